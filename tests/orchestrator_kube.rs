//! The kubernetes backend end to end against the fake API server (tests/fake_kube).

mod fake_kube;
mod support;

use fake_kube::mcp::{Mcp, tool_names};

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine;
use fake_kube::{FakeKube, Kind};
use gatehouse::orchestrator::kubernetes::lease::LeaseSettings;
use gatehouse::orchestrator::kubernetes::{KubeOptions, KubeRuntime, KubeSettings};
use gatehouse::orchestrator::spec::{
    EnvVarSpec, McpServerSpec, ServerDef, TransportKind, TransportSpec,
};
use gatehouse::orchestrator::{
    Endpoint, FailureReason, Handover, LogOptions, OrchestratorError, Phase, Runtime,
};
use serde_json::json;
use tokio::io::AsyncWriteExt;

const NS: &str = "mcp";
const GATEHOUSE: &str = env!("CARGO_BIN_EXE_gatehouse");

fn options() -> KubeOptions {
    KubeOptions {
        watch_mcpservers: false,
        retry_after: Duration::from_millis(200),
        attach_timeout: Duration::from_secs(10),
        ..KubeOptions::default()
    }
}

fn example(name: &str, image: &str, extra_args: &[&str]) -> ServerDef {
    let mut args = vec!["example-server".to_string(), "--name".into(), name.into()];
    args.extend(extra_args.iter().map(|s| s.to_string()));
    ServerDef {
        name: name.into(),
        spec: McpServerSpec {
            image: Some(image.into()),
            command: Some(GATEHOUSE.into()),
            args,
            env: vec![
                EnvVarSpec {
                    name: "GREETING".into(),
                    value: Some("hello".into()),
                    ..EnvVarSpec::default()
                },
                EnvVarSpec {
                    name: "API_TOKEN".into(),
                    secret_value: Some("tok-123".into()),
                    ..EnvVarSpec::default()
                },
            ],
            labels: BTreeMap::from([("team".into(), "tools".into())]),
            ..McpServerSpec::default()
        },
    }
}

async fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn open(rt: &dyn Runtime, name: &str) -> Mcp {
    match rt.endpoint(name).await.unwrap() {
        Endpoint::Stdio(s) => Mcp::new(s.open().await.unwrap()),
        other => panic!("expected stdio, got {other:?}"),
    }
}

fn writes(fake: &FakeKube) -> Vec<String> {
    fake.requests()
        .iter()
        .filter(|r| r.is_write())
        .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn define_server_runs_hardened_pod_and_attach_speaks_mcp() {
    let fake = FakeKube::start().await;
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, options());
    let server = example("example", "ghcr.io/gatehouse/example:1", &[])
        .resolve()
        .unwrap();
    rt.apply(server).await.unwrap();
    let endpoint = rt
        .wait_ready("example", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(matches!(endpoint, Endpoint::Stdio(_)));

    // What the API server was asked: Secret first (no owner yet), the Deployment, then
    // the Secret again owned by the Deployment. All server-side apply as `gatehouse`.
    let base = "/api/v1/namespaces/mcp/secrets/mcp-example?&force=true&fieldManager=gatehouse";
    let dep =
        "/apis/apps/v1/namespaces/mcp/deployments/mcp-example?&force=true&fieldManager=gatehouse";
    let w = writes(&fake);
    assert_eq!(
        w,
        [
            format!("PATCH {base}"),
            format!("PATCH {dep}"),
            format!("PATCH {base}")
        ],
        "{w:#?}"
    );
    let reqs = fake.requests();
    let applies: Vec<_> = reqs.iter().filter(|r| r.is_write()).collect();
    for r in &applies {
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
    }
    assert!(
        applies[0].body.as_ref().unwrap()["metadata"]
            .get("ownerReferences")
            .is_none()
    );
    let dep_obj = fake.get(Kind::Deployment, NS, "mcp-example").unwrap();
    let dep_uid = dep_obj["metadata"]["uid"].as_str().unwrap();
    assert_eq!(
        applies[2].body.as_ref().unwrap()["metadata"]["ownerReferences"][0]["uid"],
        dep_uid
    );

    // The Deployment: labels, one replica, hardened pod, secrets only by reference.
    assert!(
        !dep_obj.to_string().contains("tok-123"),
        "secret value inlined: {dep_obj}"
    );
    let labels = &dep_obj["metadata"]["labels"];
    assert_eq!(labels["gatehouse.dev/server"], "example");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "gatehouse");
    assert_eq!(labels["team"], "tools");
    assert_eq!(dep_obj["spec"]["replicas"], 1);
    let pod_spec = &dep_obj["spec"]["template"]["spec"];
    assert_eq!(pod_spec["automountServiceAccountToken"], false);
    assert_eq!(pod_spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod_spec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod_spec["containers"][0];
    assert_eq!(c["name"], "server");
    assert_eq!(c["image"], "ghcr.io/gatehouse/example:1");
    assert_eq!(c["command"], json!([GATEHOUSE]));
    assert_eq!(
        (&c["stdin"], &c["stdinOnce"], &c["tty"]),
        (&json!(true), &json!(false), &json!(false))
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["env"][0], json!({"name": "GREETING", "value": "hello"}));
    assert_eq!(
        c["env"][1],
        json!({"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "mcp-example", "key": "API_TOKEN", "optional": false}}})
    );

    // The Secret holds the value and is owned by the Deployment.
    let secret = fake.get(Kind::Secret, NS, "mcp-example").unwrap();
    let token = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["API_TOKEN"].as_str().unwrap())
        .unwrap();
    assert_eq!(token, b"tok-123");
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["kind"],
        "Deployment"
    );
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], dep_uid);
    assert!(
        fake.get(Kind::Service, NS, "mcp-example").is_none(),
        "no Service for stdio"
    );

    // The Pod came from the template (the fake's Deployment controller).
    let pod = fake.pod_of(NS, "mcp-example").expect("a pod");
    assert_eq!(pod["metadata"]["labels"]["gatehouse.dev/server"], "example");

    // Attach and speak MCP with the example server running as the pod's process.
    fake.clear_requests();
    let mut mcp = open(&rt, "example").await;
    let init = mcp.handshake().await;
    assert_eq!(
        init["result"]["serverInfo"]["name"], "gatehouse-example",
        "{init}"
    );
    let list = mcp.call(2, "tools/list", json!({})).await;
    assert!(tool_names(&list).contains(&"echo".to_string()), "{list}");
    let who = mcp
        .call(3, "tools/call", json!({"name": "whoami", "arguments": {}}))
        .await;
    assert!(who.to_string().contains("example"), "{who}");
    let attach = fake
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/attach"))
        .expect("an attach request");
    assert_eq!(
        attach.path,
        format!(
            "/api/v1/namespaces/mcp/pods/{}/attach",
            pod["metadata"]["name"].as_str().unwrap()
        )
    );
    assert_eq!(attach.query, "&stdin=true&stdout=true&container=server");

    // A second attachment to the same process (the first one stays usable afterwards).
    let mut second = open(&rt, "example").await;
    let list = second.call(10, "tools/list", json!({})).await;
    assert!(tool_names(&list).contains(&"add".to_string()));
    drop(second);

    // Logs come from pods/log, bounded like the local backend's buffer.
    fake.clear_requests();
    let logs = rt.logs("example", LogOptions::default()).await.unwrap();
    assert!(logs.contains("protocolVersion"), "{logs}");
    let asked: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/log"))
        .collect();
    assert_eq!(
        asked.len(),
        1,
        "{:?}",
        asked.iter().map(|r| r.line()).collect::<Vec<_>>()
    );
    assert!(
        asked[0].query.contains(&format!(
            "limitBytes={}",
            gatehouse::orchestrator::logbuf::LOG_BYTES
        )),
        "{}",
        asked[0].line()
    );

    // Steady state: the reconcile loop is watch-driven, it does not poll.
    fake.clear_requests();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| !r.query.contains("watch=true"))
        .map(|r| r.line())
        .collect();
    assert!(after.is_empty(), "requests at steady state: {after:?}");

    // Remove: owner references take the Secret and the Pod with the Deployment.
    drop(mcp);
    rt.remove("example").await.unwrap();
    assert!(fake.get(Kind::Deployment, NS, "mcp-example").is_none());
    assert!(fake.get(Kind::Secret, NS, "mcp-example").is_none());
    assert!(fake.list(Kind::Pod, NS).is_empty());
    assert!(matches!(
        rt.status("example").await,
        Err(OrchestratorError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_shows_in_status_and_restart_recovers() {
    let fake = FakeKube::start().await;
    fake.configure(|s| s.crash_backoff = Duration::from_secs(60));
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, options());
    let server = example("crashy", "ghcr.io/gatehouse/example:1", &["--test-tools"])
        .resolve()
        .unwrap();
    rt.apply(server).await.unwrap();
    rt.wait_ready("crashy", Duration::from_secs(10))
        .await
        .unwrap();

    let mut mcp = open(&rt, "crashy").await;
    mcp.handshake().await;
    mcp.send(json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "crash", "arguments": {}}}))
        .await;
    // The attachment ends with the process.
    assert!(
        mcp.drain(Duration::from_secs(5)).await,
        "attachment did not end when the process exited"
    );

    // Status: CrashLoopBackOff with the exit code; the readiness wait fails fast.
    let mut status = None;
    for _ in 0..250 {
        let st = rt.status("crashy").await.unwrap();
        if matches!(st.phase, Phase::Failed { .. }) {
            status = Some(st);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = status.expect("status shows the crash");
    assert_eq!(
        st.phase,
        Phase::Failed {
            reason: FailureReason::CrashLoopBackOff
        }
    );
    assert!(
        st.message.as_deref().unwrap().contains("last exit code 3"),
        "{st:?}"
    );
    assert_eq!(st.restarts, 1);
    let started = Instant::now();
    let err = rt
        .wait_ready("crashy", Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "fails fast");
    assert!(
        matches!(
            err,
            OrchestratorError::Failed {
                reason: FailureReason::CrashLoopBackOff,
                ..
            }
        ),
        "{err}"
    );

    // The previous container's logs hold the crashed run's output.
    let previous = rt
        .logs(
            "crashy",
            LogOptions {
                previous: true,
                tail_lines: None,
            },
        )
        .await
        .unwrap();
    assert!(previous.contains("protocolVersion"), "{previous}");

    // Restart: the pod is replaced and the server answers again.
    let old_pod = fake.pod_of(NS, "mcp-crashy").unwrap()["metadata"]["name"].clone();
    fake.clear_requests();
    rt.restart("crashy").await.unwrap();
    assert_eq!(
        writes(&fake),
        [format!(
            "DELETE /api/v1/namespaces/mcp/pods/{}?",
            old_pod.as_str().unwrap()
        )]
    );
    rt.wait_ready("crashy", Duration::from_secs(10))
        .await
        .unwrap();
    let new_pod = fake.pod_of(NS, "mcp-crashy").unwrap()["metadata"]["name"].clone();
    assert_ne!(old_pod, new_pod);
    let mut mcp = open(&rt, "crashy").await;
    mcp.handshake().await;
    let list = mcp.call(2, "tools/list", json!({})).await;
    assert!(tool_names(&list).contains(&"crash".to_string()));
    let err = rt
        .logs(
            "crashy",
            LogOptions {
                previous: true,
                tail_lines: None,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, OrchestratorError::NoLogs { .. }),
        "a fresh pod has no previous logs: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpullable_image_fails_fast_with_a_clear_reason() {
    let fake = FakeKube::start().await;
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, options());
    let server = example("broken", "registry.example/unpullable:404", &[])
        .resolve()
        .unwrap();
    rt.apply(server).await.unwrap();
    let started = Instant::now();
    let err = rt
        .wait_ready("broken", Duration::from_secs(20))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "fails fast: {:?}",
        started.elapsed()
    );
    match &err {
        OrchestratorError::Failed {
            server,
            reason,
            message,
        } => {
            assert_eq!(server, "broken");
            assert_eq!(*reason, FailureReason::ImagePull);
            let m = message.as_deref().unwrap();
            assert!(m.contains("unpullable:404"), "{m}");
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("ImagePullBackOff"), "{err}");
    let st = rt.status("broken").await.unwrap();
    assert_eq!(
        st.phase,
        Phase::Failed {
            reason: FailureReason::ImagePull
        }
    );

    // An unschedulable pod fails fast too.
    let server = example("huge", "registry.example/unschedulable:1", &[])
        .resolve()
        .unwrap();
    rt.apply(server).await.unwrap();
    let err = rt
        .wait_ready("huge", Duration::from_secs(20))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OrchestratorError::Failed { reason: FailureReason::Unschedulable, message: Some(m), .. } if m.contains("Insufficient memory")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptied_secret_is_restored() {
    let fake = FakeKube::start().await;
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, options());
    rt.apply(
        example("cfg", "ghcr.io/gatehouse/example:1", &[])
            .resolve()
            .unwrap(),
    )
    .await
    .unwrap();
    rt.wait_ready("cfg", Duration::from_secs(10)).await.unwrap();
    // Someone empties the Secret: the reconcile loop puts the key back (drift).
    fake.patch(
        Kind::Secret,
        NS,
        "mcp-cfg",
        json!({"data": {"API_TOKEN": null}}),
    );
    eventually("secret restored", Duration::from_secs(5), || {
        fake.get(Kind::Secret, NS, "mcp-cfg")
            .filter(|s| s["data"].get("API_TOKEN").is_some())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_or_drifted_deployment_is_restored() {
    let fake = FakeKube::start().await;
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, options());
    rt.apply(
        example("steady", "ghcr.io/gatehouse/example:1", &[])
            .resolve()
            .unwrap(),
    )
    .await
    .unwrap();
    rt.wait_ready("steady", Duration::from_secs(10))
        .await
        .unwrap();
    let old_uid = fake.get(Kind::Deployment, NS, "mcp-steady").unwrap()["metadata"]["uid"].clone();
    let old_secret = fake.get(Kind::Secret, NS, "mcp-steady").unwrap()["metadata"]["uid"].clone();

    // Deleted behind our back (the garbage collector takes the Secret and Pod too). The
    // reconcile loop runs meanwhile and may already have made a new Secret: the old one is gone.
    fake.delete(Kind::Deployment, NS, "mcp-steady");
    let secret = fake.get(Kind::Secret, NS, "mcp-steady");
    assert!(
        secret.is_none_or(|s| s["metadata"]["uid"] != old_secret),
        "the garbage collector took the Secret with its Deployment"
    );
    let dep = eventually("deployment recreated", Duration::from_secs(5), || {
        fake.get(Kind::Deployment, NS, "mcp-steady")
    })
    .await;
    assert_ne!(dep["metadata"]["uid"], old_uid);
    let secret = eventually("secret recreated and owned", Duration::from_secs(5), || {
        fake.get(Kind::Secret, NS, "mcp-steady")
            .filter(|s| s["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"])
    })
    .await;
    assert!(secret["data"]["API_TOKEN"].is_string());
    rt.wait_ready("steady", Duration::from_secs(10))
        .await
        .unwrap();
    let mut mcp = open(&rt, "steady").await;
    mcp.handshake().await;

    // Drift: someone changes the image; the reconcile loop puts ours back.
    fake.patch(
        Kind::Deployment,
        NS,
        "mcp-steady",
        json!({"spec": {"template": {"spec": {"containers": [{"name": "server", "image": "evil:latest"}]}}}}),
    );
    eventually("image restored", Duration::from_secs(5), || {
        fake.get(Kind::Deployment, NS, "mcp-steady").filter(|d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/gatehouse/example:1"
                && d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] == true
        })
    })
    .await;
    rt.wait_ready("steady", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(rt.stats().errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_reconciles() {
    let fake = FakeKube::start().await;
    let lease = |id: &str| LeaseSettings {
        lease_duration: Duration::from_millis(800),
        renew_every: Duration::from_millis(150),
        retry_every: Duration::from_millis(100),
        ..LeaseSettings::new("gatehouse-orchestrator", id)
    };
    let a = KubeRuntime::start_with_client(
        fake.client(NS),
        NS.into(),
        Some(lease("replica-a")),
        options(),
    );
    let b = KubeRuntime::start_with_client(
        fake.client(NS),
        NS.into(),
        Some(lease("replica-b")),
        options(),
    );
    eventually("a leader", Duration::from_secs(5), || {
        (a.is_leader() || b.is_leader()).then_some(())
    })
    .await;
    // Let both run a few rounds: still exactly one leader.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(a.is_leader() ^ b.is_leader(), "exactly one leader");
    let (leader, follower, leader_id) = if a.is_leader() {
        (a, b, "replica-a")
    } else {
        (b, a, "replica-b")
    };
    let lease_obj = fake.get(Kind::Lease, NS, "gatehouse-orchestrator").unwrap();
    assert_eq!(lease_obj["spec"]["holderIdentity"], leader_id);
    assert_eq!(lease_obj["spec"]["leaseTransitions"], 0);

    let server = example("shared", "ghcr.io/gatehouse/example:1", &[])
        .resolve()
        .unwrap();
    leader.apply(server.clone()).await.unwrap();
    follower.apply(server).await.unwrap();
    leader
        .wait_ready("shared", Duration::from_secs(10))
        .await
        .unwrap();
    // The follower sees the same server through its watches, without writing.
    let start = Instant::now();
    while !follower.status("shared").await.is_ok_and(|s| s.is_ready()) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the follower sees it ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It never attaches beside the leader: with no relay to go through, it says so.
    let err = follower
        .wait_ready("shared", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("relay"), "{err}");
    assert!(leader.stats().applies >= 2);
    assert_eq!(follower.stats().applies, 0);
    assert_eq!(follower.stats().deletes, 0);

    // The leader steps down: the follower takes over and repairs what breaks.
    leader.shutdown().await;
    eventually("follower leads", Duration::from_secs(5), || {
        follower.is_leader().then_some(())
    })
    .await;
    let lease_obj = fake.get(Kind::Lease, NS, "gatehouse-orchestrator").unwrap();
    assert_ne!(lease_obj["spec"]["holderIdentity"], leader_id);
    assert_eq!(lease_obj["spec"]["leaseTransitions"], 1);
    fake.delete(Kind::Deployment, NS, "mcp-shared");
    // Counted once the apply's answer is back, which can be after the object is visible.
    eventually(
        "recreated by the new leader",
        Duration::from_secs(5),
        || {
            fake.get(Kind::Deployment, NS, "mcp-shared")
                .filter(|_| follower.stats().applies >= 1)
        },
    )
    .await;
    // Lease writes always carry the resourceVersion they read (conflicts → 409).
    for r in fake
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.path.contains("/leases/"))
    {
        assert!(r.body.as_ref().unwrap()["metadata"]["resourceVersion"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_conflict_is_a_409_not_two_leaders() {
    let fake = FakeKube::start().await;
    let client = fake.client(NS);
    let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(client, NS);
    let lease: k8s_openapi::api::coordination::v1::Lease = serde_json::from_value(json!({
        "metadata": {"name": "l"}, "spec": {"holderIdentity": "x", "leaseDurationSeconds": 15}
    }))
    .unwrap();
    let created = api.create(&Default::default(), &lease).await.unwrap();
    let mut first = created.clone();
    first.spec.as_mut().unwrap().holder_identity = Some("a".into());
    api.replace("l", &Default::default(), &first).await.unwrap();
    let mut second = created;
    second.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let err = api
        .replace("l", &Default::default(), &second)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409),
        "{err}"
    );
    let err = api.create(&Default::default(), &lease).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409 && e.reason == "AlreadyExists"),
        "{err}"
    );
    let err = api.get("nope").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 404),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_with_insecure_skip_tls_verify_and_an_http_server() {
    let fake = FakeKube::start_tls().await;
    let dir = std::env::temp_dir().join(format!("gatehouse-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = fake.write_kubeconfig(&dir, "tools", "secret-token");
    let env = BTreeMap::from([
        (
            "GATEHOUSE_ORCHESTRATOR_KUBECONFIG",
            kubeconfig.display().to_string(),
        ),
        (
            "GATEHOUSE_ORCHESTRATOR_LEADER_ELECTION",
            "false".to_string(),
        ),
        (
            "GATEHOUSE_ORCHESTRATOR_WATCH_MCPSERVERS",
            "false".to_string(),
        ),
    ]);
    let settings = KubeSettings::from_env_with(|k| env.get(k).cloned())
        .unwrap()
        .unwrap();
    assert!(
        settings.namespace.is_none(),
        "namespace from the kubeconfig's context"
    );
    let rt = KubeRuntime::start(settings).await.unwrap();
    assert_eq!(rt.namespace(), "tools");
    // Ready once it listens on its port (the readiness probe); the fake's pods are 127.0.0.1.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = ServerDef {
        name: "web".into(),
        spec: McpServerSpec {
            image: Some("ghcr.io/gatehouse/example:1".into()),
            command: Some(GATEHOUSE.into()),
            args: vec![
                "example-server".into(),
                "--http".into(),
                format!("127.0.0.1:{port}"),
            ],
            transport: TransportSpec {
                kind: TransportKind::StreamableHttp,
                port: Some(port),
                path: None,
            },
            ..McpServerSpec::default()
        },
    };
    rt.apply(server.resolve().unwrap()).await.unwrap();
    let endpoint = rt.wait_ready("web", Duration::from_secs(10)).await.unwrap();
    // The server's own pod (the fake kubelet's pods have IP 127.0.0.1), not the Service:
    // its label selector would also pick a look-alike pod.
    match endpoint {
        Endpoint::Http { url } => assert_eq!(url, format!("http://127.0.0.1:{port}/mcp")),
        other => panic!("{other:?}"),
    }
    let svc = eventually("service", Duration::from_secs(5), || {
        fake.get(Kind::Service, "tools", "mcp-web")
    })
    .await;
    let dep = fake.get(Kind::Deployment, "tools", "mcp-web").unwrap();
    assert_eq!(svc["spec"]["selector"]["gatehouse.dev/server"], "web");
    assert_eq!(svc["spec"]["ports"][0]["port"], port);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "mcp");
    assert_eq!(
        svc["metadata"]["ownerReferences"][0]["uid"],
        dep["metadata"]["uid"]
    );
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["ports"][0]["containerPort"], port);
    assert!(c.get("stdin").is_none(), "no stdin for HTTP servers");
    assert!(
        fake.get(Kind::Secret, "tools", "mcp-web").is_none(),
        "no secret values, no Secret"
    );
    for r in fake.requests() {
        assert_eq!(
            r.authorization.as_deref(),
            Some("Bearer secret-token"),
            "{}",
            r.line()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcpserver_resources_are_run_owned_and_reported() {
    let fake = FakeKube::start().await;
    let rt = KubeRuntime::start_with_client(
        fake.client(NS),
        NS.into(),
        None,
        KubeOptions {
            watch_mcpservers: true,
            ..options()
        },
    );
    // As a gateway does: its configuration (none) first.
    rt.sync(Vec::new()).await.unwrap();
    let cr = fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": "from-crd"}, "spec": {
            "image": "ghcr.io/gatehouse/example:1", "command": GATEHOUSE, "args": ["example-server"],
            "env": [{"name": "TOKEN", "secretValue": "abc"}],
        }}),
    );
    let cr_uid = cr["metadata"]["uid"].clone();
    // The resource reaches the runtime through its watch.
    let start = Instant::now();
    while rt.status("from-crd").await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(5), "resource seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.wait_ready("from-crd", Duration::from_secs(10))
        .await
        .unwrap();
    let dep = fake.get(Kind::Deployment, NS, "mcp-from-crd").unwrap();
    assert_eq!(dep["metadata"]["ownerReferences"][0]["kind"], "McpServer");
    assert_eq!(dep["metadata"]["ownerReferences"][0]["uid"], cr_uid);
    let secret = fake.get(Kind::Secret, NS, "mcp-from-crd").unwrap();
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], cr_uid);
    // Status written through the status subresource.
    let cr = eventually("status written", Duration::from_secs(5), || {
        fake.get(Kind::McpServer, NS, "from-crd")
            .filter(|c| c["status"]["phase"] == "Ready")
    })
    .await;
    assert_eq!(cr["status"]["endpoint"], "attach://mcp/mcp-from-crd");
    assert!(fake.requests().iter().any(|r| r.method == "PATCH"
        && r.path == "/apis/gatehouse.dev/v1alpha1/namespaces/mcp/mcpservers/from-crd/status"));
    let mut mcp = open(&rt, "from-crd").await;
    mcp.handshake().await;
    drop(mcp);

    // An invalid resource is reported, not run.
    fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": "bad"}, "spec": {"command": "x"}}),
    );
    let cr = eventually("invalid reported", Duration::from_secs(5), || {
        fake.get(Kind::McpServer, NS, "bad")
            .filter(|c| c["status"]["phase"] == "Failed")
    })
    .await;
    assert!(
        cr["status"]["message"].as_str().unwrap().contains("image"),
        "{cr}"
    );
    assert!(fake.get(Kind::Deployment, NS, "mcp-bad").is_none());

    // Deleting the resource removes everything through owner references.
    fake.delete(Kind::McpServer, NS, "from-crd");
    assert!(fake.get(Kind::Deployment, NS, "mcp-from-crd").is_none());
    assert!(fake.get(Kind::Secret, NS, "mcp-from-crd").is_none());
    let start = Instant::now();
    while rt.status("from-crd").await.is_ok() {
        assert!(start.elapsed() < Duration::from_secs(5), "server forgotten");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn settings_from_the_environment() {
    let none = KubeSettings::from_env_with(|_| None).unwrap();
    assert!(none.is_none(), "no cluster settings: local backend");
    let both = BTreeMap::from([
        ("GATEHOUSE_ORCHESTRATOR_KUBECONFIG", "/k"),
        (
            "GATEHOUSE_ORCHESTRATOR_LOAD_KUBECONFIG_FROM_CURRENT_CLUSTER",
            "true",
        ),
    ]);
    let err = KubeSettings::from_env_with(|k| both.get(k).map(|s| s.to_string())).unwrap_err();
    assert!(err.to_string().contains("not both"), "{err}");
    let in_cluster = BTreeMap::from([
        (
            "GATEHOUSE_ORCHESTRATOR_LOAD_KUBECONFIG_FROM_CURRENT_CLUSTER",
            "true",
        ),
        ("GATEHOUSE_ORCHESTRATOR_K8S_NAMESPACE", "mcp-servers"),
        ("POD_NAME", "gatehouse-7d9f"),
    ]);
    let s = KubeSettings::from_env_with(|k| in_cluster.get(k).map(|s| s.to_string()))
        .unwrap()
        .unwrap();
    assert_eq!(
        s.source,
        gatehouse::orchestrator::kubernetes::ConfigSource::InCluster
    );
    assert_eq!(s.namespace.as_deref(), Some("mcp-servers"));
    let lease = s.leader_election.unwrap();
    assert!(
        lease.identity.starts_with("gatehouse-7d9f_"),
        "{}",
        lease.identity
    );
    let bad = BTreeMap::from([(
        "GATEHOUSE_ORCHESTRATOR_LOAD_KUBECONFIG_FROM_CURRENT_CLUSTER",
        "maybe",
    )]);
    assert!(KubeSettings::from_env_with(|k| bad.get(k).map(|s| s.to_string())).is_err());
    // The operator's default egress: a preset, `unrestricted`, or refused naming the variable.
    let with_egress = |v: &'static str| {
        let mut env = in_cluster.clone();
        env.insert("GATEHOUSE_ORCHESTRATOR_DEFAULT_EGRESS", v);
        KubeSettings::from_env_with(move |k| env.get(k).map(|s| s.to_string()))
    };
    let preset = |v| {
        with_egress(v)
            .unwrap()
            .unwrap()
            .options
            .policy
            .default_egress
    };
    assert_eq!(
        preset("dns-and-https"),
        Some(gatehouse::orchestrator::egress::EgressPreset::DnsAndHttps)
    );
    assert_eq!(preset("unrestricted"), None);
    assert_eq!(s.options.policy.default_egress, None, "unset: no policy");
    let err = with_egress("everything").unwrap_err().to_string();
    assert!(
        err.contains("GATEHOUSE_ORCHESTRATOR_DEFAULT_EGRESS"),
        "{err}"
    );
    let cilium = |v: &'static str| {
        let mut env = in_cluster.clone();
        env.insert("GATEHOUSE_ORCHESTRATOR_CILIUM", v);
        KubeSettings::from_env_with(move |k| env.get(k).map(|s| s.to_string()))
    };
    assert!(cilium("true").unwrap().unwrap().options.policy.cilium);
    assert!(!s.options.policy.cilium);
    assert!(cilium("yes").is_err());
    let with = |k: &'static str, v: &'static str| {
        let mut env = in_cluster.clone();
        env.insert(k, v);
        KubeSettings::from_env_with(move |k| env.get(k).map(|s| s.to_string()))
    };
    let p = with(
        "GATEHOUSE_ORCHESTRATOR_EGRESS_PRIVATE_CIDRS",
        "10.1.0.0/16, 192.168.5.0/24",
    )
    .unwrap()
    .unwrap()
    .options
    .policy;
    assert_eq!(p.egress_private_cidrs, ["10.1.0.0/16", "192.168.5.0/24"]);
    for (k, v) in [
        ("GATEHOUSE_ORCHESTRATOR_EGRESS_PRIVATE_CIDRS", "10.1.0.1/16"),
        ("GATEHOUSE_ORCHESTRATOR_EGRESS_EXCEPT", "0.0.0.0/0"),
        ("GATEHOUSE_ORCHESTRATOR_EGRESS_EXCEPT", "nope"),
        (
            "GATEHOUSE_ORCHESTRATOR_EGRESS_EXCEPT",
            "::ffff:10.0.0.0/104",
        ),
    ] {
        let err = with(k, v).unwrap_err().to_string();
        assert!(err.contains(k), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_works_over_the_older_v4_channel_protocol() {
    let fake = FakeKube::start().await;
    fake.configure(|s| s.attach_protocols = vec!["v4.channel.k8s.io"]);
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, options());
    rt.apply(
        example("old", "ghcr.io/gatehouse/example:1", &[])
            .resolve()
            .unwrap(),
    )
    .await
    .unwrap();
    rt.wait_ready("old", Duration::from_secs(10)).await.unwrap();
    let mut mcp = open(&rt, "old").await;
    mcp.handshake().await;
    let list = mcp.call(2, "tools/list", json!({})).await;
    assert!(tool_names(&list).contains(&"echo".to_string()));
    // No subprotocol in common: a clear error, not a hang.
    fake.configure(|s| s.attach_protocols = vec![]);
    let Endpoint::Stdio(ep) = rt.endpoint("old").await.unwrap() else {
        unreachable!()
    };
    let err = ep.open().await.unwrap_err();
    assert!(matches!(err, OrchestratorError::Attach { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_deletes_leftovers_only_once_it_knows_its_config() {
    let fake = FakeKube::start().await;
    // With a Secret and an egress policy: a restart writes neither, nor the Deployment.
    let mut keep = example("keep", "ghcr.io/gatehouse/example:1", &[]);
    keep.spec.egress = Some(
        serde_json::from_value(json!({"preset": "dns-and-https",
            "allow": [{"host": "api.github.com", "ports": [443]}]}))
        .unwrap(),
    );
    let a = keep.resolve().unwrap();
    let b = example("drop", "ghcr.io/gatehouse/example:1", &[])
        .resolve()
        .unwrap();
    {
        let first = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, options());
        first.sync(vec![a.clone(), b]).await.unwrap();
        first
            .wait_ready("keep", Duration::from_secs(10))
            .await
            .unwrap();
        first
            .wait_ready("drop", Duration::from_secs(10))
            .await
            .unwrap();
    }
    let pod_before = fake.pod_of(NS, "mcp-keep").unwrap()["metadata"]["uid"].clone();
    assert!(fake.get(Kind::NetworkPolicy, NS, "mcp-keep").is_some());
    // The gateway restarts; "drop" is no longer in its config.
    let second = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, options());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        fake.get(Kind::Deployment, NS, "mcp-drop").is_some(),
        "nothing is deleted before the config is known"
    );
    fake.clear_requests();
    second.sync(vec![a]).await.unwrap();
    eventually("leftover deleted", Duration::from_secs(5), || {
        fake.get(Kind::Deployment, NS, "mcp-drop")
            .is_none()
            .then_some(())
    })
    .await;
    second
        .wait_ready("keep", Duration::from_secs(10))
        .await
        .unwrap();
    // The Deployment goes (its Secret with it, through the owner reference; a delete of
    // the Secret may race the watch and find it gone). Nothing is written for "keep".
    let w = writes(&fake);
    assert_eq!(
        w[0],
        "DELETE /apis/apps/v1/namespaces/mcp/deployments/mcp-drop?"
    );
    assert!(
        w[1..]
            .iter()
            .all(|r| r == "DELETE /api/v1/namespaces/mcp/secrets/mcp-drop?"),
        "{w:?}"
    );
    assert!(fake.get(Kind::Secret, NS, "mcp-drop").is_none());
    assert!(fake.get(Kind::Deployment, NS, "mcp-keep").is_some());
    assert_eq!(
        fake.pod_of(NS, "mcp-keep").unwrap()["metadata"]["uid"],
        pod_before,
        "the server's pod was not restarted"
    );
}

/// Whether any request the fake API server received mentions `needle` (path or body).
fn sent(fake: &FakeKube, needle: &str) -> Vec<String> {
    fake.requests()
        .iter()
        .filter(|r| {
            r.path.contains(needle)
                || r.body
                    .as_ref()
                    .is_some_and(|b| b.to_string().contains(needle))
        })
        .map(|r| r.line())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcpserver_resources_cannot_escalate() {
    let fake = FakeKube::start().await;
    let rt = KubeRuntime::start_with_client(
        fake.client(NS),
        NS.into(),
        None,
        KubeOptions {
            watch_mcpservers: true,
            ..options()
        },
    );
    // As a gateway does: its configuration (none) first.
    rt.sync(Vec::new()).await.unwrap();
    // A value of the gateway's own environment that a resource tries to read.
    let var = "PATH";
    let value = std::env::var(var).unwrap();
    let attacks = [
        (
            "as-gateway",
            json!({"serviceAccountName": "gatehouse"}),
            "serviceAccountName",
        ),
        (
            "as-other",
            json!({"serviceAccountName": "ci-bot"}),
            "serviceAccountName",
        ),
        (
            "with-token",
            json!({"automountServiceAccountToken": true}),
            "automountServiceAccountToken",
        ),
        (
            "reads-env",
            json!({"env": [{"name": "STOLEN", "secretFromEnv": var}]}),
            "env[0].secretFromEnv",
        ),
        // The metadata endpoint as an IPv4-mapped IPv6 range.
        (
            "mapped-metadata",
            json!({"egress": {"allow": [{"cidr": "::ffff:169.254.169.254/128"}]}}),
            "egress.allow[0].cidr",
        ),
    ];
    for (name, extra, _) in &attacks {
        let mut spec = json!({"image": "ghcr.io/gatehouse/example:1", "command": GATEHOUSE,
            "args": ["example-server"]});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        fake.create(
            Kind::McpServer,
            NS,
            json!({"metadata": {"name": name}, "spec": spec}),
        );
    }
    // A well-behaved resource after them: once it runs, the others have been judged.
    fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": "fine"}, "spec": {"image": "ghcr.io/gatehouse/example:1",
            "command": GATEHOUSE, "args": ["example-server"]}}),
    );
    let start = Instant::now();
    while rt.status("fine").await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(5), "resource seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.wait_ready("fine", Duration::from_secs(10))
        .await
        .unwrap();
    for (name, _, field) in &attacks {
        let cr = eventually(&format!("{name} reported"), Duration::from_secs(5), || {
            fake.get(Kind::McpServer, NS, name)
                .filter(|c| c["status"]["phase"] == "Failed")
        })
        .await;
        let message = cr["status"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{name}: {message}");
        assert!(
            fake.get(Kind::Deployment, NS, &format!("mcp-{name}"))
                .is_none()
        );
        assert!(fake.get(Kind::Secret, NS, &format!("mcp-{name}")).is_none());
        let writes: Vec<String> = writes(&fake)
            .into_iter()
            .filter(|w| w.contains(&format!("mcp-{name}")))
            .collect();
        assert!(writes.is_empty(), "{name}: {writes:?}");
    }
    assert!(
        sent(&fake, &value).is_empty(),
        "the gateway's {var} reached the API server"
    );
    // The pod that does run: the namespace's default account, no token, bounded resources.
    let dep = fake.get(Kind::Deployment, NS, "mcp-fine").unwrap();
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "default");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(
        (&pod["hostNetwork"], &pod["hostPID"], &pod["hostIPC"]),
        (&json!(false), &json!(false), &json!(false))
    );
    assert_eq!(
        pod["volumes"],
        json!([{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}])
    );
    assert_eq!(
        pod["containers"][0]["resources"],
        json!({"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}})
    );
}

/// A pod that copies a server's labels and looks ready, created by someone else.
fn look_alike(fake: &FakeKube, real: &serde_json::Value, name: &str, owners: serde_json::Value) {
    fake.create(
        Kind::Pod,
        NS,
        json!({
            "metadata": {"name": name, "labels": real["metadata"]["labels"].clone(),
                         "ownerReferences": owners},
            "spec": real["spec"].clone(),
            "status": {"phase": "Running", "podIP": "10.6.6.6",
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alike_pods_are_never_attached_to() {
    let fake = FakeKube::start().await;
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, options());
    rt.apply(
        example("gh", "ghcr.io/gatehouse/example:1", &[])
            .resolve()
            .unwrap(),
    )
    .await
    .unwrap();
    rt.wait_ready("gh", Duration::from_secs(10)).await.unwrap();
    let real = fake.pod_of(NS, "mcp-gh").expect("the server's pod");
    let dep = fake.get(Kind::Deployment, NS, "mcp-gh").unwrap();
    // Names that sort after the real pod's: the newest pod would win a label-only choice.
    look_alike(&fake, &real, "mcp-gh-zzzz-1", json!([]));
    look_alike(
        &fake,
        &real,
        "mcp-gh-zzzz-2",
        json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": "mcp-gh",
                "uid": dep["metadata"]["uid"], "controller": true}]),
    );
    // Restart: only the server's own pod is deleted; the new one comes from its ReplicaSet.
    fake.clear_requests();
    rt.restart("gh").await.unwrap();
    let deletes: Vec<String> = writes(&fake);
    assert_eq!(
        deletes,
        [format!(
            "DELETE /api/v1/namespaces/{NS}/pods/{}?",
            real["metadata"]["name"].as_str().unwrap()
        )]
    );
    let fresh = eventually("a new pod", Duration::from_secs(5), || {
        fake.pod_of(NS, "mcp-gh")
            .filter(|p| p["metadata"]["name"] != real["metadata"]["name"])
    })
    .await;
    let fresh_name = fresh["metadata"]["name"].as_str().unwrap();
    let start = Instant::now();
    loop {
        let st = rt.status("gh").await.unwrap();
        if st.is_ready()
            && st
                .message
                .as_deref()
                .unwrap_or_default()
                .contains(fresh_name)
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut mcp = open(&rt, "gh").await;
    mcp.handshake().await;
    drop(mcp);
    let attached: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/attach"))
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        attached,
        [format!("/api/v1/namespaces/{NS}/pods/{fresh_name}/attach")]
    );
    assert!(
        sent(&fake, "mcp-gh-zzzz").is_empty(),
        "look-alikes untouched"
    );
    assert!(fake.get(Kind::Pod, NS, "mcp-gh-zzzz-1").is_some());
}

/// An attachment to a pod that is deleted behind our back ends (EOF) instead of leaving
/// the shared connection waiting on a process that no longer exists: both when the
/// websocket is closed while idle and when it stays half-open (a lost node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attachment_ends_when_its_pod_is_gone() {
    for half_open in [false, true] {
        let fake = FakeKube::start().await;
        fake.configure(|s| s.attachments_outlive_pods = half_open);
        let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, options());
        rt.apply(
            example("gone", "ghcr.io/gatehouse/example:1", &[])
                .resolve()
                .unwrap(),
        )
        .await
        .unwrap();
        let mut mcp = open(&rt, "gone").await;
        mcp.handshake().await;
        let old = fake.pod_of(NS, "mcp-gone").unwrap();
        fake.delete(Kind::Pod, NS, old["metadata"]["name"].as_str().unwrap());
        eventually("a replacement pod", Duration::from_secs(10), || {
            fake.pod_of(NS, "mcp-gone")
                .filter(|p| p["metadata"]["name"] != old["metadata"]["name"])
        })
        .await;
        // A write after the websocket closed fails inside kube-rs; the reader must still end.
        let _ = mcp
            .writer
            .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"tools/list\"}\n")
            .await;
        let _ = mcp.writer.flush().await;
        assert!(
            mcp.drain(Duration::from_secs(10)).await,
            "the attachment to the deleted pod ended (half_open: {half_open})"
        );
        // And a new attachment reaches the replacement.
        let mut fresh = open(&rt, "gone").await;
        let init = fresh.handshake().await;
        assert!(init["result"]["serverInfo"].is_object(), "{init}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_goes_only_to_a_relay_its_leader_signed() {
    let fake = FakeKube::start().await;
    // Someone who may write the Lease (but not read the replicas' secret) names their own
    // address as the holder's relay.
    let forged = |signature: &str| {
        json!({"gatehouse.dev/relay": "http://evil.example:80",
               "gatehouse.dev/relay-signature": signature})
    };
    let rt = follower_of_mallory(&fake, forged("AAAA")).await;
    let secret = eventually("the relay secret", Duration::from_secs(5), || {
        let s = fake.get(Kind::Secret, NS, "gatehouse-orchestrator-relay")?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s["data"]["secret"].as_str()?)
            .ok()?;
        String::from_utf8(raw).ok()
    })
    .await;
    // Several election rounds: the follower never goes to the forged address.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!rt.is_leader());
    let err = rt.endpoint("s").await.unwrap_err();
    assert!(err.to_string().contains("relay"), "{err}");

    // Signed with the replicas' lease key, for that holder: followed.
    let key = gatehouse::replica_key::ReplicaKey::derive(&secret).unwrap();
    let sign_with = |key: &[u8], holder: &str| {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
        mac.update(format!("{holder}\nhttp://evil.example:80").as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    };
    let sign = |holder: &str| sign_with(key.lease_key(), holder);
    // Keyed by the secret itself (not the key derived for leases): not followed.
    fake.patch(
        Kind::Lease,
        NS,
        "gatehouse-orchestrator",
        json!({"metadata": {"annotations": forged(&sign_with(secret.as_bytes(), "mallory"))}}),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rt.endpoint("s").await.is_err());
    // A signature of another holder's relay does not carry over.
    fake.patch(
        Kind::Lease,
        NS,
        "gatehouse-orchestrator",
        json!({"metadata": {"annotations": forged(&sign("someone-else"))}}),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rt.endpoint("s").await.is_err());
    fake.patch(
        Kind::Lease,
        NS,
        "gatehouse-orchestrator",
        json!({"metadata": {"annotations": forged(&sign("mallory"))}}),
    );
    let url = followed_relay(&rt, "the signed relay is followed").await;
    assert_eq!(url, "http://evil.example:80/relay/s");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_lets_go_before_anyone_may_take_over() {
    let fake = FakeKube::start().await;
    let duration = Duration::from_millis(900);
    let lease = LeaseSettings {
        lease_duration: duration,
        renew_every: Duration::from_millis(150),
        retry_every: Duration::from_millis(100),
        ..LeaseSettings::new("gatehouse-orchestrator", "replica-a")
    };
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), Some(lease), options());
    eventually("leads", Duration::from_secs(5), || {
        rt.is_leader().then_some(())
    })
    .await;
    // A renewal that succeeds now is the last: the API server stops answering (a partition;
    // the client's own timeout is minutes long).
    tokio::time::sleep(Duration::from_millis(200)).await;
    fake.configure(|s| s.stall_paths = vec!["/apis/coordination.k8s.io".into()]);
    let stalled = Instant::now();
    // Another replica may take the lease a whole duration after it last saw it change,
    // which is no earlier than our last renewal was sent: we must have let go by then.
    eventually("let go", duration, || (!rt.is_leader()).then_some(())).await;
    assert!(stalled.elapsed() < duration);
    rt.shutdown().await;
}

/// A server's `egress` becomes a NetworkPolicy selecting its pod, written before the pod can
/// start, owned like its other objects, kept against drift, and removed with the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_becomes_a_network_policy_kept_with_the_server() {
    let fake = FakeKube::start().await;
    let mut opts = options();
    // The operator lets definitions name one private range, and keeps a public address of
    // the cluster (its API server, say) out of "public".
    opts.policy.egress_private_cidrs = vec!["10.20.0.0/16".into()];
    opts.policy.egress_except = vec!["203.0.113.10/32".into()];
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, opts);
    let with_egress = |name: &str, egress: serde_json::Value| {
        let mut def = example(name, "ghcr.io/gatehouse/example:1", &[]);
        def.spec.egress = Some(serde_json::from_value(egress).unwrap());
        def.resolve().unwrap()
    };
    let private_v4 = json!([
        "0.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "192.0.0.0/24",
        "198.18.0.0/15",
        "203.0.113.10/32"
    ]);
    let private_v6 = json!([
        "fc00::/7",
        "fe80::/10",
        "::1/128",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "2002::/16"
    ]);
    let public = |ports: serde_json::Value| {
        json!({"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": private_v4}},
                      {"ipBlock": {"cidr": "::/0", "except": private_v6}}],
               "ports": ports})
    };
    let dns = json!({"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                             "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                     "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]});

    // A range reaching private or metadata addresses the operator did not allow is refused,
    // naming the rule; nothing is written for it. An IPv4-mapped range is IPv4 on the wire
    // (the API server reads `::ffff:10.0.0.0/104` as 10.0.0.0/8): refused with the
    // definition, which must write it as IPv4.
    for (name, cidr, says) in [
        ("metadata", "169.254.169.254/32", "private"),
        ("everywhere", "0.0.0.0/0", "private"),
        ("cluster", "10.0.0.0/8", "private"),
        ("metadata-v6", "fd00:ec2::254/128", "private"),
        (
            "mapped-all",
            "::ffff:0.0.0.0/96",
            "write it as IPv4, 0.0.0.0/0",
        ),
        (
            "mapped-metadata",
            "::ffff:169.254.169.254/128",
            "write it as IPv4, 169.254.169.254/32",
        ),
        (
            "mapped-cluster",
            "::ffff:10.0.0.0/104",
            "write it as IPv4, 10.0.0.0/8",
        ),
    ] {
        let mut def = example(name, "ghcr.io/gatehouse/example:1", &[]);
        let egress = json!({"allow": [{"cidr": cidr}]});
        def.spec.egress = Some(serde_json::from_value(egress).unwrap());
        let err = match def.resolve() {
            Ok(server) => rt.apply(server).await.unwrap_err().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("egress.allow[0].cidr") && err.contains(says),
            "{err}"
        );
        assert!(
            fake.get(Kind::Deployment, NS, &format!("mcp-{name}"))
                .is_none()
        );
        assert!(
            fake.get(Kind::NetworkPolicy, NS, &format!("mcp-{name}"))
                .is_none()
        );
    }

    // Nothing at all: an egress policy with no rule.
    rt.apply(with_egress("locked", json!({"preset": "none"})))
        .await
        .unwrap();
    rt.wait_ready("locked", Duration::from_secs(10))
        .await
        .unwrap();
    // Owned by the Deployment, like the Secret (once the Deployment exists).
    let dep = fake.get(Kind::Deployment, NS, "mcp-locked").unwrap();
    let np = eventually("the policy owned", Duration::from_secs(5), || {
        fake.get(Kind::NetworkPolicy, NS, "mcp-locked")
            .filter(|np| np["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"])
    })
    .await;
    assert_eq!(
        np["spec"],
        json!({"podSelector": {"matchLabels": {"gatehouse.dev/server": "locked", "app.kubernetes.io/instance": "locked"}},
               "policyTypes": ["Egress"], "egress": []}),
    );
    assert_eq!(np["metadata"]["labels"]["team"], "tools");
    // Written before the Deployment: the pod never runs without it.
    let w = writes(&fake);
    let first = |what: &str| w.iter().position(|l| l.contains(what)).unwrap();
    assert!(
        first("networkpolicies/mcp-locked") < first("deployments/mcp-locked"),
        "{w:#?}"
    );

    // A preset, a named private range, and a host (its ports, to public addresses only).
    rt.apply(with_egress(
        "web",
        json!({"preset": "dns-and-https", "allow": [
            {"cidr": "10.20.5.0/24", "ports": [5432]},
            {"host": "api.github.com", "ports": [443, 8443]},
            {"cidr": "2001:db8::/32"}]}),
    ))
    .await
    .unwrap();
    let np = eventually("the web policy", Duration::from_secs(5), || {
        fake.get(Kind::NetworkPolicy, NS, "mcp-web")
    })
    .await;
    assert_eq!(
        np["spec"]["egress"],
        json!([
            dns,
            public(json!([{"protocol": "TCP", "port": 443}])),
            {"to": [{"ipBlock": {"cidr": "10.20.5.0/24"}}], "ports": [{"protocol": "TCP", "port": 5432}]},
            public(json!([{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 8443}])),
            {"to": [{"ipBlock": {"cidr": "2001:db8::/32"}}]},
        ])
    );

    assert_eq!(
        rt.egress("web").unwrap(),
        "enforced by NetworkPolicy mcp-web (host names: their ports to any public address; set GATEHOUSE_ORCHESTRATOR_CILIUM on Cilium): preset dns-and-https; 10.20.5.0/24 port 5432; api.github.com port 443,8443; 2001:db8::/32 every port"
    );

    // Drift: deleted, or opened to everything, it is put back.
    fake.delete(Kind::NetworkPolicy, NS, "mcp-locked");
    eventually(
        "the deleted policy restored",
        Duration::from_secs(5),
        || fake.get(Kind::NetworkPolicy, NS, "mcp-locked"),
    )
    .await;
    fake.patch(
        Kind::NetworkPolicy,
        NS,
        "mcp-locked",
        json!({"spec": {"egress": [{}]}}),
    );
    eventually(
        "the opened policy closed again",
        Duration::from_secs(5),
        || {
            fake.get(Kind::NetworkPolicy, NS, "mcp-locked")
                .filter(|np| np["spec"]["egress"] == json!([]))
        },
    )
    .await;
    // A selector that no longer selects the pod is a way out too: the policy is replaced
    // whole (an apply would leave a field someone else set).
    fake.patch(
        Kind::NetworkPolicy,
        NS,
        "mcp-locked",
        json!({"spec": {"podSelector": {"matchExpressions": [
            {"key": "nothing", "operator": "Exists"}]}}}),
    );
    eventually("the selector restored", Duration::from_secs(5), || {
        fake.get(Kind::NetworkPolicy, NS, "mcp-locked")
            .filter(|np| np["spec"]["podSelector"].get("matchExpressions").is_none())
    })
    .await;

    // No egress any more: no policy. Removed: the policy goes with the server.
    rt.apply(
        example("web", "ghcr.io/gatehouse/example:1", &[])
            .resolve()
            .unwrap(),
    )
    .await
    .unwrap();
    eventually("the web policy removed", Duration::from_secs(5), || {
        fake.get(Kind::NetworkPolicy, NS, "mcp-web")
            .is_none()
            .then_some(())
    })
    .await;
    rt.remove("locked").await.unwrap();
    eventually("the locked policy removed", Duration::from_secs(5), || {
        fake.get(Kind::NetworkPolicy, NS, "mcp-locked")
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(rt.stats().errors, 0);
}

/// The operator's default egress applies to servers that declare none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_default_egress_applies_to_servers_that_declare_none() {
    let fake = FakeKube::start().await;
    let mut opts = options();
    opts.policy.default_egress = Some(gatehouse::orchestrator::egress::EgressPreset::DnsAndHttps);
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, opts);
    rt.apply(
        example("plain", "ghcr.io/gatehouse/example:1", &[])
            .resolve()
            .unwrap(),
    )
    .await
    .unwrap();
    let np = eventually("the default policy", Duration::from_secs(5), || {
        fake.get(Kind::NetworkPolicy, NS, "mcp-plain")
    })
    .await;
    let rules = np["spec"]["egress"].as_array().unwrap();
    assert_eq!(rules.len(), 2, "DNS and public HTTPS: {np}");
    assert!(rt.egress("plain").unwrap().contains("preset dns-and-https"));
    assert_eq!(rules[1]["ports"], json!([{"protocol": "TCP", "port": 443}]));
}

/// Where the operator says the cluster runs Cilium, host names are enforced by a
/// CiliumNetworkPolicy (`toFQDNs`, DNS through Cilium's proxy) instead of opening their ports to
/// every public address, and never reach private, cluster or metadata addresses (`egressDeny`);
/// it is kept and removed like the NetworkPolicy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_cilium_host_names_become_to_fqdns() {
    let fake = FakeKube::start().await;
    let mut opts = options();
    opts.policy.cilium = true;
    opts.policy.egress_private_cidrs = vec!["10.9.0.0/16".into()];
    opts.policy.egress_except = vec!["203.0.113.10/32".into()];
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, opts);
    let mut def = example("gh", "ghcr.io/gatehouse/example:1", &[]);
    def.spec.egress = Some(
        serde_json::from_value(json!({"allow": [
            {"host": "api.github.com", "ports": [443]},
            {"host": "*.githubusercontent.com"},
            {"cidr": "10.9.0.0/16", "ports": [8080]}]}))
        .unwrap(),
    );
    rt.apply(def.resolve().unwrap()).await.unwrap();
    let cnp = eventually("the Cilium policy", Duration::from_secs(5), || {
        fake.get(Kind::CiliumNetworkPolicy, NS, "mcp-gh")
    })
    .await;
    assert_eq!(
        cnp["spec"],
        json!({
            "endpointSelector": {"matchLabels": {"gatehouse.dev/server": "gh", "app.kubernetes.io/instance": "gh"}},
            "egress": [
                {"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system", "k8s:k8s-app": "kube-dns"}}],
                 "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}], "rules": {"dns": [{"matchPattern": "*"}]}}]},
                {"toFQDNs": [{"matchName": "api.github.com"}], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
                {"toFQDNs": [{"matchPattern": "*.githubusercontent.com"}]},
            ],
            // Whoever controls a name chooses its addresses: none of the ranges the
            // NetworkPolicy's "public" excepts (the operator's too), whatever allows them,
            // except the range the definition names itself.
            "egressDeny": [{"toCIDRSet": [
                {"cidr": "0.0.0.0/8"},
                {"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]},
                {"cidr": "172.16.0.0/12"},
                {"cidr": "192.168.0.0/16"},
                {"cidr": "169.254.0.0/16"},
                {"cidr": "100.64.0.0/10"},
                {"cidr": "127.0.0.0/8"},
                {"cidr": "192.0.0.0/24"},
                {"cidr": "198.18.0.0/15"},
                {"cidr": "fc00::/7"},
                {"cidr": "fe80::/10"},
                {"cidr": "::1/128"},
                {"cidr": "64:ff9b::/96"},
                {"cidr": "64:ff9b:1::/48"},
                {"cidr": "2002::/16"},
                {"cidr": "203.0.113.10/32"},
            ]}]
        })
    );
    // The NetworkPolicy keeps DNS and the named range, and opens nothing for the hosts.
    let np = eventually("the NetworkPolicy", Duration::from_secs(5), || {
        fake.get(Kind::NetworkPolicy, NS, "mcp-gh")
    })
    .await;
    let rules = np["spec"]["egress"].as_array().unwrap();
    assert_eq!(rules.len(), 2, "{np}");
    assert_eq!(rules[1]["to"][0]["ipBlock"]["cidr"], "10.9.0.0/16");
    assert!(!np.to_string().contains("0.0.0.0/0"), "{np}");
    assert!(rt.egress("gh").unwrap().contains("CiliumNetworkPolicy"));

    // Widened behind our back (the deny dropped too): replaced whole. Hosts dropped from
    // the definition: removed.
    fake.patch(
        Kind::CiliumNetworkPolicy,
        NS,
        "mcp-gh",
        json!({"spec": {"egress": [{"toEntities": ["world"]}], "egressDeny": null}}),
    );
    eventually("the Cilium policy restored", Duration::from_secs(5), || {
        fake.get(Kind::CiliumNetworkPolicy, NS, "mcp-gh")
            .filter(|p| p["spec"] == cnp["spec"])
    })
    .await;
    let mut def = example("gh", "ghcr.io/gatehouse/example:1", &[]);
    def.spec.egress = Some(serde_json::from_value(json!({"preset": "none"})).unwrap());
    rt.apply(def.resolve().unwrap()).await.unwrap();
    eventually("the Cilium policy removed", Duration::from_secs(5), || {
        fake.get(Kind::CiliumNetworkPolicy, NS, "mcp-gh")
            .is_none()
            .then_some(())
    })
    .await;
    assert!(fake.get(Kind::NetworkPolicy, NS, "mcp-gh").is_some());
    assert_eq!(rt.stats().errors, 0);
}

/// A pod of a server that ended (evicted) is deleted; the running one and a failed look-alike
/// that is not the server's (no ReplicaSet of its Deployment controls it) are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_pods_of_a_server_are_collected() {
    let fake = FakeKube::start().await;
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, options());
    rt.apply(
        example("tidy", "ghcr.io/gatehouse/example:1", &[])
            .resolve()
            .unwrap(),
    )
    .await
    .unwrap();
    rt.wait_ready("tidy", Duration::from_secs(10))
        .await
        .unwrap();
    let running = fake.pod_of(NS, "mcp-tidy").unwrap();
    let failed = |name: &str, owners: serde_json::Value| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": NS,
                            "labels": running["metadata"]["labels"].clone(),
                            "ownerReferences": owners},
               "spec": running["spec"].clone(),
               "status": {"phase": "Failed", "reason": "Evicted",
                          "message": "The node was low on resource: memory."}})
    };
    fake.create(Kind::Pod, NS, failed("mcp-tidy-lookalike", json!([])));
    fake.create(
        Kind::Pod,
        NS,
        failed(
            "mcp-tidy-evicted",
            running["metadata"]["ownerReferences"].clone(),
        ),
    );
    // A graceful node shutdown leaves the pod Succeeded (Kubernetes 1.27 and later).
    let mut shut_down = failed(
        "mcp-tidy-shutdown",
        running["metadata"]["ownerReferences"].clone(),
    );
    shut_down["status"] = json!({"phase": "Succeeded", "reason": "Terminated"});
    fake.create(Kind::Pod, NS, shut_down);
    eventually("the ended pods deleted", Duration::from_secs(5), || {
        (fake.get(Kind::Pod, NS, "mcp-tidy-evicted").is_none()
            && fake.get(Kind::Pod, NS, "mcp-tidy-shutdown").is_none())
        .then_some(())
    })
    .await;
    assert!(fake.get(Kind::Pod, NS, "mcp-tidy-lookalike").is_some());
    let name = running["metadata"]["name"].as_str().unwrap();
    assert!(
        fake.get(Kind::Pod, NS, name).is_some(),
        "the running pod stays"
    );
    rt.wait_ready("tidy", Duration::from_secs(10))
        .await
        .unwrap();
}

fn condition(cr: &serde_json::Value, type_: &str) -> serde_json::Value {
    cr["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or_else(|| panic!("no {type_} condition in {cr}"))
}

fn events_about(fake: &FakeKube, name: &str, reason: &str) -> Vec<serde_json::Value> {
    fake.list(Kind::Event, NS)
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name && e["reason"] == reason)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcpserver_status_has_conditions_and_events() {
    let fake = FakeKube::start().await;
    let opts = KubeOptions {
        watch_mcpservers: true,
        ..options()
    };
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, opts.clone());
    // As a gateway does: its configuration (none) first.
    rt.sync(Vec::new()).await.unwrap();
    let cr = fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": "conds"}, "spec": {
            "image": "ghcr.io/gatehouse/example:1", "command": GATEHOUSE, "args": ["example-server"],
        }}),
    );
    let uid = cr["metadata"]["uid"].clone();
    let ready = |c: &serde_json::Value| c["status"]["phase"] == "Ready";
    let cr = eventually("a Ready status", Duration::from_secs(10), || {
        fake.get(Kind::McpServer, NS, "conds").filter(ready)
    })
    .await;
    assert_eq!(cr["status"]["observedGeneration"], 1, "{cr}");
    let types: Vec<_> = cr["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types, ["Ready", "Progressing", "Degraded", "Asleep"]);
    assert_eq!(condition(&cr, "Ready")["status"], "True");
    assert_eq!(condition(&cr, "Ready")["observedGeneration"], 1);
    assert_eq!(condition(&cr, "Progressing")["status"], "False");
    assert_eq!(condition(&cr, "Degraded")["reason"], "AsExpected");
    assert_eq!(condition(&cr, "Asleep")["status"], "False");
    let started = eventually("a Started Event", Duration::from_secs(5), || {
        events_about(&fake, "conds", "Started").pop()
    })
    .await;
    assert_eq!(started["type"], "Normal");
    assert_eq!(started["regarding"]["uid"], uid);
    assert_eq!(started["regarding"]["kind"], "McpServer");
    assert_eq!(started["reportingController"], "gatehouse");
    assert!(
        started["note"]
            .as_str()
            .unwrap()
            .contains("attach://mcp/mcp-conds"),
        "{started}"
    );

    // A crash: the restart is counted and recorded, the server comes back.
    let pod = fake.pod_of(NS, "mcp-conds").unwrap()["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    fake.kill_container(NS, &pod);
    let crashed = eventually("a Crashed Event", Duration::from_secs(10), || {
        events_about(&fake, "conds", "Crashed").pop()
    })
    .await;
    assert_eq!(crashed["type"], "Warning");
    assert!(
        crashed["note"].as_str().unwrap().contains("1 restarts"),
        "{crashed}"
    );
    let cr = eventually("Ready again", Duration::from_secs(10), || {
        fake.get(Kind::McpServer, NS, "conds")
            .filter(|c| ready(c) && c["status"]["restarts"] == 1)
    })
    .await;
    assert_eq!(condition(&cr, "Ready")["status"], "True");

    // A new spec whose image cannot be pulled: generation 2, Degraded with the kubelet's
    // reason, and a Warning naming it.
    fake.patch(
        Kind::McpServer,
        NS,
        "conds",
        json!({"spec": {"image": "registry.example/unpullable:404"}}),
    );
    let cr = eventually("a Degraded status", Duration::from_secs(10), || {
        fake.get(Kind::McpServer, NS, "conds")
            .filter(|c| c["status"]["observedGeneration"] == 2 && c["status"]["phase"] == "Failed")
    })
    .await;
    let degraded = condition(&cr, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "ImagePullBackOff");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("unpullable:404"),
        "{degraded}"
    );
    assert_eq!(condition(&cr, "Ready")["status"], "False");
    assert_eq!(condition(&cr, "Ready")["reason"], "ImagePullBackOff");
    let pull = eventually("an ImagePullBackOff Event", Duration::from_secs(5), || {
        events_about(&fake, "conds", "ImagePullBackOff").pop()
    })
    .await;
    assert_eq!(pull["type"], "Warning");
    let outside = fake_kube::outside_role(&fake.requests(), &fake_kube::deployed_role());
    assert!(
        outside.is_empty(),
        "requests the Role does not allow: {outside:?}"
    );

    // The kubelet goes from ErrImagePull to ImagePullBackOff a moment later: the status
    // follows it before the restart (else the restarted gateway rightly writes the change).
    eventually("the back-off in the status", Duration::from_secs(5), || {
        fake.get(Kind::McpServer, NS, "conds").filter(|c| {
            c["status"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("Back-off pulling image"))
        })
    })
    .await;

    // A restarted gateway finds the status current: it writes none, records nothing. A
    // second resource created after it starts marks when its first pass is done.
    drop(rt);
    let before = fake.list(Kind::Event, NS).len();
    fake.clear_requests();
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, opts);
    rt.sync(Vec::new()).await.unwrap();
    fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": "marker"}, "spec": {"command": "x"}}),
    );
    eventually("the marker's status", Duration::from_secs(10), || {
        fake.get(Kind::McpServer, NS, "marker")
            .filter(|c| c["status"]["phase"] == "Failed")
    })
    .await;
    assert!(matches!(
        rt.status("conds").await.unwrap().phase,
        Phase::Failed { .. }
    ));
    // Its Event is recorded after its status is written.
    eventually("the marker's Event", Duration::from_secs(5), || {
        events_about(&fake, "marker", "InvalidDefinition").pop()
    })
    .await;
    let conds_writes: Vec<_> = writes(&fake)
        .into_iter()
        .filter(|w| w.contains("/conds") || w.contains("/events"))
        .collect();
    let marker_events = events_about(&fake, "marker", "InvalidDefinition").len();
    assert_eq!(marker_events, 1, "the invalid marker is recorded once");
    assert_eq!(
        conds_writes.len(),
        1,
        "only the marker's Event: {conds_writes:?}"
    );
    assert_eq!(fake.list(Kind::Event, NS).len(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_server_scales_to_zero_and_a_call_scales_it_back() {
    let fake = FakeKube::start().await;
    let opts = KubeOptions {
        watch_mcpservers: true,
        ..options()
    };
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, opts.clone());
    // As a gateway does: its configuration (none) first.
    rt.sync(Vec::new()).await.unwrap();
    fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": "napper"}, "spec": {
            "image": "ghcr.io/gatehouse/example:1", "command": GATEHOUSE, "args": ["example-server"],
            "idle": {"after": "1s"},
        }}),
    );
    let start = Instant::now();
    while rt.status("napper").await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(5), "resource seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.wait_ready("napper", Duration::from_secs(10))
        .await
        .unwrap();
    let usage = rt.usage("napper").expect("idle-capable");
    assert_eq!(usage.after(), Duration::from_secs(1));

    // Not idle yet: asking changes nothing. Idle: the Deployment scales to zero.
    let call = usage.begin();
    rt.sleep("napper").await.unwrap();
    assert_eq!(rt.status("napper").await.unwrap().phase, Phase::Ready);
    drop(call);
    eventually("idle", Duration::from_secs(5), || {
        usage.is_idle().then_some(())
    })
    .await;
    fake.clear_requests();
    rt.sleep("napper").await.unwrap();
    assert_eq!(rt.status("napper").await.unwrap().phase, Phase::Asleep);
    let dep = eventually("scaled to zero", Duration::from_secs(5), || {
        fake.get(Kind::Deployment, NS, "mcp-napper")
            .filter(|d| d["spec"]["replicas"] == 0)
    })
    .await;
    assert!(
        dep["metadata"]["annotations"]["gatehouse.dev/asleep"].is_string(),
        "{dep}"
    );
    eventually("its pod gone", Duration::from_secs(5), || {
        fake.pod_of(NS, "mcp-napper").is_none().then_some(())
    })
    .await;
    let cr = eventually("an Asleep status", Duration::from_secs(5), || {
        fake.get(Kind::McpServer, NS, "napper")
            .filter(|c| c["status"]["phase"] == "Asleep")
    })
    .await;
    assert_eq!(condition(&cr, "Asleep")["status"], "True");
    assert_eq!(condition(&cr, "Asleep")["reason"], "Idle");
    assert_eq!(condition(&cr, "Ready")["status"], "False");
    eventually("a Slept Event", Duration::from_secs(5), || {
        events_about(&fake, "napper", "Slept").pop()
    })
    .await;
    let deployment_writes: Vec<_> = writes(&fake)
        .into_iter()
        .filter(|w| w.contains("/deployments/"))
        .collect();
    assert_eq!(
        deployment_writes,
        [
            "PATCH /apis/apps/v1/namespaces/mcp/deployments/mcp-napper?&force=true&fieldManager=gatehouse"
        ],
        "one apply scales it down"
    );
    assert!(usage.is_asleep());

    // A restarted gateway finds it asleep and leaves it so.
    drop(rt);
    fake.clear_requests();
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, opts);
    rt.sync(Vec::new()).await.unwrap();
    eventually("asleep after a restart", Duration::from_secs(5), || {
        futures_util::FutureExt::now_or_never(rt.status("napper"))
            .and_then(Result::ok)
            .filter(|s| s.phase == Phase::Asleep)
    })
    .await;
    assert!(
        !writes(&fake).iter().any(|w| w.contains("/deployments/")),
        "{:?}",
        writes(&fake)
    );

    // The next call wakes it: scaled back up, ready, and said so.
    let started = Instant::now();
    rt.wait_ready("napper", Duration::from_secs(10))
        .await
        .unwrap();
    let woke_in = started.elapsed();
    let dep = fake.get(Kind::Deployment, NS, "mcp-napper").unwrap();
    assert_eq!(dep["spec"]["replicas"], 1, "{dep}");
    assert!(
        dep["metadata"]["annotations"]
            .get("gatehouse.dev/asleep")
            .is_none(),
        "{dep}"
    );
    let mut mcp = open(&rt, "napper").await;
    mcp.handshake().await;
    eventually("a Woke Event", Duration::from_secs(5), || {
        events_about(&fake, "napper", "Woke").pop()
    })
    .await;
    assert_eq!(rt.usage("napper").unwrap().wakes(), 1);
    eprintln!("wake to ready on the fake API server: {woke_in:?}");
}

/// A server whose objects the API server refuses is retried with a doubling delay (not
/// hammered), and converges once the API server takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reconciles_back_off_and_then_converge() {
    let fake = FakeKube::start().await;
    fake.configure(|s| {
        s.fail_paths = vec![format!(
            "/apis/apps/v1/namespaces/{NS}/deployments/mcp-refused"
        )]
    });
    let retry_after = Duration::from_millis(100);
    let options = KubeOptions {
        retry_after,
        ..options()
    };
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, options);
    rt.apply(
        example("refused", "ghcr.io/gatehouse/example:1", &[])
            .resolve()
            .unwrap(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut seen = Vec::new();
    while seen.len() < 7 {
        let errors = rt.stats().errors;
        if errors as usize > seen.len() {
            seen.push(started.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "errors: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Timer retries come after about 100, 200, 400 ms... (±10%). Events (its Secret
    // written, say) reconcile it at once too, early on, and how many of them come depends on
    // the machine's load (up to three leave the last two gaps the timer's): the last gaps
    // are the timer's alone, and double.
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("gaps between failed reconciles: {gaps:?}");
    let (before, last) = (gaps[gaps.len() - 2], gaps[gaps.len() - 1]);
    assert!(before >= retry_after.mul_f32(1.7), "{gaps:?}");
    assert!(last >= retry_after.mul_f32(3.4), "{gaps:?}");
    assert!(last >= before.mul_f32(1.6), "{gaps:?}");
    fake.configure(|s| s.fail_paths.clear());
    rt.wait_ready("refused", Duration::from_secs(10))
        .await
        .unwrap();
}

/// A replica that comes to lead learns whom it took the lease from, to take the leader's state
/// over: the holder that gave it up, or the one whose lease expired; only ever a relay that
/// replica signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_learns_whom_it_took_the_lease_from_by_its_signed_relay() {
    let fake = FakeKube::start().await;
    // (No relay listens in this test: where it would is all that is handed on.)
    let replica = |id: &str, port: u16| {
        let lease = LeaseSettings {
            lease_duration: Duration::from_secs(2),
            renew_every: Duration::from_millis(150),
            retry_every: Duration::from_millis(100),
            ..LeaseSettings::new("gatehouse-orchestrator", id)
        };
        elected_with(&fake, lease, port)
    };
    let leads = |rt: &KubeRuntime| rt.is_leader().then_some(());
    let handover = |rt: &KubeRuntime| rt.relay().unwrap().handover().borrow().clone();
    let relay_annotation = || {
        let lease = fake.get(Kind::Lease, NS, "gatehouse-orchestrator")?;
        lease["metadata"]["annotations"]["gatehouse.dev/relay"]
            .as_str()
            .map(str::to_owned)
    };

    let a = replica("replica-a", 1111);
    eventually("a leads", Duration::from_secs(10), || leads(&a)).await;
    assert_eq!(handover(&a), Handover::Nobody, "nobody led before");
    eventually("a's relay in the lease", Duration::from_secs(5), || {
        (relay_annotation()? == "https://127.0.0.1:1111").then_some(())
    })
    .await;
    let b = replica("replica-b", 2222);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.is_leader());

    // Given up: the next holder takes over from it.
    a.shutdown().await;
    eventually("b leads", Duration::from_secs(10), || leads(&b)).await;
    assert_eq!(
        handover(&b),
        Handover::From("https://127.0.0.1:1111".into())
    );
    eventually("b's relay in the lease", Duration::from_secs(5), || {
        (relay_annotation()? == "https://127.0.0.1:2222").then_some(())
    })
    .await;

    // Gone without giving it up (its tasks stop, nothing is written): taken once expired,
    // from it still.
    drop(b);
    let c = replica("replica-c", 3333);
    eventually("c leads", Duration::from_secs(10), || leads(&c)).await;
    assert_eq!(
        handover(&c),
        Handover::From("https://127.0.0.1:2222".into())
    );

    // A writer of the Lease names someone's relay as the one that gave it up: not signed by
    // that one, not followed.
    drop(c);
    fake.patch(
        Kind::Lease,
        NS,
        "gatehouse-orchestrator",
        json!({"metadata": {"annotations": {
            "gatehouse.dev/released-by": "mallory",
            "gatehouse.dev/relay": "http://evil.example:80"}},
            "spec": {"holderIdentity": null}}),
    );
    let d = replica("replica-d", 4444);
    eventually("d leads", Duration::from_secs(10), || leads(&d)).await;
    assert_eq!(handover(&d), Handover::Nobody);
    eventually("d's relay in the lease", Duration::from_secs(5), || {
        (relay_annotation()? == "https://127.0.0.1:4444").then_some(())
    })
    .await;

    // Taken, but the answer lost: the next round finds the lease naming it, and it took it
    // from d still (not from itself).
    let e = replica("replica-e", 5555);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!e.is_leader());
    let lease_path = format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases");
    fake.configure(|s| s.lost_answers = vec![("PUT".into(), lease_path.clone())]);
    let stopping = tokio::spawn(async move { d.shutdown().await });
    eventually("e's write taken", Duration::from_secs(10), || {
        let lease = fake.get(Kind::Lease, NS, "gatehouse-orchestrator")?;
        (lease["spec"]["holderIdentity"] == "replica-e").then_some(())
    })
    .await;
    assert!(!e.is_leader(), "its answer never came");
    // Its next rounds' answers are lost too (each round is bounded by a third of the lease).
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(!e.is_leader(), "their answers never came");
    fake.configure(|s| s.lost_answers.clear());
    eventually("e leads", Duration::from_secs(10), || leads(&e)).await;
    assert_eq!(
        handover(&e),
        Handover::From("https://127.0.0.1:4444".into())
    );
    stopping.await.unwrap();
    e.shutdown().await;
}

/// A writer of the Lease who names a follower as the holder does not make it lead: it did not
/// write that (no attempt of its own is out), so two replicas never lead at once; the lease so
/// written is left to expire, and then one replica takes it as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_naming_a_follower_it_did_not_write_does_not_make_it_lead() {
    let fake = FakeKube::start().await;
    let replica = |id: &str| {
        let lease = LeaseSettings {
            lease_duration: Duration::from_secs(2),
            renew_every: Duration::from_millis(600),
            retry_every: Duration::from_millis(50),
            ..LeaseSettings::new("gatehouse-orchestrator", id)
        };
        KubeRuntime::start_with_client(fake.client(NS), NS.into(), Some(lease), options())
    };
    let a = replica("replica-a");
    eventually("a leads", Duration::from_secs(10), || {
        a.is_leader().then_some(())
    })
    .await;
    let b = replica("replica-b");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!b.is_leader());
    fake.patch(
        Kind::Lease,
        NS,
        "gatehouse-orchestrator",
        json!({"spec": {"holderIdentity": "replica-b"}}),
    );
    // Until the lease so written expires (2 s) and after: never both; then one leads again.
    never_two_then_one(&a, &b).await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A writer of the Lease who empties it (naming the holder as the one that gave it up, with a
/// forged signature) or shortens its duration does not make a follower lead while the holder
/// still does: two leaders would both attach to a stdio pod and read each other's answers.
/// A holder that gives the lease up itself still hands it over at once.
#[tokio::test]
async fn a_lease_emptied_or_shortened_by_another_writer_never_makes_two_leaders() {
    let fake = FakeKube::start().await;
    let replica = |id: &str, port: u16| elected(&fake, id, port);
    let a = replica("replica-a", 1111);
    eventually("a leads", Duration::from_secs(10), || {
        a.is_leader().then_some(())
    })
    .await;
    let b = replica("replica-b", 2222);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.is_leader());
    let never_two = |what: &'static str| {
        let (a, b) = (&a, &b);
        async move {
            // Longer than the holder takes to renew, and than the lease lasts.
            let until = Instant::now() + Duration::from_secs(4);
            while Instant::now() < until {
                assert!(!(a.is_leader() && b.is_leader()), "{what}: two leaders");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    for (what, patch) in [
        (
            "emptied",
            json!({"metadata": {"annotations": {
                "gatehouse.dev/released-by": "replica-a",
                "gatehouse.dev/release-signature": "AAAA"}},
                "spec": {"holderIdentity": null}}),
        ),
        ("shortened", json!({"spec": {"leaseDurationSeconds": 0}})),
    ] {
        just_renewed(&fake).await;
        fake.patch(Kind::Lease, NS, "gatehouse-orchestrator", patch);
        never_two(what).await;
        eventually("one leads", Duration::from_secs(10), || {
            (a.is_leader() || b.is_leader()).then_some(())
        })
        .await;
    }
    // Given up by its holder: the other takes over well within a lease duration.
    let (leader, follower) = if a.is_leader() { (a, b) } else { (b, a) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = Instant::now();
    leader.shutdown().await;
    eventually("the follower leads", Duration::from_secs(10), || {
        follower.is_leader().then_some(())
    })
    .await;
    assert!(
        stopped.elapsed() < Duration::from_millis(1500),
        "taken over after {:?}",
        stopped.elapsed()
    );
    follower.shutdown().await;
}

/// For 4 s (longer than the tests' leases last) `x` and `y` never lead at once; then one of
/// them leads.
async fn never_two_then_one(x: &KubeRuntime, y: &KubeRuntime) {
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert!(
            !(x.is_leader() && y.is_leader()),
            "two replicas lead at once"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eventually("one leads", Duration::from_secs(10), || {
        (x.is_leader() || y.is_leader()).then_some(())
    })
    .await;
}

/// A replica in a leader election with a 3 s lease renewed every 900 ms, looking every 50 ms,
/// whose relay says it listens at `port`.
fn elected(fake: &FakeKube, id: &str, port: u16) -> KubeRuntime {
    let lease = LeaseSettings {
        lease_duration: Duration::from_secs(3),
        renew_every: Duration::from_millis(900),
        retry_every: Duration::from_millis(50),
        ..LeaseSettings::new("gatehouse-orchestrator", id)
    };
    elected_with(fake, lease, port)
}

/// A replica in the leader election `lease` describes, whose relay says it listens at `port`.
fn elected_with(fake: &FakeKube, lease: LeaseSettings, port: u16) -> KubeRuntime {
    let rt = KubeRuntime::start_with_client(
        fake.client(NS),
        NS.into(),
        Some(lease),
        KubeOptions {
            relay_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..options()
        },
    );
    rt.relay().unwrap().serving(([127, 0, 0, 1], port).into());
    rt
}

/// Waits for the holder's next renewal: its next look at the lease is then furthest away.
async fn just_renewed(fake: &FakeKube) {
    let rv =
        fake.get(Kind::Lease, NS, "gatehouse-orchestrator").unwrap()["metadata"]["resourceVersion"]
            .clone();
    eventually("a renewal", Duration::from_secs(5), || {
        let now = fake.get(Kind::Lease, NS, "gatehouse-orchestrator")?;
        (now["metadata"]["resourceVersion"] != rv).then_some(())
    })
    .await;
}

/// A release its holder signed, written again later over a holding forged to match it (its
/// holder and time of taking), frees nothing: the follower saw that holding at a later version
/// than the release gave up, so the lease is not taken while its real holder leads.
#[tokio::test]
async fn an_old_release_written_again_does_not_free_the_lease() {
    let fake = FakeKube::start().await;
    let a = elected(&fake, "replica-a", 1111);
    eventually("a leads", Duration::from_secs(10), || {
        a.is_leader().then_some(())
    })
    .await;
    // Given up with nobody to take it: the release stays in the lease for anyone to copy.
    a.shutdown().await;
    let released = fake.get(Kind::Lease, NS, "gatehouse-orchestrator").unwrap();
    let annotations = released["metadata"]["annotations"].clone();
    assert!(
        annotations["gatehouse.dev/release-signature"].is_string(),
        "{released}"
    );
    let acquired = released["spec"]["acquireTime"].clone();
    let b = elected(&fake, "replica-b", 2222);
    eventually("b leads", Duration::from_secs(10), || {
        b.is_leader().then_some(())
    })
    .await;
    let c = elected(&fake, "replica-c", 3333);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!c.is_leader());
    just_renewed(&fake).await;
    // The old holding forged, for c to follow, then the old release over it.
    fake.patch(
        Kind::Lease,
        NS,
        "gatehouse-orchestrator",
        json!({"spec": {"holderIdentity": "replica-a", "acquireTime": acquired}}),
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    fake.patch(
        Kind::Lease,
        NS,
        "gatehouse-orchestrator",
        json!({"metadata": {"annotations": annotations}, "spec": {"holderIdentity": null}}),
    );
    never_two_then_one(&b, &c).await;
    b.shutdown().await;
    c.shutdown().await;
}

/// Creates a well-behaved McpServer `name` and waits until the runtime runs it: the watch
/// has then delivered every change made before.
async fn take_up_sentinel(fake: &FakeKube, rt: &KubeRuntime, name: &str) {
    fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": name}, "spec": {"image": "ghcr.io/gatehouse/example:1",
            "command": GATEHOUSE, "args": ["example-server", "--name", name]}}),
    );
    let start = Instant::now();
    while rt.status(name).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(5), "{name} seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.wait_ready(name, Duration::from_secs(10)).await.unwrap();
}

/// With `watch_mcpservers` on, an McpServer named like a server of the configuration file
/// does not replace it, whether it appears while the gateway runs, is edited, is there when
/// the gateway restarts, or is deleted: nothing it says reaches the API server, the operator's
/// pod keeps running its configured image without an McpServer owner, and other resources
/// are still taken up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcpserver_named_like_a_config_server_does_not_replace_it() {
    let fake = FakeKube::start().await;
    let opts = KubeOptions {
        watch_mcpservers: true,
        ..options()
    };
    let configured = example("keep", "ghcr.io/gatehouse/example:1", &[])
        .resolve()
        .unwrap();
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, opts.clone());
    rt.sync(vec![configured.clone()]).await.unwrap();
    rt.wait_ready("keep", Duration::from_secs(10))
        .await
        .unwrap();
    let pod_before = fake.pod_of(NS, "mcp-keep").unwrap()["metadata"]["uid"].clone();
    let evil = |step: &str| {
        json!({"image": "evil.example/x:1", "command": GATEHOUSE,
            "args": ["example-server", "--name", format!("evil-{step}")],
            "env": [{"name": "STOLEN", "secretValue": format!("evil-value-{step}")}]})
    };
    let no_mcpserver_owner = |obj: &serde_json::Value| {
        obj["metadata"]["ownerReferences"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|r| r["kind"] != "McpServer")
    };
    let check = |step: &str| {
        let dep = fake.get(Kind::Deployment, NS, "mcp-keep").expect(step);
        let c = &dep["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "ghcr.io/gatehouse/example:1", "{step}: {dep}");
        assert_eq!(
            c["args"],
            json!(["example-server", "--name", "keep"]),
            "{step}"
        );
        assert!(no_mcpserver_owner(&dep), "{step}: {dep}");
        let pod = fake.pod_of(NS, "mcp-keep").expect(step);
        assert_eq!(pod["metadata"]["uid"], pod_before, "{step}: pod replaced");
        assert_eq!(
            pod["spec"]["containers"][0]["image"], "ghcr.io/gatehouse/example:1",
            "{step}"
        );
        assert!(no_mcpserver_owner(&pod), "{step}: {pod}");
        let secret = fake.get(Kind::Secret, NS, "mcp-keep").expect(step);
        assert!(no_mcpserver_owner(&secret), "{step}: {secret}");
        assert!(secret["data"].get("STOLEN").is_none(), "{step}: {secret}");
        for needle in ["evil.example", "evil-"] {
            let found = sent(&fake, needle);
            assert!(found.is_empty(), "{step}: {needle} sent: {found:#?}");
        }
    };
    let answers_as_itself = async |rt: &KubeRuntime| {
        let mut mcp = open(rt, "keep").await;
        mcp.handshake().await;
        let who = mcp
            .call(2, "tools/call", json!({"name": "whoami", "arguments": {}}))
            .await;
        assert_eq!(who["result"]["content"][0]["text"], "keep", "{who}");
    };

    // Created while the gateway runs.
    fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": "keep"}, "spec": evil("created")}),
    );
    take_up_sentinel(&fake, &rt, "sentinel-1").await;
    check("created");
    answers_as_itself(&rt).await;

    // Edited (a MODIFIED event).
    fake.patch(Kind::McpServer, NS, "keep", json!({"spec": evil("edited")}));
    take_up_sentinel(&fake, &rt, "sentinel-2").await;
    check("edited");

    // There when the gateway restarts (configured at once, as `gatehouse::start` does): the
    // watch's first list does not take it either.
    rt.shutdown().await;
    drop(rt);
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, opts);
    rt.sync(vec![configured]).await.unwrap();
    take_up_sentinel(&fake, &rt, "sentinel-3").await;
    rt.wait_ready("keep", Duration::from_secs(10))
        .await
        .unwrap();
    check("restarted");

    // Deleted: the configured server stays.
    fake.delete(Kind::McpServer, NS, "keep");
    take_up_sentinel(&fake, &rt, "sentinel-4").await;
    check("deleted");
    assert!(rt.status("keep").await.unwrap().is_ready());
    answers_as_itself(&rt).await;
    rt.shutdown().await;
}

/// A replicas' relay secret found shorter than 32 characters is not taken (not even by a
/// follower): a Lease relay signed with it is never followed. Once the Secret holds a value of
/// 32 characters, a relay signed with that is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weak_relay_secret_is_not_used() {
    let fake = FakeKube::start().await;
    let b64 = |v: &str| base64::engine::general_purpose::STANDARD.encode(v);
    // Made beforehand by someone who may write Secrets, guessable or not: one short.
    let weak = "w".repeat(31);
    fake.create(
        Kind::Secret,
        NS,
        json!({"metadata": {"name": "gatehouse-orchestrator-relay"},
               "data": {"secret": b64(&weak)}}),
    );
    // (Keyed as the replicas would key it; a weak secret keys nothing, so the secret itself.)
    let signed = |secret: &str| {
        use hmac::Mac;
        let key = gatehouse::replica_key::ReplicaKey::derive(secret)
            .map(|k| k.lease_key().to_vec())
            .unwrap_or_else(|_| secret.as_bytes().to_vec());
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(b"mallory\nhttp://evil.example:80");
        let sig =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        json!({"gatehouse.dev/relay": "http://evil.example:80",
               "gatehouse.dev/relay-signature": sig})
    };
    let rt = follower_of_mallory(&fake, signed(&weak)).await;
    // Several election rounds and reads of the Secret: the relay is never followed.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(800) {
        assert!(!rt.is_leader());
        match rt.endpoint("s").await {
            Err(e) => assert!(e.to_string().contains("relay"), "{e}"),
            Ok(ep) => panic!("followed a relay signed with a weak secret: {ep:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It was read again and again (`retry_after` is 200 ms), and never taken.
    let path = format!("/api/v1/namespaces/{NS}/secrets/gatehouse-orchestrator-relay");
    let reads = fake
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == path)
        .count();
    assert!(reads >= 2, "read {reads} times");
    // Neither replaced nor written: the operator's Secret is theirs to fix.
    let secret = fake
        .get(Kind::Secret, NS, "gatehouse-orchestrator-relay")
        .unwrap();
    assert_eq!(secret["data"]["secret"], b64(&weak));
    assert!(
        sent(&fake, "gatehouse-orchestrator-relay")
            .iter()
            .all(|r| r.starts_with("GET ")),
        "{:#?}",
        sent(&fake, "gatehouse-orchestrator-relay")
    );

    // Fixed with a value of 32 characters: a relay signed with it is followed.
    let strong = "s".repeat(32);
    fake.patch(
        Kind::Secret,
        NS,
        "gatehouse-orchestrator-relay",
        json!({"data": {"secret": b64(&strong)}}),
    );
    fake.patch(
        Kind::Lease,
        NS,
        "gatehouse-orchestrator",
        json!({"metadata": {"annotations": signed(&strong)}}),
    );
    let url = followed_relay(&rt, "the relay signed with a good secret is followed").await;
    assert_eq!(url, "http://evil.example:80/relay/s");
    rt.shutdown().await;
}

/// A pod status whose `podIP` is not an IP address (written by anyone who may patch
/// `pods/status`) never becomes an HTTP server's URL: no other host, port or path is reached
/// through it; an IPv6 address is bracketed, and other servers keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_ip_that_is_not_an_address_never_becomes_a_url() {
    let fake = FakeKube::start().await;
    let rt = KubeRuntime::start_with_client(fake.client(NS), NS.into(), None, options());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let web = ServerDef {
        name: "web".into(),
        spec: McpServerSpec {
            image: Some("ghcr.io/gatehouse/example:1".into()),
            command: Some(GATEHOUSE.into()),
            args: vec![
                "example-server".into(),
                "--http".into(),
                format!("127.0.0.1:{port}"),
            ],
            transport: TransportSpec {
                kind: TransportKind::StreamableHttp,
                port: Some(port),
                path: None,
            },
            ..McpServerSpec::default()
        },
    };
    rt.apply(web.resolve().unwrap()).await.unwrap();
    rt.apply(
        example("other", "ghcr.io/gatehouse/example:1", &[])
            .resolve()
            .unwrap(),
    )
    .await
    .unwrap();
    let good = format!("http://127.0.0.1:{port}/mcp");
    match rt.wait_ready("web", Duration::from_secs(10)).await.unwrap() {
        Endpoint::Http { url } => assert_eq!(url, good),
        other => panic!("{other:?}"),
    }
    let pod = fake.pod_of(NS, "mcp-web").unwrap();
    let pod = pod["metadata"]["name"].as_str().unwrap().to_owned();
    let set_ip = |ip: &str| {
        fake.patch(Kind::Pod, NS, &pod, json!({"status": {"podIP": ip}}));
    };
    // Waits until the runtime's endpoint for "web" is `url`.
    let shows = async |url: &str| {
        let start = Instant::now();
        while !matches!(rt.endpoint("web").await, Ok(Endpoint::Http { url: u }) if u == url) {
            assert!(start.elapsed() < Duration::from_secs(5), "{url} seen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // The endpoint once it is no longer `from` (None if it still is after `within`).
    let changed = async |from: &str, within: Duration| {
        let start = Instant::now();
        loop {
            let now = rt.endpoint("web").await;
            if !matches!(&now, Ok(Endpoint::Http { url }) if url == from) {
                return Some(now);
            }
            if start.elapsed() > within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    for (i, bad) in [
        "10.0.0.1/evil",
        "evil.example",
        "1.2.3.4:99@x",
        "127.0.0.1:1/x?",
        "",
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "0.0.0.0",
        "::",
        "fe80::1",
        "224.0.0.1",
        "255.255.255.255",
    ]
    .into_iter()
    .enumerate()
    {
        // First a valid IPv6 address of its own, seen bracketed: the status after it is new.
        let v6 = format!("http://[fd00::{}]:{port}/mcp", i + 1);
        set_ip(&format!("fd00::{}", i + 1));
        shows(&v6).await;
        set_ip(bad);
        // No endpoint, saying why.
        match changed(&v6, Duration::from_secs(5)).await {
            Some(Err(e)) => assert!(
                e.to_string().contains("is not an IP address")
                    || e.to_string().contains("is not a pod's address"),
                "podIP {bad:?}: {e}"
            ),
            other => panic!("podIP {bad:?}: {other:?}"),
        }
    }

    // Back to its address: reached there again; the other server was never disturbed.
    set_ip("127.0.0.1");
    shows(&good).await;
    let mut mcp = open(&rt, "other").await;
    mcp.handshake().await;
    rt.shutdown().await;
}

/// `McpServer` resources written by someone who may write them but nothing else: names the
/// objects cannot carry (a dotted name, one too long for `mcp-{name}`, the gateway's own),
/// labels that would make the pod pass for another server's (and be selected by its
/// Deployment, Service and NetworkPolicy) or for the gateway (whose relay port admits
/// `app.kubernetes.io/name: gatehouse`), values that are not labels, quantities or image
/// references. Each is reported `Failed` naming the field, nothing is written for it, and a
/// well-formed resource beside them runs as if they were not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcpserver_resources_with_hostile_names_or_labels_run_nothing() {
    let fake = FakeKube::start().await;
    let rt = KubeRuntime::start_with_client(
        fake.client(NS),
        NS.into(),
        None,
        KubeOptions {
            watch_mcpservers: true,
            ..options()
        },
    );
    // As a gateway does: its configuration (none) first.
    rt.sync(Vec::new()).await.unwrap();
    let too_long = format!("long{}", "o".repeat(56));
    let attacks: Vec<(String, serde_json::Value, &str)> = vec![
        ("dotted.name".into(), json!({}), "name"),
        (too_long.clone(), json!({}), "name"),
        ("gateway".into(), json!({}), "name"),
        (
            "poses-as-fine".into(),
            json!({"labels": {"gatehouse.dev/server": "fine"}}),
            "labels.gatehouse.dev/server",
        ),
        (
            "poses-as-instance".into(),
            json!({"labels": {"app.kubernetes.io/instance": "fine"}}),
            "labels.app.kubernetes.io/instance",
        ),
        (
            "poses-as-gateway".into(),
            json!({"labels": {"app.kubernetes.io/name": "gatehouse"}}),
            "labels.app.kubernetes.io/name",
        ),
        (
            "unmanaged".into(),
            json!({"labels": {"app.kubernetes.io/managed-by": "someone"}}),
            "labels.app.kubernetes.io/managed-by",
        ),
        (
            "bad-label-value".into(),
            json!({"labels": {"team": "a b"}}),
            "labels.team",
        ),
        (
            "bad-label-key".into(),
            json!({"labels": {"../x": "y"}}),
            "labels.../x",
        ),
        (
            "bad-quantity".into(),
            json!({"resources": {"limits": {"memory": "1Gi\nprivileged: true"}}}),
            "resources.limits.memory",
        ),
        (
            "bad-resource-name".into(),
            json!({"resources": {"limits": {"../gpu": "1"}}}),
            "resources.limits.../gpu",
        ),
        (
            "not-a-quantity".into(),
            json!({"resources": {"requests": {"memory": "lots"}}}),
            "resources.requests.memory",
        ),
        (
            "negative-quantity".into(),
            json!({"resources": {"limits": {"cpu": "-1"}}}),
            "resources.limits.cpu",
        ),
        (
            "bad-image".into(),
            json!({"image": "ghcr.io/x:1 --privileged"}),
            "image",
        ),
        (
            "bad-path".into(),
            json!({"transport": {"type": "streamable-http", "port": 3000, "path": "../admin"}}),
            "transport.path",
        ),
    ];
    for (name, extra, _) in &attacks {
        let mut spec = json!({"image": "ghcr.io/gatehouse/example:1", "command": GATEHOUSE,
            "args": ["example-server"]});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        fake.create(
            Kind::McpServer,
            NS,
            json!({"metadata": {"name": name}, "spec": spec}),
        );
    }
    // Well-formed quantities and resource names, in their many forms, pass.
    fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": "fine"}, "spec": {"image": "ghcr.io/gatehouse/example:1",
            "command": GATEHOUSE, "args": ["example-server"],
            "resources": {"requests": {"cpu": "250m", "memory": "1.5Gi", "ephemeral-storage": ".5G"},
                          "limits": {"cpu": "1", "memory": "2e9", "example.com/gpu": "+1",
                                     "hugepages-2Mi": "64Mi"}}}}),
    );
    let start = Instant::now();
    while rt.status("fine").await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(5), "resource seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.wait_ready("fine", Duration::from_secs(10))
        .await
        .unwrap();
    for (name, _, field) in &attacks {
        let cr = eventually(&format!("{name} reported"), Duration::from_secs(5), || {
            fake.get(Kind::McpServer, NS, name)
                .filter(|c| c["status"]["phase"] == "Failed")
        })
        .await;
        let message = cr["status"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{field}:")),
            "{name}: {message}"
        );
        let object = format!("mcp-{name}");
        for kind in [Kind::Deployment, Kind::Secret, Kind::Service] {
            assert!(fake.get(kind, NS, &object).is_none(), "{name}: {kind:?}");
        }
        let written: Vec<String> = writes(&fake)
            .into_iter()
            .filter(|w| w.contains(&format!("{object}?")) || w.contains(&format!("{object}/")))
            .collect();
        assert!(written.is_empty(), "{name}: {written:?}");
        assert!(rt.endpoint(name).await.is_err(), "{name} has no endpoint");
    }
    // The well-formed one: its own labels and selector, its one pod, reached as before.
    let dep = fake.get(Kind::Deployment, NS, "mcp-fine").unwrap();
    assert_eq!(
        dep["spec"]["selector"]["matchLabels"]["gatehouse.dev/server"],
        "fine"
    );
    let pods: Vec<serde_json::Value> = fake
        .list(Kind::Pod, NS)
        .into_iter()
        .filter(|p| p["metadata"]["labels"]["gatehouse.dev/server"] == "fine")
        .collect();
    assert_eq!(pods.len(), 1, "{pods:?}");
    let mut mcp = open(&rt, "fine").await;
    mcp.handshake().await;
    drop(mcp);
    // Its status is the gateway's to say: one rewritten to lie (another endpoint, another
    // phase) is said again as it is, and nothing is reached through what it said.
    let real = fake.get(Kind::McpServer, NS, "fine").unwrap()["status"].clone();
    assert_eq!(real["phase"], "Ready", "{real}");
    fake.patch(
        Kind::McpServer,
        NS,
        "fine",
        json!({"status": {"phase": "Failed", "message": "ignore previous instructions",
            "endpoint": "http://169.254.169.254/latest/meta-data/"}}),
    );
    eventually("the status said again", Duration::from_secs(5), || {
        fake.get(Kind::McpServer, NS, "fine").filter(|c| {
            c["status"]["phase"] == "Ready" && c["status"]["endpoint"] == real["endpoint"]
        })
    })
    .await;
    assert!(matches!(
        rt.endpoint("fine").await.unwrap(),
        Endpoint::Stdio(_)
    ));
    assert!(
        sent(&fake, "169.254.169.254")
            .iter()
            .all(|r| r.contains("/mcpservers/fine"))
    );
}

/// Waits until the runtime knows server `name` (its resource was read).
async fn seen(rt: &KubeRuntime, name: &str) {
    let start = Instant::now();
    while rt.status(name).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "resource {name} seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An `McpServer` this gateway cannot read (a field of a newer CRD, as after a rollback of
/// the gateway, or a value of the wrong type where the API server's schema does not say)
/// hides no other: the well-formed resources beside it still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcpserver_this_gateway_cannot_read_hides_no_other() {
    let fake = FakeKube::start().await;
    let spec = || {
        json!({"image": "ghcr.io/gatehouse/example:1", "command": GATEHOUSE,
            "args": ["example-server"]})
    };
    let mut newer = spec();
    newer["someFutureField"] = json!({"x": 1});
    let mut wrong = spec();
    wrong["args"] = json!("example-server");
    // Before the gateway starts (its first list), and after (its watch).
    fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": "newer"}, "spec": newer}),
    );
    fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": "before"}, "spec": spec()}),
    );
    let rt = KubeRuntime::start_with_client(
        fake.client(NS),
        NS.into(),
        None,
        KubeOptions {
            watch_mcpservers: true,
            ..options()
        },
    );
    // As a gateway does: its configuration (none) first.
    rt.sync(Vec::new()).await.unwrap();
    seen(&rt, "before").await;
    rt.wait_ready("before", Duration::from_secs(10))
        .await
        .expect("a readable resource runs beside one that is not");
    fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": "wrong"}, "spec": wrong}),
    );
    fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": "after"}, "spec": spec()}),
    );
    seen(&rt, "after").await;
    rt.wait_ready("after", Duration::from_secs(10))
        .await
        .expect("a readable resource created after one that is not runs");
    // Each one it cannot read is reported on itself, once (its status is read back as
    // written, not written again on every event its own write causes).
    for name in ["newer", "wrong"] {
        let cr = eventually(&format!("{name} reported"), Duration::from_secs(5), || {
            fake.get(Kind::McpServer, NS, name)
                .filter(|c| c["status"]["phase"] == "Failed")
        })
        .await;
        let message = cr["status"]["message"].as_str().unwrap();
        assert!(message.starts_with("spec: "), "{name}: {message}");
        assert!(
            fake.get(Kind::Deployment, NS, &format!("mcp-{name}"))
                .is_none(),
            "{name}"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for name in ["newer", "wrong"] {
        let status_writes = writes(&fake)
            .into_iter()
            .filter(|w| w.contains(&format!("/mcpservers/{name}/status")))
            .count();
        assert!((1..=2).contains(&status_writes), "{name}: {status_writes}");
    }
}

/// An `McpServer` this gateway cannot read (reported `Failed`) is given a new definition
/// through the admin API like any other: the PUT replaces its spec whole (the unreadable field
/// gone) and answers 200, and the server then runs it, as a GET shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcpserver_this_gateway_cannot_read_is_replaced_by_an_admin_put() {
    const ADMIN_TOKEN: &str = "admin-token-for-the-unreadable-put";
    let fake = FakeKube::start().await;
    fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": "newer"}, "spec": {"image": "ghcr.io/gatehouse/example:1",
            "command": GATEHOUSE, "args": ["example-server"], "someFutureField": {"x": 1}}}),
    );
    let rt = KubeRuntime::start_with_client(
        fake.client(NS),
        NS.into(),
        None,
        KubeOptions {
            watch_mcpservers: true,
            ..options()
        },
    );
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: {{tokens: [{{principal: ops, token: {ADMIN_TOKEN}}}]}}\norchestrator: {{connect_timeout: 20s, call_timeout: 20s}}"
    );
    let config = gatehouse::Config::from_yaml(&yaml).unwrap();
    let running = gatehouse::start_with(config, Some(std::sync::Arc::new(rt)))
        .await
        .expect("gateway starts");
    let gw = support::TestGateway {
        addr: running.listening.local_addr,
        running: Some(running),
    };
    let admin = |method: &'static str, body: Option<serde_json::Value>| {
        support::admin_request(
            gw.addr,
            Some(ADMIN_TOKEN),
            method,
            "/admin/v1/servers/newer",
            body,
        )
    };
    eventually("newer reported", Duration::from_secs(5), || {
        fake.get(Kind::McpServer, NS, "newer")
            .filter(|c| c["status"]["phase"] == "Failed")
    })
    .await;

    let spec = json!({"image": "ghcr.io/gatehouse/example:1", "command": GATEHOUSE,
        "args": ["example-server", "--name", "replaced"]});
    let r = admin("PUT", Some(spec)).await;
    assert_eq!(r.status, 200, "an update like any other: {}", r.body);
    let cr = fake.get(Kind::McpServer, NS, "newer").unwrap();
    assert_eq!(
        cr["spec"]["args"],
        json!(["example-server", "--name", "replaced"]),
        "{cr}"
    );
    assert!(cr["spec"].get("someFutureField").is_none(), "{cr}");
    // The new definition runs, and the GET says so.
    eventually("the new definition runs", Duration::from_secs(10), || {
        fake.get(Kind::Deployment, NS, "mcp-newer")
            .filter(|d| d.to_string().contains("replaced"))
    })
    .await;
    let start = Instant::now();
    loop {
        let r = admin("GET", None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let status = &r.json()["status"];
        assert!(
            !status["message"]
                .as_str()
                .unwrap_or_default()
                .contains("cannot read"),
            "{status}"
        );
        if status["phase"] == "ready" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not ready: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await;
}

/// A gateway whose first list of `McpServer` resources comes before its configuration (a
/// slow start, a busy node) does not run the resource named like a config-file server in the
/// meantime: nothing of the resource's (its image) reaches the API server, before or after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcpserver_listed_before_the_configuration_never_runs_in_its_place() {
    let fake = FakeKube::start().await;
    fake.create(
        Kind::McpServer,
        NS,
        json!({"metadata": {"name": "keep"}, "spec": {"image": "evil.example/x:1",
            "command": GATEHOUSE, "args": ["example-server"],
            "env": [{"name": "STOLEN", "secretValue": "evil-value"}]}}),
    );
    let rt = KubeRuntime::start_with_client(
        fake.client(NS),
        NS.into(),
        None,
        KubeOptions {
            watch_mcpservers: true,
            ..options()
        },
    );
    // Every watch has listed (the resource included) well before the configuration comes.
    seen(&rt, "keep").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for needle in ["evil.example", "evil-value"] {
        let found = sent(&fake, needle);
        assert!(found.is_empty(), "before the configuration: {found:#?}");
    }
    let configured = example("keep", "ghcr.io/gatehouse/example:1", &[])
        .resolve()
        .unwrap();
    rt.sync(vec![configured]).await.unwrap();
    rt.wait_ready("keep", Duration::from_secs(10))
        .await
        .unwrap();
    for needle in ["evil.example", "evil-value"] {
        let found = sent(&fake, needle);
        assert!(found.is_empty(), "after the configuration: {found:#?}");
    }
    let dep = fake.get(Kind::Deployment, NS, "mcp-keep").unwrap();
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/gatehouse/example:1"
    );
    rt.shutdown().await;
}

/// While the replicas' secret is rotated, the Secret's `also-accepted` names the other secret:
/// a relay its holder signed with that one is followed too (the holder has not been rolled
/// yet), one signed with a third secret is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_signed_with_a_secret_also_accepted_is_followed() {
    let fake = FakeKube::start().await;
    let b64 = |v: &str| base64::engine::general_purpose::STANDARD.encode(v);
    let (new, old, third) = ("n".repeat(40), "o".repeat(40), "t".repeat(40));
    fake.create(
        Kind::Secret,
        NS,
        json!({"metadata": {"name": "gatehouse-orchestrator-relay"},
               "data": {"secret": b64(&new), "also-accepted": b64(&format!("{old}\n"))}}),
    );
    let signed = |secret: &str, url: &str| {
        use hmac::Mac;
        let key = gatehouse::replica_key::ReplicaKey::derive(secret).unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.lease_key()).unwrap();
        mac.update(format!("mallory\n{url}").as_bytes());
        let sig =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        json!({"gatehouse.dev/relay": url, "gatehouse.dev/relay-signature": sig})
    };
    let rt = follower_of_mallory(&fake, signed(&third, "https://third.example:9091")).await;
    // Signed with a secret neither presented nor accepted: never followed.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(600) {
        assert!(!rt.is_leader());
        if let Ok(ep) = rt.endpoint("s").await {
            panic!("followed a relay signed with a third secret: {ep:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Signed with the old secret, which this replica also accepts: followed.
    fake.patch(
        Kind::Lease,
        NS,
        "gatehouse-orchestrator",
        json!({"metadata": {"annotations": signed(&old, "https://old.example:9091")}}),
    );
    let url = followed_relay(&rt, "the relay signed with the old secret is followed").await;
    assert_eq!(url, "https://old.example:9091/relay/s");
    rt.shutdown().await;
}

/// A replica with a relay, serving server `s`, that finds the Lease held by "mallory" with
/// these annotations (its relay and their signature).
async fn follower_of_mallory(fake: &FakeKube, annotations: serde_json::Value) -> KubeRuntime {
    fake.create(
        Kind::Lease,
        NS,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "gatehouse-orchestrator", "annotations": annotations},
            "spec": {"holderIdentity": "mallory", "leaseDurationSeconds": 3600}}),
    );
    let lease = LeaseSettings {
        lease_duration: Duration::from_millis(800),
        renew_every: Duration::from_millis(150),
        retry_every: Duration::from_millis(100),
        ..LeaseSettings::new("gatehouse-orchestrator", "replica-a")
    };
    let rt = KubeRuntime::start_with_client(
        fake.client(NS),
        NS.into(),
        Some(lease),
        KubeOptions {
            relay_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..options()
        },
    );
    rt.apply(
        example("s", "ghcr.io/gatehouse/example:1", &[])
            .resolve()
            .unwrap(),
    )
    .await
    .unwrap();
    rt
}

/// The relay `rt` reaches server `s` through, once it follows one (within 5 s: else `what`
/// fails the test).
async fn followed_relay(rt: &KubeRuntime, what: &str) -> String {
    let start = Instant::now();
    loop {
        if let Ok(Endpoint::Relay { url, .. }) = rt.endpoint("s").await {
            return url;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
