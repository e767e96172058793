//! How the gateway starts MCP server processes, for both config stdio upstreams and the local
//! orchestrator: one place, so both get the same isolation.
//!
//! - **Only what they are given.** A server starts with a cleared environment, a minimal `PATH`
//!   ([`DEFAULT_PATH`]) and a `HOME` of its own (the server's; for a process it runs for one
//!   principal alone, that principal's: [`principal_home`]; removed with the server), then the
//!   variables its definition names. The
//!   gateway's own environment (its client and admin tokens, cloud credentials, ...) never
//!   reaches a server or anything the server starts.
//! - **They die with their owner.** A server runs in its own process group, so stopping it
//!   (stdin closed, then SIGTERM, then SIGKILL, all to the group) reaches its children too
//!   (`npx` → `node`, `sh -c` → the real server). Dropping a [`ServerProcess`] kills whatever is
//!   left of its group.
//! - **Nor through `/proc`.** The `gatehouse` binary makes its own `/proc` entries unreadable
//!   to its user ([`keep_proc_private`]), so a server cannot read the gateway's environment there.
//! - **Nowhere of the gateway's.** A server whose command names no working directory starts in
//!   an empty, private (0700) directory of its own, made for that process and removed with it
//!   ([`ServerProcess::spawn`]), never in the gateway's. Runners and servers read project
//!   configuration from the working directory and its parents (`.npmrc`, `uv.toml`,
//!   `pyproject.toml`, `.env`): a file in the gateway's directory could otherwise redirect where
//!   a package is fetched from. The directories live beside the `HOME`s (see [`server_home`]):
//!   under the gateway's cache directory, whose parents are its user's own, when it has one.
//! - **Even when the owner is SIGKILLed.** A killed gateway runs no cleanup, and
//!   `PR_SET_PDEATHSIG` would only reach direct children (grandchildren in the group survive),
//!   needs `pre_exec` (unsafe, which this crate forbids), and fires when the *thread* that
//!   spawned the child exits, which tokio's blocking-pool threads do all the time. Instead the
//!   `gatehouse` binary starts one small guard process ([`enable_guard`], the hidden
//!   `process-guard` subcommand) that is told the process group of every server as it starts
//!   and stops. The guard holds the read end of a pipe whose only writer is the gateway (the
//!   write end is close-on-exec, so no server inherits it), so the kernel tells it that the
//!   gateway is gone by end-of-file, however the gateway died; it then stops every group still
//!   listed (SIGTERM, a grace period, SIGKILL) and exits. The guard runs in its own process
//!   group, so a Ctrl-C meant for the gateway does not take it down first.
//!
//! Not covered: a server that moves itself out of its group (`setsid`, daemonizing), and a
//! gateway killed in the instant between starting a server and telling the guard. Tokio's
//! `process_group(0)` plus `killpg` is all `process-wrap` would have added for the group (its
//! kill-on-drop kills only the leader), so it is not a dependency.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// `PATH` of a server whose definition sets none.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The hidden subcommand of the `gatehouse` binary that runs the guard.
pub const GUARD_SUBCOMMAND: &str = "process-guard";

/// A command that starts server `name` as `program`: a cleared environment with
/// [`DEFAULT_PATH`] and a `HOME` of its own unless `env` sets them, then `env`; its own process
/// group. Start it with [`ServerProcess::spawn`].
pub fn command<K, V>(name: &str, program: &str, env: impl IntoIterator<Item = (K, V)>) -> Command
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    command_at_home(server_home(name), name, program, env)
}

/// [`command`], with `home` as the process's `HOME` (unless `env` sets one).
pub fn command_at_home<K, V>(
    home: Result<PathBuf, String>,
    name: &str,
    program: &str,
    env: impl IntoIterator<Item = (K, V)>,
) -> Command
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let env: Vec<(K, V)> = env.into_iter().collect();
    let names = |key: &str| env.iter().any(|(k, _)| k.as_ref() == key);
    let mut cmd = Command::new(program);
    cmd.env_clear();
    if !names("PATH") {
        // Also where `program` is looked up when it is not a path.
        cmd.env("PATH", DEFAULT_PATH);
    }
    if !names("HOME") {
        match home {
            Ok(home) => {
                cmd.env("HOME", home);
            }
            Err(e) => tracing::warn!(server = name, "no HOME directory for the server: {e}"),
        }
    }
    cmd.envs(env)
        .process_group(0)
        // A backstop for the leader; `ServerProcess`'s drop takes the rest of the group.
        .kill_on_drop(true);
    cmd
}

/// Where servers get their `HOME` directories: under the gateway's cache directory, so tools
/// that cache downloads there (`npx`) keep them across restarts, else a fresh temporary
/// directory. Private to the gateway's user either way.
fn homes_root() -> Result<&'static Path, String> {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ROOT.get_or_init(|| gateway_dir("server-homes"))
        .as_deref()
        .map_err(Clone::clone)
}

/// Where servers get their working directories ([`WorkDir`]), as [`homes_root`]; what a killed
/// gateway left there is removed when it is first used.
fn work_root() -> Result<&'static Path, String> {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = gateway_dir("server-work")?;
        sweep_work_dirs(&root);
        Ok(root)
    })
    .as_deref()
    .map_err(Clone::clone)
}

/// A directory private to the gateway's user for `kind`: `gatehouse/{kind}` under its cache
/// directory, else a fresh one under the temporary directory.
fn gateway_dir(kind: &str) -> Result<PathBuf, String> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .filter(|p| p.is_absolute());
    if let Some(cache) = cache {
        let root = cache.join("gatehouse").join(kind);
        if private_dir(&root).is_ok() {
            return Ok(root);
        }
    }
    // A fresh, unguessable directory with mode 0700 (creation fails if it exists).
    let dir = std::env::temp_dir().join(format!("gatehouse-{kind}-{}", random_hex(12)?));
    new_private_dir(&dir).map_err(|e| format!("cannot create {dir:?}: {e}"))?;
    Ok(dir)
}

fn random_hex(bytes: usize) -> Result<String, String> {
    let mut raw = vec![0u8; bytes];
    getrandom::fill(&mut raw).map_err(|e| format!("no random source: {e}"))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// Creates `dir` with mode 0700; fails if anything is there already.
fn new_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Where the processes a server runs for one principal alone get their `HOME`s: apart from
/// [`homes_root`], so that no server's shared process (whatever its name) has them under its own.
fn principal_homes_root() -> Result<&'static Path, String> {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ROOT.get_or_init(|| gateway_dir("principal-homes"))
        .as_deref()
        .map_err(Clone::clone)
}

/// The `HOME` of server `name` (created if missing).
pub fn server_home(name: &str) -> Result<PathBuf, String> {
    let dir = homes_root()?.join(home_leaf(name));
    private_dir(&dir).map_err(|e| format!("cannot create {dir:?}: {e}"))?;
    Ok(dir)
}

/// The `HOME` of the processes server `name` runs for `principal` alone (`None`: for
/// unauthenticated sessions), created if missing: neither the server's shared `HOME` nor any
/// other principal's, so that what a process keeps there (a memory file, a login, packages it
/// writes into) is no other principal's to read. Processes of one principal (its sessions'
/// own, under `per-session`) share it.
pub fn principal_home(name: &str, principal: Option<&str>) -> Result<PathBuf, String> {
    // A digest: any principal's name, one path component, none like another's.
    let leaf = match principal {
        Some(p) => {
            let digest = ring::digest::digest(&ring::digest::SHA256, p.as_bytes());
            let hex: String = digest.as_ref()[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("p-{hex}")
        }
        None => "anonymous".into(),
    };
    let dir = principal_homes_root()?.join(home_leaf(name)).join(leaf);
    private_dir(&dir).map_err(|e| format!("cannot create {dir:?}: {e}"))?;
    Ok(dir)
}

/// Removes every `HOME` of server `name` (when it is removed: a server later defined under the
/// name starts with none of its files).
pub fn remove_homes(name: &str) {
    let leaf = home_leaf(name);
    for root in [homes_root(), principal_homes_root()].into_iter().flatten() {
        let dir = root.join(&leaf);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(server = name, "cannot remove {dir:?}: {e}");
        }
    }
}

/// Server `name` as one path component.
fn home_leaf(name: &str) -> String {
    // Names are validated elsewhere; this only keeps a path component a path component.
    let mut leaf: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if leaf.is_empty() || leaf.starts_with('.') {
        leaf.insert(0, '_');
    }
    leaf
}

/// The working directory of one server process whose command names none: empty when it
/// starts, private (0700), removed (with whatever the server wrote there) when dropped. Named
/// after the gateway's pid, so that a later gateway can sweep what a killed one left.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> std::io::Result<WorkDir> {
        let root = work_root().map_err(std::io::Error::other)?;
        let nonce = random_hex(8).map_err(std::io::Error::other)?;
        let dir = root.join(format!("{}-{nonce}", std::process::id()));
        new_private_dir(&dir)?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the working directories under `root` of gateways that are gone.
fn sweep_work_dirs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let pid = entry
            .file_name()
            .to_str()
            .and_then(|n| n.split('-').next()?.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// How [`ServerProcess::stop`] ended the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It exited by itself (after its stdin closed).
    Exited,
    /// It exited on SIGTERM.
    Terminated,
    /// It ignored SIGTERM and was killed.
    Killed,
}

/// A server process leading its own process group. Dropping it SIGKILLs whatever is left of
/// the group, so no grandchild outlives it.
pub struct ServerProcess {
    /// The direct child (the group leader).
    pub child: Child,
    /// `None` once the group has been swept.
    pgid: Option<Pid>,
    /// Its own working directory, when its command named none; removed after the group is
    /// swept (fields drop after [`Drop::drop`]).
    _workdir: Option<WorkDir>,
}

impl ServerProcess {
    /// Starts `cmd` (from [`command`]) and tells the guard, if there is one, about its group.
    /// A command that names no working directory (`current_dir`) is given an empty one of its
    /// own (see the module docs); when that cannot be made, nothing starts.
    pub fn spawn(cmd: &mut Command) -> std::io::Result<Self> {
        let workdir = match cmd.as_std().get_current_dir() {
            Some(_) => None,
            None => {
                let dir = WorkDir::create().map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot make its working directory: {e}"))
                })?;
                cmd.current_dir(&dir.0);
                Some(dir)
            }
        };
        let child = cmd.spawn()?;
        // `process_group(0)`: the group id is the leader's pid.
        let pgid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw);
        if let Some(pgid) = pgid {
            guard_send(Some(pgid.as_raw()), None);
        }
        Ok(ServerProcess {
            child,
            pgid,
            _workdir: workdir,
        })
    }

    /// Sends `signal` to the whole group.
    pub fn signal_group(&self, signal: Signal) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, signal);
        }
    }

    /// Closes stdin, waits `grace`, SIGTERMs the group, waits `grace`, SIGKILLs the group; then
    /// kills whatever the leader left behind in its group.
    pub async fn stop(&mut self, grace: Duration) -> Stopped {
        drop(self.child.stdin.take());
        let how = if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
            Stopped::Exited
        } else {
            self.signal_group(Signal::SIGTERM);
            if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
                Stopped::Terminated
            } else {
                self.signal_group(Signal::SIGKILL);
                let _ = self.child.wait().await;
                Stopped::Killed
            }
        };
        self.sweep();
        how
    }

    /// SIGKILLs what is left of the group and forgets it.
    pub fn sweep(&mut self) {
        // Once the leader is reaped its pid, the group id, is only safe from reuse while some
        // member is left; sweeping right after the leader ends keeps that window tiny.
        if let Some(pgid) = self.pgid.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
            guard_send(None, Some(pgid.as_raw()));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.sweep();
    }
}

/// The guard process and the groups it has been told about.
struct Guard {
    exe: PathBuf,
    grace: Duration,
    state: Mutex<GuardState>,
}

#[derive(Default)]
struct GuardState {
    proc: Option<std::process::Child>,
    groups: BTreeSet<i32>,
}

/// Makes this process's `/proc` entries (its environment, memory, open files) readable by root
/// only, and refuses tracing it to processes of its own user (`PR_SET_DUMPABLE` 0, which also
/// turns off its core dumps): a server running as the gateway's user would otherwise read the
/// gateway's tokens from `/proc/<pid>/environ`, however cleared the server's own environment
/// is. Servers are not affected: the flag is set anew at `exec`.
pub fn keep_proc_private() -> nix::Result<()> {
    nix::sys::prctl::set_dumpable(false)
}

static GUARD: OnceLock<Guard> = OnceLock::new();

/// Starts `exe process-guard` (the `gatehouse` binary) now, so that every server started from
/// here on is stopped even if this process dies without stopping it (see the module docs).
/// Only a process that will not `fork` itself away from its guard should call it, once.
pub fn enable_guard(exe: PathBuf, grace: Duration) -> std::io::Result<()> {
    let guard = GUARD.get_or_init(|| Guard {
        exe,
        grace,
        state: Mutex::new(GuardState::default()),
    });
    let mut st = guard.state.lock().unwrap_or_else(|e| e.into_inner());
    guard.restart(&mut st)
}

impl Guard {
    fn restart(&self, st: &mut GuardState) -> std::io::Result<()> {
        if let Some(mut old) = st.proc.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let mut proc = std::process::Command::new(&self.exe)
            .arg(GUARD_SUBCOMMAND)
            .arg("--grace-ms")
            .arg(self.grace.as_millis().to_string())
            .env_clear()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .process_group(0)
            .spawn()?;
        let mut lines = String::new();
        for g in &st.groups {
            lines.push_str(&format!("+{g}\n"));
        }
        if let Some(stdin) = proc.stdin.as_mut() {
            stdin.write_all(lines.as_bytes())?;
        }
        st.proc = Some(proc);
        Ok(())
    }
}

/// Tells the guard (when there is one) about a group that started or ended.
fn guard_send(started: Option<i32>, ended: Option<i32>) {
    let Some(guard) = GUARD.get() else {
        return;
    };
    let mut st = guard.state.lock().unwrap_or_else(|e| e.into_inner());
    let mut line = String::new();
    if let Some(g) = started {
        st.groups.insert(g);
        line.push_str(&format!("+{g}\n"));
    }
    if let Some(g) = ended {
        st.groups.remove(&g);
        line.push_str(&format!("-{g}\n"));
    }
    // A few bytes into a pipe its reader drains at once: this does not block in practice.
    let sent = st
        .proc
        .as_mut()
        .and_then(|p| p.stdin.as_mut())
        .is_some_and(|stdin| stdin.write_all(line.as_bytes()).is_ok());
    if !sent {
        // The guard died (or never started): a new one is told every group still running.
        match guard.restart(&mut st) {
            Ok(()) => tracing::warn!("restarted the process guard"),
            Err(e) => tracing::error!(
                "cannot start the process guard ({:?}): servers may outlive a killed gateway: {e}",
                guard.exe
            ),
        }
    }
}

/// The guard itself (the hidden `process-guard` subcommand): reads `+PGID` and `-PGID` lines
/// on stdin; at end of input, which means its owner is gone, stops the groups still listed
/// (SIGTERM, up to `grace` for them to go, SIGKILL) and returns.
pub fn run_guard(grace: Duration) {
    use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
    // Terminal signals are for the gateway; the guard must outlive it. (It never execs, so the
    // blocked mask goes nowhere else.)
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGHUP);
    mask.add(Signal::SIGQUIT);
    let _ = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None);
    let mut groups = BTreeSet::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let parse = |n: &str| n.parse::<i32>().ok().filter(|g| *g > 1);
        if let Some(g) = line.strip_prefix('+').and_then(parse) {
            groups.insert(g);
        } else if let Some(g) = line.strip_prefix('-').and_then(parse) {
            groups.remove(&g);
        } else {
            eprintln!("gatehouse process-guard: ignoring {line:?}");
        }
    }
    if groups.is_empty() {
        return;
    }
    eprintln!(
        "gatehouse process-guard: the gateway is gone; stopping {} server process group(s)",
        groups.len()
    );
    let pgids: Vec<Pid> = groups.into_iter().map(Pid::from_raw).collect();
    for &g in &pgids {
        let _ = killpg(g, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    // Signal 0 checks whether a group still has members (zombies count until init reaps them).
    while Instant::now() < deadline && pgids.iter().any(|&g| killpg(g, None).is_ok()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &g in &pgids {
        let _ = killpg(g, Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_working_directory_is_private_empty_and_goes_with_its_process_or_its_gateway() {
        use std::os::unix::fs::PermissionsExt;
        let dir = WorkDir::create().unwrap();
        let path = dir.0.clone();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0);
        std::fs::write(path.join("left"), "x").unwrap();
        drop(dir);
        assert!(!path.exists());
        // What a gateway that is gone left is swept; a live one's is not.
        let root = work_root().unwrap();
        let dead = root.join("999999999-0000000000000000");
        let live = root.join(format!("{}-test-sweep", std::process::id()));
        for d in [&dead, &live] {
            std::fs::create_dir_all(d).unwrap();
        }
        sweep_work_dirs(root);
        assert!(!dead.exists());
        assert!(live.exists());
        let _ = std::fs::remove_dir_all(&live);
    }
}
