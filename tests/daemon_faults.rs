//! Faults: the daemon killed with SIGKILL takes its executions along, restarts cleanly, and
//! still answers for executions that ended before (real result) or died with it (clear error).

mod daemon_support;

use daemon_support::*;
use elide_task_driver::proto::elide::daemon::v1alpha1 as pb;

#[tokio::test(flavor = "multi_thread")]
async fn kill9_daemon_with_20_running_executions_leaves_none_and_restart_works() {
    let mut d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &["env", "io", "net"]).await;

    // One that ended before the crash: its real result must survive the restart.
    let done = c
        .start_execution(code_req(&s, "py", "import sys; sys.exit(17)"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(wait(&mut c, &done.id).await.exit_code, 17);

    let mut running = Vec::new();
    for i in 0..20 {
        let (lang, code) = if i % 2 == 0 {
            ("py", "import time\ntime.sleep(300)")
        } else {
            ("js", "setInterval(() => {}, 1000)")
        };
        let e = c
            .start_execution(code_req(&s, lang, code))
            .await
            .unwrap()
            .into_inner();
        assert!(e.pid > 0);
        running.push(e);
    }
    for e in &running {
        assert!(alive(e.pid), "pid {} not running", e.pid);
    }
    drop(c);
    d.kill9();
    for e in &running {
        let pid = e.pid;
        eventually(
            &format!("execution pid {pid} killed with the daemon"),
            || !alive(pid),
        )
        .await;
    }

    d.spawn().await;
    let mut c = d.client().await;
    // The session survived (it is persisted) and new work runs.
    let sessions = c
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(sessions.sessions.iter().any(|x| x.id == s), "{sessions:?}");
    let (r, out, _) = run(&mut c, code_req(&s, "py", "print('after restart')")).await;
    assert_eq!((r.exit_code, out.as_str()), (0, "after restart\n"));

    assert_eq!(wait(&mut c, &done.id).await.exit_code, 17);
    for e in &running {
        let r = wait(&mut c, &e.id).await;
        assert!(
            !r.error.is_empty(),
            "execution {} lost its verdict: {r:?}",
            e.id
        );
        assert!(r.error.contains("daemon"), "{}", r.error);
        let got = execution(&mut c, &e.id).await;
        assert_eq!(got.state(), pb::ExecutionState::Exited);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_status_survives_a_graceful_restart() {
    let mut d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &[]).await;
    let e = c
        .start_execution(code_req(&s, "js", "process.exit(9)"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(wait(&mut c, &e.id).await.exit_code, 9);
    drop(c);
    // SIGTERM: graceful stop.
    d.terminate();
    let mut child = d.child.take().unwrap();
    let st = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(st.success(), "{st}: {}", d.log());
    assert!(!d.socket.exists(), "socket left behind");
    d.spawn().await;
    let mut c = d.client().await;
    let r = wait(&mut c, &e.id).await;
    assert_eq!((r.exit_code, r.error.as_str()), (9, ""));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_on_the_same_socket_or_state_dir_is_refused() {
    let d = TestDaemon::start().await;
    let out = tokio::task::spawn_blocking({
        let socket = d.socket.clone();
        let state = d.path("state2");
        // Its own run dir too: the default is the system's (/run/elide/exec).
        let run = d.path("run2");
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_elide-daemon"))
                .arg("--socket")
                .arg(&socket)
                .arg("--state-dir")
                .arg(&state)
                .arg("--run-dir")
                .arg(&run)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::task::spawn_blocking({
        let socket = d.path("other.sock");
        let state = d.state_dir.clone();
        let run = d.path("run3");
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_elide-daemon"))
                .arg("--socket")
                .arg(&socket)
                .arg("--state-dir")
                .arg(&state)
                .arg("--run-dir")
                .arg(&run)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("state dir"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first daemon still works.
    let mut c = d.client().await;
    c.get_daemon_info(pb::GetDaemonInfoRequest {})
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_is_private_by_default() {
    use std::os::unix::fs::PermissionsExt;
    let d = TestDaemon::start().await;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Optionally shared with a group.
    use std::os::unix::fs::MetadataExt;
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(65534))
        .unwrap()
        .map(|g| g.name)
        .unwrap_or_else(|| "65534".into());
    let d = TestDaemon::start_with(&["--socket-mode", "0660", "--socket-group", &group]).await;
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_daemon_also_kills_grandchildren_that_left_the_process_group() {
    let mut d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &["env", "io", "net"]).await;
    let mut req = code_req(
        &s,
        "py",
        "import subprocess, time\n\
         p = subprocess.Popen(['/bin/sleep', '300'], start_new_session=True)\n\
         print(p.pid, flush=True)\ntime.sleep(300)\n",
    );
    req.env = vec![pb::EnvVar {
        key: b"PATH".to_vec(),
        value: b"/usr/bin:/bin".to_vec(),
    }];
    let e = c.start_execution(req).await.unwrap().into_inner();
    let mut out = c
        .stream_output(pb::StreamOutputRequest {
            execution_id: e.id.clone(),
            streams: vec![pb::OutputStream::Stdout as i32],
            offset: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let line = tokio::time::timeout(DEADLINE, out.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let grandchild: u32 = String::from_utf8_lossy(&line.data).trim().parse().unwrap();
    assert!(alive(grandchild));
    drop(out);
    drop(c);
    d.kill9();
    // No restart: the daemon's reaper cleans up on its own.
    eventually("execution killed with the daemon", || !alive(e.pid)).await;
    eventually("escaped grandchild killed with the daemon", || {
        !alive(grandchild)
    })
    .await;
}

/// Inodes of the daemon's ends of its client connections: its sockets that carry the
/// listening socket's path (/proc/net/unix names an accepted socket after its listener).
fn client_connections(d: &TestDaemon) -> std::collections::HashSet<u64> {
    let path = d.socket.display().to_string();
    let named: std::collections::HashSet<u64> = std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(7) == Some(&path.as_str())).then(|| f[6].parse().ok())?
        })
        .collect();
    std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            let link = link.to_str()?;
            link.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .filter(|i| named.contains(i))
        .collect()
}

/// A client that gives up on StartExecution halfway (its own timeout, a plugin killed mid-call)
/// leaves nothing behind: the start still runs to its end in the daemon and the execution,
/// whose id that client never learned, is stopped at once. Nothing stays `Starting`, no
/// process or FIFO writer lingers, and the daemon still shuts down promptly.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_abandoned_by_its_client_leaves_no_process_and_no_stuck_execution() {
    use std::time::{Duration, Instant};
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    for (pool, lang) in [(0, "py"), (1, "py"), (1, "js")] {
        let s = session_with_pool(&mut c, &["env", "io", "net"], pool).await;
        if pool > 0 {
            // The pool warm, so that the start is a pooled one (checked below).
            if lang == "py" {
                python_pool_warm(&mut c, &s).await;
            } else {
                idle_node_workers(&mut c, &s, 1).await;
            }
        }
        let fifo = d.path(&format!("abandoned-{pool}-{lang}.fifo"));
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let code = if lang == "py" {
            "import time\ntime.sleep(600)"
        } else {
            "setInterval(() => {}, 1000)"
        };
        let mut r = code_req(&s, lang, code);
        r.stdout = path_sink(&fifo);
        // A client of its own, on a connection of its own: the daemon's end of it shows when
        // the daemon has let it go.
        let others = client_connections(&d);
        let mut c2 = d.client().await;
        daemon_info(&mut c2).await;
        let mine: Vec<u64> = client_connections(&d)
            .into_iter()
            .filter(|i| !others.contains(i))
            .collect();
        assert!(!mine.is_empty(), "the daemon's end of the new connection");
        // The FIFO has no reader yet, so the start waits for one (its execution is listed,
        // not yet running); the client gives up meanwhile.
        let start = tokio::spawn(async move { c2.start_execution(r).await });
        let deadline = Instant::now() + DEADLINE;
        while executions_of(&mut c, &s).await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{lang}, pool {pool}: the start never reached the daemon"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !start.is_finished(),
            "{lang}: started without a FIFO reader: {:?}",
            start.await
        );
        start.abort();
        assert!(start.await.unwrap_err().is_cancelled());
        // The reader attaches once the daemon has seen the call cancelled: with its client
        // gone, the connection ends, and the daemon closes its end once it has passed the
        // reset on to the call's handler (a start that completes before the cancel arrives is answered to a client
        // that no longer listens, which no daemon can tell). It reads to EOF: every writer
        // gone.
        let deadline = Instant::now() + DEADLINE;
        while client_connections(&d).iter().any(|i| mine.contains(i)) {
            assert!(
                Instant::now() < deadline,
                "{lang}, pool {pool}: the daemon kept the abandoned connection"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reader = std::thread::spawn(move || std::fs::read(fifo).unwrap());
        let deadline = Instant::now() + DEADLINE;
        let ended = loop {
            let list = executions_of(&mut c, &s).await;
            if !list.is_empty()
                && list
                    .iter()
                    .all(|e| e.state == pb::ExecutionState::Exited as i32)
            {
                break list;
            }
            assert!(
                Instant::now() < deadline,
                "{lang}, pool {pool}: the abandoned execution never ended: {list:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for e in &ended {
            assert!(
                e.pid != 0,
                "{lang}: the start completed, so it had a process"
            );
            assert_eq!(e.pooled, pool > 0, "{lang}, pool {pool}: {e:?}");
            eventually("the abandoned execution's process is gone", || {
                !alive(e.pid)
            })
            .await;
        }
        // Returned at EOF: no writer of the FIFO is left.
        assert_eq!(reader.join().unwrap(), b"", "{lang}");
    }
    let pid = d.pid();
    d.terminate();
    let t = Instant::now();
    while alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the daemon did not shut down after SIGTERM:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A daemon that stops (here SIGTERM) leaves no cgroup of its own behind: its reaper removes
/// the execution cgroups, the stocked ones and then the parent.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_daemon_leaves_no_cgroup_behind() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = session(&mut c, &["env", "io", "net"]).await;
    let (r, _, _) = run(&mut c, code_req(&s, "py", "print(1)")).await;
    assert_eq!(r.exit_code, 0);
    let parents = d.cgroup_parents();
    if parents.is_empty() {
        eprintln!("no cgroups on this machine; nothing to check");
        return;
    }
    d.terminate();
    eventually("the daemon's cgroups are gone", || {
        parents.iter().all(|p| !p.exists())
    })
    .await;
}

/// StopExecution and CloseSession escalate to SIGKILL after the grace even when their client
/// gave up on the call before that (a snippet ignoring SIGTERM must not survive a stop whose
/// caller went away), and the closed session is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_or_close_abandoned_by_its_client_still_kills_after_the_grace() {
    use std::time::Duration;
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(600)";
    let grace = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    let start = |c: &mut Client, s: &str, out: std::path::PathBuf| {
        let mut c = c.clone();
        let mut r = code_req(s, "py", stubborn);
        r.stdout = path_sink(&out);
        async move {
            let e = c.start_execution(r).await.unwrap().into_inner();
            // SIGTERM is ignored only once the handler is installed.
            eventually("the snippet ignores SIGTERM", || {
                std::fs::read_to_string(&out).is_ok_and(|o| o.contains("ready"))
            })
            .await;
            e
        }
    };

    let s = session(&mut c, &["env", "io", "net"]).await;
    let e = start(&mut c, &s, d.path("stop.out")).await;
    let mut c2 = c.clone();
    let stop = c2.stop_execution(pb::StopExecutionRequest {
        execution_id: e.id.clone(),
        signal: String::new(),
        grace,
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stop)
            .await
            .is_err(),
        "the stop ended within the grace although SIGTERM is ignored"
    );
    let r = tokio::time::timeout(DEADLINE, wait(&mut c, &e.id))
        .await
        .expect("the abandoned stop never killed the execution");
    assert_eq!(r.signal, libc::SIGKILL);

    let s = session(&mut c, &["env", "io", "net"]).await;
    let e = start(&mut c, &s, d.path("close.out")).await;
    let mut c2 = c.clone();
    let close = c2.close_session(pb::CloseSessionRequest {
        session_id: s.clone(),
        grace,
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(200), close)
            .await
            .is_err()
    );
    eventually("the abandoned close killed the execution", || !alive(e.pid)).await;
    let deadline = std::time::Instant::now() + DEADLINE;
    while c
        .get_session(pb::GetSessionRequest {
            session_id: s.clone(),
        })
        .await
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned close left the session behind"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
