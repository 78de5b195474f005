//! Task lifecycle RPCs: StartTask, WaitTask, StopTask, DestroyTask, InspectTask, SignalTask and
//! RecoverTask, on top of the daemon's executions. Streams (TaskStats, TaskEvents, exec) live
//! in [`super::task_io`].
//!
//! Model: every Nomad task is one daemon execution. The daemon owns the process (and its FIFO
//! write ends and exit status), so the plugin can be SIGKILLed at any time; a new plugin finds
//! the execution again from `driver_state` alone. Per task, one background waiter blocks on
//! WaitExecution and publishes the exit to every WaitTask caller.
//!
//! Choices (fact sheet §3.8–§3.17):
//! - StopTask with an empty signal sends SIGINT, like Nomad's executor-based drivers; a
//!   timeout of 0 kills at once. Unknown or already-ended tasks answer OK.
//! - DestroyTask refuses a running task unless `force`; unknown ids answer OK. Only a running
//!   task's destroy may auto-start the daemon: unknown and ended ones leave nothing a daemon
//!   that is down holds.
//! - Wait/Inspect/Signal on unknown ids answer NotFound (never Unavailable).
//! - A daemon that cannot be reached at StartTask gives a RecoverableError so Nomad retries.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Response, Status, Streaming};

use super::driver_state::{DRIVER_STATE_VERSION, DriverState};
use super::state::{PluginState, Snapshot};
use super::task_config::{Source, TaskSpec};
use super::tasks::TaskEntry;
use crate::daemon_client::{DEFAULT_CALL_TIMEOUT, DaemonClient, DaemonError};
use crate::goplugin::services::BoxStream;
use crate::proto::elide::daemon::v1alpha1 as api;
use crate::proto::hashicorp::nomad::plugins::drivers::proto as pb;

/// Signal StopTask sends when Nomad passes none (what Nomad's executor does).
pub const DEFAULT_STOP_SIGNAL: &str = "SIGINT";
/// How long the waiter may spend checking whether a broken connection means a dead daemon.
pub const LOST_CHECK_TIMEOUT: Duration = Duration::from_millis(1500);
/// Prefix of WaitTask's `err` when the daemon went away under a running task.
pub const CONNECTION_LOST: &str = "elide-daemon connection lost";
/// How long an execution left running by an earlier plugin process gets between SIGTERM and
/// SIGKILL (Nomad's default `kill_timeout`: its own is not known any more).
pub const LEFTOVER_GRACE: Duration = Duration::from_secs(5);

const RECOVERABLE_TYPE_URL: &str =
    "type.googleapis.com/hashicorp.nomad.plugins.shared.structs.RecoverableError";

/// A status carrying Nomad's `RecoverableError{recoverable: true}` detail (fact sheet §3.21):
/// the restart policy applies instead of failing the task for good.
pub fn recoverable(message: String) -> Status {
    let detail = crate::proto::hashicorp::nomad::plugins::shared::structs::RecoverableError {
        recoverable: true,
    };
    let status = crate::proto::google::rpc::Status {
        code: tonic::Code::FailedPrecondition as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: RECOVERABLE_TYPE_URL.into(),
            value: detail.encode_to_vec(),
        }],
    };
    Status::with_details(
        tonic::Code::FailedPrecondition,
        message,
        status.encode_to_vec().into(),
    )
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("task with ID {id:?} not found"))
}

/// Maps a daemon failure of an operation on task `id` to a status (never Unavailable: the
/// client reads that as "plugin died").
pub fn daemon_status(state: &PluginState, id: &str, e: &DaemonError) -> Status {
    if e.is_unreachable() {
        state.link.invalidate();
        return Status::failed_precondition(format!("task {id}: elide-daemon unreachable: {e}"));
    }
    let msg = format!("task {id}: {e}");
    match e.code() {
        Some(tonic::Code::InvalidArgument) => Status::invalid_argument(msg),
        Some(tonic::Code::NotFound) => Status::not_found(msg),
        Some(tonic::Code::AlreadyExists) => Status::already_exists(msg),
        Some(tonic::Code::PermissionDenied) => Status::permission_denied(msg),
        Some(tonic::Code::ResourceExhausted | tonic::Code::Unavailable) => {
            Status::resource_exhausted(msg)
        }
        _ => Status::failed_precondition(msg),
    }
}

async fn client_for(state: &PluginState, snapshot: &Snapshot) -> Result<DaemonClient, Status> {
    state
        .link
        .client(snapshot)
        .await
        .map_err(|e| Status::failed_precondition(e.to_string()))
}

/// Stops an execution that an earlier plugin process left running ([`super::inherited`]) and
/// has the daemon forget it; `why` names what showed it to be a leftover.
async fn stop_leftover(client: &DaemonClient, task_id: &str, execution_id: &str, why: &str) {
    tracing::warn!(task = %task_id, execution = %execution_id, "stopping an execution an earlier plugin process left running: {why}");
    let how = Stop {
        signal: "SIGTERM",
        grace: LEFTOVER_GRACE,
        what: "the leftover execution",
    };
    // Failures are logged there; nobody waits for this one.
    let _ = stop_and_forget(client, task_id, execution_id, how).await;
}

/// How [`stop_and_forget`] stops an execution, and what the logs call it.
pub(super) struct Stop {
    pub(super) signal: &'static str,
    pub(super) grace: Duration,
    pub(super) what: &'static str,
}

/// Stops an execution no task entry will wait for and has the daemon forget it. One already
/// gone is fine; failures are logged, since nobody is left to tell, and a failed stop is
/// returned for a caller that tries again.
pub(super) async fn stop_and_forget(
    client: &DaemonClient,
    task_id: &str,
    execution_id: &str,
    how: Stop,
) -> Result<(), DaemonError> {
    let Stop {
        signal,
        grace,
        what,
    } = how;
    match client.stop_execution(execution_id, signal, grace).await {
        Ok(_) => {}
        Err(e) if e.code() == Some(tonic::Code::NotFound) => return Ok(()),
        Err(e) => {
            tracing::error!(task = %task_id, execution = %execution_id, error = %e, "cannot stop {what}");
            return Err(e);
        }
    }
    if let Err(e) = client.remove_execution(execution_id, true).await
        && e.code() != Some(tonic::Code::NotFound)
    {
        tracing::warn!(task = %task_id, execution = %execution_id, error = %e, "daemon did not forget {what}");
    }
    Ok(())
}

/// Stops and forgets `execution_id` on the daemon at `socket`, one the plugin is no longer
/// configured for; says what became of it.
async fn stop_on_former_daemon(socket: &Path, task_id: &str, execution_id: &str) -> String {
    let client = match DaemonClient::connect(socket, DEFAULT_CALL_TIMEOUT).await {
        Ok(c) => c,
        Err(e) if e.nobody_listens() => {
            return "that daemon is gone, and its executions with it".into();
        }
        Err(e) => {
            tracing::error!(task = %task_id, execution = %execution_id, socket = %socket.display(), error = %e, "cannot reach the former elide-daemon to stop a task it runs; it may still run");
            return format!(
                "the former daemon cannot be reached ({e}); the execution may still run there"
            );
        }
    };
    let how = Stop {
        signal: "SIGKILL",
        grace: Duration::ZERO,
        what: "a task of the former elide-daemon",
    };
    match stop_and_forget(&client, task_id, execution_id, how).await {
        Ok(()) => {
            tracing::warn!(task = %task_id, execution = %execution_id, socket = %socket.display(), "stopped a task left on the former elide-daemon; Nomad starts it again");
            format!("its execution {execution_id} there was stopped")
        }
        Err(e) => format!("stopping its execution {execution_id} there failed: {e}"),
    }
}

/// How long RecoverTask asks a daemon that does not answer again before it fails.
const RECOVER_RETRY_FOR: Duration = Duration::from_secs(30);

/// How long a destroyed task's kill is retried while the daemon cannot be asked.
const DESTROYED_KILL_RETRY_FOR: Duration = Duration::from_secs(600);

/// Kills and forgets, in the background, the execution of a task Nomad destroyed while the
/// daemon could not be asked; retried with back-off for [`DESTROYED_KILL_RETRY_FOR`]. A daemon
/// that is down took its executions with it: none is started for this.
fn kill_in_background(state: Arc<PluginState>, task_id: String, execution_id: String) {
    tokio::spawn(async move {
        let give_up = tokio::time::Instant::now() + DESTROYED_KILL_RETRY_FOR;
        let mut pause = Duration::from_secs(1);
        loop {
            tokio::time::sleep(pause).await;
            let Some(socket) = state
                .snapshot()
                .config
                .as_ref()
                .map(|c| c.daemon_socket.clone())
            else {
                return;
            };
            let last_error = match DaemonClient::connect(&socket, DEFAULT_CALL_TIMEOUT).await {
                Err(e) if e.nobody_listens() => {
                    tracing::info!(task = %task_id, execution = %execution_id, "elide-daemon is down, and the destroyed task ended with it");
                    return;
                }
                Ok(client) => {
                    let how = Stop {
                        signal: "SIGKILL",
                        grace: Duration::ZERO,
                        what: "the destroyed task",
                    };
                    match stop_and_forget(&client, &task_id, &execution_id, how).await {
                        Ok(()) => return,
                        Err(e) => e.to_string(),
                    }
                }
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= give_up {
                tracing::error!(task = %task_id, execution = %execution_id, error = %last_error, "gave up killing the destroyed task; it may still run (see `elide-daemon executions`)");
                return;
            }
            pause = (pause * 2).min(Duration::from_secs(30));
        }
    });
}

/// Notes what earlier plugin processes left running (in any session), once per process; a
/// failure only means leftovers are not looked for this time.
async fn note_inherited(state: &PluginState, client: &DaemonClient) {
    if let Err(e) = state.inherited.note(client).await {
        tracing::warn!(error = %e, "cannot list the daemon's executions to find leftovers of an earlier plugin process");
    }
}

/// The task dir Nomad made for this task (`<alloc_dir>/<task name>`).
pub fn task_dir(cfg: &pb::TaskConfig) -> PathBuf {
    Path::new(&cfg.alloc_dir).join(&cfg.name)
}

/// The memory limit in bytes: the task's `resources` (max of memory and memory_max),
/// tightened by `elide_opts.memory_limit_mb` and `session_config.memory_limit_mb`; 0 = none.
pub fn memory_limit_bytes(cfg: &pb::TaskConfig, spec: &TaskSpec, session_cap_mb: u64) -> i64 {
    const MIB: i64 = 1024 * 1024;
    let res = cfg.resources.as_ref();
    let from_alloc = res
        .and_then(|r| r.allocated_resources.as_ref())
        .and_then(|a| a.memory.as_ref())
        .map(|m| m.memory_mb.max(m.memory_max_mb).saturating_mul(MIB))
        .unwrap_or(0);
    let from_linux = res
        .and_then(|r| r.linux_resources.as_ref())
        .map(|l| l.memory_limit_bytes)
        .unwrap_or(0);
    let nomad = if from_alloc > 0 {
        from_alloc
    } else {
        from_linux
    };
    let opts = spec.memory_limit_mb.map_or(0, |m| {
        i64::try_from(m).unwrap_or(i64::MAX).saturating_mul(MIB)
    });
    let session = i64::try_from(session_cap_mb)
        .unwrap_or(i64::MAX)
        .saturating_mul(MIB);
    [nomad, opts, session]
        .into_iter()
        .filter(|v| *v > 0)
        .min()
        .unwrap_or(0)
}

/// The cores Nomad reserved for the task (`resources { cores = N }`), comma-joined; empty
/// when none.
pub fn reserved_cores(cfg: &pb::TaskConfig) -> String {
    cfg.resources
        .as_ref()
        .and_then(|r| r.linux_resources.as_ref())
        .map(|l| l.cpuset_cpus.clone())
        .unwrap_or_default()
}

/// CPU shares (Nomad MHz) from the task's resources; 0 = none.
pub fn cpu_shares(cfg: &pb::TaskConfig) -> i64 {
    let res = cfg.resources.as_ref();
    let alloc = res
        .and_then(|r| r.allocated_resources.as_ref())
        .and_then(|a| a.cpu.as_ref())
        .map(|c| c.cpu_shares)
        .unwrap_or(0);
    if alloc > 0 {
        alloc
    } else {
        res.and_then(|r| r.linux_resources.as_ref())
            .map(|l| l.cpu_shares)
            .unwrap_or(0)
            .max(0)
    }
}

fn duration_proto(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

fn duration_from(d: Option<&prost_types::Duration>) -> Duration {
    match d {
        Some(d) if d.seconds > 0 || (d.seconds == 0 && d.nanos > 0) => Duration::new(
            d.seconds.max(0) as u64,
            d.nanos.clamp(0, 999_999_999) as u32,
        ),
        _ => Duration::ZERO,
    }
}

/// The daemon request for a validated task.
pub fn execution_request(
    cfg: &pb::TaskConfig,
    spec: &TaskSpec,
    session_id: &str,
    session_cap_mb: u64,
) -> api::StartExecutionRequest {
    // Nomad's env is the task's complete environment; the job's `env` map goes on top.
    let mut env: std::collections::BTreeMap<&str, &str> = cfg
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for (k, v) in &spec.env {
        env.insert(k, v);
    }
    let (code, path) = match &spec.source {
        Source::Code(c) => (c.clone(), String::new()),
        Source::Script(p) => (String::new(), p.display().to_string()),
    };
    let sink = |p: &str| {
        Some(api::OutputSink {
            kind: Some(api::output_sink::Kind::Path(if p.is_empty() {
                crate::sandbox::sink::DEV_NULL.to_string()
            } else {
                p.to_string()
            })),
        })
    };
    let network_namespace = cfg
        .network_isolation_spec
        .as_ref()
        .filter(|n| {
            n.mode == pb::network_isolation_spec::NetworkIsolationMode::Group as i32
                && !n.path.is_empty()
        })
        .map(|n| n.path.clone())
        .unwrap_or_default();
    let dir = task_dir(cfg);
    let shared = Path::new(&cfg.alloc_dir).join("alloc");
    let extra: Vec<String> = [&dir, &shared]
        .into_iter()
        .filter(|p| p.is_dir())
        .map(|p| p.display().to_string())
        .collect();
    api::StartExecutionRequest {
        session_id: session_id.to_string(),
        language: spec.language.as_str().to_string(),
        code,
        path,
        args: spec.args.clone(),
        env: env
            .into_iter()
            .map(|(k, v)| api::EnvVar {
                key: k.as_bytes().to_vec(),
                value: v.as_bytes().to_vec(),
            })
            .collect(),
        working_dir: if dir.is_dir() {
            dir.display().to_string()
        } else {
            String::new()
        },
        user: cfg.user.clone(),
        limits: Some(api::Limits {
            memory_bytes: memory_limit_bytes(cfg, spec, session_cap_mb),
            cpu_shares: cpu_shares(cfg),
            pids: 0,
            timeout: spec.timeout.map(duration_proto),
            cpuset_cpus: reserved_cores(cfg),
        }),
        stdout: sink(&cfg.stdout_path),
        stderr: sink(&cfg.stderr_path),
        network_namespace,
        client_ref: cfg.id.clone(),
        extra_read_paths: extra.clone(),
        extra_write_paths: extra,
    }
}

/// The Nomad exit result of a daemon result; `err` explains abnormal ends.
pub fn exit_of(r: &api::ExecutionResult, timeout: Option<Duration>) -> (pb::ExitResult, String) {
    let err = if !r.error.is_empty() {
        r.error.clone()
    } else if r.timed_out {
        match timeout {
            Some(t) => format!(
                "killed after elide_opts.timeout ({})",
                humantime::format_duration(t)
            ),
            None => "killed after elide_opts.timeout".into(),
        }
    } else {
        String::new()
    };
    (
        pb::ExitResult {
            exit_code: r.exit_code,
            signal: r.signal,
            oom_killed: r.oom_killed,
        },
        err,
    )
}

/// Starts the background waiter of a task: blocks on WaitExecution and publishes the exit.
/// A broken connection is checked against a fresh one: a daemon that still knows the
/// execution means a blip (wait again); no daemon means the task is gone with it.
pub fn spawn_waiter(state: Arc<PluginState>, entry: Arc<TaskEntry>, timeout: Option<Duration>) {
    tokio::spawn(async move {
        // Back-off while the daemon is there but does not answer.
        let mut pause = UNSURE_FIRST_PAUSE;
        loop {
            let snapshot = state.snapshot();
            // Never starts a daemon: one that is down ended its executions, this one included
            // (and the look below says so).
            let failure = match state.link.running_client(&snapshot).await {
                Ok(client) => {
                    let waited = tokio::select! {
                        r = client.wait_execution(&entry.execution_id) => r,
                        () = entry.cancel.cancelled() => return,
                    };
                    match waited {
                        Ok(resp) => {
                            let r = resp.result.unwrap_or_default();
                            let (result, err) = exit_of(&r, timeout);
                            entry.set_exit(result, err);
                            return;
                        }
                        Err(e) if e.code() == Some(tonic::Code::NotFound) => {
                            entry.set_exit(
                                lost_result(),
                                format!(
                                    "execution {} is unknown to elide-daemon (its state was lost): {e}",
                                    entry.execution_id
                                ),
                            );
                            return;
                        }
                        Err(e) => {
                            state.link.invalidate();
                            e.to_string()
                        }
                    }
                }
                Err(e) => e.to_string(),
            };
            let socket = snapshot
                .config
                .as_ref()
                .map(|c| c.daemon_socket.clone())
                .unwrap_or_default();
            match look_again(&socket, &entry.execution_id).await {
                Sighting::Running => {
                    tracing::debug!(task = %entry.id, error = %failure, "wait interrupted; the execution still runs, waiting again");
                    pause = UNSURE_FIRST_PAUSE;
                    // A wait that keeps failing at once must not spin.
                    tokio::select! {
                        () = tokio::time::sleep(RUNNING_REWAIT_PAUSE) => {}
                        () = entry.cancel.cancelled() => return,
                    }
                }
                Sighting::Ended(r) => {
                    let (result, err) = exit_of(&r, timeout);
                    entry.set_exit(result, err);
                    return;
                }
                Sighting::Gone(why) => {
                    tracing::warn!(task = %entry.id, error = %failure, "elide-daemon went away under a running task");
                    entry.set_exit(
                        lost_result(),
                        format!(
                            "{CONNECTION_LOST} while the task was running ({failure}; {why}); the daemon's executions end with it"
                        ),
                    );
                    return;
                }
                Sighting::Unsure(why) => {
                    // A daemon that is there but slow (a loaded node) still runs the task:
                    // calling it lost would have Nomad start it again and kill this one.
                    if pause == UNSURE_FIRST_PAUSE {
                        tracing::warn!(task = %entry.id, error = %failure, "elide-daemon does not answer ({why}); the task is taken to run on, asking again");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = entry.cancel.cancelled() => return,
                    }
                    pause = (pause * 2).min(UNSURE_LONGEST_PAUSE);
                }
            }
        }
    });
}

/// The waiter's pause before waiting again on an execution that still runs.
const RUNNING_REWAIT_PAUSE: Duration = Duration::from_millis(100);
/// First and longest pause of the waiter while the daemon is there but does not answer.
const UNSURE_FIRST_PAUSE: Duration = Duration::from_millis(500);
const UNSURE_LONGEST_PAUSE: Duration = Duration::from_secs(5);

/// What a fresh look at the daemon says of an execution after a wait failed.
enum Sighting {
    /// The daemon answers and the execution runs.
    Running,
    /// The daemon answers with the execution's end.
    Ended(api::ExecutionResult),
    /// No daemon: no socket, nobody listening on it, or a daemon that does not know the
    /// execution. Its executions ended with it.
    Gone(String),
    /// Something listens but did not answer in time: the execution may still run.
    Unsure(String),
}

async fn look_again(socket: &Path, execution_id: &str) -> Sighting {
    let client = match tokio::time::timeout(
        LOST_CHECK_TIMEOUT,
        DaemonClient::connect(socket, LOST_CHECK_TIMEOUT),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) if e.nobody_listens() => return Sighting::Gone(e.to_string()),
        Ok(Err(e)) => return Sighting::Unsure(e.to_string()),
        Err(_) => return Sighting::Unsure(format!("no connection within {LOST_CHECK_TIMEOUT:?}")),
    };
    match tokio::time::timeout(LOST_CHECK_TIMEOUT, client.get_execution(execution_id)).await {
        Ok(Ok(exec)) if exec.state == api::ExecutionState::Exited as i32 => {
            Sighting::Ended(exec.result.unwrap_or_default())
        }
        Ok(Ok(_)) => Sighting::Running,
        Ok(Err(e)) if e.code() == Some(tonic::Code::NotFound) => Sighting::Gone(e.to_string()),
        Ok(Err(e)) => Sighting::Unsure(e.to_string()),
        Err(_) => Sighting::Unsure(format!("no answer within {LOST_CHECK_TIMEOUT:?}")),
    }
}

fn lost_result() -> pb::ExitResult {
    // Like Nomad's executor when it cannot tell how the process ended.
    pb::ExitResult {
        exit_code: -1,
        signal: 0,
        oom_killed: false,
    }
}

/// RecoverTask: rebuilds the entry from the handle alone (`handle.config.id` and
/// `driver_state`; the request's `task_id` and the raw driver config are never there).
pub async fn recover_task(
    state: &Arc<PluginState>,
    req: pb::RecoverTaskRequest,
) -> Result<Response<pb::RecoverTaskResponse>, Status> {
    let handle = req
        .handle
        .ok_or_else(|| Status::invalid_argument("handle: missing"))?;
    let cfg = handle.config.ok_or_else(|| {
        Status::invalid_argument("handle.config: missing; cannot tell which task")
    })?;
    if cfg.id.is_empty() {
        return Err(Status::invalid_argument("handle.config.id: empty"));
    }
    state.dangling.note_alloc_dir(&cfg.alloc_dir);
    // Held from here: while the daemon is asked (for up to RECOVER_RETRY_FOR), the task is
    // already ours, and no dangling look takes its execution for a stray one.
    let Ok(reservation) = state.tasks.reserve(&cfg.id) else {
        tracing::debug!(task = %cfg.id, "nothing to recover; task already known or being recovered");
        return Ok(Response::new(pb::RecoverTaskResponse {}));
    };
    if handle.version != DRIVER_STATE_VERSION as i32 {
        return Err(Status::invalid_argument(format!(
            "handle.version {} is not supported (this plugin writes version {DRIVER_STATE_VERSION}); task {} cannot be recovered",
            handle.version, cfg.id
        )));
    }
    let ds = DriverState::decode(&handle.driver_state)
        .map_err(|e| Status::invalid_argument(format!("task {}: handle.{e}", cfg.id)))?;
    let snapshot = state.snapshot();
    if let Some(c) = snapshot.config.as_ref()
        && c.daemon_socket != ds.daemon_socket
    {
        // Nomad starts the task again on the daemon configured now; the old daemon (it may
        // still run) would otherwise keep the old execution going unseen, since Nomad's
        // DestroyTask of it reaches only the daemon configured now.
        let old = stop_on_former_daemon(&ds.daemon_socket, &cfg.id, &ds.execution_id).await;
        return Err(Status::failed_precondition(format!(
            "task {} was started on elide-daemon at {} but the plugin now uses {} ({old})",
            cfg.id,
            ds.daemon_socket.display(),
            c.daemon_socket.display()
        )));
    }
    // A failed recovery has Nomad start the task again and kill this one: a daemon that is
    // only slow to answer (an agent restart recovers every task of the node at once) is asked
    // again for a while before the recovery fails.
    let give_up = tokio::time::Instant::now() + RECOVER_RETRY_FOR;
    let mut pause = Duration::from_millis(250);
    let exec = loop {
        let client = match state.link.client(&snapshot).await {
            Ok(c) => c,
            Err(e) if e.is_slow_daemon() && tokio::time::Instant::now() + pause < give_up => {
                tracing::warn!(task = %cfg.id, error = %e, "elide-daemon did not answer the recovery; asking again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(e) => return Err(Status::failed_precondition(e.to_string())),
        };
        if snapshot.session_id.is_some() {
            note_inherited(state, &client).await;
        }
        match client.get_execution(&ds.execution_id).await {
            Ok(exec) => break exec,
            Err(e) if e.code() == Some(tonic::Code::NotFound) => {
                return Err(Status::not_found(format!(
                    "task {}: execution {} no longer exists in elide-daemon",
                    cfg.id, ds.execution_id
                )));
            }
            Err(e) if e.is_unreachable() && tokio::time::Instant::now() + pause < give_up => {
                state.link.invalidate();
                tracing::warn!(task = %cfg.id, error = %e, "elide-daemon did not answer the recovery; asking again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(daemon_status(state, &cfg.id, &e)),
        }
    };
    let running = exec.state != api::ExecutionState::Exited as i32;
    if running && ds.pid != 0 && (exec.pid != ds.pid || exec.pid_start_ticks != ds.pid_start_ticks)
    {
        return Err(Status::failed_precondition(format!(
            "task {}: execution {} runs pid {} (start {}), not the recorded pid {} (start {})",
            cfg.id, ds.execution_id, exec.pid, exec.pid_start_ticks, ds.pid, ds.pid_start_ticks
        )));
    }
    let entry = Arc::new(TaskEntry::new(
        &cfg,
        ds.execution_id.clone(),
        ds.session_id.clone(),
        ds.pid,
        ds.started_at(),
    ));
    reservation.commit(entry.clone());
    state.inherited.claim(&ds.execution_id);
    tracing::info!(task = %cfg.id, execution = %ds.execution_id, running, "task recovered");
    spawn_waiter(state.clone(), entry, None);
    Ok(Response::new(pb::RecoverTaskResponse {}))
}

/// StartTask. Runs detached from the RPC: Nomad cancels StartTask when its task runner's
/// context ends, and tonic then drops this future; a start the daemon has already made must
/// still end in a task entry or be undone, never in an execution nobody will stop (the way
/// the daemon's own `start_execution` survives its caller).
pub async fn start_task(
    state: &Arc<PluginState>,
    req: pb::StartTaskRequest,
) -> Result<Response<pb::StartTaskResponse>, Status> {
    let caller_gone = CancellationToken::new();
    let _present = caller_gone.clone().drop_guard();
    let state = state.clone();
    tokio::spawn(async move { start_detached(&state, req, caller_gone).await })
        .await
        .map_err(|e| Status::internal(format!("StartTask failed: {e}")))?
}

/// Kills and forgets an execution the daemon started for a StartTask whose caller has gone:
/// Nomad never learns of it, so nothing else would stop it (and a retried StartTask would run
/// the snippet a second time).
async fn abandon_start(client: &DaemonClient, task_id: &str, execution_id: &str) {
    tracing::warn!(task = %task_id, execution = %execution_id, "StartTask was cancelled by Nomad after elide-daemon started the execution; killing it");
    let how = Stop {
        signal: "SIGKILL",
        grace: Duration::ZERO,
        what: "the execution of a cancelled StartTask",
    };
    // Failures are logged there; nobody waits for this one.
    let _ = stop_and_forget(client, task_id, execution_id, how).await;
}

/// The body of [`start_task`]; `caller_gone` is cancelled once Nomad has dropped the RPC.
async fn start_detached(
    state: &Arc<PluginState>,
    req: pb::StartTaskRequest,
    caller_gone: CancellationToken,
) -> Result<Response<pb::StartTaskResponse>, Status> {
    let cfg = req
        .task
        .ok_or_else(|| Status::invalid_argument("task: missing"))?;
    if cfg.id.is_empty() {
        return Err(Status::invalid_argument("task.id: empty"));
    }
    state.dangling.note_alloc_dir(&cfg.alloc_dir);
    let reservation = state.tasks.reserve(&cfg.id).map_err(|_| {
        Status::already_exists(format!("task with ID {:?} already started", cfg.id))
    })?;
    let snapshot = state.snapshot();
    let (Some(config), Some(session_id)) = (snapshot.config.clone(), snapshot.session_id.clone())
    else {
        return Err(recoverable(
            "the elide plugin has not been configured by the Nomad client yet".into(),
        ));
    };
    let spec = TaskSpec::decode(
        &cfg.msgpack_driver_config,
        &task_dir(&cfg),
        &config.session.enabled_languages,
    )
    .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let client = state.link.client(&snapshot).await.map_err(|e| {
        if e.is_transient() {
            recoverable(format!("cannot start task {}: {e}", cfg.id))
        } else {
            Status::failed_precondition(format!("cannot start task {}: {e}", cfg.id))
        }
    })?;
    note_inherited(state, &client).await;
    for (old_id, execution) in state.inherited.take_task(&cfg.alloc_id, &cfg.name) {
        let why = format!("Nomad starts its task again as {}", cfg.id);
        stop_leftover(&client, &old_id, &execution, &why).await;
    }
    // The same for the tasks of this very process: before each start of a task Nomad destroys
    // the handle of its last instance (DestroyTask), so an instance still held here is one whose
    // start reply Nomad lost (an agent that died after the start and reattached to this
    // process). A running one is stopped; an ended one is forgotten.
    for old in state
        .tasks
        .other_instances(&cfg.alloc_id, &cfg.name, &cfg.id)
    {
        if old.exit().is_none() {
            tracing::warn!(task = %old.id, execution = %old.execution_id, "stopping an instance of this task that Nomad no longer tracks: it starts the task again as {}", cfg.id);
            let how = Stop {
                signal: "SIGTERM",
                grace: LEFTOVER_GRACE,
                what: "the untracked instance",
            };
            if stop_and_forget(&client, &old.id, &old.execution_id, how)
                .await
                .is_err()
            {
                kill_in_background(state.clone(), old.id.clone(), old.execution_id.clone());
            }
            old.set_exit(
                lost_result(),
                format!("superseded: Nomad started this task again as {}", cfg.id),
            );
        } else if let Err(e) = client.remove_execution(&old.execution_id, true).await
            && e.code() != Some(tonic::Code::NotFound)
        {
            tracing::debug!(task = %old.id, error = %e, "daemon did not forget an ended instance Nomad no longer tracks");
        }
        old.cancel.cancel();
        state.tasks.remove(&old.id);
    }
    if caller_gone.is_cancelled() {
        // Nothing started yet, and nobody is left to tell.
        return Err(Status::cancelled(format!("StartTask {} cancelled", cfg.id)));
    }
    let request = execution_request(&cfg, &spec, &session_id, config.session.memory_limit_mb);
    let start_timeout = state.link.start_timeout();
    let mut result = client.start_execution(request.clone(), start_timeout).await;
    if let Err(e) = &result
        && e.code() == Some(tonic::Code::NotFound)
        && e.to_string().contains("session")
    {
        // The daemon lost our session (restarted with a fresh state dir): make it again.
        super::daemon_link::ensure_session(&client, &snapshot, &session_id)
            .await
            .map_err(|e| recoverable(format!("cannot start task {}: {e}", cfg.id)))?;
        result = client.start_execution(request, start_timeout).await;
    }
    let exec = result.map_err(|e| {
        if e.is_unreachable() {
            state.link.invalidate();
            recoverable(format!("cannot start task {}: elide-daemon: {e}", cfg.id))
        } else if e.code() == Some(tonic::Code::Unavailable) {
            // The node is out of something for now; Nomad retries the start by the job's
            // restart policy.
            recoverable(format!("cannot start task {}: elide-daemon: {e}", cfg.id))
        } else if e.code() == Some(tonic::Code::InvalidArgument) {
            Status::invalid_argument(format!("cannot start task {}: {e}", cfg.id))
        } else {
            daemon_status(state, &cfg.id, &e)
        }
    })?;
    if caller_gone.is_cancelled() {
        // The reservation is released on return, after the execution is gone.
        abandon_start(&client, &cfg.id, &exec.id).await;
        return Err(Status::cancelled(format!(
            "StartTask {} cancelled; execution {} stopped",
            cfg.id, exec.id
        )));
    }
    let started_at = exec
        .started_at
        .and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or_else(SystemTime::now);
    let ds = DriverState::new(
        config.daemon_socket.clone(),
        session_id.clone(),
        exec.id.clone(),
        started_at,
        exec.pid,
        exec.pid_start_ticks,
    );
    let entry = Arc::new(TaskEntry::new(
        &cfg,
        exec.id.clone(),
        session_id,
        exec.pid,
        started_at,
    ));
    reservation.commit(entry.clone());
    spawn_waiter(state.clone(), entry, spec.timeout);
    tracing::info!(task = %cfg.id, execution = %exec.id, pid = exec.pid, "task started");
    let handle = pb::TaskHandle {
        version: DRIVER_STATE_VERSION as i32,
        config: Some(cfg),
        state: pb::TaskState::Running as i32,
        driver_state: ds.encode(),
    };
    Ok(Response::new(pb::StartTaskResponse {
        result: pb::start_task_response::Result::Success as i32,
        driver_error_msg: String::new(),
        handle: Some(handle),
        network_override: None,
    }))
}

/// WaitTask: the exit once known; any number of callers; immediate for ended tasks.
pub async fn wait_task(
    state: &Arc<PluginState>,
    req: pb::WaitTaskRequest,
) -> Result<Response<pb::WaitTaskResponse>, Status> {
    let entry = state
        .tasks
        .get(&req.task_id)
        .ok_or_else(|| not_found(&req.task_id))?;
    let exit = entry.wait().await;
    Ok(Response::new(pb::WaitTaskResponse {
        result: Some(exit.result),
        err: exit.err,
    }))
}

/// StopTask: signal (SIGINT when empty), wait up to `timeout`, then SIGKILL the group.
pub async fn stop_task(
    state: &Arc<PluginState>,
    req: pb::StopTaskRequest,
) -> Result<Response<pb::StopTaskResponse>, Status> {
    let Some(entry) = state.tasks.get(&req.task_id) else {
        // Unknown ids answer OK: the client would otherwise retry for minutes (§3.9).
        return Ok(Response::new(pb::StopTaskResponse {}));
    };
    if entry.exit().is_some() {
        return Ok(Response::new(pb::StopTaskResponse {}));
    }
    let mut signal = if req.signal.trim().is_empty() {
        DEFAULT_STOP_SIGNAL
    } else {
        req.signal.trim()
    };
    if let Err(e) = crate::sandbox::signal::parse_signal(signal) {
        // A kill_signal with a typo: refusing would leave the task running for good (Nomad
        // retries StopTask a few times, then gives up on it). Stopped as with no kill_signal
        // instead, and said so.
        tracing::warn!(task = %req.task_id, signal, error = %e, "unknown kill_signal; stopping the task with {DEFAULT_STOP_SIGNAL} instead");
        signal = DEFAULT_STOP_SIGNAL;
    }
    let grace = duration_from(req.timeout.as_ref());
    let client = client_for(state, &state.snapshot()).await?;
    let stopped = client
        .stop_execution(&entry.execution_id, signal, grace)
        .await;
    match stopped {
        Ok(resp) => {
            if let Some(r) = resp.result {
                let (result, err) = exit_of(&r, None);
                entry.set_exit(result, err);
            }
            Ok(Response::new(pb::StopTaskResponse {}))
        }
        Err(e) if e.code() == Some(tonic::Code::NotFound) => {
            Ok(Response::new(pb::StopTaskResponse {}))
        }
        Err(e) if e.code() == Some(tonic::Code::InvalidArgument) => Err(Status::invalid_argument(
            format!("StopTask {}: {e}", req.task_id),
        )),
        Err(e) => Err(daemon_status(state, &req.task_id, &e)),
    }
}

/// DestroyTask: forgets the task (killing it first with `force`); unknown ids are fine.
pub async fn destroy_task(
    state: &Arc<PluginState>,
    req: pb::DestroyTaskRequest,
) -> Result<Response<pb::DestroyTaskResponse>, Status> {
    let Some(entry) = state.tasks.get(&req.task_id) else {
        // Not ours: maybe a task whose recovery failed, which Nomad now cleans up. Only a
        // daemon that already runs can hold a leftover (one that is down ended its executions),
        // so none is started just to look.
        let snapshot = state.snapshot();
        if let (Ok(client), Some(_)) = (
            state.link.running_client(&snapshot).await,
            &snapshot.session_id,
        ) {
            note_inherited(state, &client).await;
            if let Some(execution) = state.inherited.take_id(&req.task_id) {
                let why = "Nomad destroys its task, which this plugin process did not recover";
                stop_leftover(&client, &req.task_id, &execution, why).await;
            }
        }
        return Ok(Response::new(pb::DestroyTaskResponse {}));
    };
    let running = entry.exit().is_none();
    if running && !req.force {
        return Err(Status::failed_precondition(format!(
            "cannot destroy running task {:?}; stop it first or set force",
            req.task_id
        )));
    }
    // An ended task leaves only the daemon's record of it to forget: not worth starting a
    // daemon that is down for (it drops ended records after `ended_retention` anyway). A
    // task still running must be stopped, so its destroy may start the daemon as other calls do.
    let snapshot = state.snapshot();
    let client = if running {
        state.link.client(&snapshot).await
    } else {
        state.link.running_client(&snapshot).await
    };
    // Nomad ignores DestroyTask's error and never calls again: a task the daemon cannot kill
    // now is forgotten here all the same and killed in the background once it can.
    let kill_later = |why: String| {
        tracing::warn!(task = %req.task_id, execution = %entry.execution_id, "cannot kill the destroyed task now ({why}); retrying in the background");
        kill_in_background(
            state.clone(),
            req.task_id.clone(),
            entry.execution_id.clone(),
        );
    };
    match client {
        Ok(client) => {
            let stopped = if running {
                match client
                    .stop_execution(&entry.execution_id, "SIGKILL", Duration::ZERO)
                    .await
                {
                    Ok(resp) => {
                        if let Some(r) = resp.result {
                            let (result, err) = exit_of(&r, None);
                            entry.set_exit(result, err);
                        }
                        true
                    }
                    Err(e) if e.code() == Some(tonic::Code::NotFound) => true,
                    Err(e) => {
                        if e.is_unreachable() {
                            state.link.invalidate();
                        }
                        kill_later(e.to_string());
                        false
                    }
                }
            } else {
                true
            };
            if stopped
                && let Err(e) = client.remove_execution(&entry.execution_id, true).await
                && e.code() != Some(tonic::Code::NotFound)
            {
                tracing::warn!(task = %req.task_id, error = %e, "daemon did not forget the execution");
            }
        }
        Err(e) if running => kill_later(format!("elide-daemon unreachable: {e}")),
        Err(_) => {}
    }
    // WaitTask callers still blocked get an answer: the waiter stops now.
    entry.set_exit(lost_result(), "task destroyed".into());
    entry.cancel.cancel();
    state.tasks.remove(&req.task_id);
    Ok(Response::new(pb::DestroyTaskResponse {}))
}

/// Go's zero time (0001-01-01T00:00:00Z), Nomad's "not set".
pub fn go_zero_time() -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: -62_135_596_800,
        nanos: 0,
    }
}

/// InspectTask: every field the Go client dereferences is set (Appendix A).
pub async fn inspect_task(
    state: &Arc<PluginState>,
    req: pb::InspectTaskRequest,
) -> Result<Response<pb::InspectTaskResponse>, Status> {
    let entry = state
        .tasks
        .get(&req.task_id)
        .ok_or_else(|| not_found(&req.task_id))?;
    let exit = entry.exit();
    let attributes = [
        ("pid".to_string(), entry.pid.to_string()),
        ("execution_id".to_string(), entry.execution_id.clone()),
        ("session_id".to_string(), entry.session_id.clone()),
    ]
    .into_iter()
    .collect();
    Ok(Response::new(pb::InspectTaskResponse {
        task: Some(pb::TaskStatus {
            id: entry.id.clone(),
            name: entry.name.clone(),
            state: if exit.is_some() {
                pb::TaskState::Exited as i32
            } else {
                pb::TaskState::Running as i32
            },
            started_at: Some(entry.started_at.into()),
            completed_at: Some(
                exit.as_ref()
                    .map_or_else(go_zero_time, |e| e.completed_at.into()),
            ),
            result: Some(exit.map(|e| e.result).unwrap_or_default()),
        }),
        driver: Some(pb::TaskDriverStatus { attributes }),
        network_override: None,
    }))
}

/// SignalTask.
pub async fn signal_task(
    state: &Arc<PluginState>,
    req: pb::SignalTaskRequest,
) -> Result<Response<pb::SignalTaskResponse>, Status> {
    let entry = state
        .tasks
        .get(&req.task_id)
        .ok_or_else(|| not_found(&req.task_id))?;
    if req.signal.trim().is_empty() {
        return Err(Status::invalid_argument(
            "signal: empty; give a name such as \"SIGHUP\"",
        ));
    }
    let client = client_for(state, &state.snapshot()).await?;
    client
        .signal_execution(&entry.execution_id, req.signal.trim())
        .await
        .map_err(|e| daemon_status(state, &req.task_id, &e))?;
    Ok(Response::new(pb::SignalTaskResponse {}))
}

/// TaskStats.
pub async fn task_stats(
    state: &Arc<PluginState>,
    req: pb::TaskStatsRequest,
) -> Result<Response<BoxStream<pb::TaskStatsResponse>>, Status> {
    super::task_io::task_stats(state, req).await
}

/// TaskEvents.
pub async fn task_events(
    state: &Arc<PluginState>,
    req: pb::TaskEventsRequest,
) -> Result<Response<BoxStream<pb::DriverTaskEvent>>, Status> {
    super::task_io::task_events(state, req).await
}

/// ExecTask.
pub async fn exec_task(
    state: &Arc<PluginState>,
    req: pb::ExecTaskRequest,
) -> Result<Response<pb::ExecTaskResponse>, Status> {
    super::task_io::exec_task(state, req).await
}

/// ExecTaskStreaming.
pub async fn exec_task_streaming(
    state: &Arc<PluginState>,
    req: Streaming<pb::ExecTaskStreamingRequest>,
) -> Result<Response<BoxStream<pb::ExecTaskStreamingResponse>>, Status> {
    super::task_io::exec_task_streaming(state, req).await
}

/// CreateNetwork: not advertised (`must_create_network = false`).
pub async fn create_network(
    _state: &Arc<PluginState>,
    _req: pb::CreateNetworkRequest,
) -> Result<Response<pb::CreateNetworkResponse>, Status> {
    Err(Status::unimplemented(
        "CreateNetwork: the elide driver does not create networks (must_create_network = false)",
    ))
}

/// DestroyNetwork: not advertised.
pub async fn destroy_network(
    _state: &Arc<PluginState>,
    _req: pb::DestroyNetworkRequest,
) -> Result<Response<pb::DestroyNetworkResponse>, Status> {
    Err(Status::unimplemented(
        "DestroyNetwork: the elide driver does not create networks (must_create_network = false)",
    ))
}

/// Default deadline for daemon calls made on behalf of one RPC.
pub const CALL_TIMEOUT: Duration = DEFAULT_CALL_TIMEOUT;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nomad::config::Language;

    fn spec(memory_limit_mb: Option<u64>) -> TaskSpec {
        TaskSpec {
            source: Source::Code("print(1)".into()),
            language: Language::Python,
            args: vec!["a".into()],
            env: [("A".to_string(), "job".to_string())].into_iter().collect(),
            timeout: Some(Duration::from_secs(3)),
            memory_limit_mb,
        }
    }

    fn task(memory_mb: i64, memory_max_mb: i64) -> pb::TaskConfig {
        pb::TaskConfig {
            id: "a/t/x".into(),
            name: "t".into(),
            alloc_dir: "/nonexistent/alloc/a".into(),
            env: [
                ("A".to_string(), "nomad".to_string()),
                ("NOMAD_TASK_NAME".to_string(), "t".to_string()),
            ]
            .into_iter()
            .collect(),
            resources: Some(pb::Resources {
                allocated_resources: Some(pb::AllocatedTaskResources {
                    cpu: Some(pb::AllocatedCpuResources { cpu_shares: 250 }),
                    memory: Some(pb::AllocatedMemoryResources {
                        memory_mb,
                        memory_max_mb,
                    }),
                    networks: vec![],
                }),
                linux_resources: None,
                ports: vec![],
            }),
            ..Default::default()
        }
    }

    const MIB: i64 = 1024 * 1024;

    #[test]
    fn memory_is_the_max_of_memory_and_memory_max_tightened_by_opts_and_session() {
        assert_eq!(memory_limit_bytes(&task(128, 0), &spec(None), 0), 128 * MIB);
        assert_eq!(
            memory_limit_bytes(&task(128, 512), &spec(None), 0),
            512 * MIB
        );
        assert_eq!(
            memory_limit_bytes(&task(128, 512), &spec(Some(64)), 0),
            64 * MIB
        );
        assert_eq!(
            memory_limit_bytes(&task(128, 512), &spec(Some(1024)), 0),
            512 * MIB
        );
        assert_eq!(memory_limit_bytes(&task(128, 0), &spec(None), 32), 32 * MIB);
        assert_eq!(memory_limit_bytes(&task(0, 0), &spec(None), 0), 0);
        assert_eq!(cpu_shares(&task(1, 0)), 250);
    }

    #[test]
    fn request_merges_env_and_maps_sinks_and_network() {
        let mut t = task(64, 0);
        t.stdout_path = String::new();
        t.stderr_path = "/x/alloc/logs/.t.stderr.fifo".into();
        t.user = "nomad-4242".into();
        t.network_isolation_spec = Some(pb::NetworkIsolationSpec {
            mode: pb::network_isolation_spec::NetworkIsolationMode::Group as i32,
            path: "/var/run/netns/a".into(),
            ..Default::default()
        });
        let r = execution_request(&t, &spec(None), "s1", 0);
        let env: std::collections::HashMap<String, String> = r
            .env
            .iter()
            .map(|e| {
                (
                    String::from_utf8_lossy(&e.key).into_owned(),
                    String::from_utf8_lossy(&e.value).into_owned(),
                )
            })
            .collect();
        assert_eq!(env["A"], "job", "job env wins over Nomad's");
        assert_eq!(env["NOMAD_TASK_NAME"], "t");
        let path = |s: &Option<api::OutputSink>| match s.as_ref().and_then(|s| s.kind.clone()) {
            Some(api::output_sink::Kind::Path(p)) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(path(&r.stdout), "/dev/null");
        assert_eq!(path(&r.stderr), "/x/alloc/logs/.t.stderr.fifo");
        assert_eq!(r.network_namespace, "/var/run/netns/a");
        assert_eq!(r.user, "nomad-4242");
        assert_eq!(r.client_ref, "a/t/x");
        assert_eq!(r.session_id, "s1");
        assert_eq!(r.limits.unwrap().timeout.unwrap().seconds, 3);
        t.network_isolation_spec = None;
        assert_eq!(
            execution_request(&t, &spec(None), "s1", 0).network_namespace,
            ""
        );
    }

    #[test]
    fn recoverable_status_carries_nomads_detail() {
        let s = recoverable("daemon down".into());
        let st = crate::proto::google::rpc::Status::decode(s.details()).unwrap();
        assert_eq!(st.details[0].type_url, RECOVERABLE_TYPE_URL);
        let r = crate::proto::hashicorp::nomad::plugins::shared::structs::RecoverableError::decode(
            st.details[0].value.as_slice(),
        )
        .unwrap();
        assert!(r.recoverable);
    }
}
