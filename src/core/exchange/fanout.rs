//! Fanout exchange: every bound destination, routing key ignored.

use super::Destination;
use crate::core::shared::SharedSet;

/// Bindings of a fanout exchange. Persistent: a bind copies one path.
#[derive(Clone, Debug, Default)]
pub struct FanoutIndex {
    all: SharedSet<Destination>,
}

impl FanoutIndex {
    /// Adds `dest` (callers add each distinct dest once).
    pub fn insert(&mut self, dest: Destination) {
        self.all.insert(dest);
    }

    /// Removes `dest`.
    pub fn remove(&mut self, dest: &Destination) {
        self.all.remove(dest);
    }

    /// The number of destinations.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Every destination.
    pub fn route(&self, out: &mut impl FnMut(&Destination)) {
        self.all.for_each(out);
    }
}
