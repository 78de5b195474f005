//! The reaper: a small companion process (`elide-daemon __reaper`) that outlives the daemon only
//! to clean up after it. PR_SET_PDEATHSIG kills an execution's first process when the daemon
//! dies, but not what that process forked (a `setsid` grandchild escapes the process group
//! too). The reaper holds the read end of a pipe whose only writer is the daemon; when the
//! daemon exits for any reason — including SIGKILL — the pipe reaches EOF and the reaper kills
//! every execution cgroup and process group the daemon left.
//!
//! Handover on restart: the reaper holds `reaper.lock` in the state dir from its start until its
//! cleanup is done. A new daemon's reaper must take that lock before the new daemon proceeds, so
//! a new execution can never be caught by the previous daemon's cleanup.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use crate::sandbox::cgroup::CgroupManager;

use super::state::StateStore;

/// A running reaper; dropping it (or the daemon dying) triggers the cleanup.
pub struct Reaper {
    _lifeline: ChildStdin,
    _child: Child,
}

/// How long a new daemon waits for a previous daemon's reaper to finish.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

impl Reaper {
    /// Starts the reaper for a daemon using `state_dir` and cgroups `parent` under `root`, and
    /// waits until it holds the handover lock.
    pub fn start(
        state_dir: &Path,
        cgroup_root: &Path,
        cgroup_parent: &str,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("__reaper")
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--cgroup-root")
            .arg(cgroup_root)
            .arg("--cgroup-parent")
            .arg(cgroup_parent)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // Own session: a Ctrl-C or group kill aimed at the daemon must not take the reaper first.
        cmd.process_group(0);
        let mut child = cmd.spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            anyhow::bail!("reaper started without pipes");
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(HANDOVER_TIMEOUT) {
            Ok(line) if line.trim() == "ready" => Ok(Self {
                _lifeline: stdin,
                _child: child,
            }),
            Ok(line) => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("the reaper failed to start (said {line:?})")
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!(
                    "the previous daemon's cleanup still holds {}/reaper.lock after {:?}",
                    state_dir.display(),
                    HANDOVER_TIMEOUT
                )
            }
        }
    }
}

/// Body of `elide-daemon __reaper`: lock, report ready, wait for the daemon to go, clean up.
pub fn run(state_dir: PathBuf, cgroup_root: PathBuf, cgroup_parent: String) -> anyhow::Result<()> {
    let lock_path = state_dir.join("reaper.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    let _lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", lock_path.display()))?;
    println!("ready");
    // Until EOF: the daemon holds the only writer.
    let mut sink = [0u8; 64];
    let mut stdin = std::io::stdin().lock();
    loop {
        match stdin.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    cleanup(&state_dir, &cgroup_root, &cgroup_parent);
    Ok(())
}

/// Kills what a dead daemon left: process groups of executions it recorded as running (when
/// the pid still is that process), then every execution cgroup under its parent, then the
/// parent itself when nothing else uses it.
pub fn cleanup(state_dir: &Path, cgroup_root: &Path, cgroup_parent: &str) {
    if let Ok(store) = StateStore::open_readonly(state_dir) {
        for rec in store.load_executions() {
            if rec.result.is_none()
                && rec.pid != 0
                && rec.pid_start_ticks != 0
                && super::launcher::start_ticks(rec.pid) == rec.pid_start_ticks
            {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(rec.pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let cgroups = CgroupManager::detect_at(cgroup_root, cgroup_parent);
    if let Err(e) = cgroups.reap_stale() {
        eprintln!("elide-daemon reaper: {e}");
    }
    // A stopped daemon leaves no cgroup behind; the kernel keeps a parent that is still in use.
    if let Err(e) = cgroups.remove_parent() {
        eprintln!("elide-daemon reaper: {e}");
    }
}
