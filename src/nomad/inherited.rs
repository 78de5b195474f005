//! Executions an earlier plugin process started in our session and left running.
//!
//! The agent kills the plugin on every restart, and Nomad recovers the tasks it holds a handle
//! for (RecoverTask). Two kinds of execution escape that and would run on unseen, next to the
//! task Nomad starts again:
//! - a start whose reply never reached Nomad (the agent died in between): Nomad has no handle,
//!   and runs the task afresh under a new task id;
//! - a task whose recovery failed: Nomad destroys its old task id, which this plugin process
//!   never started, then starts it afresh.
//!
//! So the first time this plugin process reaches the daemon it notes the running executions
//! of Nomad tasks by task id (`client_ref`), in every session (`session_config` may have changed). RecoverTask claims what it recovers; a StartTask
//! of the same allocation and task name, or a DestroyTask of the noted task id, stops what is
//! left of it. Nomad never runs two instances of one task of an allocation at once, so a noted
//! execution of that task is a leftover by then.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::OnceCell;

use super::task_io::route_of;
use crate::daemon_client::{DaemonClient, DaemonError};
use crate::proto::elide::daemon::v1alpha1 as api;

/// Running executions found at this process's first contact with the daemon: task id →
/// execution id.
#[derive(Debug, Default)]
pub struct Inherited {
    noted: OnceCell<Mutex<HashMap<String, String>>>,
}

impl Inherited {
    /// Notes the daemon's running executions of Nomad tasks, once per plugin process; every
    /// caller waits for that first listing, so nothing this process starts is ever among them.
    /// A failed listing is tried again by the next caller. Every session's: an earlier process
    /// may have run under another `session_config` (allocation ids are unique in the cluster,
    /// so another agent's executions never match a task of ours).
    pub async fn note(&self, client: &DaemonClient) -> Result<(), DaemonError> {
        self.noted
            .get_or_try_init(|| async {
                let running: HashMap<String, String> = client
                    .list_executions("")
                    .await?
                    .into_iter()
                    .filter(|e| {
                        e.state != api::ExecutionState::Exited as i32 && !e.client_ref.is_empty()
                    })
                    .map(|e| (e.client_ref, e.id))
                    .collect();
                if !running.is_empty() {
                    tracing::info!(
                        count = running.len(),
                        "executions of an earlier plugin process still run"
                    );
                }
                Ok::<_, DaemonError>(Mutex::new(running))
            })
            .await
            .map(|_| ())
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, String>) -> T) -> Option<T> {
        let m = self.noted.get()?;
        Some(f(&mut m.lock().unwrap_or_else(|p| p.into_inner())))
    }

    /// RecoverTask took the execution over: not a leftover.
    pub fn claim(&self, execution_id: &str) {
        self.with(|m| m.retain(|_, e| e != execution_id));
    }

    /// Takes the noted executions of task `task_name` of allocation `alloc_id`:
    /// (task id, execution id).
    pub fn take_task(&self, alloc_id: &str, task_name: &str) -> Vec<(String, String)> {
        self.with(|m| {
            let ids: Vec<String> = m
                .keys()
                .filter(|id| route_of(id) == Some((alloc_id, task_name)))
                .cloned()
                .collect();
            ids.into_iter()
                .filter_map(|id| m.remove(&id).map(|e| (id, e)))
                .collect()
        })
        .unwrap_or_default()
    }

    /// Takes the noted execution of task id `task_id`.
    pub fn take_id(&self, task_id: &str) -> Option<String> {
        self.with(|m| m.remove(task_id)).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(pairs: &[(&str, &str)]) -> Inherited {
        let i = Inherited::default();
        let m = pairs
            .iter()
            .map(|(t, e)| (t.to_string(), e.to_string()))
            .collect();
        i.noted.set(Mutex::new(m)).unwrap();
        i
    }

    #[test]
    fn a_task_takes_only_its_own_leftovers_and_only_once() {
        let i = filled(&[
            ("a1/web/1111", "e-1"),
            ("a1/web2/2222", "e-2"),
            ("a2/web/3333", "e-3"),
        ]);
        assert_eq!(
            i.take_task("a1", "web"),
            vec![("a1/web/1111".to_string(), "e-1".to_string())]
        );
        assert!(i.take_task("a1", "web").is_empty());
        assert_eq!(i.take_id("a2/web/3333").as_deref(), Some("e-3"));
        assert_eq!(i.take_id("a2/web/3333"), None);
    }

    #[test]
    fn a_claimed_execution_is_no_leftover() {
        let i = filled(&[("a1/web/1111", "e-1")]);
        i.claim("e-1");
        assert!(i.take_task("a1", "web").is_empty());
        assert_eq!(i.take_id("a1/web/1111"), None);
    }

    #[test]
    fn nothing_is_taken_before_the_daemon_was_reached() {
        let i = Inherited::default();
        i.claim("e-1");
        assert!(i.take_task("a1", "web").is_empty());
        assert_eq!(i.take_id("a1/web/1111"), None);
    }
}
