//! Single active consumer (`x-single-active-consumer`,
//! https://www.rabbitmq.com/docs/consumers#single-active-consumer): one consumer receives at a
//! time; the others wait and take over, in RabbitMQ 4.2's order, when it goes.

mod common;

use common::*;
use coney::*;

fn sac() -> FieldTable {
    FieldTable::new().with("x-single-active-consumer", true)
}

fn quorum_sac() -> FieldTable {
    sac().with("x-queue-type", "quorum")
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn consume_priority(ch: &Channel, queue: &str, tag: &str, priority: i32) -> Consumer {
    ch.basic_consume(
        queue,
        tag,
        BasicConsumeOptions::default(),
        FieldTable::new().with("x-priority", priority),
    )
    .unwrap_or_else(|e| panic!("consuming from '{queue}': {e}"))
}

/// Only the first registered consumer receives; the others wait and still count in the
/// declare-ok `consumer_count` (RabbitMQ counts waiting consumers too).
#[test]
fn only_the_first_consumer_receives() {
    let (_broker, conn, ch) = setup();
    let ch2 = conn.channel().unwrap();
    for (q, args) in [("cq", sac()), ("qq", quorum_sac())] {
        ch.queue_declare(q, durable(), args).unwrap();
        let mut first = consume(&ch, q, "first");
        let mut second = consume(&ch2, q, "second");
        publish_all(&ch, q, &["a", "b", "c", "d"]);
        assert_eq!(drain_bodies(&mut first), ["a", "b", "c", "d"], "{q}");
        assert!(drain(&mut second).is_empty(), "{q}: the second waits");
        assert_eq!(passive(&ch, q).unwrap().consumer_count, 2, "{q}");
    }
}

/// After `basic.cancel` of the active consumer the next one takes over at once; the cancelled
/// consumer's unacked messages stay with its channel and can still be acked.
#[test]
fn cancel_hands_over_and_unacked_stay_outstanding() {
    for (q, args) in [("cq", sac()), ("qq", quorum_sac())] {
        let (_broker, conn, ch) = setup();
        let ch2 = conn.channel().unwrap();
        ch.queue_declare(q, durable(), args).unwrap();
        ch.basic_qos(2, Default::default()).unwrap();
        let mut first = consume(&ch, q, "first");
        let mut second = consume(&ch2, q, "second");
        publish_all(&ch, q, &["a", "b", "c"]);
        let held = drain(&mut first);
        assert_eq!(bodies(&held), ["a", "b"], "{q}: prefetch 2");
        assert!(drain(&mut second).is_empty());
        ch.basic_cancel("first", Default::default()).unwrap();
        assert_eq!(
            drain_bodies(&mut second),
            ["c"],
            "{q}: the second took over"
        );
        for d in &held {
            d.ack(BasicAckOptions::default()).unwrap();
        }
        assert_eq!(ready(&ch2, q), 0, "{q}");
        publish(&ch, "", q, "d");
        assert_eq!(drain_bodies(&mut second), ["d"], "{q}");
    }
}

/// When the active consumer's channel closes, its unacked messages are requeued before the
/// next consumer takes over, so that one receives them first.
#[test]
fn channel_close_requeues_before_handing_over() {
    for (q, args, expected) in [
        // classic: original positions; quorum: returns first
        ("cq", sac(), ["a", "b", "c"]),
        ("qq", quorum_sac(), ["a", "b", "c"]),
    ] {
        let (_broker, conn, ch) = setup();
        let ch1 = conn.channel().unwrap();
        ch.queue_declare(q, durable(), args).unwrap();
        ch1.basic_qos(2, Default::default()).unwrap();
        let mut first = consume(&ch1, q, "first");
        let mut second = consume(&ch, q, "second");
        publish_all(&ch, q, &["a", "b", "c"]);
        assert_eq!(drain_bodies(&mut first), ["a", "b"]);
        ch1.close();
        let got = drain(&mut second);
        assert_eq!(bodies(&got), expected, "{q}");
        assert!(got[0].redelivered() && got[1].redelivered() && !got[2].redelivered());
        assert_eq!(passive(&ch, q).unwrap().consumer_count, 1);
    }
}

/// Classic queues: a higher-priority consumer that registers later does not take over; when
/// the active one goes, the waiting consumer of highest priority does.
#[test]
fn classic_next_active_is_the_highest_priority_waiting() {
    let (_broker, _conn, ch) = setup();
    declare_args(&ch, "cq", sac());
    let mut first = consume_priority(&ch, "cq", "first", 0);
    let mut low = consume_priority(&ch, "cq", "low", 0);
    let mut high = consume_priority(&ch, "cq", "high", 5);
    publish(&ch, "", "cq", "a");
    assert_eq!(
        drain_bodies(&mut first),
        ["a"],
        "no take-over on a classic queue"
    );
    assert!(drain(&mut high).is_empty());
    ch.basic_cancel("first", Default::default()).unwrap();
    publish(&ch, "", "cq", "b");
    assert_eq!(drain_bodies(&mut high), ["b"]);
    assert!(drain(&mut low).is_empty());
}

/// Quorum queues: a higher-priority consumer takes over once the active one has settled what
/// it holds; until then nobody receives.
#[test]
fn quorum_higher_priority_takes_over_after_settling() {
    let (_broker, _conn, ch) = setup();
    ch.queue_declare("qq", durable(), quorum_sac()).unwrap();
    let mut low = consume_priority(&ch, "qq", "low", 0);
    publish(&ch, "", "qq", "a");
    let a = drain(&mut low);
    assert_eq!(bodies(&a), ["a"]);
    let mut high = consume_priority(&ch, "qq", "high", 5);
    publish(&ch, "", "qq", "b");
    assert!(drain(&mut low).is_empty(), "the active one quiesces");
    assert!(
        drain(&mut high).is_empty(),
        "and hands over only when settled"
    );
    a[0].ack(BasicAckOptions::default()).unwrap();
    assert_eq!(drain_bodies(&mut high), ["b"]);
    publish(&ch, "", "qq", "c");
    assert_eq!(drain_bodies(&mut high), ["c"]);
    assert!(drain(&mut low).is_empty());
}

/// An exclusive consume of a classic single-active-consumer queue is refused with 403.
#[test]
fn exclusive_consume_is_refused() {
    let (_broker, _conn, ch) = setup();
    declare_args(&ch, "cq", sac());
    let r = ch.basic_consume(
        "cq",
        "x",
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::new(),
    );
    channel_error(
        r.map(|c| c.tag().to_owned()),
        ReplyCode::AccessRefused,
        Some("ACCESS_REFUSED - queue 'cq' in vhost '/' in exclusive use"),
    );
}

/// `basic.get` on a quorum single-active-consumer queue is refused with 405; a classic one
/// allows it.
#[test]
fn basic_get_on_a_quorum_sac_queue_is_refused() {
    let (_broker, _conn, ch) = setup();
    declare_args(&ch, "cq", sac());
    publish(&ch, "", "cq", "m");
    assert_eq!(get_all(&ch, "cq"), ["m"]);
    ch.queue_declare("qq", durable(), quorum_sac()).unwrap();
    let r = ch.basic_get("qq", BasicGetOptions { no_ack: true });
    channel_error(
        r,
        ReplyCode::ResourceLocked,
        Some(
            "RESOURCE_LOCKED - cannot obtain access to locked queue 'qq' in vhost '/'. basic.get operations are not supported by quorum queues with single active consumer",
        ),
    );
}

/// The broker-wide invariants hold with waiting consumers around.
#[test]
fn invariants_hold_with_waiting_consumers() {
    let (broker, _conn, ch) = setup();
    declare_args(&ch, "cq", sac());
    let mut c = (0..3)
        .map(|i| consume(&ch, "cq", &format!("c{i}")))
        .collect::<Vec<_>>();
    publish_all(&ch, "cq", &["a", "b"]);
    broker.check_invariants().unwrap();
    let got = drain(&mut c[0]);
    assert_eq!(got.len(), 2);
    got[0]
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .unwrap();
    broker.check_invariants().unwrap();
    assert_eq!(
        drain_bodies(&mut c[0]),
        ["a"],
        "back to the active consumer"
    );
    assert!(drain(&mut c[1]).is_empty() && drain(&mut c[2]).is_empty());
}
