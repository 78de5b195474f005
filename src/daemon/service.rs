//! The daemon's core: sessions and executions, independent of gRPC. Every method validates its
//! input and returns a [`DaemonError`] naming the field; `server.rs` only adapts to tonic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use super::config::DaemonConfig;
use super::error::{DaemonError, DaemonResult};
use super::events::{EventBus, EventSubject};
use super::execution::{Execution, Phase, SupervisorContext, result_to_proto};
use super::launcher::{ColdLauncher, LaunchError, Launcher, Spawner};
use super::plan::{PlanContext, duration, plan_execution};
use super::pool::PoolLauncher;
use super::reaper::Reaper;
use super::runtime::RuntimeRegistry;
use super::session::Session;
use super::state::{ResultRecord, StateStore};
use super::tsstrip::StripCache;
use crate::proto::elide::daemon::v1alpha1 as pb;
use crate::sandbox::cgroup::{CgroupManager, CgroupMode};
use crate::sandbox::probe::Feature;
use crate::sandbox::signal::parse_signal;

/// API version served.
pub const API_VERSION: &str = "v1alpha1";

/// Default grace before SIGKILL for stop and close.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// The daemon: sessions, executions, and what it needs to run them.
pub struct Daemon {
    /// Effective configuration.
    pub config: DaemonConfig,
    /// Discovered runtimes.
    pub runtimes: RuntimeRegistry,
    strip_cache: Arc<StripCache>,
    state: Arc<StateStore>,
    events: EventBus,
    launcher: Arc<dyn Launcher>,
    pools: Arc<PoolLauncher>,
    spawner: Spawner,
    cgroups: CgroupManager,
    features: Vec<Feature>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    executions: Mutex<HashMap<String, Arc<Execution>>>,
    started_at: SystemTime,
    /// Cancelled when the daemon shuts down.
    pub shutdown: CancellationToken,
    _reaper: Reaper,
}

/// Who is calling (from the socket's peer credentials).
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller {
    /// Peer uid, when known.
    pub uid: Option<u32>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `work` to its end on a task of its own. An RPC whose client goes away (a timeout, a
/// plugin killed mid-call) has its handler dropped wherever it is waiting; a change of daemon
/// state made of several steps (start, stop with escalation, close) must not stop halfway.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = DaemonResult<T>> + Send + 'static,
) -> DaemonResult<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| DaemonError::Internal(format!("the daemon task failed: {e}")))?
}

/// Whether `pid` still is the process that started at `ticks`.
fn same_process(pid: u32, ticks: u64) -> bool {
    pid != 0 && ticks != 0 && super::launcher::start_ticks(pid) == ticks
}

impl Daemon {
    /// Opens the state dir, discovers runtimes, cleans up after a previous instance and restores
    /// its sessions and ended executions. Blocking: call before serving.
    pub fn open(
        config: DaemonConfig,
        runtime: tokio::runtime::Handle,
    ) -> anyhow::Result<Arc<Self>> {
        let state = Arc::new(StateStore::open(&config.state_dir)?);
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(&config.run_dir)
            .map_err(|e| anyhow::anyhow!("creating run_dir {}: {e}", config.run_dir.display()))?;
        // Task users must traverse the run dir to reach their own private execution dir.
        std::fs::set_permissions(
            &config.run_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .map_err(|e| anyhow::anyhow!("chmod run_dir {}: {e}", config.run_dir.display()))?;
        // The reaper must hold the handover lock before anything else happens: once it does,
        // any previous daemon's cleanup is over and cannot touch what we start.
        let reaper = Reaper::start(
            &config.state_dir,
            &config.cgroup_root,
            &config.cgroup_parent,
        )?;
        let runtimes = RuntimeRegistry::discover(&config.runtimes);
        let cgroups = CgroupManager::detect_at(&config.cgroup_root, &config.cgroup_parent);
        if cgroups.mode() == CgroupMode::None {
            tracing::warn!(
                cgroup_root = %config.cgroup_root.display(),
                "no usable cgroups (neither v2 with the memory, cpu and pids controllers nor a \
                 v1 hierarchy of them): executions run without memory, CPU and \
                 pids limits, and an out-of-memory kill is reported as a plain SIGKILL"
            );
        }
        if !config.syscall_filter {
            if crate::sandbox::syscall_filter::switch_off() {
                tracing::warn!(
                    "executions run without the seccomp filter (syscall_filter = false): they \
                     may use io_uring, the kernel keyrings, bpf and the rest of its list"
                );
            } else {
                anyhow::bail!("syscall_filter = false came after the filter was in use");
            }
        }

        // A previous daemon's executions: their processes normally died with it (PDEATHSIG),
        // but grandchildren may survive; kill whatever is left by process group and cgroup.
        let records = state.load_executions();
        for rec in &records {
            if rec.result.is_none() && same_process(rec.pid, rec.pid_start_ticks) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(rec.pid as i32),
                    Signal::SIGKILL,
                );
            }
        }
        match cgroups.reap_stale() {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "removed cgroups left by a previous daemon"),
            Err(e) => tracing::warn!(error = %e, "cannot reap stale cgroups"),
        }
        if let Ok(entries) = std::fs::read_dir(&config.run_dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let features = crate::sandbox::probe::probe(&cgroups);
        let spawner = Spawner::start(runtime.clone())?;
        let events = EventBus::default();
        // Probed before serving (it forks): whether pooled python children can outlive a
        // zygote that dies under them.
        let outlive = super::pool::python_zygote::exit_status_outlives_reaping();
        tracing::info!(
            pooled_python_outlives_its_zygote = outlive,
            "the kernel {} a process's exit status for its pidfd after reaping",
            if outlive { "keeps" } else { "does not keep" }
        );
        // Warm pools in front of the cold launcher (sessions with context_pool_size > 0).
        let pools = Arc::new(PoolLauncher::new(
            ColdLauncher::new(
                spawner.clone(),
                cgroups.clone(),
                config.output_roots.clone(),
                config.sink_open_timeout,
            ),
            spawner.clone(),
            events.clone(),
            runtimes.clone(),
            config.run_dir.clone(),
            runtime,
        ));
        let launcher: Arc<dyn Launcher> = pools.clone();

        let mut executions = HashMap::new();
        let now = SystemTime::now();
        for rec in records {
            let ended = rec.ended_at.unwrap_or(now);
            if now.duration_since(ended).unwrap_or_default() > config.ended_retention {
                state.remove_execution(&rec.id);
                continue;
            }
            let e = Execution::restored(&rec);
            if rec.result.is_none() {
                // Persist the verdict so it does not change on the next restart.
                let _ = state.save_execution(&e.record());
            }
            executions.insert(rec.id.clone(), e);
        }
        let mut sessions = HashMap::new();
        for rec in state.load_sessions() {
            match Session::from_record(&rec, &runtimes) {
                Ok(s) => {
                    for e in executions.values().filter(|e| e.session_id == s.id) {
                        s.add(e.clone());
                    }
                    pools.open_session(&s);
                    sessions.insert(rec.id.clone(), Arc::new(s));
                }
                Err(e) => {
                    tracing::warn!(session = %rec.id, error = %e, "dropping unusable session")
                }
            }
        }
        Ok(Arc::new(Self {
            config,
            runtimes,
            strip_cache: Arc::new(StripCache::new(256)),
            state,
            events,
            launcher,
            pools,
            spawner,
            cgroups,
            features,
            sessions: Mutex::new(sessions),
            executions: Mutex::new(executions),
            started_at: SystemTime::now(),
            shutdown: CancellationToken::new(),
            _reaper: reaper,
        }))
    }

    /// The thread every child is forked from.
    pub fn spawner(&self) -> &Spawner {
        &self.spawner
    }

    /// Lifecycle events.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// GetDaemonInfo.
    pub fn info(&self) -> pb::DaemonInfo {
        pb::DaemonInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: API_VERSION.to_string(),
            runtimes: self
                .runtimes
                .all()
                .iter()
                .map(|r| pb::Runtime {
                    language: r.language.name().to_string(),
                    aliases: r.language.aliases().iter().map(|a| a.to_string()).collect(),
                    command: r.command.display().to_string(),
                    version: r.version.clone(),
                    backend: match r.backend {
                        super::runtime::Backend::Native => "native".into(),
                        super::runtime::Backend::Elide => "elide".into(),
                    },
                    available: r.available,
                    detail: r.detail.clone(),
                })
                .collect(),
            cgroup_mode: self.cgroups.mode().as_str().to_string(),
            cgroup_parent: self.cgroups.parent_path().unwrap_or_default(),
            sink_open_timeout: prost_types::Duration::try_from(self.config.sink_open_timeout).ok(),
            isolation: self
                .features
                .iter()
                .map(|f| pb::IsolationFeature {
                    name: f.name.clone(),
                    enforced: f.enforced,
                    detail: f.detail.clone(),
                })
                .collect(),
            pid: std::process::id(),
            started_at: Some(self.started_at.into()),
            max_code_bytes: self.config.max_code_bytes,
        }
    }

    fn session(&self, id: &str) -> DaemonResult<Arc<Session>> {
        if id.is_empty() {
            return Err(DaemonError::invalid("session_id", "is empty"));
        }
        lock(&self.sessions)
            .get(id)
            .cloned()
            .ok_or_else(|| DaemonError::no_session(id))
    }

    /// Looks up an execution (and touches its session).
    pub fn execution(&self, id: &str) -> DaemonResult<Arc<Execution>> {
        if id.is_empty() {
            return Err(DaemonError::invalid("execution_id", "is empty"));
        }
        let e = lock(&self.executions)
            .get(id)
            .cloned()
            .ok_or_else(|| DaemonError::no_execution(id))?;
        if let Some(s) = lock(&self.sessions).get(&e.session_id) {
            s.touch();
        }
        Ok(e)
    }

    /// CreateSession.
    pub async fn create_session(&self, req: pb::CreateSessionRequest) -> DaemonResult<pb::Session> {
        let id = if req.session_id.is_empty() {
            format!("s-{}", uuid::Uuid::new_v4().simple())
        } else {
            if !StateStore::valid_id(&req.session_id) {
                return Err(DaemonError::invalid(
                    "session_id",
                    format!(
                        "{:?} must be 1-128 ASCII letters, digits, '-', '_' or '.'",
                        req.session_id
                    ),
                ));
            }
            req.session_id.clone()
        };
        let session = Arc::new(Session::new(
            id.clone(),
            req.owner,
            req.config.unwrap_or_default(),
            &self.runtimes,
            SystemTime::now(),
        )?);
        {
            let mut map = lock(&self.sessions);
            if map.contains_key(&id) {
                return Err(DaemonError::AlreadyExists {
                    what: "session",
                    id,
                });
            }
            map.insert(id.clone(), session.clone());
        }
        self.pools.open_session(&session);
        let state = self.state.clone();
        let rec = session.record();
        let saved = tokio::task::spawn_blocking(move || state.save_session(&rec)).await;
        // The session serves either way; a daemon restarted before it is saved forgets it, and
        // the plugin's next fingerprint creates it again.
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(session = %id, error = %e, "cannot persist session"),
            Err(e) => tracing::warn!(session = %id, error = %e, "cannot persist session"),
        }
        Ok(self.session_proto(&session))
    }

    /// A session in the API form, with its pools.
    fn session_proto(&self, s: &Session) -> pb::Session {
        pb::Session {
            pools: self
                .pools
                .pool(&s.id)
                .map(|p| p.status())
                .unwrap_or_default(),
            ..s.to_proto()
        }
    }

    /// GetSession.
    pub fn get_session(&self, id: &str) -> DaemonResult<pb::Session> {
        let s = self.session(id)?;
        s.touch();
        Ok(self.session_proto(&s))
    }

    /// ListSessions.
    pub fn list_sessions(&self) -> Vec<pb::Session> {
        let sessions: Vec<Arc<Session>> = lock(&self.sessions).values().cloned().collect();
        let mut v: Vec<pb::Session> = sessions.iter().map(|s| self.session_proto(s)).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// CloseSession: stops every execution (grace, then SIGKILL), then forgets the session and
    /// its executions.
    /// (Runs to its end even when the caller goes away: see `detached`.)
    pub async fn close_session(
        self: &Arc<Self>,
        id: &str,
        grace: Option<&prost_types::Duration>,
    ) -> DaemonResult<()> {
        let (me, id, grace) = (self.clone(), id.to_string(), grace.cloned());
        detached(async move { me.close_session_inner(&id, grace.as_ref(), true).await }).await
    }

    /// Closes a session; with `forget` false its ended executions stay queryable by id until
    /// `ended_retention` (idle reclaim must not lose a result a returning client will ask for).
    async fn close_session_inner(
        &self,
        id: &str,
        grace: Option<&prost_types::Duration>,
        forget: bool,
    ) -> DaemonResult<()> {
        let grace = match grace {
            Some(d) => duration("grace", d)?,
            None => DEFAULT_GRACE,
        };
        let s = self.session(id)?;
        s.mark_closed();
        let execs = s.executions();
        futures::future::join_all(
            execs
                .iter()
                .filter(|e| e.phase() != Phase::Exited)
                .map(|e| e.stop(Signal::SIGTERM, grace)),
        )
        .await;
        self.pools.close_session(id).await;
        lock(&self.sessions).remove(id);
        if forget {
            let mut map = lock(&self.executions);
            for e in &execs {
                map.remove(&e.id);
            }
        }
        let state = self.state.clone();
        let id_owned = id.to_string();
        let ids: Vec<String> = if forget {
            execs.iter().map(|e| e.id.clone()).collect()
        } else {
            Vec::new()
        };
        let _ = tokio::task::spawn_blocking(move || {
            for e in ids {
                state.remove_execution(&e);
            }
            state.remove_session(&id_owned);
        })
        .await;
        self.events.emit(
            pb::EventKind::SessionClosed,
            &EventSubject {
                session_id: id,
                execution_id: "",
                client_ref: "",
            },
            format!("session closed ({} executions)", execs.len()),
            HashMap::new(),
        );
        Ok(())
    }

    /// StartExecution: validates, plans, launches; returns once the process runs.
    ///
    /// The start runs to its end on a task of its own even when the caller goes away (a client
    /// timeout, a plugin killed mid-call): dropped halfway, it would leave a process that nobody
    /// supervises and an execution stuck in `Starting`. An execution whose caller never learned
    /// its id is stopped at once: nobody could wait for it or stop it.
    pub async fn start_execution(
        self: &Arc<Self>,
        req: pb::StartExecutionRequest,
        caller: Caller,
    ) -> DaemonResult<pb::Execution> {
        let gone = CancellationToken::new();
        let _present = gone.clone().drop_guard();
        let me = self.clone();
        detached(async move { me.start_detached(req, caller, gone).await }).await
    }

    async fn start_detached(
        &self,
        mut req: pb::StartExecutionRequest,
        caller: Caller,
        caller_gone: CancellationToken,
    ) -> DaemonResult<pb::Execution> {
        let session = self.session(&req.session_id)?;
        if session.is_closed() {
            return Err(DaemonError::FailedPrecondition(format!(
                "session_id: session {:?} is closing",
                req.session_id
            )));
        }
        session.touch();
        // A non-root peer may only run code as itself.
        let own_uid = nix::unistd::geteuid().as_raw();
        if let Some(uid) = caller.uid
            && uid != 0
            && uid != own_uid
        {
            if req.user.is_empty() {
                req.user = uid.to_string();
            } else if req.user != uid.to_string() {
                return Err(DaemonError::PermissionDenied(format!(
                    "user: caller uid {uid} may only run executions as itself, not as {:?}",
                    req.user
                )));
            }
        }
        let id = format!("e-{}", uuid::Uuid::new_v4().simple());
        let inline_plan = super::plan::is_brief(&req);
        let plan = {
            let ctx_languages = session.languages.clone();
            let intrinsics = session.intrinsics;
            let memory_cap = session.memory_cap;
            let merge_pages = session.merge_pages;
            let max_code_bytes = self.config.max_code_bytes;
            let run_dir = self.config.run_dir.clone();
            let runtimes = self.runtimes.clone();
            let id = id.clone();
            let strip = self.strip_cache.clone();
            let plan = move || {
                let ctx = PlanContext {
                    runtimes: &runtimes,
                    session_languages: &ctx_languages,
                    intrinsics,
                    session_memory_cap: memory_cap,
                    merge_pages,
                    max_code_bytes,
                    run_dir: &run_dir,
                    strip_cache: &strip,
                };
                plan_execution(&ctx, &id, &req)
            };
            if inline_plan {
                plan()?
            } else {
                super::blocking::offload(plan)
                    .await
                    .map_err(|e| DaemonError::Internal(format!("planning task failed: {e}")))??
            }
        };
        let exec = Execution::new(plan.clone());
        let exec_dir = plan.exec_dir.clone();
        lock(&self.executions).insert(id.clone(), exec.clone());
        session.add(exec.clone());
        self.events.emit(
            pb::EventKind::Queued,
            &EventSubject {
                session_id: &exec.session_id,
                execution_id: &exec.id,
                client_ref: &exec.client_ref,
            },
            "validated; starting",
            HashMap::new(),
        );
        match self.launcher.launch(plan).await {
            Ok(launched) => {
                exec.start_supervisor(
                    launched,
                    SupervisorContext {
                        state: self.state.clone(),
                        events: self.events.clone(),
                        max_capture_bytes: self.config.max_capture_bytes as usize,
                    },
                );
                // Recorded before the client learns the id, so that a daemon restarted after a
                // crash can still answer for it.
                // An append to the journal (page cache): inline, see `blocking`.
                if let Err(e) = exec.persist_started(&self.state) {
                    tracing::warn!(execution = %exec.id, error = %e, "cannot record the started execution");
                }
                if session.is_closed() {
                    // CloseSession ran while this one was starting and did not see it.
                    exec.kill_all();
                    return Err(DaemonError::FailedPrecondition(format!(
                        "session_id: session {:?} was closed while the execution started; it was stopped",
                        exec.session_id
                    )));
                }
                if caller_gone.is_cancelled() {
                    tracing::warn!(execution = %exec.id, client_ref = %exec.client_ref, "the client went away before the execution started; stopped it");
                    exec.kill_all();
                    return Err(DaemonError::Internal(
                        "the client went away before the execution started".into(),
                    ));
                }
                Ok(exec.to_proto())
            }
            Err(e) => {
                exec.fail_start(e.to_string());
                lock(&self.executions).remove(&id);
                session.remove(&id);
                let _ =
                    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(exec_dir)).await;
                Err(match e {
                    LaunchError::Sink { field, message } => DaemonError::invalid(field, message),
                    e if e.is_exhaustion() => DaemonError::Unavailable(format!(
                        "{e} (the node or the daemon is out of descriptors, processes or \
                         memory for now: the start can be retried; for the daemon's open-file \
                         limit, raise its hard limit, systemd: LimitNOFILE=)"
                    )),
                    other => DaemonError::Internal(other.to_string()),
                })
            }
        }
    }

    /// GetExecution.
    pub fn get_execution(&self, id: &str) -> DaemonResult<pb::Execution> {
        Ok(self.execution(id)?.to_proto())
    }

    /// ListExecutions.
    pub fn list_executions(&self, session_id: &str) -> DaemonResult<Vec<pb::Execution>> {
        let execs: Vec<Arc<Execution>> = if session_id.is_empty() {
            lock(&self.executions).values().cloned().collect()
        } else {
            let s = self.session(session_id)?;
            s.touch();
            s.executions()
        };
        let mut v: Vec<pb::Execution> = execs.iter().map(|e| e.to_proto()).collect();
        v.sort_by(|a, b| {
            let ka = a.started_at.as_ref().map(|t| (t.seconds, t.nanos));
            let kb = b.started_at.as_ref().map(|t| (t.seconds, t.nanos));
            ka.cmp(&kb).then(a.id.cmp(&b.id))
        });
        Ok(v)
    }

    /// WaitExecution.
    pub async fn wait_execution(&self, id: &str) -> DaemonResult<pb::WaitExecutionResponse> {
        let e = self.execution(id)?;
        let r = e.wait().await;
        Ok(pb::WaitExecutionResponse {
            result: Some(result_to_proto(&r)),
            execution: Some(e.to_proto()),
        })
    }

    /// SignalExecution.
    pub fn signal_execution(&self, id: &str, signal: &str) -> DaemonResult<()> {
        let sig =
            parse_signal(signal).map_err(|e| DaemonError::invalid("signal", e.to_string()))?;
        let e = self.execution(id)?;
        if e.phase() != Phase::Running {
            return Err(DaemonError::FailedPrecondition(format!(
                "execution {id:?} is not running (it has ended); cannot send {sig}"
            )));
        }
        e.signal_group(sig).map_err(|err| {
            DaemonError::Internal(format!("sending {sig} to execution {id:?}: {err}"))
        })?;
        self.events.emit(
            pb::EventKind::Signaled,
            &EventSubject {
                session_id: &e.session_id,
                execution_id: &e.id,
                client_ref: &e.client_ref,
            },
            format!("{sig} sent to the process group"),
            HashMap::new(),
        );
        Ok(())
    }

    /// StopExecution.
    pub async fn stop_execution(
        &self,
        id: &str,
        signal: &str,
        grace: Option<&prost_types::Duration>,
    ) -> DaemonResult<ResultRecord> {
        let sig = if signal.is_empty() {
            Signal::SIGTERM
        } else {
            parse_signal(signal).map_err(|e| DaemonError::invalid("signal", e.to_string()))?
        };
        let grace = match grace {
            Some(d) => duration("grace", d)?,
            None => DEFAULT_GRACE,
        };
        let e = self.execution(id)?;
        // Once signalled, the escalation to SIGKILL must happen even if the caller goes away.
        detached(async move { Ok(e.stop(sig, grace).await) }).await
    }

    /// GetExecutionStats.
    pub async fn stats(&self, id: &str) -> DaemonResult<pb::ExecutionStats> {
        let e = self.execution(id)?;
        tokio::task::spawn_blocking(move || e.stats())
            .await
            .map_err(|err| DaemonError::Internal(format!("stats task failed: {err}")))
    }

    /// RemoveExecution.
    pub async fn remove_execution(&self, id: &str, force: bool) -> DaemonResult<()> {
        let e = self.execution(id)?;
        if e.phase() != Phase::Exited {
            if !force {
                return Err(DaemonError::FailedPrecondition(format!(
                    "execution {id:?} is still running; stop it first or set force"
                )));
            }
            e.stop(Signal::SIGKILL, Duration::ZERO).await;
        }
        lock(&self.executions).remove(id);
        if let Some(s) = lock(&self.sessions).get(&e.session_id) {
            s.remove(id);
        }
        let state = self.state.clone();
        let id = id.to_string();
        let _ = tokio::task::spawn_blocking(move || state.remove_execution(&id)).await;
        Ok(())
    }

    /// One pass of housekeeping: closes idle sessions, forgets long-ended executions.
    pub async fn housekeeping(&self) {
        let now = SystemTime::now();
        let idle: Vec<String> = lock(&self.sessions)
            .values()
            .filter(|s| {
                s.running() == 0
                    && now.duration_since(s.last_activity()).unwrap_or_default()
                        > self.config.session_idle_ttl
            })
            .map(|s| s.id.clone())
            .collect();
        for id in idle {
            tracing::info!(session = %id, "closing idle session");
            let _ = self.close_session_inner(&id, None, false).await;
        }
        let old: Vec<String> = lock(&self.executions)
            .values()
            .filter(|e| {
                e.phase() == Phase::Exited
                    && e.to_proto()
                        .ended_at
                        .and_then(|t| SystemTime::try_from(t).ok())
                        .is_some_and(|t| {
                            now.duration_since(t).unwrap_or_default() > self.config.ended_retention
                        })
            })
            .map(|e| e.id.clone())
            .collect();
        for id in old {
            let _ = self.remove_execution(&id, false).await;
        }
    }

    /// Runs housekeeping until shutdown.
    pub async fn run_housekeeping(self: Arc<Self>) {
        let period = (self.config.session_idle_ttl / 4)
            .clamp(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => self.housekeeping().await,
            }
        }
    }

    /// Stops every running execution (used at daemon shutdown).
    pub async fn stop_all(&self, grace: Duration) {
        let execs: Vec<Arc<Execution>> = lock(&self.executions)
            .values()
            .filter(|e| e.phase() != Phase::Exited)
            .cloned()
            .collect();
        futures::future::join_all(execs.iter().map(|e| e.stop_for_shutdown(grace))).await;
        self.pools.close_all().await;
    }

    /// The cgroups executions run in.
    pub fn cgroups(&self) -> &CgroupManager {
        &self.cgroups
    }

    /// The warm pools (pids of pool processes, for tests and benchmarks).
    pub fn pools(&self) -> &PoolLauncher {
        &self.pools
    }
}
