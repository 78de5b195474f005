//! How the plugin treats what it finds on `daemon_socket`: a daemon is started only where none
//! is, never next to one that is there but does not serve it.

#[path = "daemon_support/mod.rs"]
mod daemon_support;
mod lifecycle_support;
mod support;

use elide_task_driver::proto::hashicorp::nomad::plugins::drivers::proto::TaskHandle;
use elide_task_driver::proto::hashicorp::nomad::plugins::drivers::proto::fingerprint_response::HealthState;
use lifecycle_support::{Alloc, AutoDaemon, DEADLINE, Plugin, daemons_on, plugin_config};
use serde_json::json;
use support::fingerprint_until;

/// A listener on `socket` that accepts every connection and never answers (a hung daemon, or
/// not a daemon at all); abort the task to close it.
fn hung_listener(socket: &std::path::Path) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        let mut conns = Vec::new();
        loop {
            if let Ok((c, _)) = listener.accept().await {
                conns.push(c);
            }
        }
    })
}

/// Something listens on the socket and accepts, but never answers (a hung daemon, or not a
/// daemon at all): the plugin reports it in its fingerprint and fails StartTask naming it, and
/// starts no second daemon, which would only stop at the first's socket and hide the cause.
#[tokio::test]
async fn a_socket_that_accepts_but_never_answers_is_reported_not_replaced() {
    let root = tempfile::Builder::new()
        .prefix("hung")
        .tempdir_in("/tmp")
        .unwrap();
    let auto = AutoDaemon::new(root.path());
    let held = hung_listener(&auto.socket);
    let plugin = Plugin::launch(&plugin_config(&auto.socket, Some(&auto))).await;
    let mut fp = plugin.client.fingerprint().await;
    let m = fingerprint_until(&mut fp, DEADLINE, |m| {
        m.health == HealthState::Unhealthy as i32
    })
    .await;
    assert!(
        m.health_description.contains("does not answer")
            && !m.health_description.contains("start it"),
        "{}",
        m.health_description
    );
    let alloc = Alloc::new(root.path());
    let t = alloc.task("t");
    let e = plugin
        .start_json(&t, json!({"language": "python", "code": "print(1)"}))
        .await
        .unwrap_err();
    assert!(e.message().contains("does not answer"), "{e:?}");
    assert!(
        daemons_on(&auto.socket).is_empty(),
        "a daemon was started next to the listener"
    );
    assert!(
        !auto.log.exists(),
        "an auto-start was tried: {:?}",
        std::fs::read_to_string(&auto.log)
    );
    plugin.alive().await;
    held.abort();
}

/// A task of `plugin` that sleeps for 10 minutes, started in an alloc dir of `daemon`'s.
async fn sleeping_task(
    daemon: &daemon_support::TestDaemon,
    plugin: &Plugin,
) -> (lifecycle_support::Task, TaskHandle) {
    let t = Alloc::new(&daemon.path("nomad")).task("t");
    let h = plugin
        .start_json(
            &t,
            json!({"language": "python", "code": "import time\ntime.sleep(600)"}),
        )
        .await
        .expect("StartTask");
    (t, h)
}

/// DestroyTask while the daemon cannot answer (stopped here with SIGSTOP) forgets the task at
/// once, as Nomad expects (it ignores the error and never calls again), and kills it in the
/// background once the daemon answers: nothing keeps running unseen.
#[tokio::test]
async fn a_task_destroyed_while_the_daemon_hangs_is_killed_once_it_answers() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let daemon = daemon_support::TestDaemon::start().await;
    let plugin = Plugin::launch(&plugin_config(&daemon.socket, None)).await;
    let (t, h) = sleeping_task(&daemon, &plugin).await;
    let pid = lifecycle_support::handle_pid(&h);
    assert!(daemon_support::alive(pid));
    let daemon_pid = Pid::from_raw(daemon.pid() as i32);
    kill(daemon_pid, Signal::SIGSTOP).unwrap();
    let destroyed = plugin.destroy(&t.id, true).await;
    kill(daemon_pid, Signal::SIGCONT).unwrap();
    destroyed.expect("DestroyTask answers OK although the daemon hangs");
    let e = plugin
        .driver()
        .wait_task(
            elide_task_driver::proto::hashicorp::nomad::plugins::drivers::proto::WaitTaskRequest {
                task_id: t.id.clone(),
            },
        )
        .await
        .expect_err("a destroyed task is forgotten");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    daemon_support::eventually("the destroyed task's process is killed", || {
        !daemon_support::alive(pid)
    })
    .await;
    plugin.alive().await;
}

/// A daemon that stops answering for a while (SIGSTOP here, for longer than the connection's
/// keepalive) but is there still does not make its running tasks lost: Nomad would start them
/// again and kill the originals. Once it answers again, the task's end is reported as usual.
#[tokio::test]
async fn a_daemon_that_hangs_for_a_while_does_not_lose_its_running_tasks() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let daemon = daemon_support::TestDaemon::start().await;
    let plugin = Plugin::launch(&plugin_config(&daemon.socket, None)).await;
    let (t, h) = sleeping_task(&daemon, &plugin).await;
    let pid = lifecycle_support::handle_pid(&h);
    let daemon_pid = Pid::from_raw(daemon.pid() as i32);
    kill(daemon_pid, Signal::SIGSTOP).unwrap();
    // Keepalive (5 s ping, 5 s to answer) breaks the plugin's wait, then its look at the
    // daemon times out, more than once.
    let hung = plugin.wait_within(&t.id, std::time::Duration::from_secs(16));
    let early = tokio::time::timeout(std::time::Duration::from_secs(15), hung).await;
    kill(daemon_pid, Signal::SIGCONT).unwrap();
    assert!(
        early.is_err(),
        "WaitTask answered while the daemon hung: {early:?}"
    );
    assert!(daemon_support::alive(pid), "the task was killed");
    plugin
        .stop(&t.id, "SIGTERM", std::time::Duration::from_secs(5))
        .await
        .expect("StopTask");
    let w = plugin.wait(&t.id).await;
    let r = w.result.expect("a result");
    assert_eq!(r.signal, 15, "{w:?}");
    assert!(w.err.is_empty(), "{w:?}");
}

/// A daemon that keeps failing to start gives the same health description at every attempt
/// (its last words without their time): each change would be a node update and a node event in
/// Nomad, every back-off period, for as long as it fails.
#[tokio::test]
async fn a_daemon_that_keeps_failing_to_start_gives_one_stable_health_description() {
    let root = tempfile::Builder::new()
        .prefix("fail")
        .tempdir_in("/tmp")
        .unwrap();
    let fake = root.path().join("elide-daemon");
    daemon_support::write_script(
        &fake,
        "#!/bin/sh\necho \"$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)  INFO starting, pid $$\"\n\
         echo \"$(date -u +%Y-%m-%dT%H:%M:%S.%NZ) ERROR cannot open the state dir\"\nexit 1\n",
    );
    let socket = root.path().join("d.sock");
    let mut config = plugin_config(&socket, None);
    config["daemon"] = json!([{
        "auto_start": true,
        "path": fake.display().to_string(),
        "log_file": root.path().join("daemon.log").display().to_string(),
    }]);
    let plugin = Plugin::launch(&config).await;
    let mut fp = plugin.client.fingerprint().await;
    let mut seen = Vec::new();
    // Three failed starts at least (back-off 1 s, 2 s, 4 s), one fingerprint a second.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(9);
    while std::time::Instant::now() < until {
        let m = fingerprint_until(&mut fp, DEADLINE, |_| true).await;
        if m.health_description.contains("exited during start-up") {
            seen.push(m.health_description);
        }
    }
    let log = std::fs::read_to_string(root.path().join("daemon.log")).unwrap();
    assert!(log.matches("starting").count() >= 2, "{log}");
    seen.dedup();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    let last_time = log
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().next())
        .unwrap();
    assert!(
        seen[0].contains("ERROR cannot open the state dir") && !seen[0].contains(last_time),
        "{}",
        seen[0]
    );
}

/// RecoverTask while the daemon does not answer for a few seconds (a node busy with an agent
/// restart): the plugin asks again instead of failing the recovery, which would have Nomad
/// start the task again and kill the running original.
#[tokio::test]
async fn a_recovery_waits_out_a_daemon_that_is_slow_to_answer() {
    use elide_task_driver::proto::hashicorp::nomad::plugins::drivers::proto as pb;
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let daemon = daemon_support::TestDaemon::start().await;
    let config = plugin_config(&daemon.socket, None);
    let plugin = Plugin::launch(&config).await;
    let (t, h) = sleeping_task(&daemon, &plugin).await;
    let pid = lifecycle_support::handle_pid(&h);
    // The agent restarts: the plugin is SIGKILLed, a new one recovers the task.
    let mut plugin = plugin;
    plugin.client.process.child.kill().unwrap();
    plugin.client.process.child.wait().unwrap();
    let plugin = Plugin::launch(&config).await;
    let daemon_pid = Pid::from_raw(daemon.pid() as i32);
    kill(daemon_pid, Signal::SIGSTOP).unwrap();
    let mut d = plugin.driver();
    let recovery = tokio::spawn(async move {
        d.recover_task(pb::RecoverTaskRequest {
            task_id: String::new(),
            handle: Some(h),
        })
        .await
    });
    // Past two calls' deadlines (5 s each: the look for leftovers, then the execution's), so
    // the first attempt fails.
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    kill(daemon_pid, Signal::SIGCONT).unwrap();
    tokio::time::timeout(DEADLINE, recovery)
        .await
        .expect("RecoverTask hung")
        .unwrap()
        .expect("RecoverTask succeeds once the daemon answers");
    assert!(daemon_support::alive(pid), "the task was killed");
    plugin
        .stop(&t.id, "SIGKILL", std::time::Duration::ZERO)
        .await
        .expect("StopTask of the recovered task");
    assert_eq!(plugin.wait(&t.id).await.result.unwrap().signal, 9);
}

/// The first fingerprint does not wait for a slow auto-start (up to `daemon.start_timeout`):
/// Nomad waits at most 50 s for it before it updates the node without the driver. A daemon
/// still starting is reported unhealthy, saying so, within the probe's 10 s.
#[tokio::test]
async fn the_first_fingerprint_does_not_wait_for_a_slow_auto_start() {
    let root = tempfile::Builder::new()
        .prefix("slow")
        .tempdir_in("/tmp")
        .unwrap();
    let fake = root.path().join("elide-daemon");
    daemon_support::write_script(&fake, "#!/bin/sh\nexec sleep 120\n");
    let socket = root.path().join("d.sock");
    let mut config = plugin_config(&socket, None);
    config["daemon"] = json!([{
        "auto_start": true,
        "path": fake.display().to_string(),
        "start_timeout": "90s",
        "log_file": root.path().join("daemon.log").display().to_string(),
    }]);
    let plugin = Plugin::launch(&config).await;
    let asked = std::time::Instant::now();
    let mut fp = plugin.client.fingerprint().await;
    let m = fingerprint_until(&mut fp, DEADLINE, |m| {
        m.health == HealthState::Unhealthy as i32
    })
    .await;
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(30),
        "the first unhealthy fingerprint took {:?}",
        asked.elapsed()
    );
    assert!(
        m.health_description.contains("auto-start may be under way"),
        "{}",
        m.health_description
    );
    drop(plugin);
    let _ = std::process::Command::new("pkill")
        .args(["-f", &fake.display().to_string()])
        .status();
}

/// A task (root, without `io`; with `net` it finds every bound socket path in
/// /proc/self/net/unix) cannot drive the plugin through its go-plugin socket either: that would
/// let it stop or exec into every other task. The plugin closes such connections unanswered,
/// pooled or cold, and keeps serving Nomad.
#[tokio::test]
async fn a_task_cannot_use_the_plugins_socket() {
    let daemon = daemon_support::TestDaemon::start().await;
    let alloc = Alloc::new(&daemon.path("nomad"));
    for pool in [0, 2] {
        let mut config = plugin_config(&daemon.socket, None);
        config["session_config"] =
            json!([{ "context_pool_size": pool, "enabled_intrinsics": ["env", "net"] }]);
        let plugin = Plugin::launch(&config).await;
        let socket = std::path::PathBuf::from(plugin.client.handshake.address());
        let code = daemon_support::greet_snippet(&socket);
        // The pool may still be warming: the first tasks can run cold, which is checked too.
        for i in 0..3 {
            let t = alloc.task(&format!("greet-{pool}-{i}"));
            plugin
                .start_json(&t, json!({"language": "python", "code": code}))
                .await
                .expect("StartTask");
            let w = plugin.wait(&t.id).await;
            assert_eq!(w.result.unwrap().exit_code, 0, "{w:?}");
            assert_eq!(t.stdout.wait_eof().await, "refused\n", "pool {pool}");
        }
        plugin.alive().await;
    }
}

/// Callers that queue while one attempt to reach a daemon that is there but hangs takes its
/// 5 s do not each wait out an attempt of their own after it: they share its answer. Six
/// StartTasks at once end together, not one after the other (6 × 5 s).
#[tokio::test]
async fn callers_queued_behind_a_hung_daemon_share_one_attempt() {
    let root = tempfile::Builder::new()
        .prefix("queue")
        .tempdir_in("/tmp")
        .unwrap();
    let socket = root.path().join("d.sock");
    let held = hung_listener(&socket);
    let plugin = Plugin::launch(&plugin_config(&socket, None)).await;
    let alloc = Alloc::new(root.path());
    let tasks: Vec<_> = (0..6).map(|i| alloc.task(&format!("t{i}"))).collect();
    let asked = std::time::Instant::now();
    let starts = futures::future::join_all(
        tasks
            .iter()
            .map(|t| plugin.start_json(t, json!({"language": "python", "code": "print(1)"}))),
    )
    .await;
    for s in starts {
        let e = s.expect_err("no daemon answers");
        assert!(e.message().contains("does not answer"), "{e:?}");
    }
    // One attempt (5 s), perhaps behind the fingerprint's own, and the queue's shared answer;
    // one after the other they took 30 s and more.
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(20),
        "six queued StartTasks took {:?}",
        asked.elapsed()
    );
    held.abort();
}
