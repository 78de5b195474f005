//! Exit notes: a pooled python child tells the daemon its exit code before the kernel tears
//! its address space down.
//!
//! A forked child's exit unmaps the whole copy of the zygote's image (thousands of page-table
//! entries, the pages it copied) before its pidfd turns readable or its parent learns of it:
//! ≈ 0.5 ms here, on every execution's critical path, with the zygote's refill fork on top.
//! The child knows its exit code earlier, once the snippet's `atexit` handlers ran and its
//! streams were flushed, and notes it in a page of memory shared with the daemon; a futex wake
//! brings the daemon's note thread. The daemon then answers waiters at once and kills what is
//! left of the execution (the child is already on its way out); its cleanup waits for the
//! process to be gone.
//!
//! Nothing of this is visible to the snippet as a file descriptor: one memfd is mapped by the
//! zygote (`slots` pages, one per execution at a time), and a child that takes a job unmaps
//! every page but its own slot before the snippet runs. A note is only taken with the nonce
//! the daemon gave that job, so a process that outlived its execution cannot write one for the
//! next user of its slot, and a snippet writing its own note only ends itself early, with the
//! code it chose (as `os._exit` would).
//!
//! Layout: page 0 holds the note threads' control words (one `u32` each); page `1 + i` is slot
//! `i`: a `u32` note word at offset 0 (0 = nothing yet, `0x100 | code` = noted) and the job's
//! `u64` nonce at offset 8. A thread waits on one bank of `BANK` slots (`futex_waitv` takes
//! at most 128 words, its control word among them); a bank's thread starts when the bank is
//! first used, so a daemon with few executions runs one.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Slots per note thread: `futex_waitv` waits on at most 128 words, one of them the control
/// word.
const BANK: usize = 127;
/// Banks per daemon. Pooled python executions running beyond `SLOTS` at one time simply end
/// the usual way; the region's pages exist only once touched.
const BANKS: usize = 8;
/// Slots per daemon.
pub const SLOTS: usize = BANK * BANKS;

/// The note word's "noted" bit; the low byte is the exit code.
const NOTED: u32 = 0x100;

const FUTEX_WAKE: libc::c_int = 1;
/// `futex_waitv` flag: a 32-bit futex (shared between processes: no FUTEX2_PRIVATE).
const FUTEX2_SIZE_U32: u32 = 0x02;

/// `struct futex_waitv` of the kernel's uapi.
#[repr(C)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

impl FutexWaitv {
    /// Waits on `word` (a 32-bit futex shared between processes) while it holds `val`.
    fn on(word: &AtomicU32, val: u32) -> Self {
        FutexWaitv {
            val: u64::from(val),
            uaddr: word.as_ptr() as u64,
            flags: FUTEX2_SIZE_U32,
            reserved: 0,
        }
    }
}

/// The shared region and the slots handed out of it. Lives as long as the daemon.
pub struct ExitNotes {
    shared: Arc<Shared>,
    memfd: OwnedFd,
}

struct Shared {
    /// Start of the mapping (`(1 + SLOTS) * page` bytes, MAP_SHARED, never unmapped).
    base: usize,
    page: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Lowest first, so executions fill the first bank before another thread is started.
    free: Vec<usize>,
    /// Banks whose thread runs.
    started: [bool; BANKS],
    /// Slots whose note the thread waits for: the job's nonce and who to tell.
    watched: HashMap<usize, (u64, oneshot::Sender<u8>)>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn nonce(&self, slot: usize) -> &AtomicU64 {
        // SAFETY: as for `word`; offset 8 is 8-aligned.
        unsafe { &*((self.base + (1 + slot) * self.page + 8) as *const AtomicU64) }
    }

    fn control(&self, bank: usize) -> &AtomicU32 {
        // SAFETY: within page 0 (BANKS u32s), 4-aligned, only accessed atomically.
        unsafe { &*((self.base + bank * 4) as *const AtomicU32) }
    }

    fn note_word(&self, slot: usize) -> &AtomicU32 {
        // SAFETY: in bounds of the mapping, page-aligned, and only accessed atomically.
        unsafe { &*((self.base + (1 + slot) * self.page) as *const AtomicU32) }
    }

    /// What a child writes at its end, nonce first (for tests of the note's readers).
    #[cfg(test)]
    fn write_note(&self, slot: usize, nonce: u64, code: u8) {
        self.nonce(slot).store(nonce, Ordering::SeqCst);
        self.note_word(slot)
            .store(NOTED | u32::from(code), Ordering::SeqCst);
        futex_wake(self.note_word(slot));
    }

    /// Wakes the note thread of `bank` so it waits on the current set of its slots.
    fn poke(&self, bank: usize) {
        self.control(bank).fetch_add(1, Ordering::SeqCst);
        futex_wake(self.control(bank));
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32 of a shared mapping.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            FUTEX_WAKE,
            libc::c_int::MAX,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

/// One execution's slot: its note arrives on the receiver handed out with it. Freed (its page
/// cleared for the next execution) when dropped, which must wait until the child is gone.
pub struct Slot {
    shared: Arc<Shared>,
    index: usize,
    nonce: u64,
}

impl Slot {
    /// Writes the note its child writes at its end (for tests of the note's readers).
    #[cfg(test)]
    pub fn note_for_test(&self, code: u8) {
        self.shared.write_note(self.index, self.nonce, code);
    }

    /// Its index in the region (the child keeps only page `1 + index` mapped).
    pub fn index(&self) -> usize {
        self.index
    }

    /// What the child writes next to its note, so that no other process can note for it.
    pub fn nonce(&self) -> u64 {
        self.nonce
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.watched.remove(&self.index);
        self.shared.nonce(self.index).store(0, Ordering::SeqCst);
        self.shared.note_word(self.index).store(0, Ordering::SeqCst);
        st.free.push(self.index);
    }
}

impl ExitNotes {
    /// The region and its note thread, or `None` where the kernel lacks `futex_waitv` (before
    /// 5.16) or memfds: pooled executions then end the usual way.
    pub fn new() -> Option<Arc<ExitNotes>> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
        let len = (1 + SLOTS) * page;
        // SAFETY: a NUL-terminated name; flags as documented.
        let fd = unsafe {
            libc::memfd_create(
                c"elide-exit-notes".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: memfd_create just returned this fd to us.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&memfd);
        // SAFETY: plain fd calls on our memfd. The seals keep its size fixed, so no holder can
        // shrink it under the daemon's mapping.
        let sized = unsafe {
            libc::ftruncate(raw, len as libc::off_t) == 0
                && libc::fcntl(
                    raw,
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
                ) == 0
        };
        if !sized {
            return None;
        }
        // SAFETY: a fresh shared mapping of the whole memfd.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                raw,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let shared = Arc::new(Shared {
            base: base as usize,
            page,
            state: Mutex::new(State {
                free: (0..SLOTS).rev().collect(),
                ..State::default()
            }),
        });
        if !waitv_works(&shared) {
            return None;
        }
        Some(Arc::new(ExitNotes { shared, memfd }))
    }

    /// The memfd the zygote maps (`(1 + SLOTS)` pages of `page_size` bytes).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    pub fn page_size(&self) -> usize {
        self.shared.page
    }

    /// A free slot and where its note will arrive, or `None` when all are in use.
    pub fn take(&self) -> Option<(Slot, oneshot::Receiver<u8>)> {
        let (tx, rx) = oneshot::channel();
        // Never 0: a cleared page must not match.
        let nonce = rand_u64() | 1;
        let index = {
            let mut st = self.shared.lock();
            let index = st.free.pop()?;
            let bank = index / BANK;
            if !st.started[bank] {
                let shared = self.shared.clone();
                let started = std::thread::Builder::new()
                    .name(format!("elide-notes-{bank}"))
                    .spawn(move || note_thread(&shared, bank));
                if let Err(e) = started {
                    // This execution ends the usual way; the next take tries again.
                    tracing::warn!(error = %e, "exit notes: cannot start a note thread");
                    st.free.push(index);
                    return None;
                }
                st.started[bank] = true;
            }
            st.watched.insert(index, (nonce, tx));
            index
        };
        self.shared.poke(index / BANK);
        Some((
            Slot {
                shared: self.shared.clone(),
                index,
                nonce,
            },
            rx,
        ))
    }
}

/// A random u64 from the kernel (getrandom never blocks once the pool is initialised, which
/// it is long before a daemon runs jobs).
fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: writes at most 8 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if n == 8 {
        u64::from_ne_bytes(b)
    } else {
        // No entropy call: distinct per call, which keeps stale notes from matching.
        static NEXT: AtomicU64 = AtomicU64::new(0x5eed_0000_0001);
        NEXT.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
    }
}

/// `futex_waitv` on `waiters`: `Ok(())` when woken or a word already differed (EAGAIN),
/// `Err` for anything else.
fn futex_waitv(waiters: &[FutexWaitv], timeout: Option<&libc::timespec>) -> std::io::Result<()> {
    // SAFETY: a valid array of `waiters.len()` (≤ 128) entries; an absolute CLOCK_MONOTONIC
    // timeout or none.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            waiters.as_ptr(),
            waiters.len() as libc::c_uint,
            0 as libc::c_uint,
            timeout.map_or(std::ptr::null(), |t| t as *const libc::timespec),
            libc::CLOCK_MONOTONIC,
        )
    };
    if rc >= 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ETIMEDOUT) => Ok(()),
        _ => Err(e),
    }
}

/// Whether this kernel has `futex_waitv`: one call that times out at once.
fn waitv_works(shared: &Shared) -> bool {
    let control = shared.control(0);
    let waiter = FutexWaitv::on(control, control.load(Ordering::SeqCst));
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    futex_waitv(std::slice::from_ref(&waiter), Some(&now)).is_ok()
}

/// The note thread of `bank`: sleeps until its control word or a watched slot's word of its
/// bank changes, then hands every note that carries its job's nonce to whoever waits for it.
fn note_thread(shared: &Shared, bank: usize) {
    let mine = bank * BANK..(bank + 1) * BANK;
    let mut waiters: Vec<FutexWaitv> = Vec::with_capacity(1 + BANK);
    loop {
        let control = shared.control(bank);
        waiters.clear();
        waiters.push(FutexWaitv::on(control, control.load(Ordering::SeqCst)));
        {
            let mut st = shared.lock();
            let noted = st.watched.extract_if(|i, _| {
                mine.contains(i) && shared.note_word(*i).load(Ordering::SeqCst) != 0
            });
            for (i, (expected, tx)) in noted {
                let word = shared.note_word(i).load(Ordering::SeqCst);
                // A word without the job's nonce is not this execution's: it ends the usual way.
                if word & NOTED != 0 && shared.nonce(i).load(Ordering::SeqCst) == expected {
                    let _ = tx.send((word & 0xFF) as u8);
                }
            }
            waiters.extend(
                st.watched
                    .keys()
                    .filter(|i| mine.contains(i))
                    .map(|&i| FutexWaitv::on(shared.note_word(i), 0)),
            );
        }
        if let Err(e) = futex_waitv(&waiters, None) {
            tracing::warn!(error = %e, bank, "exit notes: futex_waitv failed; this bank's notes are off");
            // Its waiters fall back to the pidfd, and so will later users of its slots: no
            // thread waits for their notes, their executions end the usual way.
            shared.lock().watched.retain(|i, _| !mine.contains(i));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the zygote's child does at its end, played on the daemon's own mapping.
    fn note(notes: &ExitNotes, slot: usize, nonce: u64, code: u8) {
        notes.shared.write_note(slot, nonce, code);
    }

    fn notes() -> Arc<ExitNotes> {
        ExitNotes::new().expect("memfd and futex_waitv (Linux 5.16+)")
    }

    /// What the note thread made of a note: its code, or `Err` when it dropped the waiter.
    async fn outcome(rx: oneshot::Receiver<u8>) -> Result<u8, oneshot::error::RecvError> {
        tokio::time::timeout(std::time::Duration::from_secs(5), rx)
            .await
            .expect("the thread looked at the note")
    }

    #[tokio::test]
    async fn a_note_with_its_nonce_reaches_the_waiter() {
        let n = notes();
        let (slot, rx) = n.take().expect("a free slot");
        note(&n, slot.index(), slot.nonce(), 42);
        let code = outcome(rx).await.expect("the note arrives");
        assert_eq!(code, 42);
    }

    #[tokio::test]
    async fn a_note_without_the_nonce_is_not_taken() {
        let n = notes();
        let (slot, rx) = n.take().expect("a free slot");
        note(&n, slot.index(), slot.nonce() ^ 1, 3);
        // The thread drops the waiter: its receiver ends without a code.
        let got = outcome(rx).await;
        assert!(got.is_err(), "a forged note was taken: {got:?}");
    }

    #[tokio::test]
    async fn a_note_in_a_later_bank_reaches_its_waiter() {
        // The first bank's slots are all in use: the next execution's note is waited for by
        // the second bank's thread, started then.
        let n = notes();
        let first: Vec<(Slot, oneshot::Receiver<u8>)> =
            (0..BANK).map(|_| n.take().expect("a free slot")).collect();
        assert!(first.iter().all(|(s, _)| s.index() < BANK));
        let (slot, rx) = n.take().expect("a slot of the second bank");
        assert_eq!(slot.index(), BANK);
        note(&n, slot.index(), slot.nonce(), 11);
        let code = outcome(rx).await.expect("the note arrives");
        assert_eq!(code, 11);
    }

    #[tokio::test]
    async fn a_freed_slot_is_cleared_before_anyone_else_gets_it() {
        let n = notes();
        let mut taken: Vec<(Slot, oneshot::Receiver<u8>)> =
            (0..SLOTS).map(|_| n.take().expect("a free slot")).collect();
        assert!(n.take().is_none(), "more slots than the region holds");
        let (old, _) = taken.pop().expect("one");
        let (index, old_nonce) = (old.index(), old.nonce());
        note(&n, index, old_nonce, 7);
        drop(old);
        let (again, rx) = n.take().expect("the freed slot");
        assert_eq!(again.index(), index);
        assert_ne!(again.nonce(), old_nonce);
        assert_eq!(n.shared.note_word(index).load(Ordering::SeqCst), 0);
        // A process of the old execution noting late is ignored.
        note(&n, index, old_nonce, 9);
        let got = outcome(rx).await;
        assert!(got.is_err(), "a stale note was taken: {got:?}");
    }
}
