//! go-plugin transport behaviour of the real plugin binary, seen from the host side.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::{DEADLINE, Launch, NomadClient, PluginProcess, short_tempdir};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

const NOT_A_PLUGIN: &str = "This binary is a plugin. These are not meant to be executed directly.\n\
Please execute the program that consumes these plugins, which will\n\
load any plugins automatically";

fn assert_refused_as_not_a_plugin(cookie: Option<&str>) {
    let dir = short_tempdir();
    let opts = Launch {
        cookie: cookie.map(str::to_string),
        ..Launch::default()
    };
    let mut p = PluginProcess::spawn(&opts, dir.path());
    let status = p.wait_exit(DEADLINE).expect("plugin must exit");
    assert_eq!(status.code(), Some(1));
    assert!(p.wait_stdio_eof(DEADLINE));
    assert!(
        p.read_handshake(Duration::from_millis(10)).is_none(),
        "nothing may reach stdout"
    );
    assert!(p.stdout_rest.lock().unwrap().is_empty());
    assert_eq!(p.stderr_lines().join("\n"), NOT_A_PLUGIN);
    // No socket was created.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn missing_cookie_prints_three_lines_and_exits_1() {
    assert_refused_as_not_a_plugin(None);
}

#[test]
fn wrong_cookie_prints_three_lines_and_exits_1() {
    assert_refused_as_not_a_plugin(Some("not-the-cookie"));
    assert_refused_as_not_a_plugin(Some(""));
}

#[tokio::test]
async fn handshake_line_has_six_fields_and_points_at_a_listening_socket() {
    let c = NomadClient::launch().await;
    let f = &c.handshake.fields;
    assert_eq!(&f[..3], ["1", "2", "unix"]);
    assert_eq!(f[4], "grpc");
    assert_eq!(f[5], "", "no server certificate without AutoMTLS");
    assert!(c.handshake.raw.ends_with("grpc|"), "{:?}", c.handshake.raw);
    let addr = std::path::Path::new(c.handshake.address());
    assert_eq!(
        addr.parent(),
        Some(c.socket_dir.as_path()),
        "socket must live in PLUGIN_UNIX_SOCKET_DIR"
    );
    assert!(
        addr.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("plugin")
    );
    // Served right away.
    assert_eq!(c.plugin_info().await.name, "elide");
}

#[tokio::test]
async fn socket_goes_to_tmpdir_without_plugin_socket_dir() {
    let tmp = short_tempdir();
    let dir = short_tempdir();
    // PLUGIN_UNIX_SOCKET_DIR empty (Nomad never sets it): the socket goes to TMPDIR.
    let opts = Launch {
        env: vec![
            ("TMPDIR".into(), tmp.path().display().to_string()),
            ("PLUGIN_UNIX_SOCKET_DIR".into(), String::new()),
        ],
        ..Launch::default()
    };
    let p = PluginProcess::spawn(&opts, dir.path());
    let hs = p.read_handshake(DEADLINE).expect("handshake");
    assert!(
        hs.fields[3].starts_with(&tmp.path().display().to_string()),
        "{}",
        hs.raw
    );
}

#[tokio::test]
async fn protocol_versions_without_2_is_reported_and_plugin_still_serves() {
    let c = NomadClient::launch_with(Launch {
        protocol_versions: Some("1,3".into()),
        ..Launch::default()
    })
    .await;
    // Like go-plugin: announce what we speak, the host rejects it with its own error.
    assert_eq!(c.handshake.fields[1], "2");
    let warn = c
        .process
        .wait_log("does not speak", DEADLINE)
        .expect("a warning about the requested versions");
    assert_eq!(warn["@level"], "warn");
    assert_eq!(warn["requested"], "[1, 3]");
    assert_eq!(c.plugin_info().await.name, "elide");
}

#[tokio::test]
async fn garbage_protocol_versions_are_ignored_with_a_log_line() {
    let c = NomadClient::launch_with(Launch {
        protocol_versions: Some("x,2".into()),
        ..Launch::default()
    })
    .await;
    assert_eq!(c.handshake.fields[1], "2");
    let w = c
        .process
        .wait_log("not an integer", DEADLINE)
        .expect("log line");
    assert_eq!(w["value"], "x");
    assert_eq!(c.plugin_info().await.name, "elide");
}

#[tokio::test]
async fn health_reports_plugin_serving() {
    let c = NomadClient::launch().await;
    let resp = c
        .health()
        .check(HealthCheckRequest {
            service: "plugin".into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(resp.status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn stdio_and_broker_streams_stay_open_and_silent() {
    let c = NomadClient::launch().await;
    let mut stdio = c
        .stdio()
        .stream_stdio(())
        .await
        .expect("StreamStdio")
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(elide_task_driver::proto::plugin::ConnInfo {
        service_id: 7,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut broker = c
        .broker()
        .start_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("StartStream")
        .into_inner();
    // Neither stream yields anything nor ends while the plugin serves.
    let idle = tokio::time::timeout(Duration::from_millis(500), async {
        tokio::select! {
            m = stdio.message() => format!("stdio: {m:?}"),
            m = broker.message() => format!("broker: {m:?}"),
        }
    })
    .await;
    assert!(idle.is_err(), "a stream produced or ended: {idle:?}");
    assert_eq!(c.plugin_info().await.name, "elide");
    drop(tx);
}

#[tokio::test]
async fn controller_shutdown_exits_promptly_and_removes_socket() {
    let mut c = NomadClient::launch().await;
    // Long-lived streams open, as with a real host: they must not hold the exit up.
    let _fp = c.fingerprint().await;
    let _stdio = c.stdio().stream_stdio(()).await.expect("StreamStdio");
    let socket = c.handshake.address().to_string();
    let status = c.controller_shutdown().await.expect("plugin exited");
    assert_eq!(status.code(), Some(0));
    assert!(
        !std::path::Path::new(&socket).exists(),
        "socket file left behind"
    );
    assert!(c.process.wait_stdio_eof(DEADLINE));
    assert!(
        c.process.stdout_rest.lock().unwrap().is_empty(),
        "stdout must stay silent after the handshake"
    );
    c.process.log_entries();
}

#[tokio::test]
async fn sigint_is_ignored() {
    let mut c = NomadClient::launch().await;
    c.process.signal(Signal::SIGINT);
    c.process
        .wait_log("SIGINT ignored", DEADLINE)
        .expect("SIGINT noticed");
    assert!(c.process.child.try_wait().unwrap().is_none());
    assert_eq!(c.plugin_info().await.name, "elide");
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully_and_removes_socket() {
    let mut c = NomadClient::launch().await;
    let _fp = c.fingerprint().await;
    let socket = c.handshake.address().to_string();
    c.process.signal(Signal::SIGTERM);
    let status = c.process.wait_exit(DEADLINE).expect("exit after SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert!(!std::path::Path::new(&socket).exists());
}

#[tokio::test]
async fn every_stderr_line_is_hclog_json() {
    let mut c = NomadClient::launch_with(Launch {
        protocol_versions: Some("1".into()),
        ..Launch::default()
    })
    .await;
    c.process
        .wait_log("does not speak", DEADLINE)
        .expect("at least one log line");
    c.controller_shutdown().await.expect("exit");
    assert!(c.process.wait_stdio_eof(DEADLINE));
    let entries = c.process.log_entries();
    assert!(!entries.is_empty());
    for e in entries {
        for key in ["@level", "@message", "@timestamp", "@module"] {
            assert!(e[key].is_string(), "{key} must be a string in {e}");
        }
        assert!(
            ["trace", "debug", "info", "warn", "error"].contains(&e["@level"].as_str().unwrap()),
            "{e}"
        );
        let ts = e["@timestamp"].as_str().unwrap();
        let frac = ts.split('.').nth(1).expect("fraction");
        assert_eq!(frac.len(), 7, "six digits then Z: {ts}");
        assert!(
            frac.ends_with('Z') && frac[..6].bytes().all(|b| b.is_ascii_digit()),
            "{ts}"
        );
    }
}

#[tokio::test]
async fn plugin_survives_host_closing_its_stderr() {
    use std::io::BufRead;
    // After an agent crash the log pipe has no reader: every log write fails with EPIPE and
    // must neither kill nor stall the plugin.
    let dir = short_tempdir();
    let mut child = std::process::Command::new(support::plugin_bin())
        .env(support::COOKIE_KEY, support::COOKIE_VALUE)
        .env("PLUGIN_PROTOCOL_VERSIONS", "2")
        .env("PLUGIN_UNIX_SOCKET_DIR", dir.path())
        .env("ELIDE_PLUGIN_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stderr.take());
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().split('|').nth(3).unwrap().to_string();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    for _ in 0..20 {
        // Each SIGINT makes the plugin write a log line into the broken pipe.
        let _ = nix::sys::signal::kill(pid, Signal::SIGINT);
    }
    use elide_task_driver::proto::hashicorp::nomad::plugins::base::proto as base;
    let mut client = base::base_plugin_client::BasePluginClient::new(support::dial(&addr).await);
    // A bad config also logs (at error level) into the closed pipe.
    let err = client
        .set_config(base::SetConfigRequest {
            msgpack_config: vec![0x93],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let info = client
        .plugin_info(base::PluginInfoRequest {})
        .await
        .expect("still serving");
    assert_eq!(info.into_inner().name, "elide");
    assert!(child.try_wait().unwrap().is_none(), "plugin died on EPIPE");
    let _ = child.kill();
    let _ = child.wait();
}
