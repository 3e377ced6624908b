//! What a queue counts as messages pass through it, read by [`Broker::stats`](super::Broker::stats)
//! without taking the queue's lock.
//!
//! Counters written under the queue's lock (deliveries, settles, the gauges) have one writer
//! at a time, so they are bumped with a plain load and store rather than a locked
//! read-modify-write; publishes are counted by the publishing threads themselves, on a cache
//! line of their own. Processing times (delivery to settle) are gathered under the queue's
//! lock into a small buffer and moved into the queue's histogram when the lock is released,
//! with a `try_lock`: a reader copying the histogram never makes the hot path wait, unless the
//! buffer has filled up ([`SAMPLES_MAX`]).

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use hdrhistogram::Histogram;
use parking_lot::Mutex;

/// Processing times buffered under a queue's lock before its holder waits for the histogram.
pub(crate) const SAMPLES_MAX: usize = 4096;

/// The histogram's precision: two significant digits (values within 1%).
const SIGNIFICANT_DIGITS: u8 = 2;

/// A queue's counters and processing-time histogram.
pub(crate) struct QueueMetrics {
    /// Messages routed to the queue (written by publishers, without the queue's lock).
    published: CachePadded<AtomicU64>,
    /// Written under the queue's lock only.
    locked: CachePadded<Locked>,
    /// Delivery-to-settle times in microseconds, of settles by clients (ack, nack, reject).
    processing: Mutex<Histogram<u64>>,
    /// When the queue was declared or recovered (the broker's clock), the origin of its rates.
    pub(crate) created_ms: AtomicU64,
}

/// The counters and gauges written under the queue's lock.
#[derive(Default)]
struct Locked {
    delivered_ack: AtomicU64,
    delivered_no_ack: AtomicU64,
    get_ack: AtomicU64,
    get_no_ack: AtomicU64,
    get_empty: AtomicU64,
    redelivered: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    requeued: AtomicU64,
    ready: AtomicU64,
    unacked: AtomicU64,
    consumers: AtomicU64,
}

/// What a queue's counters read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) published: u64,
    pub(crate) delivered_ack: u64,
    pub(crate) delivered_no_ack: u64,
    pub(crate) get_ack: u64,
    pub(crate) get_no_ack: u64,
    pub(crate) get_empty: u64,
    pub(crate) redelivered: u64,
    pub(crate) acked: u64,
    pub(crate) nacked: u64,
    pub(crate) requeued: u64,
    pub(crate) ready: u64,
    pub(crate) unacked: u64,
    pub(crate) consumers: u64,
}

/// A delivery, by how it left the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// To a consumer (`basic.deliver`).
    Consume { no_ack: bool },
    /// Fetched (`basic.get`).
    Get { no_ack: bool },
}

/// A settle by a client, by outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    Acked,
    /// Nacked or rejected; `requeue` says whether it went back.
    Nacked {
        requeue: bool,
    },
}

/// Adds `n` to a counter that only the queue's lock holder writes.
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

impl QueueMetrics {
    pub(crate) fn new() -> Self {
        Self {
            published: CachePadded::new(AtomicU64::new(0)),
            locked: CachePadded::new(Locked::default()),
            processing: Mutex::new(new_histogram()),
            created_ms: AtomicU64::new(0),
        }
    }

    /// A message was routed to the queue (any thread).
    pub(crate) fn published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    /// A message was handed out (under the queue's lock).
    pub(crate) fn delivered(&self, how: Delivered, redelivered: bool) {
        let l = &self.locked;
        bump(
            match how {
                Delivered::Consume { no_ack: false } => &l.delivered_ack,
                Delivered::Consume { no_ack: true } => &l.delivered_no_ack,
                Delivered::Get { no_ack: false } => &l.get_ack,
                Delivered::Get { no_ack: true } => &l.get_no_ack,
            },
            1,
        );
        if redelivered {
            bump(&l.redelivered, 1);
        }
    }

    /// A `basic.get` found the queue empty (under the queue's lock).
    pub(crate) fn get_empty(&self) {
        bump(&self.locked.get_empty, 1);
    }

    /// A client settled a message (under the queue's lock).
    pub(crate) fn settled(&self, how: Settled) {
        let l = &self.locked;
        match how {
            Settled::Acked => bump(&l.acked, 1),
            Settled::Nacked { requeue } => {
                bump(&l.nacked, 1);
                if requeue {
                    bump(&l.requeued, 1);
                }
            }
        }
    }

    /// The queue's sizes as its lock is released.
    pub(crate) fn set_gauges(&self, ready: u64, unacked: u64, consumers: u64) {
        let l = &self.locked;
        l.ready.store(ready, Ordering::Relaxed);
        l.unacked.store(unacked, Ordering::Relaxed);
        l.consumers.store(consumers, Ordering::Relaxed);
    }

    /// Moves buffered processing times into the histogram, unless a reader holds it and the
    /// buffer still has room (called under the queue's lock, as it is released).
    pub(crate) fn record(&self, samples: &mut Vec<u64>) {
        if samples.is_empty() {
            return;
        }
        let histogram = match self.processing.try_lock() {
            Some(h) => h,
            None if samples.len() >= SAMPLES_MAX => self.processing.lock(),
            None => return,
        };
        let mut histogram = histogram;
        for &us in samples.iter() {
            // The histogram grows to fit; only a value beyond its largest possible range is
            // clamped.
            if histogram.record(us).is_err() {
                histogram.saturating_record(us);
            }
        }
        drop(histogram);
        samples.clear();
    }

    /// The counters now.
    pub(crate) fn counts(&self) -> Counts {
        let l = &self.locked;
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            published: self.published.load(Ordering::Relaxed),
            delivered_ack: r(&l.delivered_ack),
            delivered_no_ack: r(&l.delivered_no_ack),
            get_ack: r(&l.get_ack),
            get_no_ack: r(&l.get_no_ack),
            get_empty: r(&l.get_empty),
            redelivered: r(&l.redelivered),
            acked: r(&l.acked),
            nacked: r(&l.nacked),
            requeued: r(&l.requeued),
            ready: r(&l.ready),
            unacked: r(&l.unacked),
            consumers: r(&l.consumers),
        }
    }

    /// A copy of the processing-time histogram (microseconds).
    pub(crate) fn processing(&self) -> Histogram<u64> {
        self.processing.lock().clone()
    }
}

/// An empty histogram of microseconds that grows as values come.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new(SIGNIFICANT_DIGITS)
        .expect("2 significant digits are within hdrhistogram's 0..=5")
}
