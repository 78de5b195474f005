//! Dangling executions: what the daemon runs for this agent although no Nomad task is behind it
//! any more.
//!
//! [`super::inherited`] stops an earlier plugin process's leftovers when Nomad starts or
//! destroys the same task again. Some leftovers never see either:
//! - a task Nomad destroyed while the daemon could not answer, whose background kill died with
//!   the plugin process (an agent restart within its retry window);
//! - a start whose reply never reached Nomad, for an allocation Nomad then gave up on.
//!
//! So the long-lived plugin process looks every `period` (as the docker driver's dangling
//! container reconciler does) and stops, with SIGKILL, each running execution of the daemon
//! (in any session: `session_config` may have changed since an earlier process) that
//! - carries a Nomad task id (`client_ref`) no task of this process holds or is starting, and
//!   runs as no task's execution;
//! - works in a task dir under an alloc root this process has seen in a StartTask or
//!   RecoverTask (another Nomad agent on the node may share the daemon, even the session);
//! - started more than `creation_grace` ago, while this process has had its agent config for
//!   at least as long (Nomad recovers its tasks within seconds of an agent start).
//!
//! The validation launch never gets here: only SetConfig with `nomad_config` arms it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::config::DanglingSettings;
use super::lifecycle::{Stop, stop_and_forget};
use super::state::PluginState;
use crate::proto::elide::daemon::v1alpha1 as api;

/// The alloc roots this process has seen, and whether its reconciler runs.
#[derive(Debug, Default)]
pub struct Dangling {
    roots: Mutex<HashSet<PathBuf>>,
    armed: std::sync::atomic::AtomicBool,
}

impl Dangling {
    /// Notes the alloc root (`<data_dir>/alloc`) of a task's alloc dir.
    pub fn note_alloc_dir(&self, alloc_dir: &str) {
        let Some(root) = Path::new(alloc_dir).parent() else {
            return;
        };
        if root.as_os_str().is_empty() || !root.is_absolute() {
            return;
        }
        let mut roots = self.roots.lock().unwrap_or_else(|p| p.into_inner());
        if !roots.contains(root) {
            roots.insert(root.to_path_buf());
        }
    }

    fn roots(&self) -> Vec<PathBuf> {
        let roots = self.roots.lock().unwrap_or_else(|p| p.into_inner());
        roots.iter().cloned().collect()
    }
}

/// Starts the reconciler of `state`, once per process; does nothing when `settings` disable it.
pub fn arm(state: &Arc<PluginState>, settings: DanglingSettings) {
    use std::sync::atomic::Ordering;
    if !settings.enabled || state.dangling.armed.swap(true, Ordering::SeqCst) {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        let configured = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(settings.period) => {}
                () = state.shutdown.cancelled() => return,
            }
            if configured.elapsed() < settings.creation_grace {
                continue;
            }
            reconcile(&state, settings.creation_grace).await;
        }
    });
}

/// One look: lists the daemon's executions and stops the dangling ones.
async fn reconcile(state: &PluginState, grace: Duration) {
    let snapshot = state.snapshot();
    if snapshot.session_id.is_none() {
        return;
    }
    let roots = state.dangling.roots();
    if roots.is_empty() {
        // No task seen yet: nothing tells our executions from another agent's.
        return;
    }
    // A daemon that is down ended its executions: nothing to look for, nothing to start.
    let Ok(client) = state.link.running_client(&snapshot).await else {
        return;
    };
    // Every session's: after a change of `session_config` the tasks an earlier plugin process
    // started run in the old session. The alloc roots keep other clients' executions out.
    let executions = match client.list_executions("").await {
        Ok(list) => list,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list the daemon's executions to look for dangling ones");
            return;
        }
    };
    let now = SystemTime::now();
    for e in dangling(&executions, &roots, now, grace) {
        // Asked again right before the stop: a task may have been recovered meanwhile.
        if state.tasks.tracks(&e.client_ref, &e.id) {
            continue;
        }
        tracing::warn!(task = %e.client_ref, execution = %e.id, pid = e.pid, working_dir = %e.working_dir, "stopping an execution no Nomad task tracks any more (dangling_executions)");
        let how = Stop {
            signal: "SIGKILL",
            grace: Duration::ZERO,
            what: "a dangling execution",
        };
        // Failures are logged there; the next look tries again.
        let _ = stop_and_forget(&client, &e.client_ref, &e.id, how).await;
    }
}

/// The executions of `executions` that are dangling by every test but the task table's
/// (which the caller asks right before stopping each).
pub fn dangling<'a>(
    executions: &'a [api::Execution],
    roots: &[PathBuf],
    now: SystemTime,
    grace: Duration,
) -> Vec<&'a api::Execution> {
    executions
        .iter()
        .filter(|e| {
            e.state == api::ExecutionState::Running as i32
                || e.state == api::ExecutionState::Starting as i32
        })
        .filter(|e| !e.client_ref.is_empty() && !e.working_dir.is_empty())
        .filter(|e| {
            let dir = Path::new(&e.working_dir);
            roots.iter().any(|r| dir.starts_with(r) && dir != r)
        })
        .filter(|e| {
            e.started_at
                .and_then(|t| SystemTime::try_from(t).ok())
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= grace)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(id: &str, client_ref: &str, dir: &str, age: Duration) -> api::Execution {
        api::Execution {
            id: id.into(),
            client_ref: client_ref.into(),
            working_dir: dir.into(),
            state: api::ExecutionState::Running as i32,
            started_at: Some((SystemTime::now() - age).into()),
            ..Default::default()
        }
    }

    fn ids(v: Vec<&api::Execution>) -> Vec<&str> {
        v.into_iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn only_old_running_nomad_executions_under_a_seen_alloc_root_dangle() {
        let old = Duration::from_secs(600);
        let grace = Duration::from_secs(300);
        let roots = vec![PathBuf::from("/var/nomad/alloc")];
        let mut exited = running("e-exited", "a1/web/1", "/var/nomad/alloc/a1/web", old);
        exited.state = api::ExecutionState::Exited as i32;
        let list = vec![
            running("e-old", "a1/web/1", "/var/nomad/alloc/a1/web", old),
            running(
                "e-young",
                "a1/api/2",
                "/var/nomad/alloc/a1/api",
                Duration::from_secs(5),
            ),
            exited,
            // Another agent's alloc root, or not Nomad's at all.
            running("e-other-agent", "a9/web/3", "/srv/nomad2/alloc/a9/web", old),
            running("e-cli", "", "/var/nomad/alloc/a1/web", old),
            running("e-no-dir", "a1/web/4", "", old),
            // The root itself is no task dir; a sibling with the root as prefix is no child.
            running("e-root", "a1/web/5", "/var/nomad/alloc", old),
            running(
                "e-sibling",
                "a1/web/6",
                "/var/nomad/allocations/a1/web",
                old,
            ),
        ];
        let now = SystemTime::now();
        assert_eq!(ids(dangling(&list, &roots, now, grace)), vec!["e-old"]);
        assert!(dangling(&list, &[], now, grace).is_empty());
        let mut unknown_start = running("e-when", "a1/web/7", "/var/nomad/alloc/a1/web", old);
        unknown_start.started_at = None;
        assert!(dangling(&[unknown_start], &roots, now, grace).is_empty());
    }

    #[test]
    fn alloc_roots_come_from_absolute_alloc_dirs() {
        let d = Dangling::default();
        d.note_alloc_dir("/var/nomad/alloc/a1");
        d.note_alloc_dir("/var/nomad/alloc/a2");
        d.note_alloc_dir("relative/a3");
        d.note_alloc_dir("");
        d.note_alloc_dir("/");
        assert_eq!(d.roots(), vec![PathBuf::from("/var/nomad/alloc")]);
    }
}
