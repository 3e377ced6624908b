//! A queue's ready messages in delivery order: one FIFO lane, or one lane per message priority.
//!
//! Three kinds ([`LaneKind`]):
//! - `Fifo`: one lane (a queue without priorities pays nothing for the feature);
//! - `Strict`: a classic queue with `x-max-priority` N has N + 1 lanes; the highest non-empty
//!   lane is served first, FIFO inside a lane; a message without `priority` is 0, one above N
//!   is N (RabbitMQ's `rabbit_priority_queue`, <https://www.rabbitmq.com/docs/priority>);
//! - `Weighted`: a quorum queue (RabbitMQ 4.0-4.2) has two lanes, "high" (priority > 4) and
//!   "normal" (4 or less, or absent); while both hold messages, two of every three deliveries
//!   come from the high lane (`rabbit_fifo_q`, `WEIGHT = 2`, described below at
//!   [`Lanes::head_lane`]). A message a client requeues on a quorum queue without delivery
//!   limit is re-appended to the normal lane whatever its priority
//!   ([`Lanes::insert_normal`]), so the normal lane may hold high-priority messages.
//!
//! Every lane is ordered by sequence number: a message goes back to its own lane at its
//! original position when requeued. The head as [`Lanes::front`] sees it is what a delivery,
//! a `basic.get`, a `drop-head` and TTL expiry all take next.

use std::collections::VecDeque;

use smallvec::{SmallVec, smallvec};

use super::Entry;

/// How many deliveries in a row the high lane of a quorum queue gets while the normal lane
/// also waits (`rabbit_fifo_q`'s `WEIGHT`).
const WEIGHT: u8 = 2;

/// Priorities above this are "high" in a quorum queue (`rabbit_fifo:priority_tag/1`).
const QUORUM_NORMAL_MAX: u8 = 4;

/// How the lanes are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LaneKind {
    /// One lane.
    Fifo,
    /// Lanes `0..=max`, lane 0 holding priority `max`: the first non-empty lane is served.
    Strict { max: u8 },
    /// Lane 0 high, lane 1 normal; `served` counts dequeues modulo `WEIGHT + 1`.
    Weighted { served: u8 },
}

/// The ready messages of a queue.
#[derive(Debug)]
pub(super) struct Lanes {
    kind: LaneKind,
    lanes: SmallVec<[VecDeque<Entry>; 1]>,
    len: usize,
}

impl Default for Lanes {
    fn default() -> Self {
        Self::new(LaneKind::Fifo)
    }
}

impl Lanes {
    pub(super) fn new(kind: LaneKind) -> Self {
        let count = match kind {
            LaneKind::Fifo => 1,
            LaneKind::Strict { max } => usize::from(max) + 1,
            LaneKind::Weighted { .. } => 2,
        };
        Self {
            kind,
            lanes: smallvec![VecDeque::new(); count],
            len: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The lane a message belongs to.
    fn lane_of(&self, entry: &Entry) -> usize {
        let priority = || entry.message.properties.priority.unwrap_or(0);
        match self.kind {
            LaneKind::Fifo => 0,
            LaneKind::Strict { max } => usize::from(max - priority().min(max)),
            LaneKind::Weighted { .. } => usize::from(priority() <= QUORUM_NORMAL_MAX),
        }
    }

    /// The lane served next. For a quorum queue, as `rabbit_fifo_q:next/1`: when both lanes
    /// hold messages and the high lane had its `WEIGHT` turns, the normal lane's head goes
    /// next if it is older than the high lane's head (otherwise the high lane keeps its turn);
    /// in every other case the high lane goes first when it holds anything.
    fn head_lane(&self) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        match self.kind {
            LaneKind::Fifo => Some(0),
            LaneKind::Strict { .. } => self.lanes.iter().position(|l| !l.is_empty()),
            LaneKind::Weighted { served } => match (self.lanes[0].front(), self.lanes[1].front()) {
                (Some(high), Some(normal)) if served == WEIGHT && normal.seq < high.seq => Some(1),
                (Some(_), _) => Some(0),
                (None, _) => Some(1),
            },
        }
    }

    /// The message served next.
    pub(super) fn front(&self) -> Option<&Entry> {
        self.lanes[self.head_lane()?].front()
    }

    /// Takes the message served next.
    pub(super) fn pop_front(&mut self) -> Option<Entry> {
        let lane = self.head_lane()?;
        if let LaneKind::Weighted { served } = &mut self.kind {
            // Every dequeue counts, whichever lane it came from (`rabbit_fifo_q:out/1`).
            *served = if *served == WEIGHT { 0 } else { *served + 1 };
        }
        self.len -= 1;
        self.lanes[lane].pop_front()
    }

    /// Inserts at the position of the entry's sequence number in its lane.
    pub(super) fn insert(&mut self, entry: Entry) {
        let index = match self.kind {
            LaneKind::Fifo => 0,
            _ => self.lane_of(&entry),
        };
        self.insert_into(index, entry);
    }

    /// Inserts into a quorum queue's normal lane whatever the entry's priority: RabbitMQ
    /// 4.0-4.2 re-enqueues a message requeued without delivery limit there
    /// (`rabbit_fifo:apply/3` for `#requeue{}` calls `rabbit_fifo_q:in(no, ...)`). Other
    /// kinds insert into the entry's own lane.
    pub(super) fn insert_normal(&mut self, entry: Entry) {
        match self.kind {
            LaneKind::Weighted { .. } => self.insert_into(1, entry),
            _ => self.insert(entry),
        }
    }

    fn insert_into(&mut self, index: usize, entry: Entry) {
        let lane = &mut self.lanes[index];
        let at = match lane.back() {
            Some(last) if last.seq > entry.seq => lane.partition_point(|e| e.seq < entry.seq),
            _ => lane.len(),
        };
        lane.insert(at, entry);
        self.len += 1;
    }

    /// Every message, lane by lane (highest priority first, FIFO within a lane).
    pub(super) fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.lanes.iter().flatten()
    }

    /// Takes every message, lane by lane.
    pub(super) fn take_all(&mut self) -> Vec<Entry> {
        self.len = 0;
        let mut all = Vec::new();
        for lane in &mut self.lanes {
            all.extend(std::mem::take(lane));
        }
        all
    }

    /// The largest lane's capacity.
    pub(super) fn capacity(&self) -> usize {
        self.lanes.iter().map(VecDeque::capacity).max().unwrap_or(0)
    }

    /// Applies `shrink` to every lane.
    pub(super) fn shrink_with(&mut self, shrink: impl Fn(&mut VecDeque<Entry>)) {
        self.lanes.iter_mut().for_each(shrink);
    }

    /// Each lane ordered by sequence number and holding only its own priorities (a quorum
    /// queue's normal lane may hold any, see [`Lanes::insert_normal`]); `len` agrees.
    pub(super) fn check_invariants(&self) -> Result<(), String> {
        let mut total = 0;
        for (i, lane) in self.lanes.iter().enumerate() {
            total += lane.len();
            let mut prev = None;
            for e in lane {
                if prev.is_some_and(|p| p >= e.seq) {
                    return Err(format!("lane {i} not ordered by seq at {}", e.seq));
                }
                prev = Some(e.seq);
                let normal = matches!(self.kind, LaneKind::Weighted { .. }) && i == 1;
                if self.lane_of(e) != i && !normal {
                    return Err(format!("seq {} in lane {i}, not its own", e.seq));
                }
            }
        }
        if total != self.len {
            return Err(format!("lanes hold {total} but len is {}", self.len));
        }
        match self.kind {
            LaneKind::Weighted { served } if served > WEIGHT => {
                Err(format!("served counter {served} over {WEIGHT}"))
            }
            _ => Ok(()),
        }
    }
}
