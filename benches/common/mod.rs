//! What the benchmarks share: percentiles, the machine line, the real interpreters behind
//! version-manager shims, the cold-spawn baseline and writing a section of BENCHMARKS.md.
#![allow(dead_code)] // each bench uses its own subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `p`th percentile of already sorted samples (nearest rank); NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Median and p99 of a sample.
pub struct Stats {
    pub median: f64,
    pub p99: f64,
    pub n: usize,
}

pub fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.total_cmp(b));
    Stats {
        median: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        n: v.len(),
    }
}

/// `value` with `decimals` decimals, or more where that many would print a value beside `line`
/// as the line itself: a budget missed by 0.004 must not read "10.0×, MISSED".
pub fn against(value: f64, line: f64, decimals: usize) -> String {
    let mut d = decimals;
    loop {
        let shown = format!("{value:.d$}");
        if d >= decimals + 3 || value == line || shown.parse::<f64>() != Ok(line) {
            return shown;
        }
        d += 1;
    }
}

/// CPU, cores, kernel, memory and the load at the start of the run (the machine is shared: the
/// load says how noisy the numbers are).
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "nproc {nproc}, {cpu}, Linux {}, {mem} RAM; load average at start {}",
        kernel.trim(),
        load.join(" ")
    )
}

/// The real binary behind `cmd` (a shim such as pyenv's would add ~100 ms to every cold
/// spawn and flatter the ratios): `cmd args` prints its own executable path.
pub fn resolve(cmd: &str, args: &[&str]) -> PathBuf {
    let out = Command::new(cmd).args(args).output().expect("interpreter");
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    std::fs::canonicalize(&p).unwrap_or(p)
}

pub fn resolve_python() -> PathBuf {
    resolve("python3", &["-c", "import sys; print(sys.executable)"])
}

pub fn resolve_node() -> PathBuf {
    resolve("node", &["-e", "console.log(process.execPath)"])
}

/// What a cold baseline runs: `program` with the environment the benches' executions get (a
/// task's `PATH` and `HOME`), not this process's own. A machine's environment can hold
/// variables that change an interpreter's start-up: where these benches run, it sets
/// `NODE_EXTRA_CA_CERTS`, and every node started with it parses a CA bundle first, tens of ms
/// that no pooled worker pays (a task's environment lacks it, and the daemon runs a task with
/// `NODE_*` variables cold). Like a version-manager shim, it would flatter the ratio.
pub fn baseline_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    for key in BASELINE_ENV {
        if let Some(value) = std::env::var_os(key) {
            cmd.env(key, value);
        }
    }
    cmd
}

/// The variables a cold baseline keeps from this process's environment.
const BASELINE_ENV: [&str; 2] = ["PATH", "HOME"];

/// A cold baseline taken around a measurement of ours: half its spawns just before it, half
/// just after. This VM's speed drifts by the minute: a baseline taken minutes away from the
/// samples it is compared with moved a 10× ratio by a whole point, either way.
pub struct Bracket {
    program: std::path::PathBuf,
    args: Vec<String>,
    half: usize,
    times: Vec<f64>,
}

impl Bracket {
    /// Takes the first half (of `n` spawns) now.
    pub fn before(program: &Path, args: &[&str], n: usize) -> Self {
        let half = n.div_ceil(2);
        Self {
            program: program.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            half,
            times: cold_spawn_times(program, args, half),
        }
    }

    /// Takes the second half, and the baseline of both.
    pub fn after(mut self) -> Stats {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.times
            .extend(cold_spawn_times(&self.program, &args, self.half));
        stats(self.times)
    }
}

/// Cold spawn → exit of `program args`, output to /dev/null, in ms (3 warm-up runs dropped),
/// in the order taken.
fn cold_spawn_times(program: &Path, args: &[&str], n: usize) -> Vec<f64> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n + 3 {
        let t = Instant::now();
        let st = baseline_command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("spawn");
        assert!(st.success());
        if i >= 3 {
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    v
}

/// Replaces the text between `begin` and `end` in the file at `$BENCH_WRITE` with `section`
/// (which carries both markers), or appends it; no-op without `BENCH_WRITE`.
pub fn write_section(begin: &str, end: &str, section: &str) {
    let Ok(path) = std::env::var("BENCH_WRITE") else {
        return;
    };
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n\n".into());
    let new = match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if e > b => format!(
            "{}{}{}",
            &old[..b],
            section.trim_end(),
            &old[e + end.len()..]
        ),
        _ => format!("{}\n\n{}\n", old.trim_end(), section.trim_end()),
    };
    if let Err(e) = std::fs::write(&path, new) {
        eprintln!("cannot write {path}: {e}");
    }
}

/// The KiB value of the `key:` line of a `/proc/<pid>/<file>`; 0 when the process is gone.
pub fn proc_kib(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// PSS of a process (smaps_rollup), in KiB; 0 when it is gone.
pub fn pss_kib(pid: u32) -> u64 {
    proc_kib(pid, "smaps_rollup", "Pss")
}

/// VmRSS of a process, in KiB; 0 when it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    proc_kib(pid, "status", "VmRSS")
}

/// The parent of a process (`/proc/<pid>/stat`), `None` when it is gone.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields follow the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every descendant of `root` (children, their children, ...).
pub fn descendants(root: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Some(pp) = parent_of(pid) {
                parent.insert(pid, pp);
            }
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for (&c, &pp) in &parent {
            if pp == p {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

/// PSS of `n` cold idle interpreters, /N, in KiB.
pub fn cold_idle_pss(program: &Path, args: &[&str], n: usize) -> f64 {
    let mut kids: Vec<_> = (0..n)
        .map(|_| {
            baseline_command(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn")
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let total: u64 = kids.iter().map(|k| pss_kib(k.id())).sum();
    for k in &mut kids {
        let _ = k.kill();
        let _ = k.wait();
    }
    total as f64 / n as f64
}

/// CPU time (ms) a process used so far; with `reaped`, that of the children it reaped too.
pub fn cpu_ms(pid: u32, reaped: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    // Fields 14-17 (utime, stime, cutime, cstime); `rest` starts at field 3.
    let ticks: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse().ok())
        .collect();
    let used: f64 = ticks.iter().take(if reaped { 4 } else { 2 }).sum();
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    used * 1e3 / hz
}

const KSM: &str = "/sys/kernel/mm/ksm";

/// How many pages ksmd looks at per wake-up (every 20 ms) while a bench measures merging; the
/// kernel's default is 100.
pub const PAGE_MERGING_SCAN: u32 = 1000;

/// The host's same-page merging daemon (ksmd) switched on for a measurement at
/// [`PAGE_MERGING_SCAN`], and put back as it was on drop, what it merged unmerged first.
pub struct PageMerging {
    run: String,
    pages_to_scan: String,
}

impl PageMerging {
    /// `None` where the kernel has no KSM or this process may not switch it (not root).
    pub fn switch_on() -> Option<Self> {
        let read = |f: &str| std::fs::read_to_string(format!("{KSM}/{f}")).ok();
        let saved = Self {
            run: read("run")?.trim().to_string(),
            pages_to_scan: read("pages_to_scan")?.trim().to_string(),
        };
        let write = |f: &str, v: &str| std::fs::write(format!("{KSM}/{f}"), v).is_ok();
        (write("pages_to_scan", &PAGE_MERGING_SCAN.to_string()) && write("run", "1"))
            .then_some(saved)
    }

    /// Full scans ksmd has completed since boot.
    pub fn full_scans() -> u64 {
        std::fs::read_to_string(format!("{KSM}/full_scans"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// CPU ksmd has used since boot, in ms.
    pub fn ksmd_cpu_ms() -> f64 {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return 0.0;
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "ksmd")
            })
            .map_or(0.0, |pid| cpu_ms(pid, false))
    }

    /// Waits until merging settled for what `pss` sums (KiB): two full scans, then until a scan
    /// lowers the sum by less than 1%, or `cap` passed. The last sum, the seconds waited and
    /// the CPU ksmd spent meanwhile (ms).
    pub async fn settled(&self, pss: impl Fn() -> u64, cap: Duration) -> (u64, f64, f64) {
        let t = Instant::now();
        let cpu = Self::ksmd_cpu_ms();
        let first = Self::full_scans();
        let mut counted = first;
        let mut last: Option<u64> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let scans = Self::full_scans();
            let timed_out = t.elapsed() >= cap;
            if scans == counted && !timed_out {
                continue;
            }
            counted = scans;
            let now = pss();
            let flat = last.is_some_and(|l| now as f64 > l as f64 * 0.99);
            if (scans >= first + 2 && flat) || timed_out {
                return (now, t.elapsed().as_secs_f64(), Self::ksmd_cpu_ms() - cpu);
            }
            last = Some(now);
        }
    }
}

/// `pss()` now, or, with `merging`, once merging settled (capped at 3 minutes): the sum, and
/// then how long settling took (s) and ksmd's CPU meanwhile (ms).
pub async fn pss_settled(
    merging: Option<&PageMerging>,
    pss: impl Fn() -> u64,
) -> (u64, Option<(f64, f64)>) {
    match merging {
        None => (pss(), None),
        Some(m) => {
            let (total, secs, ksmd_ms) = m.settled(pss, Duration::from_secs(180)).await;
            (total, Some((secs, ksmd_ms)))
        }
    }
}

impl Drop for PageMerging {
    fn drop(&mut self) {
        // "2" unmerges every merged page before ksmd stops.
        let write = |f: &str, v: &str| {
            let _ = std::fs::write(format!("{KSM}/{f}"), v);
        };
        write("run", "2");
        write("run", &self.run);
        write("pages_to_scan", &self.pages_to_scan);
    }
}
