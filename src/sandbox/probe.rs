//! What this machine can enforce, measured rather than assumed, for DaemonInfo and startup logs.

use super::cgroup::CgroupManager;
use super::landlock_rules;
use serde::{Deserialize, Serialize};

/// One isolation feature and whether executions get it on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    /// Stable name: "cgroup", "landlock", "netns", "userns", "setuid", "seccomp", "pidns".
    pub name: String,
    /// True when the daemon applies it to executions that ask for it.
    pub enforced: bool,
    /// Version, mode or the reason it is missing.
    pub detail: String,
}

fn feature(name: &str, enforced: bool, detail: impl Into<String>) -> Feature {
    Feature {
        name: name.to_string(),
        enforced,
        detail: detail.into(),
    }
}

/// Forks a child that calls `unshare(flags)` and reports whether it succeeded.
///
/// Done in a throwaway child because some namespaces (user) cannot be entered by a
/// multi-threaded process and because we must not change the daemon's own namespaces.
fn can_unshare(flags: libc::c_int) -> Result<(), String> {
    // SAFETY: the child only calls async-signal-safe functions (unshare, _exit).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork failed: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: in the forked child; exits immediately.
        unsafe {
            let code = if libc::unshare(flags) == 0 { 0 } else { 1 };
            libc::_exit(code);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting for the child we just forked.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(format!(
                "waitpid failed: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        Err("unshare was refused by the kernel".to_string())
    }
}

/// Probes every feature. Cheap (two short-lived forks); call once at daemon start.
pub fn probe(cgroups: &CgroupManager) -> Vec<Feature> {
    let mut out = Vec::new();
    let usable = cgroups.mode() != super::cgroup::CgroupMode::None && cgroups.writable();
    out.push(feature(
        "cgroup",
        usable,
        if usable || cgroups.mode() == super::cgroup::CgroupMode::None {
            cgroups.describe()
        } else {
            format!("{}; not writable by this daemon", cgroups.describe())
        },
    ));
    let abi = landlock_rules::abi_version();
    out.push(if landlock_rules::domains_available() {
        feature(
            "landlock",
            true,
            format!("ABI {abi}; every execution a domain of its own (signals and ptrace scoped)"),
        )
    } else if abi >= 1 {
        feature(
            "landlock",
            true,
            format!(
                "ABI {abi}; filesystem confinement only (executions with io on are not scoped \
                 from each other: that needs ABI 6, Linux 6.12)"
            ),
        )
    } else {
        feature(
            "landlock",
            false,
            "Landlock is not available in this kernel",
        )
    });
    out.push(match can_unshare(libc::CLONE_NEWNET) {
        Ok(()) => feature("netns", true, "private network namespace with loopback"),
        Err(e) => feature("netns", false, e),
    });
    out.push(match can_unshare(libc::CLONE_NEWUSER) {
        // Not used by executions yet: reported for operators and future rootless mode.
        Ok(()) => feature("userns", false, "available, not used"),
        Err(e) => feature("userns", false, e),
    });
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    out.push(if euid == 0 {
        feature(
            "setuid",
            true,
            "daemon runs as root: executions can switch user",
        )
    } else {
        feature(
            "setuid",
            false,
            format!("daemon runs as uid {euid}: executions keep that user"),
        )
    });
    out.push(match super::syscall_filter::filter() {
        Ok(_) => feature("seccomp", true, super::syscall_filter::describe()),
        Err(why) => feature("seccomp", false, why),
    });
    out.push(feature("pidns", false, "not used yet"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_every_feature_once() {
        let m = CgroupManager::detect("elide-probe-test");
        let f = probe(&m);
        let names: Vec<&str> = f.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "cgroup", "landlock", "netns", "userns", "setuid", "seccomp", "pidns"
            ]
        );
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 && m.mode() != crate::sandbox::cgroup::CgroupMode::None {
            assert!(f[0].enforced, "root can create cgroups: {:?}", f[0]);
        }
        // This machine takes the syscall filter, and the report lists what it refuses.
        assert!(f[5].enforced, "{:?}", f[5]);
        assert!(
            f[5].detail.contains("io_uring_setup, io_uring_enter"),
            "{:?}",
            f[5]
        );
        let fake = tempfile::tempdir().expect("tempdir");
        let none = probe(&CgroupManager::detect_at(fake.path(), "elide"));
        assert!(!none[0].enforced);
        assert!(none[0].detail.contains("no usable cgroup"), "{:?}", none[0]);
        let landlock = &f[1];
        assert_eq!(landlock.enforced, landlock_rules::abi_version() >= 1);
        assert_eq!(
            landlock
                .detail
                .contains("every execution a domain of its own"),
            landlock_rules::domains_available(),
            "{landlock:?}"
        );
        assert!(f.iter().all(|f| !f.detail.is_empty()));
        println!("{}", serde_json::to_string_pretty(&f).unwrap_or_default());
    }
}
