//! Model test with restarts: random publishes (persistent or not, to durable and transient
//! queues), gets, acks, syncs, injected store failures and crashes, against a model of what
//! must, may and must not survive (DESIGN.md "Durability"; SEMANTICS.md §9.2).
//!
//! A crash stops the store's writes at an arbitrary point (everything not flushed is lost),
//! then the broker reopens from what was flushed. Because the flusher runs on its own, a
//! publish or an ack is only *certainly* durable after a successful `sync`; before that the
//! model accepts either outcome, and after the restart it adopts what came back.

use coney::store::{Faults, FaultyStore, MemoryStore};
use coney::*;
use proptest::prelude::*;

/// q0 and q1 are durable, q2 is not.
const QUEUES: [&str; 3] = ["q0", "q1", "q2"];

#[derive(Clone, Debug)]
enum Op {
    Publish { queue: usize, persistent: bool },
    Get { queue: usize, no_ack: bool },
    AckAll,
    Sync,
    Fault,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, any::<bool>()).prop_map(|(queue, persistent)| Op::Publish { queue, persistent }),
        3 => (0..3usize, any::<bool>()).prop_map(|(queue, no_ack)| Op::Get { queue, no_ack }),
        2 => Just(Op::AckAll),
        2 => Just(Op::Sync),
        1 => Just(Op::Fault),
        1 => Just(Op::Crash),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Durable {
    Maybe,
    Certain,
}

#[derive(Clone, Copy, Debug)]
struct MMsg {
    id: u64,
    /// Whether it can survive a restart at all (persistent, in a durable queue).
    kept: bool,
    /// Whether its record is on disk.
    put: Durable,
    state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Ready,
    /// Fetched, not acked: still in the queue.
    Unacked,
    /// Acked (or fetched no-ack), with whether the removal is on disk.
    Removed(Durable),
}

struct World {
    mem: MemoryStore,
    faults: Faults,
    broker: Option<Broker>,
    conn: Option<Connection>,
    ch: Option<Channel>,
    queues: [Vec<MMsg>; 3],
    next_id: u64,
}

impl World {
    fn new() -> Self {
        let mut w = World {
            mem: MemoryStore::new(),
            faults: Faults::new(),
            broker: None,
            conn: None,
            ch: None,
            queues: Default::default(),
            next_id: 0,
        };
        w.open();
        w
    }

    fn open(&mut self) {
        self.faults = Faults::new();
        let store = FaultyStore::new(self.mem.clone(), self.faults.clone());
        let broker = Broker::builder().open_store(store).unwrap();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        for (i, q) in QUEUES.iter().enumerate() {
            let durable = i < 2;
            let opts = QueueDeclareOptions {
                durable,
                ..Default::default()
            };
            // A declare can meet a poisoned store only if a fault was injected; not here.
            ch.queue_declare(q, opts, FieldTable::new()).unwrap();
        }
        self.broker = Some(broker);
        self.conn = Some(conn);
        self.ch = Some(ch);
    }

    fn ch(&self) -> &Channel {
        self.ch.as_ref().unwrap()
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Publish { queue, persistent } => {
                let id = self.next_id;
                self.next_id += 1;
                let props = if persistent {
                    BasicProperties::default().with_delivery_mode(2)
                } else {
                    BasicProperties::default()
                };
                let r = self.ch().basic_publish(
                    "",
                    QUEUES[queue],
                    Default::default(),
                    id.to_le_bytes().to_vec(),
                    props,
                );
                let kept = persistent && queue < 2;
                match r {
                    Ok(()) => self.queues[queue].push(MMsg {
                        id,
                        kept,
                        put: Durable::Maybe,
                        state: State::Ready,
                    }),
                    // Only a record-keeping publish may be refused, and only by a failed store.
                    Err(Error::Storage(_)) => prop_assert!(kept, "a transient publish was refused"),
                    Err(e) => return Err(TestCaseError::fail(format!("publish: {e:?}"))),
                }
            }
            Op::Get { queue, no_ack } => {
                let got = self
                    .ch()
                    .basic_get(QUEUES[queue], BasicGetOptions { no_ack })
                    .unwrap();
                let next = self.queues[queue]
                    .iter_mut()
                    .find(|m| m.state == State::Ready);
                match (got, next) {
                    (None, None) => {}
                    (Some(g), Some(m)) => {
                        let id = u64::from_le_bytes(g.delivery.body()[..8].try_into().unwrap());
                        prop_assert_eq!(id, m.id, "get from {}", QUEUES[queue]);
                        m.state = if no_ack {
                            State::Removed(Durable::Maybe)
                        } else {
                            State::Unacked
                        };
                    }
                    (g, m) => {
                        return Err(TestCaseError::fail(format!(
                            "get from {}: broker {:?}, model {:?}",
                            QUEUES[queue],
                            g.map(|g| g.delivery.body().clone()),
                            m.map(|m| m.id)
                        )));
                    }
                }
            }
            Op::AckAll => {
                // Tag 0 with `multiple` acks everything outstanding (nothing is fine too).
                match self.ch().basic_ack(0, BasicAckOptions { multiple: true }) {
                    Ok(()) => {}
                    // The acks stand in memory; the store, poisoned by an injected fault, says
                    // they will not reach the disk.
                    Err(Error::Storage(_)) => prop_assert!(
                        !self.broker.as_ref().unwrap().health().is_healthy(),
                        "an ack reported a storage error while the store was healthy"
                    ),
                    Err(e) => return Err(TestCaseError::fail(format!("ack all: {e:?}"))),
                }
                for q in &mut self.queues {
                    for m in q.iter_mut().filter(|m| m.state == State::Unacked) {
                        m.state = State::Removed(Durable::Maybe);
                    }
                }
            }
            Op::Sync => {
                if self.broker.as_ref().unwrap().sync().is_ok() {
                    for m in self.queues.iter_mut().flatten() {
                        m.put = Durable::Certain;
                        if m.state == State::Removed(Durable::Maybe) {
                            m.state = State::Removed(Durable::Certain);
                        }
                    }
                }
            }
            Op::Fault => self.faults.fail_apply_after(0),
            Op::Crash => self.crash()?,
        }
        if let Err(e) = self.broker.as_ref().unwrap().check_invariants() {
            return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
        }
        Ok(())
    }

    /// Stops every further write, loses what was not flushed, reopens, and checks what came
    /// back against the model.
    fn crash(&mut self) -> Result<(), TestCaseError> {
        self.faults.fail_apply_after(0);
        self.faults.fail_next_flush();
        // Stop the broker (its flusher's last writes fail), then lose what was not flushed.
        self.ch = None;
        self.conn = None;
        self.broker = None;
        self.mem.crash();
        self.open();
        for (q, name) in QUEUES.iter().enumerate() {
            let mut present = Vec::new();
            while let Some(g) = self
                .ch()
                .basic_get(name, BasicGetOptions::default())
                .unwrap()
            {
                prop_assert!(
                    g.delivery.redelivered(),
                    "recovered messages are redelivered"
                );
                present.push(u64::from_le_bytes(
                    g.delivery.body()[..8].try_into().unwrap(),
                ));
            }
            let model = &self.queues[q];
            let mut expected = model.iter().filter(|m| m.kept).peekable();
            let mut adopted = Vec::new();
            for id in &present {
                // Skip model messages that may have been lost, up to this one.
                loop {
                    let Some(m) = expected.next() else {
                        return Err(TestCaseError::fail(format!(
                            "{name}: {id} came back but was never kept ({present:?})"
                        )));
                    };
                    if m.id == *id {
                        prop_assert!(
                            m.state != State::Removed(Durable::Certain),
                            "{}: acked {} came back",
                            name,
                            id
                        );
                        adopted.push(MMsg {
                            put: Durable::Certain,
                            state: State::Ready,
                            ..*m
                        });
                        break;
                    }
                    prop_assert!(
                        !must_survive(m),
                        "{}: {} lost (present {:?})",
                        name,
                        m.id,
                        present
                    );
                }
            }
            for m in expected {
                prop_assert!(
                    !must_survive(m),
                    "{}: {} lost (present {:?})",
                    name,
                    m.id,
                    present
                );
            }
            self.queues[q] = adopted;
        }
        // Put everything fetched back.
        self.ch()
            .basic_recover(BasicRecoverOptions::default())
            .unwrap();
        Ok(())
    }
}

fn must_survive(m: &MMsg) -> bool {
    m.kept && m.put == Durable::Certain && !matches!(m.state, State::Removed(_))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Nothing certainly durable is lost, nothing certainly removed comes back, order holds.
    #[test]
    fn restarts_keep_exactly_what_was_made_durable(ops in prop::collection::vec(op(), 1..80)) {
        let mut w = World::new();
        for op in &ops {
            w.step(op)?;
        }
        w.crash()?;
    }
}
