//! 200 concurrent short tasks through one plugin and one daemon: every one completes with its
//! own output, and afterwards the plugin holds no more fds than before and no snippet process
//! is left.

#[path = "daemon_support/mod.rs"]
mod daemon_support;
mod lifecycle_support;
mod support;

use std::time::Duration;

use daemon_support::{TestDaemon, fd_count};
use elide_task_driver::proto::hashicorp::nomad::plugins::drivers::proto as pb;
use lifecycle_support::{Alloc, DEADLINE, Plugin, eventually, plugin_config};
use serde_json::json;

const TASKS: usize = 200;

/// Processes whose environment carries this marker (the snippets of this test).
fn marked_processes(marker: &str) -> Vec<u32> {
    let needle = format!("SCALE_MARK={marker}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_short_tasks_complete_without_leaks() {
    let daemon = TestDaemon::start().await;
    let plugin = Plugin::launch(&plugin_config(&daemon.socket, None)).await;
    let plugin_pid = plugin.client.process.child.id();
    // Under the daemon's --output-root: such a daemon refuses FIFOs elsewhere.
    let root = daemon.path("nomad");
    let marker = uuid::Uuid::new_v4().simple().to_string();

    // Warm up one task so lazily opened connections are counted in the baseline.
    let alloc = Alloc::new(&root);
    let warm = alloc.task("warm");
    plugin
        .start_json(
            &warm,
            json!({"language": "python", "code": "print('warm')"}),
        )
        .await
        .unwrap();
    plugin.wait(&warm.id).await;
    warm.stdout.wait_eof().await;
    plugin.destroy(&warm.id, true).await.unwrap();
    let fds_before = fd_count(plugin_pid);

    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let mut t = alloc.task(&format!("t{i}"));
        t.extra_env.insert("SCALE_MARK".into(), marker.clone());
        tasks.push(t);
    }
    let spec = plugin.spec.clone();
    let runs: Vec<_> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let language = ["python", "javascript"][i % 2];
            let code = if language == "python" {
                format!("print('task {i}')")
            } else {
                format!("console.log('task {i}')")
            };
            let cfg = t.config(&spec, &json!({"language": language, "code": code}));
            let mut d = plugin.driver();
            let id = t.id.clone();
            tokio::spawn(async move {
                d.start_task(pb::StartTaskRequest { task: Some(cfg) })
                    .await
                    .unwrap_or_else(|e| panic!("start {id}: {e}"));
                let w = tokio::time::timeout(
                    Duration::from_secs(240),
                    d.wait_task(pb::WaitTaskRequest {
                        task_id: id.clone(),
                    }),
                )
                .await
                .expect("WaitTask hung")
                .unwrap()
                .into_inner();
                d.destroy_task(pb::DestroyTaskRequest {
                    task_id: id,
                    force: true,
                })
                .await
                .unwrap();
                w
            })
        })
        .collect();
    for (i, r) in futures::future::join_all(runs)
        .await
        .into_iter()
        .enumerate()
    {
        let w = r.unwrap();
        assert_eq!(w.result.unwrap().exit_code, 0, "task {i}: {w:?}");
    }
    for (i, t) in tasks.iter().enumerate() {
        assert_eq!(t.stdout.wait_eof().await, format!("task {i}\n"));
        assert_eq!(t.stderr.wait_eof().await, "");
    }
    eventually("no snippet process left", || {
        marked_processes(&marker).is_empty()
    })
    .await;
    // Connections the daemon or plugin closes lazily may take a moment to go away.
    let deadline = std::time::Instant::now() + DEADLINE;
    while fd_count(plugin_pid) > fds_before && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        fd_count(plugin_pid) <= fds_before,
        "plugin fds: {} before, {} after",
        fds_before,
        fd_count(plugin_pid)
    );
    plugin.alive().await;
}
