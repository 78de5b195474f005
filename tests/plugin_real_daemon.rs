//! The plugin against the real `elide-daemon` (not the fake): SetConfig creates the session,
//! Fingerprint goes HEALTHY with the machine's real runtimes, and UNHEALTHY when the daemon
//! is killed, HEALTHY again once it is back (session re-created).

mod daemon_support;
mod support;

use elide_task_driver::proto::elide::daemon::v1alpha1 as api;
use elide_task_driver::proto::hashicorp::nomad::plugins::drivers::proto::fingerprint_response::HealthState;
use elide_task_driver::proto::hashicorp::nomad::plugins::shared::structs::attribute::Value as AttrValue;
use serde_json::json;
use support::{NomadClient, fingerprint_until};

#[tokio::test]
async fn fingerprint_follows_the_real_daemon() {
    let mut daemon = daemon_support::TestDaemon::start().await;
    let c = NomadClient::launch().await;
    c.set_config(
        json!({"daemon_socket": daemon.socket.display().to_string(), "fingerprint_period": "1s",
               "session_config": {"context_pool_size": 1, "enabled_languages": ["python", "js"]},
               // The test restarts the daemon itself; the plugin must not start one meanwhile.
               "daemon": {"auto_start": false}}),
        true,
    )
    .await
    .expect("SetConfig");
    let mut fp = c.fingerprint().await;
    let m = fingerprint_until(&mut fp, support::DEADLINE, |m| {
        m.health == HealthState::Healthy as i32
    })
    .await;
    let python = match m
        .attributes
        .get("driver.elide.runtime.python")
        .and_then(|a| a.value.clone())
    {
        Some(AttrValue::StringVal(v)) => v,
        other => panic!("python runtime attribute: {other:?}"),
    };
    assert!(python.starts_with('3'), "{python}");
    assert!(m.attributes.contains_key("driver.elide.daemon_version"));

    // The session exists in the daemon, owned by this plugin process.
    let mut client = api::execution_api_client::ExecutionApiClient::new(
        support::dial(&daemon.socket.display().to_string()).await,
    );
    let sessions = client
        .list_sessions(api::ListSessionsRequest {})
        .await
        .expect("ListSessions")
        .into_inner()
        .sessions;
    let ours: Vec<_> = sessions
        .iter()
        .filter(|s| s.owner == format!("nomad-plugin pid {}", c.process.child.id()))
        .collect();
    assert_eq!(ours.len(), 1, "{sessions:?}");
    assert!(ours[0].id.starts_with("nomad-"));

    daemon.kill9();
    let m = fingerprint_until(&mut fp, support::DEADLINE, |m| {
        m.health == HealthState::Unhealthy as i32
    })
    .await;
    assert!(
        m.health_description.contains("not reachable"),
        "{}",
        m.health_description
    );

    daemon.spawn().await;
    fingerprint_until(&mut fp, support::DEADLINE, |m| {
        m.health == HealthState::Healthy as i32
    })
    .await;
}
