//! Accepting clients on a Unix socket without spinning when `accept` fails.
//!
//! tonic's serve loop retries a failed `accept` at once and logs it at trace level. When the
//! process is out of descriptors (EMFILE, ENFILE) or kernel memory, the connection stays in the
//! listen backlog, so the listener stays readable and every retry fails the same way: a core
//! spins, silently, until a descriptor is freed, and the executions the daemon runs lose that
//! core. [`PacedIncoming`] pauses between failed attempts instead, doubling the pause up to a
//! second (as Go's `net/http` does), and tells the operator when clients start waiting and when
//! they no longer do. Clients wait in the backlog meanwhile; none is refused.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::Stream;
use tokio::net::{UnixListener, UnixStream};
use tokio::time::{Instant, Sleep};

/// The pause after the first failed attempt of a streak.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause: how late a waiting client is served, at worst, once it can be.
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// A listener, as far as [`PacedIncoming`] uses one.
pub trait Accept {
    type Conn;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>>;
}

impl Accept for UnixListener {
    type Conn = UnixStream;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<UnixStream>> {
        UnixListener::poll_accept(self, cx).map_ok(|(conn, _)| conn)
    }
}

/// The accepted connections of a listener, for tonic's `serve_with_incoming*`. It never yields
/// an error: a failed `accept` is logged and retried after a pause.
pub struct PacedIncoming<L> {
    listener: L,
    /// The pause under way, after a failed attempt.
    pause: Option<Pin<Box<Sleep>>>,
    /// Failed attempts since the last accepted connection, and when the first of them failed.
    failing: Option<(u64, Instant)>,
}

impl<L: Accept> PacedIncoming<L> {
    pub fn new(listener: L) -> Self {
        Self {
            listener,
            pause: None,
            failing: None,
        }
    }

    fn pause_after(failures: u64) -> Duration {
        let doublings = u32::try_from(failures.saturating_sub(1)).unwrap_or(u32::MAX);
        FIRST_PAUSE
            .checked_mul(2u32.saturating_pow(doublings))
            .map_or(LONGEST_PAUSE, |d| d.min(LONGEST_PAUSE))
    }
}

impl<L: Accept + Unpin> Stream for PacedIncoming<L> {
    type Item = io::Result<L::Conn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(pause) = this.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok(conn) => {
                    if let Some((failures, since)) = this.failing.take() {
                        tracing::info!(
                            failed_attempts = failures,
                            waited_ms = since.elapsed().as_millis() as u64,
                            "accepting new clients again"
                        );
                    }
                    return Poll::Ready(Some(Ok(conn)));
                }
                Err(error) => {
                    let (failures, _) = this.failing.get_or_insert((0, Instant::now()));
                    *failures += 1;
                    let pause = Self::pause_after(*failures);
                    if *failures == 1 {
                        tracing::warn!(
                            %error,
                            "cannot accept new clients; they wait in the listen backlog, \
                             retried with pauses of up to {LONGEST_PAUSE:?}"
                        );
                    }
                    this.pause = Some(Box::pin(tokio::time::sleep(pause)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::collections::VecDeque;

    /// A listener that plays a script of results, then has nothing more to accept; it notes
    /// when each attempt was made.
    struct Scripted {
        script: VecDeque<io::Result<u32>>,
        attempts: Vec<Instant>,
    }

    impl Accept for Scripted {
        type Conn = u32;
        fn poll_accept(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<u32>> {
            match self.script.pop_front() {
                Some(r) => {
                    self.attempts.push(Instant::now());
                    Poll::Ready(r)
                }
                None => Poll::Pending,
            }
        }
    }

    fn emfile() -> io::Result<u32> {
        Err(io::Error::from_raw_os_error(libc::EMFILE))
    }

    fn gaps(attempts: &[Instant]) -> Vec<u64> {
        attempts
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis() as u64)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn failed_accepts_are_retried_after_doubling_pauses_and_never_yielded() {
        let mut script: VecDeque<_> = (0..10).map(|_| emfile()).collect();
        script.push_back(Ok(7));
        let mut incoming = PacedIncoming::new(Scripted {
            script,
            attempts: Vec::new(),
        });
        let conn = incoming
            .next()
            .await
            .expect("a connection")
            .expect("no error");
        assert_eq!(conn, 7);
        assert_eq!(
            gaps(&incoming.listener.attempts),
            [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]
        );
        assert!(incoming.failing.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_accepted_connection_ends_the_streak_and_the_next_failure_pauses_briefly() {
        let script = VecDeque::from([emfile(), emfile(), emfile(), Ok(1), Ok(2), emfile(), Ok(3)]);
        let mut incoming = PacedIncoming::new(Scripted {
            script,
            attempts: Vec::new(),
        });
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(
                incoming
                    .next()
                    .await
                    .expect("a connection")
                    .expect("no error"),
            );
        }
        assert_eq!(got, [1, 2, 3]);
        assert_eq!(gaps(&incoming.listener.attempts), [5, 10, 20, 0, 0, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_aborted_before_accept_is_only_a_short_pause() {
        let script = VecDeque::from([Err(io::Error::from_raw_os_error(libc::ECONNABORTED)), Ok(4)]);
        let mut incoming = PacedIncoming::new(Scripted {
            script,
            attempts: Vec::new(),
        });
        assert_eq!(
            incoming
                .next()
                .await
                .expect("a connection")
                .expect("no error"),
            4
        );
        assert_eq!(gaps(&incoming.listener.attempts), [5]);
    }

    #[test]
    fn the_pause_is_capped_however_long_the_streak() {
        for failures in [9, 10, 33, 64, u64::MAX] {
            assert_eq!(
                PacedIncoming::<Scripted>::pause_after(failures),
                LONGEST_PAUSE,
                "{failures}"
            );
        }
        assert_eq!(PacedIncoming::<Scripted>::pause_after(1), FIRST_PAUSE);
    }
}
