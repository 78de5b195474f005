//! Plugin startup benchmark: handshake-line latency after exec and plugin RSS after SetConfig
//! (plus the first Fingerprint), over N launches of the real binary, the way Nomad launches it.
//!
//! `cargo bench --bench plugin_startup` (N from `BENCH_N`, default 50). Prints a markdown
//! section and, with `BENCH_WRITE=path`, replaces this benchmark's section in that file.
//! Budgets (ARCHITECTURE.md): handshake ≤ 20 ms, RSS ≤ 10 MiB.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::{machine, percentile, proc_kib, write_section};
use serde_json::json;
use support::{Launch, NomadClient, PluginProcess, short_tempdir};

const HANDSHAKE_BUDGET_MS: f64 = 20.0;
const RSS_BUDGET_KIB: u64 = 10 * 1024;
const BEGIN: &str = "<!-- plugin_startup:begin -->";
const END: &str = "<!-- plugin_startup:end -->";

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not: then this is only a
    // smoke run (a few launches, nothing written), so `make test` stays quick.
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let default_n = if bench_mode { 50 } else { 3 };
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_n);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let absent = short_tempdir();
    let daemon_socket = absent.path().join("no-daemon.sock");

    // Warm the page cache once so the first sample does not measure disk reads.
    {
        let dir = short_tempdir();
        let p = PluginProcess::spawn(&Launch::default(), dir.path());
        let _ = p.read_handshake(support::DEADLINE);
    }

    let mut handshake_ms = Vec::with_capacity(n);
    let mut rss_kib = Vec::with_capacity(n);
    let mut hwm_kib = Vec::with_capacity(n);
    for _ in 0..n {
        let dir = short_tempdir();
        let start = Instant::now();
        let p = PluginProcess::spawn(&Launch::default(), dir.path());
        let hs = p.read_handshake(support::DEADLINE).expect("handshake");
        handshake_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        drop(p);
        let _ = hs;

        let (rss, hwm) = rt.block_on(async {
            let c = NomadClient::launch().await;
            c.set_config(
                json!({"daemon_socket": daemon_socket.display().to_string(), "daemon": {"auto_start": false}}),
                true,
            )
            .await
            .expect("SetConfig");
            let mut fp = c.fingerprint().await;
            support::next_within(&mut fp, Duration::from_secs(30))
                .await
                .expect("fingerprint");
            let pid = c.process.child.id();
            (
                proc_kib(pid, "status", "VmRSS"),
                proc_kib(pid, "status", "VmHWM"),
            )
        });
        rss_kib.push(rss as f64);
        hwm_kib.push(hwm as f64);
    }
    for v in [&mut handshake_ms, &mut rss_kib, &mut hwm_kib] {
        v.sort_by(f64::total_cmp);
    }
    let hs_med = percentile(&handshake_ms, 50.0);
    let hs_p99 = percentile(&handshake_ms, 99.0);
    let rss_med = percentile(&rss_kib, 50.0);
    let rss_p99 = percentile(&rss_kib, 99.0);
    let hwm_p99 = percentile(&hwm_kib, 99.0);
    let verdict = |ok: bool| if ok { "within budget" } else { "OVER BUDGET" };
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release (bench profile)"
    };
    let section = format!(
        "{BEGIN}\n## Plugin startup (`cargo bench --bench plugin_startup`, `make bench`)\n\n\
Machine: {}. Binary: {profile}. N = {n} launches; each launch as Nomad does it (go-plugin env, \
stdout pipe, socket in a temp dir). RSS is read from `/proc/<pid>/status` after `SetConfig` with \
`nomad_config` (daemon absent) and the first `Fingerprint` message.\n\n\
| metric | median | p99 | budget | verdict |\n|---|---|---|---|---|\n\
| handshake line after exec | {hs_med:.2} ms | {hs_p99:.2} ms | ≤ {HANDSHAKE_BUDGET_MS} ms | {} |\n\
| plugin RSS after SetConfig | {:.2} MiB | {:.2} MiB | ≤ 10 MiB | {} |\n\
| plugin peak RSS (VmHWM) | | {:.2} MiB | | |\n{END}\n",
        machine(),
        verdict(hs_p99 <= HANDSHAKE_BUDGET_MS),
        rss_med / 1024.0,
        rss_p99 / 1024.0,
        verdict(rss_p99 <= RSS_BUDGET_KIB as f64),
        hwm_p99 / 1024.0,
    );
    println!("{section}");
    if !bench_mode {
        return;
    }
    write_section(BEGIN, END, &section);
}
