//! Isolation and limits for one execution: cgroups, Landlock filesystem confinement, network
//! namespaces, user switching, output sinks, signal names, and the single `pre_exec` that applies
//! them all to a `std::process::Command`.
//!
//! The daemon resolves and opens everything it can in the parent ([`user::resolve_user`],
//! [`sink::open_sink`], [`cgroup::CgroupManager::create`]), fills an [`IsolationSpec`], and calls
//! [`IsolationSpec::apply`]. [`IsolationSpec::plan`] describes the same steps as data so another
//! launcher (the future Python zygote) can replay them.
//!
//! # Intrinsics (what a snippet may use; all enforced by the kernel, not by convention)
//! - `env` off: the child starts from `PATH`, `HOME`, `LANG` (and `USER`/`LOGNAME` when switching
//!   to a named user) plus the variables set explicitly on the command; nothing of the daemon's
//!   environment leaks.
//! - `io` off: Landlock (ABI ≥ 1) denies every filesystem access except: read/execute of system
//!   libraries and binaries ([`landlock_rules::SYSTEM_READ_PATHS`]: /usr, /lib*, /bin, /sbin,
//!   ld.so cache, TLS certificates and openssl.cnf, localtime, resolv.conf/hosts/nsswitch,
//!   passwd/group, machine-wide /proc info files, the child's own /proc/self (never other
//!   processes'), CPU and cgroup info in /sys, /dev/urandom) and of the runtime's install dirs
//!   (`read_paths`); read/write of the working dir, `write_paths` and /dev/null.
//!   Abstract Unix sockets outside the sandbox are unreachable too (ABI ≥ 6).
//!   `TMPDIR` points at the working dir. Without Landlock, `apply` fails rather than running
//!   unconfined.
//! - `net` off: a fresh network namespace holding only `lo` (up): the host's interfaces and its
//!   loopback services are unreachable; the snippet can still use loopback among its own
//!   processes. With `net` on and a `network_namespace`, the child joins that namespace (Nomad
//!   bridge/group networking); otherwise it shares the host network.
//!
//! # Always applied
//! Own session and process group; the execution cgroup(s) joined before anything else runs;
//! signal dispositions reset; core dumps off; `oom_score_adj` 0; SIGKILL when the spawning
//! thread dies; `no_new_privs`; the requested user, group and supplementary groups; stdin from
//! /dev/null; stdout/stderr on the sinks; no other inherited fd; the open-file limit the
//! daemon was started with (it raises its own: [`open_files`]); a Landlock domain of its own
//! (ABI ≥ 6; with `io` on it confines nothing on the filesystem), so the execution cannot
//! signal or ptrace the daemon or another execution, nor open their `/proc/<pid>/mem`, even
//! as the same user (see [`landlock_rules`] for what `/proc` still shows with `io` on); the
//! seccomp filter of [`syscall_filter`], where the machine takes one.
//! An operator's exec session and the daemon's own helpers differ where [`Role`] says.
//!
//! # Machine support
//! [`probe::probe`] reports what this machine enforces. cgroup v2 (memory/cpu/pids delegated)
//! and v1 (per-controller hierarchies) are both supported; with neither, executions run without
//! cgroup limits and the probe says so.

pub mod caps;
pub mod cgroup;
pub mod cpus;
pub mod landlock_rules;
pub mod netns;
pub mod open_files;
pub mod page_merge;
pub mod probe;
pub mod proc_stat;
pub mod signal;
pub mod sink;
pub mod spawn;
pub mod syscall_filter;
pub mod user;

pub use spawn::{Intrinsics, IsolationPlan, IsolationSpec, PlanStep, Role};

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

/// A pidfd of process `pid`: it keeps naming that process even once its pid is reused.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `signal` to the process `pidfd` names (never to another that took its pid since).
pub fn pidfd_send_signal(pidfd: &OwnedFd, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal with a pidfd the caller owns and no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            std::os::fd::AsRawFd::as_raw_fd(pidfd),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Everything that can go wrong while preparing an isolated execution.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Landlock(#[from] landlock_rules::LandlockError),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error(transparent)]
    User(#[from] user::UserError),
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    /// The working directory is unusable.
    #[error("working_dir {path:?}: {reason}")]
    WorkingDir { path: PathBuf, reason: String },
    /// The requested isolation needs privileges the daemon does not have.
    #[error("{what} needs {needs}")]
    Privilege { what: String, needs: &'static str },
    /// A file the child needs could not be opened in the parent.
    #[error("cannot open {what} {path:?}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
