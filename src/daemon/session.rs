//! Sessions: a configuration (languages, intrinsics, memory cap, pool size) shared by the
//! executions started in it. A session belongs to the daemon, not to a connection: it lives
//! until closed or until it has been idle (no running execution, no activity) for the TTL.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::error::{DaemonError, DaemonResult};
use super::execution::{Execution, Phase};
use super::plan::IntrinsicSet;
use super::runtime::{Language, RuntimeRegistry};
use super::state::SessionRecord;
use crate::proto::elide::daemon::v1alpha1 as pb;
use crate::sandbox::page_merge;

/// The largest `context_pool_size` a session takes: warm runtimes per language, each a process
/// (a typo guard before it is a resource decision: 10,000 would start 10,000 node processes).
pub const MAX_CONTEXT_POOL_SIZE: u32 = 256;

/// The largest `memory_limit_mb`: the most MiB whose bytes a u64 holds.
pub const MAX_MEMORY_LIMIT_MB: u64 = u64::MAX >> 20;

/// Refuses `got` above `max`, naming `field`.
fn at_most(field: &str, got: u64, max: u64, unit: &str) -> DaemonResult<()> {
    if got > max {
        return Err(DaemonError::invalid(
            field,
            format!("must be at most {max}{unit}, got {got}"),
        ));
    }
    Ok(())
}

/// A session.
pub struct Session {
    /// Unique id.
    pub id: String,
    /// Owner label.
    pub owner: String,
    /// Config as requested.
    pub config: pb::SessionConfig,
    /// Canonical languages it runs.
    pub languages: Vec<Language>,
    /// Kernel-enforced capabilities.
    pub intrinsics: IntrinsicSet,
    /// Memory cap for each execution.
    pub memory_cap: Option<u64>,
    /// Whether its executions and warm runtimes offer their memory for same-page merging:
    /// asked for, and possible on this kernel.
    pub merge_pages: bool,
    /// Creation time.
    pub created_at: SystemTime,
    last_activity: Mutex<SystemTime>,
    executions: Mutex<Vec<Arc<Execution>>>,
    total: AtomicU32,
    closed: AtomicBool,
}

impl Session {
    /// Validates `config` against the node's runtimes and builds the session.
    pub fn new(
        id: String,
        owner: String,
        config: pb::SessionConfig,
        runtimes: &RuntimeRegistry,
        created_at: SystemTime,
    ) -> DaemonResult<Self> {
        let mut languages = Vec::new();
        if config.enabled_languages.is_empty() {
            languages.extend(
                runtimes
                    .all()
                    .iter()
                    .filter(|r| r.available)
                    .map(|r| r.language),
            );
        } else {
            for (i, name) in config.enabled_languages.iter().enumerate() {
                let lang = Language::parse(name).ok_or_else(|| {
                    DaemonError::invalid(
                        format!("config.enabled_languages[{i}]"),
                        format!(
                            "unknown language {name:?}; expected python, javascript, typescript (or py/js/ts)"
                        ),
                    )
                })?;
                if !languages.contains(&lang) {
                    languages.push(lang);
                }
            }
        }
        let intrinsics =
            IntrinsicSet::parse(&config.enabled_intrinsics, "config.enabled_intrinsics")?;
        at_most(
            "config.context_pool_size",
            config.context_pool_size.into(),
            MAX_CONTEXT_POOL_SIZE.into(),
            "",
        )?;
        at_most(
            "config.memory_limit_mb",
            config.memory_limit_mb,
            MAX_MEMORY_LIMIT_MB,
            " (MiB)",
        )?;
        let memory_cap = (config.memory_limit_mb > 0).then_some(config.memory_limit_mb << 20);
        let merge_pages = config.merge_identical_pages && page_merge::available();
        if config.merge_identical_pages && !merge_pages {
            tracing::warn!(
                session = %id,
                "merge_identical_pages: this kernel cannot offer memory for merging (needs Linux 6.4+ with KSM); the session runs without"
            );
        } else if merge_pages && !page_merge::ksmd_running() {
            tracing::warn!(
                session = %id,
                "merge_identical_pages: ksmd is not running here, so no page merges until the host enables it (echo 1 > /sys/kernel/mm/ksm/run)"
            );
        }
        Ok(Self {
            id,
            owner,
            config,
            languages,
            intrinsics,
            memory_cap,
            merge_pages,
            created_at,
            last_activity: Mutex::new(SystemTime::now()),
            executions: Mutex::new(Vec::new()),
            total: AtomicU32::new(0),
            closed: AtomicBool::new(false),
        })
    }

    /// Rebuilds a persisted session.
    pub fn from_record(rec: &SessionRecord, runtimes: &RuntimeRegistry) -> DaemonResult<Self> {
        let config = pb::SessionConfig {
            context_pool_size: rec.context_pool_size,
            enabled_languages: rec.enabled_languages.clone(),
            enabled_intrinsics: rec.enabled_intrinsics.clone(),
            memory_limit_mb: rec.memory_limit_mb,
            enable_ai: rec.enable_ai,
            merge_identical_pages: rec.merge_identical_pages,
        };
        Self::new(
            rec.id.clone(),
            rec.owner.clone(),
            config,
            runtimes,
            rec.created_at,
        )
    }

    /// The persisted form.
    pub fn record(&self) -> SessionRecord {
        SessionRecord {
            id: self.id.clone(),
            owner: self.owner.clone(),
            context_pool_size: self.config.context_pool_size,
            enabled_languages: self.config.enabled_languages.clone(),
            enabled_intrinsics: self.config.enabled_intrinsics.clone(),
            memory_limit_mb: self.config.memory_limit_mb,
            enable_ai: self.config.enable_ai,
            merge_identical_pages: self.config.merge_identical_pages,
            created_at: self.created_at,
        }
    }

    fn execs(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Execution>>> {
        self.executions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes client activity (keeps the session from idle reclaim).
    pub fn touch(&self) {
        *self.last_activity.lock().unwrap_or_else(|p| p.into_inner()) = SystemTime::now();
    }

    /// Last client activity.
    pub fn last_activity(&self) -> SystemTime {
        *self.last_activity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an execution.
    pub fn add(&self, e: Arc<Execution>) {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.execs().push(e);
        self.touch();
    }

    /// Removes an execution.
    pub fn remove(&self, id: &str) {
        self.execs().retain(|e| e.id != id);
    }

    /// The session's executions.
    pub fn executions(&self) -> Vec<Arc<Execution>> {
        self.execs().clone()
    }

    /// How many have not ended.
    pub fn running(&self) -> u32 {
        self.execs()
            .iter()
            .filter(|e| e.phase() != Phase::Exited)
            .count() as u32
    }

    /// Marks the session closed (no new executions); returns false if it already was.
    pub fn mark_closed(&self) -> bool {
        !self.closed.swap(true, Ordering::SeqCst)
    }

    /// Whether it was closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The API form.
    pub fn to_proto(&self) -> pb::Session {
        pb::Session {
            id: self.id.clone(),
            config: Some(self.config.clone()),
            owner: self.owner.clone(),
            created_at: Some(self.created_at.into()),
            last_activity_at: Some(self.last_activity().into()),
            running_executions: self.running(),
            total_executions: self.total.load(Ordering::Relaxed),
            languages: self
                .languages
                .iter()
                .map(|l| l.name().to_string())
                .collect(),
            // The pools are the launcher's: the service adds them.
            pools: Vec::new(),
        }
    }
}
