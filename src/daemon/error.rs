//! The daemon's error type and its mapping to gRPC status codes at the API edge.

use tonic::{Code, Status};

/// Everything an ExecutionAPI call can fail with. Messages name the field and the value.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A request field is invalid.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// Request field, e.g. `limits.memory_bytes`.
        field: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// An id names nothing.
    #[error("{what} {id:?} not found")]
    NotFound {
        /// "session" or "execution".
        what: &'static str,
        /// The id.
        id: String,
    },
    /// The call does not fit the current state (e.g. signal to an ended execution).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A size or count limit was exceeded.
    #[error("{field}: {message}")]
    ResourceExhausted {
        /// Request field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The request is well-formed but the id already exists.
    #[error("{what} {id:?} already exists")]
    AlreadyExists {
        /// "session".
        what: &'static str,
        /// The id.
        id: String,
    },
    /// The caller is not allowed to use the daemon.
    #[error("{0}")]
    PermissionDenied(String),
    /// The node is out of something for now (descriptors, processes, memory): the same call
    /// may work later.
    #[error("{0}")]
    Unavailable(String),
    /// Something failed inside the daemon or the machine.
    #[error("{0}")]
    Internal(String),
}

impl DaemonError {
    /// An InvalidArgument error for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A NotFound error for an execution id.
    pub fn no_execution(id: &str) -> Self {
        Self::NotFound {
            what: "execution",
            id: id.to_string(),
        }
    }

    /// A NotFound error for a session id.
    pub fn no_session(id: &str) -> Self {
        Self::NotFound {
            what: "session",
            id: id.to_string(),
        }
    }
}

impl From<DaemonError> for Status {
    fn from(e: DaemonError) -> Self {
        let code = match &e {
            DaemonError::InvalidArgument { .. } => Code::InvalidArgument,
            DaemonError::NotFound { .. } => Code::NotFound,
            DaemonError::FailedPrecondition(_) => Code::FailedPrecondition,
            DaemonError::ResourceExhausted { .. } => Code::ResourceExhausted,
            DaemonError::AlreadyExists { .. } => Code::AlreadyExists,
            DaemonError::PermissionDenied(_) => Code::PermissionDenied,
            DaemonError::Unavailable(_) => Code::Unavailable,
            DaemonError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

/// Result alias of the daemon layer.
pub type DaemonResult<T> = Result<T, DaemonError>;
