//! Monitoring: what [`Broker::stats`](crate::Broker::stats) reports (per-queue sizes, counters,
//! rates, error rate and processing time; broker-wide totals, memory and flow control) and
//! its Prometheus text exposition.
//!
//! # How the figures are made
//! - **Sizes** (`messages_ready`, `messages_unacked`, `consumers`) are those of the last time
//!   the queue's lock was released, so a snapshot never waits for a queue.
//! - **Counters** count since the queue was declared (or recovered; counters are not stored):
//!   messages routed to it, deliveries by kind (consumer or `basic.get`, manual or automatic
//!   acknowledgement), redeliveries, settles by clients (acks, nacks and rejects, requeued or
//!   not), dead-letterings and drops. They are written on the publish, deliver and settle
//!   paths without a lock of their own.
//! - **Rates** are per second over the last [`RATE_WINDOW_MS`] of the broker's clock: each
//!   snapshot is kept as a sample, and a rate compares the counters now with the newest sample
//!   at least that old (or, before there is one, with zero at the queue's creation, which
//!   makes it the average over the queue's life). Call `stats()` at least once per window to
//!   get windowed rates; rates follow a [`ManualClock`](crate::ManualClock) exactly.
//! - **Error rate** is the share of settles in the same window that were negative (nack or
//!   reject, requeued or not): 0 with no settles.
//! - **Processing time** is the time from a message's delivery to its settle by the client
//!   (ack, nack or reject; a message a closed channel gave back is not counted), measured on
//!   the broker's clock in microseconds and kept in an HDR histogram (2 significant digits)
//!   since the queue was declared. A [`ManualClock`](crate::ManualClock) moves in
//!   milliseconds, so processing times under it are whole milliseconds.
//!
//! # Prometheus
//! [`BrokerStats::to_prometheus`] writes the text exposition format (version 0.0.4) under
//! RabbitMQ's metric names where RabbitMQ has one (`rabbitmq_queue_messages_ready`,
//! `rabbitmq_queue_messages_acked_total`, `rabbitmq_connections`, ...; labels `vhost` and
//! `queue`, as RabbitMQ's per-object metrics), and `coney_` names for what RabbitMQ does not
//! export per queue (nacks, dead letters and drops by reason, processing time as a summary).
//! Rates are left to Prometheus (`rate()`). With the cargo feature `http`,
//! `serve_prometheus` serves it over HTTP.
//!
//! ```
//! use std::time::Duration;
//! use coney::*;
//!
//! let clock = ManualClock::new(0);
//! let broker = Broker::builder().clock(clock.clone()).in_memory();
//! let ch = broker.connect().channel()?;
//! ch.queue_declare("orders", QueueDeclareOptions::default(), FieldTable::new())?;
//! for i in 0..10 {
//!     ch.basic_publish("", "orders", Default::default(), format!("o-{i}"), Default::default())?;
//! }
//! let got = ch.basic_get("orders", BasicGetOptions::default())?.expect("a message");
//! clock.advance(Duration::from_millis(40));         // the order takes 40 ms to process
//! got.delivery.ack(BasicAckOptions::default())?;
//! clock.advance(Duration::from_secs(1));
//!
//! let stats = broker.stats();
//! let orders = stats.queue("orders").unwrap();
//! assert_eq!((orders.messages_ready, orders.messages_unacked), (9, 0));
//! assert_eq!(orders.counters.acked, 1);
//! assert_eq!(orders.rates.published, 10.0 / 1.04); // 10 publishes in the queue's 1.04 s
//! let p50 = orders.processing.p50();                 // within the histogram's 1%
//! assert!(p50.abs_diff(Duration::from_millis(40)) <= Duration::from_micros(400), "{p50:?}");
//! assert!(stats.to_prometheus().contains("rabbitmq_queue_messages_ready{vhost=\"/\",queue=\"orders\"} 9"));
//! # Ok::<(), coney::Error>(())
//! ```

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::runtime::ReasonCounts;

/// How far back rates look, in milliseconds of the broker's clock (RabbitMQ's default
/// statistics interval is 5 s).
pub const RATE_WINDOW_MS: u64 = 5_000;

/// A snapshot of the whole broker ([`Broker::stats`](crate::Broker::stats)).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BrokerStats {
    /// When it was taken, in milliseconds of the broker's clock.
    pub at_ms: u64,
    /// Every queue, by name.
    pub queues: Vec<QueueStats>,
    /// The queues' counters, rates and processing times added up.
    pub totals: Totals,
    /// Open connections.
    pub connections: u64,
    /// Open channels.
    pub channels: u64,
    /// Consumers on all queues (waiting single-active consumers included).
    pub consumers: u64,
    /// Memory.
    pub memory: MemoryStats,
    /// Whether publishers wait for flow control now (memory over the high watermark, or the
    /// store's backlog over its bound), as RabbitMQ blocks publishing connections.
    pub publishers_blocked: bool,
    /// Bytes of records waiting for the store (0 in memory).
    pub store_backlog_bytes: u64,
    /// Whether the broker has a store.
    pub durable: bool,
}

/// One queue in a [`BrokerStats`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct QueueStats {
    /// Its name.
    pub name: String,
    /// `"classic"` or `"quorum"`.
    pub queue_type: &'static str,
    /// Whether it is durable.
    pub durable: bool,
    /// Messages ready for delivery (held at-least-once dead letters not included).
    pub messages_ready: u64,
    /// Messages delivered and not yet settled.
    pub messages_unacked: u64,
    /// Consumers (waiting single-active consumers included).
    pub consumers: u64,
    /// Counts since the queue was declared or recovered.
    pub counters: Counters,
    /// Per second over the last [`RATE_WINDOW_MS`].
    pub rates: Rates,
    /// Negative settles among the settles of the rate window (0 with none).
    pub error_rate: f64,
    /// Delivery-to-settle times since the queue was declared.
    pub processing: Processing,
}

/// What a queue counted since it was declared or recovered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Messages routed to it by publishes (refused ones included).
    pub published: u64,
    /// Delivered to consumers in manual-acknowledgement mode.
    pub delivered: u64,
    /// Delivered to consumers in automatic-acknowledgement (`no_ack`) mode.
    pub delivered_no_ack: u64,
    /// Fetched with `basic.get` in manual-acknowledgement mode.
    pub get: u64,
    /// Fetched with `basic.get` with `no_ack`.
    pub get_no_ack: u64,
    /// `basic.get` calls that found nothing.
    pub get_empty: u64,
    /// Deliveries and fetches of messages delivered before (redelivered flag set).
    pub redelivered: u64,
    /// Acked by clients.
    pub acked: u64,
    /// Nacked or rejected by clients, requeued or not.
    pub nacked: u64,
    /// Of those, requeued.
    pub requeued: u64,
    /// Dead-lettered, per reason.
    pub dead_lettered: ReasonCounts,
    /// Dropped (removed without an ack and not dead-lettered), per reason.
    pub dropped: ReasonCounts,
}

impl Counters {
    /// Every delivery and fetch, in either acknowledgement mode.
    pub fn delivered_total(&self) -> u64 {
        self.delivered + self.delivered_no_ack + self.get + self.get_no_ack
    }

    fn add(&mut self, o: &Counters) {
        self.published += o.published;
        self.delivered += o.delivered;
        self.delivered_no_ack += o.delivered_no_ack;
        self.get += o.get;
        self.get_no_ack += o.get_no_ack;
        self.get_empty += o.get_empty;
        self.redelivered += o.redelivered;
        self.acked += o.acked;
        self.nacked += o.nacked;
        self.requeued += o.requeued;
        add_reasons(&mut self.dead_lettered, &o.dead_lettered);
        add_reasons(&mut self.dropped, &o.dropped);
    }
}

fn add_reasons(a: &mut ReasonCounts, b: &ReasonCounts) {
    a.rejected += b.rejected;
    a.expired += b.expired;
    a.maxlen += b.maxlen;
    a.delivery_limit += b.delivery_limit;
}

fn reasons_total(r: &ReasonCounts) -> u64 {
    r.rejected + r.expired + r.maxlen + r.delivery_limit
}

/// Events per second over the rate window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Rates {
    /// Messages routed to the queue.
    pub published: f64,
    /// Deliveries and fetches, in either acknowledgement mode.
    pub delivered: f64,
    /// Acks.
    pub acked: f64,
    /// Nacks and rejects.
    pub nacked: f64,
    /// Redeliveries.
    pub redelivered: f64,
    /// Dead-letterings.
    pub dead_lettered: f64,
    /// Drops.
    pub dropped: f64,
}

impl Rates {
    /// The rates between two counter readings `elapsed_ms` apart (all 0 for no time).
    pub fn between(before: &Counters, now: &Counters, elapsed_ms: u64) -> Rates {
        if elapsed_ms == 0 {
            return Rates::default();
        }
        let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 * 1_000.0 / elapsed_ms as f64;
        Rates {
            published: per_s(before.published, now.published),
            delivered: per_s(before.delivered_total(), now.delivered_total()),
            acked: per_s(before.acked, now.acked),
            nacked: per_s(before.nacked, now.nacked),
            redelivered: per_s(before.redelivered, now.redelivered),
            dead_lettered: per_s(
                reasons_total(&before.dead_lettered),
                reasons_total(&now.dead_lettered),
            ),
            dropped: per_s(reasons_total(&before.dropped), reasons_total(&now.dropped)),
        }
    }

    fn add(&mut self, o: &Rates) {
        self.published += o.published;
        self.delivered += o.delivered;
        self.acked += o.acked;
        self.nacked += o.nacked;
        self.redelivered += o.redelivered;
        self.dead_lettered += o.dead_lettered;
        self.dropped += o.dropped;
    }
}

/// The share of negative settles between two counter readings (0 with no settles).
pub fn error_rate(before: &Counters, now: &Counters) -> f64 {
    let acked = now.acked.saturating_sub(before.acked);
    let nacked = now.nacked.saturating_sub(before.nacked);
    if acked + nacked == 0 {
        0.0
    } else {
        nacked as f64 / (acked + nacked) as f64
    }
}

/// Processing times (delivery to settle by the client) from an HDR histogram.
#[derive(Clone, Debug)]
pub struct Processing {
    histogram: Histogram<u64>,
}

impl Default for Processing {
    fn default() -> Self {
        Self {
            histogram: crate::runtime::new_histogram(),
        }
    }
}

impl Processing {
    pub(crate) fn from_histogram(histogram: Histogram<u64>) -> Self {
        Self { histogram }
    }

    /// Settles measured.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The time under which `q` (0.0 to 1.0) of the settles fell; zero with none.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.histogram.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_micros(self.histogram.value_at_quantile(q.clamp(0.0, 1.0)))
    }

    /// The median.
    pub fn p50(&self) -> Duration {
        self.quantile(0.5)
    }

    /// The 99th percentile.
    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    /// The longest (within the histogram's 1%).
    pub fn max(&self) -> Duration {
        if self.histogram.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_micros(self.histogram.max())
    }

    /// The mean.
    pub fn mean(&self) -> Duration {
        Duration::from_secs_f64(self.histogram.mean() / 1_000_000.0)
    }

    /// The histogram itself (microseconds), for other quantiles or merging.
    pub fn histogram(&self) -> &Histogram<u64> {
        &self.histogram
    }

    fn add(&mut self, o: &Processing) {
        // Both auto-resize, so adding cannot run out of range.
        let _ = self.histogram.add(&o.histogram);
    }
}

/// The queues' figures added up.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Totals {
    /// Queues.
    pub queues: u64,
    /// Ready messages.
    pub messages_ready: u64,
    /// Unacked messages.
    pub messages_unacked: u64,
    /// Counters.
    pub counters: Counters,
    /// Rates.
    pub rates: Rates,
    /// Negative settles among the settles of the rate window, over all queues.
    pub error_rate: f64,
    /// Processing times of every queue.
    pub processing: Processing,
}

/// Memory, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryStats {
    /// The estimate of the queued messages' memory that flow control compares with the high
    /// watermark.
    pub messages_bytes: u64,
    /// The memory high watermark.
    pub high_watermark_bytes: u64,
    /// The process's resident set, where the system tells it (Linux: `/proc/self/statm`).
    pub process_resident_bytes: Option<u64>,
}

impl BrokerStats {
    pub(crate) fn assemble(
        at_ms: u64,
        queues: Vec<QueueStats>,
        window: (Vec<Counters>, Vec<Counters>),
        mut rest: BrokerStats,
    ) -> BrokerStats {
        let mut totals = Totals {
            queues: queues.len() as u64,
            ..Totals::default()
        };
        for q in &queues {
            totals.messages_ready += q.messages_ready;
            totals.messages_unacked += q.messages_unacked;
            totals.counters.add(&q.counters);
            totals.rates.add(&q.rates);
            totals.processing.add(&q.processing);
        }
        let (mut before, mut now) = (Counters::default(), Counters::default());
        for (b, n) in window.0.iter().zip(&window.1) {
            before.add(b);
            now.add(n);
        }
        totals.error_rate = error_rate(&before, &now);
        rest.at_ms = at_ms;
        rest.consumers = queues.iter().map(|q| q.consumers).sum();
        rest.queues = queues;
        rest.totals = totals;
        rest
    }

    pub(crate) fn empty() -> BrokerStats {
        BrokerStats {
            at_ms: 0,
            queues: Vec::new(),
            totals: Totals::default(),
            connections: 0,
            channels: 0,
            consumers: 0,
            memory: MemoryStats::default(),
            publishers_blocked: false,
            store_backlog_bytes: 0,
            durable: false,
        }
    }

    /// The queue called `name`, if there is one.
    pub fn queue(&self, name: &str) -> Option<&QueueStats> {
        self.queues.iter().find(|q| q.name == name)
    }

    /// The snapshot in Prometheus' text exposition format (version 0.0.4), under RabbitMQ's
    /// metric names where RabbitMQ has one (see the module doc).
    pub fn to_prometheus(&self) -> String {
        let mut out = Exposition::default();
        self.write_queues(&mut out);
        out.family(
            "rabbitmq_connections",
            "gauge",
            "Connections currently open",
        );
        out.sample("rabbitmq_connections", "", self.connections as f64);
        out.family("rabbitmq_channels", "gauge", "Channels currently open");
        out.sample("rabbitmq_channels", "", self.channels as f64);
        out.family(
            "rabbitmq_consumers",
            "gauge",
            "Consumers currently connected",
        );
        out.sample("rabbitmq_consumers", "", self.consumers as f64);
        out.family("rabbitmq_queues", "gauge", "Queues available");
        out.sample("rabbitmq_queues", "", self.queues.len() as f64);
        if let Some(rss) = self.memory.process_resident_bytes {
            out.family(
                "rabbitmq_process_resident_memory_bytes",
                "gauge",
                "Memory used in bytes",
            );
            out.sample("rabbitmq_process_resident_memory_bytes", "", rss as f64);
        }
        out.family(
            "rabbitmq_resident_memory_limit_bytes",
            "gauge",
            "Memory high watermark in bytes",
        );
        out.sample(
            "rabbitmq_resident_memory_limit_bytes",
            "",
            self.memory.high_watermark_bytes as f64,
        );
        out.family(
            "coney_messages_memory_bytes",
            "gauge",
            "Estimated memory of the queued messages, compared with the high watermark",
        );
        out.sample(
            "coney_messages_memory_bytes",
            "",
            self.memory.messages_bytes as f64,
        );
        out.family(
            "coney_publishers_blocked",
            "gauge",
            "1 while publishers wait for flow control",
        );
        out.sample(
            "coney_publishers_blocked",
            "",
            f64::from(u8::from(self.publishers_blocked)),
        );
        out.family(
            "coney_store_backlog_bytes",
            "gauge",
            "Bytes of records waiting for the store",
        );
        out.sample(
            "coney_store_backlog_bytes",
            "",
            self.store_backlog_bytes as f64,
        );
        out.text
    }

    fn write_queues(&self, out: &mut Exposition) {
        type Gauge = fn(&QueueStats) -> u64;
        let gauges: [(&str, &str, Gauge); 4] = [
            (
                "rabbitmq_queue_messages_ready",
                "Messages ready to be delivered to consumers",
                |q| q.messages_ready,
            ),
            (
                "rabbitmq_queue_messages_unacked",
                "Messages delivered to consumers but not yet acknowledged",
                |q| q.messages_unacked,
            ),
            (
                "rabbitmq_queue_messages",
                "Sum of ready and unacknowledged messages - total queue depth",
                |q| q.messages_ready + q.messages_unacked,
            ),
            ("rabbitmq_queue_consumers", "Consumers on a queue", |q| {
                q.consumers
            }),
        ];
        for (name, help, value) in gauges {
            out.family(name, "gauge", help);
            for q in &self.queues {
                out.sample(name, &queue_labels(q, ""), value(q) as f64);
            }
        }
        type Count = fn(&Counters) -> u64;
        let counters: [(&str, &str, Count); 10] = [
            (
                "rabbitmq_queue_messages_published_total",
                "Total number of messages published into a queue",
                |c| c.published,
            ),
            (
                "rabbitmq_queue_messages_delivered_ack_total",
                "Total number of messages delivered from a queue to consumers in manual acknowledgement mode",
                |c| c.delivered,
            ),
            (
                "rabbitmq_queue_messages_delivered_total",
                "Total number of messages delivered from a queue to consumers in automatic acknowledgement mode",
                |c| c.delivered_no_ack,
            ),
            (
                "rabbitmq_queue_get_ack_total",
                "Total number of messages fetched from a queue with basic.get in manual acknowledgement mode",
                |c| c.get,
            ),
            (
                "rabbitmq_queue_get_total",
                "Total number of messages fetched from a queue with basic.get in automatic acknowledgement mode",
                |c| c.get_no_ack,
            ),
            (
                "rabbitmq_queue_get_empty_total",
                "Total number of times basic.get operations fetched no message on a queue",
                |c| c.get_empty,
            ),
            (
                "rabbitmq_queue_messages_redelivered_total",
                "Total number of messages redelivered from a queue to consumers",
                |c| c.redelivered,
            ),
            (
                "rabbitmq_queue_messages_acked_total",
                "Total number of messages acknowledged by consumers on a queue",
                |c| c.acked,
            ),
            (
                "coney_queue_messages_nacked_total",
                "Total number of messages nacked or rejected by consumers on a queue",
                |c| c.nacked,
            ),
            (
                "coney_queue_messages_requeued_total",
                "Total number of messages nacked or rejected with requeue on a queue",
                |c| c.requeued,
            ),
        ];
        for (name, help, value) in counters {
            out.family(name, "counter", help);
            for q in &self.queues {
                out.sample(name, &queue_labels(q, ""), value(&q.counters) as f64);
            }
        }
        type Reasons = fn(&Counters) -> &ReasonCounts;
        let by_reason: [(&str, &str, Reasons); 2] = [
            (
                "coney_queue_messages_dead_lettered_total",
                "Total number of messages dead-lettered from a queue, by reason",
                |c| &c.dead_lettered,
            ),
            (
                "coney_queue_messages_dropped_total",
                "Total number of messages a queue removed without an ack and did not dead-letter, by reason",
                |c| &c.dropped,
            ),
        ];
        for (name, help, value) in by_reason {
            out.family(name, "counter", help);
            for q in &self.queues {
                let r = value(&q.counters);
                for (reason, n) in [
                    ("rejected", r.rejected),
                    ("expired", r.expired),
                    ("maxlen", r.maxlen),
                    ("delivery_limit", r.delivery_limit),
                ] {
                    let extra = format!(",reason=\"{reason}\"");
                    out.sample(name, &queue_labels(q, &extra), n as f64);
                }
            }
        }
        let name = "coney_queue_processing_seconds";
        out.family(
            name,
            "summary",
            "Time from delivery to settle by the client",
        );
        for q in &self.queues {
            let p = &q.processing;
            for (label, quantile) in [("0.5", 0.5), ("0.99", 0.99), ("1", 1.0)] {
                let extra = format!(",quantile=\"{label}\"");
                let value = if quantile == 1.0 {
                    p.max()
                } else {
                    p.quantile(quantile)
                };
                out.sample(name, &queue_labels(q, &extra), value.as_secs_f64());
            }
            let sum = p.mean().as_secs_f64() * p.count() as f64;
            out.sample(&format!("{name}_sum"), &queue_labels(q, ""), sum);
            out.sample(
                &format!("{name}_count"),
                &queue_labels(q, ""),
                p.count() as f64,
            );
        }
    }
}

/// The text of an exposition, family by family.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.text, "{name} {value}");
        } else {
            let _ = writeln!(self.text, "{name}{{{labels}}} {value}");
        }
    }
}

/// `vhost="/",queue="<name>"` followed by `extra` (which starts with a comma).
fn queue_labels(q: &QueueStats, extra: &str) -> String {
    format!("vhost=\"/\",queue=\"{}\"{extra}", escape_label(&q.name))
}

/// A label value as the exposition format wants it: backslash, double quote and line feed
/// escaped.
pub(crate) fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The process's resident set in bytes, from `/proc/self/statm` (`None` elsewhere).
pub(crate) fn process_resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().map(|p| p * pages)
}

#[cfg(feature = "http")]
pub use http::{PrometheusServer, serve_prometheus};

#[cfg(feature = "http")]
mod http;
