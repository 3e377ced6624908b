//! Compaction of the sled store: a drained backlog gives its disk back, compaction changes no
//! record, when it is due, and what opening makes of each step a crash can interrupt it at
//! (DESIGN.md "Flow control and bounds": disk goes back after a backlog drains).
//!
//! The crash points are built by hand from what each step leaves on disk (a generation not
//! named by `CURRENT`, a `CURRENT.tmp`, an old generation next to the new one, generation 0's
//! files next to a later generation); `tests/crash.rs` kills real processes mid-compaction.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use bytes::Bytes;
use common::TempDir;
use coney::store::{
    BindingRecord, COMPACT_FLOOR_BYTES, DestinationRecord, ExchangeRecord, Faults, FaultyStore,
    MemoryStore, MessageRecord, Op, QueueRecord, Recovered, SledOptions, SledStore, Store,
    StoreError,
};
use coney::*;

// ---------------------------------------------------------------------------------------------
// Through the broker

/// Messages per backlog: enough that sled leaves tens of MiB behind once they are gone.
const BACKLOG: u64 = 200_000;
/// Messages left queued after each drain.
const LEFT: u64 = 1_000;
/// Body size of the backlog's messages.
const BODY_BYTES: usize = 64;

/// Fills a durable queue, drains it but for [`LEFT`] messages, twice. The directory comes back
/// under twice the live data plus the floor each time, without waiting: the compaction the
/// flusher would start once idle is asked for directly (`compact_store_if_due`, the same
/// decision without the wait; the broker's own is off, so it cannot come first). The second backlog's peak is no higher than the first's (the
/// compacted store starts small), and what is left comes back after a reopen, in order.
#[test]
fn a_drained_backlog_gives_its_disk_back_and_a_second_one_does_not_grow_it() {
    let dir = TempDir::new("drain");
    let broker = Broker::builder()
        .auto_compact(false)
        .open(dir.path())
        .unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    let mut next = 0u64;
    let mut peaks = Vec::new();
    for cycle in 0..2 {
        for _ in 0..BACKLOG {
            ch.basic_publish("", "q", Default::default(), body(next), persistent())
                .unwrap();
            next += 1;
        }
        assert!(ch.wait_for_confirms().unwrap());
        broker.sync().unwrap();
        let peak = broker.size_on_disk().unwrap();
        assert!(
            peak > 2 * COMPACT_FLOOR_BYTES,
            "cycle {cycle}: a backlog of {BACKLOG} takes {peak} bytes"
        );
        assert_eq!(
            broker.compact_store_if_due().unwrap(),
            None,
            "cycle {cycle}: no compaction is due while the backlog is live"
        );
        peaks.push(peak);
        // The first cycle also takes the messages left by the one before.
        let drain = if cycle == 0 { BACKLOG - LEFT } else { BACKLOG };
        take_and_ack(&ch, drain);
        broker.sync().unwrap();
        let drained = broker.size_on_disk().unwrap();
        let stats = broker
            .compact_store_if_due()
            .unwrap()
            .unwrap_or_else(|| panic!("cycle {cycle}: compaction due at {drained} bytes"));
        let live_min = LEFT * (BODY_BYTES as u64 + 17);
        assert!(
            (live_min..live_min * 4).contains(&stats.live_bytes),
            "cycle {cycle}: {LEFT} messages are {} live bytes",
            stats.live_bytes
        );
        let size = broker.size_on_disk().unwrap();
        eprintln!("cycle {cycle}: peak {peak} bytes, drained {drained}, compacted {stats:?}");
        let bound = 2 * stats.live_bytes + COMPACT_FLOOR_BYTES;
        assert!(
            size <= bound,
            "cycle {cycle}: {size} bytes after compacting, over {bound}"
        );
        assert_eq!(stats.size_after_bytes, size);
        assert!(stats.size_before_bytes > size);
        // Nothing else is left in the directory: one generation, the lock, CURRENT.
        let total = directory_bytes(dir.path());
        assert!(
            total <= bound,
            "cycle {cycle}: the directory holds {total} bytes: {:?}",
            names(dir.path())
        );
        assert_eq!(
            names(dir.path()),
            BTreeSet::from([
                "CURRENT".to_string(),
                "coney.lock".to_string(),
                format!("gen-{}", stats.generation)
            ])
        );
        assert_eq!(
            broker.compact_store_if_due().unwrap(),
            None,
            "cycle {cycle}: a compacted store is not due again"
        );
    }
    // A peak depends on how the flusher grouped publishes and acks (how many records an ack
    // cancelled before they were written), which varies by up to ~15% on a loaded machine; a
    // store that kept the first backlog would take about twice the first peak.
    assert!(
        peaks[1] <= peaks[0] + peaks[0] / 2,
        "the second backlog took {} bytes, the first {}",
        peaks[1],
        peaks[0]
    );
    drop((ch, conn, broker));
    let broker = Broker::open(dir.path()).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    let ok = ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
    assert_eq!(u64::from(ok.message_count), LEFT);
    for expected in next - LEFT..next {
        let got = ch
            .basic_get("q", BasicGetOptions { no_ack: true })
            .unwrap()
            .expect("a message");
        assert_eq!(got.delivery.body(), &body(expected));
    }
    assert!(
        ch.basic_get("q", BasicGetOptions::default())
            .unwrap()
            .is_none()
    );
}

/// With its own compaction on (the default), the broker gives the disk back by itself once a
/// drained backlog leaves it idle. (Polled with a generous deadline: no timing is asserted.)
#[test]
fn the_broker_compacts_by_itself_once_idle() {
    let dir = TempDir::new("auto");
    let broker = Broker::open(dir.path()).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    let body = Bytes::from(vec![0x5a; 8 * 1024]);
    for _ in 0..3_000 {
        ch.basic_publish("", "q", Default::default(), body.clone(), persistent())
            .unwrap();
    }
    assert!(ch.wait_for_confirms().unwrap());
    take_and_ack(&ch, 3_000);
    broker.sync().unwrap();
    let drained = broker.size_on_disk().unwrap();
    assert!(drained > COMPACT_FLOOR_BYTES, "{drained} bytes");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while directory_bytes(dir.path()) > COMPACT_FLOOR_BYTES {
        assert!(
            std::time::Instant::now() < deadline,
            "still {} bytes a minute after the drain",
            directory_bytes(dir.path())
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(broker.size_on_disk().unwrap() < COMPACT_FLOOR_BYTES);
    assert!(broker.health().is_healthy());
}

/// A small store (under the floor) is never due, however little of it is live.
#[test]
fn a_small_store_is_not_due() {
    let dir = TempDir::new("small");
    let broker = Broker::builder()
        .auto_compact(false)
        .open(dir.path())
        .unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
    for i in 0..2_000 {
        ch.basic_publish("", "q", Default::default(), body(i), persistent())
            .unwrap();
    }
    take_and_ack(&ch, 2_000);
    broker.sync().unwrap();
    assert_eq!(broker.compact_store_if_due().unwrap(), None);
    // On demand it runs anyway, and the broker goes on.
    let stats = broker.compact_store().unwrap();
    assert_eq!(stats.generation, 1);
    ch.basic_publish("", "q", Default::default(), body(7), persistent())
        .unwrap();
    broker.sync().unwrap();
    drop((ch, conn, broker));
    let broker = Broker::open(dir.path()).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    let got = ch
        .basic_get("q", BasicGetOptions::default())
        .unwrap()
        .unwrap();
    assert_eq!(got.delivery.body(), &body(7));
}

/// In memory there is nothing to compact.
#[test]
fn an_in_memory_broker_has_nothing_to_compact() {
    let broker = Broker::in_memory();
    assert_eq!(broker.compact_store().unwrap(), Default::default());
    assert_eq!(broker.compact_store_if_due().unwrap(), None);
}

/// A compaction that fails before its switch leaves the broker working: nothing is poisoned,
/// confirms go on.
#[test]
fn a_failed_compaction_poisons_nothing() {
    let faults = Faults::new();
    let store = FaultyStore::new(MemoryStore::new(), faults.clone());
    let broker = Broker::builder().open_store(store).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    faults.fail_next_compact();
    let err = broker.compact_store().unwrap_err();
    assert!(
        matches!(err, Error::Storage(StoreError::Compaction(_))),
        "{err}"
    );
    assert!(broker.health().is_healthy());
    ch.basic_publish("", "q", Default::default(), body(1), persistent())
        .unwrap();
    assert!(ch.wait_for_confirms().unwrap());
    broker.sync().unwrap();
}

// ---------------------------------------------------------------------------------------------
// The store: compaction changes no record

/// Every kind of record, a blob-sized message among them, reads back the same after each of
/// two compactions and after a reopen; the old generation is gone each time, and the store
/// takes writes in its new generation.
#[test]
fn compaction_changes_no_record() {
    let dir = TempDir::new("same");
    let store = open(dir.path());
    fill(&store);
    let before = store.recover().unwrap();
    assert_eq!(store.generation_dir(), dir.path());
    for generation in 1..=2u64 {
        let stats = store.compact().unwrap();
        assert_eq!(stats.generation, generation);
        assert_eq!(store.recover().unwrap(), before);
        assert_eq!(
            store.generation_dir(),
            dir.path().join(format!("gen-{generation}"))
        );
        assert_eq!(
            names(dir.path()),
            BTreeSet::from([
                "CURRENT".to_string(),
                "coney.lock".to_string(),
                format!("gen-{generation}")
            ]),
            "the old generation (or generation 0's files) is gone"
        );
    }
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.recover().unwrap(), before);
    apply(&store, vec![Op::DeleteMessage { queue: 1, seq: 0 }]);
    store.flush().unwrap();
    drop(store);
    let store = open(dir.path());
    let after = store.recover().unwrap();
    assert_eq!(
        after.messages[0].messages.len() + 1,
        before.messages[0].messages.len()
    );
}

/// A second store on a compacted directory is refused while the first is open, and opens as
/// soon as it is dropped.
#[test]
fn a_compacted_store_is_locked_while_open() {
    let dir = TempDir::new("lock");
    let store = open(dir.path());
    fill(&store);
    store.compact().unwrap();
    let err = SledStore::open(dir.path(), SledOptions::default()).unwrap_err();
    assert!(matches!(err, StoreError::Locked(_)), "{err}");
    drop(store);
    open(dir.path());
}

// ---------------------------------------------------------------------------------------------
// Crash points: what opening makes of what each step leaves

/// Killed while copying (or after the copy, before `CURRENT`): the new generation is there,
/// not named. The old one stays active and the copy is removed, for a first compaction (from
/// generation 0) and a later one.
#[test]
fn a_generation_not_named_by_current_is_removed() {
    for compactions_before in [0, 1] {
        let dir = TempDir::new("unnamed");
        let store = open(dir.path());
        fill(&store);
        for _ in 0..compactions_before {
            store.compact().unwrap();
        }
        let expected = store.recover().unwrap();
        drop(store);
        let next = compactions_before + 1;
        // A complete copy that never got named (built elsewhere, moved in) ...
        let elsewhere = TempDir::new("unnamed-elsewhere");
        copy_tree(dir.path(), elsewhere.path());
        let copy = open(elsewhere.path());
        copy.compact().unwrap();
        drop(copy);
        let built = elsewhere.path().join(format!("gen-{next}"));
        std::fs::rename(&built, dir.path().join(format!("gen-{next}"))).unwrap();
        // ... and a half-written one: a sled directory whose log stops short.
        let half = dir.path().join(format!("gen-{}", next + 1));
        copy_tree(&dir.path().join(format!("gen-{next}")), &half);
        cut(&half.join("db"), 1000);
        let store = open(dir.path());
        assert_eq!(store.recover().unwrap(), expected);
        let mut expected_names = BTreeSet::from(["coney.lock".to_string()]);
        if compactions_before > 0 {
            expected_names.insert("CURRENT".to_string());
            expected_names.insert(format!("gen-{compactions_before}"));
        } else {
            expected_names.extend(generation_zero_names(dir.path()));
        }
        assert_eq!(names(dir.path()), expected_names, "{compactions_before}");
        // The next compaction takes a number above the removed ones' (or reuses it: either way
        // it completes).
        let stats = store.compact().unwrap();
        assert!(stats.generation > compactions_before);
        assert_eq!(store.recover().unwrap(), expected);
    }
}

/// Killed while writing `CURRENT.tmp`, or before its rename: it is removed, and the old
/// generation stays active.
#[test]
fn a_current_tmp_is_removed() {
    let dir = TempDir::new("current-tmp");
    let store = open(dir.path());
    fill(&store);
    store.compact().unwrap();
    let expected = store.recover().unwrap();
    drop(store);
    std::fs::write(dir.path().join("CURRENT.tmp"), b"gen-2 ").unwrap();
    let store = open(dir.path());
    assert_eq!(store.recover().unwrap(), expected);
    assert_eq!(store.generation_dir(), dir.path().join("gen-1"));
    assert!(!dir.path().join("CURRENT.tmp").exists());
}

/// Killed after the rename of `CURRENT`, before the old generation was removed: the new one is
/// active (it differs from the old one here, to tell them apart) and the old one is removed.
#[test]
fn the_generation_current_names_wins_and_the_old_one_is_removed() {
    let dir = TempDir::new("both");
    let store = open(dir.path());
    fill(&store);
    store.compact().unwrap();
    drop(store);
    let saved = TempDir::new("both-saved");
    copy_tree(&dir.path().join("gen-1"), saved.path());
    let store = open(dir.path());
    apply(&store, vec![Op::DeleteMessage { queue: 1, seq: 0 }]);
    store.flush().unwrap();
    store.compact().unwrap();
    let expected = store.recover().unwrap();
    drop(store);
    copy_tree(saved.path(), &dir.path().join("gen-1"));
    let store = open(dir.path());
    assert_eq!(store.recover().unwrap(), expected);
    assert_eq!(store.generation_dir(), dir.path().join("gen-2"));
    assert!(!dir.path().join("gen-1").exists());
}

/// Killed while removing generation 0's files after the first switch (all of them left, or
/// some): they are removed; `CURRENT`, the lock and files the store does not know stay.
#[test]
fn generation_zero_files_left_after_a_switch_are_removed() {
    for keep in [
        &["db", "conf", "blobs", "coney.commit"][..],
        &["conf", "coney.commit"],
    ] {
        let dir = TempDir::new("gen0-left");
        let store = open(dir.path());
        fill(&store);
        drop(store);
        let saved = TempDir::new("gen0-saved");
        copy_tree(dir.path(), saved.path());
        let store = open(dir.path());
        store.compact().unwrap();
        let expected = store.recover().unwrap();
        drop(store);
        for name in keep {
            copy_tree(&saved.path().join(name), &dir.path().join(name));
        }
        std::fs::write(dir.path().join("notes.txt"), b"the operator's").unwrap();
        let store = open(dir.path());
        assert_eq!(store.recover().unwrap(), expected);
        assert_eq!(
            names(dir.path()),
            BTreeSet::from(["CURRENT", "coney.lock", "gen-1", "notes.txt"].map(str::to_string)),
            "{keep:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Damage to a compacted store

/// Damage to `CURRENT` or to the generation it names is `CorruptStore`, naming what is wrong,
/// and the refused open removes nothing.
#[test]
fn damage_to_a_compacted_store_is_corrupt_store() {
    let base = TempDir::new("damage-base");
    let store = open(base.path());
    fill(&store);
    store.compact().unwrap();
    // A flushed write after the switch, for the lost-writes case below.
    let before_write = TempDir::new("damage-before-write");
    store.flush().unwrap();
    copy_tree(&base.path().join("gen-1"), before_write.path());
    apply(&store, vec![Op::DeleteMessage { queue: 2, seq: 1 }]);
    store.flush().unwrap();
    drop(store);
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "CURRENT flipped",
            Box::new(|dir| flip(&dir.join("CURRENT"), 4)),
            "CURRENT",
        ),
        (
            "CURRENT emptied",
            Box::new(|dir| std::fs::write(dir.join("CURRENT"), b"").unwrap()),
            "CURRENT",
        ),
        (
            "CURRENT deleted",
            Box::new(|dir| std::fs::remove_file(dir.join("CURRENT")).unwrap()),
            "CURRENT",
        ),
        (
            "generation deleted",
            Box::new(|dir| std::fs::remove_dir_all(dir.join("gen-1")).unwrap()),
            "gen-1",
        ),
        (
            "log deleted",
            Box::new(|dir| std::fs::remove_file(dir.join("gen-1/db")).unwrap()),
            "gen-1/db",
        ),
        (
            "commit file deleted",
            Box::new(|dir| std::fs::remove_file(dir.join("gen-1/coney.commit")).unwrap()),
            "gen-1/coney.commit",
        ),
        (
            "log from before a flushed write",
            Box::new(move |dir| {
                std::fs::copy(before_write.path().join("db"), dir.join("gen-1/db")).unwrap();
            }),
            "gen-1/db",
        ),
    ];
    for (what, damage, names_path) in cases {
        let dir = TempDir::new("damage");
        copy_tree(base.path(), dir.path());
        damage(dir.path());
        // A leftover next to the damage: a refused open must not tidy it away.
        std::fs::create_dir(dir.path().join("gen-9")).unwrap();
        // (The lock's file is created by any open, refused or not.)
        let listing = names(dir.path());
        match SledStore::open(dir.path(), SledOptions::default()) {
            Err(err @ StoreError::CorruptStore { .. }) => {
                let StoreError::CorruptStore { path, .. } = &err else {
                    unreachable!()
                };
                assert!(path.ends_with(names_path), "{what}: {err}");
            }
            Err(other) => panic!("{what}: expected CorruptStore, got {other}"),
            Ok(_) => panic!("{what}: the damaged store opened"),
        }
        let mut after = names(dir.path());
        after.remove("coney.lock");
        assert_eq!(after, listing, "{what}: the refused open changed nothing");
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// A [`BODY_BYTES`]-byte body starting with `id`.
fn body(id: u64) -> Bytes {
    let mut body = vec![0x5a; BODY_BYTES];
    body[..8].copy_from_slice(&id.to_be_bytes());
    Bytes::from(body)
}

/// Takes `n` messages from `q` and acks them, a thousand at a time.
fn take_and_ack(ch: &Channel, n: u64) {
    for i in 0..n {
        let got = ch
            .basic_get("q", BasicGetOptions::default())
            .unwrap()
            .expect("a message");
        if (i + 1) % 1000 == 0 || i + 1 == n {
            ch.basic_ack(
                got.delivery.delivery_tag(),
                BasicAckOptions { multiple: true },
            )
            .unwrap();
        }
    }
}

fn open(dir: &Path) -> SledStore {
    SledStore::open(dir, SledOptions::default()).expect("open the store")
}

fn apply(store: &dyn Store, ops: Vec<Op>) {
    store.apply(&ops.into()).expect("apply");
}

/// Definitions of every kind and 300 messages in two queues, one of them over sled's blob
/// threshold; flushed.
fn fill(store: &dyn Store) {
    let mut ops = vec![
        Op::PutExchange(ExchangeRecord {
            name: "orders".into(),
            kind: "topic".into(),
            auto_delete: false,
            internal: false,
            arguments: FieldTable::new().with("alternate-exchange", "ae"),
        }),
        Op::PutQueue(QueueRecord {
            id: 1,
            name: "created".into(),
            auto_delete: false,
            arguments: FieldTable::new().with("x-queue-type", "quorum"),
        }),
        Op::PutQueue(QueueRecord {
            id: 2,
            name: "audit".into(),
            auto_delete: false,
            arguments: FieldTable::new(),
        }),
        Op::PutBinding(BindingRecord {
            source: "orders".into(),
            destination: DestinationRecord::Queue("created".into()),
            routing_key: "order.created".into(),
            arguments: FieldTable::new(),
        }),
    ];
    for seq in 0..300u64 {
        ops.push(Op::PutMessage {
            queue: 1 + seq % 2,
            seq,
            record: std::sync::Arc::new(MessageRecord {
                exchange: "orders".into(),
                routing_key: "order.created".into(),
                properties: persistent().with_message_id(seq.to_string()),
                body: Bytes::from(vec![(seq % 251) as u8; 16 + (seq as usize * 37) % 1500]),
                delivery_count: u32::try_from(seq % 3).unwrap(),
                delivered: seq % 5 == 0,
                enqueued_at_ms: 1_700_000_000_000 + seq,
                dead_lettered: false,
                bcc: Vec::new(),
                pending_dead_letter: None,
            }),
        });
    }
    ops.push(Op::PutMessage {
        queue: 2,
        seq: 1_000,
        record: std::sync::Arc::new(MessageRecord {
            exchange: String::new(),
            routing_key: "audit".into(),
            properties: persistent(),
            body: Bytes::from(vec![7u8; 300 * 1024]),
            delivery_count: 0,
            delivered: false,
            enqueued_at_ms: 1_700_000_000_000,
            dead_lettered: false,
            bcc: Vec::new(),
            pending_dead_letter: None,
        }),
    });
    apply(store, ops);
    store.flush().unwrap();
    let recovered: Recovered = store.recover().unwrap();
    assert_eq!(recovered.messages.len(), 2);
}

/// The names in a directory.
fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Generation 0's names in a store directory (sled's files and the commit file).
fn generation_zero_names(dir: &Path) -> BTreeSet<String> {
    names(dir)
        .into_iter()
        .filter(|name| {
            ["db", "conf", "blobs", "coney.commit"].contains(&name.as_str())
                || name.starts_with("snap.")
        })
        .collect()
}

/// Bytes of every file under `dir`. Entries that vanish while it walks (a compaction running on
/// the broker's own thread removes the retired generation) count as empty.
fn directory_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let meta = entry.metadata().ok()?;
            Some(if meta.is_dir() {
                directory_bytes(&entry.path())
            } else {
                meta.len()
            })
        })
        .sum()
}

/// Copies a file or a directory tree (replacing what is at `to`).
fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() == "coney.lock" {
                continue;
            }
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

fn flip(path: &Path, offset: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

fn cut(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}
