//! Plugin + daemon benchmark: StartTask → WaitTask through the real plugin binary (launched as
//! Nomad launches it, go-plugin handshake, SetConfig) and a real release `elide-daemon`, with
//! logmon-like FIFOs in a Nomad-shaped alloc dir, for `print("hi")` in each language, next to
//! a cold interpreter spawn; plus sustained throughput of short python tasks.
//!
//! `cargo bench --bench plugin_tasks`; `BENCH_N` samples (default 100); with
//! `BENCH_WRITE=path` replaces this benchmark's section in that file. `BENCH_QUICK=1`: python
//! latency through a pooled plugin only (for profiling; writes nothing).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/daemon_support/mod.rs"]
mod daemon_support;
#[path = "../tests/lifecycle_support/mod.rs"]
mod lifecycle_support;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::{Stats, cold_spawn, resolve_node, resolve_python, stats, write_section};
use daemon_support::TestDaemon;
use lifecycle_support::{Alloc, Plugin, plugin_config};
use serde_json::json;

const BEGIN: &str = "<!-- plugin_tasks:begin -->";
const END: &str = "<!-- plugin_tasks:end -->";

/// Sum of StartTask round trips (µs), to split latency between start and wait.
static START_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One task: StartTask → WaitTask (ms, exit code); the FIFOs are created before timing.
async fn one_task(
    plugin: &Plugin,
    alloc: &Alloc,
    name: &str,
    language: &str,
    code: &str,
) -> (f64, i32) {
    let task = alloc.task(name);
    let cfg = task.config(&plugin.spec, &json!({"language": language, "code": code}));
    let t = Instant::now();
    plugin.start(cfg).await.expect("StartTask");
    START_US.fetch_add(
        t.elapsed().as_micros() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let w = plugin.wait(&task.id).await;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let code = w.result.map(|r| r.exit_code).unwrap_or(-1);
    let _ = plugin.destroy(&task.id, true).await;
    (ms, code)
}

fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let section = rt.block_on(run(n));
    println!("{section}");
    if std::env::var("BENCH_QUICK").is_err() {
        write_section(BEGIN, END, &section);
    }
}

async fn run(n: usize) -> String {
    let python = resolve_python();
    let node = resolve_node();
    let py_cold = cold_spawn(&python, &["-c", "print(\"hi\")"], n.min(60)).median;
    let node_cold = cold_spawn(&node, &["-e", "console.log(\"hi\")"], n.min(60)).median;

    let daemon = TestDaemon::start_with_tmpfs_run_dir().await;
    let mut rows = String::new();
    let mut budgets = String::new();
    // Under the daemon's allowed output root, so it accepts the FIFOs as sinks.
    let root = daemon.dir.path().to_path_buf();
    let alloc = Alloc::new(&root);
    let quick = std::env::var("BENCH_QUICK").is_ok();
    let pools: &[u32] = if quick { &[4] } else { &[4, 0] };
    for &pool in pools {
        let mut cfg = plugin_config(&daemon.socket, None);
        cfg["session_config"] = json!([{ "context_pool_size": pool }]);
        let plugin = Plugin::launch(&cfg).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        for (lang, code, base) in [
            ("python", "print(\"hi\")", py_cold),
            ("javascript", "console.log(\"hi\")", node_cold),
            (
                "typescript",
                "const s: string = \"hi\";\nconsole.log(s)",
                node_cold,
            ),
        ] {
            if quick && lang != "python" {
                continue;
            }
            eprintln!("plugin {lang} pool {pool}");
            let samples = if pool == 0 {
                n.min(40)
            } else if lang == "python" {
                n
            } else {
                n / 2
            };
            let mut v = Vec::new();
            START_US.store(0, std::sync::atomic::Ordering::Relaxed);
            for i in 0..samples + 5 {
                let (ms, code) =
                    one_task(&plugin, &alloc, &format!("{lang}-{pool}-{i}"), lang, code).await;
                assert_eq!(code, 0, "{lang} task failed");
                if i >= 5 {
                    v.push(ms);
                }
                if lang != "python" && pool > 0 {
                    // Let the single-use node workers refill (sustained load: see throughput).
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            }
            let Stats {
                median: med, p99, ..
            } = stats(v);
            let start_ms = START_US.load(std::sync::atomic::Ordering::Relaxed) as f64
                / 1e3
                / (samples + 5) as f64;
            eprintln!("{lang} pool {pool}: median {med:.2} ms, mean StartTask {start_ms:.2} ms");
            let ratio = base / med;
            rows.push_str(&format!(
                "| {lang} | {pool} | {med:.2} ms | {p99:.2} ms | {base:.2} ms | {ratio:.1}× |\n"
            ));
            if pool > 0 {
                let (want, verdict) = if lang == "python" {
                    ("≤ 5 ms median and ≥ 10×", med <= 5.0 && ratio >= 10.0)
                } else {
                    ("≥ 10×", ratio >= 10.0)
                };
                budgets.push_str(&format!(
                    "| {lang} StartTask→WaitTask {want} | {med:.2} ms, {ratio:.1}× | {} |\n",
                    if verdict { "reached" } else { "MISSED" }
                ));
            }
        }
        if pool > 0 && !quick {
            // Sustained short python tasks: 4 concurrent Nomad-like callers for 5 s.
            eprintln!("plugin throughput");
            let plugin = &plugin;
            let alloc = &Alloc::new(&root);
            let deadline = Instant::now() + Duration::from_secs(5);
            let t = Instant::now();
            let mut tasks = Vec::new();
            for w in 0..4 {
                // Polled together on this task (the harness client is not Send).
                tasks.push(async move {
                    let mut done = 0u64;
                    let mut i = 0;
                    while Instant::now() < deadline {
                        let (_, code) =
                            one_task(plugin, alloc, &format!("tp-{w}-{i}"), "python", "pass").await;
                        assert_eq!(code, 0);
                        done += 1;
                        i += 1;
                    }
                    done
                });
            }
            let done: u64 = futures::future::join_all(tasks).await.into_iter().sum();
            let rate = done as f64 / t.elapsed().as_secs_f64();
            budgets.push_str(&format!(
                "| ≥ 300 short python tasks/s through plugin + daemon | {rate:.0}/s | {} |\n",
                if rate >= 300.0 { "reached" } else { "MISSED" }
            ));
        }
    }
    format!(
        "{BEGIN}\n## Plugin + daemon: StartTask → WaitTask (`plugin_tasks`)\n\n\
Command: `make bench` (`cargo bench --bench plugin_tasks`). The harness launches the release \
plugin binary as Nomad does (go-plugin handshake, SetConfig with `session_config`), creates the \
task's logmon FIFOs (drained by reader threads) before timing, then times StartTask → WaitTask \
(DestroyTask afterwards, untimed). Alloc dir and daemon state dir on disk (ext4), the daemon's \
run dir on tmpfs (`/dev/shm`, as `/run/elide/exec` is on a systemd host). Cold baseline: `{}` / `{}` spawned directly, output to /dev/null.\n\n\
| budget | measured | verdict |\n|---|---|---|\n{budgets}\n\
| language | context_pool_size | median | p99 | cold interpreter median | speed-up |\n|---|---|---|---|---|---|\n{rows}{END}\n",
        python.display(),
        node.display()
    )
}
