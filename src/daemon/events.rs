//! Lifecycle events of executions and sessions, fanned out to every WatchEvents caller.

use std::collections::HashMap;

use tokio::sync::broadcast;

use crate::proto::elide::daemon::v1alpha1::{EventKind, ExecutionEvent};

/// Fan-out of events. Slow watchers lose the oldest events (reported as a lag), never block
/// the executions that emit them.
#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<ExecutionEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(1024)
    }
}

/// What an event is about.
pub struct EventSubject<'a> {
    /// Session id.
    pub session_id: &'a str,
    /// Execution id, empty for session events.
    pub execution_id: &'a str,
    /// Client reference of the execution.
    pub client_ref: &'a str,
}

impl EventBus {
    /// A bus keeping `capacity` events for slow watchers.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        Self { tx }
    }

    /// Publishes an event (nobody listening is fine).
    pub fn emit(
        &self,
        kind: EventKind,
        subject: &EventSubject<'_>,
        message: impl Into<String>,
        annotations: HashMap<String, String>,
    ) {
        let event = ExecutionEvent {
            kind: kind as i32,
            session_id: subject.session_id.to_string(),
            execution_id: subject.execution_id.to_string(),
            client_ref: subject.client_ref.to_string(),
            timestamp: Some(std::time::SystemTime::now().into()),
            message: message.into(),
            annotations,
        };
        let _ = self.tx.send(event);
    }

    /// A new receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ExecutionEvent> {
        self.tx.subscribe()
    }
}
