//! The execution journal: one append-only file of JSON lines, `{"put":{record}}` or
//! `{"del":"id"}`, where the last line about an id wins.
//!
//! It replaces one file per execution record. Creating, renaming and deleting an inode for
//! every start and exit cost about a third of the daemon's CPU on ext4 (inode allocation scans
//! past recently deleted inodes, so the cost grows with the churn); an append is one `write`.
//! The file is rewritten with only the live records once dead lines dominate it.
//!
//! Crash safety: a line is written with a single `write` on an `O_APPEND` file, so a daemon
//! crash leaves at most one torn last line, which loading ignores and a writable open cuts off.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::state::{ExecutionRecord, StateError, io, replace_file};

/// Dead lines tolerated beyond this many (plus twice the live ones) before a rewrite.
const COMPACT_SLACK: usize = 1024;

/// One line: owned when read back, borrowed when written (no copy of the record per append).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Entry<R = ExecutionRecord, S = String> {
    Put(R),
    Del(S),
}

/// What a journal file holds: the live records (as their last line) and how many lines it has.
struct Replayed {
    live: HashMap<String, Vec<u8>>,
    lines: usize,
    /// Length of the file up to its last complete line.
    complete_len: u64,
}

fn replay(path: &Path) -> Result<Replayed, StateError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(path)(e)),
    };
    let complete_len = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete_len < bytes.len() {
        tracing::warn!(path = %path.display(), bytes = bytes.len() - complete_len, "ignoring a torn last journal line");
    }
    let mut live = HashMap::new();
    let mut lines = 0;
    for line in bytes[..complete_len].split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        lines += 1;
        match serde_json::from_slice::<Entry>(line) {
            Ok(Entry::Put(rec)) => {
                live.insert(rec.id, line.to_vec());
            }
            Ok(Entry::Del(id)) => {
                live.remove(&id);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring a corrupt journal line");
            }
        }
    }
    Ok(Replayed {
        live,
        lines,
        complete_len: complete_len as u64,
    })
}

/// Every live record in the journal at `path` (none when it does not exist).
pub fn load(path: &Path) -> Result<Vec<ExecutionRecord>, StateError> {
    Ok(records_of(&replay(path)?.live))
}

/// The records of live `put` lines.
fn records_of(live: &HashMap<String, Vec<u8>>) -> Vec<ExecutionRecord> {
    live.values()
        .filter_map(|line| match serde_json::from_slice::<Entry>(line) {
            Ok(Entry::Put(rec)) => Some(rec),
            _ => None,
        })
        .collect()
}

struct Inner {
    file: File,
    live: HashMap<String, Vec<u8>>,
    lines: usize,
    /// Lines appended so far (a sequence number) and the last one known to be on disk.
    appended: u64,
    synced: u64,
    /// A [`Journal::sync_grouped`] caller is waiting out its window; its fdatasync will cover
    /// every line appended until it wakes.
    gathering: bool,
}

/// The writable journal of a daemon (which holds the state dir's lock).
pub struct Journal {
    path: PathBuf,
    inner: Mutex<Inner>,
}

fn open_append(path: &Path) -> Result<File, StateError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))
}

impl Journal {
    /// Opens (creating) the journal at `path`, cutting off a torn last line.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let r = replay(path)?;
        let file = open_append(path)?;
        let len = file.metadata().map_err(io(path))?.len();
        if len > r.complete_len {
            file.set_len(r.complete_len).map_err(io(path))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            inner: Mutex::new(Inner {
                file,
                live: r.live,
                lines: r.lines,
                appended: 0,
                synced: 0,
                gathering: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append(&self, entry: &Entry<&ExecutionRecord, &str>) -> Result<u64, StateError> {
        let mut line = serde_json::to_vec(entry).map_err(|e| StateError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let mut g = self.lock();
        g.file.write_all(&line).map_err(io(&self.path))?;
        g.lines += 1;
        g.appended += 1;
        match entry {
            Entry::Put(rec) => {
                line.pop();
                g.live.insert(rec.id.clone(), line);
            }
            Entry::Del(id) => {
                g.live.remove(*id);
            }
        }
        if g.lines > 2 * g.live.len() + COMPACT_SLACK {
            self.compact(&mut g)?;
        }
        Ok(g.appended)
    }

    /// Records `rec` (replacing any earlier record of its id); durable once [`sync`](Self::sync)
    /// returns.
    pub fn put(&self, rec: &ExecutionRecord) -> Result<u64, StateError> {
        self.append(&Entry::Put(rec))
    }

    /// Forgets the record of `id`.
    pub fn delete(&self, id: &str) -> Result<(), StateError> {
        self.append(&Entry::Del(id)).map(|_| ())
    }

    /// Makes everything up to append number `upto` durable; one fdatasync covers every append
    /// before it, so concurrent callers mostly find their line already synced.
    pub fn sync(&self, upto: u64) -> Result<(), StateError> {
        let (file, seq) = {
            let g = self.lock();
            if g.synced >= upto {
                return Ok(());
            }
            (g.file.try_clone().map_err(io(&self.path))?, g.appended)
        };
        // Outside the lock: appends need not wait for the disk.
        file.sync_data().map_err(io(&self.path))?;
        let mut g = self.lock();
        g.synced = g.synced.max(seq);
        Ok(())
    }

    /// Like [`Self::sync`], but first waits `window` so that lines appended meanwhile share
    /// the one fdatasync (group commit): executions ending together cost the disk one flush,
    /// not one each. A caller arriving while another waits returns at once, its line covered
    /// by that one's flush (which reports its own failure). Blocks for `window`: call it off
    /// the async workers.
    pub fn sync_grouped(&self, upto: u64, window: std::time::Duration) -> Result<(), StateError> {
        {
            let mut g = self.lock();
            if g.synced >= upto || g.gathering {
                return Ok(());
            }
            g.gathering = true;
        }
        std::thread::sleep(window);
        let (file, seq) = {
            let mut g = self.lock();
            g.gathering = false;
            (g.file.try_clone().map_err(io(&self.path))?, g.appended)
        };
        file.sync_data().map_err(io(&self.path))?;
        let mut g = self.lock();
        g.synced = g.synced.max(seq);
        Ok(())
    }

    /// Every live record.
    pub fn records(&self) -> Vec<ExecutionRecord> {
        records_of(&self.lock().live)
    }

    /// Rewrites the file with only the live records (write, fsync, rename over the old one).
    fn compact(&self, g: &mut Inner) -> Result<(), StateError> {
        let mut out = Vec::new();
        for line in g.live.values() {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        replace_file(&self.path, &self.path.with_extension("compact"), &out, true)?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        g.file = open_append(&self.path)?;
        g.lines = g.live.len();
        // Everything live is on disk now.
        g.synced = g.appended;
        Ok(())
    }

    /// Lines in the file (tests: compaction).
    #[cfg(test)]
    fn lines(&self) -> usize {
        self.lock().lines
    }

    #[cfg(test)]
    fn synced_and_gathering(&self) -> (u64, bool) {
        let g = self.lock();
        (g.synced, g.gathering)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::state::test_record as rec;

    fn ids(mut v: Vec<ExecutionRecord>) -> Vec<(String, Option<i32>)> {
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v.into_iter()
            .map(|r| (r.id, r.result.map(|x| x.exit_code)))
            .collect()
    }

    #[test]
    fn the_last_line_about_an_id_wins_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("executions.journal");
        let j = Journal::open(&path).unwrap();
        j.put(&rec("a", None)).unwrap();
        j.put(&rec("b", None)).unwrap();
        let n = j.put(&rec("a", Some(3))).unwrap();
        j.sync(n).unwrap();
        j.delete("b").unwrap();
        assert_eq!(ids(j.records()), vec![("a".into(), Some(3))]);
        drop(j);
        assert_eq!(ids(load(&path).unwrap()), vec![("a".into(), Some(3))]);
        let j = Journal::open(&path).unwrap();
        assert_eq!(ids(j.records()), vec![("a".into(), Some(3))]);
    }

    #[test]
    fn lines_appended_within_a_grouped_sync_window_share_its_flush() {
        let dir = tempfile::tempdir().unwrap();
        let j = std::sync::Arc::new(Journal::open(&dir.path().join("executions.journal")).unwrap());
        let first = j.put(&rec("a", Some(0))).unwrap();
        let leader = {
            let j = j.clone();
            std::thread::spawn(move || j.sync_grouped(first, std::time::Duration::from_millis(500)))
        };
        while !j.synced_and_gathering().1 {
            std::thread::yield_now();
        }
        let second = j.put(&rec("b", Some(1))).unwrap();
        // A caller during the window leaves its line to the waiting one: it returns while that
        // one still gathers, with nothing flushed yet.
        j.sync_grouped(second, std::time::Duration::from_millis(500))
            .unwrap();
        assert_eq!(j.synced_and_gathering(), (0, true));
        leader.join().unwrap().unwrap();
        // The one flush covered both lines.
        assert_eq!(j.synced_and_gathering(), (second, false));
        // Nothing pending: a later call returns at once.
        j.sync_grouped(second, std::time::Duration::from_secs(3600))
            .unwrap();
    }

    #[test]
    fn a_torn_or_corrupt_line_is_skipped_and_a_torn_tail_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("executions.journal");
        let j = Journal::open(&path).unwrap();
        j.put(&rec("a", Some(0))).unwrap();
        drop(j);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"not json\n{\"put\":{\"id\":\"b\",\"sess")
            .unwrap();
        drop(f);
        assert_eq!(ids(load(&path).unwrap()), vec![("a".into(), Some(0))]);
        let j = Journal::open(&path).unwrap();
        j.put(&rec("c", Some(1))).unwrap();
        drop(j);
        // The new line did not get glued onto the torn one.
        assert_eq!(
            ids(load(&path).unwrap()),
            vec![("a".into(), Some(0)), ("c".into(), Some(1))]
        );
    }

    #[test]
    fn dead_lines_are_compacted_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("executions.journal");
        let j = Journal::open(&path).unwrap();
        j.put(&rec("keep", Some(5))).unwrap();
        for i in 0..3000 {
            let id = format!("e{i}");
            j.put(&rec(&id, None)).unwrap();
            j.put(&rec(&id, Some(0))).unwrap();
            j.delete(&id).unwrap();
        }
        assert!(j.lines() <= 2 + COMPACT_SLACK, "{} lines", j.lines());
        let on_disk = fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(on_disk, j.lines());
        assert!(!path.with_extension("compact").exists());
        drop(j);
        assert_eq!(ids(load(&path).unwrap()), vec![("keep".into(), Some(5))]);
    }
}
