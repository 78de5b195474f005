//! The daemon's open-file limit. Every running execution holds a few descriptors in the daemon
//! (its pidfd, its output pipes or sinks, its cgroup's event file), so the soft limit a service
//! manager hands a process by default (systemd: 1,024) would stop a node near 250 concurrent
//! executions with `EMFILE`. As the Go runtime does for Nomad itself, the daemon raises its soft
//! limit to the hard one at start ([`raise`]), and every process it starts gets the soft limit
//! the daemon was started with back ([`for_children`], a step of every spawn): a snippet sees
//! the limit the operator set, pooled or cold.

use std::sync::OnceLock;

/// `RLIMIT_NOFILE`, soft and hard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// What `open` is held to.
    pub soft: u64,
    /// How far the soft limit may be raised without privilege.
    pub hard: u64,
}

/// What the daemon was started with, once [`raise`] changed its own limit.
static STARTED_WITH: OnceLock<Limits> = OnceLock::new();

/// What [`raise`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raised {
    /// The soft limit already was the hard one (or above what the kernel allows).
    AlreadyAtHard(Limits),
    /// The soft limit went from `was.soft` to `to`.
    Raised {
        /// The limits the daemon was started with.
        was: Limits,
        /// The soft limit now.
        to: u64,
    },
}

/// This process's limits.
pub fn current() -> std::io::Result<Limits> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Limits {
        soft: l.rlim_cur,
        hard: l.rlim_max,
    })
}

/// The soft limit to raise to: the hard limit, but never past what the kernel lets a process
/// open (`fs.nr_open`; a hard limit of "unlimited" cannot be the soft one).
fn target(limits: Limits, nr_open: Option<u64>) -> u64 {
    match nr_open {
        Some(n) => limits.hard.min(n),
        None => limits.hard,
    }
}

/// Raises this process's soft limit to its hard limit, remembering the limits it had for
/// [`for_children`]. Called once, by the daemon at start, before it starts any process.
pub fn raise() -> std::io::Result<Raised> {
    let was = current()?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let to = target(was, nr_open);
    if to <= was.soft {
        return Ok(Raised::AlreadyAtHard(was));
    }
    let raised = libc::rlimit {
        rlim_cur: to,
        rlim_max: was.hard,
    };
    // SAFETY: setrlimit reads one struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // A second call would find the soft limit raised already and return above.
    let _ = STARTED_WITH.set(was);
    Ok(Raised::Raised { was, to })
}

/// The limits a process the daemon starts must get back, when [`raise`] changed the daemon's.
/// An atomic read: safe to call between fork and exec.
pub fn for_children() -> Option<Limits> {
    STARTED_WITH.get().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_the_hard_limit_within_what_the_kernel_allows() {
        let l = Limits {
            soft: 1024,
            hard: 524_288,
        };
        assert_eq!(target(l, Some(1_048_576)), 524_288);
        assert_eq!(target(l, None), 524_288);
        let unlimited = Limits {
            soft: 1024,
            hard: libc::RLIM_INFINITY,
        };
        assert_eq!(target(unlimited, Some(1_048_576)), 1_048_576);
    }

    #[test]
    fn current_reads_a_soft_limit_within_the_hard_one() {
        let l = current().expect("getrlimit");
        assert!(l.soft <= l.hard && l.soft > 0, "{l:?}");
    }
}
