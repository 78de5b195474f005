//! Copies a node worker's output pipe into its execution's sink until EOF, with `splice(2)`
//! (the pages move from pipe to sink without a trip through user space).
//!
//! A sink the runtime can wait on (a FIFO such as Nomad's logmon, a capture pipe) and
//! `/dev/null` are copied on the async workers: both fds non-blocking, woken by epoll. Any
//! other sink (a regular file: epoll cannot wait for one, and a write may wait on the disk)
//! gets a small thread that blocks in `splice` instead.
//!
//! Nothing is lost either way: the copy ends only at EOF, when every writer of the pipe (the
//! worker and anything it started) has closed it. A sink that breaks (its reader gone) is
//! replaced by draining the pipe, so a writer never blocks on it.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

/// Most bytes one `splice` call moves.
const SPLICE_CHUNK: usize = 1 << 20;

/// Starts copying `from` into `to`; the receiver resolves once the copy reached EOF (or None
/// when no copy could be started, which leaves the pipe to its writers' SIGPIPE).
pub(super) fn start(
    from: OwnedFd,
    to: OwnedFd,
    name: &'static str,
) -> Option<oneshot::Receiver<()>> {
    let (tx, rx) = oneshot::channel();
    match Polled::new(from, to) {
        Ok(polled) => {
            tokio::spawn(async move {
                polled.run().await;
                let _ = tx.send(());
            });
            Some(rx)
        }
        Err((from, to)) => {
            let spawned = std::thread::Builder::new()
                .name(format!("elide-splice-{name}"))
                .stack_size(64 * 1024)
                .spawn(move || {
                    copy_blocking(&from, &to);
                    let _ = tx.send(());
                });
            match spawned {
                Ok(_) => Some(rx),
                Err(e) => {
                    // Out of threads or memory: the writers get EPIPE (or SIGPIPE) on this
                    // stream, which the operator can only place with this line.
                    tracing::warn!(
                        stream = name,
                        error = %e,
                        "cannot start copying a node worker's output to its file sink; the \
                         snippet's writes to it fail"
                    );
                    None
                }
            }
        }
    }
}

/// What one round of splicing ended with.
enum Pump {
    /// Every writer closed the pipe and it is empty.
    Eof,
    /// Nothing moves for now: the pipe is empty or the sink is full.
    Blocked,
    /// The sink fails (its reader is gone, say).
    Broken,
}

/// A copy run by the async workers.
struct Polled {
    from: AsyncFd<OwnedFd>,
    to: Sink,
}

enum Sink {
    /// A FIFO or a pipe: epoll says when it takes more.
    Watched(AsyncFd<OwnedFd>),
    /// `/dev/null`, which always takes everything.
    DevNull(OwnedFd),
}

impl Sink {
    fn raw(&self) -> RawFd {
        match self {
            Sink::Watched(afd) => afd.get_ref().as_raw_fd(),
            Sink::DevNull(fd) => fd.as_raw_fd(),
        }
    }
}

impl Polled {
    /// Registers both ends, or hands them back when the sink is not one epoll can wait on.
    fn new(from: OwnedFd, to: OwnedFd) -> Result<Self, (OwnedFd, OwnedFd)> {
        let Some(watch) = sink_watched(&to) else {
            return Err((from, to));
        };
        // Both fds are this copy's own open files (the sink was opened for this execution;
        // the worker writes through its own end of the pipe), so the flags change nothing
        // for anyone else. Whatever is handed back to the blocking copy is blocking again.
        let give_back = |from: OwnedFd, to: OwnedFd| {
            let _ = set_nonblocking(&from, false);
            let _ = set_nonblocking(&to, false);
            Err((from, to))
        };
        if set_nonblocking(&from, true).is_err() || set_nonblocking(&to, true).is_err() {
            return give_back(from, to);
        }
        // SAFETY: an OwnedFd keeps its fd open and unchanged for as long as the AsyncFd owns it.
        let from = match unsafe { AsyncFd::register_with_interest(from, Interest::READABLE) } {
            Ok(afd) => afd,
            Err(e) => return give_back(e.into_parts().0, to),
        };
        let to = if watch {
            // SAFETY: as above.
            match unsafe { AsyncFd::register_with_interest(to, Interest::WRITABLE) } {
                Ok(afd) => Sink::Watched(afd),
                Err(e) => return give_back(from.into_inner(), e.into_parts().0),
            }
        } else {
            Sink::DevNull(to)
        };
        Ok(Self { from, to })
    }

    async fn run(self) {
        let (from, to) = (self.from.get_ref().as_raw_fd(), self.to.raw());
        loop {
            let Ok(mut readable) = self.from.readable().await else {
                return;
            };
            match pump(from, to) {
                Pump::Eof => return,
                Pump::Broken => return self.drain().await,
                Pump::Blocked if unread(from) == 0 => {
                    readable.clear_ready();
                    continue;
                }
                Pump::Blocked => {}
            }
            drop(readable);
            // Bytes wait in the pipe and the sink takes no more: wait for the sink.
            loop {
                match &self.to {
                    Sink::Watched(sink) => {
                        let Ok(mut writable) = sink.writable().await else {
                            return self.drain().await;
                        };
                        match pump(from, to) {
                            Pump::Eof => return,
                            Pump::Broken => return self.drain().await,
                            Pump::Blocked if unread(from) > 0 => writable.clear_ready(),
                            Pump::Blocked => break,
                        }
                    }
                    // /dev/null never fills; should it refuse, try again after others ran.
                    Sink::DevNull(_) => {
                        tokio::task::yield_now().await;
                        break;
                    }
                }
            }
        }
    }

    /// Reads and drops everything left until EOF, so no writer blocks on a broken sink.
    async fn drain(&self) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let Ok(mut readable) = self.from.readable().await else {
                return;
            };
            match nix::unistd::read(self.from.get_ref(), &mut buf) {
                Ok(0) => return,
                Ok(_) | Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => readable.clear_ready(),
                Err(_) => return,
            }
        }
    }
}

/// Splices until the pipe is empty, the sink full, EOF or an error.
fn pump(from: RawFd, to: RawFd) -> Pump {
    loop {
        match splice(from, to, libc::SPLICE_F_NONBLOCK) {
            Ok(0) => return Pump::Eof,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Pump::Blocked,
            Err(_) => return Pump::Broken,
        }
    }
}

/// One `splice` of up to [`SPLICE_CHUNK`] bytes from `from` to `to` (null offsets: pipes,
/// FIFOs, `/dev/null` and append-only files have none), with `SPLICE_F_MOVE` and `flags`.
fn splice(from: RawFd, to: RawFd, flags: libc::c_uint) -> Result<usize, Errno> {
    // SAFETY: splice between two fds the caller owns, with null offset pointers.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            SPLICE_CHUNK,
            libc::SPLICE_F_MOVE | flags,
        )
    };
    if n < 0 {
        Err(Errno::last())
    } else {
        Ok(n as usize)
    }
}

/// Bytes waiting in the pipe `fd` (0 when unknown).
fn unread(fd: RawFd) -> libc::c_int {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer we pass.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
        return 0;
    }
    n
}

/// Whether the async copy serves the sink `fd`, and then whether it waits on it: Some(true)
/// for a FIFO or pipe, Some(false) for `/dev/null`, None for anything else (a thread's job).
fn sink_watched(fd: &OwnedFd) -> Option<bool> {
    let st = nix::sys::stat::fstat(fd.as_fd()).ok()?;
    let fmt = st.st_mode & libc::S_IFMT;
    if fmt == libc::S_IFIFO {
        Some(true)
    } else if fmt == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3) {
        Some(false)
    } else {
        None
    }
}

fn set_nonblocking(fd: &OwnedFd, on: bool) -> nix::Result<()> {
    let mut flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    flags.set(OFlag::O_NONBLOCK, on);
    fcntl(fd, FcntlArg::F_SETFL(flags)).map(|_| ())
}

/// Copies `from` into `to` until EOF on the calling thread (any sink).
fn copy_blocking(from: &OwnedFd, to: &OwnedFd) {
    let (f, t) = (from.as_raw_fd(), to.as_raw_fd());
    let mut use_splice = true;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if use_splice {
            match splice(f, t, 0) {
                Ok(0) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(Errno::EINVAL) => {
                    // The sink does not support splice: copy through user space.
                    use_splice = false;
                    continue;
                }
                // The sink is gone (EPIPE...): keep draining so the writer never blocks.
                Err(_) => return drain_blocking(from, &mut buf),
            }
        }
        match nix::unistd::read(from, &mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut off = 0;
                while off < n {
                    match nix::unistd::write(to, &buf[off..n]) {
                        Ok(w) => off += w,
                        Err(Errno::EINTR) => {}
                        Err(_) => return drain_blocking(from, &mut buf),
                    }
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

fn drain_blocking(fd: &OwnedFd, buf: &mut [u8]) {
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(0) => return,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}
