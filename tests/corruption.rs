//! Damage to a closed store never panics and never changes data silently: every damaged copy
//! either fails to open with a typed error or recovers exactly what the undamaged store holds
//! (DESIGN.md "Durability").
//!
//! One store is built through the public API (durable exchanges, queues and bindings,
//! persistent messages, one of them large enough for sled to keep in a blob file, some acked,
//! some returned), closed, and read back once through [`SledStore::open`] + [`Store::recover`]:
//! that is the expected state. Every test runs on two such stores: one as built (generation 0,
//! sled's files in the store directory), and one compacted twice halfway through its building
//! (`CURRENT` naming `gen-2`, which holds the files, and its own commit file). Each trial copies the directory, damages the copy (flips one
//! random bit of a random byte of a random file; cuts `db` at a random length; deletes one
//! file), then opens it twice, on two copies of the same damage: with `SledStore::open` +
//! `recover`, and with `Broker::open` (whose recovered state is read back through the store
//! after the broker is dropped). Each must give a typed error or exactly the expected state. A
//! panic that reaches the trial, or one in a thread the store does not guard, fails it (a panic
//! hook sees them all).
//!
//! `cargo test` runs a seeded sample (40 flips, 20 cuts, every file deleted) on each store.
//! `CONEY_CORRUPTION_TRIALS=N` runs N flips and N/2 cuts; `CONEY_CORRUPTION_SEED=S` changes the
//! seed. A failing trial prints its seed and index and what it damaged; the base store comes
//! from a live broker and its bytes differ between runs, so a trial replays exactly only with
//! the base it was run on (kept when `CONEY_CORRUPTION_KEEP` is set).

mod common;

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, Once, OnceLock};

use common::TempDir;
use coney::store::{Recovered, SledOptions, SledStore, Store};
use coney::*;

/// Flips per `cargo test` run.
const FLIPS_DEFAULT: u64 = 40;
/// Cuts of `db` per `cargo test` run.
const CUTS_DEFAULT: u64 = 20;
/// The seed unless `CONEY_CORRUPTION_SEED` says otherwise.
const SEED_DEFAULT: u64 = 0x5eed_c0de;

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn a_flipped_bit_is_a_typed_error_or_changes_nothing() {
    let _serial = serial();
    for layout in LAYOUTS {
        flip_bits(layout);
    }
}

fn flip_bits(layout: Layout) {
    let base = base(layout);
    let trials = trials(FLIPS_DEFAULT);
    let seed = seed();
    let mut tally = Tally::default();
    for index in 0..trials {
        let mut rng = Rng::new(seed, index);
        let index_of_file = usize::try_from(rng.below(len_u64(base.files.len()))).unwrap();
        let len = base.file_len(index_of_file);
        if len == 0 {
            continue;
        }
        let file = base.files[index_of_file].0.clone();
        let offset = rng.below(len);
        let bit = rng.below(8) as u8;
        let damage = Damage::Flip { file, offset, bit };
        tally.add(base, seed, index, damage);
    }
    tally.finish(&format!("{layout:?}: flip one bit"));
}

#[test]
fn a_cut_log_is_a_typed_error_or_changes_nothing() {
    let _serial = serial();
    for layout in LAYOUTS {
        cut_log(layout);
    }
}

fn cut_log(layout: Layout) {
    let base = base(layout);
    let trials = trials(FLIPS_DEFAULT) * CUTS_DEFAULT / FLIPS_DEFAULT;
    let seed = seed();
    let log = layout.log();
    let db = base
        .files
        .iter()
        .position(|(name, _)| *name == log)
        .expect("the store has a db file");
    let db_len = base.file_len(db);
    let mut tally = Tally::default();
    for index in 0..trials {
        let mut rng = Rng::new(seed ^ 0xc07, index);
        let damage = Damage::Cut {
            file: log.clone(),
            len: rng.below(db_len),
        };
        tally.add(base, seed ^ 0xc07, index, damage);
    }
    tally.finish(&format!("{layout:?}: cut db"));
}

#[test]
fn a_deleted_file_is_a_typed_error_or_changes_nothing() {
    let _serial = serial();
    for layout in LAYOUTS {
        delete_files(layout);
    }
}

fn delete_files(layout: Layout) {
    let base = base(layout);
    let mut tally = Tally::default();
    for (index, (file, _)) in base.files.iter().enumerate() {
        let damage = Damage::Delete { file: file.clone() };
        tally.add(base, 0, len_u64(index), damage);
    }
    tally.finish(&format!("{layout:?}: delete a file"));
}

#[test]
fn the_undamaged_copy_recovers_everything_through_both_paths() {
    let _serial = serial();
    for layout in LAYOUTS {
        let base = base(layout);
        let dir = kept_dir("intact");
        base.write_to(dir.path());
        assert_eq!(open_and_recover(base, dir.path()), Outcome::Same);
        let dir = kept_dir("intact-broker");
        base.write_to(dir.path());
        assert_eq!(open_broker(base, dir.path()), Outcome::Same);
    }
}

/// The two stores every test damages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// As built: generation 0.
    Flat,
    /// Compacted twice while built: `gen-2`.
    Compacted,
}

const LAYOUTS: [Layout; 2] = [Layout::Flat, Layout::Compacted];

impl Layout {
    /// The log file, relative to the store directory.
    fn log(self) -> PathBuf {
        match self {
            Layout::Flat => PathBuf::from("db"),
            Layout::Compacted => PathBuf::from("gen-2/db"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Trials

/// One way of damaging a copy.
#[derive(Clone, Debug)]
enum Damage {
    /// Flip bit `bit` of the byte at `offset` of `file` (relative to the store directory).
    Flip { file: PathBuf, offset: u64, bit: u8 },
    /// Cut the log `file` (relative to the store directory) to `len` bytes.
    Cut { file: PathBuf, len: u64 },
    /// Delete `file`.
    Delete { file: PathBuf },
}

impl Damage {
    fn apply(&self, dir: &Path) {
        match self {
            Damage::Flip { file, offset, bit } => {
                let path = dir.join(file);
                let mut bytes = std::fs::read(&path).unwrap();
                bytes[usize::try_from(*offset).unwrap()] ^= 1 << bit;
                std::fs::write(&path, bytes).unwrap();
            }
            Damage::Cut { file, len } => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join(file))
                    .unwrap();
                file.set_len(*len).unwrap();
            }
            Damage::Delete { file } => std::fs::remove_file(dir.join(file)).unwrap(),
        }
    }
}

/// What opening a damaged copy gave.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// Exactly the expected state.
    Same,
    /// A typed error (its text).
    Refused(String),
    /// It opened with other data (what differs).
    Changed(String),
    /// Something panicked (the panic messages).
    Panicked(String),
}

/// Outcomes of a group of trials.
#[derive(Default)]
struct Tally {
    /// (path, outcome kind) -> count.
    counts: BTreeMap<(&'static str, &'static str), u64>,
    failures: Vec<String>,
}

impl Tally {
    /// Runs one trial: the damage on two copies, each opened one way.
    fn add(&mut self, base: &Base, seed: u64, index: u64, damage: Damage) {
        let store_copy = kept_dir("trial-store");
        base.write_to(store_copy.path());
        damage.apply(store_copy.path());
        let broker_copy = kept_dir("trial-broker");
        base.write_to(broker_copy.path());
        damage.apply(broker_copy.path());
        for (path, outcome) in [
            ("store", open_and_recover(base, store_copy.path())),
            ("broker", open_broker(base, broker_copy.path())),
        ] {
            let kind = match &outcome {
                Outcome::Same => "same",
                Outcome::Refused(_) => "typed error",
                Outcome::Changed(_) => "CHANGED",
                Outcome::Panicked(_) => "PANICKED",
            };
            *self.counts.entry((path, kind)).or_default() += 1;
            if matches!(outcome, Outcome::Changed(_) | Outcome::Panicked(_)) {
                self.failures.push(format!(
                    "seed {seed:#x} trial {index} ({path}): {damage:?}: {outcome:?}"
                ));
            }
        }
    }

    fn finish(self, what: &str) {
        eprintln!("{what}: {:?}", self.counts);
        assert!(
            self.failures.is_empty(),
            "{what}: {} of the trials panicked or changed data:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

/// Opens the copy with `SledStore::open` and recovers it, under `catch_unwind`.
fn open_and_recover(base: &Base, dir: &Path) -> Outcome {
    let expected = &base.expected;
    guarded(|| {
        let store = match SledStore::open(dir, SledOptions::default()) {
            Ok(store) => store,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        match store.recover() {
            Ok(recovered) => compare(expected, &recovered),
            Err(e) => Outcome::Refused(e.to_string()),
        }
    })
}

/// Opens the copy with `Broker::open`, drops the broker and reads the store back.
fn open_broker(base: &Base, dir: &Path) -> Outcome {
    let expected = &base.expected;
    guarded(|| {
        match Broker::open(dir) {
            Ok(broker) => drop(broker),
            Err(Error::Storage(e)) => return Outcome::Refused(e.to_string()),
            Err(other) => return Outcome::Changed(format!("not a storage error: {other}")),
        }
        let store = match SledStore::open(dir, SledOptions::default()) {
            Ok(store) => store,
            Err(e) => return Outcome::Changed(format!("opened once, then not: {e}")),
        };
        match store.recover() {
            Ok(recovered) => compare(expected, &recovered),
            Err(e) => Outcome::Changed(format!("opened once, then not: {e}")),
        }
    })
}

/// Runs `open` under `catch_unwind`. `Panicked` if a panic reaches it, or if any thread but
/// this one and the store's recovery reader panicked meanwhile: a panic inside sled on those two
/// is the store's to catch and report as a typed error (the outcome says whether it did), one on
/// another thread (sled's own) is caught by nobody.
fn guarded(open: impl FnOnce() -> Outcome) -> Outcome {
    let this = format!(
        "thread {}:",
        std::thread::current().name().unwrap_or("unnamed")
    );
    let before = panics().lock().unwrap().len();
    let outcome = catch_unwind(AssertUnwindSafe(open));
    let messages = panics().lock().unwrap().split_off(before);
    let elsewhere: Vec<&String> = messages
        .iter()
        .filter(|m| !m.starts_with(&this) && !m.starts_with("thread coney-recover:"))
        .collect();
    match outcome {
        Ok(outcome) if elsewhere.is_empty() => outcome,
        _ => Outcome::Panicked(messages.join("; ")),
    }
}

/// `Same`, or `Changed` with a summary of the difference.
fn compare(expected: &Recovered, got: &Recovered) -> Outcome {
    if expected == got {
        return Outcome::Same;
    }
    let counts = |r: &Recovered| {
        let messages: Vec<(u64, usize)> = r
            .messages
            .iter()
            .map(|q| (q.queue, q.messages.len()))
            .collect();
        format!(
            "{} exchanges, {} queues, {} bindings, messages {messages:?}",
            r.exchanges.len(),
            r.queues.len(),
            r.bindings.len()
        )
    };
    Outcome::Changed(format!(
        "expected {}, got {}",
        counts(expected),
        counts(got)
    ))
}

// ---------------------------------------------------------------------------------------------
// The base store

/// The undamaged store, built once per test binary and kept in memory.
struct Base {
    /// Every file (path relative to the store directory) and its bytes.
    files: Vec<(PathBuf, Vec<u8>)>,
    expected: Recovered,
}

impl Base {
    /// Writes the store into `dir`.
    fn write_to(&self, dir: &Path) {
        for (rel, bytes) in &self.files {
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().expect("a file has a parent")).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
    }

    fn file_len(&self, index: usize) -> u64 {
        len_u64(self.files[index].1.len())
    }
}

fn base(layout: Layout) -> &'static Base {
    static FLAT: OnceLock<Base> = OnceLock::new();
    static COMPACTED: OnceLock<Base> = OnceLock::new();
    let cell = match layout {
        Layout::Flat => &FLAT,
        Layout::Compacted => &COMPACTED,
    };
    cell.get_or_init(|| {
        let dir = kept_dir("base");
        if std::env::var_os("CONEY_CORRUPTION_KEEP").is_some() {
            eprintln!("{layout:?} base store: {}", dir.path().display());
        }
        build(dir.path(), layout);
        assert!(
            dir.path().join(layout.log()).exists(),
            "{layout:?}: the log is at {}",
            layout.log().display()
        );
        let files = files(dir.path())
            .into_iter()
            .map(|rel| {
                let bytes = std::fs::read(dir.path().join(&rel)).unwrap();
                (rel, bytes)
            })
            .collect();
        drop(dir);
        let mut base = Base {
            files,
            expected: Recovered::default(),
        };
        let copy = kept_dir("expected");
        base.write_to(copy.path());
        base.expected = SledStore::open(copy.path(), SledOptions::default())
            .and_then(|store| store.recover())
            .expect("the undamaged store recovers");
        assert!(
            base.expected
                .messages
                .iter()
                .map(|q| q.messages.len())
                .sum::<usize>()
                > 100,
            "the base store holds messages"
        );
        base
    })
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// Fills a store through the broker: definitions, messages, acks, returns; then closes it.
/// For [`Layout::Compacted`], compacts it twice on the way, the second time after the blob.
fn build(dir: &Path, layout: Layout) {
    let compact = |broker: &Broker| {
        if layout == Layout::Compacted {
            broker.compact_store().expect("compacting the base store");
        }
    };
    let broker = Broker::open(dir).expect("a fresh store opens");
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.exchange_declare(
        "orders",
        ExchangeKind::Topic,
        durable_exchange(),
        FieldTable::new(),
    )
    .unwrap();
    ch.exchange_declare(
        "audit",
        ExchangeKind::Fanout,
        durable_exchange(),
        FieldTable::new(),
    )
    .unwrap();
    let dead_letters = FieldTable::new().with("x-dead-letter-exchange", FieldValue::from("audit"));
    ch.queue_declare("created", durable_queue(), dead_letters)
        .unwrap();
    ch.queue_declare("all", durable_queue(), FieldTable::new())
        .unwrap();
    ch.queue_declare("audit-log", durable_queue(), FieldTable::new())
        .unwrap();
    ch.queue_bind(
        "created",
        "orders",
        "order.created",
        QueueBindOptions::default(),
        FieldTable::new(),
    )
    .unwrap();
    ch.queue_bind(
        "all",
        "orders",
        "order.#",
        QueueBindOptions::default(),
        FieldTable::new(),
    )
    .unwrap();
    ch.queue_bind(
        "audit-log",
        "audit",
        "",
        QueueBindOptions::default(),
        FieldTable::new(),
    )
    .unwrap();
    ch.exchange_bind(
        "audit",
        "orders",
        "order.cancelled",
        ExchangeBindOptions::default(),
        FieldTable::new(),
    )
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    let persistent = BasicProperties::default().with_delivery_mode(2);
    for i in 0..400u32 {
        if i == 200 {
            compact(&broker);
        }
        let key = ["order.created", "order.paid", "order.cancelled"][(i % 3) as usize];
        let body = vec![u8::try_from(i % 251).unwrap(); 16 + (i as usize * 37) % 1500];
        ch.basic_publish(
            "orders",
            key,
            BasicPublishOptions::default(),
            body,
            persistent.clone().with_message_id(i.to_string()),
        )
        .unwrap();
    }
    // Over sled's blob threshold (a quarter of a 512 KiB segment): kept in a file of its own.
    ch.basic_publish(
        "",
        "audit-log",
        BasicPublishOptions::default(),
        vec![7u8; 300 * 1024],
        persistent.clone(),
    )
    .unwrap();
    assert!(ch.wait_for_confirms().unwrap());
    compact(&broker);
    for _ in 0..60 {
        let got = ch.basic_get("all", BasicGetOptions::default()).unwrap();
        got.expect("a message")
            .delivery
            .ack(BasicAckOptions::default())
            .unwrap();
    }
    for _ in 0..20 {
        let got = ch.basic_get("created", BasicGetOptions::default()).unwrap();
        got.expect("a message")
            .delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .unwrap();
    }
    for _ in 0..10 {
        let got = ch.basic_get("created", BasicGetOptions::default()).unwrap();
        got.expect("a message")
            .delivery
            .nack(BasicNackOptions::default())
            .unwrap();
    }
    broker.sync().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Trials tests run one at a time: the panic hook cannot tell whose thread panicked.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Panic messages seen by the hook, in every thread.
fn panics() -> &'static Mutex<Vec<String>> {
    static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("unnamed").to_owned();
            PANICS
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(format!("thread {name}: {info}"));
            previous(info);
        }));
    });
    &PANICS
}

fn trials(default: u64) -> u64 {
    std::env::var("CONEY_CORRUPTION_TRIALS")
        .ok()
        .map(|n| n.parse().expect("CONEY_CORRUPTION_TRIALS is a number"))
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("CONEY_CORRUPTION_SEED")
        .ok()
        .map(|s| {
            let s = s.trim_start_matches("0x");
            u64::from_str_radix(s, 16).expect("CONEY_CORRUPTION_SEED is hex")
        })
        .unwrap_or(SEED_DEFAULT)
}

fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap()
}

/// SplitMix64 keyed by (seed, trial index): each trial draws the same numbers alone or in a run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, index: u64) -> Self {
        let mut rng = Rng(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        rng.next();
        rng
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), near enough for test inputs.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(dir.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let rel = rel.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                stack.push(rel);
            } else {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

/// A [`TempDir`] kept after the test when `CONEY_CORRUPTION_KEEP` is set.
fn kept_dir(name: &str) -> TempDir {
    TempDir::new(name).keep_if(std::env::var_os("CONEY_CORRUPTION_KEEP").is_some())
}
