//! The Python zygote: one fork server per session, started through the normal sandboxed spawn
//! path, with the interpreter initialised and common modules imported (`zygote.py`).
//!
//! Protocol (one JSON object per `SOCK_SEQPACKET` message, so boundaries are kept and the
//! zygote's and its children's messages never interleave):
//! - daemon → zygote: the job (`token`, isolation `steps` from [`IsolationSpec::plan`], final
//!   `env`, `argv`, `script`) with SCM_RIGHTS `[stdout, stderr, landlock ruleset?]`;
//! - zygote → daemon: `hello` once warm, `exit {pid, status}` (the zygote is the parent and
//!   reaps). The daemon usually knows first: it watches the child's pidfd and reads the status
//!   of the ended child itself ([`exit_status_of_ended`]), so an exit is reported even while
//!   the zygote is busy forking or not scheduled;
//! - child → daemon: `forked {token, pid}` as soon as it holds the job, then `ready {token, pid}`
//!   with a pidfd of itself (SCM_RIGHTS), or `failed {token, error}` naming the isolation step
//!   that failed;
//! - before all of that, daemon → zygote: `notes {slots, page, futex}` with the memfd of the
//!   [`exit_notes`] region (or `notes: null`); a job's `note {slot, nonce}` has its child keep
//!   only that slot's page and note its exit code there just before it exits, which
//!   [`child_exit`] takes ahead of the pidfd.
//!
//! The zygote keeps `context_pool_size` children pre-forked and blocked on the socket, so a job
//! does not wait for the fork (the expensive part on a large interpreter: page tables are
//! copied); the child that takes a job has the zygote fork the next one. A fork the kernel
//! refuses (no pids or memory left) does not end the zygote, whose running children would die
//! with it: it says so on the daemon's stderr and tries again every 100 ms. While that leaves
//! it without any spare it tells the daemon (`empty`), which starts executions cold meanwhile
//! instead of queueing them on the socket; jobs sent before the daemon heard it, the zygote
//! reads off the socket itself and hands back unrun (`declined {token}`), to start cold too.
//!
//! The Landlock ruleset (the filesystem policy with `io` off, a domain of its own with `io` on)
//! is built by the daemon exactly as for a cold spawn and passed as an fd; the child adds the
//! rule for its own `/proc/self` (it must resolve to the child) and restricts itself, so it
//! enforces the identical ruleset.
//!
//! A zygote's death ends its spares (`PR_SET_PDEATHSIG`), but not the executions it handed
//! over, where the kernel keeps an orphan's wait status for its pidfd whoever reaps it
//! ([`exit_status_outlives_reaping`], Linux 6.15+) and the execution has a cgroup (the
//! daemon's reaper kills what is left in execution cgroups when the daemon dies, as a cold
//! start dies with the daemon): the child clears its parent-death signal just before it
//! reports ready, and the daemon, which then holds its pidfd, learns its end as usual. (A
//! zygote that dies before that report leaves no stray child: the daemon shuts the socket, the
//! report fails and the child exits unrun, while the job starts cold.) Elsewhere the child dies
//! with its zygote, and its end is reported as SIGKILL.
//!
//! [`IsolationSpec::plan`]: crate::sandbox::IsolationSpec::plan

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use serde::Deserialize;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use super::exit_notes::{self, ExitNotes, Slot};
use crate::daemon::launcher::{LaunchError, ProcessExit, Spawner};
use crate::sandbox::{Intrinsics, IsolationSpec, Role};

/// The fork server's source (run with `python3 -c`).
pub const ZYGOTE_SOURCE: &str = include_str!("zygote.py");

/// The oldest python the zygote runs on: a child hands the daemon its pidfd from
/// `os.pidfd_open`, new in 3.9.
pub const OLDEST_PYTHON: (u32, u32) = (3, 9);

/// Why the interpreter of version `version` (`platform.python_version()`) cannot be warmed;
/// None when it can. A version this cannot read is given the benefit of the doubt: a zygote
/// that still fails to start only leaves the session's executions to start cold.
pub fn unwarmable(version: &str) -> Option<String> {
    let mut parts = version.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .ok()
    });
    let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) else {
        return None;
    };
    ((major, minor) < OLDEST_PYTHON).then(|| {
        format!(
            "python {version} cannot be warmed (the pool needs python {}.{} or newer)",
            OLDEST_PYTHON.0, OLDEST_PYTHON.1
        )
    })
}

/// Why a job did not come to run in a child.
#[derive(Debug)]
pub enum NotReady {
    /// The child failed an isolation step or ended before running the snippet (the message).
    Failed(String),
    /// The zygote handed the job back unrun: it found it queued while it had no spare and
    /// could not fork one. No process touched the job's cgroup or sinks.
    Declined,
    /// The child reported ready, but its pidfd did not arrive with the report: the daemon had
    /// no descriptor to receive it in (at its open-file limit, the kernel drops passed fds).
    /// The daemon could not follow the child, so the child was killed before its snippet ran.
    NoPidfd,
}

/// What the child reports once isolated.
pub struct Ready {
    /// Its pid.
    pub pid: u32,
    /// A pidfd of it.
    pub pidfd: OwnedFd,
}

struct Pending {
    ready: Option<oneshot::Sender<Result<Ready, NotReady>>>,
    exit: Option<oneshot::Sender<i32>>,
    pid: Option<u32>,
}

#[derive(Default)]
struct Table {
    pending: HashMap<u64, Pending>,
    by_pid: HashMap<u32, u64>,
}

/// The largest job the zygote reads whole (`_MAX_MESSAGE` in zygote.py): a larger one would
/// reach it cut short. The daemon's end of the socket is sized to carry it (see
/// [`fit_send_buffer`]); jobs are JSON, so about as large as their arguments, environment and
/// inline code.
const MAX_JOB_BYTES: usize = 1 << 20;

/// A running zygote.
pub struct Zygote {
    sock: Arc<OwnedFd>,
    /// The zygote's pid.
    pub pid: u32,
    table: Arc<Mutex<Table>>,
    alive: Arc<AtomicBool>,
    /// Set while the zygote has no spare and cannot fork one (out of pids or memory).
    empty: Arc<AtomicBool>,
    next_token: AtomicU64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Message {
    Hello { hello: u32 },
    Forked { forked: u64, pid: u32 },
    Ready { ready: u64, pid: u32 },
    Failed { failed: u64, error: String },
    Exit { exit: u32, status: i32 },
    Empty { empty: bool },
    Declined { declined: u64 },
}

fn lock(t: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// A job in flight: resolves when the child is isolated, then when it has exited.
pub struct Job {
    /// The child's report.
    pub ready: oneshot::Receiver<Result<Ready, NotReady>>,
    /// Its raw wait status (dropped sender = the zygote died).
    pub exit: oneshot::Receiver<i32>,
}

/// Why a job could not be handed over (the caller falls back to a cold start).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The zygote has exited.
    #[error("the python zygote is not running")]
    Dead,
    /// The job is larger than the zygote reads in one message (1 MiB), or than
    /// the socket's send buffer where the daemon could not raise it: a very large inline
    /// snippet, environment or argument list.
    #[error(
        "the job is {bytes} bytes (its environment and arguments, mostly), more than one \
         message to the python zygote carries"
    )]
    TooLarge { bytes: usize },
    /// The socket refused the message.
    #[error("sending the job to the python zygote: {0}")]
    Socket(nix::Error),
}

impl Zygote {
    /// Whether it still runs.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Whether it said it has no spare left and cannot fork one: a job sent now would wait
    /// on its socket until forks work again.
    pub fn starved(&self) -> bool {
        self.empty.load(Ordering::SeqCst)
    }

    /// Hands `job` (JSON without `token`) and `fds` to the zygote.
    pub fn submit(
        &self,
        mut job: serde_json::Map<String, serde_json::Value>,
        fds: &[RawFd],
    ) -> Result<Job, SendError> {
        if !self.alive() {
            return Err(SendError::Dead);
        }
        let token = self.next_token.fetch_add(1, Ordering::SeqCst);
        job.insert("token".into(), token.into());
        let bytes = serde_json::Value::Object(job).to_string().into_bytes();
        if bytes.len() > MAX_JOB_BYTES {
            return Err(SendError::TooLarge { bytes: bytes.len() });
        }
        let (rtx, rrx) = oneshot::channel();
        let (etx, erx) = oneshot::channel();
        lock(&self.table).pending.insert(
            token,
            Pending {
                ready: Some(rtx),
                exit: Some(etx),
                pid: None,
            },
        );
        if let Err(e) = send(self.sock.as_raw_fd(), &bytes, fds) {
            lock(&self.table).pending.remove(&token);
            return Err(match e {
                nix::errno::Errno::EMSGSIZE => SendError::TooLarge { bytes: bytes.len() },
                e => SendError::Socket(e),
            });
        }
        Ok(Job {
            ready: rrx,
            exit: erx,
        })
    }

    /// Stops the zygote: EOF on its socket makes it exit; its spares die with it (running
    /// executions are stopped by whoever closes the session, first).
    pub fn shutdown(&self) {
        self.alive.store(false, Ordering::SeqCst);
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The zygote's first message: the exit-note region (a memfd) to map before it forks, or none.
fn send_notes(sock: &OwnedFd, notes: Option<&ExitNotes>) -> nix::Result<()> {
    let setup = match notes {
        Some(n) => serde_json::json!({"notes": {
            "slots": exit_notes::SLOTS,
            "page": n.page_size(),
            "futex": libc::SYS_futex,
        }}),
        None => serde_json::json!({ "notes": null }),
    };
    let fds: Vec<RawFd> = notes.iter().map(|n| n.memfd().as_raw_fd()).collect();
    send(sock.as_raw_fd(), setup.to_string().as_bytes(), &fds)
}

/// The daemon's and the zygote's ends of the zygote's socket: messages, not a byte stream, so
/// one job is one read.
fn socket_pair() -> nix::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

/// Lets the daemon's end of the zygote's socket carry a job of [`MAX_JOB_BYTES`] in one
/// message. A message on it is bounded by the send buffer, ≈ 208 KiB by Linux's default
/// (`net.core.wmem_default`), and a larger job would start cold. The buffer is only a bound:
/// memory is charged for messages queued, which the zygote reads as they come.
/// `SO_SNDBUFFORCE` (CAP_NET_ADMIN, which the daemon has as root) passes over
/// `net.core.wmem_max`; without it the buffer grows as far as that allows. Returns the bytes
/// one message may now hold.
fn fit_send_buffer(sock: &OwnedFd) -> usize {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    // The kernel doubles the figure for its own bookkeeping, which leaves room for a message's.
    let wanted = MAX_JOB_BYTES;
    if setsockopt(sock, sockopt::SndBufForce, &wanted).is_err() {
        let _ = setsockopt(sock, sockopt::SndBuf, &wanted);
    }
    // A datagram may take the buffer but for a small header (`unix_dgram_sendmsg`).
    getsockopt(sock, sockopt::SndBuf).map_or(0, |b| b.saturating_sub(32))
}

/// One message to the zygote with `fds` (SCM_RIGHTS). Never blocks: a full socket means a
/// stuck zygote, and the runtime must not wait on it.
fn send(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> nix::Result<()> {
    let iov = [std::io::IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(
        sock,
        &iov,
        if fds.is_empty() { &[] } else { &cmsg },
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(|_| ())
}

/// One message from the zygote's socket without blocking: its length and fds, `None` at EOF.
fn receive(fd: RawFd, buf: &mut [u8]) -> nix::Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let m = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    if let Ok(cms) = m.cmsgs() {
        for c in cms {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these fds for us.
                fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
    }
    // A zero-length read on a SOCK_SEQPACKET socket is the peer's hang-up.
    Ok((m.bytes > 0).then_some((m.bytes, fds)))
}

/// Reads the zygote's and its children's messages on the runtime (no thread of its own: a
/// reader thread cost a thread wake-up on each report, two of them on every execution's
/// critical path) until the zygote hangs up.
async fn reader(
    sock: Arc<OwnedFd>,
    table: Arc<Mutex<Table>>,
    alive: Arc<AtomicBool>,
    empty: Arc<AtomicBool>,
    hello: oneshot::Sender<u32>,
) {
    let mut hello = Some(hello);
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: the AsyncFd holds one of the socket's `Arc`s, so the fd stays open while it is
    // registered; it deregisters before dropping that `Arc`.
    match unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) } {
        Ok(afd) => loop {
            let Ok(mut ready) = afd.readable().await else {
                break;
            };
            match receive(afd.get_ref().as_raw_fd(), &mut buf) {
                Ok(Some((n, fds))) => handle(&buf[..n], fds, &table, &empty, &mut hello),
                Ok(None) => break,
                Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading the python zygote's socket");
                    break;
                }
            }
        },
        Err(e) => tracing::warn!(error = %e, "cannot watch the python zygote's socket"),
    }
    alive.store(false, Ordering::SeqCst);
    // Dropping the senders tells every waiter the zygote is gone.
    let mut t = lock(&table);
    t.pending.clear();
    t.by_pid.clear();
}

/// Acts on one message: resolves the waiters it concerns.
fn handle(
    bytes: &[u8],
    fds: Vec<OwnedFd>,
    table: &Mutex<Table>,
    empty: &AtomicBool,
    hello: &mut Option<oneshot::Sender<u32>>,
) {
    let msg: Message = match serde_json::from_slice(bytes) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "garbled message from the python zygote");
            return;
        }
    };
    let mut t = lock(table);
    match msg {
        Message::Empty { empty: e } => {
            empty.store(e, Ordering::SeqCst);
            if e {
                tracing::warn!(
                    "the python zygote has no spare and cannot fork one: executions start cold until it can"
                );
            }
        }
        Message::Hello { hello: pid } => {
            if let Some(tx) = hello.take() {
                let _ = tx.send(pid);
            }
        }
        Message::Forked { forked, pid } => {
            if let Some(p) = t.pending.get_mut(&forked) {
                p.pid = Some(pid);
                t.by_pid.insert(pid, forked);
            }
        }
        Message::Ready { ready, pid } => {
            t.by_pid.insert(pid, ready);
            if let Some(p) = t.pending.get_mut(&ready) {
                p.pid = Some(pid);
                match (p.ready.take(), fds.into_iter().next()) {
                    (Some(tx), Some(pidfd)) => {
                        // The start gave up waiting for this report (its timeout) and failed:
                        // nobody would supervise the snippet the child is about to run.
                        if let Err(Ok(late)) = tx.send(Ok(Ready { pid, pidfd })) {
                            tracing::warn!(
                                pid,
                                "a pooled python child reported after its start gave up; killed"
                            );
                            kill_unsupervised(&late);
                        }
                    }
                    (Some(tx), None) => {
                        // By pid, as the pidfd is what is missing; its own session by now (the
                        // steps ran), so the group is the execution. Only a child already
                        // ended, reaped and its pid reused within this moment could make
                        // this reach another process.
                        if let Ok(pid) = i32::try_from(pid) {
                            // SAFETY: kill takes integers and touches no memory.
                            unsafe {
                                libc::kill(-pid, libc::SIGKILL);
                                libc::kill(pid, libc::SIGKILL);
                            }
                        }
                        let _ = tx.send(Err(NotReady::NoPidfd));
                    }
                    (None, _) => {}
                }
            }
        }
        Message::Declined { declined } => {
            if let Some(tx) = t.pending.remove(&declined).and_then(|mut p| p.ready.take()) {
                let _ = tx.send(Err(NotReady::Declined));
            }
        }
        Message::Failed { failed, error } => {
            if let Some(tx) = t.pending.get_mut(&failed).and_then(|p| p.ready.take()) {
                let _ = tx.send(Err(NotReady::Failed(error)));
            }
        }
        Message::Exit { exit: pid, status } => {
            if let Some(token) = t.by_pid.remove(&pid)
                && let Some(mut p) = t.pending.remove(&token)
            {
                if let Some(tx) = p.ready.take() {
                    let _ = tx.send(Err(NotReady::Failed(format!(
                        "the zygote child ended before running the snippet ({})",
                        describe_status(status)
                    ))));
                }
                if let Some(tx) = p.exit.take() {
                    let _ = tx.send(status);
                }
            }
        }
    }
}

/// Kills a child whose start was abandoned, and its process group (the child's own session by
/// the time it reports). The pidfd pins the child: its pid is not another process's while the
/// pidfd's signal reaches it.
fn kill_unsupervised(child: &Ready) {
    if crate::sandbox::pidfd_send_signal(&child.pidfd, libc::SIGKILL).is_ok()
        && let Ok(pid) = i32::try_from(child.pid)
    {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// `PIDFD_GET_INFO` (Linux 6.13+) and its `PIDFD_INFO_EXIT` flag (6.15+): the wait status of a
/// process through a pidfd of it, once its parent has reaped it.
const PIDFD_INFO_EXIT: u64 = 1 << 3;
const PIDFD_GET_INFO: libc::c_ulong = nix::request_code_readwrite!(0xFF, 11, 64) as libc::c_ulong;

/// `struct pidfd_info`, version 0 (64 bytes).
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    ids: [u32; 11],
    exit_code: i32,
}

/// Whether this daemon may read other processes' exit codes in `/proc/<pid>/stat` (the kernel
/// shows 0 to a reader without ptrace access, which would pass for a clean exit).
fn may_read_exit_codes() -> bool {
    static MAY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MAY.get_or_init(|| {
        const CAP_SYS_PTRACE: u32 = 19;
        crate::sandbox::caps::own_set("CapEff") & (1 << CAP_SYS_PTRACE) != 0
    })
}

/// The wait status of a zygote child whose pidfd turned readable, learned without its parent
/// (the zygote, whose report needs it scheduled and running Python): from the kernel's record
/// once the zygote reaped it, else from `/proc/<pid>/stat` of the zombie. `None` when neither
/// can be had (a kernel before 6.15, no ptrace access): the zygote's report is the answer then.
pub fn exit_status_of_ended(pid: u32, pidfd: std::os::fd::BorrowedFd<'_>) -> Option<i32> {
    if let Reaped::Yes(status) = reaped(pidfd)? {
        return Some(status);
    }
    if !may_read_exit_codes() {
        return None;
    }
    let zombie = procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .ok()
        .filter(|s| s.state == 'Z')
        .and_then(|s| s.exit_code);
    // Asked again after the read: still unreaped means the pid was still the child's while
    // we read it (a pid is only reused once reaped); reaped meanwhile, the kernel's record.
    match reaped(pidfd)? {
        Reaped::Yes(status) => Some(status),
        Reaped::No => zombie,
    }
}

/// The start time (clock ticks since boot) of the zygote child `pid` whose pidfd is `pidfd`;
/// 0 when the zygote had reaped it before it was read (the pid may name another process by
/// then). A kernel that cannot tell (before Linux 6.13) gets what `/proc` said.
pub fn start_ticks_of(pid: u32, pidfd: std::os::fd::BorrowedFd<'_>) -> u64 {
    let ticks = crate::daemon::launcher::start_ticks(pid);
    match reaped(pidfd) {
        Some(Reaped::Yes(_)) => 0,
        Some(Reaped::No) | None => ticks,
    }
}

/// Whether the kernel keeps a process's wait status for its pidfd once anyone reaped it
/// (`PIDFD_INFO_EXIT`, Linux 6.15+). Then a pooled child may outlive its zygote: whichever
/// process reaps the orphan (init, a subreaper), the daemon still learns how it ended.
/// Probed once, with a child that exits at once.
pub fn exit_status_outlives_reaping() -> bool {
    static KEPT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KEPT.get_or_init(|| {
        // SAFETY: the child only calls `_exit`, which is async-signal-safe.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: ends the child without running anything of the parent's.
            unsafe { libc::_exit(3) };
        }
        if pid < 0 {
            return false;
        }
        let pidfd = crate::sandbox::pidfd_open(pid as u32).ok();
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        pidfd.and_then(|fd| reaped(fd.as_fd())).is_some_and(|r| {
            matches!(r, Reaped::Yes(status) if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 3)
        })
    })
}

enum Reaped {
    Yes(i32),
    No,
}

/// Whether the kernel holds the exit status of the pidfd's process (reaped); `None` when it
/// cannot say (`PIDFD_GET_INFO` missing, before Linux 6.13).
fn reaped(pidfd: std::os::fd::BorrowedFd<'_>) -> Option<Reaped> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..PidfdInfo::default()
    };
    // SAFETY: the kernel writes at most `size_of::<PidfdInfo>()` bytes (the size in the request
    // code) into `info`, which lives across the call.
    let rc = unsafe {
        libc::ioctl(
            pidfd.as_raw_fd(),
            PIDFD_GET_INFO,
            &mut info as *mut PidfdInfo,
        )
    };
    if rc != 0 {
        return None;
    }
    Some(if info.mask & PIDFD_INFO_EXIT != 0 {
        Reaped::Yes(info.exit_code)
    } else {
        Reaped::No
    })
}

/// A job's exit note: its slot, where the code arrives, and whom to tell once the child is
/// really gone (the slot is freed then, not before: see [`exit_notes`]).
pub struct Note {
    slot: Slot,
    code: oneshot::Receiver<u8>,
    gone: oneshot::Sender<()>,
}

impl Note {
    /// The note of a job given `slot` (from [`ExitNotes::take`]), and what resolves once its
    /// child is gone ([`crate::daemon::launcher::Launched::gone`]).
    pub fn new(slot: Slot, code: oneshot::Receiver<u8>) -> (Note, oneshot::Receiver<()>) {
        let (gone, gone_rx) = oneshot::channel();
        (Note { slot, code, gone }, gone_rx)
    }
}

/// How long a noted child may take to be gone before its slot is freed anyway (it was killed
/// right after its note; a kernel that cannot end it in this time has worse problems).
const GONE_AFTER_NOTE: std::time::Duration = std::time::Duration::from_secs(30);

/// How the zygote child `pid` of a job ended, as soon as it is known: its exit note
/// ([`exit_notes`]), written before the kernel tears the process down; else read from its
/// `pidfd` ([`exit_status_of_ended`]), which usually beats the zygote's `report` (the zygote
/// must be scheduled, handle SIGCHLD in Python, reap and write) and does not need the zygote
/// to run at all; the report where that cannot be read. After the zygote died, only the pidfd
/// can tell (the child outlived it, or died with it: SIGKILL when the status cannot be read).
/// After a note, the pidfd is watched on until the child is gone, which `note.gone` tells.
pub async fn child_exit(
    pid: u32,
    pidfd: OwnedFd,
    mut report: oneshot::Receiver<i32>,
    note: Option<Note>,
) -> std::io::Result<ProcessExit> {
    // SAFETY: the AsyncFd owns the pidfd and deregisters it before closing it.
    let afd = unsafe { AsyncFd::register(pidfd)? };
    let (slot_gone, noted) = match note {
        Some(Note { slot, code, gone }) => (Some((slot, gone)), Some(code)),
        None => (None, None),
    };
    let mut zygote_died = false;
    tokio::select! {
        biased;
        // No note, or one the note thread dropped: the branch is off, the others tell.
        Some(Ok(code)) = async { match noted { Some(rx) => Some(rx.await), None => None } } => {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(GONE_AFTER_NOTE, afd.readable()).await;
                if let Some((slot, gone)) = slot_gone {
                    drop(slot);
                    let _ = gone.send(());
                }
            });
            return Ok(ProcessExit::Exited(i32::from(code)));
        }
        status = &mut report => match status {
            Ok(status) => return Ok(exit_of(status)),
            Err(_) => {
                zygote_died = true;
                let _ = afd.readable().await?;
            }
        },
        gone = afd.readable() => {
            let _ = gone?;
        }
    }
    if let Some(status) = exit_status_of_ended(pid, afd.get_ref().as_fd()) {
        return Ok(exit_of(status));
    }
    if !zygote_died && let Ok(status) = report.await {
        return Ok(exit_of(status));
    }
    Ok(ProcessExit::Signaled(libc::SIGKILL))
}

/// A wait status as a [`ProcessExit`].
pub fn exit_of(status: i32) -> ProcessExit {
    if libc::WIFSIGNALED(status) {
        ProcessExit::Signaled(libc::WTERMSIG(status))
    } else {
        ProcessExit::Exited(libc::WEXITSTATUS(status))
    }
}

fn describe_status(status: i32) -> String {
    match exit_of(status) {
        ProcessExit::Exited(c) => format!("exit code {c}"),
        ProcessExit::Signaled(s) => format!("signal {s}"),
    }
}

/// A zygote process starting up.
pub struct Spawned {
    /// The zygote (usable once `hello` resolved).
    pub zygote: Arc<Zygote>,
    /// Resolves once the zygote is warm (imports done), with its pid.
    pub hello: oneshot::Receiver<u32>,
    /// The zygote process, to be awaited (reaped) by the caller.
    pub child: tokio::process::Child,
}

/// Starts a zygote of `python` in `workdir`, forked on `spawner` with the standard sandbox
/// (own session, PDEATHSIG to the daemon, no inherited fds, signals reset); it keeps the
/// daemon's user and privileges because each child drops them itself.
/// What a session's zygote is started with.
pub struct Settings {
    /// The interpreter.
    pub python: std::path::PathBuf,
    /// Its working directory (the pool's dir).
    pub workdir: std::path::PathBuf,
    /// Children it keeps forked (`context_pool_size`).
    pub spares: u32,
    /// Offer its memory, and so its children's, for same-page merging.
    pub merge_pages: bool,
    /// The region its children note their exit codes in, when the kernel allows it.
    pub notes: Option<Arc<ExitNotes>>,
}

pub async fn spawn(settings: &Settings, spawner: &Spawner) -> Result<Spawned, LaunchError> {
    let (python, workdir) = (settings.python.as_path(), settings.workdir.as_path());
    let descriptor = |what: &'static str| move |source| LaunchError::Descriptor { what, source };
    let (ours, theirs) = socket_pair().map_err(|e| descriptor("socketpair")(e.into()))?;
    let carries = fit_send_buffer(&ours);
    static SAID: std::sync::Once = std::sync::Once::new();
    if carries < MAX_JOB_BYTES {
        SAID.call_once(|| {
            tracing::info!(
                bytes = carries,
                "the python zygote's socket carries smaller jobs than the zygote reads (the daemon \
             lacks CAP_NET_ADMIN and net.core.wmem_max is low): larger python jobs start cold"
            )
        });
    }
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map_err(descriptor("/dev/null"))?;
    let stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(descriptor("dup stderr"))?;
    let mut cmd = std::process::Command::new(python);
    // The capabilities every child keeps (its `limit_capabilities` step): the zygote drops
    // the bounding part for all of them at once and prepares the rest (see zygote.py).
    let caps = serde_json::json!({
        "keep": crate::sandbox::caps::kept_mask(),
        "bounding": crate::sandbox::caps::bounding_drops(),
    });
    cmd.arg("-c")
        .arg(ZYGOTE_SOURCE)
        .arg(settings.spares.to_string())
        .arg(caps.to_string());
    // What the zygote must find in force, so that its children may say they run under the
    // syscall filter: the daemon's own filters (an outer sandbox's) and this one.
    if let Some(expected) = crate::sandbox::syscall_filter::filters_in_children() {
        cmd.arg(expected);
    }
    cmd.env_clear();
    cmd.env("PATH", crate::sandbox::spawn::MINIMAL_PATH);
    cmd.env("LANG", "C.UTF-8");
    cmd.env("HOME", workdir);
    let spec = IsolationSpec {
        user: None,
        working_dir: workdir.to_path_buf(),
        intrinsics: Intrinsics::ALL,
        // The session's machinery, not an execution: each child it forks makes its own domain
        // and sets its own oom_score_adj 0 before it takes a job, as a cold spawn does.
        role: Role::DaemonHelper,
        read_paths: Vec::new(),
        write_paths: Vec::new(),
        network_namespace: None,
        cgroup_procs: Vec::new(),
        // Each child pins itself to its execution's cores (a step of its plan).
        cpus: None,
        // Children inherit it at fork: one step here covers every pooled execution.
        merge_pages: settings.merge_pages,
        stdout: null.into(),
        stderr,
    };
    spec.apply(&mut cmd)
        .map_err(|e| crate::daemon::launcher::isolation_failed(&e))?;
    // After apply: fd 0 of the zygote is its end of the socket pair.
    cmd.stdin(std::process::Stdio::from(theirs));
    let child = super::spawn_pool_process(spawner, cmd, python).await?;
    let pid = child.id().unwrap_or(0);
    send_notes(&ours, settings.notes.as_deref())
        .map_err(|e| LaunchError::Sandbox(format!("sending the exit-note region: {e}")))?;
    let sock = Arc::new(ours);
    let table = Arc::new(Mutex::new(Table::default()));
    let alive = Arc::new(AtomicBool::new(true));
    let empty = Arc::new(AtomicBool::new(false));
    let (htx, hrx) = oneshot::channel();
    tokio::spawn(reader(
        sock.clone(),
        table.clone(),
        alive.clone(),
        empty.clone(),
        htx,
    ));
    Ok(Spawned {
        zygote: Arc::new(Zygote {
            sock,
            pid,
            table,
            alive,
            empty,
            next_token: AtomicU64::new(1),
        }),
        hello: hrx,
        child,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn interpreters_older_than_3_9_are_not_warmed() {
        for old in ["3.8.18", "3.6.15", "2.7.18", "3.8.0rc1"] {
            let why = unwarmable(old).unwrap_or_else(|| panic!("{old} would be warmed"));
            assert!(why.contains(old) && why.contains("3.9 or newer"), "{why}");
        }
        for fine in [
            "3.9.18", "3.11.7", "3.13.0", "3.14.0a1", "4.0", "unknown", "",
        ] {
            assert_eq!(unwarmable(fine), None, "{fine}");
        }
    }

    /// The zygote itself refuses an interpreter that lacks what it needs (python 3.8 and
    /// older have no `os.pidfd_open`), naming the version, rather than forking spares that
    /// die at once: played by the real python3 with `pidfd_open` taken away before the
    /// zygote's source runs.
    #[test]
    fn the_zygote_refuses_an_interpreter_without_pidfd_open() {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!("import os\ndel os.pidfd_open\n{ZYGOTE_SOURCE}"))
            .arg("1")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("python3");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{stderr}");
        assert!(
            stderr.contains("lacks os.pidfd_open") && stderr.contains("3.9 or newer needed"),
            "{stderr}"
        );
        let version = String::from_utf8(
            std::process::Command::new("python3")
                .args(["-c", "import sys; print(sys.version.split()[0])"])
                .output()
                .expect("python3")
                .stdout,
        )
        .expect("utf-8");
        assert!(stderr.contains(version.trim()), "{stderr}");
    }

    /// The real zygote keeping one spare, on a fresh socket pair: our end, and the zygote.
    fn zygote_on_socket_pair(stderr: std::process::Stdio) -> (OwnedFd, std::process::Child) {
        let (ours, theirs) = socket_pair().expect("socketpair");
        let zygote = std::process::Command::new("python3")
            .arg("-c")
            .arg(ZYGOTE_SOURCE)
            .arg("1")
            .stdin(std::process::Stdio::from(theirs))
            .stderr(stderr)
            .spawn()
            .expect("python3");
        (ours, zygote)
    }

    /// The zygote's and its children's messages on `ours`, one at a time, until `wanted` says
    /// yes: that one.
    fn next_message(
        ours: &OwnedFd,
        wanted: &dyn Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "no such message from the zygote");
            let mut p = libc::pollfd {
                fd: ours.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd on the stack.
            if unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) } != 1 {
                continue;
            }
            let mut buf = [0u8; 4096];
            let n = nix::sys::socket::recv(ours.as_raw_fd(), &mut buf, MsgFlags::empty())
                .expect("recv");
            assert!(n > 0, "the zygote closed its socket");
            let msg: serde_json::Value = serde_json::from_slice(&buf[..n]).expect("json");
            if wanted(&msg) {
                return msg;
            }
        }
    }

    /// A child's ready report without its pidfd (a daemon at its open-file limit receives
    /// none) fails its start as `NoPidfd` and kills the child, which the daemon could not
    /// follow: played with a real process standing in for the child.
    #[test]
    fn a_ready_report_without_its_pidfd_fails_the_start_and_kills_the_child() {
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("sleep");
        let table = Mutex::new(Table::default());
        let (tx, mut rx) = oneshot::channel();
        lock(&table).pending.insert(
            9,
            Pending {
                ready: Some(tx),
                exit: None,
                pid: None,
            },
        );
        let report = format!(r#"{{"ready": 9, "pid": {}}}"#, child.id());
        handle(
            report.as_bytes(),
            Vec::new(),
            &table,
            &AtomicBool::new(false),
            &mut None,
        );
        assert!(matches!(rx.try_recv(), Ok(Err(NotReady::NoPidfd))));
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    }

    /// A job's script of `source` in a fresh directory (kept while the guard lives), and
    /// /dev/null opened for writing, to pass as its stdout and stderr.
    fn script_and_null(source: &str) -> (tempfile::TempDir, std::path::PathBuf, std::fs::File) {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("main.py");
        std::fs::write(&script, source).expect("script");
        let null = std::fs::File::options()
            .write(true)
            .open("/dev/null")
            .expect("/dev/null");
        (dir, script, null)
    }

    /// A daemon that shuts the pool's socket while the zygote has a report on its way (here
    /// a child's exit) ends the zygote quietly, as a hang-up does: exit status 0 and nothing
    /// on its stderr, not a broken-pipe traceback. Shutting only our reading side stands in
    /// for the daemon's shutdown landing between the zygote's poll and its send: the zygote
    /// sees no hang-up, and its next send fails.
    #[test]
    fn a_report_to_a_shut_socket_ends_the_zygote_quietly() {
        use std::io::Read;
        let (ours, mut zygote) = zygote_on_socket_pair(std::process::Stdio::piped());
        send(ours.as_raw_fd(), b"{}", &[]).expect("send the setup");
        next_message(&ours, &|m| m.get("hello").is_some());
        let (_dir, script, null) = script_and_null("import time\ntime.sleep(0.3)\n");
        let job = serde_json::json!({
            "token": 5, "steps": [], "env": {}, "argv": ["main.py"], "script": script,
        });
        send(
            ours.as_raw_fd(),
            job.to_string().as_bytes(),
            &[null.as_raw_fd(), null.as_raw_fd()],
        )
        .expect("send the job");
        let ready = next_message(&ours, &|m| {
            m.get("failed").is_some() || m.get("ready").is_some()
        });
        assert_eq!(ready["ready"], 5, "{ready}");
        nix::sys::socket::shutdown(ours.as_raw_fd(), nix::sys::socket::Shutdown::Read)
            .expect("shutdown");
        let status = zygote.wait().expect("wait");
        let mut stderr = String::new();
        zygote
            .stderr
            .take()
            .expect("piped")
            .read_to_string(&mut stderr)
            .expect("stderr");
        assert!(status.success(), "{status}: {stderr}");
        assert_eq!(stderr, "");
    }

    /// A child whose plan has the syscall filter step checks the filter is in force (the
    /// zygote compares the filters it runs under with what the daemon says at its start) and
    /// fails the job, naming the step, where it is not, rather than running the snippet
    /// unfiltered. This zygote is told to expect the filter but started without it; whatever
    /// filters this test itself runs under (a container's) do not count.
    #[test]
    fn a_child_without_the_syscall_filter_refuses_its_job() {
        let expected = crate::sandbox::syscall_filter::filters_in_children()
            .expect("this machine takes the filter");
        let (ours, theirs) = socket_pair().expect("socketpair");
        let mut zygote = std::process::Command::new("python3")
            .arg("-c")
            .arg(ZYGOTE_SOURCE)
            .args(["1", r#"{"keep": 0, "bounding": []}"#, expected])
            .stdin(std::process::Stdio::from(theirs))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3");
        send(ours.as_raw_fd(), b"{}", &[]).expect("send the setup");
        next_message(&ours, &|m| m.get("hello").is_some());
        let (_dir, script, null) = script_and_null("print('ran')\n");
        let job = serde_json::json!({
            "token": 9, "steps": [{"step": "syscall_filter"}], "env": {}, "argv": ["main.py"],
            "script": script,
        });
        send(
            ours.as_raw_fd(),
            job.to_string().as_bytes(),
            &[null.as_raw_fd(), null.as_raw_fd()],
        )
        .expect("send the job");
        let failed = next_message(&ours, &|m| {
            m.get("failed").is_some() || m.get("ready").is_some()
        });
        assert_eq!(failed["failed"], 9, "{failed}");
        assert_eq!(
            failed["error"], "syscall_filter: the zygote runs without the seccomp filter",
            "{failed}"
        );
        drop(ours);
        assert!(zygote.wait().expect("wait").success());
    }

    /// A memfd of `bytes`, standing in for the daemon's exit-note region.
    fn note_region(bytes: usize) -> OwnedFd {
        let region =
            nix::sys::memfd::memfd_create(c"test-notes", nix::sys::memfd::MFdFlags::empty())
                .expect("memfd");
        nix::unistd::ftruncate(&region, bytes as i64).expect("ftruncate");
        region
    }

    /// A malformed first message (the exit-note setup) leaves the zygote without notes, says
    /// why on its stderr, and the zygote still warms up and serves: played by the real zygote
    /// on a socket pair, each setup message a way the daemon could get it wrong.
    #[test]
    fn a_malformed_note_setup_leaves_the_zygote_serving_without_notes() {
        use std::io::Read;
        let region = note_region(4096);
        let cases: [(&str, bool, &str); 5] = [
            (r#"[1, 2]"#, false, "AttributeError"),
            (r#"{"notes": "x"}"#, true, "TypeError"),
            (r#"{"notes": {"slots": 3}}"#, true, "KeyError: 'page'"),
            // Four pages asked of a one-page memfd.
            (
                r#"{"notes": {"slots": 3, "page": 4096, "futex": 202}}"#,
                true,
                "ValueError: mmap length is greater than file size",
            ),
            (
                "{not json",
                false,
                "JSONDecodeError: Expecting property name",
            ),
        ];
        for (setup, with_fd, why) in cases {
            let (ours, mut child) = zygote_on_socket_pair(std::process::Stdio::piped());
            let fds = if with_fd {
                vec![region.as_raw_fd()]
            } else {
                vec![]
            };
            send(ours.as_raw_fd(), setup.as_bytes(), &fds).expect("send");
            let mut buf = [0u8; 256];
            let n = nix::sys::socket::recv(ours.as_raw_fd(), &mut buf, MsgFlags::empty())
                .expect("recv");
            let hello: serde_json::Value =
                serde_json::from_slice(&buf[..n]).unwrap_or_else(|e| panic!("{setup}: {e}"));
            assert_eq!(hello["hello"], child.id(), "{setup}");
            // EOF on its socket ends the zygote.
            drop(ours);
            let status = child.wait().expect("wait");
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .expect("piped")
                .read_to_string(&mut stderr)
                .expect("stderr");
            assert!(status.success(), "{setup}: {status} {stderr}");
            assert!(
                stderr.contains("elide python zygote: no exit notes: ") && stderr.contains(why),
                "{setup}: {stderr}"
            );
        }
    }

    /// The real zygote on a socket pair, set up with an exit-note region of two slots (the
    /// region's memfd is named `test-notes`); the hello is the next message.
    fn zygote_with_two_note_slots() -> (OwnedFd, OwnedFd, std::process::Child) {
        let page = 4096usize;
        let region = note_region(3 * page);
        let (ours, zygote) = zygote_on_socket_pair(std::process::Stdio::inherit());
        let setup =
            serde_json::json!({"notes": {"slots": 2, "page": page, "futex": libc::SYS_futex}});
        send(
            ours.as_raw_fd(),
            setup.to_string().as_bytes(),
            &[region.as_raw_fd()],
        )
        .expect("send the setup");
        (region, ours, zygote)
    }

    /// A job whose exit-note slot lies outside the region fails its start with the slot named
    /// (the daemon never sends one: this guards the zygote's own check), and the zygote goes on
    /// serving: the next job, with a slot in range, runs and reports its exit. Played by the
    /// real zygote on a socket pair with a region of two slots.
    #[test]
    fn a_note_slot_out_of_range_fails_the_start_and_names_the_slot() {
        let (_region, ours, mut zygote) = zygote_with_two_note_slots();
        let next_until = |wanted: &dyn Fn(&serde_json::Value) -> bool| next_message(&ours, wanted);
        next_until(&|m| m.get("hello").is_some());
        let (_dir, script, null) = script_and_null("import sys\nsys.exit(3)\n");
        let job = |token: u64, slot: i64| {
            serde_json::json!({
                "token": token, "steps": [], "env": {}, "argv": ["main.py"],
                "script": script, "note": {"slot": slot, "nonce": 11},
            })
            .to_string()
        };
        let fds = [null.as_raw_fd(), null.as_raw_fd()];
        for slot in [2, -1] {
            send(ours.as_raw_fd(), job(7, slot).as_bytes(), &fds).expect("send the job");
            let failed = next_until(&|m| m.get("failed").is_some() || m.get("ready").is_some());
            assert_eq!(failed["failed"], 7, "{failed}");
            let error = failed["error"].as_str().unwrap_or_default();
            assert_eq!(
                error,
                format!("exit note: slot {slot} out of range"),
                "{failed}"
            );
        }
        send(ours.as_raw_fd(), job(8, 1).as_bytes(), &fds).expect("send the job");
        let ready = next_until(&|m| m.get("failed").is_some() || m.get("ready").is_some());
        assert_eq!(ready["ready"], 8, "{ready}");
        let pid = ready["pid"].clone();
        let exit = next_until(&|m| m.get("exit") == Some(&pid));
        assert_eq!(exit["status"], 3 << 8, "{exit}");
        drop(ours);
        assert!(zygote.wait().expect("wait").success());
    }

    /// A job without an exit-note slot (the daemon had none free) runs with no page of the
    /// region mapped: its snippet can neither read nor write any execution's note. Played by
    /// the real zygote on a socket pair with a region of two slots.
    #[test]
    fn a_job_without_a_note_slot_maps_no_page_of_the_region() {
        let (_region, ours, mut zygote) = zygote_with_two_note_slots();
        next_message(&ours, &|m| m.get("hello").is_some());
        let dir = tempfile::tempdir().expect("tempdir");
        let found = dir.path().join("found");
        let (_script_dir, script, null) = script_and_null(&format!(
            "maps = [l for l in open('/proc/self/maps') if 'test-notes' in l]\n\
             open({:?}, 'w').write(repr(maps))\n",
            found.display().to_string()
        ));
        let fds = [null.as_raw_fd(), null.as_raw_fd()];
        let job = |note: Option<serde_json::Value>| {
            let mut job = serde_json::json!({
                "token": 5, "steps": [], "env": {}, "argv": ["main.py"], "script": script,
            });
            if let Some(n) = note {
                job["note"] = n;
            }
            job.to_string()
        };
        // With a slot, that one page stays (the check has something to find); without, none.
        for (note, wanted) in [
            (Some(serde_json::json!({"slot": 1, "nonce": 3})), 1),
            (None, 0),
        ] {
            send(ours.as_raw_fd(), job(note.clone()).as_bytes(), &fds).expect("send the job");
            let ready = next_message(&ours, &|m| {
                m.get("failed").is_some() || m.get("ready").is_some()
            });
            assert_eq!(ready["ready"], 5, "{ready}");
            let pid = ready["pid"].clone();
            let exit = next_message(&ours, &|m| m.get("exit") == Some(&pid));
            assert_eq!(exit["status"], 0, "{exit}");
            let maps = std::fs::read_to_string(&found).expect("the snippet's report");
            assert_eq!(
                maps.matches("test-notes").count(),
                wanted,
                "{note:?}: {maps}"
            );
        }
        drop(ours);
        assert!(zygote.wait().expect("wait").success());
    }

    /// A job larger than the zygote reads whole is refused before it is sent, although the
    /// socket would carry it: the start falls back cold instead of a spare reading it cut short.
    #[test]
    fn a_job_larger_than_the_zygote_reads_is_not_sent() {
        let (ours, theirs) = socket_pair().expect("socketpair");
        assert!(
            fit_send_buffer(&ours) >= MAX_JOB_BYTES,
            "the tests run as root"
        );
        let zygote = Zygote {
            sock: Arc::new(ours),
            pid: 0,
            table: Arc::default(),
            alive: Arc::new(AtomicBool::new(true)),
            empty: Arc::default(),
            next_token: AtomicU64::new(1),
        };
        let job = |len: usize| {
            let mut m = serde_json::Map::new();
            m.insert("env".into(), "x".repeat(len).into());
            m
        };
        let sent = zygote.submit(job(MAX_JOB_BYTES - 100), &[]);
        assert!(sent.is_ok(), "a job the zygote reads whole is sent");
        let mut buf = vec![0u8; 2 * MAX_JOB_BYTES];
        let n = nix::sys::socket::recv(theirs.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT)
            .expect("the job arrived");
        assert!(n <= MAX_JOB_BYTES, "{n}");
        match zygote.submit(job(MAX_JOB_BYTES), &[]) {
            Err(SendError::TooLarge { bytes }) => assert!(bytes > MAX_JOB_BYTES, "{bytes}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a job larger than the zygote reads was sent"),
        }
        assert_eq!(
            nix::sys::socket::recv(theirs.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT),
            Err(nix::errno::Errno::EAGAIN),
            "nothing more was sent"
        );
        // Only the first job waits for its child.
        assert_eq!(lock(&zygote.table).pending.len(), 1);
    }

    /// The socket as made refuses a job the zygote would read whole (Linux's default send
    /// buffer, ≈ 208 KiB); once fitted it carries one of the largest such jobs in one message.
    #[test]
    fn the_sockets_send_buffer_is_fitted_to_the_largest_job() {
        let (ours, theirs) = socket_pair().expect("socketpair");
        let job = vec![b'x'; MAX_JOB_BYTES];
        let fits = |buf: usize| buf.saturating_sub(32) >= MAX_JOB_BYTES;
        let before = nix::sys::socket::getsockopt(&ours, nix::sys::socket::sockopt::SndBuf)
            .expect("SO_SNDBUF");
        if !fits(before) {
            assert_eq!(
                send(ours.as_raw_fd(), &job, &[]),
                Err(nix::errno::Errno::EMSGSIZE),
                "a {before}-byte send buffer"
            );
        }
        assert!(
            fit_send_buffer(&ours) >= MAX_JOB_BYTES,
            "the tests run as root"
        );
        send(ours.as_raw_fd(), &job, &[]).expect("the largest job in one message");
        let mut buf = vec![0u8; 2 * MAX_JOB_BYTES];
        let n = nix::sys::socket::recv(theirs.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT)
            .expect("the job arrived");
        assert_eq!(n, MAX_JOB_BYTES);
    }

    /// A child that reports ready after its start gave up (the launcher dropped the waiter at
    /// its timeout) is killed with its process group, not left to run a snippet nobody
    /// supervises.
    #[test]
    fn a_child_that_reports_after_its_start_gave_up_is_killed() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .expect("sleep");
        let pid = child.id();
        let pidfd = crate::sandbox::pidfd_open(pid).expect("pidfd_open");
        let table = Mutex::new(Table::default());
        let (tx, rx) = oneshot::channel();
        lock(&table).pending.insert(
            5,
            Pending {
                ready: Some(tx),
                exit: None,
                pid: None,
            },
        );
        drop(rx);
        let report = format!(r#"{{"ready": 5, "pid": {pid}}}"#);
        handle(
            report.as_bytes(),
            vec![pidfd],
            &table,
            &AtomicBool::new(false),
            &mut None,
        );
        let status = child.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }

    /// A noted exit is answered while the process still exists (the note is written just
    /// before the kernel tears a child down), and `gone` follows once it has ended.
    #[tokio::test]
    async fn a_noted_exit_is_answered_before_the_process_is_gone() {
        let notes = ExitNotes::new().expect("memfd and futex_waitv (Linux 5.16+)");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pidfd = pidfd_of(child.id());
        let (slot, code) = notes.take().expect("a free slot");
        slot.note_for_test(5);
        let (note, mut gone_rx) = Note::new(slot, code);
        let (_report_tx, report) = oneshot::channel();
        let exit = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            child_exit(child.id(), pidfd, report, Some(note)),
        )
        .await
        .expect("answered on the note")
        .expect("no error");
        assert!(matches!(exit, ProcessExit::Exited(5)), "{exit:?}");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the process ended before the note was answered"
        );
        assert!(gone_rx.try_recv().is_err(), "gone before the process ended");
        child.kill().expect("kill");
        child.wait().expect("wait");
        tokio::time::timeout(std::time::Duration::from_secs(5), gone_rx)
            .await
            .expect("gone once the process ended")
            .expect("told, not dropped");
    }

    fn pidfd_of(pid: u32) -> OwnedFd {
        crate::sandbox::pidfd_open(pid).expect("pidfd_open")
    }

    fn wait_readable(fd: &OwnedFd) {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 10_000) }, 1);
    }

    #[test]
    fn the_status_of_an_ended_child_is_read_before_and_after_its_parent_reaps_it() {
        for (script, status) in [("exit 5", 5 << 8), ("kill -TERM $$", libc::SIGTERM)] {
            let mut child = std::process::Command::new("sh")
                .args(["-c", script])
                .spawn()
                .unwrap();
            let pid = child.id();
            let pidfd = pidfd_of(pid);
            wait_readable(&pidfd);
            // A zombie: its parent (this test) has not reaped it yet.
            if may_read_exit_codes() {
                assert_eq!(
                    exit_status_of_ended(pid, pidfd.as_fd()),
                    Some(status),
                    "{script}"
                );
            }
            let reaped = child.wait().unwrap();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::into_raw(reaped),
                status
            );
            // Reaped: only a kernel with PIDFD_INFO_EXIT (6.15+) still knows.
            match exit_status_of_ended(pid, pidfd.as_fd()) {
                Some(s) => assert_eq!(s, status, "{script}"),
                None => eprintln!("this kernel keeps no exit status for pidfds"),
            }
        }
    }
}
