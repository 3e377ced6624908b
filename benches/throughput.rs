//! Single-producer / single-consumer throughput of coney against a raw crossbeam-channel baseline.
//!
//! Group `spsc_64B`: every iteration moves `N` messages with 64-byte bodies from a producer
//! thread (spawned per iteration) to the bench thread, which consumes them. Bodies are clones of
//! one pre-built 64-byte `Bytes`, prepared outside the timed region, for the baselines and for
//! coney alike. The broker (or channel) of a benchmark is created once, on first use, and every
//! iteration checks that it left the broker empty, so iterations are independent. See
//! BENCHMARKS.md for what each benchmark measures and the figures.

use std::hint::black_box;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coney::{
    BasicAckOptions, BasicConsumeOptions, BasicProperties, BasicPublishOptions, BasicQosOptions,
    Broker, Channel, Connection, Consumer, FieldTable, QueueDeclareOptions,
};
use criterion::{BenchmarkId, Criterion, Throughput};
use crossbeam_channel::{Receiver, Sender, TryRecvError};

/// Messages per iteration.
const N: u64 = 100_000;
/// Body size in bytes.
const BODY_LEN: usize = 64;
/// Prefetch of the manual-ack consumers.
const PREFETCH: u16 = 1000;
/// The manual-ack-multiple consumer acks (with `multiple`) every this many deliveries.
const ACK_EVERY: u64 = 100;
/// The queue every coney benchmark uses.
const QUEUE: &str = "q";

/// `N` clones of one 64-byte body, rebuilt outside the timed region before every iteration;
/// the producer drains them and hands the (empty) buffer back for reuse.
struct Bodies {
    one: Bytes,
    buf: Vec<Bytes>,
}

impl Bodies {
    fn new() -> Self {
        Self {
            one: Bytes::from(vec![0xA5u8; BODY_LEN]),
            buf: Vec::with_capacity(N as usize),
        }
    }

    /// A full batch of `N` bodies.
    fn take(&mut self) -> Vec<Bytes> {
        let mut v = std::mem::take(&mut self.buf);
        v.clear();
        v.extend((0..N).map(|_| self.one.clone()));
        v
    }

    /// Gives a drained batch back.
    fn give_back(&mut self, v: Vec<Bytes>) {
        debug_assert!(v.is_empty());
        self.buf = v;
    }
}

// ---- crossbeam-channel baselines ------------------------------------------------------------

/// A crossbeam channel created once per benchmark.
struct CrossbeamFixture {
    tx: Sender<Bytes>,
    rx: Receiver<Bytes>,
    bodies: Bodies,
}

impl CrossbeamFixture {
    fn new(bounded: Option<usize>) -> Self {
        let (tx, rx) = match bounded {
            Some(cap) => crossbeam_channel::bounded(cap),
            None => crossbeam_channel::unbounded(),
        };
        Self {
            tx,
            rx,
            bodies: Bodies::new(),
        }
    }

    fn run(&mut self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let mut batch = self.bodies.take();
            let (tx, rx) = (&self.tx, &self.rx);
            let start = Instant::now();
            let batch = thread::scope(|s| {
                let producer = s.spawn(move || {
                    for body in batch.drain(..) {
                        tx.send(body).expect("receiver alive");
                    }
                    batch
                });
                for _ in 0..N {
                    let body = rx.recv().expect("sender alive");
                    black_box(body.len());
                }
                producer.join().expect("producer panicked")
            });
            total += start.elapsed();
            assert_eq!(self.rx.try_recv(), Err(TryRecvError::Empty));
            self.bodies.give_back(batch);
        }
        total
    }
}

// ---- coney ----------------------------------------------------------------------------------

/// How the coney consumer settles its deliveries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AckMode {
    /// `no_ack: true`: settled when sent.
    Auto,
    /// Manual ack, each delivery acked on its own (`Delivery::ack`).
    Each,
    /// Manual ack, `basic_ack(tag, multiple: true)` every `ACK_EVERY` deliveries.
    Multiple,
}

/// A broker with queue `QUEUE`, a publishing channel and a consumer, created once per benchmark.
struct ConeyFixture {
    broker: Broker,
    mode: AckMode,
    publisher: Channel,
    consumer_ch: Channel,
    consumer: Consumer,
    /// The delivery tag the next delivery on `consumer_ch` should carry.
    next_tag: u64,
    bodies: Bodies,
    _conn: Connection,
}

impl ConeyFixture {
    fn new(mode: AckMode) -> Self {
        let broker = Broker::in_memory();
        let conn = broker.connect();
        let publisher = conn.channel().expect("open publisher channel");
        let consumer_ch = conn.channel().expect("open consumer channel");
        consumer_ch
            .queue_declare(QUEUE, QueueDeclareOptions::default(), FieldTable::new())
            .expect("declare queue");
        if mode != AckMode::Auto {
            consumer_ch
                .basic_qos(PREFETCH, BasicQosOptions::default())
                .expect("basic.qos");
        }
        let consumer = consumer_ch
            .basic_consume(
                QUEUE,
                "",
                BasicConsumeOptions {
                    no_ack: mode == AckMode::Auto,
                    ..Default::default()
                },
                FieldTable::new(),
            )
            .expect("basic.consume");
        Self {
            broker,
            mode,
            publisher,
            consumer_ch,
            consumer,
            next_tag: 1,
            bodies: Bodies::new(),
            _conn: conn,
        }
    }

    fn run(&mut self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let mut batch = self.bodies.take();
            let first_tag = self.next_tag;
            let publisher = &self.publisher;
            let (consumer, consumer_ch, mode) = (&mut self.consumer, &self.consumer_ch, self.mode);
            let start = Instant::now();
            let (batch, last_tag) = thread::scope(|s| {
                let producer = s.spawn(move || {
                    for body in batch.drain(..) {
                        publisher
                            .basic_publish(
                                "",
                                QUEUE,
                                BasicPublishOptions::default(),
                                body,
                                BasicProperties::default(),
                            )
                            .expect("basic.publish");
                    }
                    batch
                });
                let last_tag = consume_n(consumer, consumer_ch, mode);
                (producer.join().expect("producer panicked"), last_tag)
            });
            total += start.elapsed();
            self.bodies.give_back(batch);
            assert_eq!(last_tag, first_tag + N - 1, "deliveries lost or duplicated");
            self.next_tag = last_tag + 1;
            self.assert_empty();
        }
        total
    }

    /// The queue holds no ready message, the consumer's buffer is empty and the broker is
    /// consistent (each queue's unacked count equals what channels hold). Every delivery was
    /// acked with an `Ok` (an unknown tag would have closed the channel), and `finish` proves
    /// nothing stayed unacked.
    fn assert_empty(&mut self) {
        let ok = self
            .consumer_ch
            .queue_declare(
                QUEUE,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::new(),
            )
            .expect("passive declare");
        assert_eq!(ok.message_count, 0, "messages left in the queue");
        assert_eq!(ok.consumer_count, 1);
        assert!(matches!(self.consumer.try_recv(), Err(TryRecvError::Empty)));
        self.broker.check_invariants().expect("broker invariants");
    }

    /// After the last iteration: closing the consumer's channel requeues whatever it still had
    /// unacked, so the queue must still be empty afterwards.
    fn finish(self) {
        let ConeyFixture {
            publisher,
            consumer_ch,
            consumer,
            ..
        } = self;
        drop(consumer);
        consumer_ch.close();
        let ok = publisher
            .queue_declare(
                QUEUE,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::new(),
            )
            .expect("passive declare");
        assert_eq!(ok.message_count, 0, "deliveries were left unacked");
        assert_eq!(ok.consumer_count, 0);
    }
}

/// Receives (and settles) `N` deliveries; returns the last delivery tag.
fn consume_n(consumer: &mut Consumer, channel: &Channel, mode: AckMode) -> u64 {
    let mut last = 0;
    for i in 1..=N {
        let d = consumer.recv().expect("consumer ended");
        black_box(d.body().len());
        last = d.delivery_tag();
        match mode {
            AckMode::Auto => {}
            AckMode::Each => d.ack(BasicAckOptions::default()).expect("basic.ack"),
            AckMode::Multiple => {
                if i % ACK_EVERY == 0 {
                    channel
                        .basic_ack(last, BasicAckOptions { multiple: true })
                        .expect("basic.ack multiple");
                }
            }
        }
    }
    last
}

fn spsc_64b(c: &mut Criterion) {
    let mut group = c.benchmark_group("spsc_64B");
    group.throughput(Throughput::Elements(N));

    for (name, bounded) in [
        ("crossbeam_baseline", None),
        ("crossbeam_bounded_baseline", Some(1024)),
    ] {
        let mut fixture: Option<CrossbeamFixture> = None;
        group.bench_function(name, |b| {
            let f = fixture.get_or_insert_with(|| CrossbeamFixture::new(bounded));
            b.iter_custom(|iters| f.run(iters));
        });
    }

    let prefetch = format!("prefetch_{PREFETCH}");
    for (id, mode) in [
        (BenchmarkId::from_parameter("coney_autoack"), AckMode::Auto),
        (
            BenchmarkId::new("coney_manual_ack", &prefetch),
            AckMode::Each,
        ),
        (
            BenchmarkId::new("coney_manual_ack_multiple_100", &prefetch),
            AckMode::Multiple,
        ),
    ] {
        let mut fixture: Option<ConeyFixture> = None;
        group.bench_function(id, |b| {
            let f = fixture.get_or_insert_with(|| ConeyFixture::new(mode));
            b.iter_custom(|iters| f.run(iters));
        });
        if let Some(f) = fixture {
            f.finish();
        }
    }

    group.finish();
}

// What `criterion_group!` / `criterion_main!` expand to, written out because the macro's
// generated `pub fn` trips the crate's `missing_docs` lint. The defaults below keep the whole
// run near a minute; command-line flags (`-- --measurement-time 3`) still override them.
fn main() {
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    spsc_64b(&mut criterion);
    criterion.final_summary();
}
