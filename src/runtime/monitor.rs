//! Assembles [`BrokerStats`] from the queues' counters (see [`crate::stats`] for what the
//! figures mean) and keeps the samples its rates are computed from.
//!
//! Reading a queue takes none of its locks: sizes and counters are atomics, and the
//! processing-time histogram has a lock of its own that the queue's hot path only tries.
//! The sample list is kept under its own mutex, touched by `stats()` calls alone.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use rustc_hash::FxHashMap;

use super::BrokerInner;
use super::metrics::Counts;
use crate::core::channel::QueueId;
use crate::stats::{
    BrokerStats, Counters, MemoryStats, Processing, QueueStats, RATE_WINDOW_MS, Rates, error_rate,
    process_resident_bytes,
};

/// Samples kept at most; older ones go first (a caller taking snapshots very often gets
/// rates over a shorter window rather than unbounded memory).
const SAMPLES_MAX: usize = 1024;

/// Earlier snapshots' counters, oldest first.
#[derive(Default)]
pub(crate) struct RateSamples {
    samples: VecDeque<Sample>,
}

struct Sample {
    at_ms: u64,
    counters: FxHashMap<QueueId, Counters>,
}

impl RateSamples {
    /// The counters of queue `id` to compute rates from at `now_ms`, and when they were
    /// read: the newest sample at least [`RATE_WINDOW_MS`] old that has the queue, else zero
    /// at the queue's creation.
    fn base(&self, id: QueueId, now_ms: u64, created_ms: u64) -> (u64, Counters) {
        let cutoff = now_ms.saturating_sub(RATE_WINDOW_MS);
        self.samples
            .iter()
            .rev()
            .filter(|s| s.at_ms <= cutoff && s.at_ms >= created_ms)
            .find_map(|s| s.counters.get(&id).map(|c| (s.at_ms, *c)))
            .unwrap_or((created_ms, Counters::default()))
    }

    /// Keeps `sample`, and of the older ones only those a later base may still need: every
    /// sample inside the window and the newest one before it.
    fn push(&mut self, sample: Sample) {
        let cutoff = sample.at_ms.saturating_sub(RATE_WINDOW_MS);
        self.samples.push_back(sample);
        while self.samples.len() > 1 && self.samples.get(1).is_some_and(|s| s.at_ms <= cutoff) {
            self.samples.pop_front();
        }
        while self.samples.len() > SAMPLES_MAX {
            self.samples.pop_front();
        }
    }
}

impl BrokerInner {
    /// A snapshot of every queue and of the broker (`Broker::stats`).
    pub(crate) fn stats(&self) -> BrokerStats {
        let now_ms = self.clock.now_ms();
        let snapshot = self.snapshot.load();
        let mut read: Vec<_> = snapshot
            .queues
            .iter()
            .map(|(&id, cell)| {
                let counts = cell.metrics.counts();
                let deaths = cell.deaths.stats();
                let created_ms = cell.metrics.created_ms.load(Ordering::Relaxed);
                let counters = counters(&counts, deaths);
                (id, cell, counts, counters, created_ms)
            })
            .collect();
        read.sort_by(|a, b| a.1.meta.name.cmp(&b.1.meta.name));
        let mut samples = self.rates.lock();
        let mut befores = Vec::with_capacity(read.len());
        let mut nows = Vec::with_capacity(read.len());
        let mut queues = Vec::with_capacity(read.len());
        let mut sample = Sample {
            at_ms: now_ms,
            counters: FxHashMap::default(),
        };
        for (id, cell, counts, counters, created_ms) in read {
            let (base_ms, before) = samples.base(id, now_ms, created_ms);
            let elapsed_ms = now_ms.saturating_sub(base_ms);
            queues.push(QueueStats {
                name: cell.meta.name.to_string(),
                queue_type: match cell.is_quorum() {
                    false => "classic",
                    true => "quorum",
                },
                durable: cell.meta.durable,
                messages_ready: counts.ready,
                messages_unacked: counts.unacked,
                consumers: counts.consumers,
                counters,
                rates: Rates::between(&before, &counters, elapsed_ms),
                error_rate: error_rate(&before, &counters),
                processing: Processing::from_histogram(cell.metrics.processing()),
            });
            befores.push(before);
            nows.push(counters);
            sample.counters.insert(id, counters);
        }
        samples.push(sample);
        drop(samples);
        let rest = BrokerStats {
            connections: self.connections.lock().len() as u64,
            channels: self.channels.lock().len() as u64,
            memory: MemoryStats {
                messages_bytes: snapshot.queues.values().map(|c| c.memory_bytes()).sum(),
                high_watermark_bytes: self.limits.memory_high_watermark_bytes,
                process_resident_bytes: process_resident_bytes(),
            },
            publishers_blocked: self.flow.is_blocked(),
            store_backlog_bytes: self.flow.backlog_bytes(),
            durable: self.persistence.is_some(),
            ..BrokerStats::empty()
        };
        BrokerStats::assemble(now_ms, queues, (befores, nows), rest)
    }
}

/// A queue's counters as the public type has them.
fn counters(c: &Counts, deaths: super::DeathStats) -> Counters {
    Counters {
        published: c.published,
        delivered: c.delivered_ack,
        delivered_no_ack: c.delivered_no_ack,
        get: c.get_ack,
        get_no_ack: c.get_no_ack,
        get_empty: c.get_empty,
        redelivered: c.redelivered,
        acked: c.acked,
        nacked: c.nacked,
        requeued: c.requeued,
        dead_lettered: deaths.dead_lettered,
        dropped: deaths.dropped,
    }
}
