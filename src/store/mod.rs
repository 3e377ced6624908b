//! Durable storage behind one narrow trait: the records the broker persists, atomic batches of them, and typed errors.
//!
//! The runtime turns the core's effects into [`Op`]s, collects them in a [`Batch`], hands the
//! batch to [`Store::apply`] (atomic, not yet durable) and later calls [`Store::flush`] once for
//! every batch applied so far (group commit: one fsync covers every confirm waiting on it). On
//! open it calls [`Store::recover`] and rebuilds definitions, then each queue's messages.
//!
//! # Implementations
//! - [`SledStore`]: sled 0.34, one tree, one `sled::Batch` per [`Batch`]. The durable store;
//!   [`Store::compact`] gives back the space of removed records by copying the live ones into
//!   a fresh sled directory.
//! - [`MemoryStore`]: a `BTreeMap` with explicit crash semantics (`crash()` drops everything not
//!   flushed), for tests and the simulator. Uses the same [`codec`] as sled.
//! - [`FaultyStore`]: wraps any store and fails an apply, a flush or a recover on request.
//!
//! # Records and keys
//! [`codec`] defines the key layout (one prefix byte per record kind, big-endian integers, so a
//! queue's messages are one contiguous range in FIFO order) and the value format: one
//! format-version byte, a CRC-32 of key and value (format 2), then bincode 2. Every record is
//! checked when encoded (name lengths, field-table nesting, encoded size) and when decoded
//! (version, checksum, the same checks, no trailing bytes, key and value agree). A record that
//! fails to decode is [`StoreError::Corrupt`] naming its key; recovery never panics and never
//! skips a record silently.
//!
//! # Damage
//! A checksum per record cannot see a record that is missing, or one that is back after its
//! deletion: sled recovers a damaged log as if a crash had torn it at the damage, which yields
//! an older store, consistent in itself. [`SledStore`] therefore also records a commit counter
//! in a file of its own after every flush and refuses, on open, a log whose counter is behind
//! it ("Lost writes" there). Damage to the store as a whole (that, a missing or damaged file, a
//! panic or a corruption error inside sled) is [`StoreError::CorruptStore`] naming the file;
//! opening never panics. `tests/corruption.rs` damages a store at random to check it.
//!
//! # Invariants
//! - A batch is all or nothing: after a failed [`Store::apply`] nothing of it is visible.
//! - Ops in a batch take effect in order: a `PutMessage` followed by `DeleteQueue` of the same
//!   queue in one batch leaves no message.
//! - The first storage failure poisons the store: every later call returns
//!   [`StoreError::Poisoned`] with the first failure's text, so nothing pretends to be durable
//!   after the disk said no. Invalid records (rejected before any write) and corruption (found
//!   on read) do not poison.
//! - A damaged store opens to exactly what it held or fails with [`StoreError::Corrupt`] or
//!   [`StoreError::CorruptStore`] (for the damage `tests/corruption.rs` and the `store_open`
//!   fuzz target try; what [`SledStore`] cannot see is listed there).
//! - [`Store::compact`] changes no record: what [`Store::recover`] reads is the same before and
//!   after, and after a crash at any point of it.
//! - [`Recovered`] is deterministic: definitions in key order, queues' messages by ascending
//!   queue id, each queue's messages by ascending sequence number.

pub mod codec;
mod commit_file;
mod faulty;
mod memory;
mod sled;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::types::{BasicProperties, FieldTable};

pub use self::faulty::{Faults, FaultyStore};
pub use self::memory::MemoryStore;
pub use self::sled::{COMPACT_FLOOR_BYTES, COMPACT_LIVE_RATIO, SledOptions, SledStore};

/// Durable storage of definitions and messages.
///
/// Implementations are shared between threads (the runtime's flusher and its publishers); each
/// call is atomic with respect to the others.
pub trait Store: Send + Sync + 'static {
    /// Applies a batch atomically (all or nothing). Not yet durable.
    fn apply(&self, batch: &Batch) -> Result<(), StoreError>;
    /// Makes everything applied so far durable (fsync).
    fn flush(&self) -> Result<(), StoreError>;
    /// Reads back everything durable, for recovery, handing each record to `sink` as it is
    /// decoded, in key order: bindings, exchanges, messages (by queue id, then sequence
    /// number), queues. Nothing is gathered in between, so a million messages are never all
    /// held twice.
    fn recover_into(&self, sink: &mut dyn RecoverySink) -> Result<(), StoreError>;

    /// Reads back everything durable, gathered: definitions, then each queue's messages in
    /// sequence order.
    fn recover(&self) -> Result<Recovered, StoreError> {
        let mut recovered = Recovered::default();
        self.recover_into(&mut recovered)?;
        Ok(recovered)
    }
    /// Bytes the store occupies on disk (0 for memory), for monitoring.
    fn size_on_disk(&self) -> Result<u64, StoreError>;

    /// Gives back the disk space that removed records still take, by rewriting the live ones
    /// into fresh storage (see "Compaction" on [`SledStore`]); changes no record. Writes wait
    /// while it runs. A store with nothing to give back does nothing (the default).
    ///
    /// A failure before anything was switched is [`StoreError::Compaction`]: the store is
    /// unchanged and not poisoned.
    fn compact(&self) -> Result<CompactStats, StoreError> {
        Ok(CompactStats::default())
    }

    /// Whether most of the store's space on disk is no longer live, so that a
    /// [`Store::compact`] would give back much more than it costs; `None` if not (the default).
    /// Cheap: no record is read.
    fn compaction_due(&self) -> Result<Option<CompactionDue>, StoreError> {
        Ok(None)
    }
}

/// What a [`Store::compact`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompactStats {
    /// The generation now in use (see "Layout" on [`SledStore`]); 0 if nothing was done.
    pub generation: u64,
    /// Records copied: messages, definitions and the store's own bookkeeping.
    pub records: u64,
    /// Their encoded bytes (keys and values).
    pub live_bytes: u64,
    /// [`Store::size_on_disk`] before.
    pub size_before_bytes: u64,
    /// [`Store::size_on_disk`] after.
    pub size_after_bytes: u64,
    /// How long the store held writes (other threads' applies and flushes): from taking its
    /// locks to the switch to the copy.
    pub pause: Duration,
    /// How long it took in all, until the old copy was closed and removed (a caller that
    /// writes on the same thread, as the broker's flusher does, waits this long).
    pub took: Duration,
}

/// What [`Store::compaction_due`] found when a compaction is worth it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompactionDue {
    /// [`Store::size_on_disk`] now.
    pub size_on_disk_bytes: u64,
    /// Live records, estimated.
    pub live_records: u64,
    /// Their encoded bytes, estimated.
    pub live_bytes: u64,
    /// How long the compaction would hold writes, roughly (from the records and bytes to copy).
    pub pause_estimate: Duration,
}

/// A durable exchange (only durable exchanges are stored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExchangeRecord {
    /// Its name, at most [`codec::NAME_BYTES_MAX`] bytes.
    pub name: String,
    /// Its kind as RabbitMQ names it (`direct`, `fanout`, `topic`, `headers`).
    pub kind: String,
    /// Deleted when its last binding as a source goes.
    pub auto_delete: bool,
    /// Only reachable through exchange-to-exchange bindings.
    pub internal: bool,
    /// Its declare arguments.
    pub arguments: FieldTable,
}

/// A durable, non-exclusive queue (only those are stored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueRecord {
    /// The broker-assigned id its messages are keyed by; never reused for another queue.
    pub id: u64,
    /// Its name, at most [`codec::NAME_BYTES_MAX`] bytes.
    pub name: String,
    /// Deleted when its last consumer is cancelled.
    pub auto_delete: bool,
    /// Its declare arguments (`x-queue-type`, `x-dead-letter-exchange`, ...).
    pub arguments: FieldTable,
}

/// A binding between durable entities. The whole record is its identity (its key).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BindingRecord {
    /// The source exchange.
    pub source: String,
    /// The destination queue or exchange.
    pub destination: DestinationRecord,
    /// The binding key.
    pub routing_key: String,
    /// The binding arguments (headers exchange match rules, ...).
    pub arguments: FieldTable,
}

/// Where a binding leads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DestinationRecord {
    /// A queue, by name.
    Queue(String),
    /// An exchange, by name (exchange-to-exchange binding).
    Exchange(String),
}

/// A policy (broker-wide queue settings by name pattern). Its name is its key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// Its name, at most [`codec::NAME_BYTES_MAX`] bytes.
    pub name: String,
    /// The queue-name pattern (a regular expression).
    pub pattern: String,
    /// Higher wins where several match.
    pub priority: i32,
    /// The settings, under RabbitMQ's policy keys (`dead-letter-exchange`, `message-ttl`,
    /// ...): a table, so settings added later need no new record format.
    pub definition: FieldTable,
}

/// A persistent message in one durable queue. Its queue and sequence number are its key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageRecord {
    /// The exchange it was published to (`""` for the default exchange).
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Its properties.
    pub properties: BasicProperties,
    /// Its body.
    pub body: Bytes,
    /// How many times it was delivered and returned (quorum queues' `x-delivery-count`).
    pub delivery_count: u32,
    /// Whether it was delivered (so it comes back with `redelivered = true`).
    pub delivered: bool,
    /// When it was enqueued, milliseconds since the Unix epoch (per-queue TTL counts from here).
    pub enqueued_at_ms: u64,
    /// Whether the broker dead-lettered it (its `x-death` headers are the broker's history).
    pub dead_lettered: bool,
    /// The keys of its `BCC` header, kept for dead-lettering (the header itself is removed
    /// at publish).
    pub bcc: Vec<String>,
    /// Set while its at-least-once dead-lettering waits for its targets: the dead-letter
    /// reason (`rejected`, `expired`, `maxlen`, `delivery_limit`). Such a message is not ready
    /// in its queue; it is retried after a restart.
    pub pending_dead_letter: Option<String>,
}

/// One change to the stored state.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Creates or replaces a durable exchange.
    PutExchange(ExchangeRecord),
    /// Deletes a durable exchange by name (absent: no-op).
    DeleteExchange(String),
    /// Creates or replaces a durable queue.
    PutQueue(QueueRecord),
    /// Deletes a durable queue by id, and every message of that queue.
    DeleteQueue(u64),
    /// Creates a binding (present: no-op).
    PutBinding(BindingRecord),
    /// Deletes a binding (absent: no-op).
    DeleteBinding(BindingRecord),
    /// Creates or replaces a policy.
    PutPolicy(PolicyRecord),
    /// Deletes a policy by name (absent: no-op).
    DeletePolicy(String),
    /// Creates or replaces message `seq` of queue `queue`.
    PutMessage {
        /// The queue's id.
        queue: u64,
        /// Its sequence number within the queue (FIFO order).
        seq: u64,
        /// The message (shared with the runtime, which keeps it in memory).
        record: Arc<MessageRecord>,
    },
    /// Deletes message `seq` of queue `queue` (absent: no-op).
    DeleteMessage {
        /// The queue's id.
        queue: u64,
        /// Its sequence number within the queue.
        seq: u64,
    },
}

/// Ops applied together, in order, all or nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an op.
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Whether there are no ops.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Number of ops.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// The ops, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Removes every op, keeping the allocation.
    pub fn clear(&mut self) {
        self.ops.clear();
    }

    /// Appends every op of `other`, after this batch's.
    pub fn extend(&mut self, other: Batch) {
        self.ops.extend(other.ops);
    }
}

impl From<Vec<Op>> for Batch {
    fn from(ops: Vec<Op>) -> Self {
        Self { ops }
    }
}

/// Everything a store holds, as [`Store::recover`] reads it back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovered {
    /// Durable exchanges, in key order (by name bytes).
    pub exchanges: Vec<ExchangeRecord>,
    /// Durable queues, ascending by id.
    pub queues: Vec<QueueRecord>,
    /// Bindings, in key order (by encoded record).
    pub bindings: Vec<BindingRecord>,
    /// Policies, in key order (by name bytes).
    pub policies: Vec<PolicyRecord>,
    /// Messages grouped by queue, queues ascending by id; only queues with messages appear.
    /// Messages of a queue with no [`QueueRecord`] are returned too: the caller decides.
    pub messages: Vec<QueueMessages>,
}

/// The stored messages of one queue.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueMessages {
    /// The queue's id.
    pub queue: u64,
    /// `(seq, message)`, ascending by seq.
    pub messages: Vec<(u64, MessageRecord)>,
}

/// Receives recovered records one at a time, in key order (see [`Store::recover_into`]).
pub trait RecoverySink {
    /// A durable exchange.
    fn exchange(&mut self, record: ExchangeRecord) -> Result<(), StoreError>;
    /// A durable queue.
    fn queue(&mut self, record: QueueRecord) -> Result<(), StoreError>;
    /// A binding.
    fn binding(&mut self, record: BindingRecord) -> Result<(), StoreError>;
    /// A policy.
    fn policy(&mut self, record: PolicyRecord) -> Result<(), StoreError>;
    /// A message of queue `queue` with sequence number `seq`.
    fn message(&mut self, queue: u64, seq: u64, record: MessageRecord) -> Result<(), StoreError>;
}

/// Gathers everything, for [`Store::recover`].
impl RecoverySink for Recovered {
    fn exchange(&mut self, record: ExchangeRecord) -> Result<(), StoreError> {
        self.exchanges.push(record);
        Ok(())
    }

    fn queue(&mut self, record: QueueRecord) -> Result<(), StoreError> {
        self.queues.push(record);
        Ok(())
    }

    fn binding(&mut self, record: BindingRecord) -> Result<(), StoreError> {
        self.bindings.push(record);
        Ok(())
    }

    fn policy(&mut self, record: PolicyRecord) -> Result<(), StoreError> {
        self.policies.push(record);
        Ok(())
    }

    fn message(&mut self, queue: u64, seq: u64, record: MessageRecord) -> Result<(), StoreError> {
        match self.messages.last_mut() {
            Some(group) if group.queue == queue => {
                assert!(
                    group.messages.last().is_none_or(|(last, _)| *last < seq),
                    "records must be fed in key order"
                );
                group.messages.push((seq, record));
            }
            last => {
                assert!(
                    last.is_none_or(|group| group.queue < queue),
                    "records must be fed in key order"
                );
                self.messages.push(QueueMessages {
                    queue,
                    messages: vec![(seq, record)],
                });
            }
        }
        Ok(())
    }
}

/// A failure of a store operation.
///
/// Damage found on disk comes in two variants, by what can be named: [`StoreError::Corrupt`]
/// for one record (its key), [`StoreError::CorruptStore`] for the store as a whole (a file, or
/// writes the log lost). Whoever handles one handles the other the same way (the data on disk
/// cannot be trusted: restore it, or move it aside and start empty), so
/// [`StoreError::is_corrupt`] covers both.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// An I/O or sled failure. The store is now poisoned.
    #[error("storage failure: {0}")]
    Storage(String),
    /// A call after the first storage failure; carries the first failure's text.
    #[error("store poisoned by an earlier failure: {0}")]
    Poisoned(String),
    /// A stored record failed to decode (a checksum, the format, or key and value disagree).
    #[error("corrupt record at key {}: {reason}", codec::hex(.key))]
    Corrupt {
        /// The record's key.
        key: Vec<u8>,
        /// What was wrong with it.
        reason: String,
    },
    /// The store as a whole is damaged: a file is missing or unreadable, the storage engine
    /// failed (or panicked) reading its own files, or the log lost writes that a flush had
    /// made durable (see "Lost writes" on [`SledStore`]). Found on open or recovery; nothing
    /// was changed and the store is not poisoned.
    #[error("corrupt store at {}: {reason}", .path.display())]
    CorruptStore {
        /// The file at fault, or the store's directory when no one file is.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A compaction failed before it switched to its copy (no space for the copy, ...). The
    /// copy was removed; the store is unchanged and not poisoned.
    #[error("compaction failed, store unchanged: {0}")]
    Compaction(String),
    /// The directory is in use by another process (or another open store in this one).
    #[error("store directory is locked: {0}")]
    Locked(String),
    /// A record or an argument was rejected before anything was written (a name too long,
    /// headers nested too deep, an empty store path, ...). Nothing of the batch was applied and
    /// the store is not poisoned.
    #[error("invalid: {0}")]
    Invalid(String),
}

impl StoreError {
    /// Whether the error reports damage on disk ([`StoreError::Corrupt`] or
    /// [`StoreError::CorruptStore`]).
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            StoreError::Corrupt { .. } | StoreError::CorruptStore { .. }
        )
    }
}

/// The poisoned flag shared by the implementations: the first failure's text, set once.
#[derive(Debug, Default)]
pub(crate) struct Poison {
    first: OnceLock<String>,
}

impl Poison {
    /// `Err(Poisoned)` once a failure was recorded.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        match self.first.get() {
            Some(text) => Err(StoreError::Poisoned(text.clone())),
            None => Ok(()),
        }
    }

    /// Records a storage failure (the first one wins) and returns it as `Storage`.
    pub(crate) fn fail(&self, text: String) -> StoreError {
        let _ = self.first.set(text.clone());
        StoreError::Storage(text)
    }

    /// Whether a failure was recorded.
    pub(crate) fn is_poisoned(&self) -> bool {
        self.first.get().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_keeps_the_first_failure() {
        let poison = Poison::default();
        assert_eq!(poison.check(), Ok(()));
        assert_eq!(
            poison.fail("disk full".into()),
            StoreError::Storage("disk full".into())
        );
        assert_eq!(
            poison.fail("later".into()),
            StoreError::Storage("later".into())
        );
        assert!(poison.is_poisoned());
        assert_eq!(
            poison.check(),
            Err(StoreError::Poisoned("disk full".into()))
        );
    }

    #[test]
    fn corrupt_display_names_the_key_in_hex() {
        let err = StoreError::Corrupt {
            key: vec![b'M', 0, 0xff],
            reason: "bad".into(),
        };
        assert_eq!(err.to_string(), "corrupt record at key 4d00ff: bad");
    }
}
