//! An in-memory store with explicit crash semantics, for tests and the simulator.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::codec::{self, Write};
use super::{Batch, RecoverySink, Store, StoreError};

/// A store in two `BTreeMap`s: what was applied, and what was durable at the last flush.
///
/// Records go through the same [`codec`] as [`super::SledStore`], so tests exercise encoding and
/// decoding. [`crash`](Self::crash) drops everything applied since the last flush, as a process
/// crash would with sled. Clones share the state, so a test keeps a clone, gives one to the
/// broker, crashes it, and "reopens" by calling [`Store::recover`] on its clone.
///
/// It never fails by itself; wrap it in [`super::FaultyStore`] to inject failures.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// Everything applied: what `recover` reads.
    applied: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Everything flushed: what survives a crash.
    durable: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Batches applied since the last flush, encoded, replayed onto `durable` by `flush`.
    pending: Vec<Vec<Write>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a process crash: everything applied since the last flush is gone.
    pub fn crash(&self) {
        let mut state = self.state.lock();
        state.applied = state.durable.clone();
        state.pending.clear();
    }

    /// A new store holding what a process crash would leave of this one now: only what was
    /// flushed. This store is left as it is (its broker may go on writing to it, harmlessly).
    pub fn crash_image(&self) -> MemoryStore {
        let durable = self.state.lock().durable.clone();
        MemoryStore {
            state: Arc::new(Mutex::new(State {
                applied: durable.clone(),
                durable,
                pending: Vec::new(),
            })),
        }
    }

    /// Flips every bit of the first byte (the format version) of the value stored under `key`,
    /// applied and durable alike, so decoding it fails. Returns whether the key was present.
    pub fn corrupt_key(&self, key: &[u8]) -> bool {
        let mut state = self.state.lock();
        let State {
            applied, durable, ..
        } = &mut *state;
        let mut found = false;
        for map in [applied, durable] {
            if let Some(value) = map.get_mut(key) {
                match value.first_mut() {
                    Some(first) => *first ^= 0xFF,
                    None => value.push(0xFF),
                }
                found = true;
            }
        }
        found
    }

    /// Number of records applied (definitions and messages).
    pub fn len(&self) -> usize {
        self.state.lock().applied.len()
    }

    /// Whether no record is applied.
    pub fn is_empty(&self) -> bool {
        self.state.lock().applied.is_empty()
    }

    /// Number of records that would survive a crash now.
    pub fn durable_len(&self) -> usize {
        self.state.lock().durable.len()
    }
}

impl Store for MemoryStore {
    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        // Encoding is the only step that can fail, and it happens before any change.
        let writes = codec::encode_batch(batch)?;
        let mut state = self.state.lock();
        apply_writes(&mut state.applied, &writes);
        state.pending.push(writes);
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        let State {
            durable, pending, ..
        } = &mut *state;
        for writes in pending.drain(..) {
            apply_writes(durable, &writes);
        }
        Ok(())
    }

    fn recover_into(&self, sink: &mut dyn RecoverySink) -> Result<(), StoreError> {
        let state = self.state.lock();
        for (key, value) in &state.applied {
            codec::feed(sink, key, value, |body| {
                Bytes::copy_from_slice(&value[body])
            })?;
        }
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
}

fn apply_writes(map: &mut BTreeMap<Vec<u8>, Vec<u8>>, writes: &[Write]) {
    for write in writes {
        match write {
            Write::Put { key, value } => {
                map.insert(key.clone(), value.clone());
            }
            Write::Remove { key } => {
                map.remove(key);
            }
            Write::RemoveQueue { id } => {
                map.remove(codec::queue_key(*id).as_slice());
                let prefix = codec::queue_messages_prefix(*id);
                let keys: Vec<Vec<u8>> = map
                    .range(prefix.to_vec()..)
                    .take_while(|(key, _)| key.starts_with(&prefix))
                    .map(|(key, _)| key.clone())
                    .collect();
                for key in keys {
                    map.remove(&key);
                }
            }
        }
    }
}
