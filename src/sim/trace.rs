//! What happened in a broker, event by event, stamped with the broker's clock.
//!
//! A [`Trace`] is attached to a broker with [`BrokerBuilder::trace`](crate::BrokerBuilder::trace)
//! (a [`Simulation`](super::Simulation) attaches one by itself). The broker records every
//! publish, route, enqueue, delivery, settle, expiry, dead letter, drop and confirm as it
//! happens; a simulation adds the handlers it runs and the faults it injects. Events of one
//! thread are in the order they happened; in a simulation everything happens on one thread,
//! so the same seed gives the same trace, byte for byte ([`Trace::to_text`]).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::clock::Clock;

/// One thing that happened, at `at_ms` on the broker's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// The broker's clock when it happened.
    pub at_ms: u64,
    /// What happened.
    pub event: Event,
}

/// What happened. Queues are named; a message in a queue is its sequence number there
/// (`seq`), which the queue assigns in publish order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A message was published on a channel (its `message_id`, else its `correlation_id`, else
    /// empty, names it).
    Publish {
        /// The publishing channel's number in the broker.
        channel: u64,
        /// The exchange published to (`""`: the default exchange).
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The message's `message_id` or `correlation_id`.
        message: String,
    },
    /// The exchange routed the message published just before to these queues (none:
    /// unroutable).
    Route {
        /// The queues, in the order they take the message.
        queues: Vec<String>,
    },
    /// A queue took a message.
    Enqueue {
        /// The queue.
        queue: String,
        /// Its number in the queue.
        seq: u64,
    },
    /// A queue handed a message to a consumer.
    Deliver {
        /// The queue.
        queue: String,
        /// The message's number in the queue.
        seq: u64,
        /// The consumer's tag.
        consumer: String,
        /// Whether it was flagged redelivered.
        redelivered: bool,
    },
    /// `basic.get` took a message.
    Get {
        /// The queue.
        queue: String,
        /// The message's number in the queue.
        seq: u64,
        /// Whether it was flagged redelivered.
        redelivered: bool,
    },
    /// A client acked a message.
    Ack {
        /// The queue.
        queue: String,
        /// The message's number in the queue.
        seq: u64,
    },
    /// A client nacked or rejected a message.
    Nack {
        /// The queue.
        queue: String,
        /// The message's number in the queue.
        seq: u64,
        /// Whether it goes back to the queue.
        requeue: bool,
    },
    /// An unacked message went back to its queue because its holder went away (a channel or
    /// connection closed, a consumer crashed).
    Requeue {
        /// The queue.
        queue: String,
        /// The message's number in the queue.
        seq: u64,
    },
    /// A message's TTL ran out.
    Expire {
        /// The queue.
        queue: String,
        /// The message's number in the queue.
        seq: u64,
    },
    /// A message left its queue for its dead-letter exchange.
    DeadLetter {
        /// The queue it left.
        queue: String,
        /// Its number there.
        seq: u64,
        /// Why (`rejected`, `expired`, `maxlen`, `delivery_limit`, as in `x-death`).
        reason: String,
    },
    /// A message left its queue for good, without being dead-lettered.
    Drop {
        /// The queue it left.
        queue: String,
        /// Its number there.
        seq: u64,
        /// Why (as in `x-death`).
        reason: String,
    },
    /// A publisher confirm.
    Confirm {
        /// The channel's number in the broker.
        channel: u64,
        /// The publish's sequence number on its channel.
        tag: u64,
        /// Whether it covers every unanswered number up to `tag`.
        multiple: bool,
        /// An ack (`false`: a nack).
        ack: bool,
    },
    /// The store wrote and flushed the records waiting (a simulation's store).
    Flush {
        /// The jobs written (publishes, removals, moves, ...).
        jobs: u64,
    },
    /// A simulation ran a service's handler on a delivery.
    Handle {
        /// The service.
        service: String,
        /// The delivery's queue.
        queue: String,
        /// The delivery's tag on the service's channel.
        delivery_tag: u64,
        /// Whether the handler returned an error.
        failed: bool,
    },
    /// A fault, injected by a simulation or by hand.
    Fault {
        /// What kind (`service_crash`, `channel_closed`, `store_write`, `crash`, ...).
        kind: String,
        /// What it hit.
        detail: String,
    },
    /// A note of the simulation's own (a service restarted, the broker reopened, ...).
    Note {
        /// The text.
        text: String,
    },
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Publish {
                channel,
                exchange,
                routing_key,
                message,
            } => write!(
                f,
                "publish ch={channel} exchange='{exchange}' key='{routing_key}' id='{message}'"
            ),
            Event::Route { queues } => write!(f, "route -> [{}]", queues.join(", ")),
            Event::Enqueue { queue, seq } => write!(f, "enqueue {queue}#{seq}"),
            Event::Deliver {
                queue,
                seq,
                consumer,
                redelivered,
            } => write!(
                f,
                "deliver {queue}#{seq} to {consumer}{}",
                if *redelivered { " (redelivered)" } else { "" }
            ),
            Event::Get {
                queue,
                seq,
                redelivered,
            } => write!(
                f,
                "get {queue}#{seq}{}",
                if *redelivered { " (redelivered)" } else { "" }
            ),
            Event::Ack { queue, seq } => write!(f, "ack {queue}#{seq}"),
            Event::Nack {
                queue,
                seq,
                requeue,
            } => write!(f, "nack {queue}#{seq} requeue={requeue}"),
            Event::Requeue { queue, seq } => write!(f, "requeue {queue}#{seq}"),
            Event::Expire { queue, seq } => write!(f, "expire {queue}#{seq}"),
            Event::DeadLetter { queue, seq, reason } => {
                write!(f, "dead-letter {queue}#{seq} reason={reason}")
            }
            Event::Drop { queue, seq, reason } => write!(f, "drop {queue}#{seq} reason={reason}"),
            Event::Confirm {
                channel,
                tag,
                multiple,
                ack,
            } => write!(
                f,
                "confirm ch={channel} tag={tag}{} {}",
                if *multiple { " multiple" } else { "" },
                if *ack { "ack" } else { "nack" }
            ),
            Event::Flush { jobs } => write!(f, "flush {jobs} jobs"),
            Event::Handle {
                service,
                queue,
                delivery_tag,
                failed,
            } => write!(
                f,
                "handle {service} {queue} tag={delivery_tag}{}",
                if *failed { " failed" } else { "" }
            ),
            Event::Fault { kind, detail } => write!(f, "FAULT {kind}: {detail}"),
            Event::Note { text } => write!(f, "note {text}"),
        }
    }
}

impl fmt::Display for TraceEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>6}.{:03} {}",
            self.at_ms / 1000,
            self.at_ms % 1000,
            self.event
        )
    }
}

/// A shared, growing record of [`TraceEvent`]s. Cloning shares it.
#[derive(Clone)]
pub struct Trace {
    inner: Arc<Recorder>,
    /// Whether this handle still records: a broker's handle is muted when a simulation
    /// abandons the broker (a crash), so its shutdown leaves no events.
    live: Arc<AtomicBool>,
}

struct Recorder {
    clock: Mutex<Option<Arc<dyn Clock>>>,
    events: Mutex<Vec<TraceEvent>>,
}

impl Default for Trace {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trace")
            .field("events", &self.len())
            .finish_non_exhaustive()
    }
}

impl Trace {
    /// An empty trace. Its events are stamped with the clock of the broker it is attached to.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Recorder {
                clock: Mutex::new(None),
                events: Mutex::new(Vec::new()),
            }),
            live: Arc::new(AtomicBool::new(true)),
        }
    }

    /// A handle of this trace for one broker, which can be muted on its own.
    pub(crate) fn attachment(&self) -> Trace {
        Trace {
            inner: self.inner.clone(),
            live: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Stops this handle (and its clones) from recording; the trace itself goes on.
    pub(crate) fn mute(&self) {
        self.live.store(false, Ordering::Relaxed);
    }

    /// Stamps events with `clock` from now on (the broker's, when the trace is attached).
    pub(crate) fn set_clock(&self, clock: Arc<dyn Clock>) {
        *self.inner.clock.lock() = Some(clock);
    }

    /// Records `event` now.
    pub fn record(&self, event: Event) {
        if !self.live.load(Ordering::Relaxed) {
            return;
        }
        let at_ms = self.inner.clock.lock().as_ref().map_or(0, |c| c.now_ms());
        self.inner.events.lock().push(TraceEvent { at_ms, event });
    }

    /// The number of events recorded.
    pub fn len(&self) -> usize {
        self.inner.events.lock().len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the events recorded so far.
    pub fn events(&self) -> Vec<TraceEvent> {
        self.inner.events.lock().clone()
    }

    /// The events from index `from` on.
    pub fn events_since(&self, from: usize) -> Vec<TraceEvent> {
        let events = self.inner.events.lock();
        events.get(from..).map(<[_]>::to_vec).unwrap_or_default()
    }

    /// Every event on a line of its own: `seconds.millis event`.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let events = self.inner.events.lock();
        let mut text = String::with_capacity(events.len() * 40);
        for e in events.iter() {
            let _ = writeln!(text, "{e}");
        }
        text
    }

    /// A 64-bit digest of [`Trace::to_text`] (FNV-1a), to compare runs cheaply.
    pub fn digest(&self) -> u64 {
        fnv1a(self.to_text().as_bytes())
    }

    /// Forgets every event recorded so far.
    pub fn clear(&self) {
        self.inner.events.lock().clear();
    }
}

/// FNV-1a over `bytes`.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;

    #[test]
    fn events_are_stamped_with_the_clock_and_printed_in_order() {
        let clock = ManualClock::new(1_500);
        let trace = Trace::new();
        trace.set_clock(Arc::new(clock.clone()));
        trace.record(Event::Enqueue {
            queue: "q".into(),
            seq: 0,
        });
        clock.advance(std::time::Duration::from_millis(2_250));
        trace.record(Event::Ack {
            queue: "q".into(),
            seq: 0,
        });
        assert_eq!(trace.len(), 2);
        assert_eq!(
            trace.to_text(),
            "     1.500 enqueue q#0\n     3.750 ack q#0\n"
        );
        let before = trace.digest();
        trace.record(Event::Note { text: "x".into() });
        assert_ne!(trace.digest(), before);
        assert_eq!(trace.events_since(2).len(), 1);
        trace.clear();
        assert!(trace.is_empty());
    }
}
