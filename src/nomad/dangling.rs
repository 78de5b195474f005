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
//! - has looked so at every look for `creation_grace` (monotonic time: a clock step changes
//!   nothing; Nomad recovers its tasks within seconds of an agent start).
//!
//! The validation launch never gets here: only SetConfig with `nomad_config` arms it. Nor does
//! a plugin process whose agent is gone (no Fingerprint stream open: the agent holds one for
//! as long as it uses the plugin): after a failed reattach Nomad starts a new plugin process
//! and leaves the old one running, whose frozen task table would take the new one's tasks for
//! dangling.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::config::DanglingSettings;
use super::lifecycle::{Stop, stop_and_forget};
use super::state::PluginState;
use crate::proto::elide::daemon::v1alpha1 as api;

/// The alloc roots this process has seen, the agents attached, and what looked dangling since
/// when.
#[derive(Debug, Default)]
pub struct Dangling {
    roots: Mutex<HashSet<PathBuf>>,
    armed: AtomicBool,
    agents: AtomicUsize,
    /// Execution id → first look that found it dangling.
    first_seen: Mutex<HashMap<String, Instant>>,
    /// The last listing failed (warned once per streak).
    list_failing: AtomicBool,
}

/// An agent's Fingerprint stream, open for as long as this lives.
pub struct AgentAttached<'a>(&'a Dangling);

impl Drop for AgentAttached<'_> {
    fn drop(&mut self) {
        self.0.agents.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Dangling {
    fn first_seen_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.first_seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Of `candidates` (all a look at `now` takes for dangling), those every look has taken
    /// for dangling for at least `grace`; one missing from a look starts over.
    fn due<'a>(
        &self,
        candidates: Vec<&'a api::Execution>,
        now: Instant,
        grace: Duration,
    ) -> Vec<&'a api::Execution> {
        let mut seen = self.first_seen_lock();
        seen.retain(|id, _| candidates.iter().any(|e| &e.id == id));
        candidates
            .into_iter()
            .filter(|e| {
                let since = *seen.entry(e.id.clone()).or_insert(now);
                now.saturating_duration_since(since) >= grace
            })
            .collect()
    }

    /// Counts an agent as attached until the guard is dropped.
    pub fn agent_attached(&self) -> AgentAttached<'_> {
        self.agents.fetch_add(1, Ordering::SeqCst);
        AgentAttached(self)
    }

    /// Notes the alloc root (`<data_dir>/alloc`) of a task's alloc dir. A root of fewer than
    /// two components (`/`, `/alloc`) is refused: it would take in much more than Nomad's.
    pub fn note_alloc_dir(&self, alloc_dir: &str) {
        let Some(root) = Path::new(alloc_dir).parent() else {
            return;
        };
        let depth = root
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .count();
        let plain = root
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !root.is_absolute() || !plain || depth < 2 {
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
    if !settings.enabled || state.dangling.armed.swap(true, Ordering::SeqCst) {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(settings.period) => {}
                () = state.shutdown.cancelled() => return,
            }
            reconcile(&state, settings.creation_grace).await;
        }
    });
}

/// One look: lists the daemon's executions and stops those that have looked dangling for
/// `grace`.
async fn reconcile(state: &PluginState, grace: Duration) {
    let d = &state.dangling;
    let snapshot = state.snapshot();
    let roots = d.roots();
    if snapshot.session_id.is_none() || roots.is_empty() || d.agents.load(Ordering::SeqCst) == 0 {
        // Not configured by an agent, no task seen yet (nothing tells our executions from
        // another agent's), or no agent attached: what looked dangling is forgotten.
        d.first_seen_lock().clear();
        return;
    }
    // A daemon that is down ended its executions: nothing to look for, nothing to start.
    let Ok(client) = state.link.running_client(&snapshot).await else {
        return;
    };
    // Every session's: after a change of `session_config` the tasks an earlier plugin process
    // started run in the old session. The alloc roots keep other clients' executions out.
    let executions = match client.list_executions("").await {
        Ok(list) => {
            d.list_failing.store(false, Ordering::SeqCst);
            list
        }
        Err(e) => {
            if !d.list_failing.swap(true, Ordering::SeqCst) {
                tracing::warn!(error = %e, "cannot list the daemon's executions to look for dangling ones; trying again every period");
            }
            return;
        }
    };
    let candidates: Vec<&api::Execution> = dangling(&executions, &roots)
        .into_iter()
        .filter(|e| !state.tasks.tracks(&e.client_ref, &e.id))
        .collect();
    for e in d.due(candidates, Instant::now(), grace) {
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
        if stop_and_forget(&client, &e.client_ref, &e.id, how)
            .await
            .is_ok()
        {
            d.first_seen_lock().remove(&e.id);
        }
    }
}

/// The executions of `executions` that a look takes for dangling, but for the task table
/// (which the caller asks) and for how long they have looked so.
pub fn dangling<'a>(
    executions: &'a [api::Execution],
    roots: &[PathBuf],
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
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(id: &str, client_ref: &str, dir: &str) -> api::Execution {
        api::Execution {
            id: id.into(),
            client_ref: client_ref.into(),
            working_dir: dir.into(),
            state: api::ExecutionState::Running as i32,
            ..Default::default()
        }
    }

    fn ids(v: Vec<&api::Execution>) -> Vec<&str> {
        v.into_iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn only_running_nomad_executions_under_a_seen_alloc_root_are_candidates() {
        let roots = vec![PathBuf::from("/var/nomad/alloc")];
        let mut exited = running("e-exited", "a1/web/1", "/var/nomad/alloc/a1/web");
        exited.state = api::ExecutionState::Exited as i32;
        let mut starting = running("e-starting", "a1/web/1", "/var/nomad/alloc/a1/web");
        starting.state = api::ExecutionState::Starting as i32;
        let list = vec![
            running("e-ours", "a1/web/1", "/var/nomad/alloc/a1/web"),
            starting,
            exited,
            // Another agent's alloc root, or not Nomad's at all.
            running("e-other-agent", "a9/web/3", "/srv/nomad2/alloc/a9/web"),
            running("e-cli", "", "/var/nomad/alloc/a1/web"),
            running("e-no-dir", "a1/web/4", ""),
            // The root itself is no task dir; a sibling with the root as prefix is no child.
            running("e-root", "a1/web/5", "/var/nomad/alloc"),
            running("e-sibling", "a1/web/6", "/var/nomad/allocations/a1/web"),
        ];
        assert_eq!(ids(dangling(&list, &roots)), vec!["e-ours", "e-starting"]);
        assert!(dangling(&list, &[]).is_empty());
    }

    #[test]
    fn only_what_every_look_took_for_dangling_for_the_grace_is_due() {
        let d = Dangling::default();
        let grace = Duration::from_secs(300);
        let (a, b) = (
            running("e-a", "a1/web/1", "/n/alloc/a1/web"),
            running("e-b", "a1/api/2", "/n/alloc/a1/api"),
        );
        let t0 = Instant::now();
        assert!(d.due(vec![&a, &b], t0, grace).is_empty());
        let t1 = t0 + Duration::from_secs(200);
        // `b` is not dangling at this look (recovered, say): its clock starts over.
        assert!(d.due(vec![&a], t1, grace).is_empty());
        let t2 = t0 + grace;
        assert_eq!(ids(d.due(vec![&a, &b], t2, grace)), vec!["e-a"]);
        assert!(
            d.due(vec![&b], t2 + Duration::from_secs(1), grace)
                .is_empty()
        );
        assert_eq!(ids(d.due(vec![&b], t2 + grace, grace)), vec!["e-b"]);
    }

    #[test]
    fn alloc_roots_come_from_absolute_alloc_dirs_two_levels_deep_at_least() {
        let d = Dangling::default();
        d.note_alloc_dir("/var/nomad/alloc/a1");
        d.note_alloc_dir("/var/nomad/alloc/a2");
        d.note_alloc_dir("/nomad/alloc/a3");
        for refused in [
            "relative/alloc/a3",
            "",
            "/",
            "/a1",
            "/alloc/a1",
            "/x/../alloc/a1",
        ] {
            d.note_alloc_dir(refused);
        }
        let mut roots = d.roots();
        roots.sort();
        assert_eq!(
            roots,
            vec![
                PathBuf::from("/nomad/alloc"),
                PathBuf::from("/var/nomad/alloc")
            ]
        );
    }

    #[test]
    fn agents_count_while_their_guards_live() {
        let d = Dangling::default();
        let first = d.agent_attached();
        let second = d.agent_attached();
        assert_eq!(d.agents.load(Ordering::SeqCst), 2);
        drop(first);
        drop(second);
        assert_eq!(d.agents.load(Ordering::SeqCst), 0);
    }
}
