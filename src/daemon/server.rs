//! The gRPC edge: the ExecutionAPI over a Unix socket. Owns the socket (stale-socket removal,
//! permissions, group), peer-credential checks, and the mapping of daemon errors to statuses.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::config::DaemonConfig;
use super::error::DaemonError;
use super::execution::{Execution, Phase, result_to_proto};
use super::output::CaptureBuffer;
use super::service::{Caller, Daemon};
use crate::paced_accept::PacedIncoming;
use crate::peer_guard::{Executions, GuardedListener};
use crate::proto::elide::daemon::v1alpha1 as pb;
use crate::proto::elide::daemon::v1alpha1::execution_api_server::{
    ExecutionApi, ExecutionApiServer,
};

/// The tonic service.
#[derive(Clone)]
pub struct ApiService {
    daemon: Arc<Daemon>,
}

fn caller<T>(req: &Request<T>) -> Caller {
    Caller {
        uid: req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid()),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

const CHUNK: usize = 64 * 1024;

/// How long after its execution ended captured output may still arrive: what the pipe held
/// when the process exited (a pooled runtime reports its exit before the kernel has torn it
/// down and closed its end), and what its process group wrote before the kill at its exit. A
/// writer that outlives that, such as a daemonized child on a node without cgroups, does not
/// hold a stream open.
const SETTLE: Duration = Duration::from_secs(2);

/// Sends `buf` from `offset`. Without `follow`, what a running execution has written so far,
/// or all an ended one wrote; with it, until the execution's output ends.
async fn follow_stream(
    buf: Arc<CaptureBuffer>,
    stream: pb::OutputStream,
    mut offset: u64,
    follow: bool,
    execution: Arc<Execution>,
    tx: tokio::sync::mpsc::Sender<Result<pb::OutputChunk, Status>>,
) {
    let mut phase = execution.watch_phase();
    let mut progress = buf.watch();
    let mut settled_by: Option<tokio::time::Instant> = None;
    loop {
        let chunk = buf.read_from(offset, CHUNK);
        if !chunk.data.is_empty() {
            offset = chunk.offset + chunk.data.len() as u64;
            let msg = pb::OutputChunk {
                stream: stream as i32,
                offset: chunk.offset,
                data: chunk.data,
            };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
            continue;
        }
        let (end, closed) = *progress.borrow_and_update();
        if closed && end <= offset {
            return;
        }
        if end > offset {
            continue;
        }
        let ended = *phase.borrow_and_update() == Phase::Exited;
        if !follow && !ended {
            return;
        }
        if ended && settled_by.is_none() {
            // From the end, not from this call: a later read of a pipe a daemonized child
            // holds open answers at once.
            let since = execution.ended_since().unwrap_or_default();
            settled_by = Some(tokio::time::Instant::now() + SETTLE.saturating_sub(since));
        }
        let settle = async {
            match settled_by {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = progress.changed() => if changed.is_err() { return },
            // The sender lives as long as the execution this task holds.
            changed = phase.changed(), if !ended => if changed.is_err() { return },
            () = settle => return,
        }
    }
}

#[tonic::async_trait]
impl ExecutionApi for ApiService {
    async fn get_daemon_info(
        &self,
        _req: Request<pb::GetDaemonInfoRequest>,
    ) -> Result<Response<pb::DaemonInfo>, Status> {
        Ok(Response::new(self.daemon.info()))
    }

    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        Ok(Response::new(
            self.daemon.create_session(req.into_inner()).await?,
        ))
    }

    async fn get_session(
        &self,
        req: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        Ok(Response::new(
            self.daemon.get_session(&req.get_ref().session_id)?,
        ))
    }

    async fn list_sessions(
        &self,
        _req: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: self.daemon.list_sessions(),
        }))
    }

    async fn close_session(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let r = req.into_inner();
        self.daemon
            .close_session(&r.session_id, r.grace.as_ref())
            .await?;
        Ok(Response::new(pb::CloseSessionResponse {}))
    }

    async fn start_execution(
        &self,
        req: Request<pb::StartExecutionRequest>,
    ) -> Result<Response<pb::Execution>, Status> {
        let who = caller(&req);
        Ok(Response::new(
            self.daemon.start_execution(req.into_inner(), who).await?,
        ))
    }

    async fn get_execution(
        &self,
        req: Request<pb::GetExecutionRequest>,
    ) -> Result<Response<pb::Execution>, Status> {
        Ok(Response::new(
            self.daemon.get_execution(&req.get_ref().execution_id)?,
        ))
    }

    async fn list_executions(
        &self,
        req: Request<pb::ListExecutionsRequest>,
    ) -> Result<Response<pb::ListExecutionsResponse>, Status> {
        Ok(Response::new(pb::ListExecutionsResponse {
            executions: self.daemon.list_executions(&req.get_ref().session_id)?,
        }))
    }

    async fn wait_execution(
        &self,
        req: Request<pb::WaitExecutionRequest>,
    ) -> Result<Response<pb::WaitExecutionResponse>, Status> {
        Ok(Response::new(
            self.daemon
                .wait_execution(&req.get_ref().execution_id)
                .await?,
        ))
    }

    type StreamOutputStream = BoxStream<pb::OutputChunk>;

    async fn stream_output(
        &self,
        req: Request<pb::StreamOutputRequest>,
    ) -> Result<Response<Self::StreamOutputStream>, Status> {
        let r = req.into_inner();
        let e: Arc<Execution> = self.daemon.execution(&r.execution_id)?;
        e.wait_started().await;
        let explicit = !r.streams.is_empty();
        let wanted: Vec<pb::OutputStream> = if explicit {
            let mut v = Vec::new();
            for (i, s) in r.streams.iter().enumerate() {
                match pb::OutputStream::try_from(*s) {
                    Ok(pb::OutputStream::Stdout) => v.push(pb::OutputStream::Stdout),
                    Ok(pb::OutputStream::Stderr) => v.push(pb::OutputStream::Stderr),
                    _ => {
                        return Err(DaemonError::invalid(
                            format!("streams[{i}]"),
                            format!("{s} is not OUTPUT_STREAM_STDOUT or OUTPUT_STREAM_STDERR"),
                        )
                        .into());
                    }
                }
            }
            v
        } else {
            vec![pb::OutputStream::Stdout, pb::OutputStream::Stderr]
        };
        let mut buffers = Vec::new();
        for s in wanted {
            let slot = match s {
                pb::OutputStream::Stderr => &e.stderr,
                _ => &e.stdout,
            };
            match slot.get() {
                Some(b) => buffers.push((s, b.clone())),
                None if explicit => {
                    return Err(DaemonError::FailedPrecondition(format!(
                        "{} of execution {:?} is not captured (its sink is a path, or the \
                         execution ran under a previous daemon)",
                        s.as_str_name(),
                        e.id
                    ))
                    .into());
                }
                None => {}
            }
        }
        if buffers.is_empty() {
            return Err(DaemonError::FailedPrecondition(format!(
                "execution {:?} has no captured output (both sinks are paths)",
                e.id
            ))
            .into());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        for (s, b) in buffers {
            tokio::spawn(follow_stream(
                b,
                s,
                r.offset,
                r.follow,
                e.clone(),
                tx.clone(),
            ));
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn signal_execution(
        &self,
        req: Request<pb::SignalExecutionRequest>,
    ) -> Result<Response<pb::SignalExecutionResponse>, Status> {
        let r = req.get_ref();
        self.daemon.signal_execution(&r.execution_id, &r.signal)?;
        Ok(Response::new(pb::SignalExecutionResponse {}))
    }

    async fn stop_execution(
        &self,
        req: Request<pb::StopExecutionRequest>,
    ) -> Result<Response<pb::StopExecutionResponse>, Status> {
        let r = req.into_inner();
        let result = self
            .daemon
            .stop_execution(&r.execution_id, &r.signal, r.grace.as_ref())
            .await?;
        Ok(Response::new(pb::StopExecutionResponse {
            result: Some(result_to_proto(&result)),
        }))
    }

    async fn get_execution_stats(
        &self,
        req: Request<pb::GetExecutionStatsRequest>,
    ) -> Result<Response<pb::ExecutionStats>, Status> {
        Ok(Response::new(
            self.daemon.stats(&req.get_ref().execution_id).await?,
        ))
    }

    async fn remove_execution(
        &self,
        req: Request<pb::RemoveExecutionRequest>,
    ) -> Result<Response<pb::RemoveExecutionResponse>, Status> {
        let r = req.get_ref();
        self.daemon
            .remove_execution(&r.execution_id, r.force)
            .await?;
        Ok(Response::new(pb::RemoveExecutionResponse {}))
    }

    type WatchEventsStream = BoxStream<pb::ExecutionEvent>;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let session = req.into_inner().session_id;
        let mut rx = self.daemon.events().subscribe();
        let shutdown = self.daemon.shutdown.clone();
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    ev = rx.recv() => ev,
                };
                match ev {
                    Ok(ev) if session.is_empty() || ev.session_id == session => {
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(missed = n, "event watcher lagged");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    type ExecStream = BoxStream<pb::ExecResponse>;

    async fn exec(
        &self,
        req: Request<tonic::Streaming<pb::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let stream = super::exec::exec(self.daemon.clone(), req.into_inner()).await?;
        Ok(Response::new(stream))
    }
}

/// Errors setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A live daemon already answers on it.
    #[error("socket {0} is in use by a running daemon; stop it or choose another --socket")]
    InUse(String),
    /// Filesystem trouble.
    #[error("socket {path}: {op}: {source}")]
    Io {
        /// The path.
        path: String,
        /// What was attempted.
        op: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Unknown group.
    #[error("socket_group {0:?} does not exist")]
    UnknownGroup(String),
}

fn sock_io<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        path: path.display().to_string(),
        op,
        source,
    }
}

/// Binds the API socket: creates its directory, removes a stale socket (one nobody answers
/// on), sets mode and group.
pub fn bind_socket(cfg: &DaemonConfig) -> Result<tokio::net::UnixListener, SocketError> {
    let path = cfg.socket.as_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock_io(dir, "create directory"))?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(path.display().to_string())),
            Err(_) => std::fs::remove_file(path).map_err(sock_io(path, "remove stale socket"))?,
        }
    }
    // Bind under a restrictive umask-independent mode: chmod right after, before serving.
    let listener = tokio::net::UnixListener::bind(path).map_err(sock_io(path, "bind"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(cfg.socket_mode))
        .map_err(sock_io(path, "chmod"))?;
    if let Some(g) = &cfg.socket_group {
        let gid = match g.parse::<u32>() {
            Ok(n) => nix::unistd::Gid::from_raw(n),
            Err(_) => nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .map(|gr| gr.gid)
                .ok_or_else(|| SocketError::UnknownGroup(g.clone()))?,
        };
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| SocketError::Io {
            path: path.display().to_string(),
            op: "chown",
            source: e.into(),
        })?;
    }
    Ok(listener)
}

/// Raises the daemon's open-file limit before it starts any process (see `open_files`), and
/// says what it found: a hard limit this low is the operator's to raise.
fn raise_open_file_limit() {
    use crate::sandbox::open_files::{self, Raised};
    // What a running execution holds here, about: 2 for python writing into Nomad's FIFOs (its
    // pidfd, its cgroup's event file), 5-6 for node, whose output the daemon copies (measured).
    const PER_EXECUTION: u64 = 4;
    const FEW: u64 = 4096;
    match open_files::raise() {
        Ok(Raised::Raised { was, to }) => tracing::info!(
            from = was.soft,
            to,
            "raised the open-file limit to the hard limit; processes the daemon starts get {} back",
            was.soft
        ),
        Ok(Raised::AlreadyAtHard(l)) if l.soft < FEW => tracing::warn!(
            limit = l.soft,
            "the open-file limit allows about {} concurrent executions; raise the hard limit \
             (systemd: LimitNOFILE=) for more",
            l.soft / PER_EXECUTION
        ),
        Ok(Raised::AlreadyAtHard(_)) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// Runs the daemon until SIGTERM/SIGINT: binds the socket, serves, then stops every execution.
pub async fn serve(cfg: DaemonConfig) -> anyhow::Result<()> {
    raise_open_file_limit();
    let handle = tokio::runtime::Handle::current();
    let daemon = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || Daemon::open(cfg, handle)).await??
    };
    let listener = bind_socket(&cfg)?;
    let mut allowed = cfg.allowed_uids.clone();
    allowed.push(nix::unistd::geteuid().as_raw());
    let allowed = Arc::new(allowed);
    let check = move |req: Request<()>| -> Result<Request<()>, Status> {
        let uid = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid());
        match uid {
            Some(u) if allowed.contains(&u) => Ok(req),
            Some(u) => Err(Status::permission_denied(format!(
                "uid {u} is not allowed to use this elide daemon (add it to allowed_uids)"
            ))),
            None => Err(Status::permission_denied("peer credentials unavailable")),
        }
    };
    let api = ExecutionApiServer::new(ApiService {
        daemon: daemon.clone(),
    })
    .max_decoding_message_size((cfg.max_code_bytes as usize).saturating_add(4 << 20))
    .max_encoding_message_size(64 << 20);
    let api = tonic::service::interceptor::InterceptedService::new(api, check);

    tokio::spawn(daemon.clone().run_housekeeping());
    let shutdown = daemon.shutdown.clone();
    {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down: stopping executions");
            daemon.stop_all(Duration::from_secs(2)).await;
            daemon.shutdown.cancel();
        });
    }
    tracing::info!(socket = %cfg.socket.display(), pid = std::process::id(), "elide-daemon listening");
    let server = tonic::transport::Server::builder()
        .add_service(api)
        .serve_with_incoming_shutdown(
            PacedIncoming::new(GuardedListener::new(listener, {
                let ours = Executions {
                    daemon_pid: Some(std::process::id()),
                    cgroup_parent: daemon.cgroups().parent_path(),
                };
                Arc::new(move |pid| ours.sign_of(pid))
            })),
            shutdown.clone().cancelled_owned(),
        );
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r?,
        // Streams that never end (followers of a hung client) must not hold the exit hostage.
        _ = async { shutdown.cancelled().await; tokio::time::sleep(Duration::from_secs(5)).await } => {}
    }
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
