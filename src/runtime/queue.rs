//! A queue as the runtime holds it: the core state machine behind its own mutex, a lock-free
//! inbox for publishes, and the senders of its consumers. Carries out what the core decides.
//!
//! Publishing and settling never wait for the queue's lock: if it is taken, the command goes
//! into the inbox, and the current holder applies it as it releases the lock. Every lock
//! acquisition drains the inbox first, so whatever a thread published or settled before is
//! visible to what it does next, in the order it did it.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Arc, OnceLock, Weak};

use crossbeam_channel::Sender;
use crossbeam_queue::SegQueue;
use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};
use rustc_hash::FxHashMap as HashMap;
use smallvec::SmallVec;

use super::BrokerInner;
use super::channel::ChannelInner;
use super::consumer::{Delivery, Pending};
use super::persist::{Job, Persistence};
use crate::core::channel::ChannelState;
use crate::core::queue::dead_letter::{DeadLetterTarget, DeathReason};
use crate::core::queue::{ConsumerId, Dispatch, Effect, Entry, Queue, Removal};
use crate::core::topology::QueueMeta;
use crate::types::Message;

/// What settles a set of unacked messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    Ack,
    Requeue,
    Reject,
}

pub(crate) struct QueueCell {
    pub(crate) meta: Arc<QueueMeta>,
    /// Whether messages need their enqueue time (the queue has a message TTL); otherwise
    /// publish skips reading the clock.
    pub(crate) timed: bool,
    /// The store, for a durable queue.
    persist: Option<Arc<Persistence>>,
    /// Where its dead letters go (`x-dead-letter-exchange`), if anywhere.
    dead_letter: Option<DeadLetterTarget>,
    /// Messages removed for a dead-letter reason, routed by whoever releases the lock next.
    dead: SegQueue<(Entry, DeathReason)>,
    /// The broker the dead letters are routed through.
    broker: OnceLock<Weak<BrokerInner>>,
    /// Sequence numbers are reserved at publish, before the queue's lock is taken.
    next_seq: AtomicU64,
    inbox: CachePadded<SegQueue<Inbound>>,
    state: CachePadded<Mutex<QueueShared>>,
}

pub(crate) struct QueueShared {
    pub(crate) core: Queue,
    pub(crate) sinks: HashMap<ConsumerId, Sink>,
    /// Set once the queue is deleted; an old snapshot may still lead here.
    pub(crate) deleted: bool,
}

/// Where a consumer's deliveries go.
pub(crate) struct Sink {
    pub(crate) tx: Sender<Pending>,
    pub(crate) channel: Arc<ChannelInner>,
    pub(crate) tag: Arc<str>,
}

/// A command that found the queue's lock taken.
enum Inbound {
    Publish(Entry),
    Settle(u64, Settle),
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
        drop(g);
        self.cell.drain_unlocked();
    }
}

impl QueueCell {
    /// Sets the broker dead letters are routed through (once, right after creation).
    pub(crate) fn set_broker(&self, broker: Weak<BrokerInner>) {
        let _ = self.broker.set(broker);
    }

    /// Routes the dead letters waiting (called without the queue's lock). Without a broker
    /// (it is shutting down) they are dropped.
    fn route_dead_letters(&self) {
        if self.dead.is_empty() {
            return;
        }
        let broker = self.broker.get().and_then(Weak::upgrade);
        while let Some((entry, reason)) = self.dead.pop() {
            match (&broker, &self.dead_letter) {
                (Some(b), Some(target)) => b.dead_letter(self, target, entry, reason),
                _ => self.forget(&entry),
            }
        }
    }
}

impl QueueCell {
    pub(crate) fn new(meta: Arc<QueueMeta>, persist: Option<Arc<Persistence>>) -> Self {
        Self {
            persist,
            dead_letter: DeadLetterTarget::from_arguments(&meta.arguments),
            dead: SegQueue::new(),
            broker: OnceLock::new(),
            timed: meta.arguments.contains_key("x-message-ttl"),
            meta,
            next_seq: AtomicU64::new(0),
            inbox: CachePadded::new(SegQueue::new()),
            state: CachePadded::new(Mutex::new(QueueShared {
                core: Queue::new(),
                sinks: HashMap::default(),
                deleted: false,
            })),
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
    pub(crate) fn publish(&self, seq: u64, message: Arc<Message>, now_ms: u64) {
        let entry = Entry {
            seq,
            message,
            delivered: false,
            delivery_count: 0,
            enqueued_at_ms: now_ms,
        };
        if let Some(mut g) = self.state.try_lock() {
            self.drain_inbox(&mut g); // earlier publishes first
            if !g.deleted {
                g.core.handle_enqueue_entry(entry);
                self.dispatch(&mut g);
            }
        } else {
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
        }
    }

    fn drain_inbox(&self, s: &mut QueueShared) {
        let mut any = false;
        while let Some(command) = self.inbox.pop() {
            any = true;
            if s.deleted {
                continue; // publishes to and settles of a deleted queue are dropped (§4.2)
            }
            match command {
                Inbound::Publish(entry) => s.core.handle_enqueue_entry(entry),
                Inbound::Settle(seq, how) => _ = self.apply_settle(s, seq, how),
            }
        }
        if any {
            self.dispatch(s);
        }
    }

    /// Settles messages of this queue (in the given order) and delivers what that frees.
    pub(crate) fn settle(&self, seqs: impl Iterator<Item = u64>, how: Settle) {
        let Some(mut g) = self.state.try_lock() else {
            for seq in seqs {
                self.inbox.push(Inbound::Settle(seq, how));
            }
            self.drain_unlocked();
            return;
        };
        self.drain_inbox(&mut g); // earlier commands first
        if g.deleted {
            return; // acks after a queue delete are accepted and ignored (§4.2)
        }
        let acked: SmallVec<[Entry; 1]> = seqs
            .filter_map(|seq| self.apply_settle(&mut g, seq, how))
            .collect();
        self.dispatch(&mut g);
        drop(g);
        drop(acked); // the last reference to a message is often here: free it unlocked
        self.drain_unlocked();
    }

    /// Applies one settle; an acked entry is handed back to be freed outside the lock.
    fn apply_settle(&self, s: &mut QueueShared, seq: u64, how: Settle) -> Option<Entry> {
        match how {
            Settle::Ack => {
                let entry = s.core.handle_ack(seq)?;
                self.forget(&entry);
                return Some(entry);
            }
            Settle::Requeue => {
                if let Some((message, delivery_count)) = s.core.handle_requeue(seq)
                    && let Some(p) = &self.persist
                    && message.properties.is_persistent()
                {
                    let queue = self.meta.id.0;
                    p.send(Job::Requeued {
                        queue,
                        seq,
                        message,
                        delivery_count,
                    });
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
    /// broker cannot know whether they reached a consumer before the restart).
    pub(crate) fn restore(&self, entries: impl IntoIterator<Item = Entry>) {
        let mut s = self.lock();
        let mut next = self.next_seq.load(Ordering::Relaxed);
        for entry in entries {
            next = next.max(entry.seq + 1);
            s.core.handle_enqueue_entry(entry);
        }
        self.next_seq.store(next, Ordering::Relaxed);
    }

    /// Hands every possible delivery to its consumer. Called with the queue locked; locks the
    /// receiving channels (queue -> channel order), each once per batch of deliveries.
    pub(crate) fn dispatch(&self, s: &mut QueueShared) {
        while let Some(effect) = s.core.poll_effect() {
            match effect {
                Effect::Removed { entry, reason } => match (&self.dead_letter, reason) {
                    // Routed once the lock is released; its record goes with the move.
                    (Some(_), Removal::Rejected) => self.dead.push((entry, DeathReason::Rejected)),
                    (None, _) => self.forget(&entry),
                },
            }
        }
        loop {
            let failed = self.send_all(s);
            if failed.is_empty() {
                return;
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
    }

    /// Hands out deliveries until the core has none, holding each receiving channel's lock
    /// across consecutive deliveries to it. Returns the dispatches that could not be handed
    /// over (with the tag already issued, if one was).
    fn send_all(&self, s: &mut QueueShared) -> SmallVec<[(Dispatch, Option<u64>); 1]> {
        let QueueShared { core, sinks, .. } = s;
        let mut failed = SmallVec::new();
        let mut held: Option<(&Arc<ChannelInner>, MutexGuard<'_, ChannelState>)> = None;
        let admit = |c: ConsumerId| sinks.get(&c).is_none_or(|s| s.channel.reserve_global());
        while let Some(d) = core.poll_dispatch_with(admit) {
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
            if sink.tx.send(Pending::new(tag, &d)).is_err() {
                sink.channel.release_global(u32::from(counted));
                failed.push((d, counted.then_some(tag)));
            } else if d.no_ack {
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
        let Some(d) = s.core.handle_get(no_ack) else {
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
        if no_ack {
            self.forget(&d.entry);
        }
        let remaining = s.core.ready_len();
        let delivery = Delivery::from_pending(Pending::new(tag, &d), None, channel.clone());
        GetOutcome::Got(delivery, remaining)
    }
}

pub(crate) enum GetOutcome {
    Got(Delivery, u64),
    Empty,
    Deleted,
    ChannelClosed,
}
