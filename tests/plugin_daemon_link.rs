//! How the plugin treats what it finds on `daemon_socket`: a daemon is started only where none
//! is, never next to one that is there but does not serve it.

#[path = "daemon_support/mod.rs"]
mod daemon_support;
mod lifecycle_support;
mod support;

use elide_task_driver::proto::hashicorp::nomad::plugins::drivers::proto::fingerprint_response::HealthState;
use lifecycle_support::{Alloc, AutoDaemon, DEADLINE, Plugin, daemons_on, plugin_config};
use serde_json::json;
use support::fingerprint_until;

/// Something listens on the socket and accepts, but never answers (a hung daemon, or not a
/// daemon at all): the plugin reports it in its fingerprint and fails StartTask naming it, and
/// starts no second daemon, which would only stop at the first's socket and hide the cause.
#[tokio::test]
async fn a_socket_that_accepts_but_never_answers_is_reported_not_replaced() {
    let root = tempfile::Builder::new()
        .prefix("hung")
        .tempdir_in("/tmp")
        .unwrap();
    let auto = AutoDaemon::new(root.path());
    let listener = tokio::net::UnixListener::bind(&auto.socket).unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        loop {
            if let Ok((c, _)) = listener.accept().await {
                conns.push(c);
            }
        }
    });
    let plugin = Plugin::launch(&plugin_config(&auto.socket, Some(&auto))).await;
    let mut fp = plugin.client.fingerprint().await;
    let m = fingerprint_until(&mut fp, DEADLINE, |m| {
        m.health == HealthState::Unhealthy as i32
    })
    .await;
    assert!(
        m.health_description.contains("does not answer"),
        "{}",
        m.health_description
    );
    let alloc = Alloc::new(root.path());
    let t = alloc.task("t");
    let e = plugin
        .start_json(&t, json!({"language": "python", "code": "print(1)"}))
        .await
        .unwrap_err();
    assert!(e.message().contains("does not answer"), "{e:?}");
    assert!(
        daemons_on(&auto.socket).is_empty(),
        "a daemon was started next to the listener"
    );
    assert!(
        !auto.log.exists(),
        "an auto-start was tried: {:?}",
        std::fs::read_to_string(&auto.log)
    );
    plugin.alive().await;
    held.abort();
}
