//! A pooled execution (python zygote fork, node worker) gets exactly what a cold one gets: the
//! same assertions run against a session with `context_pool_size = 0` and one with a warm pool,
//! and the pooled runs must really have been pooled (`Execution.pooled`).

mod daemon_support;

use daemon_support::*;
use elide_task_driver::proto::elide::daemon::v1alpha1 as pb;

/// Runs `req` on the path `kind` names (see `run_on_path`).
async fn run_on(
    c: &mut Client,
    kind: Kind,
    req: pb::StartExecutionRequest,
) -> (pb::ExecutionResult, String, String) {
    let (_, r, out, err) = run_on_path(c, req, kind == Kind::Pooled).await;
    (r, out, err)
}

fn env_var(k: &str, v: &str) -> pb::EnvVar {
    pb::EnvVar {
        key: k.into(),
        value: v.into(),
    }
}

const PY_REPORT: &str = r#"
import os, sys, json, resource, threading

def refused():
    """The errno of io_uring_setup and keyctl, which the syscall filter refuses."""
    import ctypes, platform
    libc = ctypes.CDLL(None, use_errno=True)
    keyctl = 250 if platform.machine() == "x86_64" else 219
    out = []
    for nr, args in ((425, (1, None)), (keyctl, (0, -4, 0))):
        out.append(ctypes.get_errno() if libc.syscall(nr, *args) < 0 else 0)
    return out

# A thread, then a fork: the forked process must see only itself in the thread table.
done = threading.Event()
worker = threading.Thread(target=done.wait, daemon=True)
worker.start()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, b"%d" % threading.active_count())
    os._exit(0)
os.waitpid(pid, 0)
threads_after_fork = int(os.read(r, 16))
done.set()
worker.join()
print(json.dumps({
    "threads": threading.active_count(),
    "threads_after_fork": threads_after_fork,
    "main_thread_id_is_pid": threading.main_thread().native_id == os.getpid(),
    "main_thread_alive": threading.main_thread().is_alive(),
    "argv": sys.argv[1:],
    "argv0_is_script": sys.argv[0].endswith("main.py"),
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
    "core": resource.getrlimit(resource.RLIMIT_CORE),
    "oom": open("/proc/self/oom_score_adj").read().strip(),
    "pgid_is_pid": os.getpgid(0) == os.getpid(),
    "sid_is_pid": os.getsid(0) == os.getpid(),
    "stdin": os.readlink("/proc/self/fd/0"),
    "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
    "main": __name__, "file_is_script": __file__ == sys.argv[0],
    "path0": sys.path[0] == os.path.dirname(sys.argv[0]),
    "path0_is_dir": sys.path[0] == os.path.dirname(os.path.abspath(sys.argv[0])),
    "lc_ctype": __import__("locale").setlocale(__import__("locale").LC_CTYPE),
    "encodings": [sys.getfilesystemencoding(), sys.stdout.encoding, sys.stdout.errors],
    "environb_greeting": os.environb.get(b"GREETING", b"").hex(),
    "nnp": [l for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0].split()[1],
    "caps": {l.split(":")[0]: l.split()[1] for l in open("/proc/self/status") if l.startswith("Cap")},
    "new_uts_ns": __import__("ctypes").CDLL(None, use_errno=True).unshare(0x04000000),
    "seccomp": [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp")],
    "refused": refused(),
}, sort_keys=True))
"#;

const JS_REPORT: &str = r#"
const fs = require('fs');
console.log(JSON.stringify({
  argv: process.argv.slice(2),
  argv0_is_script: process.argv[1].endsWith('main.js'),
  cwd: process.cwd(),
  env: Object.fromEntries(Object.entries(process.env).sort()),
  uid: process.getuid(), gid: process.getgid(), groups: process.getgroups().sort(),
  oom: fs.readFileSync('/proc/self/oom_score_adj', 'utf8').trim(),
  main: require.main === module,
  nnp: fs.readFileSync('/proc/self/status', 'utf8').split('\n').find(l => l.startsWith('NoNewPrivs')).split(/\s+/)[1],
  seccomp: fs.readFileSync('/proc/self/status', 'utf8').split('\n')
    .filter(l => l.startsWith('Seccomp')).map(l => l.split(/\s+/)[1]),
  caps: Object.fromEntries(fs.readFileSync('/proc/self/status', 'utf8').split('\n')
    .filter(l => l.startsWith('Cap')).map(l => l.split(/:\s+/))),
}));
"#;

fn report_req(s: &str, lang: &str, wd: &std::path::Path, user: &str) -> pb::StartExecutionRequest {
    let mut req = code_req(s, lang, if lang == "py" { PY_REPORT } else { JS_REPORT });
    req.args = vec!["a b".into(), "--flag".into(), "ü".into()];
    req.env = vec![
        env_var("FOO", "bar"),
        env_var("EMPTY", ""),
        env_var("GREETING", "grüße ✓"),
    ];
    req.working_dir = wd.display().to_string();
    req.user = user.into();
    req
}

/// The capability sets a report shows: Nomad's `exec` default set for a task running as the
/// daemon's user (root here, when the test runs as root), none for another user; nothing
/// ambient, and a bounding set cut to the same set where the daemon may cut it.
fn check_capabilities(v: &serde_json::Value, user: &str, what: &str) {
    use elide_task_driver::sandbox::caps;
    let set = |name: &str| {
        u64::from_str_radix(
            v["caps"][name]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: {v}")),
            16,
        )
        .unwrap()
    };
    let ours = caps::own_set;
    let kept = if user.is_empty() {
        caps::kept_mask() & ours("CapEff")
    } else {
        0
    };
    assert_eq!(set("CapEff"), kept, "{what}");
    assert_eq!(set("CapPrm"), kept, "{what}");
    assert_eq!(set("CapInh") & !caps::kept_mask(), 0, "{what}");
    assert_eq!(set("CapAmb"), 0, "{what}");
    if ours("CapEff") & (1 << 8) != 0 {
        assert_eq!(set("CapBnd"), caps::kept_mask() & ours("CapBnd"), "{what}");
    }
    if !v["new_uts_ns"].is_null() && user.is_empty() && ours("CapEff") & (1 << 21) != 0 {
        // CAP_SYS_ADMIN is gone: no namespace of its own (the test runs as root).
        assert_eq!(v["new_uts_ns"], -1, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_cwd_argv_user_and_process_state_match_cold() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let wd = d.path("wd");
    std::fs::create_dir(&wd).unwrap();
    std::fs::set_permissions(&wd, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    for intrinsics in [&["env", "io", "net"][..], &["io"][..]] {
        // python3 lives under /root/.pyenv here, which nobody cannot execute: see
        // `unusable_interpreter_fails_on_both_paths`.
        for (lang, user) in [("py", ""), ("js", ""), ("js", "nobody")] {
            let mut seen = Vec::new();
            for kind in KINDS {
                let s = session_of(&mut c, kind, intrinsics).await;
                let (r, out, err) = run_on(&mut c, kind, report_req(&s, lang, &wd, user)).await;
                assert_eq!(r.exit_code, 0, "{kind:?} {lang} {user}: {err}");
                assert!(err.is_empty(), "{kind:?} {lang}: {err}");
                let v: serde_json::Value = serde_json::from_str(out.trim())
                    .unwrap_or_else(|e| panic!("{kind:?} {lang}: {e}: {out}"));
                assert_eq!(
                    v["argv"],
                    serde_json::json!(["a b", "--flag", "ü"]),
                    "{kind:?} {lang}"
                );
                assert_eq!(v["cwd"], wd.display().to_string());
                assert_eq!(v["oom"], "0");
                assert_eq!(v["nnp"], "1");
                // Filter mode, one filter more than this test runs under: the syscall filter,
                // in force for pooled and cold.
                let filters = (own_seccomp().1 + 1).to_string();
                assert_eq!(
                    v["seccomp"],
                    serde_json::json!(["2", filters]),
                    "{kind:?} {lang}"
                );
                if lang == "py" {
                    let eperm = libc::EPERM;
                    assert_eq!(v["refused"], serde_json::json!([eperm, eperm]), "{kind:?}");
                }
                if lang == "py" {
                    assert_eq!(v["threads"], 1, "{kind:?}");
                    assert_eq!(v["threads_after_fork"], 1, "{kind:?}");
                    assert_eq!(v["main_thread_id_is_pid"], true, "{kind:?}");
                    assert_eq!(v["main_thread_alive"], true, "{kind:?}");
                }
                check_capabilities(&v, user, &format!("{kind:?} {lang} {user}"));
                if lang == "py" {
                    assert_eq!(v["path0_is_dir"], true, "{kind:?}");
                }
                if intrinsics.contains(&"env") {
                    assert_eq!(v["env"]["FOO"], "bar", "{kind:?} {lang}");
                    assert_eq!(v["env"]["GREETING"], "grüße ✓", "{kind:?} {lang}");
                } else {
                    assert!(v["env"].get("FOO").is_none(), "{kind:?} {lang}: env leaked");
                }
                if user == "nobody" {
                    assert_eq!(v["uid"], 65534);
                }
                seen.push(v);
                c.close_session(pb::CloseSessionRequest {
                    session_id: s,
                    grace: None,
                })
                .await
                .unwrap();
            }
            // Everything observable is identical between the two paths.
            assert_eq!(
                seen[0], seen[1],
                "cold vs pooled differ ({lang}, {user:?}, {intrinsics:?})"
            );
        }
    }
}

/// Pooled python as another user: the pyenv python3 on PATH lives under /root, which nobody
/// cannot execute (see `unusable_interpreter_fails_on_both_paths`), so this daemon runs the
/// system's /usr/bin/python3 instead. The zygote's child switches to nobody as a cold start
/// does: the same uid, gid, groups, capabilities and everything else the report shows.
#[tokio::test(flavor = "multi_thread")]
async fn a_system_python_runs_as_nobody_the_same_pooled_and_cold() {
    let system = std::path::Path::new("/usr/bin/python3");
    if !system.exists() {
        eprintln!("skipped: no /usr/bin/python3 on this machine");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("a nobody user");
    let config = tempfile::tempdir().unwrap();
    let d = TestDaemon::start_with_config(
        config.path(),
        &format!(
            "[runtimes.python]\ncommand = {:?}\n",
            system.display().to_string()
        ),
    )
    .await;
    let mut c = d.client().await;
    let py = runtime_info(&mut c, "python").await;
    let resolved = std::fs::canonicalize(system).unwrap();
    assert_eq!(
        (py.available, py.command.as_str()),
        (true, resolved.to_str().unwrap()),
        "{py:?}"
    );
    let wd = d.path("wd");
    std::fs::create_dir(&wd).unwrap();
    std::fs::set_permissions(&wd, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    for intrinsics in [&["env", "io", "net"][..], &["io"][..], &[][..]] {
        let mut seen = Vec::new();
        for kind in KINDS {
            let s = session_of(&mut c, kind, intrinsics).await;
            let what = format!("{kind:?} {intrinsics:?}");
            let (r, out, err) = run_on(&mut c, kind, report_req(&s, "py", &wd, "nobody")).await;
            assert_eq!(r.exit_code, 0, "{what}: {err}");
            assert!(err.is_empty(), "{what}: {err}");
            let v: serde_json::Value =
                serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{what}: {e}: {out}"));
            assert_eq!(v["uid"], nobody.uid.as_raw(), "{what}");
            assert_eq!(v["gid"], nobody.gid.as_raw(), "{what}");
            assert_eq!(
                v["groups"],
                serde_json::json!([nobody.gid.as_raw()]),
                "{what}"
            );
            assert_eq!(
                v["argv"],
                serde_json::json!(["a b", "--flag", "ü"]),
                "{what}"
            );
            assert_eq!(v["cwd"], wd.display().to_string(), "{what}");
            assert_eq!(v["threads"], 1, "{what}");
            assert_eq!(v["threads_after_fork"], 1, "{what}");
            assert_eq!(v["nnp"], "1", "{what}");
            check_capabilities(&v, "nobody", &what);
            if intrinsics.contains(&"env") {
                assert_eq!(v["env"]["GREETING"], "grüße ✓", "{what}");
            }
            // The snippet's own output, as nobody: a file it writes in its working dir.
            let mut req = code_req(
                &s,
                "py",
                "import os\nopen('mine', 'w').write('x')\nprint(os.stat('mine').st_uid)\nos.remove('mine')",
            );
            req.working_dir = wd.display().to_string();
            req.user = "nobody".into();
            let (r, out, err) = run_on(&mut c, kind, req).await;
            assert_eq!(
                (r.exit_code, out),
                (0, format!("{}\n", nobody.uid)),
                "{what}: {err}"
            );
            seen.push(v);
            c.close_session(pb::CloseSessionRequest {
                session_id: s,
                grace: None,
            })
            .await
            .unwrap();
        }
        assert_eq!(seen[0], seen[1], "cold vs pooled differ ({intrinsics:?})");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_semantics_and_stream_separation_match_cold() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let cases: &[(&str, &str, i32, i32, &str, &str)] = &[
        // (lang, code, exit code, signal, stdout, stderr must contain)
        (
            "py",
            "print('out')\nimport sys\nprint('err', file=sys.stderr)",
            0,
            0,
            "out\n",
            "err\n",
        ),
        ("py", "import sys\nprint('x')\nsys.exit(3)", 3, 0, "x\n", ""),
        (
            "py",
            "def f():\n    1/0\nf()",
            1,
            0,
            "",
            "ZeroDivisionError: division by zero",
        ),
        ("py", "raise SystemExit('bye')", 1, 0, "", "bye"),
        (
            "py",
            "import os\nprint('before', flush=True)\nos.kill(os.getpid(), 9)",
            137,
            9,
            "before\n",
            "",
        ),
        (
            "py",
            "import atexit\natexit.register(lambda: print('atexit ran'))",
            0,
            0,
            "atexit ran\n",
            "",
        ),
        // A process the snippet forks ends through the same exit path (a pooled child notes
        // its code there, see exit_notes.rs); only the execution's own process says how the
        // execution ends.
        (
            "py",
            "import os, sys\npid = os.fork()\nif pid == 0:\n    sys.exit(7)\nos.waitpid(pid, 0)\nprint('parent', flush=True)\nsys.exit(3)",
            3,
            0,
            "parent\n",
            "",
        ),
        (
            "py",
            "import os\nprint('y', flush=True)\nos._exit(5)",
            5,
            0,
            "y\n",
            "",
        ),
        ("py", "import sys\nsys.exit(258)", 2, 0, "", ""),
        (
            "js",
            "console.log('out'); console.error('err')",
            0,
            0,
            "out\n",
            "err\n",
        ),
        ("js", "console.log('x'); process.exit(3)", 3, 0, "x\n", ""),
        // Natural end with process.exitCode, output from 'exit' listeners and late timers, a
        // 'beforeExit' listener that schedules more work, and a code the kernel truncates.
        (
            "js",
            "process.exitCode = 4; process.on('exit', (c) => console.log('exit', c)); setTimeout(() => console.log('late'), 20)",
            4,
            0,
            "late\nexit 4\n",
            "",
        ),
        (
            "js",
            "let n = 0; process.on('beforeExit', () => { if (n++ < 2) setTimeout(() => console.log('again', n), 1) })",
            0,
            0,
            "again 1\nagain 2\n",
            "",
        ),
        ("js", "process.exit(258)", 2, 0, "", ""),
        // Nothing of the worker's `node -e` shows: no builtin modules or module/require on the
        // global object, none of its own declarations, no execArgv.
        (
            "js",
            "const g = ['fs', 'http', 'require', 'module', 'exports', '__filename', 'runJob', 'job']; console.log(JSON.stringify([process.execArgv, g.filter((n) => n in globalThis), typeof fs, typeof Module, typeof path, typeof require]))",
            0,
            0,
            "[[],[],\"undefined\",\"undefined\",\"undefined\",\"function\"]\n",
            "",
        ),
        // The worker's warm-up of the streams' write path leaves no listener of its own.
        (
            "js",
            "console.log('a'); console.error('b'); console.log(JSON.stringify([process.stdout.listenerCount('error'), process.stderr.listenerCount('error')]))",
            0,
            0,
            "a\n[0,0]\n",
            "b\n",
        ),
        // An 'exit' listener may still change the code of a natural end; a string code counts.
        (
            "js",
            "process.exitCode = '5'; process.on('exit', (c) => { console.log('exit', c); process.exitCode = 6 })",
            6,
            0,
            "exit 5\n",
            "",
        ),
        (
            "js",
            "function f() { throw new Error('boom') }\nf()",
            1,
            0,
            "",
            "Error: boom",
        ),
        (
            "js",
            "console.log('before'); process.kill(process.pid, 'SIGKILL')",
            137,
            9,
            "before\n",
            "",
        ),
        (
            "ts",
            "const n: number = 3;\nconsole.log(n); process.exit(n)",
            3,
            0,
            "3\n",
            "",
        ),
    ];
    for kind in KINDS {
        let s = session_of(&mut c, kind, &["env", "io", "net"]).await;
        for (lang, code, exit, sig, out_want, err_has) in cases {
            let (r, out, err) = run_on(&mut c, kind, code_req(&s, lang, code)).await;
            let what = format!("{kind:?} {lang} {code:?}: {err}");
            assert_eq!(r.exit_code, *exit, "{what}");
            assert_eq!(r.signal, *sig, "{what}");
            assert_eq!(out, *out_want, "{what}");
            assert!(err.contains(err_has), "{what}");
        }
        // The traceback names the snippet's own file and line, nothing of the pool.
        let (_, _, err) = run_on(
            &mut c,
            kind,
            code_req(&s, "py", "x = 1\nraise ValueError('v')"),
        )
        .await;
        assert!(
            err.starts_with("Traceback (most recent call last):\n  File \""),
            "{kind:?}: {err}"
        );
        assert!(
            err.contains("main.py\", line 2, in <module>"),
            "{kind:?}: {err}"
        );
        assert!(
            !err.contains("zygote") && !err.contains("runpy"),
            "{kind:?}: {err}"
        );
        assert_eq!(err.matches("File \"").count(), 1, "{kind:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn intrinsics_are_enforced_the_same_way() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = format!(
        r#"
import socket
try:
    open("/etc/hostname").read()
    print("read-ok")
except PermissionError:
    print("read-denied")
try:
    open("/tmp/elide-pool-probe-{port}", "w").write("x")
    print("write-ok")
except PermissionError:
    print("write-denied")
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("127.0.0.1", {port}))
    print("connect-ok")
except OSError:
    print("connect-refused")
open("inside.txt", "w").write("fine")
print("cwd-write-ok")
"#
    );
    for kind in KINDS {
        let s = session_of(&mut c, kind, &[]).await;
        let (r, out, err) = run_on(&mut c, kind, code_req(&s, "py", &probe)).await;
        assert_eq!(r.exit_code, 0, "{kind:?}: {err}");
        assert_eq!(
            out, "read-denied\nwrite-denied\nconnect-refused\ncwd-write-ok\n",
            "{kind:?}: {err}"
        );
        let s = session_of(&mut c, kind, &["io", "net"]).await;
        let (_, out, err) = run_on(&mut c, kind, code_req(&s, "py", &probe)).await;
        assert_eq!(
            out, "read-ok\nwrite-ok\nconnect-ok\ncwd-write-ok\n",
            "{kind:?}: {err}"
        );
        let _ = std::fs::remove_file(format!("/tmp/elide-pool-probe-{port}"));
    }
    // Node workers keep net-off sessions pooled (the worker starts in its own namespace).
    let js_probe = format!(
        "require('net').connect({port}, '127.0.0.1').on('connect', () => {{ console.log('connect-ok'); process.exit(0) }}).on('error', () => {{ console.log('connect-refused') }})"
    );
    for kind in KINDS {
        let s = session_of(&mut c, kind, &["io"]).await;
        let (_, out, err) = run_on(&mut c, kind, code_req(&s, "js", &js_probe)).await;
        assert_eq!(out, "connect-refused\n", "{kind:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_limit_and_cgroup_apply_to_pooled_children() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let hog = "b = []\nwhile True:\n    b.append(bytearray(8 << 20))";
    for kind in KINDS {
        let s = session_of(&mut c, kind, &["env", "io", "net"]).await;
        let mut req = code_req(&s, "py", "print(open('/proc/self/cgroup').read())");
        let (_, out, _) = run_on(&mut c, kind, req.clone()).await;
        assert!(
            out.contains("elide-test-"),
            "{kind:?}: not in the execution cgroup: {out}"
        );
        req.code = hog.into();
        req.limits = Some(pb::Limits {
            memory_bytes: 64 << 20,
            ..Default::default()
        });
        let (r, _, _) = run_on(&mut c, kind, req).await;
        assert!(r.oom_killed, "{kind:?}: {r:?}");
        // Node workers start inside their cgroup and get the execution's limits at hand-over.
        let mut req = code_req(
            &s,
            "js",
            "console.log(require('fs').readFileSync('/proc/self/cgroup', 'utf8'))",
        );
        let (_, out, _) = run_on(&mut c, kind, req.clone()).await;
        assert!(
            out.contains("elide-test-"),
            "{kind:?}: node not in an execution cgroup: {out}"
        );
        req.code = "const b = []; for (;;) b.push(Buffer.alloc(8 << 20, 1))".into();
        req.limits = Some(pb::Limits {
            memory_bytes: 128 << 20,
            ..Default::default()
        });
        let (r, _, _) = run_on(&mut c, kind, req).await;
        assert!(r.oom_killed, "{kind:?}: node: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unusable_interpreter_fails_on_both_paths() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    // Only meaningful where nobody cannot execute python3 (pyenv under /root); else both run.
    let real = real_python3();
    let probe = std::process::Command::new("su")
        .args([
            "-s",
            "/bin/sh",
            "nobody",
            "-c",
            &format!("test -x '{real}'"),
        ])
        .output();
    let nobody_can_run = probe.map(|o| o.status.success()).unwrap_or(true);
    for kind in KINDS {
        let s = session_of(&mut c, kind, &["env", "io", "net"]).await;
        // Warm the pool first so the pooled attempt really goes through the zygote.
        let _ = run_on(&mut c, kind, code_req(&s, "py", "pass")).await;
        let mut req = code_req(&s, "py", "print('ran')");
        req.user = "nobody".into();
        let got = c.start_execution(req).await;
        if nobody_can_run {
            assert!(got.is_ok(), "{kind:?}: {got:?}");
        } else {
            let e = got.expect_err("nobody cannot execute the interpreter");
            assert!(
                e.message().contains("ermission denied")
                    || e.message().contains("not executable")
                    || e.message().contains("cannot use the interpreter"),
                "{kind:?}: {e:?}"
            );
        }
    }
}

/// What an execution can do to its neighbours: the daemon, another execution, its own child.
const PY_NEIGHBOURS: &str = r#"
import os, sys, subprocess
daemon, other = int(sys.argv[1]), int(sys.argv[2])
def probe(name, f):
    try:
        f()
        print(name, "ok")
    except PermissionError:
        print(name, "denied")
probe("signal-daemon", lambda: os.kill(daemon, 0))
probe("signal-other", lambda: os.kill(other, 0))
probe("memory-daemon", lambda: open("/proc/%d/mem" % daemon, "rb"))
probe("memory-other", lambda: open("/proc/%d/mem" % other, "rb"))
probe("own-status", lambda: open("/proc/self/status").read())
child = subprocess.Popen(["sleep", "30"])
child.kill()
print("own-child", child.wait())
"#;

const JS_NEIGHBOURS: &str = r#"
const fs = require('fs');
const cp = require('child_process');
const [daemon, other] = process.argv.slice(2).map(Number);
function probe(name, f) {
  try { f(); console.log(name, 'ok'); }
  catch (e) { console.log(name, e.code === 'EPERM' || e.code === 'EACCES' ? 'denied' : e.code); }
}
probe('signal-daemon', () => process.kill(daemon, 0));
probe('signal-other', () => process.kill(other, 0));
probe('memory-daemon', () => fs.closeSync(fs.openSync(`/proc/${daemon}/mem`, 'r')));
probe('memory-other', () => fs.closeSync(fs.openSync(`/proc/${other}/mem`, 'r')));
probe('own-status', () => fs.readFileSync('/proc/self/status'));
const child = cp.spawn('sleep', ['30']);
child.on('exit', (code, signal) => console.log('own-child', signal));
child.kill('SIGKILL');
"#;

/// Every execution is a Landlock domain of its own, whatever its intrinsics: it cannot signal
/// or trace the daemon or another execution, nor open their memory, even as the same user; its
/// own children and its own `/proc/self` stay in reach, on both launch paths.
#[tokio::test(flavor = "multi_thread")]
async fn an_execution_cannot_reach_the_daemon_or_another_execution() {
    let abi = elide_task_driver::sandbox::landlock_rules::abi_version();
    if abi < 6 {
        eprintln!("skipped: Landlock ABI {abi} scopes no signals (needs Linux 6.12+)");
        return;
    }
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let neighbour_session = session(&mut c, &["env", "io", "net"]).await;
    let neighbour = c
        .start_execution(code_req(
            &neighbour_session,
            "py",
            "import time; time.sleep(120)",
        ))
        .await
        .unwrap()
        .into_inner();
    let neighbour_pid = execution(&mut c, &neighbour.id).await.pid;
    assert_ne!(neighbour_pid, 0);
    let args = vec![d.pid().to_string(), neighbour_pid.to_string()];
    let denied = "signal-daemon denied\nsignal-other denied\nmemory-daemon denied\n\
                  memory-other denied\nown-status ok\n";
    // Node workers are pooled with io on only.
    let cases = [
        ("py", PY_NEIGHBOURS, &["env", "io", "net"][..], "-9"),
        ("py", PY_NEIGHBOURS, &["env"][..], "-9"),
        ("js", JS_NEIGHBOURS, &["env", "io", "net"][..], "SIGKILL"),
    ];
    for kind in KINDS {
        for (lang, code, intrinsics, killed) in cases {
            let s = session_of(&mut c, kind, intrinsics).await;
            let mut req = code_req(&s, lang, code);
            req.args = args.clone();
            let (r, out, err) = run_on(&mut c, kind, req).await;
            assert_eq!(r.exit_code, 0, "{lang}, {kind:?}, {intrinsics:?}: {err}");
            assert_eq!(
                out,
                format!("{denied}own-child {killed}\n"),
                "{lang}, {kind:?}, intrinsics {intrinsics:?}: {err}"
            );
        }
    }
    assert!(alive(neighbour_pid), "the neighbour was killed");
    kill_now(&mut c, &neighbour.id).await;
}

const PY_STREAMS: &str = r#"
import sys, os, json
def shape(s):
    return [type(s).__name__, s.encoding, s.errors, s.line_buffering, s.write_through, s.name,
            s.mode, type(s.buffer).__name__, s.buffer.name, s.buffer.mode,
            s is getattr(sys, "__%s__" % s.name.strip("<>"))]
print(json.dumps([shape(sys.stdout), shape(sys.stderr)]))
sys.stdout.write("unflushed")
os._exit(3)
"#;

/// PYTHONUNBUFFERED, which jobs set to see their log lines as they are written, runs pooled
/// with the standard streams a cold start builds for it; other `PYTHON*` variables change the
/// interpreter's start-up and start cold.
#[tokio::test(flavor = "multi_thread")]
async fn pythonunbuffered_runs_pooled_with_the_streams_of_a_cold_start() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let mut shapes = Vec::new();
    for kind in KINDS {
        let s = session_of(&mut c, kind, &["env", "io", "net"]).await;
        let mut req = code_req(&s, "py", PY_STREAMS);
        req.env = vec![env_var("PYTHONUNBUFFERED", "1")];
        let (r, out, err) = run_on(&mut c, kind, req).await;
        assert_eq!(r.exit_code, 3, "{kind:?}: {err}");
        // Unbuffered: what was written before os._exit reached the sink.
        assert!(out.ends_with("\nunflushed"), "{kind:?}: {out:?}");
        shapes.push(out);
    }
    assert_eq!(shapes[0], shapes[1], "cold, then pooled");
    assert!(shapes[0].contains("\"FileIO\""), "{}", shapes[0]);

    let s = session_of(&mut c, Kind::Pooled, &["env", "io", "net"]).await;
    let _ = run_on(&mut c, Kind::Pooled, code_req(&s, "py", "pass")).await;
    let mut hashes = Vec::new();
    for _ in 0..2 {
        let mut req = code_req(&s, "py", "print(hash('elide'))");
        req.env = vec![env_var("PYTHONHASHSEED", "0")];
        let e = c.start_execution(req).await.unwrap().into_inner();
        assert!(!e.pooled, "PYTHONHASHSEED ran on the warm interpreter");
        hashes.push(output(&mut c, &e.id, pb::OutputStream::Stdout).await);
        assert_eq!(wait(&mut c, &e.id).await.exit_code, 0);
    }
    assert_eq!(hashes[0], hashes[1], "the seed was not honoured");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_that_merges_pages_offers_every_execution_and_others_none() {
    if !elide_task_driver::sandbox::page_merge::available() {
        eprintln!("skipped: this kernel cannot mark memory mergeable (Linux 6.4+ with KSM)");
        return;
    }
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let py = "print([l for l in open('/proc/self/ksm_stat') if l.startswith('ksm_merge_any')][0].strip())";
    let js = "console.log(require('fs').readFileSync('/proc/self/ksm_stat', 'utf8').split('\\n').find(l => l.startsWith('ksm_merge_any')))";
    for merge in [true, false] {
        for kind in KINDS {
            let config = pb::SessionConfig {
                enabled_intrinsics: vec!["env".into(), "io".into(), "net".into()],
                context_pool_size: if kind == Kind::Pooled { 2 } else { 0 },
                merge_identical_pages: merge,
                ..Default::default()
            };
            let s = session_with_config(&mut c, config).await;
            let want = if merge {
                "ksm_merge_any: yes\n"
            } else {
                "ksm_merge_any: no\n"
            };
            // Pooled python is a fork of the zygote, a node worker a process of its own: each
            // carries the session's choice, as a cold start does.
            for (lang, code) in [("py", py), ("js", js)] {
                let (r, out, err) = run_on(&mut c, kind, code_req(&s, lang, code)).await;
                assert_eq!(r.exit_code, 0, "{kind:?} {lang}: {err}");
                assert_eq!(out, want, "{kind:?} {lang} merge={merge}");
            }
        }
    }
}

/// Nomad's reserved cores (`resources { cores }`, passed as `cpuset_cpus`) pin every thread of
/// an execution the same way pooled and cold, python and node; without them an execution keeps
/// every core the daemon has.
#[tokio::test(flavor = "multi_thread")]
async fn reserved_cores_pin_every_thread_pooled_and_cold_alike() {
    use elide_task_driver::sandbox::cpus::Cpus;
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let all = Cpus::of_this_process().expect("sched_getaffinity");
    let core = all.cores().last().copied().expect("a core");
    // The distinct Cpus_allowed_list of the process's threads.
    let py = "import glob\n\
              print(' '.join(sorted({l.split()[1] for f in glob.glob('/proc/self/task/*/status') \
              for l in open(f) if l.startswith('Cpus_allowed_list')})))";
    let js = "const fs = require('fs');\n\
              const lists = fs.readdirSync('/proc/self/task').map(t => fs.readFileSync(\
              `/proc/self/task/${t}/status`, 'utf8').match(/Cpus_allowed_list:\\s*(\\S+)/)[1]);\n\
              console.log([...new Set(lists)].sort().join(' '))";
    for kind in KINDS {
        let s = session_of(&mut c, kind, &["env", "io", "net"]).await;
        for (lang, code) in [("py", py), ("js", js)] {
            for (reserved, want) in [
                (core.to_string(), core.to_string()),
                (String::new(), all.to_string()),
            ] {
                let mut req = code_req(&s, lang, code);
                req.limits = Some(pb::Limits {
                    cpuset_cpus: reserved.clone(),
                    ..Default::default()
                });
                let (r, out, err) = run_on(&mut c, kind, req).await;
                assert_eq!(
                    (r.exit_code, out.trim()),
                    (0, want.as_str()),
                    "{kind:?} {lang}, cores {reserved:?}: {err}"
                );
            }
        }
    }
}
