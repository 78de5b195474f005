//! What the plugin process remembers between RPCs: the config from SetConfig, whether the
//! Nomad client (not just the validation launch) configured us, and our daemon session.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::config::PluginConfig;
use super::daemon_link::DaemonLink;
use super::tasks::TaskStore;
use crate::proto::elide::daemon::v1alpha1 as api;

/// A consistent copy of the configuration-related state.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The last accepted config (from any SetConfig).
    pub config: Option<Arc<PluginConfig>>,
    /// True once SetConfig arrived with `nomad_config` (the long-lived instance).
    pub agent_configured: bool,
    /// Our session id in the daemon, chosen at that SetConfig.
    pub session_id: Option<String>,
}

/// Shared plugin state; cheap to clone behind an `Arc`.
#[derive(Debug)]
pub struct PluginState {
    inner: Mutex<Snapshot>,
    changed: watch::Sender<u64>,
    /// Cancelled when the plugin shuts down; long-lived streams end then.
    pub shutdown: CancellationToken,
    /// The shared daemon connection (auto-start, reconnect, session).
    pub link: DaemonLink,
    /// The tasks this plugin process handles.
    pub tasks: TaskStore,
}

impl PluginState {
    /// Empty state: not configured.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            inner: Mutex::new(Snapshot::default()),
            changed: watch::channel(0).0,
            shutdown,
            link: DaemonLink::default(),
            tasks: TaskStore::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Snapshot> {
        // A poisoned lock only means a panic elsewhere; the data is plain values.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state.
    pub fn snapshot(&self) -> Snapshot {
        self.lock().clone()
    }

    /// Stores a config from the validation launch (no `nomad_config`): nothing else changes.
    pub fn set_validated_config(&self, config: PluginConfig) {
        self.lock().config = Some(Arc::new(config));
        self.notify();
    }

    /// Stores the agent's config and returns the session id to use (kept across repeated
    /// SetConfig calls so the daemon sees one session per plugin process).
    pub fn set_agent_config(&self, config: PluginConfig) -> String {
        let id = {
            let mut s = self.lock();
            s.config = Some(Arc::new(config));
            s.agent_configured = true;
            s.session_id
                .get_or_insert_with(|| format!("nomad-{}", uuid::Uuid::new_v4()))
                .clone()
        };
        self.notify();
        id
    }

    /// Wakes the fingerprint loop.
    pub fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes whenever the config does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The owner label the daemon shows for our session.
pub fn session_owner() -> String {
    format!("nomad-plugin pid {}", std::process::id())
}

/// The daemon's session config for `cfg`.
pub fn session_config(cfg: &PluginConfig) -> api::SessionConfig {
    api::SessionConfig {
        context_pool_size: cfg.session.context_pool_size,
        enabled_languages: cfg
            .session
            .enabled_languages
            .iter()
            .map(|l| l.as_str().to_string())
            .collect(),
        enabled_intrinsics: cfg
            .session
            .enabled_intrinsics
            .iter()
            .map(|i| i.as_str().to_string())
            .collect(),
        memory_limit_mb: cfg.session.memory_limit_mb,
        enable_ai: cfg.session.enable_ai,
    }
}
