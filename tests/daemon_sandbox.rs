//! Isolation enforced by the kernel: memory limit with OOM verdict, user switching, `net` and
//! `io` intrinsics off.

mod daemon_support;

use std::io::Read;

use daemon_support::*;
use elide_task_driver::proto::elide::daemon::v1alpha1 as pb;

fn cgroup_memory_available() -> bool {
    std::path::Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
        || std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_hog_under_64mb_is_reported_oom_killed() {
    if !cgroup_memory_available() {
        eprintln!("SKIPPED: no memory cgroup controller on this machine");
        return;
    }
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    let mut req = code_req(
        &s,
        "py",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 1024 * 1024))\n",
    );
    req.limits = Some(pb::Limits {
        memory_bytes: 64 * 1024 * 1024,
        ..Default::default()
    });
    let mut events = c
        .watch_events(pb::WatchEventsRequest {
            session_id: s.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let e = c.start_execution(req).await.unwrap().into_inner();
    assert!(!e.cgroup.is_empty(), "no cgroup reported: {e:?}");
    let r = wait(&mut c, &e.id).await;
    assert!(r.oom_killed, "{r:?}");
    assert_eq!((r.signal, r.exit_code), (9, 137));
    let mut saw_oom = false;
    while let Ok(Ok(Some(ev))) =
        tokio::time::timeout(std::time::Duration::from_secs(5), events.message()).await
    {
        saw_oom |= ev.kind() == pb::EventKind::OomKilled;
        if ev.kind() == pb::EventKind::Exited {
            break;
        }
    }
    assert!(saw_oom, "no OOM event");

    // The same program within a roomy limit is not flagged.
    let mut req = code_req(&s, "py", "x = bytearray(16 * 1024 * 1024)\nprint(len(x))");
    req.limits = Some(pb::Limits {
        memory_bytes: 256 * 1024 * 1024,
        ..Default::default()
    });
    let (r, out, err) = run(&mut c, req).await;
    assert_eq!(r.exit_code, 0, "{err}");
    assert!(!r.oom_killed);
    assert_eq!(out.trim(), (16 * 1024 * 1024).to_string());

    // The session cap tightens a bigger per-execution limit.
    let capped = c
        .create_session(pb::CreateSessionRequest {
            config: Some(pb::SessionConfig {
                memory_limit_mb: 64,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let mut req = code_req(
        &capped,
        "py",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 1024 * 1024))\n",
    );
    req.limits = Some(pb::Limits {
        memory_bytes: 4 * 1024 * 1024 * 1024,
        ..Default::default()
    });
    let (r, _, _) = run(&mut c, req).await;
    assert!(r.oom_killed, "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn user_nobody_runs_the_snippet() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: switching users needs a root daemon");
        return;
    }
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    let mut req = code_req(
        &s,
        "js",
        "const fs = require('fs'); fs.writeFileSync('mine.txt', 'x'); console.log(process.getuid(), process.getgid(), fs.statSync('mine.txt').uid)",
    );
    req.user = "nobody".into();
    let (r, out, err) = run(&mut c, req).await;
    assert_eq!(r.exit_code, 0, "{err}");
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(
        out.trim(),
        format!("{} {} {}", nobody.uid, nobody.gid, nobody.uid)
    );

    // An interpreter the user cannot reach is a clear error, not an EACCES from exec.
    let py = daemon_info(&mut c)
        .await
        .runtimes
        .into_iter()
        .find(|r| r.language == "python")
        .unwrap();
    let mut req = code_req(&s, "py", "import os; print(os.getuid())");
    req.user = "nobody".into();
    let reachable = std::process::Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "test",
            "-x",
        ])
        .arg(&py.command)
        .status()
        .map(|s| s.success());
    match (reachable, c.start_execution(req.clone()).await) {
        (Ok(false), Err(st)) => {
            assert_eq!(st.code(), tonic::Code::InvalidArgument);
            assert!(
                st.message().contains("user") && st.message().contains("nobody"),
                "{}",
                st.message()
            );
        }
        (Ok(true), Ok(e)) => {
            let r = wait(&mut c, &e.into_inner().id).await;
            assert_eq!(r.exit_code, 0);
        }
        (reach, got) => panic!("interpreter reachable={reach:?} but start gave {got:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn net_off_blocks_tcp_to_a_host_loopback_listener() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        buf
    });
    let code = format!(
        "import socket, sys\ntry:\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=10)\n    s.sendall(b'hello')\n    print('connected')\nexcept OSError as e:\n    print('blocked', e.errno)\n"
    );
    // net off: own namespace, the host listener is unreachable.
    let closed = session(&mut c, &["env", "io"]).await;
    let (r, out, err) = run(&mut c, code_req(&closed, "py", &code)).await;
    assert_eq!(r.exit_code, 0, "{err}");
    assert!(out.starts_with("blocked"), "{out}");
    // Loopback inside the private namespace works.
    let (r, out, err) = run(
        &mut c,
        code_req(
            &closed,
            "py",
            "import socket\nl = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen()\nc = socket.create_connection(l.getsockname())\nprint('loopback ok')",
        ),
    )
    .await;
    assert_eq!((r.exit_code, out.trim()), (0, "loopback ok"), "{err}");
    // net on: the same code connects.
    let open = session(&mut c, &["env", "io", "net"]).await;
    let (r, out, err) = run(&mut c, code_req(&open, "py", &code)).await;
    assert_eq!(r.exit_code, 0, "{err}");
    assert_eq!(out.trim(), "connected");
    assert_eq!(&accepted.join().unwrap(), b"hello");
}

#[tokio::test(flavor = "multi_thread")]
async fn io_off_blocks_reading_etc_hostname_and_writing_tmp() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let marker = format!("/tmp/elide-io-test-{}", std::process::id());
    let _ = std::fs::remove_file(&marker);
    let code = format!(
        "def attempt(f):\n    try:\n        f()\n        return 'ok'\n    except OSError as e:\n        return 'denied:%d' % e.errno\n\
         print(attempt(lambda: open('/etc/hostname').read()))\n\
         print(attempt(lambda: open('{marker}', 'w').write('x')))\n\
         print(attempt(lambda: open('here.txt', 'w').write('x')))\n"
    );
    let closed = session(&mut c, &["env", "net"]).await;
    let (r, out, err) = run(&mut c, code_req(&closed, "py", &code)).await;
    assert_eq!(r.exit_code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec![
            format!("denied:{}", libc::EACCES).as_str(),
            format!("denied:{}", libc::EACCES).as_str(),
            "ok"
        ],
        "{out}"
    );
    assert!(!std::path::Path::new(&marker).exists());
    // JavaScript is confined the same way.
    let (r, out, err) = run(
        &mut c,
        code_req(
            &closed,
            "js",
            "try { require('fs').readFileSync('/etc/hostname'); console.log('read') } catch (e) { console.log(e.code) }",
        ),
    )
    .await;
    assert_eq!((r.exit_code, out.trim()), (0, "EACCES"), "{err}");

    let open = session(&mut c, &["env", "io", "net"]).await;
    let (r, out, err) = run(&mut c, code_req(&open, "py", &code)).await;
    assert_eq!(r.exit_code, 0, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["ok", "ok", "ok"]);
    assert!(std::path::Path::new(&marker).exists());
    let _ = std::fs::remove_file(&marker);
}

/// A pids limit holds the snippet's forks, started cold and pooled (a zygote's child joins
/// its execution cgroup before the snippet runs).
#[tokio::test(flavor = "multi_thread")]
async fn pids_limit_caps_process_creation() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let info = daemon_info(&mut c).await;
    for pool in [0, 2] {
        let pooled = pool > 0;
        let s = session_with_pool(&mut c, &["env", "io", "net"], pool).await;
        let mut req = code_req(
            &s,
            "py",
            "import os, time\nn = 0\ntry:\n    for i in range(50):\n        if os.fork() == 0:\n            time.sleep(5); os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('limited', n, e.errno)\nelse:\n    print('unlimited', n)\n",
        );
        req.limits = Some(pb::Limits {
            pids: 8,
            ..Default::default()
        });
        if info.cgroup_mode == "none" {
            // Only acceptable when the machine cannot enforce it, and then said clearly.
            let st = c
                .start_execution(req)
                .await
                .expect_err("a pids limit without cgroups");
            assert!(st.message().contains("pids"), "{}", st.message());
            continue;
        }
        let (e, r, out, err) = run_on_path(&mut c, req, pooled).await;
        assert_eq!(e.pooled, pooled, "{e:?}");
        assert_eq!(r.exit_code, 0, "pool {pool}: {err}");
        assert!(out.starts_with("limited"), "pool {pool}: {out}");
        let n: usize = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(n < 8, "pool {pool}: {out}");
        assert_eq!(
            out.split_whitespace().nth(2),
            Some(libc::EAGAIN.to_string().as_str()),
            "pool {pool}: {out}"
        );
    }
}

/// `syscall_filter = false` in the daemon's config: executions, cold and pooled, run without
/// the seccomp filter; the daemon says so in its log and in its feature report. (With the
/// default, `pool_parity` checks that both paths run under it.)
#[tokio::test(flavor = "multi_thread")]
async fn the_operator_can_switch_the_syscall_filter_off() {
    let dir = tempfile::tempdir().unwrap();
    let d = TestDaemon::start_with_config(dir.path(), "syscall_filter = false\n").await;
    let log = d.log();
    assert!(
        log.contains("executions run without the seccomp filter (syscall_filter = false)"),
        "{log}"
    );
    let mut c = d.client().await;
    let info = daemon_info(&mut c).await;
    let seccomp = info
        .isolation
        .iter()
        .find(|f| f.name == "seccomp")
        .expect("a seccomp feature");
    assert!(!seccomp.enforced, "{seccomp:?}");
    assert!(
        seccomp.detail.contains("syscall_filter = false"),
        "{seccomp:?}"
    );

    let report =
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('Seccomp')])";
    for pool in [0, 2] {
        let s = session_with_pool(&mut c, &["env", "io", "net"], pool).await;
        let (_, r, out, _) = run_on_path(&mut c, code_req(&s, "python", report), pool > 0).await;
        assert_eq!(r.exit_code, 0);
        // What this test itself runs under, nothing more.
        let (mode, filters) = own_seccomp();
        assert_eq!(out, format!("['{mode}', '{filters}']\n"), "pool {pool}");
    }
}
