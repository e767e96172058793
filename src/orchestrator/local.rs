//! The `local` backend: each server is a child process of the gateway.
//!
//! A supervisor task per server starts the process, restarts it with capped exponential
//! backoff when it exits, keeps the output of the current and the previous run in
//! bounded ring buffers, and publishes the server's status on a watch channel.
//!
//! - stdio servers: stdout is the MCP channel, so only stderr goes to the logs. The
//!   endpoint attaches to the running process; a newer attachment replaces the older
//!   one, whose reader then sees end-of-file. The process outlives attachments.
//! - streamable-http servers: stdout and stderr go to the logs; the server is ready
//!   once its port accepts TCP connections on 127.0.0.1.
//!
//! The child's environment is cleared except for [`LocalSettings::inherit_env`] (nothing by
//! default) plus the definition's own variables, so the gateway's secrets do not leak into
//! servers; it runs in its own process group, which is what stopping it signals, and starts in
//! an empty private directory of its own, never the gateway's (see [`crate::process`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::process::{ChildStdin, ChildStdout};
use tokio::sync::{Notify, OwnedMutexGuard, mpsc, watch};

use super::backoff::{Backoff, random_unit};
use super::idle::Usage;
use super::logbuf::LogBuffer;
use super::port_owner::{self, Listeners};
use super::spec::{EnvValue, ResolvedServer};
use super::{
    Endpoint, FailureReason, LogOptions, OrchestratorError, Phase, Result, Runtime, ServerStatus,
    Sharing, StdioConnector, StdioEndpoint, StdioStream,
};
use crate::process::{self, ServerProcess};

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// Delays between restarts.
    pub backoff: Backoff,
    /// Bytes of output kept per run (current and previous).
    pub log_bytes: usize,
    /// Give up (phase `Failed`) after this many exits in a row without a stable run; `None` retries forever.
    pub max_consecutive_failures: Option<u32>,
    /// `wait_ready` fails with `CrashLoopBackOff` after this many exits while it waits.
    pub crashloop_after: u32,
    /// Between stdin close, SIGTERM and SIGKILL when stopping a process.
    pub stop_grace: Duration,
    /// How long [`StdioEndpoint::open`] waits for a (re)starting process.
    pub attach_timeout: Duration,
    /// Variables of the gateway's environment passed on to every server.
    pub inherit_env: Vec<String>,
    /// Buffer size of an attachment's pipes.
    pub attach_buffer: usize,
    /// Stop servers unused for this long unless their definition says otherwise (`None`: only
    /// servers whose definition asks for it sleep).
    pub idle_after: Option<Duration>,
}

impl Default for LocalSettings {
    fn default() -> Self {
        LocalSettings {
            backoff: Backoff::default(),
            log_bytes: super::logbuf::LOG_BYTES,
            max_consecutive_failures: None,
            crashloop_after: 3,
            stop_grace: Duration::from_secs(2),
            attach_timeout: Duration::from_secs(30),
            // Nothing by default: a server gets a minimal PATH, its own HOME and what its
            // definition names (see crate::process).
            inherit_env: Vec::new(),
            attach_buffer: 256 * 1024,
            idle_after: None,
        }
    }
}

/// Runs MCP servers as child processes of the gateway.
///
/// Changes to one name (apply, remove, restart) run one at a time under that name's lock,
/// and a supervisor is started and put in `servers` in one step under it: every supervisor
/// has exactly one entry, so removing the entry's server stops everything it started.
pub struct LocalRuntime {
    settings: Arc<LocalSettings>,
    servers: Arc<DashMap<String, Arc<Supervised>>>,
    /// A lock per name with a change in progress (dropped with the last holder).
    changing: Arc<DashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Set by shutdown: no server starts after it.
    closed: Arc<AtomicBool>,
    /// Held while a change checks that no other server listens on its port and takes it.
    ports: Arc<std::sync::Mutex<()>>,
    /// Servers removed while this gateway ran: defined again, they start with none of the
    /// files a process of the old definition may have written after the removal.
    removed: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// Holds the change lock of one server name; frees the name's entry when nobody waits.
struct ChangeLock {
    changing: Arc<DashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    name: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for ChangeLock {
    fn drop(&mut self) {
        drop(self.guard.take());
        // Only the map's own reference left: nobody holds or waits for this lock.
        self.changing
            .remove_if(&self.name, |_, m| Arc::strong_count(m) == 1);
    }
}

impl LocalRuntime {
    /// A runtime with no servers.
    pub fn new(settings: LocalSettings) -> Self {
        sweep_secret_files();
        LocalRuntime {
            settings: Arc::new(settings),
            servers: Arc::new(DashMap::new()),
            changing: Arc::new(DashMap::new()),
            closed: Arc::new(AtomicBool::new(false)),
            ports: Arc::default(),
            removed: Arc::default(),
        }
    }

    /// Waits for the other changes to `name` to finish.
    async fn lock(&self, name: &str) -> ChangeLock {
        let mutex = self.changing.entry(name.to_owned()).or_default().clone();
        let mut lock = ChangeLock {
            changing: self.changing.clone(),
            name: name.to_owned(),
            guard: None,
        };
        lock.guard = Some(mutex.lock_owned().await);
        lock
    }

    /// Runs a change to completion even if the caller stops waiting (a client that hangs
    /// up mid-PUT must not leave a half-replaced server), holding the name's lock throughout.
    async fn change<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce(ChangeCtx) -> BoxFuture<'static, Result<T>>,
    ) -> Result<T> {
        let lock = self.lock(name).await;
        let ctx = ChangeCtx {
            name: name.to_owned(),
            servers: self.servers.clone(),
            settings: self.settings.clone(),
            closed: self.closed.clone(),
            ports: self.ports.clone(),
            removed: self.removed.clone(),
        };
        let work = f(ctx);
        let task = tokio::spawn(async move {
            let _lock = lock;
            work.await
        });
        match task.await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(OrchestratorError::NotRunning {
                server: name.to_owned(),
                detail: "the runtime is shutting down".into(),
            }),
        }
    }

    fn get(&self, name: &str) -> Result<Arc<Supervised>> {
        self.servers
            .get(name)
            .map(|s| s.value().clone())
            .ok_or_else(|| OrchestratorError::NotFound(name.to_string()))
    }

    /// Subscribes to a server's status changes.
    pub fn watch_status(&self, name: &str) -> Result<watch::Receiver<ServerStatus>> {
        Ok(self.get(name)?.status.subscribe())
    }

    /// Stops every server (for shutdown); later applies fail.
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // A change that began before `closed` holds its name's lock, so it is listed here
        // and removed once it is done; one that begins later sees `closed`.
        let mut names: std::collections::BTreeSet<String> =
            self.changing.iter().map(|e| e.key().clone()).collect();
        names.extend(self.servers.iter().map(|e| e.key().clone()));
        futures_util::future::join_all(names.iter().map(|n| Runtime::remove(self, n))).await;
    }

    fn endpoint_of(&self, sup: &Arc<Supervised>) -> Result<Endpoint> {
        // No stored secrets here (`apply` refuses them).
        if let Some(remote) = super::remote::endpoint(&sup.server, |_| None) {
            return remote;
        }
        Ok(match sup.server.http_port_path() {
            Some((port, path)) => Endpoint::Http {
                url: format!("http://127.0.0.1:{port}{path}"),
            },
            None => Endpoint::Stdio(StdioEndpoint::new(Arc::new(LocalAttach {
                sup: sup.clone(),
                settings: self.settings.clone(),
            }))),
        })
    }
}

impl Drop for LocalRuntime {
    fn drop(&mut self) {
        for s in self.servers.iter() {
            s.stop_now();
        }
    }
}

impl Runtime for LocalRuntime {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(LocalRuntime::shutdown(self))
    }

    fn apply(&self, server: ResolvedServer) -> BoxFuture<'_, Result<()>> {
        async move {
            if server.spec.command.is_none() && server.spec.remote.is_none() {
                return Err(OrchestratorError::Unsupported {
                    server: server.name.clone(),
                    backend: "local",
                    what: "a command",
                });
            }
            if server.uses_stored_secrets() {
                return Err(OrchestratorError::Unsupported {
                    server: server.name.clone(),
                    backend: "local",
                    what: "storedSecret (a Kubernetes Secret; give secretValue)",
                });
            }
            if server.spec.egress.is_some() {
                tracing::warn!(
                    server = %server.name,
                    "egress {}", super::egress::NOT_ENFORCED_LOCALLY
                );
            }
            let name = server.name.clone();
            self.change(&name, move |ctx| {
                async move {
                    if ctx.closed.load(Ordering::SeqCst) {
                        return Err(OrchestratorError::NotRunning {
                            server: ctx.name,
                            detail: "the gateway is shutting down".into(),
                        });
                    }
                    let old = ctx.servers.get(&ctx.name).map(|s| s.value().clone());
                    if let Some(old) = &old
                        && old.server == server
                        && !old.stopping()
                    {
                        return Ok(());
                    }
                    // Refused before the old process is stopped: a refused change changes nothing.
                    check_port(&ctx.servers, &server)?;
                    if let Some(old) = old {
                        // The old entry stays visible until its process is gone.
                        old.stop().await;
                    } else if lock_removed(&ctx.removed).remove(&ctx.name) {
                        process::remove_homes(&ctx.name);
                    }
                    // Checked again and taken at once: another change may have taken it since.
                    let _ports = ctx.ports.lock().unwrap_or_else(|e| e.into_inner());
                    check_port(&ctx.servers, &server)?;
                    let sup = Supervised::start(server, ctx.settings.clone());
                    ctx.servers.insert(ctx.name, sup);
                    Ok(())
                }
                .boxed()
            })
            .await
        }
        .boxed()
    }

    fn sync(&self, servers: Vec<ResolvedServer>) -> BoxFuture<'_, Result<()>> {
        async move {
            if let Some(s) = servers
                .iter()
                .find(|s| s.spec.command.is_none() && s.spec.remote.is_none())
            {
                return Err(OrchestratorError::Unsupported {
                    server: s.name.clone(),
                    backend: "local",
                    what: "a command",
                });
            }
            // All refused before anything changes, as `apply` would refuse each.
            let mut ports = BTreeMap::new();
            for s in &servers {
                if let Some(port) = local_port(s)
                    && let Some(other) = ports.insert(port, &s.name)
                {
                    return Err(OrchestratorError::Conflict(format!(
                        "servers {other:?} and {:?} both listen on port {port}: two servers on this machine cannot share a port",
                        s.name
                    )));
                }
            }
            if let Some(s) = servers.iter().find(|s| s.uses_stored_secrets()) {
                return Err(OrchestratorError::Unsupported {
                    server: s.name.clone(),
                    backend: "local",
                    what: "storedSecret (a Kubernetes Secret; give secretValue)",
                });
            }
            let keep: std::collections::BTreeSet<String> =
                servers.iter().map(|s| s.name.clone()).collect();
            let gone: Vec<String> = self
                .servers
                .iter()
                .map(|e| e.key().clone())
                .filter(|n| !keep.contains(n))
                .collect();
            for name in gone {
                self.remove(&name).await?;
            }
            for server in servers {
                self.apply(server).await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn wait_ready<'a>(
        &'a self,
        name: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Endpoint>> {
        async move {
            let sup = self.get(name)?;
            let mut rx = sup.status.subscribe();
            // Under the lock of `rest`: a sleep not yet carried out is called off (the
            // process keeps running), one carried out already is undone by a new process.
            let woke = sup.rest.send_if_modified(|rest| {
                if let Some(u) = &sup.usage {
                    u.woke();
                }
                std::mem::replace(rest, Rest::Awake) != Rest::Awake
            });
            if woke {
                tracing::info!(server = name, "waking: a call needs it");
            }
            let start_restarts = rx.borrow().restarts;
            let crashloop = self.settings.crashloop_after;
            let wait = async {
                loop {
                    let st = rx.borrow_and_update().clone();
                    match &st.phase {
                        Phase::Ready => return Ok(()),
                        Phase::Failed { reason } => {
                            return Err(OrchestratorError::Failed {
                                server: name.to_string(),
                                reason: reason.clone(),
                                message: st.message.clone(),
                            });
                        }
                        Phase::Removed => return Err(OrchestratorError::Removed(name.into())),
                        Phase::BackOff { .. }
                            if st.restarts.saturating_sub(start_restarts) >= crashloop =>
                        {
                            return Err(OrchestratorError::Failed {
                                server: name.to_string(),
                                reason: FailureReason::CrashLoopBackOff,
                                message: st.message.clone(),
                            });
                        }
                        _ => {}
                    }
                    if rx.changed().await.is_err() {
                        return Err(OrchestratorError::Removed(name.into()));
                    }
                }
            };
            match tokio::time::timeout(timeout, wait).await {
                Ok(Ok(())) => self.endpoint_of(&sup),
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    let st = sup.status.borrow().clone();
                    Err(OrchestratorError::Timeout {
                        server: name.to_string(),
                        waited: timeout,
                        last: describe(&st),
                    })
                }
            }
        }
        .boxed()
    }

    fn endpoint<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Endpoint>> {
        async move { self.endpoint_of(&self.get(name)?) }.boxed()
    }

    fn sleep<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        async move {
            let _lock = self.lock(name).await;
            let sup = self.get(name)?;
            let mut slept = sup.slept.subscribe();
            let before = *slept.borrow_and_update();
            // A call may have begun since the sweeper looked: then it holds the server.
            let asked = sup.rest.send_if_modified(|rest| {
                let asked =
                    *rest == Rest::Awake && sup.usage.as_ref().is_some_and(|u| u.try_sleep());
                if asked {
                    *rest = Rest::Asked;
                }
                asked
            });
            if !asked {
                return Ok(());
            }
            let mut woken = sup.rest.subscribe();
            // Done once the process is gone (or the server removed), or when a call woke it
            // before it was; bounded, since this holds the name's lock.
            let settled = async {
                tokio::select! {
                    _ = slept.wait_for(|n| *n != before) => {}
                    _ = woken.wait_for(|r| *r == Rest::Awake) => {}
                }
            };
            let bound = self.settings.stop_grace * 3 + Duration::from_secs(5);
            if tokio::time::timeout(bound, settled).await.is_err() {
                tracing::warn!(server = name, "the idle server did not stop in {bound:?}");
            }
            Ok(())
        }
        .boxed()
    }

    fn usage(&self, name: &str) -> Option<Arc<Usage>> {
        self.get(name).ok()?.usage.clone()
    }

    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<ServerStatus>> {
        async move { Ok(self.get(name)?.status.borrow().clone()) }.boxed()
    }

    fn remote_addresses(&self) -> Option<super::remote::AddressCheck> {
        // A literal address is checked with the definition; a name is checked at each
        // connection, for what it resolves to then.
        Some(Arc::new(super::spec::outside_link_local))
    }

    fn egress(&self, name: &str) -> Option<String> {
        let server = self.get(name).ok()?;
        server
            .server
            .spec
            .egress
            .as_ref()
            .map(|_| super::egress::NOT_ENFORCED_LOCALLY.to_owned())
    }

    fn list(&self) -> BoxFuture<'_, Vec<(String, ServerStatus)>> {
        async move {
            let mut all: Vec<_> = self
                .servers
                .iter()
                .map(|e| (e.key().clone(), e.value().status.borrow().clone()))
                .collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            all
        }
        .boxed()
    }

    fn restart<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        async move {
            let _lock = self.lock(name).await;
            let sup = self.get(name)?;
            if sup.server.spec.remote.is_some() {
                return Err(OrchestratorError::Remote {
                    server: name.to_owned(),
                    what: "process to restart",
                });
            }
            // A sleeping server has no process to restart; the next call starts a fresh one.
            if *sup.rest.borrow() != Rest::Asleep {
                sup.restart.notify_one();
            }
            Ok(())
        }
        .boxed()
    }

    fn logs<'a>(&'a self, name: &'a str, opts: LogOptions) -> BoxFuture<'a, Result<String>> {
        async move {
            let sup = self.get(name)?;
            if sup.server.spec.remote.is_some() {
                return Err(OrchestratorError::Remote {
                    server: name.to_owned(),
                    what: "logs",
                });
            }
            let logs = sup.logs.lock().unwrap_or_else(|e| e.into_inner());
            if opts.previous {
                logs.previous
                    .as_ref()
                    .map(|b| b.text(opts.tail_lines))
                    .ok_or_else(|| OrchestratorError::NoLogs {
                        server: name.to_string(),
                        detail: "no previous run".into(),
                    })
            } else {
                Ok(logs.current.text(opts.tail_lines))
            }
        }
        .boxed()
    }

    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        async move {
            self.change(name, |ctx| {
                async move {
                    let sup = ctx.servers.get(&ctx.name).map(|s| s.value().clone());
                    if let Some(sup) = sup {
                        sup.stop().await;
                        ctx.servers.remove(&ctx.name);
                    }
                    // A server defined later under this name starts with none of its files
                    // (removed again then: private processes of this one may still run).
                    process::remove_homes(&ctx.name);
                    lock_removed(&ctx.removed).insert(ctx.name.clone());
                    Ok(())
                }
                .boxed()
            })
            .await
        }
        .boxed()
    }
}

fn lock_removed(
    removed: &std::sync::Mutex<std::collections::HashSet<String>>,
) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
    removed.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a change to one server works on, owned so that it can outlive its caller.
struct ChangeCtx {
    name: String,
    servers: Arc<DashMap<String, Arc<Supervised>>>,
    settings: Arc<LocalSettings>,
    closed: Arc<AtomicBool>,
    ports: Arc<std::sync::Mutex<()>>,
    /// Servers removed while this gateway ran: defined again, they start with none of the
    /// files a process of the old definition may have written after the removal.
    removed: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// The loopback port a server's own process listens on (an HTTP server that is not remote).
fn local_port(server: &ResolvedServer) -> Option<u16> {
    match server.http_port_path() {
        Some((port, _)) if server.spec.remote.is_none() && port != 0 => Some(port),
        _ => None,
    }
}

/// Refuses a server whose port another (not stopping) server of this machine listens on: the
/// gateway reaches a local HTTP server by its port alone, so one would take the other's calls.
fn check_port(servers: &DashMap<String, Arc<Supervised>>, server: &ResolvedServer) -> Result<()> {
    let Some(port) = local_port(server) else {
        return Ok(());
    };
    match servers.iter().find(|e| {
        *e.key() != server.name
            && !e.value().stopping()
            && local_port(&e.value().server) == Some(port)
    }) {
        Some(other) => Err(OrchestratorError::Conflict(format!(
            "server {:?} listens on port {port} already: two servers on this machine cannot share a port",
            other.key()
        ))),
        None => Ok(()),
    }
}

fn describe(st: &ServerStatus) -> String {
    match &st.message {
        Some(m) => format!("{}: {m}", st.phase.name()),
        None => st.phase.name().to_string(),
    }
}

/// Output of the current and the previous run.
struct Logs {
    current: LogBuffer,
    previous: Option<LogBuffer>,
}

/// The I/O of a running stdio process that attachments plug into.
struct ProcIo {
    sink: Arc<tokio::sync::Mutex<Option<WriteHalf<DuplexStream>>>>,
    source_tx: mpsc::Sender<ReadHalf<DuplexStream>>,
}

/// A server's secrets delivered as files: a private directory (0700) of read-only files
/// (0400), each named as its variable, removed with the server. The name carries the
/// gateway's pid, so that a later gateway can sweep what a killed one left (see
/// [`sweep_secret_files`]).
struct SecretFiles {
    dir: PathBuf,
}

/// Prefix of the directories of [`SecretFiles`] under the temporary directory.
const SECRET_FILES_PREFIX: &str = "gatehouse-secrets-";

/// How often a ready HTTP server's port is checked for another user's listener.
const RECHECK_READY: Duration = Duration::from_secs(2);

impl SecretFiles {
    /// Where `server`'s file secrets will be kept (`None`: it has none). Nothing is written
    /// yet: [`SecretFiles::ensure`] does, before each process starts.
    fn for_server(server: &ResolvedServer) -> Option<SecretFiles> {
        if !server
            .env
            .iter()
            .any(|(_, v)| matches!(v, EnvValue::SecretFile(_)))
        {
            return None;
        }
        let mut nonce = [0u8; 8];
        let _ = getrandom::fill(&mut nonce);
        Some(SecretFiles {
            dir: std::env::temp_dir().join(format!(
                "{SECRET_FILES_PREFIX}{}-{}-{:016x}",
                std::process::id(),
                server.name,
                u64::from_ne_bytes(nonce)
            )),
        })
    }

    /// Makes the directory and files exactly `server`'s file secrets again (a file removed
    /// or changed since, by the server itself or a cleaner of the temporary directory, is
    /// written anew; a failure is tried again at the next start).
    fn ensure(&self, server: &ResolvedServer) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
        match std::fs::symlink_metadata(&self.dir) {
            // Ours only if a real directory of ours, private: anything else was planted.
            Ok(m) => {
                if !m.is_dir() || Some(m.uid()) != own_uid() {
                    return Err(std::io::Error::other(format!(
                        "{} is not this gateway's directory",
                        self.dir.display()
                    )));
                }
                std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new().mode(0o700).create(&self.dir)?;
            }
            Err(e) => return Err(e),
        }
        for (key, value) in server.env.iter().filter_map(|(k, v)| match v {
            EnvValue::SecretFile(s) => Some((k, s)),
            _ => None,
        }) {
            let path = self.path(key);
            if std::fs::read(&path).is_ok_and(|b| b == value.as_bytes()) {
                continue;
            }
            // Written aside, then renamed over: a process reading it sees all or nothing.
            let tmp = self.dir.join(format!(".{key}.new"));
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&tmp)?;
            f.write_all(value.as_bytes())?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }
}

impl Drop for SecretFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// This process's user id (the owner of its `/proc` entry).
fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Removes the secret directories of gateways that are gone (killed before they could).
fn sweep_secret_files() {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let Some(me) = own_uid() else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SECRET_FILES_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let ours = entry.metadata().is_ok_and(|m| m.is_dir() && m.uid() == me);
        if ours && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// One supervised server.
struct Supervised {
    server: ResolvedServer,
    /// Where its file secrets are kept (written before each process starts).
    secret_files: Option<SecretFiles>,
    status: watch::Sender<ServerStatus>,
    logs: Mutex<Logs>,
    io: Mutex<Option<ProcIo>>,
    restart: Notify,
    stop_tx: watch::Sender<bool>,
    /// Where its sleep stands; changed only under this channel's lock, with [`Usage`].
    rest: watch::Sender<Rest>,
    /// How it is used, when it may sleep while idle.
    usage: Option<Arc<Usage>>,
    /// Counts the times its process was stopped for sleep (and closes when it is removed).
    slept: watch::Sender<u64>,
    /// Completes when the supervisor task has ended; every stopper awaits it.
    done: Mutex<Option<Shared<BoxFuture<'static, ()>>>>,
}

impl Supervised {
    fn start(server: ResolvedServer, settings: Arc<LocalSettings>) -> Arc<Self> {
        let (stop_tx, _) = watch::channel(false);
        let secret_files = SecretFiles::for_server(&server);
        let usage = super::idle::after_of(&server.spec, settings.idle_after)
            .map(|after| Usage::new(after, super::idle::fingerprint(&server.spec)));
        let sup = Arc::new(Supervised {
            rest: watch::Sender::new(Rest::Awake),
            usage,
            slept: watch::Sender::new(0),
            secret_files,
            server,
            status: watch::Sender::new(ServerStatus::new(Phase::Pending)),
            logs: Mutex::new(Logs {
                current: LogBuffer::new(settings.log_bytes),
                previous: None,
            }),
            io: Mutex::new(None),
            restart: Notify::new(),
            stop_tx,
            done: Mutex::new(None),
        });
        let task = tokio::spawn(supervise(sup.clone(), settings));
        *sup.done.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(task.map(|_| ()).boxed().shared());
        sup
    }

    fn update(&self, f: impl FnOnce(&mut ServerStatus)) {
        self.status.send_modify(f);
    }

    fn stop_now(&self) {
        self.stop_tx.send_replace(true);
    }

    fn stopping(&self) -> bool {
        *self.stop_tx.borrow()
    }

    /// Stops the process and returns once the supervisor has ended, for every caller
    /// (a second stopper used to return at once, before the process was gone).
    async fn stop(&self) {
        self.stop_now();
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(done) = done {
            done.await;
        }
    }

    fn set_io(&self, io: Option<ProcIo>) {
        *self.io.lock().unwrap_or_else(|e| e.into_inner()) = io;
    }
}

/// Where a server's sleep stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rest {
    Awake,
    /// Asked to sleep; the supervisor has not stopped the process yet, and a call may still
    /// call it off.
    Asked,
    /// The process is stopped, or being stopped: a call waits for the next one.
    Asleep,
}

/// Carries out a sleep that is still asked for: from here a waker waits for a new process.
fn commit_sleep(sup: &Supervised) -> bool {
    sup.rest.send_if_modified(|rest| {
        if *rest != Rest::Asked {
            return false;
        }
        *rest = Rest::Asleep;
        if let Some(u) = &sup.usage {
            u.fell_asleep();
        }
        sup.update(|s| {
            s.set_phase(Phase::Asleep);
            s.message = Some("idle: stopped until the next call".into());
        });
        true
    })
}

/// Returns once a sleep is asked for, the channel's lock released (the value `wait_for`
/// returns holds it, and a select arm keeps it until the arm's end).
async fn asked(rx: &mut watch::Receiver<Rest>) {
    let _ = rx.wait_for(|r| *r == Rest::Asked).await;
}

enum RunEnd {
    Exited(String),
    Restart,
    Sleep,
    Stop,
}

async fn supervise(sup: Arc<Supervised>, settings: Arc<LocalSettings>) {
    let mut stop_rx = sup.stop_tx.subscribe();
    if let Some(remote) = &sup.server.spec.remote {
        // Nothing runs here: reachable as defined until removed.
        sup.update(|s| {
            s.set_phase(Phase::Ready);
            s.message = Some(format!("remote: {}", remote.url));
        });
        let _ = stop_rx.wait_for(|s| *s).await;
        sup.update(|s| {
            s.set_phase(Phase::Removed);
            s.message = None;
        });
        sup.slept.send_modify(|n| *n += 1);
        return;
    }
    let mut rest_rx = sup.rest.subscribe();
    let mut attempt: u32 = 0;
    let mut failures: u32 = 0;
    loop {
        if *stop_rx.borrow() {
            break;
        }
        // Copied out: the borrow must not be held while commit_sleep takes the lock.
        let rest = *rest_rx.borrow_and_update();
        let resting = match rest {
            Rest::Awake => false,
            Rest::Asked => commit_sleep(&sup),
            Rest::Asleep => true,
        };
        if resting {
            sup.slept.send_modify(|n| *n += 1);
            tokio::select! {
                _ = rest_rx.wait_for(|r| *r == Rest::Awake) => {}
                _ = stop_rx.wait_for(|s| *s) => break,
            }
            attempt = 0;
            failures = 0;
            continue;
        }
        sup.update(|s| {
            s.set_phase(Phase::Starting);
            s.message = None;
        });
        // The last run's processes (a wrapper's children, killed with its group) may hold the
        // port a moment after it ended: not taken for another program's.
        if let Some(port) = local_port(&sup.server) {
            port_free_within(port, settings.stop_grace).await;
        }
        let started = Instant::now();
        let end = match spawn(&sup, &settings, Owner::Server) {
            Ok(child) => run(&sup, child, &settings, &mut stop_rx).await,
            Err(e) => {
                let msg = format!(
                    "cannot start {:?}: {e}",
                    sup.server.spec.command.as_deref().unwrap_or_default()
                );
                tracing::warn!(server = %sup.server.name, "{msg}");
                sup.logs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .current
                    .push_line(msg.as_bytes());
                sup.update(|s| {
                    s.set_phase(Phase::Failed {
                        reason: FailureReason::SpawnFailed,
                    });
                    s.message = Some(msg.clone());
                });
                RunEnd::Exited(msg)
            }
        };
        sup.set_io(None);
        {
            // The run's output becomes the previous run's, as `kubectl logs --previous`.
            let mut logs = sup.logs.lock().unwrap_or_else(|e| e.into_inner());
            let fresh = LogBuffer::new(settings.log_bytes);
            let mut old = std::mem::replace(&mut logs.current, fresh);
            old.flush();
            logs.previous = Some(old);
        }
        let spawn_failed = matches!(
            sup.status.borrow().phase,
            Phase::Failed {
                reason: FailureReason::SpawnFailed
            }
        );
        let message = match end {
            RunEnd::Stop => break,
            RunEnd::Sleep => continue,
            RunEnd::Restart => {
                attempt = 0;
                failures = 0;
                sup.update(|s| {
                    s.restarts += 1;
                    s.set_phase(Phase::Pending);
                    s.message = Some("restarted on request".into());
                });
                continue;
            }
            RunEnd::Exited(message) => message,
        };
        if started.elapsed() >= settings.backoff.reset_after {
            attempt = 0;
            failures = 0;
        }
        failures += 1;
        let delay = settings.backoff.delay(attempt, random_unit());
        attempt = attempt.saturating_add(1);
        let give_up = settings
            .max_consecutive_failures
            .is_some_and(|max| failures >= max);
        sup.update(|s| {
            s.restarts += 1;
            if give_up {
                s.set_phase(Phase::Failed {
                    reason: FailureReason::TooManyRestarts,
                });
                s.message = Some(format!(
                    "{message}; gave up after {failures} exits in a row"
                ));
            } else if spawn_failed {
                // Stays Failed(SpawnFailed) while it waits: the cause will not go away by itself.
                s.message = Some(format!("{message}; retrying in {delay:.1?}"));
            } else {
                s.set_phase(Phase::BackOff { retry_in: delay });
                s.message = Some(message.clone());
            }
        });
        tracing::info!(server = %sup.server.name, "{message}; restart in {delay:.1?}");
        let wait = async {
            if give_up {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(delay).await
            }
        };
        tokio::select! {
            _ = wait => {}
            _ = sup.restart.notified() => { attempt = 0; failures = 0; }
            _ = asked(&mut rest_rx) => {}
            _ = stop_rx.wait_for(|s| *s) => break,
        }
    }
    sup.set_io(None);
    sup.update(|s| {
        s.set_phase(Phase::Removed);
        s.message = None;
    });
    // Whoever waits for a sleep waits no more.
    sup.slept.send_modify(|n| *n += 1);
}

/// Waits until nothing listens on loopback `port`, at most `wait`.
async fn port_free_within(port: u16, wait: Duration) {
    let deadline = Instant::now() + wait;
    while matches!(
        std::net::TcpListener::bind(("127.0.0.1", port)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse
    ) && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whose process [`spawn`] starts.
#[derive(Clone, Copy)]
enum Owner<'a> {
    /// The server's own, which its callers share.
    Server,
    /// One for a principal alone (`None`: an unauthenticated session).
    Principal(Option<&'a str>),
}

/// Binds a socket to 127.0.0.1:`port` (as a listener would, address reuse allowed) without
/// listening on it, and closes it.
fn bind_only(port: u16) -> std::io::Result<()> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind((std::net::Ipv4Addr::LOCALHOST, port).into())
}

fn spawn(
    sup: &Supervised,
    settings: &LocalSettings,
    owner: Owner<'_>,
) -> std::io::Result<ServerProcess> {
    let spec = &sup.server.spec;
    // The gateway reaches the server by its port alone: whatever listens there already (another
    // program) would be taken for it, and answer its calls.
    // (Only a port in use says so: one this process may not bind, the server's may.) Bound,
    // not listened on: a listener, even for a moment, would take a connection meant for the
    // server (its readiness check, say), and leave the port held by it.
    if let Some(port) = local_port(&sup.server)
        && let Err(e) = bind_only(port)
        && e.kind() == std::io::ErrorKind::AddrInUse
    {
        return Err(std::io::Error::new(
            e.kind(),
            format!("port {port} on 127.0.0.1 is taken by another program: {e}"),
        ));
    }
    let command = spec.command.as_deref().unwrap_or_default();
    let inherited = settings
        .inherit_env
        .iter()
        .filter_map(|key| Some((OsString::from(key), std::env::var_os(key)?)));
    let files = sup.secret_files.as_ref();
    if let Some(files) = files {
        files.ensure(&sup.server).map_err(|e| {
            std::io::Error::other(format!("cannot write the secrets it gets as files: {e}"))
        })?;
    }
    let own = sup.server.env.iter().filter_map(|(k, v)| match v {
        EnvValue::Plain(s) | EnvValue::Secret(s) => Some((OsString::from(k), OsString::from(s))),
        EnvValue::SecretFile(_) => {
            Some((OsString::from(k), files.as_ref()?.path(k).into_os_string()))
        }
        // Refused by `apply`: never reaches a process here.
        EnvValue::Stored { .. } => None,
    });
    // Later entries win: the definition over what the settings inherit (see crate::process).
    let env: BTreeMap<OsString, OsString> = inherited.chain(own).collect();
    let name = &sup.server.name;
    let home = match owner {
        Owner::Server => process::server_home(name),
        Owner::Principal(principal) => process::principal_home(name, principal),
    };
    let mut cmd = process::command_at_home(home, name, command, env);
    cmd.args(&spec.args)
        .stdin(if sup.server.is_stdio() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    ServerProcess::spawn(&mut cmd)
}

async fn run(
    sup: &Arc<Supervised>,
    mut proc: ServerProcess,
    settings: &LocalSettings,
    stop_rx: &mut watch::Receiver<bool>,
) -> RunEnd {
    let mut rest_rx = sup.rest.subscribe();
    let child = &mut proc.child;
    let pid = child.id();
    tracing::debug!(server = %sup.server.name, ?pid, "started local MCP server");
    let mut pumps = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        pumps.push(tokio::spawn(capture(stderr, sup.clone())));
    }
    let http = sup.server.http_port_path();
    match (child.stdout.take(), child.stdin.take()) {
        (Some(stdout), Some(stdin)) if http.is_none() => {
            let sink = Arc::new(tokio::sync::Mutex::new(None));
            let (source_tx, source_rx) = mpsc::channel(4);
            pumps.push(tokio::spawn(pump_stdout(stdout, sink.clone())));
            pumps.push(tokio::spawn(pump_stdin(stdin, source_rx)));
            sup.set_io(Some(ProcIo { sink, source_tx }));
            sup.update(|s| s.set_phase(Phase::Ready));
        }
        (Some(stdout), _) => pumps.push(tokio::spawn(capture(stdout, sup.clone()))),
        _ => {}
    }
    let probe = async {
        match http {
            Some((port, _)) => {
                // Ready once it answers there, and it is the gateway's user's own (another
                // user's program may take the port before the server binds it, or while it
                // rebinds); checked again while ready.
                let uid = own_uid();
                let mut foreign = None;
                let mut ready = false;
                loop {
                    // Once ready, only the tables are read (no connection every few seconds).
                    let answers = ready
                        || tokio::net::TcpStream::connect(("127.0.0.1", port))
                            .await
                            .is_ok();
                    let holder = match uid {
                        Some(uid) if answers || foreign.is_some() => {
                            tokio::task::spawn_blocking(move || port_owner::listeners_on(port, uid))
                                .await
                                .unwrap_or(Listeners::Unknown)
                        }
                        _ => Listeners::Unknown,
                    };
                    let now = match holder {
                        Listeners::Foreign(other) => Some(other),
                        _ => None,
                    };
                    if now != foreign {
                        foreign = now;
                        if let Some(other) = foreign {
                            tracing::warn!(server = %sup.server.name, port, uid = other, "another user's program listens on the server's port");
                        }
                        sup.update(|s| {
                            s.message = foreign.map(|other| {
                                format!("port {port} on 127.0.0.1 is held by another user's program (uid {other}): it is not taken for the server")
                            });
                        });
                    }
                    let now_ready = answers && foreign.is_none();
                    if now_ready != ready {
                        ready = now_ready;
                        sup.update(|s| {
                            s.set_phase(if ready { Phase::Ready } else { Phase::Starting })
                        });
                    }
                    tokio::time::sleep(match (ready, foreign) {
                        (true, _) => RECHECK_READY,
                        (false, Some(_)) => Duration::from_millis(250),
                        (false, None) => Duration::from_millis(25),
                    })
                    .await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::pin!(probe);
    let end = loop {
        tokio::select! {
            status = child.wait() => break RunEnd::Exited(match status {
                Ok(s) => format!("process exited ({s})"),
                Err(e) => format!("process wait failed: {e}"),
            }),
            _ = &mut probe => unreachable!("the probe never finishes"),
            _ = sup.restart.notified() => break RunEnd::Restart,
            // Not Ready once committed: a waker waits for the next process. A call that
            // called the sleep off first keeps this one.
            _ = asked(&mut rest_rx) => if commit_sleep(sup) {
                break RunEnd::Sleep;
            },
            _ = stop_rx.wait_for(|s| *s) => break RunEnd::Stop,
        }
    };
    if matches!(end, RunEnd::Exited(_)) {
        // The leader is gone; what it started goes with it.
        proc.sweep();
    } else {
        sup.set_io(None);
        // Stdin closed, then SIGTERM, then SIGKILL, to the whole group.
        proc.stop(settings.stop_grace).await;
    }
    for p in pumps {
        // Pumps end at EOF, which the exit brings; do not wait on grandchildren holding pipes.
        let _ = tokio::time::timeout(Duration::from_millis(200), p).await;
    }
    sup.logs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .current
        .flush();
    end
}

async fn capture(mut out: impl AsyncRead + Unpin, sup: Arc<Supervised>) {
    let mut buf = vec![0u8; 8192];
    loop {
        match out.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => sup
                .logs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .current
                .push_bytes(&buf[..n]),
        }
    }
}

async fn pump_stdout(
    mut stdout: ChildStdout,
    sink: Arc<tokio::sync::Mutex<Option<WriteHalf<DuplexStream>>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stdout.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut slot = sink.lock().await;
        if let Some(w) = slot.as_mut()
            && w.write_all(&buf[..n]).await.is_err()
        {
            *slot = None;
        }
        // With nobody attached, output is dropped: there is no request to answer.
    }
    if let Some(mut w) = sink.lock().await.take() {
        let _ = w.shutdown().await;
    }
}

async fn pump_stdin(mut stdin: ChildStdin, mut sources: mpsc::Receiver<ReadHalf<DuplexStream>>) {
    let mut current: Option<ReadHalf<DuplexStream>> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            next = sources.recv() => match next {
                Some(src) => current = Some(src),
                None => break,
            },
            n = async { current.as_mut().expect("guarded").read(&mut buf).await }, if current.is_some() => {
                match n {
                    Ok(0) | Err(_) => current = None,
                    Ok(n) => {
                        if stdin.write_all(&buf[..n]).await.is_err() || stdin.flush().await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// Attaches to a local stdio process.
struct LocalAttach {
    sup: Arc<Supervised>,
    settings: Arc<LocalSettings>,
}

impl StdioConnector for LocalAttach {
    fn open(&self) -> BoxFuture<'_, Result<StdioStream>> {
        async move {
            let name = &self.sup.server.name;
            let mut rx = self.sup.status.subscribe();
            let ready = async {
                loop {
                    {
                        let st = rx.borrow_and_update();
                        match &st.phase {
                            Phase::Ready => {
                                let io = self.sup.io.lock().unwrap_or_else(|e| e.into_inner());
                                if let Some(io) = io.as_ref() {
                                    return Ok((io.sink.clone(), io.source_tx.clone()));
                                }
                            }
                            Phase::Removed | Phase::Failed { .. } => {
                                return Err(OrchestratorError::NotRunning {
                                    server: name.clone(),
                                    detail: describe(&st),
                                });
                            }
                            _ => {}
                        }
                    }
                    if rx.changed().await.is_err() {
                        return Err(OrchestratorError::Removed(name.clone()));
                    }
                }
            };
            let (sink, source_tx) = tokio::time::timeout(self.settings.attach_timeout, ready)
                .await
                .map_err(|_| OrchestratorError::NotRunning {
                    server: name.clone(),
                    detail: describe(&self.sup.status.borrow()),
                })??;
            let (ours, theirs) = tokio::io::duplex(self.settings.attach_buffer);
            let (our_read, our_write) = tokio::io::split(ours);
            *sink.lock().await = Some(our_write);
            source_tx
                .send(our_read)
                .await
                .map_err(|_| OrchestratorError::Attach {
                    server: name.clone(),
                    detail: "the process exited".into(),
                })?;
            let (reader, writer) = tokio::io::split(theirs);
            Ok(StdioStream {
                reader: Box::pin(reader),
                writer: Box::pin(writer),
                process: None,
            })
        }
        .boxed()
    }

    fn open_private<'a>(
        &'a self,
        principal: Option<&'a str>,
    ) -> BoxFuture<'a, Result<StdioStream>> {
        async move {
            let name = &self.sup.server.name;
            if !self.sup.server.is_stdio() {
                return Err(OrchestratorError::WrongTransport {
                    server: name.clone(),
                    expected: "stdio",
                });
            }
            // The same command, environment and process group rules as the supervised
            // process; its stderr joins the server's logs.
            let mut proc =
                spawn(&self.sup, &self.settings, Owner::Principal(principal)).map_err(|e| {
                    OrchestratorError::NotRunning {
                        server: name.clone(),
                        detail: format!("cannot start a private process: {e}"),
                    }
                })?;
            let child = &mut proc.child;
            let (Some(stdin), Some(stdout), Some(stderr)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                return Err(OrchestratorError::NotRunning {
                    server: name.clone(),
                    detail: "the private process has no stdio pipes".into(),
                });
            };
            tracing::debug!(server = %name, pid = ?child.id(), "started a private process");
            tokio::spawn(capture(stderr, self.sup.clone()));
            Ok(StdioStream {
                reader: Box::pin(crate::pipe::Pipe::new(stdout)),
                writer: Box::pin(crate::pipe::Pipe::new(stdin)),
                process: Some(proc),
            })
        }
        .boxed()
    }

    fn sharing(&self) -> Sharing {
        self.sup.server.spec.sharing
    }

    fn describe(&self) -> String {
        format!(
            "local process {}",
            self.sup.server.spec.command.as_deref().unwrap_or_default()
        )
    }
}
