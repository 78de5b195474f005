//! Pre-started node workers (node cannot fork): `context_pool_size` per session, each waiting
//! for one job and used exactly once, replaced in the background.
//!
//! A worker is spawned through the normal sandboxed path with the session's baseline: the
//! daemon's user (root, so it can still switch), its own session and process group, signals
//! reset, PDEATHSIG, no inherited fds, and, when the session lacks `net`, its own network
//! namespace with loopback only (each worker gets a fresh one). It boots node, then blocks
//! reading its job from fd 0 (`worker.js`).
//!
//! Handing over an execution:
//! - cgroup: the daemon writes the worker's pid into the execution's `cgroup.procs` files
//!   before sending the job, so everything the snippet does is limited and accounted (memory
//!   charged before the move stays with the daemon's cgroup on v1).
//! - cwd, environment, argv, user: the job carries them; the worker applies `process.chdir`,
//!   replaces `process.env` and `process.argv`, and calls `setgroups/setgid/setuid` before
//!   running the script with `Module.runMain` (so `require.main === module` holds).
//! - exit: the job travels over a socket on the worker's fd 0, and the worker answers on it
//!   with its exit code once the snippet is done and its standard streams are closed, ahead of
//!   node's own teardown (several ms); the process is reaped in the background. A worker that
//!   ends without a report (fatal error, signal) is judged by its wait status.
//! - output: node cannot receive fds, so the worker's fds 1/2 are pipes created at spawn; the
//!   daemon `splice(2)`s each into the execution's sink (FIFO, file, /dev/null or capture pipe)
//!   until EOF (`pipe_copy`: on the async workers, a thread for a regular file). Nothing is
//!   lost: the copy ends only at EOF (every writer gone), and the execution's exit is reported
//!   once both copies drained (bounded wait, in case a descendant keeps the pipe open).
//!
//! Plans a warm worker cannot honour fall back to a cold start: without `io` (Landlock must be
//! applied before node starts, with per-execution paths), joining a given network namespace,
//! `NODE_*` variables (they change start-up), non-UTF-8 values, the elide backend.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{NotPooled, final_env, pipe_copy, warmable};
use crate::daemon::blocking::offload;
use crate::daemon::launcher::{
    LaunchError, Launched, Prepared, Preparer, ProcessExit, Sinks, Spawner, cgroup_limits, convert,
};
use crate::daemon::plan::{ExecutionPlan, IntrinsicSet};
use crate::sandbox::cgroup::ExecutionCgroup;
use crate::sandbox::{Intrinsics, IsolationSpec, Role};

/// The worker's source (run with `node -e`).
pub const WORKER_SOURCE: &str = include_str!("worker.js");

/// How long the exit report waits for output still in flight after the process ended.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// How long a taken worker's replacement waits while the pool has idle workers to spare (see
/// [`NodePool::run`]): a short snippet is done well before it.
const REFILL_LATE: Duration = Duration::from_millis(50);

/// Jobs up to this size fit an idle Unix socket's send buffer (≈ 200 KiB by default), so writing
/// one never waits for the worker.
const INLINE_JOB_BYTES: usize = 64 * 1024;

struct Worker {
    child: tokio::process::Child,
    pid: u32,
    /// Read at its spawn (nothing reaps a worker before its job is sent).
    start_ticks: u64,
    /// The daemon's end of the worker's fd 0: the job goes out, the exit code comes back.
    job: std::os::unix::net::UnixStream,
    stdout: OwnedFd,
    stderr: OwnedFd,
    /// The cgroup it started in, which becomes its execution's cgroup.
    cgroup: Option<ExecutionCgroup>,
}

impl Worker {
    fn try_alive(&mut self) -> std::io::Result<bool> {
        Ok(self.child.try_wait()?.is_none())
    }

    /// Kills a worker that will not run anything and removes its cgroup, in the background.
    fn discard(self) {
        let Worker {
            mut child, cgroup, ..
        } = self;
        let _ = child.start_kill();
        tokio::spawn(async move {
            let _ = child.wait().await;
            if let Some(cg) = cgroup {
                let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
            }
        });
    }
}

/// The idle workers of one session.
pub struct NodePool {
    node: PathBuf,
    workdir: PathBuf,
    size: u32,
    intrinsics: IntrinsicSet,
    /// Workers offer their memory for same-page merging (their session asked).
    merge_pages: bool,
    preparer: Arc<Preparer>,
    idle: Mutex<VecDeque<Worker>>,
    wake: Notify,
}

/// Why a javascript or typescript start falls back while no worker waits.
pub(super) const NO_IDLE_WORKER: &str = "no idle node worker (pool empty; refilling)";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), LaunchError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| LaunchError::Descriptor {
        what: "pipe",
        source: e.into(),
    })
}

impl NodePool {
    /// A pool of `size` workers of `node`, idle in `workdir`, each in a cgroup of its own made
    /// by `preparer`.
    pub(crate) fn new(
        node: PathBuf,
        workdir: PathBuf,
        size: u32,
        intrinsics: IntrinsicSet,
        merge_pages: bool,
        preparer: Arc<Preparer>,
    ) -> Self {
        Self {
            node,
            workdir,
            size,
            intrinsics,
            merge_pages,
            preparer,
            idle: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
        }
    }

    /// Pids of the idle workers.
    pub fn idle_pids(&self) -> Vec<u32> {
        lock(&self.idle).iter().map(|w| w.pid).collect()
    }

    /// How many workers wait for a job.
    pub fn idle_count(&self) -> u32 {
        lock(&self.idle).len() as u32
    }

    async fn spawn_worker(&self, spawner: &Spawner) -> Result<Worker, LaunchError> {
        // The worker starts inside the cgroup its execution will use: moving a running,
        // multi-threaded node in later takes the kernel's global thread-group lock, whose write
        // side waits out an RCU grace period (~7 ms) whenever cgroups were idle. A forked child
        // joining by itself before exec does not. The execution's limits are written at
        // hand-over; node's start-up memory is charged to it, as for a cold start.
        let cgroup = {
            let preparer = self.preparer.clone();
            tokio::task::spawn_blocking(move || preparer.worker_cgroup())
                .await
                .map_err(|e| LaunchError::Sandbox(format!("worker cgroup task failed: {e}")))??
        };
        match self.spawn_in(spawner, cgroup.as_ref()).await {
            Ok(worker) => Ok(Worker { cgroup, ..worker }),
            Err(e) => {
                if let Some(cg) = cgroup {
                    let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
                }
                Err(e)
            }
        }
    }

    /// Starts a worker that joins `cgroup` before exec (the returned one does not own it).
    async fn spawn_in(
        &self,
        spawner: &Spawner,
        cgroup: Option<&ExecutionCgroup>,
    ) -> Result<Worker, LaunchError> {
        let (job_ours, job_theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|source| LaunchError::Descriptor {
                what: "socketpair",
                source,
            })?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let mut cmd = std::process::Command::new(&self.node);
        cmd.arg("-e").arg(WORKER_SOURCE);
        cmd.env_clear();
        cmd.env("PATH", crate::sandbox::spawn::MINIMAL_PATH);
        cmd.env("LANG", "C.UTF-8");
        cmd.env("HOME", &self.workdir);
        let spec = IsolationSpec {
            user: None,
            working_dir: self.workdir.clone(),
            intrinsics: Intrinsics {
                env: true,
                io: true,
                net: self.intrinsics.net,
            },
            // The worker becomes the execution: its domain is the execution's.
            role: Role::Execution,
            read_paths: Vec::new(),
            write_paths: Vec::new(),
            network_namespace: None,
            cgroup_procs: cgroup.map(|c| c.self_join_files()).unwrap_or_default(),
            // Pinned at the hand-over, once its execution's cores are known.
            cpus: None,
            merge_pages: self.merge_pages,
            stdout: out_w,
            stderr: err_w,
        };
        spec.apply(&mut cmd)
            .map_err(|e| crate::daemon::launcher::isolation_failed(&e))?;
        cmd.stdin(std::process::Stdio::from(OwnedFd::from(job_theirs)));
        let child = super::spawn_pool_process(spawner, cmd, &self.node).await?;
        let pid = child.id().unwrap_or(0);
        Ok(Worker {
            child,
            pid,
            start_ticks: crate::daemon::launcher::start_ticks(pid),
            job: job_ours,
            stdout: out_r,
            stderr: err_r,
            cgroup: None,
        })
    }

    /// Keeps `size` workers idle until `closed`, then kills and reaps them.
    pub async fn run(self: Arc<Self>, spawner: Spawner, closed: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        // When the replacement of a taken worker is due (see below).
        let mut refill_due: Option<tokio::time::Instant> = None;
        loop {
            if closed.is_cancelled() {
                break;
            }
            // Forget workers that died while idle.
            let dead: Vec<Worker> = {
                let mut idle = lock(&self.idle);
                let mut alive = VecDeque::with_capacity(idle.len());
                let mut dead = Vec::new();
                for mut w in idle.drain(..) {
                    if matches!(w.try_alive(), Ok(true)) {
                        alive.push_back(w);
                    } else {
                        dead.push(w);
                    }
                }
                *idle = alive;
                dead
            };
            dead.into_iter().for_each(Worker::discard);
            let idle = lock(&self.idle).len();
            if idle < self.size as usize {
                // A replacement boots a whole node (tens of ms of CPU on several threads), which
                // would share the cores with the execution that took the worker. While more
                // than half the pool is still idle it waits REFILL_LATE; below that a burst is
                // under way (or the pool is starting) and it boots at once. (Booting it at the
                // execution's end instead put it on the exit's path: slower in alternating runs.)
                if 2 * idle > self.size as usize {
                    let due = *refill_due
                        .get_or_insert_with(|| tokio::time::Instant::now() + REFILL_LATE);
                    if tokio::time::Instant::now() < due {
                        tokio::select! {
                            _ = tokio::time::sleep_until(due) => {}
                            // Another take: look again, the pool may be down to half.
                            _ = self.wake.notified() => {}
                            _ = closed.cancelled() => break,
                        }
                        continue;
                    }
                }
                refill_due = None;
                match self.spawn_worker(&spawner).await {
                    Ok(w) => {
                        lock(&self.idle).push_back(w);
                        backoff = Duration::from_millis(100);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start a node worker");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = closed.cancelled() => break,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                // Notice workers killed while idle.
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = closed.cancelled() => break,
            }
        }
        let workers: Vec<Worker> = lock(&self.idle).drain(..).collect();
        for mut w in workers {
            let _ = w.child.start_kill();
            let _ = w.child.wait().await;
            if let Some(cg) = w.cgroup.take() {
                let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
            }
        }
    }

    fn eligible(plan: &ExecutionPlan) -> Result<(), String> {
        warmable(plan)?;
        if !plan.intrinsics.io {
            return Err(
                "without the io intrinsic Landlock must confine node before it starts".into(),
            );
        }
        if plan.network_namespace.is_some() {
            return Err("joining a network namespace must happen before node starts".into());
        }
        if let Some(k) =
            plan.env.iter().map(|(k, _)| k).find(|k| {
                k.starts_with("NODE_") || *k == "UV_THREADPOOL_SIZE" || *k == "OPENSSL_CONF"
            })
        {
            return Err(format!("environment variable {k} changes node start-up"));
        }
        Ok(())
    }

    /// Runs `plan` on an idle worker.
    pub(super) async fn launch(
        self: &Arc<Self>,
        plan: &ExecutionPlan,
        preparer: &Arc<Preparer>,
    ) -> Result<Launched, NotPooled> {
        Self::eligible(plan).map_err(NotPooled::Fallback)?;
        let worker = loop {
            let Some(mut w) = lock(&self.idle).pop_front() else {
                self.wake.notify_one();
                return Err(NotPooled::Fallback(NO_IDLE_WORKER.into()));
            };
            if matches!(w.try_alive(), Ok(true)) {
                break w;
            }
            w.discard();
        };
        // The refill loop (`run`) decides when the replacement boots.
        self.wake.notify_one();

        // Limits first: a worker that cannot take them is replaced before any sink is opened
        // (a fallback after opening a FIFO would show logmon an EOF).
        // A few cgroupfs writes: inline (see `blocking`).
        if let Some(cg) = &worker.cgroup
            && let Err(e) = cg.set_limits(&cgroup_limits(plan))
        {
            worker.discard();
            return Err(NotPooled::Fallback(format!(
                "a warm node worker cannot take the execution's limits: {e}"
            )));
        }
        // Node's threads are running: each is pinned (a few syscalls, inline).
        if let Some(cpus) = &plan.limits.cpus
            && let Err(e) = crate::sandbox::cpus::pin_process(worker.pid, cpus)
        {
            worker.discard();
            return Err(NotPooled::Fallback(format!(
                "a warm node worker cannot be pinned to cores {cpus}: {e}"
            )));
        }
        let sinks = match preparer.open_sinks(plan).await {
            Ok(p) => p,
            Err(e) => {
                worker.discard();
                return Err(NotPooled::Fail(e));
            }
        };
        let Worker {
            mut child,
            pid,
            start_ticks,
            mut job,
            stdout,
            stderr,
            cgroup,
        } = worker;
        let (spec, captures) = sinks.into_spec(plan, &cgroup);
        let env = final_env(plan, &spec);
        let IsolationSpec {
            stdout: sink_out,
            stderr: sink_err,
            ..
        } = spec;
        let argv: Vec<String> = plan
            .argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let body = serde_json::json!({
            "cwd": plan.working_dir.to_string_lossy(),
            "env": env,
            "argv": argv,
            "user": plan.user.as_ref().map(|u| serde_json::json!({
                "uid": u.uid, "gid": u.gid, "groups": u.groups,
            })),
        })
        .to_string();
        let body_len = body.len();
        // The worker reads the job only once it is all there: a job that fits the socket buffer
        // (the usual case) is written inline, a huge environment off the async workers.
        let send = move || {
            job.write_all(body.as_bytes())?;
            job.shutdown(std::net::Shutdown::Write)?;
            job.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(job)
        };
        let sent = if body_len <= INLINE_JOB_BYTES {
            Ok(send())
        } else {
            offload(send).await
        };
        let Ok(Ok(report)) = sent else {
            let _ = child.start_kill();
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            // Removal kills what is left and may wait for it to exit: not on an async worker.
            if let Some(cg) = cgroup {
                let _ = offload(move || cg.remove()).await;
            }
            // The cold start takes the sinks as they are: a FIFO closed and opened again would
            // show Nomad's logmon an EOF in between.
            let opened = Prepared {
                sinks: Sinks {
                    stdout: sink_out,
                    stderr: sink_err,
                    captures,
                },
                cgroup: None,
            };
            return Err(NotPooled::FallbackOn(
                "the node worker died before taking the job".into(),
                opened,
            ));
        };
        // The copies start once the job is out: what the worker writes first waits in its
        // pipes meanwhile.
        let copies = [
            pipe_copy::start(stdout, sink_out, "stdout"),
            pipe_copy::start(stderr, sink_err, "stderr"),
        ];
        let (reaped_tx, reaped) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = reaped_tx.send(child.wait().await);
        });
        let exit = Box::pin(async move {
            // The worker reports its exit code before node tears itself down; without a report
            // (a fatal error, a signal) the process's own end is the answer.
            // (A descendant that inherited fd 0 can hold the socket open: the process's end is
            // watched alongside.)
            let mut reaped = reaped;
            let report = async {
                match read_exit_code(report).await {
                    Some(code) => code,
                    None => std::future::pending().await,
                }
            };
            let status = tokio::select! {
                biased;
                code = report => Ok(ProcessExit::Exited(code)),
                s = &mut reaped => match s {
                    Ok(s) => s.map(convert),
                    Err(_) => Err(std::io::Error::other("the worker's reaper task ended")),
                },
            };
            for c in copies.into_iter().flatten() {
                let _ = tokio::time::timeout(DRAIN_GRACE, c).await;
            }
            status
        });
        Ok(Launched {
            pid,
            start_ticks,
            cgroup,
            captures,
            exit,
            gone: None,
            pooled: true,
        })
    }
}

/// The exit code the worker reports on its fd 0 (`<code>\n`), or None when it ended without one.
async fn read_exit_code(mut sock: tokio::net::UnixStream) -> Option<i32> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(8);
    let mut chunk = [0u8; 16];
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let code: i64 = std::str::from_utf8(&buf[..end]).ok()?.trim().parse().ok()?;
            // What the kernel keeps of exit(code).
            return Some((code & 0xff) as i32);
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) if buf.len() < 64 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) => return None,
        }
    }
}
