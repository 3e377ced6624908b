//! Length limits (SEMANTICS.md §7.3): `x-max-length`, `x-max-length-bytes` and the three
//! `x-overflow` modes, with publisher confirms and dead-lettering with reason `maxlen`.

mod common;

use common::*;
use coney::*;

fn max_len(n: i64, overflow: &str) -> FieldTable {
    FieldTable::new()
        .with("x-max-length", n)
        .with("x-overflow", overflow)
}

/// Publishes with confirms on and returns whether each publish was acked.
fn publish_confirmed(ch: &Channel, queue: &str, bodies: &[&str]) -> Vec<bool> {
    let events = ch.confirm_listener();
    for b in bodies {
        publish(ch, "", queue, b);
    }
    let mut acked = vec![None; bodies.len()];
    while acked.iter().any(Option::is_none) {
        let e = events
            .recv_timeout(WAIT)
            .expect("every publish is answered");
        let tags = if e.multiple {
            (1..=e.delivery_tag).collect::<Vec<_>>()
        } else {
            vec![e.delivery_tag]
        };
        for t in tags {
            let i = (t - 1) as usize;
            if i < acked.len() && acked[i].is_none() {
                acked[i] = Some(e.ack);
            }
        }
    }
    acked.into_iter().map(Option::unwrap).collect()
}

fn confirming(conn: &Connection) -> Channel {
    let ch = conn.channel().unwrap();
    ch.confirm_select(Default::default()).unwrap();
    ch
}

/// §7.3 (`max_length_drop_head`): max-length 1, drop-head: publishing 1, 2, 3 keeps only 3;
/// the dropped ones are counted (no DLX) and every publish is acked.
#[test]
fn drop_head_keeps_the_newest() {
    let (broker, conn, ch) = setup();
    declare_args(&ch, "q", max_len(1, "drop-head"));
    let confirm = confirming(&conn);
    assert_eq!(
        publish_confirmed(&confirm, "q", &["1", "2", "3"]),
        [true; 3]
    );
    assert_eq!(get_all(&ch, "q"), ["3"]);
    assert_eq!(broker.death_stats("q").unwrap().dropped.maxlen, 2);
    broker.check_invariants().unwrap();
}

/// §5.2, §7.3: with a DLX, drop-head dead-letters the dropped messages with reason `maxlen`.
#[test]
fn drop_head_dead_letters_with_maxlen() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "dlq");
    let args = max_len(2, "drop-head")
        .with("x-dead-letter-exchange", "")
        .with("x-dead-letter-routing-key", "dlq");
    declare_args(&ch, "q", args);
    publish_all(&ch, "q", &["1", "2", "3", "4"]);
    assert_eq!(get_all(&ch, "q"), ["3", "4"]);
    let d = get(&ch, "dlq").unwrap();
    assert_eq!(body(&d), "1");
    assert_eq!(text(&death(&d, 0), "reason"), Some("maxlen"));
    assert_eq!(get_all(&ch, "dlq"), ["2"]);
    assert_eq!(broker.death_stats("q").unwrap().dead_lettered.maxlen, 2);
}

/// §7.3 (`check_max_length_drops_publish`): max-length 1, reject-publish: 1 kept, 2 and 3
/// nacked; without confirms the refused publish is dropped silently, never returned.
#[test]
fn reject_publish_nacks_the_new_message() {
    let (broker, conn, ch) = setup();
    declare_args(&ch, "q", max_len(1, "reject-publish"));
    let confirm = confirming(&conn);
    assert_eq!(
        publish_confirmed(&confirm, "q", &["1", "2", "3"]),
        [true, false, false]
    );
    let returned = std::sync::Arc::new(std::sync::Mutex::new(0));
    let r = returned.clone();
    ch.set_return_handler(move |_| *r.lock().unwrap() += 1);
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    ch.basic_publish("", "q", options, b"4".to_vec(), Default::default())
        .unwrap();
    assert_eq!(*returned.lock().unwrap(), 0, "never basic.return");
    assert_eq!(get_all(&ch, "q"), ["1"]);
    // Space again: accepted.
    assert_eq!(publish_confirmed(&confirm, "q", &["5"]), [true]);
    assert_eq!(broker.death_stats("q").unwrap().dropped.maxlen, 3);
}

/// §7.3: reject-publish-dlx refuses (nack) and dead-letters the refused message with `maxlen`.
#[test]
fn reject_publish_dlx_dead_letters_the_refused_message() {
    let (broker, conn, ch) = setup();
    declare(&ch, "dlq");
    let args = max_len(1, "reject-publish-dlx")
        .with("x-dead-letter-exchange", "")
        .with("x-dead-letter-routing-key", "dlq");
    declare_args(&ch, "q", args);
    let confirm = confirming(&conn);
    assert_eq!(publish_confirmed(&confirm, "q", &["1", "2"]), [true, false]);
    assert_eq!(get_all(&ch, "q"), ["1"]);
    assert_eq!(get_all(&ch, "dlq"), ["2"]);
    assert_eq!(broker.death_stats("q").unwrap().dead_lettered.maxlen, 1);
}

/// §7.3: `x-max-length-bytes` counts body bytes of ready messages.
#[test]
fn max_length_bytes_counts_bodies() {
    let (_broker, conn, ch) = setup();
    let args = FieldTable::new()
        .with("x-max-length-bytes", 10i64)
        .with("x-overflow", "reject-publish");
    declare_args(&ch, "q", args);
    let confirm = confirming(&conn);
    assert_eq!(
        publish_confirmed(&confirm, "q", &["12345", "67890", "x"]),
        [true, true, false],
        "5 + 5 fit in 10 bytes, one more does not"
    );
    declare_args(
        &ch,
        "d",
        FieldTable::new().with("x-max-length-bytes", 10i64),
    );
    publish_all(&ch, "d", &["12345", "67890", "abc"]);
    assert_eq!(
        get_all(&ch, "d"),
        ["67890", "abc"],
        "drop-head drops until it fits"
    );
}

/// §7.3: only ready messages count; unacked ones do not.
#[test]
fn unacked_messages_do_not_count() {
    let (_broker, conn, ch) = setup();
    declare_args(&ch, "q", max_len(1, "reject-publish"));
    let confirm = confirming(&conn);
    assert_eq!(publish_confirmed(&confirm, "q", &["1"]), [true]);
    let held = get(&ch, "q").unwrap();
    assert_eq!(publish_confirmed(&confirm, "q", &["2"]), [true]);
    // §4.3: a requeue may take a reject-publish queue over its limit.
    held.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(ready(&ch, "q"), 2, "reject-publish never drops");
    assert_eq!(get_all(&ch, "q"), ["1", "2"]);
}

/// §7.3 (RabbitMQ `requeue_and_run` → `maybe_drop_head`): on a classic drop-head queue a
/// requeue that takes it over the limit drops the oldest at once, before any delivery.
#[test]
fn drop_head_applies_on_requeue() {
    let (broker, _conn, ch) = setup();
    declare_args(&ch, "q", max_len(2, "drop-head"));
    publish_all(&ch, "q", &["1", "2", "3"]); // "1" dropped
    let two = get(&ch, "q").unwrap();
    publish(&ch, "", "q", "4"); // ready: 3, 4
    two.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .unwrap(); // back at its place: 2, 3, 4 → over: "2" dropped
    assert_eq!(get_all(&ch, "q"), ["3", "4"]);
    assert_eq!(broker.death_stats("q").unwrap().dropped.maxlen, 2);
}

/// §7.3: max-length 0: drop-head still delivers to a consumer that can take the message (it
/// never waits in the queue), reject-publish refuses even with an idle consumer.
#[test]
fn max_length_zero() {
    let (broker, conn, ch) = setup();
    declare_args(&ch, "d", max_len(0, "drop-head"));
    publish(&ch, "", "d", "lost");
    assert_eq!(ready(&ch, "d"), 0);
    let mut c = consume(&ch, "d", "c");
    publish(&ch, "", "d", "taken");
    assert_eq!(drain_bodies(&mut c), ["taken"]);
    assert_eq!(broker.death_stats("d").unwrap().dropped.maxlen, 1);

    declare_args(&ch, "r", max_len(0, "reject-publish"));
    let mut c = consume(&ch, "r", "c2");
    let confirm = confirming(&conn);
    assert_eq!(publish_confirmed(&confirm, "r", &["x"]), [false]);
    assert!(drain(&mut c).is_empty());
}

/// §7.3: a message routed to several queues and refused by one is nacked; the queues that
/// took it keep their copy.
#[test]
fn a_refusal_by_one_queue_nacks_the_fan_out() {
    let (_broker, conn, ch) = setup();
    declare_exchange(&ch, "fan", ExchangeKind::Fanout);
    declare_args(&ch, "full", max_len(0, "reject-publish"));
    declare(&ch, "open");
    bind(&ch, "full", "fan", "");
    bind(&ch, "open", "fan", "");
    let confirm = confirming(&conn);
    let events = confirm.confirm_listener();
    publish(&confirm, "fan", "", "m");
    let e = events.recv_timeout(WAIT).unwrap();
    assert!(!e.ack, "nacked");
    assert_eq!(get_all(&ch, "open"), ["m"]);
    assert_eq!(get_all(&ch, "full"), Vec::<String>::new());
}
