//! What the plugin process remembers between RPCs: the config from SetConfig, whether the
//! Nomad client (not just the validation launch) configured us, and our daemon session.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::config::PluginConfig;
use super::daemon_link::DaemonLink;
use super::dangling::Dangling;
use super::inherited::Inherited;
use super::tasks::TaskStore;
use crate::proto::elide::daemon::v1alpha1 as api;

/// A consistent copy of the configuration-related state.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The last accepted config (from any SetConfig).
    pub config: Option<Arc<PluginConfig>>,
    /// True once SetConfig arrived with `nomad_config` (the long-lived instance).
    pub agent_configured: bool,
    /// Our session id in the daemon, named after the config at that SetConfig
    /// ([`session_id_for`]).
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
    /// What earlier plugin processes left running in our session.
    pub inherited: Inherited,
    /// Alloc roots seen, for stopping executions Nomad no longer tracks.
    pub dangling: Dangling,
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
            inherited: Inherited::default(),
            dangling: Dangling::default(),
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

    /// Stores the agent's config and returns the session id to use ([`session_id_for`]).
    pub fn set_agent_config(&self, config: PluginConfig) -> String {
        let id = session_id_for(&config);
        {
            let mut s = self.lock();
            s.config = Some(Arc::new(config));
            s.agent_configured = true;
            s.session_id = Some(id.clone());
        }
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

/// The daemon session for an agent config, named after its `session_config`: every plugin
/// process the agent launches with that config (a new one on each agent restart) uses the same
/// session and its warm pools. A session per process would leave one behind per restart, pools
/// included, for as long as any task it started runs (and then the idle TTL).
pub fn session_id_for(cfg: &PluginConfig) -> String {
    use prost::Message;
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(session_config(cfg).encode_to_vec());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("nomad-{hex}")
}

/// The owner label the daemon shows for our session (the plugin process that created it).
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
        merge_identical_pages: cfg.session.merge_identical_pages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nomad::config::Language;

    #[test]
    fn the_session_is_named_after_its_config_alone() {
        let cfg = PluginConfig::default();
        let id = session_id_for(&cfg);
        assert!(id.starts_with("nomad-") && id.len() == 22, "{id}");
        // Another plugin process with the same config: the same session.
        let state = PluginState::new(CancellationToken::new());
        assert_eq!(state.set_agent_config(cfg.clone()), id);
        assert_eq!(session_id_for(&PluginConfig::default()), id);
        // Any change to session_config: another session.
        let mut bigger = cfg.clone();
        bigger.session.context_pool_size += 1;
        assert_ne!(session_id_for(&bigger), id);
        let mut python_only = cfg.clone();
        python_only.session.enabled_languages = vec![Language::Python];
        assert_ne!(session_id_for(&python_only), id);
        let mut merging = cfg.clone();
        merging.session.merge_identical_pages = true;
        assert!(session_config(&merging).merge_identical_pages);
        assert_ne!(session_id_for(&merging), id);
        // A new config at a later SetConfig moves the plugin to its session.
        assert_eq!(
            state.set_agent_config(bigger.clone()),
            session_id_for(&bigger)
        );
        assert_eq!(state.snapshot().session_id, Some(session_id_for(&bigger)));
    }
}
