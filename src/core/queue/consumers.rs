//! A queue's consumers: prefetch credit and round-robin order within priority groups (§3.2),
//! or one active consumer at a time (`x-single-active-consumer`).
//!
//! Single active consumer, as RabbitMQ 4.2 does it
//! (<https://www.rabbitmq.com/docs/consumers#single-active-consumer>):
//! - the first consumer registered becomes active; the others wait, and only the active one
//!   receives;
//! - when the active one leaves (cancel, channel close), the waiting consumer of highest
//!   priority becomes active, the earliest registered among equals
//!   (`rabbit_queue_consumers:get_consumer/1` for classic queues, the sorted waiting list of
//!   `rabbit_fifo` for quorum queues);
//! - classic queues never take the role away from a live active consumer;
//! - quorum queues (`rabbit_fifo:activate_next_consumer/2`): when a waiting consumer has a
//!   higher priority than the active one, the active one gets no more messages ("quiescing")
//!   and hands over as soon as it holds no unsettled delivery; it then waits like the others.

use std::collections::HashMap;

/// Identifies a consumer across the broker (assigned by the runtime, never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(pub u64);

/// What the queue needs to know about a new consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumerSpec {
    /// Its id.
    pub id: ConsumerId,
    /// Unacked deliveries allowed at once; 0 = unlimited. For a no-ack consumer this is the
    /// window of deliveries its receiver has not taken yet (memory bound, never 0).
    pub prefetch: u32,
    /// Settled on receipt.
    pub no_ack: bool,
    /// Holds the queue alone.
    pub exclusive: bool,
    /// `x-priority`: higher priorities are served first.
    pub priority: i32,
}

#[derive(Clone, Debug)]
struct Slot {
    spec: ConsumerSpec,
    in_flight: u32,
}

impl Slot {
    fn has_credit(&self) -> bool {
        self.spec.prefetch == 0 || self.in_flight < self.spec.prefetch
    }
}

/// Consumers in service order: priority descending, round-robin inside a priority.
#[derive(Debug, Default)]
pub(super) struct Consumers {
    order: Vec<Slot>,
    /// How many of them settle their deliveries (are not no-ack).
    acking: u32,
    /// `Some` on a single-active-consumer queue.
    single: Option<Single>,
}

/// Who receives on a single-active-consumer queue.
#[derive(Clone, Copy, Debug)]
struct Single {
    /// A waiting consumer of higher priority takes over (quorum queues).
    by_priority: bool,
    /// The consumer that receives; `None` only when there is no consumer.
    active: Option<ConsumerId>,
    /// A higher-priority consumer waits for the active one to settle what it holds: the
    /// active one receives nothing meanwhile.
    quiescing: bool,
}

impl Consumers {
    /// No consumers yet; `single_active` makes one consumer receive at a time, handing over
    /// to a higher-priority one when `by_priority` (quorum queues).
    pub(super) fn new(single_active: bool, by_priority: bool) -> Self {
        Self {
            order: Vec::new(),
            acking: 0,
            single: single_active.then_some(Single {
                by_priority,
                active: None,
                quiescing: false,
            }),
        }
    }

    pub(super) fn add(&mut self, spec: ConsumerSpec) {
        self.acking += u32::from(!spec.no_ack);
        self.insert(Slot { spec, in_flight: 0 });
        self.reconsider();
    }

    /// Joins the back of its priority group: after every consumer of the same or higher
    /// priority.
    fn insert(&mut self, slot: Slot) {
        let at = self
            .order
            .partition_point(|s| s.spec.priority >= slot.spec.priority);
        self.order.insert(at, slot);
    }

    pub(super) fn remove(&mut self, id: ConsumerId) -> bool {
        let before = self.order.len();
        let mut acking = 0;
        self.order.retain(|s| {
            let gone = s.spec.id == id;
            acking += u32::from(gone && !s.spec.no_ack);
            !gone
        });
        self.acking -= acking;
        if let Some(single) = &mut self.single
            && single.active == Some(id)
        {
            single.active = None;
        }
        self.reconsider();
        before != self.order.len()
    }

    /// Whether consumers take turns with one active at a time.
    pub(super) fn is_single_active(&self) -> bool {
        self.single.is_some()
    }

    /// The consumer that receives on a single-active-consumer queue.
    pub(super) fn active(&self) -> Option<ConsumerId> {
        self.single.and_then(|s| s.active)
    }

    /// Brings the single active consumer up to date after a change (a consumer came or left,
    /// a delivery was settled): see the module doc. Costs nothing without single active
    /// consumer.
    fn reconsider(&mut self) {
        let Some(single) = &mut self.single else {
            return;
        };
        let current = single
            .active
            .and_then(|id| self.order.iter().position(|s| s.spec.id == id));
        let Some(at) = current else {
            // The first in service order: highest priority, earliest registered.
            single.active = self.order.first().map(|s| s.spec.id);
            single.quiescing = false;
            return;
        };
        if !single.by_priority {
            return;
        }
        let active = &self.order[at];
        let challenger = self
            .order
            .iter()
            .find(|s| s.spec.id != active.spec.id)
            .filter(|c| c.spec.priority > active.spec.priority);
        let Some(challenger) = challenger else {
            single.quiescing = false;
            return;
        };
        if active.spec.no_ack || active.in_flight == 0 {
            single.active = Some(challenger.spec.id);
            single.quiescing = false;
            // The old active consumer waits at the back of its priority group.
            let slot = self.order.remove(at);
            self.insert(slot);
        } else {
            single.quiescing = true;
        }
    }

    /// Whether any consumer settles its deliveries (is not no-ack).
    pub(super) fn any_acking(&self) -> bool {
        self.acking > 0
    }

    pub(super) fn len(&self) -> u32 {
        u32::try_from(self.order.len()).unwrap_or(u32::MAX)
    }

    pub(super) fn has_exclusive(&self) -> bool {
        self.order.iter().any(|s| s.spec.exclusive)
    }

    /// Picks the first consumer with credit, charges it one delivery and moves it to the back
    /// of its priority group.
    pub(super) fn next_with_credit(
        &mut self,
        mut admit: impl FnMut(ConsumerId) -> bool,
    ) -> Option<(ConsumerId, bool)> {
        if let Some(single) = self.single {
            return self.next_single(single, admit);
        }
        let i = self
            .order
            .iter()
            .position(|s| s.has_credit() && (s.spec.no_ack || admit(s.spec.id)))?;
        let mut slot = self.order.remove(i);
        slot.in_flight += 1;
        let picked = (slot.spec.id, slot.spec.no_ack);
        let at = self
            .order
            .partition_point(|s| s.spec.priority >= slot.spec.priority);
        self.order.insert(at, slot);
        Some(picked)
    }

    /// [`Consumers::next_with_credit`] on a single-active-consumer queue: the active
    /// consumer, if it may receive now.
    fn next_single(
        &mut self,
        single: Single,
        mut admit: impl FnMut(ConsumerId) -> bool,
    ) -> Option<(ConsumerId, bool)> {
        if single.quiescing {
            return None;
        }
        let id = single.active?;
        let slot = self.order.iter_mut().find(|s| s.spec.id == id)?;
        if !(slot.has_credit() && (slot.spec.no_ack || admit(id))) {
            return None;
        }
        slot.in_flight += 1;
        Some((id, slot.spec.no_ack))
    }

    /// A manual-ack delivery of `id` was settled.
    pub(super) fn settled(&mut self, id: ConsumerId) {
        if let Some(s) = self.order.iter_mut().find(|s| s.spec.id == id) {
            debug_assert!(s.in_flight > 0, "settled more than delivered");
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                self.reconsider();
            }
        }
    }

    /// A no-ack consumer's receiver took `count` deliveries.
    pub(super) fn release(&mut self, id: ConsumerId, count: u32) {
        if let Some(s) = self.order.iter_mut().find(|s| s.spec.id == id) {
            s.in_flight = s.in_flight.saturating_sub(count);
        }
    }

    /// `holders`: the consumer of every unacked entry that has one.
    pub(super) fn check_invariants(
        &self,
        holders: impl Iterator<Item = ConsumerId>,
    ) -> Result<(), String> {
        let mut held: HashMap<ConsumerId, u32> = HashMap::new();
        for c in holders {
            *held.entry(c).or_default() += 1;
        }
        let acking = self.order.iter().filter(|s| !s.spec.no_ack).count();
        if acking != self.acking as usize {
            return Err(format!(
                "{acking} acking consumers registered, {} counted",
                self.acking
            ));
        }
        let mut ids = std::collections::HashSet::new();
        for (i, s) in self.order.iter().enumerate() {
            if !ids.insert(s.spec.id) {
                return Err(format!("consumer {:?} registered twice", s.spec.id));
            }
            if i > 0 && self.order[i - 1].spec.priority < s.spec.priority {
                return Err("consumers out of priority order".into());
            }
            if s.spec.exclusive && self.order.len() > 1 {
                return Err("an exclusive consumer shares its queue".into());
            }
            if !s.spec.no_ack {
                let h = held.get(&s.spec.id).copied().unwrap_or(0);
                if h != s.in_flight {
                    return Err(format!(
                        "consumer {:?}: in_flight {} but holds {h}",
                        s.spec.id, s.in_flight
                    ));
                }
            }
            if s.spec.prefetch != 0 && s.in_flight > s.spec.prefetch {
                return Err(format!("consumer {:?} over its prefetch", s.spec.id));
            }
        }
        self.check_single()
    }

    /// Single active consumer: an active consumer exactly when there are consumers, one of
    /// them; waiting manual-ack consumers hold nothing; only a quorum queue quiesces, and only
    /// for a waiting consumer of higher priority.
    fn check_single(&self) -> Result<(), String> {
        let Some(single) = self.single else {
            return Ok(());
        };
        let Some(active) = single.active else {
            return match self.order.is_empty() {
                true => Ok(()),
                false => Err("consumers but none active".into()),
            };
        };
        let Some(slot) = self.order.iter().find(|s| s.spec.id == active) else {
            return Err(format!("active consumer {active:?} is not registered"));
        };
        if let Some(w) = self
            .order
            .iter()
            .find(|s| s.spec.id != active && !s.spec.no_ack && s.in_flight > 0)
        {
            return Err(format!("waiting consumer {:?} holds deliveries", w.spec.id));
        }
        let outranked = self
            .order
            .iter()
            .any(|s| s.spec.priority > slot.spec.priority);
        if single.quiescing && !(single.by_priority && outranked && slot.in_flight > 0) {
            return Err("quiescing without a reason".into());
        }
        if single.by_priority && outranked && !single.quiescing {
            return Err("a higher-priority consumer waits behind an idle active one".into());
        }
        Ok(())
    }
}
