//! Driver service over the real binary: schema, capabilities, fingerprint health transitions,
//! and fast, clean answers from the task RPCs before any task exists (the task lifecycle
//! itself is covered by the `lifecycle_*` tests).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use elide_task_driver::proto::hashicorp::nomad::plugins::drivers::proto::{
    self as pb, fingerprint_response::HealthState,
};
use elide_task_driver::proto::hashicorp::nomad::plugins::shared::hclspec::spec::Block;
use elide_task_driver::proto::hashicorp::nomad::plugins::shared::structs::attribute::Value as AttrValue;
use serde_json::json;
use support::fake_daemon::FakeDaemon;
use support::{
    DEADLINE, NomadClient, eventually_within, fingerprint_until, next_within, short_tempdir,
};

fn attr_str(m: &pb::FingerprintResponse, key: &str) -> Option<String> {
    match m.attributes.get(key)?.value.as_ref()? {
        AttrValue::StringVal(s) => Some(s.clone()),
        _ => None,
    }
}

fn healthy(m: &pb::FingerprintResponse) -> bool {
    m.health == HealthState::Healthy as i32
}

fn unhealthy(m: &pb::FingerprintResponse) -> bool {
    m.health == HealthState::Unhealthy as i32
}

#[tokio::test]
async fn init_and_shutdown_answer_ok() {
    let c = NomadClient::launch().await;
    c.driver
        .clone()
        .init(pb::InitRequest {})
        .await
        .expect("Init");
    c.driver
        .clone()
        .shutdown(pb::ShutdownRequest {})
        .await
        .expect("Shutdown");
    // A Shutdown notice does not stop the plugin.
    assert_eq!(c.plugin_info().await.name, "elide");
}

#[tokio::test]
async fn task_config_schema_has_the_seed_names() {
    let c = NomadClient::launch().await;
    let spec = c.task_config_schema().await;
    let Some(Block::Object(o)) = spec.block.as_ref() else {
        panic!("object expected")
    };
    let mut keys: Vec<_> = o.attributes.keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        ["args", "code", "elide_opts", "env", "language", "script"]
    );
    let ty = |k: &str| match o.attributes[k].block.as_ref() {
        Some(Block::Attr(a)) => a.r#type.clone(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(ty("script"), "string");
    assert_eq!(ty("code"), "string");
    assert_eq!(ty("language"), "string");
    assert_eq!(ty("args"), "list(string)");
    assert_eq!(ty("env"), "map(string)");
    assert!(matches!(
        o.attributes["elide_opts"].block,
        Some(Block::BlockValue(_))
    ));
    // A job config decodes against it the way Nomad would.
    let bytes = support::cty::encode_config(
        &spec,
        &json!({"code": "print(1)", "language": "py", "env": {"A": "b"}, "elide_opts": [{"timeout": "5s"}]}),
    );
    assert!(bytes.is_ok(), "{bytes:?}");
}

/// What the plugin's Capabilities RPC answers.
async fn capabilities_of(c: &NomadClient) -> pb::DriverCapabilities {
    c.driver
        .clone()
        .capabilities(pb::CapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .expect("set")
}

#[tokio::test]
async fn capabilities_are_honest() {
    let c = NomadClient::launch().await;
    let caps = capabilities_of(&c).await;
    assert!(caps.send_signals);
    assert!(caps.exec);
    assert!(!caps.disable_log_collection);
    assert_eq!(
        caps.fs_isolation,
        pb::driver_capabilities::FsIsolation::None as i32
    );
    assert_eq!(
        caps.network_isolation_modes,
        vec![
            pb::network_isolation_spec::NetworkIsolationMode::Host as i32,
            pb::network_isolation_spec::NetworkIsolationMode::Group as i32
        ]
    );
    assert!(!caps.must_create_network);
    // Off until the plugin config turns it on.
    assert!(!caps.dynamic_workload_users);
}

/// `dynamic_workload_users = true` advertises Nomad's dynamic workload users (a task without
/// `user` then runs as the `nomad-<N>` Nomad picks); the default does not.
#[tokio::test]
async fn dynamic_workload_users_follow_the_plugin_config() {
    // No daemon: an agent SetConfig with the default socket would auto-start one at the
    // system's own paths (/run/elide, /var/lib/elide).
    let dir = short_tempdir();
    let socket = dir.path().join("absent.sock").display().to_string();
    for (config, want) in [
        (json!({}), false),
        (json!({"dynamic_workload_users": false}), false),
        (json!({"dynamic_workload_users": true}), true),
    ] {
        let c = NomadClient::launch().await;
        let mut agent = config.clone();
        agent["daemon_socket"] = json!(socket);
        agent["daemon"] = json!({"auto_start": false});
        c.set_config(agent, true).await.unwrap();
        let caps = capabilities_of(&c).await;
        assert_eq!(caps.dynamic_workload_users, want, "{config}");
    }
}

#[tokio::test]
async fn task_rpcs_without_tasks_answer_quickly_and_plugin_keeps_serving() {
    let c = NomadClient::launch().await;
    let mut d = c.driver.clone();
    let quick = Duration::from_secs(10);
    use tonic::Code;
    let code = |r: Result<(), tonic::Status>| match r {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    };
    let got = vec![
        code(
            tokio::time::timeout(quick, d.start_task(pb::StartTaskRequest::default()))
                .await
                .unwrap()
                .map(|_| ()),
        ),
        code(
            tokio::time::timeout(quick, d.recover_task(pb::RecoverTaskRequest::default()))
                .await
                .unwrap()
                .map(|_| ()),
        ),
        code(
            tokio::time::timeout(quick, d.wait_task(pb::WaitTaskRequest::default()))
                .await
                .unwrap()
                .map(|_| ()),
        ),
        code(
            tokio::time::timeout(quick, d.stop_task(pb::StopTaskRequest::default()))
                .await
                .unwrap()
                .map(|_| ()),
        ),
        code(
            tokio::time::timeout(quick, d.destroy_task(pb::DestroyTaskRequest::default()))
                .await
                .unwrap()
                .map(|_| ()),
        ),
        code(
            tokio::time::timeout(quick, d.inspect_task(pb::InspectTaskRequest::default()))
                .await
                .unwrap()
                .map(|_| ()),
        ),
        code(
            tokio::time::timeout(quick, d.signal_task(pb::SignalTaskRequest::default()))
                .await
                .unwrap()
                .map(|_| ()),
        ),
        code(
            tokio::time::timeout(quick, d.exec_task(pb::ExecTaskRequest::default()))
                .await
                .unwrap()
                .map(|_| ()),
        ),
        code(
            tokio::time::timeout(quick, d.create_network(pb::CreateNetworkRequest::default()))
                .await
                .unwrap()
                .map(|_| ()),
        ),
        code(
            tokio::time::timeout(
                quick,
                d.destroy_network(pb::DestroyNetworkRequest::default()),
            )
            .await
            .unwrap()
            .map(|_| ()),
        ),
    ];
    assert_eq!(
        got,
        vec![
            Code::InvalidArgument, // StartTask without a task
            Code::InvalidArgument, // RecoverTask without a handle
            Code::NotFound,        // WaitTask, unknown id
            Code::Ok,              // StopTask, unknown id: OK so the client does not retry
            Code::Ok,              // DestroyTask, unknown id: harmless
            Code::NotFound,        // InspectTask
            Code::NotFound,        // SignalTask
            Code::NotFound,        // ExecTask
            Code::Unimplemented,   // CreateNetwork (not advertised)
            Code::Unimplemented,   // DestroyNetwork
        ]
    );
    let stats = tokio::time::timeout(quick, d.task_stats(pb::TaskStatsRequest::default()))
        .await
        .unwrap();
    let stats_code = match stats {
        Err(s) => s.code(),
        Ok(r) => r.into_inner().message().await.unwrap_err().code(),
    };
    assert_eq!(stats_code, Code::NotFound);
    let exec = tokio::time::timeout(
        quick,
        d.exec_task_streaming(tokio_stream::iter(vec![
            pb::ExecTaskStreamingRequest::default(),
        ])),
    )
    .await
    .unwrap();
    let exec_code = match exec {
        Err(s) => s.code(),
        Ok(r) => r.into_inner().message().await.unwrap_err().code(),
    };
    assert_eq!(
        exec_code,
        Code::InvalidArgument,
        "first message without setup"
    );
    assert_eq!(c.plugin_info().await.name, "elide");
}

#[tokio::test]
async fn task_events_stream_stays_open() {
    let c = NomadClient::launch().await;
    let mut events = c
        .driver
        .clone()
        .task_events(pb::TaskEventsRequest {})
        .await
        .expect("TaskEvents")
        .into_inner();
    // Ending the stream would make Nomad re-open it in a hot loop.
    let r = tokio::time::timeout(Duration::from_millis(500), events.message()).await;
    assert!(r.is_err(), "TaskEvents produced or ended: {r:?}");
}

#[tokio::test]
async fn fingerprint_is_undetected_until_the_agent_configures_the_plugin() {
    let c = NomadClient::launch().await;
    let mut fp = c.fingerprint().await;
    let first = next_within(&mut fp, DEADLINE)
        .await
        .expect("first fingerprint at once");
    assert_eq!(first.health, HealthState::Undetected as i32);
    assert_eq!(
        attr_str(&first, "driver.elide.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    // The validation launch's SetConfig does not make the driver detected either.
    c.set_config(json!({}), false).await.unwrap();
    let again = next_within(&mut fp, DEADLINE)
        .await
        .expect("fingerprint after config change");
    assert_eq!(again.health, HealthState::Undetected as i32);
}

#[tokio::test]
async fn fingerprint_is_unhealthy_with_an_operator_hint_without_daemon() {
    let dir = short_tempdir();
    let socket = dir.path().join("absent.sock");
    let c = NomadClient::launch().await;
    c.set_config(
        json!({"daemon_socket": socket.display().to_string(), "fingerprint_period": "1s", "daemon": {"auto_start": false}}),
        true,
    )
    .await
    .unwrap();
    let mut fp = c.fingerprint().await;
    let m = fingerprint_until(&mut fp, DEADLINE, unhealthy).await;
    let d = &m.health_description;
    assert!(
        d.starts_with(&format!(
            "elide-daemon not reachable at {}: ",
            socket.display()
        )),
        "{d}"
    );
    assert!(
        d.ends_with("start it with `elide-daemon` or set daemon.auto_start"),
        "{d}"
    );
    // Periodic resends carry identical values (no churn of node updates).
    let next = next_within(&mut fp, DEADLINE)
        .await
        .expect("periodic fingerprint");
    assert_eq!(next, m);
    assert_eq!(c.plugin_info().await.name, "elide");
}

/// A plugin given `config` by the agent (SetConfig with `nomad_config`), pointed at a fake
/// daemon it must not auto-start: the scratch dir (keep it), the daemon's socket, the daemon and
/// the plugin.
async fn plugin_on_fake_daemon(
    mut config: serde_json::Value,
) -> (tempfile::TempDir, PathBuf, FakeDaemon, NomadClient) {
    let dir = short_tempdir();
    let socket = dir.path().join("d.sock");
    let daemon = FakeDaemon::start(&socket).await;
    let c = NomadClient::launch().await;
    config["daemon_socket"] = json!(socket.display().to_string());
    config["daemon"] = json!({"auto_start": false});
    c.set_config(config, true).await.unwrap();
    (dir, socket, daemon, c)
}

#[tokio::test]
async fn fingerprint_says_whether_snippet_memory_is_merged_here() {
    use elide_task_driver::sandbox::page_merge;
    let (_dir, _socket, _daemon, c) =
        plugin_on_fake_daemon(json!({"session_config": {"merge_identical_pages": true}})).await;
    let mut fp = c.fingerprint().await;
    let m = fingerprint_until(&mut fp, DEADLINE, healthy).await;
    // The plugin sees the daemon's kernel and ksmd: it runs on the same node.
    let want = match (page_merge::available(), page_merge::ksmd_running()) {
        (false, _) => "unsupported",
        (true, false) => "ksmd off",
        (true, true) => "on",
    };
    assert_eq!(
        attr_str(&m, "driver.elide.page_merging").as_deref(),
        Some(want)
    );
}

/// Runtimes the session does not enable are not advertised, even when the daemon has them:
/// a job constraining on `${attr.driver.elide.runtime.javascript}` must not be placed on a
/// node that would refuse it at StartTask.
#[tokio::test]
async fn fingerprint_advertises_only_the_runtimes_the_session_enables() {
    let (_dir, _socket, daemon, c) =
        plugin_on_fake_daemon(json!({"session_config": {"enabled_languages": ["python"]}})).await;
    let mut fp = c.fingerprint().await;
    let m = fingerprint_until(&mut fp, DEADLINE, healthy).await;
    assert_eq!(
        attr_str(&m, "driver.elide.runtime.python").as_deref(),
        Some("3.11.7")
    );
    assert!(
        !m.attributes.contains_key("driver.elide.runtime.javascript"),
        "a runtime the session leaves out is advertised: {:?}",
        m.attributes.keys().collect::<Vec<_>>()
    );
    daemon.stop().await;
}

#[tokio::test]
async fn fingerprint_follows_the_daemon_healthy_unhealthy_healthy() {
    let (_dir, socket, daemon, c) =
        plugin_on_fake_daemon(json!({"fingerprint_period": "1s"})).await;
    let mut fp = c.fingerprint().await;

    let m = fingerprint_until(&mut fp, DEADLINE, healthy).await;
    assert_eq!(m.health_description, "Healthy");
    assert_eq!(
        attr_str(&m, "driver.elide.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        attr_str(&m, "driver.elide.daemon_version").as_deref(),
        Some("9.9.9-fake")
    );
    assert_eq!(attr_str(&m, "driver.elide.cgroups").as_deref(), Some("v1"));
    assert_eq!(
        attr_str(&m, "driver.elide.runtime.python").as_deref(),
        Some("3.11.7")
    );
    assert_eq!(
        attr_str(&m, "driver.elide.runtime.javascript").as_deref(),
        Some("v20.20.2")
    );
    assert!(
        !m.attributes.contains_key("driver.elide.runtime.typescript"),
        "unavailable runtime advertised"
    );
    assert_eq!(
        attr_str(&m, "driver.elide.page_merging").as_deref(),
        Some("off"),
        "merge_identical_pages is off by default"
    );

    daemon.stop().await;
    let m = fingerprint_until(&mut fp, DEADLINE, unhealthy).await;
    assert!(
        m.health_description.contains("not reachable"),
        "{}",
        m.health_description
    );
    // Attributes that no longer hold are cleared with empty values.
    assert!(m.attributes["driver.elide.runtime.python"].value.is_none());
    assert!(m.attributes["driver.elide.daemon_version"].value.is_none());
    assert!(m.attributes["driver.elide.cgroups"].value.is_none());

    // A restarted daemon has lost our session: the plugin re-creates it and is healthy again.
    let daemon = FakeDaemon::start(&socket).await;
    let m = fingerprint_until(&mut fp, DEADLINE, healthy).await;
    assert_eq!(
        attr_str(&m, "driver.elide.runtime.python").as_deref(),
        Some("3.11.7")
    );
    let calls = daemon.create_session_calls();
    assert_eq!(calls.len(), 1, "session re-created once");
    assert!(calls[0].session_id.starts_with("nomad-"));
    daemon.stop().await;
}

#[tokio::test]
async fn fingerprint_is_unhealthy_when_no_enabled_language_is_available() {
    // The fake daemon reports typescript as unavailable.
    let (_dir, _socket, daemon, c) =
        plugin_on_fake_daemon(json!({"session_config": {"enabled_languages": ["ts"]}})).await;
    let mut fp = c.fingerprint().await;
    let m = fingerprint_until(&mut fp, DEADLINE, unhealthy).await;
    assert!(
        m.health_description
            .contains("none of the enabled languages (typescript)"),
        "{}",
        m.health_description
    );
    daemon.stop().await;
}

#[tokio::test]
async fn fingerprint_stream_ends_cleanly_when_the_client_cancels() {
    let c = NomadClient::launch().await;
    for _ in 0..20 {
        let mut fp = c.fingerprint().await;
        next_within(&mut fp, DEADLINE).await.expect("first message");
        drop(fp);
    }
    assert_eq!(c.plugin_info().await.name, "elide");
}

/// A python task `id` with inline code, its config encoded against the plugin's schema.
async fn code_task(c: &NomadClient, id: &str) -> pb::TaskConfig {
    let spec = c.task_config_schema().await;
    let config = support::cty::encode_config(&spec, &json!({"code": "print(1)", "language": "py"}))
        .expect("job config fits the schema");
    pb::TaskConfig {
        id: id.into(),
        name: "t".into(),
        alloc_id: "a1".into(),
        alloc_dir: "/nonexistent/alloc/a1".into(),
        msgpack_driver_config: config,
        ..Default::default()
    }
}

#[tokio::test]
async fn start_task_cancelled_after_the_daemon_started_kills_and_forgets_the_execution() {
    let (_dir, _socket, daemon, c) = plugin_on_fake_daemon(json!({})).await;
    // Healthy first: link and session are up, so StartTask goes straight to StartExecution.
    let mut fp = c.fingerprint().await;
    fingerprint_until(&mut fp, DEADLINE, healthy).await;
    daemon.set_start_delay(Duration::from_millis(400));
    let task = code_task(&c, "a1/t/1").await;
    let request = || pb::StartTaskRequest {
        task: Some(task.clone()),
    };

    // Nomad gives up on StartTask once the daemon has started the execution, before its
    // answer arrives: dropping the call resets the stream and the plugin's handler is dropped.
    let mut d = c.driver.clone();
    let seen = || daemon.with_calls(|c| !c.started.is_empty());
    tokio::select! {
        r = d.start_task(request()) => panic!("StartTask answered before it was dropped: {r:?}"),
        () = eventually_within("the daemon sees StartExecution", DEADLINE, seen) => {}
    }
    let started = daemon.with_calls(|c| c.started[0].clone());

    let undone = || {
        daemon.with_calls(|c| {
            let killed = c
                .stop_execution
                .iter()
                .any(|s| s.execution_id == started && s.signal == "SIGKILL");
            let removed = c.remove_execution.iter().any(|r| r.execution_id == started);
            killed && removed
        })
    };
    let what = format!("execution {started} killed (SIGKILL) and removed");
    // Generous: a bound against a hang, on a loaded machine.
    eventually_within(&what, Duration::from_secs(20), undone).await;

    // The task id is free again. The fake records RemoveExecution before the plugin has its
    // answer, so the plugin may still hold the id for a moment.
    daemon.set_start_delay(Duration::ZERO);
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    let resp = loop {
        match c.driver.clone().start_task(request()).await {
            Err(s)
                if s.code() == tonic::Code::AlreadyExists && tokio::time::Instant::now() < end =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => break r.expect("StartTask again").into_inner(),
        }
    };
    assert_eq!(resp.result, pb::start_task_response::Result::Success as i32);
    let (started_all, stopped) = daemon.with_calls(|c| (c.started.clone(), c.stop_execution.len()));
    assert_eq!(started_all.len(), 2, "{started_all:?}");
    assert_eq!(stopped, 1, "only the abandoned start is stopped");
}
