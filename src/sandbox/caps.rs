//! The Linux capabilities an execution keeps.
//!
//! Tasks without a `user` run as the daemon's user, root on a Nomad node. Without this, such a
//! snippet held every capability: it could mount filesystems, enter or make namespaces, load
//! kernel modules, set the clock, or change the host's routes and firewall. An execution keeps
//! the set Nomad's `exec` driver grants by default ([`KEPT`]) and loses the rest from its
//! effective, permitted, inheritable and ambient sets, and from its bounding set where the
//! daemon may change that (`CAP_SETPCAP`). With `no_new_privs`, which every execution has, an
//! exec cannot bring them back (the kernel caps what an exec grants at the permitted set).
//!
//! Dropped before the user switch: `CAP_SETUID` and `CAP_SETGID` are kept for it, and a switch
//! to another user clears the rest anyway.

/// Capabilities an execution keeps (number, name): Nomad's `exec` driver default `allow_caps`.
pub const KEPT: &[(u32, &str)] = &[
    (0, "chown"),
    (1, "dac_override"),
    (3, "fowner"),
    (4, "fsetid"),
    (5, "kill"),
    (6, "setgid"),
    (7, "setuid"),
    (8, "setpcap"),
    (10, "net_bind_service"),
    (18, "sys_chroot"),
    (27, "mknod"),
    (29, "audit_write"),
    (31, "setfcap"),
];

const CAP_SETPCAP: u32 = 8;

/// [`KEPT`] as a bit mask.
pub fn kept_mask() -> u64 {
    KEPT.iter().fold(0, |m, (c, _)| m | 1 << c)
}

/// A capability set of this process from `/proc/self/status` (`CapEff`, `CapBnd`...); 0 when
/// it cannot be read.
pub fn own_set(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .unwrap_or(0)
}

/// What a child of this process drops from its bounding set: everything in ours beyond
/// [`KEPT`], or nothing when we may not change bounding sets (no `CAP_SETPCAP`; then
/// `no_new_privs` alone keeps execs from regaining capabilities). Read once.
pub fn bounding_drops() -> &'static [u32] {
    static DROPS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    DROPS.get_or_init(|| {
        if own_set("CapEff") & (1 << CAP_SETPCAP) == 0 {
            return Vec::new();
        }
        let drop = own_set("CapBnd") & !kept_mask();
        (0..64).filter(|c| drop & (1 << c) != 0).collect()
    })
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets as two 32-bit halves.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// In a forked child before exec: drops `bounding_drop` from the bounding set, clears the
/// ambient set and narrows the effective, permitted and inheritable sets to `keep`. The error
/// names the step, with errno. Async-signal-safe: syscalls on stack data only.
pub fn limit(keep: u64, bounding_drop: &[u32]) -> Result<(), (&'static [u8], i32)> {
    let errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY: prctl, capget and capset with integer arguments and pointers to stack values
    // that outlive the calls.
    unsafe {
        for &cap in bounding_drop {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0 {
                return Err((b"prctl CAPBSET_DROP", errno()));
            }
        }
        // EINVAL: a kernel without ambient capabilities (before 4.3) has none to clear.
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
            && errno() != libc::EINVAL
        {
            return Err((b"prctl CAP_AMBIENT_CLEAR_ALL", errno()));
        }
        let mut header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
            return Err((b"capget", errno()));
        }
        for (half, d) in data.iter_mut().enumerate() {
            let k = (keep >> (32 * half)) as u32;
            d.effective &= k;
            d.permitted &= k;
            d.inheritable &= k;
        }
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err((b"capset", errno()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The effective set, read with capget (no allocation).
    fn effective() -> u64 {
        let mut header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: capget writes two CapData into `data`.
        unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
        u64::from(data[0].effective) | u64::from(data[1].effective) << 32
    }

    #[test]
    fn the_kept_set_is_nomads_exec_default() {
        // chown dac_override fowner fsetid kill setgid setuid setpcap net_bind_service
        // sys_chroot mknod audit_write setfcap
        assert_eq!(kept_mask(), 0xa804_05fb);
    }

    #[test]
    fn a_forked_child_keeps_only_the_kept_set() {
        let drops = bounding_drops();
        // SAFETY: the child runs async-signal-safe code only and ends with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // Nothing here allocates: the parent has other threads.
            let code = match limit(kept_mask(), drops) {
                Ok(()) if effective() & !kept_mask() == 0 => 0,
                Ok(()) => 1,
                Err(_) => 2,
            };
            // SAFETY: ends the child.
            unsafe { libc::_exit(code) };
        }
        let st = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
        assert_eq!(
            st,
            nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(pid), 0)
        );
    }
}
