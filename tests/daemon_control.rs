//! Controlling running executions: signals, stop with grace, timeouts, waits that survive
//! disconnects, live output, events, stats, exec, session close and idle reclaim. What
//! controls one execution is checked on both launch paths: cold, and pooled (python forked by
//! the zygote, javascript on a warm node worker), and the pooled starts must really be pooled.

mod daemon_support;

use std::time::Duration;

use daemon_support::*;
use elide_task_driver::proto::elide::daemon::v1alpha1 as pb;

/// StopExecution with `signal` and `grace_s` seconds of grace: its result.
async fn stopped(c: &mut Client, id: &str, signal: &str, grace_s: i64) -> pb::ExecutionResult {
    c.stop_execution(pb::StopExecutionRequest {
        execution_id: id.into(),
        signal: signal.into(),
        grace: Some(prost_types::Duration {
            seconds: grace_s,
            nanos: 0,
        }),
    })
    .await
    .unwrap()
    .into_inner()
    .result
    .unwrap()
}

/// Starts `req` on the path `kind` names (see `start_on_path`) and waits until it printed
/// `ready` on stdout.
async fn start_ready_on(
    c: &mut Client,
    kind: Kind,
    req: pb::StartExecutionRequest,
) -> pb::Execution {
    let e = start_on_path(c, req, kind == Kind::Pooled).await;
    assert_eq!(e.pooled, kind == Kind::Pooled, "{kind:?}: {e:?}");
    await_ready(c, e).await
}

/// Starts `code` and waits until it printed `ready` on stdout.
async fn start_ready(c: &mut Client, req: pb::StartExecutionRequest) -> pb::Execution {
    let e = c.start_execution(req).await.unwrap().into_inner();
    await_ready(c, e).await
}

/// Waits until `e` printed `ready` on stdout.
async fn await_ready(c: &mut Client, e: pb::Execution) -> pb::Execution {
    let mut s = c
        .stream_output(pb::StreamOutputRequest {
            execution_id: e.id.clone(),
            streams: vec![pb::OutputStream::Stdout as i32],
            offset: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("ready") {
        let chunk = tokio::time::timeout(DEADLINE, s.message())
            .await
            .expect("no ready line")
            .unwrap()
            .expect("output ended before ready");
        seen.extend_from_slice(&chunk.data);
    }
    e
}

#[tokio::test(flavor = "multi_thread")]
async fn snippet_signal_handler_sees_sigusr1() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    for kind in KINDS {
        let s = session_of(&mut c, kind, &["io"]).await;
        // The handler writes with os.write: the signal may land while `print('ready')` is
        // still inside the buffered writer, and print is not reentrant.
        let code = "import os, signal, sys, time\n\
                    def h(n, f):\n    os.write(1, b'got %d\\n' % n)\n    sys.exit(0)\n\
                    signal.signal(signal.SIGUSR1, h)\nprint('ready', flush=True)\n\
                    while True: time.sleep(0.1)\n";
        let e = start_ready_on(&mut c, kind, code_req(&s, "py", code)).await;
        c.signal_execution(pb::SignalExecutionRequest {
            execution_id: e.id.clone(),
            signal: "SIGUSR1".into(),
        })
        .await
        .unwrap();
        let r = wait(&mut c, &e.id).await;
        let err = output(&mut c, &e.id, pb::OutputStream::Stderr).await;
        assert_eq!(
            r.exit_code,
            0,
            "{kind:?}: {}",
            String::from_utf8_lossy(&err)
        );
        let out = output(&mut c, &e.id, pb::OutputStream::Stdout).await;
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("ready\ngot {}\n", libc::SIGUSR1),
            "{kind:?}"
        );

        let js = "process.on('SIGUSR1', () => { console.log('js got usr1'); process.exit(5); });\n\
                  console.log('ready'); setInterval(() => {}, 1000);";
        let e = start_ready_on(&mut c, kind, code_req(&s, "js", js)).await;
        c.signal_execution(pb::SignalExecutionRequest {
            execution_id: e.id.clone(),
            signal: "usr1".into(),
        })
        .await
        .unwrap();
        assert_eq!(wait(&mut c, &e.id).await.exit_code, 5, "{kind:?}");
        let out = output(&mut c, &e.id, pb::OutputStream::Stdout).await;
        assert_eq!(
            String::from_utf8_lossy(&out),
            "ready\njs got usr1\n",
            "{kind:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_sends_signal_then_sigkill_after_grace() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    // (language, ignores SIGTERM, honours SIGTERM)
    let cases = [
        (
            "py",
            "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
             print('ready', flush=True)\nwhile True: time.sleep(0.1)\n",
            "import time\nprint('ready', flush=True)\ntime.sleep(60)",
        ),
        (
            "js",
            "process.on('SIGTERM', () => {}); console.log('ready'); setInterval(() => {}, 100);",
            "console.log('ready'); setTimeout(() => {}, 60000);",
        ),
    ];
    for kind in KINDS {
        let s = session_of(&mut c, kind, &["io"]).await;
        for (lang, ignores, honours) in cases {
            // Ignores SIGTERM: only the SIGKILL after the grace period ends it.
            let e = start_ready_on(&mut c, kind, code_req(&s, lang, ignores)).await;
            let started = std::time::Instant::now();
            let r = stopped(&mut c, &e.id, "SIGTERM", 1).await;
            assert_eq!((r.signal, r.exit_code), (9, 137), "{kind:?} {lang}");
            assert!(
                started.elapsed() >= Duration::from_secs(1),
                "{kind:?} {lang}: killed before the grace period"
            );
            assert!(!alive(e.pid), "{kind:?} {lang}");

            // One that honours SIGTERM ends with it, well before the grace period.
            let e = start_ready_on(&mut c, kind, code_req(&s, lang, honours)).await;
            let r = stopped(&mut c, &e.id, "", 50).await;
            assert_eq!((r.signal, r.exit_code), (15, 143), "{kind:?} {lang}");
            assert!(!alive(e.pid), "{kind:?} {lang}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_kills_the_whole_process_group() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let cases = [
        (
            "py",
            "import subprocess, time\n\
             p = subprocess.Popen(['sleep', '300'])\nprint(p.pid)\nprint('ready', flush=True)\ntime.sleep(300)\n",
        ),
        (
            "js",
            "const p = require('child_process').spawn('sleep', ['300'], { stdio: 'ignore' });\n\
             console.log(p.pid); console.log('ready'); setInterval(() => {}, 1000);",
        ),
    ];
    for kind in KINDS {
        let s = session_of(&mut c, kind, &["env", "io", "net"]).await;
        for (lang, code) in cases {
            let mut req = code_req(&s, lang, code);
            req.env = vec![pb::EnvVar {
                key: b"PATH".to_vec(),
                value: b"/usr/bin:/bin".to_vec(),
            }];
            let e = start_ready_on(&mut c, kind, req).await;
            let out = output_read(&mut c, &e.id, pb::OutputStream::Stdout, false).await;
            let out = String::from_utf8(out).unwrap();
            let grandchild: u32 = out
                .lines()
                .next()
                .and_then(|l| l.trim().parse().ok())
                .unwrap_or_else(|| panic!("{kind:?} {lang}: no pid in {out:?}"));
            assert!(alive(grandchild), "{kind:?} {lang}");
            c.stop_execution(pb::StopExecutionRequest {
                execution_id: e.id.clone(),
                signal: "TERM".into(),
                grace: Some(prost_types::Duration {
                    seconds: 5,
                    nanos: 0,
                }),
            })
            .await
            .unwrap();
            eventually(&format!("{kind:?} {lang}: grandchild killed"), || {
                !alive(grandchild)
            })
            .await;
            assert!(!alive(e.pid), "{kind:?} {lang}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_kills_and_reports_timed_out() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    for kind in KINDS {
        let s = session_of(&mut c, kind, &["io"]).await;
        for (lang, code) in [
            ("js", "setInterval(() => {}, 1000)"),
            ("py", "import time\nwhile True: time.sleep(0.1)"),
        ] {
            let mut req = code_req(&s, lang, code);
            req.limits = Some(pb::Limits {
                timeout: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 500_000_000,
                }),
                ..Default::default()
            });
            let mut events = events_of(&mut c, &s).await;
            let e = start_on_path(&mut c, req, kind == Kind::Pooled).await;
            let r = wait(&mut c, &e.id).await;
            assert!(r.timed_out, "{kind:?} {lang}: {r:?}");
            assert_eq!((r.signal, r.exit_code), (9, 137), "{kind:?} {lang}");
            assert!(!alive(e.pid), "{kind:?} {lang}");
            // This execution's events, up to its exit (start_on_path may have retried).
            let mut kinds = Vec::new();
            while !kinds.contains(&pb::EventKind::Exited) {
                let ev = tokio::time::timeout(DEADLINE, events.message())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                assert_eq!(ev.session_id, s);
                if ev.execution_id == e.id {
                    kinds.push(ev.kind());
                }
            }
            for k in [
                pb::EventKind::Queued,
                pb::EventKind::Started,
                pb::EventKind::TimedOut,
            ] {
                assert!(kinds.contains(&k), "{kind:?} {lang}: {kinds:?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn disconnected_waiter_loses_nothing_and_many_waiters_see_the_result() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    let e = start_ready(
        &mut c,
        code_req(
            &s,
            "py",
            "import sys, time\nprint('ready', flush=True)\ntime.sleep(1.5)\nsys.exit(42)",
        ),
    )
    .await;
    // A client waits, then drops its connection mid-wait.
    {
        let mut c2 = d.client().await;
        let id = e.id.clone();
        let w = tokio::spawn(async move {
            c2.wait_execution(pb::WaitExecutionRequest { execution_id: id })
                .await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        w.abort();
    }
    let mut waiters = Vec::new();
    for _ in 0..5 {
        let mut ci = d.client().await;
        let id = e.id.clone();
        waiters.push(tokio::spawn(async move { wait(&mut ci, &id).await }));
    }
    for w in waiters {
        assert_eq!(w.await.unwrap().exit_code, 42);
    }
    // A new connection after the end gets the real result at once.
    let mut c3 = d.client().await;
    assert_eq!(wait(&mut c3, &e.id).await.exit_code, 42);
    let got = execution(&mut c3, &e.id).await;
    assert_eq!(got.state(), pb::ExecutionState::Exited);
    assert_eq!(got.result.unwrap().exit_code, 42);
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_measure_a_running_execution() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    // 30 MiB of touched memory, then busy until killed.
    let cases = [
        (
            "py",
            "x = bytearray(30 * 1024 * 1024)\nprint('ready', flush=True)\nimport time\nt = time.time()\nwhile time.time() - t < 60: pass\n",
        ),
        (
            "js",
            "const x = Buffer.alloc(30 * 1024 * 1024, 1); console.log('ready');\n\
             const t = Date.now(); while (Date.now() - t < 60000) {}",
        ),
    ];
    for kind in KINDS {
        let s = session_of(&mut c, kind, &["io"]).await;
        for (lang, code) in cases {
            let e = start_ready_on(&mut c, kind, code_req(&s, lang, code)).await;
            // CPU time shows once the kernel has accounted some: poll for it.
            let deadline = std::time::Instant::now() + DEADLINE;
            let st = loop {
                let st = c
                    .get_execution_stats(pb::GetExecutionStatsRequest {
                        execution_id: e.id.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if st.cpu_user_seconds + st.cpu_system_seconds > 0.0
                    || std::time::Instant::now() > deadline
                {
                    break st;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let what = format!("{kind:?} {lang}: {st:?}");
            assert!(st.measured.contains(&"rss".to_string()), "{what}");
            assert!(st.rss_bytes > 30 * 1024 * 1024, "{what}");
            assert!(st.cpu_user_seconds + st.cpu_system_seconds > 0.0, "{what}");
            assert!(st.processes.contains_key(&e.pid), "{what}");
            kill_now(&mut c, &e.id).await;
            assert_eq!(wait(&mut c, &e.id).await.signal, 9, "{kind:?} {lang}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_runs_a_command_in_the_execution_context() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let cases = [
        (
            "py",
            &["env"][..],
            "import time\nprint('ready', flush=True)\ntime.sleep(60)",
        ),
        (
            "js",
            &["env", "io"][..],
            "console.log('ready'); setTimeout(() => {}, 60000);",
        ),
    ];
    for kind in KINDS {
        for (lang, intrinsics, code) in cases {
            let s = session_of(&mut c, kind, intrinsics).await;
            let mut req = code_req(&s, lang, code);
            req.env = vec![
                pb::EnvVar {
                    key: b"MARK".to_vec(),
                    value: b"m1".to_vec(),
                },
                pb::EnvVar {
                    key: b"PATH".to_vec(),
                    value: b"/usr/bin:/bin".to_vec(),
                },
            ];
            let e = start_ready_on(&mut c, kind, req).await;
            exec_in(&mut c, &d, &e, &format!("{kind:?} {lang}")).await;
        }
    }
}

/// What [`exec_runs_a_command_in_the_execution_context`] checks of one running execution `e`
/// (started with MARK=m1 in its environment), which it then kills.
async fn exec_in(c: &mut Client, d: &TestDaemon, e: &pb::Execution, what: &str) {
    // A command that cannot start is an error naming the field.
    let bad = pb::ExecRequest {
        msg: Some(pb::exec_request::Msg::Setup(pb::ExecSetup {
            execution_id: e.id.clone(),
            command: vec!["/no/such/program".into()],
            tty: false,
            timeout: None,
        })),
    };
    let st = c.exec(futures::stream::iter(vec![bad])).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{what}");
    assert!(
        st.message().contains("setup.command"),
        "{what}: {}",
        st.message()
    );
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::ExecRequest {
        msg: Some(pb::exec_request::Msg::Setup(pb::ExecSetup {
            execution_id: e.id.clone(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "read line; echo \"$line $MARK $(pwd)\"; echo oops >&2; exit 4".into(),
            ],
            tty: false,
            timeout: None,
        })),
    })
    .await
    .unwrap();
    tx.send(pb::ExecRequest {
        msg: Some(pb::exec_request::Msg::Stdin(b"hello\n".to_vec())),
    })
    .await
    .unwrap();
    tx.send(pb::ExecRequest {
        msg: Some(pb::exec_request::Msg::StdinClose(true)),
    })
    .await
    .unwrap();
    let out = c
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let (so, se, code) = drain_exec(out).await;
    drop(tx);
    assert!(so.starts_with("hello m1 "), "{what}: {so}");
    assert!(
        so.contains(&*d.run_dir.display().to_string()),
        "{what}: cwd not the execution's: {so}"
    );
    assert_eq!(se, "oops\n", "{what}");
    assert_eq!(code, 4, "{what}");

    // With a tty: the command sees a terminal of the requested size.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::ExecRequest {
        msg: Some(pb::exec_request::Msg::Setup(pb::ExecSetup {
            execution_id: e.id.clone(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "sleep 0.5; test -t 1 && stty size".into(),
            ],
            tty: true,
            timeout: None,
        })),
    })
    .await
    .unwrap();
    tx.send(pb::ExecRequest {
        msg: Some(pb::exec_request::Msg::Resize(pb::TerminalSize {
            height: 33,
            width: 101,
        })),
    })
    .await
    .unwrap();
    let out = c
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let (so, _, code) = drain_exec(out).await;
    drop(tx);
    assert_eq!(code, 0, "{what}: {so}");
    assert!(so.contains("33 101"), "{what}: {so}");

    // The operator's exec session reaches the task's processes (the task cannot reach out of
    // its own Landlock domain, but the session is not inside it).
    let task_pid = execution(c, &e.id).await.pid;
    assert_eq!(task_pid, e.pid, "{what}");
    let (so, _, code) = exec_collect(
        c,
        &e.id,
        &["sh", "-c", &format!("kill -0 {task_pid} && echo reached")],
    )
    .await;
    assert_eq!((so.as_str(), code), ("reached\n", 0), "{what}");
    kill_now(c, &e.id).await;
    assert_eq!(wait(c, &e.id).await.signal, 9, "{what}");
}

/// Runs `command` in the execution through Exec without a tty or input.
async fn exec_collect(c: &mut Client, id: &str, command: &[&str]) -> (String, String, i32) {
    let setup = pb::ExecRequest {
        msg: Some(pb::exec_request::Msg::Setup(pb::ExecSetup {
            execution_id: id.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            tty: false,
            timeout: None,
        })),
    };
    let close = pb::ExecRequest {
        msg: Some(pb::exec_request::Msg::StdinClose(true)),
    };
    let out = c
        .exec(futures::stream::iter(vec![setup, close]))
        .await
        .unwrap()
        .into_inner();
    drain_exec(out).await
}

/// An Exec response stream to its end: (stdout, stderr, exit code).
async fn drain_exec(mut out: tonic::Streaming<pb::ExecResponse>) -> (String, String, i32) {
    let (mut so, mut se, mut code) = (Vec::new(), Vec::new(), None);
    while let Some(m) = tokio::time::timeout(DEADLINE, out.message())
        .await
        .unwrap()
        .unwrap()
    {
        match m.msg {
            Some(pb::exec_response::Msg::Stdout(b)) => so.extend(b),
            Some(pb::exec_response::Msg::Stderr(b)) => se.extend(b),
            Some(pb::exec_response::Msg::Exited(r)) => code = Some(r.exit_code),
            None => {}
        }
    }
    (
        String::from_utf8_lossy(&so).into_owned(),
        String::from_utf8_lossy(&se).into_owned(),
        code.expect("the exec stream ended without an exit"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_a_session_stops_its_executions() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    let mut pids = Vec::new();
    for _ in 0..3 {
        let e = start_ready(
            &mut c,
            code_req(
                &s,
                "py",
                "import time\nprint('ready', flush=True)\ntime.sleep(60)",
            ),
        )
        .await;
        pids.push(e.pid);
    }
    let got = c
        .get_session(pb::GetSessionRequest {
            session_id: s.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.running_executions, got.total_executions), (3, 3));
    c.close_session(pb::CloseSessionRequest {
        session_id: s.clone(),
        grace: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
    })
    .await
    .unwrap();
    for p in pids {
        assert!(!alive(p), "pid {p} survived its session");
    }
    let list = c
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.sessions.iter().all(|x| x.id != s));
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_sessions_are_reclaimed_but_busy_ones_are_kept() {
    let d = TestDaemon::start_with(&["--session-idle-ttl", "1s"]).await;
    let mut c = d.client().await;
    let idle = session(&mut c, &[]).await;
    let busy = session(&mut c, &[]).await;
    let e = start_ready(
        &mut c,
        code_req(
            &busy,
            "py",
            "import time\nprint('ready', flush=True)\ntime.sleep(300)",
        ),
    )
    .await;
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let list = c
            .list_sessions(pb::ListSessionsRequest {})
            .await
            .unwrap()
            .into_inner();
        if list.sessions.iter().all(|x| x.id != idle) {
            assert!(
                list.sessions.iter().any(|x| x.id == busy),
                "busy session reclaimed"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "idle session never reclaimed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // An ended execution of a reclaimed session still answers with its result.
    let done_session = session(&mut c, &[]).await;
    let done = c
        .start_execution(code_req(&done_session, "py", "import sys; sys.exit(6)"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(wait(&mut c, &done.id).await.exit_code, 6);
    let deadline = std::time::Instant::now() + DEADLINE;
    // ListSessions is not activity (GetSession would keep the session alive).
    while c
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions
        .iter()
        .any(|x| x.id == done_session)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "idle session never reclaimed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(wait(&mut c, &done.id).await.exit_code, 6);
    assert_eq!(
        execution(&mut c, &e.id).await.state(),
        pb::ExecutionState::Running
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_output_resumes_from_an_offset_and_follows_live_output() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    let code = "import sys, time\nprint('ready', flush=True)\nfor i in range(5):\n    print('line', i, flush=True)\n    time.sleep(0.2)\n";
    let e = start_ready(&mut c, code_req(&s, "py", code)).await;
    // Follow from byte 6 ("ready\n" skipped) while the snippet still writes.
    let mut st = c
        .stream_output(pb::StreamOutputRequest {
            execution_id: e.id.clone(),
            streams: vec![],
            offset: 6,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut next = 6u64;
    while let Some(ch) = tokio::time::timeout(DEADLINE, st.message())
        .await
        .unwrap()
        .unwrap()
    {
        assert_eq!(ch.stream(), pb::OutputStream::Stdout);
        assert_eq!(ch.offset, next);
        next += ch.data.len() as u64;
        got.extend(ch.data);
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        "line 0\nline 1\nline 2\nline 3\nline 4\n"
    );
    assert_eq!(wait(&mut c, &e.id).await.exit_code, 0);
    // Without follow, an ended execution's output is returned at once from any offset.
    let mut st = c
        .stream_output(pb::StreamOutputRequest {
            execution_id: e.id.clone(),
            streams: vec![pb::OutputStream::Stdout as i32],
            offset: 13,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let ch = st.message().await.unwrap().unwrap();
    assert_eq!(
        (ch.offset, &ch.data[..]),
        (13, &b"line 1\nline 2\nline 3\nline 4\n"[..])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_command_is_killed_when_its_client_goes_away() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    let e = start_ready(
        &mut c,
        code_req(
            &s,
            "py",
            "import time\nprint('ready', flush=True)\ntime.sleep(300)",
        ),
    )
    .await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::ExecRequest {
        msg: Some(pb::exec_request::Msg::Setup(pb::ExecSetup {
            execution_id: e.id.clone(),
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo $$; exec /bin/sleep 300".into(),
            ],
            tty: false,
            timeout: None,
        })),
    })
    .await
    .unwrap();
    let mut c2 = d.client().await;
    let mut out = c2
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(DEADLINE, out.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(pb::exec_response::Msg::Stdout(b)) = first.msg else {
        panic!("expected the pid on stdout, got {first:?}");
    };
    let pid: u32 = String::from_utf8_lossy(&b).trim().parse().unwrap();
    assert!(alive(pid));
    drop(out);
    drop(tx);
    drop(c2);
    eventually("exec'd command killed after its client left", || {
        !alive(pid)
    })
    .await;
    // The execution itself is untouched.
    assert!(alive(e.pid));
    kill_now(&mut c, &e.id).await;
}

/// A node without cgroups cannot hold an execution to its limits: the daemon says so when it
/// starts, and a task that asks for limits is told in its Started event (which Nomad shows as
/// a task event). With cgroups, neither.
#[tokio::test(flavor = "multi_thread")]
async fn limits_that_cannot_hold_are_said_so_at_start_and_in_the_started_event() {
    let no_cgroups = tempfile::tempdir().unwrap();
    let without =
        TestDaemon::start_with(&["--cgroup-root", no_cgroups.path().to_str().unwrap()]).await;
    let with = TestDaemon::start().await;
    for (d, has_cgroups) in [(&without, false), (&with, true)] {
        let mut c = d.client().await;
        let mode = daemon_info(&mut c).await.cgroup_mode;
        if has_cgroups && mode == "none" {
            eprintln!(
                "this machine has no usable cgroups: only the daemon without them is checked"
            );
            continue;
        }
        assert_eq!(mode == "none", !has_cgroups, "{mode}");
        let s = session(&mut c, &[]).await;
        let mut events = events_of(&mut c, &s).await;
        let mut started = Vec::new();
        for memory_bytes in [64 << 20, 0] {
            let mut req = code_req(&s, "py", "pass");
            req.limits = Some(pb::Limits {
                memory_bytes,
                ..Default::default()
            });
            let e = c.start_execution(req).await.unwrap().into_inner();
            assert_eq!(wait(&mut c, &e.id).await.exit_code, 0);
            started.push(next_event(&mut events, pb::EventKind::Started, &e.id).await);
        }
        let told = |ev: &pb::ExecutionEvent| {
            ev.message
                .contains("limits are not enforced: this node has no usable cgroups")
                && ev.annotations.get("limits").map(String::as_str) == Some("not enforced")
        };
        assert_eq!(told(&started[0]), !has_cgroups, "{:?}", started[0]);
        assert!(!told(&started[1]), "no limits asked for: {:?}", started[1]);
        assert_eq!(
            d.log().contains("no usable cgroups"),
            !has_cgroups,
            "{}",
            d.log()
        );
    }
}

/// Once WaitExecution has answered, StreamOutput without follow returns all of an execution's
/// captured output, including what was still in the pipe when the process exited (a pooled
/// runtime reports its exit before the kernel closes its end).
#[tokio::test(flavor = "multi_thread")]
async fn an_ended_executions_output_is_whole_without_follow() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    for pool in [2, 0] {
        let s = session_with_pool(&mut c, &[], pool).await;
        for lang in ["py", "js"] {
            let code = if lang == "py" {
                "import sys\nsys.stdout.write('x' * 1000000 + 'end')"
            } else {
                "process.stdout.write('x'.repeat(1000000) + 'end')"
            };
            for _ in 0..3 {
                let e = c
                    .start_execution(code_req(&s, lang, code))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(wait(&mut c, &e.id).await.exit_code, 0);
                let out = output_read(&mut c, &e.id, pb::OutputStream::Stdout, false).await;
                assert_eq!(
                    (out.len(), out.ends_with(b"end")),
                    (1_000_003, true),
                    "{lang}, pool {pool}, pooled: {}",
                    e.pooled
                );
            }
        }
    }
}

/// A child that leaves the snippet's process group and keeps its stdout (possible where no
/// cgroup sweeps up after an execution) does not hold a stream open once the execution has
/// ended, following or not; what it writes shortly after the end is still part of the output.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemonized_child_does_not_hold_the_output_open() {
    let no_cgroups = tempfile::tempdir().unwrap();
    let d = TestDaemon::start_with(&["--cgroup-root", no_cgroups.path().to_str().unwrap()]).await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    // The snippet ends only once the child has left its process group (the group is killed
    // when the snippet ends).
    let code = "import os, sys, time\n\
                r, w = os.pipe()\n\
                pid = os.fork()\n\
                if pid == 0:\n    os.setsid()\n    os.write(w, b'x')\n    time.sleep(0.3)\n    \
                print('late', flush=True)\n    time.sleep(600)\n    os._exit(0)\n\
                os.read(r, 1)\n\
                print(pid, flush=True)";
    let e = c
        .start_execution(code_req(&s, "py", code))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(wait(&mut c, &e.id).await.exit_code, 0);
    let started = std::time::Instant::now();
    let now = String::from_utf8(output_read(&mut c, &e.id, pb::OutputStream::Stdout, false).await)
        .unwrap();
    let followed =
        String::from_utf8(output(&mut c, &e.id, pb::OutputStream::Stdout).await).unwrap();
    let waited = started.elapsed();
    let child: i32 = now
        .lines()
        .next()
        .unwrap_or("")
        .parse()
        .expect("the child's pid");
    let alive_then = alive(child as u32);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(alive_then, "the daemonized child outlived the execution");
    assert_eq!(now, format!("{child}\nlate\n"));
    assert_eq!(followed, now);
    assert!(
        waited < Duration::from_secs(20),
        "the streams stayed open {waited:?}"
    );
}

/// A daemon that stops ends its executions with SIGTERM, and their results say the daemon
/// ended them, also when a snippet catches the signal and exits 0: Nomad must not count such a
/// task as done (a batch job would be marked complete instead of restarted). Checked where the
/// plugin reads it after a daemon restart: the persisted result.
#[tokio::test(flavor = "multi_thread")]
async fn an_execution_a_stopping_daemon_ends_says_so_even_after_a_clean_exit() {
    let mut d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    let code = "import signal, sys, time\n\
                signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n\
                print('ready', flush=True)\n\
                time.sleep(600)";
    let e = start_ready(&mut c, code_req(&s, "py", code)).await;
    drop(c);
    d.terminate();
    let mut daemon = d.child.take().expect("the daemon process");
    let status = tokio::task::spawn_blocking(move || daemon.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}: {}", d.log());
    assert!(!alive(e.pid), "the snippet outlived the daemon");
    d.spawn().await;
    let mut c = d.client().await;
    let r = execution(&mut c, &e.id).await.result.expect("a result");
    assert_eq!((r.exit_code, r.signal), (0, 0), "{r:?}");
    assert!(
        r.error
            .contains("elide-daemon stopped (shut down or restarted) while this task ran"),
        "{r:?}"
    );
}
