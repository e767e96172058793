//! What an `McpServer` resource says about its server: the status subresource (phase,
//! conditions, times) and the Events between two statuses, as pure functions.

use k8s_openapi::jiff::Timestamp;

use crate::orchestrator::spec::{McpServerCondition, McpServerStatus};
use crate::orchestrator::{Phase, ServerStatus};

/// Condition types, in the order they are written.
pub const TYPES: [&str; 4] = ["Ready", "Progressing", "Degraded", "Asleep"];

/// Longest condition message or event note, in bytes (the Events API takes 1 kB notes).
const MAX_MESSAGE: usize = 1024;

/// What the reconcile loop knows about a server besides its [`ServerStatus`].
#[derive(Debug, Default)]
pub struct Facts<'a> {
    /// The resource's `metadata.generation`.
    pub generation: Option<i64>,
    /// Where the gateway reaches the server.
    pub endpoint: Option<String>,
    /// Why the last reconcile failed, when it did.
    pub reconcile_error: Option<&'a str>,
}

/// An Event to record on the resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occurrence {
    /// A `Warning` rather than a `Normal` event.
    pub warning: bool,
    /// CamelCase reason (`Started`, `Crashed`, `ImagePullBackOff`...).
    pub reason: String,
    /// What was done (`Start`, `Restart`, `Reconcile`).
    pub action: &'static str,
    /// Details for people.
    pub note: String,
}

/// The reason a phase gives, in CamelCase.
fn phase_reason(phase: &Phase) -> String {
    match phase {
        Phase::Failed { reason } => reason.to_string(),
        other => other.name().to_string(),
    }
}

fn bounded(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// RFC 3339 at whole seconds, as Kubernetes writes `metav1.Time`.
pub fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The status subresource for `st`, keeping `prev`'s transition times where nothing changed.
pub fn render(
    st: &ServerStatus,
    facts: &Facts<'_>,
    prev: Option<&McpServerStatus>,
    now: Timestamp,
) -> McpServerStatus {
    let phase = st.phase.name().to_string();
    let message = st.message.clone().unwrap_or_default();
    let reason = phase_reason(&st.phase);
    let (progressing, degraded) = match &st.phase {
        Phase::Pending | Phase::Starting => (true, false),
        Phase::BackOff { .. } => (true, true),
        Phase::Failed { .. } => (false, true),
        Phase::Ready | Phase::Asleep | Phase::Removed => (false, false),
    };
    let asleep = st.phase == Phase::Asleep;
    let ready = st.phase == Phase::Ready;
    // A failed reconcile says nothing about the pod: it degrades, Ready keeps its own reason.
    let degraded = match facts.reconcile_error {
        _ if degraded => (true, reason.clone(), message.clone()),
        Some(e) => (true, "ReconcileFailed".into(), e.to_string()),
        None => (false, "AsExpected".into(), String::new()),
    };
    let conditions = [
        (ready, reason.clone(), message.clone()),
        (progressing, reason, message.clone()),
        degraded,
        if asleep {
            (true, "Idle".into(), message.clone())
        } else {
            (false, "Awake".into(), String::new())
        },
    ];
    let prev_condition =
        |type_: &str| prev.and_then(|p| p.conditions.iter().find(|c| c.type_ == type_));
    let conditions = TYPES
        .iter()
        .zip(conditions)
        .map(|(type_, (on, reason, message))| {
            let status = if on { "True" } else { "False" };
            let since = prev_condition(type_)
                .filter(|c| c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| rfc3339(now));
            McpServerCondition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason,
                message: bounded(message),
                last_transition_time: since,
                observed_generation: facts.generation,
            }
        })
        .collect();
    let last_transition_time = prev
        .filter(|p| p.phase.as_deref() == Some(phase.as_str()))
        .and_then(|p| p.last_transition_time.clone())
        .unwrap_or_else(|| rfc3339(now));
    McpServerStatus {
        phase: Some(phase),
        message: st.message.clone(),
        restarts: i32::try_from(st.restarts).unwrap_or(i32::MAX),
        endpoint: facts.endpoint.clone(),
        observed_generation: facts.generation,
        last_transition_time: Some(last_transition_time),
        conditions,
    }
}

fn condition<'a>(status: &'a McpServerStatus, type_: &str) -> Option<&'a McpServerCondition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// The Events that going from `prev` (`None`: a resource that had no status yet) to `next`
/// is worth: a start, a crash, a failure with its reason, a failed reconcile.
pub fn events(prev: Option<&McpServerStatus>, next: &McpServerStatus) -> Vec<Occurrence> {
    let empty = McpServerStatus::default();
    let prev = prev.unwrap_or(&empty);
    let mut out = Vec::new();
    let message = next.message.clone().unwrap_or_default();
    if next.restarts > prev.restarts {
        out.push(Occurrence {
            warning: true,
            reason: "Crashed".into(),
            action: "Restart",
            note: bounded(format!(
                "the server's container restarted ({} restarts so far): {message}",
                next.restarts
            )),
        });
    }
    let degraded = |s: &McpServerStatus| {
        condition(s, "Degraded")
            .filter(|c| c.status == "True")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    if let Some((reason, message)) = degraded(next)
        && degraded(prev).map(|d| d.0) != Some(reason.clone())
        && reason != "BackOff"
    {
        out.push(Occurrence {
            warning: true,
            action: if reason == "ReconcileFailed" {
                "Reconcile"
            } else {
                "Start"
            },
            reason,
            note: bounded(message),
        });
    }
    let (was, is) = (prev.phase.as_deref(), next.phase.as_deref());
    if is == Some("Asleep") && was != Some("Asleep") {
        out.push(Occurrence {
            warning: false,
            reason: "Slept".into(),
            action: "Sleep",
            note: bounded(format!("idle: stopped until the next call ({message})")),
        });
    }
    if was == Some("Asleep") && is != Some("Asleep") {
        out.push(Occurrence {
            warning: false,
            reason: "Woke".into(),
            action: "Wake",
            note: "a call needs it: starting it again".into(),
        });
    }
    if is == Some("Ready") && was != Some("Ready") {
        let at = next.endpoint.as_deref().unwrap_or("its endpoint");
        out.push(Occurrence {
            warning: false,
            reason: "Started".into(),
            action: "Start",
            note: bounded(format!("ready at {at}")),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::FailureReason;
    use std::time::Duration;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_780_000_000 + secs).unwrap()
    }

    fn facts() -> Facts<'static> {
        Facts {
            generation: Some(3),
            endpoint: Some("attach://mcp/mcp-x".into()),
            reconcile_error: None,
        }
    }

    fn by_type<'a>(s: &'a McpServerStatus, t: &str) -> (&'a str, &'a str, &'a str) {
        let c = condition(s, t).unwrap();
        (&c.status, &c.reason, &c.last_transition_time)
    }

    #[test]
    fn conditions_follow_the_phase_and_keep_their_transition_times() {
        let starting = ServerStatus::new(Phase::Starting).with_message("pod p: ContainerCreating");
        let s1 = render(&starting, &facts(), None, at(0));
        assert_eq!(s1.phase.as_deref(), Some("Starting"));
        assert_eq!(s1.observed_generation, Some(3));
        let types: Vec<_> = s1.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, TYPES);
        assert_eq!(by_type(&s1, "Ready").0, "False");
        assert_eq!(by_type(&s1, "Ready").1, "Starting");
        assert_eq!(by_type(&s1, "Progressing").0, "True");
        assert_eq!(
            by_type(&s1, "Degraded"),
            ("False", "AsExpected", &*rfc3339(at(0)))
        );
        assert_eq!(by_type(&s1, "Asleep").0, "False");

        let ready = ServerStatus::new(Phase::Ready).with_message("pod p: ready");
        let s2 = render(&ready, &facts(), Some(&s1), at(10));
        assert_eq!(by_type(&s2, "Ready"), ("True", "Ready", &*rfc3339(at(10))));
        assert_eq!(by_type(&s2, "Progressing").0, "False");
        // Degraded stayed False: its time is the first one.
        assert_eq!(by_type(&s2, "Degraded").2, rfc3339(at(0)));
        assert_eq!(s2.last_transition_time, Some(rfc3339(at(10))));
        // Nothing changed: the same status, byte for byte (no write).
        assert_eq!(render(&ready, &facts(), Some(&s2), at(99)), s2);

        let pull = ServerStatus::new(Phase::Failed {
            reason: FailureReason::ImagePull,
        })
        .with_message("pod p: ImagePullBackOff: not found");
        let s3 = render(&pull, &facts(), Some(&s2), at(20));
        assert_eq!(
            by_type(&s3, "Ready"),
            ("False", "ImagePullBackOff", &*rfc3339(at(20)))
        );
        assert_eq!(by_type(&s3, "Degraded").0, "True");
        assert_eq!(by_type(&s3, "Degraded").1, "ImagePullBackOff");
        assert_eq!(
            condition(&s3, "Degraded").unwrap().message,
            "pod p: ImagePullBackOff: not found"
        );

        let backoff = ServerStatus::new(Phase::BackOff {
            retry_in: Duration::from_secs(1),
        });
        let s4 = render(&backoff, &facts(), Some(&s3), at(30));
        assert_eq!(by_type(&s4, "Progressing").0, "True");
        assert_eq!(by_type(&s4, "Degraded").1, "BackOff");
        // Degraded stayed True: its time is when it became True.
        assert_eq!(by_type(&s4, "Degraded").2, rfc3339(at(20)));
    }

    #[test]
    fn a_failed_reconcile_degrades_without_hiding_readiness() {
        let ready = ServerStatus::new(Phase::Ready);
        let f = Facts {
            reconcile_error: Some("the API server said 500"),
            ..facts()
        };
        let s = render(&ready, &f, None, at(0));
        assert_eq!(by_type(&s, "Ready").0, "True");
        assert_eq!(by_type(&s, "Degraded").1, "ReconcileFailed");
        assert_eq!(
            condition(&s, "Degraded").unwrap().message,
            "the API server said 500"
        );
    }

    #[test]
    fn messages_are_bounded_at_a_character_boundary() {
        let st = ServerStatus::new(Phase::Failed {
            reason: FailureReason::CrashLoopBackOff,
        })
        .with_message("é".repeat(4000));
        let s = render(&st, &facts(), None, at(0));
        for c in &s.conditions {
            assert!(c.message.len() <= MAX_MESSAGE, "{}", c.message.len());
        }
        let ev = events(None, &s);
        assert!(ev.iter().all(|e| e.note.len() <= MAX_MESSAGE));
    }

    #[test]
    fn events_name_starts_crashes_and_failures_once() {
        let f = facts();
        let pending = render(&ServerStatus::new(Phase::Pending), &f, None, at(0));
        assert_eq!(events(None, &pending), vec![]);
        let ready = render(&ServerStatus::new(Phase::Ready), &f, Some(&pending), at(1));
        let ev = events(Some(&pending), &ready);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].reason.as_str(), ev[0].warning), ("Started", false));
        assert!(ev[0].note.contains("attach://mcp/mcp-x"), "{}", ev[0].note);
        // The same status again: nothing.
        assert_eq!(events(Some(&ready), &ready), vec![]);

        let mut crashed = ServerStatus::new(Phase::Failed {
            reason: FailureReason::CrashLoopBackOff,
        })
        .with_message("last exit code 3");
        crashed.restarts = 1;
        let crashed = render(&crashed, &f, Some(&ready), at(2));
        let reasons: Vec<_> = events(Some(&ready), &crashed)
            .into_iter()
            .map(|e| (e.reason, e.warning))
            .collect();
        assert_eq!(
            reasons,
            [
                ("Crashed".to_string(), true),
                ("CrashLoopBackOff".to_string(), true)
            ]
        );
        // Still in the crash loop, no new restart: nothing new.
        assert_eq!(events(Some(&crashed), &crashed), vec![]);
        // A resource first seen already running says it started.
        assert_eq!(events(None, &ready)[0].reason, "Started");

        let asleep = render(&ServerStatus::new(Phase::Asleep), &f, Some(&ready), at(3));
        assert_eq!(
            by_type(&asleep, "Asleep"),
            ("True", "Idle", &*rfc3339(at(3)))
        );
        assert_eq!(by_type(&asleep, "Ready").1, "Asleep");
        assert_eq!(by_type(&asleep, "Degraded").0, "False");
        let reasons =
            |a, b| -> Vec<String> { events(Some(a), b).into_iter().map(|e| e.reason).collect() };
        assert_eq!(reasons(&ready, &asleep), ["Slept"]);
        let waking = render(
            &ServerStatus::new(Phase::Starting),
            &f,
            Some(&asleep),
            at(4),
        );
        assert_eq!(reasons(&asleep, &waking), ["Woke"]);
        let awake = render(&ServerStatus::new(Phase::Ready), &f, Some(&waking), at(5));
        assert_eq!(reasons(&waking, &awake), ["Started"]);
    }
}
