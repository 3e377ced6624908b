//! Compaction: the live records copied into a fresh generation, which then replaces the old
//! one, so that the space a drained backlog took goes back to the file system (sled 0.34 only
//! ever cuts its log file at its end). The steps, their order and why a crash at any of them
//! is safe are under "Compaction" on [`SledStore`](super::SledStore); the layout they move
//! between is in `layout.rs`.
//!
//! # Invariants
//! - No apply and no flush runs while a compaction copies or switches: it holds the flush and
//!   apply locks from its first flush until the new generation is in use, so the copy is every
//!   record applied, and the new generation's commit counter and commit file equal the old
//!   one's.
//! - `CURRENT` is written only after the copy, its commit file and both directories are on
//!   stable storage.
//! - A compaction that fails before the rename of `CURRENT` leaves the store as it was, not
//!   poisoned, and removes its copy (or leaves it for the next open to remove).
//! - The old generation is removed only after its sled closed and let go of its files, and
//!   only if the switch is on stable storage.
//! - Every attempt takes a new generation number, so a copy whose sled could not be closed
//!   (it hangs after a write failure) is never reused.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::live::{LiveData, Tally};
use super::{
    CLOSE_WAIT, CLOSE_WAIT_POISONED, CommitFile, DurableFiles, Generation, GenerationId, SledInner,
    catch_sled_panic, close_on_thread, collect_sled_garbage, corrupt_store, layout, open_sled,
    panic_text, sync_file, wait_until_unlocked,
};
use crate::store::{CompactStats, CompactionDue, StoreError};

/// Below this size on disk no compaction is due, whatever the live data: there is too little
/// to give back for the pause. Above what sled settles at under a steady stream over a small
/// backlog (3-4 MiB with 1,000 messages queued, `benches/durable.rs`), so such a store never
/// compacts, and small next to the backlogs that leave real waste behind (a drained backlog of
/// 1,000,000 64-byte messages leaves ~190-300 MiB).
pub const COMPACT_FLOOR_BYTES: u64 = 8 << 20;

/// A compaction is due when the size on disk is over this many times the live records'
/// encoded bytes (and over [`COMPACT_FLOOR_BYTES`]). A freshly compacted generation takes
/// ~2-3 times them (measured with 64-byte messages, 1,000 to 1,000,000 of them), so a
/// compaction never makes another one due by itself; sled's own reuse keeps a store that
/// writes steadily over a large backlog at ~3-5 times (60 MiB over 100,000 messages), which a
/// compaction would only bring to ~2.5 times for a copy of the whole backlog.
pub const COMPACT_LIVE_RATIO: u64 = 4;

/// Records per batch the copy writes at most.
const COPY_BATCH_KEYS: usize = 4096;
/// Bytes (keys and values) per batch the copy writes at most.
const COPY_BATCH_BYTES: usize = 8 << 20;
/// What copying one record costs, roughly, for [`CompactionDue::pause_estimate`]: sled wrote
/// 100,000-200,000 small records a second on the development machine.
const COPY_NANOS_PER_RECORD: u64 = 10_000;
/// What copying one byte costs, roughly (large values).
const COPY_BYTES_PER_SECOND: u64 = 128 << 20;

/// What compactions share: the next generation number to try.
#[derive(Debug)]
pub(super) struct CompactionState {
    next: GenerationId,
}

impl CompactionState {
    /// `next` is above every generation in the directory.
    pub(super) fn new(next: GenerationId) -> Self {
        Self { next }
    }

    fn take_next(&mut self) -> GenerationId {
        let id = self.next;
        self.next = GenerationId(id.0 + 1);
        id
    }
}

impl SledInner {
    /// See [`Store::compaction_due`](crate::store::Store::compaction_due).
    pub(super) fn compaction_due(&self) -> Result<Option<CompactionDue>, StoreError> {
        self.poison.check()?;
        let Some(live) = self.apply_lock.lock().live.total() else {
            return Ok(None);
        };
        let size = self.size_on_disk()?;
        let due = size > COMPACT_FLOOR_BYTES && size / COMPACT_LIVE_RATIO > live.bytes;
        Ok(due.then(|| CompactionDue {
            size_on_disk_bytes: size,
            live_records: live.records,
            live_bytes: live.bytes,
            pause_estimate: pause_estimate(live),
        }))
    }

    /// See "Compaction" on [`SledStore`](super::SledStore).
    pub(super) fn compact(&self) -> Result<CompactStats, StoreError> {
        self.poison.check()?;
        let mut state = self.compaction.lock();
        let started = Instant::now();
        let mut sync = self.flush_lock.lock();
        let mut commits = self.apply_lock.lock();
        let old = self.active.read();
        // Everything applied on stable storage in the old generation, and its counter in its
        // commit file: what the copy starts from, and what a crash before the switch keeps.
        let counter = self.write_commit(&old.db, &mut commits)?;
        old.flush(&self.poison)?;
        self.record_commit(&old.commit_file, &mut sync, counter, true)?;
        let size_before_bytes = old
            .db
            .size_on_disk()
            .map_err(|e| self.poison.fail(format!("size on disk: {e}")))?;
        let id = state.take_next();
        let last_commit = commits.next - 1;
        let (new, live) = self.build(&old, id, last_commit)?;
        let copied = live.total().expect("a full read knows what it read");
        // The commit point.
        let (renamed, committed) = layout::write_current(&self.path, id);
        if !renamed {
            let e = committed.expect_err("a rename that did not happen failed");
            abandon(new.dir.clone(), Some(new));
            return Err(StoreError::Compaction(format!(
                "cannot write {} in {}: {e}",
                layout::CURRENT,
                self.path.display()
            )));
        }
        drop(old);
        let old = std::mem::replace(&mut *self.active.write(), new);
        let writes = commits.live.writes();
        commits.live.replace(live, writes);
        // The new commit file holds the last counter, synced.
        sync.synced_at = Instant::now();
        sync.pending = false;
        let size_after_bytes = self.active.read().db.size_on_disk();
        drop(commits);
        drop(sync);
        let pause = started.elapsed();
        if let Err(e) = committed {
            // After a crash either generation may be the active one; both are complete and hold
            // the same records. Keep both: the next open removes the one CURRENT does not name.
            let failure = self.poison.fail(format!(
                "fsync {} after renaming {}: {e}",
                self.path.display(),
                layout::CURRENT
            ));
            let _ = close_on_thread(move || old.close_now(), CLOSE_WAIT);
            return Err(failure);
        }
        let size_after_bytes =
            size_after_bytes.map_err(|e| self.poison.fail(format!("size on disk: {e}")))?;
        self.retire(old);
        drop(state);
        Ok(CompactStats {
            generation: id.0,
            records: copied.records,
            live_bytes: copied.bytes,
            size_before_bytes,
            size_after_bytes,
            pause,
            took: started.elapsed(),
        })
    }

    /// Writes generation `id`: every record of `old`, then its commit file holding `counter`,
    /// all synced with both directories. On failure nothing of it is left (or it is left for
    /// the next open to remove) and the error says which side failed: reading `old` (a storage
    /// failure of the store, or its corruption) or writing the copy
    /// ([`StoreError::Compaction`]).
    fn build(
        &self,
        old: &Generation,
        id: GenerationId,
        counter: u64,
    ) -> Result<(Generation, LiveData), StoreError> {
        let dir = id.dir(&self.path);
        let failed = |doing: &str, e: &dyn std::fmt::Display| {
            StoreError::Compaction(format!("cannot {doing} {}: {e}", dir.display()))
        };
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(failed("remove an earlier copy at", &e));
            }
            _ => {}
        }
        std::fs::create_dir(&dir).map_err(|e| failed("create", &e))?;
        let db = match open_sled(&dir, self.options) {
            Ok(db) => db,
            Err(e) => {
                abandon_dir(&dir, None);
                return Err(failed("open sled in", &e));
            }
        };
        let finished = self.copy(old, &db, &dir).and_then(|live| {
            db.flush().map_err(|e| failed("flush", &e))?;
            let commit_file = CommitFile::create(&dir, counter)
                .map_err(|e| failed("create the commit file in", &e))?;
            let files = DurableFiles::open(&dir)
                .and_then(|files| files.sync_all_known().map(|()| files))
                .map_err(|e| failed("sync", &e))?;
            // The generation's entry in the store directory.
            sync_file(&self.path).map_err(|e| failed("sync the store directory of", &e))?;
            Ok((live, commit_file, files))
        });
        match finished {
            Ok((live, commit_file, files)) => Ok((
                Generation {
                    id,
                    dir,
                    db,
                    files,
                    commit_file,
                },
                live,
            )),
            Err(e) => {
                abandon_dir(&dir, Some(db));
                Err(e)
            }
        }
    }

    /// Copies every record of `from` into `to` (in directory `dir`), in batches; returns what
    /// it copied.
    fn copy(&self, from: &Generation, to: &::sled::Db, dir: &Path) -> Result<LiveData, StoreError> {
        let mut live = LiveData::scanning();
        let mut batch = ::sled::Batch::default();
        let (mut keys, mut bytes) = (0usize, 0usize);
        let mut records = from.db.iter();
        loop {
            let next = catch_sled_panic(&from.dir, "reading its log", || records.next())?;
            let Some(record) = next else { break };
            let (key, value) = record.map_err(|e| match e {
                e @ ::sled::Error::Corruption { .. } => {
                    corrupt_store(&from.dir, format!("sled found its log corrupt: {e}"))
                }
                other => self.poison.fail(format!("read: {other}")),
            })?;
            live.count(&key, value.len());
            keys += 1;
            bytes += key.len() + value.len();
            batch.insert(key, value);
            if keys >= COPY_BATCH_KEYS || bytes >= COPY_BATCH_BYTES {
                write_copy(to, std::mem::take(&mut batch), keys, dir)?;
                (keys, bytes) = (0, 0);
            }
        }
        write_copy(to, batch, keys, dir)?;
        Ok(live)
    }

    /// Closes the generation a compaction switched away from and removes it; if it cannot be
    /// closed in time it stays, and the next open removes it.
    fn retire(&self, old: Generation) {
        let (id, log) = (old.id, old.dir.join("db"));
        if !close_on_thread(move || old.close_now(), CLOSE_WAIT) || !wait_until_unlocked(&log) {
            tracing::warn!(
                path = %self.path.display(),
                generation = id.0,
                "the old generation did not close in time; the next open removes it"
            );
            return;
        }
        if let Err(e) = layout::remove_generation(&self.path, id) {
            tracing::warn!(
                path = %self.path.display(),
                generation = id.0,
                "cannot remove the old generation ({e}); the next open removes it"
            );
        }
    }
}

/// Writes one batch of the copy.
fn write_copy(
    to: &::sled::Db,
    batch: ::sled::Batch,
    keys: usize,
    dir: &Path,
) -> Result<(), StoreError> {
    if keys == 0 {
        return Ok(());
    }
    let written = catch_unwind(AssertUnwindSafe(|| to.apply_batch(batch))).map_err(|panic| {
        StoreError::Compaction(format!(
            "sled panicked writing the copy in {}: {}",
            dir.display(),
            panic_text(&*panic)
        ))
    })?;
    written.map_err(|e| {
        StoreError::Compaction(format!("cannot write the copy in {}: {e}", dir.display()))
    })?;
    collect_sled_garbage(keys);
    Ok(())
}

/// Removes a generation that will not be used (see [`abandon_dir`]).
fn abandon(dir: PathBuf, generation: Option<Generation>) {
    let db = generation.map(|generation| {
        let Generation { db, .. } = generation;
        db
    });
    abandon_dir(&dir, db);
}

/// Closes a copy's sled (bounded: after a write failure sled may never finish closing) and
/// removes its directory. What cannot be removed is left for the next open.
fn abandon_dir(dir: &Path, db: Option<::sled::Db>) {
    if let Some(db) = db {
        let closed = close_on_thread(
            move || drop(catch_unwind(AssertUnwindSafe(|| drop(db)))),
            CLOSE_WAIT_POISONED,
        );
        if closed {
            wait_until_unlocked(&dir.join("db"));
        }
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => tracing::warn!(
            path = %dir.display(),
            "cannot remove an abandoned copy ({e}); the next open removes it"
        ),
        _ => {}
    }
}

/// How long copying `live` should take, roughly.
fn pause_estimate(live: Tally) -> Duration {
    let records = live.records.saturating_mul(COPY_NANOS_PER_RECORD);
    let bytes = live.bytes.saturating_mul(1_000_000_000) / COPY_BYTES_PER_SECOND;
    Duration::from_nanos(records.saturating_add(bytes))
}
