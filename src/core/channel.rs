//! One channel's bookkeeping as a pure state machine: delivery tags, the ledger of unacked
//! deliveries, consumer tags and the prefetch setting for new consumers.
//!
//! # Invariants
//! - delivery tags are issued from 1, strictly increasing, never reused;
//! - every ledger entry has a tag below `next_tag`;
//! - a closed channel holds no ledger entries and no consumers.

use std::collections::{BTreeMap, VecDeque};

use smallvec::SmallVec;
use std::sync::Arc;

use crate::core::queue::ConsumerId;
use crate::error::{AmqpError, CloseCause, ReplyCode};

/// Identifies a queue across the broker (assigned when declared, never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u64);

/// An unacked delivery as the channel knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outstanding {
    /// The queue holding the message.
    pub queue: QueueId,
    /// The message's sequence number in that queue.
    pub seq: u64,
    /// Whether it counts against the channel-wide prefetch (a consumer delivery, not a get).
    pub counted: bool,
}

/// A consumer registered on the channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Its broker-wide id.
    pub id: ConsumerId,
    /// The queue it consumes from.
    pub queue: QueueId,
}

/// What a closing channel hands back to the runtime.
#[derive(Debug, Default)]
pub struct Closing {
    /// Unacked deliveries to requeue, ascending by tag.
    pub ledger: Vec<(u64, Outstanding)>,
    /// Consumers to cancel.
    pub consumers: Vec<(Arc<str>, ConsumerRecord)>,
}

/// Deliveries settled by one ack / nack / reject (usually one: kept inline).
pub type Settled = SmallVec<[(u64, Outstanding); 1]>;

/// Unacked deliveries ordered by tag. Tags are issued in increasing order, so a delivery is
/// appended, and the usual in-order ack removes from the front; lookups are binary searches.
#[derive(Debug, Default)]
struct Ledger {
    entries: VecDeque<(u64, Outstanding)>,
}

impl Ledger {
    fn push(&mut self, tag: u64, o: Outstanding) {
        debug_assert!(
            self.entries.back().is_none_or(|&(t, _)| t < tag),
            "tags increase"
        );
        self.entries.push_back((tag, o));
    }

    fn position(&self, tag: u64) -> Option<usize> {
        match self.entries.front() {
            Some(&(t, _)) if t == tag => Some(0),
            _ => self.entries.binary_search_by_key(&tag, |&(t, _)| t).ok(),
        }
    }

    fn remove_at(&mut self, at: usize) -> Outstanding {
        self.entries.remove(at).expect("position is in range").1
    }

    /// Removes and returns entries `..=at`.
    fn take_through(&mut self, at: usize) -> Settled {
        self.entries.drain(..=at).collect()
    }

    fn take_all(&mut self) -> Vec<(u64, Outstanding)> {
        std::mem::take(&mut self.entries).into()
    }
}

/// A channel's state.
#[derive(Debug)]
pub struct ChannelState {
    next_tag: u64,
    ledger: Ledger,
    consumers: BTreeMap<Arc<str>, ConsumerRecord>,
    prefetch: u16,
    closed: Option<Arc<CloseCause>>,
}

impl Default for ChannelState {
    fn default() -> Self {
        Self {
            next_tag: 1,
            ledger: Ledger::default(),
            consumers: BTreeMap::new(),
            prefetch: 0,
            closed: None,
        }
    }
}

impl ChannelState {
    /// A fresh open channel.
    pub fn new() -> Self {
        Self::default()
    }

    /// Issues the next delivery tag; a manual-ack delivery enters the ledger.
    pub fn handle_delivery(
        &mut self,
        queue: QueueId,
        seq: u64,
        no_ack: bool,
        counted: bool,
    ) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        if !no_ack {
            self.ledger.push(
                tag,
                Outstanding {
                    queue,
                    seq,
                    counted,
                },
            );
        }
        tag
    }

    /// The queues this channel's consumers consume from, ascending, without repeats.
    pub fn consumer_queues(&self) -> Vec<QueueId> {
        let mut q: Vec<QueueId> = self.consumers.values().map(|r| r.queue).collect();
        q.sort_unstable();
        q.dedup();
        q
    }

    /// Takes the deliveries an ack/nack/reject settles: `tag` alone, or with `multiple` every
    /// outstanding tag up to it (`tag = 0` with `multiple` = all). An unknown tag is a 406 and
    /// nothing is taken.
    pub fn handle_settle(&mut self, tag: u64, multiple: bool) -> Result<Settled, AmqpError> {
        if multiple && tag == 0 {
            return Ok(self.ledger.take_all().into_iter().collect());
        }
        let Some(at) = self.ledger.position(tag) else {
            return Err(AmqpError::new(
                ReplyCode::PreconditionFailed,
                format!("unknown delivery tag {tag}"),
            ));
        };
        if multiple {
            Ok(self.ledger.take_through(at))
        } else {
            let mut one = Settled::new();
            one.push((tag, self.ledger.remove_at(at)));
            Ok(one)
        }
    }

    /// Takes those of `tags` that are still outstanding, ascending by tag; others are skipped
    /// (a consumer giving back deliveries it never handed out, some perhaps acked already).
    pub fn handle_take_outstanding(&mut self, tags: &[u64]) -> Settled {
        let mut taken: Settled = tags
            .iter()
            .filter_map(|&t| {
                self.ledger
                    .position(t)
                    .map(|at| (t, self.ledger.remove_at(at)))
            })
            .collect();
        taken.sort_unstable_by_key(|(t, _)| *t);
        taken
    }

    /// Takes every unacked delivery (`basic.recover`), ascending by tag.
    pub fn handle_recover(&mut self) -> Vec<(u64, Outstanding)> {
        self.ledger.take_all()
    }

    /// Registers a consumer tag; `Err` if the tag is in use on this channel (530).
    pub fn handle_consume(
        &mut self,
        tag: Arc<str>,
        record: ConsumerRecord,
    ) -> Result<(), AmqpError> {
        if self.consumers.contains_key(&tag) {
            return Err(AmqpError::new(
                ReplyCode::NotAllowed,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        self.consumers.insert(tag, record);
        Ok(())
    }

    /// Forgets a consumer tag (client cancel or server cancel); unknown tags are fine.
    pub fn handle_cancel(&mut self, tag: &str) -> Option<ConsumerRecord> {
        self.consumers.remove(tag)
    }

    /// Forgets `tag` only if it still names consumer `id` (a stale handle must not cancel a
    /// newer consumer that reuses the tag).
    pub fn handle_cancel_consumer(&mut self, tag: &str, id: ConsumerId) -> Option<ConsumerRecord> {
        if self.consumers.get(tag).is_some_and(|r| r.id == id) {
            self.consumers.remove(tag)
        } else {
            None
        }
    }

    /// Sets the prefetch applied to consumers created from now on (`global = false`).
    pub fn handle_qos(&mut self, prefetch: u16) {
        self.prefetch = prefetch;
    }

    /// Closes the channel, handing back its unacked deliveries (ascending by tag) and its
    /// consumers for the runtime to requeue and cancel. A second close changes nothing.
    pub fn handle_close(&mut self, cause: Arc<CloseCause>) -> Closing {
        if self.closed.is_some() {
            return Closing::default();
        }
        self.closed = Some(cause);
        Closing {
            ledger: self.ledger.take_all(),
            consumers: std::mem::take(&mut self.consumers).into_iter().collect(),
        }
    }

    /// Why the channel is closed, if it is.
    pub fn closed(&self) -> Option<&Arc<CloseCause>> {
        self.closed.as_ref()
    }

    /// The prefetch for new consumers.
    pub fn prefetch(&self) -> u16 {
        self.prefetch
    }

    /// The consumer registered under `tag`.
    pub fn consumer(&self, tag: &str) -> Option<ConsumerRecord> {
        self.consumers.get(tag).copied()
    }

    /// The unacked deliveries, ascending by tag.
    pub fn ledger(&self) -> impl Iterator<Item = (u64, Outstanding)> + '_ {
        self.ledger.entries.iter().copied()
    }

    /// Checks the module's invariants.
    pub fn check_invariants(&self) -> Result<(), String> {
        if let Some(&(last, _)) = self.ledger.entries.back()
            && last >= self.next_tag
        {
            return Err(format!("ledger tag {last} was never issued"));
        }
        if !self
            .ledger
            .entries
            .iter()
            .zip(self.ledger.entries.iter().skip(1))
            .all(|(a, b)| a.0 < b.0)
        {
            return Err("ledger not ordered by tag".into());
        }
        if self.closed.is_some() && (!self.ledger.entries.is_empty() || !self.consumers.is_empty())
        {
            return Err("a closed channel still holds deliveries or consumers".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: QueueId = QueueId(7);

    #[test]
    fn tags_start_at_one_and_count_no_ack_deliveries() {
        let mut ch = ChannelState::new();
        assert_eq!(ch.handle_delivery(Q, 0, true, false), 1);
        assert_eq!(ch.handle_delivery(Q, 1, false, false), 2);
        assert!(
            ch.handle_settle(1, false).is_err(),
            "no-ack tags cannot be acked"
        );
        assert_eq!(ch.handle_settle(2, false).unwrap().len(), 1);
    }

    #[test]
    fn multiple_takes_everything_up_to_the_tag_and_requires_it_outstanding() {
        let mut ch = ChannelState::new();
        for seq in 0..5 {
            ch.handle_delivery(Q, seq, false, false);
        }
        ch.handle_settle(2, false).unwrap();
        let err = ch.handle_settle(2, true).unwrap_err();
        assert_eq!(err.text, "PRECONDITION_FAILED - unknown delivery tag 2");
        let taken: Vec<u64> = ch
            .handle_settle(4, true)
            .unwrap()
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(taken, [1, 3, 4]);
        assert_eq!(ch.handle_settle(0, true).unwrap().len(), 1);
        ch.check_invariants().unwrap();
    }
}
