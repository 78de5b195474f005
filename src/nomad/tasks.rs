//! The plugin's in-memory view of the tasks it handles: one [`TaskEntry`] per Nomad task id,
//! from StartTask (or RecoverTask) until DestroyTask. Each entry publishes its exit once, to
//! any number of WaitTask callers, and keeps it until the entry is destroyed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::proto::hashicorp::nomad::plugins::drivers::proto as pb;

/// How a task ended, as WaitTask reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskExit {
    /// Exit code, signal, OOM flag.
    pub result: pb::ExitResult,
    /// Non-empty when the task ended abnormally (daemon lost, timeout, ...).
    pub err: String,
    /// When the plugin learnt of the end.
    pub completed_at: SystemTime,
}

/// One task.
#[derive(Debug)]
pub struct TaskEntry {
    /// Nomad task id (`<alloc>/<task>/<short>`).
    pub id: String,
    /// Task name.
    pub name: String,
    /// Allocation id (TaskEvents routing key).
    pub alloc_id: String,
    /// Daemon execution id.
    pub execution_id: String,
    /// Daemon session id.
    pub session_id: String,
    /// Snippet pid.
    pub pid: u32,
    /// When the task started.
    pub started_at: SystemTime,
    exit: watch::Sender<Option<TaskExit>>,
    /// Cancelled when the task is destroyed: stops its background work.
    pub cancel: CancellationToken,
}

impl TaskEntry {
    /// A running task.
    pub fn new(
        config: &pb::TaskConfig,
        execution_id: String,
        session_id: String,
        pid: u32,
        started_at: SystemTime,
    ) -> Self {
        Self {
            id: config.id.clone(),
            name: config.name.clone(),
            alloc_id: config.alloc_id.clone(),
            execution_id,
            session_id,
            pid,
            started_at,
            exit: watch::channel(None).0,
            cancel: CancellationToken::new(),
        }
    }

    /// The exit, once known.
    pub fn exit(&self) -> Option<TaskExit> {
        self.exit.borrow().clone()
    }

    /// Publishes the exit unless one is already known (the first verdict wins).
    pub fn set_exit(&self, result: pb::ExitResult, err: String) {
        self.exit.send_if_modified(|cur| {
            if cur.is_some() {
                return false;
            }
            *cur = Some(TaskExit {
                result,
                err,
                completed_at: SystemTime::now(),
            });
            true
        });
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> TaskExit {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            // The sender lives in `self`, so this only fails if the entry is dropped.
            if rx.changed().await.is_err() {
                return TaskExit {
                    result: pb::ExitResult::default(),
                    err: "task state dropped".into(),
                    completed_at: SystemTime::now(),
                };
            }
        }
    }
}

/// All tasks of this plugin process.
#[derive(Debug, Default)]
pub struct TaskStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tasks: HashMap<String, Arc<TaskEntry>>,
    starting: std::collections::HashSet<String>,
}

/// Why an id cannot be reserved.
#[derive(Debug, PartialEq, Eq)]
pub enum Reserve {
    /// Already running or being started.
    Taken,
}

/// An id held while its task starts; released on drop unless committed.
pub struct Reservation<'a> {
    store: &'a TaskStore,
    id: String,
    done: bool,
}

impl Reservation<'_> {
    /// Stores the started task under the reserved id.
    pub fn commit(mut self, entry: Arc<TaskEntry>) {
        let mut g = self.store.lock();
        g.starting.remove(&self.id);
        g.tasks.insert(self.id.clone(), entry);
        self.done = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.store.lock().starting.remove(&self.id);
        }
    }
}

impl TaskStore {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `id` for a start; refused when a task with that id exists or is starting.
    pub fn reserve(&self, id: &str) -> Result<Reservation<'_>, Reserve> {
        let mut g = self.lock();
        if g.tasks.contains_key(id) || !g.starting.insert(id.to_string()) {
            return Err(Reserve::Taken);
        }
        Ok(Reservation {
            store: self,
            id: id.to_string(),
            done: false,
        })
    }

    /// The task with this id.
    pub fn get(&self, id: &str) -> Option<Arc<TaskEntry>> {
        self.lock().tasks.get(id).cloned()
    }

    /// Removes and returns the task.
    pub fn remove(&self, id: &str) -> Option<Arc<TaskEntry>> {
        self.lock().tasks.remove(id)
    }

    /// True when task `task_id` is held or being started here, or some task runs as
    /// `execution_id`.
    pub fn tracks(&self, task_id: &str, execution_id: &str) -> bool {
        let g = self.lock();
        g.tasks.contains_key(task_id)
            || g.starting.contains(task_id)
            || g.tasks.values().any(|e| e.execution_id == execution_id)
    }

    /// The tasks of task `name` of allocation `alloc_id` (running or ended), but for task id
    /// `except`.
    pub fn other_instances(&self, alloc_id: &str, name: &str, except: &str) -> Vec<Arc<TaskEntry>> {
        self.lock()
            .tasks
            .values()
            .filter(|e| e.alloc_id == alloc_id && e.name == name && e.id != except)
            .cloned()
            .collect()
    }

    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.lock().tasks.len()
    }

    /// True when there are no tasks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(id: &str) -> pb::TaskConfig {
        pb::TaskConfig {
            id: id.into(),
            name: "web".into(),
            alloc_id: "a1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn tracks_held_starting_and_running_tasks() {
        let store = TaskStore::default();
        assert!(!store.tracks("a1/web/1", "e-1"));
        let starting = store.reserve("a1/web/1").unwrap();
        assert!(
            store.tracks("a1/web/1", "e-unknown"),
            "a task being started"
        );
        let entry = TaskEntry::new(
            &config("a1/web/1"),
            "e-1".into(),
            "s".into(),
            1,
            SystemTime::now(),
        );
        starting.commit(Arc::new(entry));
        assert!(store.tracks("a1/web/1", "e-unknown"), "a held task id");
        assert!(store.tracks("a1/web/9", "e-1"), "a held task's execution");
        assert!(!store.tracks("a1/web/2", "e-2"));
        let released = store.reserve("a1/web/3").unwrap();
        drop(released);
        assert!(!store.tracks("a1/web/3", "e-3"), "a start given up");
        store.remove("a1/web/1");
        assert!(!store.tracks("a1/web/1", "e-1"));
    }

    #[tokio::test]
    async fn exit_is_published_once_to_every_waiter() {
        let cfg = pb::TaskConfig {
            id: "a/t/1".into(),
            ..Default::default()
        };
        let e = Arc::new(TaskEntry::new(
            &cfg,
            "e".into(),
            "s".into(),
            1,
            SystemTime::now(),
        ));
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let e = e.clone();
                tokio::spawn(async move { e.wait().await })
            })
            .collect();
        e.set_exit(
            pb::ExitResult {
                exit_code: 3,
                ..Default::default()
            },
            String::new(),
        );
        e.set_exit(
            pb::ExitResult {
                exit_code: 9,
                ..Default::default()
            },
            String::new(),
        );
        for w in waiters {
            assert_eq!(w.await.unwrap().result.exit_code, 3);
        }
        assert_eq!(e.wait().await.result.exit_code, 3);
    }

    #[test]
    fn ids_are_reserved_until_released() {
        let s = TaskStore::default();
        let r = s.reserve("x").unwrap();
        assert!(s.reserve("x").is_err());
        drop(r);
        let r = s.reserve("x").unwrap();
        let cfg = pb::TaskConfig {
            id: "x".into(),
            ..Default::default()
        };
        r.commit(Arc::new(TaskEntry::new(
            &cfg,
            "e".into(),
            "s".into(),
            1,
            SystemTime::now(),
        )));
        assert!(s.reserve("x").is_err());
        assert!(s.get("x").is_some());
        assert!(s.remove("x").is_some());
        assert!(s.reserve("x").is_ok());
    }
}
