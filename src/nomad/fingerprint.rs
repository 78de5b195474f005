//! The Fingerprint stream: the driver's health as Nomad sees it.
//!
//! - UNDETECTED until the Nomad client configured us (SetConfig with `nomad_config`);
//! - HEALTHY only when the daemon answers GetDaemonInfo and our session exists (re-created
//!   when the daemon lost it, e.g. after a restart);
//! - UNHEALTHY otherwise, with a description telling the operator what to do.
//!
//! The first message goes out at once, then after every change of config and every
//! `fingerprint_period`; the stream only ends when the client cancels it or the plugin stops.
//! Values are stable (no timestamps or counters): each change is a node update in Nomad.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::PLUGIN_VERSION;
use super::config::{DEFAULT_FINGERPRINT_PERIOD, Language};
use super::daemon_link::{DaemonLink, LinkError};
use super::state::{PluginState, Snapshot, session_config, session_owner};
use crate::proto::hashicorp::nomad::plugins::drivers::proto::{
    FingerprintResponse, fingerprint_response::HealthState,
};
use crate::proto::hashicorp::nomad::plugins::shared::structs::{Attribute, attribute};
use crate::sandbox::page_merge;

/// How long a health probe waits for the daemon link (which may be auto-starting the daemon,
/// for up to `daemon.start_timeout`): Nomad waits at most 50 s for a plugin's first
/// fingerprint before it updates the node without it.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Attribute: our version.
pub const ATTR_VERSION: &str = "driver.elide.version";
/// Attribute: the daemon's version.
pub const ATTR_DAEMON_VERSION: &str = "driver.elide.daemon_version";
/// Attribute: whether AI intrinsics are available ("true"/"false").
pub const ATTR_AI: &str = "driver.elide.ai";
/// Attribute: whether snippet memory is merged with identical pages (`session_config.
/// merge_identical_pages`): "off", "on", "ksmd off" (asked, but the host's ksmd does not run)
/// or "unsupported" (asked, but this kernel cannot).
pub const ATTR_PAGE_MERGING: &str = "driver.elide.page_merging";
/// Attribute: the daemon's cgroups, "v2", "v1" or "none" (tasks' memory, CPU and pids limits
/// hold only with cgroups: a job that needs them constrains on this).
pub const ATTR_CGROUPS: &str = "driver.elide.cgroups";
/// Attribute prefix: one per runtime available and enabled in the session, value = its version.
pub const ATTR_RUNTIME_PREFIX: &str = "driver.elide.runtime.";
/// Nomad's own wording for a healthy driver.
pub const HEALTHY_DESCRIPTION: &str = "Healthy";

/// The value of [`ATTR_PAGE_MERGING`]: the plugin runs on the daemon's node, so it sees the
/// same kernel and ksmd. The probes run only as far as the answer needs them: a node that
/// does not merge reads no sysfs file on each fingerprint.
fn page_merging(
    asked: bool,
    kernel_can: impl FnOnce() -> bool,
    ksmd_runs: impl FnOnce() -> bool,
) -> &'static str {
    if !asked {
        "off"
    } else if !kernel_can() {
        "unsupported"
    } else if !ksmd_runs() {
        "ksmd off"
    } else {
        "on"
    }
}

fn string_attr(s: &str) -> Attribute {
    Attribute {
        value: Some(attribute::Value::StringVal(s.to_string())),
        unit: String::new(),
    }
}

fn message(
    health: HealthState,
    description: String,
    attributes: BTreeMap<String, Attribute>,
) -> FingerprintResponse {
    FingerprintResponse {
        attributes: attributes.into_iter().collect(),
        health: health as i32,
        health_description: description,
        err: String::new(),
    }
}

/// Why the daemon at `socket` does not serve: `absent` (nothing answers there) comes with
/// what to do about it; a daemon that is there but refuses or hangs is described as such.
fn unserved(socket: &std::path::Path, detail: impl std::fmt::Display, absent: bool) -> String {
    if absent {
        format!(
            "elide-daemon not reachable at {}: {detail}; start it with `elide-daemon` or set daemon.auto_start",
            socket.display()
        )
    } else {
        format!(
            "elide-daemon at {} does not serve this plugin: {detail}",
            socket.display()
        )
    }
}

/// One health check: what Fingerprint should report right now.
pub async fn probe(link: &DaemonLink, snapshot: &Snapshot) -> FingerprintResponse {
    let mut attrs = BTreeMap::from([(ATTR_VERSION.to_string(), string_attr(PLUGIN_VERSION))]);
    let (Some(config), true, Some(session_id)) = (
        snapshot.config.as_ref(),
        snapshot.agent_configured,
        snapshot.session_id.as_ref(),
    ) else {
        return message(
            HealthState::Undetected,
            "waiting for the plugin configuration from the Nomad client".into(),
            attrs,
        );
    };
    let socket = &config.daemon_socket;
    // The shared link connects, auto-starts the daemon when allowed, and (re-)creates our
    // session, e.g. after the daemon restarted and lost it.
    let linked = tokio::time::timeout(PROBE_TIMEOUT, link.client(snapshot)).await;
    let client = match linked {
        Ok(Ok(c)) => c,
        Ok(Err(LinkError::Unreachable { detail, absent, .. })) => {
            return message(
                HealthState::Unhealthy,
                unserved(socket, detail, absent),
                attrs,
            );
        }
        Ok(Err(e)) => return message(HealthState::Unhealthy, e.to_string(), attrs),
        Err(_) => {
            return message(
                HealthState::Unhealthy,
                format!(
                    "elide-daemon at {} does not answer within {PROBE_TIMEOUT:?} (an auto-start may be under way)",
                    socket.display()
                ),
                attrs,
            );
        }
    };
    let info = match client.daemon_info().await {
        Ok(i) => i,
        Err(e) => {
            if e.is_unreachable() {
                link.invalidate();
            }
            let description = unserved(socket, &e, e.is_unreachable());
            return message(HealthState::Unhealthy, description, attrs);
        }
    };
    attrs.insert(ATTR_DAEMON_VERSION.into(), string_attr(&info.version));
    attrs.insert(ATTR_CGROUPS.into(), string_attr(&info.cgroup_mode));
    // A runtime the node has but the session leaves out is not advertised: a job that
    // constrains on it would be placed here and then refused at StartTask.
    for rt in info.runtimes.iter().filter(|r| r.available) {
        if let Some(lang) =
            Language::parse(&rt.language).filter(|l| config.session.enabled_languages.contains(l))
        {
            attrs.insert(
                format!("{ATTR_RUNTIME_PREFIX}{}", lang.as_str()),
                string_attr(&rt.version),
            );
        }
    }
    // AI intrinsics need the session flag and a runtime on the Elide backend (jobs constrain
    // on this, e.g. examples/ai-inference.nomad).
    let ai = config.session.enable_ai
        && info
            .runtimes
            .iter()
            .any(|r| r.available && r.backend == "elide");
    attrs.insert(
        ATTR_AI.into(),
        string_attr(if ai { "true" } else { "false" }),
    );
    attrs.insert(
        ATTR_PAGE_MERGING.into(),
        string_attr(page_merging(
            config.session.merge_identical_pages,
            page_merge::available,
            page_merge::ksmd_running,
        )),
    );
    let session = match client.get_session(session_id).await {
        Ok(s) => Ok(s),
        Err(e) if e.code() == Some(tonic::Code::NotFound) => {
            // The daemon does not know our session (first contact, or it restarted).
            client
                .create_session(session_id, &session_owner(), session_config(config))
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = session {
        return message(
            HealthState::Unhealthy,
            format!(
                "elide-daemon at {} is up but session {session_id} is not usable: {e}",
                socket.display()
            ),
            attrs,
        );
    }
    let available: Vec<Language> = info
        .runtimes
        .iter()
        .filter(|r| r.available)
        .filter_map(|r| Language::parse(&r.language))
        .collect();
    if !config
        .session
        .enabled_languages
        .iter()
        .any(|l| available.contains(l))
    {
        let enabled: Vec<&str> = config
            .session
            .enabled_languages
            .iter()
            .map(|l| l.as_str())
            .collect();
        return message(
            HealthState::Unhealthy,
            format!(
                "elide-daemon at {} has none of the enabled languages ({}) available; install their runtimes or change session_config.enabled_languages",
                socket.display(),
                enabled.join(", ")
            ),
            attrs,
        );
    }
    message(HealthState::Healthy, HEALTHY_DESCRIPTION.into(), attrs)
}

/// Adds empty values for keys sent before but absent now: Nomad only removes a node attribute
/// when it receives the key with no value.
fn clear_vanished(msg: &mut FingerprintResponse, previous: &BTreeMap<String, ()>) {
    for key in previous.keys() {
        msg.attributes
            .entry(key.clone())
            .or_insert_with(|| Attribute {
                value: None,
                unit: String::new(),
            });
    }
}

/// Starts the fingerprint loop for one stream; messages go to the returned receiver.
pub fn spawn(state: Arc<PluginState>) -> mpsc::Receiver<FingerprintResponse> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        // The agent holds this stream for as long as it uses the plugin.
        let _attached = state.dangling.agent_attached();
        let mut changes = state.subscribe();
        let mut sent_keys: BTreeMap<String, ()> = BTreeMap::new();
        loop {
            changes.mark_unchanged();
            let snapshot = state.snapshot();
            let period = snapshot
                .config
                .as_ref()
                .map_or(DEFAULT_FINGERPRINT_PERIOD, |c| c.fingerprint_period);
            let mut msg = tokio::select! {
                m = probe(&state.link, &snapshot) => m,
                () = tx.closed() => return,
                () = state.shutdown.cancelled() => return,
            };
            clear_vanished(&mut msg, &sent_keys);
            sent_keys = msg
                .attributes
                .iter()
                .filter(|(_, v)| v.value.is_some())
                .map(|(k, _)| (k.clone(), ()))
                .collect();
            if tx.send(msg).await.is_err() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                r = changes.changed() => if r.is_err() { return },
                () = tx.closed() => return,
                () = state.shutdown.cancelled() => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nomad::config::PluginConfig;

    #[tokio::test]
    async fn undetected_before_agent_config() {
        let msg = probe(&DaemonLink::default(), &Snapshot::default()).await;
        assert_eq!(msg.health, HealthState::Undetected as i32);
        assert!(msg.attributes.contains_key(ATTR_VERSION));
    }

    #[tokio::test]
    async fn unhealthy_with_operator_hint_when_socket_missing() {
        let dir = tempfile::Builder::new()
            .prefix("e")
            .tempdir_in("/tmp")
            .unwrap();
        let socket = dir.path().join("none.sock");
        let snapshot = Snapshot {
            config: Some(Arc::new(PluginConfig {
                daemon_socket: socket.clone(),
                daemon: crate::nomad::config::DaemonSettings {
                    auto_start: false,
                    ..Default::default()
                },
                ..PluginConfig::default()
            })),
            agent_configured: true,
            session_id: Some("nomad-x".into()),
        };
        let link = DaemonLink::default();
        let a = probe(&link, &snapshot).await;
        let b = probe(&link, &snapshot).await;
        assert_eq!(a.health, HealthState::Unhealthy as i32);
        assert!(
            a.health_description.contains(&socket.display().to_string()),
            "{}",
            a.health_description
        );
        assert!(
            a.health_description
                .contains("start it with `elide-daemon`"),
            "{}",
            a.health_description
        );
        // Stable wording: repeated probes must not churn node updates.
        assert_eq!(a, b);
    }

    #[test]
    fn page_merging_says_whether_it_is_asked_and_can_happen() {
        let never = || -> bool { panic!("probed although the answer was known") };
        let yes = || true;
        let no = || false;
        assert_eq!(page_merging(false, never, never), "off");
        assert_eq!(page_merging(true, no, never), "unsupported");
        assert_eq!(page_merging(true, yes, no), "ksmd off");
        assert_eq!(page_merging(true, yes, yes), "on");
    }

    #[test]
    fn vanished_keys_are_cleared_with_empty_values() {
        let mut msg = message(HealthState::Unhealthy, "x".into(), BTreeMap::new());
        clear_vanished(
            &mut msg,
            &BTreeMap::from([("driver.elide.runtime.python".to_string(), ())]),
        );
        assert_eq!(msg.attributes["driver.elide.runtime.python"].value, None);
    }
}
