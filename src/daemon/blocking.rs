//! Blocking work from async tasks: what runs inline on the async worker, and what is handed to
//! another thread with [`offload`].
//!
//! The rule: work bounded by a few syscalls on in-memory filesystems or the page cache
//! (cgroupfs limit writes and reads, procfs, a tmpfs file, an append to the execution journal,
//! a FIFO open that succeeds at once, a small write to a socket with room) runs inline. Handing
//! it to another thread costs more than the work itself: the hand-off wakes a thread, which on
//! a busy machine waits for a time slice and on an idle one for a halted CPU. On the 2-core VM
//! of BENCHMARKS.md, taking the start path's hand-offs out cut the mean StartExecution by
//! 0.2–1.3 ms in each of 9 back-to-back A/B quick runs (3 runs × 3 languages).
//!
//! Work that can wait on something outside the daemon (a FIFO whose reader has not attached, a
//! cgroup that is still emptying, an fsync, a large write to a full socket, a mkdir in every
//! cgroup hierarchy) goes through [`offload`]. The journal's occasional compaction (every
//! thousand or so appends, with two fsyncs) runs on a thread of its own: the append that sets
//! it off only takes the snapshot, and no append waits for its disk.

/// Runs blocking work without a thread hop where the runtime allows it: on the daemon's
/// multi-threaded runtime the current worker becomes a blocking thread for the call
/// (`block_in_place`, other tasks move to the remaining workers); elsewhere it falls back to the
/// blocking pool.
pub async fn offload<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => Ok(tokio::task::block_in_place(f)),
        _ => tokio::task::spawn_blocking(f).await,
    }
}
