//! One queue as a pure state machine: the ready FIFO, the unacked ledger, and consumers with
//! prefetch credit.
//!
//! Commands come in through `handle_*`; deliveries come out through [`Queue::poll_dispatch`],
//! which the runtime calls until it returns `None` after every command that can make a delivery
//! possible (enqueue, consume, settle, credit), then calls [`Queue::handle_housekeeping`] to
//! apply length limits and expiry. Time is an argument (`now_ms`), never read here.
//!
//! TTL (§7.1) is enforced at the head only, as RabbitMQ does: a message expires when it is next
//! to be delivered and its deadline has passed, so expiry costs O(expired), never a scan. A
//! message whose TTL is 0 may still go to a consumer that can take it at the instant it
//! arrives; otherwise the housekeeping after that arrival expires it.
//!
//! Ready messages wait in lanes (`lanes.rs`): one FIFO lane for a plain classic queue, one
//! lane per priority level for a classic queue with `x-max-priority`, two weighted lanes for a
//! quorum queue. Delivery, `basic.get`, `drop-head` and TTL expiry all take the head as the
//! lanes serve it (highest priority first), as RabbitMQ's fetch does. Consumers take turns
//! round-robin within priority groups, or one at a time on a single-active-consumer queue
//! (`consumers.rs`).
//!
//! # Invariants (checked by [`Queue::check_invariants`])
//! - every message is in exactly one place: `returns`, `ready` or `unacked` (no sequence number
//!   twice);
//! - each lane of `ready` is ordered by sequence number (classic-queue requeue restores
//!   original positions) and holds only messages of its own priority level; the lane lengths
//!   add up to the ready count; `returns` (quorum queues' returned messages, served first)
//!   keeps return order;
//! - `timed` counts the waiting messages that have a deadline;
//! - `ready_bytes` / `unacked_bytes` equal the body sizes of what each holds;
//! - each consumer's `in_flight` equals the unacked entries it holds (manual-ack consumers) and
//!   never exceeds its prefetch limit once settled;
//! - consumer ids are unique; an exclusive consumer is the only consumer;
//! - on a single-active-consumer queue there is an active consumer exactly when there are
//!   consumers, waiting manual-ack consumers hold no unacked message, and a quorum queue's
//!   active consumer stops receiving ("quiesces") only while a waiting consumer has a higher
//!   priority and it still holds unsettled deliveries.

pub mod config;
mod consumers;
pub mod dead_letter;
pub mod expiration;
mod lanes;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use smallvec::SmallVec;

pub use config::{DeadLetterStrategy, Overflow, PolicyDefinition, QueueConfig, QueueKind};
use consumers::Consumers;
pub use consumers::{ConsumerId, ConsumerSpec};
use lanes::{LaneKind, Lanes};

use crate::types::Message;

/// Buffers (ready FIFO, returns, unacked ledger) at most this many slots large are never
/// shrunk: small enough to cost little, large enough that a busy queue does not shrink and
/// regrow at every drain.
const BUFFER_SHRINK_MIN: usize = 4096;

/// A message in a queue.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Position in the queue: increases with every enqueue, never reused.
    pub seq: u64,
    /// The shared message.
    pub message: Arc<Message>,
    /// Whether the message was delivered before (the `redelivered` flag of its next delivery).
    pub delivered: bool,
    /// How many times it came back to the queue after a delivery (requeue, recover, channel loss).
    pub delivery_count: u32,
    /// When it entered this queue (0 when neither the queue nor the message has a TTL and the
    /// message is not recorded: the runtime skips the clock read then).
    pub enqueued_at_ms: u64,
    /// When it expires (§7.1): the enqueue time plus the lower of the queue's and the message's
    /// TTL. Kept across requeues.
    pub expires_at_ms: Option<u64>,
}

impl Entry {
    /// Whether the entry has expired at `now_ms`.
    fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms
            .is_some_and(|deadline| now_ms >= deadline)
    }

    /// Whether it has a TTL of 0 (expires the instant it arrives).
    fn zero_ttl(&self) -> bool {
        self.expires_at_ms == Some(self.enqueued_at_ms)
    }
}

/// A message handed out by [`Queue::poll_dispatch`] or [`Queue::handle_get`].
#[derive(Clone, Debug)]
pub struct Dispatch {
    /// The consumer it goes to (`None` for `basic.get`).
    pub consumer: Option<ConsumerId>,
    /// Whether the receiver settles it on receipt (no-ack): the queue no longer holds it.
    pub no_ack: bool,
    /// The entry as it was *before* this delivery (so `entry.delivered` is the redelivered flag).
    pub entry: Entry,
}

/// A message the queue holds until its holder settles it.
#[derive(Clone, Debug)]
struct Unacked {
    entry: Entry,
    consumer: Option<ConsumerId>,
    /// When it was handed out ([`Queue::handle_time_us`] at the time).
    delivered_at_us: u64,
}

/// Why a message left the queue without being acked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Rejected or nacked without requeue.
    Rejected,
    /// Its TTL elapsed at the head of the queue.
    Expired,
    /// Dropped from the head by a length limit (`drop-head`).
    MaxLen,
    /// A publish refused by a length limit (`reject-publish`, `reject-publish-dlx`).
    Refused,
    /// Returned more often than the delivery limit allows (quorum queues).
    DeliveryLimit,
}

impl Removal {
    /// The dead-letter reason it is recorded under (`x-death`, counters): a refused publish
    /// counts as `maxlen` (§5.2).
    pub fn death_reason(self) -> dead_letter::DeathReason {
        use dead_letter::DeathReason;
        match self {
            Removal::Rejected => DeathReason::Rejected,
            Removal::Expired => DeathReason::Expired,
            Removal::MaxLen | Removal::Refused => DeathReason::Maxlen,
            Removal::DeliveryLimit => DeathReason::DeliveryLimit,
        }
    }
}

/// Where [`Queue::handle_requeue`] puts a message back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequeueTo {
    /// Where the queue's type puts returned messages: a classic queue at the original
    /// position, a quorum queue in the returns lane, served first. Every requeue but a
    /// client's on a queue that [re-appends](QueueConfig::requeues_to_tail) (and there, a
    /// return because the holder went away: channel closed, receiver dropped).
    Return,
    /// A client's nack or reject with requeue (or `basic.recover`) on a quorum queue without
    /// delivery limit: re-appended at the tail of the normal-priority lane under this new
    /// sequence number, reserved by the caller, as RabbitMQ 4.0-4.2 re-enqueues it as a new
    /// log entry. (After a restart it is back in the lane of its own priority, at that
    /// number's position.)
    Tail(u64),
}

/// What became of a message returned to the queue ([`Queue::handle_requeue`]).
#[derive(Clone, Debug)]
pub enum Requeue {
    /// It is back, waiting for its next delivery.
    Back {
        /// Its sequence number now: a new one if it was re-appended ([`RequeueTo::Tail`]).
        seq: u64,
        /// The message.
        message: Arc<Message>,
        /// Its new delivery count.
        delivery_count: u32,
        /// When it first entered the queue.
        enqueued_at_ms: u64,
    },
    /// It went over the delivery limit and left the queue ([`Removal::DeliveryLimit`]).
    Removed,
}

/// An effect the runtime must carry out: dead letters, drops.
#[derive(Clone, Debug)]
pub enum Effect {
    /// A message left the queue for the given reason (dead-lettered when the queue has a DLX).
    Removed {
        /// The message.
        entry: Entry,
        /// Why.
        reason: Removal,
    },
}

/// A queue's state.
#[derive(Debug, Default)]
pub struct Queue {
    config: QueueConfig,
    /// Quorum queues' returned messages, delivered before `ready` (§4.3).
    returns: VecDeque<Entry>,
    /// Waiting messages other than returns, one lane per priority level the queue tells
    /// apart.
    ready: Lanes,
    /// Waiting messages (`returns` and `ready`) that have a deadline.
    timed: usize,
    /// A publish was accepted under `drop-head` limits: housekeeping checks the length.
    limit_check: bool,
    /// TTL-0 messages published since the last housekeeping: deliverable in this pass only,
    /// to a consumer that can take them as they arrive (§7.1).
    arriving: SmallVec<[u64; 2]>,
    unacked: HashMap<u64, Unacked, BuildHasherDefault<SeqHasher>>,
    consumers: Consumers,
    next_seq: u64,
    ready_bytes: u64,
    unacked_bytes: u64,
    has_had_consumers: bool,
    effects: VecDeque<Effect>,
    /// Dead letters of an at-least-once queue still waiting for their targets (held by the
    /// runtime): they count toward the length limits.
    held_len: u64,
    held_bytes: u64,
    /// The time deliveries are stamped with ([`Queue::handle_time_us`]).
    now_us: u64,
}

impl Queue {
    /// An empty classic queue without TTL or limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty queue with the given configuration.
    pub fn with_config(config: QueueConfig) -> Self {
        let lanes = match (config.kind, config.max_priority) {
            (QueueKind::Quorum, _) => LaneKind::Weighted { served: 0 },
            (QueueKind::Classic, Some(max)) if max > 0 => LaneKind::Strict { max },
            (QueueKind::Classic, _) => LaneKind::Fifo,
        };
        Self {
            config,
            ready: Lanes::new(lanes),
            consumers: Consumers::new(
                config.single_active_consumer,
                config.kind == QueueKind::Quorum,
            ),
            ..Self::default()
        }
    }

    /// The queue's configuration.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Changes the configuration (a policy was set or cleared). Deadlines of messages already
    /// in the queue stay; a length limit now exceeded under `drop-head` drops from the head at
    /// the next housekeeping (§7.3). The type, priorities and single active consumer come from
    /// the arguments alone and do not change.
    pub fn set_config(&mut self, config: QueueConfig) {
        debug_assert_eq!(
            (
                config.kind,
                config.max_priority,
                config.single_active_consumer
            ),
            (
                self.config.kind,
                self.config.max_priority,
                self.config.single_active_consumer
            ),
            "a policy changed what only arguments decide"
        );
        self.config = config;
        self.limit_check = config.has_length_limit() && config.overflow == Overflow::DropHead;
    }

    // ---- commands -------------------------------------------------------------------------

    /// Sets the time, in microseconds of the runtime's monotonic clock, that deliveries from
    /// now on are stamped with ([`Queue::delivered_at_us`]), so the runtime can measure how
    /// long a message stayed unacked. Stamps are for measurement only: no decision reads them.
    pub fn handle_time_us(&mut self, now_us: u64) {
        self.now_us = now_us;
    }

    /// Appends a published message, with the queue's TTL applied.
    pub fn handle_enqueue(&mut self, message: Arc<Message>, now_ms: u64) -> bool {
        let seq = self.next_seq;
        let message_ttl = message
            .properties
            .expiration
            .as_deref()
            .and_then(|e| expiration::parse_expiration(e).ok());
        let expires_at_ms = self.config.deadline(now_ms, message_ttl);
        self.handle_publish(Entry {
            seq,
            message,
            delivered: false,
            delivery_count: 0,
            enqueued_at_ms: now_ms,
            expires_at_ms,
        })
    }

    /// Takes a published message whose sequence number was assigned outside (reserved at
    /// publish so a fan-out can be written as one batch), at its place by sequence number,
    /// applying the length limit (§7.3): under `reject-publish(-dlx)` a message that would take
    /// the queue over it is refused ([`Removal::Refused`] effect) and `false` returned. The
    /// number must be new to this queue.
    pub fn handle_publish(&mut self, entry: Entry) -> bool {
        self.next_seq = self.next_seq.max(entry.seq + 1);
        if self.config.refuses_publishes() && self.would_overflow(entry.message.body_size()) {
            self.effects.push_back(Effect::Removed {
                entry,
                reason: Removal::Refused,
            });
            return false;
        }
        // Only drop-head drops from the head: under reject-publish(-dlx) a queue taken over its
        // limit by requeues stays there until consumed (RabbitMQ's `maybe_drop_head` skips both).
        if self.config.has_length_limit() && self.config.overflow == Overflow::DropHead {
            self.limit_check = true;
        }
        if entry.zero_ttl() {
            self.arriving.push(entry.seq);
        }
        self.insert_ready(entry);
        true
    }

    /// Puts back an entry read from the store, at its place by sequence number; no limit
    /// applies (§4.3: nothing is dropped for a message the queue already held).
    pub fn handle_restore(&mut self, entry: Entry) {
        debug_assert!(
            !self.unacked.contains_key(&entry.seq),
            "sequence number {} reused",
            entry.seq
        );
        self.next_seq = self.next_seq.max(entry.seq + 1);
        self.insert_ready(entry);
    }

    /// Whether a message of `body_size` bytes would take the queue over a length limit
    /// (`len + 1 > max` or `bytes + size > max_bytes`, §7.3).
    pub fn would_overflow(&self, body_size: u64) -> bool {
        self.config
            .max_length
            .is_some_and(|max| self.ready_len() + self.held_len + 1 > max)
            || self
                .config
                .max_length_bytes
                .is_some_and(|max| self.ready_bytes + self.held_bytes + body_size > max)
    }

    /// A dead letter of an at-least-once queue ([`QueueConfig::at_least_once`]) waits for its
    /// targets outside the queue: until [`Queue::handle_release`], it counts toward the length
    /// limits, as RabbitMQ counts a quorum queue's pending dead letters.
    pub fn handle_hold(&mut self, entry: &Entry) {
        self.held_len += 1;
        self.held_bytes += entry.message.body_size();
    }

    /// A held dead letter reached every target (or was dropped).
    pub fn handle_release(&mut self, entry: &Entry) {
        self.held_len = self.held_len.saturating_sub(1);
        self.held_bytes = self.held_bytes.saturating_sub(entry.message.body_size());
    }

    /// Dead letters held for at-least-once dead-lettering.
    pub fn held_len(&self) -> u64 {
        self.held_len
    }

    /// Registers a consumer. The caller has checked exclusivity with [`Queue::can_consume`].
    pub fn handle_consume(&mut self, spec: ConsumerSpec) {
        self.has_had_consumers = true;
        self.consumers.add(spec);
    }

    /// Removes a consumer (`basic.cancel`, channel close). Its unacked messages stay unacked
    /// (§4.4); returns whether it existed. On a single-active-consumer queue the next waiting
    /// consumer becomes active if this one was (the runtime delivers to it after requeueing
    /// what a closed channel held, so that it gets those messages first).
    pub fn handle_cancel(&mut self, consumer: ConsumerId) -> bool {
        self.consumers.remove(consumer)
    }

    /// Fetches the head message for `basic.get` (expired messages at the head go first, never
    /// returned). With `no_ack` it leaves the queue at once; otherwise it becomes unacked with
    /// no consumer.
    pub fn handle_get(&mut self, now_ms: u64, no_ack: bool) -> Option<Dispatch> {
        self.expire_head(now_ms, false);
        let entry = self.pop_ready()?;
        let dispatch = self.hand_out(entry, None, no_ack);
        // What is expired at the new head goes before the remaining count is read, as
        // RabbitMQ's fetch does (§7.1: only expired messages behind a live head count).
        self.expire_head(now_ms, false);
        Some(dispatch)
    }

    /// Settles an unacked message positively, handing back the entry so the caller can free it
    /// outside any lock. `None` if the queue does not hold it (acks after a queue delete are
    /// no-ops).
    pub fn handle_ack(&mut self, seq: u64) -> Option<Entry> {
        self.take_unacked(seq)
    }

    /// Settles an unacked message negatively without requeue: it leaves the queue with
    /// [`Removal::Rejected`] (an [`Effect`] for the runtime).
    pub fn handle_reject(&mut self, seq: u64) -> bool {
        match self.take_unacked(seq) {
            Some(entry) => {
                self.effects.push_back(Effect::Removed {
                    entry,
                    reason: Removal::Rejected,
                });
                true
            }
            None => false,
        }
    }

    /// Returns an unacked message to the queue (nack/reject with requeue, recover, channel loss),
    /// flagged redelivered, its delivery count incremented (§6.2): a classic queue puts it back
    /// at its original position (in its priority lane), a quorum queue at the front, after
    /// earlier returns, or at the tail under a new sequence number ([`RequeueTo::Tail`], §4.3).
    /// A count over the delivery limit removes it instead ([`Removal::DeliveryLimit`]). `None`
    /// if the queue does not hold it.
    pub fn handle_requeue(&mut self, seq: u64, to: RequeueTo) -> Option<Requeue> {
        let mut entry = self.take_unacked(seq)?;
        entry.delivered = true;
        entry.delivery_count = entry.delivery_count.saturating_add(1);
        if self
            .config
            .delivery_limit
            .is_some_and(|limit| entry.delivery_count > limit)
        {
            self.effects.push_back(Effect::Removed {
                entry,
                reason: Removal::DeliveryLimit,
            });
            return Some(Requeue::Removed);
        }
        if let RequeueTo::Tail(fresh) = to {
            debug_assert!(
                self.config.requeues_to_tail(),
                "only a quorum queue without delivery limit re-appends"
            );
            debug_assert!(
                fresh >= self.next_seq,
                "a re-appended message needs a new number"
            );
            entry.seq = fresh;
            self.next_seq = self.next_seq.max(fresh + 1);
        }
        let requeued = Requeue::Back {
            seq: entry.seq,
            message: entry.message.clone(),
            delivery_count: entry.delivery_count,
            enqueued_at_ms: entry.enqueued_at_ms,
        };
        match (self.config.kind, to) {
            (QueueKind::Quorum, RequeueTo::Tail(_)) => {
                self.add_waiting(&entry);
                self.ready.insert_normal(entry);
            }
            (QueueKind::Classic, _) => {
                self.insert_ready(entry);
                // A classic queue applies drop-head on requeue too (`requeue_and_run` calls
                // `maybe_drop_head`), before anything is delivered.
                if self.config.overflow == Overflow::DropHead {
                    self.drop_over_limit();
                }
            }
            (QueueKind::Quorum, RequeueTo::Return) => self.push_return(entry),
        }
        Some(requeued)
    }

    /// Takes back a dispatch the runtime could not hand over (the consumer's channel closed
    /// before it got there): the message returns unchanged, as if never dispatched, and the
    /// consumer is removed.
    pub fn handle_undelivered(&mut self, dispatch: Dispatch) {
        if let Some(consumer) = dispatch.consumer {
            self.consumers.remove(consumer);
        }
        if !dispatch.no_ack {
            let taken = self.take_unacked(dispatch.entry.seq);
            debug_assert!(
                taken.is_some(),
                "an undelivered manual-ack dispatch is unacked"
            );
        }
        match self.config.kind {
            QueueKind::Quorum if dispatch.entry.delivered => {
                self.add_waiting(&dispatch.entry);
                self.returns.push_front(dispatch.entry);
            }
            _ => self.insert_ready(dispatch.entry),
        }
    }

    /// A no-ack consumer's receiver took `count` messages: that much window opens again.
    pub fn handle_credit(&mut self, consumer: ConsumerId, count: u32) {
        self.consumers.release(consumer, count);
    }

    /// Removes every ready message (`queue.purge`); unacked messages are untouched (§1.8).
    /// Returns the number removed.
    pub fn handle_purge(&mut self) -> Vec<Entry> {
        self.ready_bytes = 0;
        self.timed = 0;
        let mut purged: Vec<Entry> = std::mem::take(&mut self.returns).into();
        purged.extend(self.ready.take_all());
        purged
    }

    /// What follows a burst of commands and deliveries: drops the oldest ready messages while a
    /// `drop-head` length limit is exceeded after a publish ([`Removal::MaxLen`]), then expires
    /// messages at the head ([`Removal::Expired`]). Costs nothing when neither applies.
    pub fn handle_housekeeping(&mut self, now_ms: u64) {
        if std::mem::take(&mut self.limit_check) {
            self.drop_over_limit();
        }
        self.expire_head(now_ms, false);
        self.arriving.clear();
        if self.ready.capacity() > BUFFER_SHRINK_MIN
            || self.returns.capacity() > BUFFER_SHRINK_MIN
            || self.unacked.capacity() > BUFFER_SHRINK_MIN
        {
            self.shrink_buffers();
        }
    }

    /// Gives back the memory of buffers that a backlog grew and a drain left mostly empty:
    /// one over [`BUFFER_SHRINK_MIN`] slots and at most a quarter used shrinks to twice its
    /// length, so the copy is paid once per halving and a queue that fills again regrows
    /// without churn.
    #[cold]
    fn shrink_buffers(&mut self) {
        fn shrink<T>(buffer: &mut VecDeque<T>) {
            if buffer.capacity() > BUFFER_SHRINK_MIN && buffer.len() <= buffer.capacity() / 4 {
                buffer.shrink_to(buffer.len() * 2);
            }
        }
        self.ready.shrink_with(shrink);
        shrink(&mut self.returns);
        let unacked = &mut self.unacked;
        if unacked.capacity() > BUFFER_SHRINK_MIN && unacked.len() <= unacked.capacity() / 4 {
            unacked.shrink_to(unacked.len() * 2);
        }
    }

    // ---- output ---------------------------------------------------------------------------

    /// The next delivery to a consumer with credit, round-robin within the highest priority
    /// that can take one (§3.2), or only to the active consumer on a single-active-consumer
    /// queue; `None` when nothing more can be delivered now.
    pub fn poll_dispatch(&mut self, now_ms: u64) -> Option<Dispatch> {
        self.poll_dispatch_with(now_ms, |_| true)
    }

    /// [`Queue::poll_dispatch`] where a manual-ack consumer with credit must also be admitted
    /// by `admit` (a channel-wide prefetch limit, §3.3 `global`); `admit` is asked only about
    /// the consumer that would receive, and a `true` answer commits to the delivery. Expired
    /// messages at the head are removed first.
    pub fn poll_dispatch_with(
        &mut self,
        now_ms: u64,
        admit: impl FnMut(ConsumerId) -> bool,
    ) -> Option<Dispatch> {
        self.expire_head(now_ms, true);
        if self.ready.is_empty() && self.returns.is_empty() {
            return None;
        }
        let (consumer, no_ack) = self.consumers.next_with_credit(admit)?;
        let entry = self.pop_ready().expect("ready is not empty");
        Some(self.hand_out(entry, Some(consumer), no_ack))
    }

    /// The next effect for the runtime (dead letters, drops).
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    // ---- queries --------------------------------------------------------------------------

    /// The waiting messages in the order they would be delivered (a quorum queue's returns
    /// first, then by priority, FIFO within one), without taking them.
    pub fn ready_entries(&self) -> impl Iterator<Item = &Entry> {
        self.returns.iter().chain(self.ready.iter())
    }

    /// Ready messages (the `message_count` of declare-ok and get-ok); expired messages not yet
    /// at the head still count (§7.1).
    pub fn ready_len(&self) -> u64 {
        (self.ready.len() + self.returns.len()) as u64
    }

    /// Whether a waiting message has a deadline: only then does the queue need the time.
    pub fn is_timed(&self) -> bool {
        self.timed > 0
    }

    /// The deadline of the message next in line, if it has one: when the queue must next be
    /// looked at for expiry.
    pub fn next_deadline(&self) -> Option<u64> {
        self.head()?.expires_at_ms
    }

    /// Delivered, not yet settled messages.
    pub fn unacked_len(&self) -> u64 {
        self.unacked.len() as u64
    }

    /// Body bytes of ready messages.
    pub fn ready_bytes(&self) -> u64 {
        self.ready_bytes
    }

    /// Body bytes of unacked messages.
    pub fn unacked_bytes(&self) -> u64 {
        self.unacked_bytes
    }

    /// Number of consumers, waiting ones included on a single-active-consumer queue: the
    /// `consumer_count` of declare-ok, as RabbitMQ counts it (classic queues:
    /// `rabbit_queue_consumers:count/0` counts every registered consumer; quorum queues:
    /// `rabbit_fifo:query_consumer_count/1` adds the waiting consumers to the active one).
    pub fn consumer_count(&self) -> u32 {
        self.consumers.len()
    }

    /// Whether a consumer that settles its deliveries (not no-ack) is registered: only their
    /// deliveries are stamped with [`Queue::handle_time_us`]'s time.
    pub fn has_acking_consumer(&self) -> bool {
        self.consumers.any_acking()
    }

    /// The consumer that receives on a single-active-consumer queue (`None` on other queues
    /// and when there is no consumer).
    pub fn active_consumer(&self) -> Option<ConsumerId> {
        self.consumers.active()
    }

    /// Whether the queue ever had a consumer (auto-delete needs one, §1.6).
    pub fn has_had_consumers(&self) -> bool {
        self.has_had_consumers
    }

    /// Whether a new consumer may join: `Err` with RabbitMQ's reason if an exclusive consumer
    /// holds the queue, an exclusive one is asked for while others exist, or an exclusive one
    /// is asked for on a classic single-active-consumer queue (`exclusive_consume_unavailable`
    /// in `rabbit_amqqueue_process`).
    pub fn can_consume(&self, exclusive: bool) -> Result<(), ExclusiveUse> {
        let single_active =
            self.consumers.is_single_active() && self.config.kind == QueueKind::Classic;
        if self.consumers.has_exclusive()
            || (exclusive && (self.consumers.len() > 0 || single_active))
        {
            Err(ExclusiveUse)
        } else {
            Ok(())
        }
    }

    /// When unacked message `seq` was handed out (the [`Queue::handle_time_us`] of then);
    /// `None` if it is not unacked here.
    pub fn delivered_at_us(&self, seq: u64) -> Option<u64> {
        self.unacked.get(&seq).map(|u| u.delivered_at_us)
    }

    /// Whether `seq` is delivered and not yet settled.
    pub fn holds_unacked(&self, seq: u64) -> bool {
        self.unacked.contains_key(&seq)
    }

    /// The ready messages: returns first, then lane by lane, highest priority first and FIFO
    /// within a priority (a quorum queue interleaves its two lanes when it delivers).
    pub fn ready(&self) -> impl Iterator<Item = &Entry> {
        self.returns.iter().chain(self.ready.iter())
    }

    /// Checks every invariant of the module doc; `Err` names the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for e in &self.returns {
            if !seen.insert(e.seq) || e.seq >= self.next_seq {
                return Err(format!(
                    "returned seq {} duplicated or from the future",
                    e.seq
                ));
            }
        }
        let timed = self.ready().filter(|e| e.expires_at_ms.is_some()).count();
        if timed != self.timed {
            return Err(format!(
                "timed count {} but {timed} have deadlines",
                self.timed
            ));
        }
        self.ready.check_invariants()?;
        for e in self.ready.iter() {
            if !seen.insert(e.seq) || e.seq >= self.next_seq {
                return Err(format!("seq {} duplicated or from the future", e.seq));
            }
        }
        for (&seq, u) in &self.unacked {
            if seq != u.entry.seq || !seen.insert(seq) {
                return Err(format!("unacked seq {seq} duplicated or mis-keyed"));
            }
        }
        let ready_bytes: u64 = self.ready().map(|e| e.message.body_size()).sum();
        let unacked_bytes: u64 = self
            .unacked
            .values()
            .map(|u| u.entry.message.body_size())
            .sum();
        if ready_bytes != self.ready_bytes || unacked_bytes != self.unacked_bytes {
            return Err(format!(
                "byte totals drifted: ready {ready_bytes} vs {}, unacked {unacked_bytes} vs {}",
                self.ready_bytes, self.unacked_bytes
            ));
        }
        self.consumers
            .check_invariants(self.unacked.values().filter_map(|u| u.consumer))
    }

    // ---- helpers --------------------------------------------------------------------------

    fn head(&self) -> Option<&Entry> {
        self.returns.front().or_else(|| self.ready.front())
    }

    fn pop_ready(&mut self) -> Option<Entry> {
        let entry = match self.returns.pop_front() {
            Some(e) => e,
            None => self.ready.pop_front()?,
        };
        self.ready_bytes -= entry.message.body_size();
        self.timed -= usize::from(entry.expires_at_ms.is_some());
        Some(entry)
    }

    /// Removes expired messages at the head (only there, §7.1); `arriving` spares a TTL-0
    /// message at the instant it arrived, for a consumer that can take it.
    fn expire_head(&mut self, now_ms: u64, arriving: bool) {
        if self.timed == 0 {
            return;
        }
        let spared = |e: &Entry, fresh: &[u64]| {
            arriving && e.zero_ttl() && now_ms == e.enqueued_at_ms && fresh.contains(&e.seq)
        };
        while self
            .head()
            .is_some_and(|e| e.expired(now_ms) && !spared(e, &self.arriving))
        {
            let entry = self.pop_ready().expect("has a head");
            self.effects.push_back(Effect::Removed {
                entry,
                reason: Removal::Expired,
            });
        }
    }

    /// Drops the oldest ready messages while a length limit is exceeded ([`Removal::MaxLen`]).
    fn drop_over_limit(&mut self) {
        while self.over_limit() {
            let entry = self.pop_ready().expect("over a limit, so not empty");
            self.effects.push_back(Effect::Removed {
                entry,
                reason: Removal::MaxLen,
            });
        }
    }

    fn over_limit(&self) -> bool {
        self.config
            .max_length
            .is_some_and(|max| self.ready_len() > max)
            || self
                .config
                .max_length_bytes
                .is_some_and(|max| self.ready_bytes > max)
    }

    fn add_waiting(&mut self, entry: &Entry) {
        self.ready_bytes += entry.message.body_size();
        self.timed += usize::from(entry.expires_at_ms.is_some());
    }

    /// Appends to the returns lane (quorum queues, §4.3).
    fn push_return(&mut self, entry: Entry) {
        self.add_waiting(&entry);
        self.returns.push_back(entry);
    }

    fn hand_out(&mut self, entry: Entry, consumer: Option<ConsumerId>, no_ack: bool) -> Dispatch {
        if !no_ack {
            let mut held = entry.clone();
            held.delivered = true;
            self.unacked_bytes += held.message.body_size();
            self.unacked.insert(
                held.seq,
                Unacked {
                    entry: held,
                    consumer,
                    delivered_at_us: self.now_us,
                },
            );
        }
        Dispatch {
            consumer,
            no_ack,
            entry,
        }
    }

    fn take_unacked(&mut self, seq: u64) -> Option<Entry> {
        let u = self.unacked.remove(&seq)?;
        self.unacked_bytes -= u.entry.message.body_size();
        if let Some(c) = u.consumer {
            self.consumers.settled(c);
        }
        Some(u.entry)
    }

    /// Inserts at the position of the entry's sequence number in its priority lane
    /// (classic-queue requeue, §4.3).
    fn insert_ready(&mut self, entry: Entry) {
        self.add_waiting(&entry);
        self.ready.insert(entry);
    }
}

/// An exclusive consumer holds the queue, or an exclusive consumer was asked for on a queue
/// that has consumers (403 `in exclusive use`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExclusiveUse;

/// Hasher for sequence-number keys: they are already unique integers, so a multiply spreads
/// them well enough and costs one instruction.
#[derive(Default)]
struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[cfg(test)]
mod tests;
