//! Direct exchange: a binding key byte-equal to the routing key (§2.5).

use rustc_hash::FxHashMap as HashMap;

use super::Destination;

/// Bindings of a direct exchange, indexed by binding key.
#[derive(Clone, Debug, Default)]
pub struct DirectIndex {
    by_key: HashMap<String, Vec<Destination>>,
}

impl DirectIndex {
    /// Adds `dest` under `key` (callers add each distinct (key, dest) once).
    pub fn insert(&mut self, key: &str, dest: Destination) {
        self.by_key.entry(key.to_owned()).or_default().push(dest);
    }

    /// Removes `dest` under `key`.
    pub fn remove(&mut self, key: &str, dest: &Destination) {
        if let Some(v) = self.by_key.get_mut(key) {
            v.retain(|d| d != dest);
            if v.is_empty() {
                self.by_key.remove(key);
            }
        }
    }

    /// Destinations bound with exactly `key`.
    pub fn route(&self, key: &str, out: &mut impl FnMut(&Destination)) {
        if let Some(v) = self.by_key.get(key) {
            v.iter().for_each(out);
        }
    }
}
