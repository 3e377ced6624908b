//! At-least-once dead-lettering of quorum queues (`x-dead-letter-strategy: at-least-once` with
//! `x-overflow: reject-publish`): a dead letter leaves its source only once every target queue
//! has it; until then the source holds it and retries every `Limits::dead_letter_retry_ms`
//! of the broker's clock. With any other overflow mode it falls back to at-most-once.
//!
//! The crash test's child is this test binary re-run with `CONEY_AT_LEAST_ONCE_DIR` set.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use coney::*;

const RETRY: Duration = Duration::from_millis(180_000);

fn at_least_once(dlx: &str) -> FieldTable {
    FieldTable::new()
        .with("x-queue-type", "quorum")
        .with("x-dead-letter-exchange", dlx)
        .with("x-dead-letter-strategy", "at-least-once")
        .with("x-overflow", "reject-publish")
}

fn manual() -> (ManualClock, Broker, Connection, Channel) {
    let clock = ManualClock::new(0);
    let broker = Broker::builder().clock(clock.clone()).in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    (clock, broker, conn, ch)
}

fn held(broker: &Broker, queue: &str) -> u64 {
    broker.death_stats(queue).unwrap().held
}

/// A missing dead-letter exchange keeps the dead letter in its source (not ready, not
/// dropped); once the exchange and a route exist, the next retry delivers it, not earlier.
#[test]
fn a_missing_dead_letter_exchange_keeps_the_message() {
    let (clock, broker, _conn, ch) = manual();
    ch.queue_declare("work", durable(), at_least_once("dlx"))
        .unwrap();
    publish(&ch, "", "work", "m");
    get(&ch, "work")
        .unwrap()
        .reject(BasicRejectOptions::default())
        .unwrap();
    assert_eq!(held(&broker, "work"), 1);
    assert_eq!(ready(&ch, "work"), 0, "held, not ready");
    declare_exchange(&ch, "dlx", ExchangeKind::Fanout);
    declare(&ch, "dlq");
    bind(&ch, "dlq", "dlx", "");
    assert_eq!(
        ready(&ch, "dlq"),
        0,
        "a topology change alone does not retry"
    );
    clock.advance(RETRY - Duration::from_millis(1));
    assert_eq!(ready(&ch, "dlq"), 0);
    clock.advance(Duration::from_millis(1));
    let d = get(&ch, "dlq").expect("delivered at the retry");
    assert_eq!(body(&d), "m");
    assert_eq!(text(&death(&d, 0), "reason"), Some("rejected"));
    let stats = broker.death_stats("work").unwrap();
    assert_eq!((stats.held, stats.dead_lettered.rejected), (0, 1));
    assert_eq!(stats.dropped.rejected, 0);
    broker.check_invariants().unwrap();
}

/// With the default overflow (drop-head) the strategy falls back to at-most-once, as
/// RabbitMQ's does: a missing exchange drops the message.
#[test]
fn without_reject_publish_it_is_at_most_once() {
    let (_clock, broker, _conn, ch) = manual();
    let args = FieldTable::new()
        .with("x-queue-type", "quorum")
        .with("x-dead-letter-exchange", "dlx")
        .with("x-dead-letter-strategy", "at-least-once");
    ch.queue_declare("work", durable(), args).unwrap();
    publish(&ch, "", "work", "m");
    get(&ch, "work")
        .unwrap()
        .reject(BasicRejectOptions::default())
        .unwrap();
    let stats = broker.death_stats("work").unwrap();
    assert_eq!((stats.held, stats.dropped.rejected), (0, 1));
}

/// A target that refuses the dead letter (full, with reject-publish) does not get it; the
/// others do, once; the next retry after it has room delivers it there, and nowhere twice.
/// Held messages count toward the source's own length limit.
#[test]
fn a_refusing_target_gets_it_at_a_later_retry_and_no_target_gets_it_twice() {
    let (clock, broker, _conn, ch) = manual();
    declare_exchange(&ch, "dlx", ExchangeKind::Fanout);
    declare(&ch, "roomy");
    bind(&ch, "roomy", "dlx", "");
    let full = FieldTable::new()
        .with("x-max-length", 1i64)
        .with("x-overflow", "reject-publish");
    declare_args(&ch, "full", full);
    bind(&ch, "full", "dlx", "");
    publish(&ch, "", "full", "occupant");
    let args = at_least_once("dlx").with("x-max-length", 2i64);
    ch.queue_declare("work", durable(), args).unwrap();
    publish_all(&ch, "work", &["a", "b"]);
    get(&ch, "work")
        .unwrap()
        .reject(BasicRejectOptions::default())
        .unwrap();
    assert_eq!(held(&broker, "work"), 1);
    assert_eq!(get_all(&ch, "roomy"), ["a"]);
    publish(&ch, "", "work", "c");
    assert_eq!(
        ready(&ch, "work"),
        1,
        "'b' ready and 'a' held fill the limit of 2: 'c' is refused"
    );
    clock.advance(RETRY);
    assert_eq!(held(&broker, "work"), 1, "still no room in 'full'");
    assert_eq!(get_all(&ch, "full"), ["occupant"]);
    clock.advance(RETRY);
    assert_eq!(held(&broker, "work"), 0);
    assert_eq!(get_all(&ch, "full"), ["a"]);
    assert_eq!(ready(&ch, "roomy"), 0, "not sent again where it was");
    broker.check_invariants().unwrap();
}

/// A policy can ask for at-least-once; clearing it (back to at-most-once) drops what is held,
/// as RabbitMQ drops pending dead letters when the strategy changes away.
#[test]
fn the_strategy_by_policy_and_switching_away() {
    let (_clock, broker, _conn, ch) = manual();
    let args = FieldTable::new()
        .with("x-queue-type", "quorum")
        .with("x-dead-letter-exchange", "dlx")
        .with("x-overflow", "reject-publish");
    ch.queue_declare("work", durable(), args).unwrap();
    let policy = Policy {
        pattern: "^work$".into(),
        priority: 0,
        definition: PolicyDefinition {
            dead_letter_strategy: Some(DeadLetterStrategy::AtLeastOnce),
            ..Default::default()
        },
    };
    broker.set_policy("alo", policy).unwrap();
    publish(&ch, "", "work", "m");
    get(&ch, "work")
        .unwrap()
        .reject(BasicRejectOptions::default())
        .unwrap();
    assert_eq!(held(&broker, "work"), 1);
    broker.clear_policy("alo").unwrap();
    let stats = broker.death_stats("work").unwrap();
    assert_eq!((stats.held, stats.dropped.rejected), (0, 1));
}

/// The child: a held persistent dead letter, synced, then the process aborts.
#[test]
fn at_least_once_crash_child() {
    let Ok(dir) = std::env::var("CONEY_AT_LEAST_ONCE_DIR") else {
        return; // not a child run
    };
    let broker = Broker::open(&dir).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare("work", durable(), at_least_once("dlx"))
        .unwrap();
    for body in ["held", "ready"] {
        let properties = BasicProperties::default().with_delivery_mode(2);
        ch.basic_publish("", "work", Default::default(), body.as_bytes(), properties)
            .unwrap();
    }
    get(&ch, "work")
        .unwrap()
        .reject(BasicRejectOptions::default())
        .unwrap();
    assert_eq!(broker.death_stats("work").unwrap().held, 1);
    broker.sync().unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "\nSYNCED").unwrap();
    out.flush().unwrap();
    std::process::abort();
}

/// After a crash the held dead letter is still held (not ready again in its source, so no
/// consumer sees it twice), and reaches the dead-letter queue at the first retry once the
/// exchange exists.
#[test]
fn a_held_dead_letter_survives_a_crash() {
    let dir = TempDir::new("at-least-once-crash");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "at_least_once_crash_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CONEY_AT_LEAST_ONCE_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().any(|l| l == "SYNCED"), "child: {stdout}");
    assert!(!out.status.success(), "the child aborted");

    let clock = ManualClock::new(0);
    let broker = Broker::builder()
        .clock(clock.clone())
        .open(dir.path())
        .unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    assert_eq!(broker.death_stats("work").unwrap().held, 1);
    assert_eq!(get_all(&ch, "work"), ["ready"], "the held one is not ready");
    declare_exchange(&ch, "dlx", ExchangeKind::Fanout);
    declare(&ch, "dlq");
    bind(&ch, "dlq", "dlx", "");
    clock.advance(RETRY);
    assert_eq!(get_all(&ch, "dlq"), ["held"]);
    assert_eq!(broker.death_stats("work").unwrap().held, 0);
    drop((ch, conn, broker));
    let broker = Broker::open(dir.path()).unwrap();
    assert_eq!(
        broker.death_stats("work").unwrap().held,
        0,
        "its record went"
    );
}
