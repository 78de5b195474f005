//! Ways out of an execution's isolation that must stay shut, on the cold and the pooled path:
//! device nodes made in the working dir, the daemon's own socket, the parent-death signal of a
//! task that switches user.

mod daemon_support;

use daemon_support::*;
use elide_task_driver::proto::elide::daemon::v1alpha1 as pb;

/// A root task without `io` may make files, FIFOs and sockets in its working dir, but no
/// device node: one would open the raw disk (or memory) beneath Landlock's path rules.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_without_io_makes_no_device_node() {
    if elide_task_driver::sandbox::landlock_rules::abi_version() < 1 {
        eprintln!("SKIPPED: no Landlock on this kernel");
        return;
    }
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let code = r#"
import os, stat
for name, mode, dev in [("null", stat.S_IFCHR, os.makedev(1, 3)), ("disk", stat.S_IFBLK, os.makedev(7, 0))]:
    try:
        os.mknod(name, mode | 0o600, dev)
        print(name, "made")
    except PermissionError:
        print(name, "refused")
os.mkfifo("fifo")
print("fifo", stat.S_ISFIFO(os.stat("fifo").st_mode))
"#;
    for pool in [0, 2] {
        let s = session_with_pool(&mut c, &["env", "net"], pool).await;
        let (e, r, out, err) = run_on_path(&mut c, code_req(&s, "python", code), pool > 0).await;
        assert_eq!(r.exit_code, 0, "pool {pool}: {err}");
        assert_eq!(
            out, "null refused\ndisk refused\nfifo True\n",
            "pool {pool} (pooled: {})",
            e.pooled
        );
    }
}

/// A task that switches user still dies with its parent (the daemon, or the zygote that forked
/// it): the kernel clears the parent-death signal on a uid change, so it is set after the
/// switch. Cold, and pooled on a daemon without cgroups (with them, a pooled child lets go of
/// its zygote on purpose once it reported ready: the daemon's reaper ends it instead).
#[tokio::test(flavor = "multi_thread")]
async fn a_task_that_switches_user_keeps_its_parent_death_signal() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: switching users needs a root daemon");
        return;
    }
    // An interpreter `nobody` can run (the benches' python3 may live under /root).
    let python = "/usr/bin/python3";
    if !std::path::Path::new(python).exists() {
        eprintln!("SKIPPED: no {python}");
        return;
    }
    let code = "import ctypes, os\n\
                libc = ctypes.CDLL(None, use_errno=True)\n\
                sig = ctypes.c_int(-1)\n\
                assert libc.prctl(2, ctypes.byref(sig), 0, 0, 0) == 0  # PR_GET_PDEATHSIG\n\
                print(os.getuid(), sig.value)";
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("a nobody user");
    let empty_cgroup_root = tempfile::tempdir().unwrap();
    for (pool, cgroups) in [(0, true), (2, false)] {
        let dir = tempfile::tempdir().unwrap();
        let mut toml = format!("[runtimes.python]\ncommand = {python:?}\n");
        if !cgroups {
            toml = format!(
                "cgroup_root = {:?}\n{toml}",
                empty_cgroup_root.path().display().to_string()
            );
        }
        let d = TestDaemon::start_with_config(dir.path(), &toml).await;
        let mut c = d.client().await;
        let s = session_with_pool(&mut c, &["env", "io", "net"], pool).await;
        let mut req = code_req(&s, "python", code);
        req.user = "nobody".into();
        let (_, r, out, err) = run_on_path(&mut c, req, pool > 0).await;
        assert_eq!(r.exit_code, 0, "pool {pool}: {err}");
        assert_eq!(
            out,
            format!("{} {}\n", nobody.uid, libc::SIGKILL),
            "pool {pool}"
        );
    }
}

/// A task running as root, even without `io` and `net`, cannot use the daemon's socket (it
/// could otherwise start an unconfined execution, or stop and exec into any other task): the
/// daemon closes the connection unanswered, cold or pooled, with cgroups and without (where
/// the daemon being its ancestor gives it away). Another process of the same uid is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_cannot_use_the_daemons_socket() {
    let empty_cgroup_root = tempfile::tempdir().unwrap();
    for cgroups in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let toml = if cgroups {
            String::new()
        } else {
            format!(
                "cgroup_root = {:?}\n",
                empty_cgroup_root.path().display().to_string()
            )
        };
        let d = TestDaemon::start_with_config(dir.path(), &toml).await;
        let mut c = d.client().await;

        // The test itself, the same uid as the tasks: answered.
        let socket = d.socket.clone();
        let answered = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
                .unwrap();
            s.write_all(H2_HELLO).unwrap();
            let mut buf = [0u8; 64];
            s.read(&mut buf).unwrap()
        })
        .await
        .unwrap();
        assert!(answered > 0, "the daemon does not answer a client");

        let code = greet_snippet(&d.socket);
        for pool in [0, 2] {
            let s = session_with_pool(&mut c, &["env"], pool).await;
            let (_, r, out, err) =
                run_on_path(&mut c, code_req(&s, "python", &code), pool > 0).await;
            assert_eq!(r.exit_code, 0, "cgroups {cgroups}, pool {pool}: {err}");
            assert_eq!(out, "refused\n", "cgroups {cgroups}, pool {pool}");
        }
        assert!(
            d.log()
                .contains("refused a connection from one of the daemon's executions"),
            "{}",
            d.log()
        );
    }
}

/// Nor by having a child connect and exit before the daemon looks at the connection (whose
/// credentials then name a process that is gone): a peer that cannot be checked is refused.
/// The daemon is stopped (SIGSTOP) while the children connect, exit and are reaped, so every
/// accept comes after.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_cannot_use_the_daemons_socket_through_a_child_that_exited() {
    use nix::sys::signal::{Signal, kill};
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let daemon = nix::unistd::Pid::from_raw(d.pid() as i32);
    for pool in [0, 2] {
        let go = d.path(&format!("go-{pool}"));
        let done = d.path(&format!("done-{pool}"));
        let code = format!(
            "import os, socket, time\n\
             while not os.path.exists({go:?}):\n    time.sleep(0.01)\n\
             socks = []\n\
             for _ in range(5):\n    \
                 s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n    \
                 child = os.fork()\n    \
                 if child == 0:\n        \
                     try:\n            s.connect({socket:?})\n        \
                     finally:\n            os._exit(0)\n    \
                 os.waitpid(child, 0)\n    \
                 socks.append(s)\n\
             open({done:?}, 'w').close()\n\
             answered = 0\n\
             for s in socks:\n    \
                 s.settimeout(20)\n    \
                 try:\n        s.sendall({hello})\n        answered += bool(s.recv(64))\n    \
                 except OSError:\n        pass\n\
             print('answered', answered)",
            go = go.display().to_string(),
            done = done.display().to_string(),
            socket = d.socket.display().to_string(),
            hello = python_bytes(H2_HELLO),
        );
        let s = session_with_pool(&mut c, &["env", "io", "net"], pool).await;
        let mut req = code_req(&s, "python", &code);
        req.stdout = capture();
        let e = start_on_path(&mut c, req, pool > 0).await;
        kill(daemon, Signal::SIGSTOP).unwrap();
        std::fs::write(&go, b"").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !done.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        kill(daemon, Signal::SIGCONT).unwrap();
        assert!(done.exists(), "pool {pool}: the children never connected");
        let out = output(&mut c, &e.id, pb::OutputStream::Stdout).await;
        assert_eq!(wait(&mut c, &e.id).await.exit_code, 0, "pool {pool}");
        assert_eq!(String::from_utf8_lossy(&out), "answered 0\n", "pool {pool}");
    }
}
