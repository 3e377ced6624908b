//! A queue as the runtime holds it: the core state machine behind its own mutex, a lock-free
//! inbox for publishes, and the senders of its consumers. Carries out what the core decides.
//!
//! Publishing and settling never wait for the queue's lock: if it is taken, the command goes
//! into the inbox, and the current holder applies it as it releases the lock. Every lock
//! acquisition drains the inbox first, so whatever a thread published or settled before is
//! visible to what it does next, in the order it did it.
//!
//! A command in the inbox (or a dead letter waiting to be routed) may still owe the store a
//! record: an ack's removal, a dead letter's move. `Broker::sync` first has every queue hand
//! such records to the flusher ([`QueueCell::quiesce`]), then asks the flusher for durability:
//! an ack made before a sync is durable when the sync returns, whoever held the queue's lock.
//! `in_flight` counts queued commands until their records are sent, so a sync skips idle
//! queues without touching their locks.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, OnceLock, Weak};

use arc_swap::ArcSwapOption;
use crossbeam_channel::Sender;
use crossbeam_queue::SegQueue;
use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};
use rustc_hash::FxHashMap as HashMap;
use smallvec::SmallVec;

use super::BrokerInner;
use super::channel::ChannelInner;
use super::consumer::{Delivery, Pending};
use super::flow::{FlowControl, message_memory_bytes};
use super::metrics::{Delivered, QueueMetrics, Settled};
use super::persist::{Job, Persistence};
use super::timer::{TimerKind, Timers};
use crate::clock::Clock;
use crate::core::channel::ChannelState;
use crate::core::queue::dead_letter::{DeadLetterTarget, DeathReason};
use crate::core::queue::expiration::parse_expiration;
use crate::core::queue::{
    ConsumerId, Dispatch, Effect, Entry, Overflow, PolicyDefinition, Queue, QueueConfig, QueueKind,
    Removal, Requeue, RequeueTo,
};
use crate::core::topology::QueueMeta;
use crate::sim::trace::{Event, Trace};
use crate::types::Message;

/// What settles a set of unacked messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    Ack,
    /// The client sent them back: nack or reject with requeue, `basic.recover`.
    Requeue,
    /// Their holder went away (channel closed, a consumer's receiver dropped): back to the
    /// queue as returns (a quorum queue serves them first), never re-appended at the tail.
    Return,
    Reject,
}

pub(crate) struct QueueCell {
    pub(crate) meta: Arc<QueueMeta>,
    /// What its arguments and policy make of it (TTL, limits); read off the hot paths only,
    /// which use the flags below.
    config: Mutex<QueueConfig>,
    /// Its type (arguments only, never changes).
    kind: QueueKind,
    /// Whether messages need their enqueue time (the queue has a message TTL); otherwise
    /// publish skips reading the clock.
    timed: AtomicBool,
    /// Whether a publish may be refused by a length limit (decided under the queue's lock).
    refuses: AtomicBool,
    /// `x-expires` in milliseconds (0: none).
    expires_ms: AtomicU64,
    /// The store, for a durable queue.
    persist: Option<Arc<Persistence>>,
    /// Where its dead letters go (`x-dead-letter-exchange`), if anywhere.
    dead_letter: ArcSwapOption<DeadLetterTarget>,
    /// Messages removed for a dead-letter reason, routed by whoever releases the lock next.
    dead: SegQueue<DeadLetter>,
    /// Whether its dead letters are at-least-once ([`QueueConfig::at_least_once`]).
    at_least_once: AtomicBool,
    /// At-least-once dead letters that did not reach every target yet, waiting for the retry
    /// timer.
    held: Mutex<Vec<DeadLetter>>,
    /// Whether a dead-letter retry timer is pending.
    retry_timer: AtomicBool,
    /// The broker it belongs to: its clock, timers, and where dead letters are routed.
    env: OnceLock<QueueEnv>,
    /// This cell, for its timers.
    me: Weak<QueueCell>,
    /// The earliest message-expiry timer pending (`u64::MAX`: none).
    expiry_timer: AtomicU64,
    /// Whether an `x-expires` timer is pending.
    lease_timer: AtomicBool,
    /// When the queue was last used (`x-expires`, §7.2).
    last_used_ms: AtomicU64,
    /// Dead-letterings and drops, per reason.
    pub(crate) deaths: DeathCounts,
    /// Publishes, deliveries, settles and processing times, for `Broker::stats`.
    pub(crate) metrics: QueueMetrics,
    /// Sequence numbers are reserved at publish, before the queue's lock is taken.
    next_seq: AtomicU64,
    /// Commands queued in `inbox` or `dead` whose records may not have reached the flusher yet.
    /// Raised before a command is queued, lowered once whatever it sends to the store is sent.
    in_flight: AtomicU64,
    /// Held while routing dead letters: one router at a time, and `quiesce` waits for it.
    routing: Mutex<()>,
    /// The memory estimate of this queue's messages (`message_memory_bytes`), brought up to
    /// date each time the lock is released.
    memory_bytes: AtomicU64,
    /// The part of `memory_bytes` added to the broker's flow control: passed on in steps of at
    /// least [`MEMORY_REPORT_STEP_BYTES`] (and exactly when the queue empties), so publishers
    /// and consumers on different threads do not write one shared counter per message.
    memory_reported: AtomicU64,
    inbox: CachePadded<SegQueue<Inbound>>,
    state: CachePadded<Mutex<QueueShared>>,
}

pub(crate) struct QueueShared {
    pub(crate) core: Queue,
    pub(crate) sinks: HashMap<ConsumerId, Sink>,
    /// Set once the queue is deleted; an old snapshot may still lead here.
    pub(crate) deleted: bool,
    /// Processing times (microseconds) of settles since the lock was last released, on their
    /// way to the histogram in `metrics`.
    samples: Vec<u64>,
}

/// Where a consumer's deliveries go.
pub(crate) struct Sink {
    pub(crate) tx: Sender<Pending>,
    pub(crate) channel: Arc<ChannelInner>,
    pub(crate) tag: Arc<str>,
}

/// Where a queue's dead letters go under its arguments and policy.
fn dead_letter_target(
    meta: &QueueMeta,
    policy: Option<&PolicyDefinition>,
) -> Option<DeadLetterTarget> {
    DeadLetterTarget::resolve(
        &meta.arguments,
        policy.and_then(|p| p.dead_letter_exchange.as_deref()),
        policy.and_then(|p| p.dead_letter_routing_key.as_deref()),
    )
}

/// What a queue needs from its broker.
pub(crate) struct QueueEnv {
    pub(crate) broker: Weak<BrokerInner>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) timers: Arc<Timers>,
    pub(crate) flow: Arc<FlowControl>,
    pub(crate) trace: Option<Trace>,
}

/// How many messages a queue dead-lettered and dropped, per reason (SEMANTICS.md §5.2).
#[derive(Default)]
pub(crate) struct DeathCounts {
    dead_lettered: [AtomicU64; 4],
    dropped: [AtomicU64; 4],
}

impl DeathCounts {
    pub(crate) fn count(&self, reason: DeathReason, dead_lettered: bool) {
        let counters = if dead_lettered {
            &self.dead_lettered
        } else {
            &self.dropped
        };
        counters[reason_index(reason)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> super::DeathStats {
        let read = |c: &[AtomicU64; 4]| super::ReasonCounts {
            rejected: c[0].load(Ordering::Relaxed),
            expired: c[1].load(Ordering::Relaxed),
            maxlen: c[2].load(Ordering::Relaxed),
            delivery_limit: c[3].load(Ordering::Relaxed),
        };
        super::DeathStats {
            dead_lettered: read(&self.dead_lettered),
            dropped: read(&self.dropped),
            held: 0,
        }
    }
}

fn reason_index(reason: DeathReason) -> usize {
    match reason {
        DeathReason::Rejected => 0,
        DeathReason::Expired => 1,
        DeathReason::Maxlen => 2,
        DeathReason::DeliveryLimit => 3,
    }
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Drop for QueueCell {
    /// A deleted queue's messages no longer count against the memory watermark.
    fn drop(&mut self) {
        let reported = *self.memory_reported.get_mut();
        if let Some(env) = self.env.get() {
            env.flow.add_memory(-signed(reported));
        }
    }
}

/// How far a queue's memory estimate may drift from what it reported to the broker's flow
/// control before it reports again. The broker-wide count the watermark is compared with may
/// therefore lag by up to this much per queue holding messages; `Broker::health` adds up the
/// exact figures.
const MEMORY_REPORT_STEP_BYTES: u64 = 64 * 1024;

/// Dead letters one router takes per turn of the routing lock.
const DEAD_LETTERS_PER_TURN: usize = 64;

/// A message on its way to the dead-letter exchange, with what earlier attempts achieved
/// (at-least-once dead-lettering).
pub(crate) struct DeadLetter {
    pub(crate) entry: Entry,
    pub(crate) reason: DeathReason,
    /// The target queues that already have it.
    pub(crate) delivered: SmallVec<[crate::core::channel::QueueId; 2]>,
    /// Whether its record already says its dead-lettering is pending.
    pub(crate) marked: bool,
}

impl DeadLetter {
    fn new(entry: Entry, reason: DeathReason) -> Self {
        Self {
            entry,
            reason,
            delivered: SmallVec::new(),
            marked: false,
        }
    }
}

/// A command that found the queue's lock taken.
enum Inbound {
    Publish(Entry),
    /// A settle, with the time it was made (for the processing time; 0 when not measured).
    Settle(u64, Settle, u64),
}

/// The queue's lock. Drains the inbox when taken and again when released, so no publish is
/// left behind by a holder.
pub(crate) struct QueueGuard<'a> {
    cell: &'a QueueCell,
    guard: Option<MutexGuard<'a, QueueShared>>,
}

impl Deref for QueueGuard<'_> {
    type Target = QueueShared;

    fn deref(&self) -> &QueueShared {
        self.guard.as_ref().expect("held until drop")
    }
}

impl DerefMut for QueueGuard<'_> {
    fn deref_mut(&mut self) -> &mut QueueShared {
        self.guard.as_mut().expect("held until drop")
    }
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        let mut g = self.guard.take().expect("held until drop");
        self.cell.drain_inbox(&mut g);
        self.cell.account(&mut g);
        drop(g);
        self.cell.drain_unlocked();
    }
}

impl QueueCell {
    /// Attaches the queue to its broker (once, right after creation) and starts its timers:
    /// the expiry of recovered messages and the queue's own lease.
    pub(crate) fn attach(&self, env: QueueEnv) {
        let now = env.clock.now_ms();
        self.metrics.created_ms.store(now, Ordering::Relaxed);
        let _ = self.env.set(env);
        self.last_used_ms.store(now, Ordering::Relaxed);
        self.renew_lease();
        // Recovered messages that expired meanwhile go when this timer runs (the broker is
        // not built yet, so they could not be dead-lettered now).
        self.schedule_expiry(&self.lock());
        self.schedule_retry();
    }

    /// Routes the dead letters waiting (called without the queue's lock). Without a broker
    /// (it is shutting down) they are dropped.
    fn route_dead_letters(&self) {
        loop {
            fence(Ordering::SeqCst);
            if self.dead.is_empty() {
                return;
            }
            // One router at a time; whoever holds it checks again after letting go, so an
            // entry pushed meanwhile is not left behind.
            let Some(routing) = self.routing.try_lock() else {
                return;
            };
            self.route_some_dead_letters();
            drop(routing);
        }
    }

    /// Routes at most [`DEAD_LETTERS_PER_TURN`] queued dead letters (the caller holds
    /// `routing`), so a `quiesce` waiting for the routing lock gets it under a steady stream.
    fn route_some_dead_letters(&self) {
        let broker = self.env.get().and_then(|e| e.broker.upgrade());
        let target = self.dead_letter.load_full();
        for _ in 0..DEAD_LETTERS_PER_TURN {
            let Some(dead) = self.dead.pop() else {
                return;
            };
            let at_least_once = self.at_least_once.load(Ordering::Relaxed);
            match (&broker, &target) {
                (Some(b), Some(target)) => {
                    if let Some(held) = b.dead_letter(self, target, dead, at_least_once) {
                        self.hold(held);
                    }
                }
                // Closing: an at-least-once dead letter keeps its record for the next open.
                _ if at_least_once => {}
                _ => self.dropped(&dead.entry, dead.reason, "broker closing"),
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Brings this queue's memory estimate up to date, and the broker's when it drifted far
    /// enough. Called with the lock held, before each release.
    fn account(&self, s: &mut QueueShared) {
        self.metrics.set_gauges(
            s.core.ready_len(),
            s.core.unacked_len(),
            u64::from(s.core.consumer_count()),
        );
        self.metrics.record(&mut s.samples);
        let now = message_memory_bytes(&s.core);
        self.memory_bytes.store(now, Ordering::Relaxed);
        let reported = self.memory_reported.load(Ordering::Relaxed);
        let due = now.abs_diff(reported) >= MEMORY_REPORT_STEP_BYTES || (now == 0 && reported != 0);
        if due && let Some(env) = self.env.get() {
            self.memory_reported.store(now, Ordering::Relaxed);
            env.flow.add_memory(signed(now) - signed(reported));
        }
    }

    /// The memory estimate of this queue's messages as of its last lock release.
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.memory_bytes.load(Ordering::Relaxed)
    }

    /// Returns once every command queued for this queue before the call (a settle or a
    /// publish in the inbox, a dead letter waiting to be routed) has sent its records to the
    /// flusher. Takes the queue's lock if any may be pending (its holder applies the inbox as
    /// it releases it), then the routing lock (a router in progress finishes its turn) and
    /// routes what is left itself. Never waits for commands queued after it started.
    pub(crate) fn quiesce(&self) {
        if self.in_flight.load(Ordering::SeqCst) == 0 {
            return;
        }
        drop(self.lock());
        let routing = self.routing.lock();
        while !self.dead.is_empty() {
            self.route_some_dead_letters();
        }
        drop(routing);
    }

    /// Holds an at-least-once dead letter that did not reach every target: it counts toward
    /// the length limits, its record says so (once), and it is tried again when the retry
    /// timer fires.
    fn hold(&self, mut dead: DeadLetter) {
        let mut g = self.lock();
        if g.deleted {
            return; // its record went with the queue
        }
        g.core.handle_hold(&dead.entry);
        drop(g);
        if !dead.marked
            && let Some(p) = &self.persist
            && dead.entry.message.properties.is_persistent()
        {
            dead.marked = true;
            p.send(Job::Requeued {
                queue: self.meta.id.0,
                seq: dead.entry.seq,
                message: dead.entry.message.clone(),
                delivery_count: dead.entry.delivery_count,
                enqueued_at_ms: dead.entry.enqueued_at_ms,
                held: Some(dead.reason),
            });
        }
        self.held.lock().push(dead);
        self.schedule_retry();
    }

    /// Puts back recovered dead letters whose at-least-once dead-lettering was pending: held
    /// again, tried when the retry timer first fires.
    pub(crate) fn restore_held(&self, held: Vec<(Entry, DeathReason)>) {
        let mut g = self.lock();
        let mut next = self.next_seq.load(Ordering::Relaxed);
        let mut list = self.held.lock();
        for (entry, reason) in held {
            next = next.max(entry.seq + 1);
            g.core.handle_hold(&entry);
            list.push(DeadLetter {
                entry,
                reason,
                delivered: SmallVec::new(),
                marked: true,
            });
        }
        self.next_seq.store(next, Ordering::Relaxed);
    }

    fn schedule_retry(&self) {
        let Some(env) = self.env.get() else {
            return; // scheduled when the queue is attached
        };
        if self.held.lock().is_empty() || self.retry_timer.swap(true, Ordering::AcqRel) {
            return;
        }
        let interval = env
            .broker
            .upgrade()
            .map_or(0, |b| b.limits.dead_letter_retry_ms);
        let at = env.clock.now_ms().saturating_add(interval);
        env.timers
            .schedule(at, self.me.clone(), TimerKind::DeadLetterRetry);
    }

    /// The held dead letters go back to be routed again.
    fn retry_held(&self) {
        self.retry_timer.store(false, Ordering::Release);
        let held = std::mem::take(&mut *self.held.lock());
        if held.is_empty() {
            return;
        }
        let mut g = self.lock();
        for dead in held {
            g.core.handle_release(&dead.entry);
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            self.dead.push(dead);
        }
        drop(g); // routes them as it releases the lock
        self.route_dead_letters();
    }

    /// Drops every held dead letter (the queue stopped being at-least-once: RabbitMQ drops
    /// pending dead letters when the strategy changes away).
    fn drop_held(&self, g: &mut QueueShared) {
        for dead in std::mem::take(&mut *self.held.lock()) {
            g.core.handle_release(&dead.entry);
            self.dropped(&dead.entry, dead.reason, "dead-letter strategy changed");
        }
    }

    /// Dead letters held for at-least-once dead-lettering.
    pub(crate) fn held_len(&self) -> usize {
        self.held.lock().len()
    }

    /// A message left for good without being dead-lettered: counted, logged as a warning (it
    /// is lost), its record gone.
    pub(crate) fn dropped(&self, entry: &Entry, reason: DeathReason, why: &'static str) {
        self.deaths.count(reason, false);
        self.trace(|queue| Event::Drop {
            queue: queue.into(),
            seq: entry.seq,
            reason: reason.as_str().into(),
        });
        tracing::warn!(
            queue = &*self.meta.name,
            reason = reason.as_str(),
            message_id = entry.message.properties.message_id.as_deref().unwrap_or(""),
            why,
            "message dropped"
        );
        self.forget(entry);
    }

    /// Whether the broker keeps a trace.
    #[inline]
    pub(crate) fn tracing(&self) -> bool {
        self.env.get().is_some_and(|e| e.trace.is_some())
    }

    /// Records the event `event` makes, if the broker keeps a trace.
    #[inline]
    pub(crate) fn trace(&self, event: impl FnOnce(&str) -> Event) {
        if let Some(trace) = self.env.get().and_then(|e| e.trace.as_ref()) {
            trace.record(event(&self.meta.name));
        }
    }

    /// The broker's time (0 before the queue is attached).
    pub(crate) fn now_ms(&self) -> u64 {
        self.env.get().map_or(0, |e| e.clock.now_ms())
    }

    /// The broker's clock in microseconds, for processing times: at least 1, as 0 means "not
    /// measured" (and is what it returns before the queue is attached).
    fn now_us(&self) -> u64 {
        self.env.get().map_or(0, |e| e.clock.now_us().max(1))
    }

    /// The queue was used (declared, consumed from, fetched from): its `x-expires` lease starts
    /// again.
    pub(crate) fn touch(&self) {
        if self.expires_ms.load(Ordering::Relaxed) != 0 {
            self.last_used_ms.store(self.now_ms(), Ordering::Relaxed);
            self.renew_lease();
        }
    }

    /// Schedules the lease check unless one is pending (a pending one reschedules itself).
    fn renew_lease(&self) {
        let expires = self.expires_ms.load(Ordering::Relaxed);
        let Some(env) = self.env.get().filter(|_| expires != 0) else {
            return;
        };
        if !self.lease_timer.swap(true, Ordering::AcqRel) {
            let at = self
                .last_used_ms
                .load(Ordering::Relaxed)
                .saturating_add(expires);
            env.timers
                .schedule(at, self.me.clone(), TimerKind::QueueExpiry);
        }
    }

    /// Schedules the expiry of the message next in line, unless an earlier timer is pending.
    fn schedule_expiry(&self, s: &QueueShared) {
        let (Some(at), Some(env)) = (s.core.next_deadline(), self.env.get()) else {
            return;
        };
        if at < self.expiry_timer.fetch_min(at, Ordering::AcqRel) {
            env.timers
                .schedule(at, self.me.clone(), TimerKind::MessageExpiry);
        }
    }

    /// A timer of this queue is due.
    pub(crate) fn on_timer(&self, kind: TimerKind) {
        match kind {
            TimerKind::MessageExpiry => {
                self.expiry_timer.store(u64::MAX, Ordering::Release);
                let mut g = self.lock();
                if !g.deleted {
                    self.dispatch(&mut g);
                }
            }
            TimerKind::DeadLetterRetry => self.retry_held(),
            TimerKind::QueueExpiry => {
                self.lease_timer.store(false, Ordering::Release);
                let Some(env) = self.env.get() else { return };
                let unused = self.lock().core.consumer_count() == 0;
                if !unused {
                    return; // renewed when its last consumer goes
                }
                let expires = self.expires_ms.load(Ordering::Relaxed);
                if expires == 0 {
                    return; // a policy change removed it
                }
                let due = self
                    .last_used_ms
                    .load(Ordering::Relaxed)
                    .saturating_add(expires);
                if env.clock.now_ms() < due {
                    self.renew_lease();
                } else if let Some(broker) = env.broker.upgrade() {
                    let _ = broker.expire_queue(self.meta.id, due);
                }
            }
        }
    }

    /// When the queue was last used (`x-expires`).
    pub(crate) fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }
}

impl QueueCell {
    pub(crate) fn new(
        meta: Arc<QueueMeta>,
        persist: Option<Arc<Persistence>>,
        policy: Option<&PolicyDefinition>,
    ) -> Arc<Self> {
        let config = QueueConfig::resolve(&meta.arguments, policy);
        let dead_letter = dead_letter_target(&meta, policy);
        Arc::new_cyclic(|me| Self {
            persist,
            dead_letter: ArcSwapOption::from(dead_letter.map(Arc::new)),
            dead: SegQueue::new(),
            at_least_once: AtomicBool::new(config.at_least_once),
            held: Mutex::new(Vec::new()),
            retry_timer: AtomicBool::new(false),
            env: OnceLock::new(),
            me: me.clone(),
            expiry_timer: AtomicU64::new(u64::MAX),
            lease_timer: AtomicBool::new(false),
            last_used_ms: AtomicU64::new(0),
            deaths: DeathCounts::default(),
            metrics: QueueMetrics::new(),
            timed: AtomicBool::new(config.message_ttl.is_some()),
            refuses: AtomicBool::new(config.refuses_publishes()),
            expires_ms: AtomicU64::new(config.expires.unwrap_or(0)),
            kind: config.kind,
            config: Mutex::new(config),
            meta,
            next_seq: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            routing: Mutex::new(()),
            memory_bytes: AtomicU64::new(0),
            memory_reported: AtomicU64::new(0),
            inbox: CachePadded::new(SegQueue::new()),
            state: CachePadded::new(Mutex::new(QueueShared {
                core: Queue::with_config(config),
                sinks: HashMap::default(),
                deleted: false,
                samples: Vec::new(),
            })),
        })
    }

    /// Whether the queue is a quorum queue (deliveries carry `x-delivery-count`).
    pub(crate) fn is_quorum(&self) -> bool {
        self.kind == QueueKind::Quorum
    }

    /// Whether messages entering it need the time (it has a message TTL).
    pub(crate) fn timed(&self) -> bool {
        self.timed.load(Ordering::Relaxed)
    }

    /// Whether a publish may be refused (a length limit with a reject overflow mode).
    pub(crate) fn refuses_publishes(&self) -> bool {
        self.refuses.load(Ordering::Relaxed)
    }

    /// Its configuration now.
    pub(crate) fn config(&self) -> QueueConfig {
        *self.config.lock()
    }

    /// Applies a policy (or its removal): the new TTL applies to messages entering from now
    /// on, a lower `drop-head` limit drops from the head at once, and the dead-letter target
    /// changes for messages removed from now on.
    pub(crate) fn apply_policy(&self, policy: Option<&PolicyDefinition>) {
        let config = QueueConfig::resolve(&self.meta.arguments, policy);
        let dead_letter = dead_letter_target(&self.meta, policy);
        if *self.config.lock() == config
            && self.dead_letter.load().as_deref() == dead_letter.as_ref()
        {
            return; // the policy does not touch this queue
        }
        let mut g = self.lock();
        *self.config.lock() = config;
        self.timed
            .store(config.message_ttl.is_some(), Ordering::Relaxed);
        self.refuses
            .store(config.refuses_publishes(), Ordering::Relaxed);
        self.expires_ms
            .store(config.expires.unwrap_or(0), Ordering::Relaxed);
        self.dead_letter.store(dead_letter.map(Arc::new));
        let was_at_least_once = self
            .at_least_once
            .swap(config.at_least_once, Ordering::Relaxed);
        if was_at_least_once && !config.at_least_once {
            self.drop_held(&mut g);
        }
        g.core.set_config(config);
        if !g.deleted {
            self.dispatch(&mut g);
        }
        drop(g);
        self.renew_lease();
    }

    /// Builds the entry of a message published at `now_ms` with the given per-message TTL.
    pub(crate) fn entry(
        &self,
        seq: u64,
        message: Arc<Message>,
        now_ms: u64,
        message_ttl: Option<u64>,
    ) -> Entry {
        let expires_at_ms = if self.timed() || message_ttl.is_some() {
            self.config().deadline(now_ms, message_ttl)
        } else {
            None
        };
        Entry {
            seq,
            message,
            delivered: false,
            delivery_count: 0,
            enqueued_at_ms: now_ms,
            expires_at_ms,
        }
    }

    /// Takes the queue's lock, with every publish so far applied.
    pub(crate) fn lock(&self) -> QueueGuard<'_> {
        let mut g = self.state.lock();
        self.drain_inbox(&mut g);
        QueueGuard {
            cell: self,
            guard: Some(g),
        }
    }

    /// Hands a published message to the queue without waiting for its lock: applied at once
    /// if the lock is free, else left in the inbox for the holder.
    pub(crate) fn publish(&self, entry: Entry) {
        self.metrics.published();
        if let Some(mut g) = self.state.try_lock() {
            self.drain_inbox(&mut g); // earlier publishes first
            if !g.deleted {
                g.core.handle_publish(entry);
                self.dispatch(&mut g);
            }
            self.account(&mut g);
        } else {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            self.inbox.push(Inbound::Publish(entry));
        }
        self.drain_unlocked();
    }

    /// Reserves the sequence number of the next message published to this queue.
    pub(crate) fn reserve_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// After a push or an unlock: if the inbox holds messages and the lock is free, apply them.
    /// A message pushed while another thread holds the lock is applied by that holder, which
    /// checks again after unlocking; the fences make sure one of the two sees the other.
    fn drain_unlocked(&self) {
        loop {
            fence(Ordering::SeqCst);
            if self.inbox.is_empty() {
                self.route_dead_letters();
                return;
            }
            let Some(mut g) = self.state.try_lock() else {
                return;
            };
            self.drain_inbox(&mut g);
            self.account(&mut g);
        }
    }

    fn drain_inbox(&self, s: &mut QueueShared) {
        let mut any = false;
        let mut applied = 0;
        while let Some(command) = self.inbox.pop() {
            any = true;
            applied += 1;
            // publishes to and settles of a deleted queue are dropped (§4.2)
            if !s.deleted {
                match command {
                    Inbound::Publish(entry) => _ = s.core.handle_publish(entry),
                    Inbound::Settle(seq, how, at_us) => {
                        _ = self.apply_settle(s, seq, how, at_us);
                    }
                }
            }
        }
        if applied > 0 {
            // Their records are sent: a sync no longer needs to wait for them.
            self.in_flight.fetch_sub(applied, Ordering::SeqCst);
        }
        if any {
            self.dispatch(s);
        }
    }

    /// Settles messages of this queue (in the given order) and delivers what that frees.
    pub(crate) fn settle(&self, seqs: impl Iterator<Item = u64>, how: Settle) {
        // A client's settle ends the processing of what it settles; a lost holder's does not.
        let at_us = if how == Settle::Return {
            0
        } else {
            self.now_us()
        };
        let Some(mut g) = self.state.try_lock() else {
            let seqs: SmallVec<[u64; 8]> = seqs.collect();
            self.in_flight
                .fetch_add(seqs.len() as u64, Ordering::SeqCst);
            for seq in seqs {
                self.inbox.push(Inbound::Settle(seq, how, at_us));
            }
            self.drain_unlocked();
            return;
        };
        self.drain_inbox(&mut g); // earlier commands first
        if g.deleted {
            return; // acks after a queue delete are accepted and ignored (§4.2)
        }
        let acked: SmallVec<[Entry; 1]> = seqs
            .filter_map(|seq| self.apply_settle(&mut g, seq, how, at_us))
            .collect();
        self.dispatch(&mut g);
        self.account(&mut g);
        drop(g);
        drop(acked); // the last reference to a message is often here: free it unlocked
        self.drain_unlocked();
    }

    /// Applies one settle; an acked entry is handed back to be freed outside the lock. A
    /// client's settle made at `at_us` (not 0) is counted, with its processing time.
    fn apply_settle(
        &self,
        s: &mut QueueShared,
        seq: u64,
        how: Settle,
        at_us: u64,
    ) -> Option<Entry> {
        if self.tracing() && s.core.holds_unacked(seq) {
            self.trace(|queue| {
                let queue = queue.into();
                match how {
                    Settle::Ack => Event::Ack { queue, seq },
                    Settle::Requeue => Event::Nack {
                        queue,
                        seq,
                        requeue: true,
                    },
                    Settle::Reject => Event::Nack {
                        queue,
                        seq,
                        requeue: false,
                    },
                    Settle::Return => Event::Requeue { queue, seq },
                }
            });
        }
        if at_us != 0
            && let Some(delivered_us) = s.core.delivered_at_us(seq)
        {
            s.samples.push(at_us.saturating_sub(delivered_us));
            self.metrics.settled(match how {
                Settle::Ack => Settled::Acked,
                Settle::Requeue => Settled::Nacked { requeue: true },
                Settle::Reject | Settle::Return => Settled::Nacked { requeue: false },
            });
        }
        match how {
            Settle::Ack => {
                let entry = s.core.handle_ack(seq)?;
                self.forget(&entry);
                return Some(entry);
            }
            Settle::Requeue | Settle::Return => {
                let to = if how == Settle::Requeue && s.core.config().requeues_to_tail() {
                    RequeueTo::Tail(self.reserve_seq())
                } else {
                    RequeueTo::Return
                };
                if let Some(Requeue::Back {
                    seq: now_seq,
                    message,
                    delivery_count,
                    enqueued_at_ms,
                }) = s.core.handle_requeue(seq, to)
                    && let Some(p) = &self.persist
                    && message.properties.is_persistent()
                {
                    let queue = self.meta.id.0;
                    // A re-appended message is written under its new number before the old
                    // record goes: a crash in between keeps it (twice), never loses it.
                    p.send(Job::Requeued {
                        queue,
                        seq: now_seq,
                        message,
                        delivery_count,
                        enqueued_at_ms,
                        held: None,
                    });
                    if now_seq != seq {
                        p.send(Job::Remove { queue, seq });
                    }
                }
            }
            Settle::Reject => _ = s.core.handle_reject(seq),
        }
        None
    }

    /// A message left the queue for good: its record goes too (persistent messages of durable
    /// queues).
    pub(crate) fn forget(&self, entry: &Entry) {
        if let Some(p) = &self.persist
            && entry.message.properties.is_persistent()
        {
            p.send(Job::Remove {
                queue: self.meta.id.0,
                seq: entry.seq,
            });
        }
    }

    /// Whether the queue is durable in a broker with a store: its persistent messages get
    /// records.
    pub(crate) fn has_store(&self) -> bool {
        self.persist.is_some()
    }

    /// Puts recovered messages back, in sequence order, flagged as possibly delivered (the
    /// broker cannot know whether they reached a consumer before the restart). Their deadlines
    /// are computed again from their enqueue times (`now_ms` where none was recorded).
    pub(crate) fn restore(&self, entries: impl IntoIterator<Item = Entry>, now_ms: u64) {
        let mut s = self.lock();
        let mut next = self.next_seq.load(Ordering::Relaxed);
        for mut entry in entries {
            next = next.max(entry.seq + 1);
            let ttl = entry.message.properties.expiration.as_deref();
            let ttl = ttl.and_then(|t| parse_expiration(t).ok());
            if self.timed() || ttl.is_some() {
                if entry.enqueued_at_ms == 0 {
                    entry.enqueued_at_ms = now_ms;
                }
                entry.expires_at_ms = self.config().deadline(entry.enqueued_at_ms, ttl);
            }
            s.core.handle_restore(entry);
        }
        self.next_seq.store(next, Ordering::Relaxed);
    }

    /// Hands every possible delivery to its consumer. Called with the queue locked; locks the
    /// receiving channels (queue -> channel order), each once per batch of deliveries.
    pub(crate) fn dispatch(&self, s: &mut QueueShared) {
        if s.core.ready_len() > 0 && s.core.has_acking_consumer() {
            // Deliveries of this pass are stamped with one reading of the clock (no-ack
            // deliveries are never settled, so they need none).
            s.core.handle_time_us(self.now_us());
        }
        let mut now = if s.core.is_timed() { self.now_ms() } else { 0 };
        loop {
            let failed = self.send_all(s, now);
            if failed.is_empty() {
                break;
            }
            for (d, tag) in failed {
                // The consumer's channel closed or its receiver went away: take it back.
                let consumer = d.consumer.expect("poll_dispatch always names a consumer");
                if let Some(sink) = s.sinks.remove(&consumer)
                    && let Some(tag) = tag
                {
                    let _ = sink.channel.state.lock().handle_settle(tag, false);
                }
                s.core.handle_undelivered(d);
            }
        }
        if now == 0 && s.core.is_timed() {
            now = self.now_ms();
        }
        s.core.handle_housekeeping(now);
        while let Some(Effect::Removed { entry, reason }) = s.core.poll_effect() {
            let death = reason.death_reason();
            if death == DeathReason::Expired {
                self.trace(|queue| Event::Expire {
                    queue: queue.into(),
                    seq: entry.seq,
                });
            }
            let dead_letters = self.dead_letter.load().is_some()
                && (reason != Removal::Refused
                    || s.core.config().overflow == Overflow::RejectPublishDlx);
            if dead_letters {
                self.trace(|queue| Event::DeadLetter {
                    queue: queue.into(),
                    seq: entry.seq,
                    reason: death.as_str().into(),
                });
                // Routed once the lock is released; its record goes with the move.
                self.in_flight.fetch_add(1, Ordering::SeqCst);
                self.dead.push(DeadLetter::new(entry, death));
            } else {
                let why = if reason == Removal::Refused {
                    "refused by a length limit"
                } else {
                    "no dead-letter exchange"
                };
                self.dropped(&entry, death, why);
            }
        }
        self.schedule_expiry(s);
    }

    /// Hands out deliveries until the core has none, holding each receiving channel's lock
    /// across consecutive deliveries to it. Returns the dispatches that could not be handed
    /// over (with the tag already issued, if one was).
    fn send_all(&self, s: &mut QueueShared, now_ms: u64) -> SmallVec<[(Dispatch, Option<u64>); 1]> {
        let QueueShared { core, sinks, .. } = s;
        let mut failed = SmallVec::new();
        let mut held: Option<(&Arc<ChannelInner>, MutexGuard<'_, ChannelState>)> = None;
        let admit = |c: ConsumerId| sinks.get(&c).is_none_or(|s| s.channel.reserve_global());
        let quorum = self.is_quorum();
        while let Some(d) = core.poll_dispatch_with(now_ms, admit) {
            let consumer = d.consumer.expect("poll_dispatch always names a consumer");
            let Some(sink) = sinks.get(&consumer) else {
                failed.push((d, None));
                continue;
            };
            let counted = !d.no_ack;
            if !held
                .as_ref()
                .is_some_and(|(ch, _)| Arc::ptr_eq(ch, &sink.channel))
            {
                drop(held.take()); // release before taking the next channel's lock
                held = Some((&sink.channel, sink.channel.state.lock()));
            }
            let (_, ch) = held.as_mut().expect("just set");
            if ch.closed().is_some() {
                sink.channel.release_global(u32::from(counted));
                failed.push((d, None));
                continue;
            }
            let tag = ch.handle_delivery(self.meta.id, d.entry.seq, d.no_ack, counted);
            if sink.tx.send(Pending::new(tag, &d, quorum)).is_err() {
                sink.channel.release_global(u32::from(counted));
                failed.push((d, counted.then_some(tag)));
                continue;
            }
            self.metrics
                .delivered(Delivered::Consume { no_ack: d.no_ack }, d.entry.delivered);
            self.trace(|queue| Event::Deliver {
                queue: queue.into(),
                seq: d.entry.seq,
                consumer: sink.tag.to_string(),
                redelivered: d.entry.delivered,
            });
            if d.no_ack {
                self.forget(&d.entry);
            }
        }
        failed
    }

    /// Takes the head message for `basic.get` and records it on `channel`.
    pub(crate) fn get(&self, channel: &Arc<ChannelInner>, no_ack: bool) -> GetOutcome {
        let mut s = self.lock();
        if s.deleted {
            return GetOutcome::Deleted;
        }
        self.touch();
        let now = if s.core.is_timed() { self.now_ms() } else { 0 };
        if !no_ack {
            s.core.handle_time_us(self.now_us());
        }
        let Some(d) = s.core.handle_get(now, no_ack) else {
            self.metrics.get_empty();
            self.dispatch(&mut s); // carries out what expired at the head
            return GetOutcome::Empty;
        };
        let tag = {
            let mut ch = channel.state.lock();
            match ch.closed() {
                Some(_) => None,
                None => Some(ch.handle_delivery(self.meta.id, d.entry.seq, no_ack, false)),
            }
        };
        let Some(tag) = tag else {
            s.core.handle_undelivered(d);
            return GetOutcome::ChannelClosed;
        };
        self.metrics
            .delivered(Delivered::Get { no_ack }, d.entry.delivered);
        self.trace(|queue| Event::Get {
            queue: queue.into(),
            seq: d.entry.seq,
            redelivered: d.entry.delivered,
        });
        if no_ack {
            self.forget(&d.entry);
        }
        let remaining = s.core.ready_len();
        let delivery = Delivery::from_pending(
            Pending::new(tag, &d, self.is_quorum()),
            None,
            channel.clone(),
        );
        // Expired messages removed on the way are carried out.
        self.dispatch(&mut s);
        GetOutcome::Got(delivery, remaining)
    }
}

pub(crate) enum GetOutcome {
    Got(Delivery, u64),
    Empty,
    Deleted,
    ChannelClosed,
}
