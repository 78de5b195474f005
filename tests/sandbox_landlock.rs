//! The `io` intrinsic off: a real python3 child confined by Landlock.

mod sandbox_common;

use elide_task_driver::sandbox::Intrinsics;
use elide_task_driver::sandbox::landlock_rules::abi_version;
use sandbox_common::{Scratch, describe, python, run, skip};
use std::process::Command;

const SCRIPT: &str = r#"
import json, os, sys, tempfile
results = {}
def attempt(name, fn):
    try:
        fn()
        results[name] = "ok"
    except PermissionError:
        results[name] = "denied"
    except Exception as e:
        results[name] = "error:" + type(e).__name__
attempt("read_hostname", lambda: open("/etc/hostname").read())
attempt("write_tmp", lambda: open(sys.argv[1], "w").write("x"))
attempt("list_root_home", lambda: os.listdir("/root"))
attempt("write_workdir", lambda: open("inside.txt", "w").write("hello"))
attempt("read_workdir", lambda: open("inside.txt").read())
attempt("write_extra", lambda: open(os.path.join(sys.argv[2], "extra.txt"), "w").write("x"))
attempt("tempfile", lambda: tempfile.NamedTemporaryFile().close())
attempt("devnull", lambda: open("/dev/null", "w").write("x"))
attempt("urandom", lambda: os.urandom(8))
attempt("proc_self", lambda: open("/proc/self/status").read())
attempt("proc_thread_self", lambda: open("/proc/thread-self/comm").read())
attempt("proc_parent_environ", lambda: open("/proc/%d/environ" % os.getppid(), "rb").read())
attempt("proc_init_cmdline", lambda: open("/proc/1/cmdline", "rb").read())
attempt("cpu_count", lambda: os.sched_getaffinity(0) and open("/proc/cpuinfo").read())
print(json.dumps(results, sort_keys=True))
"#;

fn results(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad output {out:?}: {e}"))
}

#[test]
fn io_off_confines_python_to_working_dir_and_runtime() {
    let abi = abi_version();
    if abi < 1 {
        return skip(
            "io_off_confines_python_to_working_dir_and_runtime",
            "Landlock not available in this kernel",
        );
    }
    println!("landlock ABI {abi}");
    let s = Scratch::new();
    let extra = s.dir.path().join("extra");
    std::fs::create_dir(&extra).expect("mkdir");
    let tmp_target = format!("/tmp/elide-landlock-{}", std::process::id());
    let (py, prefix) = python();
    let mut spec = s.spec();
    spec.intrinsics = Intrinsics {
        io: false,
        ..Intrinsics::ALL
    };
    spec.read_paths = vec![prefix];
    spec.write_paths = vec![extra.clone()];
    let mut cmd = Command::new(&py);
    cmd.args(["-c", SCRIPT, &tmp_target, extra.to_str().expect("utf8")]);
    let (st, out, err) = run(&s, spec, cmd);
    assert!(st.success(), "{} stderr={err}", describe(st));
    let r = results(&out);
    assert_eq!(r["read_hostname"], "denied", "{r}");
    assert_eq!(r["write_tmp"], "denied", "{r}");
    assert_eq!(r["list_root_home"], "denied", "{r}");
    assert_eq!(r["write_workdir"], "ok", "{r}");
    assert_eq!(r["read_workdir"], "ok", "{r}");
    assert_eq!(r["write_extra"], "ok", "{r}");
    assert_eq!(
        r["tempfile"], "ok",
        "TMPDIR must point somewhere writable: {r}"
    );
    assert_eq!(r["devnull"], "ok", "{r}");
    assert_eq!(r["urandom"], "ok", "{r}");
    assert_eq!(r["proc_self"], "ok", "{r}");
    assert_eq!(r["proc_thread_self"], "ok", "{r}");
    assert_eq!(
        r["proc_parent_environ"], "denied",
        "the daemon's environment must stay hidden: {r}"
    );
    assert_eq!(r["proc_init_cmdline"], "denied", "{r}");
    assert_eq!(r["cpu_count"], "ok", "{r}");
    assert!(!std::path::Path::new(&tmp_target).exists());
    assert_eq!(
        std::fs::read_to_string(s.work().join("inside.txt")).expect("written"),
        "hello"
    );
}

#[test]
fn io_on_leaves_the_filesystem_alone() {
    let s = Scratch::new();
    let tmp_target = format!("/tmp/elide-landlock-on-{}", std::process::id());
    let (py, _) = python();
    let mut cmd = Command::new(&py);
    cmd.args(["-c", SCRIPT, &tmp_target, "/tmp"]);
    let (st, out, err) = run(&s, s.spec(), cmd);
    assert!(st.success(), "{} stderr={err}", describe(st));
    let r = results(&out);
    let _ = std::fs::remove_file(&tmp_target);
    let _ = std::fs::remove_file("/tmp/extra.txt");
    assert_eq!(r["read_hostname"], "ok", "{r}");
    assert_eq!(r["write_tmp"], "ok", "{r}");
}

#[test]
fn io_off_with_missing_write_path_is_an_error_naming_it_and_missing_read_path_is_skipped() {
    if abi_version() < 1 {
        return skip("io_off_with_missing_write_path", "Landlock not available");
    }
    let s = Scratch::new();
    let mut spec = s.spec();
    spec.intrinsics = Intrinsics::NONE;
    spec.write_paths = vec!["/nonexistent/elide-output".into()];
    let err = spec
        .apply(&mut Command::new("/bin/true"))
        .expect_err("missing write path");
    assert!(
        err.to_string().contains("/nonexistent/elide-output"),
        "{err}"
    );

    let s = Scratch::new();
    let mut spec = s.spec();
    spec.intrinsics = Intrinsics::NONE;
    spec.read_paths = vec!["/nonexistent/elide-runtime/lib".into()];
    let (st, out, err) = run(&s, spec, sh_echo());
    assert!(st.success(), "{} stderr={err}", describe(st));
    assert_eq!(out, "ran\n");
}

fn sh_echo() -> Command {
    let mut c = Command::new("/bin/sh");
    c.args(["-c", "echo ran"]);
    c
}

const NODE_SCRIPT: &str = r#"
const fs = require('fs');
const r = {};
const attempt = (name, fn) => {
  try { fn(); r[name] = 'ok'; }
  catch (e) { r[name] = (e.code === 'EACCES' || e.code === 'EPERM') ? 'denied' : 'error:' + e.code; }
};
attempt('read_hostname', () => fs.readFileSync('/etc/hostname'));
attempt('write_tmp', () => fs.writeFileSync(process.argv[process.argv.length - 1], 'x'));
attempt('write_workdir', () => fs.writeFileSync('inside.txt', 'hello'));
attempt('read_workdir', () => fs.readFileSync('inside.txt'));
attempt('crypto', () => require('crypto').randomBytes(8));
attempt('os_info', () => { if (require('os').cpus().length < 1 || require('os').totalmem() < 1) throw new Error('no info'); });
attempt('proc_self', () => fs.readFileSync('/proc/self/status'));
attempt('proc_init', () => fs.readFileSync('/proc/1/cmdline'));
console.log(JSON.stringify(r));
"#;

#[test]
fn io_off_confines_node_too() {
    if abi_version() < 1 {
        return skip("io_off_confines_node_too", "Landlock not available");
    }
    let node = std::path::Path::new("/usr/bin/node");
    if !node.exists() {
        return skip(
            "io_off_confines_node_too",
            "node is not installed at /usr/bin/node",
        );
    }
    let s = Scratch::new();
    let tmp_target = format!("/tmp/elide-landlock-node-{}", std::process::id());
    let mut spec = s.spec();
    spec.intrinsics = Intrinsics::NONE;
    let mut cmd = Command::new(node);
    cmd.args(["-e", NODE_SCRIPT, &tmp_target]);
    let (st, out, err) = run(&s, spec, cmd);
    assert!(st.success(), "{} stderr={err}", describe(st));
    let r = results(&out);
    assert_eq!(r["read_hostname"], "denied", "{r}");
    assert_eq!(r["write_tmp"], "denied", "{r}");
    assert_eq!(r["write_workdir"], "ok", "{r}");
    assert_eq!(r["read_workdir"], "ok", "{r}");
    assert_eq!(r["crypto"], "ok", "{r}");
    assert_eq!(r["os_info"], "ok", "{r}");
    assert_eq!(r["proc_self"], "ok", "{r}");
    assert_eq!(r["proc_init"], "denied", "{r}");
}

#[test]
fn io_off_cannot_reach_abstract_unix_sockets_outside_the_sandbox() {
    if abi_version() < 6 {
        return skip(
            "io_off_cannot_reach_abstract_unix_sockets_outside_the_sandbox",
            "Landlock ABI < 6 has no abstract socket scoping",
        );
    }
    use std::os::linux::net::SocketAddrExt;
    let name = format!("elide-test-abstract-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
    let _listener = std::os::unix::net::UnixListener::bind_addr(&addr).expect("bind abstract");
    let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n    s.connect('\\0'+sys.argv[1]); print('connected')\nexcept OSError as e:\n    print(type(e).__name__)";
    let (py, prefix) = python();
    for (io, expected) in [(false, "PermissionError\n"), (true, "connected\n")] {
        let s = Scratch::new();
        let mut spec = s.spec();
        spec.intrinsics = Intrinsics {
            io,
            ..Intrinsics::ALL
        };
        spec.read_paths = vec![prefix.clone()];
        let mut cmd = Command::new(&py);
        cmd.args(["-c", script, &name]);
        let (st, out, err) = run(&s, spec, cmd);
        assert!(st.success(), "{} stderr={err}", describe(st));
        assert_eq!(out, expected, "io={io} stderr={err}");
    }
}
