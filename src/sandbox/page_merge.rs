//! Letting the kernel merge identical memory pages across executions (KSM).
//!
//! Forked python children and node workers started from one binary hold many pages with the
//! same bytes: each child copies a page of the zygote when it merely bumps a reference count,
//! and restores the count later. `prctl(PR_SET_MEMORY_MERGE)` (Linux 6.4+) offers every
//! anonymous page of a process to the kernel's same-page merging daemon (`ksmd`), which maps
//! identical ones to one copy, copy-on-write. The setting is inherited across fork and, from
//! Linux 6.7, across exec. ksmd runs only where the host enables it
//! (`/sys/kernel/mm/ksm/run` = 1); its scan rate there decides how fast pages merge.
//!
//! Merged pages let one process time another's writes to a page they share, so only the
//! executions of sessions that ask for it (`merge_identical_pages`) are offered.

use std::sync::OnceLock;

const PR_SET_MEMORY_MERGE: libc::c_int = 67;
const PR_GET_MEMORY_MERGE: libc::c_int = 68;
const KSM_RUN: &str = "/sys/kernel/mm/ksm/run";

/// Whether this kernel can mark a process's memory mergeable (Linux 6.4+ with KSM built in).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    // SAFETY: PR_GET_MEMORY_MERGE only reads this process's flag.
    *AVAILABLE.get_or_init(|| unsafe { libc::prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) } >= 0)
}

/// Whether ksmd is merging pages on this host now (`/sys/kernel/mm/ksm/run` reads 1).
pub fn ksmd_running() -> bool {
    std::fs::read_to_string(KSM_RUN).is_ok_and(|s| s.trim() == "1")
}

/// Offers every anonymous page of the calling process, and of what it forks and execs, for
/// merging. Async-signal-safe (one prctl); the errno on failure.
pub(crate) fn offer_own_memory() -> Result<(), i32> {
    // SAFETY: PR_SET_MEMORY_MERGE changes only this process's memory flags.
    if unsafe { libc::prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merge_flag() -> libc::c_int {
        // SAFETY: reads this process's flag.
        unsafe { libc::prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) }
    }

    #[test]
    fn an_offered_process_and_its_fork_are_mergeable() {
        if !available() {
            eprintln!("skipped: this kernel cannot mark memory mergeable");
            return;
        }
        // SAFETY: the child only calls async-signal-safe functions, then _exit.
        match unsafe { libc::fork() } {
            0 => unsafe {
                let before = merge_flag();
                let offered = offer_own_memory().is_ok();
                let after = merge_flag();
                let inherited = match libc::fork() {
                    0 => libc::_exit(if merge_flag() == 1 { 0 } else { 1 }),
                    pid => {
                        let mut status = 0;
                        libc::waitpid(pid, &mut status, 0);
                        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
                    }
                };
                libc::_exit(if before == 0 && offered && after == 1 && inherited {
                    0
                } else {
                    1
                })
            },
            pid => {
                let mut status = 0;
                // SAFETY: waits for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "{status}");
                assert_eq!(
                    libc::WEXITSTATUS(status),
                    0,
                    "flag not set or not inherited"
                );
            }
        }
    }
}
