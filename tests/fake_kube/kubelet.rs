//! The fake kubelet: runs each pod's container command as a local process.

use std::collections::HashMap;
use std::convert::Infallible;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::{Body, Kind, Shared, error, now_rfc3339};

type Output = (u8, Bytes);

/// One pod's container runtime state.
#[derive(Default)]
struct PodRuntime {
    current_log: Arc<Mutex<Vec<u8>>>,
    previous_log: Option<Vec<u8>>,
    stdin: Option<mpsc::Sender<Bytes>>,
    output: Option<broadcast::Sender<Output>>,
    task: Option<tokio::task::JoinHandle<()>>,
    restarts: u32,
    waiting_config: bool,
    running: bool,
    run: u64,
}

/// All pods' runtimes.
#[derive(Default)]
pub struct Kubelet {
    pods: HashMap<(String, String), PodRuntime>,
    /// Output channels of deleted pods kept open (`attachments_outlive_pods`).
    lost: Vec<broadcast::Sender<Output>>,
    /// Whether deleted pods' attachments stay open.
    pub keep_attachments: bool,
}

impl Kubelet {
    /// Stops a pod's process (the pod was deleted).
    pub fn stop(&mut self, ns: &str, name: &str) {
        let Some(rt) = self.pods.remove(&(ns.to_string(), name.to_string())) else {
            return;
        };
        if self.keep_attachments
            && let Some(out) = rt.output
        {
            self.lost.push(out);
        }
        if let Some(t) = rt.task {
            t.abort();
        }
    }

    /// Stops every process.
    pub fn stop_all(&mut self) {
        for (_, rt) in self.pods.drain() {
            if let Some(t) = rt.task {
                t.abort();
            }
        }
    }

    /// Pods that wait for a Secret.
    pub fn waiting_for_config(&self) -> Vec<(String, String)> {
        self.pods
            .iter()
            .filter(|(_, rt)| rt.waiting_config)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// Changes a pod's status (no-op when the pod is gone).
/// The port of a container's TCP readiness probe (a number, or the name of one of its ports).
fn tcp_probe_port(container: &Value) -> Option<u16> {
    let port = &container["readinessProbe"]["tcpSocket"]["port"];
    let number = match port.as_str() {
        Some(named) => container["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == named)?["containerPort"]
            .as_u64()?,
        None => port.as_u64()?,
    };
    u16::try_from(number).ok()
}

fn set_status(shared: &Arc<Shared>, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
    let mut store = shared.store.lock().unwrap();
    let Some(mut pod) = store.get(Kind::Pod, ns, name).cloned() else {
        return;
    };
    f(&mut pod["status"]);
    store.update(&shared.events, Kind::Pod, ns, name, pod);
}

fn waiting(status: &mut Value, image: &str, restarts: u32, reason: &str, message: &str) {
    status["phase"] = json!("Pending");
    status["conditions"] = json!([
        {"type": "PodScheduled", "status": "True"},
        {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
    ]);
    status["containerStatuses"] = json!([{
        "name": "server", "image": image, "imageID": "", "ready": false, "started": false,
        "restartCount": restarts,
        "state": {"waiting": {"reason": reason, "message": message}},
    }]);
}

/// Starts (or retries) the container of a pod.
pub fn start_pod(shared: &Arc<Shared>, ns: &str, name: &str) {
    let key = (ns.to_string(), name.to_string());
    let (pod, secrets) = {
        let store = shared.store.lock().unwrap();
        let Some(pod) = store.get(Kind::Pod, ns, name).cloned() else {
            return;
        };
        (pod, store.list(Kind::Secret, ns))
    };
    let container = pod["spec"]["containers"][0].clone();
    let image = container["image"].as_str().unwrap_or_default().to_string();
    let restarts = {
        let mut store = shared.store.lock().unwrap();
        let rt = store.kubelet.pods.entry(key.clone()).or_default();
        if rt.running {
            return;
        }
        rt.waiting_config = false;
        rt.restarts
    };
    if image.contains("unschedulable") {
        set_status(shared, ns, name, |s| {
            s["phase"] = json!("Pending");
            s["conditions"] = json!([{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 Insufficient memory. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.",
            }]);
        });
        return;
    }
    if image.contains("unpullable") {
        let msg = format!("failed to pull and unpack image \"{image}\": not found");
        set_status(shared, ns, name, |s| {
            waiting(s, &image, 0, "ErrImagePull", &msg)
        });
        let (shared, ns, name) = (shared.clone(), ns.to_string(), name.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let msg = format!("Back-off pulling image \"{image}\"");
            set_status(&shared, &ns, &name, |s| {
                waiting(s, &image, 0, "ImagePullBackOff", &msg)
            });
        });
        return;
    }
    // Resolve env, secretKeyRef included.
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_array().cloned().unwrap_or_default() {
        let key_name = var["name"].as_str().unwrap_or_default().to_string();
        if let Some(v) = var["value"].as_str() {
            env.push((key_name, v.to_string()));
        } else if let Some(r) = var["valueFrom"].get("secretKeyRef") {
            let sname = r["name"].as_str().unwrap_or_default();
            let skey = r["key"].as_str().unwrap_or_default();
            let secret = secrets.iter().find(|s| s["metadata"]["name"] == sname);
            let value = secret
                .and_then(|s| s["data"][skey].as_str())
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
            match (secret, value) {
                (_, Some(v)) => env.push((key_name, String::from_utf8_lossy(&v).into_owned())),
                (None, _) => {
                    return config_error(
                        shared,
                        &key,
                        &image,
                        restarts,
                        &format!("secret \"{sname}\" not found"),
                    );
                }
                (Some(_), None) => {
                    return config_error(
                        shared,
                        &key,
                        &image,
                        restarts,
                        &format!("couldn't find key {skey} in Secret {ns}/{sname}"),
                    );
                }
            }
        }
    }
    let mut argv: Vec<String> = match container["command"].as_array() {
        Some(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        // No command: the image's entrypoint.
        None => shared
            .settings
            .lock()
            .unwrap()
            .images
            .get(&image)
            .cloned()
            .unwrap_or_default(),
    };
    argv.extend(
        container["args"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    );
    if argv.is_empty() {
        return config_error(
            shared,
            &key,
            &image,
            restarts,
            "the fake kubelet runs the container's command; this container has none",
        );
    }
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(std::env::var("PATH").ok().map(|p| ("PATH".to_string(), p)))
        .envs(std::env::var("HOME").ok().map(|p| ("HOME".to_string(), p)))
        .envs(env)
        .stdin(if container["stdin"] == true {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("failed to create containerd task: exec: {:?}: {e}", argv[0]);
            set_status(shared, ns, name, |s| {
                waiting(s, &image, restarts, "RunContainerError", &msg)
            });
            return;
        }
    };
    let (stdin_tx, mut stdin_rx) = mpsc::channel::<Bytes>(64);
    let (out_tx, _) = broadcast::channel::<Output>(4096);
    let log = Arc::new(Mutex::new(Vec::new()));
    let run = {
        let mut store = shared.store.lock().unwrap();
        let rt = store.kubelet.pods.entry(key.clone()).or_default();
        rt.running = true;
        rt.run += 1;
        rt.stdin = Some(stdin_tx);
        rt.output = Some(out_tx.clone());
        rt.current_log = log.clone();
        rt.run
    };
    let started = now_rfc3339();
    // A container with a TCP readiness probe is ready once its port accepts (probed every
    // 20 ms here, where a kubelet waits `periodSeconds`); one without is ready once running.
    let probe = tcp_probe_port(&container);
    set_status(shared, ns, name, |s| {
        let last = s["containerStatuses"][0]["lastState"].clone();
        let ready = probe.is_none();
        let flag = if ready { "True" } else { "False" };
        s["phase"] = json!("Running");
        s["podIP"] = json!("127.0.0.1");
        s["startTime"] = json!(started);
        s["conditions"] = json!([
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": flag},
            {"type": "Ready", "status": flag},
        ]);
        s["containerStatuses"] = json!([{
            "name": "server", "image": image, "imageID": format!("fake://{image}"),
            "ready": ready, "started": true, "restartCount": restarts,
            "state": {"running": {"startedAt": started}},
            "lastState": if last.is_null() { json!({}) } else { last },
        }]);
    });
    if let Some(port) = probe {
        let (shared, ns, name, key) = (
            shared.clone(),
            ns.to_string(),
            name.to_string(),
            key.clone(),
        );
        tokio::spawn(async move {
            loop {
                let current = shared
                    .store
                    .lock()
                    .unwrap()
                    .kubelet
                    .pods
                    .get(&key)
                    .is_some_and(|rt| rt.running && rt.run == run);
                if !current {
                    return;
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    set_status(&shared, &ns, &name, |s| {
                        s["conditions"][2]["status"] = json!("True");
                        s["conditions"][3]["status"] = json!("True");
                        s["containerStatuses"][0]["ready"] = json!(true);
                    });
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    let (shared2, ns2, name2) = (shared.clone(), ns.to_string(), name.to_string());
    let task = tokio::spawn(async move {
        let mut stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let pump = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>, ch: u8| {
            let (out, log) = (out_tx.clone(), log.clone());
            async move {
                let mut buf = vec![0u8; 16384];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            log.lock().unwrap().extend_from_slice(&buf[..n]);
                            let _ = out.send((ch, Bytes::copy_from_slice(&buf[..n])));
                        }
                    }
                }
            }
        };
        let out_pump = tokio::spawn(pump(Box::new(stdout), 1));
        let err_pump = tokio::spawn(pump(Box::new(stderr), 2));
        let stdin_pump = tokio::spawn(async move {
            while let Some(b) = stdin_rx.recv().await {
                if let Some(w) = stdin.as_mut()
                    && (w.write_all(&b).await.is_err() || w.flush().await.is_err())
                {
                    break;
                }
            }
        });
        let status = child.wait().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), out_pump).await;
        let _ = tokio::time::timeout(Duration::from_millis(500), err_pump).await;
        stdin_pump.abort();
        let code = status.ok().and_then(|s| s.code()).unwrap_or(137);
        let exit_status = if code == 0 {
            json!({"metadata": {}, "status": "Success"})
        } else {
            json!({"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                   "message": format!("command terminated with non-zero exit code: {code}"),
                   "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
        };
        let _ = out_tx.send((3, Bytes::from(exit_status.to_string())));
        exited(&shared2, &ns2, &name2, run, code).await;
    });
    let mut store = shared.store.lock().unwrap();
    if let Some(rt) = store.kubelet.pods.get_mut(&key) {
        rt.task = Some(task);
    } else {
        task.abort();
    }
}

fn config_error(
    shared: &Arc<Shared>,
    key: &(String, String),
    image: &str,
    restarts: u32,
    msg: &str,
) {
    {
        let mut store = shared.store.lock().unwrap();
        if let Some(rt) = store.kubelet.pods.get_mut(key) {
            rt.waiting_config = true;
        }
    }
    set_status(shared, &key.0, &key.1, |s| {
        waiting(s, image, restarts, "CreateContainerConfigError", msg)
    });
}

/// The container exited: CrashLoopBackOff, then a restart after the back-off.
async fn exited(shared: &Arc<Shared>, ns: &str, name: &str, run: u64, code: i32) {
    let key = (ns.to_string(), name.to_string());
    let (restarts, image) = {
        let mut store = shared.store.lock().unwrap();
        let image = store
            .get(Kind::Pod, ns, name)
            .map(|p| {
                p["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_default();
        let Some(rt) = store.kubelet.pods.get_mut(&key) else {
            return;
        };
        if rt.run != run {
            return;
        }
        rt.running = false;
        rt.stdin = None;
        rt.output = None;
        rt.restarts += 1;
        let log = std::mem::take(&mut *rt.current_log.lock().unwrap());
        rt.previous_log = Some(log);
        rt.current_log = Arc::new(Mutex::new(Vec::new()));
        (rt.restarts, image)
    };
    let base = shared.settings.lock().unwrap().crash_backoff;
    let delay = (base * 2u32.saturating_pow(restarts.saturating_sub(1).min(5)))
        .min(Duration::from_secs(10));
    let finished = now_rfc3339();
    let msg = format!("back-off {delay:?} restarting failed container=server pod={name}");
    set_status(shared, ns, name, |s| {
        waiting(s, &image, restarts, "CrashLoopBackOff", &msg);
        s["phase"] = json!("Running");
        s["containerStatuses"][0]["lastState"] = json!({"terminated": {
            "exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
            "finishedAt": finished,
        }});
    });
    tokio::time::sleep(delay).await;
    let still = shared
        .store
        .lock()
        .unwrap()
        .kubelet
        .pods
        .get(&key)
        .is_some_and(|rt| rt.run == run && !rt.running);
    if still {
        start_pod(shared, ns, name);
    }
}

/// Kills a pod's process as a crash would.
pub fn kill(shared: &Arc<Shared>, ns: &str, name: &str) {
    let task = {
        let store = shared.store.lock().unwrap();
        store
            .kubelet
            .pods
            .get(&(ns.to_string(), name.to_string()))
            .and_then(|rt| rt.task.as_ref().map(|t| t.abort_handle()))
    };
    // Aborting the task drops the Child (kill_on_drop): handle the exit ourselves.
    if let Some(t) = task {
        t.abort();
        let run = shared
            .store
            .lock()
            .unwrap()
            .kubelet
            .pods
            .get(&(ns.to_string(), name.to_string()))
            .map(|rt| rt.run)
            .unwrap_or(0);
        let (shared, ns, name) = (shared.clone(), ns.to_string(), name.to_string());
        tokio::spawn(async move {
            let out = shared
                .store
                .lock()
                .unwrap()
                .kubelet
                .pods
                .get(&(ns.clone(), name.clone()))
                .and_then(|rt| rt.output.clone());
            if let Some(out) = out {
                let st = json!({"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                    "message": "command terminated with non-zero exit code: 137"});
                let _ = out.send((3, Bytes::from(st.to_string())));
            }
            exited(&shared, &ns, &name, run, 137).await;
        });
    }
}

fn text(code: u16, body: String) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap()
}

/// `GET pods/{name}/log`.
pub fn logs(
    shared: &Arc<Shared>,
    ns: &str,
    name: &str,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let store = shared.store.lock().unwrap();
    if store.get(Kind::Pod, ns, name).is_none() {
        return error(404, "NotFound", format!("pods \"{name}\" not found"));
    }
    let rt = store.kubelet.pods.get(&(ns.to_string(), name.to_string()));
    let previous = q.get("previous").is_some_and(|v| v == "true");
    let bytes = if previous {
        match rt.and_then(|r| r.previous_log.clone()) {
            Some(b) => b,
            None => {
                return error(
                    400,
                    "BadRequest",
                    format!("previous terminated container \"server\" in pod \"{name}\" not found"),
                );
            }
        }
    } else {
        rt.map(|r| r.current_log.lock().unwrap().clone())
            .unwrap_or_default()
    };
    let mut out = String::from_utf8_lossy(&bytes).into_owned();
    if let Some(n) = q.get("tailLines").and_then(|v| v.parse::<usize>().ok()) {
        let lines: Vec<&str> = out.lines().collect();
        let skip = lines.len().saturating_sub(n);
        out = lines[skip..].iter().map(|l| format!("{l}\n")).collect();
    }
    // Like the kubelet: the first `limitBytes` of what it would send (after `tailLines`).
    if let Some(n) = q.get("limitBytes").and_then(|v| v.parse::<usize>().ok()) {
        let mut end = n.min(out.len());
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    text(200, out)
}

/// `pods/{name}/attach` over a websocket with the channel subprotocol.
pub fn attach(
    shared: Arc<Shared>,
    ns: &str,
    name: &str,
    q: &HashMap<String, String>,
    req: Request<Full<Bytes>>,
) -> Response<Body> {
    let key = (ns.to_string(), name.to_string());
    let (stdin, output) = {
        let store = shared.store.lock().unwrap();
        if store.get(Kind::Pod, ns, name).is_none() {
            return error(404, "NotFound", format!("pods \"{name}\" not found"));
        }
        match store.kubelet.pods.get(&key) {
            Some(rt) if rt.running => (rt.stdin.clone(), rt.output.clone()),
            _ => {
                return error(
                    400,
                    "BadRequest",
                    format!(
                        "container server is not valid for pod {name}: the container is not running"
                    ),
                );
            }
        }
    };
    let Some(output) = output else {
        return error(400, "BadRequest", "container is not running");
    };
    if q.get("container").is_some_and(|c| c != "server") {
        return error(
            400,
            "BadRequest",
            format!("container {} is not valid for pod {name}", q["container"]),
        );
    }
    if q.get("tty").is_some_and(|v| v == "true") {
        return error(400, "BadRequest", "tty is not supported by this container");
    }
    let headers = req.headers();
    let Some(key_hdr) = headers.get("sec-websocket-key").cloned() else {
        return error(400, "BadRequest", "not a websocket upgrade");
    };
    let offered: Vec<String> = headers
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let accepted = shared.settings.lock().unwrap().attach_protocols.clone();
    let Some(protocol) = accepted
        .into_iter()
        .find(|p| offered.iter().any(|o| o == p))
    else {
        return error(400, "BadRequest", "no supported channel subprotocol");
    };
    let want_stdin = q.get("stdin").is_some_and(|v| v == "true");
    let want_stdout = q.get("stdout").is_some_and(|v| v == "true");
    let want_stderr = q.get("stderr").is_some_and(|v| v == "true");
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key_hdr.as_bytes());
    let mut rx = output.subscribe();
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        let (mut sink, mut stream) = ws.split();
        let mut stdin_open = want_stdin;
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(Ok(Message::Binary(data))) if !data.is_empty() => {
                        match data[0] {
                            0 if stdin_open => {
                                if let Some(tx) = &stdin {
                                    let _ = tx.send(Bytes::copy_from_slice(&data[1..])).await;
                                }
                            }
                            255 if data.get(1) == Some(&0) => stdin_open = false,
                            _ => {}
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
                out = rx.recv() => match out {
                    Ok((ch, bytes)) => {
                        let forward = match ch {
                            1 => want_stdout,
                            2 => want_stderr,
                            3 => true,
                            _ => false,
                        };
                        if forward {
                            let mut frame = Vec::with_capacity(bytes.len() + 1);
                            frame.push(ch);
                            frame.extend_from_slice(&bytes);
                            if sink.send(Message::Binary(frame.into())).await.is_err() {
                                break;
                            }
                        }
                        if ch == 3 {
                            let _ = sink.close().await;
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => {
                        let _ = sink.close().await;
                        break;
                    }
                },
            }
        }
    });
    Response::builder()
        .status(101)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", accept)
        .header("sec-websocket-protocol", protocol)
        .body(
            Full::new(Bytes::new())
                .map_err(|e: Infallible| match e {})
                .boxed(),
        )
        .unwrap()
}
