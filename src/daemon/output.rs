//! Captured output (sink = capture): the child's fd 1/2 is the write end of a pipe the daemon
//! drains into a bounded buffer, which StreamOutput reads from any offset, following new bytes
//! until the execution's last writer closes the pipe.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

/// One captured stream.
pub struct CaptureBuffer {
    inner: Mutex<Inner>,
    /// (end offset, closed) after every change.
    progress: watch::Sender<(u64, bool)>,
    max_bytes: usize,
}

struct Inner {
    /// Offset of `data[0]` in the stream (older bytes were dropped past `max_bytes`).
    base: u64,
    data: Vec<u8>,
}

/// A slice of a captured stream.
pub struct Chunk {
    /// Offset of `data[0]` in the stream.
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

impl CaptureBuffer {
    /// An empty buffer keeping at most `max_bytes` of the newest output.
    pub fn new(max_bytes: usize) -> Arc<Self> {
        let (progress, _) = watch::channel((0, false));
        Arc::new(Self {
            inner: Mutex::new(Inner {
                base: 0,
                data: Vec::new(),
            }),
            progress,
            max_bytes: max_bytes.max(4096),
        })
    }

    fn append(&self, bytes: &[u8]) {
        let end = {
            let Ok(mut inner) = self.inner.lock() else {
                return;
            };
            inner.data.extend_from_slice(bytes);
            if inner.data.len() > self.max_bytes {
                let drop = inner.data.len() - self.max_bytes;
                inner.data.drain(..drop);
                inner.base += drop as u64;
            }
            inner.base + inner.data.len() as u64
        };
        self.progress.send_modify(|p| p.0 = end);
    }

    /// Marks the stream finished (no writer left).
    pub fn close(&self) {
        self.progress.send_modify(|p| p.1 = true);
    }

    /// Bytes from `offset` (clamped to what is still kept), at most `max` of them.
    pub fn read_from(&self, offset: u64, max: usize) -> Chunk {
        let Ok(inner) = self.inner.lock() else {
            return Chunk {
                offset,
                data: Vec::new(),
            };
        };
        let start = offset.max(inner.base);
        let rel = (start - inner.base) as usize;
        let data = if rel >= inner.data.len() {
            Vec::new()
        } else {
            let end = inner.data.len().min(rel + max);
            inner.data[rel..end].to_vec()
        };
        Chunk {
            offset: start,
            data,
        }
    }

    /// Watches (end offset, closed).
    pub fn watch(&self) -> watch::Receiver<(u64, bool)> {
        self.progress.subscribe()
    }

    /// Drains `read_end` (a pipe) into this buffer until EOF, then closes it.
    pub fn spawn_drain(self: &Arc<Self>, read_end: OwnedFd) -> std::io::Result<()> {
        let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end)?;
        let me = self.clone();
        tokio::spawn(async move {
            let mut receiver = receiver;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match receiver.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => me.append(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading captured output failed");
                        break;
                    }
                }
            }
            me.close();
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_buffer_drops_oldest_and_reads_from_offset() {
        let b = CaptureBuffer::new(4096);
        b.append(&[1u8; 4000]);
        b.append(&[2u8; 200]);
        let c = b.read_from(0, usize::MAX);
        assert_eq!(c.offset, 104);
        assert_eq!(c.data.len(), 4096);
        let c = b.read_from(4100, 50);
        assert_eq!(c.offset, 4100);
        assert_eq!(c.data, vec![2u8; 50]);
        assert!(b.read_from(5000, 10).data.is_empty());
    }

    #[tokio::test]
    async fn drain_reads_pipe_until_eof() {
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .unwrap();
        let b = CaptureBuffer::new(1 << 20);
        b.spawn_drain(r).unwrap();
        let mut rx = b.watch();
        let mut f = std::fs::File::from(w);
        std::io::Write::write_all(&mut f, b"hello").unwrap();
        drop(f);
        rx.wait_for(|p| p.1).await.unwrap();
        assert_eq!(b.read_from(0, 100).data, b"hello");
    }
}
