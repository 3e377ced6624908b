//! Fanout exchange: every bound destination, routing key ignored (§2.5).

use super::Destination;

/// Bindings of a fanout exchange.
#[derive(Clone, Debug, Default)]
pub struct FanoutIndex {
    all: Vec<Destination>,
}

impl FanoutIndex {
    /// Adds `dest` (callers add each distinct dest once).
    pub fn insert(&mut self, dest: Destination) {
        self.all.push(dest);
    }

    /// Removes `dest`.
    pub fn remove(&mut self, dest: &Destination) {
        self.all.retain(|d| d != dest);
    }

    /// Every destination.
    pub fn route(&self, out: &mut impl FnMut(&Destination)) {
        self.all.iter().for_each(out);
    }
}
