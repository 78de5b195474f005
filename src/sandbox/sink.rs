//! Opens the files an execution writes its stdout/stderr to, refusing anything that would let a
//! daemon client write arbitrary files.
//!
//! Allowed: FIFOs (Nomad's logmon FIFOs), regular files under an allowed root (created if
//! missing), and `/dev/null`. Refused: symlinks, directories, sockets, devices, hard-linked
//! files, and files outside the roots.
//!
//! [`open_sink`] may sleep while waiting for a FIFO reader: call it from a blocking context.

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, OpenHow, ResolveFlag, fcntl, open, openat2};
use nix::sys::stat::{Mode, SFlag, fstat};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// A sink path that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("output sink {path:?} refused: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("output sink {path:?}: no reader opened the FIFO within {waited:?}")]
    NoReader { path: PathBuf, waited: Duration },
    #[error("output sink {path:?}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn refused(path: &Path, reason: impl Into<String>) -> SinkError {
    SinkError::Refused {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn io_err(path: &Path, op: &'static str, e: impl Into<std::io::Error>) -> SinkError {
    SinkError::Io {
        path: path.to_path_buf(),
        op,
        source: e.into(),
    }
}

/// The path of the null sink.
pub const DEV_NULL: &str = "/dev/null";

/// The directories sinks must lie under (the daemon's `output_roots`), each resolved to its
/// real path once, when first found: every resolution is a readlink per path component, and a
/// start opens two sinks. A root that does not exist yet (Nomad creates its data dir when it
/// first runs) is looked for again at each use until it does.
#[derive(Debug, Default)]
pub struct SinkRoots {
    configured: Vec<PathBuf>,
    /// The real paths of the roots found so far, and whether that is all of them.
    resolved: RwLock<(Arc<[PathBuf]>, bool)>,
}

impl SinkRoots {
    pub fn new(configured: Vec<PathBuf>) -> Self {
        let roots = SinkRoots {
            configured,
            resolved: RwLock::new((Arc::from(Vec::new()), false)),
        };
        roots.real_paths();
        roots
    }

    /// No roots: file sinks are refused and FIFOs accepted anywhere.
    pub fn none() -> Self {
        Self::new(Vec::new())
    }

    fn is_empty(&self) -> bool {
        self.configured.is_empty()
    }

    /// The real paths of the roots that exist.
    fn real_paths(&self) -> Arc<[PathBuf]> {
        if let Ok(r) = self.resolved.read()
            && r.1
        {
            return r.0.clone();
        }
        let found = canonical_roots(&self.configured);
        let complete = found.len() == self.configured.len();
        let found: Arc<[PathBuf]> = Arc::from(found);
        if let Ok(mut r) = self.resolved.write() {
            *r = (found.clone(), complete);
        }
        found
    }
}

/// The first and the longest sleep between FIFO open attempts while no reader is attached. The
/// reader is usually a moment away (logmon's goroutine, started just before StartTask, has not
/// reached its `open` yet), so the first retries come quickly and back off from there.
/// (An inotify `IN_OPEN` watch cannot replace the polling: a reader blocked in `open` has not
/// completed it, so the event only comes once a writer is there.)
const FIFO_RETRY_FIRST: Duration = Duration::from_millis(1);
const FIFO_RETRY_MAX: Duration = Duration::from_millis(5);

/// Opens `path` for writing as an output sink and returns a blocking, close-on-exec fd.
///
/// FIFOs are opened non-blocking and retried while the kernel says no reader is attached
/// (ENXIO), until `deadline` has elapsed; then `O_NONBLOCK` is cleared so the child sees an
/// ordinary blocking pipe. Regular files must resolve under one of `allowed_roots`. FIFOs must
/// too when any root is configured (so a system FIFO such as /run/initctl is out of reach);
/// with no roots configured, file sinks are refused and FIFOs are accepted anywhere.
pub fn open_sink(
    path: &Path,
    allowed_roots: &SinkRoots,
    deadline: Duration,
) -> Result<OwnedFd, SinkError> {
    if !path.is_absolute() {
        return Err(refused(path, "path must be absolute"));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(refused(path, "path must not contain `..`"));
    }
    if path == Path::new(DEV_NULL) {
        return open_dev_null(path);
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            let ft = meta.file_type();
            if ft.is_fifo() {
                if allowed_roots.is_empty() {
                    return open_fifo(path, deadline);
                }
                let roots = allowed_roots.real_paths();
                if let Some(fd) = open_fifo_beneath(path, &roots, deadline)? {
                    return Ok(fd);
                }
                resolve_under_roots(path, &roots)?;
                let fd = open_fifo(path, deadline)?;
                check_fd_under_roots(path, &fd, &roots)?;
                Ok(fd)
            } else if ft.is_file() {
                // Its links are checked on the opened file (see `open_regular`).
                open_regular(path, allowed_roots)
            } else {
                Err(refused(path, describe_refused_type(&ft)))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => open_regular(path, allowed_roots),
        Err(e) => Err(io_err(path, "stat", e)),
    }
}

fn describe_refused_type(ft: &std::fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "is a symlink (sinks must be the real path)"
    } else if ft.is_dir() {
        "is a directory"
    } else if ft.is_socket() {
        "is a socket"
    } else if ft.is_char_device() || ft.is_block_device() {
        "is a device (only /dev/null is allowed)"
    } else {
        "is not a FIFO, regular file or /dev/null"
    }
}

fn open_dev_null(path: &Path) -> Result<OwnedFd, SinkError> {
    let fd = open(
        path,
        OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| io_err(path, "open", e))?;
    let st = fstat(fd.as_fd()).map_err(|e| io_err(path, "fstat", e))?;
    // /dev/null is char device 1:3; anything else mounted there is not the null sink.
    let is_char = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFCHR;
    if !is_char || libc::major(st.st_rdev) != 1 || libc::minor(st.st_rdev) != 3 {
        return Err(refused(path, "is not the null device"));
    }
    Ok(fd)
}

const FIFO_FLAGS: OFlag = OFlag::O_WRONLY
    .union(OFlag::O_NONBLOCK)
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_NOFOLLOW);

fn open_fifo(path: &Path, deadline: Duration) -> Result<OwnedFd, SinkError> {
    open_fifo_with(path, deadline, || open(path, FIFO_FLAGS, Mode::empty()))
}

/// Opens a FIFO that lies, as written, under one of the real `roots` in one `openat2` that
/// the kernel keeps beneath that root (no `..`, no absolute symlink, no /proc magic link out of
/// it): the same guarantee as resolving its directory first and checking the opened fd after,
/// without the readlink per path component. None when the path is not written under a real
/// root (a root given through a symlink), passes an absolute symlink, or the kernel lacks
/// `openat2` (before 5.6): the caller then resolves it the long way.
fn open_fifo_beneath(
    path: &Path,
    roots: &[PathBuf],
    deadline: Duration,
) -> Result<Option<OwnedFd>, SinkError> {
    let Some((root, rel)) = roots.iter().find_map(|r| {
        let rel = path.strip_prefix(r).ok()?;
        (!rel.as_os_str().is_empty()).then_some((r, rel))
    }) else {
        return Ok(None);
    };
    let dir = match open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(dir) => dir,
        // Gone or replaced since it was resolved: the long way re-checks everything.
        Err(_) => return Ok(None),
    };
    let how = || {
        OpenHow::new()
            .flags(FIFO_FLAGS)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS)
    };
    match open_fifo_with(path, deadline, || openat2(dir.as_fd(), rel, how())) {
        Ok(fd) => Ok(Some(fd)),
        // EXDEV: the path leaves the root as written (an absolute symlink, which may still
        // lead back inside): the long way decides, and names the root if it does not.
        Err(SinkError::Io { source, .. })
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOSYS) | Some(libc::E2BIG) | Some(libc::EPERM) | Some(libc::EXDEV)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The FIFO opened by `open_once` (non-blocking, write-only), retried while no reader is
/// attached, and handed back blocking.
fn open_fifo_with(
    path: &Path,
    deadline: Duration,
    mut open_once: impl FnMut() -> nix::Result<OwnedFd>,
) -> Result<OwnedFd, SinkError> {
    let started = Instant::now();
    let mut pause = FIFO_RETRY_FIRST;
    let fd = loop {
        match open_once() {
            Ok(fd) => break fd,
            Err(Errno::ENXIO) => {
                let waited = started.elapsed();
                if waited >= deadline {
                    return Err(SinkError::NoReader {
                        path: path.to_path_buf(),
                        waited,
                    });
                }
                // The last pause ends at the deadline, where one more attempt is made.
                std::thread::sleep(pause.min(deadline - waited));
                pause = (pause * 2).min(FIFO_RETRY_MAX);
            }
            Err(Errno::EINTR) => {}
            Err(Errno::ELOOP) => return Err(refused(path, "is a symlink")),
            Err(e) => return Err(io_err(path, "open", e)),
        }
    };
    // The path may have been swapped between lstat and open.
    let st = fstat(fd.as_fd()).map_err(|e| io_err(path, "fstat", e))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFIFO {
        return Err(refused(path, "changed type while opening (not a FIFO)"));
    }
    let current = fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(|e| io_err(path, "fcntl", e))?;
    let blocking = OFlag::from_bits_truncate(current) - OFlag::O_NONBLOCK;
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(blocking)).map_err(|e| io_err(path, "fcntl", e))?;
    Ok(fd)
}

fn canonical_roots(roots: &[PathBuf]) -> Vec<PathBuf> {
    // A root that does not exist cannot contain anything: skip it rather than fail.
    roots.iter().filter_map(|r| r.canonicalize().ok()).collect()
}

fn under_root(roots: &[PathBuf], p: &Path) -> bool {
    roots.iter().any(|r| p.starts_with(r) && p != r.as_path())
}

/// The path with its parent directory canonicalised, if it lies under one of `roots`.
fn resolve_under_roots(path: &Path, roots: &[PathBuf]) -> Result<PathBuf, SinkError> {
    let (Some(parent), Some(file_name)) = (path.parent(), path.file_name()) else {
        return Err(refused(path, "has no parent directory"));
    };
    let parent = parent
        .canonicalize()
        .map_err(|e| io_err(path, "resolve parent directory", e))?;
    let resolved = parent.join(file_name);
    if !under_root(roots, &resolved) {
        return Err(refused(
            path,
            format!("is not under an allowed sink root ({roots:?})"),
        ));
    }
    Ok(resolved)
}

/// A directory component may have been swapped for a symlink after canonicalisation: check
/// where the opened fd really points.
fn check_fd_under_roots(path: &Path, fd: &OwnedFd, roots: &[PathBuf]) -> Result<(), SinkError> {
    let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| io_err(path, "resolve opened file", e))?;
    if !under_root(roots, &real) {
        return Err(refused(
            path,
            format!("resolved to {real:?}, outside the allowed sink roots"),
        ));
    }
    Ok(())
}

fn open_regular(path: &Path, allowed_roots: &SinkRoots) -> Result<OwnedFd, SinkError> {
    let roots = allowed_roots.real_paths();
    if roots.is_empty() {
        return Err(refused(
            path,
            "regular files are only allowed under a configured sink root, and none is configured",
        ));
    }
    let resolved = resolve_under_roots(path, &roots)?;
    let fd = open(
        &resolved,
        OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o640),
    )
    .map_err(|e| match e {
        Errno::ELOOP => refused(path, "is a symlink"),
        e => io_err(path, "open", e),
    })?;
    let st = fstat(fd.as_fd()).map_err(|e| io_err(path, "fstat", e))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(refused(path, "is not a regular file"));
    }
    // On what was opened, not the path: a hard link made after a check of the path would let
    // the writes land in another allocation's file.
    if st.st_nlink > 1 {
        return Err(refused(path, "regular file has more than one hard link"));
    }
    check_fd_under_roots(path, &fd, &roots)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::mkfifo;

    /// The short way is taken for a path written under a root's real path, and left to the
    /// long way (None) for one written through a symlink or leaving the root as written.
    #[test]
    fn fifo_beneath_a_real_root_opens_in_one_step() {
        let base = tempfile::tempdir().expect("tempdir");
        let real = base.path().canonicalize().expect("real path").join("root");
        std::fs::create_dir(&real).expect("mkdir");
        let fifo = real.join("o.fifo");
        mkfifo(&fifo, Mode::from_bits_truncate(0o600)).expect("mkfifo");
        // A reader that stays attached for the whole test, so the opens succeed at once.
        let _reader =
            open(&fifo, OFlag::O_RDONLY | OFlag::O_NONBLOCK, Mode::empty()).expect("reader");
        let roots = [real.clone()];
        let fd = open_fifo_beneath(&fifo, &roots, Duration::from_secs(5)).expect("open");
        assert!(fd.is_some(), "a path under the real root opens beneath it");
        let via = base.path().join("via");
        std::os::unix::fs::symlink(&real, &via).expect("symlink");
        let through_link = via.join("o.fifo");
        assert!(
            open_fifo_beneath(&through_link, &roots, Duration::from_secs(5))
                .expect("not an error")
                .is_none()
        );
        std::os::unix::fs::symlink(&real, real.join("self")).expect("symlink");
        let absolute = real.join("self").join("o.fifo");
        assert!(
            open_fifo_beneath(&absolute, &roots, Duration::from_secs(5))
                .expect("not an error")
                .is_none(),
            "an absolute symlink is for the long way to judge"
        );
    }
}
