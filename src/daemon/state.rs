//! Durable state under the state dir: a record per execution (written when it starts and again
//! when it ends) and one per session, so that a client reconnecting after an execution ended —
//! even across a daemon restart — gets the real result. Execution records go to an append-only
//! journal ([`super::journal`]); session records, rare, are files replaced atomically (write to
//! a temp file, fsync, rename).
//!
//! Layout: `<state_dir>/executions.journal`, `<state_dir>/sessions/<id>.json`,
//! `<state_dir>/daemon.lock` (held with flock while a daemon runs). Older daemons kept one
//! `<state_dir>/executions/<id>.json` per execution; those are read, and moved into the journal
//! by the next daemon that opens the dir.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::journal::{self, Journal};

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An I/O operation on a state file failed.
    #[error("state dir {path}: {source}")]
    Io {
        /// The file or dir.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another daemon holds the lock.
    #[error(
        "another elide-daemon already uses state dir {0} (its daemon.lock is held); stop it or use --state-dir"
    )]
    Locked(PathBuf),
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The persisted result of an execution.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResultRecord {
    /// Exit code (128+N when killed by signal N).
    pub exit_code: i32,
    /// Signal that ended it, 0 if none.
    pub signal: i32,
    /// Killed by the OOM killer.
    pub oom_killed: bool,
    /// Killed for exceeding its timeout.
    pub timed_out: bool,
    /// Set when the daemon ended it.
    pub error: String,
}

/// The persisted record of an execution.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionRecord {
    /// Execution id.
    pub id: String,
    /// Session id.
    pub session_id: String,
    /// Canonical language.
    pub language: String,
    /// Opaque client reference.
    pub client_ref: String,
    /// Process id (0 before spawn).
    pub pid: u32,
    /// Start time of `pid` in clock ticks since boot.
    pub pid_start_ticks: u64,
    /// Unix seconds + nanos of start.
    pub started_at: Option<std::time::SystemTime>,
    /// When it ended.
    pub ended_at: Option<std::time::SystemTime>,
    /// Set once ended.
    pub result: Option<ResultRecord>,
    /// Cgroup path(s) description.
    pub cgroup: String,
    /// Pid of the daemon that ran it.
    pub daemon_pid: u32,
}

/// The persisted record of a session (its config as protobuf-compatible JSON fields).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session id.
    pub id: String,
    /// Owner label.
    pub owner: String,
    /// Warm pool size.
    pub context_pool_size: u32,
    /// Enabled languages as requested.
    pub enabled_languages: Vec<String>,
    /// Enabled intrinsics.
    pub enabled_intrinsics: Vec<String>,
    /// Memory cap in MiB.
    pub memory_limit_mb: u64,
    /// AI enabled.
    pub enable_ai: bool,
    /// Memory offered for same-page merging (absent in records of older daemons).
    #[serde(default)]
    pub merge_identical_pages: bool,
    /// Creation time.
    pub created_at: std::time::SystemTime,
}

/// Creates (or truncates) `path` with `bytes`, owner-only, fdatasynced when `durable`; the open
/// file, for more writes.
pub(super) fn write_new(path: &Path, bytes: &[u8], durable: bool) -> Result<File, StateError> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    if durable {
        f.sync_data().map_err(io(path))?;
    }
    Ok(f)
}

/// Replaces `path` with `bytes` atomically: written to `tmp` (see [`write_new`]), renamed over
/// `path`.
pub(super) fn replace_file(
    path: &Path,
    tmp: &Path,
    bytes: &[u8],
    durable: bool,
) -> Result<(), StateError> {
    write_new(tmp, bytes, durable)?;
    fs::rename(tmp, path).map_err(io(path))
}

/// The execution journal's file name under the state dir.
const JOURNAL: &str = "executions.journal";
/// How long a final record may wait for others to share its flush. At a few hundred short
/// executions a second, a flush per execution is a flush every few milliseconds on the node's
/// disk; this makes it one per window. Only a machine crash within the window loses the
/// result, and then the execution was already over.
pub const GROUP_COMMIT_WINDOW: std::time::Duration = std::time::Duration::from_millis(20);

/// Where older daemons kept one file per execution.
const LEGACY_EXECUTIONS: &str = "executions";

/// The state directory.
pub struct StateStore {
    root: PathBuf,
    /// The execution journal; `None` in a read-only view.
    journal: Option<Journal>,
    _lock: Option<nix::fcntl::Flock<File>>,
}

/// A written execution record, to be made durable with [`StateStore::sync_execution`].
#[derive(Debug, Clone, Copy)]
pub struct Written(u64);

impl StateStore {
    /// Opens (creating) the state dir and takes its lock.
    pub fn open(root: &Path) -> Result<Self, StateError> {
        let sessions = root.join("sessions");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&sessions)
            .map_err(io(&sessions))?;
        let lock_path = root.join("daemon.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let lock = match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            Ok(held) => held,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(StateError::Locked(root.to_path_buf()));
            }
            Err((_, e)) => {
                return Err(StateError::Io {
                    path: lock_path,
                    source: e.into(),
                });
            }
        };
        let journal = Journal::open(&root.join(JOURNAL))?;
        let store = Self {
            root: root.to_path_buf(),
            journal: Some(journal),
            _lock: Some(lock),
        };
        store.migrate_legacy_records()?;
        Ok(store)
    }

    /// Moves the per-execution files of an older daemon into the journal.
    fn migrate_legacy_records(&self) -> Result<(), StateError> {
        let legacy: Vec<ExecutionRecord> = self.read_all(LEGACY_EXECUTIONS);
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        if legacy.is_empty() {
            return Ok(());
        }
        let mut last = 0;
        for rec in &legacy {
            last = journal.put(rec)?;
        }
        journal.sync(last)?;
        let dir = self.root.join(LEGACY_EXECUTIONS);
        let _ = fs::remove_dir_all(&dir);
        tracing::info!(
            count = legacy.len(),
            "moved execution records into the journal"
        );
        Ok(())
    }

    /// Opens the state dir for reading without taking the daemon lock (the reaper's view).
    pub fn open_readonly(root: &Path) -> Result<Self, StateError> {
        if !root.is_dir() {
            return Err(StateError::Io {
                path: root.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            journal: None,
            _lock: None,
        })
    }

    fn write_atomic(&self, path: &Path, value: &impl Serialize) -> Result<(), StateError> {
        self.write_atomic_opt(path, value, true)
    }

    fn write_atomic_opt(
        &self,
        path: &Path,
        value: &impl Serialize,
        durable: bool,
    ) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| StateError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        replace_file(path, &path.with_extension("json.tmp"), &bytes, durable)
    }

    fn read_all<T: for<'de> Deserialize<'de>>(&self, sub: &str) -> Vec<T> {
        let dir = self.root.join(sub);
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match fs::read(&p).map(|b| serde_json::from_slice::<T>(&b)) {
                Ok(Ok(v)) => out.push(v),
                Ok(Err(err)) => {
                    tracing::warn!(path = %p.display(), error = %err, "ignoring corrupt state record")
                }
                Err(err) => {
                    tracing::warn!(path = %p.display(), error = %err, "cannot read state record")
                }
            }
        }
        out
    }

    fn safe_name(id: &str) -> bool {
        !id.is_empty()
            && id.len() <= 128
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && !id.starts_with('.')
    }

    /// Saves an execution record durably (fsynced before returning).
    pub fn save_execution(&self, rec: &ExecutionRecord) -> Result<(), StateError> {
        let w = self.save_unsynced(rec)?;
        self.sync_execution(w)
    }

    /// Flushes a saved execution record (and every one written before it) to disk.
    pub fn sync_execution(&self, w: Written) -> Result<(), StateError> {
        match &self.journal {
            Some(j) => j.sync(w.0),
            None => Ok(()),
        }
    }

    /// Like [`sync_execution`](Self::sync_execution) for records that need not be durable at
    /// once (final records, whose result the waiters already have): waits up to
    /// [`GROUP_COMMIT_WINDOW`] so that records of executions ending together share one flush.
    /// Blocks: call it off the async workers.
    pub fn sync_execution_soon(&self, w: Written) -> Result<(), StateError> {
        match &self.journal {
            Some(j) => j.sync_grouped(w.0, GROUP_COMMIT_WINDOW),
            None => Ok(()),
        }
    }

    /// Saves an execution record without fsync: it survives a crash of the daemon process (the
    /// page cache does). Enough for a running execution, which a machine crash kills anyway; a
    /// final record is followed by [`sync_execution_soon`](Self::sync_execution_soon) off the
    /// latency path to survive a machine crash too.
    pub fn save_unsynced(&self, rec: &ExecutionRecord) -> Result<Written, StateError> {
        match &self.journal {
            Some(j) if Self::safe_name(&rec.id) => j.put(rec).map(Written),
            _ => Ok(Written(0)),
        }
    }

    /// Deletes an execution record.
    pub fn remove_execution(&self, id: &str) {
        if let Some(j) = &self.journal
            && let Err(e) = j.delete(id)
        {
            tracing::warn!(execution = %id, error = %e, "cannot remove an execution record");
        }
    }

    /// Every stored execution.
    pub fn load_executions(&self) -> Vec<ExecutionRecord> {
        match &self.journal {
            Some(j) => j.records(),
            None => {
                let mut out = journal::load(&self.root.join(JOURNAL)).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot read the execution journal");
                    Vec::new()
                });
                out.extend(self.read_all::<ExecutionRecord>(LEGACY_EXECUTIONS));
                out
            }
        }
    }

    /// Saves a session record.
    pub fn save_session(&self, rec: &SessionRecord) -> Result<(), StateError> {
        if !Self::safe_name(&rec.id) {
            return Ok(());
        }
        self.write_atomic(
            &self.root.join("sessions").join(format!("{}.json", rec.id)),
            rec,
        )
    }

    /// Deletes a session record.
    pub fn remove_session(&self, id: &str) {
        if Self::safe_name(id) {
            let path = self.root.join("sessions").join(format!("{id}.json"));
            // Left behind, the closed session would come back, pool and all, at the next start.
            if let Err(e) = fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(session = %id, path = %path.display(), error = %e, "cannot forget a closed session");
            }
        }
    }

    /// Every stored session.
    pub fn load_sessions(&self) -> Vec<SessionRecord> {
        self.read_all("sessions")
    }

    /// Whether `id` may be used as a file name (session and execution ids must be).
    pub fn valid_id(id: &str) -> bool {
        Self::safe_name(id)
    }
}

/// A record for tests: pid 42, started now, ended with `exit` when given.
#[cfg(test)]
pub(crate) fn test_record(id: &str, exit: Option<i32>) -> ExecutionRecord {
    ExecutionRecord {
        id: id.into(),
        session_id: "s".into(),
        language: "python".into(),
        client_ref: String::new(),
        pid: 42,
        pid_start_ticks: 7,
        started_at: Some(std::time::SystemTime::now()),
        ended_at: None,
        result: exit.map(|c| ResultRecord {
            exit_code: c,
            ..Default::default()
        }),
        cgroup: String::new(),
        daemon_pid: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        assert!(matches!(
            StateStore::open(dir.path()),
            Err(StateError::Locked(_))
        ));
        let rec = test_record("e1", Some(3));
        s.save_execution(&rec).unwrap();
        let back = s.load_executions();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].result.as_ref().unwrap().exit_code, 3);
        s.remove_execution("e1");
        assert!(s.load_executions().is_empty());
        drop(s);
        StateStore::open(dir.path()).unwrap();
    }

    #[test]
    fn an_older_daemons_record_files_move_into_the_journal_and_the_reaper_sees_them() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join(LEGACY_EXECUTIONS);
        fs::create_dir_all(&legacy).unwrap();
        let rec = test_record("old", None);
        fs::write(legacy.join("old.json"), serde_json::to_vec(&rec).unwrap()).unwrap();
        // A read-only view (the reaper) reads the old layout as it is.
        let ro = StateStore::open_readonly(dir.path()).unwrap();
        assert_eq!(ro.load_executions().len(), 1);
        let s = StateStore::open(dir.path()).unwrap();
        assert!(!legacy.exists(), "the old files are gone once journaled");
        let back = s.load_executions();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].id, "old");
        let mut running = back[0].clone();
        running.id = "new".into();
        s.save_unsynced(&running).unwrap();
        // The reaper reads the journal while the daemon holds it.
        let mut seen: Vec<String> = ro.load_executions().into_iter().map(|r| r.id).collect();
        seen.sort();
        assert_eq!(seen, vec!["new".to_string(), "old".to_string()]);
    }

    #[test]
    fn unsafe_ids_rejected() {
        assert!(!StateStore::valid_id("../x"));
        assert!(!StateStore::valid_id(""));
        assert!(!StateStore::valid_id("a/b"));
        assert!(StateStore::valid_id("nomad-1234_abc.1"));
    }
}
