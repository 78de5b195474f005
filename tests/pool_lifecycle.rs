//! Warm pools over time: no state crosses executions, `context_pool_size = 0` disables warming,
//! pools refill after bursts and are torn down with their session, and 1,000 executions leave
//! no zombie or leaked worker behind.

mod daemon_support;

use daemon_support::*;
use elide_task_driver::proto::elide::daemon::v1alpha1 as pb;

/// Every descendant of `root` except the daemon's reaper companion: (pid, state, cmdline).
fn descendants(root: u32) -> Vec<(u32, char, String)> {
    all_descendants(root)
        .into_iter()
        .filter(|(_, _, c)| !c.contains("__reaper"))
        .collect()
}

/// The daemon's zygotes (its own children running zygote.py, not their forks).
fn zygotes(daemon: u32) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|(_, ppid, _, c)| *ppid == daemon && c.contains("elide python zygote"))
        .map(|(p, _, _, _)| p)
        .collect()
}

/// Forks of the zygotes: the pre-forked spare, plus any execution still running.
fn zygote_children(daemon: u32) -> Vec<u32> {
    let z = zygotes(daemon);
    processes()
        .into_iter()
        .filter(|(_, ppid, _, _)| z.contains(ppid))
        .map(|(p, _, _, _)| p)
        .collect()
}

fn node_workers(daemon: u32) -> Vec<u32> {
    descendants(daemon)
        .into_iter()
        .filter(|(_, _, c)| c.contains("elide node worker"))
        .map(|(p, _, _)| p)
        .collect()
}

/// What `elide-daemon sessions` prints.
async fn sessions_listing(d: &TestDaemon) -> String {
    let out = d.cli("sessions", &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn pooled_session(c: &mut Client, size: u32) -> String {
    session_with_pool(c, &["env", "io", "net"], size).await
}

/// Runs `code` until an execution of it is pooled; returns its stdout.
async fn run_pooled(c: &mut Client, s: &str, lang: &str, code: &str) -> String {
    let (_, r, out, err) = run_on_path(c, code_req(s, lang, code), true).await;
    assert_eq!(r.exit_code, 0, "{err}");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn no_state_crosses_pooled_executions() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = pooled_session(&mut c, 2).await;
    let set = r#"
import os, sys, json, colorsys
json.LEAK = "global"
os.environ["LEAK"] = "env"
sys.modules["leaky_module"] = sys
open("leak.txt", "w").write("file")
LEAK_MAIN = 1
print("set")
"#;
    let check = r#"
import os, sys, json
print(json.dumps([
    hasattr(json, "LEAK"), os.environ.get("LEAK"), "leaky_module" in sys.modules,
    "colorsys" in sys.modules, os.path.exists("leak.txt"), "LEAK_MAIN" in globals(),
]))
"#;
    assert_eq!(run_pooled(&mut c, &s, "py", set).await, "set\n");
    for _ in 0..3 {
        assert_eq!(
            run_pooled(&mut c, &s, "py", check).await,
            "[false, null, false, false, false, false]\n"
        );
    }
    let set_js = "globalThis.LEAK = 1; process.env.LEAK = 'env'; require('fs').writeFileSync('leak.txt', 'x'); console.log('set')";
    let check_js = "console.log(JSON.stringify([typeof globalThis.LEAK, process.env.LEAK ?? null, require('fs').existsSync('leak.txt')]))";
    assert_eq!(run_pooled(&mut c, &s, "js", set_js).await, "set\n");
    assert_eq!(
        run_pooled(&mut c, &s, "js", check_js).await,
        "[\"undefined\",null,false]\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_size_zero_disables_warming_and_close_tears_the_pool_down() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let daemon = d.pid();
    let cold = pooled_session(&mut c, 0).await;
    let mut events = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Several executions of each language, one after the other and a few at once: none is
    // pooled, and nothing warms behind them.
    for round in 0..3 {
        for (lang, code) in [
            ("py", format!("print('cold', {round})")),
            ("js", format!("console.log('cold', {round})")),
        ] {
            let e = c
                .start_execution(code_req(&cold, lang, &code))
                .await
                .unwrap()
                .into_inner();
            assert!(!e.pooled, "{lang} {round}: {e:?}");
            let out = output(&mut c, &e.id, pb::OutputStream::Stdout).await;
            assert_eq!(wait(&mut c, &e.id).await.exit_code, 0, "{lang} {round}");
            assert_eq!(String::from_utf8_lossy(&out), format!("cold {round}\n"));
        }
    }
    let burst = (0..4).map(|i| {
        let mut c = c.clone();
        let req = if i % 2 == 0 {
            code_req(&cold, "py", "pass")
        } else {
            code_req(&cold, "js", "0")
        };
        async move {
            let e = c.start_execution(req).await.unwrap().into_inner();
            (e.pooled, wait(&mut c, &e.id).await.exit_code)
        }
    });
    assert_eq!(futures::future::join_all(burst).await, vec![(false, 0); 4]);
    let execs = executions_of(&mut c, &cold).await;
    assert_eq!(execs.len(), 10, "{execs:?}");
    assert!(execs.iter().all(|e| !e.pooled), "{execs:?}");
    // No pool at all in GetSession: none that started anything or holds an idle worker.
    let pools = pool_statuses(&mut c, &cold).await;
    assert!(pools.is_empty(), "{pools:?}");
    assert!(zygotes(daemon).is_empty() && node_workers(daemon).is_empty());
    eventually("no process left behind the cold executions", || {
        descendants(daemon).is_empty()
    })
    .await;

    let s = pooled_session(&mut c, 3).await;
    eventually("a zygote and 3 node workers", || {
        zygotes(daemon).len() == 1 && node_workers(daemon).len() == 3
    })
    .await;
    let _ = run_pooled(&mut c, &s, "py", "print(1)").await;
    c.close_session(pb::CloseSessionRequest {
        session_id: s,
        grace: None,
    })
    .await
    .unwrap();
    // CloseSession returns once the pool's processes are reaped.
    assert!(zygotes(daemon).is_empty(), "{:?}", descendants(daemon));
    assert!(node_workers(daemon).is_empty(), "{:?}", descendants(daemon));
    assert!(descendants(daemon).is_empty(), "{:?}", descendants(daemon));
    // The cold session never fell back: it has no pool to fall back from.
    while let Ok(Some(ev)) =
        tokio::time::timeout(std::time::Duration::from_millis(200), events.message())
            .await
            .map(|m| m.unwrap())
    {
        if ev.session_id == cold {
            assert_ne!(ev.kind, pb::EventKind::PoolFallback as i32, "{ev:?}");
        }
    }
}

/// An interpreter too old for the zygote (python 3.8 has no `os.pidfd_open`) is not warmed:
/// no zygote starts, and each execution starts cold at once, with an event that says why,
/// instead of waiting for spares that cannot take a job.
#[tokio::test(flavor = "multi_thread")]
async fn an_interpreter_older_than_3_9_is_not_warmed_and_starts_cold() {
    let real = real_python3();
    // Answers the daemon's version probe as python 3.8 does; runs everything else for real.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("python3.8");
    write_script(
        &fake,
        &format!(
            "#!/bin/sh\ncase \"$*\" in *platform.python_version*)\n  \
             exec '{real}' -c 'import sys; print(\"'\"$0\"'\"); print(\"3.8.18\"); print(sys.prefix); print(sys.base_prefix)';;\nesac\n\
             exec '{real}' \"$@\"\n"
        ),
    );
    let toml = format!("[runtimes.python]\ncommand = \"{}\"\n", fake.display());
    let d = TestDaemon::start_with_config(dir.path(), &toml).await;
    let mut c = d.client().await;
    let py = runtime_info(&mut c, "python").await;
    assert_eq!(py.version, "3.8.18", "{py:?}");
    let mut events = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let s = pooled_session(&mut c, 2).await;
    // The session's node workers warm; python gets no zygote.
    eventually("2 node workers", || node_workers(d.pid()).len() == 2).await;
    assert!(zygotes(d.pid()).is_empty(), "{:?}", descendants(d.pid()));
    let started = std::time::Instant::now();
    let e = c
        .start_execution(code_req(&s, "py", "print('cold', 1)"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the start waited for a pool"
    );
    assert!(!e.pooled, "{e:?}");
    let out = output(&mut c, &e.id, pb::OutputStream::Stdout).await;
    assert_eq!(wait(&mut c, &e.id).await.exit_code, 0);
    assert_eq!(String::from_utf8_lossy(&out), "cold 1\n");
    let fallback = loop {
        let ev = tokio::time::timeout(DEADLINE, events.message())
            .await
            .expect("no pool fallback event")
            .unwrap()
            .expect("the event stream ended");
        if ev.kind == pb::EventKind::PoolFallback as i32 && ev.execution_id == e.id {
            break ev;
        }
    };
    assert!(
        fallback.message.contains("python 3.8.18 cannot be warmed")
            && fallback.message.contains("3.9 or newer"),
        "{fallback:?}"
    );
    let python = pool_status(&mut c, &s, "python").await;
    assert_eq!(
        (python.state(), python.pooled_starts, python.cold_starts),
        (pb::PoolState::NotWarmed, 0, 1),
        "{python:?}"
    );
    assert_eq!(
        python.detail,
        fallback.message.trim_start_matches("starting cold: ")
    );
    let listing = sessions_listing(&d).await;
    assert!(
        listing.contains("pool python not warmed pooled 0 cold 1 (python 3.8.18 cannot be warmed"),
        "{listing}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn burst_falls_back_with_an_event_then_the_pool_refills() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let daemon = d.pid();
    let s = pooled_session(&mut c, 2).await;
    idle_node_workers(&mut c, &s, 2).await;
    let mut events = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    // A burst of 8 at once against 2 warm workers: each start is pooled or falls back to cold
    // with an event, and all of them run correctly either way.
    let starts = (0..8).map(|i| {
        let mut c = c.clone();
        let s = s.clone();
        async move {
            let e = c
                .start_execution(code_req(
                    &s,
                    "js",
                    &format!("setTimeout(() => console.log('done {i}'), 300)"),
                ))
                .await
                .unwrap()
                .into_inner();
            (e.id, e.pooled)
        }
    });
    let ids = futures::future::join_all(starts).await;
    let pooled = ids.iter().filter(|(_, p)| *p).count();
    assert!(pooled >= 2, "{ids:?}");
    for (i, (id, _)) in ids.iter().enumerate() {
        let out = output(&mut c, id, pb::OutputStream::Stdout).await;
        assert_eq!(String::from_utf8_lossy(&out), format!("done {i}\n"));
        assert_eq!(wait(&mut c, id).await.exit_code, 0);
    }
    // Every cold one said so with an event (awaited, however slow the machine), and no
    // pooled one did (whatever follows within a moment is counted too).
    let mut fallbacks = 0;
    let mut quiet = DEADLINE;
    while let Ok(Some(ev)) = tokio::time::timeout(quiet, events.message())
        .await
        .map(|m| m.unwrap())
    {
        if ev.kind == pb::EventKind::PoolFallback as i32 {
            assert!(ev.message.contains("starting cold"), "{ev:?}");
            assert!(
                ids.iter().any(|(id, p)| *id == ev.execution_id && !p),
                "a fallback event for a pooled start: {ev:?} {ids:?}"
            );
            fallbacks += 1;
        }
        if fallbacks >= 8 - pooled {
            quiet = std::time::Duration::from_millis(300);
        }
    }
    assert_eq!(fallbacks, 8 - pooled, "{ids:?}");
    eventually("the pool refilled to 2 workers", || {
        node_workers(daemon).len() == 2
    })
    .await;
    // The session's pool status counts the same starts, and shows the refilled workers.
    let deadline = std::time::Instant::now() + DEADLINE;
    let node = loop {
        let node = pool_status(&mut c, &s, "node").await;
        if node.idle_workers == 2 || std::time::Instant::now() > deadline {
            break node;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        (
            node.state(),
            node.idle_workers,
            node.pooled_starts,
            node.cold_starts
        ),
        (pb::PoolState::Warm, 2, pooled as u64, (8 - pooled) as u64),
        "{node:?}"
    );
    let python = pool_status(&mut c, &s, "python").await;
    assert_eq!(
        (python.pooled_starts, python.cold_starts),
        (0, 0),
        "{python:?}"
    );
    let listing = sessions_listing(&d).await;
    assert!(
        listing.contains(&format!(
            "pool node   warm       pooled {pooled} cold {} idle workers 2",
            8 - pooled
        )),
        "{listing}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_zygote_is_replaced() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let daemon = d.pid();
    let s = pooled_session(&mut c, 1).await;
    let _ = run_pooled(&mut c, &s, "py", "print(1)").await;
    let old = vec![kill_zygote(daemon).await];
    // A job handed over while the killed zygote's spare is still there would be taken by the
    // spare and die with it (PDEATHSIG); so this waits until the spare is gone too.
    eventually("the killed zygote's spare is gone", || {
        processes().iter().all(|(_, ppid, _, _)| *ppid != old[0])
    })
    .await;
    // Meanwhile executions still run (cold) and the zygote comes back.
    let (r, out, _) = run(&mut c, code_req(&s, "py", "print('still')")).await;
    assert_eq!((r.exit_code, out.as_str()), (0, "still\n"));
    eventually("a new zygote", || {
        let z = zygotes(daemon);
        z.len() == 1 && z != old
    })
    .await;
    assert_eq!(run_pooled(&mut c, &s, "py", "print(2)").await, "2\n");
}

/// Starts `code` until an execution of it is pooled (the unpooled ones are killed); its id and pid.
async fn start_pooled(c: &mut Client, s: &str, code: &str) -> (String, u32) {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let e = c
            .start_execution(code_req(s, "py", code))
            .await
            .unwrap()
            .into_inner();
        if e.pooled {
            return (e.id, e.pid);
        }
        kill_now(c, &e.id).await;
        wait(c, &e.id).await;
        assert!(std::time::Instant::now() < deadline, "never pooled");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// SIGKILLs the daemon's only zygote and waits until it is gone; its pid.
async fn kill_zygote(daemon: u32) -> u32 {
    let z = zygotes(daemon);
    assert_eq!(z.len(), 1, "{z:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(z[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("the killed zygote is gone", || {
        !zygotes(daemon).contains(&z[0])
    })
    .await;
    z[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn running_python_executions_outlive_a_killed_zygote_but_not_the_daemon() {
    let mut d = TestDaemon::start().await;
    let mut c = d.client().await;
    let daemon = d.pid();
    let s = pooled_session(&mut c, 2).await;
    // Where the kernel cannot tell how an orphan ended (before Linux 6.15) or no cgroup would
    // let the reaper end it with the daemon, executions still die with their zygote.
    let outlives = elide_task_driver::daemon::pool::python_zygote::exit_status_outlives_reaping()
        && !d.cgroup_parents().is_empty();
    let flag = d.path("go");
    let ends_itself = format!(
        "import os, sys, time\nwhile not os.path.exists({flag:?}): time.sleep(0.02)\nprint('after', flush=True)\nsys.exit(7)"
    );
    let sleeper = "import time\ntime.sleep(600)";
    let (ending, _) = start_pooled(&mut c, &s, &ends_itself).await;
    let (stopped, stopped_pid) = start_pooled(&mut c, &s, sleeper).await;
    kill_zygote(daemon).await;
    if !outlives {
        assert_eq!(wait(&mut c, &ending).await.signal, 9);
        assert_eq!(wait(&mut c, &stopped).await.signal, 9);
        return;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for id in [&ending, &stopped] {
        let e = execution(&mut c, id).await;
        assert_eq!(e.state, pb::ExecutionState::Running as i32, "{e:?}");
        assert!(alive(e.pid), "{e:?}");
    }
    // Still supervised: its own exit code and output, and a stop.
    std::fs::write(&flag, b"").unwrap();
    let r = wait(&mut c, &ending).await;
    assert_eq!((r.exit_code, r.signal), (7, 0), "{r:?}");
    let out = output(&mut c, &ending, pb::OutputStream::Stdout).await;
    assert_eq!(String::from_utf8_lossy(&out), "after\n");
    stop_with(&mut c, &stopped, "TERM").await;
    assert_eq!(wait(&mut c, &stopped).await.signal, 15);
    assert!(!alive(stopped_pid));
    // The pool comes back; an execution orphaned by its zygote still dies with the daemon
    // (its reaper empties the execution cgroups).
    assert_eq!(run_pooled(&mut c, &s, "py", "print(2)").await, "2\n");
    let (_, orphan) = start_pooled(&mut c, &s, sleeper).await;
    kill_zygote(daemon).await;
    assert!(alive(orphan));
    d.kill9();
    eventually("the orphaned execution ended with the daemon", || {
        !alive(orphan)
    })
    .await;
}

/// A pooled snippet that reports its exit early (`code` reports 7 through the warm runtime's own
/// channel, and ends with 1 where a cold start has none) is taken at its word and does not
/// run on behind it. Without cgroups to sweep up after it, the kill of the leader's process
/// group at exit is what ends it.
async fn an_early_exit_report_ends_the_snippet(lang: &str, code: &str) {
    let no_cgroups = tempfile::tempdir().unwrap();
    let d = TestDaemon::start_with(&["--cgroup-root", no_cgroups.path().to_str().unwrap()]).await;
    let mut c = d.client().await;
    let s = pooled_session(&mut c, 1).await;
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let e = c
            .start_execution(code_req(&s, lang, code))
            .await
            .unwrap()
            .into_inner();
        let r = wait(&mut c, &e.id).await;
        if e.pooled {
            // The code stands: the snippet could as well have exited with it.
            assert_eq!(r.exit_code, 7, "{r:?}");
            eventually("the process behind an early exit report is gone", || {
                !alive(e.pid)
            })
            .await;
            return;
        }
        assert_eq!(r.exit_code, 1, "{r:?}");
        assert!(std::time::Instant::now() < deadline, "never pooled");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_snippet_that_fakes_its_exit_report_does_not_outlive_it() {
    // The exit report is only a write to fd 0, which the snippet can make too; a cold start
    // has /dev/null there (read-only), so the write throws and the snippet ends with 1.
    let code = "require('fs').writeSync(0, '7\\n'); setInterval(() => {}, 1000);";
    an_early_exit_report_ends_the_snippet("js", code).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_snippet_that_notes_its_exit_early_does_not_outlive_it() {
    // A pooled child notes its exit code in shared memory before it exits (exit_notes.rs); the
    // snippet's caller is the zygote's code, whose globals hold the function that does it. A
    // cold interpreter has no caller frame: the snippet ends with 1.
    let code = "import sys, time\n\
                try:\n    note = sys._getframe(1).f_globals['_write_note']\n\
                except (ValueError, KeyError):\n    raise SystemExit(1)\n\
                note(7)\n\
                time.sleep(600)";
    an_early_exit_report_ends_the_snippet("py", code).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_child_keeps_only_its_own_exit_note_page() {
    // The zygote maps the whole exit-note region; a child that takes a job unmaps every page
    // but its slot before the snippet runs, so no execution can read or write another's note.
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = pooled_session(&mut c, 2).await;
    let report = "import os\n\
                  page = os.sysconf('SC_PAGE_SIZE')\n\
                  sizes = []\n\
                  for line in open('/proc/self/maps'):\n    \
                      if 'elide-exit-notes' in line:\n        \
                          lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n        \
                          sizes.append((hi - lo) // page)\n\
                  print(sizes)";
    // Each in turn, whichever slot it was given.
    for _ in 0..3 {
        assert_eq!(run_pooled(&mut c, &s, "py", report).await, "[1]\n");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_zygote_takes_the_daemons_oom_score_adj_and_executions_do_not() {
    let d = TestDaemon::start().await;
    let daemon = d.pid();
    let oom_of = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .unwrap()
            .trim()
            .to_string()
    };
    // Raising needs no privilege (this machine has no CAP_SYS_RESOURCE to lower it); what is
    // checked is that the zygote follows the daemon and the executions do not.
    std::fs::write(format!("/proc/{daemon}/oom_score_adj"), "321").unwrap();
    let mut c = d.client().await;
    let report = "print(open('/proc/self/oom_score_adj').read().strip())";
    let s = pooled_session(&mut c, 2).await;
    assert_eq!(run_pooled(&mut c, &s, "py", report).await, "0\n");
    let zygote = zygotes(daemon);
    assert_eq!(zygote.len(), 1, "{:?}", descendants(daemon));
    assert_eq!(oom_of(zygote[0]), "321");
    // A cold execution of the same daemon gets 0 as well.
    let cold = pooled_session(&mut c, 0).await;
    let e = c
        .start_execution(code_req(&cold, "py", report))
        .await
        .unwrap()
        .into_inner();
    let out = output(&mut c, &e.id, pb::OutputStream::Stdout).await;
    assert_eq!(wait(&mut c, &e.id).await.exit_code, 0);
    assert!(!e.pooled);
    assert_eq!(String::from_utf8_lossy(&out), "0\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exit_is_reported_while_the_zygote_cannot_run() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let daemon = d.pid();
    let s = pooled_session(&mut c, 2).await;
    assert_eq!(run_pooled(&mut c, &s, "py", "print(1)").await, "1\n");
    let zygote = zygotes(daemon);
    assert_eq!(zygote.len(), 1);
    let zygote = nix::unistd::Pid::from_raw(zygote[0] as i32);
    let cases = [
        ("import time; time.sleep(0.5); raise SystemExit(3)", 3, 0),
        (
            "import os, signal, time; time.sleep(0.5); os.kill(os.getpid(), signal.SIGTERM)",
            128 + 15,
            15,
        ),
    ];
    for (code, exit_code, signal) in cases {
        let e = c
            .start_execution(code_req(&s, "py", code))
            .await
            .unwrap()
            .into_inner();
        assert!(e.pooled);
        // The zygote (the child's parent, which reaps it) is stopped before the child ends: the
        // daemon learns the end from the child's pidfd, not from the zygote's report.
        nix::sys::signal::kill(zygote, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_secs(20), wait(&mut c, &e.id)).await;
        nix::sys::signal::kill(zygote, nix::sys::signal::Signal::SIGCONT).unwrap();
        let r = r.expect("no exit reported while the zygote was stopped");
        assert_eq!((r.exit_code, r.signal), (exit_code, signal), "{code}");
    }
    assert_eq!(run_pooled(&mut c, &s, "py", "print(2)").await, "2\n");
    assert!(!d.log().contains("cannot remove"), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_zygote_keeps_pool_size_spares_forked_and_replaces_used_and_killed_ones() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let daemon = d.pid();
    let s = pooled_session(&mut c, 3).await;
    let _ = run_pooled(&mut c, &s, "py", "print(1)").await;
    eventually("three spares", || zygote_children(daemon).len() == 3).await;
    let zygote = zygotes(daemon);
    let spares = zygote_children(daemon);
    // A job consumes a spare; the zygote forks a replacement.
    assert_eq!(run_pooled(&mut c, &s, "py", "print(2)").await, "2\n");
    eventually("a fresh spare after a job", || {
        let now = zygote_children(daemon);
        now.len() == 3 && now.iter().filter(|p| !spares.contains(p)).count() == 1
    })
    .await;
    // A burst of three concurrent jobs finds three spares ready: all pooled.
    let burst = (0..3).map(|i| {
        let mut c = c.clone();
        let r = code_req(&s, "py", &format!("print({i})"));
        async move {
            let e = c.start_execution(r).await.unwrap().into_inner();
            let r = wait(&mut c, &e.id).await;
            (e.pooled, r.exit_code)
        }
    });
    let ran = futures::future::join_all(burst).await;
    assert_eq!(ran, vec![(true, 0); 3]);
    eventually("the spares refilled after the burst", || {
        zygote_children(daemon).len() == 3
    })
    .await;
    // A spare killed while idle is replaced too (its death is no job's exit), and the zygote
    // itself survives.
    let spares = zygote_children(daemon);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(spares[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("a replaced spare", || {
        let now = zygote_children(daemon);
        now.len() == 3 && !now.contains(&spares[0])
    })
    .await;
    assert_eq!(zygotes(daemon), zygote);
    assert_eq!(run_pooled(&mut c, &s, "py", "print(3)").await, "3\n");
}

/// A cgroup v1 `pids` hierarchy the test owns; removed (its members moved out) on drop.
struct PidsCgroup(std::path::PathBuf);

impl PidsCgroup {
    fn new(name: &str) -> Option<Self> {
        let root = std::path::Path::new("/sys/fs/cgroup/pids");
        if !root.join("cgroup.procs").exists() {
            return None;
        }
        let dir = root.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        Some(Self(dir))
    }

    fn set_max(&self, max: &str) {
        std::fs::write(self.0.join("pids.max"), max).unwrap();
    }

    fn adopt(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        let members = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
        for pid in members.lines() {
            let _ = std::fs::write("/sys/fs/cgroup/pids/cgroup.procs", pid);
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A spare taken by a job that keeps running is replaced while it runs. With most of the pool
/// idle the zygote holds the replacement back until a child ends (so its fork does not meet
/// the job's start), but only for a moment: no child ends here.
#[tokio::test(flavor = "multi_thread")]
async fn a_spare_taken_by_a_long_job_is_replaced_while_the_job_runs() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let daemon = d.pid();
    let s = pooled_session(&mut c, 4).await;
    eventually("four spares", || zygote_children(daemon).len() == 4).await;
    let (id, pid) = start_pooled(&mut c, &s, "import time; time.sleep(600)").await;
    eventually("four spares beside the running job", || {
        let forks = zygote_children(daemon);
        forks.len() == 5 && forks.contains(&pid)
    })
    .await;
    kill_now(&mut c, &id).await;
    assert_eq!(wait(&mut c, &id).await.signal, 9);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zygote_that_cannot_fork_keeps_its_running_executions_and_refills_later() {
    let Some(limit) = PidsCgroup::new("elide-test-forkfail") else {
        eprintln!("skipped: no cgroup v1 pids hierarchy on this machine");
        return;
    };
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let daemon = d.pid();
    let s = pooled_session(&mut c, 1).await;
    assert_eq!(run_pooled(&mut c, &s, "py", "print(1)").await, "1\n");
    eventually("one spare", || zygote_children(daemon).len() == 1).await;
    let zygote = zygotes(daemon);
    let zygote_pid = nix::unistd::Pid::from_raw(zygote[0] as i32);
    // Stopped, the zygote does not yet know that its spare takes the next job, so the daemon
    // still believes a spare waits and sends the job after it to the socket, where it queues.
    nix::sys::signal::kill(zygote_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // The zygote alone in a cgroup that allows no further process: its forks fail (EAGAIN),
    // as they would on a node out of pids or memory.
    limit.set_max("max");
    limit.adopt(zygote[0]);
    limit.set_max("1");
    let e = c
        .start_execution(code_req(
            &s,
            "py",
            "import time; print('up', flush=True); time.sleep(60)",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(e.pooled, "the spare took it");
    let mut events = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let queued = {
        let mut c = d.client().await;
        let s = s.clone();
        tokio::spawn(async move {
            c.start_execution(code_req(&s, "py", "print('queued')"))
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!queued.is_finished(), "no spare is left to take the job");
    nix::sys::signal::kill(zygote_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    // Unable to fork a spare, the zygote hands the queued job back unrun, and it starts cold
    // at once instead of failing after the ready timeout (30 s).
    let queued = tokio::time::timeout(std::time::Duration::from_secs(20), queued)
        .await
        .expect("the queued start waited for a fork")
        .unwrap()
        .unwrap()
        .into_inner();
    assert!(!queued.pooled, "{queued:?}");
    let fallback = loop {
        let ev = events
            .message()
            .await
            .unwrap()
            .expect("the event stream ended");
        if ev.kind == pb::EventKind::PoolFallback as i32 && ev.execution_id == queued.id {
            break ev;
        }
    };
    assert!(fallback.message.contains("cannot fork"), "{fallback:?}");
    let out = output(&mut c, &queued.id, pb::OutputStream::Stdout).await;
    assert_eq!(wait(&mut c, &queued.id).await.exit_code, 0);
    assert_eq!(String::from_utf8_lossy(&out), "queued\n");
    // The spare that took the job asks for a replacement, which cannot be forked; the zygote
    // says so and lives on.
    eventually("the zygote reports it cannot fork a spare", || {
        d.log().contains("cannot fork a spare")
    })
    .await;
    assert_eq!(zygotes(daemon), zygote, "the zygote died");
    let got = execution(&mut c, &e.id).await;
    assert_eq!(got.state(), pb::ExecutionState::Running, "{got:?}");
    assert!(alive(e.pid));
    // With no spare left and none forkable, a start does not queue behind the zygote (it
    // would wait out the ready timeout): it runs cold.
    eventually("the daemon learns the zygote is out of spares", || {
        d.log().contains("no spare and cannot fork")
    })
    .await;
    let python = pool_status(&mut c, &s, "python").await;
    assert_eq!(python.state(), pb::PoolState::Empty, "{python:?}");
    assert!(python.detail.contains("cannot fork"), "{python:?}");
    let cold = c
        .start_execution(code_req(&s, "py", "print('cold')"))
        .await
        .unwrap()
        .into_inner();
    assert!(!cold.pooled);
    let out = output(&mut c, &cold.id, pb::OutputStream::Stdout).await;
    assert_eq!(wait(&mut c, &cold.id).await.exit_code, 0);
    assert_eq!(String::from_utf8_lossy(&out), "cold\n");
    // Once forks work again the zygote refills on its own, and the execution still runs.
    limit.set_max("max");
    eventually("a spare again", || zygote_children(daemon).len() == 2).await;
    assert!(alive(e.pid));
    assert_eq!(run_pooled(&mut c, &s, "py", "print(2)").await, "2\n");
    let python = pool_status(&mut c, &s, "python").await;
    assert_eq!(python.state(), pb::PoolState::Warm, "{python:?}");
    // The same starts as the session's executions say (run_pooled may have retried).
    let execs = executions_of(&mut c, &s).await;
    let pooled = execs.iter().filter(|e| e.pooled).count() as u64;
    assert!(pooled >= 3, "{execs:?}");
    assert_eq!(
        (python.pooled_starts, python.cold_starts),
        (pooled, execs.len() as u64 - pooled),
        "{execs:?}"
    );
    let stopped = c
        .stop_execution(pb::StopExecutionRequest {
            execution_id: e.id.clone(),
            signal: "SIGKILL".into(),
            grace: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.result.map(|r| r.signal), Some(9));
    drop(d);
}

/// Every path under `dir` (relative), sorted.
fn run_dir_entries(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            out.push(path.strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_executions_leave_no_zombie_or_leaked_worker() {
    let d = TestDaemon::start().await;
    let daemon = d.pid();
    let mut c = d.client().await;
    let s = pooled_session(&mut c, 2).await;
    let _ = run_pooled(&mut c, &s, "py", "pass").await;
    eventually("warm pool", || {
        zygotes(daemon).len() == 1
            && zygote_children(daemon).len() == 2
            && node_workers(daemon).len() == 2
    })
    .await;
    idle_node_workers(&mut c, &s, 2).await;
    // What the daemon holds with a warm pool and no execution: its open files, and what is in
    // its run dir (pool sockets and dirs; each execution's dir goes once it has ended).
    let fds_before = fd_count(daemon);
    let run_dir_before = run_dir_entries(&d.run_dir);
    let mut pooled = 0;
    // 4 clients in parallel, 250 executions each (python mostly, some javascript).
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut c = d.client().await;
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut pooled = 0;
            for i in 0..250 {
                let (lang, code) = if i % 25 == 0 {
                    ("js", format!("console.log({t}*1000+{i})"))
                } else {
                    ("py", format!("print({t}*1000+{i})"))
                };
                let e = c
                    .start_execution(code_req(&s, lang, &code))
                    .await
                    .unwrap()
                    .into_inner();
                let out = output(&mut c, &e.id, pb::OutputStream::Stdout).await;
                assert_eq!(String::from_utf8_lossy(&out), format!("{}\n", t * 1000 + i));
                assert_eq!(wait(&mut c, &e.id).await.exit_code, 0);
                pooled += e.pooled as u32;
            }
            pooled
        }));
    }
    for t in tasks {
        pooled += t.await.unwrap();
    }
    assert!(pooled > 500, "only {pooled} of 1000 executions were pooled");
    // Once the pool refilled, only the zygote, its two pre-forked spares and the idle workers
    // remain, none a zombie.
    eventually("only pool processes left", || {
        let d = descendants(daemon);
        d.len() == 5
            && zygotes(daemon).len() == 1
            && zygote_children(daemon).len() == 2
            && node_workers(daemon).len() == 2
    })
    .await;
    let zombies: Vec<_> = descendants(daemon)
        .into_iter()
        .filter(|(_, st, _)| *st == 'Z')
        .collect();
    assert!(zombies.is_empty(), "{zombies:?}");
    // No descriptor or file left per execution. A few fds legitimately come and go: the four
    // clients' connections close on the daemon's side a moment after they left, the
    // journal's file may be between compactions, the node workers' and zygote's replacements
    // each hold their sockets and pidfds, the runtime's blocking threads open and close
    // files. A leak of one per execution would be hundreds, so a slack of 16 still catches it.
    const FD_SLACK: usize = 16;
    let deadline = std::time::Instant::now() + DEADLINE;
    while fd_count(daemon) > fds_before + FD_SLACK && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let fds_after = fd_count(daemon);
    assert!(
        fds_after <= fds_before + FD_SLACK,
        "the daemon holds {fds_after} fds, {fds_before} before the executions: {:?}",
        std::fs::read_dir(format!("/proc/{daemon}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .collect::<Vec<_>>()
    );
    let deadline = std::time::Instant::now() + DEADLINE;
    while run_dir_entries(&d.run_dir) != run_dir_before && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        run_dir_entries(&d.run_dir),
        run_dir_before,
        "the run dir after the executions, and before"
    );
    c.close_session(pb::CloseSessionRequest {
        session_id: s,
        grace: None,
    })
    .await
    .unwrap();
    assert!(descendants(daemon).is_empty(), "{:?}", descendants(daemon));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_fallback_starts_cold_on_the_fifo_the_pooled_attempt_opened() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let daemon = d.pid();
    let s = pooled_session(&mut c, 1).await;
    let _ = run_pooled(&mut c, &s, "py", "print(1)").await;
    // The ended child may still await its reaping by the zygote (the daemon reports an exit as
    // soon as the child is gone, not when the zygote has reaped it).
    eventually("only the zygote's spare", || {
        zygote_children(daemon).len() == 1
    })
    .await;
    // Freeze the zygote and its spare: jobs pile up on its socket until it refuses more, and a
    // start refused there falls back cold after it already opened its sinks.
    let frozen: Vec<u32> = zygotes(daemon)
        .into_iter()
        .chain(zygote_children(daemon))
        .collect();
    assert_eq!(frozen.len(), 2, "zygote and spare");
    for p in &frozen {
        kill(Pid::from_raw(*p as i32), Signal::SIGSTOP).unwrap();
    }
    let mut queued = Vec::new();
    let mut refused = false;
    // Whether each start ran pooled, as it answers: a refused one answers once it started
    // cold, the accepted ones only when the zygote runs again.
    let (answered, mut answers) = tokio::sync::mpsc::unbounded_channel();
    // Large jobs (480 KB) fill the socket's send buffer (2 MiB, sized for the zygote's
    // largest job) in a few messages.
    let big: Vec<pb::EnvVar> = (0..4)
        .map(|i| pb::EnvVar {
            key: format!("BIG{i}").into_bytes(),
            value: vec![b'x'; 120_000],
        })
        .collect();
    for _ in 0..40 {
        let mut c2 = d.client().await;
        let mut req = code_req(&s, "py", "print('queued')");
        req.env.extend(big.iter().cloned());
        let tx = answered.clone();
        queued.push(tokio::spawn(async move {
            let e = c2.start_execution(req).await.unwrap().into_inner();
            let _ = tx.send(e.pooled);
            wait(&mut c2, &e.id).await.exit_code
        }));
        // A moment for the answers so far before the next job; one that comes later (a slow
        // cold start) is still read after the next.
        let moment = tokio::time::sleep(std::time::Duration::from_millis(100));
        tokio::pin!(moment);
        while !refused {
            tokio::select! {
                Some(pooled) = answers.recv() => refused = !pooled,
                _ = &mut moment => break,
            }
        }
        if refused {
            break;
        }
    }
    // Every start so far may still answer.
    while !refused {
        match tokio::time::timeout(DEADLINE, answers.recv()).await {
            Ok(Some(pooled)) => refused = !pooled,
            _ => break,
        }
    }
    assert!(refused, "the frozen zygote's socket never filled up");
    // The socket is full: this start opens its FIFO, is refused by the zygote, and must run
    // cold on the same open FIFO (a close would hand the reader its EOF before any output).
    let fifo = d.dir.path().join("late.fifo");
    let reader = fifo_reader(&fifo);
    let mut req = code_req(&s, "py", "print('cold on the same fifo')");
    req.env.extend(big);
    req.stdout = path_sink(&fifo);
    let e = c.start_execution(req).await.unwrap().into_inner();
    assert!(!e.pooled);
    assert_eq!(wait(&mut c, &e.id).await.exit_code, 0);
    let out = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out), "cold on the same fifo\n");
    for p in &frozen {
        kill(Pid::from_raw(*p as i32), Signal::SIGCONT).unwrap();
    }
    for q in queued {
        assert_eq!(q.await.unwrap(), 0);
    }
}

/// Runs `benches/<script>` with `args`; its output.
fn bench_script(script: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("python3")
        .arg(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("benches")
                .join(script),
        )
        .args(args)
        .output()
        .expect("python3")
}

/// Runs `benches/<script>` with `args`, which must succeed; its stdout.
fn bench_output(script: &str, args: &[&str]) -> String {
    let out = bench_script(script, args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `make bench-zygote` drives the real zygote over its protocol; it must keep speaking it.
#[test]
fn the_zygote_alone_bench_speaks_the_zygote_protocol() {
    let text = bench_output("zygote_alone.py", &["--jobs", "5"]);
    assert!(text.contains("5 jobs back to back"), "{text}");
    for phase in [
        "send -> ready",
        "ready -> noted",
        "noted -> exited",
        "ready -> exited",
        "exited -> report",
    ] {
        assert!(text.contains(phase), "{phase} missing: {text}");
    }
    // Children that ran a job made pages of their own.
    let children: f64 = text
        .lines()
        .find(|l| l.starts_with("pages made private per job"))
        .and_then(|l| l.split("children ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no children's pages: {text}"));
    assert!(children > 10.0, "{text}");
    // Idle snippets hold memory of their own, and end with the zygote when the bench closes it.
    let idle = bench_output("zygote_alone.py", &["--idle", "3", "--spares", "1"]);
    assert!(idle.contains("3 idle snippets"), "{idle}");
    let private: u64 = idle
        .split("private dirty memory (median): ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no private memory figure: {idle}"));
    assert!(private > 100, "{idle}");
    // Bad options are refused, naming them (a zygote without spares would run no job).
    for (bad, says) in [
        (["--spares", "0"], "--spares must be at least 1"),
        (
            ["--idle", "-1"],
            "--idle not negative, got --jobs 300 --idle -1",
        ),
        (
            ["--jobs", "0"],
            "--jobs must be at least 1 and --idle not negative, got --jobs 0 --idle 0",
        ),
    ] {
        let refused = bench_script("zygote_alone.py", &bad);
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{bad:?}");
        assert!(err.contains(says), "{bad:?}: {err}");
    }
}

#[test]
fn the_fork_floor_bench_measures_the_zygotes_module_set() {
    let text = bench_output("fork_floor.py", &["--rounds", "5", "--idle", "3"]);
    assert!(text.contains("5 rounds"), "{text}");
    // Every figure is a measurement: a child that forked and ran made pages private, and an
    // idle one holds memory.
    let figure = |prefix: &str, after: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} missing: {text}"));
        let rest = &line[line.find(after).unwrap_or_else(|| panic!("{line}")) + after.len()..];
        let number: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        number.parse().unwrap_or_else(|_| panic!("{line}"))
    };
    assert!(figure("bare", "minor faults") > 10.0, "{text}");
    assert!(
        figure("job", "minor faults") > figure("bare", "minor faults"),
        "{text}"
    );
    assert!(figure("job", "(parent + child)") > 0.0, "{text}");
    assert!(figure("idle", "/ N") > 0.1, "{text}");
    for bad in [["--rounds", "0"], ["--idle", "-1"]] {
        let refused = bench_script("fork_floor.py", &bad);
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{bad:?}");
        assert!(
            err.contains("--rounds must be at least 1 and --idle at least 0"),
            "{bad:?}: {err}"
        );
        assert!(
            err.contains(&format!(
                "got {}",
                if bad[0] == "--rounds" {
                    "0 and 50"
                } else {
                    "400 and -1"
                }
            )),
            "{bad:?}: {err}"
        );
    }
}

/// Starts `code` with `n` environment variables of 100 KB each; returns whether it was
/// pooled and the (name, length) pairs it printed.
async fn run_with_big_env(
    c: &mut Client,
    s: &str,
    lang: &str,
    code: &str,
    n: usize,
) -> (bool, String) {
    let mut req = code_req(s, lang, code);
    req.env = (0..n)
        .map(|i| pb::EnvVar {
            key: format!("BIG{i:02}").into_bytes(),
            value: vec![b'x'; 100_000],
        })
        .collect();
    let e = c.start_execution(req).await.unwrap().into_inner();
    let out = output(c, &e.id, pb::OutputStream::Stdout).await;
    let err = output(c, &e.id, pb::OutputStream::Stderr).await;
    let r = wait(c, &e.id).await;
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&err));
    (e.pooled, String::from_utf8_lossy(&out).trim().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_environment_too_big_for_the_zygote_starts_cold_whole_with_an_event() {
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = pooled_session(&mut c, 2).await;
    eventually("2 spares", || zygote_children(d.pid()).len() >= 2).await;
    let mut events = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let py = "import os\nprint(','.join(f'{k}={len(v)}' for k, v in sorted(os.environ.items()) if k.startswith('BIG')))";
    let expect = |n: usize| {
        (0..n)
            .map(|i| format!("BIG{i:02}=100000"))
            .collect::<Vec<_>>()
            .join(",")
    };
    // 300 KB fits one message to the zygote (more than a Unix socket's default send buffer,
    // which the daemon raises); 1.2 MB does not (the zygote reads at most 1 MiB), so that one
    // starts cold, and its environment still arrives whole.
    assert_eq!(
        run_with_big_env(&mut c, &s, "py", py, 3).await,
        (true, expect(3))
    );
    assert_eq!(
        run_with_big_env(&mut c, &s, "py", py, 12).await,
        (false, expect(12))
    );
    let ev = loop {
        let ev = tokio::time::timeout(DEADLINE, events.message())
            .await
            .expect("no fallback event")
            .unwrap()
            .expect("event stream ended");
        if ev.kind == pb::EventKind::PoolFallback as i32 {
            break ev;
        }
    };
    assert!(
        ev.message.starts_with("starting cold: the job is ")
            && ev
                .message
                .contains("more than one message to the python zygote carries"),
        "{ev:?}"
    );
    // Node workers read their job from a stream: 1.2 MB of environment stays pooled.
    idle_node_workers(&mut c, &s, 2).await;
    let js = "console.log(Object.keys(process.env).filter(k => k.startsWith('BIG')).sort().map(k => `${k}=${process.env[k].length}`).join(','))";
    assert_eq!(
        run_with_big_env(&mut c, &s, "js", js, 12).await,
        (true, expect(12))
    );
}

/// Where a pooled execution's stdout goes in [`pooled_node_output_reaches_every_sink_whole`].
enum Sink {
    /// A FIFO whose reader takes 64 KiB, then pauses: slower than the snippet writes.
    SlowFifo,
    /// A FIFO whose reader leaves after the first bytes.
    BrokenFifo,
    File,
    DevNull,
}

#[tokio::test(flavor = "multi_thread")]
async fn pooled_node_output_reaches_every_sink_whole() {
    use std::io::Read;
    let d = TestDaemon::start().await;
    let mut c = d.client().await;
    let s = pooled_session(&mut c, 1).await;
    // 4 MiB in 64 KiB writes, each write of one digit, then a line on stderr.
    let code = "for (let i = 0; i < 64; i++) process.stdout.write(String(i % 10).repeat(65536)); console.error('done')";
    let want: Vec<u8> = (0..64u8)
        .flat_map(|i| std::iter::repeat_n(b'0' + i % 10, 65536))
        .collect();
    for (n, sink) in [Sink::SlowFifo, Sink::File, Sink::BrokenFifo, Sink::DevNull]
        .into_iter()
        .enumerate()
    {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let path = d.dir.path().join(format!("out-{n}"));
            let _ = std::fs::remove_file(&path);
            let reader = match sink {
                Sink::SlowFifo | Sink::BrokenFifo => {
                    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                        .unwrap();
                    let (p, slow) = (path.clone(), matches!(sink, Sink::SlowFifo));
                    Some(std::thread::spawn(move || {
                        let mut f = std::fs::File::open(&p).unwrap();
                        let mut out = Vec::new();
                        let mut chunk = vec![0u8; 64 << 10];
                        loop {
                            let k = f.read(&mut chunk).unwrap();
                            if k == 0 || !slow {
                                // The broken reader leaves here, with its first bytes.
                                out.extend_from_slice(&chunk[..k]);
                                return out;
                            }
                            out.extend_from_slice(&chunk[..k]);
                            std::thread::sleep(std::time::Duration::from_millis(2));
                        }
                    }))
                }
                Sink::File | Sink::DevNull => None,
            };
            let mut req = code_req(&s, "js", code);
            req.stdout = match sink {
                Sink::DevNull => path_sink(std::path::Path::new("/dev/null")),
                _ => path_sink(&path),
            };
            let e = c.start_execution(req).await.unwrap().into_inner();
            let err = output(&mut c, &e.id, pb::OutputStream::Stderr).await;
            let r = wait(&mut c, &e.id).await;
            let what = format!("sink {n}, pooled {}", e.pooled);
            assert_eq!(r.exit_code, 0, "{what}");
            assert_eq!(String::from_utf8_lossy(&err), "done\n", "{what}");
            let got = match reader {
                Some(r) => tokio::task::spawn_blocking(move || r.join().unwrap())
                    .await
                    .unwrap(),
                None if matches!(sink, Sink::File) => std::fs::read(&path).unwrap(),
                None => Vec::new(),
            };
            match sink {
                Sink::SlowFifo | Sink::File => {
                    assert!(got == want, "{what}: {} of {} bytes", got.len(), want.len())
                }
                Sink::BrokenFifo => assert!(
                    !got.is_empty() && want.starts_with(&got),
                    "{what}: {} bytes",
                    got.len()
                ),
                Sink::DevNull => {}
            }
            if e.pooled {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: never pooled");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// A node worker lost at the hand-over (here a stand-in for node whose worker closes its job
/// socket and lives on) sends the start cold on the output it had already opened: Nomad's
/// logmon, reading the FIFO until EOF, sees the one stream with all the output, not an EOF
/// and then a FIFO nobody reads.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_worker_lost_at_the_hand_over_falls_back_cold_on_the_same_fifos() {
    let dir = tempfile::tempdir().unwrap();
    let real = std::process::Command::new("node")
        .args(["-e", "console.log(process.execPath)"])
        .output()
        .expect("node");
    let real = String::from_utf8_lossy(&real.stdout).trim().to_string();
    let fake = dir.path().join("fake-node");
    // Discovery asks for execPath (which becomes the runtime's command: this script's path);
    // a worker is `-e` with the worker's source; a cold start runs a script file.
    write_script(
        &fake,
        &format!(
            "#!/bin/sh\n\
             if [ \"$2\" = 'console.log(process.execPath);console.log(process.version)' ]; then\n\
               echo \"$0\"; exec {real} -e 'console.log(process.version)'; fi\n\
             if [ \"$1\" = \"-e\" ]; then exec 0<&-; exec sleep 600; fi\n\
             exec {real} \"$@\"\n"
        ),
    );
    let d = TestDaemon::start_with_config(
        dir.path(),
        &format!(
            "[runtimes.javascript]\ncommand = {:?}\n",
            fake.to_str().unwrap()
        ),
    )
    .await;
    let mut c = d.client().await;
    let s = pooled_session(&mut c, 1).await;
    let mut events = events_of(&mut c, &s).await;
    // The stand-in's worker is idle once it runs, and lost once its shell closed the job socket.
    eventually("a stand-in worker with its job socket closed", || {
        all_descendants(d.pid()).iter().any(|(pid, _, cmd)| {
            cmd.contains("sleep 600")
                && !std::path::Path::new(&format!("/proc/{pid}/fd/0")).exists()
        })
    })
    .await;
    let out = d.path("out.fifo");
    let reader = fifo_reader(&out);
    let mut r = code_req(&s, "js", "console.log('hi')");
    r.stdout = path_sink(&out);
    let e = c.start_execution(r).await.unwrap().into_inner();
    let result = wait(&mut c, &e.id).await;
    assert_eq!(result.exit_code, 0, "{result:?}");
    assert!(!e.pooled, "the stand-in's worker ran a job");
    let fallback = next_event(&mut events, pb::EventKind::PoolFallback, &e.id).await;
    assert!(
        fallback.message.contains("died before taking the job"),
        "{fallback:?}"
    );
    assert_eq!(String::from_utf8(reader.join().unwrap()).unwrap(), "hi\n");
}
