//! Faults: the plugin SIGKILLed under running tasks (recovery from the handle alone), the
//! daemon SIGKILLed under running tasks, a daemon that cannot be auto-started, and a daemon
//! out of descriptors.

#[path = "daemon_support/mod.rs"]
mod daemon_support;
mod lifecycle_support;
mod support;

use std::time::{Duration, Instant};

use daemon_support::TestDaemon;
use elide_task_driver::proto::hashicorp::nomad::plugins::drivers::proto::{
    self as pb, fingerprint_response::HealthState,
};
use lifecycle_support::{
    Alloc, AutoDaemon, DEADLINE, Plugin, alive, daemon_pid, daemons_on, eventually, handle_pid,
    plugin_config,
};
use prost::Message;
use serde_json::json;
use support::fingerprint_until;

const COUNTER: &str =
    "import time\ni = 0\nwhile True:\n    print(i, flush=True)\n    i += 1\n    time.sleep(0.05)\n";

fn assert_contiguous(text: &str, what: &str) -> usize {
    let nums: Vec<u64> = text
        .lines()
        .map(|l| {
            l.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{what}: bad line {l:?}"))
        })
        .collect();
    for (i, n) in nums.iter().enumerate() {
        assert_eq!(*n, i as u64, "{what}: gap or duplicate at line {i}");
    }
    nums.len()
}

fn proc_stat_field(pid: u32, idx: usize) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit(')').next()?;
    rest.split_whitespace().nth(idx).map(str::to_string)
}

/// A plugin whose config lets it auto-start a daemon of its own, in a fresh temp dir: (the dir,
/// the daemon's settings, the plugin config, the launched plugin).
/// A short scratch dir, and a daemon the plugin may auto-start there.
fn scratch_daemon() -> (tempfile::TempDir, AutoDaemon) {
    let root = tempfile::Builder::new()
        .prefix("er")
        .tempdir_in("/tmp")
        .unwrap();
    let auto = AutoDaemon::new(root.path());
    (root, auto)
}

async fn plugin_with_auto_daemon() -> (tempfile::TempDir, AutoDaemon, serde_json::Value, Plugin) {
    let (root, auto) = scratch_daemon();
    let config = plugin_config(&auto.socket, Some(&auto));
    let plugin = Plugin::launch(&config).await;
    (root, auto, config, plugin)
}

/// A python task that sleeps for ten minutes.
fn sleeper() -> serde_json::Value {
    json!({"language": "python", "code": "import time\ntime.sleep(600)"})
}

/// Task `before` of the allocation laid out afresh, as Nomad does for a task it starts again:
/// a new task id, new logmon readers.
fn task_again(alloc: &Alloc, before: &lifecycle_support::Task) -> lifecycle_support::Task {
    for fifo in [&before.stdout_path, &before.stderr_path] {
        std::fs::remove_file(fifo).unwrap();
    }
    let again = alloc.task(&before.name);
    assert_ne!(again.id, before.id);
    again
}

/// Kills and destroys the tasks `ids` (a test's cleanup).
async fn kill_and_destroy(plugin: &Plugin, ids: &[&String]) {
    for id in ids {
        let _ = plugin.stop(id, "SIGKILL", Duration::ZERO).await;
        let _ = plugin.destroy(id, true).await;
    }
}

#[tokio::test]
async fn plugin_killed_under_ten_tasks_recovers_them_from_the_handles_alone() {
    let (root, auto, config, plugin) = plugin_with_auto_daemon().await;
    // The plugin auto-started the daemon: detached, own session, stdio away from the plugin.
    eventually("auto-started daemon answers", || auto.socket.exists()).await;
    let dpid = daemon_pid(&auto.socket).await.expect("daemon answers");
    assert_eq!(
        proc_stat_field(dpid, 3).as_deref(),
        Some(dpid.to_string().as_str()),
        "own session (setsid)"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{dpid}/fd/0")).unwrap(),
        std::path::PathBuf::from("/dev/null")
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{dpid}/fd/2")).unwrap(),
        auto.log
    );

    let alloc = Alloc::new(root.path());
    let mut tasks = Vec::new();
    for i in 0..10 {
        let t = alloc.task(&format!("c{i}"));
        let h = plugin
            .start_json(&t, json!({"language": "python", "code": COUNTER}))
            .await
            .unwrap();
        tasks.push((t, h));
    }
    let ender = alloc.task("ender");
    let marker = ender.task_dir.join("local/go");
    let ender_handle = plugin
        .start_json(
            &ender,
            json!({"language": "python", "code": format!(
                "import os, sys, time\nwhile not os.path.exists({:?}):\n    time.sleep(0.02)\nprint('ending', flush=True)\nsys.exit(5)\n",
                marker.display().to_string()
            )}),
        )
        .await
        .unwrap();
    for (t, _) in &tasks {
        t.stdout
            .wait_for("first lines", |s| s.lines().count() >= 3)
            .await;
    }

    // The agent restarts: the plugin is SIGKILLed.
    let mut plugin = plugin;
    plugin.client.process.child.kill().unwrap();
    plugin.client.process.child.wait().unwrap();
    assert!(alive(dpid), "daemon outlives the plugin");
    for (t, h) in &tasks {
        assert!(alive(handle_pid(h)), "{} died with the plugin", t.id);
    }
    // One task ends while no plugin runs.
    std::fs::write(&marker, "").unwrap();
    let ender_pid = handle_pid(&ender_handle);
    eventually("ender exits", || !alive(ender_pid)).await;
    let before: Vec<usize> = tasks
        .iter()
        .map(|(t, _)| t.stdout.text().lines().count())
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A new plugin instance: SetConfig, then RecoverTask from the persisted handles (the raw
    // driver config does not survive Nomad's state store).
    let plugin = Plugin::launch(&config).await;
    assert_eq!(
        daemon_pid(&auto.socket).await,
        Some(dpid),
        "same daemon, no second start"
    );
    let mut d = plugin.driver();
    for (_, h) in tasks
        .iter()
        .chain(std::iter::once(&(ender, ender_handle.clone())))
    {
        let mut h = h.clone();
        if let Some(c) = h.config.as_mut() {
            c.msgpack_driver_config.clear();
        }
        d.recover_task(pb::RecoverTaskRequest {
            task_id: String::new(),
            handle: Some(h.clone()),
        })
        .await
        .unwrap();
        // Recovering a task the plugin already knows is fine.
        d.recover_task(pb::RecoverTaskRequest {
            task_id: String::new(),
            handle: Some(h),
        })
        .await
        .unwrap();
    }
    let ender_id = ender_handle.config.as_ref().unwrap().id.clone();
    let w = plugin.wait(&ender_id).await;
    assert_eq!(
        w.result.unwrap().exit_code,
        5,
        "real exit code after the plugin was down"
    );

    // The new plugin process works in the session the first one created (it is named after the
    // config): an agent restart leaves no second session, and no second warm pool, behind.
    let after = alloc.task("after");
    plugin
        .start_json(
            &after,
            json!({"language": "python", "code": "print('after')"}),
        )
        .await
        .unwrap();
    assert_eq!(plugin.wait(&after.id).await.result.unwrap().exit_code, 0);
    let sessions = daemon_sessions(&auto.socket).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");

    for ((t, _), n0) in tasks.iter().zip(&before) {
        let st = plugin.inspect(&t.id).await.unwrap().task.unwrap();
        assert_eq!(st.state, pb::TaskState::Running as i32, "{}", t.id);
        t.stdout
            .wait_for("output continues", |s| s.lines().count() > n0 + 3)
            .await;
    }
    for (t, _) in &tasks {
        plugin
            .stop(&t.id, "SIGTERM", Duration::from_secs(5))
            .await
            .unwrap();
        let r = plugin.wait(&t.id).await.result.unwrap();
        assert_eq!(r.signal, 15, "{}: {r:?}", t.id);
        let text = t.stdout.wait_eof().await;
        let n = assert_contiguous(&text, &t.id);
        assert!(n > 10, "{}: {n} lines", t.id);
        plugin.destroy(&t.id, true).await.unwrap();
    }
    drop(plugin);
    auto.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn executions_an_earlier_plugin_left_unrecovered_stop_when_nomad_starts_or_destroys_their_task()
 {
    let (root, auto, config, plugin) = plugin_with_auto_daemon().await;
    let alloc = Alloc::new(root.path());
    let sleeper = sleeper();
    // `lost`: the agent died before its StartTask reply reached Nomad (no handle);
    // `failed`: its recovery failed; `kept`: recovered.
    let (lost, failed, kept) = (alloc.task("lost"), alloc.task("failed"), alloc.task("kept"));
    let mut handles = Vec::new();
    for t in [&lost, &failed, &kept] {
        handles.push(plugin.start_json(t, sleeper.clone()).await.unwrap());
    }
    let pids: Vec<u32> = handles.iter().map(handle_pid).collect();
    let kept_handle = handles.pop().unwrap();
    let mut plugin = plugin;
    plugin.client.process.child.kill().unwrap();
    plugin.client.process.child.wait().unwrap();

    let plugin = Plugin::launch(&config).await;
    plugin
        .driver()
        .recover_task(pb::RecoverTaskRequest {
            task_id: String::new(),
            handle: Some(kept_handle),
        })
        .await
        .unwrap();
    // Nomad runs `lost` afresh under a new task id (the same task of the same allocation, with
    // new logmon readers): the leftover is gone before the new instance starts.
    let again = task_again(&alloc, &lost);
    let again_pid = handle_pid(&plugin.start_json(&again, sleeper.clone()).await.unwrap());
    assert!(!alive(pids[0]), "the leftover of `lost` still runs");
    assert!(alive(again_pid));
    // Nomad cleans up `failed` after its recovery failed.
    plugin.destroy(&failed.id, true).await.unwrap();
    assert!(!alive(pids[1]), "the leftover of `failed` still runs");
    assert!(alive(pids[2]), "a recovered task was stopped");
    kill_and_destroy(&plugin, &[&again.id, &kept.id]).await;
    drop(plugin);
    auto.kill().await;
}

/// The agent died after a StartTask reply left the plugin, and its successor reattached to the
/// same plugin process without that task's handle: Nomad starts the task again under a new id,
/// and the instance it lost track of is stopped rather than left running next to the new one.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_started_again_stops_the_instance_nomad_lost_track_of() {
    let (root, auto, _, plugin) = plugin_with_auto_daemon().await;
    let alloc = Alloc::new(root.path());
    let sleeper = sleeper();
    let (first, sidecar) = (alloc.task("web"), alloc.task("sidecar"));
    let first_pid = handle_pid(&plugin.start_json(&first, sleeper.clone()).await.unwrap());
    let sidecar_pid = handle_pid(&plugin.start_json(&sidecar, sleeper.clone()).await.unwrap());
    let again = task_again(&alloc, &first);
    let again_pid = handle_pid(&plugin.start_json(&again, sleeper).await.unwrap());
    eventually("the lost instance is stopped", || !alive(first_pid)).await;
    assert!(alive(again_pid), "the new instance was stopped");
    assert!(
        alive(sidecar_pid),
        "another task of the allocation was stopped"
    );
    let gone = plugin
        .driver()
        .wait_task(pb::WaitTaskRequest {
            task_id: first.id.clone(),
        })
        .await
        .expect_err("the lost instance is still a task of the plugin");
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
    // An instance that ended and that Nomad lost is forgotten too.
    let quick = alloc.task("quick");
    let done = json!({"language": "python", "code": "print(1)"});
    plugin.start_json(&quick, done.clone()).await.unwrap();
    assert_eq!(plugin.wait(&quick.id).await.result.unwrap().exit_code, 0);
    let quick_again = task_again(&alloc, &quick);
    plugin.start_json(&quick_again, done).await.unwrap();
    let forgotten = plugin
        .driver()
        .wait_task(pb::WaitTaskRequest {
            task_id: quick.id.clone(),
        })
        .await
        .expect_err("the ended instance Nomad lost is still a task of the plugin");
    assert_eq!(forgotten.code(), tonic::Code::NotFound, "{forgotten:?}");
    kill_and_destroy(&plugin, &[&again.id, &sidecar.id, &quick_again.id]).await;
    drop(plugin);
    auto.kill().await;
}

/// The agent's `daemon_socket` changed across a restart: the task is not recovered on the daemon
/// configured now (Nomad starts it again there), and its execution on the former daemon, which
/// still runs, is stopped rather than left running where no DestroyTask reaches it.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_of_a_former_daemon_socket_is_not_recovered_but_stopped_there() {
    let (root, former, _, plugin) = plugin_with_auto_daemon().await;
    let alloc = Alloc::new(root.path());
    let task = alloc.task("moved");
    let sleeper = sleeper();
    let handle = plugin.start_json(&task, sleeper).await.unwrap();
    let pid = handle_pid(&handle);
    let mut plugin = plugin;
    plugin.client.process.child.kill().unwrap();
    plugin.client.process.child.wait().unwrap();

    let (_now_root, now) = scratch_daemon();
    let plugin = Plugin::launch(&plugin_config(&now.socket, Some(&now))).await;
    let err = plugin
        .driver()
        .recover_task(pb::RecoverTaskRequest {
            task_id: String::new(),
            handle: Some(handle),
        })
        .await
        .expect_err("recovered on a daemon that never ran it");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let former_socket = former.socket.display().to_string();
    assert!(
        err.message().contains(&former_socket) && err.message().contains("was stopped"),
        "{err:?}"
    );
    eventually("the task on the former daemon is stopped", || !alive(pid)).await;
    drop(plugin);
    former.kill().await;
    now.kill().await;
}

/// Starts `gone` and `kept` under one plugin process (configured with `dangling`), kills it,
/// and has a new one recover `kept` only: Nomad destroyed `gone` while no plugin ran (its
/// background kill died with the process), so nothing of Nomad's names it again. The agent's
/// `session_config` changed meanwhile: both tasks run in the old session.
async fn a_task_lost_with_its_plugin(
    root: &std::path::Path,
    auto: &AutoDaemon,
    dangling: serde_json::Value,
) -> LostTask {
    let mut config = plugin_config(&auto.socket, Some(auto));
    config["dangling_executions"] = dangling;
    let plugin = Plugin::launch(&config).await;
    // Held, as the agent holds it: a plugin process stops nothing while no agent is attached.
    let attached = plugin.client.fingerprint().await;
    config["session_config"] = json!([{ "context_pool_size": 0 }]);
    let alloc = Alloc::new(root);
    let sleeper = sleeper();
    let (gone, kept) = (alloc.task("gone"), alloc.task("kept"));
    let gone_pid = handle_pid(&plugin.start_json(&gone, sleeper.clone()).await.unwrap());
    let kept_handle = plugin.start_json(&kept, sleeper).await.unwrap();
    let kept_pid = handle_pid(&kept_handle);
    // Longer than creation grace and period: the tasks a plugin holds never dangle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        alive(gone_pid),
        "a task the plugin holds was stopped as dangling"
    );
    assert!(
        alive(kept_pid),
        "a task the plugin holds was stopped as dangling"
    );
    let mut plugin = plugin;
    plugin.client.process.child.kill().unwrap();
    plugin.client.process.child.wait().unwrap();
    drop(attached);

    let plugin = Plugin::launch(&config).await;
    let launched = Instant::now();
    let attached = plugin.client.fingerprint().await;
    plugin
        .driver()
        .recover_task(pb::RecoverTaskRequest {
            task_id: String::new(),
            handle: Some(kept_handle),
        })
        .await
        .unwrap();
    LostTask {
        plugin,
        _attached: attached,
        gone_pid,
        kept_pid,
        launched,
        gone_id: gone.id,
        kept_id: kept.id,
    }
}

struct LostTask {
    /// The plugin process that recovered `kept`.
    plugin: Plugin,
    /// Its agent's Fingerprint stream.
    _attached: tonic::Streaming<pb::FingerprintResponse>,
    gone_pid: u32,
    kept_pid: u32,
    /// When that plugin process had its agent config.
    launched: Instant,
    gone_id: String,
    kept_id: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn executions_no_nomad_task_tracks_stop_once_their_creation_grace_passed() {
    let (root, auto) = scratch_daemon();
    let dangling = json!([{ "period": "1s", "creation_grace": "3s" }]);
    let lost = a_task_lost_with_its_plugin(root.path(), &auto, dangling).await;
    eventually("the dangling execution is stopped", || {
        !alive(lost.gone_pid)
    })
    .await;
    assert!(
        lost.launched.elapsed() >= Duration::from_secs(3),
        "stopped {:?} after the plugin's SetConfig, within its creation grace",
        lost.launched.elapsed()
    );
    assert!(alive(lost.kept_pid), "a recovered task was stopped");
    kill_and_destroy(&lost.plugin, &[&lost.kept_id]).await;
    drop(lost);
    auto.kill().await;
}

/// A plugin process whose agent is gone (Nomad started a new one after a failed reattach, and
/// left this one running) stops nothing: its task table is frozen, and the new process's tasks
/// would look dangling to it.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_without_its_agent_stops_nothing() {
    let (root, auto) = scratch_daemon();
    let mut config = plugin_config(&auto.socket, Some(&auto));
    config["dangling_executions"] = json!([{ "period": "1s", "creation_grace": "2s" }]);
    let sleeper = sleeper();
    let alloc = Alloc::new(root.path());
    let orphan = Plugin::launch(&config).await;
    let agent = orphan.client.fingerprint().await;
    let (old, fresh) = (alloc.task("old"), alloc.task("fresh"));
    let old_pid = handle_pid(&orphan.start_json(&old, sleeper.clone()).await.unwrap());
    // The agent dies: its stream closes, the plugin process stays.
    drop(agent);

    let plugin = Plugin::launch(&config).await;
    let _agent = plugin.client.fingerprint().await;
    let fresh_pid = handle_pid(&plugin.start_json(&fresh, sleeper).await.unwrap());
    // The new process does stop what it does not hold (so the looks run meanwhile)...
    eventually("the new plugin stops the orphan's task", || !alive(old_pid)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // ...and the orphan, which sees `fresh` as dangling as long, stops nothing.
    assert!(
        alive(fresh_pid),
        "the orphaned plugin stopped the new one's task"
    );
    kill_and_destroy(&plugin, &[&fresh.id]).await;
    drop(orphan);
    drop(plugin);
    auto.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dangling_executions_disabled_leaves_them_to_nomad() {
    let (root, auto) = scratch_daemon();
    let dangling = json!([{ "enabled": false, "period": "1s", "creation_grace": "1s" }]);
    let lost = a_task_lost_with_its_plugin(root.path(), &auto, dangling).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        alive(lost.gone_pid),
        "stopped although dangling_executions is disabled"
    );
    assert!(alive(lost.kept_pid));
    // The inherited-task path still stops it when Nomad names it, in the old session too.
    lost.plugin.destroy(&lost.gone_id, true).await.unwrap();
    assert!(
        !alive(lost.gone_pid),
        "DestroyTask of the leftover left it running"
    );
    kill_and_destroy(&lost.plugin, &[&lost.kept_id]).await;
    drop(lost);
    auto.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn destroying_tasks_after_the_daemon_died_answers_at_once_and_starts_no_daemon() {
    let (root, auto, _config, plugin) = plugin_with_auto_daemon().await;
    eventually("auto-started daemon answers", || auto.socket.exists()).await;
    let dpid = daemon_pid(&auto.socket).await.expect("daemon answers");
    let alloc = Alloc::new(root.path());
    let t = alloc.task("t");
    let h = plugin.start_json(&t, sleeper()).await.unwrap();
    let pid = handle_pid(&h);
    // The task's waiter is what notices the daemon is gone and drops the plugin's cached
    // connection; until then a DestroyTask would reuse that connection and never try to start.
    let mut d = plugin.driver();
    let id = t.id.clone();
    let wait = tokio::spawn(async move { d.wait_task(pb::WaitTaskRequest { task_id: id }).await });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dpid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let r = tokio::time::timeout(DEADLINE, wait)
        .await
        .expect("WaitTask hung")
        .unwrap()
        .expect("WaitTask answers with a result")
        .into_inner();
    assert!(r.err.contains("elide-daemon connection lost"), "{r:?}");
    // What the plugin would look for is gone already: nothing a new daemon could clean up.
    eventually("the execution dies with its daemon", || !alive(pid)).await;

    // Nomad cleans up a task this plugin process does not know (say, its recovery failed),
    // first with the SIGKILLed daemon's socket file left behind (connections refused), then
    // with no socket file at all.
    assert!(auto.socket.exists(), "a SIGKILLed daemon leaves its socket");
    // Then the task it knows, which ended with the daemon: only the daemon's record of it is
    // left to forget, and a daemon that is down keeps no such thing worth starting it for.
    for (case, task) in [
        ("stale socket", "0a1b2c3d/gone/0123abcd"),
        ("stale socket", t.id.as_str()),
        ("no socket", "0a1b2c3d/gone/0123abcd"),
    ] {
        if case == "no socket" {
            std::fs::remove_file(&auto.socket).unwrap();
        }
        let asked = Instant::now();
        plugin
            .destroy(task, true)
            .await
            .unwrap_or_else(|e| panic!("{case}, {task}: {e:?}"));
        assert!(
            // Nothing to wait for: no connection timeout, no daemon start (the plugin gives
            // one 10 s); generous for a loaded machine.
            asked.elapsed() < Duration::from_secs(15),
            "{case}, {task}: DestroyTask took {:?}",
            asked.elapsed()
        );
        assert_eq!(
            daemon_pid(&auto.socket).await,
            None,
            "{case}, {task}: a daemon answers"
        );
        assert_eq!(
            daemons_on(&auto.socket),
            Vec::<i32>::new(),
            "{case}, {task}: a daemon was started"
        );
    }
    // The destroyed task is gone from the plugin.
    let mut d = plugin.driver();
    let gone = d
        .inspect_task(pb::InspectTaskRequest {
            task_id: t.id.clone(),
        })
        .await
        .expect_err("a destroyed task is not found");
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
    assert!(!auto.socket.exists(), "something created the socket again");
    plugin.alive().await;
    drop(plugin);
    auto.kill().await;
}

/// The sessions the daemon at `socket` holds.
async fn daemon_sessions(
    socket: &std::path::Path,
) -> Vec<elide_task_driver::proto::elide::daemon::v1alpha1::Session> {
    let c = elide_task_driver::daemon_client::DaemonClient::connect(socket, DEADLINE)
        .await
        .unwrap();
    c.raw()
        .list_sessions(elide_task_driver::proto::elide::daemon::v1alpha1::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions
}

fn recoverable_detail(s: &tonic::Status) -> Option<bool> {
    let st = elide_task_driver::proto::google::rpc::Status::decode(s.details()).ok()?;
    let any = st.details.first()?;
    if !any
        .type_url
        .ends_with("hashicorp.nomad.plugins.shared.structs.RecoverableError")
    {
        return None;
    }
    elide_task_driver::proto::hashicorp::nomad::plugins::shared::structs::RecoverableError::decode(
        any.value.as_slice(),
    )
    .ok()
    .map(|r| r.recoverable)
}

#[tokio::test]
async fn daemon_killed_fails_waits_promptly_and_health_follows_it() {
    let mut daemon = TestDaemon::start().await;
    let plugin = Plugin::launch(&plugin_config(&daemon.socket, None)).await;
    let mut fp = plugin.client.fingerprint().await;
    fingerprint_until(&mut fp, DEADLINE, |m| {
        m.health == HealthState::Healthy as i32
    })
    .await;
    // Under the daemon's --output-root: such a daemon refuses FIFOs elsewhere.
    let alloc = Alloc::new(&daemon.path("nomad"));
    let mut waits = Vec::new();
    let mut pids = Vec::new();
    for i in 0..3 {
        let t = alloc.task(&format!("k{i}"));
        let h = plugin
            .start_json(&t, json!({"language": "python", "code": COUNTER}))
            .await
            .unwrap();
        pids.push(handle_pid(&h));
        t.stdout.wait_for("running", |s| !s.is_empty()).await;
        let mut d = plugin.driver();
        let id = t.id.clone();
        waits.push(tokio::spawn(async move {
            let r = d.wait_task(pb::WaitTaskRequest { task_id: id }).await;
            (r, Instant::now())
        }));
    }
    let killed = Instant::now();
    daemon.kill9();
    for w in waits {
        let (r, at) = tokio::time::timeout(DEADLINE, w).await.unwrap().unwrap();
        let r = r
            .expect("WaitTask answers with a result, not a status")
            .into_inner();
        assert!(r.result.is_some());
        assert!(r.err.contains("elide-daemon connection lost"), "{r:?}");
        assert!(
            // At once on the lost connection, not after a retry backoff or start timeout (30 s);
            // generous for a loaded machine.
            at.duration_since(killed) < Duration::from_secs(15),
            "took {:?}",
            at.duration_since(killed)
        );
    }
    for pid in pids {
        eventually("executions die with the daemon", || !alive(pid)).await;
    }
    let m = fingerprint_until(&mut fp, Duration::from_secs(20), |m| {
        m.health == HealthState::Unhealthy as i32
    })
    .await;
    assert!(
        m.health_description.contains("not reachable"),
        "{}",
        m.health_description
    );
    // Within one fingerprint period (1 s here, 30 s by default) plus generous slack for a
    // loaded machine.
    assert!(
        killed.elapsed() < Duration::from_secs(15),
        "{:?}",
        killed.elapsed()
    );

    // StartTask while the daemon is down: an error Nomad retries (RecoverableError detail).
    let t = alloc.task("down");
    let e = plugin
        .start_json(&t, json!({"language": "python", "code": "print(1)"}))
        .await
        .unwrap_err();
    assert_eq!(recoverable_detail(&e), Some(true), "{e:?}");
    plugin.alive().await;

    // The daemon comes back with an empty state dir: our session is gone and gets re-created.
    let _ = std::fs::remove_dir_all(&daemon.state_dir);
    daemon.spawn().await;
    fingerprint_until(&mut fp, DEADLINE, |m| {
        m.health == HealthState::Healthy as i32
    })
    .await;
    let t = alloc.task("after");
    plugin
        .start_json(&t, json!({"language": "python", "code": "print('back')"}))
        .await
        .unwrap();
    assert_eq!(plugin.wait(&t.id).await.result.unwrap().exit_code, 0);
    assert_eq!(t.stdout.wait_eof().await, "back\n");
    let sessions = daemon_sessions(&daemon.socket).await;
    let owner = format!("nomad-plugin pid {}", plugin.client.process.child.id());
    assert!(
        sessions
            .iter()
            .any(|s| s.owner == owner && s.id.starts_with("nomad-")),
        "session re-created in the fresh daemon: {sessions:?}"
    );
}

#[tokio::test]
async fn daemon_that_cannot_be_started_is_reported_and_start_task_is_retryable() {
    let root = tempfile::Builder::new()
        .prefix("en")
        .tempdir_in("/tmp")
        .unwrap();
    let socket = root.path().join("d.sock");
    let mut config = plugin_config(&socket, None);
    config["daemon"] = json!([{"auto_start": true, "path": "/nonexistent/elide-daemon"}]);
    let plugin = Plugin::launch(&config).await;
    let mut fp = plugin.client.fingerprint().await;
    let m = fingerprint_until(&mut fp, DEADLINE, |m| {
        m.health == HealthState::Unhealthy as i32
    })
    .await;
    assert!(
        m.health_description.contains("auto-start failed"),
        "{}",
        m.health_description
    );
    assert!(
        m.health_description.contains("/nonexistent/elide-daemon"),
        "{}",
        m.health_description
    );
    let alloc = Alloc::new(root.path());
    let t = alloc.task("t");
    let e = plugin
        .start_json(&t, json!({"language": "python", "code": "print(1)"}))
        .await
        .unwrap_err();
    assert_eq!(recoverable_detail(&e), Some(true), "{e:?}");
    assert!(e.message().contains("auto-start failed"), "{e:?}");
    plugin.alive().await;
}

/// A daemon out of descriptors (its hard open-file limit set far too low) fails the StartTask
/// it cannot serve with an error Nomad retries (RecoverableError detail) naming the cause; the
/// tasks that started run to their end, and once they are gone a start works again.
#[tokio::test]
async fn a_daemon_out_of_descriptors_fails_starts_as_recoverable_and_recovers() {
    const LIMIT: u64 = 64;
    let daemon = TestDaemon::start_with_open_file_limits(LIMIT, Some(LIMIT)).await;
    let plugin = Plugin::launch(&plugin_config(&daemon.socket, None)).await;
    let alloc = Alloc::new(&daemon.path("nomad"));
    let go = daemon.path("go");
    let code = format!(
        "import os, time\nwhile not os.path.exists({:?}):\n    time.sleep(0.02)\nprint('done')\n",
        go.display()
    );
    let mut started = Vec::new();
    let refused = loop {
        assert!(
            started.len() < LIMIT as usize,
            "{} tasks started under an open-file limit of {LIMIT}",
            started.len()
        );
        let t = alloc.task(&format!("t{}", started.len()));
        match plugin
            .start_json(&t, json!({"language": "python", "code": code}))
            .await
        {
            Ok(_) => started.push(t),
            Err(e) => break e,
        }
    };
    assert!(!started.is_empty(), "not one task started");
    assert_eq!(recoverable_detail(&refused), Some(true), "{refused:?}");
    assert!(
        daemon_support::refused_for_want_of_descriptors(refused.message()),
        "{refused:?}"
    );
    plugin.alive().await;

    std::fs::write(&go, b"").expect("go");
    for t in &started {
        let w = plugin.wait(&t.id).await;
        assert_eq!(w.result.expect("result").exit_code, 0, "{}", t.id);
        assert_eq!(t.stdout.wait_eof().await, "done\n");
        plugin.destroy(&t.id, true).await.expect("destroy");
    }
    let t = alloc.task("after");
    plugin
        .start_json(&t, json!({"language": "python", "code": code}))
        .await
        .expect("a start once descriptors are free again");
    assert_eq!(
        plugin.wait(&t.id).await.result.expect("result").exit_code,
        0
    );
    assert_eq!(t.stdout.wait_eof().await, "done\n");
}
