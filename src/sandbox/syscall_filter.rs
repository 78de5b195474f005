//! The seccomp filter every process the daemon starts runs under: a short list of system calls
//! a snippet has no use for, refused with EPERM, everything else allowed.
//!
//! Capabilities already keep a task from loading modules or rebooting the node; this list is
//! about what any user may do and what crosses task boundaries anyway:
//! - `io_uring_*`: a large kernel attack surface, whose I/O no filter can inspect (container
//!   runtimes refuse it by default too; node's libuv falls back to its thread pool).
//! - `keyctl`, `add_key`, `request_key`: the kernel's keyrings are per user, not per process or
//!   namespace, so a task could read or plant keys of another task running as the same user.
//! - `bpf`, `perf_event_open`, `userfaultfd`: left to sysctls on most kernels; refused here
//!   whatever those say.
//! - kernel and host administration (`kexec_*`, module loading, `reboot`, `swapon`/`swapoff`,
//!   `acct`): refused even where a capability would allow it.
//!
//! The filter admits only the daemon's own architecture: a system call through another ABI
//! (i386's `int 0x80` on x86_64) kills the process, so no 32-bit program runs in a task and the
//! list cannot be bypassed that way. On x86_64 the x32 numbers of the listed calls are refused
//! too.
//!
//! The filter is built once, in the daemon; [`install`] is async-signal-safe, for `pre_exec`.
//! The python zygote is started under it, so every child it forks inherits it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The refused system calls, by name (for reports) and number on this architecture.
pub const REFUSED: &[(&str, libc::c_long)] = &[
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", SYS_KEXEC_FILE_LOAD),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
];

/// libc does not list it for riscv64, where it has the generic number. (Only x86_64 is built
/// and tested here; the other two architectures seccompiler knows are expected to compile.)
#[cfg(target_arch = "riscv64")]
const SYS_KEXEC_FILE_LOAD: libc::c_long = 294;
#[cfg(not(target_arch = "riscv64"))]
const SYS_KEXEC_FILE_LOAD: libc::c_long = libc::SYS_kexec_file_load;

/// The x32 ABI shares x86_64's architecture value and marks its numbers with this bit.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: libc::c_long = 0x4000_0000;

/// The listed calls whose x32 number is not their x86_64 one (`arch/x86/entry/syscalls/
/// syscall_64.tbl`, the `x32` rows from 512); every other listed call is `common` there.
#[cfg(target_arch = "x86_64")]
const X32_OWN_NUMBERS: &[(&str, libc::c_long)] = &[("kexec_load", 528)];

/// Why executions run without the filter on this machine, or the filter.
pub type Availability = Result<&'static BpfProgram, &'static str>;

static FILTER: OnceLock<Result<BpfProgram, String>> = OnceLock::new();

/// Why [`filter`] is `Err` after [`switch_off`].
pub const SWITCHED_OFF: &str = "switched off in the daemon's config (syscall_filter = false)";

/// Runs every process started from now on without the filter (the daemon's
/// `syscall_filter = false`, for nodes whose tasks need a refused call). Must come before the
/// first start: returns false, changing nothing, once the filter is in use (true where this
/// machine had none to begin with).
pub fn switch_off() -> bool {
    FILTER.set(Err(SWITCHED_OFF.to_string())).is_ok() || filter().is_err()
}

/// The filter for this machine, built on first use; `Err` says why there is none (an
/// architecture seccompiler does not know, a kernel without seccomp filters, [`switch_off`]).
pub fn filter() -> Availability {
    FILTER
        .get_or_init(|| {
            kernel_supports_filters()?;
            build(std::env::consts::ARCH)
        })
        .as_ref()
        .map_err(String::as_str)
}

/// Whether the kernel takes seccomp filters that return an errno or kill the process.
fn kernel_supports_filters() -> Result<(), String> {
    // Listed by kernels with CONFIG_SECCOMP_FILTER (4.14+).
    let actions = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail")
        .map_err(|e| format!("no seccomp filters in this kernel (actions_avail: {e})"))?;
    let have = |a: &str| actions.split_whitespace().any(|x| x == a);
    if have("errno") && have("kill_process") {
        Ok(())
    } else {
        Err(format!(
            "this kernel's seccomp lacks the errno or kill_process action ({})",
            actions.trim()
        ))
    }
}

fn build(arch: &str) -> Result<BpfProgram, String> {
    let target = TargetArch::try_from(arch)
        .map_err(|_| format!("no seccomp filter for the {arch} architecture"))?;
    let mut rules = BTreeMap::new();
    for &(name, nr) in REFUSED {
        rules.insert(nr, Vec::new());
        #[cfg(target_arch = "x86_64")]
        {
            let x32 = X32_OWN_NUMBERS
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(nr, |&(_, own)| own);
            rules.insert(x32 | X32_SYSCALL_BIT, Vec::new());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = name;
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target,
    )
    .map_err(|e| format!("building the seccomp filter: {e}"))?;
    BpfProgram::try_from(filter).map_err(|e| format!("compiling the seccomp filter: {e}"))
}

/// Installs `filter` on the calling thread (and what it execs). Async-signal-safe: a few
/// syscalls on memory prepared before the fork. Sets `no_new_privs`, which the filter needs.
///
/// Asks the kernel not to switch on speculation mitigations for the task on account of the
/// filter (`SECCOMP_FILTER_FLAG_SPEC_ALLOW`): kernels before 5.16 did by default, slowing the
/// task's own stores, a cost cold and pooled tasks alike would pay for a boundary (within one
/// process) that is not the one this sandbox draws.
pub fn install(filter: &BpfProgram) -> Result<(), libc::c_int> {
    #[repr(C)]
    struct SockFprog {
        len: libc::c_ushort,
        filter: *const seccompiler::sock_filter,
    }
    let errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL)
    };
    let len = libc::c_ushort::try_from(filter.len()).map_err(|_| libc::EINVAL)?;
    let prog = SockFprog {
        len,
        filter: filter.as_ptr(),
    };
    // SAFETY: prctl and seccomp read only `prog` and the program it points to, both alive
    // for the call; the kernel copies the program.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(errno());
        }
        let set = |flags: libc::c_ulong| {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &prog as *const SockFprog,
            )
        };
        if set(libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW) == 0 {
            return Ok(());
        }
        // Kernels before 4.17 know no such flag.
        if errno() == libc::EINVAL && set(0) == 0 {
            return Ok(());
        }
    }
    Err(errno())
}

/// What a process the daemon starts under the filter can check it runs under it: `Seccomp_filters`
/// in its `/proc/self/status`, one more than the daemon's own (an outer sandbox may filter the
/// daemon too), or `any` where the kernel does not count filters (before 5.9), meaning only
/// that some filter is in force. None without a filter.
pub fn filters_in_children() -> Option<&'static str> {
    filter().ok()?;
    // The daemon never filters itself: its own count is read once, for every zygote.
    static EXPECTED: OnceLock<String> = OnceLock::new();
    let expected = EXPECTED.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok();
        let own = status.as_deref().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Seccomp_filters:"))
                .and_then(|n| n.trim().parse::<u32>().ok())
        });
        own.map_or_else(|| "any".to_string(), |n| (n + 1).to_string())
    });
    Some(expected)
}

/// One line for reports: what the filter refuses.
pub fn describe() -> String {
    let names: Vec<&str> = REFUSED.iter().map(|(n, _)| *n).collect();
    format!(
        "{} system calls refused with EPERM ({}); other architectures' calls kill the process",
        names.len(),
        names.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forks a child that installs the filter and reports, through its exit status, the errno
    /// of each call (0 for success): io_uring_setup, keyctl, getppid, and on x86_64 the x32
    /// numbers of keyctl (common with x86_64) and kexec_load (x32's own).
    fn errnos_under_filter(filter: &BpfProgram) -> Vec<i32> {
        // SAFETY: the child makes async-signal-safe calls only, then _exits.
        unsafe {
            let (r, w) = {
                let mut fds = [0; 2];
                assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
                (fds[0], fds[1])
            };
            let pid = libc::fork();
            assert!(pid >= 0, "fork");
            if pid == 0 {
                libc::close(r);
                let mut out = [0i32; 5];
                if install(filter).is_err() {
                    libc::_exit(99);
                }
                let errno = |rc: libc::c_long| {
                    if rc < 0 { *libc::__errno_location() } else { 0 }
                };
                out[0] = errno(libc::syscall(
                    libc::SYS_io_uring_setup,
                    1,
                    std::ptr::null_mut::<u8>(),
                ));
                // KEYCTL_GET_KEYRING_ID of the user keyring, without creating it.
                out[1] = errno(libc::syscall(libc::SYS_keyctl, 0, -4, 0));
                out[2] = errno(libc::syscall(libc::SYS_getppid));
                #[cfg(target_arch = "x86_64")]
                {
                    out[3] = errno(libc::syscall(libc::SYS_keyctl | X32_SYSCALL_BIT, 0, -4, 0));
                    // Were it let through: no segments, so at most it unloads a staged kexec kernel.
                    out[4] = errno(libc::syscall(528 | X32_SYSCALL_BIT, 0, 0, 0, 0));
                }
                libc::write(w, out.as_ptr().cast(), size_of_val(&out));
                libc::_exit(0);
            }
            libc::close(w);
            let mut out = [0i32; 5];
            let n = libc::read(r, out.as_mut_ptr().cast(), size_of_val(&out));
            libc::close(r);
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "the child could not install the filter (status {status:#x})"
            );
            assert_eq!(n as usize, size_of_val(&out));
            out.to_vec()
        }
    }

    #[test]
    fn refused_calls_fail_with_eperm_and_others_work() {
        let filter = filter().expect("this machine takes the filter");
        let got = errnos_under_filter(filter);
        assert_eq!(
            got[..3],
            [libc::EPERM, libc::EPERM, 0],
            "io_uring_setup, keyctl, getppid"
        );
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                got[3..],
                [libc::EPERM, libc::EPERM],
                "keyctl, kexec_load through x32"
            );
        }
    }

    #[test]
    fn a_call_through_another_architecture_kills_the_process() {
        if !cfg!(target_arch = "x86_64") {
            return;
        }
        let filter = filter().expect("this machine takes the filter");
        // SAFETY: the child makes async-signal-safe calls only, then _exits or is killed.
        let status = unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork");
            if pid == 0 {
                if install(filter).is_err() {
                    libc::_exit(99);
                }
                // i386's getpid (20) through int 0x80.
                #[cfg(target_arch = "x86_64")]
                std::arch::asm!("int 0x80", inout("eax") 20 => _, options(nostack));
                libc::_exit(0);
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            status
        };
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "status {status:#x}"
        );
    }

    #[test]
    fn an_unknown_architecture_gets_no_filter_and_says_why() {
        let e = build("mips").expect_err("no filter for mips");
        assert!(e.contains("mips"), "{e}");
        assert!(build(std::env::consts::ARCH).is_ok());
        assert!(describe().starts_with(&format!("{} system calls", REFUSED.len())));
    }
}
