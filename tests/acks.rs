//! Acknowledgements, negative acks, requeue and what happens to unacked messages on lifecycle
//! events (SEMANTICS.md §3.5, §3.6, §4).

mod common;

use coney::{
    BasicAckOptions, BasicNackOptions, BasicRecoverOptions, BasicRejectOptions, Delivery, ReplyCode,
};

use common::*;

fn tags(ds: &[Delivery]) -> Vec<u64> {
    ds.iter().map(Delivery::delivery_tag).collect()
}

const MULTIPLE: BasicAckOptions = BasicAckOptions { multiple: true };

/// §3.5: delivery tags start at 1 on each channel, count consumer deliveries and gets
/// together, and are independent across channels.
#[test]
fn delivery_tags_start_at_one_per_channel() {
    let (broker, conn, ch1) = setup();
    let ch2 = conn.channel().unwrap();
    declare(&ch1, "q1");
    declare(&ch1, "q2");
    publish_all(&ch1, "q1", &["a", "b", "c"]);
    publish_all(&ch1, "q2", &["x", "y"]);
    let g = get(&ch1, "q1").unwrap();
    let mut c1 = consume(&ch1, "q1", "c1");
    let mut c2 = consume(&ch2, "q2", "c2");
    let d1 = drain(&mut c1);
    let d2 = drain(&mut c2);
    assert_eq!(g.delivery_tag(), 1);
    assert_eq!(tags(&d1), [2, 3]);
    assert_eq!(tags(&d2), [1, 2]);
    broker.check_invariants().unwrap();
}

/// §4.1: ack with multiple settles every outstanding tag up to and including the given one.
#[test]
fn ack_multiple_settles_up_to_tag() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2", "3", "4", "5"]);
    let mut c = consume(&ch, "q", "c");
    let ds = drain(&mut c);
    assert_eq!(tags(&ds), [1, 2, 3, 4, 5]);
    ch.basic_ack(3, MULTIPLE).unwrap();
    ch.close();
    let ch2 = conn.channel().unwrap();
    assert_eq!(get_all(&ch2, "q"), ["4", "5"], "only 4 and 5 were unacked");
    broker.check_invariants().unwrap();
}

/// §4.1 (amqpl_consumer_ack_SUITE:requeue_one_channel_classic_queue): nack multiple with
/// requeue redelivers 1, 2, 3 in their original order, flagged redelivered, with new tags.
#[test]
fn nack_multiple_requeue_redelivers_in_order() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    let mut c = consume(&ch, "q", "c");
    publish_all(&ch, "q", &["1", "2", "3"]);
    let first = drain(&mut c);
    assert_eq!(tags(&first), [1, 2, 3]);
    ch.basic_nack(
        3,
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    )
    .unwrap();
    let again = drain(&mut c);
    assert_eq!(bodies(&again), ["1", "2", "3"]);
    assert!(again.iter().all(Delivery::redelivered));
    assert_eq!(tags(&again), [4, 5, 6]);
    ch.basic_ack(6, MULTIPLE).unwrap();
    assert_eq!(ready(&ch, "q"), 0);
    broker.check_invariants().unwrap();
}

/// §4.1/§5.2: reject without requeue drops the message (no dead-letter exchange configured).
#[test]
fn reject_without_requeue_drops() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2"]);
    let d = get(&ch, "q").unwrap();
    ch.basic_reject(d.delivery_tag(), BasicRejectOptions { requeue: false })
        .unwrap();
    let n = get(&ch, "q").unwrap();
    ch.basic_nack(
        n.delivery_tag(),
        BasicNackOptions {
            multiple: false,
            requeue: false,
        },
    )
    .unwrap();
    ch.close();
    let ch2 = conn.channel().unwrap();
    assert_eq!(ready(&ch2, "q"), 0);
    broker.check_invariants().unwrap();
}

/// §4.3: a requeued classic-queue message returns to its original position, ahead of every
/// message published after it.
#[test]
fn requeue_returns_to_original_position() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2", "3", "4"]);
    let d1 = get(&ch, "q").unwrap();
    let d2 = get(&ch, "q").unwrap();
    let d3 = get(&ch, "q").unwrap();
    d3.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .unwrap();
    d1.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .unwrap();
    d2.ack(BasicAckOptions::default()).unwrap();
    publish(&ch, "", "q", "5");
    let order: Vec<(String, bool)> = std::iter::from_fn(|| get(&ch, "q"))
        .map(|d| {
            let r = (body(&d), d.redelivered());
            d.ack(BasicAckOptions::default()).unwrap();
            r
        })
        .collect();
    assert_eq!(
        order,
        [
            ("1".into(), true),
            ("3".into(), true),
            ("4".into(), false),
            ("5".into(), false)
        ]
    );
    broker.check_invariants().unwrap();
}

/// §4.2 (InvalidAcks): acking a tag twice is a 406 `unknown delivery tag` that closes the
/// channel.
#[test]
fn double_ack_is_406() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    publish(&ch, "", "q", "m");
    let d = get(&ch, "q").unwrap();
    d.ack(BasicAckOptions::default()).unwrap();
    channel_error(
        d.ack(BasicAckOptions::default()),
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - unknown delivery tag 1"),
    );
    assert!(ch.is_closed());
    closed_with(
        ch.basic_get("q", Default::default()).map(|_| ()),
        Some(ReplyCode::PreconditionFailed),
    );
    broker.check_invariants().unwrap();
}

/// §4.2: ack multiple with a tag that is not itself outstanding is a 406 and acks nothing
/// (the channel's unacked messages are requeued by the close instead).
#[test]
fn ack_multiple_with_unknown_tag_acks_nothing() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2", "3"]);
    let ds: Vec<Delivery> = (0..3).map(|_| get(&ch, "q").unwrap()).collect();
    ds[1].ack(BasicAckOptions::default()).unwrap();
    channel_error(
        ch.basic_ack(2, MULTIPLE),
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - unknown delivery tag 2"),
    );
    let ch2 = conn.channel().unwrap();
    assert_eq!(get_all(&ch2, "q"), ["1", "3"]);

    let ch3 = conn.channel().unwrap();
    publish(&ch3, "", "q", "4");
    let _held = get(&ch3, "q").unwrap();
    channel_error(
        ch3.basic_ack(99, MULTIPLE),
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - unknown delivery tag 99"),
    );
    let ch4 = conn.channel().unwrap();
    assert_eq!(
        ready(&ch4, "q"),
        1,
        "tag 1 was not acked by the failed multiple"
    );
    broker.check_invariants().unwrap();
}

/// §4.1: ack(0, multiple) acks every outstanding delivery; ack(0) alone is an unknown tag.
#[test]
fn ack_zero_multiple_acks_all() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2", "3"]);
    let mut c = consume(&ch, "q", "c");
    assert_eq!(drain(&mut c).len(), 3);
    ch.basic_ack(0, MULTIPLE).unwrap();
    ch.close();
    let ch2 = conn.channel().unwrap();
    assert_eq!(ready(&ch2, "q"), 0);

    publish(&ch2, "", "q", "4");
    let _d = get(&ch2, "q").unwrap();
    channel_error(
        ch2.basic_ack(0, BasicAckOptions::default()),
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - unknown delivery tag 0"),
    );
    broker.check_invariants().unwrap();
}

/// §3.5/§4.2: delivery tags mean nothing on another channel: acking there is a 406, and the
/// original channel can still ack.
#[test]
fn ack_on_another_channel_is_406() {
    let (broker, conn, ch1) = setup();
    declare(&ch1, "q");
    publish(&ch1, "", "q", "m");
    let d = get(&ch1, "q").unwrap();
    let ch2 = conn.channel().unwrap();
    channel_error(
        ch2.basic_ack(d.delivery_tag(), BasicAckOptions::default()),
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - unknown delivery tag 1"),
    );
    assert!(!ch1.is_closed());
    d.ack(BasicAckOptions::default()).unwrap();
    assert_eq!(ready(&ch1, "q"), 0);
    broker.check_invariants().unwrap();
}

/// §4.4 (RequeueOnChannelClose): closing a channel requeues its unacked messages in original
/// order, flagged redelivered.
#[test]
fn channel_close_requeues_unacked_in_order() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2", "3", "4"]);
    let mut c = consume(&ch, "q", "c");
    let ds = drain(&mut c);
    ds[1].ack(BasicAckOptions::default()).unwrap();
    ch.close();
    let ch2 = conn.channel().unwrap();
    let again: Vec<Delivery> = std::iter::from_fn(|| get(&ch2, "q")).collect();
    assert_eq!(bodies(&again), ["1", "3", "4"]);
    assert!(again.iter().all(Delivery::redelivered));
    ch2.basic_ack(0, MULTIPLE).unwrap();
    broker.check_invariants().unwrap();
}

/// §4.4: dropping the last handle of a channel (channel and consumers) closes it and requeues.
#[test]
fn dropping_channel_handles_requeues() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2"]);
    let worker = conn.channel().unwrap();
    let mut c = consume(&worker, "q", "c");
    let ds = drain(&mut c);
    assert_eq!(ds.len(), 2);
    drop(ds);
    drop(c);
    drop(worker);
    let again: Vec<Delivery> = std::iter::from_fn(|| get(&ch, "q")).collect();
    assert_eq!(bodies(&again), ["1", "2"]);
    assert!(again.iter().all(Delivery::redelivered));
    broker.check_invariants().unwrap();
}

/// §4.4 (RequeueOnConnectionClose): a connection closing requeues the unacked messages of all
/// its channels.
#[test]
fn connection_close_requeues_unacked() {
    let broker = coney::Broker::in_memory();
    let observer = broker.connect();
    let och = observer.channel().unwrap();
    declare(&och, "q");
    publish_all(&och, "q", &["1", "2", "3"]);

    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    let mut c = consume(&ch, "q", "c");
    let ds = drain(&mut c);
    assert_eq!(ds.len(), 3);
    assert_eq!(ready(&och, "q"), 0);
    conn.close();
    assert!(ch.is_closed());
    assert!(c.try_recv().is_err());
    let again: Vec<Delivery> = std::iter::from_fn(|| get(&och, "q")).collect();
    assert_eq!(bodies(&again), ["1", "2", "3"]);
    assert!(again.iter().all(Delivery::redelivered));
    och.basic_ack(0, MULTIPLE).unwrap();
    broker.check_invariants().unwrap();
}

/// §4.4 (NoRequeueOnCancel): basic.cancel leaves the consumer's unacked messages outstanding
/// on the channel: not requeued, still ackable; a later channel close requeues them.
#[test]
fn cancel_leaves_unacked_outstanding() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2", "3"]);
    let mut c = consume(&ch, "q", "c");
    let ds = drain(&mut c);
    assert_eq!(ds.len(), 3);
    ch.basic_cancel("c", Default::default()).unwrap();
    let ch2 = conn.channel().unwrap();
    assert_eq!(ready(&ch2, "q"), 0, "not requeued by the cancel");
    ds[0].ack(BasicAckOptions::default()).unwrap();
    ds[1]
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(ready(&ch2, "q"), 1);
    ch.close();
    assert_eq!(get_all(&ch2, "q"), ["2", "3"]);
    broker.check_invariants().unwrap();
}

/// §4.1 (queue_parallel_SUITE:basic_recover): basic.recover(requeue=true) requeues every
/// unacked message of the channel, which is then redelivered.
#[test]
fn basic_recover_requeues_all_unacked() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    let mut c = consume(&ch, "q", "c");
    publish_all(&ch, "q", &["1", "2", "3"]);
    let first = drain(&mut c);
    first[0].ack(BasicAckOptions::default()).unwrap();
    ch.basic_recover(BasicRecoverOptions { requeue: true })
        .unwrap();
    let again = drain(&mut c);
    assert_eq!(bodies(&again), ["2", "3"]);
    assert!(again.iter().all(Delivery::redelivered));
    assert_eq!(tags(&again), [4, 5]);
    ch.basic_ack(0, MULTIPLE).unwrap();
    assert_eq!(ready(&ch, "q"), 0);
    broker.check_invariants().unwrap();
}

/// §4.1/§12: basic.recover(requeue=false) is a 540 connection error.
#[test]
fn basic_recover_without_requeue_is_540() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    connection_error(
        ch.basic_recover(BasicRecoverOptions { requeue: false }),
        ReplyCode::NotImplemented,
        Some("NOT_IMPLEMENTED - requeue=false"),
    );
    assert!(conn.is_closed());
    assert!(ch.is_closed());
    broker.check_invariants().unwrap();
}

/// §4.1: the Delivery ack / nack / reject helpers settle on the delivery's own channel.
#[test]
fn delivery_settle_methods() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish_all(
        &ch,
        "q",
        &["ack", "nack", "reject", "reject-requeue", "nack-drop"],
    );
    let mut c = consume(&ch, "q", "c");
    let ds = drain(&mut c);
    assert_eq!(ds.len(), 5);
    ds[0].ack(BasicAckOptions::default()).unwrap();
    ds[2].reject(BasicRejectOptions::default()).unwrap();
    ds[4].nack(BasicNackOptions::default()).unwrap();
    ch.basic_cancel("c", Default::default()).unwrap();
    ds[1]
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .unwrap();
    ds[3].reject(BasicRejectOptions { requeue: true }).unwrap();
    let ch2 = conn.channel().unwrap();
    assert_eq!(get_all(&ch2, "q"), ["nack", "reject-requeue"]);
    broker.check_invariants().unwrap();
}

/// §4.3/§6.2: the delivery count grows with every return to the queue (nack, reject with
/// requeue, channel close), and redelivered stays set.
#[test]
fn delivery_count_increments_on_each_requeue() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish(&ch, "", "q", "m");
    let d = get(&ch, "q").unwrap();
    assert_eq!((d.delivery_count(), d.redelivered()), (0, false));
    d.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .unwrap();
    let d = get(&ch, "q").unwrap();
    assert_eq!((d.delivery_count(), d.redelivered()), (1, true));
    d.reject(BasicRejectOptions { requeue: true }).unwrap();
    let d = get(&ch, "q").unwrap();
    assert_eq!(d.delivery_count(), 2);
    ch.basic_recover(BasicRecoverOptions::default()).unwrap();
    let d = get(&ch, "q").unwrap();
    assert_eq!(d.delivery_count(), 3);
    ch.close();
    let ch2 = conn.channel().unwrap();
    let d = get(&ch2, "q").unwrap();
    assert_eq!((d.delivery_count(), d.redelivered()), (4, true));
    d.ack(BasicAckOptions::default()).unwrap();
    broker.check_invariants().unwrap();
}

/// A delivery settles with lapin's option structs: `multiple` covers every outstanding delivery
/// of its channel up to it, `requeue` puts them back.
#[test]
fn delivery_settles_with_lapin_options() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2", "3", "4", "5"]);
    let ds: Vec<Delivery> = std::iter::from_fn(|| get(&ch, "q")).collect();
    assert_eq!(ds.len(), 5);
    ds[1].ack(MULTIPLE).unwrap(); // "1" and "2"
    ds[3]
        .nack(BasicNackOptions {
            multiple: true,
            requeue: true,
        })
        .unwrap(); // "3" and "4" back
    ds[4].reject(BasicRejectOptions { requeue: true }).unwrap();
    let again: Vec<Delivery> = std::iter::from_fn(|| get(&ch, "q")).collect();
    assert_eq!(bodies(&again), ["3", "4", "5"]);
    again[2].ack(MULTIPLE).unwrap();
    assert_eq!(ready(&ch, "q"), 0);
    broker.check_invariants().unwrap();
}
