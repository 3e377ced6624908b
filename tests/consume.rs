//! Consumers, dispatch, prefetch, basic.get and basic.cancel (SEMANTICS.md §3, §11).

mod common;

use std::sync::mpsc;
use std::thread;

use coney::runtime::RecvTimeoutError;
use coney::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, BasicRejectOptions,
    FieldTable, QueueDeclareOptions, ReplyCode,
};

use common::*;

fn qos(ch: &coney::Channel, prefetch: u16) {
    ch.basic_qos(prefetch, BasicQosOptions::default()).unwrap();
}

fn priority(p: i32) -> FieldTable {
    FieldTable::new().with("x-priority", p)
}

fn exclusive_consumer() -> BasicConsumeOptions {
    BasicConsumeOptions {
        exclusive: true,
        ..Default::default()
    }
}

/// §3.1: an empty consumer tag gets a server-generated `amq.ctag-` + 22 base64url characters;
/// deliveries carry the tag.
#[test]
fn server_generated_consumer_tag() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    let mut c = consume(&ch, "q", "");
    let tag = c.tag().to_owned();
    assert!(tag.starts_with("amq.ctag-"), "{tag}");
    assert_eq!(tag.len(), "amq.ctag-".len() + 22, "{tag}");
    assert!(
        tag[9..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    let c2 = consume(&ch, "q", "");
    assert_ne!(c2.tag(), tag);
    publish(&ch, "", "q", "m");
    let d = c.try_recv().expect("first consumer in round-robin");
    assert_eq!(d.consumer_tag(), Some(tag.as_str()));
    d.ack(BasicAckOptions::default()).unwrap();
    broker.check_invariants().unwrap();
}

/// §3.1: consuming from a missing queue is a 404.
#[test]
fn consume_from_missing_queue_is_404() {
    let (broker, _conn, ch) = setup();
    let r = ch.basic_consume("missing", "c", Default::default(), FieldTable::new());
    channel_error(
        r.map(|_| ()),
        ReplyCode::NotFound,
        Some("NOT_FOUND - no queue 'missing' in vhost '/'"),
    );
    broker.check_invariants().unwrap();
}

/// §3.2: a consumer added to a queue with ready messages gets them at once, in FIFO order.
#[test]
fn consumer_gets_ready_messages_immediately() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2", "3"]);
    let mut c = consume(&ch, "q", "c");
    let ds = drain(&mut c);
    assert_eq!(bodies(&ds), ["1", "2", "3"]);
    assert!(ds.iter().all(|d| !d.redelivered()));
    assert_eq!(ready(&ch, "q"), 0);
    broker.check_invariants().unwrap();
}

/// §3.2: equal-priority consumers are served round-robin.
#[test]
fn round_robin_over_two_consumers() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    let mut c1 = consume(&ch, "q", "c1");
    let ch2 = conn.channel().unwrap();
    let mut c2 = consume(&ch2, "q", "c2");
    publish_all(&ch, "q", &["1", "2", "3", "4", "5", "6"]);
    assert_eq!(drain_bodies(&mut c1), ["1", "3", "5"]);
    assert_eq!(drain_bodies(&mut c2), ["2", "4", "6"]);
    broker.check_invariants().unwrap();
}

/// §3.3: basic.qos limits each new consumer's unacked deliveries; an ack frees credit and the
/// next ready message is delivered.
#[test]
fn prefetch_limits_unacked_per_consumer() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    qos(&ch, 2);
    let mut c = consume(&ch, "q", "c");
    publish_all(&ch, "q", &["1", "2", "3", "4", "5"]);
    let first = drain(&mut c);
    assert_eq!(bodies(&first), ["1", "2"]);
    assert_eq!(ready(&ch, "q"), 3);
    first[0].ack(BasicAckOptions::default()).unwrap();
    assert_eq!(drain_bodies(&mut c), ["3"]);
    ch.basic_ack(3, BasicAckOptions { multiple: true }).unwrap();
    let next = drain(&mut c);
    assert_eq!(bodies(&next), ["4", "5"]);
    assert_eq!(ready(&ch, "q"), 0);
    broker.check_invariants().unwrap();
}

/// §3.2/§3.3: a prefetch-blocked consumer is skipped, so others with credit take the messages.
#[test]
fn blocked_consumer_is_skipped() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    qos(&ch, 1);
    let mut c1 = consume(&ch, "q", "c1");
    let ch2 = conn.channel().unwrap();
    qos(&ch2, 3);
    let mut c2 = consume(&ch2, "q", "c2");
    publish_all(&ch, "q", &["1", "2", "3", "4", "5"]);
    assert_eq!(drain_bodies(&mut c1), ["1"]);
    assert_eq!(drain_bodies(&mut c2), ["2", "3", "4"]);
    assert_eq!(ready(&ch, "q"), 1);
    broker.check_invariants().unwrap();
}

/// §3.3: basic.qos (global=false) applies to consumers created afterwards; existing consumers
/// keep their limit.
#[test]
fn qos_applies_only_to_later_consumers() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    let mut unlimited = consume(&ch, "q", "unlimited");
    qos(&ch, 1);
    let mut limited = consume(&ch, "q", "limited");
    publish_all(&ch, "q", &["1", "2", "3", "4", "5", "6"]);
    assert_eq!(drain_bodies(&mut unlimited), ["1", "3", "4", "5", "6"]);
    assert_eq!(drain_bodies(&mut limited), ["2"]);

    declare(&ch, "q2");
    let mut one = consume(&ch, "q2", "one");
    qos(&ch, 10);
    publish_all(&ch, "q2", &["a", "b"]);
    assert_eq!(
        drain_bodies(&mut one),
        ["a"],
        "keeps the prefetch it was created with"
    );
    assert_eq!(ready(&ch, "q2"), 1);
    broker.check_invariants().unwrap();
}

/// §3.3: prefetch 0 means unlimited.
#[test]
fn prefetch_zero_is_unlimited() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    qos(&ch, 3);
    qos(&ch, 0);
    let mut c = consume(&ch, "q", "c");
    for i in 0..500 {
        publish(&ch, "", "q", &i.to_string());
    }
    assert_eq!(drain(&mut c).len(), 500);
    assert_eq!(ready(&ch, "q"), 0);
    broker.check_invariants().unwrap();
}

/// §3.3: basic.get ignores prefetch.
#[test]
fn basic_get_ignores_prefetch() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    qos(&ch, 1);
    publish_all(&ch, "q", &["1", "2", "3"]);
    let held: Vec<_> = (0..3).map(|_| get(&ch, "q").unwrap()).collect();
    assert_eq!(bodies(&held), ["1", "2", "3"]);
    broker.check_invariants().unwrap();
}

/// §3.1: while an exclusive consumer exists every other consume is a 403; it can be the only
/// one after its cancel frees the queue.
#[test]
fn exclusive_consumer_refuses_others() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    let mut ex = ch
        .basic_consume("q", "ex", exclusive_consumer(), FieldTable::new())
        .unwrap();
    let ch2 = conn.channel().unwrap();
    let r = ch2.basic_consume("q", "other", Default::default(), FieldTable::new());
    channel_error(
        r.map(|_| ()),
        ReplyCode::AccessRefused,
        Some("ACCESS_REFUSED - queue 'q' in vhost '/' in exclusive use"),
    );
    publish(&ch, "", "q", "m");
    let d = ex.try_recv().expect("the exclusive consumer still works");
    d.ack(BasicAckOptions::default()).unwrap();

    ch.basic_cancel("ex", Default::default()).unwrap();
    let ch3 = conn.channel().unwrap();
    let _c = consume(&ch3, "q", "after");
    broker.check_invariants().unwrap();
}

/// §3.1: an exclusive consume on a queue that already has a consumer is a 403.
#[test]
fn exclusive_consume_refused_when_queue_has_consumer() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    let mut c = consume(&ch, "q", "first");
    let ch2 = conn.channel().unwrap();
    let r = ch2.basic_consume("q", "ex", exclusive_consumer(), FieldTable::new());
    channel_error(
        r.map(|_| ()),
        ReplyCode::AccessRefused,
        Some("ACCESS_REFUSED - queue 'q' in vhost '/' in exclusive use"),
    );
    publish(&ch, "", "q", "m");
    assert_eq!(drain_bodies(&mut c), ["m"]);
    broker.check_invariants().unwrap();
}

/// §3.1: reusing an active consumer tag on the same channel is a 530 connection error.
#[test]
fn consumer_tag_reuse_on_same_channel_is_530() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    declare(&ch, "q2");
    let _c = consume(&ch, "q", "dup");
    let r = ch.basic_consume("q2", "dup", Default::default(), FieldTable::new());
    connection_error(
        r.map(|_| ()),
        ReplyCode::NotAllowed,
        Some("NOT_ALLOWED - attempt to reuse consumer tag 'dup'"),
    );
    assert!(conn.is_closed());
    assert!(ch.is_closed());
    broker.check_invariants().unwrap();
}

/// §3.1: tags are scoped per channel (the same tag on another channel is fine) and a tag can
/// be reused after its consumer is cancelled.
#[test]
fn consumer_tags_are_per_channel_and_reusable_after_cancel() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    let _a = consume(&ch, "q", "same");
    let ch2 = conn.channel().unwrap();
    let _b = consume(&ch2, "q", "same");
    assert_eq!(passive(&ch, "q").unwrap().consumer_count, 2);
    ch2.basic_cancel("same", Default::default()).unwrap();
    let mut again = consume(&ch2, "q", "same");
    ch.basic_cancel("same", Default::default()).unwrap();
    publish(&ch, "", "q", "m");
    assert_eq!(drain_bodies(&mut again), ["m"]);
    assert!(!conn.is_closed());
    broker.check_invariants().unwrap();
}

/// §11.1: a server-cancelled consumer's tag is free again; dropping the old, ended handle
/// must not cancel the new consumer that reuses the tag.
#[test]
fn stale_consumer_handle_does_not_cancel_reused_tag() {
    let (broker, conn, ch) = setup();
    declare(&ch, "doomed");
    declare(&ch, "next");
    let mut old = consume(&ch, "doomed", "tag");
    conn.channel()
        .unwrap()
        .queue_delete("doomed", Default::default())
        .unwrap();
    assert!(matches!(
        old.recv_timeout(WAIT),
        Err(RecvTimeoutError::Disconnected)
    ));
    let mut new = consume(&ch, "next", "tag");
    drop(old);
    publish(&ch, "", "next", "m");
    assert_eq!(drain_bodies(&mut new), ["m"]);
    assert_eq!(passive(&ch, "next").unwrap().consumer_count, 1);
    broker.check_invariants().unwrap();
}

/// §11.2: the highest x-priority consumer gets every message while it has credit; when it is
/// blocked by prefetch, lower priorities get them; negative priorities are allowed.
#[test]
fn higher_priority_consumer_served_first() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    let mut low = ch
        .basic_consume("q", "low", Default::default(), FieldTable::new())
        .unwrap();
    let mut negative = ch
        .basic_consume("q", "neg", Default::default(), priority(-5))
        .unwrap();
    let ch_high = conn.channel().unwrap();
    qos(&ch_high, 2);
    let mut high = ch_high
        .basic_consume("q", "high", Default::default(), priority(10))
        .unwrap();
    publish_all(&ch, "q", &["1", "2", "3", "4"]);
    let got_high = drain(&mut high);
    assert_eq!(bodies(&got_high), ["1", "2"]);
    assert_eq!(drain_bodies(&mut low), ["3", "4"]);
    assert!(drain(&mut negative).is_empty());

    ch_high
        .basic_ack(
            got_high[1].delivery_tag(),
            BasicAckOptions { multiple: true },
        )
        .unwrap();
    publish_all(&ch, "q", &["5", "6", "7"]);
    assert_eq!(drain_bodies(&mut high), ["5", "6"]);
    assert_eq!(drain_bodies(&mut low), ["7"]);
    assert!(drain(&mut negative).is_empty());
    broker.check_invariants().unwrap();
}

/// §3.1: a non-integer x-priority is a 406.
#[test]
fn non_integer_priority_is_refused() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    let r = ch.basic_consume(
        "q",
        "c",
        Default::default(),
        FieldTable::new().with("x-priority", "high"),
    );
    channel_error(r.map(|_| ()), ReplyCode::PreconditionFailed, None);
    broker.check_invariants().unwrap();
}

/// §3.5/§4.2: no-ack deliveries still take delivery tags, but those tags cannot be acked
/// (406 unknown delivery tag) and the messages are gone from the queue.
#[test]
fn no_ack_consumer() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish(&ch, "", "q", "got");
    let first = get(&ch, "q").unwrap();
    assert_eq!(first.delivery_tag(), 1);
    let mut c = ch
        .basic_consume(
            "q",
            "c",
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::new(),
        )
        .unwrap();
    publish_all(&ch, "q", &["a", "b", "c"]);
    let ds = drain(&mut c);
    assert_eq!(bodies(&ds), ["a", "b", "c"]);
    let tags: Vec<u64> = ds.iter().map(|d| d.delivery_tag()).collect();
    assert_eq!(tags, [2, 3, 4]);
    assert_eq!(ready(&ch, "q"), 0);
    first.ack(BasicAckOptions::default()).unwrap();

    channel_error(
        ds[0].ack(BasicAckOptions::default()),
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - unknown delivery tag 2"),
    );
    assert!(ch.is_closed());
    let ch2 = conn.channel().unwrap();
    assert_eq!(ready(&ch2, "q"), 0, "no-ack messages are never requeued");
    broker.check_invariants().unwrap();
}

/// §3.4: basic.get returns Ok(None) on an empty queue and otherwise the head message with the
/// ready count remaining after it; no-ack gets settle at once.
#[test]
fn basic_get_semantics() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    assert!(
        ch.basic_get("q", BasicGetOptions::default())
            .unwrap()
            .is_none()
    );
    assert!(!ch.is_closed());
    publish_all(&ch, "q", &["1", "2", "3"]);

    let g = ch
        .basic_get("q", BasicGetOptions { no_ack: false })
        .unwrap()
        .unwrap();
    assert_eq!(g.message_count, 2);
    assert_eq!(body(&g.delivery), "1");
    assert_eq!(g.delivery.delivery_tag(), 1);
    assert!(!g.delivery.redelivered());
    assert_eq!(g.delivery.consumer_tag(), None);
    assert_eq!(g.delivery.exchange(), "");
    assert_eq!(g.delivery.routing_key(), "q");

    let g2 = ch
        .basic_get("q", BasicGetOptions { no_ack: true })
        .unwrap()
        .unwrap();
    assert_eq!((body(&g2.delivery), g2.message_count), ("2".into(), 1));
    assert_eq!(g2.delivery.delivery_tag(), 2);
    let g3 = ch
        .basic_get("q", BasicGetOptions { no_ack: true })
        .unwrap()
        .unwrap();
    assert_eq!((body(&g3.delivery), g3.message_count), ("3".into(), 0));
    assert!(
        ch.basic_get("q", BasicGetOptions::default())
            .unwrap()
            .is_none()
    );

    ch.close();
    let ch2 = conn.channel().unwrap();
    assert_eq!(
        get_all(&ch2, "q"),
        ["1"],
        "only the manual-ack get is requeued"
    );
    broker.check_invariants().unwrap();
}

/// §3.4/§1.6: basic.get does not register a consumer: consumer_count stays 0 and an
/// auto-delete queue polled only with basic.get is never deleted.
#[test]
fn basic_get_is_not_a_consumer() {
    let (broker, conn, ch) = setup();
    ch.queue_declare(
        "ad",
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::new(),
    )
    .unwrap();
    publish_all(&ch, "ad", &["1", "2"]);
    let d = get(&ch, "ad").unwrap();
    assert_eq!(passive(&ch, "ad").unwrap().consumer_count, 0);
    d.reject(BasicRejectOptions { requeue: true }).unwrap();
    assert_eq!(get_all(&ch, "ad"), ["1", "2"]);
    ch.close();
    drop(conn);
    assert!(queue_exists(&broker, "ad"));
    broker.check_invariants().unwrap();
}

/// §11.1/§4.4: basic.cancel ends the consumer's iterator after the deliveries already made;
/// messages published afterwards stay ready; cancelling an unknown tag is fine.
#[test]
fn basic_cancel_ends_the_iterator() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    let mut c = consume(&ch, "q", "c");
    publish_all(&ch, "q", &["1", "2"]);
    ch.basic_cancel("c", Default::default()).unwrap();
    let mut got = Vec::new();
    loop {
        match c.recv_timeout(WAIT) {
            Ok(d) => got.push(d),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("a cancelled consumer must end"),
        }
    }
    assert_eq!(bodies(&got), ["1", "2"]);
    assert!(c.recv().is_none());
    publish(&ch, "", "q", "after");
    assert_eq!(ready(&ch, "q"), 1);
    assert_eq!(passive(&ch, "q").unwrap().consumer_count, 0);
    for d in &got {
        d.ack(BasicAckOptions::default()).unwrap();
    }
    ch.basic_cancel("c", Default::default()).unwrap();
    ch.basic_cancel("never-existed", Default::default())
        .unwrap();
    assert!(!ch.is_closed());
    broker.check_invariants().unwrap();
}

/// §3.1: dropping a consumer handle cancels it: later messages go to the remaining consumer.
#[test]
fn dropping_a_consumer_cancels_it() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    let c1 = consume(&ch, "q", "c1");
    let mut c2 = consume(&ch, "q", "c2");
    drop(c1);
    assert_eq!(passive(&ch, "q").unwrap().consumer_count, 1);
    publish_all(&ch, "q", &["1", "2"]);
    assert_eq!(drain_bodies(&mut c2), ["1", "2"]);
    broker.check_invariants().unwrap();
}

/// §3.2: a consumer thread iterating `for d in consumer` receives and acks every message the
/// main thread publishes, in order; the iterator ends once the main thread cancels.
#[test]
fn consumer_thread_receives_all() {
    const N: usize = 1000;
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    let consumer = consume(&ch, "q", "worker");
    let worker = thread::spawn(move || {
        let mut got = Vec::new();
        for d in consumer {
            got.push(body(&d));
            d.ack(BasicAckOptions::default())
                .expect("ack from the consumer thread");
        }
        got
    });
    for i in 0..N {
        publish(&ch, "", "q", &i.to_string());
    }
    ch.basic_cancel("worker", Default::default()).unwrap();
    let got = worker.join().expect("consumer thread");
    let expected: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert_eq!(got, expected);
    assert_eq!(ready(&ch, "q"), 0);
    broker.check_invariants().unwrap();
}

/// §3.2/§3.3: two consumer threads with prefetch 1 share the work: each message is delivered
/// exactly once, acks on the consumer threads release the next deliveries.
#[test]
fn competing_consumer_threads_with_prefetch() {
    const N: usize = 400;
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    qos(&ch, 1);
    let (tx, rx) = mpsc::channel::<String>();
    let workers: Vec<_> = ["w1", "w2"]
        .into_iter()
        .map(|tag| {
            let mut c = consume(&ch, "q", tag);
            let tx = tx.clone();
            thread::spawn(move || {
                let mut n = 0usize;
                while let Ok(d) = c.recv_timeout(WAIT) {
                    let b = body(&d);
                    d.ack(BasicAckOptions::default())
                        .expect("ack from a consumer thread");
                    tx.send(b).expect("main thread listens");
                    n += 1;
                }
                n
            })
        })
        .collect();
    drop(tx);
    for i in 0..N {
        publish(&ch, "", "q", &i.to_string());
    }
    let mut seen: Vec<usize> = (0..N)
        .map(|_| rx.recv_timeout(WAIT).expect("every message is consumed"))
        .map(|b| b.parse().unwrap())
        .collect();
    ch.basic_cancel("w1", Default::default()).unwrap();
    ch.basic_cancel("w2", Default::default()).unwrap();
    let per_worker: Vec<usize> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert_eq!(per_worker.iter().sum::<usize>(), N);
    seen.sort_unstable();
    assert_eq!(seen, (0..N).collect::<Vec<_>>());
    assert_eq!(ready(&ch, "q"), 0);
    broker.check_invariants().unwrap();
}

/// §3.3: prefetch only limits manual-ack consumers: a no-ack consumer receives every message,
/// however many, even on a channel with a prefetch set.
#[test]
fn no_ack_consumer_ignores_prefetch() {
    const N: usize = 3000;
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    qos(&ch, 1);
    for i in 0..N {
        publish(&ch, "", "q", &i.to_string());
    }
    let mut c = ch
        .basic_consume(
            "q",
            "c",
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::new(),
        )
        .unwrap();
    let got = drain_bodies(&mut c);
    let expected: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert_eq!(got, expected);
    assert_eq!(ready(&ch, "q"), 0);
    broker.check_invariants().unwrap();
}

/// §3.3 (<=4.2 profile): `global = true` sets one limit shared by every consumer of the
/// channel, across queues; an ack frees one delivery's worth for whichever consumer takes it.
#[test]
fn global_qos_is_shared_by_the_channels_consumers() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "a");
    declare(&ch, "b");
    publish_all(&ch, "a", &["a1", "a2", "a3"]);
    publish_all(&ch, "b", &["b1", "b2", "b3"]);
    ch.basic_qos(2, BasicQosOptions { global: true }).unwrap();
    let mut ca = consume(&ch, "a", "ca");
    let mut cb = consume(&ch, "b", "cb");
    let got_a = drain(&mut ca);
    let got_b = drain(&mut cb);
    assert_eq!(
        bodies(&got_a),
        ["a1", "a2"],
        "the first consumer takes the shared credit"
    );
    assert!(got_b.is_empty(), "nothing left for the second consumer");
    got_a[0].ack(BasicAckOptions::default()).unwrap();
    let more = drain(&mut ca).len() + drain(&mut cb).len();
    assert_eq!(
        more, 1,
        "one ack frees exactly one delivery of the shared credit"
    );
    broker.check_invariants().unwrap();
}

/// §3.3 (<=4.2 profile): the per-consumer and the channel-wide limits both apply; raising the
/// global limit delivers at once.
#[test]
fn global_and_per_consumer_prefetch_both_apply() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "a");
    declare(&ch, "b");
    publish_all(&ch, "a", &["a1", "a2"]);
    publish_all(&ch, "b", &["b1", "b2"]);
    ch.basic_qos(1, BasicQosOptions::default()).unwrap();
    ch.basic_qos(1, BasicQosOptions { global: true }).unwrap();
    let mut ca = consume(&ch, "a", "ca");
    let mut cb = consume(&ch, "b", "cb");
    assert_eq!(drain_bodies(&mut ca), ["a1"]);
    assert!(drain(&mut cb).is_empty(), "global limit 1 reached");
    ch.basic_qos(5, BasicQosOptions { global: true }).unwrap();
    assert_eq!(
        drain_bodies(&mut cb),
        ["b1"],
        "per-consumer limit 1 still holds"
    );
    assert!(drain(&mut ca).is_empty());
    broker.check_invariants().unwrap();
}
