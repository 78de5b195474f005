//! Plugin + daemon benchmark: StartTask → WaitTask through the real plugin binary (launched as
//! Nomad launches it, go-plugin handshake, SetConfig) and a real release `elide-daemon`, with
//! logmon-like FIFOs in a Nomad-shaped alloc dir, for `print("hi")` in each language, next to
//! a cold interpreter spawn; plus sustained throughput of short python tasks.
//!
//! `cargo bench --bench plugin_tasks`; `BENCH_N` samples (default 100); with
//! `BENCH_WRITE=path` replaces this benchmark's section in that file. For profiling, one
//! measurement alone (writes nothing): `BENCH_QUICK=1` python latency through a pooled plugin,
//! `BENCH_QUICK=js` the same for javascript and typescript, `BENCH_QUICK=throughput` the
//! sustained python throughput, `BENCH_QUICK=memory` the idle python snippets' memory in a
//! python-only session, with where it lies (plugin, daemon, zygote, its children).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/daemon_support/mod.rs"]
mod daemon_support;
#[path = "../tests/lifecycle_support/mod.rs"]
mod lifecycle_support;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::{
    PAGE_MERGING_SCAN, PageMerging, Stats, cold_idle_pss, cpu_ms, descendants, pss_kib,
    pss_settled, resolve_node, resolve_python, stats, write_section,
};
use daemon_support::TestDaemon;
use lifecycle_support::{Alloc, Plugin, Task, plugin_config};
use serde_json::json;

const BEGIN: &str = "<!-- plugin_tasks:begin -->";
const END: &str = "<!-- plugin_tasks:end -->";

/// The idle python snippet of the memory measurement.
const PY_IDLE: &str = "import time\ntime.sleep(600)";

/// Idle snippets in the memory measurement.
const MEM_N: usize = 50;

/// PSS per idle snippet (KiB) with `MEM_N` tasks of `code` running through the plugin:
/// plugin + daemon + every descendant of the daemon, / N. With `merging` (ksmd on), once
/// merging settled, also the seconds that took.
async fn idle_pss_through_plugin(
    plugin: &Plugin,
    daemon: &TestDaemon,
    root: &std::path::Path,
    lang: &str,
    code: &str,
    merging: Option<&PageMerging>,
) -> (f64, Option<f64>) {
    let alloc = Alloc::new(root);
    let mut tasks = Vec::new();
    for i in 0..MEM_N {
        let task = alloc.task(&format!("mem-{lang}-{i}"));
        let cfg = task.config(&plugin.spec, &json!({"language": lang, "code": code}));
        plugin.start(cfg).await.expect("StartTask");
        tasks.push(task);
    }
    // Let every snippet reach its idle state.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let d = daemon.pid();
    let pss = || -> u64 {
        [plugin.client.process.child.id(), d]
            .into_iter()
            .chain(descendants(d))
            .map(pss_kib)
            .sum()
    };
    let (total, settling) = pss_settled(merging, pss).await;
    if quick() == Quick::Memory {
        print_memory_split(plugin.client.process.child.id(), d);
    }
    let settled_after = settling.map(|(secs, _)| secs);
    for t in &tasks {
        let _ = plugin.stop(&t.id, "SIGKILL", Duration::ZERO).await;
        let _ = plugin.destroy(&t.id, true).await;
    }
    (total as f64 / MEM_N as f64, settled_after)
}

/// Where the memory of idle snippets lies, per process kind (KiB of PSS, / `MEM_N`), and an
/// execution's private dirty memory (median): what `BENCH_QUICK=memory` prints.
fn print_memory_split(plugin: u32, daemon: u32) {
    let all = descendants(daemon);
    let zygotes: Vec<u32> = all
        .iter()
        .copied()
        .filter(|&p| common::parent_of(p) == Some(daemon))
        .collect();
    let children: Vec<u32> = all
        .iter()
        .copied()
        .filter(|&p| common::parent_of(p).is_some_and(|pp| zygotes.contains(&pp)))
        .collect();
    let others: Vec<u32> = all
        .iter()
        .copied()
        .filter(|p| !zygotes.contains(p) && !children.contains(p))
        .collect();
    let sum = |v: &[u32]| v.iter().map(|&p| pss_kib(p)).sum::<u64>() as f64 / MEM_N as f64;
    let mut private: Vec<u64> = children
        .iter()
        .map(|&p| common::proc_kib(p, "smaps_rollup", "Private_Dirty"))
        .collect();
    private.sort_unstable();
    eprintln!(
        "memory split, KiB per snippet: plugin {:.0}, daemon {:.0}, zygote {:.0}, its {} children {:.0}, others ({}) {:.0}; a child's private dirty (median) {} KiB",
        pss_kib(plugin) as f64 / MEM_N as f64,
        pss_kib(daemon) as f64 / MEM_N as f64,
        sum(&zygotes),
        children.len(),
        sum(&children),
        others.len(),
        sum(&others),
        private.get(private.len() / 2).copied().unwrap_or(0),
    );
}

/// A row of the memory table: ours and cold in KiB per snippet.
fn memory_row(label: &str, ours: f64, cold: f64) -> String {
    format!(
        "| {label} | {:.2} MiB | {:.2} MiB | {:.0}% |\n",
        ours / 1024.0,
        cold / 1024.0,
        ours / cold * 100.0
    )
}

/// A budget row for a memory share (≤ 20% of a cold interpreter).
fn memory_budget_row(what: &str, share: f64) -> String {
    format!(
        "| {what} | {:.0}% | {} |\n",
        share * 100.0,
        if share <= 0.20 { "reached" } else { "MISSED" }
    )
}

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
    run_task(plugin, alloc.task(name), language, code).await
}

/// StartTask → WaitTask of a prepared task (its dirs and logmon FIFOs exist), then DestroyTask.
async fn run_task(plugin: &Plugin, task: Task, language: &str, code: &str) -> (f64, i32) {
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

/// Lays out task `name` (dirs, logmon FIFOs) on a blocking thread, as Nomad's task runner does
/// in its own goroutine: the other callers' RPCs go on meanwhile.
fn prepare(alloc: &Alloc, name: String) -> tokio::task::JoinHandle<Task> {
    let alloc = alloc.clone();
    tokio::task::spawn_blocking(move || alloc.task(&name))
}

/// Who spends the CPU of the throughput window: the python zygotes with the children they
/// reaped (executions, spares), the daemon itself, the plugin, the Nomad stand-in (this
/// process: its RPCs, task layout and logmon threads).
fn cpu_split(plugin: &Plugin, daemon: &TestDaemon) -> [f64; 4] {
    let zygotes: f64 = descendants(daemon.pid())
        .into_iter()
        .filter(|&p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("elide python zygote"))
        })
        .map(|p| cpu_ms(p, true))
        .sum();
    [
        zygotes,
        cpu_ms(daemon.pid(), false),
        cpu_ms(plugin.client.process.child.id(), false),
        cpu_ms(std::process::id(), false),
    ]
}

/// Short python tasks (`pass`) per second through plugin + daemon: 4 concurrent Nomad-like
/// callers for 5 s, each laying out its next task while the current one runs; with the CPU
/// per task of each party (see [`cpu_split`]).
async fn throughput(plugin: &Plugin, daemon: &TestDaemon, alloc: &Alloc) -> (f64, [f64; 4]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let before = cpu_split(plugin, daemon);
    let t = Instant::now();
    // Polled together on this task (the harness client is not Send).
    let callers = (0..4).map(|w| async move {
        let mut done = 0u64;
        let mut next = prepare(alloc, format!("tp-{w}-0"));
        while Instant::now() < deadline {
            let task = next.await.expect("task layout");
            // The next task's layout overlaps this one's RPCs.
            next = prepare(alloc, format!("tp-{w}-{}", done + 1));
            let (_, code) = run_task(plugin, task, "python", "pass").await;
            assert_eq!(code, 0);
            done += 1;
        }
        done
    });
    let done: u64 = futures::future::join_all(callers).await.into_iter().sum();
    let secs = t.elapsed().as_secs_f64();
    let after = cpu_split(plugin, daemon);
    let per_task = std::array::from_fn(|i| (after[i] - before[i]) / done.max(1) as f64);
    (done as f64 / secs, per_task)
}

fn main() {
    // `cargo bench` passes `--bench`; under `cargo test --all-targets` this is a smoke run
    // with few latency samples (the tables it prints are not results).
    let default_n = if std::env::args().any(|a| a == "--bench") {
        100
    } else {
        10
    };
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_n);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let section = rt.block_on(run(n));
    println!("{section}");
    if quick() == Quick::Off {
        write_section(BEGIN, END, &section);
    }
}

/// `BENCH_QUICK`: one measurement alone, for profiling.
#[derive(Clone, Copy, PartialEq)]
enum Quick {
    Off,
    Latency,
    /// Javascript and typescript latency.
    LatencyNode,
    Throughput,
    Memory,
}

fn quick() -> Quick {
    match std::env::var("BENCH_QUICK").as_deref() {
        Err(_) => Quick::Off,
        Ok("throughput") => Quick::Throughput,
        Ok("memory") => Quick::Memory,
        Ok("js") => Quick::LatencyNode,
        Ok(_) => Quick::Latency,
    }
}

async fn run(n: usize) -> String {
    let python = resolve_python();
    let node = resolve_node();
    let py_cold = (python.as_path(), ["-c", "print(\"hi\")"]);
    let node_cold = (node.as_path(), ["-e", "console.log(\"hi\")"]);

    let daemon = TestDaemon::start_with_tmpfs_run_dir().await;
    let mut rows = String::new();
    let mut budgets = String::new();
    let mut memory = String::new();
    let mut throughputs = String::new();
    // Under the daemon's allowed output root, so it accepts the FIFOs as sinks.
    let root = daemon.dir.path().to_path_buf();
    let alloc = Alloc::new(&root);
    let quick = quick();
    let mut py_cold_pss = 0.0;
    let pools: &[u32] = match quick {
        Quick::Off => &[4, 0],
        Quick::Memory => &[],
        Quick::Latency | Quick::LatencyNode | Quick::Throughput => &[4],
    };
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
            if quick == Quick::Throughput
                || (quick == Quick::Latency && lang != "python")
                || (quick == Quick::LatencyNode && lang == "python")
            {
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
            // Both halves of the baseline start on a machine as quiet as the other's.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let baseline = common::Bracket::before(base.0, &base.1, n.min(60));
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
            // Pools refilled before the baseline's second half (the node samples are paced for
            // it anyway; python's spares are forked after each task).
            tokio::time::sleep(Duration::from_millis(200)).await;
            let base = baseline.after().median;
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
                    "| {lang} StartTask→WaitTask {want} | {} ms, {}× | {} |\n",
                    common::against(med, 5.0, 2),
                    common::against(ratio, 10.0, 1),
                    if verdict { "reached" } else { "MISSED" }
                ));
            }
        }
        if pool > 0 && !matches!(quick, Quick::Latency | Quick::LatencyNode) {
            // Sustained short python tasks: 4 concurrent Nomad-like callers for 5 s, with the
            // stand-in's alloc dir on disk and on tmpfs (see the section's text for why both).
            let plugin = &plugin;
            let tmpfs = daemon.tmpfs_output_root().expect("a tmpfs output root");
            for (place, root) in [("on disk", &root), ("on tmpfs", &tmpfs)] {
                eprintln!("plugin throughput, alloc dir {place}");
                let (rate, [py, dmn, plg, nomad]) =
                    throughput(plugin, &daemon, &Alloc::new(root)).await;
                eprintln!("plugin throughput, alloc dir {place}: {rate:.0} tasks/s");
                throughputs.push_str(&format!(
                    "| {place} | {rate:.0} | {py:.1} ms | {dmn:.1} ms | {plg:.1} ms | {nomad:.1} ms |\n"
                ));
                if place == "on tmpfs" {
                    budgets.push_str(&format!(
                        "| ≥ 300 short python tasks/s through plugin + daemon | {rate:.0}/s | {} |\n",
                        if rate >= 300.0 { "reached" } else { "MISSED" }
                    ));
                }
            }
            if quick != Quick::Off {
                continue;
            }

            eprintln!("plugin memory");
            for (lang, code, program, args) in [
                ("python", PY_IDLE, &python, ["-c", PY_IDLE]),
                (
                    "javascript",
                    "setTimeout(() => {}, 600000)",
                    &node,
                    ["-e", "setTimeout(() => {}, 600000)"],
                ),
            ] {
                let (ours, _) =
                    idle_pss_through_plugin(plugin, &daemon, &root, lang, code, None).await;
                let cold = cold_idle_pss(program, &args, MEM_N);
                memory.push_str(&memory_row(lang, ours, cold));
                if lang == "python" {
                    py_cold_pss = cold;
                    budgets.push_str(&memory_budget_row(
                        "memory per idle python snippet through plugin + daemon ≤ 20% of a cold python3",
                        ours / cold,
                    ));
                }
            }
        }
    }
    if quick == Quick::Memory {
        py_cold_pss = cold_idle_pss(&python, &["-c", PY_IDLE], MEM_N);
    }
    if quick == Quick::Off || quick == Quick::Memory {
        // The same measurement for an operator who enables python only: no idle node workers
        // in the session. A daemon of its own, so the first one's sessions are not counted.
        eprintln!("plugin memory, python-only session");
        let daemon = TestDaemon::start_with_tmpfs_run_dir().await;
        let root = daemon.dir.path().to_path_buf();
        let mut cfg = plugin_config(&daemon.socket, None);
        cfg["session_config"] =
            json!([{ "context_pool_size": 4, "enabled_languages": ["python"] }]);
        let plugin = Plugin::launch(&cfg).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (ours, _) =
            idle_pss_through_plugin(&plugin, &daemon, &root, "python", PY_IDLE, None).await;
        memory.push_str(&memory_row(
            "python, session with `enabled_languages = [\"python\"]`",
            ours,
            py_cold_pss,
        ));
        budgets.push_str(&memory_budget_row(
            "the same, python-only session (`enabled_languages = [\"python\"]`)",
            ours / py_cold_pss,
        ));
        eprintln!(
            "plugin memory, python-only session: {ours:.0} KiB per snippet, {:.0}% of a cold python3",
            100.0 * ours / py_cold_pss
        );
        drop(plugin);
        drop(daemon);
        // And with the session's memory offered to the kernel's same-page merging while ksmd
        // runs (switched on for this row, put back after).
        if quick == Quick::Off
            && let Some(merging) = PageMerging::switch_on()
        {
            eprintln!("plugin memory, python-only session merging pages");
            let daemon = TestDaemon::start_with_tmpfs_run_dir().await;
            let root = daemon.dir.path().to_path_buf();
            let mut cfg = plugin_config(&daemon.socket, None);
            cfg["session_config"] = json!([{
                "context_pool_size": 4,
                "enabled_languages": ["python"],
                "merge_identical_pages": true
            }]);
            let plugin = Plugin::launch(&cfg).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (ours, secs) =
                idle_pss_through_plugin(&plugin, &daemon, &root, "python", PY_IDLE, Some(&merging))
                    .await;
            memory.push_str(&memory_row(
                &format!(
                    "python, that session with `merge_identical_pages = true`, ksmd on (`pages_to_scan` = {PAGE_MERGING_SCAN}), settled after {:.0} s",
                    secs.unwrap_or_default()
                ),
                ours,
                py_cold_pss,
            ));
            budgets.push_str(&memory_budget_row(
                "the same, with `merge_identical_pages = true` and ksmd on",
                ours / py_cold_pss,
            ));
        }
    }
    format!(
        "{BEGIN}\n## Plugin + daemon: StartTask → WaitTask (`plugin_tasks`)\n\n\
Command: `make bench` (`cargo bench --bench plugin_tasks`). The harness launches the release \
plugin binary as Nomad does (go-plugin handshake, SetConfig with `session_config`), creates the \
task's logmon FIFOs (drained by reader threads) before timing, then times StartTask → WaitTask \
(DestroyTask afterwards, untimed). Alloc dir and daemon state dir on disk (ext4), the daemon's \
run dir on tmpfs (`/dev/shm`, as `/run/elide/exec` is on a systemd host). Cold baseline: `{}` / `{}` spawned directly, output to /dev/null, with the environment a task \
gets (`PATH` and `HOME` only), not the bench's own (see the daemon section); each row's \
baseline is 60 spawns, half just before its samples and half just after (this VM's speed drifts \
by the minute).\n\n\
| budget | measured | verdict |\n|---|---|---|\n{budgets}\n\
| language | context_pool_size | median | p99 | cold interpreter median | speed-up |\n|---|---|---|---|---|---|\n{rows}\n\
### Sustained short python tasks through plugin + daemon (`pass`, 4 concurrent callers, 5 s)\n\n\
Each caller plays a Nomad task runner: StartTask → WaitTask → DestroyTask, one task after the \
other, laying out its next task (dirs, logmon FIFOs and their readers) on a thread of its own \
meanwhile, as Nomad's task runners work concurrently. The stand-in's alloc dir lies on disk in \
the first row and on tmpfs in the second; the budget is read off the second. Laying out a \
task is Nomad's work, not the driver's, and on this VM's root ext4 (85% full, heavy churn from \
test runs) its `mkdir` and `mkfifo` spend most of their time in ext4's inode allocator \
(`recently_deleted`, `find_get_block_common`: a third of all CPU samples during the window, \
`perf record -a`), which the driver's share of the 2 cores then lacks. CPU per task, from \
`/proc/<pid>/stat` over the window: python = the zygotes with the children they reaped \
(executions, spares); the stand-in = this harness (its RPCs, task layout, logmon threads). \
Two cores give 2,000 ms of CPU per second: at 300 tasks/s, 6.7 ms per task for all four.\n\n\
| stand-in's alloc dir | tasks/s | CPU per task: python | daemon | plugin | Nomad stand-in |\n|---|---|---|---|---|---|\n{throughputs}\n\
### Memory per running idle snippet through plugin + daemon, N = {MEM_N}\n\n\
PSS (smaps_rollup) of the plugin, the daemon and every descendant of the daemon (zygote, \
spares, node workers, executions, reaper), / N, with the tasks started through StartTask at \
`context_pool_size = 4`; next to N cold interpreters. The plugin's session warms every enabled \
language, so with the default `enabled_languages` (all three) its idle node workers and zygote \
spares are part of both figures; the last rows are a session that enables python only (the daemon \
section measures single-language sessions), and that session with `merge_identical_pages = true` \
while ksmd runs (switched on for that row and put back after), measured once merging settled.\n\n\
| language | plugin + daemon + children / N | cold interpreter | share |\n|---|---|---|---|\n{memory}{END}\n",
        python.display(),
        node.display()
    )
}
