//! Keeps the daemon's own executions off its socket.
//!
//! The socket admits the uids in `allowed_uids`, root among them, and a task without `user` runs
//! as root. Landlock confines connecting to a socket by its path only from ABI 9, and a private
//! network namespace does not hide a socket file: without this guard, a task without `io` could
//! connect to the daemon, start an execution with every intrinsic, and stop, signal or exec into
//! every other task on the node.
//!
//! A connecting process is taken for an execution (or a pool process that becomes one) when
//! - its cgroup lies below the daemon's parent in any hierarchy: leaving it takes a write to
//!   cgroupfs, which Landlock denies a task without `io`; or
//! - the daemon is among its ancestors: every execution starts below it, also on a node without
//!   cgroups, where this is the only sign (a process that double-forks away from its parent
//!   loses it, which the README says).
//!
//! A task as root with `io` on owns the host's files anyway (README, Isolation), so this is no
//! fence against it: it can leave its cgroup first.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::task::{Context, Poll};

use tokio::net::{UnixListener, UnixStream};

use crate::paced_accept::Accept;
use crate::sandbox::cgroup::CgroupManager;
use crate::sandbox::proc_stat::ProcStat;

/// `SO_PEERPIDFD` (Linux 6.5; the same number on every architecture the daemon supports).
const SO_PEERPIDFD: libc::c_int = 77;

/// How far up the process tree [`descends_from`] looks.
const MAX_DEPTH: usize = 256;

/// Decides which connecting processes the daemon refuses.
#[derive(Clone)]
pub struct PeerGuard {
    cgroups: CgroupManager,
    daemon_pid: u32,
}

impl PeerGuard {
    /// A guard for the daemon running in this process, whose executions live in `cgroups`.
    pub fn new(cgroups: CgroupManager) -> Self {
        Self {
            cgroups,
            daemon_pid: std::process::id(),
        }
    }

    /// Why `pid` may not connect, if it may not.
    pub fn refusal_of(&self, pid: u32) -> Option<&'static str> {
        if self.cgroups.holds_process(pid) {
            Some("it runs in one of the daemon's execution cgroups")
        } else if descends_from(pid, self.daemon_pid) {
            Some("the daemon started it")
        } else {
            None
        }
    }

    /// Why the peer of `conn` may not connect, if it may not (with its pid).
    fn refusal(&self, conn: &UnixStream) -> Option<(u32, &'static str)> {
        // A peer in a pid namespace we cannot see shows as 0: nothing to check, as for a
        // peer without credentials (the uid check refuses that one).
        let pid = conn
            .peer_cred()
            .ok()?
            .pid()
            .and_then(|p| u32::try_from(p).ok())
            .filter(|&p| p > 0)?;
        // Pin the peer before looking it up, so its pid cannot name another process by then.
        let pinned = peer_pidfd(conn);
        if let Some(why) = self.refusal_of(pid) {
            return Some((pid, why));
        }
        match pinned {
            Some(fd) if crate::sandbox::pidfd_send_signal(&fd, 0).is_err() => {
                Some((pid, "it exited before it could be checked"))
            }
            _ => None,
        }
    }
}

/// The peer's pidfd, where the kernel hands one out.
fn peer_pidfd(conn: &UnixStream) -> Option<OwnedFd> {
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
    // SAFETY: on success the kernel made a new fd for us.
    (rc == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `ancestor` is among the ancestors of `pid` (`/proc/<pid>/stat`'s parent, up to init).
fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut p = pid;
    for _ in 0..MAX_DEPTH {
        let Some(parent) = parent_of(p) else {
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

fn parent_of(pid: u32) -> Option<u32> {
    ProcStat::of(pid).map(|s| s.ppid)
}

/// A listener that drops connections from the daemon's own executions as it accepts them.
pub struct GuardedListener {
    listener: UnixListener,
    guard: PeerGuard,
}

impl GuardedListener {
    /// Guards `listener` with `guard`.
    pub fn new(listener: UnixListener, guard: PeerGuard) -> Self {
        Self { listener, guard }
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
            // A few small procfs reads: inline (see `blocking`).
            match self.guard.refusal(&conn) {
                Some((pid, why)) => {
                    tracing::warn!(
                        pid,
                        reason = why,
                        "refused a connection to the daemon's socket from one of its own executions"
                    );
                }
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
}
