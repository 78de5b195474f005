//! The execution journal: one append-only file of JSON lines, `{"put":{record}}` or
//! `{"del":"id"}`, where the last line about an id wins.
//!
//! It replaces one file per execution record. Creating, renaming and deleting an inode for
//! every start and exit cost about a third of the daemon's CPU on ext4 (inode allocation scans
//! past recently deleted inodes, so the cost grows with the churn); an append is one `write`.
//! The file is rewritten with only the live records once dead lines dominate it, on a thread of
//! its own that holds the lock only for the final swap (the append that sets it off takes the
//! snapshot); syncs wait for a rewrite to end.
//!
//! Crash safety: a line is written with a single `write` on an `O_APPEND` file, so a daemon
//! crash leaves at most one torn last line, which loading ignores and a writable open cuts off.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::state::{ExecutionRecord, StateError, io, write_new};

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
    /// While a compaction writes the new file outside the lock: the lines appended since its
    /// snapshot, which it adds before the rename.
    compacting: Option<Vec<u8>>,
    /// Renames of a compacted file over the journal, and how many of them a directory fsync
    /// made durable: until then a crash may bring back the old file, so a sync covers both.
    renames: u64,
    renames_synced: u64,
    /// After a failed compaction, the line count the next attempt waits for (no retry per
    /// append while the disk refuses).
    compact_after: usize,
}

/// What a sync captured under the lock, to flush outside it.
struct Flush {
    file: File,
    seq: u64,
    /// The renames done so far when one of them is not yet durable: the directory needs an
    /// fsync too.
    dir_renames: Option<u64>,
}

/// The writable journal of a daemon (which holds the state dir's lock).
pub struct Journal {
    shared: Arc<Shared>,
}

/// What the journal's users and its compaction thread share.
struct Shared {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// Signalled when a compaction ends (syncs wait for it: see [`Shared::settled`]).
    compacted: Condvar,
    /// Tests: a compaction thread waits for this before writing its snapshot.
    #[cfg(test)]
    hold_compaction: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

/// Appends `line` whole or not at all. A disk that fills up mid-line (ENOSPC, EDQUOT) takes
/// part of it: the part is cut off again, or the next line would be glued onto it, and a reload
/// would skip both as one corrupt line.
fn append_whole(file: &mut File, line: &[u8]) -> std::io::Result<()> {
    let mut written = 0;
    while written < line.len() {
        let failed = match file.write(&line[written..]) {
            Ok(0) => std::io::Error::from(std::io::ErrorKind::WriteZero),
            Ok(n) => {
                written += n;
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => e,
        };
        if written > 0 {
            // Under the journal's lock nobody else appends: the file ends with our part.
            let len = file.metadata()?.len();
            file.set_len(len.saturating_sub(written as u64))?;
        }
        return Err(failed);
    }
    Ok(())
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
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                inner: Mutex::new(Inner {
                    file,
                    live: r.live,
                    lines: r.lines,
                    appended: 0,
                    synced: 0,
                    gathering: false,
                    compacting: None,
                    renames: 0,
                    renames_synced: 0,
                    compact_after: 0,
                }),
                compacted: Condvar::new(),
                #[cfg(test)]
                hold_compaction: Mutex::new(None),
            }),
        })
    }

    /// Records `rec` (replacing any earlier record of its id); durable once [`sync`](Self::sync)
    /// returns.
    pub fn put(&self, rec: &ExecutionRecord) -> Result<u64, StateError> {
        self.shared.append(&Entry::Put(rec))
    }

    /// Forgets the record of `id`.
    pub fn delete(&self, id: &str) -> Result<(), StateError> {
        self.shared.append(&Entry::Del(id)).map(|_| ())
    }

    /// Makes everything up to append number `upto` durable; one fdatasync covers every append
    /// before it, so concurrent callers mostly find their line already synced.
    pub fn sync(&self, upto: u64) -> Result<(), StateError> {
        let sh = &self.shared;
        let f = {
            let g = sh.settled();
            if g.synced >= upto {
                return Ok(());
            }
            sh.capture(&g)?
        };
        sh.flush(f)
    }

    /// Like [`Self::sync`], but first waits `window` so that lines appended meanwhile share
    /// the one fdatasync (group commit): executions ending together cost the disk one flush,
    /// not one each. A caller arriving while another waits returns at once, its line covered
    /// by that one's flush (which reports its own failure). Blocks for `window`: call it off
    /// the async workers.
    pub fn sync_grouped(&self, upto: u64, window: std::time::Duration) -> Result<(), StateError> {
        let sh = &self.shared;
        {
            let mut g = sh.lock();
            if g.synced >= upto || g.gathering {
                return Ok(());
            }
            g.gathering = true;
        }
        std::thread::sleep(window);
        let f = {
            let mut g = sh.settled();
            g.gathering = false;
            sh.capture(&g)?
        };
        sh.flush(f)
    }

    /// Every live record.
    pub fn records(&self) -> Vec<ExecutionRecord> {
        records_of(&self.shared.lock().live)
    }

    /// Lines in the file once no compaction is under way (tests: compaction).
    #[cfg(test)]
    fn lines(&self) -> usize {
        self.shared.settled().lines
    }

    #[cfg(test)]
    fn synced_and_gathering(&self) -> (u64, bool) {
        let g = self.shared.lock();
        (g.synced, g.gathering)
    }
}

impl Drop for Journal {
    /// Lets a compaction under way finish its swap: whoever opens the file next finds either
    /// the old file or the new one whole, never a rename still to come.
    fn drop(&mut self) {
        drop(self.shared.settled());
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock, once no compaction is under way. A sync must not flush the old file while a
    /// compaction runs: the new file it renames over it may hold the synced lines unflushed.
    fn settled(&self) -> MutexGuard<'_, Inner> {
        let mut g = self.lock();
        while g.compacting.is_some() {
            g = self.compacted.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g
    }

    /// Captures what a flush covering every line appended so far needs.
    fn capture(&self, g: &Inner) -> Result<Flush, StateError> {
        Ok(Flush {
            file: g.file.try_clone().map_err(io(&self.path))?,
            seq: g.appended,
            dir_renames: (g.renames > g.renames_synced).then_some(g.renames),
        })
    }

    /// Flushes what [`Self::capture`] took, outside the lock: appends need not wait for the
    /// disk. A rename not yet durable is made so too, or a crash could bring back the old file
    /// without the lines this flush reports durable.
    fn flush(&self, f: Flush) -> Result<(), StateError> {
        f.file.sync_data().map_err(io(&self.path))?;
        if f.dir_renames.is_some() {
            self.sync_dir()?;
        }
        let mut g = self.lock();
        g.synced = g.synced.max(f.seq);
        if let Some(renames) = f.dir_renames {
            g.renames_synced = g.renames_synced.max(renames);
        }
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), StateError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
    }

    fn append(self: &Arc<Self>, entry: &Entry<&ExecutionRecord, &str>) -> Result<u64, StateError> {
        let mut line = serde_json::to_vec(entry).map_err(|e| StateError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let mut g = self.lock();
        append_whole(&mut g.file, &line).map_err(io(&self.path))?;
        if let Some(tail) = &mut g.compacting {
            tail.extend_from_slice(&line);
        }
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
        let seq = g.appended;
        if g.compacting.is_none()
            && g.lines > (2 * g.live.len() + COMPACT_SLACK).max(g.compact_after)
        {
            // The line is in the journal either way: the rewrite runs on a thread of its own.
            self.start_compaction(g);
        }
        Ok(seq)
    }

    /// Rewrites the file with only the live records, on a thread of its own, so the append
    /// that asks for it (inline on an async worker) does not wait for the disk. The snapshot
    /// of the live records is taken here, under the lock; [`Self::compact`] writes it.
    fn start_compaction(self: &Arc<Self>, mut g: MutexGuard<'_, Inner>) {
        let mut snapshot = Vec::new();
        for line in g.live.values() {
            snapshot.extend_from_slice(line);
            snapshot.push(b'\n');
        }
        let snapshot_lines = g.live.len();
        g.compacting = Some(Vec::new());
        drop(g);
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("journal-compact".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| me.compact(&snapshot, snapshot_lines));
                match std::panic::catch_unwind(run) {
                    Ok(Ok(())) => {}
                    // Tried again once more dead lines pile up.
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot compact the execution journal"),
                    Err(_) => {
                        me.abandon_compaction();
                        tracing::error!("compacting the execution journal panicked; the journal goes on uncompacted");
                    }
                }
            });
        if let Err(e) = spawned {
            self.abandon_compaction();
            tracing::warn!(error = %e, "cannot start compacting the execution journal");
        }
    }

    /// Ends a compaction that will not swap files (it could not start, or it panicked), so
    /// that syncs stop waiting for it; the next attempt waits for more lines.
    fn abandon_compaction(&self) {
        let mut g = self.lock();
        if g.compacting.take().is_some() {
            g.compact_after = g.lines + COMPACT_SLACK;
        }
        drop(g);
        self.compacted.notify_all();
    }

    /// Writes and flushes `snapshot` as the new file outside the lock, so appends go on
    /// meanwhile; the lines they add are appended to the new file under the lock just before
    /// it is renamed over the old one. Syncs wait for the end (see [`Self::settled`]).
    fn compact(&self, snapshot: &[u8], snapshot_lines: usize) -> Result<(), StateError> {
        #[cfg(test)]
        if let Some(hold) = self
            .hold_compaction
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = hold.recv();
        }
        let tmp = self.path.with_extension("compact");
        let written = write_new(&tmp, snapshot, true);
        let mut g = self.lock();
        let tail = g.compacting.take().unwrap_or_default();
        let swapped = written.and_then(|mut f| {
            // Lines appended meanwhile: none was reported durable (syncs waited), so the page
            // cache is enough until the next sync.
            f.write_all(&tail).map_err(io(&tmp))?;
            fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
            open_append(&self.path)
        });
        let outcome = match swapped {
            Ok(file) => {
                g.file = file;
                g.lines = snapshot_lines + tail.iter().filter(|&&b| b == b'\n').count();
                g.renames += 1;
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                g.compact_after = g.lines + COMPACT_SLACK;
                Err(e)
            }
        };
        let renames = g.renames;
        drop(g);
        self.compacted.notify_all();
        outcome?;
        // The rename durable, off the lock (a sync before this does it itself).
        self.sync_dir()?;
        let mut g = self.lock();
        g.renames_synced = g.renames_synced.max(renames);
        Ok(())
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

    /// Compaction writes its snapshot outside the lock: appends and syncs from other threads
    /// go on meanwhile, and every line they add is in the file that replaces the old one.
    #[test]
    fn appends_and_syncs_during_compactions_all_survive_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("executions.journal");
        let j = std::sync::Arc::new(Journal::open(&path).unwrap());
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let j = j.clone();
                std::thread::spawn(move || {
                    for i in 0..600 {
                        let id = format!("w{w}-{i}");
                        j.put(&rec(&id, None)).unwrap();
                        let last = j.put(&rec(&id, Some(w))).unwrap();
                        if i % 3 == 0 {
                            // Kept, and made durable (waits out a compaction under way).
                            j.sync(last).unwrap();
                            let (synced, _) = j.synced_and_gathering();
                            assert!(synced >= last, "synced {synced} < {last}");
                        } else {
                            j.delete(&id).unwrap();
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let mut want: Vec<(String, Option<i32>)> = (0..4)
            .flat_map(|w| {
                (0..600)
                    .step_by(3)
                    .map(move |i| (format!("w{w}-{i}"), Some(w)))
            })
            .collect();
        want.sort();
        assert_eq!(ids(j.records()), want);
        // 7,200 lines were appended; compactions kept the file near its live records.
        assert!(
            j.lines() <= 2 * want.len() + COMPACT_SLACK,
            "{} lines",
            j.lines()
        );
        let on_disk = fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(on_disk, j.lines());
        assert!(!path.with_extension("compact").exists());
        drop(j);
        assert_eq!(ids(load(&path).unwrap()), want);
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

    /// A line the disk has room for only part of is refused whole: the part is cut off, so
    /// the lines before it and the lines appended once there is room again all load. Needs a
    /// small filesystem to fill: a tmpfs of 16 KiB (root; skipped where mounting is refused).
    #[test]
    fn a_line_the_disk_has_no_room_for_leaves_no_part_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mounted = nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=16k"),
        );
        if let Err(e) = mounted {
            eprintln!("cannot mount a small tmpfs here ({e}): skipped");
            return;
        }
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _unmount = Unmount(dir.path());
        let path = dir.path().join("executions.journal");
        let j = Journal::open(&path).unwrap();
        // Most of the space, so that a line soon finds only part of one left.
        std::fs::write(dir.path().join("filler"), vec![0u8; 12 * 1024]).unwrap();
        let mut kept = Vec::new();
        let refused = (0..100).find(|i| {
            let id = format!("e{i:03}-{}", "x".repeat(200));
            match j.put(&rec(&id, Some(0))) {
                Ok(_) => {
                    kept.push((id, Some(0)));
                    false
                }
                Err(_) => true,
            }
        });
        assert!(refused.is_some(), "the disk never filled");
        let text = std::fs::read(&path).unwrap();
        assert_eq!(text.last(), Some(&b'\n'), "a part of a line was left");
        std::fs::remove_file(dir.path().join("filler")).unwrap();
        j.put(&rec("after", Some(1))).unwrap();
        drop(j);
        kept.push(("after".into(), Some(1)));
        kept.sort();
        let mut loaded = ids(load(&path).unwrap());
        loaded.sort();
        assert_eq!(loaded, kept);
    }

    /// The append that sets off a compaction returns before the compaction touches the disk,
    /// and appends go on while it runs: none of them waits for its write and fsyncs.
    #[test]
    fn appends_do_not_wait_for_a_compaction_they_set_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("executions.journal");
        let j = Journal::open(&path).unwrap();
        let (release, hold) = std::sync::mpsc::channel();
        *j.shared.hold_compaction.lock().unwrap() = Some(hold);
        j.put(&rec("keep", Some(5))).unwrap();
        let (done_tx, done) = std::sync::mpsc::channel();
        let appender = std::thread::spawn(move || {
            // Enough dead lines to set off a compaction, and more after it started.
            for i in 0..(COMPACT_SLACK + 200) {
                let id = format!("e{i}");
                j.put(&rec(&id, Some(0))).unwrap();
                j.delete(&id).unwrap();
            }
            j.put(&rec("late", Some(7))).unwrap();
            done_tx.send(()).unwrap();
            j
        });
        // Every append returned while the compaction is held before its first write.
        done.recv_timeout(std::time::Duration::from_secs(30))
            .expect("an append waited for the compaction");
        let j = appender.join().unwrap();
        assert!(
            j.shared.lock().compacting.is_some(),
            "no compaction was set off"
        );
        release.send(()).unwrap();
        // Once it ends, the file holds its snapshot and every line appended meanwhile.
        let appended = 2 * (COMPACT_SLACK + 200) + 2;
        let after = j.lines();
        assert!(after < appended, "{after} lines of {appended}");
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), after);
        // The dead ones among those go with the next compaction, which the next append sets
        // off (nothing holds it now).
        j.put(&rec("last", Some(8))).unwrap();
        assert_eq!(j.lines(), 3);
        let want = vec![
            ("keep".into(), Some(5)),
            ("last".into(), Some(8)),
            ("late".into(), Some(7)),
        ];
        assert_eq!(ids(j.records()), want);
        drop(j);
        assert_eq!(ids(load(&path).unwrap()), want);
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
        // A compaction keeps the lines appended while it ran: on a loaded machine, thousands.
        // The appends that follow one set off the next, as the loop's did.
        for i in 0..10 {
            if j.lines() <= 2 + COMPACT_SLACK {
                break;
            }
            let id = format!("after{i}");
            j.put(&rec(&id, None)).unwrap();
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
