//! The run's report: per-queue figures from the broker, latency percentiles, the invariant's
//! audit, as a table for people or JSON for programs.
//!
//! Queue figures come from `Broker::stats` (sizes, counters since the queue was declared or
//! recovered, so a resumed run counts its own part, and processing time from delivery to
//! settle).

use std::fmt::Write as _;
use std::time::Duration;

use coney::Broker;
use serde::Serialize;

use super::invariant::Audit;
use super::model::QUEUES;

/// One queue's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QueueStats {
    /// The queue.
    pub name: String,
    /// Messages ready.
    pub ready: u64,
    /// Messages delivered and not yet settled.
    pub unacked: u64,
    /// Consumers (while the services ran).
    pub consumers: u64,
    /// Messages routed to it.
    pub published: u64,
    /// Acks by its consumers.
    pub acked: u64,
    /// Nacks and rejects by its consumers.
    pub nacked: u64,
    /// Redeliveries.
    pub redelivered: u64,
    /// Messages it dead-lettered, all reasons.
    pub dead_lettered: u64,
    /// Messages it dropped (no dead-letter target), all reasons.
    pub dropped: u64,
    /// Nacks and rejects / settles.
    pub error_rate: f64,
    /// Delivery to settle, median, in ms (a service settles a batch once it is committed).
    pub processing_p50_ms: f64,
    /// Delivery to settle, 99th percentile, in ms.
    pub processing_p99_ms: f64,
}

/// The figures of every shop queue now.
pub fn all_queue_stats(broker: &Broker) -> Vec<QueueStats> {
    let stats = broker.stats();
    QUEUES
        .iter()
        .map(|name| match stats.queue(name) {
            Some(q) => queue_stats(q),
            None => QueueStats {
                name: (*name).to_owned(),
                ..QueueStats::default()
            },
        })
        .collect()
}

fn queue_stats(q: &coney::stats::QueueStats) -> QueueStats {
    let total = |r: coney::ReasonCounts| r.rejected + r.expired + r.maxlen + r.delivery_limit;
    let c = &q.counters;
    let settles = c.acked + c.nacked;
    let ms = |d: Duration| d.as_secs_f64() * 1_000.0;
    QueueStats {
        name: q.name.clone(),
        ready: q.messages_ready,
        unacked: q.messages_unacked,
        consumers: q.consumers,
        published: c.published,
        acked: c.acked,
        nacked: c.nacked,
        redelivered: c.redelivered,
        dead_lettered: total(c.dead_lettered),
        dropped: total(c.dropped),
        error_rate: if settles == 0 {
            0.0
        } else {
            c.nacked as f64 / settles as f64
        },
        processing_p50_ms: ms(q.processing.p50()),
        processing_p99_ms: ms(q.processing.p99()),
    }
}

/// Create -> final state percentiles, in ms.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    /// Orders measured.
    pub count: u64,
    /// Median.
    pub p50_ms: u64,
    /// 99th percentile.
    pub p99_ms: u64,
    /// Slowest.
    pub max_ms: u64,
}

impl Latency {
    /// Percentiles of `samples_ms` (3 significant figures).
    pub fn of(samples_ms: &[u64]) -> Latency {
        // Up to a day: a resumed run's first orders waited for the restart.
        let Ok(mut h) = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 86_400_000, 3) else {
            return Latency::default();
        };
        for &ms in samples_ms {
            h.saturating_record(ms);
        }
        Latency {
            count: h.len(),
            p50_ms: h.value_at_quantile(0.5),
            p99_ms: h.value_at_quantile(0.99),
            max_ms: h.max(),
        }
    }
}

/// Everything a run reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// `fire-and-forget` or `request-reply`.
    pub mode: String,
    /// The seed (a resumed run keeps the first run's).
    pub seed: u64,
    /// Whether this run resumed an earlier one.
    pub resumed: bool,
    /// Orders asked for in all.
    pub orders_asked: u64,
    /// Orders this run created (a resumed run creates the rest).
    pub created_this_run: u64,
    /// Payment requests a resumed run sent again: those whose first publish was not
    /// confirmed (fire-and-forget), or every open order (request-reply).
    pub republished: u64,
    /// This run's wall time, in seconds.
    pub elapsed_s: f64,
    /// Orders settled by this run per second of it.
    pub orders_per_s: f64,
    /// Payment attempts this run (deliveries of undecided requests).
    pub payment_attempts: u64,
    /// Of which failed and were retried or dead-lettered.
    pub payment_failures: u64,
    /// `payment_failures / payment_attempts`.
    pub error_rate: f64,
    /// Payment calls without a reply in time, called again (request-reply mode).
    pub rpc_timeouts: u64,
    /// Deliveries found already handled (redeliveries, republished requests) this run.
    pub repeats: u64,
    /// Most ready messages seen in `payment_queue` while running.
    pub payment_queue_peak: u32,
    /// Per queue, at the end.
    pub queues: Vec<QueueStats>,
    /// Create -> final state.
    pub latency: Latency,
    /// The invariant check and the counts it is made of.
    pub audit: Audit,
    /// Whether the run hit its deadline before everything settled.
    pub timed_out: bool,
}

impl Report {
    /// Whether the run settled everything and the invariant holds.
    pub fn ok(&self) -> bool {
        self.audit.holds && !self.timed_out
    }

    /// The report as a table.
    pub fn to_table(&self) -> String {
        let a = &self.audit;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "coney shop: {} mode, seed {}{}",
            self.mode,
            self.seed,
            if self.resumed { ", resumed" } else { "" }
        );
        let _ = writeln!(
            s,
            "  orders created      {:>10}   (this run: {}, republished: {})",
            a.orders, self.created_this_run, self.republished
        );
        let _ = writeln!(s, "  paid                {:>10}", a.paid);
        let _ = writeln!(s, "  failed (declined)   {:>10}", a.failed);
        let reasons: Vec<String> = a
            .dead_letter_reasons
            .iter()
            .map(|(r, n)| format!("{r}: {n}"))
            .collect();
        let _ = writeln!(
            s,
            "  dead-lettered       {:>10}   ({})",
            a.dead_lettered,
            if reasons.is_empty() {
                "none".to_owned()
            } else {
                reasons.join(", ")
            }
        );
        let _ = writeln!(s, "  stock updates       {:>10}", a.stock_updates);
        let _ = writeln!(s, "  charges             {:>10}", a.charges);
        let _ = writeln!(
            s,
            "  elapsed             {:>10.2} s   ({:.0} orders/s)",
            self.elapsed_s, self.orders_per_s
        );
        let _ = writeln!(
            s,
            "  payment attempts    {:>10}   (failed {}, error rate {:.2}%)",
            self.payment_attempts,
            self.payment_failures,
            100.0 * self.error_rate
        );
        let _ = writeln!(s, "  repeats handled     {:>10}", self.repeats);
        if self.mode == "request-reply" {
            let _ = writeln!(
                s,
                "  calls timed out     {:>10}   (called again)",
                self.rpc_timeouts
            );
        }
        let _ = writeln!(
            s,
            "  latency create->final  p50 {} ms, p99 {} ms, max {} ms ({} orders)",
            self.latency.p50_ms, self.latency.p99_ms, self.latency.max_ms, self.latency.count
        );
        let _ = writeln!(
            s,
            "  payment_queue peak  {:>10} ready",
            self.payment_queue_peak
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "  {:<16} {:>6} {:>7} {:>9} {:>9} {:>9} {:>7} {:>11} {:>8} {:>8} {:>7} {:>16}",
            "queue",
            "ready",
            "unacked",
            "consumers",
            "published",
            "acked",
            "nacked",
            "redelivered",
            "dead-let",
            "dropped",
            "errors",
            "process p50/p99"
        );
        for q in &self.queues {
            let _ = writeln!(
                s,
                "  {:<16} {:>6} {:>7} {:>9} {:>9} {:>9} {:>7} {:>11} {:>8} {:>8} {:>6.2}% {:>7.1}/{:<5.1}ms",
                q.name,
                q.ready,
                q.unacked,
                q.consumers,
                q.published,
                q.acked,
                q.nacked,
                q.redelivered,
                q.dead_lettered,
                q.dropped,
                100.0 * q.error_rate,
                q.processing_p50_ms,
                q.processing_p99_ms
            );
        }
        let _ = writeln!(s);
        if self.timed_out {
            let _ = writeln!(
                s,
                "  DEADLINE: the run did not settle in time ({} orders still pending)",
                a.pending
            );
        }
        if a.holds {
            let _ = writeln!(
                s,
                "  INVARIANT holds: every order paid with its stock updated once, failed, or dead-lettered with its reason; none lost, none processed twice"
            );
        } else {
            let _ = writeln!(s, "  INVARIANT BROKEN: {} violations", a.violation_count);
            for v in &a.violations {
                let _ = writeln!(s, "    - {v}");
            }
        }
        s
    }
}

/// Seconds as f64, for rates.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}
