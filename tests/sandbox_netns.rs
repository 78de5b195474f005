//! The `net` intrinsic off (own namespace, loopback only) and joining an existing namespace.

mod sandbox_common;

use elide_task_driver::sandbox::Intrinsics;
use elide_task_driver::sandbox::netns::open_netns;
use sandbox_common::{Scratch, describe, python, run, skip, wait};
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

const PROBE: &str = r#"
import socket, sys
port = int(sys.argv[1])
def outside():
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return "connected"
    except OSError as e:
        return type(e).__name__
def inside():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    c = socket.create_connection(srv.getsockname(), timeout=5)
    a, _ = srv.accept()
    c.sendall(b"ping")
    return a.recv(4).decode()
print(outside(), inside())
"#;

fn netns_supported() -> bool {
    // The probe forks a child that unshares: the same thing apply does.
    let m = elide_task_driver::sandbox::cgroup::CgroupManager::detect("elide-netns-probe");
    elide_task_driver::sandbox::probe::probe(&m)
        .iter()
        .any(|f| f.name == "netns" && f.enforced)
}

#[test]
fn net_off_blocks_host_loopback_but_has_its_own() {
    if !netns_supported() {
        return skip(
            "net_off_blocks_host_loopback_but_has_its_own",
            "cannot unshare a network namespace",
        );
    }
    let host = TcpListener::bind("127.0.0.1:0").expect("bind host listener");
    host.set_nonblocking(true).expect("nonblocking");
    let port = host.local_addr().expect("addr").port();
    let s = Scratch::new();
    let mut spec = s.spec();
    spec.intrinsics = Intrinsics {
        net: false,
        ..Intrinsics::ALL
    };
    let (py, _) = python();
    let mut cmd = Command::new(py);
    cmd.args(["-c", PROBE, &port.to_string()]);
    let (st, out, err) = run(&s, spec, cmd);
    assert!(st.success(), "{} stderr={err}", describe(st));
    assert_eq!(out, "ConnectionRefusedError ping\n", "stderr={err}");
    assert!(
        host.accept().is_err(),
        "the host listener must not have been reached"
    );

    // Control: with net on, the same probe reaches the host listener.
    let s = Scratch::new();
    let (py, _) = python();
    let mut cmd = Command::new(py);
    cmd.args(["-c", PROBE, &port.to_string()]);
    let (st, out, err) = run(&s, s.spec(), cmd);
    assert!(st.success(), "{} stderr={err}", describe(st));
    assert_eq!(out, "connected ping\n");
}

#[test]
fn joins_an_existing_network_namespace() {
    if !netns_supported() {
        return skip(
            "joins_an_existing_network_namespace",
            "cannot unshare a network namespace",
        );
    }
    // A "group" namespace: a child with net off that listens on loopback inside it.
    let owner = Scratch::new();
    let mut spec = owner.spec();
    spec.intrinsics = Intrinsics {
        net: false,
        ..Intrinsics::ALL
    };
    let (py, _) = python();
    let mut cmd = Command::new(&py);
    cmd.args([
        "-c",
        "import socket,sys\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1',0))\ns.listen(5)\nprint(s.getsockname()[1], flush=True)\nwhile True:\n    c,_=s.accept(); c.sendall(b'from-group'); c.close()",
    ]);
    spec.apply(&mut cmd).expect("apply");
    let mut group = cmd.spawn().expect("spawn group owner");
    let deadline = Instant::now() + Duration::from_secs(60);
    let port: u16 = loop {
        if let Ok(p) = owner.stdout().trim().parse() {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "group owner did not start: {}",
            owner.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let ns_path = std::path::PathBuf::from(format!("/proc/{}/ns/net", group.id()));

    let s = Scratch::new();
    let mut spec = s.spec();
    spec.network_namespace = Some(ns_path);
    let mut cmd = Command::new(&py);
    cmd.args([
        "-c",
        "import socket,sys\nc=socket.create_connection(('127.0.0.1',int(sys.argv[1])),timeout=10)\nprint(c.recv(64).decode())",
        &port.to_string(),
    ]);
    let (st, out, err) = run(&s, spec, cmd);
    // Checked while the group's listener is still up.
    let leaked = host_reaches_group(port);
    let _ = group.kill();
    let _ = wait(&mut group, Duration::from_secs(30));
    assert!(st.success(), "{} stderr={err}", describe(st));
    assert_eq!(out, "from-group\n");
    assert!(!leaked, "the group's listener leaked to the host namespace");
}

fn host_reaches_group(port: u16) -> bool {
    // From the host namespace the group's listener is not reachable (an unrelated host
    // listener may happen to own the same port number: it just must not be the group's).
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    use std::io::Read;
    conn.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 10];
    let n = conn.read(&mut buf).unwrap_or(0);
    &buf[..n] == b"from-group"
}

#[test]
fn open_netns_refuses_files_that_are_not_namespaces() {
    let err = open_netns(std::path::Path::new("/etc/hostname")).expect_err("not nsfs");
    assert!(err.to_string().contains("/etc/hostname"), "{err}");
    let err = open_netns(std::path::Path::new("/nonexistent/ns")).expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/ns"), "{err}");
    open_netns(std::path::Path::new("/proc/self/ns/net")).expect("our own namespace is one");
}
