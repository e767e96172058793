//! A server's status from its pods, as a pure function.

use k8s_openapi::api::core::v1::Pod;

use crate::orchestrator::{FailureReason, Phase};

/// Phase, message and restart count derived from the server's pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The phase.
    pub phase: Phase,
    /// The kubelet's reason and message, and the pod's name.
    pub message: Option<String>,
    /// The container's restart count.
    pub restarts: u32,
    /// The pod the phase was read from.
    pub pod: Option<String>,
}

/// Waiting reasons that will not resolve by waiting, mapped to our reasons.
fn fatal_waiting(reason: &str) -> Option<FailureReason> {
    match reason {
        "CrashLoopBackOff" => Some(FailureReason::CrashLoopBackOff),
        "ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" | "ErrImageNeverPull" => {
            Some(FailureReason::ImagePull)
        }
        "CreateContainerConfigError" | "CreateContainerError" => {
            Some(FailureReason::CreateContainerConfig)
        }
        _ => None,
    }
}

/// The newest live pod of a server (not being deleted), if any.
pub fn current_pod<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Option<&'a Pod> {
    pods.into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .max_by(|a, b| {
            a.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0)
                .cmp(&b.metadata.creation_timestamp.as_ref().map(|t| t.0))
                .then_with(|| a.metadata.name.cmp(&b.metadata.name))
        })
}

/// Reads a pod's state: ready, starting, or failed with a clear reason.
pub fn observe(pod: Option<&Pod>) -> Observed {
    let Some(pod) = pod else {
        return Observed {
            phase: Phase::Pending,
            message: Some("no pod yet".into()),
            restarts: 0,
            pod: None,
        };
    };
    let name = pod.metadata.name.clone();
    let status = pod.status.as_ref();
    let conditions = status.and_then(|s| s.conditions.as_deref()).unwrap_or(&[]);
    let cstatus = status
        .and_then(|s| s.container_statuses.as_deref())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.name == super::objects::CONTAINER)
                .or(cs.first())
        });
    let restarts = cstatus.map_or(0, |c| u32::try_from(c.restart_count).unwrap_or(0));
    let at = |msg: String| Some(format!("pod {}: {msg}", name.as_deref().unwrap_or("?")));
    let observed = |phase, message| Observed {
        phase,
        message,
        restarts,
        pod: name.clone(),
    };

    if let Some(c) = conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        && c.reason.as_deref() == Some("Unschedulable")
    {
        return observed(
            Phase::Failed {
                reason: FailureReason::Unschedulable,
            },
            at(c.message
                .clone()
                .unwrap_or_else(|| "no node fits the pod".into())),
        );
    }
    if let Some(waiting) = cstatus
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.waiting.as_ref())
        && let Some(reason) = waiting.reason.as_deref()
    {
        if let Some(fatal) = fatal_waiting(reason) {
            let mut msg = reason.to_string();
            if let Some(m) = &waiting.message {
                msg.push_str(": ");
                msg.push_str(m);
            }
            if fatal == FailureReason::CrashLoopBackOff
                && let Some(t) = cstatus
                    .and_then(|c| c.last_state.as_ref())
                    .and_then(|s| s.terminated.as_ref())
            {
                msg.push_str(&format!(" (last exit code {}", t.exit_code));
                if let Some(r) = &t.reason {
                    msg.push_str(&format!(", {r}"));
                }
                msg.push(')');
            }
            return observed(Phase::Failed { reason: fatal }, at(msg));
        }
        return observed(Phase::Starting, at(reason.to_string()));
    }
    let ready = conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if ready {
        return observed(Phase::Ready, at("ready".into()));
    }
    if let Some(t) = cstatus
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
    {
        return observed(
            Phase::Starting,
            at(format!("container exited with code {}", t.exit_code)),
        );
    }
    let phase = status
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".into());
    observed(
        if phase == "Pending" {
            Phase::Pending
        } else {
            Phase::Starting
        },
        at(phase),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn reads_fatal_and_ready_states() {
        let crash = pod(
            serde_json::json!({"phase": "Running", "containerStatuses": [{
            "name": "server", "image": "x", "imageID": "", "ready": false, "restartCount": 3,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}),
        );
        let o = observe(Some(&crash));
        assert_eq!(
            o.phase,
            Phase::Failed {
                reason: FailureReason::CrashLoopBackOff
            }
        );
        assert_eq!(o.restarts, 3);
        assert_eq!(
            o.message.as_deref(),
            Some("pod p: CrashLoopBackOff: back-off 40s (last exit code 1, Error)")
        );

        let pull = pod(
            serde_json::json!({"phase": "Pending", "containerStatuses": [{
            "name": "server", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ErrImagePull"}}}]}),
        );
        assert_eq!(
            observe(Some(&pull)).phase,
            Phase::Failed {
                reason: FailureReason::ImagePull
            }
        );

        let unsched = pod(serde_json::json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: insufficient memory"}]}));
        let o = observe(Some(&unsched));
        assert_eq!(
            o.phase,
            Phase::Failed {
                reason: FailureReason::Unschedulable
            }
        );
        assert!(o.message.unwrap().contains("insufficient memory"));

        let ready = pod(
            serde_json::json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}),
        );
        assert_eq!(observe(Some(&ready)).phase, Phase::Ready);
        assert_eq!(observe(None).phase, Phase::Pending);

        let config = pod(
            serde_json::json!({"phase": "Pending", "containerStatuses": [{
            "name": "server", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "CreateContainerConfigError",
                                  "message": "secret \"mcp-x\" not found"}}}]}),
        );
        let o = observe(Some(&config));
        assert_eq!(
            o.phase,
            Phase::Failed {
                reason: FailureReason::CreateContainerConfig
            }
        );
        assert_eq!(
            o.message.as_deref(),
            Some("pod p: CreateContainerConfigError: secret \"mcp-x\" not found")
        );

        let creating = pod(
            serde_json::json!({"phase": "Pending", "containerStatuses": [{
            "name": "server", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
        );
        assert_eq!(observe(Some(&creating)).phase, Phase::Starting);
    }
}
