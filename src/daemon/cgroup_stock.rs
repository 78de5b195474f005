//! Execution cgroups made ahead of time. Creating a cgroup on v1 is a mkdir in every hierarchy,
//! and the kernel populates each new directory with its controller's files: ≈ 0.5–1 ms of
//! kernel time per execution on a small VM, on the start's critical path. A background thread
//! keeps a few empty cgroups ready, so a start only writes its limits into one.
//!
//! Stocked cgroups are empty and limitless; nothing of an execution is ever put back (each is
//! used once and removed as before). Stocking starts with the first start that asks, so an idle
//! daemon creates nothing; what is left at exit is reaped like any execution cgroup.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::sandbox::cgroup::{
    CgroupError, CgroupLimits, CgroupManager, CgroupMode, ExecutionCgroup,
};

/// How long the refill thread waits after a failed mkdir before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A few ready execution cgroups, refilled in the background.
pub struct CgroupStock {
    shared: Arc<Shared>,
}

struct Shared {
    cgroups: CgroupManager,
    target: usize,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    ready: Vec<ExecutionCgroup>,
    refilling: bool,
    /// The stock was dropped: the refill thread ends and removes what it still makes.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl CgroupStock {
    /// Keeps up to `target` cgroups of `cgroups` ready (none on a machine without cgroups).
    pub fn new(cgroups: CgroupManager, target: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                cgroups,
                target,
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
            }),
        }
    }

    /// A ready cgroup with `limits` applied, or `None` when the stock is empty or the limits
    /// could not be applied to it (the caller then creates one itself, which reports errors
    /// with the execution's own cgroup name).
    pub fn take(&self, limits: &CgroupLimits) -> Option<ExecutionCgroup> {
        let s = &self.shared;
        if s.target == 0 || s.cgroups.mode() == CgroupMode::None {
            return None;
        }
        let taken = {
            let mut st = s.lock();
            let taken = st.ready.pop();
            if !st.refilling {
                st.refilling = true;
                self.start_refill();
            }
            s.wake.notify_one();
            taken
        }?;
        match taken.set_limits(limits) {
            Ok(()) => Some(taken),
            Err(e) => {
                tracing::debug!(error = %e, "a stocked cgroup refused the limits; creating one");
                let _ = taken.remove();
                None
            }
        }
    }

    fn start_refill(&self) {
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("elide-cgroup-stock".into())
            .spawn(move || refill(shared));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the cgroup stock thread; cgroups are made per start");
        }
    }

    /// Cgroups ready now (tests).
    #[cfg(test)]
    fn ready(&self) -> usize {
        self.shared.lock().ready.len()
    }
}

impl Drop for CgroupStock {
    fn drop(&mut self) {
        let ready = {
            let mut st = self.shared.lock();
            st.closed = true;
            std::mem::take(&mut st.ready)
        };
        self.shared.wake.notify_all();
        for cg in ready {
            let _ = cg.remove();
        }
    }
}

/// A new empty cgroup, not yet tied to an execution (`w-<uuid>`).
pub fn unnamed_cgroup(cgroups: &CgroupManager) -> Result<ExecutionCgroup, CgroupError> {
    let name = format!("w-{}", uuid::Uuid::new_v4().simple());
    cgroups.create(&name, &CgroupLimits::default())
}

/// The refill loop: runs until the stock is dropped.
fn refill(s: Arc<Shared>) {
    loop {
        {
            let mut st = s.lock();
            while st.ready.len() >= s.target && !st.closed {
                st = s.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.closed {
                return;
            }
        }
        match unnamed_cgroup(&s.cgroups) {
            Ok(cg) => {
                let mut st = s.lock();
                if st.closed {
                    drop(st);
                    let _ = cg.remove();
                    return;
                }
                st.ready.push(cg);
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot stock an execution cgroup");
                std::thread::sleep(RETRY_AFTER);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroup v2 root with the controllers delegated.
    fn v2_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::write(dir.path().join("cgroup.subtree_control"), "").unwrap();
        dir
    }

    fn eventually(mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "condition not reached"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_first_take_starts_stocking_and_taken_cgroups_get_the_limits() {
        let root = v2_root();
        let mgr = CgroupManager::detect_at(root.path(), "elide-stock-test");
        if mgr.mode() != CgroupMode::V2 {
            eprintln!("SKIPPED: fake v2 root not detected as v2");
            return;
        }
        let stock = CgroupStock::new(mgr, 2);
        let limits = CgroupLimits {
            memory_bytes: Some(64 << 20),
            cpu_shares: None,
            pids: Some(32),
        };
        // Nothing is made before anyone asks.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(stock.ready(), 0);
        assert!(stock.take(&limits).is_none(), "empty at first");
        eventually(|| stock.ready() == 2);
        let cg = stock.take(&limits).expect("a stocked cgroup");
        let dir = &cg.dirs()[0];
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max")).unwrap(),
            (64u64 << 20).to_string()
        );
        assert_eq!(std::fs::read_to_string(dir.join("pids.max")).unwrap(), "32");
        eventually(|| stock.ready() == 2);
        let parent = root.path().join("elide-stock-test");
        let count = || {
            std::fs::read_dir(&parent)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().is_dir())
                .count()
        };
        assert_eq!(count(), 3, "two stocked and the one taken");
        drop(stock);
        assert_eq!(count(), 1, "the stock removes what it did not hand out");
    }
}
