//! Lifetimes of the broker and its handles: closing a broker releases its store directory at
//! once, even while handles of it are held, and those handles then fail with a typed error;
//! a channel keeps its connection open.

mod common;

use std::time::Duration;

use common::*;
use coney::store::{Faults, FaultyStore, MemoryStore, StoreError};
use coney::*;

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn persistent(ch: &Channel, queue: &str, body: &str) {
    ch.basic_publish(
        "",
        queue,
        BasicPublishOptions::default(),
        body.as_bytes(),
        BasicProperties::default().with_delivery_mode(2),
    )
    .unwrap();
}

fn assert_broker_closed<T: std::fmt::Debug>(r: coney::Result<T>) {
    let err = r.unwrap_err();
    assert!(err.is_broker_closed(), "{err:?}");
}

/// Closing a durable broker requeues what its channels held, writes it, and releases the
/// directory: a broker opened on it at once, in the same process, sees every message (the
/// unacked one back as ready). The old handles fail with the broker's close as the cause.
#[test]
fn close_releases_the_directory_while_handles_are_held() {
    let dir = TempDir::new("close-release");
    let broker = Broker::open(dir.path()).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
    for body in ["1", "2", "3"] {
        persistent(&ch, "q", body);
    }
    let mut consumer = consume(&ch, "q", "c");
    let delivery = consumer.recv_timeout(WAIT).unwrap();
    assert_eq!(body(&delivery), "1");

    broker.close().unwrap();
    assert!(broker.is_closed());

    let reopened = Broker::open(dir.path()).expect("the directory is released by close");
    let rconn = reopened.connect();
    let rch = rconn.channel().unwrap();
    let again: Vec<Delivery> = std::iter::from_fn(|| get(&rch, "q")).collect();
    assert_eq!(bodies(&again), ["1", "2", "3"]);
    assert!(
        again[0].redelivered(),
        "the unacked one was delivered before"
    );

    assert_broker_closed(ch.basic_get("q", BasicGetOptions::default()));
    assert_broker_closed(delivery.ack(BasicAckOptions::default()));
    assert!(ch.is_closed());
    assert!(
        ch.close_cause().unwrap().is_broker_closed(),
        "{:?}",
        ch.close_cause()
    );
    assert_eq!(
        conn.close_cause().as_deref(),
        Some(&CloseCause::BrokerClosed)
    );
    assert!(consumer.recv_timeout(WAIT).is_err(), "the consumer ended");
    assert_broker_closed(conn.channel().map(|_| ()));
    assert!(matches!(broker.sync(), Err(Error::BrokerClosed)));
    assert!(matches!(broker.size_on_disk(), Err(Error::BrokerClosed)));
    assert_broker_closed(broker.connect().channel().map(|_| ()));
    broker.close().expect("closing again is harmless");
    reopened.check_invariants().unwrap();
}

/// Dropping the application's last `Broker` handle closes the broker, even while a channel
/// of it is held: clones count, channels do not.
#[test]
fn dropping_the_last_broker_handle_releases_the_directory() {
    let dir = TempDir::new("drop-release");
    let broker = Broker::open(dir.path()).unwrap();
    let clone = broker.clone();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
    persistent(&ch, "q", "kept");
    drop(broker);
    assert!(!clone.is_closed(), "a clone still holds the broker");
    assert_eq!(ready(&ch, "q"), 1);
    drop(clone);

    assert_broker_closed(ch.basic_get("q", BasicGetOptions::default()));
    let reopened = Broker::open(dir.path()).expect("the directory is released by the drop");
    let rconn = reopened.connect();
    let rch = rconn.channel().unwrap();
    assert_eq!(get_all(&rch, "q"), ["kept"]);
}

/// A close returns the storage error when its final flush fails, and says so again when asked
/// again.
#[test]
fn close_returns_the_final_flush_failure() {
    let faults = Faults::new();
    let broker = Broker::builder()
        .open_store(FaultyStore::new(MemoryStore::new(), faults.clone()))
        .unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
    persistent(&ch, "q", "m");
    faults.fail_next_flush();
    let err = broker.close().unwrap_err();
    // The publish's own flush may be the one that fails; then the close hears of it too.
    assert!(
        matches!(&err, Error::Storage(StoreError::Storage(t) | StoreError::Poisoned(t))
            if t.contains("injected flush failure")),
        "{err:?}"
    );
    assert_eq!(broker.close().unwrap_err(), err);
}

/// An in-memory broker's close ends its consumers and lets a publisher waiting for flow
/// control go, with the broker's close as the error.
#[test]
fn close_wakes_waiting_consumers_and_publishers() {
    let limits = Limits {
        memory_high_watermark_bytes: 64 * 1024,
        ..Limits::default()
    };
    let broker = Broker::builder().limits(limits).in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    declare(&ch, "empty");
    declare(&ch, "backlog");
    let mut consumer = consume(&ch, "empty", "c");
    let publish = |ch: &Channel, timeout| {
        ch.basic_publish_timeout(
            "",
            "backlog",
            Default::default(),
            vec![0u8; 1024],
            Default::default(),
            timeout,
        )
    };
    while publish(&ch, Duration::from_millis(10)).is_ok() {}
    assert!(broker.health().publishers_blocked);
    let waiting_consumer = std::thread::spawn(move || consumer.recv().is_none());
    let publisher = ch.clone();
    let waiting_publisher = std::thread::spawn(move || publish(&publisher, WAIT * 4));
    broker.close().unwrap();
    assert!(waiting_consumer.join().unwrap(), "the consumer ended");
    let published = waiting_publisher.join().unwrap();
    assert!(
        published.as_ref().is_err_and(Error::is_broker_closed),
        "{published:?}"
    );
}

/// A channel keeps its connection open: `broker.connect().channel()` works, and the
/// connection (with its exclusive queues) goes when its last channel does.
#[test]
fn a_channel_keeps_its_connection_open() {
    let broker = Broker::in_memory();
    let ch = broker.connect().channel().unwrap();
    assert!(!ch.is_closed());
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    ch.queue_declare("mine", exclusive, FieldTable::new())
        .unwrap();
    publish(&ch, "", "mine", "m");
    assert_eq!(get_all(&ch, "mine"), ["m"]);
    let consumer = consume(&ch, "mine", "c");
    drop(ch);
    assert!(
        queue_exists(&broker, "mine"),
        "the consumer holds the channel"
    );
    drop(consumer);
    assert!(!queue_exists(&broker, "mine"), "the connection closed");
    broker.check_invariants().unwrap();
}

/// `Connection::close` closes its channels even while they are held.
#[test]
fn connection_close_closes_held_channels() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1"]);
    let d = get(&ch, "q").unwrap();
    conn.close();
    assert_eq!(
        ch.close_cause().as_deref(),
        Some(&CloseCause::Connection(std::sync::Arc::new(
            CloseCause::Client
        )))
    );
    assert!(d.ack(BasicAckOptions::default()).is_err());
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    assert_eq!(get_all(&ch, "q"), ["1"], "requeued by the close");
}

/// The broker's timers stop with it: a manual clock moved after the close expires nothing.
#[test]
fn close_stops_the_timers() {
    let clock = ManualClock::new(0);
    let broker = Broker::builder().clock(clock.clone()).in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    declare(&ch, "parked");
    let args = FieldTable::new()
        .with("x-message-ttl", 1_000i64)
        .with("x-dead-letter-exchange", "")
        .with("x-dead-letter-routing-key", "parked");
    ch.queue_declare("orders", QueueDeclareOptions::default(), args)
        .unwrap();
    publish_all(&ch, "orders", &["a", "b"]);
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        broker.death_stats("orders").unwrap().dead_lettered.expired,
        2
    );
    publish_all(&ch, "orders", &["c"]);
    broker.close().unwrap();
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        broker.death_stats("orders").unwrap().dead_lettered.expired,
        2,
        "nothing expires once closed"
    );
}
