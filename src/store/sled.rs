//! The durable store: sled 0.34, every record in one tree, one `sled::Batch` per [`Batch`].

use std::collections::BTreeMap;
use std::io;
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
    /// explicit flush). More importantly it is the only place sled 0.34 runs its segment
    /// cleaner: with `None`, space of removed records is never reused and the directory grows
    /// with every byte ever written (see "Disk use" on [`SledStore`]). Default `Some(500)`,
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
/// batches become durable at the next [`Store::flush`] (`sled::Db::flush`, which fsyncs).
///
/// # Disk use
/// sled is log-structured: every write appends to 512 KiB segments of one file, and removed or
/// overwritten records leave dead space behind. sled 0.34 reclaims it only in its segment
/// cleaner, which runs on the background flusher thread ([`SledOptions::flush_every_ms`]) for
/// at most half of each period: it rewrites the live pages of segments that are at most half
/// live, and later writes reuse the freed segments. The file itself rarely shrinks; what stays
/// bounded is its growth. Measured with 64-byte bodies (`benches/store.rs` prints it, figures in
/// BENCHMARKS.md):
/// - without the flusher the directory grows by about 500 bytes per message written, whatever
///   is deleted: a queue holding 100,000 messages reached 1 GiB after 2 million had passed
///   through;
/// - with it, writing a million, deleting them and writing a million more ends near the size of
///   one million (space is reused), and a queue of 100,000 fed at ~30,000 messages/s stays under
///   100 MiB; but at full speed (~100,000 messages/s in and out) the cleaner falls behind and
///   the directory keeps growing (2 GiB after 4 million had passed through).
///
/// So the broker's disk limit (checked with [`Store::size_on_disk`], which is sled's count of
/// its files' bytes) is what bounds the disk in the end: while publishers are blocked at the
/// limit, the cleaner frees segments that later writes reuse.
///
/// # Errors
/// The first sled or I/O failure poisons the store (every later call returns
/// [`StoreError::Poisoned`]). A record that fails to decode during [`Store::recover`] is
/// [`StoreError::Corrupt`] and does not poison: nothing was written wrongly by this process.
#[derive(Debug)]
pub struct SledStore {
    db: ::sled::Db,
    path: PathBuf,
    poison: Poison,
    /// Serialises applies so a `DeleteQueue`'s scan of the queue's messages and the removal it
    /// applies are not interleaved with another batch's writes to the same queue.
    apply_lock: Mutex<()>,
    /// Declared after `db`, so dropped after it: waits until sled's own threads have let go of
    /// the directory's lock, so the directory can be opened again as soon as the store is gone.
    _release: LockRelease,
}

/// Waits, when dropped, until the sled directory's lock file can be locked (bounded).
#[derive(Debug)]
struct LockRelease(PathBuf);

impl Drop for LockRelease {
    fn drop(&mut self) {
        let lock_file = self.0.join("db");
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
    pub fn open(path: impl AsRef<Path>, options: SledOptions) -> Result<SledStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db = ::sled::Config::new()
            .path(&path)
            .cache_capacity(options.cache_capacity_bytes)
            .flush_every_ms(options.flush_every_ms)
            .open()
            .map_err(|e| open_error(&path, e))?;
        Ok(SledStore {
            db,
            _release: LockRelease(path.clone()),
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
            .map(|_| ())
            .map_err(|e| self.poison.fail(format!("insert: {e}")))
    }

    /// One `sled::Batch` with the effect of `writes` applied in order.
    fn sled_batch(&self, writes: &[Write]) -> Result<::sled::Batch, ::sled::Error> {
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
            return Ok(batch);
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
        for (key, value) in overlay {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        Ok(batch)
    }
}

impl Store for SledStore {
    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        self.poison.check()?;
        let writes = codec::encode_batch(batch)?;
        let _serialised = self.apply_lock.lock();
        let batch = self
            .sled_batch(&writes)
            .map_err(|e| self.poison.fail(format!("scan for queue delete: {e}")))?;
        self.db
            .apply_batch(batch)
            .map_err(|e| self.poison.fail(format!("apply: {e}")))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.poison.check()?;
        self.db
            .flush()
            .map(|_| ())
            .map_err(|e| self.poison.fail(format!("flush: {e}")))
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
