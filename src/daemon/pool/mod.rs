//! Warm context pools: a [`PoolLauncher`] sits in front of the [`ColdLauncher`] and runs an
//! execution on a warm runtime of its session when it can, cold otherwise.
//!
//! - Python ([`python_zygote`]): one zygote (fork server) per session with the interpreter
//!   initialised and common modules imported, keeping `context_pool_size` children forked
//!   ahead of jobs; each execution is such a fresh fork that replays the same isolation plan a
//!   cold spawn applies, so pages are shared copy-on-write and nothing of one execution is
//!   visible to the next. A dead zygote is restarted in the background.
//! - JavaScript/TypeScript ([`node_worker`]): node cannot fork, so `context_pool_size` node
//!   processes are pre-started per session, each used for exactly one execution and replaced in
//!   the background.
//!
//! Pools exist only for sessions with `context_pool_size > 0`; 0 disables warming. Whenever a
//! pooled start is impossible (pool still warming or empty, a plan the warm runtime cannot
//! honour, the zygote gone) the execution starts cold and an `EVENT_KIND_POOL_FALLBACK` event
//! says why. A session's pool is torn down (and its processes reaped) when the session closes.

pub mod exit_notes;
pub mod node_worker;
mod pipe_copy;
pub mod python_zygote;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::blocking::offload;
use super::events::{EventBus, EventSubject};
use super::launcher::{
    ColdLauncher, LaunchError, Launched, Launcher, Prepared, Preparer, Sinks, Spawner,
};
use super::plan::ExecutionPlan;
use super::runtime::{Backend, Language, RuntimeRegistry};
use super::session::Session;
use crate::proto::elide::daemon::v1alpha1 as pb;
use crate::sandbox::IsolationSpec;
use python_zygote::Zygote;

/// How long a pooled child may take to apply its isolation before the start fails.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Why a python start falls back while the zygote has no spare and cannot fork one.
const STARVED: &str = "the python zygote has no spare and cannot fork one (out of pids or memory)";
/// Why a python start falls back while the zygote starts or restarts.
const NOT_READY: &str = "the python zygote is not ready (starting or restarting)";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a pooled start did not happen.
enum NotPooled {
    /// Start cold instead, telling the client why.
    Fallback(String),
    /// Start cold on the sinks the pooled attempt already opened.
    FallbackOn(String, Prepared),
    /// A real error the cold path would report too (bad sink, isolation failure).
    Fail(LaunchError),
}

/// Python in a session that runs it natively.
enum PythonPool {
    /// Its interpreter cannot be warmed (too old): why.
    NotWarmed(String),
    /// The session's zygote once it is warm; `None` while it starts or restarts.
    Zygote(Arc<Mutex<Option<Arc<Zygote>>>>),
}

/// How a pool's executions started, for [`SessionPool::status`].
#[derive(Default)]
struct StartCounts {
    pooled: AtomicU64,
    cold: AtomicU64,
}

impl StartCounts {
    fn count(&self, pooled: bool) {
        let c = if pooled { &self.pooled } else { &self.cold };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn status(&self, runtime: &str, state: pb::PoolState, detail: &str) -> pb::PoolStatus {
        pb::PoolStatus {
            runtime: runtime.into(),
            state: state as i32,
            idle_workers: 0,
            pooled_starts: self.pooled.load(Ordering::Relaxed),
            cold_starts: self.cold.load(Ordering::Relaxed),
            detail: detail.into(),
        }
    }
}

/// The warm runtimes of one session.
pub struct SessionPool {
    session_id: String,
    closed: CancellationToken,
    python: Option<PythonPool>,
    node: Option<Arc<node_worker::NodePool>>,
    python_starts: StartCounts,
    node_starts: StartCounts,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl SessionPool {
    /// The warm zygote, if there is one now.
    fn zygote(&self) -> Option<Arc<Zygote>> {
        match &self.python {
            Some(PythonPool::Zygote(slot)) => lock(slot).clone(),
            _ => None,
        }
    }

    /// Whether a python start can run pooled now: the zygote to send it to, or the pool's
    /// state and why the start runs cold. `None` when the session does not warm python.
    fn python_now(&self) -> Option<Result<Arc<Zygote>, (pb::PoolState, String)>> {
        use pb::PoolState::{Empty, NotWarmed, Warming};
        Some(match self.python.as_ref()? {
            PythonPool::NotWarmed(why) => Err((NotWarmed, why.clone())),
            PythonPool::Zygote(_) => match self.zygote().filter(|z| z.alive()) {
                None => Err((Warming, NOT_READY.into())),
                Some(z) if z.starved() => Err((Empty, STARVED.into())),
                Some(z) => Ok(z),
            },
        })
    }

    /// Pids of the pool's own processes (zygote, idle workers), for tests and benchmarks.
    pub fn pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.zygote().map(|z| z.pid).into_iter().collect();
        if let Some(n) = &self.node {
            v.extend(n.idle_pids());
        }
        v
    }

    /// What each runtime's pool can do now, and how the session's executions started.
    pub fn status(&self) -> Vec<pb::PoolStatus> {
        use pb::PoolState::{Warm, Warming};
        let mut v = Vec::new();
        match self.python_now() {
            None => {}
            Some(Ok(_)) => v.push(self.python_starts.status("python", Warm, "")),
            Some(Err((state, why))) => v.push(self.python_starts.status("python", state, &why)),
        }
        if let Some(node) = &self.node {
            let idle = node.idle_count();
            let (state, why) = if idle > 0 {
                (Warm, "")
            } else {
                (Warming, node_worker::NO_IDLE_WORKER)
            };
            v.push(pb::PoolStatus {
                idle_workers: idle,
                ..self.node_starts.status("node", state, why)
            });
        }
        v
    }
}

/// Runs executions on warm runtimes when possible, cold otherwise.
pub struct PoolLauncher {
    cold: ColdLauncher,
    preparer: Arc<Preparer>,
    spawner: Spawner,
    events: EventBus,
    runtimes: RuntimeRegistry,
    run_dir: PathBuf,
    runtime: tokio::runtime::Handle,
    pools: Mutex<HashMap<String, Arc<SessionPool>>>,
    /// Made with the first python pool (an idle daemon makes nothing): see [`exit_notes`].
    notes: OnceLock<Option<Arc<exit_notes::ExitNotes>>>,
}

impl PoolLauncher {
    /// Wraps `cold`; pool processes are forked on `spawner` and live under `run_dir`.
    pub fn new(
        cold: ColdLauncher,
        spawner: Spawner,
        events: EventBus,
        runtimes: RuntimeRegistry,
        run_dir: PathBuf,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            preparer: cold.preparer(),
            cold,
            spawner,
            events,
            runtimes,
            run_dir,
            runtime,
            pools: Mutex::new(HashMap::new()),
            notes: OnceLock::new(),
        }
    }

    /// The exit-note region, made on first use; `None` where the kernel cannot have one.
    fn notes(&self) -> Option<&Arc<exit_notes::ExitNotes>> {
        self.notes
            .get_or_init(|| {
                let notes = exit_notes::ExitNotes::new();
                if notes.is_none() {
                    tracing::info!("no exit notes on this kernel (memfd, futex_waitv): pooled python executions end the usual way");
                }
                notes
            })
            .as_ref()
    }

    /// Starts warming `session`'s pool (no-op when its `context_pool_size` is 0).
    pub fn open_session(&self, session: &Session) {
        let size = session.config.context_pool_size;
        if size == 0 || lock(&self.pools).contains_key(&session.id) {
            return;
        }
        let native = |lang: Language| {
            session.languages.contains(&lang)
                && self
                    .runtimes
                    .get(lang)
                    .is_some_and(|r| r.available && r.backend == Backend::Native)
        };
        let workdir = self.run_dir.join(format!("pool-{}", session.id));
        if let Err(e) = std::fs::create_dir_all(&workdir) {
            tracing::warn!(session = %session.id, error = %e, "cannot create the pool dir; pool disabled");
            return;
        }
        let node_lang = [Language::JavaScript, Language::TypeScript]
            .into_iter()
            .any(native);
        let python_cold = native(Language::Python)
            .then(|| self.runtimes.get(Language::Python))
            .flatten()
            .and_then(|rt| python_zygote::unwarmable(&rt.version));
        if let Some(why) = &python_cold {
            tracing::warn!(session = %session.id, "{why}; its python executions start cold");
        }
        let pool = Arc::new(SessionPool {
            session_id: session.id.clone(),
            closed: CancellationToken::new(),
            python: native(Language::Python).then(|| match python_cold {
                Some(why) => PythonPool::NotWarmed(why),
                None => PythonPool::Zygote(Arc::new(Mutex::new(None))),
            }),
            node: node_lang
                .then(|| self.runtimes.get(Language::JavaScript))
                .flatten()
                .map(|rt| {
                    Arc::new(node_worker::NodePool::new(
                        rt.command.clone(),
                        workdir.clone(),
                        size,
                        session.intrinsics,
                        session.merge_pages,
                        self.preparer.clone(),
                    ))
                }),
            python_starts: StartCounts::default(),
            node_starts: StartCounts::default(),
            tasks: Mutex::new(Vec::new()),
        });
        let mut tasks = Vec::new();
        if let (Some(PythonPool::Zygote(slot)), Some(rt)) =
            (&pool.python, self.runtimes.get(Language::Python))
        {
            let settings = python_zygote::Settings {
                python: rt.command.clone(),
                workdir: workdir.clone(),
                spares: size,
                merge_pages: session.merge_pages,
                notes: self.notes().cloned(),
            };
            tasks.push(self.runtime.spawn(run_python_zygote(
                pool.session_id.clone(),
                slot.clone(),
                settings,
                self.spawner.clone(),
                pool.closed.clone(),
            )));
        }
        if let Some(node) = &pool.node {
            tasks.push(
                self.runtime
                    .spawn(node.clone().run(self.spawner.clone(), pool.closed.clone())),
            );
        }
        *lock(&pool.tasks) = tasks;
        lock(&self.pools).insert(session.id.clone(), pool);
    }

    /// Tears down `session_id`'s pool and waits until its processes are reaped.
    pub async fn close_session(&self, session_id: &str) {
        let Some(pool) = lock(&self.pools).remove(session_id) else {
            return;
        };
        pool.closed.cancel();
        let tasks = std::mem::take(&mut *lock(&pool.tasks));
        for t in tasks {
            let _ = t.await;
        }
        let dir = self.run_dir.join(format!("pool-{session_id}"));
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    }

    /// Tears down every pool (daemon shutdown).
    pub async fn close_all(&self) {
        let ids: Vec<String> = lock(&self.pools).keys().cloned().collect();
        for id in ids {
            self.close_session(&id).await;
        }
    }

    /// The pool of a session, if it has one.
    pub fn pool(&self, session_id: &str) -> Option<Arc<SessionPool>> {
        lock(&self.pools).get(session_id).cloned()
    }

    fn fallback_event(&self, plan: &ExecutionPlan, reason: &str) {
        let mut ann = HashMap::new();
        ann.insert("language".to_string(), plan.language.name().to_string());
        self.events.emit(
            pb::EventKind::PoolFallback,
            &EventSubject {
                session_id: &plan.session_id,
                execution_id: &plan.execution_id,
                client_ref: &plan.client_ref,
            },
            format!("starting cold: {reason}"),
            ann,
        );
    }

    async fn launch_python(
        &self,
        pool: &SessionPool,
        plan: &ExecutionPlan,
    ) -> Result<Launched, NotPooled> {
        let zygote = match pool.python_now() {
            None => {
                return Err(NotPooled::Fallback(
                    "python is not warmed in this session".into(),
                ));
            }
            Some(Err((_, why))) => return Err(NotPooled::Fallback(why)),
            Some(Ok(z)) => z,
        };
        let job = python_job(plan).map_err(NotPooled::Fallback)?;
        let Prepared { sinks, cgroup } = self
            .preparer
            .prepare(plan, None)
            .await
            .map_err(NotPooled::Fail)?;
        let (spec, captures) = sinks.into_spec(plan, &cgroup);
        // The same ruleset a cold spawn of this spec builds: a few syscalls, inline.
        let ruleset = match spec.landlock_ruleset() {
            Ok(r) => r,
            Err(e) => {
                if let Some(cg) = cgroup {
                    let _ = offload(move || cg.remove()).await;
                }
                return Err(NotPooled::Fail(crate::daemon::launcher::isolation_failed(
                    &e,
                )));
            }
        };
        let isolation = spec.plan();
        let mut job = job;
        job.insert(
            "steps".into(),
            serde_json::to_value(&isolation.steps).unwrap_or_default(),
        );
        job.insert("env".into(), serde_json::json!(final_env(plan, &spec)));
        // Once it reported ready, the child may outlive its zygote where the daemon still learns
        // its end without it and a daemon's death still ends it: its reaper kills what is left
        // in execution cgroups. Otherwise it dies with the zygote, as a cold start dies with
        // the daemon.
        job.insert(
            "outlive_zygote".into(),
            (cgroup.is_some() && python_zygote::exit_status_outlives_reaping()).into(),
        );
        // Only a zygote that mapped the region (all of this daemon's, when it has one) keeps a
        // slot for the child.
        let note = self.notes().and_then(|n| n.take());
        if let Some((slot, _)) = &note {
            job.insert(
                "note".into(),
                serde_json::json!({"slot": slot.index(), "nonce": slot.nonce()}),
            );
        }
        let mut fds = vec![spec.stdout.as_raw_fd(), spec.stderr.as_raw_fd()];
        if let Some(r) = &ruleset {
            fds.push(r.as_raw_fd());
        }
        let submitted = zygote.submit(job, &fds);
        drop(ruleset);
        // Our copies of the sinks stay open until the child reported ready: a late fallback
        // starts cold on them (the zygote's copies die with the job).
        let mut opened = Prepared {
            sinks: Sinks {
                stdout: spec.stdout,
                stderr: spec.stderr,
                captures,
            },
            cgroup: None,
        };
        let job = match submitted {
            Ok(j) => j,
            Err(e) => {
                // Refused before any process joined it: the cold start can use the cgroup.
                opened.cgroup = cgroup;
                return Err(NotPooled::FallbackOn(e.to_string(), opened));
            }
        };
        // From here a child may have joined the cgroup: it goes (killing what is in it) on
        // every failure. Removal may wait for exiting tasks, so not on an async worker.
        let discard = |cg: Option<crate::sandbox::cgroup::ExecutionCgroup>| async move {
            if let Some(cg) = cg {
                let _ = offload(move || cg.remove()).await;
            }
        };
        let ready = match tokio::time::timeout(READY_TIMEOUT, job.ready).await {
            Ok(Ok(Ok(r))) => r,
            Ok(Ok(Err(python_zygote::NotReady::Declined))) => {
                // No child took it: the cold start can use the cgroup and the sinks.
                opened.cgroup = cgroup;
                return Err(NotPooled::FallbackOn(STARVED.into(), opened));
            }
            Ok(Ok(Err(python_zygote::NotReady::NoPidfd))) => {
                discard(cgroup).await;
                return Err(NotPooled::Fail(LaunchError::Exhausted(
                    "the pooled python child's pidfd did not come with its ready report: the \
                     daemon had no descriptor to receive it in (its open-file limit)"
                        .into(),
                )));
            }
            Ok(Ok(Err(python_zygote::NotReady::Failed(msg)))) => {
                discard(cgroup).await;
                return Err(NotPooled::Fail(LaunchError::Spawn {
                    program: plan.argv[0].to_string_lossy().into_owned(),
                    source: std::io::Error::other(format!("isolation step failed: {msg}")),
                }));
            }
            Ok(Err(_)) => {
                discard(cgroup).await;
                return Err(NotPooled::FallbackOn(
                    "the python zygote exited while starting the execution".into(),
                    opened,
                ));
            }
            Err(_) => {
                discard(cgroup).await;
                return Err(NotPooled::Fail(LaunchError::Sandbox(format!(
                    "the pooled python child did not report within {}s",
                    READY_TIMEOUT.as_secs()
                ))));
            }
        };
        let pid = ready.pid;
        let pidfd = ready.pidfd;
        let start_ticks = python_zygote::start_ticks_of(pid, std::os::fd::AsFd::as_fd(&pidfd));
        let exit_rx = job.exit;
        let (note, gone) = note
            .map(|(slot, code)| python_zygote::Note::new(slot, code))
            .unzip();
        let exit = Box::pin(python_zygote::child_exit(pid, pidfd, exit_rx, note));
        Ok(Launched {
            pid,
            start_ticks,
            cgroup,
            // The child holds its own copies of the sinks; ours close here.
            captures: opened.sinks.captures,
            exit,
            gone,
            pooled: true,
        })
    }
}

impl Launcher for PoolLauncher {
    fn launch(&self, plan: ExecutionPlan) -> BoxFuture<'_, Result<Launched, LaunchError>> {
        Box::pin(async move {
            let Some(pool) = self.pool(&plan.session_id) else {
                return self.cold.launch(plan).await;
            };
            let tried = match plan.language {
                Language::Python => self.launch_python(&pool, &plan).await,
                Language::JavaScript | Language::TypeScript => match &pool.node {
                    Some(node) => node.launch(&plan, &self.preparer).await,
                    None => Err(NotPooled::Fallback(
                        "node is not warmed in this session".into(),
                    )),
                },
            };
            let counts = match plan.language {
                Language::Python => &pool.python_starts,
                Language::JavaScript | Language::TypeScript => &pool.node_starts,
            };
            match tried {
                Ok(l) => {
                    counts.count(true);
                    Ok(l)
                }
                Err(NotPooled::Fail(e)) => Err(e),
                Err(NotPooled::Fallback(reason)) => {
                    counts.count(false);
                    tracing::debug!(execution = %plan.execution_id, %reason, "pool fallback");
                    self.fallback_event(&plan, &reason);
                    self.cold.launch(plan).await
                }
                Err(NotPooled::FallbackOn(reason, opened)) => {
                    counts.count(false);
                    tracing::debug!(execution = %plan.execution_id, %reason, "late pool fallback");
                    self.fallback_event(&plan, &reason);
                    self.cold.launch_from(plan, Some(opened)).await
                }
            }
        })
    }
}

/// The environment a cold spawn gives the child: the base environment without `env`, the
/// plan's variables over it, and TMPDIR in the working dir without `io`.
fn final_env(plan: &ExecutionPlan, spec: &IsolationSpec) -> Vec<(String, String)> {
    let mut env = spec.base_env().unwrap_or_default();
    for (k, v) in &plan.env {
        let v = v.to_string_lossy().into_owned();
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(e) => e.1 = v,
            None => env.push((k.clone(), v)),
        }
    }
    if !plan.intrinsics.io && env.iter().all(|(k, _)| k != "TMPDIR") {
        env.push((
            "TMPDIR".to_string(),
            plan.working_dir.to_string_lossy().into_owned(),
        ));
    }
    env
}

/// Forks a pool process (zygote, node worker) from `cmd` on the spawner thread, so its
/// PDEATHSIG is tied to the daemon; killed when the returned child is dropped.
async fn spawn_pool_process(
    spawner: &Spawner,
    cmd: std::process::Command,
    program: &std::path::Path,
) -> Result<tokio::process::Child, LaunchError> {
    let program = program.display().to_string();
    spawner
        .run(move || {
            let mut cmd = tokio::process::Command::from(cmd);
            cmd.kill_on_drop(true);
            cmd.spawn()
        })
        .await?
        .map_err(|source| LaunchError::Spawn { program, source })
}

/// Why no warm runtime can run `plan` exactly as a cold interpreter would, for the reasons all
/// pools share: the elide backend, a user switch a non-root daemon cannot make, arguments or
/// environment values that are not UTF-8 (the jobs travel as JSON).
fn warmable(plan: &ExecutionPlan) -> Result<(), String> {
    if plan.backend != Backend::Native {
        return Err("the elide backend is not pooled".into());
    }
    // SAFETY: geteuid/getegid have no preconditions.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if let Some(u) = &plan.user
        && euid != 0
        && (u.uid != euid || u.gid != egid)
    {
        return Err("switching users needs a root daemon".into());
    }
    if plan.argv.iter().any(|a| a.to_str().is_none()) {
        return Err("an argument is not valid UTF-8".into());
    }
    if let Some((k, _)) = plan.env.iter().find(|(_, v)| v.to_str().is_none()) {
        return Err(format!("environment variable {k} is not valid UTF-8"));
    }
    Ok(())
}

/// The plan-independent part of a zygote job, or why the zygote cannot run `plan` exactly as a
/// cold interpreter would.
fn python_job(plan: &ExecutionPlan) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    warmable(plan)?;
    let argv: Vec<String> = plan
        .argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if argv.len() < 2 {
        return Err("no script in argv".into());
    }
    for (k, v) in &plan.env {
        // These change how the interpreter starts (paths, hash seed, flags): the warm one
        // started without them. PYTHONUNBUFFERED only shapes the standard streams, which the
        // child rebuilds as a cold start would (`zygote.py`); it is common in jobs that want
        // their log lines as they are written.
        if k.starts_with("PYTHON") && k != "PYTHONUNBUFFERED" {
            return Err(format!(
                "environment variable {k} changes interpreter start-up"
            ));
        }
        // The warm interpreter's standard streams are UTF-8; another charset must start cold.
        if matches!(k.as_str(), "LC_ALL" | "LC_CTYPE" | "LANG") {
            let v = v.to_string_lossy().to_ascii_lowercase();
            if !(v.is_empty()
                || v == "c"
                || v == "posix"
                || v.contains("utf-8")
                || v.contains("utf8"))
            {
                return Err(format!("{k}={v} selects a non-UTF-8 charset"));
            }
        }
    }
    let mut job = serde_json::Map::new();
    job.insert("script".into(), argv[1].clone().into());
    job.insert("argv".into(), serde_json::json!(argv));
    Ok(job)
}

/// Keeps one warm zygote (with `spares` forked children) in `slot` until `closed`; restarts it
/// (with backoff) when it dies.
async fn run_python_zygote(
    session_id: String,
    slot: Arc<Mutex<Option<Arc<Zygote>>>>,
    settings: python_zygote::Settings,
    spawner: Spawner,
    closed: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if closed.is_cancelled() {
            return;
        }
        match python_zygote::spawn(&settings, &spawner).await {
            Ok(spawned) => {
                let python_zygote::Spawned {
                    zygote,
                    hello,
                    mut child,
                } = spawned;
                let mut warm = false;
                tokio::select! {
                    h = hello => {
                        if h.is_ok() {
                            *lock(&slot) = Some(zygote.clone());
                            warm = true;
                        }
                    }
                    _ = child.wait() => {}
                    _ = closed.cancelled() => {}
                }
                if warm {
                    tokio::select! {
                        _ = child.wait() => {
                            tracing::warn!(session = %session_id, "python zygote exited; restarting");
                        }
                        _ = closed.cancelled() => {}
                    }
                    backoff = Duration::from_millis(100);
                }
                *lock(&slot) = None;
                zygote.shutdown();
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
            Err(e) => {
                tracing::warn!(session = %session_id, error = %e, "cannot start the python zygote");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = closed.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
