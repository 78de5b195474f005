//! Keeps a node daemon's own executions off the sockets that control them: the daemon's
//! ExecutionAPI socket and the plugin's go-plugin socket.
//!
//! The daemon's socket admits the uids in `allowed_uids`, root among them, and the plugin's
//! socket is only file-permission protected; a task without `user` runs as root. Landlock
//! confines connecting to a socket by its path only from ABI 9, a private network namespace
//! does not hide a socket file, and a task with `net` finds every bound path in
//! `/proc/self/net/unix`. Without this guard a task, even without `io`, could start an execution
//! with every intrinsic, or stop, signal and exec into every other task on the node.
//!
//! A connecting process is taken for an execution (or a pool process that becomes one) when
//! - its cgroup lies below the daemon's parent cgroup in any hierarchy: leaving it takes a
//!   write to cgroupfs, which Landlock denies a task without `io`; or
//! - the daemon is among its ancestors: every execution starts below it, also on a node without
//!   cgroups, where this is the only sign (a process that double-forks away from its parent
//!   loses it, which the README says).
//!
//! A task as root with `io` on owns the host's files anyway (README, Isolation), so this is no
//! fence against it: it can leave its cgroup first.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::{UnixListener, UnixStream};

use crate::paced_accept::Accept;
use crate::sandbox::proc_stat::ProcStat;

/// `SO_PEERPIDFD` (Linux 6.5; the same number on every architecture the daemon supports).
const SO_PEERPIDFD: libc::c_int = 77;

/// How far up the process tree [`descends_from`] looks.
const MAX_DEPTH: usize = 256;

/// How often a listener logs refused connections at most (a task that keeps connecting must
/// not flood the log).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Which processes are a daemon's executions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Executions {
    /// The daemon's pid as this process sees it; None when it is not known here (a daemon in
    /// a pid namespace of its own reports a pid that means nothing outside it).
    pub daemon_pid: Option<u32>,
    /// The daemon's parent cgroup, relative to each hierarchy's root as `/proc/<pid>/cgroup`
    /// shows it (`/elide`); None without cgroups.
    pub cgroup_parent: Option<String>,
}

impl Executions {
    /// Why `pid` counts as one of them, if it does.
    pub fn sign_of(&self, pid: u32) -> Option<&'static str> {
        if self
            .cgroup_parent
            .as_deref()
            .is_some_and(|parent| in_cgroup_below(pid, parent))
        {
            Some("it runs in one of the daemon's execution cgroups")
        } else if self
            .daemon_pid
            .is_some_and(|daemon| daemon > 1 && descends_from(pid, daemon))
        {
            Some("the daemon started it")
        } else {
            None
        }
    }
}

/// What a listener asks of each connecting process: why to refuse it (given its pid), if so.
pub type PeerCheck = Arc<dyn Fn(u32) -> Option<&'static str> + Send + Sync>;

/// Whether `/proc/<pid>/cgroup` places `pid` below `parent` (`/elide`) in any hierarchy.
fn in_cgroup_below(pid: u32, parent: &str) -> bool {
    let below = format!("/{}/", parent.trim_matches('/'));
    crate::sandbox::cgroup::paths_of(pid)
        .iter()
        .any(|path| path.starts_with(&below))
}

/// Whether `ancestor` is among the ancestors of `pid` (`/proc/<pid>/stat`'s parent, up to init).
pub fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut p = pid;
    for _ in 0..MAX_DEPTH {
        let Some(parent) = ProcStat::of(p).map(|s| s.ppid) else {
            return false;
        };
        if parent == ancestor {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        p = parent;
    }
    false
}

/// The peer's pidfd: None where the kernel has no `SO_PEERPIDFD` (before 6.5) or cannot give
/// one now (out of descriptors: the peer is still checked, unpinned), an error where the peer
/// is gone.
fn peer_pidfd(conn: &UnixStream) -> io::Result<Option<OwnedFd>> {
    use std::os::fd::AsRawFd;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the int we own.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 && fd >= 0 {
        // SAFETY: on success the kernel made a new fd for us.
        return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // A reaped peer: EINVAL (6.5 to 6.8 at least), ESRCH.
        Some(libc::EINVAL | libc::ESRCH) => Err(e),
        _ => Ok(None),
    }
}

/// What a refusal says of a peer that cannot be checked: refused all the same (a process
/// that connects and exits before the accept must not slip through).
const GONE: &str = "it exited before it could be checked";

/// Why the peer of `conn` may not connect, if it may not (with its pid).
fn refusal(conn: &UnixStream, check: &PeerCheck) -> Option<(u32, &'static str)> {
    // A peer in a pid namespace we cannot see shows as 0: nothing to check (the daemon's uid
    // check still applies).
    let pid = conn
        .peer_cred()
        .ok()?
        .pid()
        .and_then(|p| u32::try_from(p).ok())
        .filter(|&p| p > 0)?;
    // Pin the peer before looking it up, so its pid cannot name another process by then.
    let Ok(pinned) = peer_pidfd(conn) else {
        return Some((pid, GONE));
    };
    // stat(2) needs no descriptor, so a daemon out of them still tells a gone peer.
    if std::fs::metadata(format!("/proc/{pid}")).is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
    {
        return Some((pid, GONE));
    }
    if let Some(why) = check(pid) {
        return Some((pid, why));
    }
    // Still the process that connected (only a gone one counts: a daemon that may not signal
    // the peer gets EPERM here).
    match pinned.map(|fd| crate::sandbox::pidfd_send_signal(&fd, 0)) {
        Some(Err(e)) if e.raw_os_error() == Some(libc::ESRCH) => Some((pid, GONE)),
        _ => None,
    }
}

/// A listener that drops the connections `check` refuses as it accepts them.
pub struct GuardedListener {
    listener: UnixListener,
    check: PeerCheck,
    /// When a refusal was last logged, and how many went unlogged since.
    warned: Option<Instant>,
    unlogged: u64,
}

impl GuardedListener {
    /// Guards `listener` with `check`.
    pub fn new(listener: UnixListener, check: PeerCheck) -> Self {
        Self {
            listener,
            check,
            warned: None,
            unlogged: 0,
        }
    }

    fn note_refusal(&mut self, pid: u32, why: &str) {
        const WHAT: &str = "refused a connection from one of the daemon's executions";
        if self.warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            self.unlogged += 1;
            tracing::debug!(pid, reason = why, "{WHAT}");
            return;
        }
        tracing::warn!(
            pid,
            reason = why,
            more_since_last_warning = self.unlogged,
            "{WHAT}"
        );
        self.warned = Some(Instant::now());
        self.unlogged = 0;
    }
}

impl Accept for GuardedListener {
    type Conn = UnixStream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<UnixStream>> {
        loop {
            let conn = match self.listener.poll_accept(cx) {
                Poll::Ready(Ok((conn, _))) => conn,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            // A few small procfs reads: inline.
            match refusal(&conn, &self.check) {
                Some((pid, why)) => self.note_refusal(pid, why),
                None => return Poll::Ready(Ok(conn)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_of_this_process_descends_from_it_and_this_process_not_from_its_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let me = std::process::id();
        assert!(descends_from(child.id(), me));
        assert!(!descends_from(me, child.id()));
        // Init descends from nothing; a pid that is no process neither.
        assert!(!descends_from(1, me));
        let _ = child.kill();
        let _ = child.wait();
        assert!(!descends_from(child.id(), me));
    }

    #[test]
    fn this_process_is_in_a_cgroup_below_its_own_cgroups_parent_only() {
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let me = std::process::id();
        // Any hierarchy's path with at least two levels has a parent we sit below.
        let Some(deep) = own
            .lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .find(|p| p.trim_matches('/').contains('/'))
        else {
            eprintln!("SKIPPED: this process sits in no nested cgroup");
            return;
        };
        let parent = &deep[..deep.rfind('/').expect("a slash")];
        assert!(in_cgroup_below(me, parent), "{parent} of {deep}");
        assert!(!in_cgroup_below(me, "/no-such-parent-for-this-test"));
    }
}
