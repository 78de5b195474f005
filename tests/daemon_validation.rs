//! Every bad input gets a clear error naming the field, with the right gRPC code.

mod daemon_support;

use daemon_support::*;
use elide_task_driver::proto::elide::daemon::v1alpha1 as pb;
use tonic::Code;

fn check(r: Result<tonic::Response<pb::Execution>, tonic::Status>, code: Code, needles: &[&str]) {
    let st = r.expect_err("expected an error");
    assert_eq!(st.code(), code, "{}", st.message());
    for n in needles {
        assert!(st.message().contains(n), "{:?} lacks {n:?}", st.message());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn start_execution_rejects_bad_input_naming_the_field() {
    let d = TestDaemon::start_with(&["--max-code-bytes", "2000000"]).await;
    let mut c = d.client().await;
    let s = session(&mut c, &["env", "io", "net"]).await;
    let ok = || code_req(&s, "py", "print(1)");

    let mut r = ok();
    r.language = "cobol".into();
    check(
        c.start_execution(r).await,
        Code::InvalidArgument,
        &["language", "cobol"],
    );

    let mut r = ok();
    r.code = String::new();
    check(
        c.start_execution(r).await,
        Code::InvalidArgument,
        &["code", "empty"],
    );

    let mut r = ok();
    r.path = "/etc/hostname".into();
    check(
        c.start_execution(r).await,
        Code::InvalidArgument,
        &["code", "both"],
    );

    let mut r = ok();
    r.code = String::new();
    r.path = "/nonexistent/x.py".into();
    check(
        c.start_execution(r).await,
        Code::InvalidArgument,
        &["path", "/nonexistent/x.py"],
    );

    let mut r = ok();
    r.working_dir = "relative/dir".into();
    check(
        c.start_execution(r).await,
        Code::InvalidArgument,
        &["working_dir", "relative"],
    );

    let mut r = ok();
    r.session_id = "no-such-session".into();
    check(
        c.start_execution(r).await,
        Code::NotFound,
        &["session", "no-such-session"],
    );

    for p in ["/etc/passwd", "/tmp", "/etc/../tmp/x"] {
        let mut r = ok();
        r.stdout = path_sink(std::path::Path::new(p));
        check(
            c.start_execution(r).await,
            Code::InvalidArgument,
            &["stdout.path"],
        );
    }
    let mut r = ok();
    r.stderr = path_sink(std::path::Path::new("relative.log"));
    check(
        c.start_execution(r).await,
        Code::InvalidArgument,
        &["stderr.path"],
    );

    for (field, f) in [
        ("limits.memory_bytes", 0usize),
        ("limits.cpu_shares", 1),
        ("limits.pids", 2),
    ] {
        let mut r = ok();
        let mut l = pb::Limits::default();
        match f {
            0 => l.memory_bytes = -1,
            1 => l.cpu_shares = -5,
            _ => l.pids = -1,
        }
        r.limits = Some(l);
        check(
            c.start_execution(r).await,
            Code::InvalidArgument,
            &[field, "negative"],
        );
    }
    // A memory limit no interpreter can start under is refused before any process exists.
    let mut r = ok();
    r.limits = Some(pb::Limits {
        memory_bytes: 1 << 20,
        ..Default::default()
    });
    check(
        c.start_execution(r).await,
        Code::InvalidArgument,
        &["limits.memory_bytes", "1048576 bytes is below"],
    );
    let mut r = ok();
    r.limits = Some(pb::Limits {
        timeout: Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        }),
        ..Default::default()
    });
    check(
        c.start_execution(r).await,
        Code::InvalidArgument,
        &["limits.timeout"],
    );
    // Reserved cores: a list the kernel cannot take (bad input), or a core this node does not
    // have online (Nomad's list, of another moment: a precondition).
    for (cores, code, needles) in [
        (
            "1,x",
            Code::InvalidArgument,
            vec![
                "limits.cpuset_cpus",
                "\"1,x\"",
                "\"x\" is not a core number",
            ],
        ),
        (
            "3-1",
            Code::InvalidArgument,
            vec!["limits.cpuset_cpus", "runs backwards"],
        ),
        (
            "1023",
            Code::FailedPrecondition,
            vec!["limits.cpuset_cpus", "core 1023 is not online on this node"],
        ),
    ] {
        let mut r = ok();
        r.limits = Some(pb::Limits {
            cpuset_cpus: cores.into(),
            ..Default::default()
        });
        check(c.start_execution(r).await, code, &needles);
    }

    let mut r = ok();
    r.env = vec![pb::EnvVar {
        key: vec![0xff, 0xfe, b'A'],
        value: b"v".to_vec(),
    }];
    check(
        c.start_execution(r).await,
        Code::InvalidArgument,
        &["env[0].key", "UTF-8"],
    );

    let mut r = ok();
    r.env = vec![pb::EnvVar {
        key: b"A=B".to_vec(),
        value: b"v".to_vec(),
    }];
    check(
        c.start_execution(r).await,
        Code::InvalidArgument,
        &["env[0].key"],
    );

    let mut r = ok();
    r.user = "no-such-user-xyz".into();
    check(
        c.start_execution(r).await,
        Code::InvalidArgument,
        &["user", "no-such-user-xyz"],
    );

    let mut r = ok();
    r.code = "x".repeat(2_000_001);
    check(
        c.start_execution(r).await,
        Code::ResourceExhausted,
        &["code", "max_code_bytes"],
    );

    let mut r = ok();
    r.language = "ts".into();
    r.code = "enum Color { Red }\nconsole.log(Color.Red)".into();
    check(
        c.start_execution(r).await,
        Code::InvalidArgument,
        &["code", "unsupported", "enum"],
    );

    let mut r = ok();
    r.network_namespace = "/var/run/netns/does-not-exist".into();
    check(
        c.start_execution(r).await,
        Code::InvalidArgument,
        &["network_namespace"],
    );

    // A failed start leaves nothing behind.
    let list = executions_of(&mut c, &s).await;
    assert!(list.is_empty(), "{list:?}");
    assert_eq!(std::fs::read_dir(&d.run_dir).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn disabled_language_and_bad_session_config_are_refused() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = c
        .create_session(pb::CreateSessionRequest {
            config: Some(pb::SessionConfig {
                enabled_languages: vec!["py".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.languages, vec!["python".to_string()]);
    check(
        c.start_execution(code_req(&s.id, "js", "1")).await,
        Code::InvalidArgument,
        &["language", "javascript", "not enabled"],
    );
    let st = c
        .create_session(pb::CreateSessionRequest {
            config: Some(pb::SessionConfig {
                enabled_languages: vec!["ruby".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(
        st.message().contains("config.enabled_languages[0]"),
        "{}",
        st.message()
    );
    let st = c
        .create_session(pb::CreateSessionRequest {
            config: Some(pb::SessionConfig {
                enabled_intrinsics: vec!["env".into(), "gpu".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        st.message().contains("config.enabled_intrinsics[1]"),
        "{}",
        st.message()
    );
    // Bounds the daemon holds whoever its client is: a pool that would start a process per
    // unit, a limit whose bytes overflow (which wrapped to a small or zero cap).
    let max_mb = elide_task_driver::daemon::session::MAX_MEMORY_LIMIT_MB;
    for (config, needles) in [
        (
            pb::SessionConfig {
                context_pool_size: 4_000_000_000,
                ..Default::default()
            },
            vec![
                "config.context_pool_size".to_string(),
                "at most 256, got 4000000000".into(),
            ],
        ),
        (
            pb::SessionConfig {
                memory_limit_mb: 1 << 44,
                ..Default::default()
            },
            vec![
                "config.memory_limit_mb".to_string(),
                format!("at most {max_mb} (MiB), got {}", 1u64 << 44),
            ],
        ),
    ] {
        let st = c
            .create_session(pb::CreateSessionRequest {
                config: Some(config),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument);
        for n in needles {
            assert!(st.message().contains(&n), "{n}: {}", st.message());
        }
    }
    // The largest limit is no limit to speak of, and runs.
    let big = c
        .create_session(pb::CreateSessionRequest {
            config: Some(pb::SessionConfig {
                memory_limit_mb: max_mb,
                enabled_languages: vec!["python".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = run(&mut c, code_req(&big.id, "python", "print(6 * 7)")).await;
    assert_eq!((r.0.exit_code, r.1.trim()), (0, "42"), "{r:?}");
    let st = c
        .create_session(pb::CreateSessionRequest {
            session_id: "../escape".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(st.message().contains("session_id"), "{}", st.message());
    c.create_session(pb::CreateSessionRequest {
        session_id: "fixed-id".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let st = c
        .create_session(pb::CreateSessionRequest {
            session_id: "fixed-id".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::AlreadyExists);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_ids_bad_signals_and_ended_executions_are_refused() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    let st = c
        .get_execution(pb::GetExecutionRequest {
            execution_id: "e-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    assert!(st.message().contains("e-nope"));
    let st = c
        .wait_execution(pb::WaitExecutionRequest {
            execution_id: "e-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    let st = c
        .get_session(pb::GetSessionRequest {
            session_id: "s-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    let st = c
        .close_session(pb::CloseSessionRequest {
            session_id: "s-nope".into(),
            grace: None,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);

    let e = c
        .start_execution(code_req(&s, "py", "import time; time.sleep(60)"))
        .await
        .unwrap()
        .into_inner();
    let st = c
        .signal_execution(pb::SignalExecutionRequest {
            execution_id: e.id.clone(),
            signal: "SIGNOPE".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().contains("signal") && st.message().contains("SIGNOPE"));
    let st = c
        .stop_execution(pb::StopExecutionRequest {
            execution_id: e.id.clone(),
            signal: "bogus".into(),
            grace: None,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    let st = c
        .remove_execution(pb::RemoveExecutionRequest {
            execution_id: e.id.clone(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    kill_now(&mut c, &e.id).await;

    // Ended: signal and exec are refused.
    let st = c
        .signal_execution(pb::SignalExecutionRequest {
            execution_id: e.id.clone(),
            signal: "USR1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    let setup = pb::ExecRequest {
        msg: Some(pb::exec_request::Msg::Setup(pb::ExecSetup {
            execution_id: e.id.clone(),
            command: vec!["/bin/true".into()],
            tty: false,
            timeout: None,
        })),
    };
    let st = c
        .exec(futures::stream::iter(vec![setup]))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    assert!(st.message().contains("not running"), "{}", st.message());
    c.remove_execution(pb::RemoveExecutionRequest {
        execution_id: e.id.clone(),
        force: false,
    })
    .await
    .unwrap();
    let st = c
        .get_execution(pb::GetExecutionRequest {
            execution_id: e.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn fifo_without_reader_fails_after_the_open_timeout_naming_the_sink() {
    let d = TestDaemon::start_with(&["--sink-open-timeout", "300ms"]).await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    let fifo = d.path("lonely.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut r = code_req(&s, "py", "print(1)");
    r.stderr = path_sink(&fifo);
    let st = tokio::time::timeout(DEADLINE, c.start_execution(r))
        .await
        .expect("StartExecution hung on a FIFO without reader")
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{}", st.message());
    assert!(
        st.message().contains("stderr.path") && st.message().contains("reader"),
        "{}",
        st.message()
    );
}

/// Runs `lang`'s snippet with stdout to a FIFO whose reader is there from the start and stderr to
/// one whose reader attaches 300 ms into the start; checks both got all output. Whether it
/// ran pooled.
async fn late_reader_run(d: &TestDaemon, c: &mut Client, s: &str, lang: &str, tag: &str) -> bool {
    let out_fifo = d.path(&format!("{tag}-out.fifo"));
    let err_fifo = d.path(&format!("{tag}-err.fifo"));
    let out_reader = fifo_reader(&out_fifo);
    nix::unistd::mkfifo(&err_fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let code = if lang == "py" {
        "import sys\nprint('out')\nprint('err', file=sys.stderr)"
    } else {
        "console.log('out'); console.error('err')"
    };
    let mut r = code_req(s, lang, code);
    r.stdout = path_sink(&out_fifo);
    r.stderr = path_sink(&err_fifo);
    let mut c2 = c.clone();
    let start = tokio::spawn(async move { c2.start_execution(r).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !start.is_finished(),
        "{tag}: started without a stderr reader"
    );
    let err_reader = std::thread::spawn(move || std::fs::read(err_fifo).unwrap());
    let e = tokio::time::timeout(DEADLINE, start)
        .await
        .expect("StartExecution hung after the reader attached")
        .unwrap()
        .unwrap_or_else(|st| panic!("{tag}: {}", st.message()))
        .into_inner();
    assert_eq!(wait(c, &e.id).await.exit_code, 0, "{tag}");
    assert_eq!(out_reader.join().unwrap(), b"out\n", "{tag}: stdout");
    assert_eq!(err_reader.join().unwrap(), b"err\n", "{tag}: stderr");
    e.pooled
}

/// Nomad's logmon usually reads before StartTask; when a reader attaches late, the start waits
/// for it (off the daemon's async workers), and a sink opened before that wait is never closed
/// in between: its reader would see an EOF and stop.
#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_whose_reader_attaches_late_gets_all_output_and_the_other_sink_stays_open() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let cold = session(&mut c, &[]).await;
    let pooled = session_with_pool(&mut c, &["env", "io", "net"], 1).await;
    for lang in ["py", "js"] {
        let ran_pooled = late_reader_run(&d, &mut c, &cold, lang, &format!("{lang}-cold")).await;
        assert!(!ran_pooled, "{lang}: a session without pool ran pooled");
        // Until a run finds the language's warm runtime up (a run without it starts cold, and
        // must be just as correct).
        let deadline = std::time::Instant::now() + DEADLINE;
        for attempt in 0.. {
            let tag = format!("{lang}-pooled-{attempt}");
            if late_reader_run(&d, &mut c, &pooled, lang, &tag).await {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{lang} never pooled");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn language_disabled_on_the_node_is_refused_and_reported() {
    let dir = tempfile::Builder::new()
        .prefix("e")
        .tempdir_in("/tmp")
        .unwrap();
    let d =
        TestDaemon::start_with_config(dir.path(), "[runtimes.javascript]\nenabled = false\n").await;
    let mut c = d.client().await;
    let js = runtime_info(&mut c, "javascript").await;
    assert!(!js.available && js.detail.contains("disabled"), "{js:?}");
    // A session asking for every language gets only the available ones.
    let s = c
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        !s.languages.contains(&"javascript".to_string()),
        "{:?}",
        s.languages
    );
    // Explicitly enabling it in a session does not make it runnable.
    let s = c
        .create_session(pb::CreateSessionRequest {
            config: Some(pb::SessionConfig {
                enabled_languages: vec!["js".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    check(
        c.start_execution(code_req(&s.id, "js", "1")).await,
        Code::FailedPrecondition,
        &["language", "javascript", "not available", "disabled"],
    );
}

/// Arguments and environment larger than the kernel lets a new process have are refused as
/// bad input naming the argument, the variable or both, cold and pooled alike (a pooled start
/// does not exec, and ran what a cold one failed with E2BIG in its child, as INTERNAL); what
/// fits runs, pooled or not.
#[tokio::test(flavor = "multi_thread")]
async fn arguments_and_environment_beyond_the_kernels_limits_are_refused_cold_and_pooled() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let var = |key: &str, len: usize| pb::EnvVar {
        key: key.as_bytes().to_vec(),
        value: vec![b'v'; len],
    };
    // The variables the test set (python adds LC_CTYPE of its own).
    let count = "import os, sys\nprint(len(sys.argv), sum(len(v) for k, v in os.environ.items() if k[0] == 'V'))";
    for (pool, language) in [
        (0, "python"),
        (2, "python"),
        (0, "javascript"),
        (2, "javascript"),
    ] {
        let s = session_with_pool(&mut c, &["env", "io", "net"], pool).await;
        let code = if language == "python" {
            count.to_string()
        } else {
            "console.log(process.argv.length - 1, Object.entries(process.env)\n\
               .filter(([k]) => k[0] === 'V').reduce((n, [, v]) => n + v.length, 0))"
                .to_string()
        };
        let what = format!("{language}, pool {pool}");

        let mut r = code_req(&s, language, &code);
        r.env = vec![var("SMALL", 10), var("HUGE", 200_000)];
        check(
            c.start_execution(r).await,
            Code::InvalidArgument,
            &["env", "HUGE=... is 200006 bytes", "131072"],
        );

        let mut r = code_req(&s, language, &code);
        r.args = vec!["ok".into(), "a".repeat(131_072)];
        check(
            c.start_execution(r).await,
            Code::InvalidArgument,
            &["args[1]", "131073 bytes"],
        );

        // The total depends on the stack limit, which the daemon has from this test.
        let limits = elide_task_driver::daemon::exec_limits::ExecLimits::of_children();
        let too_many = limits.total / 120_000 + 2;
        let mut r = code_req(&s, language, &code);
        r.env = (0..too_many)
            .map(|i| var(&format!("V{i}"), 120_000))
            .collect();
        check(
            c.start_execution(r).await,
            Code::InvalidArgument,
            &[
                "args and env",
                &format!("environment variables ({too_many})"),
                "the kernel allows a new process",
            ],
        );

        // Large but within the limits: runs on the session's path, and the snippet sees all
        // of it. The second is larger than a Unix socket's default send buffer (≈ 208 KiB),
        // which the daemon raises for the zygote's socket so that such a job runs pooled too.
        let mut sizes = vec![(1, 100_000)];
        if limits.total > 700_000 {
            sizes.push((4, 120_000));
        }
        for (n, len) in sizes {
            let mut r = code_req(&s, language, &code);
            r.args = vec!["a".repeat(len); n];
            r.env = vec![var("V0", 100_000)];
            let (_, result, out, err) = run_on_path(&mut c, r, pool > 0).await;
            assert_eq!(
                (result.exit_code, out.trim(), err.as_str()),
                (0, format!("{} 100000", n + 1).as_str(), ""),
                "{what}, {n} arguments of {len} bytes"
            );
        }
    }
}
