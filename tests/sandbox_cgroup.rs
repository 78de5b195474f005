//! Live cgroup tests with real children. v1 tests run on v1 machines (this VM), v2 tests on
//! v2 machines; each prints "skipped: <reason>" where its mode is absent.

mod sandbox_common;

use elide_task_driver::sandbox::cgroup::{
    CgroupLimits, CgroupManager, CgroupMode, ExecutionCgroup,
};
use sandbox_common::{Scratch, describe, python, skip, wait};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A manager under a parent unique to this test run, so parallel tests (and other
/// developers' daemons using "elide") are never touched; removed on drop.
struct TestManager {
    m: CgroupManager,
}

impl TestManager {
    fn new(tag: &str) -> Self {
        let parent = format!(
            "elide-test-{}-{}-{}",
            std::process::id(),
            tag,
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        TestManager {
            m: CgroupManager::detect(&parent),
        }
    }
}

impl Drop for TestManager {
    fn drop(&mut self) {
        let _ = self.m.reap_stale();
        let _ = self.m.remove_parent();
    }
}

fn live(test: &str, want: CgroupMode) -> Option<TestManager> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "needs root to create cgroups");
        return None;
    }
    let t = TestManager::new(test);
    if t.m.mode() != want {
        skip(
            test,
            &format!(
                "this machine has {} ({}), test needs {}",
                t.m.mode().as_str(),
                t.m.describe(),
                want.as_str()
            ),
        );
        return None;
    }
    Some(t)
}

fn spawn_in(cg: &ExecutionCgroup, s: &Scratch, mut cmd: Command) -> Child {
    let mut spec = s.spec();
    spec.cgroup_procs = cg.self_join_files();
    spec.apply(&mut cmd).expect("apply");
    cmd.spawn().expect("spawn")
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn memory_hog_is_oom_killed(mode: CgroupMode, test: &str) {
    let Some(t) = live(test, mode) else { return };
    let limits = CgroupLimits {
        memory_bytes: Some(64 << 20),
        cpu_shares: Some(512),
        pids: Some(64),
    };
    let cg = t.m.create("hog", &limits).expect("create");
    let s = Scratch::new();
    let (py, _) = python();
    let mut cmd = Command::new(py);
    // Writing the bytes makes the pages real (a zero-filled bytearray could stay virtual).
    cmd.args([
        "-c",
        "x = b'a' * (200 * 1024 * 1024); print('survived', len(x))",
    ]);
    let mut child = spawn_in(&cg, &s, cmd);
    let st = wait(&mut child, Duration::from_secs(120));
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "{} out={} err={}",
        describe(st),
        s.stdout(),
        s.stderr()
    );
    assert!(cg.oom_killed(), "the kill must be attributed to OOM");
    let stats = cg.stats();
    println!("stats after OOM: {stats:?}");
    assert!(
        stats.memory_max_usage_bytes.unwrap_or(0) > 32 << 20,
        "{stats:?}"
    );
    assert!(
        stats.memory_max_usage_bytes.unwrap_or(u64::MAX) <= 64 << 20,
        "{stats:?}"
    );
    cg.remove().expect("remove");
}

#[test]
fn v1_memory_hog_under_64mb_is_oom_killed() {
    memory_hog_is_oom_killed(CgroupMode::V1, "v1_memory_hog_under_64mb_is_oom_killed");
}

#[test]
fn v2_memory_hog_under_64mb_is_oom_killed() {
    memory_hog_is_oom_killed(CgroupMode::V2, "v2_memory_hog_under_64mb_is_oom_killed");
}

fn normal_exit_is_not_oom_and_cpu_is_measured(mode: CgroupMode, test: &str) {
    let Some(t) = live(test, mode) else { return };
    let cg =
        t.m.create(
            "cpu",
            &CgroupLimits {
                memory_bytes: Some(256 << 20),
                cpu_shares: Some(100),
                pids: None,
            },
        )
        .expect("create");
    let s = Scratch::new();
    let (py, _) = python();
    let mut cmd = Command::new(py);
    cmd.args([
        "-c",
        "import time\nend=time.process_time()+0.3\nwhile time.process_time()<end: pass\nx=b'b'*(8<<20)\nprint('done')",
    ]);
    let mut child = spawn_in(&cg, &s, cmd);
    let st = wait(&mut child, Duration::from_secs(120));
    assert!(st.success(), "{} err={}", describe(st), s.stderr());
    assert!(!cg.oom_killed());
    let stats = cg.stats();
    println!("stats: {stats:?} measured={:?}", stats.measured());
    // The loop burns >= 300 ms of user+system time (process_time() itself is a syscall).
    let user_sys = stats.cpu_user_ns.unwrap_or(0) + stats.cpu_system_ns.unwrap_or(0);
    assert!(user_sys >= 250_000_000, "{stats:?}");
    assert!(stats.cpu_user_ns.unwrap_or(0) > 0, "{stats:?}");
    assert!(
        stats.cpu_total_ns.unwrap_or(0) >= stats.cpu_user_ns.unwrap_or(0) / 2,
        "{stats:?}"
    );
    assert!(
        stats.memory_max_usage_bytes.unwrap_or(0) >= 8 << 20,
        "{stats:?}"
    );
    assert!(stats.measured().contains(&"cpu_user_ns"));
    cg.remove().expect("remove");
}

#[test]
fn v1_normal_exit_is_not_oom_and_cpu_is_measured() {
    normal_exit_is_not_oom_and_cpu_is_measured(
        CgroupMode::V1,
        "v1_normal_exit_is_not_oom_and_cpu_is_measured",
    );
}

#[test]
fn v2_normal_exit_is_not_oom_and_cpu_is_measured() {
    normal_exit_is_not_oom_and_cpu_is_measured(
        CgroupMode::V2,
        "v2_normal_exit_is_not_oom_and_cpu_is_measured",
    );
}

fn pids_limit_stops_fork_loop(mode: CgroupMode, test: &str) {
    let Some(t) = live(test, mode) else { return };
    let cg =
        t.m.create(
            "pids",
            &CgroupLimits {
                memory_bytes: None,
                cpu_shares: None,
                pids: Some(16),
            },
        )
        .expect("create");
    let s = Scratch::new();
    let (py, _) = python();
    let mut cmd = Command::new(py);
    cmd.args([
        "-c",
        "import os, time\nok = 0\nfailed = 0\nfor i in range(100):\n    try:\n        pid = os.fork()\n    except OSError:\n        failed += 1\n        continue\n    if pid == 0:\n        time.sleep(1000)\n        os._exit(0)\n    ok += 1\nprint(ok, failed, flush=True)\ntime.sleep(1000)",
    ]);
    let mut child = spawn_in(&cg, &s, cmd);
    let line = wait_for("fork loop result", || {
        let out = s.stdout();
        out.ends_with('\n').then_some(out)
    });
    let nums: Vec<u32> = line
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(nums.len(), 2, "{line:?}");
    assert!(nums[0] < 16, "forks succeeded beyond the limit: {line:?}");
    assert!(
        nums[1] >= 84,
        "forks must fail once the limit is hit: {line:?}"
    );
    let pids = cg.pids();
    assert!(pids.len() <= 16 && pids.len() > 1, "{pids:?}");
    // kill_all takes the parent and every forked child.
    cg.kill_all().expect("kill_all");
    assert!(cg.pids().is_empty());
    let st = wait(&mut child, Duration::from_secs(30));
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    assert!(!cg.oom_killed());
    cg.remove().expect("remove");
}

#[test]
fn v1_pids_limit_stops_a_fork_loop_and_kill_all_kills_everything() {
    pids_limit_stops_fork_loop(
        CgroupMode::V1,
        "v1_pids_limit_stops_a_fork_loop_and_kill_all_kills_everything",
    );
}

#[test]
fn v2_pids_limit_stops_a_fork_loop_and_kill_all_kills_everything() {
    pids_limit_stops_fork_loop(
        CgroupMode::V2,
        "v2_pids_limit_stops_a_fork_loop_and_kill_all_kills_everything",
    );
}

fn kill_all_reaches_escaped_process_groups(mode: CgroupMode, test: &str) {
    let Some(t) = live(test, mode) else { return };
    let cg =
        t.m.create("escape", &CgroupLimits::default())
            .expect("create");
    let s = Scratch::new();
    // A grandchild that leaves the execution's process group (setsid): killpg misses it,
    // the cgroup does not.
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "setsid sleep 1000 & sleep 1000 & echo started; wait"]);
    let mut child = spawn_in(&cg, &s, cmd);
    wait_for("three processes in the cgroup", || {
        (cg.pids().len() >= 3).then_some(())
    });
    let victims = cg.pids();
    cg.kill_all().expect("kill_all");
    assert!(cg.pids().is_empty());
    let st = wait(&mut child, Duration::from_secs(30));
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    for p in victims {
        wait_for("victim gone", || {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok();
            match stat {
                None => Some(()),
                Some(s) if s.contains(") Z ") => Some(()),
                Some(_) => None,
            }
        });
    }
    cg.remove().expect("remove");
}

#[test]
fn v1_kill_all_reaches_processes_that_left_the_group() {
    kill_all_reaches_escaped_process_groups(
        CgroupMode::V1,
        "v1_kill_all_reaches_processes_that_left_the_group",
    );
}

#[test]
fn v2_kill_all_reaches_processes_that_left_the_group() {
    kill_all_reaches_escaped_process_groups(
        CgroupMode::V2,
        "v2_kill_all_reaches_processes_that_left_the_group",
    );
}

fn reap_stale_removes_leftovers(mode: CgroupMode, test: &str) {
    let Some(t) = live(test, mode) else { return };
    let busy =
        t.m.create(
            "left-busy",
            &CgroupLimits {
                memory_bytes: Some(128 << 20),
                ..Default::default()
            },
        )
        .expect("create");
    let empty =
        t.m.create("left-empty", &CgroupLimits::default())
            .expect("create");
    let s = Scratch::new();
    let mut child = spawn_in(&busy, &s, {
        let mut c = Command::new("/bin/sleep");
        c.arg("1000");
        c
    });
    wait_for("sleeper in cgroup", || {
        (!busy.pids().is_empty()).then_some(())
    });
    let dirs: Vec<_> = busy.dirs().into_iter().chain(empty.dirs()).collect();
    // A new daemon instance (fresh manager, same parent) cleans up after the "dead" one.
    let fresh = CgroupManager::detect_at(t.m.root(), &parent_of(&busy));
    assert_eq!(fresh.reap_stale().expect("reap"), 2);
    let st = wait(&mut child, Duration::from_secs(30));
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    for d in dirs {
        assert!(!d.exists(), "{d:?} left behind");
    }
    assert_eq!(fresh.reap_stale().expect("reap again"), 0);
}

fn parent_of(cg: &ExecutionCgroup) -> String {
    cg.dirs()[0]
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .expect("parent name")
}

#[test]
fn v1_reap_stale_kills_and_removes_leftovers() {
    reap_stale_removes_leftovers(CgroupMode::V1, "v1_reap_stale_kills_and_removes_leftovers");
}

#[test]
fn v2_reap_stale_kills_and_removes_leftovers() {
    reap_stale_removes_leftovers(CgroupMode::V2, "v2_reap_stale_kills_and_removes_leftovers");
}

#[test]
fn v1_limits_are_written_to_every_hierarchy() {
    let Some(t) = live("v1_limits_are_written_to_every_hierarchy", CgroupMode::V1) else {
        return;
    };
    let cg =
        t.m.create(
            "limits",
            &CgroupLimits {
                memory_bytes: Some(96 << 20),
                cpu_shares: Some(300),
                pids: Some(40),
            },
        )
        .expect("create");
    let read = |suffix: &str| -> Option<String> {
        cg.dirs()
            .iter()
            .map(|d| d.join(suffix))
            .find(|p| p.exists())
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.trim().to_string())
    };
    assert_eq!(
        read("memory.limit_in_bytes").as_deref(),
        Some((96u64 << 20).to_string().as_str())
    );
    if let Some(memsw) = read("memory.memsw.limit_in_bytes") {
        assert_eq!(memsw, (96u64 << 20).to_string());
    }
    assert_eq!(read("cpu.shares").as_deref(), Some("300"));
    assert_eq!(read("pids.max").as_deref(), Some("40"));
    // One procs file per hierarchy, all existing.
    assert!(cg.procs_files().len() >= 3);
    assert!(cg.procs_files().iter().all(|p| p.exists()));
    cg.remove().expect("remove");
}

#[test]
fn v1_sub_cgroups_created_by_a_root_snippet_are_killed_and_removed() {
    let Some(t) = live(
        "v1_sub_cgroups_created_by_a_root_snippet_are_killed_and_removed",
        CgroupMode::V1,
    ) else {
        return;
    };
    let cg =
        t.m.create("nested", &CgroupLimits::default())
            .expect("create");
    let memory_dir = cg
        .dirs()
        .into_iter()
        .find(|d| d.starts_with("/sys/fs/cgroup/memory"))
        .expect("memory hierarchy");
    let s = Scratch::new();
    let mut cmd = Command::new("/bin/sh");
    cmd.args([
        "-c",
        "mkdir \"$1/sub\" || exit 1; sleep 1000 & echo $! > \"$1/sub/cgroup.procs\" && echo moved; wait",
        "sh",
    ]);
    cmd.arg(&memory_dir);
    let mut child = spawn_in(&cg, &s, cmd);
    wait_for("sleeper moved to the sub-cgroup", || {
        (s.stdout() == "moved\n").then_some(())
    });
    let sub_pids = std::fs::read_to_string(memory_dir.join("sub/cgroup.procs")).expect("sub procs");
    let sleeper: u32 = sub_pids.trim().parse().expect("one pid in sub");
    assert!(
        cg.pids().contains(&sleeper),
        "pids() must include sub-cgroup members"
    );
    cg.remove().expect("remove");
    let st = wait(&mut child, Duration::from_secs(30));
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    assert!(!memory_dir.exists());
    wait_for("sleeper gone", || {
        let stat = std::fs::read_to_string(format!("/proc/{sleeper}/stat")).ok();
        match stat {
            None => Some(()),
            Some(s) if s.contains(") Z ") => Some(()),
            Some(_) => None,
        }
    });
}
