//! The threaded runtime: drives the pure core from many application threads at once.
//!
//! Locking: the topology is a read-mostly snapshot swapped atomically ([`arc_swap`]); publish
//! loads it without a lock. A change clones the snapshot in O(1) (its maps are persistent,
//! structurally shared) and edits the clone in O(log n). Each queue and each channel has its own mutex. Locks are only ever
//! taken in the order *admin -> queue -> channel*, so no two paths can deadlock. Deliveries are
//! made on the thread whose call made them possible (publish, ack, consume) and reach consumers
//! through crossbeam channels.

mod admin;
mod channel;
mod confirm;
mod connection;
mod consumer;
mod dead_letter;
mod flow;
mod metrics;
mod monitor;
mod persist;
mod policy;
mod queue;
mod recover;
mod reply_to;
mod timer;

use std::collections::HashMap;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

pub use channel::{Channel, ConfirmListener, GetMessage, QueueDeclareOk, Returned};
pub use connection::Connection;
pub use consumer::{Consumer, Delivery};
pub use crossbeam_channel::{RecvTimeoutError, TryRecvError};
pub use flow::BlockedNotice;
pub use persist::Durability;
pub use policy::Policy;

use crate::clock::{Clock, SystemClock};
use crate::core::channel::QueueId;
use crate::core::shared::Map;
use crate::core::topology::Topology;
use crate::error::{CloseCause, Error, Result};
use crate::sim::Trace;
use crate::stats::BrokerStats;
use crate::store::{CompactStats, SledOptions, SledStore, Store};
pub(crate) use metrics::new_histogram;
use persist::Persistence;
use queue::{QueueCell, QueueEnv};
use std::path::Path;
use timer::Timers;

/// sled's own flush period when the broker flushes explicitly (it also reclaims space).
const SLED_FLUSH_EVERY_MS: u64 = 500;

/// Limits the broker enforces; each has a documented outcome when reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest body accepted (406 beyond). RabbitMQ 4.x default: 16 MiB.
    pub max_message_size: u64,
    /// Channels per connection (530, connection closed, beyond). RabbitMQ default: 2047.
    pub channel_max: u16,
    /// Queues per broker: declaring one more is a 406 (`queue limit ... reached`).
    pub max_queues: u32,
    /// Deliveries a no-ack consumer may have waiting in its buffer before the queue holds back.
    pub no_ack_window: u32,
    /// Largest AMQP frame, in bytes (RabbitMQ's default: 131,072). A message's properties
    /// (its content header) and a method's argument table must fit one frame, as on the wire:
    /// beyond, the call is refused with [`Error::InvalidInput`],
    /// as a client library refuses to encode such a frame, and nothing is closed. At most
    /// [`FRAME_MAX_CEILING`] takes effect, so every record stays within what the store
    /// accepts.
    pub frame_max: u32,
    /// Memory the queued messages may take before publishers wait (flow control, as
    /// RabbitMQ's `vm_memory_high_watermark`): the estimate counts each message's body plus a
    /// fixed overhead, once per queue holding it. Default: 40% of the machine's memory (or of
    /// the process's cgroup limit, if lower); 1 GiB where neither can be read.
    pub memory_high_watermark_bytes: u64,
    /// Bytes of records waiting for the store before publishers wait, until the backlog is
    /// back under half of it. Default: 256 MiB.
    pub store_backlog_max_bytes: u64,
    /// How long an at-least-once dead letter that could not reach every target waits before
    /// the next attempt, in milliseconds of the broker's clock (RabbitMQ's
    /// `dead_letter_worker_publisher_confirm_timeout`). Default: 180,000 (3 minutes), as
    /// RabbitMQ; a topology change alone does not cause an earlier attempt.
    pub dead_letter_retry_ms: u64,
}

/// The user [`Broker::connect`] acts as: RabbitMQ's default user.
pub const DEFAULT_USER: &str = "guest";

/// The largest [`Limits::frame_max`] that takes effect (512 KiB).
pub const FRAME_MAX_CEILING: u32 = 512 * 1024;

/// Bytes of a frame that are not its payload: type, channel, size, end marker.
const FRAME_OVERHEAD_BYTES: u64 = 8;

impl Limits {
    /// The largest frame payload, in bytes.
    pub(crate) fn frame_payload_max(&self) -> u64 {
        u64::from(self.frame_max.min(FRAME_MAX_CEILING)).saturating_sub(FRAME_OVERHEAD_BYTES)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 16 * 1024 * 1024,
            channel_max: 2047,
            max_queues: 100_000,
            no_ack_window: 1024,
            frame_max: 131_072,
            memory_high_watermark_bytes: flow::default_watermark_bytes(),
            store_backlog_max_bytes: 256 << 20,
            dead_letter_retry_ms: 180_000,
        }
    }
}

/// Messages one queue removed without an ack, per reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReasonCounts {
    /// Rejected or nacked without requeue.
    pub rejected: u64,
    /// TTL elapsed.
    pub expired: u64,
    /// Length limit (dropped from the head, or a refused publish).
    pub maxlen: u64,
    /// Returned more often than the delivery limit allows.
    pub delivery_limit: u64,
}

impl ReasonCounts {
    /// Every reason added up.
    pub fn total(&self) -> u64 {
        self.rejected + self.expired + self.maxlen + self.delivery_limit
    }
}

/// What became of the messages a queue removed without an ack: republished through its
/// dead-letter exchange to at least one queue, or dropped (no dead-letter exchange, no route,
/// a cycle, or a refused publish). Each event is also logged through `tracing` with the queue,
/// the reason and the message id: a dead-lettering at `INFO`, a drop at `WARN` (the message is
/// lost). An unroutable publish is not logged: the publisher chose what happens to it
/// (`mandatory` returns it), and RabbitMQ drops it silently too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeathStats {
    /// Dead-lettered, per reason.
    pub dead_lettered: ReasonCounts,
    /// Dropped, per reason.
    pub dropped: ReasonCounts,
    /// At-least-once dead letters the queue holds now, waiting to reach every target
    /// (RabbitMQ's `messages_dlx`); they are not ready and count toward its length limits.
    pub held: u64,
}

/// What [`Broker::health`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Whether the broker has a store (`Broker::open`), rather than running in memory.
    pub durable: bool,
    /// The storage failure that poisoned the store, if one did
    /// ([`StoreError::Poisoned`](crate::store::StoreError::Poisoned) with the first failure's
    /// text). Nothing durable succeeds after it.
    pub store_failure: Option<crate::store::StoreError>,
    /// The estimated memory of the queued messages, in bytes, added up over the queues now.
    /// The watermark is compared with a running count of the same estimate that each queue
    /// updates in steps of 64 KiB, so it may lag this figure by up to that much per queue.
    pub memory_bytes: u64,
    /// The memory high watermark, in bytes.
    pub memory_high_watermark_bytes: u64,
    /// Bytes of records waiting for the store.
    pub store_backlog_bytes: u64,
    /// Whether publishers wait for flow control now.
    pub publishers_blocked: bool,
}

impl Health {
    /// Whether everything the broker promises still holds.
    pub fn is_healthy(&self) -> bool {
        self.store_failure.is_none()
    }
}

/// An in-process broker. Cheap to clone; clones share the broker.
///
/// # Closing
/// [`Broker::close`] closes it; so does dropping the last `Broker` handle (the clones are
/// what counts: connections, channels, consumers and deliveries do not keep a broker open).
/// Closing closes every connection (their channels requeue their unacked messages), stops the
/// broker's threads (the flusher, which also compacts, and the timer thread), writes
/// everything to the store, flushes it and releases its directory, so [`Broker::open`] on the
/// same directory succeeds at once. Handles still held afterwards fail with
/// [`Error::is_broker_closed`] errors rather than keep anything open. Calls that race with
/// the close may or may not take effect, as calls racing with a connection's close.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<BrokerInner>,
    /// Shared by the application's handles only: the last one dropped closes the broker.
    _owner: Arc<CloseOnDrop>,
}

/// Closes the broker when the application's last [`Broker`] handle goes.
struct CloseOnDrop(Arc<BrokerInner>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Err(e) = self.0.close() {
            // The failure was already reported to the calls it failed; nobody is left to tell.
            tracing::warn!("closing the broker as its last handle was dropped: {e}");
        }
    }
}

/// Builds a [`Broker`] with a chosen clock, limits and seed.
pub struct BrokerBuilder {
    clock: Arc<dyn Clock>,
    limits: Limits,
    seed: u64,
    durability: Durability,
    /// sled's page cache for [`BrokerBuilder::open`]; `None`: [`SledOptions`]' default.
    store_cache_bytes: Option<u64>,
    auto_compact: bool,
    trace: Option<Trace>,
    /// No flusher thread: the store is written when a simulation says so.
    stepped: bool,
}

impl Default for BrokerBuilder {
    fn default() -> Self {
        let seed = SystemClock.now_ms() ^ u64::from(std::process::id()).rotate_left(32);
        Self {
            clock: Arc::new(SystemClock),
            limits: Limits::default(),
            seed,
            durability: Durability::default(),
            store_cache_bytes: None,
            auto_compact: true,
            trace: None,
            stepped: false,
        }
    }
}

impl BrokerBuilder {
    /// Uses `clock` for every timestamp and TTL.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Sets the limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Seeds server-generated names (`amq.gen-...`, `amq.ctag-...`), for repeatable runs.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// How publishes are made durable (default: group commit).
    pub fn durability(mut self, mode: Durability) -> Self {
        self.durability = mode;
        self
    }

    /// The memory sled may use as its page cache in [`BrokerBuilder::open`] (default 64 MiB,
    /// where sled's own default of 1 GiB would be a lot for an embedded library). It holds
    /// recently used records; messages the queues hold are counted by the memory high
    /// watermark instead.
    pub fn store_cache_bytes(mut self, bytes: u64) -> Self {
        self.store_cache_bytes = Some(bytes);
        self
    }

    /// Whether the broker compacts its store by itself once most of the store's space is no
    /// longer live and the store has been idle for a moment (default: yes). Off, only
    /// [`Broker::compact_store`] compacts, for applications that pick their own moment.
    pub fn auto_compact(mut self, on: bool) -> Self {
        self.auto_compact = on;
        self
    }

    /// Records what the broker does in `trace` ([`Trace`]): every publish, route, enqueue,
    /// delivery, settle, expiry, dead letter, drop and confirm, stamped with the broker's
    /// clock. Meant for tests (a [`Simulation`](crate::sim::Simulation) attaches one by
    /// itself): the trace grows without bound.
    pub fn trace(mut self, trace: &Trace) -> Self {
        self.trace = Some(trace.attachment());
        self
    }

    /// Runs without a flusher thread (for a [`Simulation`](crate::sim::Simulation)): records
    /// wait until [`Broker::run_pending_writes`] writes them, or until someone waits for
    /// durability (a confirm wait, a sync, a definition change, the close).
    pub(crate) fn stepped_store(mut self) -> Self {
        self.stepped = true;
        self
    }

    /// An in-memory broker: nothing touches disk.
    pub fn in_memory(self) -> Broker {
        let snapshot = Snapshot {
            topology: Topology::new(),
            queues: Map::default(),
        };
        let flow = self.flow_control();
        self.build(snapshot, Vec::new(), None, flow)
    }

    /// A durable broker whose durable exchanges, queues, bindings and persistent messages live
    /// in a sled database at `path`, recovered from it if it exists. A directory another
    /// process has open is refused
    /// ([`StoreError::Locked`](crate::store::StoreError::Locked)), and so is a damaged one
    /// ([`StoreError::Corrupt`](crate::store::StoreError::Corrupt) naming a record,
    /// [`StoreError::CorruptStore`](crate::store::StoreError::CorruptStore) naming a file or
    /// lost writes) or an empty path
    /// ([`StoreError::Invalid`](crate::store::StoreError::Invalid)).
    pub fn open(self, path: impl AsRef<Path>) -> Result<Broker> {
        // sled cleans segments of long-lived records only on its own flusher thread, so it runs
        // in every mode; confirms still wait for the broker's explicit flush, except in
        // periodic mode where this timer is the only flush.
        let every_ms = match self.durability {
            Durability::Periodic { every_ms } => every_ms,
            _ => SLED_FLUSH_EVERY_MS,
        };
        let defaults = SledOptions::default();
        let options = SledOptions {
            flush_every_ms: Some(every_ms),
            cache_capacity_bytes: self
                .store_cache_bytes
                .unwrap_or(defaults.cache_capacity_bytes),
        };
        let store = SledStore::open(path, options)?;
        self.open_store(store)
    }

    /// A durable broker on any [`Store`] (a [`MemoryStore`](crate::store::MemoryStore) for
    /// restart tests, a [`FaultyStore`](crate::store::FaultyStore) for failure tests),
    /// recovered from what it holds.
    pub fn open_store(self, store: impl Store) -> Result<Broker> {
        let store: Arc<dyn Store> = Arc::new(store);
        let flow = self.flow_control();
        let persistence = if self.stepped {
            Persistence::start_stepped(store, self.durability, flow.clone())
        } else {
            Persistence::start(store, self.durability, self.auto_compact, flow.clone())
        };
        let (snapshot, policies) = recover::rebuild(&persistence, self.clock.now_ms())?;
        Ok(self.build(snapshot, policies, Some(persistence), flow))
    }

    fn flow_control(&self) -> Arc<flow::FlowControl> {
        flow::FlowControl::new(
            self.limits.memory_high_watermark_bytes,
            self.limits.store_backlog_max_bytes,
        )
    }

    fn build(
        self,
        snapshot: Snapshot,
        policies: Vec<policy::Compiled>,
        persistence: Option<Arc<Persistence>>,
        flow: Arc<flow::FlowControl>,
    ) -> Broker {
        let timers = Timers::start(self.clock.clone());
        if let Some(trace) = &self.trace {
            trace.set_clock(self.clock.clone());
        }
        let inner = Arc::new_cyclic(|me| {
            for cell in snapshot.queues.values() {
                cell.attach(QueueEnv {
                    broker: me.clone(),
                    clock: self.clock.clone(),
                    timers: timers.clone(),
                    flow: flow.clone(),
                    trace: self.trace.clone(),
                });
            }
            BrokerInner {
                timers,
                me: me.clone(),
                snapshot: ArcSwap::from_pointee(snapshot),
                admin: Mutex::new(Admin {
                    rng: SplitMix64(self.seed),
                    policies,
                }),
                clock: self.clock,
                limits: self.limits,
                next_id: AtomicU64::new(1),
                channels: Mutex::new(HashMap::new()),
                connections: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
                close_outcome: Mutex::new(None),
                persistence,
                flow,
                replies: reply_to::ReplyRoutes::default(),
                rates: Mutex::default(),
                trace: self.trace,
            }
        });
        Broker {
            _owner: Arc::new(CloseOnDrop(inner.clone())),
            inner,
        }
    }
}

impl Broker {
    /// An in-memory broker with the system clock and default limits.
    pub fn in_memory() -> Broker {
        Self::builder().in_memory()
    }

    /// A durable broker in the sled database at `path` (group commit), recovered from it if
    /// it exists.
    pub fn open(path: impl AsRef<Path>) -> Result<Broker> {
        Self::builder().open(path)
    }

    /// Waits until everything done before the call is on stable storage: persistent messages
    /// published, acks, rejects and requeues, dead-letter moves, definitions. A no-op for an
    /// in-memory broker.
    ///
    /// An ack that found its queue locked by another thread (a purge, a delivery) waits in the
    /// queue's inbox for that thread; `sync` first has every queue hand such records to the
    /// store, so the ack is durable when `sync` returns.
    pub fn sync(&self) -> Result<()> {
        self.inner.check_open()?;
        let Some(p) = &self.inner.persistence else {
            return Ok(());
        };
        let snapshot = self.inner.snapshot.load();
        for cell in snapshot.queues.values() {
            cell.quiesce();
        }
        p.sync().map_err(|e| self.inner.store_error(e))
    }

    /// What the broker can still promise: whether it has a store, the failure that poisoned
    /// it, if one did, and the state of flow control. Once poisoned, persistent publishes to durable queues, durable
    /// declares, settles of durable queues' messages and `sync` fail with that failure; a
    /// broker opened again on the same directory starts from what was durable.
    pub fn health(&self) -> Health {
        let store_failure = self
            .inner
            .persistence
            .as_ref()
            .and_then(|p| p.check().err());
        let flow = &self.inner.flow;
        let memory_bytes = {
            let snapshot = self.inner.snapshot.load();
            snapshot
                .queues
                .values()
                .map(|cell| cell.memory_bytes())
                .sum()
        };
        Health {
            durable: self.inner.persistence.is_some(),
            store_failure,
            memory_bytes,
            memory_high_watermark_bytes: self.inner.limits.memory_high_watermark_bytes,
            store_backlog_bytes: flow.backlog_bytes(),
            publishers_blocked: flow.is_blocked(),
        }
    }

    /// Copies of queue `name`'s waiting messages in delivery order, without taking them;
    /// `None` if there is no such queue.
    pub(crate) fn peek(&self, name: &str) -> Option<Vec<crate::core::queue::Entry>> {
        let cell = {
            let snapshot = self.inner.snapshot.load();
            let meta = snapshot.topology.queue(name)?;
            snapshot.queues.get(&meta.id)?.clone()
        };
        let guard = cell.lock();
        Some(guard.core.ready_entries().cloned().collect())
    }

    /// Runs `f` while holding queue `name`'s lock, as a long purge or delivery would; `None`
    /// if there is no such queue. For tests of what happens meanwhile.
    #[doc(hidden)]
    pub fn with_queue_locked<R>(&self, name: &str, f: impl FnOnce() -> R) -> Option<R> {
        let cell = {
            let snapshot = self.inner.snapshot.load();
            let meta = snapshot.topology.queue(name)?;
            snapshot.queues.get(&meta.id)?.clone()
        };
        let guard = cell.lock();
        let result = f();
        drop(guard);
        Some(result)
    }

    /// Compacts the store now: copies the live records into fresh storage and removes the old
    /// copy, so the disk space of removed messages goes back to the file system (sled keeps it
    /// otherwise; see "Compaction" on [`SledStore`]). No message or definition changes. Acks
    /// that wait in a queue's inbox are written first (as for [`Broker::sync`]), then the
    /// compaction runs after everything sent to the store before it; writes wait while it
    /// runs, for a time that grows with the live data (~1 s per 100,000 small messages),
    /// not with the space given back. Returns what it did (zeroed in memory).
    ///
    /// The broker also compacts by itself, once most of the store's space is no longer live
    /// ([`COMPACT_FLOOR_BYTES`](crate::store::COMPACT_FLOOR_BYTES),
    /// [`COMPACT_LIVE_RATIO`](crate::store::COMPACT_LIVE_RATIO)) and its store has been idle
    /// for a moment.
    ///
    /// A compaction that failed before its switch (no space for the copy, ...) returns
    /// [`StoreError::Compaction`](crate::store::StoreError::Compaction) and leaves the store
    /// as it was, usable.
    pub fn compact_store(&self) -> Result<CompactStats> {
        Ok(self.compact(false)?.unwrap_or_default())
    }

    /// Compacts the store if it says a compaction is due (what the broker does by itself when
    /// idle, without the wait); `None` if not due. For tests of when compaction happens.
    #[doc(hidden)]
    pub fn compact_store_if_due(&self) -> Result<Option<CompactStats>> {
        self.compact(true)
    }

    fn compact(&self, if_due: bool) -> Result<Option<CompactStats>> {
        self.inner.check_open()?;
        let Some(p) = &self.inner.persistence else {
            return Ok(None);
        };
        let snapshot = self.inner.snapshot.load();
        for cell in snapshot.queues.values() {
            cell.quiesce();
        }
        p.compact(if_due).map_err(|e| self.inner.store_error(e))
    }

    /// Bytes the store occupies on disk (0 in memory): for the sled store, its active
    /// generation's log and blob files.
    pub fn size_on_disk(&self) -> Result<u64> {
        self.inner.check_open()?;
        match self.inner.persistence.as_ref().and_then(|p| p.store()) {
            Some(store) => Ok(store.size_on_disk()?),
            None => Ok(0),
        }
    }

    /// Closes the broker (see "Closing" above): every connection, the broker's threads, and
    /// the store, after writing and flushing everything to it; its directory is released when
    /// this returns. Returns the storage error if that last flush failed (or the store had
    /// failed before). Closing again returns what the first close returned; a close that
    /// races with another waits for it.
    pub fn close(&self) -> Result<()> {
        self.inner.close()
    }

    /// Whether the broker is closed.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// A snapshot of every queue (sizes, counters, rates, error rate, processing time) and of
    /// the broker (connections, channels, memory, flow control); see [`crate::stats`] for
    /// what each figure means and [`BrokerStats::to_prometheus`] for Prometheus. It takes no
    /// lock that publishing, delivering or settling take, so it may be called as often as a
    /// progress line needs; rates are computed against earlier snapshots.
    pub fn stats(&self) -> BrokerStats {
        self.inner.stats()
    }

    /// The broker without keeping it open (for servers that only observe it).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn downgrade(&self) -> Weak<BrokerInner> {
        Arc::downgrade(&self.inner)
    }

    /// Dead-letterings and drops of queue `name` since it was declared (or recovered);
    /// `None` if there is no such queue.
    pub fn death_stats(&self, name: &str) -> Option<DeathStats> {
        let snap = self.inner.snapshot.load();
        let meta = snap.topology.queue(name)?;
        let cell = snap.queues.get(&meta.id)?;
        Some(DeathStats {
            held: cell.held_len() as u64,
            ..cell.deaths.stats()
        })
    }

    /// The earliest time a timer of the broker is due (message or queue expiry, a held dead
    /// letter's retry).
    pub(crate) fn next_timer_ms(&self) -> Option<u64> {
        self.inner.timers.next_due()
    }

    /// Writes the store's pending records (a broker built with `stepped_store`); returns the
    /// jobs written.
    pub(crate) fn run_pending_writes(&self) -> usize {
        self.inner
            .persistence
            .as_ref()
            .map_or(0, |p| p.run_pending())
    }

    /// The broker's own handle of its trace, if it keeps one.
    pub(crate) fn trace_handle(&self) -> Option<Trace> {
        self.inner.trace.clone()
    }

    /// Records waiting to be written (a broker built with `stepped_store`).
    pub(crate) fn pending_writes(&self) -> usize {
        self.inner.persistence.as_ref().map_or(0, |p| p.pending())
    }

    /// Runs the timers due now (a manual clock runs them only when it moves).
    pub(crate) fn run_due_timers(&self) {
        self.inner.timers.run_due(self.inner.clock.now_ms());
    }

    /// A builder for a broker with a chosen clock, limits or seed.
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder::default()
    }

    /// Opens a connection. It owns its exclusive queues; it closes once it and its channels
    /// are dropped. On a closed broker the connection is closed already (its `channel()`
    /// fails with [`CloseCause::BrokerClosed`]).
    pub fn connect(&self) -> Connection {
        Connection::open(self.inner.clone(), DEFAULT_USER)
    }

    /// Opens a connection acting as `user` (as a client logs in as a user): a message
    /// published on it with a `user_id` property that names anyone else is refused, as
    /// RabbitMQ validates `user_id` (406 PRECONDITION_FAILED, a channel error). There are no
    /// passwords or permissions. [`Broker::connect`] acts as RabbitMQ's default user,
    /// `guest`.
    pub fn connect_as(&self, user: &str) -> Connection {
        Connection::open(self.inner.clone(), user)
    }

    /// Walks the whole broker and checks every invariant of the core (queues, channels,
    /// topology) and across them: each channel's unacked deliveries are held by their queue and
    /// each queue's unacked count equals the deliveries channels hold for it.
    ///
    /// Takes every lock, so call it when the broker is quiet (tests, simulation steps).
    pub fn check_invariants(&self) -> Result<(), String> {
        let _admin = self.inner.admin.lock();
        let snap = self.inner.snapshot.load_full();
        snap.topology.check_invariants()?;
        let mut ids: Vec<&QueueId> = snap.queues.keys().collect();
        ids.sort();
        let mut guards = Vec::new();
        for id in ids {
            let cell = &snap.queues[id];
            let g = cell.lock();
            g.core
                .check_invariants()
                .map_err(|e| format!("queue '{}': {e}", cell.meta.name))?;
            guards.push((*id, g));
        }
        let channels: Vec<Arc<channel::ChannelInner>> = {
            let mut reg = self.inner.channels.lock();
            reg.retain(|_, w| w.strong_count() > 0);
            let mut v: Vec<_> = reg.values().filter_map(Weak::upgrade).collect();
            v.sort_by_key(|c| c.id);
            v
        };
        let mut held: HashMap<QueueId, u64> = HashMap::new();
        for ch in &channels {
            let st = ch.state.lock();
            st.check_invariants()
                .map_err(|e| format!("channel {}: {e}", ch.id))?;
            let counted = st.ledger().filter(|(_, o)| o.counted).count() as u64;
            if counted != ch.global_in_flight() {
                return Err(format!(
                    "channel {}: {counted} counted deliveries but {} reserved",
                    ch.id,
                    ch.global_in_flight()
                ));
            }
            for (tag, o) in st.ledger() {
                *held.entry(o.queue).or_default() += 1;
                if let Some((_, g)) = guards.iter().find(|(id, _)| *id == o.queue)
                    && !g.core.holds_unacked(o.seq)
                {
                    return Err(format!(
                        "channel {} tag {tag}: queue does not hold seq {}",
                        ch.id, o.seq
                    ));
                }
            }
        }
        for (id, g) in &guards {
            let h = held.get(id).copied().unwrap_or(0);
            if g.core.unacked_len() != h {
                return Err(format!(
                    "queue {:?}: {} unacked but channels hold {h}",
                    id,
                    g.core.unacked_len()
                ));
            }
        }
        Ok(())
    }
}

pub(crate) struct BrokerInner {
    /// This broker, for queues that dead-letter into it.
    me: Weak<BrokerInner>,
    snapshot: ArcSwap<Snapshot>,
    admin: Mutex<Admin>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    next_id: AtomicU64,
    channels: Mutex<HashMap<u64, Weak<channel::ChannelInner>>>,
    /// Open connections, closed by [`BrokerInner::close`]; a connection removes itself when
    /// it closes.
    connections: Mutex<HashMap<u64, Weak<connection::ConnectionInner>>>,
    /// Set once, at the start of the close; read without a lock.
    closed: AtomicBool,
    /// The first close's outcome; its lock serialises closes.
    close_outcome: Mutex<Option<Result<()>>>,
    persistence: Option<Arc<Persistence>>,
    timers: Arc<Timers>,
    flow: Arc<flow::FlowControl>,
    /// Direct reply-to consumers, by address.
    replies: reply_to::ReplyRoutes,
    /// Earlier `stats()` snapshots, for rates.
    rates: Mutex<monitor::RateSamples>,
    /// Where to record what happens, if anywhere.
    pub(crate) trace: Option<Trace>,
}

impl BrokerInner {
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// What a queue created now needs from the broker.
    fn queue_env(&self) -> QueueEnv {
        QueueEnv {
            broker: self.me.clone(),
            clock: self.clock.clone(),
            timers: self.timers.clone(),
            flow: self.flow.clone(),
            trace: self.trace.clone(),
        }
    }
}

impl BrokerInner {
    /// Whether the broker is closed.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Registers a connection, unless the broker is closed (then `false`). Under the
    /// registry's lock, so a close sees every connection opened before it.
    fn register_connection(&self, conn: &Arc<connection::ConnectionInner>) -> bool {
        let mut reg = self.connections.lock();
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        reg.insert(conn.id.0, Arc::downgrade(conn));
        true
    }

    /// A store call's failure: [`Error::BrokerClosed`] if the broker closed meanwhile (the
    /// flusher stopped before it got to the call).
    fn store_error(&self, e: crate::store::StoreError) -> Error {
        if self.closed.load(Ordering::Acquire) {
            Error::BrokerClosed
        } else {
            Error::Storage(e)
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::BrokerClosed);
        }
        Ok(())
    }

    /// Closes the broker: connections first (their channels requeue, and the requeues reach
    /// the store's queue), then the timers, then the store (everything written and flushed,
    /// the flusher stopped, the directory released), then flow control lets any waiting
    /// publisher go (to find its channel closed).
    fn close(&self) -> Result<()> {
        let mut outcome = self.close_outcome.lock();
        if let Some(done) = &*outcome {
            return done.clone();
        }
        let connections: Vec<_> = {
            let reg = self.connections.lock();
            self.closed.store(true, Ordering::Release);
            reg.values().filter_map(Weak::upgrade).collect()
        };
        let cause = Arc::new(CloseCause::BrokerClosed);
        for conn in connections {
            conn.close(cause.clone());
        }
        self.timers.shutdown();
        let result = match &self.persistence {
            Some(p) => {
                let snapshot = self.snapshot.load();
                for cell in snapshot.queues.values() {
                    cell.quiesce();
                }
                p.close().map_err(Error::Storage)
            }
            None => Ok(()),
        };
        self.flow.shutdown();
        *outcome = Some(result.clone());
        result
    }
}

impl Drop for BrokerInner {
    fn drop(&mut self) {
        self.timers.stop();
    }
}

/// What publish reads: the topology and the queue cells. Every change publishes a new one;
/// both parts are persistent, so the new one shares all but the changed paths with the old.
#[derive(Clone)]
pub(crate) struct Snapshot {
    topology: Topology,
    queues: Map<QueueId, Arc<QueueCell>>,
}

/// State only touched under the admin lock (topology changes).
pub(crate) struct Admin {
    rng: SplitMix64,
    /// Policies, in name order.
    policies: Vec<policy::Compiled>,
}

/// splitmix64: small, seedable, good enough for server-generated names.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `prefix` + base64url (no padding) of 16 random bytes: 22 characters.
    fn name(&mut self, prefix: &str) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        bytes[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        let mut out = String::with_capacity(prefix.len() + 22);
        out.push_str(prefix);
        let mut acc = 0u32;
        let mut bits = 0;
        for b in bytes {
            acc = (acc << 8) | u32::from(b);
            bits += 8;
            while bits >= 6 {
                bits -= 6;
                out.push(char::from(ALPHABET[((acc >> bits) & 63) as usize]));
            }
        }
        if bits > 0 {
            out.push(char::from(ALPHABET[((acc << (6 - bits)) & 63) as usize]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_have_rabbitmq_shape() {
        let mut rng = SplitMix64(7);
        let name = rng.name("amq.gen-");
        assert_eq!(name.len(), 30);
        assert!(
            name[8..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_ne!(name, rng.name("amq.gen-"));
    }
}
