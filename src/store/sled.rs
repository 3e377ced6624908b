//! The durable store: sled 0.34, every record in one tree, one `sled::Batch` per [`Batch`].

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use super::codec::{self, Write};
use super::{Batch, Poison, RecoverySink, Store, StoreError};

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
/// reuse them.
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
/// - a backlog of 1,000,000 takes ~190 MiB (490-530 MiB before), and the directory keeps that
///   size once it drains (620-640 MiB before): the freed segments are reused by later writes.
///
/// Nothing limits the directory's size: [`Store::size_on_disk`] (sled's count of its files'
/// bytes, which `Broker::size_on_disk` reports) is for monitoring, and a write that fails for
/// lack of space poisons the store like any other storage failure.
///
/// # Errors
/// The first sled or I/O failure poisons the store (every later call returns
/// [`StoreError::Poisoned`]). A record that fails to decode during [`Store::recover`] is
/// [`StoreError::Corrupt`] and does not poison: nothing was written wrongly by this process.
#[derive(Debug)]
pub struct SledStore {
    /// Closed by `Drop` on a thread of its own, with a bounded wait (see "Closing").
    db: ManuallyDrop<::sled::Db>,
    path: PathBuf,
    poison: Poison,
    /// Serialises applies so a `DeleteQueue`'s scan of the queue's messages and the removal it
    /// applies are not interleaved with another batch's writes to the same queue.
    apply_lock: Mutex<()>,
    /// What [`Store::flush`] syncs after sled's own flush.
    files: DurableFiles,
    /// Dropped after `db` is closed: waits until sled's own threads have let go of the
    /// directory's lock, so the directory can be opened again as soon as the store is gone.
    _release: LockRelease,
}

/// Closes the sled database: sled's own drop flushes what it holds and waits until that is
/// written. After a write failure (a full disk) that wait never ends in sled 0.34 (its log
/// buffer is never marked stable), so the drop runs on a thread of its own and the store waits
/// for it at most [`CLOSE_WAIT`] ([`CLOSE_WAIT_POISONED`] once poisoned). If it does not
/// finish, that thread is left behind, holding the directory's lock until the process ends:
/// nothing it could still write was confirmed, and the store returns.
impl Drop for SledStore {
    fn drop(&mut self) {
        // SAFETY: `db` is taken once, here, and never used again.
        let db = unsafe { ManuallyDrop::take(&mut self.db) };
        let wait = if self.poison.is_poisoned() {
            CLOSE_WAIT_POISONED
        } else {
            CLOSE_WAIT
        };
        let (closed_tx, closed) = mpsc::channel();
        let spawned = thread::Builder::new()
            .name("coney-sled-close".into())
            .spawn(move || {
                drop(db);
                let _ = closed_tx.send(());
            });
        let finished = spawned.is_ok() && closed.recv_timeout(wait).is_ok();
        if !finished {
            tracing::error!(
                path = %self.path.display(),
                "closing the store did not finish in time; its directory stays locked until the                  process ends"
            );
            self._release.wait = false;
        }
    }
}

/// How long dropping a healthy store waits for sled to close at most.
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// How long dropping a poisoned store waits for sled to close at most.
const CLOSE_WAIT_POISONED: Duration = Duration::from_secs(2);

/// Waits, when dropped, until the sled directory's lock file can be locked (bounded), unless
/// closing the database was given up.
#[derive(Debug)]
struct LockRelease {
    dir: PathBuf,
    wait: bool,
}

impl Drop for LockRelease {
    fn drop(&mut self) {
        if !self.wait {
            return;
        }
        let lock_file = self.dir.join("db");
        let deadline = Instant::now() + LOCK_RELEASE_WAIT;
        while Instant::now() < deadline {
            let Ok(file) = std::fs::File::open(&lock_file) else {
                return;
            };
            if file.try_lock().is_ok() {
                let _ = file.unlock();
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// How long dropping a store waits for sled to release the directory at most.
const LOCK_RELEASE_WAIT: Duration = Duration::from_secs(10);

impl SledStore {
    /// Opens (or creates) the store in directory `path`.
    ///
    /// Fails with [`StoreError::Locked`] if another process (or another open store in this
    /// one) has the directory open, and [`StoreError::Storage`] on any other failure.
    ///
    /// A snapshot file sled was still writing when its process died (`snap.*.generating`) is
    /// removed if sled refuses to open because of it (see [`remove_unfinished_snapshots`]).
    pub fn open(path: impl AsRef<Path>, options: SledOptions) -> Result<SledStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let open = || {
            ::sled::Config::new()
                .path(&path)
                .cache_capacity(options.cache_capacity_bytes)
                .flush_every_ms(options.flush_every_ms)
                .open()
        };
        let db = match open() {
            Err(::sled::Error::Corruption { .. })
                if remove_unfinished_snapshots(&path)
                    .map_err(|e| open_error(&path, e.into()))?
                    > 0 =>
            {
                open()
            }
            other => other,
        }
        .map_err(|e| open_error(&path, e))?;
        // Everything sled created or wrote while opening is made durable before the store is
        // used: the files, and their entries in the directory.
        let files = DurableFiles::open(&path)
            .and_then(|files| files.sync_all_known().map(|()| files))
            .map_err(|e| StoreError::Storage(format!("cannot sync {}: {e}", path.display())))?;
        Ok(SledStore {
            db: ManuallyDrop::new(db),
            files,
            _release: LockRelease {
                dir: path.clone(),
                wait: true,
            },
            path,
            poison: Poison::default(),
            apply_lock: Mutex::new(()),
        })
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a storage failure poisoned the store.
    pub fn is_poisoned(&self) -> bool {
        self.poison.is_poisoned()
    }

    /// Writes raw bytes under a key, bypassing the codec: for tests that plant corrupt records.
    #[doc(hidden)]
    pub fn raw_insert(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.poison.check()?;
        self.db
            .insert(key, value)
            .map_err(|e| self.poison.fail(format!("insert: {e}")))?;
        collect_sled_garbage(1);
        Ok(())
    }

    /// One `sled::Batch` with the effect of `writes` applied in order, and how many keys it
    /// writes.
    fn sled_batch(&self, writes: &[Write]) -> Result<(::sled::Batch, usize), ::sled::Error> {
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
                    for key in self.db.scan_prefix(prefix).keys() {
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
        self.poison.check()?;
        let writes = codec::encode_batch(batch)?;
        let serialised = self.apply_lock.lock();
        // One key is atomic on its own: skip the batch's log manifest (the per-message mode
        // writes one record per flush).
        let single = match writes.as_slice() {
            [Write::Put { key, value }] => Some(self.db.insert(key.as_slice(), value.as_slice())),
            [Write::Remove { key }] => Some(self.db.remove(key.as_slice())),
            _ => None,
        };
        if let Some(done) = single {
            done.map_err(|e| self.poison.fail(format!("apply: {e}")))?;
            drop(serialised);
            collect_sled_garbage(1);
            return Ok(());
        }
        let (batch, keys) = self
            .sled_batch(&writes)
            .map_err(|e| self.poison.fail(format!("scan for queue delete: {e}")))?;
        self.db
            .apply_batch(batch)
            .map_err(|e| self.poison.fail(format!("apply: {e}")))?;
        drop(serialised);
        collect_sled_garbage(keys);
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.poison.check()?;
        self.db
            .flush()
            .map_err(|e| self.poison.fail(format!("flush: {e}")))?;
        self.files
            .sync()
            .map_err(|e| self.poison.fail(format!("fsync: {e}")))?;
        collect_sled_garbage(0);
        Ok(())
    }

    /// Reads the tree on a helper thread and decodes on the caller's, so with two cores free
    /// recovery takes little more than sled's own iteration (`benches/store.rs` compares them).
    fn recover_into(&self, sink: &mut dyn RecoverySink) -> Result<(), StoreError> {
        self.poison.check()?;
        let (chunks_tx, chunks_rx) = mpsc::sync_channel(RECOVER_CHUNKS_IN_FLIGHT);
        thread::scope(|scope| {
            thread::Builder::new()
                .name("coney-recover".into())
                .spawn_scoped(scope, || read_chunks(&self.db, chunks_tx))
                .map_err(|e| self.poison.fail(format!("spawn the recovery reader: {e}")))?;
            // On an early return `chunks_rx` drops, the reader's next send fails and it stops.
            for chunk in chunks_rx {
                let chunk = chunk.map_err(|e| self.poison.fail(format!("read: {e}")))?;
                for (key, value) in &chunk {
                    codec::feed(sink, key, value, |body| {
                        Bytes::copy_from_slice(&value[body])
                    })?;
                }
            }
            Ok(())
        })
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.poison.check()?;
        self.db
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

/// Sends every record of `db`, in key order, in chunks; stops at the first error (sent on) or
/// when the receiver is gone.
fn read_chunks(db: &::sled::Db, chunks: mpsc::SyncSender<Result<Chunk, ::sled::Error>>) {
    let mut chunk = Vec::with_capacity(RECOVER_CHUNK_LEN);
    for item in db.iter() {
        match item {
            Ok(pair) => chunk.push(pair),
            Err(e) => {
                let _ = chunks.send(Err(e));
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

/// Maps an open failure: sled reports a held file lock as an `Other` I/O error with this text.
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
        other => StoreError::Storage(format!("cannot open {}: {other}", path.display())),
    }
}
