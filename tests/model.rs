//! Model test: random sequences of declare / publish / get / consume / recv / ack / nack /
//! reject / cancel / recover / purge / channel close / connection close, run against the broker
//! and a naive reference model side by side, compared after every step.
//!
//! The model is deliberately simple (vectors and linear scans) and exact: it predicts which
//! message each `basic_get` and each consumer receive returns, with its delivery tag,
//! redelivered flag and delivery count (SEMANTICS.md §3.2 round-robin, §3.3 prefetch, §3.5 tags,
//! §3.6 redelivered, §4.1 multiple, §4.2 unknown tags close the channel, §4.3 requeue to the
//! original position, §4.4 cancel vs close, §5 rejected messages dead-lettered: q0 into q1,
//! q2 back into itself). After every step `check_invariants()` must hold;
//! at the end every published message is accounted for exactly once.

use std::collections::{BTreeMap, VecDeque};

use coney::*;
use proptest::prelude::*;

const QUEUES: usize = 3;

/// Where each queue's rejected messages go (§5): q0 to q1 by routing key, q1 nowhere, q2 back
/// to itself (a loop through a rejection is not a cycle, §5.5).
const DEAD_LETTER_TO: [Option<usize>; QUEUES] = [Some(1), None, Some(2)];

/// How taken deliveries are settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    Ack,
    Requeue,
    Reject,
}
const SLOTS: usize = 4; // channel slots 0,1 on connection 0; 2,3 on connection 1

#[derive(Clone, Debug)]
enum Op {
    Publish {
        slot: usize,
        queue: usize,
    },
    Get {
        slot: usize,
        queue: usize,
        no_ack: bool,
    },
    Consume {
        slot: usize,
        queue: usize,
        no_ack: bool,
        prefetch: u16,
    },
    Recv {
        consumer: usize,
    },
    Ack {
        slot: usize,
        pick: usize,
        multiple: bool,
    },
    Nack {
        slot: usize,
        pick: usize,
        multiple: bool,
        requeue: bool,
    },
    Reject {
        slot: usize,
        pick: usize,
        requeue: bool,
    },
    BadAck {
        slot: usize,
    },
    Cancel {
        consumer: usize,
    },
    DropConsumer {
        consumer: usize,
    },
    Recover {
        slot: usize,
    },
    GlobalQos {
        slot: usize,
        limit: u16,
    },
    Purge {
        slot: usize,
        queue: usize,
    },
    CloseChannel {
        slot: usize,
    },
    CloseConnection {
        conn: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let slot = 0..SLOTS;
    let queue = 0..QUEUES;
    prop_oneof![
        6 => (slot.clone(), queue.clone()).prop_map(|(slot, queue)| Op::Publish { slot, queue }),
        2 => (slot.clone(), queue.clone(), any::<bool>()).prop_map(|(slot, queue, no_ack)| Op::Get { slot, queue, no_ack }),
        2 => (slot.clone(), queue.clone(), prop::bool::weighted(0.2), prop_oneof![Just(0u16), 1u16..4])
            .prop_map(|(slot, queue, no_ack, prefetch)| Op::Consume { slot, queue, no_ack, prefetch }),
        5 => (0..6usize).prop_map(|consumer| Op::Recv { consumer }),
        3 => (slot.clone(), any::<usize>(), prop::bool::weighted(0.3)).prop_map(|(slot, pick, multiple)| Op::Ack { slot, pick, multiple }),
        2 => (slot.clone(), any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(slot, pick, multiple, requeue)| Op::Nack { slot, pick, multiple, requeue }),
        1 => (slot.clone(), any::<usize>(), any::<bool>()).prop_map(|(slot, pick, requeue)| Op::Reject { slot, pick, requeue }),
        1 => slot.clone().prop_map(|slot| Op::BadAck { slot }),
        1 => (0..6usize).prop_map(|consumer| Op::Cancel { consumer }),
        1 => (0..6usize).prop_map(|consumer| Op::DropConsumer { consumer }),
        1 => slot.clone().prop_map(|slot| Op::Recover { slot }),
        1 => (slot.clone(), 0u16..4).prop_map(|(slot, limit)| Op::GlobalQos { slot, limit }),
        1 => (slot.clone(), queue).prop_map(|(slot, queue)| Op::Purge { slot, queue }),
        1 => slot.prop_map(|slot| Op::CloseChannel { slot }),
        1 => (0..2usize).prop_map(|conn| Op::CloseConnection { conn }),
    ]
}

// ---- the reference model ------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MMsg {
    id: u64,
    seq: u64,
    delivered: bool,
    count: u32,
}

/// What a receive or a get is expected to return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    id: u64,
    tag: u64,
    redelivered: bool,
    count: u32,
}

#[derive(Debug)]
struct MConsumer {
    key: usize,
    prefetch: u32,
    no_ack: bool,
    in_flight: u32,
}

#[derive(Debug, Default)]
struct MQueue {
    ready: Vec<MMsg>,
    consumers: Vec<MConsumer>,
    next_seq: u64,
}

/// An unacked delivery in the model: (queue, message as held, consumer key).
type Held = (usize, MMsg, Option<usize>);

#[derive(Debug)]
struct MChannel {
    next_tag: u64,
    prefetch: u16,
    global_limit: u32,
    global_in_flight: u32,
    /// tag -> (queue, message as held, consumer key)
    ledger: BTreeMap<u64, Held>,
    opened: u64,
}

impl MChannel {
    fn new(opened: u64) -> Self {
        Self {
            next_tag: 1,
            prefetch: 0,
            global_limit: 0,
            global_in_flight: 0,
            ledger: BTreeMap::new(),
            opened,
        }
    }
}

/// A consumer as the test holds it: the real object and the model's view.
struct TConsumer {
    real: Option<Consumer>,
    slot: usize,
    queue: usize,
    key: usize,
    no_ack: bool,
    registered: bool,
    buffer: VecDeque<Seen>,
}

struct World {
    broker: Broker,
    conns: Vec<Connection>,
    chans: Vec<Channel>,
    queues: Vec<String>,
    m_queues: Vec<MQueue>,
    m_chans: Vec<MChannel>,
    consumers: Vec<TConsumer>,
    next_key: usize,
    next_id: u64,
    opened: u64,
    /// Messages that left the broker for good (acked, rejected, no-ack delivered, purged).
    settled: Vec<u64>,
}

fn body_id(d: &Delivery) -> u64 {
    u64::from_le_bytes(d.body()[..8].try_into().expect("8-byte body"))
}

fn seen(d: &Delivery) -> Seen {
    Seen {
        id: body_id(d),
        tag: d.delivery_tag(),
        redelivered: d.redelivered(),
        count: d.delivery_count(),
    }
}

impl World {
    fn new() -> Self {
        let broker = Broker::builder().seed(1).in_memory();
        let conns = vec![broker.connect(), broker.connect()];
        let mut w = World {
            broker,
            conns,
            chans: Vec::new(),
            queues: Vec::new(),
            m_queues: Vec::new(),
            m_chans: Vec::new(),
            consumers: Vec::new(),
            next_key: 0,
            next_id: 0,
            opened: 0,
            settled: Vec::new(),
        };
        for slot in 0..SLOTS {
            let ch = w.conns[slot / 2].channel().unwrap();
            w.chans.push(ch);
            w.opened += 1;
            w.m_chans.push(MChannel::new(w.opened));
        }
        for q in 0..QUEUES {
            let name = format!("q{q}");
            let args = match q {
                // q0 dead-letters into q1; q2 dead-letters into itself (its own routing key).
                0 => FieldTable::new()
                    .with("x-dead-letter-exchange", "")
                    .with("x-dead-letter-routing-key", "q1"),
                2 => FieldTable::new().with("x-dead-letter-exchange", ""),
                _ => FieldTable::new(),
            };
            w.chans[0]
                .queue_declare(&name, QueueDeclareOptions::default(), args)
                .unwrap();
            w.queues.push(name);
            w.m_queues.push(MQueue::default());
        }
        w
    }

    fn reopen(&mut self, slot: usize) {
        self.chans[slot] = self.conns[slot / 2].channel().unwrap();
        self.opened += 1;
        self.m_chans[slot] = MChannel::new(self.opened);
    }

    // ---- model mechanics --------------------------------------------------------------------

    /// Delivers what queue `q` can deliver, exactly as the broker's dispatch does.
    fn m_dispatch(&mut self, q: usize) {
        loop {
            if self.m_queues[q].ready.is_empty() {
                return;
            }
            // The channel-wide limit (§3.3 global) is asked only of consumers with credit.
            let admits: Vec<bool> = self.m_queues[q]
                .consumers
                .iter()
                .map(|c| {
                    let ch = &self.m_chans[self.slot_of(c.key)];
                    c.no_ack || ch.global_limit == 0 || ch.global_in_flight < ch.global_limit
                })
                .collect();
            let mq = &mut self.m_queues[q];
            let Some(i) = mq.consumers.iter().enumerate().position(|(i, c)| {
                (c.no_ack || c.prefetch == 0 || c.in_flight < c.prefetch) && admits[i]
            }) else {
                return;
            };
            let mut c = mq.consumers.remove(i);
            c.in_flight += 1;
            let msg = mq.ready.remove(0);
            let key = c.key;
            let no_ack = c.no_ack;
            mq.consumers.push(c);
            let tc = self
                .consumers
                .iter_mut()
                .find(|t| t.key == key)
                .expect("registered consumer is held");
            let ch = &mut self.m_chans[tc.slot];
            let tag = ch.next_tag;
            ch.next_tag += 1;
            if no_ack {
                self.settled.push(msg.id);
            } else {
                ch.global_in_flight += 1;
                ch.ledger.insert(
                    tag,
                    (
                        q,
                        MMsg {
                            delivered: true,
                            ..msg
                        },
                        Some(key),
                    ),
                );
            }
            tc.buffer.push_back(Seen {
                id: msg.id,
                tag,
                redelivered: msg.delivered,
                count: msg.count,
            });
        }
    }

    fn m_release(&mut self, q: usize, consumer: Option<usize>) {
        if let Some(key) = consumer
            && let Some(c) = self.m_queues[q].consumers.iter_mut().find(|c| c.key == key)
        {
            c.in_flight -= 1;
        }
    }

    /// Settles taken ledger entries queue by queue (ascending queue index = ascending id).
    fn slot_of(&self, key: usize) -> usize {
        self.consumers
            .iter()
            .find(|t| t.key == key)
            .expect("registered consumer is held")
            .slot
    }

    /// Delivers again from every queue the channel's consumers consume from.
    fn m_kick(&mut self, slot: usize) {
        let mut queues: Vec<usize> = self
            .consumers
            .iter()
            .filter(|t| t.slot == slot && t.registered)
            .map(|t| t.queue)
            .collect();
        queues.sort_unstable();
        queues.dedup();
        for q in queues {
            self.m_dispatch(q);
        }
    }

    /// Settles a channel's taken deliveries: the channel-wide credit they held is released
    /// first, then each queue (ascending) settles and delivers, then, if the channel has a
    /// global limit and is open, its consumers' queues deliver again.
    fn m_apply(&mut self, slot: usize, taken: Vec<(u64, Held)>, how: How, closing: bool) {
        let counted = taken.iter().filter(|(_, (_, _, c))| c.is_some()).count() as u32;
        self.m_chans[slot].global_in_flight -= counted;
        self.m_settle(taken, how);
        if counted > 0 && self.m_chans[slot].global_limit > 0 && !closing {
            self.m_kick(slot);
        }
    }

    /// Settles queue by queue (ascending): each queue settles and delivers, then its rejected
    /// messages are dead-lettered in order (routed once its lock is released).
    fn m_settle(&mut self, taken: Vec<(u64, Held)>, how: How) {
        for (q, dead_letter_to) in DEAD_LETTER_TO.into_iter().enumerate() {
            let mine: Vec<_> = taken.iter().filter(|(_, (mq, _, _))| *mq == q).collect();
            if mine.is_empty() {
                continue;
            }
            let mut dead = Vec::new();
            for (_, (_, msg, consumer)) in mine {
                self.m_release(q, *consumer);
                if how == How::Reject
                    && let Some(target) = dead_letter_to
                {
                    dead.push((msg.id, target));
                } else if how == How::Requeue {
                    let back = MMsg {
                        delivered: true,
                        count: msg.count + 1,
                        ..*msg
                    };
                    let ready = &mut self.m_queues[q].ready;
                    let at = ready.partition_point(|m| m.seq < back.seq);
                    ready.insert(at, back);
                } else {
                    self.settled.push(msg.id);
                }
            }
            self.m_dispatch(q);
            for (id, target) in dead {
                let tq = &mut self.m_queues[target];
                tq.ready.push(MMsg {
                    id,
                    seq: tq.next_seq,
                    delivered: false,
                    count: 0,
                });
                tq.next_seq += 1;
                self.m_dispatch(target);
            }
        }
    }

    fn m_take(&mut self, slot: usize, tag: u64, multiple: bool) -> Option<Vec<(u64, Held)>> {
        let ledger = &mut self.m_chans[slot].ledger;
        if multiple && tag == 0 {
            return Some(std::mem::take(ledger).into_iter().collect());
        }
        if !ledger.contains_key(&tag) {
            return None;
        }
        if multiple {
            let rest = ledger.split_off(&(tag + 1));
            Some(std::mem::replace(ledger, rest).into_iter().collect())
        } else {
            Some(vec![(tag, ledger.remove(&tag).unwrap())])
        }
    }

    fn m_unregister(&mut self, key: usize) -> bool {
        let Some(i) = self.consumers.iter().position(|t| t.key == key) else {
            return false;
        };
        let tc = &mut self.consumers[i];
        if !tc.registered {
            return false;
        }
        tc.registered = false;
        self.m_queues[tc.queue].consumers.retain(|c| c.key != key);
        true
    }

    /// The model side of a channel closing: consumers cancelled, then unacked requeued.
    fn m_close_channel(&mut self, slot: usize) {
        let keys: Vec<usize> = self
            .consumers
            .iter()
            .filter(|t| t.slot == slot)
            .map(|t| t.key)
            .collect();
        for key in &keys {
            self.m_unregister(*key);
        }
        let taken = std::mem::take(&mut self.m_chans[slot].ledger)
            .into_iter()
            .collect();
        self.m_apply(slot, taken, How::Requeue, true);
        // Consumers of a closed channel yield nothing more; drop them.
        self.consumers.retain(|t| t.slot != slot);
    }

    fn pick_tag(&self, slot: usize, pick: usize) -> u64 {
        let ledger = &self.m_chans[slot].ledger;
        if ledger.is_empty() {
            return self.m_chans[slot].next_tag; // unknown: exercises the 406 path
        }
        *ledger.keys().nth(pick % ledger.len()).unwrap()
    }

    // ---- one step ---------------------------------------------------------------------------

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Publish { slot, queue } => {
                let id = self.next_id;
                self.next_id += 1;
                self.chans[slot]
                    .basic_publish(
                        "",
                        &self.queues[queue],
                        BasicPublishOptions::default(),
                        id.to_le_bytes().to_vec(),
                        BasicProperties::default(),
                    )
                    .unwrap();
                let mq = &mut self.m_queues[queue];
                mq.ready.push(MMsg {
                    id,
                    seq: mq.next_seq,
                    delivered: false,
                    count: 0,
                });
                mq.next_seq += 1;
                self.m_dispatch(queue);
            }
            Op::Get {
                slot,
                queue,
                no_ack,
            } => {
                let got = self.chans[slot]
                    .basic_get(&self.queues[queue], BasicGetOptions { no_ack })
                    .unwrap();
                let expected = if self.m_queues[queue].ready.is_empty() {
                    None
                } else {
                    let msg = self.m_queues[queue].ready.remove(0);
                    let ch = &mut self.m_chans[slot];
                    let tag = ch.next_tag;
                    ch.next_tag += 1;
                    if no_ack {
                        self.settled.push(msg.id);
                    } else {
                        ch.ledger.insert(
                            tag,
                            (
                                queue,
                                MMsg {
                                    delivered: true,
                                    ..msg
                                },
                                None,
                            ),
                        );
                    }
                    let remaining = self.m_queues[queue].ready.len() as u32;
                    Some((
                        Seen {
                            id: msg.id,
                            tag,
                            redelivered: msg.delivered,
                            count: msg.count,
                        },
                        remaining,
                    ))
                };
                let actual = got.map(|g| (seen(&g.delivery), g.message_count));
                prop_assert_eq!(actual, expected, "basic_get on q{}", queue);
            }
            Op::Consume {
                slot,
                queue,
                no_ack,
                prefetch,
            } => {
                if self.consumers.len() >= 6 {
                    return Ok(());
                }
                let ch = &self.chans[slot];
                ch.basic_qos(prefetch, BasicQosOptions::default()).unwrap();
                let opts = BasicConsumeOptions {
                    no_ack,
                    ..Default::default()
                };
                let real = ch
                    .basic_consume(&self.queues[queue], "", opts, FieldTable::new())
                    .unwrap();
                self.m_chans[slot].prefetch = prefetch;
                let key = self.next_key;
                self.next_key += 1;
                self.m_queues[queue].consumers.push(MConsumer {
                    key,
                    prefetch: u32::from(prefetch),
                    no_ack,
                    in_flight: 0,
                });
                self.consumers.push(TConsumer {
                    real: Some(real),
                    slot,
                    queue,
                    key,
                    no_ack,
                    registered: true,
                    buffer: VecDeque::new(),
                });
                self.m_dispatch(queue);
            }
            Op::Recv { consumer } => {
                let Some(tc) = self.consumers.get_mut(consumer) else {
                    return Ok(());
                };
                let real = tc.real.as_mut().unwrap();
                let actual = real.try_recv().ok().map(|d| seen(&d));
                let expected = tc.buffer.pop_front();
                prop_assert_eq!(actual, expected, "receive of consumer {}", consumer);
            }
            Op::Ack {
                slot,
                pick,
                multiple,
            } => {
                let tag = self.pick_tag(slot, pick);
                let r = self.chans[slot].basic_ack(tag, BasicAckOptions { multiple });
                self.settle_outcome(slot, tag, multiple, false, false, r)?;
            }
            Op::Nack {
                slot,
                pick,
                multiple,
                requeue,
            } => {
                let tag = self.pick_tag(slot, pick);
                let r = self.chans[slot].basic_nack(tag, BasicNackOptions { multiple, requeue });
                self.settle_outcome(slot, tag, multiple, true, requeue, r)?;
            }
            Op::Reject {
                slot,
                pick,
                requeue,
            } => {
                let tag = self.pick_tag(slot, pick);
                let r = self.chans[slot].basic_reject(tag, BasicRejectOptions { requeue });
                self.settle_outcome(slot, tag, false, true, requeue, r)?;
            }
            Op::BadAck { slot } => {
                let tag = self.m_chans[slot].next_tag + 3;
                let r = self.chans[slot].basic_ack(tag, BasicAckOptions::default());
                self.settle_outcome(slot, tag, false, false, false, r)?;
            }
            Op::Cancel { consumer } => {
                let Some(tc) = self.consumers.get(consumer) else {
                    return Ok(());
                };
                let (slot, key, tag) =
                    (tc.slot, tc.key, tc.real.as_ref().unwrap().tag().to_owned());
                self.chans[slot]
                    .basic_cancel(&tag, BasicCancelOptions::default())
                    .unwrap();
                self.m_unregister(key);
            }
            Op::DropConsumer { consumer } => {
                let Some(tc) = self.consumers.get_mut(consumer) else {
                    return Ok(());
                };
                let (key, slot, no_ack) = (tc.key, tc.slot, tc.no_ack);
                let buffered: Vec<Seen> = tc.buffer.drain(..).collect();
                drop(tc.real.take());
                // Model of `Consumer`'s drop: cancel, then requeue together the deliveries it had
                // not handed out that are still outstanding.
                self.m_unregister(key);
                self.consumers.remove(consumer);
                if !no_ack {
                    let ledger = &mut self.m_chans[slot].ledger;
                    let taken = buffered
                        .iter()
                        .filter_map(|s| ledger.remove(&s.tag).map(|e| (s.tag, e)))
                        .collect();
                    self.m_apply(slot, taken, How::Requeue, false);
                }
            }
            Op::GlobalQos { slot, limit } => {
                let opts = BasicQosOptions { global: true };
                self.chans[slot].basic_qos(limit, opts).unwrap();
                self.m_chans[slot].global_limit = u32::from(limit);
                self.m_kick(slot);
            }
            Op::Recover { slot } => {
                self.chans[slot]
                    .basic_recover(BasicRecoverOptions::default())
                    .unwrap();
                let taken = std::mem::take(&mut self.m_chans[slot].ledger)
                    .into_iter()
                    .collect();
                self.m_apply(slot, taken, How::Requeue, false);
            }
            Op::Purge { slot, queue } => {
                let n = self.chans[slot]
                    .queue_purge(&self.queues[queue], BindOptions::default())
                    .unwrap();
                let purged = std::mem::take(&mut self.m_queues[queue].ready);
                prop_assert_eq!(n as usize, purged.len(), "purge count of q{}", queue);
                self.settled.extend(purged.iter().map(|m| m.id));
            }
            Op::CloseChannel { slot } => {
                self.chans[slot].close();
                self.m_close_channel(slot);
                self.reopen(slot);
            }
            Op::CloseConnection { conn } => {
                let old = std::mem::replace(&mut self.conns[conn], self.broker.connect());
                drop(old);
                let mut slots: Vec<usize> = (conn * 2..conn * 2 + 2).collect();
                slots.sort_by_key(|&s| self.m_chans[s].opened);
                for slot in slots {
                    self.m_close_channel(slot);
                    self.reopen(slot);
                }
            }
        }
        Ok(())
    }

    fn settle_outcome(
        &mut self,
        slot: usize,
        tag: u64,
        multiple: bool,
        negative: bool,
        requeue: bool,
        r: coney::Result<()>,
    ) -> Result<(), TestCaseError> {
        match self.m_take(slot, tag, multiple) {
            Some(taken) => {
                prop_assert!(r.is_ok(), "settle of tag {} failed: {:?}", tag, r);
                let how = match (negative, requeue) {
                    (false, _) => How::Ack,
                    (true, true) => How::Requeue,
                    (true, false) => How::Reject,
                };
                self.m_apply(slot, taken, how, false);
            }
            None => {
                let err = r.expect_err("unknown tag must fail");
                prop_assert_eq!(err.reply_code(), Some(ReplyCode::PreconditionFailed));
                prop_assert!(self.chans[slot].is_closed());
                self.m_close_channel(slot);
                self.reopen(slot);
            }
        }
        Ok(())
    }

    /// Everything still in the broker, drained: every published id exactly once overall.
    fn account(&mut self) -> Result<(), TestCaseError> {
        let mut all: Vec<u64> = self.settled.clone();
        for q in &self.m_queues {
            all.extend(q.ready.iter().map(|m| m.id));
        }
        for ch in &self.m_chans {
            all.extend(ch.ledger.values().map(|(_, m, _)| m.id));
        }
        all.sort_unstable();
        let expected: Vec<u64> = (0..self.next_id).collect();
        prop_assert_eq!(all, expected, "every message in exactly one place");
        for (q, name) in self.queues.iter().enumerate() {
            let ok = self.chans[0]
                .queue_declare(
                    name,
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::new(),
                )
                .unwrap();
            prop_assert_eq!(ok.message_count as usize, self.m_queues[q].ready.len());
            prop_assert_eq!(ok.consumer_count as usize, self.m_queues[q].consumers.len());
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    /// The broker agrees with the reference model after every step of a random sequence.
    #[test]
    fn broker_matches_reference_model(ops in prop::collection::vec(op(), 1..120)) {
        let mut w = World::new();
        for op in &ops {
            w.step(op)?;
            if let Err(e) = w.broker.check_invariants() {
                return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
            }
        }
        w.account()?;
    }
}
