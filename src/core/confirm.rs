//! Publisher confirms of one channel as a pure state machine: sequence numbers, the set still
//! unanswered, and RabbitMQ's coalescing of answers into `multiple` acks and nacks.
//!
//! # Invariants
//! - sequence numbers are issued from 1, +1 per publish after `confirm.select`;
//! - every issued number is answered exactly once (ack or nack), then leaves `unconfirmed`.

use std::collections::BTreeSet;

/// One `basic.ack` / `basic.nack` the broker sends a confirming publisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfirmEvent {
    /// The publish sequence number.
    pub delivery_tag: u64,
    /// Covers every unanswered number up to `delivery_tag`.
    pub multiple: bool,
    /// `true` = `basic.ack`, `false` = `basic.nack`.
    pub ack: bool,
}

/// A channel's confirm state.
#[derive(Debug)]
pub struct Confirms {
    next_seq: u64,
    unconfirmed: BTreeSet<u64>,
}

impl Default for Confirms {
    fn default() -> Self {
        Self {
            next_seq: 1,
            unconfirmed: BTreeSet::new(),
        }
    }
}

impl Confirms {
    /// Confirm mode just selected.
    pub fn new() -> Self {
        Self::default()
    }

    /// Numbers the next publish; it is unanswered until [`Confirms::handle_outcomes`] answers
    /// it.
    pub fn handle_publish(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unconfirmed.insert(seq);
        seq
    }

    /// The number the next publish will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Publishes not yet answered.
    pub fn unconfirmed_len(&self) -> u64 {
        self.unconfirmed.len() as u64
    }

    /// Answers the given numbers (those already answered are ignored) and returns the frames
    /// to send, coalesced as RabbitMQ's `rabbit_channel:coalesce_and_send` does: acks first —
    /// one `multiple` ack for those below both the lowest number still unanswered and the
    /// lowest nack of this round, then single acks — then nacks the same way.
    pub fn handle_outcomes(&mut self, acks: &[u64], nacks: &[u64]) -> Vec<ConfirmEvent> {
        let acks = self.answer(acks);
        let nacks = self.answer(nacks);
        let mut out = Vec::new();
        self.coalesce(&acks, &nacks, true, &mut out);
        self.coalesce(&nacks, &acks, false, &mut out);
        out
    }

    /// Answers every unanswered number with a nack (the broker can no longer confirm them).
    pub fn handle_fail_all(&mut self) -> Vec<ConfirmEvent> {
        let all: Vec<u64> = self.unconfirmed.iter().copied().collect();
        self.handle_outcomes(&[], &all)
    }

    fn answer(&mut self, seqs: &[u64]) -> Vec<u64> {
        let mut answered: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|s| self.unconfirmed.remove(s))
            .collect();
        answered.sort_unstable();
        answered.dedup();
        answered
    }

    fn coalesce(&self, these: &[u64], others: &[u64], ack: bool, out: &mut Vec<ConfirmEvent>) {
        let Some(&last) = these.last() else {
            return;
        };
        let unconfirmed_cutoff = self.unconfirmed.first().copied().unwrap_or(last + 1);
        let cutoff = others.iter().copied().fold(unconfirmed_cutoff, u64::min);
        let split = these.partition_point(|&s| s < cutoff);
        if split > 0 {
            out.push(ConfirmEvent {
                delivery_tag: these[split - 1],
                multiple: true,
                ack,
            });
        }
        out.extend(these[split..].iter().map(|&s| ConfirmEvent {
            delivery_tag: s,
            multiple: false,
            ack,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(tag: u64, multiple: bool, ack: bool) -> ConfirmEvent {
        ConfirmEvent {
            delivery_tag: tag,
            multiple,
            ack,
        }
    }

    #[test]
    fn numbers_start_at_one() {
        let mut c = Confirms::new();
        assert_eq!(c.handle_publish(), 1);
        assert_eq!(c.handle_publish(), 2);
        assert_eq!(c.next_seq(), 3);
    }

    #[test]
    fn a_run_below_every_unanswered_number_is_one_multiple_ack() {
        let mut c = Confirms::new();
        for _ in 0..5 {
            c.handle_publish();
        }
        // 1..3 answered while 4 and 5 are pending: one multiple ack for 3.
        assert_eq!(c.handle_outcomes(&[2, 1, 3], &[]), [ev(3, true, true)]);
        // 5 answered while 4 is pending: a single ack.
        assert_eq!(c.handle_outcomes(&[5], &[]), [ev(5, false, true)]);
        // 4 answered last: nothing pending, so multiple (covers only 4 now).
        assert_eq!(c.handle_outcomes(&[4], &[]), [ev(4, true, true)]);
        assert_eq!(c.unconfirmed_len(), 0);
    }

    #[test]
    fn a_nack_cuts_the_multiple_ack_and_is_sent_after_it() {
        let mut c = Confirms::new();
        for _ in 0..4 {
            c.handle_publish();
        }
        let out = c.handle_outcomes(&[1, 2, 4], &[3]);
        assert_eq!(
            out,
            [ev(2, true, true), ev(4, false, true), ev(3, false, false)]
        );
    }

    #[test]
    fn answers_are_given_once() {
        let mut c = Confirms::new();
        c.handle_publish();
        assert_eq!(c.handle_outcomes(&[1], &[]).len(), 1);
        assert!(c.handle_outcomes(&[1], &[1]).is_empty());
    }

    #[test]
    fn failing_all_nacks_everything_unanswered() {
        let mut c = Confirms::new();
        for _ in 0..3 {
            c.handle_publish();
        }
        c.handle_outcomes(&[2], &[]);
        assert_eq!(c.handle_fail_all(), [ev(3, true, false)]);
    }
}
