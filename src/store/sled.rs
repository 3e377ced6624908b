//! The durable store: sled 0.34, every record in one tree, one `sled::Batch` per [`Batch`],
//! in a store directory whose active sled directory (generation) compaction can replace.

mod compact;
mod layout;
mod live;

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use super::codec::{self, Write};
use super::commit_file::{self, CommitFile};
use super::{Batch, CompactStats, CompactionDue, Poison, RecoverySink, Store, StoreError};
use compact::CompactionState;
use layout::{DirLock, GenerationId};
use live::LiveData;

pub use compact::{COMPACT_FLOOR_BYTES, COMPACT_LIVE_RATIO};

/// Options of [`SledStore::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SledOptions {
    /// Period of sled's background flusher thread, in milliseconds; `None` runs no such thread.
    ///
    /// The flusher writes and fsyncs buffered log data every period (so applied batches may
    /// become durable before [`Store::flush`], which is harmless: confirms still wait for an
    /// explicit flush). It is also the only place sled 0.34 runs its segment cleaner, which
    /// moves the live pages out of log segments that are at most half live so those segments
    /// can be reused. Without it only segments whose pages were all rewritten anyway are
    /// reused: enough for a short backlog, not for messages that stay queued while many others
    /// pass (in a loop on sled alone writing and removing 64-byte records over a backlog of
    /// 100,000, the directory kept growing, ~450 MiB after 2 million, against ~120 MiB and
    /// levelling off with the flusher). See "Disk use" on [`SledStore`]. Default `Some(500)`,
    /// sled's own default.
    pub flush_every_ms: Option<u64>,
    /// sled's page cache, in bytes (default 64 MiB; sled's own default is 1 GiB).
    pub cache_capacity_bytes: u64,
}

impl Default for SledOptions {
    fn default() -> Self {
        Self {
            flush_every_ms: Some(500),
            cache_capacity_bytes: 64 << 20,
        }
    }
}

/// A [`Store`] in a sled database directory.
///
/// Every record is a key of sled's default tree (layout in [`codec`]), so one `sled::Batch`
/// makes any [`Batch`] atomic: after a crash either all of it or none of it is there. Applied
/// batches become durable at the next [`Store::flush`].
///
/// # Layout
/// The store directory holds the sled directory in use, the *active generation*, and a lock
/// file (`coney.lock`, held while the store is open, so that no other store reads or removes a
/// generation meanwhile). Generation 0 is the store directory itself (sled's `db`, `conf`,
/// `blobs/`, `snap.*` and the commit file directly in it): every store starts there, and so
/// are stores written before compaction existed. Generation `N > 0` is the subdirectory
/// `gen-N`, named by the file `CURRENT` (with a checksum). Each generation has its own commit
/// file (see "Lost writes"). Every check below applies to the active generation.
///
/// # Compaction
/// [`Store::compact`] gives back the space of removed records, which sled 0.34 keeps (see
/// "Disk use"): with the apply and flush locks held (no write meanwhile), it flushes, copies
/// every record (the commit counter too) into generation `N + 1` in batches, flushes that and
/// syncs its files, its directory and a new commit file holding the same counter, then
/// commits the switch by writing `CURRENT` (a temporary file, synced, renamed over `CURRENT`,
/// the store directory synced). The store then uses the new generation (writes resume), closes
/// the old one (with the same bounded wait as closing the store) and removes it.
///
/// Crash safety: `CURRENT` names a generation only once that generation is complete and on
/// stable storage, so a crash at any step leaves either the old generation active (the new one
/// half-written or complete but not named) or the new one (the old one not yet removed, or
/// partly). Opening removes whatever `CURRENT` does not name (a generation, `CURRENT.tmp`,
/// generation 0's files when a later generation is active), after the active generation
/// opened, under the directory lock. A failure before the switch (no space for the copy, ...)
/// removes the copy and returns [`StoreError::Compaction`]: the store is unchanged and not
/// poisoned. A failure to sync the directory after the rename poisons the store (both
/// generations are then kept, both complete: either may be the one a restart finds).
///
/// Cost: a compaction reads and writes every live record, so it takes time in proportion to
/// the live data, not to the space it gives back, and writes wait meanwhile. Measured with
/// 64-byte messages (`benches/durable.rs`, figures in BENCHMARKS.md): writes were held 6 ms
/// when a drained backlog of 1,000,000 left nothing live (295 MiB given back; closing and
/// removing the old generation took 150 ms more, after the locks were released), and 1.2 s
/// with 100,000 messages live (sled writes 100,000-200,000 small records a second here). The
/// broker runs compactions on its flusher thread, so its writes wait for the whole. A freshly written
/// generation takes ~2-3 times the records' encoded bytes (sled's nodes hold 9-17 records, and
/// in-order inserts leave node versions and split fragments behind in the log): 28.5 MiB for
/// those 100,000.
///
/// When: [`Store::compaction_due`] says whether a compaction is worth it, from the size on
/// disk and an estimate of the live data kept from the writes applied (exact after recovery
/// and after each compaction; see `live.rs`): when the size is over [`COMPACT_FLOOR_BYTES`]
/// and over [`COMPACT_LIVE_RATIO`] times the live bytes. The broker's flusher asks when it has
/// been idle for a while and compacts then (see `Broker::compact_store`, which also compacts on
/// demand).
///
/// # Stable storage
/// `sled::Db::flush` writes sled's log buffers and waits for them with `sync_file_range`,
/// which neither writes the file's metadata nor flushes the disk's write cache: a power cut or
/// a kernel crash can still lose what it wrote (sled 0.34 fsyncs only on its own timer, at
/// file creation and when dropped). So [`Store::flush`] follows it with an `fdatasync` of the
/// log file (`db`), an `fsync` of every blob file sled wrote since the last flush (values too
/// large for a log segment live in `blobs/`, written without any sync), and an `fsync` of the
/// directory and of `blobs/` whenever their entries changed. Only then does it return, so a
/// confirm, a `sync` or a per-message publish is on stable storage when it is answered.
///
/// # Disk use
/// sled is log-structured: every write appends to 512 KiB segments of one file, and removed or
/// overwritten records leave dead space behind. A segment is reused once every page it holds
/// has a newer version elsewhere; for segments at most half live, the segment cleaner (on the
/// flusher thread, see [`SledOptions::flush_every_ms`]) writes such newer versions of the pages
/// still there. The file shrinks only when free segments sit at its end; otherwise later writes
/// reuse them. Compaction (above) is what gives the rest back.
///
/// sled 0.34 retires a written segment (makes it a candidate for reuse at all) in a step it
/// defers through its epoch-based garbage collector, behind the page versions every write
/// replaces. On its own that collector does not keep up with a fast writer: its queue grows,
/// segments are never retired and the directory grows with every byte written (with it, the
/// memory the replaced page versions hold). So every apply and flush runs the collector in
/// proportion to the keys written (`collect_sled_garbage`). Measured with 64-byte bodies
/// through the broker, group commit (`benches/durable.rs`; figures and commands in
/// BENCHMARKS.md):
/// - a publish+ack stream at full speed (~300,000 cycles/s) over a backlog of 1,000 stays at
///   3-4 MiB however long it runs (4,000,000 cycles: 3.0 MiB); before the collection it grew by
///   ~106 bytes per cycle (423 MiB after 4,000,000);
/// - over a backlog of 100,000 it levels off near 60 MiB (56-64 MiB from 1,000,000 to
///   2,000,000 cycles); before, 619 MiB after 1,000,000 and growing;
/// - a backlog of 1,000,000 takes ~190-300 MiB (490-530 MiB before), which sled keeps once it
///   drains (its freed segments are reused by later writes); a compaction then takes the
///   store back to well under a megabyte.
///
/// Nothing limits the directory's size: [`Store::size_on_disk`] (sled's count of the active
/// generation's log and blob files, which `Broker::size_on_disk` reports) is for monitoring,
/// and a write that fails for lack of space poisons the store like any other storage failure.
///
/// # Lost writes
/// sled 0.34 recovers its log up to the first message that fails its checksum and treats that
/// as the torn end of a crash: a flipped bit in the middle of the log, a damaged blob file or a
/// cut `db` file opens as an older store that is consistent in itself (acked messages back,
/// confirmed ones gone), and no record checksum can see it. So every [`Store::flush`] that
/// follows an apply also writes a commit counter into the tree ([`codec::COMMIT_KEY`], one
/// more than the last), and once the flush is on stable storage records that counter in a
/// small file of the store's own (`coney.commit`, two checksummed slots written in turn, so
/// that a torn write leaves the other one valid). On open, a tree whose counter is below the
/// file's lost writes a flush had made durable: [`StoreError::CorruptStore`]. The file is
/// written after the flush, so after a kill or a power cut it can lag the tree, never lead it
/// (no false alarm); it is fsynced when the store closes and by a flush at most once a
/// second, so a power cut can leave it up to that much
/// behind, which weakens the check and never fails it. A store without either (written before
/// the counter existed) opens and gets them. A compaction copies the counter and writes the
/// new generation's commit file, synced, before the switch.
///
/// What it cannot see: a loss that later writes hide, because sled went on replaying past it
/// (a damaged message in a segment below the unstable tail skips the rest of that segment
/// only, and a deleted blob file is read as an outdated one); the crate's corruption tests
/// (`tests/corruption.rs`) measure what remains.
///
/// # Damage
/// Opening never panics on damaged files: a panic inside sled while opening or recovering is
/// caught and reported as [`StoreError::CorruptStore`], as is sled's own corruption error,
/// a missing `db` next to files only an existing store has (`coney.commit`, `snap.*`, blob
/// files; in a generation above 0, a missing `db` whatever else is there), a commit file that
/// is missing, damaged or ahead of the tree, a `CURRENT` that is damaged or names a missing
/// generation, and generations without a `CURRENT` (nor a log of generation 0's). sled still
/// prints the panic's message through the process's panic hook.
///
/// # Errors
/// The first sled or I/O failure poisons the store (every later call returns
/// [`StoreError::Poisoned`]). A record that fails to decode during [`Store::recover`] is
/// [`StoreError::Corrupt`], damage to the store as a whole [`StoreError::CorruptStore`]; neither
/// poisons: nothing was written wrongly by this process. Neither does a compaction that failed
/// before its switch ([`StoreError::Compaction`]).
#[derive(Debug)]
pub struct SledStore {
    /// Everything but the lock release; closed by `Drop` on a thread of its own, with a
    /// bounded wait (see [`SledStore`]'s `Drop`).
    inner: ManuallyDrop<SledInner>,
    /// Dropped after `inner` is closed: waits until sled's own threads have let go of the
    /// active generation's lock, then releases the directory lock, so the directory can be
    /// opened again as soon as the store is gone.
    _release: LockRelease,
}

/// The open store: what [`SledStore`] delegates to, moved to a closing thread when dropped.
///
/// Locks, always taken in this order: `compaction`, `flush_lock`, `apply_lock`, `active`.
/// Applies hold `apply_lock`, flushes `flush_lock` (and `apply_lock` briefly), and both read
/// `active`; a compaction holds all of them while it copies and writes `active` only to swap
/// it, so no apply or flush ever sees the generation change under it.
#[derive(Debug)]
struct SledInner {
    /// The store directory.
    path: PathBuf,
    options: SledOptions,
    poison: Poison,
    /// Serialises applies so a `DeleteQueue`'s scan of the queue's messages and the removal it
    /// applies are not interleaved with another batch's writes to the same queue; holds the
    /// commit counter, which flushes write under it, and the live-data estimate.
    apply_lock: Mutex<Commits>,
    /// Serialises flushes, so commit counters reach the commit file in order.
    flush_lock: Mutex<CommitFileSync>,
    /// The generation in use.
    active: RwLock<Generation>,
    /// Serialises compactions.
    compaction: Mutex<CompactionState>,
}

/// One open generation: a sled directory and the files a flush syncs in it.
#[derive(Debug)]
struct Generation {
    id: GenerationId,
    /// Its sled directory.
    dir: PathBuf,
    db: ::sled::Db,
    /// What [`Store::flush`] syncs after sled's own flush.
    files: DurableFiles,
    /// Where flushes record their commit counter.
    commit_file: CommitFile,
}

/// Closes the store: records the last commit and syncs the commit file (closing is where that
/// file is brought up to date on stable storage, see "Lost writes"), then closes sled, whose own
/// drop flushes what it holds and waits until that is written. After a write failure (a full
/// disk) that wait never ends in sled 0.34 (its log buffer is never marked stable), so all of
/// it runs on a thread of its own and the store waits for it at most 30 s
/// (2 s once poisoned). If it does not finish, that thread is left behind,
/// holding the directory's locks until the process ends: nothing it could still write was
/// confirmed, and the store returns.
impl Drop for SledStore {
    fn drop(&mut self) {
        // SAFETY: `inner` is taken once, here, and never used again.
        let inner = unsafe { ManuallyDrop::take(&mut self.inner) };
        let path = inner.path.clone();
        self._release.log = inner.active.read().dir.join("db");
        let wait = if inner.poison.is_poisoned() {
            CLOSE_WAIT_POISONED
        } else {
            CLOSE_WAIT
        };
        if !close_on_thread(move || inner.close(), wait) {
            tracing::error!(
                path = %path.display(),
                "closing the store did not finish in time; its directory stays locked until the \
                 process ends"
            );
            self._release.wait = false;
        }
    }
}

/// Runs `close` on a thread of its own and waits for it at most `wait`; returns whether it
/// finished (if not, the thread is left behind).
fn close_on_thread(close: impl FnOnce() + Send + 'static, wait: Duration) -> bool {
    let (closed_tx, closed) = mpsc::channel();
    let spawned = thread::Builder::new()
        .name("coney-sled-close".into())
        .spawn(move || {
            close();
            let _ = closed_tx.send(());
        });
    spawned.is_ok() && closed.recv_timeout(wait).is_ok()
}

/// How long dropping a healthy store waits for sled to close at most.
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// How long dropping a poisoned store waits for sled to close at most.
const CLOSE_WAIT_POISONED: Duration = Duration::from_secs(2);

/// Waits, when dropped, until the active generation's sled lock can be taken (bounded), then
/// releases the directory lock; unless closing the database was given up, in which case both
/// stay held until the process ends.
#[derive(Debug)]
struct LockRelease {
    /// The active generation's log file, which sled locks.
    log: PathBuf,
    wait: bool,
    dir_lock: Option<DirLock>,
}

impl Drop for LockRelease {
    fn drop(&mut self) {
        if !self.wait {
            // sled may still write the generation: no other store may open the directory.
            std::mem::forget(self.dir_lock.take());
            return;
        }
        wait_until_unlocked(&self.log);
    }
}

/// Waits until sled's lock on `log` can be taken, at most [`LOCK_RELEASE_WAIT`]; returns
/// whether it could (a missing file counts as released).
fn wait_until_unlocked(log: &Path) -> bool {
    let deadline = Instant::now() + LOCK_RELEASE_WAIT;
    while Instant::now() < deadline {
        let Ok(file) = std::fs::File::open(log) else {
            return true;
        };
        if file.try_lock().is_ok() {
            let _ = file.unlock();
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// How long dropping a store waits for sled to release the directory at most.
const LOCK_RELEASE_WAIT: Duration = Duration::from_secs(10);

/// Longest time a flush leaves the commit file unsynced after writing it (see "Lost writes" on
/// [`SledStore`]). Syncing it on every flush adds a second `fdatasync` to each one: measured
/// through the broker, per-message confirms fell tenfold (`benches/durable.rs`); once a second
/// costs nothing measurable.
pub const COMMIT_FILE_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// The commit counter and the live-data estimate, kept under the apply lock.
#[derive(Debug)]
struct Commits {
    /// The counter the next flush writes.
    next: u64,
    /// Whether anything was applied since the last counter was written.
    applied: bool,
    /// What the store holds, for deciding when to compact.
    live: LiveData,
}

/// When the commit file was last synced, kept under the flush lock.
#[derive(Debug)]
struct CommitFileSync {
    synced_at: Instant,
    /// Whether a counter was written since.
    pending: bool,
}

impl SledStore {
    /// Opens (or creates) the store in directory `path`.
    ///
    /// Fails with [`StoreError::Locked`] if another process (or another open store in this
    /// one) has the directory open, [`StoreError::Invalid`] for an empty path,
    /// [`StoreError::CorruptStore`] if the files are damaged or the log lost flushed writes
    /// (see "Lost writes" and "Damage" above), and [`StoreError::Storage`] on any other failure.
    ///
    /// A snapshot file sled was still writing when its process died (`snap.*.generating`) is
    /// removed if sled refuses to open because of it.
    /// What an interrupted compaction left behind is removed once the active generation opened
    /// (see "Compaction" above).
    pub fn open(path: impl AsRef<Path>, options: SledOptions) -> Result<SledStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        if path.as_os_str().is_empty() {
            return Err(StoreError::Invalid(
                "an empty path names no store directory".to_string(),
            ));
        }
        std::fs::create_dir_all(&path)
            .map_err(|e| StoreError::Storage(format!("cannot create {}: {e}", path.display())))?;
        let dir_lock = DirLock::acquire(&path)?;
        let id = layout::read_current(&path)?;
        // Declared before the generation, so dropped after it on every early return too.
        let release = LockRelease {
            log: id.dir(&path).join("db"),
            wait: true,
            dir_lock: Some(dir_lock),
        };
        let (generation, next_commit, next_generation) = Generation::open(&path, id, options)
            .and_then(|(generation, next_commit)| {
                let leftovers = layout::generations(&path)
                    .and_then(|found| {
                        let removed = layout::remove_leftovers(&path, id)?;
                        // The directory lock's file and the removals, on stable storage.
                        sync_file(&path)?;
                        Ok((found, removed))
                    })
                    .map_err(|e| {
                        StoreError::Storage(format!("cannot tidy {}: {e}", path.display()))
                    });
                let (found, removed) = match leftovers {
                    Ok(tidied) => tidied,
                    Err(e) => {
                        generation.close_now();
                        return Err(e);
                    }
                };
                if !removed.is_empty() {
                    tracing::info!(
                        path = %path.display(),
                        ?removed,
                        "removed what an interrupted compaction left behind"
                    );
                }
                let highest = found.into_iter().max().unwrap_or(id).max(id);
                Ok((generation, next_commit, GenerationId(highest.0 + 1)))
            })?;
        Ok(SledStore {
            inner: ManuallyDrop::new(SledInner {
                path,
                options,
                poison: Poison::default(),
                apply_lock: Mutex::new(Commits {
                    next: next_commit,
                    applied: false,
                    live: LiveData::default(),
                }),
                flush_lock: Mutex::new(CommitFileSync {
                    synced_at: Instant::now(),
                    pending: false,
                }),
                active: RwLock::new(generation),
                compaction: Mutex::new(CompactionState::new(next_generation)),
            }),
            _release: release,
        })
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The active generation's sled directory (the store directory itself until the first
    /// compaction; see "Layout").
    pub fn generation_dir(&self) -> PathBuf {
        self.inner.active.read().dir.clone()
    }

    /// Whether a storage failure poisoned the store.
    pub fn is_poisoned(&self) -> bool {
        self.inner.poison.is_poisoned()
    }

    /// Writes raw bytes under a key, bypassing the codec: for tests that plant corrupt records.
    #[doc(hidden)]
    pub fn raw_insert(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.inner.raw_insert(key, value)
    }
}

impl Generation {
    /// Opens generation `id` of store directory `root` with every check of "Damage" and "Lost
    /// writes"; returns it and the counter the next flush writes.
    fn open(
        root: &Path,
        id: GenerationId,
        options: SledOptions,
    ) -> Result<(Generation, u64), StoreError> {
        let dir = id.dir(root);
        check_log_present(&dir, id)?;
        let db = open_sled(&dir, options)?;
        let opened = check_commits(&db, &dir, id).and_then(|next_commit| {
            // Everything sled created or wrote while opening, and the commit file, are made
            // durable before the store is used: the files, and their entries in the directory.
            let files = DurableFiles::open(&dir)
                .and_then(|files| files.sync_all_known().map(|()| files))
                .map_err(|e| StoreError::Storage(format!("cannot sync {}: {e}", dir.display())))?;
            let commit_file = CommitFile::open(&dir).map_err(|e| {
                StoreError::Storage(format!(
                    "cannot open {}: {e}",
                    CommitFile::path(&dir).display()
                ))
            })?;
            Ok((next_commit, files, commit_file))
        });
        match opened {
            Ok((next_commit, files, commit_file)) => Ok((
                Generation {
                    id,
                    dir,
                    db,
                    files,
                    commit_file,
                },
                next_commit,
            )),
            Err(e) => {
                // sled flushes when dropped, which may meet the damage again.
                let _ = catch_unwind(AssertUnwindSafe(|| drop(db)));
                Err(e)
            }
        }
    }

    /// Closes it on this thread, swallowing a panic of sled's (its drop flushes, which may meet
    /// damage again).
    fn close_now(self) {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(self)));
    }

    /// `sled::Db::flush`, then the syncs of "Stable storage".
    fn flush(&self, poison: &Poison) -> Result<(), StoreError> {
        self.db
            .flush()
            .map_err(|e| poison.fail(format!("flush: {e}")))?;
        self.files
            .sync()
            .map_err(|e| poison.fail(format!("fsync: {e}")))
    }
}

impl SledInner {
    fn raw_insert(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.poison.check()?;
        let mut commits = self.apply_lock.lock();
        let active = self.active.read();
        active
            .db
            .insert(key, value)
            .map_err(|e| self.poison.fail(format!("insert: {e}")))?;
        commits.applied = true;
        commits.live.apply(&[Write::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        }]);
        drop(active);
        drop(commits);
        collect_sled_garbage(1);
        Ok(())
    }

    /// Records the last commit (unless poisoned: nothing more may be written), then drops
    /// sled, which flushes.
    fn close(self) {
        if !self.poison.is_poisoned()
            && let Err(e) = self.flush_and_commit(true)
        {
            tracing::warn!(path = %self.path.display(), "closing the store: {e}");
        }
        drop(self);
    }

    /// Writes the next commit counter into `db` if anything was applied since the last one;
    /// returns it.
    fn write_commit(
        &self,
        db: &::sled::Db,
        commits: &mut Commits,
    ) -> Result<Option<u64>, StoreError> {
        if !commits.applied {
            return Ok(None);
        }
        let counter = commits.next;
        db.insert(codec::COMMIT_KEY, codec::encode_commit(counter))
            .map_err(|e| self.poison.fail(format!("write the commit counter: {e}")))?;
        commits.next += 1;
        commits.applied = false;
        Ok(Some(counter))
    }

    /// Records `counter`, now on stable storage in the tree, in the commit file; syncs the
    /// file if `sync_now` or if it was last synced [`COMMIT_FILE_SYNC_INTERVAL`] ago.
    fn record_commit(
        &self,
        commit_file: &CommitFile,
        sync: &mut CommitFileSync,
        counter: Option<u64>,
        sync_now: bool,
    ) -> Result<(), StoreError> {
        if let Some(counter) = counter {
            commit_file
                .write(counter)
                .map_err(|e| self.poison.fail(format!("write the commit file: {e}")))?;
            sync.pending = true;
        }
        if sync.pending && (sync_now || sync.synced_at.elapsed() >= COMMIT_FILE_SYNC_INTERVAL) {
            commit_file
                .sync()
                .map_err(|e| self.poison.fail(format!("fsync the commit file: {e}")))?;
            sync.synced_at = Instant::now();
            sync.pending = false;
        }
        Ok(())
    }

    /// [`Store::flush`], syncing the commit file too when `sync_commit_file`.
    fn flush_and_commit(&self, sync_commit_file: bool) -> Result<(), StoreError> {
        self.poison.check()?;
        let mut sync = self.flush_lock.lock();
        let mut commits = self.apply_lock.lock();
        let active = self.active.read();
        let counter = self.write_commit(&active.db, &mut commits)?;
        // Applies go on while sled flushes.
        drop(commits);
        active.flush(&self.poison)?;
        self.record_commit(&active.commit_file, &mut sync, counter, sync_commit_file)?;
        drop(active);
        drop(sync);
        collect_sled_garbage(usize::from(counter.is_some()));
        Ok(())
    }

    /// One `sled::Batch` with the effect of `writes` applied in order to `db`, and how many
    /// keys it writes.
    fn sled_batch(
        db: &::sled::Db,
        writes: &[Write],
    ) -> Result<(::sled::Batch, usize), ::sled::Error> {
        let mut batch = ::sled::Batch::default();
        if !writes
            .iter()
            .any(|w| matches!(w, Write::RemoveQueue { .. }))
        {
            // sled's batch keeps the last write of each key, which is in-order semantics.
            for write in writes {
                match write {
                    Write::Put { key, value } => batch.insert(key.as_slice(), value.as_slice()),
                    Write::Remove { key } => batch.remove(key.as_slice()),
                    Write::RemoveQueue { .. } => unreachable!("checked above"),
                }
            }
            return Ok((batch, writes.len()));
        }
        // A queue removal must also remove messages put earlier in this batch, which are not in
        // the tree yet: build the batch's effect in an overlay first.
        let mut overlay: BTreeMap<Vec<u8>, Option<&[u8]>> = BTreeMap::new();
        for write in writes {
            match write {
                Write::Put { key, value } => {
                    overlay.insert(key.clone(), Some(value));
                }
                Write::Remove { key } => {
                    overlay.insert(key.clone(), None);
                }
                Write::RemoveQueue { id } => {
                    overlay.insert(codec::queue_key(*id).to_vec(), None);
                    let prefix = codec::queue_messages_prefix(*id);
                    for (_, value) in overlay
                        .range_mut(prefix.to_vec()..)
                        .take_while(|(key, _)| key.starts_with(&prefix))
                    {
                        *value = None;
                    }
                    for key in db.scan_prefix(prefix).keys() {
                        overlay.insert(key?.to_vec(), None);
                    }
                }
            }
        }
        let keys = overlay.len();
        for (key, value) in overlay {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        Ok((batch, keys))
    }
}

impl Store for SledStore {
    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        self.inner.apply(batch)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }

    /// Reads the tree on a helper thread and decodes on the caller's, so with two cores free
    /// recovery takes little more than sled's own iteration (`benches/store.rs` compares them).
    fn recover_into(&self, sink: &mut dyn RecoverySink) -> Result<(), StoreError> {
        self.inner.recover_into(sink)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.inner.size_on_disk()
    }

    /// See "Compaction" on [`SledStore`].
    fn compact(&self) -> Result<CompactStats, StoreError> {
        self.inner.compact()
    }

    /// See "Compaction" on [`SledStore`].
    fn compaction_due(&self) -> Result<Option<CompactionDue>, StoreError> {
        self.inner.compaction_due()
    }
}

impl SledInner {
    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        self.poison.check()?;
        let writes = codec::encode_batch(batch)?;
        let mut serialised = self.apply_lock.lock();
        let active = self.active.read();
        let db = &active.db;
        // One key is atomic on its own: skip the batch's log manifest (the per-message mode
        // writes one record per flush).
        let single = match writes.as_slice() {
            [Write::Put { key, value }] => Some(db.insert(key.as_slice(), value.as_slice())),
            [Write::Remove { key }] => Some(db.remove(key.as_slice())),
            _ => None,
        };
        let keys = match single {
            Some(done) => {
                done.map_err(|e| self.poison.fail(format!("apply: {e}")))?;
                1
            }
            None => {
                let (batch, keys) = Self::sled_batch(db, &writes)
                    .map_err(|e| self.poison.fail(format!("scan for queue delete: {e}")))?;
                db.apply_batch(batch)
                    .map_err(|e| self.poison.fail(format!("apply: {e}")))?;
                keys
            }
        };
        serialised.applied = true;
        serialised.live.apply(&writes);
        drop(active);
        drop(serialised);
        collect_sled_garbage(keys);
        Ok(())
    }

    /// sled's flush with the commit counter (see "Lost writes" on [`SledStore`]).
    fn flush(&self) -> Result<(), StoreError> {
        self.flush_and_commit(false)
    }

    /// Reads the tree on a helper thread and decodes on the caller's, so with two cores free
    /// recovery takes little more than sled's own iteration (`benches/store.rs` compares them).
    /// The commit counter is skipped (it was checked on open). Sets the live-data estimate from
    /// what it read, if nothing was applied meanwhile.
    fn recover_into(&self, sink: &mut dyn RecoverySink) -> Result<(), StoreError> {
        self.poison.check()?;
        let writes_at_start = self.apply_lock.lock().live.writes();
        let mut live = LiveData::scanning();
        let active = self.active.read();
        let (chunks_tx, chunks_rx) = mpsc::sync_channel(RECOVER_CHUNKS_IN_FLIGHT);
        let (db, dir) = (&active.db, &active.dir);
        thread::scope(|scope| {
            thread::Builder::new()
                .name("coney-recover".into())
                .spawn_scoped(scope, || read_chunks(db, chunks_tx))
                .map_err(|e| self.poison.fail(format!("spawn the recovery reader: {e}")))?;
            // On an early return `chunks_rx` drops, the reader's next send fails and it stops.
            for chunk in chunks_rx {
                let chunk = chunk.map_err(|failure| match failure {
                    ReadFailure::Sled(e @ ::sled::Error::Corruption { .. }) => {
                        corrupt_store(dir, format!("sled found its log corrupt: {e}"))
                    }
                    ReadFailure::Sled(e) => self.poison.fail(format!("read: {e}")),
                    ReadFailure::Panicked(text) => {
                        corrupt_store(dir, format!("sled panicked while reading its log: {text}"))
                    }
                })?;
                for (key, value) in &chunk {
                    live.count(key, value.len());
                    if key[..] == codec::COMMIT_KEY {
                        continue;
                    }
                    codec::feed(sink, key, value, |body| {
                        Bytes::copy_from_slice(&value[body])
                    })?;
                }
            }
            Ok::<(), StoreError>(())
        })?;
        // Released first: the apply lock comes before `active` (see `SledInner`).
        drop(active);
        self.apply_lock.lock().live.replace(live, writes_at_start);
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.poison.check()?;
        self.active
            .read()
            .db
            .size_on_disk()
            .map_err(|e| self.poison.fail(format!("size on disk: {e}")))
    }
}

/// The files of a sled directory that [`Store::flush`] brings to stable storage after
/// `sled::Db::flush` (see "Stable storage" on [`SledStore`]).
#[derive(Debug)]
struct DurableFiles {
    dir: PathBuf,
    /// The log file, opened on its own: an fsync of any descriptor of a file covers every
    /// write to it, through whichever descriptor.
    log: File,
    /// The entries of the directory and of `blobs/` as of the last sync.
    seen: Mutex<SeenEntries>,
}

#[derive(Debug, Default)]
struct SeenEntries {
    dir: BTreeSet<OsString>,
    blobs: BTreeSet<OsString>,
}

impl DurableFiles {
    fn open(dir: &Path) -> io::Result<DurableFiles> {
        Ok(DurableFiles {
            dir: dir.to_path_buf(),
            log: File::open(dir.join("db"))?,
            seen: Mutex::new(SeenEntries::default()),
        })
    }

    /// Syncs every file and both directories, whatever was seen before (on open).
    fn sync_all_known(&self) -> io::Result<()> {
        let mut seen = self.seen.lock();
        for name in entries(&self.dir)? {
            let path = self.dir.join(&name);
            if path.is_file() {
                sync_file(&path)?;
            }
        }
        *seen = SeenEntries::default();
        drop(seen);
        self.sync()
    }

    /// `fdatasync` of the log; `fsync` of new blob files, and of each directory whose entries
    /// changed since the last call.
    fn sync(&self) -> io::Result<()> {
        self.log.sync_data()?;
        let mut seen = self.seen.lock();
        let blobs_dir = self.dir.join("blobs");
        let blobs = match entries(&blobs_dir) {
            Ok(blobs) => blobs,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(e),
        };
        if blobs != seen.blobs {
            for name in blobs.difference(&seen.blobs) {
                match sync_file(&blobs_dir.join(name)) {
                    // sled removed it since the listing: nothing left to make durable.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    other => other?,
                }
            }
            sync_file(&blobs_dir)?;
            seen.blobs = blobs;
        }
        let dir = entries(&self.dir)?;
        if dir != seen.dir {
            sync_file(&self.dir)?;
            seen.dir = dir;
        }
        Ok(())
    }
}

/// The names in a directory.
fn entries(dir: &Path) -> io::Result<BTreeSet<OsString>> {
    std::fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect()
}

/// `fsync` of a file or a directory (opened read-only, which Linux allows for both).
fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Keys written per round of epoch garbage collection that [`collect_sled_garbage`] runs.
///
/// A round frees up to 8 bags of 64 deferred items. Measured on a steady stream of inserts and
/// removes, about one round per 1,000 keys written keeps the directory flat (one per 2,000 and
/// it grows again slowly); this is an eightfold margin, and a round with nothing to free costs
/// under 100 ns.
const KEYS_PER_COLLECT: usize = 128;

/// Runs rounds of the epoch-based garbage collector sled's pages live under (crossbeam-epoch's
/// global collector), one per [`KEYS_PER_COLLECT`] keys written and at least one.
///
/// sled 0.34 defers through that collector, in the same queue as the page versions each write
/// replaces, the step that lets its segment accountant retire written segments (raising the
/// stable log position recorded in segment headers). The collector frees at most 8 bags per
/// round, runs a round only on every 128th pin of a thread or on an explicit flush, and frees
/// its queue in order; under a stream of writes its queue grows without bound, that step comes
/// later and later, and segments stay active: none is cleaned or reused, and the directory
/// grows with every byte written (~106 bytes per publish+ack cycle in `benches/durable.rs`).
/// Running rounds in proportion to what was written keeps the queue short. `sled::pin` is
/// sled's own (hidden) entry to that collector, so no other dependency is needed; `flush` on
/// the guard hands over this thread's deferred items and runs one round.
fn collect_sled_garbage(keys_written: usize) {
    for _ in 0..=keys_written / KEYS_PER_COLLECT {
        ::sled::pin().flush();
    }
}

/// Records per chunk the recovery reader hands over.
const RECOVER_CHUNK_LEN: usize = 1024;
/// Chunks queued between the recovery reader and the decoder, which bounds the memory between
/// them.
const RECOVER_CHUNKS_IN_FLIGHT: usize = 4;

type Chunk = Vec<(::sled::IVec, ::sled::IVec)>;

/// Why the recovery reader stopped early.
enum ReadFailure {
    /// sled returned an error.
    Sled(::sled::Error),
    /// sled panicked (the panic's message).
    Panicked(String),
}

/// Sends every record of `db`, in key order, in chunks; stops at the first error or panic
/// (sent on) or when the receiver is gone.
fn read_chunks(db: &::sled::Db, chunks: mpsc::SyncSender<Result<Chunk, ReadFailure>>) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| send_chunks(db, &chunks))) {
        let _ = chunks.send(Err(ReadFailure::Panicked(panic_text(&*panic))));
    }
}

fn send_chunks(db: &::sled::Db, chunks: &mpsc::SyncSender<Result<Chunk, ReadFailure>>) {
    let mut chunk = Vec::with_capacity(RECOVER_CHUNK_LEN);
    for item in db.iter() {
        match item {
            Ok(pair) => chunk.push(pair),
            Err(e) => {
                let _ = chunks.send(Err(ReadFailure::Sled(e)));
                return;
            }
        }
        if chunk.len() == RECOVER_CHUNK_LEN {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(RECOVER_CHUNK_LEN));
            if chunks.send(Ok(full)).is_err() {
                return;
            }
        }
    }
    if !chunk.is_empty() {
        let _ = chunks.send(Ok(chunk));
    }
}

/// Removes the snapshot files sled had not finished writing (`snap.<lsn>.generating`) from
/// directory `path`; returns how many.
///
/// sled 0.34.7 writes a snapshot to `snap.<lsn>.generating`, fsyncs it, then renames it to
/// `snap.<lsn>` (the rename is the commit), and deletes older snapshots only after that. But
/// when it opens a directory it takes the last of *all* `snap.` files in name order, unfinished
/// ones included: after a kill during a snapshot write, the torn `.generating` file sorts last,
/// fails its checksum, and sled refuses to open with a corruption error although the finished
/// snapshot before it is intact. Removing the unfinished file is what sled's own rename would
/// have made of it. Called only after sled refused to open with a corruption error, when sled
/// has already taken (and released) the directory's lock, so no other process is writing it.
fn remove_unfinished_snapshots(path: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Maps an open failure: sled reports a held file lock as an `Other` I/O error with this text,
/// and damage it found as a corruption error.
fn open_error(path: &Path, error: ::sled::Error) -> StoreError {
    match error {
        ::sled::Error::Io(e)
            if e.kind() == io::ErrorKind::Other
                && e.to_string().starts_with("could not acquire lock") =>
        {
            StoreError::Locked(format!(
                "{} is open in another process (or another store in this one): {e}",
                path.display()
            ))
        }
        e @ ::sled::Error::Corruption { .. } => {
            corrupt_store(path, format!("sled found its files corrupt: {e}"))
        }
        other => StoreError::Storage(format!("cannot open {}: {other}", path.display())),
    }
}

/// Opens sled in `path`, once more after removing unfinished snapshots if sled refused
/// because of one; a panic inside sled is [`StoreError::CorruptStore`].
fn open_sled(path: &Path, options: SledOptions) -> Result<::sled::Db, StoreError> {
    let open = || {
        catch_sled_panic(path, "opening", || {
            ::sled::Config::new()
                .path(path)
                .cache_capacity(options.cache_capacity_bytes)
                .flush_every_ms(options.flush_every_ms)
                .open()
        })
    };
    match open()? {
        Err(::sled::Error::Corruption { .. })
            if remove_unfinished_snapshots(path).map_err(|e| open_error(path, e.into()))? > 0 =>
        {
            open()?
        }
        other => other,
    }
    .map_err(|e| open_error(path, e))
}

/// Runs `f` (a call into sled on files the world controls), turning a panic into
/// [`StoreError::CorruptStore`] of directory `path`.
fn catch_sled_panic<T>(path: &Path, doing: &str, f: impl FnOnce() -> T) -> Result<T, StoreError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        corrupt_store(
            path,
            format!("sled panicked while {doing}: {}", panic_text(&*panic)),
        )
    })
}

/// A panic's message, when it is text.
fn panic_text(panic: &(dyn Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(text), _) => (*text).to_string(),
        (_, Some(text)) => text.clone(),
        _ => "(no message)".to_string(),
    }
}

fn corrupt_store(path: &Path, reason: String) -> StoreError {
    StoreError::CorruptStore {
        path: path.to_path_buf(),
        reason,
    }
}

/// Refuses a directory that has lost its log: `db` missing next to any file of a store (`conf`,
/// `blobs/`, a snapshot, the commit file). Without this check sled would create an empty log
/// and open an empty store. sled itself creates `blobs/` and `conf` before `db` when it creates
/// a store, so a process killed in between would leave them without one: for a directory
/// without `db` and without those, `db` is created here first (and the directory synced),
/// before sled runs. (A store created before this check, by a process killed in that window
/// and never opened since, is refused too.) A generation above 0 is complete before `CURRENT`
/// names it, so there a missing `db` is refused whatever else the directory holds.
fn check_log_present(dir: &Path, id: GenerationId) -> Result<(), StoreError> {
    let storage = |doing: &str, e: io::Error| {
        StoreError::Storage(format!("cannot {doing} {}: {e}", dir.display()))
    };
    let names = match entries(dir) {
        Ok(names) => names,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| storage("create", e))?;
            BTreeSet::new()
        }
        Err(e) => return Err(storage("list", e)),
    };
    if names.contains(&OsString::from("db")) {
        return Ok(());
    }
    if id.0 > 0 {
        return Err(corrupt_store(
            &dir.join("db"),
            format!(
                "the log file of generation {}, which CURRENT names, is missing",
                id.0
            ),
        ));
    }
    let found: Vec<String> = names
        .iter()
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| {
            name == "conf"
                || name == "blobs"
                || name == commit_file::NAME
                || name.starts_with("snap.")
        })
        .collect();
    if !found.is_empty() {
        return Err(corrupt_store(
            &dir.join("db"),
            format!(
                "the log file is missing, but the directory holds {}",
                found.join(", ")
            ),
        ));
    }
    File::create_new(dir.join("db")).map_err(|e| storage("create the log in", e))?;
    sync_file(dir).map_err(|e| storage("sync", e))
}

/// Checks the tree's commit counter against the commit file (creating the file for a store
/// of generation 0 that has none yet; a compaction writes one into every later generation);
/// returns the counter the next flush writes.
fn check_commits(db: &::sled::Db, dir: &Path, id: GenerationId) -> Result<u64, StoreError> {
    let stored = catch_sled_panic(dir, "reading the commit counter", || {
        db.get(codec::COMMIT_KEY)
    })?
    .map_err(|e| match e {
        e @ ::sled::Error::Corruption { .. } => {
            corrupt_store(dir, format!("sled found its log corrupt: {e}"))
        }
        other => StoreError::Storage(format!("cannot read {}: {other}", dir.display())),
    })?;
    let in_tree = stored
        .map(|value| codec::decode_commit(&value))
        .transpose()?;
    let in_file = CommitFile::read(dir)?;
    let file_path = || CommitFile::path(dir);
    match (in_tree, in_file) {
        (Some(tree), None) => Err(corrupt_store(
            &file_path(),
            format!("the commit file is missing, while the log holds commit {tree}"),
        )),
        (tree, Some(file)) if tree.map_or(file > 0, |tree| tree < file) => Err(corrupt_store(
            &dir.join("db"),
            format!(
                "the log lost writes that a flush had made durable: it ends at commit {}, the \
                 commit file says commit {file} was flushed",
                tree.map_or_else(|| "none".to_string(), |tree| tree.to_string())
            ),
        )),
        (tree, Some(_)) => Ok(tree.map_or(1, |tree| tree + 1)),
        (None, None) if id.0 > 0 => Err(corrupt_store(
            &file_path(),
            format!("the commit file of generation {} is missing", id.0),
        )),
        (None, None) => {
            // A new store, or one written before commit counters: start them.
            CommitFile::create(dir, 0).map_err(|e| {
                StoreError::Storage(format!("cannot create {}: {e}", file_path().display()))
            })?;
            Ok(1)
        }
    }
}
