//! An estimate of the live data a sled store holds (records and their encoded bytes), kept
//! from the writes it applies, so that deciding whether a compaction is worth it costs no
//! read of the tree.
//!
//! sled 0.34 cannot say how much of its files is live without reading the whole tree, and a
//! removal does not say how large the removed value was. So the estimate counts, per queue,
//! the message records written and their bytes (key and value, as encoded), and takes a
//! removed message as one of its queue's average size; definitions (and the commit counter)
//! are one more tally. A queue's removal drops its tally.
//!
//! It is exact after a full read of the tree (recovery on open, every compaction) and drifts
//! only through writes it cannot see the effect of: a put that replaces a record (a requeued
//! message's new delivery count; a redeclared definition) counts as a second record, and a
//! removal of a record that is not there (an ack of a message whose write was refused) as one
//! fewer. Both are rare; the next full read resets the estimate. Until the first full read
//! since the store opened it is unknown, and no compaction is due on it.
//!
//! # Invariants
//! - Counts never go below zero (a removal from an empty tally is ignored).
//! - A full read's result replaces the estimate only if no write was applied while it ran.

use rustc_hash::FxHashMap;

use super::super::codec::{self, Write};

/// Records and their encoded bytes (key and value).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Records.
    pub(crate) records: u64,
    /// Their keys' and values' bytes.
    pub(crate) bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.records += 1;
        self.bytes += bytes;
    }

    /// Removes one record of the average size.
    fn remove_one(&mut self) {
        if let Some(average) = self.bytes.checked_div(self.records) {
            self.bytes -= average;
            self.records -= 1;
        }
    }

    fn plus(self, other: Tally) -> Tally {
        Tally {
            records: self.records + other.records,
            bytes: self.bytes + other.bytes,
        }
    }
}

/// The estimate (see the module doc).
#[derive(Debug, Default)]
pub(super) struct LiveData {
    /// Message records, by queue id.
    queues: FxHashMap<u64, Tally>,
    /// Every other record: definitions, the commit counter.
    other: Tally,
    /// Whether a full read has set it since the store opened.
    known: bool,
    /// Batches applied since the store opened.
    writes: u64,
}

impl LiveData {
    /// The estimate a full read builds: every record handed to [`LiveData::count`].
    pub(super) fn scanning() -> LiveData {
        LiveData {
            known: true,
            ..LiveData::default()
        }
    }

    /// Counts one record read (or written) with its key and value length.
    pub(super) fn count(&mut self, key: &[u8], value_len: usize) {
        let bytes = u64::try_from(key.len() + value_len).unwrap_or(u64::MAX);
        match message_queue(key) {
            Some(queue) => self.queues.entry(queue).or_default().add(bytes),
            None => self.other.add(bytes),
        }
    }

    /// Takes the effect of an applied batch's writes into account.
    pub(super) fn apply(&mut self, writes: &[Write]) {
        self.writes += 1;
        for write in writes {
            match write {
                Write::Put { key, value } => self.count(key, value.len()),
                Write::Remove { key } => match message_queue(key) {
                    Some(queue) => {
                        if let Some(tally) = self.queues.get_mut(&queue) {
                            tally.remove_one();
                        }
                    }
                    None => self.other.remove_one(),
                },
                Write::RemoveQueue { id } => {
                    self.queues.remove(id);
                    self.other.remove_one();
                }
            }
        }
    }

    /// Replaces the estimate with what a full read counted, if no batch was applied since
    /// [`LiveData::writes`] returned `writes_at_start`; returns whether it did.
    pub(super) fn replace(&mut self, read: LiveData, writes_at_start: u64) -> bool {
        if self.writes != writes_at_start {
            return false;
        }
        self.queues = read.queues;
        self.other = read.other;
        self.known = true;
        true
    }

    /// Batches applied since the store opened.
    pub(super) fn writes(&self) -> u64 {
        self.writes
    }

    /// The live records and bytes; `None` until a full read set the estimate.
    pub(super) fn total(&self) -> Option<Tally> {
        self.known.then(|| {
            self.queues
                .values()
                .fold(self.other, |sum, tally| sum.plus(*tally))
        })
    }
}

/// The queue of a message key.
fn message_queue(key: &[u8]) -> Option<u64> {
    let queue = key
        .strip_prefix(&[codec::MESSAGE_PREFIX])
        .filter(|rest| rest.len() == 16)?;
    Some(u64::from_be_bytes(
        queue[..8].try_into().expect("eight of sixteen bytes"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(queue: u64, seq: u64, value_len: usize) -> Write {
        Write::Put {
            key: codec::message_key(queue, seq).to_vec(),
            value: vec![0; value_len],
        }
    }

    #[test]
    fn puts_removes_and_queue_removals_add_up() {
        let mut live = LiveData::default();
        assert_eq!(live.total(), None, "unknown until a full read");
        assert!(live.replace(LiveData::scanning(), 0));
        live.apply(&[put(1, 0, 83), put(1, 1, 83), put(2, 0, 183)]);
        assert_eq!(
            live.total(),
            Some(Tally {
                records: 3,
                bytes: 100 + 100 + 200
            })
        );
        live.apply(&[Write::Remove {
            key: codec::message_key(1, 0).to_vec(),
        }]);
        assert_eq!(live.total().unwrap().bytes, 300);
        live.apply(&[
            Write::Put {
                key: codec::queue_key(2).to_vec(),
                value: vec![0; 11],
            },
            Write::RemoveQueue { id: 2 },
        ]);
        assert_eq!(
            live.total(),
            Some(Tally {
                records: 1,
                bytes: 100
            })
        );
        // A removal from an empty tally is ignored.
        live.apply(&[Write::Remove {
            key: codec::message_key(9, 0).to_vec(),
        }]);
        live.apply(&[Write::Remove { key: vec![b'E'] }]);
        assert_eq!(live.total().unwrap().records, 1);
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_taken() {
        let mut live = LiveData::default();
        let start = live.writes();
        let mut read = LiveData::scanning();
        read.count(&codec::message_key(1, 0), 10);
        live.apply(&[put(1, 1, 10)]);
        assert!(!live.replace(read, start));
        assert_eq!(live.total(), None);
    }
}
