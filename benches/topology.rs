//! Topology costs that must not grow with the topology: declaring many queues (in memory and
//! durable) and routing through a topic binding of many `#` words, each beside an in-run
//! baseline.
//!
//! Groups:
//! - `declare_in_memory`: a fresh in-memory broker declares `N` queues `q0`, `q1`, ... on one
//!   channel; one iteration is the whole run (N = 100,000; also 1,000,000 with
//!   `CONEY_BENCH_TOPOLOGY_1M=1`, about two minutes more). Baseline: inserting the same names
//!   into a `HashMap<String, u64>`. Building and dropping the broker is not timed.
//! - `declare_durable`: one durable declare (each waits for its flush and fsync) into a broker
//!   opened with `Broker::open` on a temp dir that holds `N` durable queues (N = 0 and
//!   100,000, the latter declared once before the timing by 16 threads). Each timed declare is
//!   followed by an untimed delete, so `N` stays put. Baseline: the store alone writing and
//!   flushing one queue record (`SledStore::apply` + `flush`), the floor of a durable declare.
//! - `topic_publish`: one publish through a topic exchange to one queue, purged every 10,000
//!   publishes (untimed). Bindings: `k` with key `k` (baseline); 128 `#` words (the most a
//!   255-byte binding key holds) with keys of 1 and 128 words; 64 `#` words with `k` between
//!   them, with a key of 128 words.
//!
//! Directories live under the system temp dir and are removed at the end.

use std::hint::black_box;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coney::store::{Batch, Op, QueueRecord, SledOptions, SledStore, Store};
use coney::*;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};

/// Queues of the in-memory declare runs.
const IN_MEMORY_N: u64 = 100_000;
/// The large in-memory run, behind `CONEY_BENCH_TOPOLOGY_1M=1`.
const IN_MEMORY_LARGE_N: u64 = 1_000_000;
/// Durable queues the broker holds while one more is declared.
const DURABLE_N: u64 = 100_000;
/// Threads declaring the durable queues before the timing (they share flushes).
const DURABLE_SETUP_THREADS: u64 = 16;
/// Publishes between two (untimed) purges of the topic queue.
const PURGE_EVERY: u64 = 10_000;

fn names(n: u64) -> Vec<String> {
    (0..n).map(|i| format!("q{i}")).collect()
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "coney-bench-topology-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn limits(max_queues: u64) -> Limits {
    Limits {
        max_queues: u32::try_from(max_queues + 1_000).expect("bench sizes fit in u32"),
        ..Limits::default()
    }
}

// ---- declare, in memory ---------------------------------------------------------------------

fn declare_in_memory(c: &mut Criterion) {
    let mut sizes = vec![IN_MEMORY_N];
    if std::env::var_os("CONEY_BENCH_TOPOLOGY_1M").is_some_and(|v| v == "1") {
        sizes.push(IN_MEMORY_LARGE_N);
    }
    let mut group = c.benchmark_group("declare_in_memory");
    group.sampling_mode(SamplingMode::Flat);
    for n in sizes {
        let names = names(n);
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(
            BenchmarkId::new("hashmap_baseline", n),
            &names,
            |b, names| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let mut map = std::collections::HashMap::new();
                        let start = Instant::now();
                        for (i, name) in (0u64..).zip(names) {
                            map.insert(name.clone(), i);
                        }
                        total += start.elapsed();
                        assert_eq!(map.len(), names.len());
                    }
                    total
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("coney", n), &names, |b, names| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let broker = Broker::builder().limits(limits(n)).in_memory();
                    let conn = broker.connect();
                    let ch = conn.channel().expect("a new connection opens a channel");
                    let start = Instant::now();
                    for name in names {
                        ch.queue_declare(name, QueueDeclareOptions::default(), FieldTable::new())
                            .expect("declare under the queue limit");
                    }
                    total += start.elapsed();
                    let last = ch
                        .queue_declare(
                            &names[names.len() - 1],
                            QueueDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                            FieldTable::new(),
                        )
                        .expect("the last queue exists");
                    black_box(last);
                }
                total
            })
        });
    }
    group.finish();
}

// ---- declare, durable -----------------------------------------------------------------------

/// A durable broker on a fresh temp dir holding `n` durable queues `q0..qn`.
fn durable_broker(tag: &str, n: u64) -> (Broker, PathBuf) {
    let path = dir(tag);
    let broker = Broker::builder()
        .limits(limits(n))
        .open(&path)
        .expect("opening a fresh temp dir");
    let start = Instant::now();
    thread::scope(|s| {
        for t in 0..DURABLE_SETUP_THREADS {
            let broker = broker.clone();
            s.spawn(move || {
                let conn = broker.connect();
                let ch = conn.channel().expect("a new connection opens a channel");
                for i in (t..n).step_by(DURABLE_SETUP_THREADS as usize) {
                    ch.queue_declare(&format!("q{i}"), durable(), FieldTable::new())
                        .expect("durable declare");
                }
            });
        }
    });
    eprintln!(
        "declare_durable: {n} durable queues declared by {DURABLE_SETUP_THREADS} threads in {:.1?} (setup)",
        start.elapsed()
    );
    (broker, path)
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn declare_durable(c: &mut Criterion) {
    let mut group = c.benchmark_group("declare_durable");
    group.throughput(Throughput::Elements(1));

    let store_dir = dir("store");
    let mut store: Option<SledStore> = None;
    let mut next_id = 1u64;
    group.bench_function("store_put_flush_baseline", |b| {
        let store = store.get_or_insert_with(|| {
            SledStore::open(&store_dir, SledOptions::default()).expect("opening the store")
        });
        b.iter(|| {
            let mut batch = Batch::new();
            batch.push(Op::PutQueue(QueueRecord {
                id: next_id,
                name: format!("extra{next_id}"),
                auto_delete: false,
                arguments: FieldTable::new(),
            }));
            next_id += 1;
            store.apply(&batch).expect("store write");
            store.flush().expect("store flush");
        })
    });
    drop(store);
    let _ = std::fs::remove_dir_all(&store_dir);

    for n in [0, DURABLE_N] {
        // Built on first use, so that a run filtered to other benchmarks skips the setup.
        let mut fixture: Option<(Broker, PathBuf, Connection, Channel)> = None;
        let mut extra = 0u64;
        group.bench_function(BenchmarkId::new("coney", n), |b| {
            let (_, _, _, ch) = fixture.get_or_insert_with(|| {
                let (broker, path) = durable_broker(&format!("declare-{n}"), n);
                let conn = broker.connect();
                let ch = conn.channel().expect("a new connection opens a channel");
                (broker, path, conn, ch)
            });
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let name = format!("extra{extra}");
                    extra += 1;
                    let start = Instant::now();
                    ch.queue_declare(&name, durable(), FieldTable::new())
                        .expect("durable declare");
                    total += start.elapsed();
                    ch.queue_delete(&name, QueueDeleteOptions::default())
                        .expect("delete");
                }
                total
            })
        });
        if let Some((broker, path, conn, ch)) = fixture {
            drop((ch, conn, broker));
            let _ = std::fs::remove_dir_all(&path);
        }
    }
    group.finish();
}

// ---- topic publish --------------------------------------------------------------------------

/// A broker with topic exchange `t` bound to queue `q` with `pattern`, and a channel on it.
struct TopicFixture {
    _broker: Broker,
    _conn: Connection,
    ch: Channel,
    body: Bytes,
}

impl TopicFixture {
    fn new(pattern: &str) -> Self {
        let broker = Broker::in_memory();
        let conn = broker.connect();
        let ch = conn.channel().expect("a new connection opens a channel");
        ch.exchange_declare(
            "t",
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::new(),
        )
        .expect("declare t");
        ch.queue_declare("q", QueueDeclareOptions::default(), FieldTable::new())
            .expect("declare q");
        ch.queue_bind(
            "q",
            "t",
            pattern,
            QueueBindOptions::default(),
            FieldTable::new(),
        )
        .expect("bind q");
        Self {
            _broker: broker,
            _conn: conn,
            ch,
            body: Bytes::from_static(&[0xA5; 64]),
        }
    }

    /// Publishes `iters` messages with `key`, timing only the publishes; checks they all
    /// reached the queue.
    fn run(&self, key: &str, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let batch = left.min(PURGE_EVERY);
            let start = Instant::now();
            for _ in 0..batch {
                self.ch
                    .basic_publish(
                        "t",
                        key,
                        BasicPublishOptions::default(),
                        self.body.clone(),
                        BasicProperties::default(),
                    )
                    .expect("publish");
            }
            total += start.elapsed();
            let purged = self
                .ch
                .queue_purge("q", QueuePurgeOptions::default())
                .expect("purge");
            assert_eq!(
                u64::from(purged),
                batch,
                "every publish matched the binding"
            );
            left -= batch;
        }
        total
    }
}

fn topic_publish(c: &mut Criterion) {
    let hashes_128 = vec!["#"; 128].join(".");
    let hashes_64_between = (0..127)
        .map(|i| if i % 2 == 0 { "#" } else { "k" })
        .collect::<Vec<_>>()
        .join(".");
    let key_128 = vec!["k"; 128].join(".");
    let cases: [(&str, &str, &str); 4] = [
        ("one_word_baseline", "k", "k"),
        ("hashes_128/key_1_word", &hashes_128, "k"),
        ("hashes_128/key_128_words", &hashes_128, &key_128),
        (
            "hashes_64_between_words/key_128_words",
            &hashes_64_between,
            &key_128,
        ),
    ];
    let mut group = c.benchmark_group("topic_publish");
    group.throughput(Throughput::Elements(1));
    for (id, pattern, key) in cases {
        assert!(
            pattern.len() <= 255 && key.len() <= 255,
            "AMQP short strings"
        );
        let mut fixture: Option<TopicFixture> = None;
        group.bench_function(id, |b| {
            let fixture = fixture.get_or_insert_with(|| TopicFixture::new(pattern));
            b.iter_custom(|iters| fixture.run(key, iters))
        });
    }
    group.finish();
}

// What `criterion_group!` / `criterion_main!` expand to, written out because the macro's
// generated `pub fn` trips the crate's `missing_docs` lint. Command-line flags still override
// the defaults.
fn main() {
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    declare_in_memory(&mut criterion);
    declare_durable(&mut criterion);
    topic_publish(&mut criterion);
    criterion.final_summary();
}
