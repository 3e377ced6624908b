//! A store wrapper that fails applies, flushes, recovers and compactions on request, for
//! failure-path tests.

use std::sync::Arc;

use parking_lot::Mutex;

use super::{Batch, CompactStats, CompactionDue, Poison, RecoverySink, Store, StoreError};

/// Wraps a store and injects the failures its [`Faults`] handle asks for.
///
/// An injected failure returns [`StoreError::Storage`] without touching the inner store (a
/// failed apply applies nothing; a failed flush makes nothing durable) and poisons this wrapper
/// like a real I/O failure poisons [`super::SledStore`]: every later call returns
/// [`StoreError::Poisoned`]. Failures of the inner store pass through and poison it too. Nothing
/// here is random: the test decides when each failure happens.
#[derive(Debug)]
pub struct FaultyStore<S: Store> {
    inner: S,
    faults: Faults,
    poison: Poison,
}

/// The shared switchboard of a [`FaultyStore`]: clones control the same store, so a test keeps
/// one while the broker owns the store.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    plan: Arc<Mutex<Plan>>,
}

#[derive(Debug, Default)]
struct Plan {
    /// Applies that still succeed before one fails; `None` = no apply failure planned.
    applies_before_failure: Option<u64>,
    fail_next_flush: bool,
    fail_next_recover: bool,
    fail_next_compact: bool,
    /// Failures injected so far.
    injected: u64,
}

impl Faults {
    /// A handle with no failure planned.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets `n` more applies succeed, then fails the one after (`0` fails the next apply).
    pub fn fail_apply_after(&self, n: u64) {
        self.plan.lock().applies_before_failure = Some(n);
    }

    /// Fails the next flush.
    pub fn fail_next_flush(&self) {
        self.plan.lock().fail_next_flush = true;
    }

    /// Fails the next recover.
    pub fn fail_recover(&self) {
        self.plan.lock().fail_next_recover = true;
    }

    /// Cancels every planned failure (injected ones stay injected: the store stays poisoned).
    pub fn clear(&self) {
        let mut plan = self.plan.lock();
        plan.applies_before_failure = None;
        plan.fail_next_flush = false;
        plan.fail_next_recover = false;
        plan.fail_next_compact = false;
    }

    /// How many failures were injected so far.
    pub fn injected(&self) -> u64 {
        self.plan.lock().injected
    }

    /// Whether this apply is the planned failure (counts it down otherwise).
    fn take_apply(&self) -> bool {
        let mut plan = self.plan.lock();
        match plan.applies_before_failure {
            Some(0) => {
                plan.applies_before_failure = None;
                plan.injected += 1;
                true
            }
            Some(n) => {
                plan.applies_before_failure = Some(n - 1);
                false
            }
            None => false,
        }
    }

    fn take_flush(&self) -> bool {
        let mut plan = self.plan.lock();
        let fail = std::mem::take(&mut plan.fail_next_flush);
        plan.injected += u64::from(fail);
        fail
    }

    /// Fails the next compaction as one that could not write its copy
    /// ([`StoreError::Compaction`]: the store unchanged, nothing poisoned).
    pub fn fail_next_compact(&self) {
        self.plan.lock().fail_next_compact = true;
    }

    fn take_compact(&self) -> bool {
        let mut plan = self.plan.lock();
        let fail = std::mem::take(&mut plan.fail_next_compact);
        plan.injected += u64::from(fail);
        fail
    }

    fn take_recover(&self) -> bool {
        let mut plan = self.plan.lock();
        let fail = std::mem::take(&mut plan.fail_next_recover);
        plan.injected += u64::from(fail);
        fail
    }
}

impl<S: Store> FaultyStore<S> {
    /// Wraps `inner`, failing as `faults` says.
    pub fn new(inner: S, faults: Faults) -> Self {
        Self {
            inner,
            faults,
            poison: Poison::default(),
        }
    }

    /// The failure switchboard.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The wrapped store (for example a [`super::MemoryStore`] to crash).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Whether a failure (injected or from the inner store) poisoned this wrapper.
    pub fn is_poisoned(&self) -> bool {
        self.poison.is_poisoned()
    }

    /// Passes an inner store's failure through, poisoning this wrapper if it was a storage one.
    fn pass<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Storage(text) | StoreError::Poisoned(text)) = &result {
            let _ = self.poison.fail(text.clone());
        }
        result
    }
}

impl<S: Store> Store for FaultyStore<S> {
    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        self.poison.check()?;
        if self.faults.take_apply() {
            return Err(self.poison.fail("injected apply failure".to_string()));
        }
        self.pass(self.inner.apply(batch))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.poison.check()?;
        if self.faults.take_flush() {
            return Err(self.poison.fail("injected flush failure".to_string()));
        }
        self.pass(self.inner.flush())
    }

    fn recover_into(&self, sink: &mut dyn RecoverySink) -> Result<(), StoreError> {
        self.poison.check()?;
        if self.faults.take_recover() {
            return Err(self.poison.fail("injected recover failure".to_string()));
        }
        self.pass(self.inner.recover_into(sink))
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.poison.check()?;
        self.pass(self.inner.size_on_disk())
    }

    fn compact(&self) -> Result<CompactStats, StoreError> {
        self.poison.check()?;
        if self.faults.take_compact() {
            return Err(StoreError::Compaction(
                "injected compaction failure".to_string(),
            ));
        }
        self.pass(self.inner.compact())
    }

    fn compaction_due(&self) -> Result<Option<CompactionDue>, StoreError> {
        self.poison.check()?;
        self.pass(self.inner.compaction_due())
    }
}
