//! A small typed client for the node daemon's ExecutionAPI over its Unix socket, with a
//! deadline on every call. Errors say which socket and which call failed, in words an operator
//! can act on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::proto::elide::daemon::v1alpha1 as api;
use api::execution_api_client::ExecutionApiClient;

/// Default deadline for connecting and for each unary call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 ping interval on the daemon connection.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a ping may go unanswered before the connection counts as dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Daemon client failures.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The socket path cannot be turned into an endpoint.
    #[error("invalid daemon socket path {socket}: {detail}")]
    InvalidSocket {
        /// Socket path.
        socket: PathBuf,
        /// Why.
        detail: String,
    },
    /// Nothing usable listens on the socket.
    #[error("cannot connect: {detail}")]
    Connect {
        /// Socket path.
        socket: PathBuf,
        /// The root cause, stable across retries (e.g. "No such file or directory").
        detail: String,
        /// No socket there, or nobody listening on it (as opposed to, say, a socket this
        /// process may not open).
        nobody_listens: bool,
    },
    /// A call ran past its deadline.
    #[error("{call} timed out after {timeout:?}")]
    Timeout {
        /// RPC name.
        call: &'static str,
        /// Deadline.
        timeout: Duration,
    },
    /// The daemon answered with an error.
    #[error("{call} failed: {}", status.message())]
    Rpc {
        /// RPC name.
        call: &'static str,
        /// The status.
        status: tonic::Status,
    },
}

impl DaemonError {
    /// The gRPC code when the daemon answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            DaemonError::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// True when no daemon is there to answer: no socket, or nobody listening on it.
    pub fn nobody_listens(&self) -> bool {
        matches!(
            self,
            DaemonError::Connect {
                nobody_listens: true,
                ..
            }
        )
    }

    /// True when the daemon could not be reached at all (as opposed to answering an error).
    /// A status the client made of a transport failure (UNAVAILABLE for a refused connect,
    /// UNKNOWN for a connection reset mid-call) carries that failure as its source; one the
    /// daemon sent carries none, whatever its code. The daemon itself answers UNAVAILABLE when
    /// the node is out of descriptors, processes or memory for now: that answer came over a
    /// working connection, which stays.
    pub fn is_unreachable(&self) -> bool {
        match self {
            DaemonError::Connect { .. } | DaemonError::Timeout { .. } => true,
            DaemonError::Rpc { status, .. } => std::error::Error::source(status).is_some(),
            DaemonError::InvalidSocket { .. } => false,
        }
    }
}

/// Whether a connect failed because no socket is there or nobody listens on it.
fn nobody_listens(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            );
        }
        cur = err.source();
    }
    false
}

/// The innermost error message: stable wording such as "Connection refused (os error 111)".
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// A connected ExecutionAPI client.
#[derive(Debug, Clone)]
pub struct DaemonClient {
    socket: PathBuf,
    timeout: Duration,
    inner: ExecutionApiClient<Channel>,
}

impl DaemonClient {
    /// Connects to the daemon at `socket`; `timeout` bounds the connect and every later call.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, DaemonError> {
        let uri = format!("unix://{}", socket.display());
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| DaemonError::InvalidSocket {
                socket: socket.to_path_buf(),
                detail: root_cause(&e),
            })?
            .connect_timeout(timeout)
            // No channel-wide request timeout: WaitExecution, WatchEvents and Exec block for
            // as long as the task runs. Unary calls get their deadline in `call`. Keepalive
            // pings notice a daemon that hangs without closing the socket.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
            Ok(Ok(ch)) => ch,
            Ok(Err(e)) => {
                return Err(DaemonError::Connect {
                    socket: socket.to_path_buf(),
                    detail: root_cause(&e),
                    nobody_listens: nobody_listens(&e),
                });
            }
            Err(_) => {
                return Err(DaemonError::Timeout {
                    call: "connect",
                    timeout,
                });
            }
        };
        let inner = ExecutionApiClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        Ok(Self {
            socket: socket.to_path_buf(),
            timeout,
            inner,
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn call<T>(
        &self,
        call: &'static str,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, DaemonError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(DaemonError::Rpc { call, status }),
            Err(_) => Err(DaemonError::Timeout {
                call,
                timeout: self.timeout,
            }),
        }
    }

    /// `GetDaemonInfo`.
    pub async fn daemon_info(&self) -> Result<api::DaemonInfo, DaemonError> {
        let mut c = self.inner.clone();
        self.call(
            "GetDaemonInfo",
            c.get_daemon_info(api::GetDaemonInfoRequest {}),
        )
        .await
    }

    /// `CreateSession` with a requested id.
    pub async fn create_session(
        &self,
        session_id: &str,
        owner: &str,
        config: api::SessionConfig,
    ) -> Result<api::Session, DaemonError> {
        let mut c = self.inner.clone();
        let req = api::CreateSessionRequest {
            config: Some(config),
            owner: owner.to_string(),
            session_id: session_id.to_string(),
        };
        self.call("CreateSession", c.create_session(req)).await
    }

    /// `GetSession`.
    pub async fn get_session(&self, session_id: &str) -> Result<api::Session, DaemonError> {
        let mut c = self.inner.clone();
        let req = api::GetSessionRequest {
            session_id: session_id.to_string(),
        };
        self.call("GetSession", c.get_session(req)).await
    }

    /// `ListExecutions` of one session.
    pub async fn list_executions(
        &self,
        session_id: &str,
    ) -> Result<Vec<api::Execution>, DaemonError> {
        let mut c = self.inner.clone();
        let req = api::ListExecutionsRequest {
            session_id: session_id.to_string(),
        };
        Ok(self
            .call("ListExecutions", c.list_executions(req))
            .await?
            .executions)
    }

    /// The per-call deadline of this client.
    pub fn call_timeout(&self) -> Duration {
        self.timeout
    }

    async fn call_within<T>(
        &self,
        call: &'static str,
        timeout: Duration,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, DaemonError> {
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(DaemonError::Rpc { call, status }),
            Err(_) => Err(DaemonError::Timeout { call, timeout }),
        }
    }

    /// `StartExecution`. Bounded by the call deadline plus the daemon's FIFO-open wait.
    pub async fn start_execution(
        &self,
        req: api::StartExecutionRequest,
        timeout: Duration,
    ) -> Result<api::Execution, DaemonError> {
        let mut c = self.inner.clone();
        self.call_within("StartExecution", timeout, c.start_execution(req))
            .await
    }

    /// `GetExecution`.
    pub async fn get_execution(&self, execution_id: &str) -> Result<api::Execution, DaemonError> {
        let mut c = self.inner.clone();
        let req = api::GetExecutionRequest {
            execution_id: execution_id.to_string(),
        };
        self.call("GetExecution", c.get_execution(req)).await
    }

    /// `WaitExecution`: no deadline (it lasts as long as the execution); fails when the
    /// connection to the daemon breaks.
    pub async fn wait_execution(
        &self,
        execution_id: &str,
    ) -> Result<api::WaitExecutionResponse, DaemonError> {
        let mut c = self.inner.clone();
        let req = api::WaitExecutionRequest {
            execution_id: execution_id.to_string(),
        };
        c.wait_execution(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| DaemonError::Rpc {
                call: "WaitExecution",
                status,
            })
    }

    /// `SignalExecution`.
    pub async fn signal_execution(
        &self,
        execution_id: &str,
        signal: &str,
    ) -> Result<(), DaemonError> {
        let mut c = self.inner.clone();
        let req = api::SignalExecutionRequest {
            execution_id: execution_id.to_string(),
            signal: signal.to_string(),
        };
        self.call("SignalExecution", c.signal_execution(req))
            .await
            .map(|_| ())
    }

    /// `StopExecution`: the deadline covers the grace period plus the kill.
    pub async fn stop_execution(
        &self,
        execution_id: &str,
        signal: &str,
        grace: Duration,
    ) -> Result<api::StopExecutionResponse, DaemonError> {
        let mut c = self.inner.clone();
        let req = api::StopExecutionRequest {
            execution_id: execution_id.to_string(),
            signal: signal.to_string(),
            grace: Some(prost_types::Duration {
                seconds: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
                nanos: grace.subsec_nanos() as i32,
            }),
        };
        let timeout = grace + self.timeout + self.timeout;
        self.call_within("StopExecution", timeout, c.stop_execution(req))
            .await
    }

    /// `GetExecutionStats`.
    pub async fn stats(&self, execution_id: &str) -> Result<api::ExecutionStats, DaemonError> {
        let mut c = self.inner.clone();
        let req = api::GetExecutionStatsRequest {
            execution_id: execution_id.to_string(),
        };
        self.call("GetExecutionStats", c.get_execution_stats(req))
            .await
    }

    /// `RemoveExecution`.
    pub async fn remove_execution(
        &self,
        execution_id: &str,
        force: bool,
    ) -> Result<(), DaemonError> {
        let mut c = self.inner.clone();
        let req = api::RemoveExecutionRequest {
            execution_id: execution_id.to_string(),
            force,
        };
        let timeout = self.timeout + self.timeout;
        self.call_within("RemoveExecution", timeout, c.remove_execution(req))
            .await
            .map(|_| ())
    }

    /// `WatchEvents`: the stream lives until the daemon goes away or it is dropped.
    pub async fn watch_events(
        &self,
        session_id: &str,
    ) -> Result<tonic::Streaming<api::ExecutionEvent>, DaemonError> {
        let mut c = self.inner.clone();
        let req = api::WatchEventsRequest {
            session_id: session_id.to_string(),
        };
        self.call("WatchEvents", c.watch_events(req)).await
    }

    /// `Exec`: `input` must start with the setup message.
    pub async fn exec(
        &self,
        input: impl tonic::IntoStreamingRequest<Message = api::ExecRequest>,
    ) -> Result<tonic::Streaming<api::ExecResponse>, DaemonError> {
        let mut c = self.inner.clone();
        self.call("Exec", c.exec(input)).await
    }

    /// The raw generated client, for calls this wrapper does not cover yet.
    pub fn raw(&self) -> ExecutionApiClient<Channel> {
        self.inner.clone()
    }
}
