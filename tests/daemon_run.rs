//! The daemon runs real python3/node snippets: output, exit codes, args, env, isolation between
//! executions, large code, large output through a FIFO, runtime discovery.

mod daemon_support;

use daemon_support::*;
use elide_task_driver::proto::elide::daemon::v1alpha1 as pb;

#[tokio::test(flavor = "multi_thread")]
async fn hello_world_runs_in_every_language() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &["env", "io", "net"]).await;
    for (lang, code) in [
        ("python", "print('hello from python')"),
        ("js", "console.log('hello from javascript')"),
        (
            "ts",
            "const who: string = 'typescript';\ninterface X { a: number }\nconsole.log(`hello from ${who}`);",
        ),
    ] {
        let (r, out, err) = run(&mut c, code_req(&s, lang, code)).await;
        assert_eq!(r.exit_code, 0, "{lang}: {err}");
        assert_eq!(r.signal, 0);
        assert!(out.starts_with("hello from "), "{lang}: {out:?}");
        assert!(err.is_empty(), "{lang}: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stdout_and_stderr_are_separate() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    let (r, out, err) = run(
        &mut c,
        code_req(
            &s,
            "py",
            "import sys\nprint('to-out')\nprint('to-err', file=sys.stderr)",
        ),
    )
    .await;
    assert_eq!(r.exit_code, 0);
    assert_eq!(out, "to-out\n");
    assert_eq!(err, "to-err\n");
    let (_, out, err) = run(
        &mut c,
        code_req(&s, "js", "console.log('o'); console.error('e')"),
    )
    .await;
    assert_eq!((out.as_str(), err.as_str()), ("o\n", "e\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_are_reported() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    let (r, _, _) = run(&mut c, code_req(&s, "py", "import sys; sys.exit(3)")).await;
    assert_eq!((r.exit_code, r.signal), (3, 0));
    let (r, _, err) = run(&mut c, code_req(&s, "py", "raise ValueError('boom')")).await;
    assert_eq!(r.exit_code, 1);
    assert!(err.contains("ValueError: boom"), "{err}");
    let (r, _, _) = run(&mut c, code_req(&s, "js", "process.exit(3)")).await;
    assert_eq!(r.exit_code, 3);
    let (r, _, err) = run(&mut c, code_req(&s, "js", "throw new Error('kaboom')")).await;
    assert_eq!(r.exit_code, 1);
    assert!(err.contains("kaboom"), "{err}");
    let (r, _, err) = run(
        &mut c,
        code_req(&s, "ts", "const n: number = 1;\nthrow new Error('ts' + n);"),
    )
    .await;
    assert_eq!(r.exit_code, 1);
    // Types are blanked, not removed: the stack points at the user's line 2.
    assert!(err.contains("ts1") && err.contains(":2:"), "{err}");
    let (r, _, _) = run(&mut c, code_req(&s, "py", "print('fine')")).await;
    assert_eq!(r.exit_code, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn args_and_env_reach_the_snippet() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &["env"]).await;
    let mut req = code_req(
        &s,
        "py",
        "import sys, os, json\nprint(json.dumps([sys.argv[1:], os.environ.get('GREETING'), sorted(os.environ)]))",
    );
    req.args = vec!["a b".into(), "--flag".into(), "".into()];
    req.env = vec![pb::EnvVar {
        key: b"GREETING".to_vec(),
        value: "héllo".as_bytes().to_vec(),
    }];
    let (r, out, err) = run(&mut c, req.clone()).await;
    assert_eq!(r.exit_code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v[0], serde_json::json!(["a b", "--flag", ""]));
    assert_eq!(v[1], "héllo");
    // Exactly the requested environment: nothing inherited from the daemon.
    let keys: Vec<String> = serde_json::from_value(v[2].clone()).unwrap();
    assert!(!keys.contains(&"ELIDE_LOG".to_string()), "{keys:?}");

    req.language = "js".into();
    req.code = "console.log(JSON.stringify([process.argv.slice(2), process.env.GREETING]))".into();
    let (_, out, _) = run(&mut c, req).await;
    assert_eq!(out.trim(), r#"[["a b","--flag",""],"héllo"]"#);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_env_intrinsic_only_a_minimal_environment_is_visible() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &["io", "net"]).await;
    let mut req = code_req(&s, "py", "import os\nprint(sorted(os.environ))");
    req.env = vec![pb::EnvVar {
        key: b"SECRET".to_vec(),
        value: b"x".to_vec(),
    }];
    let (r, out, err) = run(&mut c, req).await;
    assert_eq!(r.exit_code, 0, "{err}");
    assert!(!out.contains("SECRET"), "{out}");
    assert!(out.contains("'PATH'") && out.contains("'HOME'"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn executions_of_one_session_share_no_state() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &["env", "io", "net"]).await;
    let code = "import builtins, os\nprint(hasattr(builtins, 'leak'), os.getpid(), os.getcwd(), sorted(os.listdir('.')))\nbuiltins.leak = 1\nopen('state.txt', 'w').write('x')";
    let (r1, out1, e1) = run(&mut c, code_req(&s, "py", code)).await;
    let (r2, out2, e2) = run(&mut c, code_req(&s, "py", code)).await;
    assert_eq!((r1.exit_code, r2.exit_code), (0, 0), "{e1} {e2}");
    let f1: Vec<&str> = out1.split_whitespace().collect();
    let f2: Vec<&str> = out2.split_whitespace().collect();
    assert_eq!(f1[0], "False");
    assert_eq!(
        f2[0], "False",
        "second execution saw the first one's globals"
    );
    assert_ne!(f1[1], f2[1], "same process");
    assert_ne!(f1[2], f2[2], "same working dir");
    assert!(
        !out2.contains("state.txt"),
        "second saw the first one's file: {out2}"
    );
    // JavaScript too.
    let js = "console.log(typeof globalThis.leak); globalThis.leak = 1;";
    let (_, o1, _) = run(&mut c, code_req(&s, "js", js)).await;
    let (_, o2, _) = run(&mut c, code_req(&s, "js", js)).await;
    assert_eq!((o1.trim(), o2.trim()), ("undefined", "undefined"));
}

#[tokio::test(flavor = "multi_thread")]
async fn inline_code_larger_than_one_argv_string_runs() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    // Just under the default 4 MiB maximum: far beyond the kernel's 128 KiB limit for one argv
    // string, and beyond gRPC's default 4 MiB message limit once wrapped in the request.
    let max = daemon_info(&mut c).await.max_code_bytes as usize;
    assert_eq!(max, 4 * 1024 * 1024);
    let mut code = String::from("total = 0\n");
    while code.len() < max - 200 {
        code.push_str("total += 1  # padding padding padding padding padding padding\n");
    }
    let lines = code.lines().count() - 1;
    code.push_str("print(total)\n");
    let (r, out, err) = run(&mut c, code_req(&s, "py", &code)).await;
    assert_eq!(r.exit_code, 0, "{err}");
    assert_eq!(out.trim(), lines.to_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_megabytes_arrive_complete_through_a_fifo() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    let out_fifo = d.path("stdout.fifo");
    let err_fifo = d.path("stderr.fifo");
    let out_reader = fifo_reader(&out_fifo);
    let err_reader = fifo_reader(&err_fifo);
    let code = "import sys\nline = ''.join(chr(97 + i % 26) for i in range(99)) + '\\n'\nfor i in range(100000):\n    sys.stdout.write(line)\nsys.stderr.write('done\\n')";
    let mut req = code_req(&s, "py", code);
    req.stdout = path_sink(&out_fifo);
    req.stderr = path_sink(&err_fifo);
    let e = c.start_execution(req).await.unwrap().into_inner();
    let r = wait(&mut c, &e.id).await;
    assert_eq!(r.exit_code, 0);
    let out = tokio::task::spawn_blocking(move || out_reader.join().unwrap())
        .await
        .unwrap();
    let err = tokio::task::spawn_blocking(move || err_reader.join().unwrap())
        .await
        .unwrap();
    assert_eq!(out.len(), 10_000_000);
    let line: Vec<u8> = (0..99u8).map(|i| b'a' + i % 26).chain([b'\n']).collect();
    assert!(out.chunks(100).all(|ch| ch == line.as_slice()));
    assert_eq!(err, b"done\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn script_path_runs_and_regular_file_sink_under_root_is_written() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &["env", "io", "net"]).await;
    let script = d.path("prog.py");
    std::fs::write(&script, "import sys\nprint('from file', sys.argv[1])\n").unwrap();
    let log = d.path("out.log");
    let mut req = code_req(&s, "python", "");
    req.path = script.display().to_string();
    req.args = vec!["arg1".into()];
    req.stdout = path_sink(&log);
    let e = c.start_execution(req).await.unwrap().into_inner();
    assert_eq!(wait(&mut c, &e.id).await.exit_code, 0);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "from file arg1\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn daemon_info_lists_runtimes_with_versions() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let info = daemon_info(&mut c).await;
    assert_eq!(info.api_version, "v1alpha1");
    assert_eq!(info.pid, d.pid());
    assert!(info.max_code_bytes >= 1024 * 1024);
    // What the plugin needs to know the daemon's executions and its start deadline.
    let cgroups = info.cgroup_mode != "none";
    assert_eq!(
        info.cgroup_parent,
        if cgroups {
            format!("/{}", d.cgroup_parent)
        } else {
            String::new()
        },
        "{}",
        info.cgroup_mode
    );
    assert_eq!(
        info.sink_open_timeout,
        Some(prost_types::Duration {
            seconds: 10,
            nanos: 0
        })
    );
    let py = info
        .runtimes
        .iter()
        .find(|r| r.language == "python")
        .unwrap();
    assert!(py.available, "{py:?}");
    assert!(py.aliases.contains(&"py".to_string()));
    assert!(
        !py.command.contains("shims"),
        "shim not resolved: {}",
        py.command
    );
    let real = std::process::Command::new("python3")
        .args(["-c", "import platform; print(platform.python_version())"])
        .output()
        .unwrap();
    assert_eq!(py.version, String::from_utf8_lossy(&real.stdout).trim());
    let js = info
        .runtimes
        .iter()
        .find(|r| r.language == "javascript")
        .unwrap();
    let real = std::process::Command::new("node")
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(js.version, String::from_utf8_lossy(&real.stdout).trim());
    let ts = info
        .runtimes
        .iter()
        .find(|r| r.language == "typescript")
        .unwrap();
    assert!(ts.available && ts.aliases.contains(&"ts".to_string()));
    assert!(["v1", "v2", "none"].contains(&info.cgroup_mode.as_str()));
    assert!(info.isolation.iter().any(|f| f.name == "landlock"));
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_run_streams_output_and_exits_with_the_snippet_code() {
    let d = TestDaemon::start().await;
    let script = d.path("cli.ts");
    std::fs::write(
        &script,
        "const args: string[] = process.argv.slice(2);\nconsole.log('out', args.join(','));\nconsole.error('err');\nprocess.exit(7);\n",
    )
    .unwrap();
    let out = d
        .cli("run", &[script.as_os_str(), "x".as_ref(), "-y".as_ref()])
        .await;
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out x,-y\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let info = d.cli("info", &[]).await;
    assert!(info.status.success());
    assert!(String::from_utf8_lossy(&info.stdout).contains("python"));

    // The listing commands show what runs.
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    let e = c
        .start_execution(code_req(&s, "py", "import time; time.sleep(60)"))
        .await
        .unwrap()
        .into_inner();
    for cmd in ["sessions", "executions"] {
        let out = d.cli(cmd, &[]).await;
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&s), "{cmd}: {text}");
        if cmd == "executions" {
            assert!(text.contains(&e.id) && text.contains("running"), "{text}");
        }
    }
    kill_now(&mut c, &e.id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn elide_backend_runs_snippets_through_elide_run() {
    // A stand-in `elide` binary: answers --version and runs `elide run FILE ARGS` with python3.
    let dir = tempfile::Builder::new()
        .prefix("e")
        .tempdir_in("/tmp")
        .unwrap();
    let fake = dir.path().join("elide");
    let python = real_python3();
    write_script(
        &fake,
        &format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'elide 9.9.9-fake'; exit 0; fi\n\
             [ \"$1\" = run ] || exit 64\nshift\necho via-elide\nexec {python} \"$@\"\n"
        ),
    );
    let toml = format!(
        "[runtimes.python]\nbackend = \"elide\"\nelide = \"{}\"\n",
        fake.display()
    );
    let d = TestDaemon::start_with_config(dir.path(), &toml).await;
    let mut c = d.client().await;
    let py = runtime_info(&mut c, "python").await;
    assert_eq!(
        (py.backend.as_str(), py.version.as_str()),
        ("elide", "elide 9.9.9-fake")
    );
    let s = session(&mut c, &["env", "io", "net"]).await;
    let mut req = code_req(&s, "py", "import sys\nprint('args', sys.argv[1:])");
    req.args = vec!["z".into()];
    let (r, out, err) = run(&mut c, req).await;
    assert_eq!(r.exit_code, 0, "{err}");
    assert_eq!(out, "via-elide\nargs ['z']\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_outside_allowed_uids_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root to act as another uid");
        return;
    }
    let d = TestDaemon::start_with(&["--socket-mode", "0666"]).await;
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let socket = d.socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_elide-daemon"))
            .args(["info", "--socket"])
            .arg(&socket)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not allowed") && err.contains("uid"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn execution_is_its_own_process_group_with_only_stdio_fds() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &["env", "io", "net"]).await;
    let code = "import os, sys\n\
                fds = sorted(int(f) for f in os.listdir('/proc/self/fd'))\n\
                print(os.getpgrp() == os.getpid(), os.getsid(0) == os.getpid())\n\
                print(open('/proc/self/oom_score_adj').read().strip())\n\
                print(fds)\n\
                print(repr(sys.stdin.read()))\n";
    let (r, out, err) = run(&mut c, code_req(&s, "py", code)).await;
    assert_eq!(r.exit_code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "True True");
    assert_eq!(lines[1], "0");
    // 0, 1, 2 and the descriptor listdir itself held open.
    assert_eq!(lines[2], "[0, 1, 2, 3]");
    assert_eq!(lines[3], "''", "stdin is not /dev/null");
}
