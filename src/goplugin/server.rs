//! Runs a go-plugin gRPC server: checks the cookie, negotiates, binds the socket, prints the
//! handshake once accepting, serves until the host (or SIGTERM) asks us to stop, then removes
//! the socket.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;

use super::handshake::{HandshakeConfig, handshake_line};
use super::hclog::SafeStderr;
use super::services::{Broker, Controller, Stdio};
use super::socket::{PluginSocket, SocketError, socket_dir};
use crate::peer_guard::PeerCheck;
use crate::proto::plugin::{
    grpc_broker_server::GrpcBrokerServer, grpc_controller_server::GrpcControllerServer,
    grpc_stdio_server::GrpcStdioServer,
};

/// The health service name go-plugin pings.
pub const HEALTH_SERVICE: &str = "plugin";
/// How many concurrent HTTP/2 streams one host connection may open: the host keeps several
/// long-lived streams per task (WaitTask, TaskStats, exec) and blocks when this is reached.
pub const MAX_CONCURRENT_STREAMS: u32 = 100_000;
/// How long in-flight calls may take to drain after shutdown was requested; the host SIGKILLs
/// us 2 s after its Shutdown call returns.
pub const DRAIN_GRACE: Duration = Duration::from_millis(1500);

/// Everything the host tells the plugin through the environment.
#[derive(Debug, Clone, Default)]
pub struct PluginEnv {
    /// The magic cookie's value, if present.
    pub cookie: Option<String>,
    /// `PLUGIN_PROTOCOL_VERSIONS`.
    pub protocol_versions: Option<String>,
    /// `PLUGIN_UNIX_SOCKET_DIR`.
    pub socket_dir: Option<String>,
    /// `PLUGIN_UNIX_SOCKET_GROUP`.
    pub socket_group: Option<String>,
    /// `TMPDIR`.
    pub tmpdir: Option<String>,
    /// `PLUGIN_MULTIPLEX_GRPC` (non-empty = the host asked).
    pub multiplex: Option<String>,
    /// `PLUGIN_CLIENT_CERT` (AutoMTLS, which we do not support).
    pub client_cert: Option<String>,
}

impl PluginEnv {
    /// Reads the process environment.
    pub fn from_process(cfg: &HandshakeConfig) -> Self {
        let var = |k: &str| std::env::var(k).ok();
        Self {
            cookie: var(cfg.magic_cookie_key),
            protocol_versions: var("PLUGIN_PROTOCOL_VERSIONS"),
            socket_dir: var("PLUGIN_UNIX_SOCKET_DIR"),
            socket_group: var("PLUGIN_UNIX_SOCKET_GROUP"),
            tmpdir: var("TMPDIR"),
            multiplex: var("PLUGIN_MULTIPLEX_GRPC"),
            client_cert: var("PLUGIN_CLIENT_CERT"),
        }
    }
}

/// Why serving failed (after the cookie check).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Socket creation failed.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The host asked for AutoMTLS.
    #[error(
        "PLUGIN_CLIENT_CERT is set but this plugin does not implement go-plugin AutoMTLS; Nomad never enables it, so check the host configuration"
    )]
    AutoMtlsUnsupported,
    /// The handshake line could not be written.
    #[error("cannot write the handshake line to stdout: {0}")]
    Handshake(std::io::Error),
    /// Installing a signal handler failed.
    #[error("cannot install signal handler: {0}")]
    Signals(std::io::Error),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The tokio runtime could not be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// The plugin process's whole life: returns the exit status. `app` builds the application's
/// routes; it gets the shutdown token so its long-lived streams can end at shutdown.
/// `app` gives the routes to serve and the check each connecting process must pass.
pub fn run(
    cfg: &HandshakeConfig,
    app: impl FnOnce(&CancellationToken) -> (Routes, PeerCheck),
) -> i32 {
    let env = PluginEnv::from_process(cfg);
    if let Err(e) = cfg.check_cookie(env.cookie.as_deref()) {
        // Exactly go-plugin's text, on stderr; nothing on stdout.
        let _ = SafeStderr::default().write_all(format!("{e}\n").as_bytes());
        return 1;
    }
    super::hclog::init("ELIDE_PLUGIN_LOG", "info,elide_task_driver=debug");
    // A current-thread runtime: the plugin is I/O-bound and small RSS is a budget.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %ServeError::Runtime(e), "plugin failed to start");
            return 1;
        }
    };
    let token = CancellationToken::new();
    let result = runtime.block_on(async {
        let (routes, check) = app(&token);
        serve(cfg, &env, routes, check, token.clone()).await
    });
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "plugin stopped with an error");
            1
        }
    }
}

/// Serves `routes` plus go-plugin's housekeeping services until `shutdown` is cancelled (by
/// GRPCController.Shutdown or SIGTERM), to the processes `check` lets in.
pub async fn serve(
    cfg: &HandshakeConfig,
    env: &PluginEnv,
    routes: Routes,
    check: PeerCheck,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    if env.client_cert.as_deref().is_some_and(|c| !c.is_empty()) {
        return Err(ServeError::AutoMtlsUnsupported);
    }
    let negotiation = cfg.negotiate(env.protocol_versions.as_deref());
    for item in &negotiation.ignored {
        tracing::warn!(value = %item, "PLUGIN_PROTOCOL_VERSIONS element is not an integer; ignored");
    }
    if !negotiation.matched {
        tracing::warn!(
            requested = ?negotiation.client_versions,
            supported = ?cfg.protocol_versions,
            announced = negotiation.version,
            "plugin host requested only app protocol versions this plugin does not speak; announcing ours, the host will refuse it"
        );
    }

    spawn_signal_handlers(shutdown.clone())?;

    let dir: PathBuf = socket_dir(env.socket_dir.as_deref(), env.tmpdir.as_deref());
    let mut socket = PluginSocket::bind_in(&dir, env.socket_group.as_deref())?;
    let listener = socket
        .take_listener()
        .ok_or_else(|| ServeError::Handshake(std::io::Error::other("listener already taken")))?;

    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_service_status(HEALTH_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let routes = routes
        .add_service(health_svc)
        .add_service(GrpcControllerServer::new(Controller::new(shutdown.clone())))
        .add_service(GrpcStdioServer::new(Stdio::new(shutdown.clone())))
        .add_service(GrpcBrokerServer::new(Broker::new(shutdown.clone())));
    let incoming = crate::paced_accept::PacedIncoming::new(
        crate::peer_guard::GuardedListener::new(listener, check),
    );
    let server = Server::builder()
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let mut server = tokio::spawn(server);

    // The socket is bound and listening, so the host may dial the moment it reads this.
    let multiplex = env
        .multiplex
        .as_deref()
        .filter(|v| !v.is_empty())
        .map(|_| false);
    let line = handshake_line(negotiation.version, socket.path(), multiplex);
    {
        let mut out = std::io::stdout().lock();
        out.write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .map_err(ServeError::Handshake)?;
    }
    tracing::debug!(socket = %socket.path().display(), version = negotiation.version, "plugin serving");

    let finished = tokio::select! {
        () = shutdown.cancelled() => None,
        r = &mut server => Some(r),
    };
    let result = match finished {
        Some(r) => r,
        None => match tokio::time::timeout(DRAIN_GRACE, &mut server).await {
            Ok(r) => r,
            Err(_) => {
                tracing::debug!("in-flight calls did not drain in time; exiting anyway");
                server.abort();
                Ok(Ok(()))
            }
        },
    };
    drop(socket);
    match result {
        Ok(r) => r.map_err(ServeError::from),
        Err(join) => Err(ServeError::Handshake(std::io::Error::other(
            join.to_string(),
        ))),
    }
}

/// SIGTERM = graceful shutdown; SIGINT is ignored, because the plugin shares the host's
/// process group and a terminal Ctrl-C must not kill it behind the host's back.
fn spawn_signal_handlers(shutdown: CancellationToken) -> Result<(), ServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signals)?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM received; shutting down");
                    shutdown.cancel();
                    break;
                }
                _ = int.recv() => tracing::debug!("SIGINT ignored; the plugin host drives shutdown"),
                () = shutdown.cancelled() => break,
            }
        }
    });
    Ok(())
}
