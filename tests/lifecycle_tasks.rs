//! Task lifecycle end to end: the harness plays the Nomad client against the real plugin
//! binary, which runs snippets through a real `elide-daemon` on a temp socket; output is read
//! from logmon-like FIFOs in a Nomad-shaped alloc dir.

#[path = "daemon_support/mod.rs"]
mod daemon_support;
mod lifecycle_support;
mod support;

use std::time::{Duration, Instant};

use daemon_support::TestDaemon;
use elide_task_driver::proto::hashicorp::nomad::plugins::drivers::proto as pb;
use lifecycle_support::{Alloc, DEADLINE, Plugin, plugin_config};
use serde_json::json;

/// A daemon, a plugin using it, and a data dir for allocations. The data dir lies under the
/// daemon's `--output-root` (a daemon with output roots only accepts FIFOs beneath them, so
/// operators list Nomad's `<data_dir>/alloc` there).
async fn setup() -> (TestDaemon, Plugin, DataDir) {
    let daemon = TestDaemon::start().await;
    let plugin = Plugin::launch(&plugin_config(&daemon.socket, None)).await;
    let root = DataDir(daemon.path("nomad"));
    std::fs::create_dir_all(root.path()).unwrap();
    (daemon, plugin, root)
}

struct DataDir(std::path::PathBuf);

impl DataDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

#[tokio::test]
async fn batch_task_in_each_language_logs_to_the_fifos_and_propagates_the_exit_code() {
    let (_daemon, plugin, root) = setup().await;
    let alloc = Alloc::new(root.path());
    let cases = [
        (
            "py",
            "python",
            r#"
import os, sys
print("out", sys.argv[1:], os.environ["GREETING"], os.environ["NOMAD_TASK_NAME"], os.environ["NOMAD_ALLOC_ID"], os.getcwd())
print("err-line", file=sys.stderr)
sys.exit(3)
"#,
        ),
        (
            "js",
            "javascript",
            r#"
console.log("out", JSON.stringify(process.argv.slice(2)), process.env.GREETING, process.env.NOMAD_TASK_NAME, process.env.NOMAD_ALLOC_ID, process.cwd());
console.error("err-line");
process.exit(3);
"#,
        ),
        (
            "ts",
            "typescript",
            r#"
const parts: string[] = ["out", JSON.stringify(process.argv.slice(2)), process.env.GREETING as string, process.env.NOMAD_TASK_NAME as string, process.env.NOMAD_ALLOC_ID as string, process.cwd()];
console.log(parts.join(" "));
console.error("err-line");
process.exit(3);
"#,
        ),
    ];
    for (name, language, code) in cases {
        let task = alloc.task(name);
        let h = plugin
            .start_json(
                &task,
                json!({
                    "language": language,
                    "code": code,
                    "args": ["a1", "a 2"],
                    "env": {"GREETING": "hola"},
                }),
            )
            .await
            .unwrap_or_else(|e| panic!("{language}: {e}"));
        assert_eq!(h.version, 1);
        assert_eq!(h.config.as_ref().unwrap().id, task.id, "config echoed");
        let w = plugin.wait(&task.id).await;
        let r = w.result.expect("result always set");
        assert_eq!(
            r.exit_code,
            3,
            "{language}: {w:?} stderr {}",
            task.stderr.text()
        );
        assert_eq!(w.err, "");
        let out = task.stdout.wait_eof().await;
        assert!(out.starts_with("out "), "{language}: {out:?}");
        assert!(
            out.contains("a1") && out.contains("a 2"),
            "{language}: {out:?}"
        );
        assert!(out.contains(" hola "), "{language}: env: {out:?}");
        assert!(
            out.contains(&format!(" {name} ")),
            "{language}: NOMAD_TASK_NAME: {out:?}"
        );
        assert!(
            out.contains(&alloc.id),
            "{language}: NOMAD_ALLOC_ID: {out:?}"
        );
        assert!(
            out.trim_end()
                .ends_with(&task.task_dir.display().to_string()),
            "{language}: cwd is the task dir: {out:?}"
        );
        assert!(
            !out.contains("err-line"),
            "{language}: stderr leaked into stdout"
        );
        assert_eq!(task.stderr.wait_eof().await, "err-line\n", "{language}");
        // Exited tasks answer WaitTask at once, again and again, until DestroyTask.
        let again = plugin.wait_within(&task.id, Duration::from_secs(5)).await;
        assert_eq!(again.result.unwrap().exit_code, 3);
        let i = plugin.inspect(&task.id).await.unwrap();
        let st = i.task.unwrap();
        assert_eq!(st.state, pb::TaskState::Exited as i32);
        assert!(st.completed_at.unwrap().seconds > 0);
        plugin.destroy(&task.id, true).await.unwrap();
        let gone = plugin
            .driver()
            .wait_task(pb::WaitTaskRequest {
                task_id: task.id.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(gone.code(), tonic::Code::NotFound);
    }
}

#[tokio::test]
async fn script_under_local_runs_with_language_from_the_extension() {
    let (_daemon, plugin, root) = setup().await;
    let alloc = Alloc::new(root.path());
    let task = alloc.task("script");
    std::fs::write(
        task.task_dir.join("local/main.py"),
        "import sys\nprint('script ran', *sys.argv[1:])\n",
    )
    .unwrap();
    plugin
        .start_json(&task, json!({"script": "local/main.py", "args": ["x"]}))
        .await
        .unwrap();
    let w = plugin.wait(&task.id).await;
    assert_eq!(w.result.unwrap().exit_code, 0, "{}", task.stderr.text());
    assert_eq!(task.stdout.wait_eof().await, "script ran x\n");
    // An absolute path inside the task dir is fine too (e.g. "${NOMAD_TASK_DIR}/main.py").
    let t2 = alloc.task("script2");
    std::fs::write(
        t2.task_dir.join("local/main.js"),
        "console.log('js script')\n",
    )
    .unwrap();
    let abs = t2.task_dir.join("local/main.js").display().to_string();
    plugin
        .start_json(&t2, json!({"script": abs}))
        .await
        .unwrap();
    assert_eq!(plugin.wait(&t2.id).await.result.unwrap().exit_code, 0);
    assert_eq!(t2.stdout.wait_eof().await, "js script\n");
}

const SERVICE: &str = r#"
import signal, sys, time
def term(*_):
    print("got TERM", flush=True)
    sys.exit(0)
def usr1(*_):
    print("got USR1", flush=True)
signal.signal(signal.SIGTERM, term)
signal.signal(signal.SIGUSR1, usr1)
buf = bytearray(30 * 1024 * 1024)
print("ready", flush=True)
while True:
    end = time.time() + 0.05
    while time.time() < end:
        pass
    time.sleep(0.05)
"#;

#[tokio::test]
async fn service_task_runs_reports_stats_takes_signals_and_stops_on_sigterm() {
    let (_daemon, plugin, root) = setup().await;
    let alloc = Alloc::new(root.path());
    let task = alloc.task("svc");
    let h = plugin
        .start_json(&task, json!({"language": "python", "code": SERVICE}))
        .await
        .unwrap();
    task.stdout.wait_for("ready", |t| t.contains("ready")).await;

    let i = plugin.inspect(&task.id).await.unwrap();
    let st = i.task.unwrap();
    assert_eq!(st.state, pb::TaskState::Running as i32);
    assert_eq!(st.completed_at.unwrap().seconds, -62_135_596_800);
    assert!(st.started_at.unwrap().seconds > 0);
    assert!(st.result.is_some());
    assert_eq!(
        i.driver.unwrap().attributes["pid"],
        lifecycle_support::handle_pid(&h).to_string()
    );

    // TaskStats: one message per interval, running with CPU and memory.
    let mut stats = plugin
        .driver()
        .task_stats(pb::TaskStatsRequest {
            task_id: task.id.clone(),
            collection_interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut saw_cpu = false;
    let mut saw_mem = false;
    for _ in 0..10 {
        let m = tokio::time::timeout(DEADLINE, stats.message())
            .await
            .unwrap()
            .unwrap()
            .expect("stream stays open");
        let s = m.stats.expect("stats set");
        assert!(s.timestamp.is_some());
        let agg = s.agg_resource_usage.expect("agg set");
        let cpu = agg.cpu.unwrap();
        let mem = agg.memory.unwrap();
        if cpu
            .measured_fields
            .contains(&(pb::cpu_usage::Fields::Percent as i32))
            && cpu.percent > 0.0
        {
            saw_cpu = true;
        }
        if mem
            .measured_fields
            .contains(&(pb::memory_usage::Fields::Rss as i32))
            && mem.rss > 20 * 1024 * 1024
        {
            saw_mem = true;
        }
        if saw_cpu && saw_mem {
            break;
        }
    }
    assert!(saw_cpu && saw_mem, "cpu {saw_cpu} mem {saw_mem}");
    drop(stats);

    plugin
        .driver()
        .signal_task(pb::SignalTaskRequest {
            task_id: task.id.clone(),
            signal: "SIGUSR1".into(),
        })
        .await
        .unwrap();
    task.stdout
        .wait_for("USR1", |t| t.contains("got USR1"))
        .await;
    let bad = plugin
        .driver()
        .signal_task(pb::SignalTaskRequest {
            task_id: task.id.clone(),
            signal: "SIGNOPE".into(),
        })
        .await
        .unwrap_err();
    assert!(bad.message().contains("SIGNOPE"), "{bad:?}");

    // A running task cannot be destroyed without force.
    let e = plugin.destroy(&task.id, false).await.unwrap_err();
    assert!(e.message().contains("cannot destroy running task"), "{e:?}");

    let waiter = {
        let d = plugin.driver();
        let id = task.id.clone();
        tokio::spawn(async move {
            let mut d = d;
            d.wait_task(pb::WaitTaskRequest { task_id: id }).await
        })
    };
    plugin
        .stop(&task.id, "SIGTERM", Duration::from_secs(20))
        .await
        .unwrap();
    let w = waiter.await.unwrap().unwrap().into_inner();
    assert_eq!(w.result.unwrap().exit_code, 0);
    assert!(task.stdout.wait_eof().await.contains("got TERM"));
    // Stopping again, or an unknown id, is fine.
    plugin
        .stop(&task.id, "", Duration::from_secs(1))
        .await
        .unwrap();
    plugin.destroy(&task.id, false).await.unwrap();
    plugin.destroy(&task.id, true).await.unwrap();
}

#[tokio::test]
async fn stop_kills_with_sigkill_after_the_timeout() {
    let (_daemon, plugin, root) = setup().await;
    let alloc = Alloc::new(root.path());
    let task = alloc.task("stubborn");
    plugin
        .start_json(
            &task,
            json!({"language": "python", "code": "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(600)\n"}),
        )
        .await
        .unwrap();
    task.stdout.wait_for("ready", |t| t.contains("ready")).await;
    let t0 = Instant::now();
    plugin
        .stop(&task.id, "SIGTERM", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(900), "grace honoured");
    let r = plugin.wait(&task.id).await.result.unwrap();
    assert_eq!(r.signal, 9, "{r:?}");
    assert_eq!(r.exit_code, 128 + 9);
}

#[tokio::test]
async fn exec_and_exec_streaming_run_in_the_task_context() {
    let (_daemon, plugin, root) = setup().await;
    let alloc = Alloc::new(root.path());
    let task = alloc.task("ex");
    plugin
        .start_json(
            &task,
            json!({"language": "python", "code": "import time\ntime.sleep(600)\n"}),
        )
        .await
        .unwrap();
    let r = plugin
        .driver()
        .exec_task(pb::ExecTaskRequest {
            task_id: task.id.clone(),
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "pwd; echo err >&2; exit 4".into(),
            ],
            timeout: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result.unwrap().exit_code, 4);
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    assert!(
        out.contains(&task.task_dir.display().to_string()),
        "{out:?}"
    );
    assert!(out.contains("err"), "combined output: {out:?}");
    // Output is capped at 4 KiB like Nomad's script checks.
    let big = plugin
        .driver()
        .exec_task(pb::ExecTaskRequest {
            task_id: task.id.clone(),
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "head -c 100000 /dev/zero".into(),
            ],
            timeout: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(big.stdout.len(), 4096);
    assert_eq!(big.result.unwrap().exit_code, 0);

    // Streaming: setup, stdin, close, heartbeat; output then exited with the result.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::ExecTaskStreamingRequest {
        setup: Some(pb::exec_task_streaming_request::Setup {
            task_id: task.id.clone(),
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "read x; echo got-$x; exit 7".into(),
            ],
            tty: false,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut out = plugin
        .driver()
        .exec_task_streaming(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(pb::ExecTaskStreamingRequest::default())
        .await
        .unwrap(); // heartbeat
    tx.send(pb::ExecTaskStreamingRequest {
        stdin: Some(pb::ExecTaskStreamingIoOperation {
            data: b"hello\n".to_vec(),
            close: false,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(pb::ExecTaskStreamingRequest {
        stdin: Some(pb::ExecTaskStreamingIoOperation {
            data: vec![],
            close: true,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stdout = Vec::new();
    let mut exited = None;
    while let Some(m) = tokio::time::timeout(DEADLINE, out.message())
        .await
        .unwrap()
        .unwrap()
    {
        if let Some(o) = m.stdout {
            stdout.extend_from_slice(&o.data);
        }
        if m.exited {
            exited = m.result;
        }
    }
    assert_eq!(String::from_utf8_lossy(&stdout), "got-hello\n");
    assert_eq!(exited.expect("exited message").exit_code, 7);

    // A tty exec sees a terminal.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::ExecTaskStreamingRequest {
        setup: Some(pb::exec_task_streaming_request::Setup {
            task_id: task.id.clone(),
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "test -t 1 && stty size".into(),
            ],
            tty: true,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut out = plugin
        .driver()
        .exec_task_streaming(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(pb::ExecTaskStreamingRequest {
        tty_size: Some(pb::exec_task_streaming_request::TerminalSize {
            height: 33,
            width: 101,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut text = Vec::new();
    let mut code = None;
    while let Some(m) = tokio::time::timeout(DEADLINE, out.message())
        .await
        .unwrap()
        .unwrap()
    {
        if let Some(o) = m.stdout {
            text.extend_from_slice(&o.data);
        }
        if m.exited {
            code = m.result.map(|r| r.exit_code);
        }
    }
    assert_eq!(code, Some(0), "{}", String::from_utf8_lossy(&text));
    drop(tx);
    plugin
        .stop(&task.id, "SIGKILL", Duration::ZERO)
        .await
        .unwrap();
}

#[tokio::test]
async fn task_events_are_routed_by_alloc_and_task_name() {
    let (_daemon, plugin, root) = setup().await;
    let mut events = plugin
        .driver()
        .task_events(pb::TaskEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let alloc = Alloc::new(root.path());
    let task = alloc.task("ev");
    plugin
        .start_json(
            &task,
            json!({"language": "python", "code": "import time\ntime.sleep(30)\n", "elide_opts": [{"timeout": "1s"}]}),
        )
        .await
        .unwrap();
    let mut kinds = Vec::new();
    while !kinds.iter().any(|k| k == "timed_out") {
        let ev = tokio::time::timeout(DEADLINE, events.message())
            .await
            .expect("event in time")
            .unwrap()
            .expect("stream stays open");
        assert_eq!(ev.alloc_id, alloc.id);
        assert_eq!(ev.task_name, "ev");
        assert_eq!(ev.task_id, task.id);
        assert!(ev.timestamp.is_some_and(|t| t.seconds > 0));
        kinds.push(ev.annotations["kind"].clone());
    }
    assert!(kinds.contains(&"started".to_string()), "{kinds:?}");
    let w = plugin.wait(&task.id).await;
    assert!(w.err.contains("elide_opts.timeout"), "{w:?}");
}

#[tokio::test]
async fn bad_input_gets_named_errors_and_the_plugin_keeps_serving() {
    let (_daemon, plugin, root) = setup().await;
    let alloc = Alloc::new(root.path());
    let outside = root.path().join("outside.py");
    std::fs::write(&outside, "print('escaped')").unwrap();
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            json!({"language": "python", "code": "print(1)", "script": "local/a.py"}),
            "script: both `script` and `code`",
        ),
        (
            json!({"language": "python"}),
            "code: neither `script` nor `code`",
        ),
        (json!({"script": "../outside.py"}), "contains `..`"),
        (
            json!({"script": outside.display().to_string()}),
            "is outside the task dir",
        ),
        (json!({"script": "local/link.py"}), "symlink"),
        (
            json!({"script": "local/missing.py"}),
            "not found in the task dir",
        ),
        (
            json!({"language": "cobol", "code": "x"}),
            "language: unknown language \"cobol\"",
        ),
        (
            json!({"code": 5, "language": "python"}),
            "code: expected string",
        ),
        (
            json!({"code": "x", "language": "python", "args": "a"}),
            "args: expected list",
        ),
        (
            json!({"code": "x", "language": "python", "env": {"A": 1}}),
            "env",
        ),
        (
            json!({"code": "x", "language": "python", "elide_opts": [{"timeout": "soon"}]}),
            "elide_opts.timeout",
        ),
    ];
    for (i, (config, want)) in cases.into_iter().enumerate() {
        let task = alloc.task(&format!("bad{i}"));
        std::os::unix::fs::symlink(&outside, task.task_dir.join("local/link.py")).unwrap();
        let e = plugin.start_json(&task, config.clone()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{config}: {e:?}");
        assert!(
            e.message().contains(want),
            "{config}: want {want:?} in {:?}",
            e.message()
        );
    }
    // A language the node does not enable.
    let only_py = Plugin::launch(&{
        let mut c = plugin_config(&_daemon.socket, None);
        c["session_config"] = json!([{"enabled_languages": ["python"]}]);
        c
    })
    .await;
    let task = alloc.task("disabled");
    let e = only_py
        .start_json(&task, json!({"language": "ts", "code": "console.log(1)"}))
        .await
        .unwrap_err();
    assert!(e.message().contains("typescript is not enabled"), "{e:?}");

    // Duplicate id.
    let task = alloc.task("dup");
    let cfg = task.config(
        &plugin.spec,
        &json!({"language": "python", "code": "import time\ntime.sleep(60)"}),
    );
    plugin.start(cfg.clone()).await.unwrap();
    let e = plugin.start(cfg).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    assert!(e.message().contains("already started"), "{e:?}");
    // A forced DestroyTask of a running task kills it and answers pending WaitTask calls.
    // Nothing observable marks a WaitTask's arrival at the plugin: one that arrives after the
    // destroy is told the task is unknown (NotFound). Then another task tries again, the
    // WaitTask given a longer head start, until one was pending when its task was destroyed.
    let mut task = task;
    let mut head_start = Duration::from_millis(100);
    for round in 1.. {
        let pending = {
            let mut d = plugin.driver();
            let id = task.id.clone();
            tokio::spawn(async move { d.wait_task(pb::WaitTaskRequest { task_id: id }).await })
        };
        tokio::time::sleep(head_start).await;
        assert!(
            !pending.is_finished(),
            "WaitTask answered while its task ran"
        );
        plugin.destroy(&task.id, true).await.unwrap();
        let w = tokio::time::timeout(DEADLINE, pending)
            .await
            .expect("pending WaitTask answered")
            .unwrap();
        match w {
            Ok(w) => {
                let w = w.into_inner();
                assert_eq!(w.result.unwrap().signal, 9, "{:?}", w.err);
                break;
            }
            Err(e) if e.code() == tonic::Code::NotFound && round < 6 => {
                head_start *= 2;
                task = alloc.task(&format!("dup{round}"));
                let cfg = task.config(
                    &plugin.spec,
                    &json!({"language": "python", "code": "import time\ntime.sleep(60)"}),
                );
                plugin.start(cfg).await.unwrap();
            }
            Err(e) => panic!("WaitTask of a task destroyed meanwhile, round {round}: {e:?}"),
        }
    }

    // Unknown ids.
    let mut d = plugin.driver();
    let e = d
        .wait_task(pb::WaitTaskRequest {
            task_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = d
        .inspect_task(pb::InspectTaskRequest {
            task_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    plugin
        .stop("nope", "", Duration::from_secs(1))
        .await
        .unwrap();
    plugin.destroy("nope", true).await.unwrap();
    plugin.destroy("nope", false).await.unwrap();

    // RecoverTask with garbage or an old driver_state, or without a config.
    let task = alloc.task("rec");
    let cfg = task.config_raw(vec![]);
    for (version, state, want) in [
        (
            1,
            b"\x93garbage".to_vec(),
            "driver_state is not elide driver state",
        ),
        (
            1,
            br#"{"version":0,"execution_id":"e"}"#.to_vec(),
            "version 0 is not supported",
        ),
        (1, Vec::new(), "driver_state is empty"),
        (7, br#"{"version":1}"#.to_vec(), "handle.version 7"),
    ] {
        let e = d
            .recover_task(pb::RecoverTaskRequest {
                task_id: String::new(),
                handle: Some(pb::TaskHandle {
                    version,
                    config: Some(cfg.clone()),
                    state: 0,
                    driver_state: state,
                }),
            })
            .await
            .unwrap_err();
        assert!(e.message().contains(want), "want {want:?}: {e:?}");
    }
    // A handle whose execution is gone from the daemon cannot be recovered.
    let task = alloc.task("gone");
    let h = plugin
        .start_json(&task, json!({"language": "python", "code": "print('x')"}))
        .await
        .unwrap();
    plugin.wait(&task.id).await;
    plugin.destroy(&task.id, true).await.unwrap();
    let e = d
        .recover_task(pb::RecoverTaskRequest {
            task_id: String::new(),
            handle: Some(h),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("no longer exists"), "{e:?}");
    let e = d
        .recover_task(pb::RecoverTaskRequest::default())
        .await
        .unwrap_err();
    assert!(e.message().contains("handle"), "{e:?}");
    plugin.alive().await;
}

/// A named network namespace (what Nomad creates for `network { mode = "bridge" }`), removed
/// on drop.
struct NetNs(String);

impl NetNs {
    fn create() -> NetNs {
        let name = format!(
            "elide-lc-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let st = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(st.success(), "ip netns add {name}");
        NetNs(name)
    }
    fn path(&self) -> String {
        for dir in ["/run/netns", "/var/run/netns"] {
            let p = format!("{dir}/{}", self.0);
            if std::path::Path::new(&p).exists() {
                return p;
            }
        }
        panic!("netns {} has no path", self.0);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[tokio::test]
async fn group_network_mode_joins_the_allocation_netns() {
    let (_daemon, plugin, root) = setup().await;
    let alloc = Alloc::new(root.path());
    let ns = NetNs::create();
    let code = "import socket\nprint(' '.join(sorted(n for _, n in socket.if_nameindex())))\n";
    let task = alloc.task("grp");
    let mut cfg = task.config(&plugin.spec, &json!({"language": "python", "code": code}));
    cfg.network_isolation_spec = Some(pb::NetworkIsolationSpec {
        mode: pb::network_isolation_spec::NetworkIsolationMode::Group as i32,
        path: ns.path(),
        labels: Default::default(),
        hosts_config: None,
    });
    plugin.start(cfg).await.unwrap();
    assert_eq!(plugin.wait(&task.id).await.result.unwrap().exit_code, 0);
    assert_eq!(
        task.stdout.wait_eof().await,
        "lo\n",
        "only the netns's loopback"
    );

    // Host mode: the host's interfaces.
    let host = alloc.task("host");
    plugin
        .start_json(&host, json!({"language": "python", "code": code}))
        .await
        .unwrap();
    assert_eq!(plugin.wait(&host.id).await.result.unwrap().exit_code, 0);
    let ifaces = host.stdout.wait_eof().await;
    assert_ne!(
        ifaces, "lo\n",
        "host mode sees more than loopback: {ifaces:?}"
    );
}

#[tokio::test]
async fn tasks_run_as_the_requested_user_including_dynamic_nomad_users() {
    let (_daemon, plugin, root) = setup().await;
    let alloc = Alloc::new(root.path());
    for (user, want) in [("nobody", "65534"), ("nomad-4242", "4242")] {
        let task = alloc.task(&format!("u{want}"));
        let mut cfg = task.config(
            &plugin.spec,
            // node lives in /usr/bin; this machine's python3 is under /root (not traversable by
            // other users, which the daemon reports by name).
            &json!({"language": "javascript", "code": "console.log(process.getuid(), process.getgid())"}),
        );
        cfg.user = user.into();
        plugin
            .start(cfg)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let w = plugin.wait(&task.id).await;
        assert_eq!(
            w.result.unwrap().exit_code,
            0,
            "{user}: {}",
            task.stderr.text()
        );
        let out = task.stdout.wait_eof().await;
        assert!(out.starts_with(&format!("{want} ")), "{user}: {out:?}");
    }
}

#[tokio::test]
async fn elide_opts_memory_limit_tightens_the_task_memory_and_oom_is_reported() {
    let (_daemon, plugin, root) = setup().await;
    let alloc = Alloc::new(root.path());
    let task = alloc.task("hog");
    plugin
        .start_json(
            &task,
            json!({
                "language": "python",
                "code": "b = bytearray(400 * 1024 * 1024)\nfor i in range(0, len(b), 4096):\n    b[i] = 1\nprint('survived')\n",
                "elide_opts": [{"memory_limit_mb": 64}],
            }),
        )
        .await
        .unwrap();
    let r = plugin.wait(&task.id).await.result.unwrap();
    assert!(
        r.oom_killed,
        "{r:?} (task memory 256 MiB, elide_opts 64 MiB)"
    );
    assert!(!task.stdout.wait_eof().await.contains("survived"));
}

/// A task with reserved cores (`resources { cores = 1 }`: Nomad sends them as `cpuset_cpus`)
/// runs pinned to them.
#[tokio::test]
async fn reserved_cores_pin_the_task() {
    let (_daemon, plugin, root) = setup().await;
    let alloc = Alloc::new(root.path());
    let mut task = alloc.task("pinned");
    let core = elide_task_driver::sandbox::cpus::Cpus::of_this_process()
        .expect("sched_getaffinity")
        .cores()
        .last()
        .copied()
        .expect("a core");
    task.cpuset_cpus = core.to_string();
    plugin
        .start_json(
            &task,
            json!({
                "language": "python",
                "code": "import os\nprint(sorted(os.sched_getaffinity(0)))",
            }),
        )
        .await
        .unwrap();
    let r = plugin.wait(&task.id).await.result.unwrap();
    assert_eq!(r.exit_code, 0, "{}", task.stderr.text());
    assert_eq!(task.stdout.wait_eof().await.trim(), format!("[{core}]"));
}

/// The `config {}` blocks of `examples/*.nomad`: top-level keys (with whether they were written
/// as a block) and the keys of nested blocks. Heredoc bodies are skipped.
fn example_configs(text: &str) -> Vec<Vec<(String, bool, Vec<String>)>> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    let mut heredoc: Option<String> = None;
    while let Some(line) = lines.next() {
        if line.trim() != "config {" {
            continue;
        }
        let mut keys: Vec<(String, bool, Vec<String>)> = Vec::new();
        let mut depth = 1;
        for l in lines.by_ref() {
            let t = l.trim();
            if let Some(end) = &heredoc {
                if t == end {
                    heredoc = None;
                }
                continue;
            }
            if let Some(pos) = t.find("<<-").or_else(|| t.find("<<")) {
                heredoc = Some(
                    t[pos..]
                        .trim_start_matches('<')
                        .trim_start_matches('-')
                        .to_string(),
                );
            }
            let word: String = t
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let rest = t[word.len()..].trim_start();
            if !word.is_empty() && depth == 1 {
                keys.push((word.clone(), rest.starts_with('{'), Vec::new()));
            } else if !word.is_empty()
                && depth == 2
                && rest.starts_with('=')
                && let Some(last) = keys.last_mut().filter(|k| k.1)
            {
                last.2.push(word.clone());
            }
            depth += t.matches('{').count() as i32 - t.matches('}').count() as i32;
            if depth == 0 {
                break;
            }
        }
        out.push(keys);
    }
    out
}

#[test]
fn examples_use_the_task_config_schema() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("nomad") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for keys in example_configs(&text) {
            seen += 1;
            let names: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
            for (key, is_block, nested) in &keys {
                match key.as_str() {
                    "script" | "code" | "language" | "args" | "env" => {
                        assert!(!is_block, "{path:?}: {key} is an attribute")
                    }
                    "elide_opts" => {
                        assert!(is_block, "{path:?}: elide_opts is a block");
                        for n in nested {
                            assert!(
                                ["timeout", "memory_limit_mb"].contains(&n.as_str()),
                                "{path:?}: unknown elide_opts key {n}"
                            );
                        }
                    }
                    other => panic!("{path:?}: unknown config key {other:?}"),
                }
            }
            assert!(
                names.contains(&"code") != names.contains(&"script"),
                "{path:?}: exactly one of code and script: {names:?}"
            );
        }
    }
    assert!(seen >= 7, "found {seen} elide config blocks");
}

#[tokio::test]
async fn stop_without_a_signal_or_with_an_unknown_one_sends_sigint() {
    // An unknown name (a typo in kill_signal) must not leave the task running: Nomad would
    // retry StopTask a few times, then give up on it. It is stopped as with no kill_signal.
    let (_daemon, plugin, root) = setup().await;
    let alloc = Alloc::new(root.path());
    for (name, signal) in [("int", ""), ("typo", "SIGNOPE")] {
        let task = alloc.task(name);
        plugin
            .start_json(
                &task,
                json!({"language": "javascript", "code": "console.log('ready'); setInterval(() => {}, 1000);"}),
            )
            .await
            .unwrap();
        task.stdout.wait_for("ready", |t| t.contains("ready")).await;
        plugin
            .stop(&task.id, signal, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("kill_signal {signal:?}: {e:?}"));
        let r = plugin.wait(&task.id).await.result.unwrap();
        assert_eq!(
            (r.signal, r.exit_code),
            (2, 130),
            "kill_signal {signal:?}: {r:?}"
        );
    }
}

#[tokio::test]
async fn context_pool_size_zero_runs_every_task_cold() {
    let daemon = TestDaemon::start().await;
    let root = DataDir(daemon.path("nomad"));
    std::fs::create_dir_all(root.path()).unwrap();
    let alloc = Alloc::new(root.path());
    for (size, want_pooled) in [(0, false), (1, true)] {
        let mut cfg = plugin_config(&daemon.socket, None);
        cfg["session_config"] = json!([{ "context_pool_size": size }]);
        let plugin = Plugin::launch(&cfg).await;
        let mut c = daemon.client().await;
        // A pooled run needs its worker warm, so the pooled case retries until it is; the cold
        // case runs a few tasks with the same pauses, long enough for a pool to have warmed.
        let deadline = Instant::now() + DEADLINE;
        let mut n = 0;
        let pooled = loop {
            n += 1;
            let task = alloc.task(&format!("pool{size}-{n}"));
            let h = plugin
                .start_json(&task, json!({"language": "python", "code": "print('hi')"}))
                .await
                .unwrap();
            assert_eq!(plugin.wait(&task.id).await.result.unwrap().exit_code, 0);
            assert_eq!(task.stdout.wait_eof().await, "hi\n");
            let pid = lifecycle_support::handle_pid(&h);
            let e = c
                .list_executions(
                    elide_task_driver::proto::elide::daemon::v1alpha1::ListExecutionsRequest::default(),
                )
                .await
                .unwrap()
                .into_inner()
                .executions
                .into_iter()
                .find(|e| e.pid == pid)
                .expect("the task's execution is listed");
            plugin.destroy(&task.id, true).await.unwrap();
            if e.pooled || Instant::now() > deadline || (!want_pooled && n == 4) {
                break e.pooled;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        assert_eq!(pooled, want_pooled, "context_pool_size = {size}");
    }
}
