//! Direct exchange: a binding key byte-equal to the routing key.

use std::sync::Arc;

use super::Destination;
use crate::core::shared::{Map, SharedSet};

/// Bindings of a direct exchange, indexed by binding key. Persistent: a bind copies one path.
#[derive(Clone, Debug, Default)]
pub struct DirectIndex {
    by_key: Map<Arc<str>, SharedSet<Destination>>,
}

impl DirectIndex {
    /// Adds `dest` under `key` (callers add each distinct (key, dest) once).
    pub fn insert(&mut self, key: &Arc<str>, dest: Destination) {
        match self.by_key.get_mut(&**key) {
            Some(dests) => {
                dests.insert(dest);
            }
            None => {
                let mut dests = SharedSet::new();
                dests.insert(dest);
                self.by_key.insert(key.clone(), dests);
            }
        }
    }

    /// Removes `dest` under `key`.
    pub fn remove(&mut self, key: &str, dest: &Destination) {
        if let Some(dests) = self.by_key.get_mut(key) {
            dests.remove(dest);
            if dests.is_empty() {
                self.by_key.remove(key);
            }
        }
    }

    /// The number of (key, destination) pairs.
    pub fn len(&self) -> usize {
        self.by_key.values().map(SharedSet::len).sum()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Destinations bound with exactly `key`.
    pub fn route(&self, key: &str, out: &mut impl FnMut(&Destination)) {
        if let Some(dests) = self.by_key.get(key) {
            dests.for_each(out);
        }
    }
}
