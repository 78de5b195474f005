//! `TaskHandle.driver_state`: what RecoverTask needs to find a task again after the plugin
//! process was killed (the Nomad client persists these bytes and hands them back; the task
//! config's `msgpack_driver_config` is gone by then, fact sheet §3.7).
//!
//! JSON with an explicit `version`, so a later plugin can tell old layouts apart and say so.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The layout version this plugin writes and reads. Also used as `TaskHandle.version`
/// (0 is reserved by Nomad for pre-0.9 handles).
pub const DRIVER_STATE_VERSION: u32 = 1;

/// Persisted per-task state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverState {
    /// Layout version ([`DRIVER_STATE_VERSION`]).
    pub version: u32,
    /// The daemon socket the task was started on.
    pub daemon_socket: PathBuf,
    /// The daemon session that started it.
    pub session_id: String,
    /// The daemon's execution id.
    pub execution_id: String,
    /// Start time, nanoseconds since the Unix epoch.
    pub started_at_unix_nanos: u64,
    /// The snippet's pid (0 if unknown).
    pub pid: u32,
    /// The pid's start time in clock ticks since boot, to detect pid reuse.
    pub pid_start_ticks: u64,
}

/// Why a `driver_state` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverStateError {
    /// Empty bytes.
    #[error("driver_state is empty; the handle was not written by the elide driver")]
    Empty,
    /// Not our JSON at all.
    #[error("driver_state is not elide driver state ({0})")]
    Garbage(String),
    /// Our JSON, but a layout this plugin does not read.
    #[error(
        "driver_state version {found} is not supported (this plugin reads version {DRIVER_STATE_VERSION}); the task cannot be recovered by this plugin version"
    )]
    Version {
        /// The version in the bytes.
        found: u64,
    },
    /// The right version with missing or wrong fields.
    #[error("driver_state version {DRIVER_STATE_VERSION} is incomplete: {0}")]
    Invalid(String),
}

impl DriverState {
    /// The state of a task started now.
    pub fn new(
        daemon_socket: PathBuf,
        session_id: String,
        execution_id: String,
        started_at: SystemTime,
        pid: u32,
        pid_start_ticks: u64,
    ) -> Self {
        let nanos = started_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Self {
            version: DRIVER_STATE_VERSION,
            daemon_socket,
            session_id,
            execution_id,
            started_at_unix_nanos: u64::try_from(nanos).unwrap_or(u64::MAX),
            pid,
            pid_start_ticks,
        }
    }

    /// The start time.
    pub fn started_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.started_at_unix_nanos)
    }

    /// The bytes for `TaskHandle.driver_state`.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising a struct of plain fields cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses bytes from a handle, checking the version before the fields.
    pub fn decode(bytes: &[u8]) -> Result<Self, DriverStateError> {
        if bytes.is_empty() {
            return Err(DriverStateError::Empty);
        }
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| DriverStateError::Garbage(format!("not JSON: {e}")))?;
        let Some(obj) = value.as_object() else {
            return Err(DriverStateError::Garbage("not a JSON object".into()));
        };
        let found = match obj.get("version") {
            Some(v) => v
                .as_u64()
                .ok_or_else(|| DriverStateError::Garbage(format!("version is {v}")))?,
            None => return Err(DriverStateError::Garbage("no version field".into())),
        };
        if found != u64::from(DRIVER_STATE_VERSION) {
            return Err(DriverStateError::Version { found });
        }
        let state: DriverState =
            serde_json::from_value(value).map_err(|e| DriverStateError::Invalid(e.to_string()))?;
        if state.execution_id.is_empty() {
            return Err(DriverStateError::Invalid("execution_id is empty".into()));
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DriverState {
        DriverState::new(
            "/run/elide/daemon.sock".into(),
            "nomad-1".into(),
            "e-1".into(),
            UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            42,
            1234,
        )
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let back = DriverState::decode(&s.encode()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.started_at(), s.started_at());
    }

    #[test]
    fn garbage_and_old_versions_are_named() {
        assert_eq!(DriverState::decode(b""), Err(DriverStateError::Empty));
        assert!(matches!(
            DriverState::decode(b"\x00\x01garbage"),
            Err(DriverStateError::Garbage(_))
        ));
        assert!(matches!(
            DriverState::decode(b"[1,2]"),
            Err(DriverStateError::Garbage(_))
        ));
        assert!(matches!(
            DriverState::decode(br#"{"pid": 1}"#),
            Err(DriverStateError::Garbage(_))
        ));
        let e = DriverState::decode(br#"{"version": 0, "pid": 1}"#).unwrap_err();
        assert_eq!(e, DriverStateError::Version { found: 0 });
        assert!(e.to_string().contains("version 0 is not supported"), "{e}");
        let e = DriverState::decode(br#"{"version": 1}"#).unwrap_err();
        assert!(matches!(e, DriverStateError::Invalid(_)), "{e}");
    }
}
