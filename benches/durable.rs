//! Durable-path throughput of coney beside raw sled loops and the in-memory broker, in one run.
//!
//! Groups (each `Throughput::Elements`, messages per iteration in the id):
//! - `publish_confirm_64B`: one publisher, persistent messages to a durable queue, confirm mode,
//!   waiting for all confirms at the end; coney in group-commit and periodic modes, the
//!   in-memory broker, and the raw sled baselines inserting the same number of 100-byte records
//!   flushing every 1,000, with and without an `fdatasync` of sled's log after each flush (coney's
//!   flush ends with one, since sled's own stops at `sync_file_range`).
//! - `per_message_flush_64B`: a publisher waiting for each confirm (flush per message mode)
//!   beside raw sled loops inserting then flushing each record, with and without the
//!   `fdatasync`.
//! - `spsc_persistent_{64B,4KiB}`: a producer thread publishing persistent messages with
//!   confirms to a durable queue, the bench thread consuming with manual ack (each message);
//!   durable (group commit) beside in-memory.
//! - `recovery`: opening a broker whose store holds 1,000,000 persistent 64-byte messages,
//!   beside a raw sled iteration over 1,000,000 records.
//!
//! - with `CONEY_BENCH_DISK=1`: the store's size on disk every 250,000 of 1,000,000 publish+ack
//!   cycles with a backlog of 1,000, and before and after a backlog of 1,000,000 drains, then
//!   after a compaction on demand (and its time); the same backlog drained but for 100,000
//!   messages, compacted; and once more with the broker's own compaction, how long after the
//!   drain the directory is small again (printed, untimed by criterion).
//!   `CONEY_BENCH_DISK_CYCLES` and `CONEY_BENCH_DISK_BACKLOG` change the two counts.
//!
//! Directories live under the system temp dir and are removed at the end.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coney::runtime::Durability;
use coney::*;
use criterion::{BenchmarkId, Criterion, Throughput};

const PUBLISH_N: u64 = 20_000;
const PER_MESSAGE_N: u64 = 500;
const SPSC_N: u64 = 50_000;
const RECOVERY_N: u64 = 1_000_000;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("coney-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Opens a sled directory, retrying while another handle in this process still holds its lock.
fn open_raw(path: &Path) -> sled::Db {
    let start = Instant::now();
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                eprintln!("raw sled open of {}: {e}; retrying", path.display());
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("opening {}: {e}", path.display()),
        }
    }
}

/// sled's log file, for baselines that bring sled's flush to stable storage as coney's store
/// does (`sled::Db::flush` stops at `sync_file_range`): an `fdatasync` after each flush.
struct LogFile(Option<std::fs::File>);

impl LogFile {
    fn open(sled_dir: &Path, fsync: bool) -> Self {
        Self(fsync.then(|| std::fs::File::open(sled_dir.join("db")).unwrap()))
    }

    fn sync(&self) {
        if let Some(file) = &self.0 {
            file.sync_data().unwrap();
        }
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// A broker, a channel in confirm mode and an empty durable queue `q`.
struct Rig {
    broker: Broker,
    _conn: Connection,
    ch: Channel,
}

impl Rig {
    fn new(broker: Broker) -> Self {
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
        ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
        Self {
            broker,
            _conn: conn,
            ch,
        }
    }

    /// Empties `q` and waits until its records are gone (outside the timed region).
    fn reset(&self) {
        self.ch
            .queue_purge("q", QueuePurgeOptions::default())
            .unwrap();
        self.broker.sync().unwrap();
    }
}

fn durable_broker(path: &Path, mode: Durability) -> Broker {
    Broker::builder().durability(mode).open(path).unwrap()
}

fn publish_confirm(c: &mut Criterion) {
    let body = Bytes::from(vec![0x5Au8; 64]);
    let mut g = c.benchmark_group("publish_confirm_64B");
    g.throughput(Throughput::Elements(PUBLISH_N));
    g.sample_size(10);
    for fsync in [false, true] {
        let name = if fsync {
            "raw_sled_insert_flush_fdatasync_every_1000"
        } else {
            "raw_sled_insert_flush_every_1000"
        };
        g.bench_function(BenchmarkId::new(name, PUBLISH_N), |b| {
            let path = dir(name);
            let db = sled::open(&path).unwrap();
            let log = LogFile::open(&path, fsync);
            let value = vec![0x5Au8; 100];
            let mut key = 0u64;
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    for i in 0..PUBLISH_N {
                        db.insert(key.to_be_bytes(), value.as_slice()).unwrap();
                        key += 1;
                        if (i + 1) % 1000 == 0 {
                            db.flush().unwrap();
                            log.sync();
                        }
                    }
                    db.flush().unwrap();
                    log.sync();
                }
                start.elapsed()
            });
            drop(db);
            let _ = std::fs::remove_dir_all(&path);
        });
    }
    let modes = [
        ("coney_group_commit", Some(Durability::GroupCommit)),
        (
            "coney_periodic_500ms",
            Some(Durability::Periodic { every_ms: 500 }),
        ),
        ("coney_in_memory", None),
    ];
    for (name, mode) in modes {
        g.bench_function(BenchmarkId::new(name, PUBLISH_N), |b| {
            let path = dir(name);
            let rig = Rig::new(match mode {
                Some(m) => durable_broker(&path, m),
                None => Broker::in_memory(),
            });
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    for _ in 0..PUBLISH_N {
                        rig.ch
                            .basic_publish("", "q", Default::default(), body.clone(), persistent())
                            .unwrap();
                    }
                    assert!(rig.ch.wait_for_confirms().unwrap());
                    total += start.elapsed();
                    rig.reset();
                }
                total
            });
            drop(rig);
            let _ = std::fs::remove_dir_all(&path);
        });
    }
    g.finish();
}

fn per_message_flush(c: &mut Criterion) {
    let body = Bytes::from(vec![0x5Au8; 64]);
    let mut g = c.benchmark_group("per_message_flush_64B");
    g.throughput(Throughput::Elements(PER_MESSAGE_N));
    g.sample_size(10);
    for fsync in [false, true] {
        let name = if fsync {
            "raw_sled_insert_flush_fdatasync_each"
        } else {
            "raw_sled_insert_flush_each"
        };
        g.bench_function(BenchmarkId::new(name, PER_MESSAGE_N), |b| {
            let path = dir(name);
            let db = sled::open(&path).unwrap();
            let log = LogFile::open(&path, fsync);
            let value = vec![0x5Au8; 100];
            let mut key = 0u64;
            b.iter(|| {
                for _ in 0..PER_MESSAGE_N {
                    db.insert(key.to_be_bytes(), value.as_slice()).unwrap();
                    db.flush().unwrap();
                    log.sync();
                    key += 1;
                }
            });
            drop(db);
            let _ = std::fs::remove_dir_all(&path);
        });
    }
    g.bench_function(BenchmarkId::new("coney_per_message", PER_MESSAGE_N), |b| {
        let path = dir("per-message");
        let rig = Rig::new(durable_broker(&path, Durability::PerMessage));
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                for _ in 0..PER_MESSAGE_N {
                    rig.ch
                        .basic_publish("", "q", Default::default(), body.clone(), persistent())
                        .unwrap();
                    assert!(rig.ch.wait_for_confirms().unwrap());
                }
                total += start.elapsed();
                rig.reset();
            }
            total
        });
        drop(rig);
        let _ = std::fs::remove_dir_all(&path);
    });
    g.finish();
}

fn spsc_persistent(c: &mut Criterion) {
    for (label, size) in [("64B", 64usize), ("4KiB", 4096)] {
        let body = Bytes::from(vec![0x5Au8; size]);
        let mut g = c.benchmark_group(format!("spsc_persistent_{label}"));
        g.throughput(Throughput::Elements(SPSC_N));
        g.sample_size(10);
        for (name, durable_mode) in [("coney_group_commit", true), ("coney_in_memory", false)] {
            g.bench_function(BenchmarkId::new(name, SPSC_N), |b| {
                let path = dir(&format!("spsc-{label}-{name}"));
                let broker = if durable_mode {
                    durable_broker(&path, Durability::GroupCommit)
                } else {
                    Broker::in_memory()
                };
                let rig = Rig::new(broker);
                let consumer_ch = rig._conn.channel().unwrap();
                consumer_ch
                    .basic_qos(1000, BasicQosOptions::default())
                    .unwrap();
                let mut consumer = consumer_ch
                    .basic_consume("q", "", BasicConsumeOptions::default(), FieldTable::new())
                    .unwrap();
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        thread::scope(|s| {
                            s.spawn(|| {
                                for _ in 0..SPSC_N {
                                    rig.ch
                                        .basic_publish(
                                            "",
                                            "q",
                                            Default::default(),
                                            body.clone(),
                                            persistent(),
                                        )
                                        .unwrap();
                                }
                                assert!(rig.ch.wait_for_confirms().unwrap());
                            });
                            for _ in 0..SPSC_N {
                                let d = consumer.recv().unwrap();
                                black_box(d.body().len());
                                d.ack(BasicAckOptions::default()).unwrap();
                            }
                        });
                    }
                    start.elapsed()
                });
                rig.broker.sync().unwrap();
                drop(consumer);
                drop(rig);
                let _ = std::fs::remove_dir_all(&path);
            });
        }
        g.finish();
    }
}

fn recovery(c: &mut Criterion) {
    let mut g = c.benchmark_group("recovery");
    g.throughput(Throughput::Elements(RECOVERY_N));
    g.sample_size(10);
    let path = dir("recovery");
    {
        let rig = Rig::new(durable_broker(&path, Durability::GroupCommit));
        let body = Bytes::from(vec![0x5Au8; 64]);
        for _ in 0..RECOVERY_N {
            rig.ch
                .basic_publish("", "q", Default::default(), body.clone(), persistent())
                .unwrap();
        }
        assert!(rig.ch.wait_for_confirms().unwrap());
        eprintln!(
            "recovery: {} messages, {} bytes on disk",
            RECOVERY_N,
            rig.broker.size_on_disk().unwrap()
        );
    }
    // Each iteration first opens and closes the directory untimed (sled's open after another
    // process's writes replays its log once), then times a fresh open.
    g.bench_function(BenchmarkId::new("raw_sled_iterate", RECOVERY_N), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                drop(open_raw(&path));
                thread::sleep(Duration::from_millis(200));
                let start = Instant::now();
                let db = sled::open(&path).unwrap();
                let mut n = 0u64;
                for kv in db.iter() {
                    let (k, v) = kv.unwrap();
                    n += (k.len() + v.len()) as u64;
                }
                black_box(n);
                total += start.elapsed();
                drop(db);
            }
            total
        });
    });
    g.bench_function(BenchmarkId::new("coney_open", RECOVERY_N), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                drop(open_raw(&path));
                thread::sleep(Duration::from_millis(200));
                let start = Instant::now();
                let broker = Broker::open(&path).unwrap();
                let conn = broker.connect();
                let ch = conn.channel().unwrap();
                let ok = ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
                total += start.elapsed();
                assert_eq!(u64::from(ok.message_count), RECOVERY_N);
                // Dropping a broker holding 1M messages is not recovery: untimed.
                drop((ch, conn, broker));
            }
            total
        });
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&path);
}

/// Publishes `n` persistent 64-byte messages to `q`.
fn publish_n(rig: &Rig, n: u64) {
    let body = Bytes::from(vec![0x5Au8; 64]);
    for _ in 0..n {
        rig.ch
            .basic_publish("", "q", Default::default(), body.clone(), persistent())
            .unwrap();
    }
}

/// Fetches and acks `n` messages of `q`.
fn take_n(rig: &Rig, n: u64) {
    for _ in 0..n {
        let g = rig
            .ch
            .basic_get("q", BasicGetOptions::default())
            .unwrap()
            .unwrap();
        g.delivery.ack(BasicAckOptions::default()).unwrap();
    }
}

fn mib(broker: &Broker) -> f64 {
    broker.size_on_disk().unwrap() as f64 / (1024.0 * 1024.0)
}

/// Every file under `path` (all generations, leftovers included), in MiB.
fn dir_mib(path: &Path) -> f64 {
    fn bytes(path: &Path) -> u64 {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|entry| match entry.metadata() {
                        Ok(meta) if meta.is_dir() => bytes(&entry.path()),
                        Ok(meta) => meta.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    bytes(path) as f64 / (1024.0 * 1024.0)
}

/// Not a timed benchmark: the store directory's size under a steady publish+ack stream with a
/// backlog of 1,000 by default (checking nothing acked is left behind by reopening), and before and after
/// a backlog as large as the stream drains (printed).
fn disk_space() {
    let cycles: u64 = std::env::var("CONEY_BENCH_DISK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let backlog: u64 = std::env::var("CONEY_BENCH_DISK_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let path = dir("disk");
    let rig = Rig::new(durable_broker(&path, Durability::GroupCommit));
    let start = Instant::now();
    publish_n(&rig, backlog);
    for i in 0..cycles {
        publish_n(&rig, 1);
        take_n(&rig, 1);
        if (i + 1) % 250_000 == 0 {
            rig.broker.sync().unwrap();
            eprintln!(
                "disk: {} publish+ack cycles over a backlog of {backlog}: {:.1} MiB",
                i + 1,
                mib(&rig.broker)
            );
        }
    }
    take_n(&rig, backlog);
    rig.broker.sync().unwrap();
    eprintln!(
        "disk: steady stream done in {:?}, queue empty: {:.1} MiB",
        start.elapsed(),
        mib(&rig.broker)
    );
    drop(rig);
    let rig = Rig::new(durable_broker(&path, Durability::GroupCommit));
    let left = rig
        .ch
        .queue_declare("q", durable(), FieldTable::new())
        .unwrap()
        .message_count;
    assert_eq!(left, 0, "acked messages came back");
    eprintln!(
        "disk: reopened: nothing recovered, {:.1} MiB",
        mib(&rig.broker)
    );
    drop(rig);
    // The backlog, with compaction on demand only (the broker's own is off, so the sizes
    // before are sled's alone).
    let manual = |path: &Path| Rig::new(Broker::builder().auto_compact(false).open(path).unwrap());
    let rig = manual(&path);
    publish_n(&rig, cycles);
    assert!(rig.ch.wait_for_confirms().unwrap());
    eprintln!("disk: backlog of {cycles}: {:.1} MiB", mib(&rig.broker));
    take_n(&rig, cycles);
    rig.broker.sync().unwrap();
    eprintln!(
        "disk: after the backlog drained: {:.1} MiB (directory {:.1} MiB)",
        mib(&rig.broker),
        dir_mib(&path)
    );
    thread::sleep(Duration::from_secs(2)); // a few rounds of sled's own flusher (space reclaim)
    eprintln!("disk: 2 s later: {:.1} MiB", mib(&rig.broker));
    let stats = rig.broker.compact_store().unwrap();
    eprintln!(
        "disk: compacted in {:?} (locks held {:?}): {} records, {} bytes live; {:.0} KiB \
         (directory {:.0} KiB)",
        stats.took,
        stats.pause,
        stats.records,
        stats.live_bytes,
        mib(&rig.broker) * 1024.0,
        dir_mib(&path) * 1024.0
    );
    // The same backlog drained but for a tenth: what a compaction of that many costs.
    let left = cycles / 10;
    publish_n(&rig, cycles);
    assert!(rig.ch.wait_for_confirms().unwrap());
    take_n(&rig, cycles - left);
    rig.broker.sync().unwrap();
    let before = mib(&rig.broker);
    let stats = rig.broker.compact_store().unwrap();
    eprintln!(
        "disk: backlog of {cycles} drained to {left}: {before:.1} MiB; compacted in {:?} (locks \
         held {:?}): {} records, {:.1} MiB live; {:.1} MiB (directory {:.1} MiB)",
        stats.took,
        stats.pause,
        stats.records,
        stats.live_bytes as f64 / (1024.0 * 1024.0),
        mib(&rig.broker),
        dir_mib(&path)
    );
    take_n(&rig, left);
    rig.broker.sync().unwrap();
    drop(rig);
    // The broker's own compaction: how long after the drain the store is small again.
    let rig = Rig::new(durable_broker(&path, Durability::GroupCommit));
    publish_n(&rig, cycles);
    assert!(rig.ch.wait_for_confirms().unwrap());
    eprintln!(
        "disk: automatic: backlog of {cycles}: {:.1} MiB",
        mib(&rig.broker)
    );
    take_n(&rig, cycles);
    rig.broker.sync().unwrap();
    let drained = Instant::now();
    let peak = dir_mib(&path);
    while dir_mib(&path) > 1.0 && drained.elapsed() < Duration::from_secs(60) {
        thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "disk: automatic: drained at {peak:.1} MiB (directory), {:.0} KiB (directory {:.0} KiB) \
         {:?} later",
        mib(&rig.broker) * 1024.0,
        dir_mib(&path) * 1024.0,
        drained.elapsed()
    );
    drop(rig);
    let _ = std::fs::remove_dir_all(&path);
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    if std::env::var("CONEY_BENCH_DISK").is_ok() {
        disk_space();
    }
    publish_confirm(&mut c);
    per_message_flush(&mut c);
    spsc_persistent(&mut c);
    recovery(&mut c);
    c.final_summary();
}
