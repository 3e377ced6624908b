//! A queue's consumers: prefetch credit and round-robin order within priority groups (§3.2).

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
}

impl Consumers {
    pub(super) fn add(&mut self, spec: ConsumerSpec) {
        // After every consumer of the same or higher priority: joins the back of its group.
        let at = self
            .order
            .partition_point(|s| s.spec.priority >= spec.priority);
        self.order.insert(at, Slot { spec, in_flight: 0 });
    }

    pub(super) fn remove(&mut self, id: ConsumerId) -> bool {
        let before = self.order.len();
        self.order.retain(|s| s.spec.id != id);
        before != self.order.len()
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

    /// A manual-ack delivery of `id` was settled.
    pub(super) fn settled(&mut self, id: ConsumerId) {
        if let Some(s) = self.order.iter_mut().find(|s| s.spec.id == id) {
            debug_assert!(s.in_flight > 0, "settled more than delivered");
            s.in_flight = s.in_flight.saturating_sub(1);
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
        Ok(())
    }
}
