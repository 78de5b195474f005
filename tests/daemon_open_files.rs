//! The daemon's open-file limit: started with a low soft limit (a service manager's default,
//! systemd's 1,024, here scaled down), the daemon raises its own to the hard limit, so more
//! executions run at once than the low limit has descriptors for, while every snippet, pooled
//! or cold, starts with the soft limit the daemon was started with (node then raises its own to
//! the hard limit, as a cold `node` does).

#[path = "daemon_support/mod.rs"]
mod daemon_support;

use std::time::{Duration, Instant};

use daemon_support::*;
use elide_task_driver::proto::elide::daemon::v1alpha1 as pb;

const SOFT: u64 = 128;
/// Pooled python executions held running at once: each holds a few of the daemon's
/// descriptors (pidfd, output pipes, cgroup event file), well past `SOFT` in all.
const PYTHON_AT_ONCE: usize = 60;

/// `Max open files` of `pid`, soft and hard.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let n: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (n[0], n[1])
}

/// A snippet that waits for `go` to exist, then prints its own soft open-file limit.
fn snippet(language: &str, go: &std::path::Path) -> String {
    let go = go.display();
    match language {
        "python" => format!(
            "import os, time\n\
             while not os.path.exists({go:?}):\n    time.sleep(0.02)\n\
             print([l.split()[3] for l in open('/proc/self/limits') if l.startswith('Max open files')][0])\n"
        ),
        _ => format!(
            "const fs = require('fs');\n\
             const t = setInterval(() => {{\n\
               if (!fs.existsSync({go:?})) return;\n\
               clearInterval(t);\n\
               const line = fs.readFileSync('/proc/self/limits', 'utf8').split('\\n')\n\
                 .find((l) => l.startsWith('Max open files'));\n\
               console.log(line.split(/\\s+/)[3]);\n\
             }}, 20);\n"
        ),
    }
}

/// Starts `code` in `session` until one start ran pooled (a new session's pool warms up in the
/// background) or, for a session without a pool, once; every execution started, in `started`.
async fn start_until_pooled(
    c: &mut Client,
    session: &str,
    language: &'static str,
    code: &str,
    want_pooled: bool,
    started: &mut Vec<(&'static str, String, bool)>,
) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let e = c
            .start_execution(code_req(session, language, code))
            .await
            .unwrap_or_else(|s| panic!("{language} start: {s}"))
            .into_inner();
        started.push((language, e.id.clone(), e.pooled));
        if e.pooled || !want_pooled {
            assert_eq!(e.pooled, want_pooled, "{language}: {e:?}");
            return;
        }
        assert!(Instant::now() < deadline, "{language}: no start ran pooled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_soft_limit_is_raised_for_the_daemon_and_kept_for_its_snippets() {
    let (_, hard) = open_file_limits(std::process::id());
    assert!(
        hard >= 8 * SOFT,
        "this test needs a hard open-file limit of at least {}, found {hard}",
        8 * SOFT
    );
    let d = TestDaemon::start_with_open_file_limit(SOFT).await;
    let (soft_now, hard_now) = open_file_limits(d.pid());
    assert_eq!(hard_now, hard);
    assert!(
        soft_now > SOFT && soft_now <= hard_now,
        "the daemon's soft limit is {soft_now} (started with {SOFT}, hard {hard_now})"
    );
    let log = d.log();
    assert!(
        log.contains("raised the open-file limit") && log.contains(&format!("get {SOFT} back")),
        "{log}"
    );

    let mut c = d.client().await;
    let intrinsics = ["env", "io", "net"];
    let pooled = session_with_pool(&mut c, &intrinsics, 4).await;
    let cold = session(&mut c, &intrinsics).await;
    let go = d.path("go");
    let mut started = Vec::new();
    for language in ["python", "javascript"] {
        let code = snippet(language, &go);
        start_until_pooled(&mut c, &pooled, language, &code, true, &mut started).await;
        start_until_pooled(&mut c, &cold, language, &code, false, &mut started).await;
    }
    let code = snippet("python", &go);
    for _ in 0..PYTHON_AT_ONCE {
        let e = c
            .start_execution(code_req(&pooled, "python", &code))
            .await
            .unwrap_or_else(|s| panic!("python start: {s}"))
            .into_inner();
        started.push(("python", e.id, e.pooled));
    }
    // Every execution is running, waiting for `go`: the daemon holds more descriptors than
    // the limit it was started with would have let it open.
    let held = fd_count(d.pid());
    assert!(held > SOFT as usize, "the daemon holds only {held} fds");

    std::fs::write(&go, b"").expect("go");
    for (language, id, was_pooled) in &started {
        let result = wait(&mut c, id).await;
        let out = output(&mut c, id, pb::OutputStream::Stdout).await;
        let err = output(&mut c, id, pb::OutputStream::Stderr).await;
        assert_eq!(
            (result.exit_code, String::from_utf8_lossy(&err).as_ref()),
            (0, ""),
            "{language} {id} (pooled: {was_pooled})"
        );
        // Node raises its own soft limit to the hard one at start, cold or pooled alike.
        let expected = if *language == "python" { SOFT } else { hard };
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("{expected}\n"),
            "{language} {id} (pooled: {was_pooled})"
        );
    }
}

/// A daemon whose hard open-file limit is too low for the executions asked of it refuses the
/// start it has no descriptors for as retryable (`UNAVAILABLE`, naming the cause), not as an
/// internal error or a bad request, and serves again once executions end: no panic, no hung
/// call, and the executions that did start run to their end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_out_of_descriptors_is_refused_as_retryable_and_the_daemon_recovers() {
    out_of_descriptors_and_back(0).await;
}

/// The same with warm pools (python zygote, node workers) in the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_start_out_of_descriptors_is_refused_as_retryable_and_the_daemon_recovers() {
    out_of_descriptors_and_back(4).await;
}

async fn out_of_descriptors_and_back(pool: u32) {
    const LIMIT: u64 = 64;
    let d = TestDaemon::start_with_open_file_limits(LIMIT, Some(LIMIT)).await;
    assert_eq!(open_file_limits(d.pid()), (LIMIT, LIMIT));
    let log = d.log();
    assert!(
        log.contains(&format!(
            "the open-file limit allows about {} concurrent executions",
            LIMIT / 4
        )) && log.contains("LimitNOFILE="),
        "{log}"
    );
    let mut c = d.client().await;
    let session = session_with_pool(&mut c, &["env", "io", "net"], pool).await;
    let go = d.path("go");
    let code = snippet("python", &go);
    // The plugin's own client, so what it makes of the refusal is checked too.
    let plugin_side =
        elide_task_driver::daemon_client::DaemonClient::connect(&d.socket, Duration::from_secs(20))
            .await
            .expect("connect");
    let mut started = Vec::new();
    let refused = loop {
        assert!(
            started.len() < LIMIT as usize,
            "{} executions started under an open-file limit of {LIMIT}",
            started.len()
        );
        match plugin_side
            .start_execution(code_req(&session, "python", &code), Duration::from_secs(20))
            .await
        {
            Ok(e) => started.push(e.id),
            Err(e) => break e,
        }
    };
    assert!(!started.is_empty(), "not one execution started");
    assert_eq!(
        refused.code(),
        Some(tonic::Code::Unavailable),
        "{refused:?}"
    );
    assert!(
        daemon_support::refused_for_want_of_descriptors(&refused.to_string()),
        "{refused:?}"
    );
    // An answer over a working connection: the plugin keeps it rather than reconnecting to a
    // daemon that cannot accept a new one now.
    assert!(!refused.is_unreachable(), "{refused:?}");

    std::fs::write(&go, b"").expect("go");
    for id in &started {
        assert_eq!(wait(&mut c, id).await.exit_code, 0, "{id}");
        let out = output(&mut c, id, pb::OutputStream::Stdout).await;
        assert_eq!(String::from_utf8_lossy(&out), format!("{LIMIT}\n"), "{id}");
    }
    // The descriptors of ended executions are given back: the same start works again.
    let (result, out, err) = run(&mut c, code_req(&session, "python", &code)).await;
    assert_eq!(
        (result.exit_code, out, err),
        (0, format!("{LIMIT}\n"), String::new())
    );
}

/// A client that connects while the daemon has no descriptor left to accept it with waits in
/// the listen backlog, and is served once descriptors are free again. Meanwhile the daemon
/// does not spin on the failing `accept` (which would take a core from the executions it
/// runs) and tells the operator why new clients wait, and when they no longer do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_arriving_at_the_descriptor_limit_waits_without_spinning_the_daemon() {
    const LIMIT: u64 = 64;
    let d = TestDaemon::start_with_open_file_limits(LIMIT, Some(LIMIT)).await;
    let mut c = d.client().await;
    let _ = session(&mut c, &["env"]).await;

    // Connections the daemon accepts but that never speak hold one descriptor each, until
    // the daemon holds all it may.
    let mut held = Vec::new();
    while fd_count(d.pid()) < LIMIT as usize {
        assert!(
            held.len() < LIMIT as usize,
            "the daemon never reached its limit"
        );
        held.push(std::os::unix::net::UnixStream::connect(d.path("d.sock")).expect("connect"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A few more wait in the listen backlog ahead of the client below, in case the daemon
    // counted a descriptor it held only for a moment (reading a file in /proc).
    for _ in 0..4 {
        held.push(std::os::unix::net::UnixStream::connect(d.path("d.sock")).expect("connect"));
    }
    // This one stays in the listen backlog: connected, never accepted.
    let mut late = d.client().await;
    let late_call =
        tokio::spawn(async move { late.list_sessions(pb::ListSessionsRequest {}).await });

    let before = cpu_ticks(d.pid());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = cpu_ticks(d.pid()) - before;
    assert!(
        spent < 20,
        "the daemon used {spent} ticks of CPU in 1 s while it could accept no client"
    );
    assert!(
        !late_call.is_finished(),
        "a client was served past the limit"
    );
    let log = d.log();
    assert!(
        log.contains("cannot accept new clients") && log.contains("Too many open files"),
        "{log}"
    );

    drop(held);
    let listed = tokio::time::timeout(DEADLINE, late_call)
        .await
        .expect("the waiting client was never served")
        .expect("join")
        .expect("list sessions");
    assert_eq!(listed.into_inner().sessions.len(), 1);
    eventually("the daemon says it accepts clients again", || {
        d.log().contains("accepting new clients again")
    })
    .await;
}

/// The other side of the refusal above: a daemon that dies under a connected client is
/// unreachable to the plugin's client (it drops the connection and makes a new one), whatever
/// code the failed call shows.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_gone_under_a_connected_client_is_unreachable() {
    let mut d = TestDaemon::start().await;
    let client =
        elide_task_driver::daemon_client::DaemonClient::connect(&d.socket, Duration::from_secs(20))
            .await
            .expect("connect");
    client.daemon_info().await.expect("the daemon answers");
    d.kill9();
    let gone = client
        .daemon_info()
        .await
        .expect_err("a killed daemon answers nothing");
    assert!(gone.is_unreachable(), "{gone:?}");
}
