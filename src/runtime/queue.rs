//! A queue as the runtime holds it: the core state machine behind its own mutex, plus the
//! senders of its consumers. Carries out what the core decides (deliveries, removals).

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;

use crossbeam_channel::Sender;
use parking_lot::{Mutex, MutexGuard};

use super::channel::ChannelInner;
use super::consumer::Delivery;
use crate::core::queue::{ConsumerId, Effect, Queue};
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
    pub(crate) state: Mutex<QueueShared>,
}

pub(crate) struct QueueShared {
    pub(crate) core: Queue,
    pub(crate) sinks: HashMap<ConsumerId, Sink>,
    /// Set once the queue is deleted; an old snapshot may still lead here.
    pub(crate) deleted: bool,
}

/// Where a consumer's deliveries go.
pub(crate) struct Sink {
    pub(crate) tx: Sender<Delivery>,
    pub(crate) channel: Arc<ChannelInner>,
    pub(crate) tag: Arc<str>,
}

impl QueueCell {
    pub(crate) fn new(meta: Arc<QueueMeta>) -> Self {
        Self {
            meta,
            state: Mutex::new(QueueShared {
                core: Queue::new(),
                sinks: HashMap::default(),
                deleted: false,
            }),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, QueueShared> {
        self.state.lock()
    }

    /// Enqueues a published message and delivers what can be delivered. False if the queue was
    /// deleted meanwhile.
    pub(crate) fn publish(&self, message: Arc<Message>, now_ms: u64) -> bool {
        let mut s = self.lock();
        if s.deleted {
            return false;
        }
        s.core.handle_enqueue(message, now_ms);
        self.dispatch(&mut s);
        true
    }

    /// Settles messages of this queue (in the given order) and delivers what that frees.
    pub(crate) fn settle(&self, seqs: impl Iterator<Item = u64>, how: Settle) {
        let mut s = self.lock();
        if s.deleted {
            return; // acks after a queue delete are accepted and ignored (§4.2)
        }
        for seq in seqs {
            match how {
                Settle::Ack => s.core.handle_ack(seq),
                Settle::Requeue => s.core.handle_requeue(seq),
                Settle::Reject => s.core.handle_reject(seq),
            };
        }
        self.dispatch(&mut s);
    }

    /// Hands every possible delivery to its consumer. Called with the queue locked; locks the
    /// receiving channel (queue -> channel order).
    pub(crate) fn dispatch(&self, s: &mut QueueShared) {
        while let Some(effect) = s.core.poll_effect() {
            match effect {
                // No dead-letter exchange yet: a rejected message is discarded.
                Effect::Removed { .. } => {}
            }
        }
        while let Some(d) = s.core.poll_dispatch() {
            let consumer = d.consumer.expect("poll_dispatch always names a consumer");
            let Some(sink) = s.sinks.get(&consumer) else {
                s.core.handle_undelivered(d);
                continue;
            };
            let tag = {
                let mut ch = sink.channel.state.lock();
                match ch.closed() {
                    Some(_) => None,
                    None => Some(ch.handle_delivery(self.meta.id, d.entry.seq, d.no_ack)),
                }
            };
            let Some(tag) = tag else {
                s.sinks.remove(&consumer);
                s.core.handle_undelivered(d);
                continue;
            };
            let delivery = Delivery::new(tag, &d, Some(sink.tag.clone()), sink.channel.clone());
            if let Err(returned) = sink.tx.send(delivery) {
                // The consumer's receiver is gone without a cancel: take the delivery back.
                let sink = s.sinks.remove(&consumer).expect("sink looked up above");
                if !d.no_ack {
                    let _ = sink
                        .channel
                        .state
                        .lock()
                        .handle_settle(returned.0.delivery_tag(), false);
                }
                s.core.handle_undelivered(d);
            }
        }
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
                None => Some(ch.handle_delivery(self.meta.id, d.entry.seq, no_ack)),
            }
        };
        let Some(tag) = tag else {
            s.core.handle_undelivered(d);
            return GetOutcome::ChannelClosed;
        };
        let remaining = s.core.ready_len();
        GetOutcome::Got(Delivery::new(tag, &d, None, channel.clone()), remaining)
    }
}

pub(crate) enum GetOutcome {
    Got(Delivery, u64),
    Empty,
    Deleted,
    ChannelClosed,
}
