//! Network isolation (the `net` intrinsic off): a fresh network namespace with only loopback,
//! or joining a namespace Nomad created for the task group (`network { mode = "bridge" }`).
//!
//! The functions used after fork ([`unshare_with_loopback`], [`join`]) only make raw
//! syscalls: they are async-signal-safe and allocate nothing.

use nix::sys::statfs::fstatfs;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// Network namespace failures.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path:?}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {path:?} is not a namespace file (nsfs)")]
    NotNamespace { path: PathBuf },
}

/// Magic number of the nsfs filesystem (`/proc/<pid>/ns/*`, `/var/run/netns/*` bind mounts).
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Opens a network namespace file in the parent, checking that it really is one.
pub fn open_netns(path: &Path) -> Result<OwnedFd, NetnsError> {
    let fd = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| NetnsError::Io {
        path: path.to_path_buf(),
        op: "open",
        source: e.into(),
    })?;
    let st = fstatfs(fd.as_fd()).map_err(|e| NetnsError::Io {
        path: path.to_path_buf(),
        op: "fstatfs",
        source: e.into(),
    })?;
    if st.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Err(NetnsError::NotNamespace {
            path: path.to_path_buf(),
        });
    }
    Ok(fd)
}

/// `struct ifreq` with the flags member (what SIOCGIFFLAGS/SIOCSIFFLAGS use).
#[repr(C)]
struct IfreqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Sets `lo` up in the calling thread's network namespace. Async-signal-safe.
pub fn loopback_up() -> Result<(), i32> {
    // SAFETY: plain syscalls on a local fd and a stack buffer of the size the kernel expects.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(last_errno());
        }
        let mut req = IfreqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[0] = b'l';
        req.name[1] = b'o';
        if libc::ioctl(sock, libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            let e = last_errno();
            libc::close(sock);
            return Err(e);
        }
        req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock, libc::SIOCSIFFLAGS as _, &mut req) < 0 {
            let e = last_errno();
            libc::close(sock);
            return Err(e);
        }
        libc::close(sock);
    }
    Ok(())
}

/// `unshare(CLONE_NEWNET)` then bring loopback up. Async-signal-safe; returns errno.
pub fn unshare_with_loopback() -> Result<(), i32> {
    // SAFETY: unshare has no memory-safety preconditions.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(last_errno());
    }
    loopback_up()
}

/// Joins the network namespace open at `fd`. Async-signal-safe; returns errno.
pub fn join(fd: RawFd) -> Result<(), i32> {
    // SAFETY: setns only reads the fd number.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(last_errno());
    }
    Ok(())
}
