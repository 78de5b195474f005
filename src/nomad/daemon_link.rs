//! The plugin's one connection to the node daemon, shared by every RPC: connected on demand,
//! dropped when a call finds the daemon gone, and re-established with back-off; when nothing
//! answers and `daemon.auto_start` is on, the daemon is started (one start at a time) and our
//! session is (re-)created before the connection is handed out. Callers that only look for
//! what a running daemon holds use [`DaemonLink::running_client`], which never starts one.

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::config::PluginConfig;
use super::daemon_start::{self, StartError};
use super::state::{Snapshot, session_config, session_owner};
use crate::daemon_client::{DEFAULT_CALL_TIMEOUT, DaemonClient, DaemonError};
use crate::peer_guard::Executions;
use crate::proto::elide::daemon::v1alpha1::DaemonInfo;

/// First pause before another auto-start after one failed; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause between auto-start attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why no daemon connection is available.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// SetConfig from the Nomad client has not arrived.
    #[error("the plugin is not configured yet (no SetConfig from the Nomad client)")]
    NotConfigured,
    /// The daemon does not answer (auto-start off, or not wanted by the caller).
    #[error("elide-daemon not reachable at {socket}: {detail}")]
    Unreachable {
        /// The socket.
        socket: PathBuf,
        /// Why.
        detail: String,
        /// No daemon there (no socket, nobody listening), as opposed to one that does not
        /// answer: its executions ended with it.
        absent: bool,
    },
    /// The daemon does not answer and could not be started.
    #[error("elide-daemon not reachable at {socket} and auto-start failed: {error}")]
    StartFailed {
        /// The socket.
        socket: PathBuf,
        /// Why the start failed.
        error: StartError,
    },
    /// The daemon answers but our session cannot be created.
    #[error("elide-daemon at {socket} refused session {session}: {detail}")]
    Session {
        /// The socket.
        socket: PathBuf,
        /// Session id.
        session: String,
        /// Why.
        detail: String,
        /// The daemon did not answer in time (or the connection broke), rather than refusing.
        transient: bool,
    },
}

/// An auto-start under way, shared by every caller that needs it: it runs in a task of its
/// own, so a caller that gives up waiting (a fingerprint probe's deadline) does not cancel it
/// and the next caller waits for the same start instead of starting a second daemon.
type StartUnderWay = Shared<BoxFuture<'static, Result<u32, StartError>>>;

#[derive(Debug, Default)]
struct StartBackoff {
    last_failure: Option<(Instant, Duration, StartError)>,
    /// When a daemon that is there last failed to answer, and how: callers that queued
    /// behind that attempt take its answer instead of each waiting out another one.
    unanswered: Option<(Instant, PathBuf, String)>,
}

/// How long a failed attempt to reach a daemon that is there answers the callers queued
/// behind it.
const SHARE_UNANSWERED_FOR: Duration = Duration::from_secs(1);

/// StartExecution's deadline at least (the daemon's default `sink_open_timeout` is 10 s).
pub const MIN_START_TIMEOUT: Duration = Duration::from_secs(30);
/// What a StartExecution may take beyond the daemon's wait for the FIFOs.
const START_MARGIN: Duration = Duration::from_secs(20);

/// What a daemon said of itself when the plugin linked to it.
#[derive(Debug, Clone)]
struct DaemonFacts {
    executions: Executions,
    sink_open_timeout: Option<Duration>,
}

/// Shared daemon connection.
#[derive(Debug, Default)]
pub struct DaemonLink {
    cached: Mutex<Option<(PathBuf, DaemonClient)>>,
    /// What the last daemon linked to said of itself.
    facts: Mutex<Option<DaemonFacts>>,
    /// The auto-start under way, if one is.
    starting: Mutex<Option<StartUnderWay>>,
    connecting: tokio::sync::Mutex<StartBackoff>,
}

impl DaemonLink {
    fn cached_for(&self, socket: &PathBuf) -> Option<DaemonClient> {
        let guard = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .filter(|(s, _)| s == socket)
            .map(|(_, c)| c.clone())
    }

    /// What tells the executions of the daemon last linked to (None before the first link).
    pub fn executions(&self) -> Option<Executions> {
        self.facts().map(|f| f.executions)
    }

    /// The deadline for a StartExecution: the daemon may wait its `sink_open_timeout` for
    /// Nomad's logmon to open the FIFOs, and a deadline shorter than that turns a slow logmon
    /// into a timeout (and an execution started after its caller gave up).
    pub fn start_timeout(&self) -> Duration {
        let sinks = self
            .facts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|f| f.sink_open_timeout);
        sinks.map_or(MIN_START_TIMEOUT, |s| {
            (s + START_MARGIN).max(MIN_START_TIMEOUT)
        })
    }

    fn facts(&self) -> Option<DaemonFacts> {
        self.facts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets the connection (a call found the daemon gone); the next `client` reconnects.
    pub fn invalidate(&self) {
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// A connected client with our session in place, auto-starting the daemon if allowed.
    pub async fn client(&self, snapshot: &Snapshot) -> Result<DaemonClient, LinkError> {
        let (cfg, session) = configured(snapshot)?;
        let socket = cfg.daemon_socket.clone();
        if let Some(c) = self.cached_for(&socket) {
            return Ok(c);
        }
        let mut backoff = self.connecting.lock().await;
        if let Some(c) = self.cached_for(&socket) {
            return Ok(c);
        }
        if let Some((at, on, detail)) = &backoff.unanswered
            && on == &socket
            && at.elapsed() < SHARE_UNANSWERED_FOR
        {
            return Err(LinkError::Unreachable {
                socket,
                detail: detail.clone(),
                absent: false,
            });
        }
        let answered = answering(&socket).await;
        backoff.unanswered = match &answered {
            Err(Unanswered {
                detail,
                absent: false,
            }) => Some((Instant::now(), socket.clone(), detail.clone())),
            _ => None,
        };
        let client = match answered {
            Ok(c) => c,
            Err(Unanswered { detail, absent }) => {
                // A daemon that is there but refuses us (a uid not in its allowed_uids, a
                // socket we may not open) or hangs is not replaced: a second one would stop
                // at the first's state-dir lock, and its failure would hide the cause.
                if !cfg.daemon.auto_start || !absent {
                    return Err(LinkError::Unreachable {
                        socket,
                        detail,
                        absent,
                    });
                }
                if let Some((at, pause, err)) = &backoff.last_failure
                    && at.elapsed() < *pause
                {
                    return Err(LinkError::StartFailed {
                        socket,
                        error: err.clone(),
                    });
                }
                match self.start_under_way(cfg).await {
                    Ok(_) => backoff.last_failure = None,
                    Err(error) => {
                        let pause = backoff
                            .last_failure
                            .as_ref()
                            .map_or(MIN_BACKOFF, |(_, p, _)| (*p * 2).min(MAX_BACKOFF));
                        tracing::error!(error = %error, socket = %socket.display(), "cannot auto-start elide-daemon");
                        backoff.last_failure = Some((Instant::now(), pause, error.clone()));
                        return Err(LinkError::StartFailed { socket, error });
                    }
                }
                answering(&socket)
                    .await
                    .map_err(|u| LinkError::Unreachable {
                        socket: socket.clone(),
                        absent: u.absent,
                        detail: u.detail,
                    })?
            }
        };
        self.adopt(socket, client, snapshot, session).await
    }

    /// The auto-start under way, or a new one.
    fn start_under_way(&self, cfg: &PluginConfig) -> StartUnderWay {
        let mut starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(start) = starting.as_ref()
            && start.peek().is_none()
        {
            return start.clone();
        }
        let cfg = cfg.clone();
        let task = tokio::spawn(async move { daemon_start::start(&cfg).await });
        let start = async move {
            task.await.unwrap_or_else(|e| {
                Err(StartError::Spawn {
                    path: PathBuf::from(daemon_start::DAEMON_BIN),
                    detail: format!("the start task ended: {e}"),
                })
            })
        }
        .boxed()
        .shared();
        *starting = Some(start.clone());
        start
    }

    /// Puts our session in place on a newly connected daemon and keeps the connection for the
    /// next callers.
    async fn adopt(
        &self,
        socket: PathBuf,
        (client, info): (DaemonClient, DaemonInfo),
        snapshot: &Snapshot,
        session: &str,
    ) -> Result<DaemonClient, LinkError> {
        ensure_session(&client, snapshot, session).await?;
        let daemon_pid = daemon_pid_seen_from_here(&socket).await;
        *self.facts.lock().unwrap_or_else(|p| p.into_inner()) = Some(DaemonFacts {
            executions: Executions {
                daemon_pid,
                cgroup_parent: Some(info.cgroup_parent).filter(|p| !p.is_empty()),
            },
            sink_open_timeout: info
                .sink_open_timeout
                .and_then(|d| Duration::try_from(d).ok()),
        });
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((socket, client.clone()));
        Ok(client)
    }

    /// Like [`Self::client`], but only to a daemon that already answers: never starts one.
    ///
    /// For callers that only look for what a running daemon holds: a daemon that is down has
    /// already ended its executions (its reaper goes with it), so starting one would find
    /// nothing. It neither waits for an auto-start under way (that can take the whole
    /// `start_timeout`) nor touches the start back-off.
    pub async fn running_client(&self, snapshot: &Snapshot) -> Result<DaemonClient, LinkError> {
        let (cfg, session) = configured(snapshot)?;
        let socket = cfg.daemon_socket.clone();
        if let Some(c) = self.cached_for(&socket) {
            return Ok(c);
        }
        // One deadline for connect and GetDaemonInfo together: a listener that accepts but
        // hangs must not hold the caller for both timeouts in a row.
        let answered = tokio::time::timeout(DEFAULT_CALL_TIMEOUT, answering(&socket))
            .await
            .unwrap_or_else(|_| {
                Err(Unanswered {
                    detail: format!("no answer within {DEFAULT_CALL_TIMEOUT:?}"),
                    absent: false,
                })
            });
        let client = answered.map_err(|u| LinkError::Unreachable {
            socket: socket.clone(),
            absent: u.absent,
            detail: u.detail,
        })?;
        self.adopt(socket, client, snapshot, session).await
    }
}

/// The pid of the process serving `socket`, as this process sees it (the kernel translates a
/// peer's pid into the reader's pid namespace; a daemon in a namespace of its own reports
/// another number about itself).
async fn daemon_pid_seen_from_here(socket: &Path) -> Option<u32> {
    let conn = tokio::time::timeout(
        DEFAULT_CALL_TIMEOUT,
        tokio::net::UnixStream::connect(socket),
    )
    .await
    .ok()?
    .ok()?;
    let pid = conn.peer_cred().ok()?.pid()?;
    u32::try_from(pid).ok().filter(|&p| p > 0)
}

/// The agent's config and our session id, once the Nomad client (not just the validation
/// launch) configured us.
fn configured(snapshot: &Snapshot) -> Result<(&PluginConfig, &String), LinkError> {
    match (
        snapshot.config.as_deref(),
        snapshot.agent_configured,
        snapshot.session_id.as_ref(),
    ) {
        (Some(cfg), true, Some(session)) => Ok((cfg, session)),
        _ => Err(LinkError::NotConfigured),
    }
}

/// Why no daemon answered.
struct Unanswered {
    /// In words, with the daemon's own answer when it gave one.
    detail: String,
    /// No socket, or nobody listening on it: a daemon may be started.
    absent: bool,
}

/// A client to the daemon at `socket` and what it says of itself, if one answers
/// GetDaemonInfo, else why not. An absent socket or one nobody listens on fails at once.
async fn answering(socket: &Path) -> Result<(DaemonClient, DaemonInfo), Unanswered> {
    match DaemonClient::connect(socket, DEFAULT_CALL_TIMEOUT).await {
        Ok(c) => match c.daemon_info().await {
            Ok(info) => Ok((c, info)),
            Err(e) => Err(Unanswered {
                detail: format!("it accepts connections but does not answer: {e}"),
                absent: false,
            }),
        },
        Err(e) => Err(Unanswered {
            absent: e.nobody_listens(),
            detail: e.to_string(),
        }),
    }
}

/// Creates our session unless the daemon already has it.
pub async fn ensure_session(
    client: &DaemonClient,
    snapshot: &Snapshot,
    session: &str,
) -> Result<(), LinkError> {
    let Some(cfg) = snapshot.config.as_ref() else {
        return Err(LinkError::NotConfigured);
    };
    let err = |e: DaemonError| LinkError::Session {
        socket: client.socket().to_path_buf(),
        session: session.to_string(),
        transient: e.is_unreachable(),
        detail: e.to_string(),
    };
    match client.get_session(session).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(tonic::Code::NotFound) => {
            match client
                .create_session(session, &session_owner(), session_config(cfg))
                .await
            {
                Ok(_) => {
                    tracing::info!(session, "daemon session created");
                    Ok(())
                }
                Err(e) if e.code() == Some(tonic::Code::AlreadyExists) => Ok(()),
                Err(e) => Err(err(e)),
            }
        }
        Err(e) => Err(err(e)),
    }
}

impl LinkError {
    /// True when retrying later may help (the daemon is down or starting), as opposed to a
    /// configuration problem.
    pub fn is_transient(&self) -> bool {
        match self {
            LinkError::Session { transient, .. } => *transient,
            _ => true,
        }
    }

    /// True when a daemon is there but did not answer in time: asking again may work, and its
    /// executions still run.
    pub fn is_slow_daemon(&self) -> bool {
        matches!(
            self,
            LinkError::Unreachable { absent: false, .. }
                | LinkError::Session {
                    transient: true,
                    ..
                }
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::nomad::config::DaemonSettings;

    #[test]
    fn a_start_waits_longer_than_the_daemon_waits_for_the_fifos() {
        let link = DaemonLink::default();
        // Before any daemon was reached.
        assert_eq!(link.start_timeout(), MIN_START_TIMEOUT);
        let secs = Duration::from_secs;
        for (sinks, want) in [
            (None, MIN_START_TIMEOUT),
            (Some(secs(10)), MIN_START_TIMEOUT),
            (Some(secs(60)), secs(80)),
        ] {
            *link.facts.lock().unwrap() = Some(DaemonFacts {
                executions: Executions {
                    daemon_pid: Some(1),
                    cgroup_parent: None,
                },
                sink_open_timeout: sinks,
            });
            assert_eq!(link.start_timeout(), want, "{sinks:?}");
        }
    }

    /// A snapshot whose auto-start would run `/bin/true`, which exits at once: a start attempt
    /// shows as `StartFailed`.
    fn auto_start_snapshot(socket: PathBuf) -> Snapshot {
        Snapshot {
            config: Some(Arc::new(PluginConfig {
                daemon_socket: socket,
                daemon: DaemonSettings {
                    auto_start: true,
                    path: Some("/bin/true".into()),
                    ..Default::default()
                },
                ..PluginConfig::default()
            })),
            agent_configured: true,
            session_id: Some("nomad-x".into()),
        }
    }

    #[tokio::test]
    async fn running_client_never_starts_the_daemon_and_fails_fast() {
        let dir = tempfile::Builder::new()
            .prefix("e")
            .tempdir_in("/tmp")
            .unwrap();
        let absent = dir.path().join("none.sock");
        // A socket file nobody listens on, as a SIGKILLed daemon leaves it.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        for socket in [absent, stale] {
            let link = DaemonLink::default();
            let snapshot = auto_start_snapshot(socket.clone());
            let t = Instant::now();
            let e = link.running_client(&snapshot).await.unwrap_err();
            assert!(
                matches!(e, LinkError::Unreachable { .. }),
                "{}: {e}",
                socket.display()
            );
            assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
            // The auto-starting path does try here; the connect-only one must not have.
            let e = link.client(&snapshot).await.unwrap_err();
            assert!(matches!(e, LinkError::StartFailed { .. }), "{e}");
        }
    }
}
