//! Crash safety with real processes: a child process publishes with confirms and acks in a
//! loop on a durable broker, while another of its threads compacts the store over and over;
//! the test kills it with SIGKILL at seeded random moments, reopens the directory and checks
//! that every confirmed, unacked message is there in order, that no message whose ack was
//! synced came back, that nothing is duplicated (DESIGN.md "Durability"; SEMANTICS.md §8,
//! §9.2), and that opening left one generation of the store and nothing of an interrupted
//! compaction. It prints how many kills landed during a compaction.
//!
//! The child is this test binary re-run with `CONEY_CRASH_DIR` set: `crash_child` does the
//! work then, and returns at once otherwise.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use coney::*;

const QUEUE: &str = "work";

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// The child's loop: publish a batch (announcing each id before it is published), wait for
/// its confirms and report them, then take a few messages, ack them (announcing each first),
/// sync, and report the acks as durable.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("CONEY_CRASH_DIR") else {
        return; // not a child run
    };
    let mut next: u64 = std::env::var("CONEY_CRASH_START").unwrap().parse().unwrap();
    let broker = Broker::open(&dir).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare(QUEUE, durable(), FieldTable::new())
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    let out = std::io::stdout();
    // The harness has printed "test crash_child ... " without a newline: end that line.
    writeln!(out.lock()).unwrap();
    // Compactions back to back (a kill lands in one often), each announced before and after.
    let compactor = broker.clone();
    thread::spawn(move || {
        loop {
            writeln!(std::io::stdout().lock(), "K start").unwrap();
            compactor.compact_store().unwrap();
            writeln!(std::io::stdout().lock(), "K done").unwrap();
            thread::sleep(Duration::from_millis(2));
        }
    });
    loop {
        let first = next;
        for _ in 0..20 {
            writeln!(out.lock(), "P {next}").unwrap();
            ch.basic_publish(
                "",
                QUEUE,
                Default::default(),
                next.to_le_bytes().to_vec(),
                persistent(),
            )
            .unwrap();
            next += 1;
        }
        assert!(ch.wait_for_confirms().unwrap());
        for id in first..next {
            writeln!(out.lock(), "C {id}").unwrap();
        }
        let mut acked = Vec::new();
        for _ in 0..15 {
            let Some(g) = ch.basic_get(QUEUE, BasicGetOptions::default()).unwrap() else {
                break;
            };
            let id = u64::from_le_bytes(g.delivery.body()[..8].try_into().unwrap());
            // Announced before the ack: a kill after it leaves the ack's fate unknown.
            writeln!(out.lock(), "G {id}").unwrap();
            g.delivery.ack(BasicAckOptions::default()).unwrap();
            acked.push(id);
        }
        broker.sync().unwrap();
        for id in acked {
            writeln!(out.lock(), "A {id}").unwrap();
        }
    }
}

/// What the parent learned from the children so far.
#[derive(Default)]
struct Ledger {
    published: BTreeSet<u64>,
    confirmed: BTreeSet<u64>,
    /// Acks that were about to happen (maybe written, maybe not).
    acking: BTreeSet<u64>,
    /// Acks made and synced: never to come back.
    acked: BTreeSet<u64>,
    next: u64,
    /// Kills that landed between a compaction's start and its end.
    kills_mid_compaction: u32,
    /// What the kills left of a compaction, as found before reopening: a generation not
    /// named (killed before the switch), an old generation next to the named one (after it),
    /// a `CURRENT.tmp`.
    left_unnamed: u32,
    left_old: u32,
    left_current_tmp: u32,
}

/// Runs one child for `run_ms`, kills it with SIGKILL, records what it reported.
fn run_child(dir: &Path, ledger: &mut Ledger, run_ms: u64) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("CONEY_CRASH_DIR", dir)
        .env("CONEY_CRASH_START", ledger.next.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        // Only whole lines count: the kill can cut the last one short.
        while stdout.read_line(&mut line).is_ok_and(|n| n > 0) && line.ends_with('\n') {
            if tx.send(line.trim_end().to_owned()).is_err() {
                break;
            }
            line.clear();
        }
    });
    // Start the clock once the child is publishing, so every run does some work: the test
    // harness's own lines ("running 1 test", blank lines) come before the broker is open.
    let first = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the child starts publishing");
        if ["P ", "K "].iter().any(|p| line.starts_with(p)) {
            break line;
        }
    };
    thread::sleep(Duration::from_millis(run_ms));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    let mut compacting = false;
    for line in std::iter::once(first).chain(rx.try_iter()) {
        match line.as_str() {
            "K start" => compacting = true,
            "K done" => compacting = false,
            _ => {}
        }
        let (kind, id) = match line.split_once(' ') {
            Some((k, id)) if ["P", "C", "G", "A"].contains(&k) => (k, id.parse::<u64>()),
            _ => continue, // the test harness's own lines
        };
        let Ok(id) = id else { continue };
        match kind {
            "P" => {
                ledger.published.insert(id);
                ledger.next = ledger.next.max(id + 1);
            }
            "C" => _ = ledger.confirmed.insert(id),
            "G" => _ = ledger.acking.insert(id),
            _ => _ = ledger.acked.insert(id),
        }
    }
    ledger.kills_mid_compaction += u32::from(compacting);
}

/// Reopens the directory and checks it against the ledger; leaves the messages in place.
fn check_store(dir: &Path, ledger: &Ledger, seed: u64, round: u32) {
    let broker = Broker::open(dir).unwrap();
    check_layout(dir, seed, round);
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    let ok = ch
        .queue_declare(QUEUE, durable(), FieldTable::new())
        .unwrap();
    let mut present = Vec::new();
    while let Some(g) = ch.basic_get(QUEUE, BasicGetOptions::default()).unwrap() {
        assert!(
            g.delivery.redelivered(),
            "seed {seed} round {round}: recovered messages are redelivered"
        );
        present.push(u64::from_le_bytes(
            g.delivery.body()[..8].try_into().unwrap(),
        ));
    }
    assert_eq!(present.len() as u32, ok.message_count);
    let set: BTreeSet<u64> = present.iter().copied().collect();
    assert_eq!(
        set.len(),
        present.len(),
        "seed {seed} round {round}: duplicates in {present:?}"
    );
    assert!(
        present.windows(2).all(|w| w[0] < w[1]),
        "seed {seed} round {round}: out of order"
    );
    for id in ledger.confirmed.difference(&ledger.acking) {
        assert!(
            set.contains(id),
            "seed {seed} round {round}: confirmed message {id} lost"
        );
    }
    for id in &set {
        assert!(
            !ledger.acked.contains(id),
            "seed {seed} round {round}: acked message {id} came back"
        );
        assert!(
            ledger.published.contains(id),
            "seed {seed} round {round}: {id} was never published"
        );
    }
    ch.close(); // requeues everything fetched
    drop(conn);
    broker.sync().unwrap();
}

/// Counts what an interrupted compaction left in `dir` (see [`Ledger`]).
fn note_leftovers(dir: &Path, ledger: &mut Ledger) {
    let names = names(dir);
    let named = std::fs::read_to_string(dir.join("CURRENT"))
        .ok()
        .and_then(|text| text.split(' ').next().map(str::to_owned));
    let generations: Vec<&String> = names.iter().filter(|n| n.starts_with("gen-")).collect();
    let unnamed = generations
        .iter()
        .filter(|n| Some(n.as_str()) != named.as_deref())
        .count();
    match &named {
        // Generation 0 active: any generation is a copy not yet named.
        None => ledger.left_unnamed += u32::from(unnamed > 0),
        Some(named) => {
            // The highest generation is the newest: above the named one, an unnamed copy;
            // below it (or generation 0's log), the old one not yet removed.
            let number = |n: &str| n[4..].parse::<u64>().unwrap_or(0);
            let current = number(named);
            ledger.left_unnamed += u32::from(generations.iter().any(|n| number(n) > current));
            ledger.left_old +=
                u32::from(generations.iter().any(|n| number(n) < current) || names.contains("db"));
        }
    }
    ledger.left_current_tmp += u32::from(names.contains("CURRENT.tmp"));
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// After an open: one generation (generation 0's files, or `CURRENT` and the `gen-N` it
/// names), nothing of an interrupted compaction.
fn check_layout(dir: &Path, seed: u64, round: u32) {
    let names = names(dir);
    let generations = names.iter().filter(|name| name.starts_with("gen-")).count();
    let current = names.contains("CURRENT");
    assert!(
        !names.contains("CURRENT.tmp")
            && generations == usize::from(current)
            && names.contains("db") != current,
        "seed {seed} round {round}: left behind: {names:?}"
    );
}

/// SIGKILL at seeded random moments, many rounds, each reopening what the last one left.
#[test]
fn sigkill_mid_stream_loses_nothing_confirmed_and_returns_nothing_acked() {
    let seed: u64 = std::env::var("CONEY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xC0DE);
    let rounds: u32 = std::env::var("CONEY_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let dir = std::env::temp_dir().join(format!("coney-crash-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut ledger = Ledger::default();
    let mut rng = seed;
    for round in 0..rounds {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let run_ms = 5 + (rng >> 33) % 120;
        run_child(&dir, &mut ledger, run_ms);
        note_leftovers(&dir, &mut ledger);
        check_store(&dir, &ledger, seed, round);
    }
    assert!(
        !ledger.confirmed.is_empty(),
        "the children confirmed something"
    );
    assert!(!ledger.acked.is_empty(), "the children acked something");
    eprintln!(
        "seed {seed}: {rounds} kills, {} of them during a compaction; left behind: an unnamed \
         generation {} times, the old generation {} times, CURRENT.tmp {} times",
        ledger.kills_mid_compaction, ledger.left_unnamed, ledger.left_old, ledger.left_current_tmp
    );
    let _ = std::fs::remove_dir_all(&dir);
}
