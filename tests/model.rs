//! Model test: random sequences of declare / publish / get / consume / recv / ack / nack /
//! reject / cancel / recover / purge / channel close / connection close / clock advance, run
//! against the broker (on a manual clock) and a naive reference model side by side, compared
//! after every step.
//!
//! The model is deliberately simple (vectors and linear scans) and exact: it predicts which
//! message each `basic_get` and each consumer receive returns, with its delivery tag,
//! redelivered flag, delivery count, `x-delivery-count`, `x-death` history and routing key
//! (SEMANTICS.md §3.2 round-robin, §3.3 prefetch, §3.5 tags, §3.6 redelivered, §4.1 multiple,
//! §4.2 unknown tags close the channel, §4.3 requeue to the original position (classic) or to
//! the front returns lane in return order (quorum), §4.4 cancel vs close). It also covers:
//! - §5.2/§5.3/§5.4 dead lettering for every reason (`rejected`, `expired`, `maxlen`,
//!   `delivery_limit`): q0 into q1, q2 into itself, q3 and q4 into each other, q5 into q1; the
//!   `x-death` entries (one per queue and reason, most recent first, counted) and the
//!   `x-first-death-*` / `x-last-death-*` headers; the `expiration` property removed;
//! - §5.5 cycle detection: a dead letter for `expired`, `maxlen` or `delivery_limit` into a
//!   queue whose most recent `x-death` range holds no `rejected` is dropped (q2's expiries
//!   always are; q3 <-> q4 loops are unless a rejection is in between);
//! - §6.2 the quorum delivery limit (q3, limit 2): every return counts, a return taking the count
//!   over the limit dead-letters with `delivery_limit`; `x-delivery-count` present from the
//!   first redelivery;
//! - §7.1 TTL on a manual clock: queue TTL (q1 100 ms, q2 250 ms) and per-message `expiration`
//!   ("0", "50", "200"), the lower applying, the deadline kept across requeues; expiry only at
//!   the head, expired messages never delivered or fetched; a TTL-0 message delivered only
//!   to a consumer that takes it as it arrives; half the cases on a `ManualClock` (due expiry
//!   timers run as it moves), half on a clock that runs no timers (expired messages wait at the
//!   head until the next pass or get removes them);
//! - §7.3 length limits: q4 `x-max-length` 2 `drop-head` (oldest ready dead-lettered with
//!   `maxlen` after a publish, and on a requeue before anything is delivered, as RabbitMQ's
//!   `requeue_and_run` does), q5
//!   `x-max-length` 2 `reject-publish` (publish refused when ready + 1 > 2, nacked on the
//!   confirm-mode channels, never dead-lettered);
//! - priority queues (https://www.rabbitmq.com/docs/priority): publishes carry a random
//!   `priority` (or none); q6 has `x-max-priority` 3 (highest first, FIFO within a level, above
//!   the maximum counted as the maximum, requeue to the own level's original position, drop-head
//!   and expiry at that head); the quorum queues q3 and q7 serve their two levels (above 4 high)
//!   two high for one normal while both wait, a normal one only when older than the high head
//!   (`rabbit_fifo_q`);
//! - consumer priorities (`x-priority`, random): the highest group with credit first,
//!   round-robin inside it;
//! - single active consumer on q6 (classic) and q7 (quorum): only the active consumer receives;
//!   when it leaves, the waiting one of highest priority (earliest among equals) takes over,
//!   after a closing channel's requeue; on q7 a higher-priority consumer takes over once the
//!   active one holds nothing unsettled, which receives nothing meanwhile; `basic.get` on q7 is
//!   refused with 405;
//! - q7 has no delivery limit (`x-delivery-limit` -1): a client's requeue (nack, reject,
//!   recover) re-appends at the tail of the normal lane, a return by channel close or consumer
//!   drop goes to the front;
//! - accounting: after every step `check_invariants()` holds, every published message is in
//!   exactly one place (acked, consumed without ack, purged, ready or unacked in some queue,
//!   which covers dead-lettered messages, or dropped for a counted reason) and
//!   `Broker::death_stats` matches the model's dead-lettered and dropped counts per queue and
//!   reason.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use coney::clock::Waker;

use coney::*;
use proptest::prelude::*;

const START: u64 = 1_700_000_000_000;

/// A clock whose moves run no timers (it takes the broker's waker and never calls it): expiry
/// then happens only in the queue passes and gets that follow, with expired messages already
/// at the head when a command starts. Half the cases run on it, half on a [`ManualClock`].
#[derive(Clone, Default)]
struct LazyClock(Arc<AtomicU64>);

impl Clock for LazyClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn on_advance(&self, _waker: Waker) -> bool {
        true
    }
}

/// The broker's clock as the test moves it.
enum TestClock {
    /// Due timers run as it moves.
    Manual(ManualClock),
    /// No timer ever runs.
    Lazy(LazyClock),
}

/// How each queue is declared.
#[derive(Clone, Copy, Debug)]
struct QSpec {
    quorum: bool,
    /// `x-message-ttl`.
    ttl: Option<u64>,
    /// Where its dead letters go (the default exchange, by routing key: the target's name).
    dlx_to: Option<usize>,
    /// Whether `x-dead-letter-routing-key` names the target (else the message's own key).
    dlrk: bool,
    /// `x-max-length`.
    max_len: Option<usize>,
    /// `x-overflow: reject-publish` (else `drop-head`).
    reject_publish: bool,
    /// `x-delivery-limit` (quorum).
    delivery_limit: Option<u32>,
    /// `x-delivery-limit: -1` (quorum): no limit, client requeues go to the tail.
    unlimited: bool,
    /// `x-max-priority` (classic).
    max_priority: Option<u8>,
    /// `x-single-active-consumer`.
    sac: bool,
}

const PLAIN: QSpec = QSpec {
    quorum: false,
    ttl: None,
    dlx_to: None,
    dlrk: false,
    max_len: None,
    reject_publish: false,
    delivery_limit: None,
    unlimited: false,
    max_priority: None,
    sac: false,
};

const QUEUES: usize = 8;

const SPECS: [QSpec; QUEUES] = [
    // q0: dead-letters into q1 (DLRK); messages expire only by their own `expiration`.
    QSpec {
        dlx_to: Some(1),
        dlrk: true,
        ..PLAIN
    },
    // q1: 100 ms TTL, no dead-letter exchange: rejected and expired messages are dropped.
    QSpec {
        ttl: Some(100),
        ..PLAIN
    },
    // q2: 250 ms TTL, dead-letters into itself (its own routing key): a loop through a
    // rejection is not a cycle, an expiry always is (§5.5).
    QSpec {
        ttl: Some(250),
        dlx_to: Some(2),
        ..PLAIN
    },
    // q3: quorum, delivery limit 2, dead-letters into q4.
    QSpec {
        quorum: true,
        dlx_to: Some(4),
        dlrk: true,
        delivery_limit: Some(2),
        ..PLAIN
    },
    // q4: at most 2 ready, drop-head, dead-letters into q3.
    QSpec {
        dlx_to: Some(3),
        dlrk: true,
        max_len: Some(2),
        ..PLAIN
    },
    // q5: at most 2 ready, reject-publish (refusals are not dead-lettered), dead-letters into q1.
    QSpec {
        dlx_to: Some(1),
        dlrk: true,
        max_len: Some(2),
        reject_publish: true,
        ..PLAIN
    },
    // q6: priorities 0-3, at most 3 ready (drop-head, no dead-letter exchange), single active
    // consumer.
    QSpec {
        max_priority: Some(3),
        max_len: Some(3),
        sac: true,
        ..PLAIN
    },
    // q7: quorum, no delivery limit, single active consumer.
    QSpec {
        quorum: true,
        unlimited: true,
        sac: true,
        ..PLAIN
    },
];

/// How taken deliveries are settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    Ack,
    /// The client's requeue: nack, reject, recover.
    Requeue,
    /// The holder went away: channel close, consumer drop.
    Return,
    Reject,
}

/// Why a message left a queue without an ack (§5.2); `Refused` is a `reject-publish` refusal,
/// which the broker counts as a `maxlen` drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    Rejected,
    Expired,
    Maxlen,
    DeliveryLimit,
    Refused,
}

impl Reason {
    /// The reason as counted and written in `x-death`.
    fn counted(self) -> Reason {
        if self == Reason::Refused {
            Reason::Maxlen
        } else {
            self
        }
    }

    fn index(self) -> usize {
        match self.counted() {
            Reason::Rejected => 0,
            Reason::Expired => 1,
            Reason::Maxlen | Reason::Refused => 2,
            Reason::DeliveryLimit => 3,
        }
    }

    fn as_str(self) -> &'static str {
        match self.counted() {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::Maxlen | Reason::Refused => "maxlen",
            Reason::DeliveryLimit => "delivery_limit",
        }
    }
}

const SLOTS: usize = 4; // channel slots 0,1 on connection 0; 2,3 on connection 1

/// Slots whose channels are in confirm mode (publishes are checked for ack / nack).
fn confirming(slot: usize) -> bool {
    slot % 2 == 1
}

/// Message priorities the publishes use.
const PRIORITIES: [Option<u8>; 5] = [None, Some(0), Some(2), Some(5), Some(9)];

/// Consumer priorities the consumes use.
const CONSUMER_PRIORITIES: [i32; 4] = [0, 0, 1, 2];

/// Per-message TTLs the publishes use.
const EXPIRATIONS: [Option<&str>; 4] = [None, Some("0"), Some("50"), Some("200")];

#[derive(Clone, Debug)]
enum Op {
    Publish {
        slot: usize,
        queue: usize,
        expiration: Option<&'static str>,
        priority: Option<u8>,
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
        priority: i32,
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
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let slot = 0..SLOTS;
    // The quorum queue a little more often: its delivery limit needs three returns; the
    // single-active-consumer queues too: a hand-over needs two consumers and a backlog.
    let queue = prop_oneof![5 => 0..QUEUES, 1 => Just(3), 2 => 6..QUEUES];
    let expiration = prop_oneof![
        5 => Just(EXPIRATIONS[0]),
        1 => Just(EXPIRATIONS[1]),
        1 => Just(EXPIRATIONS[2]),
        1 => Just(EXPIRATIONS[3]),
    ];
    prop_oneof![
        7 => (slot.clone(), queue.clone(), expiration, prop::sample::select(&PRIORITIES[..]))
            .prop_map(|(slot, queue, expiration, priority)| Op::Publish { slot, queue, expiration, priority }),
        2 => (slot.clone(), queue.clone(), any::<bool>()).prop_map(|(slot, queue, no_ack)| Op::Get { slot, queue, no_ack }),
        2 => (
            slot.clone(),
            queue.clone(),
            prop::bool::weighted(0.2),
            prop_oneof![Just(0u16), 1u16..4],
            prop::sample::select(&CONSUMER_PRIORITIES[..]),
        )
            .prop_map(|(slot, queue, no_ack, prefetch, priority)| Op::Consume { slot, queue, no_ack, prefetch, priority }),
        5 => (0..6usize).prop_map(|consumer| Op::Recv { consumer }),
        3 => (slot.clone(), any::<usize>(), prop::bool::weighted(0.3)).prop_map(|(slot, pick, multiple)| Op::Ack { slot, pick, multiple }),
        3 => (slot.clone(), any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(slot, pick, multiple, requeue)| Op::Nack { slot, pick, multiple, requeue }),
        1 => (slot.clone(), any::<usize>(), any::<bool>()).prop_map(|(slot, pick, requeue)| Op::Reject { slot, pick, requeue }),
        1 => slot.clone().prop_map(|slot| Op::BadAck { slot }),
        1 => (0..6usize).prop_map(|consumer| Op::Cancel { consumer }),
        1 => (0..6usize).prop_map(|consumer| Op::DropConsumer { consumer }),
        2 => slot.clone().prop_map(|slot| Op::Recover { slot }),
        1 => (slot.clone(), 0u16..4).prop_map(|(slot, limit)| Op::GlobalQos { slot, limit }),
        1 => (slot.clone(), queue).prop_map(|(slot, queue)| Op::Purge { slot, queue }),
        1 => slot.prop_map(|slot| Op::CloseChannel { slot }),
        1 => (0..2usize).prop_map(|conn| Op::CloseConnection { conn }),
        3 => prop_oneof![Just(0u64), 1u64..=300, Just(50), Just(100), Just(250)].prop_map(|ms| Op::Advance { ms }),
    ]
}

// ---- the reference model ------------------------------------------------------------------

/// A message as a queue holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MMsg {
    id: u64,
    seq: u64,
    delivered: bool,
    count: u32,
    /// When it entered this queue.
    enqueued: u64,
    /// When it expires in this queue (§7.1).
    deadline: Option<u64>,
    /// Its `expiration` property (gone once dead-lettered, §5.3).
    expiration: Option<&'static str>,
    /// The queue whose name is its routing key.
    key: usize,
    /// Its `priority` property (kept when dead-lettered).
    priority: Option<u8>,
    /// Re-appended by a client's requeue to a quorum queue's normal lane, whatever its
    /// priority (RabbitMQ 4.0-4.2).
    demoted: bool,
    /// `x-death`: (queue, reason, count), most recent first (§5.4).
    deaths: Vec<(usize, Reason, u32)>,
    /// `x-first-death-queue` / `-reason`.
    first_death: Option<(usize, Reason)>,
}

/// What a receive or a get is expected to return.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    id: u64,
    tag: u64,
    redelivered: bool,
    count: u32,
    /// `x-delivery-count` (quorum queues, §6.2).
    count_header: Option<i64>,
    routing_key: String,
    expiration: Option<String>,
    /// `x-death` as (queue, reason, count).
    deaths: Vec<(String, String, i64)>,
    /// `x-first-death-queue` / `-reason`, `x-last-death-queue` / `-reason`.
    first_death: Option<(String, String)>,
    last_death: Option<(String, String)>,
}

#[derive(Debug)]
struct MConsumer {
    key: usize,
    prefetch: u32,
    no_ack: bool,
    in_flight: u32,
    /// `x-priority`.
    priority: i32,
}

#[derive(Debug)]
struct MQueue {
    spec: QSpec,
    /// Quorum returns lane, served first (§4.3).
    returns: VecDeque<MMsg>,
    /// Ordered by sequence number, all priorities together ([`MQueue::head_index`] picks).
    ready: Vec<MMsg>,
    /// Quorum queues: dequeues from `ready` modulo 3 (`rabbit_fifo_q`'s counter).
    served: u8,
    /// In service order: priority descending, round-robin inside a priority.
    consumers: Vec<MConsumer>,
    /// Single active consumer: the one that receives.
    active: Option<usize>,
    /// Single active consumer (quorum): the active one waits to hand over to a higher one.
    quiescing: bool,
    next_seq: u64,
    /// A publish was accepted under a length limit: the next housekeeping checks it.
    limit_check: bool,
    /// Removals not yet carried out (in order).
    effects: Vec<(MMsg, Reason)>,
    /// Dead letters waiting to be routed (in order).
    dead: VecDeque<(MMsg, Reason)>,
    /// The earliest pending expiry timer (`u64::MAX`: none).
    expiry_timer: u64,
    /// Dead-lettered and dropped, per counted reason.
    dead_lettered: [u64; 4],
    dropped: [u64; 4],
}

impl MQueue {
    fn new(spec: QSpec) -> Self {
        Self {
            spec,
            returns: VecDeque::new(),
            ready: Vec::new(),
            served: 0,
            consumers: Vec::new(),
            active: None,
            quiescing: false,
            next_seq: 0,
            limit_check: false,
            effects: Vec::new(),
            dead: VecDeque::new(),
            expiry_timer: u64::MAX,
            dead_lettered: [0; 4],
            dropped: [0; 4],
        }
    }
}

impl MQueue {
    fn len(&self) -> usize {
        self.returns.len() + self.ready.len()
    }

    /// Which ready message goes next: classic priority queues the oldest of the highest
    /// (clamped) priority; quorum queues the oldest high one (priority above 4), or the oldest
    /// normal one when the high lane had its two turns and the normal one is older; else the
    /// oldest.
    fn head_index(&self) -> Option<usize> {
        if self.ready.is_empty() {
            return None;
        }
        let level = |m: &MMsg| m.priority.unwrap_or(0);
        if self.spec.quorum {
            let high = self.ready.iter().position(|m| level(m) > 4 && !m.demoted);
            let normal = self.ready.iter().position(|m| level(m) <= 4 || m.demoted);
            match (high, normal) {
                (Some(h), Some(n)) if self.served == 2 && self.ready[n].seq < self.ready[h].seq => {
                    Some(n)
                }
                (Some(h), _) => Some(h),
                (None, n) => n,
            }
        } else if let Some(max) = self.spec.max_priority {
            let top = self.ready.iter().map(|m| level(m).min(max)).max()?;
            self.ready.iter().position(|m| level(m).min(max) == top)
        } else {
            Some(0)
        }
    }

    fn head(&self) -> Option<&MMsg> {
        self.returns
            .front()
            .or_else(|| self.head_index().map(|i| &self.ready[i]))
    }

    fn pop(&mut self) -> Option<MMsg> {
        if let Some(m) = self.returns.pop_front() {
            return Some(m);
        }
        let i = self.head_index()?;
        if self.spec.quorum {
            self.served = if self.served == 2 { 0 } else { self.served + 1 };
        }
        Some(self.ready.remove(i))
    }

    /// Adds a consumer at the back of its priority group; on a single-active-consumer queue
    /// the first one becomes active.
    fn add_consumer(&mut self, c: MConsumer) {
        if self.spec.sac && self.active.is_none() {
            self.active = Some(c.key);
        }
        self.insert_consumer(c);
        self.reconsider();
    }

    fn insert_consumer(&mut self, c: MConsumer) {
        let at = self.consumers.partition_point(|x| x.priority >= c.priority);
        self.consumers.insert(at, c);
    }

    fn remove_consumer(&mut self, key: usize) {
        self.consumers.retain(|c| c.key != key);
        if self.active == Some(key) {
            self.active = None;
        }
        self.reconsider();
    }

    /// Single active consumer: with none active, the first in service order becomes active;
    /// a quorum queue's active consumer outranked by a waiting one hands over when it holds
    /// nothing (or is no-ack), else quiesces.
    fn reconsider(&mut self) {
        if !self.spec.sac {
            return;
        }
        let Some(at) = self
            .active
            .and_then(|k| self.consumers.iter().position(|c| c.key == k))
        else {
            self.active = self.consumers.first().map(|c| c.key);
            self.quiescing = false;
            return;
        };
        if !self.spec.quorum {
            return;
        }
        let active = &self.consumers[at];
        let challenger = self
            .consumers
            .iter()
            .find(|c| c.key != active.key)
            .filter(|c| c.priority > active.priority)
            .map(|c| c.key);
        match challenger {
            None => self.quiescing = false,
            Some(next) if active.no_ack || active.in_flight == 0 => {
                self.active = Some(next);
                self.quiescing = false;
                let old = self.consumers.remove(at);
                self.insert_consumer(old);
            }
            Some(_) => self.quiescing = true,
        }
    }

    fn insert_ready(&mut self, m: MMsg) {
        let at = self.ready.partition_point(|r| r.seq < m.seq);
        self.ready.insert(at, m);
    }
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

/// How a message left the broker for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gone {
    Acked,
    /// Delivered to a no-ack consumer or fetched with no-ack.
    NoAck,
    Purged,
    /// Dropped by queue `.0` for a reason (no dead-letter exchange, cycle, refused publish).
    Dropped(usize, Reason),
}

struct World {
    broker: Broker,
    clock: TestClock,
    now: u64,
    conns: Vec<Connection>,
    chans: Vec<Channel>,
    queues: Vec<String>,
    m_queues: Vec<MQueue>,
    m_chans: Vec<MChannel>,
    consumers: Vec<TConsumer>,
    next_key: usize,
    next_id: u64,
    opened: u64,
    /// Messages that left the broker for good, and how.
    settled: Vec<(u64, Gone)>,
    /// Pending expiry timers: (due, id) -> queue, as the broker schedules them.
    timers: BTreeMap<(u64, u64), usize>,
    next_timer: u64,
}

fn body_id(d: &Delivery) -> u64 {
    u64::from_le_bytes(d.body()[..8].try_into().expect("8-byte body"))
}

fn text(t: &FieldTable, key: &str) -> Option<String> {
    t.get(key).and_then(FieldValue::as_str).map(str::to_owned)
}

fn seen(d: &Delivery) -> Seen {
    let headers = d.properties().headers.clone().unwrap_or_default();
    let deaths = match headers.get("x-death") {
        Some(FieldValue::Array(items)) => items
            .iter()
            .map(|v| match v {
                FieldValue::Table(t) => (
                    text(t, "queue").unwrap_or_default(),
                    text(t, "reason").unwrap_or_default(),
                    t.get("count").and_then(FieldValue::as_i64).unwrap_or(-1),
                ),
                other => (format!("{other:?}"), String::new(), -1),
            })
            .collect(),
        _ => Vec::new(),
    };
    let pair = |q: &str, r: &str| Some((text(&headers, q)?, text(&headers, r)?));
    Seen {
        id: body_id(d),
        tag: d.delivery_tag(),
        redelivered: d.redelivered(),
        count: d.delivery_count(),
        count_header: headers.get("x-delivery-count").and_then(FieldValue::as_i64),
        routing_key: d.routing_key().to_owned(),
        expiration: d.properties().expiration.clone(),
        deaths,
        first_death: pair("x-first-death-queue", "x-first-death-reason"),
        last_death: pair("x-last-death-queue", "x-last-death-reason"),
    }
}

fn queue_args(spec: &QSpec) -> FieldTable {
    let mut args = FieldTable::new();
    if spec.quorum {
        args.insert("x-queue-type", "quorum");
    }
    if let Some(ttl) = spec.ttl {
        args.insert("x-message-ttl", ttl as i64);
    }
    if let Some(target) = spec.dlx_to {
        args.insert("x-dead-letter-exchange", "");
        if spec.dlrk {
            args.insert("x-dead-letter-routing-key", format!("q{target}").as_str());
        }
    }
    if let Some(max) = spec.max_len {
        args.insert("x-max-length", max as i64);
        let overflow = if spec.reject_publish {
            "reject-publish"
        } else {
            "drop-head"
        };
        args.insert("x-overflow", overflow);
    }
    if let Some(limit) = spec.delivery_limit {
        args.insert("x-delivery-limit", i64::from(limit));
    }
    if spec.unlimited {
        args.insert("x-delivery-limit", -1i64);
    }
    if let Some(max) = spec.max_priority {
        args.insert("x-max-priority", i64::from(max));
    }
    if spec.sac {
        args.insert("x-single-active-consumer", true);
    }
    args
}

impl World {
    fn new(lazy: bool) -> Self {
        let (broker, clock) = if lazy {
            let clock = LazyClock::default();
            clock.0.store(START, Ordering::SeqCst);
            let broker = Broker::builder().seed(1).clock(clock.clone());
            (broker.in_memory(), TestClock::Lazy(clock))
        } else {
            let clock = ManualClock::new(START);
            let broker = Broker::builder().seed(1).clock(clock.clone());
            (broker.in_memory(), TestClock::Manual(clock))
        };
        let conns = vec![broker.connect(), broker.connect()];
        let mut w = World {
            broker,
            clock,
            now: START,
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
            timers: BTreeMap::new(),
            next_timer: 0,
        };
        for slot in 0..SLOTS {
            let ch = w.conns[slot / 2].channel().unwrap();
            if confirming(slot) {
                ch.confirm_select(Default::default()).unwrap();
            }
            w.chans.push(ch);
            w.opened += 1;
            w.m_chans.push(MChannel::new(w.opened));
        }
        for (q, spec) in SPECS.iter().enumerate() {
            let name = format!("q{q}");
            let opts = QueueDeclareOptions {
                durable: spec.quorum, // quorum queues are durable only
                ..Default::default()
            };
            w.chans[0]
                .queue_declare(&name, opts, queue_args(spec))
                .unwrap();
            w.queues.push(name);
            w.m_queues.push(MQueue::new(*spec));
        }
        w
    }

    fn reopen(&mut self, slot: usize) {
        self.chans[slot] = self.conns[slot / 2].channel().unwrap();
        if confirming(slot) {
            self.chans[slot].confirm_select(Default::default()).unwrap();
        }
        self.opened += 1;
        self.m_chans[slot] = MChannel::new(self.opened);
    }

    // ---- model mechanics --------------------------------------------------------------------

    /// What a delivery of `msg` from queue `q` with `tag` looks like.
    fn expect(&self, q: usize, msg: &MMsg, tag: u64) -> Seen {
        let name = |i: usize| self.queues[i].clone();
        Seen {
            id: msg.id,
            tag,
            redelivered: msg.delivered,
            count: msg.count,
            count_header: (SPECS[q].quorum && msg.count > 0).then_some(i64::from(msg.count)),
            routing_key: name(msg.key),
            expiration: msg.expiration.map(str::to_owned),
            deaths: msg
                .deaths
                .iter()
                .map(|&(dq, r, n)| (name(dq), r.as_str().to_owned(), i64::from(n)))
                .collect(),
            first_death: msg
                .first_death
                .map(|(dq, r)| (name(dq), r.as_str().to_owned())),
            last_death: msg
                .deaths
                .first()
                .map(|&(dq, r, _)| (name(dq), r.as_str().to_owned())),
        }
    }

    /// Removes expired messages at the head of `q` (only there, §7.1). `spare` is the sequence
    /// number of a TTL-0 message at the instant it arrives: still deliverable to a consumer
    /// that can take it.
    fn m_expire_head(&mut self, q: usize, spare: Option<u64>) {
        self.m_expire_head_if(q, |h| spare == Some(h.seq));
    }

    /// [`World::m_expire_head`] sparing the messages `spare` picks.
    fn m_expire_head_if(&mut self, q: usize, spare: impl Fn(&MMsg) -> bool) {
        let now = self.now;
        let mq = &mut self.m_queues[q];
        while let Some(h) = mq.head() {
            let expired = h.deadline.is_some_and(|d| now >= d) && !spare(h);
            if !expired {
                return;
            }
            let m = mq.pop().unwrap();
            mq.effects.push((m, Reason::Expired));
        }
    }

    /// A pass of queue `q` as the broker runs one after every command: deliver what can be
    /// delivered (expiring the head first), then housekeeping (drop-head after a publish,
    /// then strict head expiry), then carry out the removals, then schedule the next expiry.
    fn m_dispatch(&mut self, q: usize, spare: Option<u64>) {
        loop {
            self.m_expire_head_if(q, |h| spare == Some(h.seq));
            if self.m_queues[q].len() == 0 {
                break;
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
            let can = |i: usize, c: &MConsumer| {
                (c.no_ack || c.prefetch == 0 || c.in_flight < c.prefetch) && admits[i]
            };
            // Single active consumer: only the active one, unless it quiesces; otherwise the
            // first with credit in service order, which moves to the back of its group.
            let pick = if mq.spec.sac {
                mq.active
                    .filter(|_| !mq.quiescing)
                    .and_then(|k| mq.consumers.iter().position(|c| c.key == k))
                    .filter(|&i| can(i, &mq.consumers[i]))
            } else {
                mq.consumers.iter().enumerate().position(|(i, c)| can(i, c))
            };
            let Some(i) = pick else {
                break;
            };
            let (key, no_ack) = if mq.spec.sac {
                let c = &mut mq.consumers[i];
                c.in_flight += 1;
                (c.key, c.no_ack)
            } else {
                let mut c = mq.consumers.remove(i);
                c.in_flight += 1;
                let picked = (c.key, c.no_ack);
                mq.insert_consumer(c);
                picked
            };
            let msg = mq.pop().unwrap();
            let slot = self.slot_of(key);
            let ch = &mut self.m_chans[slot];
            let tag = ch.next_tag;
            ch.next_tag += 1;
            let expected = self.expect(q, &msg, tag);
            if no_ack {
                self.settled.push((msg.id, Gone::NoAck));
            } else {
                let ch = &mut self.m_chans[slot];
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
            let tc = self
                .consumers
                .iter_mut()
                .find(|t| t.key == key)
                .expect("registered consumer is held");
            tc.buffer.push_back(expected);
        }
        // Housekeeping: the length limit after a publish, then the head's TTL.
        let mq = &mut self.m_queues[q];
        if std::mem::take(&mut mq.limit_check)
            && let Some(max) = SPECS[q].max_len
        {
            while mq.len() > max {
                let m = mq.pop().unwrap();
                mq.effects.push((m, Reason::Maxlen));
            }
        }
        self.m_expire_head(q, None);
        let mq = &mut self.m_queues[q];
        for (m, reason) in std::mem::take(&mut mq.effects) {
            // A refused publish is not dead-lettered under plain reject-publish (§5.2).
            if SPECS[q].dlx_to.is_some() && reason != Reason::Refused {
                mq.dead.push_back((m, reason));
            } else {
                mq.dropped[reason.index()] += 1;
                self.settled
                    .push((m.id, Gone::Dropped(q, reason.counted())));
            }
        }
        let mq = &mut self.m_queues[q];
        if let Some(at) = mq.head().and_then(|h| h.deadline)
            && at < mq.expiry_timer
        {
            mq.expiry_timer = at;
            self.timers.insert((at, self.next_timer), q);
            self.next_timer += 1;
        }
    }

    /// Routes queue `q`'s dead letters, in order (§5.3): the death recorded (§5.4), dropped if
    /// the target would make a cycle (§5.5), else published to the target.
    fn m_route_dead(&mut self, q: usize) {
        while let Some((msg, reason)) = self.m_queues[q].dead.pop_front() {
            let target = SPECS[q].dlx_to.expect("only queues with a DLX dead-letter");
            let reason = reason.counted();
            let mut deaths = msg.deaths.clone();
            let death = match deaths.iter().position(|&(dq, r, _)| dq == q && r == reason) {
                Some(i) => {
                    let (dq, r, n) = deaths.remove(i);
                    (dq, r, n + 1)
                }
                None => (q, reason, 1),
            };
            deaths.insert(0, death);
            let cycle = reason != Reason::Rejected
                && deaths
                    .iter()
                    .position(|&(dq, _, _)| dq == target)
                    .is_some_and(|i| !deaths[..=i].iter().any(|d| d.1 == Reason::Rejected));
            if cycle {
                self.m_queues[q].dropped[reason.index()] += 1;
                self.settled.push((msg.id, Gone::Dropped(q, reason)));
                continue;
            }
            self.m_queues[q].dead_lettered[reason.index()] += 1;
            let key = if SPECS[q].dlrk { target } else { msg.key };
            let moved = MMsg {
                id: msg.id,
                seq: 0, // assigned by the target
                delivered: false,
                count: 0,
                enqueued: self.now,
                deadline: None,
                expiration: None,
                key,
                priority: msg.priority,
                demoted: false,
                deaths,
                first_death: msg.first_death.or(Some((q, reason))),
            };
            self.m_publish(target, moved, None);
        }
    }

    /// A message entering queue `q` (publish or dead letter) with per-message TTL `ttl`: the
    /// length limit decides (§7.3), then a pass, then the dead letters are routed. Returns
    /// whether the queue took it.
    fn m_publish(&mut self, q: usize, mut msg: MMsg, ttl: Option<u64>) -> bool {
        let spec = SPECS[q];
        let mq = &mut self.m_queues[q];
        msg.seq = mq.next_seq;
        mq.next_seq += 1;
        let ttl = match (spec.ttl, ttl) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        msg.deadline = ttl.map(|t| msg.enqueued + t);
        let refused = spec.reject_publish && spec.max_len.is_some_and(|max| mq.len() + 1 > max);
        let mut spare = None;
        if refused {
            mq.effects.push((msg, Reason::Refused));
        } else {
            if spec.max_len.is_some() {
                mq.limit_check = true;
            }
            // A TTL-0 message may go to a consumer that takes it as it arrives (§7.1).
            if msg.deadline == Some(msg.enqueued) {
                spare = Some(msg.seq);
            }
            mq.insert_ready(msg);
        }
        self.m_dispatch(q, spare);
        self.m_route_dead(q);
        !refused
    }

    fn m_release(&mut self, q: usize, consumer: Option<usize>) {
        if let Some(key) = consumer
            && let Some(c) = self.m_queues[q].consumers.iter_mut().find(|c| c.key == key)
        {
            c.in_flight -= 1;
            if c.in_flight == 0 {
                self.m_queues[q].reconsider();
            }
        }
    }

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
            self.m_dispatch(q, None);
            self.m_route_dead(q);
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

    /// Settles queue by queue (ascending queue index = ascending id): each queue settles in
    /// tag order, runs a pass, then routes its dead letters.
    fn m_settle(&mut self, taken: Vec<(u64, Held)>, how: How) {
        for (q, spec) in SPECS.iter().enumerate() {
            let mine: Vec<_> = taken.iter().filter(|(_, (mq, _, _))| *mq == q).collect();
            if mine.is_empty() {
                continue;
            }
            for (_, (_, msg, consumer)) in mine {
                self.m_release(q, *consumer);
                let mq = &mut self.m_queues[q];
                match how {
                    How::Ack => self.settled.push((msg.id, Gone::Acked)),
                    How::Reject => mq.effects.push((msg.clone(), Reason::Rejected)),
                    How::Requeue | How::Return => {
                        // Every return counts (§6.2); over the limit it is dead-lettered.
                        let mut back = MMsg {
                            delivered: true,
                            count: msg.count + 1,
                            ..msg.clone()
                        };
                        if spec.delivery_limit.is_some_and(|l| back.count > l) {
                            mq.effects.push((back, Reason::DeliveryLimit));
                        } else if spec.quorum && spec.unlimited && how == How::Requeue {
                            // No delivery limit: a client's requeue re-appends at the tail
                            // as a new message (§4.3, RabbitMQ 4.0-4.2).
                            back.seq = mq.next_seq;
                            back.demoted = true;
                            mq.next_seq += 1;
                            mq.insert_ready(back);
                        } else if spec.quorum {
                            mq.returns.push_back(back);
                        } else {
                            mq.insert_ready(back);
                            // A classic drop-head queue drops from the head on requeue too,
                            // before anything is delivered (`requeue_and_run`).
                            if let Some(max) = spec.max_len.filter(|_| !spec.reject_publish) {
                                while mq.len() > max {
                                    let m = mq.pop().unwrap();
                                    mq.effects.push((m, Reason::Maxlen));
                                }
                            }
                        }
                    }
                }
            }
            self.m_dispatch(q, None);
            self.m_route_dead(q);
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
        self.m_queues[tc.queue].remove_consumer(key);
        true
    }

    /// A consumer left by cancel: a single-active-consumer queue delivers to the one taking
    /// over at once.
    fn m_hand_over(&mut self, q: usize) {
        if SPECS[q].sac {
            self.m_dispatch(q, None);
            self.m_route_dead(q);
        }
    }

    /// The model side of a channel closing: consumers cancelled, then unacked returned, then
    /// the single-active-consumer queues among theirs deliver to whoever took over.
    fn m_close_channel(&mut self, slot: usize) {
        let keys: Vec<(usize, usize)> = self
            .consumers
            .iter()
            .filter(|t| t.slot == slot && t.registered)
            .map(|t| (t.key, t.queue))
            .collect();
        for (key, _) in &keys {
            self.m_unregister(*key);
        }
        let taken = std::mem::take(&mut self.m_chans[slot].ledger)
            .into_iter()
            .collect();
        self.m_apply(slot, taken, How::Return, true);
        let mut queues: Vec<usize> = keys.iter().map(|&(_, q)| q).collect();
        queues.sort_unstable();
        queues.dedup();
        for q in queues {
            self.m_hand_over(q);
        }
        // Consumers of a closed channel yield nothing more; drop them.
        self.consumers.retain(|t| t.slot != slot);
    }

    /// The clock moved: the broker's expiry timers that are due run in (due, scheduling)
    /// order, each a pass of its queue.
    fn m_run_timers(&mut self) {
        while let Some((&(at, id), &q)) = self.timers.first_key_value() {
            if at > self.now {
                return;
            }
            self.timers.remove(&(at, id));
            self.m_queues[q].expiry_timer = u64::MAX;
            self.m_dispatch(q, None);
            self.m_route_dead(q);
        }
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
            Op::Publish {
                slot,
                queue,
                expiration,
                priority,
            } => {
                let id = self.next_id;
                self.next_id += 1;
                let mut props = BasicProperties {
                    priority,
                    ..Default::default()
                };
                if let Some(e) = expiration {
                    props = props.with_expiration(e);
                }
                self.chans[slot]
                    .basic_publish(
                        "",
                        &self.queues[queue],
                        BasicPublishOptions::default(),
                        id.to_le_bytes().to_vec(),
                        props,
                    )
                    .unwrap();
                let msg = MMsg {
                    id,
                    seq: 0,
                    delivered: false,
                    count: 0,
                    enqueued: self.now,
                    deadline: None,
                    expiration,
                    key: queue,
                    priority,
                    demoted: false,
                    deaths: Vec::new(),
                    first_death: None,
                };
                let ttl = expiration.map(|e| e.parse::<u64>().unwrap());
                let accepted = self.m_publish(queue, msg, ttl);
                if confirming(slot) {
                    // §7.3: a refused publish is nacked, an accepted one acked (§8).
                    let acked = self.chans[slot].wait_for_confirms().unwrap();
                    prop_assert_eq!(acked, accepted, "confirm of a publish to q{}", queue);
                }
            }
            Op::Get {
                slot,
                queue,
                no_ack,
            } => {
                let got =
                    self.chans[slot].basic_get(&self.queues[queue], BasicGetOptions { no_ack });
                if SPECS[queue].quorum && SPECS[queue].sac {
                    // Refused on a quorum single-active-consumer queue (405), channel closed.
                    let err = got.expect_err("basic.get on a quorum SAC queue");
                    prop_assert_eq!(err.reply_code(), Some(ReplyCode::ResourceLocked));
                    self.m_close_channel(slot);
                    self.reopen(slot);
                    return Ok(());
                }
                let got = got.unwrap();
                // Expired messages at the head go first, never returned (§7.1).
                self.m_expire_head(queue, None);
                let expected = match self.m_queues[queue].pop() {
                    None => None,
                    Some(msg) => {
                        let ch = &mut self.m_chans[slot];
                        let tag = ch.next_tag;
                        ch.next_tag += 1;
                        let expected = self.expect(queue, &msg, tag);
                        if no_ack {
                            self.settled.push((msg.id, Gone::NoAck));
                        } else {
                            let held = MMsg {
                                delivered: true,
                                ..msg
                            };
                            self.m_chans[slot].ledger.insert(tag, (queue, held, None));
                        }
                        // RabbitMQ drops the expired messages at the new head before it
                        // counts what remains (`rabbit_amqqueue_process:fetch/2`).
                        self.m_expire_head(queue, None);
                        let remaining = self.m_queues[queue].len() as u32;
                        Some((expected, remaining))
                    }
                };
                self.m_dispatch(queue, None);
                self.m_route_dead(queue);
                let actual = got.map(|g| (seen(&g.delivery), g.message_count));
                prop_assert_eq!(actual, expected, "basic_get on q{}", queue);
            }
            Op::Consume {
                slot,
                queue,
                no_ack,
                prefetch,
                priority,
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
                let args = FieldTable::new().with("x-priority", priority);
                let real = ch
                    .basic_consume(&self.queues[queue], "", opts, args)
                    .unwrap();
                self.m_chans[slot].prefetch = prefetch;
                let key = self.next_key;
                self.next_key += 1;
                self.m_queues[queue].add_consumer(MConsumer {
                    key,
                    prefetch: u32::from(prefetch),
                    no_ack,
                    in_flight: 0,
                    priority,
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
                self.m_dispatch(queue, None);
                self.m_route_dead(queue);
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
                let (slot, key, queue, tag) = (
                    tc.slot,
                    tc.key,
                    tc.queue,
                    tc.real.as_ref().unwrap().tag().to_owned(),
                );
                self.chans[slot]
                    .basic_cancel(&tag, BasicCancelOptions::default())
                    .unwrap();
                if self.m_unregister(key) {
                    self.m_hand_over(queue);
                }
            }
            Op::DropConsumer { consumer } => {
                let Some(tc) = self.consumers.get_mut(consumer) else {
                    return Ok(());
                };
                let (key, slot, no_ack, queue) = (tc.key, tc.slot, tc.no_ack, tc.queue);
                let buffered: Vec<Seen> = tc.buffer.drain(..).collect();
                drop(tc.real.take());
                // Model of `Consumer`'s drop: cancel (a single-active-consumer queue hands
                // over at once), then return together the deliveries it had not handed out
                // that are still outstanding.
                if self.m_unregister(key) {
                    self.m_hand_over(queue);
                }
                self.consumers.remove(consumer);
                if !no_ack {
                    let ledger = &mut self.m_chans[slot].ledger;
                    let taken = buffered
                        .iter()
                        .filter_map(|s| ledger.remove(&s.tag).map(|e| (s.tag, e)))
                        .collect();
                    self.m_apply(slot, taken, How::Return, false);
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
                    .queue_purge(&self.queues[queue], QueuePurgeOptions::default())
                    .unwrap();
                let mq = &mut self.m_queues[queue];
                let mut purged: Vec<MMsg> = std::mem::take(&mut mq.returns).into();
                purged.append(&mut mq.ready);
                prop_assert_eq!(n as usize, purged.len(), "purge count of q{}", queue);
                self.settled
                    .extend(purged.iter().map(|m| (m.id, Gone::Purged)));
            }
            Op::CloseChannel { slot } => {
                self.chans[slot].close();
                self.m_close_channel(slot);
                self.reopen(slot);
            }
            Op::CloseConnection { conn } => {
                let old = std::mem::replace(&mut self.conns[conn], self.broker.connect());
                old.close(); // its channels are still held: dropping it would not close it
                let mut slots: Vec<usize> = (conn * 2..conn * 2 + 2).collect();
                slots.sort_by_key(|&s| self.m_chans[s].opened);
                for slot in slots {
                    self.m_close_channel(slot);
                    self.reopen(slot);
                }
            }
            Op::Advance { ms } => {
                self.now += ms;
                match &self.clock {
                    TestClock::Manual(clock) => {
                        clock.advance(Duration::from_millis(ms));
                        self.m_run_timers();
                    }
                    TestClock::Lazy(clock) => _ = clock.0.fetch_add(ms, Ordering::SeqCst),
                }
                self.check_counts()?;
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

    /// Every published message is in exactly one place, every drop has a counted reason, and
    /// the broker's dead-letter and drop counters agree with the model's.
    fn account(&self) -> Result<(), TestCaseError> {
        let mut all: Vec<u64> = self.settled.iter().map(|(id, _)| *id).collect();
        for q in &self.m_queues {
            prop_assert!(q.dead.is_empty() && q.effects.is_empty());
            all.extend(q.returns.iter().chain(&q.ready).map(|m| m.id));
        }
        for ch in &self.m_chans {
            all.extend(ch.ledger.values().map(|(_, m, _)| m.id));
        }
        all.sort_unstable();
        let expected: Vec<u64> = (0..self.next_id).collect();
        prop_assert_eq!(all, expected, "every message in exactly one place");
        for (q, name) in self.queues.iter().enumerate() {
            let mq = &self.m_queues[q];
            let mut dropped = [0u64; 4];
            for (_, gone) in &self.settled {
                if let Gone::Dropped(dq, r) = gone
                    && *dq == q
                {
                    dropped[r.index()] += 1;
                }
            }
            prop_assert_eq!(dropped, mq.dropped, "drops of q{} by reason", q);
            let stats = self.broker.death_stats(name).expect("queue exists");
            let counts = |c: &ReasonCounts| [c.rejected, c.expired, c.maxlen, c.delivery_limit];
            prop_assert_eq!(
                counts(&stats.dead_lettered),
                mq.dead_lettered,
                "dead-lettered from q{} [rejected, expired, maxlen, delivery_limit]",
                q
            );
            prop_assert_eq!(
                counts(&stats.dropped),
                mq.dropped,
                "dropped by q{} [rejected, expired, maxlen, delivery_limit]",
                q
            );
        }
        Ok(())
    }

    /// The broker's message and consumer counts (passive declare) agree with the model's.
    fn check_counts(&self) -> Result<(), TestCaseError> {
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
            prop_assert_eq!(
                ok.message_count as usize,
                self.m_queues[q].len(),
                "message count of q{}",
                q
            );
            prop_assert_eq!(ok.consumer_count as usize, self.m_queues[q].consumers.len());
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1000,
        max_shrink_iters: 4000,
        // ChaCha (the default) costs half the run time in a debug build.
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    })]

    /// The broker agrees with the reference model after every step of a random sequence.
    #[test]
    fn broker_matches_reference_model(
        lazy in any::<bool>(),
        ops in prop::collection::vec(op(), 1..160),
    ) {
        let mut w = World::new(lazy);
        for op in &ops {
            w.step(op)?;
            if let Err(e) = w.broker.check_invariants() {
                return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
            }
            w.account()?;
        }
        w.check_counts()?;
    }
}
