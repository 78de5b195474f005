//! How an execution's process comes to exist. A [`Launcher`] receives a validated
//! [`ExecutionPlan`] (plain data) and returns a running process; the execution supervisor only
//! sees the pid and an exit future, so a warm-pool launcher (a forked Python zygote child, a
//! node worker) can later sit behind the same trait.
//!
//! [`ColdLauncher`] forks a fresh interpreter. Every fork happens on one dedicated, long-lived
//! spawner thread: `PR_SET_PDEATHSIG` fires when the *forking thread* exits, so forking from
//! tokio's blocking pool (whose threads retire) would kill children at random, while a thread
//! that lives as long as the daemon makes a `kill -9` of the daemon take its children along.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use futures::future::BoxFuture;

use super::blocking::offload;
use super::cgroup_stock::{CgroupStock, unnamed_cgroup};
use super::plan::{ExecutionPlan, SinkTarget};
use crate::sandbox::cgroup::{CgroupLimits, CgroupManager, CgroupMode, ExecutionCgroup};
use crate::sandbox::sink::{SinkError, SinkRoots, open_sink};
use crate::sandbox::{Intrinsics, IsolationSpec, Role};

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessExit {
    /// exit(code).
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

/// A started execution process.
pub struct Launched {
    /// Process id (also its process group id).
    pub pid: u32,
    /// Its start time in clock ticks since boot, read while the pid could only be its own (not
    /// yet reaped); 0 when it had ended by then. With the pid it tells the process from one that
    /// took the pid later.
    pub start_ticks: u64,
    /// Its cgroup, when the machine has one.
    pub cgroup: Option<ExecutionCgroup>,
    /// The daemon's ends of its capture pipes.
    pub captures: Captures,
    /// Resolves when the process has ended (and was reaped), or as soon as it said how it
    /// ends (a pooled child's exit note; see `gone`).
    pub exit: BoxFuture<'static, std::io::Result<ProcessExit>>,
    /// Where `exit` may resolve before the process is gone: resolves (or is dropped) once it
    /// is, so its cgroup is removed without waiting on a still-exiting member.
    pub gone: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Whether a warm worker ran it.
    pub pooled: bool,
}

/// Why a launch failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// An output sink was refused or could not be opened (the client's fault).
    #[error("{field}: {message}")]
    Sink {
        /// "stdout.path" or "stderr.path".
        field: &'static str,
        /// Why.
        message: String,
    },
    /// The isolation could not be prepared.
    #[error("preparing isolation: {0}")]
    Sandbox(String),
    /// The start could not be prepared for want of descriptors, processes or memory (found in
    /// an error's causes by `isolation_failed`, or a pidfd that never arrived).
    #[error("preparing isolation: {0}")]
    Exhausted(String),
    /// A descriptor the start needs could not be made.
    #[error("preparing isolation: {what}: {source}")]
    Descriptor {
        /// What was being made ("pipe").
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// fork/exec failed.
    #[error("starting {program}: {source}")]
    Spawn {
        /// The interpreter.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The spawner thread is gone (daemon shutting down).
    #[error("the daemon's spawner thread is not running")]
    SpawnerGone,
}

/// A failure to prepare an execution's isolation: [`LaunchError::Exhausted`] when its cause is
/// a node out of descriptors, processes or memory, [`LaunchError::Sandbox`] otherwise.
pub(crate) fn isolation_failed(e: &(dyn std::error::Error + 'static)) -> LaunchError {
    if caused_by_exhaustion(e) {
        LaunchError::Exhausted(e.to_string())
    } else {
        LaunchError::Sandbox(e.to_string())
    }
}

/// Whether `e`, or an error it wraps, is an errno of a node out of descriptors, processes or
/// memory: the one test every start failure goes through.
fn caused_by_exhaustion(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        let errno = c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .or_else(|| c.downcast_ref::<nix::errno::Errno>().map(|e| *e as i32));
        if errno.is_some_and(is_exhaustion_errno) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Errors a node returns while it is out of descriptors (EMFILE, ENFILE), processes (EAGAIN
/// from fork) or memory (ENOMEM).
fn is_exhaustion_errno(errno: i32) -> bool {
    matches!(
        errno,
        libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM
    )
}

impl LaunchError {
    /// Whether the start failed for want of something the node runs out of for a while
    /// (descriptors, processes, memory), not for anything in the request: the same start may
    /// work later, so Nomad should retry it rather than fail the task.
    pub fn is_exhaustion(&self) -> bool {
        match self {
            LaunchError::Exhausted(_) => true,
            LaunchError::Descriptor { source, .. } | LaunchError::Spawn { source, .. } => {
                caused_by_exhaustion(source)
            }
            _ => false,
        }
    }
}

/// Creates execution processes from plans.
pub trait Launcher: Send + Sync + 'static {
    /// Starts the process of `plan`; returns once it runs.
    fn launch(&self, plan: ExecutionPlan) -> BoxFuture<'_, Result<Launched, LaunchError>>;
}

type Job = Box<dyn FnOnce() + Send>;

/// The dedicated thread every child is forked from.
#[derive(Clone)]
pub struct Spawner {
    tx: mpsc::Sender<Job>,
}

impl Spawner {
    /// Starts the spawner thread; it runs jobs inside `runtime` so tokio can reap children.
    pub fn start(runtime: tokio::runtime::Handle) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("elide-spawner".into())
            .spawn(move || {
                let _guard = runtime.enter();
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(Self { tx })
    }

    /// Runs `f` on the spawner thread and returns its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, LaunchError> {
        let (otx, orx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let _ = otx.send(f());
            }))
            .map_err(|_| LaunchError::SpawnerGone)?;
        orx.await.map_err(|_| LaunchError::SpawnerGone)
    }
}

/// Process start time (field 22 of `/proc/<pid>/stat`), 0 when unreadable.
pub fn start_ticks(pid: u32) -> u64 {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|s| s.starttime)
        .unwrap_or(0)
}

/// Launches a fresh interpreter per execution.
pub struct ColdLauncher {
    spawner: Spawner,
    preparer: std::sync::Arc<Preparer>,
}

/// Opens sinks and creates cgroups (blocking work, run on the blocking pool).
pub(crate) struct Preparer {
    cgroups: CgroupManager,
    /// Execution cgroups made ahead of time (mkdir off the start's critical path).
    stock: CgroupStock,
    output_roots: SinkRoots,
    sink_timeout: Duration,
}

/// Execution cgroups kept ready: enough for a few concurrent starts.
const CGROUP_STOCK: usize = 4;

/// Read ends of the capture pipes (non-blocking), for sinks that are `Capture`.
#[derive(Default)]
pub struct Captures {
    /// stdout's.
    pub stdout: Option<OwnedFd>,
    /// stderr's.
    pub stderr: Option<OwnedFd>,
}

/// An execution's opened output: what its fds 1 and 2 become, and the daemon's capture ends.
pub(crate) struct Sinks {
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
    pub(crate) captures: Captures,
}

impl Sinks {
    /// Hands the sinks to the isolation of `plan`'s process (joining `cgroup`); the daemon keeps
    /// the capture ends. Every launcher, cold or warm, isolates from this one spec, so a pooled
    /// execution is isolated exactly like a cold one.
    pub(crate) fn into_spec(
        self,
        plan: &ExecutionPlan,
        cgroup: &Option<ExecutionCgroup>,
    ) -> (IsolationSpec, Captures) {
        let cgroup_procs = cgroup
            .as_ref()
            .map(|c| c.self_join_files())
            .unwrap_or_default();
        let spec = plan_isolation(plan, cgroup_procs, self.stdout, self.stderr);
        (spec, self.captures)
    }
}

/// The isolation `plan` asks for, joining the cgroup through `cgroup_procs`, with `stdout` and
/// `stderr` as fds 1 and 2: the executions' own ([`Sinks::into_spec`]) and, with its network
/// adjusted, a command run inside a running execution (`exec`).
pub(crate) fn plan_isolation(
    plan: &ExecutionPlan,
    cgroup_procs: Vec<PathBuf>,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> IsolationSpec {
    IsolationSpec {
        user: plan.user.clone(),
        working_dir: plan.working_dir.clone(),
        intrinsics: Intrinsics {
            env: plan.intrinsics.env,
            io: plan.intrinsics.io,
            net: plan.intrinsics.net,
        },
        role: Role::Execution,
        read_paths: plan.read_paths.clone(),
        write_paths: plan.write_paths.clone(),
        network_namespace: plan.network_namespace.clone(),
        cgroup_procs,
        cpus: plan.limits.cpus.clone(),
        merge_pages: plan.merge_pages,
        stdout,
        stderr,
    }
}

/// Everything an execution needs before its process starts.
pub(crate) struct Prepared {
    pub(crate) sinks: Sinks,
    pub(crate) cgroup: Option<ExecutionCgroup>,
}

fn capture_pipe() -> Result<(OwnedFd, OwnedFd), LaunchError> {
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| LaunchError::Descriptor {
            what: "pipe",
            source: e.into(),
        })?;
    // Only the daemon's end is non-blocking; the child's stays an ordinary blocking pipe.
    let flags = nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| LaunchError::Sandbox(format!("fcntl: {e}")))?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| LaunchError::Sandbox(format!("fcntl: {e}")))?;
    Ok((r, w))
}

impl ColdLauncher {
    /// A launcher forking on `spawner`, creating cgroups with `cgroups`, opening file sinks
    /// under `output_roots`, waiting at most `sink_timeout` for a FIFO reader.
    pub fn new(
        spawner: Spawner,
        cgroups: CgroupManager,
        output_roots: Vec<PathBuf>,
        sink_timeout: Duration,
    ) -> Self {
        Self {
            spawner,
            preparer: std::sync::Arc::new(Preparer {
                stock: CgroupStock::new(cgroups.clone(), CGROUP_STOCK),
                cgroups,
                output_roots: SinkRoots::new(output_roots),
                sink_timeout,
            }),
        }
    }
}

impl ColdLauncher {
    /// The sink/cgroup preparation shared with the warm-pool launcher.
    pub(crate) fn preparer(&self) -> std::sync::Arc<Preparer> {
        self.preparer.clone()
    }
}

/// Why a sink could not be opened within a deadline.
enum SinkOpen {
    /// A FIFO has no reader yet (only with a zero deadline: the caller then waits elsewhere).
    NoReaderYet,
    /// Refused or failed for good.
    Failed(LaunchError),
}

impl Preparer {
    fn open_one_within(
        &self,
        field: &'static str,
        target: &SinkTarget,
        deadline: Duration,
    ) -> Result<(OwnedFd, Option<OwnedFd>), SinkOpen> {
        match target {
            SinkTarget::Capture => {
                let (r, w) = capture_pipe().map_err(SinkOpen::Failed)?;
                Ok((w, Some(r)))
            }
            SinkTarget::Path(p) => match open_sink(p, &self.output_roots, deadline) {
                Ok(fd) => Ok((fd, None)),
                Err(SinkError::NoReader { .. }) if deadline.is_zero() => Err(SinkOpen::NoReaderYet),
                // A node out of descriptors or memory is not the sink's fault.
                Err(e) if caused_by_exhaustion(&e) => Err(SinkOpen::Failed(
                    LaunchError::Exhausted(format!("{field}: {e}")),
                )),
                Err(e) => Err(SinkOpen::Failed(LaunchError::Sink {
                    field,
                    message: e.to_string(),
                })),
            },
        }
    }

    /// Opens one sink: at once when it can (a FIFO whose reader is attached, as Nomad's logmon
    /// is before StartTask; a file; a capture pipe), otherwise waiting up to the sink timeout for
    /// the reader off the async workers.
    async fn open_one(
        self: &Arc<Self>,
        field: &'static str,
        target: &SinkTarget,
    ) -> Result<(OwnedFd, Option<OwnedFd>), LaunchError> {
        match self.open_one_within(field, target, Duration::ZERO) {
            Ok(opened) => Ok(opened),
            Err(SinkOpen::Failed(e)) => Err(e),
            Err(SinkOpen::NoReaderYet) => {
                let (me, target) = (self.clone(), target.clone());
                let deadline = self.sink_timeout;
                offload(move || me.open_one_within(field, &target, deadline))
                    .await
                    .map_err(|e| LaunchError::Sandbox(format!("sink task failed: {e}")))?
                    .map_err(|e| match e {
                        SinkOpen::Failed(e) => e,
                        SinkOpen::NoReaderYet => LaunchError::Sink {
                            field,
                            message: "no reader attached".into(),
                        },
                    })
            }
        }
    }

    /// Opens the plan's output sinks and gives the execution its cgroup (see [`blocking`] for
    /// what runs inline). With `opened`, the sinks a pooled attempt already opened are used.
    /// A sink opened before a wait for the other stays open throughout: closing a FIFO would
    /// show its reader an EOF.
    ///
    /// [`blocking`]: super::blocking
    pub(crate) async fn prepare(
        self: &Arc<Self>,
        plan: &ExecutionPlan,
        opened: Option<Prepared>,
    ) -> Result<Prepared, LaunchError> {
        let mut prepared = match opened {
            Some(p) => p,
            None => Prepared {
                sinks: self.open_sinks(plan).await?,
                cgroup: None,
            },
        };
        if self.cgroups.mode() != CgroupMode::None && prepared.cgroup.is_none() {
            let limits = cgroup_limits(plan);
            let cgroup = match self.stock.take(&limits) {
                Some(cg) => cg,
                None => {
                    // A mkdir in every hierarchy: bounded, but not brief.
                    let (me, id) = (self.clone(), plan.execution_id.clone());
                    offload(move || me.cgroups.create(&id, &limits))
                        .await
                        .map_err(|e| LaunchError::Sandbox(format!("cgroup task failed: {e}")))?
                        .map_err(|e| isolation_failed(&e))?
                }
            };
            prepared.cgroup = Some(cgroup);
        }
        Ok(prepared)
    }

    /// Opens the plan's output sinks.
    pub(crate) async fn open_sinks(
        self: &Arc<Self>,
        plan: &ExecutionPlan,
    ) -> Result<Sinks, LaunchError> {
        let (stdout, stdout_capture) = self.open_one("stdout.path", &plan.stdout).await?;
        let (stderr, stderr_capture) = self.open_one("stderr.path", &plan.stderr).await?;
        Ok(Sinks {
            stdout,
            stderr,
            captures: Captures {
                stdout: stdout_capture,
                stderr: stderr_capture,
            },
        })
    }

    /// An empty cgroup (no limits yet) for a warm worker to start in, from the stock when it
    /// has one; None on a machine without cgroups.
    pub(crate) fn worker_cgroup(&self) -> Result<Option<ExecutionCgroup>, LaunchError> {
        if self.cgroups.mode() == CgroupMode::None {
            return Ok(None);
        }
        match self.stock.take(&CgroupLimits::default()) {
            Some(cg) => Ok(Some(cg)),
            None => unnamed_cgroup(&self.cgroups)
                .map(Some)
                .map_err(|e| isolation_failed(&e)),
        }
    }
}

/// The cgroup limits of `plan`.
pub(crate) fn cgroup_limits(plan: &ExecutionPlan) -> CgroupLimits {
    CgroupLimits {
        memory_bytes: plan.limits.memory_bytes,
        cpu_shares: plan.limits.cpu_shares,
        pids: plan.limits.pids,
    }
}

pub(crate) fn convert(status: std::process::ExitStatus) -> ProcessExit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ProcessExit::Exited(c),
        (None, Some(s)) => ProcessExit::Signaled(s),
        (None, None) => ProcessExit::Exited(-1),
    }
}

impl Launcher for ColdLauncher {
    fn launch(&self, plan: ExecutionPlan) -> BoxFuture<'_, Result<Launched, LaunchError>> {
        Box::pin(self.launch_from(plan, None))
    }
}

impl ColdLauncher {
    /// Launches `plan` cold; with `opened`, on the sinks a pooled attempt already opened (a
    /// FIFO closed and reopened would end Nomad's logmon reader at the EOF in between).
    pub(crate) async fn launch_from(
        &self,
        plan: ExecutionPlan,
        opened: Option<Prepared>,
    ) -> Result<Launched, LaunchError> {
        let Prepared { sinks, cgroup } = self.preparer.prepare(&plan, opened).await?;
        let (spec, captures) = sinks.into_spec(&plan, &cgroup);
        let mut cmd = std::process::Command::new(&plan.argv[0]);
        cmd.args(&plan.argv[1..]);
        cmd.env_clear();
        cmd.envs(plan.env.iter().map(|(k, v)| (k, v)));
        let program = plan.argv[0].to_string_lossy().into_owned();
        // Building the isolation (Landlock ruleset, namespace and cgroup fds) and forking
        // both happen on the spawner thread, off the async workers.
        let spawned = self
            .spawner
            .run(move || {
                spec.apply(&mut cmd).map_err(|e| isolation_failed(&e))?;
                let mut cmd = tokio::process::Command::from(cmd);
                cmd.kill_on_drop(false);
                cmd.spawn()
                    .map_err(|source| LaunchError::Spawn { program, source })
            })
            .await;
        let mut child = match spawned {
            Ok(Ok(c)) => c,
            Ok(Err(e)) | Err(e) => {
                // A child that joined the cgroup before failing may still be exiting: removal
                // can wait, so not on an async worker (see `blocking`).
                if let Some(cg) = cgroup {
                    let _ = offload(move || cg.remove()).await;
                }
                return Err(e);
            }
        };
        let pid = child.id().unwrap_or(0);
        // Nothing reaps the child before `exit` is polled.
        let start_ticks = start_ticks(pid);
        let exit = Box::pin(async move { child.wait().await.map(convert) });
        Ok(Launched {
            pid,
            start_ticks,
            cgroup,
            captures,
            exit,
            gone: None,
            pooled: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::SandboxError;

    fn open_failed(errno: i32) -> SandboxError {
        SandboxError::Open {
            what: "cgroup membership file",
            path: "/sys/fs/cgroup/x/cgroup.procs".into(),
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// The cause is found however deep the error wraps it, and only the node's exhaustion
    /// makes a start retryable: a missing file is the request's or the host's problem.
    #[test]
    fn only_a_node_out_of_resources_makes_a_start_retryable() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::EAGAIN, libc::ENOMEM] {
            let e = isolation_failed(&open_failed(errno));
            assert!(matches!(e, LaunchError::Exhausted(_)), "{errno}: {e:?}");
            assert!(e.is_exhaustion());
            assert!(e.to_string().contains("cgroup.procs"), "{e}");
        }
        let e = isolation_failed(&open_failed(libc::ENOENT));
        assert!(
            matches!(e, LaunchError::Sandbox(_)) && !e.is_exhaustion(),
            "{e:?}"
        );
        let spawn = |errno| LaunchError::Spawn {
            program: "python3".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        assert!(spawn(libc::EAGAIN).is_exhaustion());
        assert!(!spawn(libc::EACCES).is_exhaustion());
        let other = LaunchError::Spawn {
            program: "python3".into(),
            source: std::io::Error::other("isolation step failed: too many open files"),
        };
        assert!(!other.is_exhaustion(), "a message is not a cause");
    }
}
