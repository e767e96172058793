//! The `gatehouse` command.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod operator;
mod startup_code;

/// Gatehouse: one MCP endpoint in front of many MCP servers.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (with no --config: the built-in example on 127.0.0.1:9000).
    Serve {
        /// YAML configuration file.
        #[arg(long, short, env = "GATEHOUSE_CONFIG")]
        config: Option<PathBuf>,
        /// Override the listen address.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Check a configuration file and print what it defines.
    Check {
        /// YAML configuration file.
        config: PathBuf,
    },
    /// Work with Wasm policy plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Run the example MCP server on stdio.
    ExampleServer {
        /// Also offer tools that misbehave on purpose (for tests).
        #[arg(long)]
        test_tools: bool,
        /// Name reported by the whoami tool and used in resource URIs.
        #[arg(long, default_value = "example")]
        name: String,
        /// Paginate tools/list with this many tools per page.
        #[arg(long, default_value_t = 0)]
        page_size: usize,
        /// Serve Streamable HTTP on this address instead of stdio.
        #[arg(long)]
        http: Option<std::net::SocketAddr>,
        /// Describe the echo tool with this text (a server that changes a tool, for tests).
        #[arg(long)]
        echo_description: Option<String>,
        /// Give these instructions (a server that changes them, for tests).
        #[arg(long)]
        instructions: Option<String>,
        /// With --http, also serve 2026-07-28 requests statelessly (a dual-era server).
        #[arg(long, requires = "http")]
        stateless: bool,
    },
    /// Servers a running gateway's orchestrator runs (its admin API).
    Servers {
        #[command(flatten)]
        target: operator::Target,
        #[command(subcommand)]
        command: operator::ServersCommand,
    },
    /// A running gateway's private registry: search, show, install, upgrade, uninstall, import.
    Registry {
        #[command(flatten)]
        target: operator::Target,
        #[command(subcommand)]
        command: operator::RegistryCommand,
    },
    /// Work with the audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Stops the gateway's servers when the gateway dies (started by `serve`; see gatehouse::process).
    #[command(name = gatehouse::process::GUARD_SUBCOMMAND, hide = true)]
    ProcessGuard {
        /// Between SIGTERM and SIGKILL.
        #[arg(long, default_value_t = 2000)]
        grace_ms: u64,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check a trail file's chain (and its checkpoints' signatures): prints what it holds, or
    /// the first broken record and exits with status 1.
    Verify {
        /// The audit file (JSON lines).
        file: PathBuf,
        /// The Ed25519 public key checkpoints must be signed with (base64 or hex, 32 bytes).
        #[arg(long)]
        public_key: Option<String>,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Validate a component against the plugin interface and run it once, printing the decision.
    Check {
        /// The plugin component (.wasm).
        file: PathBuf,
        /// A sample request (JSON) to run the hooks on.
        #[arg(long)]
        input: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::ProcessGuard { grace_ms } = cli.command {
        // Before any runtime: the guard is a few syscalls, it needs no threads.
        gatehouse::process::run_guard(std::time::Duration::from_millis(grace_ms));
        return Ok(());
    }
    match cli.command {
        Command::ProcessGuard { .. } => unreachable!("handled above"),
        Command::ExampleServer {
            test_tools,
            name,
            page_size,
            http,
            echo_description,
            instructions,
            stateless,
        } => {
            let opts = gatehouse::example_server::Options {
                name,
                test_tools,
                page_size,
                echo_description,
                instructions,
                stateless,
            };
            match http {
                Some(addr) => {
                    runtime(None)?.block_on(gatehouse::example_server::run_http(opts, addr))?
                }
                // Over stdio a gateway runs one per session: one thread each is lighter, and
                // its messages cross no threads.
                None => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(gatehouse::example_server::run(opts))?,
            }
        }
        Command::Servers { target, command } => {
            runtime(None)?.block_on(operator::servers(&target, command))?;
        }
        Command::Registry { target, command } => {
            runtime(None)?.block_on(operator::registry(&target, command))?;
        }
        Command::Plugin {
            command: PluginCommand::Check { file, input },
        } => {
            let report = gatehouse::plugins::check(&file, input.as_deref())?;
            println!("{report}");
        }
        Command::Audit {
            command: AuditCommand::Verify { file, public_key },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let key = public_key
                .map(|k| gatehouse::audit::public_key(&k))
                .transpose()?;
            match gatehouse::audit::verify(&text, key.as_deref()) {
                Ok(v) if key.is_some() && v.signed_checkpoints == 0 => {
                    println!(
                        "broken: {}: no checkpoint signed by the key ({} records)",
                        file.display(),
                        v.records
                    );
                    std::process::exit(1);
                }
                Ok(v) => {
                    let signatures = match key {
                        Some(_) => {
                            format!("{} checkpoints signed by the key", v.signed_checkpoints)
                        }
                        None => "checkpoint signatures not checked (no --public-key)".to_owned(),
                    };
                    println!(
                        "ok: {} records (seq {} to {}), chain anchored at {}; {signatures}; {} records after the last checkpoint",
                        v.records, v.first_seq, v.last_seq, v.anchor, v.unsigned_tail,
                    );
                    // Signed, but only as a restart found them: the signature proves nothing
                    // of what they were before. Said, and (where signatures were asked to be
                    // checked) exit status 2, for scripts.
                    if let Some((count, line)) = v.found_unsigned {
                        println!(
                            "warning: a restart (line {line}) found {count} records after the last checkpoint (a crash before one, or someone else's hand): the checkpoints after it sign them only as found"
                        );
                        if key.is_some() {
                            std::process::exit(2);
                        }
                    }
                }
                Err(broken) => {
                    println!("broken: {}: {broken}", file.display());
                    std::process::exit(1);
                }
            }
        }
        Command::Check { config } => {
            let c = gatehouse::Config::load(&config)?;
            println!("ok: listen {}, {} upstream(s)", c.listen, c.upstreams.len());
            for u in &c.upstreams {
                println!("  {}", u.name);
            }
            // Egress is enforced only where there is a cluster to write NetworkPolicies to.
            let kube = matches!(
                gatehouse::orchestrator::kubernetes::KubeSettings::from_env(),
                Ok(Some(_))
            );
            for s in c.servers.iter() {
                if let Some(egress) = &s.spec.egress {
                    let how = if kube {
                        "enforced by a NetworkPolicy (kubernetes backend)"
                    } else {
                        gatehouse::orchestrator::egress::NOT_ENFORCED_LOCALLY
                    };
                    println!("  {}: egress {} — {how}", s.name, egress.summary());
                }
            }
        }
        Command::Serve { config, listen } => {
            // The address is part of what is validated (off loopback, auth is required).
            let mut cfg = match &config {
                Some(path) => gatehouse::Config::load_listening(path, listen)?,
                None => gatehouse::Config::embedded_default(listen)?,
            };
            // The embedded default opens the console: with the operator's token when the
            // environment has one (the CLI's), else a new random one, told once at start.
            let console_token = match (&config, cfg.admin_tokens.is_empty()) {
                (None, true) => {
                    let (token, told) = match std::env::var("GATEHOUSE_ADMIN_TOKEN") {
                        Ok(t) if t.len() >= 16 => (t, false),
                        Ok(t) if !t.is_empty() => anyhow::bail!(
                            "GATEHOUSE_ADMIN_TOKEN is too short ({} bytes): use at least 16",
                            t.len()
                        ),
                        _ => (new_admin_token(), true),
                    };
                    cfg.admin_tokens.push(gatehouse::config::AdminToken {
                        token: token.clone(),
                        principal: "admin".into(),
                        scopes: None,
                    });
                    match told {
                        true => Some(tell_token(&token)?),
                        false => None,
                    }
                }
                _ => None,
            };
            gatehouse::telemetry::init(cfg.log_format, &cfg.log_level);
            // Before any server starts: none may read the gateway's tokens through /proc.
            if let Err(e) = gatehouse::process::keep_proc_private() {
                tracing::error!(
                    "cannot keep the gateway's /proc entries private; servers running as its user may read its environment: {e}"
                );
            }
            // Servers must not outlive a gateway that is killed without a chance to stop them.
            let exe = std::env::current_exe().context("cannot locate the gatehouse binary")?;
            if let Err(e) = gatehouse::process::enable_guard(exe, std::time::Duration::from_secs(2))
            {
                tracing::error!(
                    "cannot start the process guard; servers may outlive a killed gateway: {e}"
                );
            }
            let rt = runtime(cfg.workers)?;
            tracing::info!(workers = rt.metrics().num_workers(), "runtime started");
            rt.block_on(serve(cfg, config.is_none(), console_token))?;
        }
    }
    Ok(())
}

/// The multi-thread runtime with `workers` threads, or else (as tokio does) the number in
/// `TOKIO_WORKER_THREADS` or one per CPU the process may use.
fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    builder.enable_all().build()
}

/// Where a new admin token is told: on the terminal, or else (stderr is a log that may be
/// kept and shipped) in a file only its user reads, whose path is told instead.
fn tell_token(token: &str) -> anyhow::Result<String> {
    use std::io::{IsTerminal, Write};
    use std::os::unix::fs::OpenOptionsExt;
    if std::io::stderr().is_terminal() {
        return Ok(format!("for this run: {token}"));
    }
    let dir = gatehouse::config::state_dir().context(
        "no HOME or XDG_STATE_HOME to keep the admin token in; set GATEHOUSE_ADMIN_TOKEN",
    )?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("admin-token");
    // Replaced, never reused: a file someone else made (or linked) is not written through.
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{token}")?;
    Ok(format!("in {}", path.display()))
}

/// A random admin token: 32 bytes from the OS, as hex.
fn new_admin_token() -> String {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).expect("the OS random source is available");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

async fn serve(
    cfg: gatehouse::Config,
    embedded: bool,
    console_token: Option<String>,
) -> anyhow::Result<()> {
    let console = !cfg.admin_tokens.is_empty();
    let upstreams: Vec<String> = cfg.upstreams.iter().map(|u| u.name.clone()).collect();
    let running = gatehouse::start(cfg)
        .await
        .context("cannot start the gateway")?;
    let addr = running.listening.local_addr;
    tracing::info!(
        %addr,
        upstreams = ?upstreams,
        embedded_default = embedded,
        "gatehouse listening: MCP endpoint http://{addr}{}", gatehouse::listener::MCP_PATH
    );
    // Start-up is over: the code only it ran need not stay mapped.
    match startup_code::release() {
        Ok(bytes) => tracing::debug!(bytes, "start-up code pages released"),
        Err(e) => tracing::debug!(error = %e, "start-up code pages kept"),
    }
    if console {
        let url = format!("http://{addr}{}/", gatehouse::console::PREFIX);
        match console_token {
            Some(where_) => eprintln!("console: {url}  (admin token {where_})"),
            None => eprintln!("console: {url}"),
        }
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_runtime_has_the_workers_asked_for_else_one_per_cpu() {
        assert_eq!(super::runtime(Some(3)).unwrap().metrics().num_workers(), 3);
        // Unset, tokio takes TOKIO_WORKER_THREADS, else one per CPU.
        if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            assert_eq!(super::runtime(None).unwrap().metrics().num_workers(), cpus);
        }
    }
}
