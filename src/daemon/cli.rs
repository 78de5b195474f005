//! The `elide-daemon` binary's commands: `serve` (the default) runs the daemon; `run`, `sessions`,
//! `executions` and `info` are operator tools talking to a running daemon over its socket.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tonic::transport::{Channel, Endpoint};

use super::config::{DEFAULT_SOCKET, DaemonConfig, Overrides};
use super::runtime::Language;
use crate::proto::elide::daemon::v1alpha1 as pb;
use crate::proto::elide::daemon::v1alpha1::execution_api_client::ExecutionApiClient;

/// Command line of `elide-daemon`.
#[derive(Debug, Parser)]
#[command(
    name = "elide-daemon",
    version,
    about = "elide node daemon: runs Python, JavaScript and TypeScript snippets"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Serve(ServeArgs),
    /// Run a snippet file through a running daemon; exits with the snippet's exit code.
    Run(RunArgs),
    /// List sessions.
    Sessions(ClientArgs),
    /// List executions.
    Executions(ExecutionsArgs),
    /// Show daemon version, runtimes and isolation features.
    Info(ClientArgs),
    /// Internal: the daemon's companion cleanup process.
    #[command(name = "__reaper", hide = true)]
    Reaper(ReaperArgs),
}

#[derive(Debug, Args)]
struct ReaperArgs {
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long)]
    cgroup_root: PathBuf,
    #[arg(long)]
    cgroup_parent: String,
}

#[derive(Debug, Args, Default)]
struct ServeArgs {
    /// Config file (TOML).
    #[arg(long, env = "ELIDE_DAEMON_CONFIG")]
    config: Option<PathBuf>,
    /// Unix socket to serve on [default: /run/elide/daemon.sock].
    #[arg(long, env = "ELIDE_DAEMON_SOCKET")]
    socket: Option<PathBuf>,
    /// Socket permission bits, octal [default: 0600].
    #[arg(long)]
    socket_mode: Option<String>,
    /// Group owning the socket.
    #[arg(long)]
    socket_group: Option<String>,
    /// Extra peer uid allowed on the socket (repeatable).
    #[arg(long = "allowed-uid")]
    allowed_uids: Vec<u32>,
    /// State directory [default: /var/lib/elide].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Directory for per-execution files [default: /run/elide/exec].
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Largest inline code accepted, in bytes [default: 4194304].
    #[arg(long)]
    max_code_bytes: Option<u64>,
    /// Idle sessions are closed after this long, e.g. "1h" [default: 1h].
    #[arg(long)]
    session_idle_ttl: Option<String>,
    /// Directory under which regular files may be used as output sinks (repeatable).
    #[arg(long = "output-root")]
    output_roots: Vec<PathBuf>,
    /// How long to wait for a reader when opening a FIFO output sink [default: 10s].
    #[arg(long)]
    sink_open_timeout: Option<String>,
    /// cgroupfs mount point [default: /sys/fs/cgroup].
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Name of the daemon's cgroup under each hierarchy [default: elide].
    #[arg(long)]
    cgroup_parent: Option<String>,
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// Socket of the running daemon.
    #[arg(long, env = "ELIDE_DAEMON_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(Debug, Args)]
struct ExecutionsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Only this session's executions.
    #[arg(long)]
    session: Option<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// python, javascript, typescript (or py/js/ts); default from the file extension.
    #[arg(long, short = 'l')]
    language: Option<String>,
    /// Kill the snippet after this long, e.g. "30s".
    #[arg(long)]
    timeout: Option<String>,
    /// Run as this user (root daemons only).
    #[arg(long)]
    user: Option<String>,
    /// The snippet file.
    file: PathBuf,
    /// Arguments passed to the snippet.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("elide-daemon: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            None => serve(cli.serve).await.map(|_| 0u8),
            Some(Command::Serve(a)) => serve(a).await.map(|_| 0),
            Some(Command::Run(a)) => run(a).await,
            Some(Command::Sessions(a)) => sessions(a).await.map(|_| 0),
            Some(Command::Executions(a)) => executions(a).await.map(|_| 0),
            Some(Command::Info(a)) => info(a).await.map(|_| 0),
            Some(Command::Reaper(a)) => tokio::task::spawn_blocking(move || {
                super::reaper::run(a.state_dir, a.cgroup_root, a.cgroup_parent)
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r)
            .map(|_| 0),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("elide-daemon: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ELIDE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cfg = DaemonConfig::load(&Overrides {
        config_file: a.config,
        socket: a.socket,
        socket_mode: a.socket_mode,
        socket_group: a.socket_group,
        allowed_uids: a.allowed_uids,
        state_dir: a.state_dir,
        run_dir: a.run_dir,
        max_code_bytes: a.max_code_bytes,
        session_idle_ttl: a.session_idle_ttl,
        output_roots: a.output_roots,
        sink_open_timeout: a.sink_open_timeout,
        cgroup_root: a.cgroup_root,
        cgroup_parent: a.cgroup_parent,
    })?;
    super::server::serve(cfg).await
}

/// Connects to the daemon at `socket`.
pub async fn connect(socket: &std::path::Path) -> anyhow::Result<ExecutionApiClient<Channel>> {
    let ch = Endpoint::from_shared(format!("unix://{}", socket.display()))?
        .connect()
        .await
        .with_context(|| format!("connecting to the elide daemon at {}", socket.display()))?;
    Ok(ExecutionApiClient::new(ch).max_decoding_message_size(64 << 20))
}

async fn run(a: RunArgs) -> anyhow::Result<u8> {
    let language = match &a.language {
        Some(l) => {
            Language::parse(l).with_context(|| format!("--language {l:?}: unknown language"))?
        }
        None => Language::from_extension(&a.file).with_context(|| {
            format!(
                "cannot tell the language of {} from its extension; pass --language",
                a.file.display()
            )
        })?,
    };
    let path = std::fs::canonicalize(&a.file).with_context(|| format!("{}", a.file.display()))?;
    let timeout = match &a.timeout {
        Some(t) => {
            let d = humantime::parse_duration(t).with_context(|| format!("--timeout {t:?}"))?;
            Some(prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            })
        }
        None => None,
    };
    let mut client = connect(&a.client.socket).await?;
    let session = client
        .create_session(pb::CreateSessionRequest {
            config: Some(pb::SessionConfig {
                enabled_languages: vec![language.name().to_string()],
                enabled_intrinsics: vec!["env".into(), "io".into(), "net".into()],
                ..Default::default()
            }),
            owner: format!("elide-daemon run (pid {})", std::process::id()),
            session_id: String::new(),
        })
        .await?
        .into_inner();
    let cwd = std::env::current_dir()?;
    let env = std::env::vars_os()
        .map(|(k, v)| {
            use std::os::unix::ffi::OsStringExt;
            pb::EnvVar {
                key: k.into_vec(),
                value: v.into_vec(),
            }
        })
        .collect();
    let capture = || {
        Some(pb::OutputSink {
            kind: Some(pb::output_sink::Kind::Capture(pb::Capture {})),
        })
    };
    let started = client
        .start_execution(pb::StartExecutionRequest {
            session_id: session.id.clone(),
            language: language.name().to_string(),
            path: path.display().to_string(),
            args: a.args.clone(),
            env,
            working_dir: cwd.display().to_string(),
            user: a.user.clone().unwrap_or_default(),
            limits: Some(pb::Limits {
                timeout,
                ..Default::default()
            }),
            stdout: capture(),
            stderr: capture(),
            ..Default::default()
        })
        .await;
    let exec = match started {
        Ok(e) => e.into_inner(),
        Err(e) => {
            let _ = client
                .close_session(pb::CloseSessionRequest {
                    session_id: session.id.clone(),
                    grace: None,
                })
                .await;
            anyhow::bail!("{}", e.message());
        }
    };
    // Ctrl-C stops the snippet (SIGTERM, then SIGKILL after 2 s) instead of orphaning it.
    {
        let mut c = client.clone();
        let id = exec.id.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = c
                    .stop_execution(pb::StopExecutionRequest {
                        execution_id: id,
                        signal: String::new(),
                        grace: Some(prost_types::Duration {
                            seconds: 2,
                            nanos: 0,
                        }),
                    })
                    .await;
            }
        });
    }
    let mut stream = client
        .stream_output(pb::StreamOutputRequest {
            execution_id: exec.id.clone(),
            streams: vec![],
            offset: 0,
            follow: true,
        })
        .await?
        .into_inner();
    while let Some(chunk) = stream.message().await? {
        if chunk.stream == pb::OutputStream::Stderr as i32 {
            let mut e = std::io::stderr().lock();
            e.write_all(&chunk.data)?;
            e.flush()?;
        } else {
            let mut o = std::io::stdout().lock();
            o.write_all(&chunk.data)?;
            o.flush()?;
        }
    }
    let waited = client
        .wait_execution(pb::WaitExecutionRequest {
            execution_id: exec.id.clone(),
        })
        .await?
        .into_inner();
    let _ = client
        .close_session(pb::CloseSessionRequest {
            session_id: session.id,
            grace: None,
        })
        .await;
    let r = waited.result.unwrap_or_default();
    if !r.error.is_empty() {
        eprintln!("elide-daemon: {}", r.error);
    }
    if r.oom_killed {
        eprintln!("elide-daemon: the snippet was killed for exceeding its memory limit");
    }
    if r.timed_out {
        eprintln!("elide-daemon: the snippet was killed after its timeout");
    }
    Ok(r.exit_code.clamp(0, 255) as u8)
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| std::time::SystemTime::try_from(*t).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "-".into())
}

async fn sessions(a: ClientArgs) -> anyhow::Result<()> {
    let mut c = connect(&a.socket).await?;
    let list = c
        .list_sessions(pb::ListSessionsRequest {})
        .await?
        .into_inner();
    println!(
        "{:<40} {:>7} {:>7} {:<25} {:<22} OWNER",
        "ID", "RUNNING", "TOTAL", "LANGUAGES", "CREATED"
    );
    for s in list.sessions {
        println!(
            "{:<40} {:>7} {:>7} {:<25} {:<22} {}",
            s.id,
            s.running_executions,
            s.total_executions,
            s.languages.join(","),
            ts(&s.created_at),
            s.owner
        );
        for p in &s.pools {
            println!("  {}", pool_line(p));
        }
    }
    Ok(())
}

/// One warm pool of a session, under the session's row.
fn pool_line(p: &pb::PoolStatus) -> String {
    let state = pb::PoolState::try_from(p.state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("POOL_STATE_")
                .to_ascii_lowercase()
                .replace('_', " ")
        })
        .unwrap_or_else(|_| "?".into());
    let mut line = format!(
        "pool {:<6} {:<10} pooled {} cold {}",
        p.runtime, state, p.pooled_starts, p.cold_starts
    );
    if p.runtime == "node" {
        line.push_str(&format!(" idle workers {}", p.idle_workers));
    }
    if !p.detail.is_empty() {
        line.push_str(&format!(" ({})", p.detail));
    }
    line
}

async fn executions(a: ExecutionsArgs) -> anyhow::Result<()> {
    let mut c = connect(&a.client.socket).await?;
    let list = c
        .list_executions(pb::ListExecutionsRequest {
            session_id: a.session.unwrap_or_default(),
        })
        .await?
        .into_inner();
    println!(
        "{:<36} {:<36} {:<11} {:<8} {:<6} {:>8} {:<22} RESULT",
        "ID", "SESSION", "LANGUAGE", "STATE", "START", "PID", "STARTED"
    );
    for e in list.executions {
        let state = pb::ExecutionState::try_from(e.state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("EXECUTION_STATE_")
                    .to_ascii_lowercase()
            })
            .unwrap_or_else(|_| "?".into());
        let result = e
            .result
            .map(|r| {
                let mut s = format!("exit={}", r.exit_code);
                if r.signal != 0 {
                    s.push_str(&format!(" signal={}", r.signal));
                }
                if r.oom_killed {
                    s.push_str(" oom");
                }
                if r.timed_out {
                    s.push_str(" timeout");
                }
                if !r.error.is_empty() {
                    s.push_str(&format!(" error={:?}", r.error));
                }
                s
            })
            .unwrap_or_default();
        println!(
            "{:<36} {:<36} {:<11} {:<8} {:<6} {:>8} {:<22} {}",
            e.id,
            e.session_id,
            e.language,
            state,
            if e.pooled { "pooled" } else { "cold" },
            e.pid,
            ts(&e.started_at),
            result
        );
    }
    Ok(())
}

async fn info(a: ClientArgs) -> anyhow::Result<()> {
    let mut c = connect(&a.socket).await?;
    let i = c
        .get_daemon_info(pb::GetDaemonInfoRequest {})
        .await?
        .into_inner();
    println!(
        "elide-daemon {} (api {}), pid {}, started {}",
        i.version,
        i.api_version,
        i.pid,
        ts(&i.started_at)
    );
    println!("max inline code: {} bytes", i.max_code_bytes);
    println!("cgroups: {}", i.cgroup_mode);
    println!("runtimes:");
    for r in i.runtimes {
        if r.available {
            println!(
                "  {:<11} {:<10} {:<7} {} (aliases: {})",
                r.language,
                r.version,
                r.backend,
                r.command,
                r.aliases.join(", ")
            );
        } else {
            println!("  {:<11} unavailable: {}", r.language, r.detail);
        }
    }
    println!("isolation:");
    for f in i.isolation {
        println!(
            "  {:<16} {:<12} {}",
            f.name,
            if f.enforced {
                "enforced"
            } else {
                "not enforced"
            },
            f.detail
        );
    }
    Ok(())
}
