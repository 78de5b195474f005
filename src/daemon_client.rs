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

    /// True when the daemon could not be reached at all (as opposed to answering an error).
    pub fn is_unreachable(&self) -> bool {
        match self {
            DaemonError::Connect { .. } | DaemonError::Timeout { .. } => true,
            DaemonError::Rpc { status, .. } => status.code() == tonic::Code::Unavailable,
            DaemonError::InvalidSocket { .. } => false,
        }
    }
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
            .timeout(timeout);
        let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
            Ok(Ok(ch)) => ch,
            Ok(Err(e)) => {
                return Err(DaemonError::Connect {
                    socket: socket.to_path_buf(),
                    detail: root_cause(&e),
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

    /// The raw generated client, for calls this wrapper does not cover yet.
    pub fn raw(&self) -> ExecutionApiClient<Channel> {
        self.inner.clone()
    }
}
