//! `IsolationSpec::apply` with real child processes (sh, python3): user switching, process
//! group, fds, rlimits, oom_score_adj, environment, parent-death signal, plan as data.

mod sandbox_common;

use elide_task_driver::sandbox::spawn::{MINIMAL_PATH, PlanStep};
use elide_task_driver::sandbox::user::resolve_user;
use elide_task_driver::sandbox::{Intrinsics, SandboxError};
use sandbox_common::{Scratch, describe, python, run, skip, wait};
use std::process::Command;
use std::time::{Duration, Instant};

fn sh(script: &str) -> Command {
    let mut c = Command::new("/bin/sh");
    c.args(["-c", script]);
    c
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn child_runs_as_nobody_with_its_groups() {
    if !is_root() {
        return skip(
            "child_runs_as_nobody_with_its_groups",
            "needs root to switch user",
        );
    }
    let s = Scratch::new();
    let mut spec = s.spec();
    spec.user = Some(resolve_user("nobody").expect("nobody"));
    let (st, out, err) = run(&s, spec, sh("id -u; id -g; id -G"));
    assert!(st.success(), "{} stderr={err}", describe(st));
    assert_eq!(out, "65534\n65534\n65534\n", "stderr={err}");
}

#[test]
fn child_runs_as_dynamic_nomad_user_without_passwd_entry() {
    if !is_root() {
        return skip(
            "child_runs_as_dynamic_nomad_user",
            "needs root to switch user",
        );
    }
    let s = Scratch::new();
    let mut spec = s.spec();
    spec.user = Some(resolve_user("nomad-80123").expect("nomad-N"));
    let (st, out, err) = run(&s, spec, sh("id -u; id -g"));
    assert!(st.success(), "{} stderr={err}", describe(st));
    assert_eq!(out, "80123\n80123\n");
}

#[test]
fn child_leads_its_own_session_and_process_group() {
    let s = Scratch::new();
    let (py, _) = python();
    let mut cmd = Command::new(py);
    cmd.args([
        "-c",
        "import os; p=os.getpid(); print(os.getsid(0)==p, os.getpgrp()==p, os.getpgrp()!=os.getpgid(os.getppid()))",
    ]);
    let (st, out, err) = run(&s, s.spec(), cmd);
    assert!(st.success(), "{} stderr={err}", describe(st));
    assert_eq!(out, "True True True\n");
}

#[test]
fn child_inherits_no_fd_besides_stdio() {
    let s = Scratch::new();
    // An fd deliberately left inheritable in the parent, at a number the child would not
    // reuse by itself.
    let opened = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
    assert!(opened > 2, "open failed");
    let leaked = 900;
    // SAFETY: dup2 onto an unused fd number without O_CLOEXEC.
    assert_eq!(unsafe { libc::dup2(opened, leaked) }, leaked);
    let (py, _) = python();
    let mut cmd = Command::new(py);
    // listdir's own directory fd (the lowest free one, 3) shows up in its listing.
    cmd.args([
        "-c",
        "import os; print(' '.join(sorted(os.listdir('/proc/self/fd'), key=int)))",
    ]);
    let (st, out, err) = run(&s, s.spec(), cmd);
    // SAFETY: closing the fds opened above.
    unsafe {
        libc::close(leaked);
        libc::close(opened);
    }
    assert!(st.success(), "{} stderr={err}", describe(st));
    assert_eq!(
        out.trim(),
        "0 1 2 3",
        "only stdio (plus listdir's fd) expected: {out:?}"
    );
}

#[test]
fn stdin_is_dev_null_and_stdout_stderr_are_the_sinks() {
    let s = Scratch::new();
    let (st, out, err) = run(
        &s,
        s.spec(),
        sh(
            "readlink /proc/self/fd/0; read x && echo got-input; echo to-out; echo to-err >&2; exit 3",
        ),
    );
    assert_eq!(st.code(), Some(3));
    assert_eq!(out, "/dev/null\nto-out\n");
    assert_eq!(err, "to-err\n");
}

#[test]
fn core_dumps_are_disabled_and_oom_score_adj_is_reset() {
    if !is_root() {
        return skip(
            "core_dumps_are_disabled_and_oom_score_adj_is_reset",
            "needs root to lower our own oom_score_adj",
        );
    }
    // Give this test process a non-default score; the child must not inherit it.
    // Raising needs no privilege (lowering needs CAP_SYS_RESOURCE, absent in containers).
    std::fs::write("/proc/self/oom_score_adj", "500").expect("set our oom_score_adj");
    let s = Scratch::new();
    let (st, out, err) = run(&s, s.spec(), sh("ulimit -c; cat /proc/self/oom_score_adj"));
    let _ = std::fs::write("/proc/self/oom_score_adj", "0");
    assert!(st.success(), "{} stderr={err}", describe(st));
    assert_eq!(out, "0\n0\n");
}

#[test]
fn env_off_gives_minimal_environment_plus_explicit_vars() {
    assert!(
        std::env::var_os("CARGO_MANIFEST_DIR").is_some(),
        "cargo sets CARGO_MANIFEST_DIR for tests; the check below relies on an inherited var"
    );
    let s = Scratch::new();
    let mut spec = s.spec();
    spec.intrinsics = Intrinsics {
        env: false,
        ..Intrinsics::ALL
    };
    let mut cmd = Command::new("/usr/bin/env");
    cmd.env("TASK_VAR", "task value");
    let (st, out, err) = run(&s, spec, cmd);
    assert!(st.success(), "{} stderr={err}", describe(st));
    let mut keys: Vec<&str> = out.lines().filter_map(|l| l.split('=').next()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["HOME", "LANG", "PATH", "TASK_VAR"], "{out}");
    assert!(out.contains(&format!("PATH={MINIMAL_PATH}\n")));
    assert!(out.contains("TASK_VAR=task value\n"));

    // env on: inherited variables are visible.
    let s = Scratch::new();
    let (st, out, _) = run(&s, s.spec(), Command::new("/usr/bin/env"));
    assert!(st.success());
    assert!(out.contains("CARGO_MANIFEST_DIR="), "{out}");
}

#[test]
// The child is reaped with waitpid at the end, after checking it died on its own.
#[allow(clippy::zombie_processes)]
fn child_is_killed_when_the_spawning_thread_exits() {
    let s = Scratch::new();
    let spec = s.spec();
    let pid = std::thread::spawn(move || {
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("1000");
        spec.apply(&mut cmd).expect("apply");
        let child = cmd.spawn().expect("spawn");
        child.id()
        // The thread exits here: PDEATHSIG must fire.
    })
    .join()
    .expect("spawner thread");
    let deadline = Instant::now() + Duration::from_secs(30);
    let state = |pid: u32| -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')').next()?.trim().chars().next()
    };
    loop {
        match state(pid) {
            // Dead and not yet reaped (we dropped the Child), or gone.
            None | Some('Z') | Some('X') => break,
            Some(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Some(st) => {
                panic!("child {pid} still alive (state {st}) after its spawning thread exited")
            }
        }
    }
    // Reap it.
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
}

#[test]
fn bad_working_dir_is_an_error_naming_it() {
    let s = Scratch::new();
    let mut spec = s.spec();
    spec.working_dir = "relative/dir".into();
    let err = spec
        .apply(&mut Command::new("/bin/true"))
        .expect_err("relative");
    assert!(matches!(err, SandboxError::WorkingDir { .. }));
    assert!(err.to_string().contains("relative/dir"), "{err}");
    let mut spec = s.spec();
    spec.working_dir = s.dir.path().join("missing");
    let err = spec
        .apply(&mut Command::new("/bin/true"))
        .expect_err("missing");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn failing_step_reports_on_stderr_and_spawn_fails() {
    let s = Scratch::new();
    let mut spec = s.spec();
    // /dev/full opens for writing in the parent but every write fails (ENOSPC) in the child.
    spec.cgroup_procs = vec!["/dev/full".into()];
    let mut cmd = Command::new("/bin/true");
    spec.apply(&mut cmd).expect("apply");
    let err = cmd.spawn().expect_err("pre_exec must fail");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(s.stderr().contains("join cgroup"), "stderr: {}", s.stderr());

    // A file that cannot be opened for writing fails in apply, naming it.
    let mut spec = s.spec();
    spec.cgroup_procs = vec!["/nonexistent-elide/cgroup.procs".into()];
    let err = spec
        .apply(&mut Command::new("/bin/true"))
        .expect_err("open fails");
    assert!(
        err.to_string().contains("/nonexistent-elide/cgroup.procs"),
        "{err}"
    );
}

#[test]
fn plan_lists_steps_in_order_as_json() {
    let s = Scratch::new();
    let mut spec = s.spec();
    spec.user = Some(resolve_user("nobody").expect("nobody"));
    spec.intrinsics = Intrinsics::NONE;
    spec.cgroup_procs = vec!["/sys/fs/cgroup/memory/elide/x/cgroup.procs".into()];
    let plan = spec.plan();
    let names: Vec<String> = plan
        .steps
        .iter()
        .map(|s| {
            serde_json::to_value(s).expect("json")["step"]
                .as_str()
                .expect("tag")
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "chdir",
            "stdio",
            "join_cgroup",
            "reset_signals",
            "new_session",
            "new_netns",
            "set_rlimit",
            "oom_score_adj",
            "limit_capabilities",
            "set_groups",
            "set_gid",
            "set_uid",
            // After the switch, which clears it.
            "parent_death_signal",
            "no_new_privs",
            "landlock",
            "syscall_filter",
            "close_fds_from"
        ]
    );
    assert!(plan.steps.contains(&PlanStep::SetUid { uid: 65534 }));
    assert!(plan.base_env.is_some());
    // net on + a namespace path: join it; net on alone: host network (no step).
    let mut spec = s.spec();
    spec.network_namespace = Some("/proc/self/ns/net".into());
    assert!(spec.plan().steps.contains(&PlanStep::JoinNetns {
        path: "/proc/self/ns/net".into()
    }));
    let host = s.spec().plan();
    assert!(
        !host.steps.iter().any(|s| matches!(
            s,
            PlanStep::JoinNetns { .. } | PlanStep::NewNetns | PlanStep::Landlock { .. }
        )),
        "{host:?}"
    );
    assert_eq!(host.base_env, None);
    assert!(!host.steps.contains(&PlanStep::MergePages), "{host:?}");
    // Offered for page merging: before the capabilities and the user change.
    let mut spec = s.spec();
    spec.merge_pages = true;
    let steps = spec.plan().steps;
    let at = |want: fn(&PlanStep) -> bool| steps.iter().position(want);
    let merge = at(|s| *s == PlanStep::MergePages).expect("a merge_pages step");
    let caps = at(|s| matches!(s, PlanStep::LimitCapabilities { .. })).expect("caps step");
    assert!(merge < caps, "{steps:?}");
    // io on: a Landlock domain without filesystem rules, where the kernel scopes signals.
    assert_eq!(
        host.steps.contains(&PlanStep::LandlockDomain),
        elide_task_driver::sandbox::landlock_rules::domains_available(),
        "{host:?}"
    );
    // An exec session: no domain of its own, oom_score_adj reset, capabilities limited; the
    // daemon's helper (the zygote): none of them (its children limit their own).
    for (role, resets_oom) in [
        (elide_task_driver::sandbox::Role::ExecSession, true),
        (elide_task_driver::sandbox::Role::DaemonHelper, false),
    ] {
        let mut spec = s.spec();
        spec.role = role;
        let steps = spec.plan().steps;
        assert!(
            !steps.contains(&PlanStep::LandlockDomain),
            "{role:?}: {steps:?}"
        );
        assert_eq!(
            steps.contains(&PlanStep::OomScoreAdj { value: 0 }),
            resets_oom,
            "{role:?}: {steps:?}"
        );
        assert_eq!(
            steps
                .iter()
                .any(|s| matches!(s, PlanStep::LimitCapabilities { .. })),
            resets_oom,
            "{role:?}: {steps:?}"
        );
    }
    let json = serde_json::to_string(&plan).expect("serialize");
    let back: elide_task_driver::sandbox::IsolationPlan =
        serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, plan);
}

#[test]
fn a_child_offered_for_page_merging_says_so_and_others_do_not() {
    if !elide_task_driver::sandbox::page_merge::available() {
        return skip(
            "a_child_offered_for_page_merging_says_so",
            "this kernel cannot mark memory mergeable (Linux 6.4+ with KSM)",
        );
    }
    let s = Scratch::new();
    // Read after exec: the flag survives it (Linux 6.7+), as the cold start relies on.
    let read = "grep ksm_merge_any /proc/self/ksm_stat";
    let mut spec = s.spec();
    spec.merge_pages = true;
    let (st, out, err) = run(&s, spec, sh(read));
    assert!(st.success(), "{} stderr={err}", describe(st));
    assert_eq!(out.trim(), "ksm_merge_any: yes");
    let s = Scratch::new();
    let (st, out, err) = run(&s, s.spec(), sh(read));
    assert!(st.success(), "{} stderr={err}", describe(st));
    assert_eq!(out.trim(), "ksm_merge_any: no");
}

#[test]
fn child_killed_by_group_signal_reaches_grandchildren() {
    // The execution is its own process group, so killpg reaches what it forked.
    let s = Scratch::new();
    let mut cmd = sh("sleep 1000 & echo $!; wait");
    s.spec().apply(&mut cmd).expect("apply");
    let mut child = cmd.spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    let grandchild: i32 = loop {
        if let Ok(p) = s.stdout().trim().parse() {
            break p;
        }
        assert!(Instant::now() < deadline, "no grandchild pid");
        std::thread::sleep(Duration::from_millis(20));
    };
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("killpg");
    let st = wait(&mut child, Duration::from_secs(30));
    assert_eq!(describe(st), "signal 9");
    let gone = Instant::now() + Duration::from_secs(30);
    while std::path::Path::new(&format!("/proc/{grandchild}/cmdline")).exists()
        && std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
            .map(|s| !s.contains(") Z"))
            .unwrap_or(false)
    {
        assert!(
            Instant::now() < gone,
            "grandchild {grandchild} survived killpg"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn everything_at_once_nobody_no_io_no_net_in_a_cgroup() {
    if !is_root() {
        return skip("everything_at_once", "needs root");
    }
    use elide_task_driver::sandbox::cgroup::{CgroupLimits, CgroupManager, CgroupMode};
    let s = Scratch::new();
    // The execution's user must own its working dir.
    std::os::unix::fs::chown(s.work(), Some(65534), Some(65534)).expect("chown");
    let parent = format!("elide-test-{}-all", std::process::id());
    let manager = CgroupManager::detect(&parent);
    // Cleans up even when an assertion below fails.
    struct Cleanup(CgroupManager);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = self.0.reap_stale();
            let _ = self.0.remove_parent();
        }
    }
    let _cleanup = Cleanup(manager.clone());
    let cg = (manager.mode() != CgroupMode::None).then(|| {
        manager
            .create(
                "all",
                &CgroupLimits {
                    memory_bytes: Some(256 << 20),
                    cpu_shares: Some(100),
                    pids: Some(32),
                },
            )
            .expect("create cgroup")
    });
    // The pyenv interpreter lives under /root (0700): nobody needs the system one.
    let py = std::path::PathBuf::from("/usr/bin/python3");
    if !py.exists() {
        return skip("everything_at_once", "/usr/bin/python3 is not installed");
    }
    let mut spec = s.spec();
    spec.user = Some(resolve_user("nobody").expect("nobody"));
    spec.intrinsics = Intrinsics::NONE;
    spec.cgroup_procs = cg.as_ref().map(|c| c.self_join_files()).unwrap_or_default();
    let mut cmd = Command::new(py);
    cmd.args([
        "-c",
        "import os, socket\n\
         def denied(f):\n    try:\n        f(); return False\n    except OSError: return True\n\
         print(os.getuid(), os.getgid(),\n\
               denied(lambda: open('/etc/hostname').read()),\n\
               denied(lambda: socket.create_connection(('1.1.1.1', 53), timeout=3)),\n\
               open('/proc/self/cgroup').read().count('all') > 0,\n\
               open('w.txt','w').write('ok'))",
    ]);
    let (st, out, err) = run(&s, spec, cmd);
    if let Some(cg) = cg {
        cg.remove().expect("remove cgroup");
    }
    assert!(st.success(), "{} stderr={err}", describe(st));
    let in_cgroup = if manager.mode() == CgroupMode::None {
        "False"
    } else {
        "True"
    };
    assert_eq!(
        out,
        format!("65534 65534 True True {in_cgroup} 2\n"),
        "stderr={err}"
    );
}

#[test]
fn program_the_user_cannot_execute_is_reported_by_name() {
    if !is_root() {
        return skip(
            "program_the_user_cannot_execute_is_reported_by_name",
            "needs root",
        );
    }
    let s = Scratch::new();
    // Inside a 0700 root-owned directory, like the pyenv interpreters under /root.
    let hidden = s.dir.path().join("private");
    std::fs::create_dir(&hidden).expect("mkdir");
    std::fs::set_permissions(&hidden, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("chmod");
    let prog = hidden.join("tool");
    std::fs::copy("/bin/true", &prog).expect("copy");
    let mut spec = s.spec();
    spec.user = Some(resolve_user("nobody").expect("nobody"));
    let mut cmd = Command::new(&prog);
    spec.apply(&mut cmd).expect("apply");
    let err = cmd.spawn().expect_err("nobody cannot reach the program");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    assert!(
        s.stderr()
            .contains("not executable by the execution's user"),
        "{}",
        s.stderr()
    );
}

#[test]
fn child_starts_with_default_signal_dispositions_and_empty_mask() {
    // Rust ignores SIGPIPE in the parent; a snippet must see defaults (and no blocked signals)
    // so `kill -USR1` and broken pipes behave as they would from a shell.
    let s = Scratch::new();
    let (st, out, err) = run(
        &s,
        s.spec(),
        sh("grep -E '^(SigBlk|SigIgn)' /proc/self/status"),
    );
    assert!(st.success(), "{} stderr={err}", describe(st));
    assert_eq!(
        out,
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    );
}
