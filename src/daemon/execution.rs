//! One execution: its state machine (Starting → Running → Exited), the supervisor that waits for
//! the process, enforces the timeout and records the result, and the operations on a running
//! process group (signal, stop with grace, stats).
//!
//! Waiters use a `watch` channel: any number of WaitExecution callers see the transition, and a
//! caller arriving after the end gets the result at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::watch;

use super::events::{EventBus, EventSubject};
use super::launcher::{Launched, ProcessExit};
use super::output::CaptureBuffer;
use super::plan::ExecutionPlan;
use super::runtime::Language;
use super::state::{ExecutionRecord, ResultRecord, StateStore};
use crate::proto::elide::daemon::v1alpha1 as pb;
use crate::sandbox::cgroup::ExecutionCgroup;
use crate::sandbox::proc_stat::ProcStat;

/// Lifecycle phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Validated, process being created.
    Starting,
    /// The process runs.
    Running,
    /// Ended; the result is set.
    Exited,
}

#[derive(Default)]
struct Inner {
    pid: u32,
    start_ticks: u64,
    started_at: Option<SystemTime>,
    ended_at: Option<SystemTime>,
    /// When it ended, on the monotonic clock (for waits measured from the end); None for an
    /// execution restored from a previous daemon's record.
    ended: Option<Instant>,
    result: Option<ResultRecord>,
    cgroup: Option<Arc<ExecutionCgroup>>,
    cgroup_desc: String,
    last_cpu: Option<(Instant, f64)>,
    pooled: bool,
}

/// An execution known to the daemon (running, or ended and remembered).
pub struct Execution {
    /// Execution id.
    pub id: String,
    /// Session id.
    pub session_id: String,
    /// Language.
    pub language: Language,
    /// Opaque client reference.
    pub client_ref: String,
    /// The plan it was started from (absent for executions restored from disk).
    pub plan: Option<Arc<ExecutionPlan>>,
    phase: watch::Sender<Phase>,
    inner: Mutex<Inner>,
    timed_out: AtomicBool,
    /// Stopped because the daemon itself stops ([`Self::stop_for_shutdown`]).
    stopped_by_daemon: AtomicBool,
    /// Serialises writes of this execution's record (running vs final).
    persist_lock: Mutex<()>,
    /// Captured stdout, when its sink is `Capture`.
    pub stdout: OnceLock<Arc<CaptureBuffer>>,
    /// Captured stderr.
    pub stderr: OnceLock<Arc<CaptureBuffer>>,
}

/// Where the supervisor reports.
#[derive(Clone)]
pub struct SupervisorContext {
    /// Durable results.
    pub state: Arc<StateStore>,
    /// Lifecycle events.
    pub events: EventBus,
    /// Captured bytes kept per stream.
    pub max_capture_bytes: usize,
}

fn ignore_esrch(r: nix::Result<()>) -> nix::Result<()> {
    match r {
        Err(nix::errno::Errno::ESRCH) => Ok(()),
        other => other,
    }
}

/// Sends `sig` to the process group the execution's leader `pid` (started at `start_ticks`, 0
/// when unknown) led; ESRCH when `pid` now names another process. A pid stays taken while any
/// process is in the group of its number, so a reused pid means our group is empty, and the
/// number may lead someone else's (the leader is reaped before its group is killed). A pid
/// that names no process is signalled: its group may hold what the leader left (or, after a
/// reuse that came and went within the few milliseconds since the reaping, another's).
fn signal_group_of(pid: u32, start_ticks: u64, sig: Signal) -> nix::Result<()> {
    if pid == 0 {
        return Err(nix::errno::Errno::ESRCH);
    }
    let now = super::launcher::start_ticks(pid);
    if start_ticks != 0 && now != 0 && now != start_ticks {
        return Err(nix::errno::Errno::ESRCH);
    }
    nix::sys::signal::killpg(Pid::from_raw(pid as i32), sig)
}

impl Execution {
    /// A new execution in the Starting phase.
    pub fn new(plan: ExecutionPlan) -> Arc<Self> {
        let (phase, _) = watch::channel(Phase::Starting);
        Arc::new(Self {
            id: plan.execution_id.clone(),
            session_id: plan.session_id.clone(),
            language: plan.language,
            client_ref: plan.client_ref.clone(),
            plan: Some(Arc::new(plan)),
            phase,
            inner: Mutex::new(Inner::default()),
            timed_out: AtomicBool::new(false),
            stopped_by_daemon: AtomicBool::new(false),
            persist_lock: Mutex::new(()),
            stdout: OnceLock::new(),
            stderr: OnceLock::new(),
        })
    }

    /// An ended execution restored from its persisted record. Records without a result belong
    /// to a daemon that died while they ran: they are reported as ended with an error.
    pub fn restored(rec: &ExecutionRecord) -> Arc<Self> {
        let (phase, _) = watch::channel(Phase::Exited);
        let result = rec.result.clone().unwrap_or_else(|| ResultRecord {
            exit_code: 128 + libc::SIGKILL,
            signal: libc::SIGKILL,
            error: format!(
                "the elide daemon (pid {}) stopped while this execution ran; its processes were \
                 killed and the real exit status is unknown",
                rec.daemon_pid
            ),
            ..Default::default()
        });
        Arc::new(Self {
            id: rec.id.clone(),
            session_id: rec.session_id.clone(),
            language: Language::parse(&rec.language).unwrap_or(Language::Python),
            client_ref: rec.client_ref.clone(),
            plan: None,
            phase,
            inner: Mutex::new(Inner {
                pid: rec.pid,
                start_ticks: rec.pid_start_ticks,
                started_at: rec.started_at,
                ended_at: rec.ended_at.or(Some(SystemTime::now())),
                result: Some(result),
                cgroup_desc: rec.cgroup.clone(),
                ..Default::default()
            }),
            timed_out: AtomicBool::new(false),
            stopped_by_daemon: AtomicBool::new(false),
            persist_lock: Mutex::new(()),
            stdout: OnceLock::new(),
            stderr: OnceLock::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means a panic elsewhere; the data is still consistent enough.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// The result, once ended.
    pub fn result(&self) -> Option<ResultRecord> {
        self.lock().result.clone()
    }

    /// Process id (0 before the process exists).
    pub fn pid(&self) -> u32 {
        self.lock().pid
    }

    /// The files a new process of this execution joins its cgroup through (empty without one).
    pub fn cgroup_procs(&self) -> Vec<std::path::PathBuf> {
        self.lock()
            .cgroup
            .as_ref()
            .map(|c| c.self_join_files())
            .unwrap_or_default()
    }

    /// Waits until the execution has ended and returns its result.
    pub async fn wait(&self) -> ResultRecord {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(|p| *p == Phase::Exited).await;
        self.result().unwrap_or_default()
    }

    /// How long ago it ended (None while it runs; for one restored from a previous daemon's
    /// record, long ago enough for any wait measured from its end).
    pub fn ended_since(&self) -> Option<std::time::Duration> {
        let i = self.lock();
        match (i.ended, i.ended_at) {
            (Some(t), _) => Some(t.elapsed()),
            (None, Some(_)) => Some(std::time::Duration::MAX),
            (None, None) => None,
        }
    }

    /// Watches the phase.
    pub fn watch_phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Waits until the phase is no longer Starting.
    pub async fn wait_started(&self) {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(|p| *p != Phase::Starting).await;
    }

    /// The persisted form.
    pub fn record(&self) -> ExecutionRecord {
        let i = self.lock();
        ExecutionRecord {
            id: self.id.clone(),
            session_id: self.session_id.clone(),
            language: self.language.name().to_string(),
            client_ref: self.client_ref.clone(),
            pid: i.pid,
            pid_start_ticks: i.start_ticks,
            started_at: i.started_at,
            ended_at: i.ended_at,
            result: i.result.clone(),
            cgroup: i.cgroup_desc.clone(),
            daemon_pid: std::process::id(),
        }
    }

    /// Records the started execution (an append to the journal, not fsynced: it only has to
    /// survive a crash of the daemon). One that has already ended is left to its supervisor,
    /// which writes the final record itself.
    pub fn persist_started(&self, state: &StateStore) -> Result<(), super::state::StateError> {
        let _g = self.persist_lock.lock().unwrap_or_else(|p| p.into_inner());
        let rec = self.record();
        if rec.result.is_some() {
            return Ok(());
        }
        state.save_unsynced(&rec).map(|_| ())
    }

    /// Writes the final record without fsync (see [`StateStore::save_unsynced`]).
    fn persist_final_unsynced(
        &self,
        state: &StateStore,
    ) -> Result<super::state::Written, super::state::StateError> {
        let _g = self.persist_lock.lock().unwrap_or_else(|p| p.into_inner());
        state.save_unsynced(&self.record())
    }

    /// The API form.
    pub fn to_proto(&self) -> pb::Execution {
        let state = match self.phase() {
            Phase::Starting => pb::ExecutionState::Starting,
            Phase::Running => pb::ExecutionState::Running,
            Phase::Exited => pb::ExecutionState::Exited,
        };
        let i = self.lock();
        pb::Execution {
            id: self.id.clone(),
            session_id: self.session_id.clone(),
            language: self.language.name().to_string(),
            state: state as i32,
            pid: i.pid,
            pid_start_ticks: i.start_ticks,
            started_at: i.started_at.map(Into::into),
            ended_at: i.ended_at.map(Into::into),
            result: i.result.as_ref().map(result_to_proto),
            client_ref: self.client_ref.clone(),
            pooled: i.pooled,
            cgroup: i.cgroup_desc.clone(),
            working_dir: self
                .plan
                .as_ref()
                .map(|p| p.working_dir.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    fn subject(&self) -> EventSubject<'_> {
        EventSubject {
            session_id: &self.session_id,
            execution_id: &self.id,
            client_ref: &self.client_ref,
        }
    }

    /// Sends `sig` to the whole process group (only while it runs).
    pub fn signal_group(&self, sig: Signal) -> nix::Result<()> {
        let (pid, start_ticks) = {
            let i = self.lock();
            (i.pid, i.start_ticks)
        };
        if pid == 0 || self.phase() != Phase::Running {
            return Err(nix::errno::Errno::ESRCH);
        }
        ignore_esrch(signal_group_of(pid, start_ticks, sig))
    }

    /// SIGKILLs the group and every process of the cgroup (covers processes that left the
    /// group with setsid).
    pub fn kill_all(&self) {
        let (pid, start_ticks, cgroup) = {
            let i = self.lock();
            (i.pid, i.start_ticks, i.cgroup.clone())
        };
        let _ = signal_group_of(pid, start_ticks, Signal::SIGKILL);
        if let Some(cg) = cgroup {
            // Killing a v1 cgroup polls until it is empty: keep that off the async workers.
            let kill = move || {
                let _ = cg.kill_all();
            };
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn_blocking(kill);
                }
                Err(_) => kill(),
            }
        }
    }

    /// Sends `sig`, waits up to `grace`, then SIGKILLs; returns the result once ended.
    pub async fn stop(&self, sig: Signal, grace: Duration) -> ResultRecord {
        self.wait_started().await;
        if self.phase() == Phase::Running {
            if grace.is_zero() || sig == Signal::SIGKILL {
                self.kill_all();
            } else {
                let _ = self.signal_group(sig);
                let mut rx = self.phase.subscribe();
                let ended = tokio::time::timeout(grace, rx.wait_for(|p| *p == Phase::Exited)).await;
                if ended.is_err() {
                    self.kill_all();
                }
            }
        }
        self.wait().await
    }

    /// Stops it because the daemon stops: SIGTERM, SIGKILL after `grace`, and a result that
    /// says the daemon ended it.
    pub async fn stop_for_shutdown(&self, grace: Duration) -> ResultRecord {
        // A process that already exited (its end not yet recorded) finished on its own: its
        // result keeps its own account.
        self.wait_started().await;
        let pid = self.pid();
        if pid != 0 && ProcStat::of(pid).is_some_and(|s| s.running()) {
            self.stopped_by_daemon.store(true, Ordering::SeqCst);
        }
        self.stop(Signal::SIGTERM, grace).await
    }

    /// Marks the launch as failed (the execution is then forgotten by the caller).
    pub fn fail_start(&self, error: String) {
        {
            let mut i = self.lock();
            i.ended_at = Some(SystemTime::now());
            i.ended = Some(Instant::now());
            i.result = Some(ResultRecord {
                exit_code: -1,
                error,
                ..Default::default()
            });
        }
        self.phase.send_replace(Phase::Exited);
    }

    /// Records the running process and spawns its supervisor.
    pub fn start_supervisor(self: &Arc<Self>, launched: Launched, ctx: SupervisorContext) {
        let Launched {
            pid,
            start_ticks,
            cgroup,
            captures,
            exit,
            gone,
            pooled,
        } = launched;
        let cgroup = cgroup.map(Arc::new);
        let unconfined = cgroup.is_none();
        for (fd, slot) in [
            (captures.stdout, &self.stdout),
            (captures.stderr, &self.stderr),
        ] {
            if let Some(fd) = fd {
                let buf = CaptureBuffer::new(ctx.max_capture_bytes);
                if let Err(e) = buf.spawn_drain(fd) {
                    tracing::warn!(execution = %self.id, error = %e, "cannot capture output");
                    buf.close();
                }
                let _ = slot.set(buf);
            }
        }
        {
            let mut i = self.lock();
            i.pid = pid;
            // With the pid it identifies the process across a daemon restart, and before its
            // process group is signalled (pid reuse).
            i.start_ticks = start_ticks;
            i.started_at = Some(SystemTime::now());
            i.cgroup_desc = cgroup
                .as_ref()
                .map(|c| {
                    c.dirs()
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            i.cgroup = cgroup;
            i.pooled = pooled;
        }
        self.phase.send_replace(Phase::Running);
        let mut ann = HashMap::new();
        ann.insert("pid".to_string(), pid.to_string());
        ann.insert("language".to_string(), self.language.name().to_string());
        let mut message = format!("started as pid {pid}");
        // Every launcher gives an execution a cgroup when the node has them: without one, the
        // limits asked for hold nowhere, and the task's events are where its owner looks.
        let limited = self.plan.as_ref().is_some_and(|p| {
            let l = &p.limits;
            l.memory_bytes.is_some() || l.cpu_shares.is_some() || l.pids.is_some()
        });
        if unconfined && limited {
            ann.insert("limits".to_string(), "not enforced".to_string());
            message.push_str(
                "; its memory, CPU and pids limits are not enforced: this node has no usable cgroups",
            );
        }
        ctx.events
            .emit(pb::EventKind::Started, &self.subject(), message, ann);
        let timeout = self.plan.as_ref().and_then(|p| p.limits.timeout);
        let me = self.clone();
        tokio::spawn(async move { me.supervise(exit, gone, timeout, ctx).await });
    }

    async fn supervise(
        self: Arc<Self>,
        exit: futures::future::BoxFuture<'static, std::io::Result<ProcessExit>>,
        gone: Option<tokio::sync::oneshot::Receiver<()>>,
        timeout: Option<Duration>,
        ctx: SupervisorContext,
    ) {
        let mut exit = exit;
        let status = match timeout {
            None => exit.await,
            Some(t) => match tokio::time::timeout(t, &mut exit).await {
                Ok(s) => s,
                Err(_) => {
                    self.timed_out.store(true, Ordering::SeqCst);
                    ctx.events.emit(
                        pb::EventKind::TimedOut,
                        &self.subject(),
                        format!(
                            "timeout of {} reached; killing the process group",
                            humantime::format_duration(t)
                        ),
                        HashMap::new(),
                    );
                    self.kill_all();
                    exit.await
                }
            },
        };
        let (pid, start_ticks, cgroup) = {
            let mut i = self.lock();
            (i.pid, i.start_ticks, i.cgroup.take())
        };
        let oom = match &cgroup {
            // One cgroupfs read: inline (see `blocking`).
            Some(cg) => cg.oom_killed(),
            None => false,
        };
        let timed_out = self.timed_out.load(Ordering::SeqCst);
        let mut result = match status {
            Ok(ProcessExit::Exited(code)) => ResultRecord {
                exit_code: code,
                signal: 0,
                oom_killed: oom,
                timed_out,
                error: String::new(),
            },
            Ok(ProcessExit::Signaled(sig)) => ResultRecord {
                exit_code: 128 + sig,
                signal: sig,
                oom_killed: oom,
                timed_out,
                error: String::new(),
            },
            Err(e) => ResultRecord {
                exit_code: -1,
                signal: 0,
                oom_killed: oom,
                timed_out,
                error: format!("waiting for the process failed: {e}"),
            },
        };
        // Whatever the snippet made of the SIGTERM (it may catch it and exit 0), it did not
        // finish: with an error, Nomad counts the task as failed and restarts it by its policy
        // instead of calling a batch job complete.
        // A timeout that fired first keeps its own account of the end.
        if self.stopped_by_daemon.load(Ordering::SeqCst) && !timed_out && result.error.is_empty() {
            result.error = "elide-daemon stopped (shut down or restarted) while this task ran; \
                            it was sent SIGTERM"
                .to_string();
        }
        {
            let mut i = self.lock();
            i.cgroup = None;
            i.ended_at = Some(SystemTime::now());
            i.ended = Some(Instant::now());
            i.result = Some(result.clone());
        }
        // The final record is written (write + rename, no fsync) before anyone learns the result,
        // so a client reconnecting to a restarted daemon gets the same answer: the page cache
        // survives a crash of the daemon process. Only a machine crash could lose it, and that
        // ends the executions too; the fsync runs afterwards, in the cleanup below.
        // An append to the journal: inline (see `blocking`).
        let persisted = match self.persist_final_unsynced(&ctx.state) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(execution = %self.id, error = %e, "cannot persist exit status");
                None
            }
        };
        // Ended before any event says so: a client acting on the Exited event sees an ended
        // execution (its output settled) in what it asks next.
        self.phase.send_replace(Phase::Exited);
        if oom {
            ctx.events.emit(
                pb::EventKind::OomKilled,
                &self.subject(),
                "the process was killed by the OOM killer (memory limit reached)",
                HashMap::new(),
            );
        }
        let mut ann = HashMap::new();
        ann.insert("exit_code".to_string(), result.exit_code.to_string());
        ann.insert("signal".to_string(), result.signal.to_string());
        ctx.events.emit(
            pb::EventKind::Exited,
            &self.subject(),
            format!("exited with code {}", result.exit_code),
            ann,
        );
        // Whatever the leader left in its process group goes now (one syscall, but signalling
        // a process of many threads takes a while: after the waiters were told). The leader
        // itself may still be on its way out: a pooled runtime reports its exit code before
        // its teardown. The cgroup (which also holds processes that left the group) is killed
        // and removed below, off the critical path.
        let _ = signal_group_of(pid, start_ticks, Signal::SIGKILL);
        // Cleanup after the waiters were told: kill and remove the cgroup, remove the
        // execution's directory, make the record durable (sharing its flush with executions
        // that end around the same time). Errors are logged, nothing is skipped.
        let state = ctx.state.clone();
        let exec_dir = self.plan.as_ref().map(|p| p.exec_dir.clone());
        let id = self.id.clone();
        let cleanup = move || {
            if let Some(cg) = cgroup {
                // A stats sampler may still hold the Arc; the directories go either way.
                let owned: ExecutionCgroup = (*cg).clone();
                if let Err(e) = owned.remove() {
                    tracing::warn!(execution = %id, error = %e, "cannot remove an execution cgroup");
                }
            }
            if let Some(d) = exec_dir
                && let Err(e) = std::fs::remove_dir_all(&d)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(execution = %id, dir = %d.display(), error = %e, "cannot remove the execution directory");
            }
            if let Some(w) = persisted
                && let Err(e) = state.sync_execution_soon(w)
            {
                tracing::warn!(execution = %id, error = %e, "cannot fsync the exit status");
            }
        };
        match gone {
            // The process said how it ends and was killed above; its cgroup goes once it is
            // gone (the child is tearing its memory down), not in a poll for an empty cgroup.
            Some(gone) => {
                tokio::spawn(async move {
                    let _ = gone.await;
                    tokio::task::spawn_blocking(cleanup);
                });
            }
            None => {
                tokio::task::spawn_blocking(cleanup);
            }
        }
    }

    /// CPU and memory of the execution's processes.
    pub fn stats(&self) -> pb::ExecutionStats {
        let (pid, cgroup) = {
            let i = self.lock();
            (i.pid, i.cgroup.clone())
        };
        let mut out = pb::ExecutionStats {
            timestamp: Some(SystemTime::now().into()),
            ..Default::default()
        };
        if self.phase() != Phase::Running || pid == 0 {
            return out;
        }
        let pids: Vec<u32> = match &cgroup {
            Some(cg) => {
                let p = cg.pids();
                if p.is_empty() { vec![pid] } else { p }
            }
            None => group_members(pid),
        };
        let tps = procfs::ticks_per_second() as f64;
        let page = procfs::page_size();
        let (mut user, mut system, mut rss) = (0.0f64, 0.0f64, 0u64);
        let mut measured_proc = false;
        for p in pids {
            let Ok(stat) = procfs::process::Process::new(p as i32).and_then(|pr| pr.stat()) else {
                continue;
            };
            measured_proc = true;
            let ps = pb::ProcessStats {
                cpu_user_seconds: stat.utime as f64 / tps,
                cpu_system_seconds: stat.stime as f64 / tps,
                rss_bytes: stat.rss * page,
            };
            user += ps.cpu_user_seconds;
            system += ps.cpu_system_seconds;
            rss += ps.rss_bytes;
            out.processes.insert(p, ps);
        }
        let mut measured: Vec<&str> = Vec::new();
        if measured_proc {
            out.cpu_user_seconds = user;
            out.cpu_system_seconds = system;
            out.rss_bytes = rss;
            measured.extend(["cpu_user", "cpu_system", "rss"]);
        }
        if let Some(cg) = &cgroup {
            let s = cg.stats();
            if let Some(v) = s.cpu_user_ns {
                out.cpu_user_seconds = v as f64 / 1e9;
            }
            if let Some(v) = s.cpu_system_ns {
                out.cpu_system_seconds = v as f64 / 1e9;
            }
            if let Some(v) = s.memory_usage_bytes {
                out.memory_usage_bytes = v;
                measured.push("memory_usage");
            }
            if let Some(v) = s.memory_max_usage_bytes {
                out.memory_max_usage_bytes = v;
                measured.push("memory_max_usage");
            }
            if let Some(v) = s.cpu_throttled_periods {
                out.throttled_periods = v;
                measured.push("throttled_periods");
            }
            if let Some(v) = s.cpu_throttled_ns {
                out.throttled_time_ns = v;
                measured.push("throttled_time");
            }
        }
        if measured_proc {
            let total = out.cpu_user_seconds + out.cpu_system_seconds;
            let now = Instant::now();
            let mut i = self.lock();
            let start = i.started_at.and_then(|s| s.elapsed().ok());
            let (base_t, base_cpu) = match (i.last_cpu, start) {
                (Some(prev), _) => prev,
                (None, Some(el)) => (now.checked_sub(el).unwrap_or(now), 0.0),
                (None, None) => (now, total),
            };
            let dt = now.duration_since(base_t).as_secs_f64();
            if dt > 0.0 {
                out.cpu_percent = ((total - base_cpu) / dt * 100.0).max(0.0);
                measured.push("cpu_percent");
            }
            i.last_cpu = Some((now, total));
        }
        out.measured = measured.into_iter().map(str::to_string).collect();
        out
    }
}

/// The processes whose process group is `pgid` (used when there is no cgroup).
fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(all) = procfs::process::all_processes() {
        for p in all.flatten() {
            if let Ok(stat) = p.stat()
                && stat.pgrp == pgid as i32
            {
                out.push(stat.pid as u32);
            }
        }
    }
    if out.is_empty() {
        out.push(pgid);
    }
    out
}

/// Converts a stored result to the API form.
pub fn result_to_proto(r: &ResultRecord) -> pb::ExecutionResult {
    pb::ExecutionResult {
        exit_code: r.exit_code,
        signal: r.signal,
        oom_killed: r.oom_killed,
        timed_out: r.timed_out,
        error: r.error.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn group_leader() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("sleep")
    }

    #[test]
    fn a_group_is_signalled_only_while_its_leader_pid_names_the_leader() {
        let mut leader = group_leader();
        let pid = leader.id();
        let ticks = super::super::launcher::start_ticks(pid);
        assert_ne!(ticks, 0);
        // The same number, started at another time: a reused pid, whose group is not ours.
        assert_eq!(
            signal_group_of(pid, ticks + 1, Signal::SIGKILL),
            Err(nix::errno::Errno::ESRCH)
        );
        assert!(
            leader.try_wait().unwrap().is_none(),
            "a reused pid's group was signalled"
        );
        assert_eq!(signal_group_of(pid, ticks, Signal::SIGKILL), Ok(()));
        let status = leader.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert_eq!(
            signal_group_of(0, 0, Signal::SIGKILL),
            Err(nix::errno::Errno::ESRCH)
        );
    }
}
