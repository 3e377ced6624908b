//! Priority queues (https://www.rabbitmq.com/docs/priority): a classic queue with
//! `x-max-priority` delivers higher `priority` first, FIFO within a priority; a quorum queue
//! (RabbitMQ 4.0-4.2) has two levels served two high for one normal.

mod common;

use std::time::Duration;

use common::*;
use coney::store::MemoryStore;
use coney::*;

fn max_priority(max: i32) -> FieldTable {
    FieldTable::new().with("x-max-priority", max)
}

fn publish_priority(ch: &Channel, queue: &str, body: &str, priority: Option<u8>) {
    let props = BasicProperties {
        priority,
        ..Default::default()
    };
    ch.basic_publish(
        "",
        queue,
        Default::default(),
        body.as_bytes().to_vec(),
        props,
    )
    .unwrap_or_else(|e| panic!("publishing '{body}': {e}"));
}

/// Highest first, FIFO within a priority; no priority is 0; above the maximum is the maximum
/// (so 9 and 5 share a level on a queue of maximum 5, in arrival order).
#[test]
fn higher_priority_first_fifo_within_and_clamped() {
    let (_broker, _conn, ch) = setup();
    declare_args(&ch, "pq", max_priority(5));
    for (b, p) in [
        ("none", None),
        ("p3-a", Some(3)),
        ("p9", Some(9)),
        ("p5", Some(5)),
        ("p3-b", Some(3)),
        ("p0", Some(0)),
        ("p1", Some(1)),
    ] {
        publish_priority(&ch, "pq", b, p);
    }
    assert_eq!(ready(&ch, "pq"), 7);
    assert_eq!(
        get_all(&ch, "pq"),
        ["p9", "p5", "p3-a", "p3-b", "p1", "none", "p0"]
    );
}

/// A consumer that joins a backlog receives it in priority order; a queue without
/// `x-max-priority` ignores the property.
#[test]
fn consumers_receive_in_priority_order() {
    let (_broker, _conn, ch) = setup();
    declare_args(&ch, "pq", max_priority(10));
    declare(&ch, "plain");
    for q in ["pq", "plain"] {
        publish_priority(&ch, q, "low", Some(1));
        publish_priority(&ch, q, "high", Some(8));
        publish_priority(&ch, q, "mid", Some(4));
    }
    let mut c = consume(&ch, "pq", "c");
    assert_eq!(drain_bodies(&mut c), ["high", "mid", "low"]);
    let mut p = consume(&ch, "plain", "p");
    assert_eq!(drain_bodies(&mut p), ["low", "high", "mid"]);
}

/// A requeued message goes back to its own priority, at its original position there;
/// `basic.get` reports the ready messages left.
#[test]
fn requeue_returns_to_its_own_priority() {
    let (_broker, _conn, ch) = setup();
    declare_args(&ch, "pq", max_priority(5));
    publish_priority(&ch, "pq", "a1", Some(1));
    publish_priority(&ch, "pq", "b1", Some(1));
    publish_priority(&ch, "pq", "h5", Some(5));
    let h = get(&ch, "pq").unwrap();
    assert_eq!(body(&h), "h5");
    let g = ch
        .basic_get("pq", BasicGetOptions { no_ack: false })
        .unwrap()
        .unwrap();
    assert_eq!(body(&g.delivery), "a1");
    assert_eq!(g.message_count, 1, "b1 is left");
    publish_priority(&ch, "pq", "c1", Some(1));
    g.delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .unwrap();
    h.reject(BasicRejectOptions { requeue: true }).unwrap();
    assert_eq!(get_all(&ch, "pq"), ["h5", "a1", "b1", "c1"]);
}

/// `drop-head` drops the head as a fetch sees it: the highest priority first
/// (`rabbit_priority_queue:drop/2` takes the first non-empty priority, as `fetch/2` does).
#[test]
fn drop_head_drops_the_highest_priority_first() {
    let (_broker, _conn, ch) = setup();
    declare(&ch, "dlq");
    let args = max_priority(5)
        .with("x-max-length", 2i32)
        .with("x-dead-letter-exchange", "")
        .with("x-dead-letter-routing-key", "dlq");
    declare_args(&ch, "pq", args);
    publish_priority(&ch, "pq", "low-a", Some(0));
    publish_priority(&ch, "pq", "high", Some(5));
    publish_priority(&ch, "pq", "low-b", Some(0));
    assert_eq!(get_all(&ch, "dlq"), ["high"]);
    assert_eq!(get_all(&ch, "pq"), ["low-a", "low-b"]);
}

/// TTL expires at the head as deliveries see it: the high-priority message is the head though
/// published last, so it expires at its deadline; the low-priority one stays.
#[test]
fn ttl_expires_at_the_priority_head() {
    let clock = ManualClock::new(1_000);
    let broker = Broker::builder().clock(clock.clone()).in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    declare_args(&ch, "pq", max_priority(5));
    publish_priority(&ch, "pq", "low", Some(1));
    let mut expiring = BasicProperties::default().with_expiration("100");
    expiring.priority = Some(5);
    ch.basic_publish("", "pq", Default::default(), b"high".to_vec(), expiring)
        .unwrap();
    clock.advance(Duration::from_millis(100));
    assert_eq!(ready(&ch, "pq"), 1, "the expired head is gone");
    assert_eq!(get_all(&ch, "pq"), ["low"]);
    assert_eq!(broker.death_stats("pq").unwrap().dropped.expired, 1);
}

/// Purge empties every priority; the queue keeps its priorities afterwards.
#[test]
fn purge_empties_every_priority() {
    let (_broker, _conn, ch) = setup();
    declare_args(&ch, "pq", max_priority(3));
    for p in [0, 1, 2, 3] {
        publish_priority(&ch, "pq", "m", Some(p));
    }
    assert_eq!(ch.queue_purge("pq", Default::default()).unwrap(), 4);
    assert_eq!(ready(&ch, "pq"), 0);
    assert!(get(&ch, "pq").is_none());
    publish_priority(&ch, "pq", "after-low", Some(0));
    publish_priority(&ch, "pq", "after-high", Some(2));
    assert_eq!(get_all(&ch, "pq"), ["after-high", "after-low"]);
}

/// Persistent messages of a durable priority queue come back after a restart in the same
/// delivery order.
#[test]
fn durable_priority_queue_recovers_in_order() {
    let store = MemoryStore::new();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    {
        let broker = Broker::builder().open_store(store.clone()).unwrap();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        ch.queue_declare("pq", durable, max_priority(5)).unwrap();
        for (b, p) in [("l1", 1), ("h1", 5), ("l2", 1), ("m", 3), ("h2", 5)] {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_priority(p);
            ch.basic_publish("", "pq", Default::default(), b.as_bytes().to_vec(), props)
                .unwrap();
        }
        broker.sync().unwrap();
    }
    store.crash();
    let broker = Broker::builder().open_store(store).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    assert_eq!(get_all(&ch, "pq"), ["h1", "h2", "m", "l1", "l2"]);
    broker.check_invariants().unwrap();
}

/// Quorum queue (RabbitMQ 4.0-4.2, `rabbit_fifo_q`): priority above 4 is high, the rest
/// normal; while both wait, two high go for each normal one that is older than the high head.
#[test]
fn quorum_queue_serves_two_high_for_one_normal() {
    let (_broker, _conn, ch) = setup();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(
        "qq",
        durable,
        FieldTable::new().with("x-queue-type", "quorum"),
    )
    .unwrap();
    for b in ["n1", "n2", "n3"] {
        publish_priority(&ch, "qq", b, None);
    }
    for b in ["h1", "h2", "h3", "h4", "h5"] {
        publish_priority(&ch, "qq", b, Some(9));
    }
    publish_priority(&ch, "qq", "n4", Some(4));
    assert_eq!(
        get_all(&ch, "qq"),
        ["h1", "h2", "n1", "h3", "h4", "n2", "h5", "n3", "n4"]
    );
}
