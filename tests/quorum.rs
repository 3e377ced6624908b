//! Quorum-queue semantics on the one engine (SEMANTICS.md "How coney uses this page", §4.3,
//! §6): declaration rules, requeue to the front, the delivery limit and `x-delivery-count`.

mod common;

use common::*;
use coney::store::MemoryStore;
use coney::*;

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn quorum() -> FieldTable {
    FieldTable::new().with("x-queue-type", "quorum")
}

fn declare_quorum(ch: &Channel, name: &str, args: FieldTable) {
    ch.queue_declare(name, durable(), args)
        .unwrap_or_else(|e| panic!("declaring '{name}': {e}"));
}

fn delivery_count_header(d: &Delivery) -> Option<i64> {
    d.properties()
        .headers
        .as_ref()
        .and_then(|h| h.get("x-delivery-count"))
        .and_then(FieldValue::as_i64)
}

/// "How coney uses this page" (`rabbit_queue_type_util` checks): a quorum queue must be
/// durable, not exclusive and not auto-delete: 406 with RabbitMQ's texts.
#[test]
fn quorum_queues_are_durable_only() {
    let (_broker, conn, _ch) = setup();
    for (options, property) in [
        (
            QueueDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
            "auto-delete",
        ),
        (
            QueueDeclareOptions {
                durable: true,
                exclusive: true,
                ..Default::default()
            },
            "exclusive-owner",
        ),
        (QueueDeclareOptions::default(), "non-durable"),
    ] {
        let ch = conn.channel().unwrap();
        let r = ch.queue_declare("qq", options, quorum());
        let text = format!(
            "PRECONDITION_FAILED - invalid property '{property}' for queue 'qq' in vhost '/'"
        );
        channel_error(r, ReplyCode::PreconditionFailed, Some(&text));
    }
    let ch = conn.channel().unwrap();
    declare_quorum(&ch, "qq", quorum());
    // Arguments of classic queues only are refused.
    let r = ch.queue_declare("qq2", durable(), quorum().with("x-max-priority", 5i32));
    channel_error(
        r,
        ReplyCode::PreconditionFailed,
        Some(
            "PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue 'qq2' in vhost '/' of queue type rabbit_quorum_queue",
        ),
    );
    // The type is part of equivalence.
    let ch = conn.channel().unwrap();
    let r = ch.queue_declare("qq", durable(), FieldTable::new());
    channel_error(r, ReplyCode::PreconditionFailed, None);
}

/// §6.2 (4.0-4.2): `x-delivery-count` is absent on the first delivery, then counts returns;
/// §6.1: `x-delivery-limit` 1 → delivered twice, dead-lettered with `delivery_limit` on the
/// second failure (`subscribe_redelivery_limit`).
#[test]
fn delivery_limit_dead_letters_after_limit_plus_one_deliveries() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "dlq");
    let args = quorum()
        .with("x-delivery-limit", 1i32)
        .with("x-dead-letter-exchange", "")
        .with("x-dead-letter-routing-key", "dlq");
    declare_quorum(&ch, "qq", args);
    let mut c = consume(&ch, "qq", "c");
    publish(&ch, "", "qq", "poison");
    let first = c.try_recv().unwrap();
    assert_eq!(
        delivery_count_header(&first),
        None,
        "absent on the first delivery"
    );
    assert!(!first.redelivered());
    first
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .unwrap();
    let second = c.try_recv().unwrap();
    assert_eq!(delivery_count_header(&second), Some(1));
    assert!(second.redelivered());
    second.reject(BasicRejectOptions { requeue: true }).unwrap();
    assert!(c.try_recv().is_err(), "limit 1: no third delivery");
    let d = get(&ch, "dlq").expect("dead-lettered");
    assert_eq!(text(&death(&d, 0), "reason"), Some("delivery_limit"));
    assert_eq!(
        broker
            .death_stats("qq")
            .unwrap()
            .dead_lettered
            .delivery_limit,
        1
    );
}

/// §6.1: the default limit is 20 (21 deliveries), and the seed's "max retries: 3" is
/// `x-delivery-limit = 3` (4 deliveries); without a DLX the message is dropped and counted.
#[test]
fn default_and_small_limits() {
    let (broker, _conn, ch) = setup();
    for (name, args, deliveries) in [
        ("default", quorum(), 21),
        ("three", quorum().with("x-delivery-limit", 3i64), 4),
    ] {
        declare_quorum(&ch, name, args);
        publish(&ch, "", name, "m");
        let mut n = 0;
        while let Some(d) = get(&ch, name) {
            n += 1;
            d.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .unwrap();
        }
        assert_eq!(n, deliveries, "{name}");
        assert_eq!(broker.death_stats(name).unwrap().dropped.delivery_limit, 1);
    }
}

/// §6.2: channel loss and `basic.recover` count as returns too.
#[test]
fn channel_close_and_recover_count() {
    let (_broker, conn, ch) = setup();
    declare_quorum(&ch, "qq", quorum());
    publish(&ch, "", "qq", "m");
    {
        let other = conn.channel().unwrap();
        let _d = get(&other, "qq").unwrap();
        other.close();
    }
    let d = get(&ch, "qq").unwrap();
    assert_eq!(delivery_count_header(&d), Some(1), "the close counted");
    ch.basic_recover(BasicRecoverOptions { requeue: true })
        .unwrap();
    let d = get(&ch, "qq").unwrap();
    assert_eq!(delivery_count_header(&d), Some(2), "the recover counted");
}

/// §4.3: a quorum queue puts returned messages at the front, in return order; a classic queue
/// puts them back at their original positions.
#[test]
fn requeue_goes_to_the_front() {
    let (_broker, _conn, ch) = setup();
    declare_quorum(&ch, "qq", quorum());
    declare(&ch, "cq");
    for q in ["qq", "cq"] {
        publish_all(&ch, q, &["a", "b", "c"]);
        let a = get(&ch, q).unwrap();
        let b = get(&ch, q).unwrap();
        b.nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .unwrap();
        a.nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .unwrap();
    }
    assert_eq!(get_all(&ch, "qq"), ["b", "a", "c"]);
    assert_eq!(get_all(&ch, "cq"), ["a", "b", "c"]);
}

/// §6.1 with §9.2: the delivery count of a durable quorum queue's message survives a restart,
/// so the limit still holds across it.
#[test]
fn the_count_survives_a_restart() {
    let store = MemoryStore::new();
    {
        let broker = Broker::builder().open_store(store.clone()).unwrap();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        declare_quorum(&ch, "qq", quorum().with("x-delivery-limit", 2i32));
        let props = BasicProperties::default().with_delivery_mode(2);
        ch.basic_publish("", "qq", Default::default(), b"m".to_vec(), props)
            .unwrap();
        for _ in 0..2 {
            get(&ch, "qq")
                .unwrap()
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .unwrap();
        }
        broker.sync().unwrap();
    }
    store.crash();
    let broker = Broker::builder().open_store(store).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    let d = get(&ch, "qq").expect("recovered");
    assert_eq!(delivery_count_header(&d), Some(2));
    d.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .unwrap();
    assert!(
        get(&ch, "qq").is_none(),
        "third return: over the limit of 2"
    );
    assert_eq!(broker.death_stats("qq").unwrap().dropped.delivery_limit, 1);
}

/// §4.3 (RabbitMQ 4.0-4.2): without a delivery limit (`x-delivery-limit` -1), a nack or reject
/// with requeue (and `basic.recover`) re-appends the message at the tail; a return because
/// the channel closed still goes to the front.
#[test]
fn unlimited_requeue_goes_to_the_tail_and_channel_loss_to_the_front() {
    let (_broker, conn, ch) = setup();
    declare_quorum(&ch, "qq", quorum().with("x-delivery-limit", -1i32));
    publish_all(&ch, "qq", &["a", "b", "c"]);
    let a = get(&ch, "qq").unwrap();
    a.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .unwrap();
    let b = get(&ch, "qq").unwrap();
    assert_eq!(body(&b), "b");
    b.reject(BasicRejectOptions { requeue: true }).unwrap();
    let c = get(&ch, "qq").unwrap();
    ch.basic_recover(BasicRecoverOptions { requeue: true })
        .unwrap();
    let again = get(&ch, "qq").unwrap();
    assert_eq!(body(&again), "a", "c went to the tail, after a and b");
    assert!(again.redelivered());
    assert_eq!(delivery_count_header(&again), Some(1));
    again.ack(BasicAckOptions::default()).unwrap();
    drop(c);
    // A channel's loss returns its messages to the front.
    let other = conn.channel().unwrap();
    let b = get(&other, "qq").unwrap();
    assert_eq!(body(&b), "b");
    publish(&ch, "", "qq", "d");
    other.close();
    assert_eq!(get_all(&ch, "qq"), ["b", "c", "d"]);
}

/// §6.1: a negative delivery limit set by policy (with no argument) also makes requeues go to
/// the tail; with the default limit they go to the front.
#[test]
fn unlimited_by_policy_requeues_to_the_tail() {
    let (broker, _conn, ch) = setup();
    declare_quorum(&ch, "qq", quorum());
    let unlimited = Policy {
        pattern: "^qq$".into(),
        priority: 0,
        definition: PolicyDefinition {
            delivery_limit: Some(-1),
            ..Default::default()
        },
    };
    publish_all(&ch, "qq", &["a", "b"]);
    get(&ch, "qq")
        .unwrap()
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(get_all(&ch, "qq"), ["a", "b"], "limited: to the front");
    broker.set_policy("unlimited", unlimited).unwrap();
    publish_all(&ch, "qq", &["a", "b"]);
    get(&ch, "qq")
        .unwrap()
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(get_all(&ch, "qq"), ["b", "a"], "unlimited: to the tail");
}

/// A message re-appended at the tail of a durable quorum queue keeps that place and its
/// delivery count across a restart, and is stored once.
#[test]
fn tail_requeue_survives_a_restart() {
    let store = MemoryStore::new();
    {
        let broker = Broker::builder().open_store(store.clone()).unwrap();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        declare_quorum(&ch, "qq", quorum().with("x-delivery-limit", -1i32));
        for b in ["a", "b"] {
            let props = BasicProperties::default().with_delivery_mode(2);
            ch.basic_publish("", "qq", Default::default(), b.as_bytes().to_vec(), props)
                .unwrap();
        }
        get(&ch, "qq")
            .unwrap()
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .unwrap();
        broker.sync().unwrap();
    }
    store.crash();
    let broker = Broker::builder().open_store(store).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    assert_eq!(ready(&ch, "qq"), 2);
    let b = get(&ch, "qq").unwrap();
    assert_eq!(body(&b), "b");
    let a = get(&ch, "qq").unwrap();
    assert_eq!(body(&a), "a");
    assert_eq!(delivery_count_header(&a), Some(1));
    broker.check_invariants().unwrap();
}

/// RabbitMQ 4.0-4.2 re-appends a message requeued without delivery limit to the normal
/// priority level whatever its priority (`rabbit_fifo_q:in(no, ...)` for `#requeue{}`).
#[test]
fn unlimited_requeue_re_appends_at_normal_priority() {
    let (_broker, _conn, ch) = setup();
    declare_quorum(&ch, "qq", quorum().with("x-delivery-limit", -1i32));
    let high = BasicProperties::default().with_priority(9);
    ch.basic_publish("", "qq", Default::default(), b"high".to_vec(), high)
        .unwrap();
    publish(&ch, "", "qq", "normal");
    let d = get(&ch, "qq").unwrap();
    assert_eq!(body(&d), "high");
    d.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(get_all(&ch, "qq"), ["normal", "high"]);
}
