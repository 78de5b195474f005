//! Landlock: filesystem confinement for the `io` intrinsic off, and a domain of its own for
//! every execution.
//!
//! A Landlock domain also scopes what crosses its border, whatever the filesystem rules: a
//! process inside cannot signal one outside (with `LANDLOCK_SCOPE_SIGNAL`, ABI ≥ 6), nor ptrace
//! it or open the `/proc/<pid>` files that need ptrace-attach rights (`mem`, `syscall`,
//! `stack`, `io`). One domain per execution keeps the daemon and the other executions out of
//! a snippet's reach even when it runs as the same user; its own children inherit the domain
//! and stay in reach. With `io` on, [`build_domain`] makes such a domain without filesystem
//! rules. The `/proc/<pid>` files readable with ptrace-read rights (`environ`, `cmdline`,
//! `maps`) stay readable to a process of the same user (or root) with `io` on: only the
//! filesystem rules of `io` off hide them.
//!
//! The ruleset is built in the parent (opening every allowed path there), and only its fd
//! travels into the child, where [`restrict_self`] makes two raw syscalls. Everything not
//! listed is denied: reading, writing, executing, listing, creating, renaming, truncating.
//! Landlock does not restrict path traversal or `stat`, so a runtime under `/root/.pyenv`
//! works with only its prefix allowed.

use landlock::{
    ABI, Access, AccessFs, BitFlags, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreatedAttr, Scope, path_beneath_rules,
};
use serde::{Deserialize, Serialize};
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// Landlock failures.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error(
        "filesystem isolation (io intrinsic off) needs Landlock, which this kernel does not offer \
         (ABI {abi})"
    )]
    Unsupported { abi: i32 },
    #[error("building the Landlock ruleset failed: {0}")]
    Ruleset(#[source] landlock::RulesetError),
    #[error("Landlock rule path {path:?}: {reason}")]
    Path { path: PathBuf, reason: String },
}

/// The Landlock ABI version the running kernel offers (0 when unavailable), asked once.
pub fn abi_version() -> i32 {
    static ABI_VERSION: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *ABI_VERSION.get_or_init(query_abi_version)
}

/// Whether [`build_domain`] makes a domain on this kernel (signal scoping needs ABI 6, Linux
/// 6.12).
pub fn domains_available() -> bool {
    abi_version() >= 6
}

fn query_abi_version() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the version query takes no ruleset attribute.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if v < 0 { 0 } else { v as i32 }
}

/// System paths every runtime needs read/execute access to (missing ones are skipped).
pub const SYSTEM_READ_PATHS: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/ca-certificates",
    "/etc/nsswitch.conf",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/passwd",
    "/etc/group",
    // Machine-wide /proc files runtimes read (CPU count, memory, malloc tuning). The child's
    // own /proc/self is added in the child itself (see `allow_proc_self`): named here it
    // would resolve to the daemon's pid. Other processes' /proc entries stay denied, so a
    // root snippet cannot read the daemon's environ or memory.
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/proc/stat",
    "/proc/loadavg",
    "/proc/uptime",
    "/proc/version",
    "/proc/filesystems",
    "/proc/sys/kernel",
    "/proc/sys/vm/overcommit_memory",
    "/sys/devices/system/cpu",
    "/sys/fs/cgroup",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
];

/// Device files the child may write to.
pub const DEVICE_WRITE_PATHS: &[&str] = &["/dev/null", "/dev/tty"];

/// What the confined child may touch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsPolicy {
    /// Read and execute (files and directory trees).
    pub read_exec: Vec<PathBuf>,
    /// Full access (working dir, extra write paths, /dev/null).
    pub read_write: Vec<PathBuf>,
}

impl FsPolicy {
    /// The policy for an execution: system paths + `read_paths` readable, `working_dir` +
    /// `write_paths` + writable devices writable.
    pub fn for_execution(
        working_dir: &Path,
        read_paths: &[PathBuf],
        write_paths: &[PathBuf],
    ) -> Self {
        let mut read_exec: Vec<PathBuf> = SYSTEM_READ_PATHS.iter().map(PathBuf::from).collect();
        read_exec.extend(read_paths.iter().cloned());
        let mut read_write = vec![working_dir.to_path_buf()];
        read_write.extend(write_paths.iter().cloned());
        read_write.extend(DEVICE_WRITE_PATHS.iter().map(PathBuf::from));
        FsPolicy {
            read_exec,
            read_write,
        }
    }
}

/// The highest ABI whose filesystem rights we ask for. Older kernels degrade (best effort) to
/// what they can enforce; newer ones (V9+) also confine connecting to Unix sockets by path.
const TARGET_ABI: ABI = ABI::V10;

/// The Landlock access masks (kernel `LANDLOCK_ACCESS_FS_*` bits) the ruleset uses, so another
/// launcher can rebuild the same ruleset with raw syscalls. Intersect `handled` with what the
/// kernel supports; for non-directory paths keep only the `file_only` bits of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessMasks {
    pub handled: u64,
    /// `LANDLOCK_SCOPE_*` bits (ABI ≥ 6).
    pub scoped: u64,
    pub read_exec: u64,
    pub read_write: u64,
    pub file_only: u64,
}

/// What [`build_ruleset`] scopes: abstract Unix sockets, which have no path for the filesystem
/// rules to catch (ABI ≥ 6; older kernels skip this, and a private netns hides them anyway),
/// and with `scope_signals` signals too.
fn scopes(scope_signals: bool) -> BitFlags<Scope> {
    let mut scopes = BitFlags::from(Scope::AbstractUnixSocket);
    if scope_signals {
        scopes |= Scope::Signal;
    }
    scopes
}

/// What a read-write path grants: every handled right but making device nodes. A root task
/// keeps `CAP_MKNOD` (Nomad's `exec` default), and a block or character device made in its
/// working dir would open the raw disk or memory beneath every other rule.
fn read_write_access() -> BitFlags<AccessFs> {
    AccessFs::from_all(TARGET_ABI) & !(AccessFs::MakeChar | AccessFs::MakeBlock)
}

/// The masks [`build_ruleset`] uses.
pub fn access_masks(scope_signals: bool) -> AccessMasks {
    AccessMasks {
        handled: AccessFs::from_all(TARGET_ABI).bits(),
        scoped: scopes(scope_signals).bits(),
        read_exec: AccessFs::from_read(TARGET_ABI).bits(),
        read_write: read_write_access().bits(),
        file_only: AccessFs::from_file(TARGET_ABI).bits(),
    }
}

/// Builds the ruleset in the parent and returns its fd, ready for [`restrict_self`]. With
/// `scope_signals`, signals cannot leave the domain either (ABI ≥ 6).
///
/// Policy paths that do not exist are skipped (they grant nothing; system and runtime paths
/// vary by distribution); every path in `required` must exist, or the error names it.
pub fn build_ruleset(
    policy: &FsPolicy,
    required: &[PathBuf],
    scope_signals: bool,
) -> Result<OwnedFd, LandlockError> {
    let abi = abi_version();
    if abi < 1 {
        return Err(LandlockError::Unsupported { abi });
    }
    for p in required {
        if !p.exists() {
            return Err(LandlockError::Path {
                path: p.clone(),
                reason: "does not exist".to_string(),
            });
        }
    }
    let rr = LandlockError::Ruleset;
    let created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(TARGET_ABI))
        .map_err(rr)?
        .scope(scopes(scope_signals))
        .map_err(rr)?
        .create()
        .map_err(rr)?
        .add_rules(path_beneath_rules(
            &policy.read_exec,
            AccessFs::from_read(TARGET_ABI),
        ))
        .map_err(rr)?
        .add_rules(path_beneath_rules(&policy.read_write, read_write_access()))
        .map_err(rr)?;
    let fd: Option<OwnedFd> = created.into();
    fd.ok_or(LandlockError::Unsupported { abi })
}

/// A ruleset that confines nothing on the filesystem, for an execution with `io` on: restricting
/// itself with it makes the execution a Landlock domain of its own (see the module docs).
/// `None` before ABI 6, which cannot scope signals.
pub fn build_domain() -> Result<Option<OwnedFd>, LandlockError> {
    if !domains_available() {
        return Ok(None);
    }
    let rr = LandlockError::Ruleset;
    let created = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .scope(Scope::Signal)
        .map_err(rr)?
        .create()
        .map_err(rr)?;
    let fd: Option<OwnedFd> = created.into();
    Ok(fd)
}

/// `struct landlock_path_beneath_attr` (packed in the kernel UAPI).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;

/// Adds a read/execute rule for the calling process's own `/proc/self` to the ruleset at
/// `ruleset_fd`. Must run in the child (after fork) so `/proc/self` resolves to the child's
/// pid, which it keeps across exec. Async-signal-safe; returns errno.
pub fn allow_proc_self(ruleset_fd: RawFd, read_exec_access: u64) -> Result<(), i32> {
    let errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY: open/syscall/close on a static path and a stack struct of the UAPI layout.
    unsafe {
        let dir = libc::open(
            c"/proc/self".as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if dir < 0 {
            return Err(errno());
        }
        let attr = PathBeneathAttr {
            allowed_access: read_exec_access,
            parent_fd: dir,
        };
        let r = libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset_fd,
            LANDLOCK_RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        );
        let e = errno();
        libc::close(dir);
        if r != 0 {
            return Err(e);
        }
    }
    Ok(())
}

/// Confines the calling thread with the ruleset at `fd` (sets `no_new_privs` first, which an
/// unprivileged restrict requires). Async-signal-safe; returns errno.
pub fn restrict_self(fd: RawFd) -> Result<(), i32> {
    // SAFETY: prctl and landlock_restrict_self only take integers.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        if libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) != 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_match_the_kernel_uapi_bits() {
        let m = access_masks(true);
        // LANDLOCK_ACCESS_FS_EXECUTE | READ_FILE | READ_DIR
        assert_eq!(m.read_exec, (1 << 0) | (1 << 2) | (1 << 3));
        // LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL
        assert_eq!(m.scoped, 0b11);
        assert_eq!(access_masks(false).scoped, 0b01);
        // Every handled right but MAKE_CHAR (bit 6) and MAKE_BLOCK (bit 11) is granted to
        // read-write paths; read-only is a strict subset.
        assert_eq!(m.read_write, m.handled & !((1 << 6) | (1 << 11)));
        // Handled, so refused everywhere.
        assert_eq!(m.handled & ((1 << 6) | (1 << 11)), (1 << 6) | (1 << 11));
        assert_eq!(m.read_exec & !m.handled, 0);
        // WRITE_FILE (bit 1) and TRUNCATE (bit 14) apply to files; MAKE_DIR (bit 7) does not.
        assert_ne!(m.file_only & (1 << 1), 0);
        assert_ne!(m.file_only & (1 << 14), 0);
        assert_eq!(m.file_only & (1 << 7), 0);
    }

    #[test]
    fn policy_includes_system_paths_working_dir_and_extras() {
        let p = FsPolicy::for_execution(
            Path::new("/w"),
            &[PathBuf::from("/opt/rt")],
            &[PathBuf::from("/out")],
        );
        assert!(p.read_exec.contains(&PathBuf::from("/usr")));
        assert!(p.read_exec.contains(&PathBuf::from("/opt/rt")));
        assert!(
            !p.read_exec.contains(&PathBuf::from("/etc")),
            "all of /etc must not be readable"
        );
        assert_eq!(
            &p.read_write[..2],
            &[PathBuf::from("/w"), PathBuf::from("/out")]
        );
        assert!(p.read_write.contains(&PathBuf::from("/dev/null")));
        assert!(!p.read_write.contains(&PathBuf::from("/tmp")));
    }

    #[test]
    fn a_domain_is_built_exactly_where_the_kernel_scopes_signals() {
        let domain = build_domain().expect("build_domain");
        assert_eq!(domain.is_some(), abi_version() >= 6);
    }

    #[test]
    fn abi_version_agrees_with_ruleset_creation() {
        // The version query and an actual ruleset must agree on whether Landlock exists.
        let built = build_ruleset(&FsPolicy::default(), &[], true);
        assert_eq!(abi_version() >= 1, built.is_ok(), "{built:?}");
    }
}
