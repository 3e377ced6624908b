//! Storage-layer benchmarks: recovering a million messages and writing batches with flushes, each beside raw sled doing the same I/O.
//!
//! - `recover/recover_1m`: `SledStore::open` + `recover()` of a directory holding 1,000,000
//!   messages (64-byte bodies, default properties) in one queue, written once before the
//!   benchmarks (in batches of 1000, then flushed). Dropping the store and the recovered records
//!   is outside the timed region.
//! - `recover/raw_sled_iter_1m`: the baseline: `sled::Config::open` of the same directory and a
//!   walk over every record, touching each key and value, no decoding.
//! - `write/raw_sled_insert_flush_every_1000`: one `sled::Batch` of 1000 inserts (17-byte keys,
//!   100-byte values) applied, then `flush()` (fsync). Keys and values are built outside the timed
//!   region.
//! - `write/store_apply_flush_every_1000`: `SledStore::apply` of a batch of 1000 `PutMessage`
//!   ops (100-byte bodies) then `flush()`: the raw baseline plus encoding. The ops are built
//!   outside the timed region.
//!
//! - `codec/encode_message_{64B,4KiB}`, `codec/decode_message_{64B,4KiB}`: encoding a message
//!   record's value (what the flusher does for every persistent message it writes) and decoding
//!   it back (what recovery does for every stored message), default properties plus a message
//!   id, bodies copied out on decode.
//!
//! Raw sled is opened with the store's default options (64 MiB cache, flusher every 500 ms).
//!
//! `main` also prints, once: the time of the first open + recover after writing the recovery
//! directory (the restart case, which criterion's warm-up hides), and, after the benchmarks, a
//! directory's size after writing a million messages, after deleting them all and flushing,
//! after reopening, and after writing a million again: whether sled gives space back or reuses
//! it, with sled's flusher thread (which runs its segment cleaner) and without. See
//! BENCHMARKS.md for the figures.
//!
//! Run: `cargo bench --bench store`.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coney::BasicProperties;
use coney::store::{Batch, MessageRecord, Op, SledOptions, SledStore, Store, codec};
use criterion::{BatchSize, Criterion, SamplingMode, Throughput};

/// Messages in the recovery directory.
const RECOVER_N: u64 = 1_000_000;
/// Body size of the recovery messages, in bytes.
const RECOVER_BODY_LEN: usize = 64;
/// Ops per batch (and per flush) everywhere.
const BATCH_LEN: u64 = 1000;
/// Value (raw) or body (store) size of the write benchmarks, in bytes.
const WRITE_VALUE_LEN: usize = 100;
/// The queue id every benchmark writes to.
const QUEUE: u64 = 1;

/// A directory under the system temp dir, removed on drop.
struct BenchDir(PathBuf);

impl BenchDir {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("coney-store-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        Self(path)
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn message(body: &Bytes) -> Arc<MessageRecord> {
    Arc::new(MessageRecord {
        exchange: String::new(),
        routing_key: "q".into(),
        properties: BasicProperties::default(),
        body: body.clone(),
        delivery_count: 0,
        delivered: false,
        enqueued_at_ms: 1_700_000_000_000,
        dead_lettered: false,
        bcc: Vec::new(),
        pending_dead_letter: None,
    })
}

fn open(path: &Path) -> SledStore {
    SledStore::open(path, SledOptions::default()).expect("open the bench store")
}

fn raw_open(path: &Path) -> sled::Db {
    sled::Config::new()
        .path(path)
        .cache_capacity(SledOptions::default().cache_capacity_bytes)
        .flush_every_ms(SledOptions::default().flush_every_ms)
        .open()
        .expect("open the bench dir with raw sled")
}

/// Writes `RECOVER_N` messages to queue `QUEUE` starting at `first_seq`, in batches, flushed.
fn write_million(store: &SledStore, first_seq: u64) {
    let record = message(&Bytes::from(vec![0xA5u8; RECOVER_BODY_LEN]));
    let mut batch = Batch::new();
    for chunk in 0..RECOVER_N / BATCH_LEN {
        batch.clear();
        for i in 0..BATCH_LEN {
            batch.push(Op::PutMessage {
                queue: QUEUE,
                seq: first_seq + chunk * BATCH_LEN + i,
                record: Arc::clone(&record),
            });
        }
        store.apply(&batch).expect("apply");
    }
    store.flush().expect("flush");
}

/// Deletes the million messages from `first_seq` in batches of acks, flushed.
fn delete_million(store: &SledStore, first_seq: u64) {
    let mut batch = Batch::new();
    for chunk in 0..RECOVER_N / BATCH_LEN {
        batch.clear();
        for i in 0..BATCH_LEN {
            batch.push(Op::DeleteMessage {
                queue: QUEUE,
                seq: first_seq + chunk * BATCH_LEN + i,
            });
        }
        store.apply(&batch).expect("apply");
    }
    store.flush().expect("flush");
}

/// Total size of the regular files under `path`, in bytes.
fn dir_bytes(path: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).expect("read the bench dir") {
        let entry = entry.expect("a dir entry");
        let meta = entry.metadata().expect("metadata");
        total += if meta.is_dir() {
            dir_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

fn print_size(what: &str, store: &SledStore, path: &Path, took: Duration) {
    eprintln!(
        "store dir {what:<36} size_on_disk {:>9} MiB, files {:>9} MiB ({:.1} s)",
        mib(store.size_on_disk().expect("size on disk")),
        mib(dir_bytes(path)),
        took.as_secs_f64(),
    );
}

/// `bytes` in MiB with one decimal, in integer arithmetic.
fn mib(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    format!("{}.{}", bytes / MIB, bytes % MIB * 10 / MIB)
}

/// Space experiment: write a million, delete them all, reopen, write a million again; with
/// the given sled flusher period (`None`: no flusher, so no segment cleaning).
fn disk_space_report(flush_every_ms: Option<u64>) {
    let dir = BenchDir::new("space");
    let options = SledOptions {
        flush_every_ms,
        ..SledOptions::default()
    };
    eprintln!("disk space with flush_every_ms = {flush_every_ms:?}:");
    let store = SledStore::open(&dir.0, options).expect("open the bench store");
    let t = Instant::now();
    write_million(&store, 0);
    print_size("after writing 1M x 64 B", &store, &dir.0, t.elapsed());
    let t = Instant::now();
    delete_million(&store, 0);
    print_size(
        "after deleting them all + flush",
        &store,
        &dir.0,
        t.elapsed(),
    );
    drop(store);
    let t = Instant::now();
    let store = SledStore::open(&dir.0, options).expect("reopen the bench store");
    print_size("after reopening", &store, &dir.0, t.elapsed());
    let t = Instant::now();
    write_million(&store, RECOVER_N);
    print_size("after writing another 1M", &store, &dir.0, t.elapsed());
}

fn recover_1m(c: &mut Criterion, path: &Path) {
    let mut group = c.benchmark_group("recover");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(RECOVER_N));
    group.bench_function("recover_1m", |b| {
        b.iter_with_large_drop(|| {
            let store = open(path);
            let recovered = store.recover().expect("recover");
            assert_eq!(recovered.messages[0].messages.len(), 1_000_000);
            (store, recovered)
        })
    });
    group.bench_function("raw_sled_iter_1m", |b| {
        b.iter_with_large_drop(|| {
            let db = raw_open(path);
            let mut n = 0u64;
            let mut bytes = 0usize;
            for item in db.iter() {
                let (key, value) = item.expect("read");
                bytes += key.len() + value.len();
                n += 1;
            }
            assert_eq!(n, RECOVER_N);
            black_box(bytes);
            db
        })
    });
    group.finish();
}

fn writes(c: &mut Criterion) {
    let mut group = c.benchmark_group("write");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(BATCH_LEN));

    let raw_dir = BenchDir::new("raw-write");
    let db = raw_open(&raw_dir.0);
    let value = vec![0x5Au8; WRITE_VALUE_LEN];
    let mut next = 0u64;
    group.bench_function("raw_sled_insert_flush_every_1000", |b| {
        b.iter_batched(
            || {
                let first = next;
                next += BATCH_LEN;
                (first..first + BATCH_LEN)
                    .map(|seq| (codec::message_key(QUEUE, seq), value.clone()))
                    .collect::<Vec<_>>()
            },
            |writes| {
                let mut batch = sled::Batch::default();
                for (key, value) in writes {
                    batch.insert(&key[..], value);
                }
                db.apply_batch(batch).expect("apply");
                db.flush().expect("flush");
            },
            BatchSize::PerIteration,
        )
    });
    drop(db);

    let store_dir = BenchDir::new("store-write");
    let store = open(&store_dir.0);
    let record = message(&Bytes::from(vec![0x5Au8; WRITE_VALUE_LEN]));
    let mut next = 0u64;
    group.bench_function("store_apply_flush_every_1000", |b| {
        b.iter_batched(
            || {
                let first = next;
                next += BATCH_LEN;
                let mut batch = Batch::new();
                for seq in first..first + BATCH_LEN {
                    batch.push(Op::PutMessage {
                        queue: QUEUE,
                        seq,
                        record: Arc::clone(&record),
                    });
                }
                batch
            },
            |batch| {
                store.apply(&batch).expect("apply");
                store.flush().expect("flush");
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn codec_group(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for (name, len) in [("64B", 64), ("4KiB", 4096)] {
        let mut record = MessageRecord::clone(&message(&Bytes::from(vec![0x5Au8; len])));
        record.properties = record.properties.with_message_id("order-1234567");
        group.bench_function(format!("encode_message_{name}"), |b| {
            b.iter(|| codec::encode_message(QUEUE, 42, black_box(&record)).expect("encode"))
        });
        let (key, value) = codec::encode_message(QUEUE, 42, &record).expect("encode");
        group.bench_function(format!("decode_message_{name}"), |b| {
            b.iter(|| {
                codec::decode_message_with(black_box(&key), black_box(&value), |range| {
                    Bytes::copy_from_slice(&value[range])
                })
                .expect("decode")
            })
        });
    }
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    codec_group(&mut criterion);

    // The recovery directory is written first, in a quiet process, as a broker's would be.
    let recover_dir = BenchDir::new("recover");
    {
        let t = Instant::now();
        let store = open(&recover_dir.0);
        write_million(&store, 0);
        print_size("for recover_1m", &store, &recover_dir.0, t.elapsed());
    }
    // The first open after the writer closed is the restart case; criterion's warm-up hides it.
    let t = Instant::now();
    let store = open(&recover_dir.0);
    let recovered = store.recover().expect("recover");
    eprintln!(
        "first open + recover of {} messages after writing them: {} ms",
        recovered.messages[0].messages.len(),
        t.elapsed().as_millis()
    );
    drop((store, recovered));

    recover_1m(&mut criterion, &recover_dir.0);
    writes(&mut criterion);
    criterion.final_summary();

    disk_space_report(SledOptions::default().flush_every_ms);
    disk_space_report(None);
}
