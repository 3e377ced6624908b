//! Collections that topology snapshots share: a change copies only what it touches.
//!
//! Why: the runtime publishes a new topology snapshot on every declare, bind and delete while
//! publishers may still read the old one. With ordinary maps each change copied the whole
//! topology, so declaring n queues cost O(n²). These collections are persistent (structurally
//! shared): a clone is O(1), an insert or remove copies one path of O(log n) nodes, and every
//! part a change does not touch stays the same allocation in both versions.
//!
//! - [`Map`]: imbl's hash array mapped trie with the Fx hasher (deterministic iteration order,
//!   fast on short keys), for lookups by name or id on the publish path.
//! - [`OrdMap`] / [`OrdSet`]: imbl's B+ trees, where order matters (range queries, sorted
//!   walks).
//! - [`SharedSet`]: a sorted set that keeps up to [`SMALL_MAX`] elements inline (most binding
//!   keys lead to one or two destinations) and moves to an [`OrdSet`] beyond, so a fanout
//!   exchange with a million queues still binds in O(log n).

use std::fmt;

use rustc_hash::FxBuildHasher;
use smallvec::SmallVec;

pub use imbl::{OrdMap, OrdSet};

/// A persistent hash map with the Fx hasher.
pub type Map<K, V> = imbl::GenericHashMap<K, V, FxBuildHasher, imbl::shared_ptr::DefaultSharedPtr>;

/// Most elements a [`SharedSet`] keeps inline.
pub const SMALL_MAX: usize = 4;

/// A sorted set, inline while small and a persistent B+ tree when large.
///
/// Cloning copies at most [`SMALL_MAX`] elements; insert and remove are O(log n). It moves back
/// inline when it shrinks to half of [`SMALL_MAX`], so it does not flap at the boundary.
#[derive(Clone)]
pub struct SharedSet<T: Clone + Ord>(Repr<T>);

#[derive(Clone)]
enum Repr<T: Clone + Ord> {
    /// Sorted, never more than `SMALL_MAX` (never spills to the heap).
    Small(SmallVec<[T; SMALL_MAX]>),
    /// More than `SMALL_MAX / 2`.
    Large(OrdSet<T>),
}

impl<T: Clone + Ord> Default for SharedSet<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone + Ord + fmt::Debug> fmt::Debug for SharedSet<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl<T: Clone + Ord> SharedSet<T> {
    /// An empty set.
    pub fn new() -> Self {
        Self(Repr::Small(SmallVec::new()))
    }

    /// Adds `value`; false if it was already present.
    pub fn insert(&mut self, value: T) -> bool {
        match &mut self.0 {
            Repr::Small(v) => match v.binary_search(&value) {
                Ok(_) => false,
                Err(at) if v.len() < SMALL_MAX => {
                    v.insert(at, value);
                    true
                }
                Err(_) => {
                    let mut large: OrdSet<T> = v.drain(..).collect();
                    large.insert(value);
                    self.0 = Repr::Large(large);
                    true
                }
            },
            Repr::Large(set) => set.insert(value).is_none(),
        }
    }

    /// Removes `value`; false if it was absent.
    pub fn remove(&mut self, value: &T) -> bool {
        match &mut self.0 {
            Repr::Small(v) => match v.binary_search(value) {
                Ok(at) => {
                    v.remove(at);
                    true
                }
                Err(_) => false,
            },
            Repr::Large(set) => {
                let removed = set.remove(value).is_some();
                if set.len() <= SMALL_MAX / 2 {
                    self.0 = Repr::Small(set.iter().cloned().collect());
                }
                removed
            }
        }
    }

    /// Whether `value` is present.
    pub fn contains(&self, value: &T) -> bool {
        match &self.0 {
            Repr::Small(v) => v.binary_search(value).is_ok(),
            Repr::Large(set) => set.contains(value),
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Small(v) => v.len(),
            Repr::Large(set) => set.len(),
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` on every element in order (the routing path: no iterator state to carry).
    pub fn for_each(&self, f: impl FnMut(&T)) {
        match &self.0 {
            Repr::Small(v) => v.iter().for_each(f),
            Repr::Large(set) => set.iter().for_each(f),
        }
    }

    /// The elements in order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        let (small, large) = match &self.0 {
            Repr::Small(v) => (Some(v.iter()), None),
            Repr::Large(set) => (None, Some(set.iter())),
        };
        small
            .into_iter()
            .flatten()
            .chain(large.into_iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn shared_set_behaves_as_a_btreeset(ops in prop::collection::vec((any::<bool>(), 0u8..24), 0..200)) {
            let mut set = SharedSet::new();
            let mut model = std::collections::BTreeSet::new();
            for (add, v) in ops {
                let (got, want) = if add {
                    (set.insert(v), model.insert(v))
                } else {
                    (set.remove(&v), model.remove(&v))
                };
                prop_assert_eq!(got, want);
                prop_assert_eq!(set.len(), model.len());
                prop_assert!(set.iter().eq(model.iter()));
                let mut seen = Vec::new();
                set.for_each(|v| seen.push(*v));
                prop_assert!(seen.iter().eq(model.iter()));
                prop_assert!(model.iter().all(|v| set.contains(v)));
            }
        }
    }

    #[test]
    fn a_clone_is_unaffected_by_changes_to_the_original() {
        let mut set: SharedSet<u32> = (0..100).fold(SharedSet::new(), |mut s, v| {
            s.insert(v);
            s
        });
        let before = set.clone();
        for v in 0..99 {
            set.remove(&v);
        }
        assert_eq!(set.len(), 1);
        assert_eq!(before.len(), 100);
        assert!(before.iter().copied().eq(0..100));
    }
}
