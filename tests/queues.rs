//! Queue declare, exclusivity, auto-delete, delete and purge as RabbitMQ does them
//! (SEMANTICS.md §1).

mod common;

use coney::BasicAckOptions;
use coney::BasicRejectOptions;
use coney::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions, FieldTable,
    FieldValue, QueueDeclareOptions, QueueDeleteOptions, ReplyCode,
};

use common::*;
use coney::runtime::RecvTimeoutError;

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn exclusive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    }
}

fn auto_delete() -> QueueDeclareOptions {
    QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    }
}

fn args(key: &str, value: impl Into<FieldValue>) -> FieldTable {
    FieldTable::new().with(key, value)
}

/// §1.1: an empty name gives a server-named queue `amq.gen-` + 22 base64url characters; a
/// passive declare of it is fine but a non-passive redeclare hits the `amq.` prefix check
/// (403).
#[test]
fn server_named_queue() {
    let (broker, conn, ch) = setup();
    let ok = declare(&ch, "");
    assert!(ok.name.starts_with("amq.gen-"), "{}", ok.name);
    assert_eq!(ok.name.len(), 30, "{}", ok.name);
    assert!(
        ok.name[8..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{}",
        ok.name
    );
    assert_eq!((ok.message_count, ok.consumer_count), (0, 0));
    let other = declare(&ch, "");
    assert_ne!(ok.name, other.name);

    publish(&ch, "", &ok.name, "m");
    assert_eq!(ready(&ch, &ok.name), 1);

    let ch = conn.channel().unwrap();
    let r = ch.queue_declare(&ok.name, QueueDeclareOptions::default(), FieldTable::new());
    let text = format!(
        "ACCESS_REFUSED - queue name '{}' contains reserved prefix 'amq.*'",
        ok.name
    );
    channel_error(r, ReplyCode::AccessRefused, Some(&text));
    broker.check_invariants().unwrap();
}

/// §1.1: a name starting with `amq.` is refused with 403 and nothing is created.
#[test]
fn amq_prefixed_queue_name_is_refused() {
    let (broker, _conn, ch) = setup();
    let r = ch.queue_declare("amq.foo", QueueDeclareOptions::default(), FieldTable::new());
    channel_error(
        r,
        ReplyCode::AccessRefused,
        Some("ACCESS_REFUSED - queue name 'amq.foo' contains reserved prefix 'amq.*'"),
    );
    assert!(ch.is_closed());
    assert!(!queue_exists(&broker, "amq.foo"));
    broker.check_invariants().unwrap();
}

/// §1.2: a passive declare of a missing queue is a 404 closing the channel.
#[test]
fn passive_declare_of_missing_queue_is_404() {
    let (broker, _conn, ch) = setup();
    channel_error(
        passive(&ch, "q1"),
        ReplyCode::NotFound,
        Some("NOT_FOUND - no queue 'q1' in vhost '/'"),
    );
    assert!(ch.is_closed());
    broker.check_invariants().unwrap();
}

/// §1.1: declare-ok's message_count counts ready messages only (not unacked) and
/// consumer_count counts every consumer; passive declares report the same.
#[test]
fn declare_ok_counts_ready_messages_and_consumers() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2", "3", "4"]);
    ch.basic_qos(1, BasicQosOptions::default()).unwrap();
    let mut c1 = consume(&ch, "q", "c1");
    let ch2 = conn.channel().unwrap();
    ch2.basic_qos(1, BasicQosOptions::default()).unwrap();
    let mut c2 = consume(&ch2, "q", "c2");
    let held = [drain(&mut c1), drain(&mut c2)];
    assert_eq!(held.iter().map(Vec::len).sum::<usize>(), 2);

    let ok = declare(&ch, "q");
    assert_eq!((ok.message_count, ok.consumer_count), (2, 2));
    let ok = passive(&ch2, "q").unwrap();
    assert_eq!((ok.message_count, ok.consumer_count), (2, 2));
    broker.check_invariants().unwrap();
}

/// §1.3: a redeclare with a different durable flag is a 406 with RabbitMQ's text.
#[test]
fn redeclare_with_different_durable_is_406() {
    let (broker, _conn, ch) = setup();
    ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
    ch.queue_declare("q", durable(), FieldTable::new())
        .expect("identical redeclare");
    let r = ch.queue_declare("q", QueueDeclareOptions::default(), FieldTable::new());
    channel_error(
        r,
        ReplyCode::PreconditionFailed,
        Some(
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': received 'false' but current is 'true'",
        ),
    );
    broker.check_invariants().unwrap();
}

/// §1.3: a redeclare with a different auto_delete flag is a 406.
#[test]
fn redeclare_with_different_auto_delete_is_406() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    let r = ch.queue_declare("q", auto_delete(), FieldTable::new());
    channel_error(
        r,
        ReplyCode::PreconditionFailed,
        Some(
            "PRECONDITION_FAILED - inequivalent arg 'auto_delete' for queue 'q' in vhost '/': received 'true' but current is 'false'",
        ),
    );
    broker.check_invariants().unwrap();
}

/// §1.1 step 3 / §1.3: exclusive queues are never durable, so an exclusive redeclare with
/// durable=true matches; a different exclusive flag is a 405.
#[test]
fn exclusive_redeclare_ignores_durable_but_not_exclusive() {
    let (broker, conn, ch) = setup();
    ch.queue_declare("ex", exclusive(), FieldTable::new())
        .unwrap();
    ch.queue_declare(
        "ex",
        QueueDeclareOptions {
            exclusive: true,
            durable: true,
            ..Default::default()
        },
        FieldTable::new(),
    )
    .expect("effective durable is false for exclusive queues");
    let r = ch.queue_declare("ex", QueueDeclareOptions::default(), FieldTable::new());
    channel_error(r, ReplyCode::ResourceLocked, None);

    let ch = conn.channel().unwrap();
    declare(&ch, "plain");
    let r = ch.queue_declare("plain", exclusive(), FieldTable::new());
    channel_error(
        r,
        ReplyCode::ResourceLocked,
        Some(
            "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'plain' in vhost '/'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
        ),
    );
    broker.check_invariants().unwrap();
}

/// §1.3: a known argument with another value, or present on one side only, is a 406 that
/// renders both values with their types.
#[test]
fn redeclare_with_different_argument_is_406() {
    let (broker, conn, ch) = setup();
    ch.queue_declare(
        "q",
        QueueDeclareOptions::default(),
        args("x-max-length", 3i64),
    )
    .unwrap();
    let r = ch.queue_declare(
        "q",
        QueueDeclareOptions::default(),
        args("x-max-length", 5i64),
    );
    channel_error(
        r,
        ReplyCode::PreconditionFailed,
        Some(
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in vhost '/': received the value '5' of type 'long' but current is the value '3' of type 'long'",
        ),
    );

    let ch = conn.channel().unwrap();
    let r = ch.queue_declare("q", QueueDeclareOptions::default(), FieldTable::new());
    channel_error(
        r,
        ReplyCode::PreconditionFailed,
        Some(
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in vhost '/': received none but current is the value '3' of type 'long'",
        ),
    );
    broker.check_invariants().unwrap();
}

/// §1.3: all integer kinds are one class (long 5 ≡ signedint 5), but a string is not an
/// integer; `x-queue-type` absent equals `classic`.
#[test]
fn argument_equivalence_by_type_class() {
    let (broker, conn, ch) = setup();
    ch.queue_declare(
        "q",
        QueueDeclareOptions::default(),
        args("x-max-length", 5i64),
    )
    .unwrap();
    for v in [
        FieldValue::I32(5),
        FieldValue::I16(5),
        FieldValue::U8(5),
        FieldValue::U32(5),
    ] {
        ch.queue_declare(
            "q",
            QueueDeclareOptions::default(),
            args("x-max-length", v.clone()),
        )
        .unwrap_or_else(|e| panic!("{v:?} is equivalent to long 5: {e}"));
    }
    let with_type = args("x-max-length", 5i64).with("x-queue-type", "classic");
    ch.queue_declare("q", QueueDeclareOptions::default(), with_type)
        .expect("x-queue-type absent is classic");

    let r = ch.queue_declare(
        "q",
        QueueDeclareOptions::default(),
        args("x-max-length", "5"),
    );
    channel_error(r, ReplyCode::PreconditionFailed, None);

    let ch = conn.channel().unwrap();
    ch.queue_declare(
        "typed",
        QueueDeclareOptions::default(),
        args("x-queue-type", "classic"),
    )
    .unwrap();
    declare(&ch, "typed");
    broker.check_invariants().unwrap();
}

/// §1.3: arguments outside the queue type's known list (`x-foo`, `foo`) are not compared.
#[test]
fn unknown_arguments_are_not_compared() {
    let (broker, _conn, ch) = setup();
    let first = args("x-foo", 1i32).with("foo", "a");
    ch.queue_declare("q", QueueDeclareOptions::default(), first)
        .unwrap();
    let second = args("x-foo", "other").with("foo", 2i64);
    ch.queue_declare("q", QueueDeclareOptions::default(), second)
        .unwrap();
    declare(&ch, "q");
    broker.check_invariants().unwrap();
}

/// §1.4: invalid arguments on creation are a 406 `invalid arg` and no queue is created.
#[test]
fn invalid_arguments_are_refused() {
    let (broker, conn, _ch) = setup();
    let cases: [(FieldTable, Option<&str>); 8] = [
        (args("x-message-ttl", "1000"), None),
        (args("x-message-ttl", -1i64), None),
        (
            args("x-expires", 0i32),
            Some(
                "PRECONDITION_FAILED - invalid arg 'x-expires' for queue 'q' in vhost '/': {value_zero,0}",
            ),
        ),
        (
            args("x-dead-letter-routing-key", "rk"),
            Some(
                "PRECONDITION_FAILED - invalid arg 'x-dead-letter-routing-key' for queue 'q' in vhost '/': routing_key_but_no_dlx_defined",
            ),
        ),
        (
            args("x-delivery-limit", 5i64),
            Some(
                "PRECONDITION_FAILED - invalid arg 'x-delivery-limit' for queue 'q' in vhost '/' of queue type rabbit_classic_queue",
            ),
        ),
        (args("x-max-priority", 256i32), None),
        (args("x-overflow", "drop-tail"), None),
        (args("x-max-length", -1i64), None),
    ];
    for (arguments, text) in cases {
        let ch = conn.channel().unwrap();
        let key = arguments.iter().next().unwrap().0.to_owned();
        let r = ch.queue_declare("q", QueueDeclareOptions::default(), arguments);
        let e = channel_error(r, ReplyCode::PreconditionFailed, text);
        let prefix =
            format!("PRECONDITION_FAILED - invalid arg '{key}' for queue 'q' in vhost '/'");
        assert!(e.text.starts_with(&prefix), "{e}");
        assert!(!queue_exists(&broker, "q"), "{key}: nothing created");
    }
    broker.check_invariants().unwrap();
}

/// §1.4: valid boundary values are accepted (TTL 0, DLX with DLRK, x-max-priority 255).
#[test]
fn valid_arguments_are_accepted() {
    let (broker, _conn, ch) = setup();
    let ok = FieldTable::new()
        .with("x-message-ttl", 0i32)
        .with("x-expires", 1i64)
        .with("x-dead-letter-exchange", "")
        .with("x-dead-letter-routing-key", "dlq")
        .with("x-max-priority", 255i32)
        .with("x-overflow", "reject-publish")
        .with("x-single-active-consumer", true);
    ch.queue_declare("q", QueueDeclareOptions::default(), ok)
        .unwrap();
    broker.check_invariants().unwrap();
}

/// §1.5: an exclusive queue is locked (405) for every other connection: passive and active
/// declare, consume, get, purge, delete, bind and unbind.
#[test]
fn exclusive_queue_is_locked_for_other_connections() {
    let (broker, _owner, ch) = setup();
    ch.queue_declare("ex", exclusive(), FieldTable::new())
        .unwrap();
    let other = broker.connect();
    let locked = "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'ex' in vhost '/'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.";

    let c = other.channel().unwrap();
    channel_error(passive(&c, "ex"), ReplyCode::ResourceLocked, Some(locked));
    let c = other.channel().unwrap();
    let r = c.queue_declare("ex", exclusive(), FieldTable::new());
    channel_error(r, ReplyCode::ResourceLocked, Some(locked));
    let c = other.channel().unwrap();
    let r = c.basic_consume("ex", "", BasicConsumeOptions::default(), FieldTable::new());
    channel_error(r.map(|_| ()), ReplyCode::ResourceLocked, None);
    let c = other.channel().unwrap();
    let r = c.basic_get("ex", BasicGetOptions::default());
    channel_error(r.map(|_| ()), ReplyCode::ResourceLocked, None);
    let c = other.channel().unwrap();
    channel_error(
        c.queue_purge("ex", Default::default()),
        ReplyCode::ResourceLocked,
        None,
    );
    let c = other.channel().unwrap();
    channel_error(
        c.queue_delete("ex", QueueDeleteOptions::default()),
        ReplyCode::ResourceLocked,
        None,
    );
    let c = other.channel().unwrap();
    let r = c.queue_bind(
        "ex",
        "amq.fanout",
        "",
        Default::default(),
        FieldTable::new(),
    );
    channel_error(r, ReplyCode::ResourceLocked, None);
    let c = other.channel().unwrap();
    let r = c.queue_unbind("ex", "amq.fanout", "", FieldTable::new());
    channel_error(r, ReplyCode::ResourceLocked, None);

    // Publishing into it from another connection is allowed.
    let c = other.channel().unwrap();
    publish(&c, "", "ex", "from-other");
    assert_eq!(get_all(&ch, "ex"), ["from-other"]);
    broker.check_invariants().unwrap();
}

/// §1.5: an exclusive queue is deleted (messages discarded) when its connection closes, and
/// its consumers end.
#[test]
fn exclusive_queue_deleted_with_its_connection() {
    let broker = coney::Broker::in_memory();
    let owner = broker.connect();
    let ch = owner.channel().unwrap();
    ch.queue_declare("ex", exclusive(), FieldTable::new())
        .unwrap();
    publish_all(&ch, "ex", &["1", "2"]);
    let ch2 = owner.channel().unwrap();
    let mut c = consume(&ch2, "ex", "c");
    assert_eq!(drain(&mut c).len(), 2);
    assert!(queue_exists(&broker, "ex"));

    owner.close(); // its channels are still held: dropping it would not close it
    assert!(matches!(
        c.recv_timeout(WAIT),
        Err(RecvTimeoutError::Disconnected)
    ));
    let other = broker.connect();
    let oc = other.channel().unwrap();
    channel_error(
        passive(&oc, "ex"),
        ReplyCode::NotFound,
        Some("NOT_FOUND - no queue 'ex' in vhost '/'"),
    );
    broker.check_invariants().unwrap();
}

/// §1.5: an exclusive queue belongs to the connection, not the channel: it survives the
/// declaring channel's close.
#[test]
fn exclusive_queue_survives_its_channel() {
    let (broker, conn, ch) = setup();
    ch.queue_declare("ex", exclusive(), FieldTable::new())
        .unwrap();
    publish(&ch, "", "ex", "kept");
    ch.close();
    let ch2 = conn.channel().unwrap();
    let ok = passive(&ch2, "ex").expect("still there for its owner");
    assert_eq!(ok.message_count, 1);
    let other = broker.connect();
    let oc = other.channel().unwrap();
    channel_error(passive(&oc, "ex"), ReplyCode::ResourceLocked, None);
    broker.check_invariants().unwrap();
}

/// §1.6: an auto-delete queue goes when its last consumer is cancelled (not before); its
/// ready messages are discarded.
#[test]
fn auto_delete_after_last_consumer_cancelled() {
    let (broker, conn, ch) = setup();
    ch.queue_declare("ad", auto_delete(), FieldTable::new())
        .unwrap();
    let c1 = consume(&ch, "ad", "c1");
    let ch2 = conn.channel().unwrap();
    let c2 = consume(&ch2, "ad", "c2");
    ch.basic_cancel(c1.tag(), Default::default()).unwrap();
    assert!(queue_exists(&broker, "ad"), "one consumer left");
    ch2.basic_cancel(c2.tag(), Default::default()).unwrap();
    assert!(!queue_exists(&broker, "ad"));
    broker.check_invariants().unwrap();
}

/// §1.6: closing the last consumer's channel also auto-deletes.
#[test]
fn auto_delete_when_last_consumer_channel_closes() {
    let (broker, conn, ch) = setup();
    ch.queue_declare("ad", auto_delete(), FieldTable::new())
        .unwrap();
    let consumer_ch = conn.channel().unwrap();
    let _c = consume(&consumer_ch, "ad", "c");
    publish(&ch, "", "ad", "m");
    consumer_ch.close();
    assert!(!queue_exists(&broker, "ad"));
    broker.check_invariants().unwrap();
}

/// §1.6/§3.4: a queue that never had a consumer (only basic.get) is never auto-deleted.
#[test]
fn auto_delete_never_without_a_consumer() {
    let (broker, conn, ch) = setup();
    ch.queue_declare("ad", auto_delete(), FieldTable::new())
        .unwrap();
    publish_all(&ch, "ad", &["1", "2"]);
    let d = get(&ch, "ad").unwrap();
    d.ack(BasicAckOptions::default()).unwrap();
    assert_eq!(get_all(&ch, "ad"), ["2"]);
    ch.close();
    let ch = conn.channel().unwrap();
    let ok = passive(&ch, "ad").expect("never had a consumer");
    assert_eq!((ok.message_count, ok.consumer_count), (0, 0));
    broker.check_invariants().unwrap();
}

/// §1.7: if-empty refuses a queue with ready messages (406) but unacked ones do not block.
#[test]
fn delete_if_empty_counts_ready_only() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2"]);
    let held = get(&ch, "q").unwrap();
    let if_empty = QueueDeleteOptions {
        if_empty: true,
        ..Default::default()
    };
    let ch2 = conn.channel().unwrap();
    channel_error(
        ch2.queue_delete("q", if_empty),
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - queue 'q' in vhost '/' not empty"),
    );
    assert!(queue_exists(&broker, "q"));

    let other = get(&ch, "q").unwrap();
    let ch3 = conn.channel().unwrap();
    assert_eq!(ch3.queue_delete("q", if_empty).unwrap(), 0);
    assert!(!queue_exists(&broker, "q"));
    held.ack(BasicAckOptions::default())
        .expect("ack after delete is accepted");
    other
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .expect("nack after delete is accepted");
    assert!(!ch.is_closed());
    broker.check_invariants().unwrap();
}

/// §1.7: if-unused refuses a queue with a consumer (406); if-empty is checked first.
#[test]
fn delete_if_unused() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    ch.basic_qos(1, BasicQosOptions::default()).unwrap();
    let mut c = consume(&ch, "q", "c");
    publish_all(&ch, "q", &["1", "2"]);
    let got = drain(&mut c);
    assert_eq!(got.len(), 1);

    let both = QueueDeleteOptions {
        if_unused: true,
        if_empty: true,
        ..Default::default()
    };
    let ch2 = conn.channel().unwrap();
    channel_error(
        ch2.queue_delete("q", both),
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - queue 'q' in vhost '/' not empty"),
    );
    let if_unused = QueueDeleteOptions {
        if_unused: true,
        ..Default::default()
    };
    let ch3 = conn.channel().unwrap();
    channel_error(
        ch3.queue_delete("q", if_unused),
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - queue 'q' in vhost '/' in use"),
    );
    ch.basic_cancel("c", Default::default()).unwrap();
    let ch4 = conn.channel().unwrap();
    assert_eq!(ch4.queue_delete("q", if_unused).unwrap(), 1);
    assert!(!queue_exists(&broker, "q"));
    broker.check_invariants().unwrap();
}

/// §1.7: deleting a missing queue is fine and reports 0; deleting returns the ready count.
#[test]
fn delete_returns_ready_count_and_is_idempotent() {
    let (broker, _conn, ch) = setup();
    assert_eq!(ch.queue_delete("missing", Default::default()).unwrap(), 0);
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2", "3"]);
    let d = get(&ch, "q").unwrap();
    assert_eq!(ch.queue_delete("q", Default::default()).unwrap(), 2);
    assert_eq!(ch.queue_delete("q", Default::default()).unwrap(), 0);
    d.ack(BasicAckOptions::default()).unwrap();
    assert!(!ch.is_closed());
    broker.check_invariants().unwrap();
}

/// §1.7/§4.4/§11.1: deleting a queue server-cancels its consumers (their iterators end, the
/// tag is free again) and later acks or nacks of its deliveries are silently accepted.
#[test]
fn delete_ends_consumers_and_later_acks_are_accepted() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    declare(&ch, "other");
    let mut c = consume(&ch, "q", "c");
    publish_all(&ch, "q", &["1", "2", "3"]);
    let ds = drain(&mut c);
    assert_eq!(bodies(&ds), ["1", "2", "3"]);

    let admin = conn.channel().unwrap();
    assert_eq!(admin.queue_delete("q", Default::default()).unwrap(), 0);
    assert!(matches!(
        c.recv_timeout(WAIT),
        Err(RecvTimeoutError::Disconnected)
    ));
    assert!(c.recv().is_none());

    ds[0].ack(BasicAckOptions::default()).unwrap();
    ds[1]
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .unwrap();
    ds[2].reject(BasicRejectOptions::default()).unwrap();
    assert!(!ch.is_closed());
    let _again = consume(&ch, "other", "c");
    broker.check_invariants().unwrap();
}

/// §1.8 (queue_parallel_SUITE:purge): purge removes ready messages only; an unacked message
/// survives and comes back on nack with requeue.
#[test]
fn purge_leaves_unacked_messages() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2"]);
    let held = get(&ch, "q").unwrap();
    assert_eq!(ch.queue_purge("q", Default::default()).unwrap(), 1);
    assert_eq!(ready(&ch, "q"), 0);
    ch.basic_nack(
        held.delivery_tag(),
        BasicNackOptions {
            multiple: false,
            requeue: true,
        },
    )
    .unwrap();
    assert_eq!(ready(&ch, "q"), 1);
    let d = get(&ch, "q").unwrap();
    assert_eq!(body(&d), "1");
    assert!(d.redelivered());
    d.ack(BasicAckOptions::default()).unwrap();
    assert_eq!(ch.queue_purge("q", Default::default()).unwrap(), 0);
    broker.check_invariants().unwrap();
}

/// §1.8: purging a missing queue is a 404.
#[test]
fn purge_missing_queue_is_404() {
    let (broker, _conn, ch) = setup();
    channel_error(
        ch.queue_purge("missing", Default::default()),
        ReplyCode::NotFound,
        Some("NOT_FOUND - no queue 'missing' in vhost '/'"),
    );
    broker.check_invariants().unwrap();
}

/// §1.1: after a declare, `""` names the last declared queue for bind (with an empty key the
/// key becomes the queue name), purge, get, consume and delete.
#[test]
fn empty_queue_name_means_last_declared() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "first");
    let name = declare(&ch, "").name;
    ch.queue_bind("", "amq.direct", "k", Default::default(), FieldTable::new())
        .unwrap();
    ch.queue_bind("", "amq.direct", "", Default::default(), FieldTable::new())
        .unwrap();
    publish(&ch, "amq.direct", "k", "by-key");
    publish(&ch, "amq.direct", &name, "by-name");
    publish(&ch, "amq.direct", "", "empty-key");
    assert_eq!(ready(&ch, &name), 2);

    let g = ch.basic_get("", BasicGetOptions { no_ack: true }).unwrap();
    assert_eq!(body(&g.unwrap().delivery), "by-key");
    assert_eq!(ch.queue_purge("", Default::default()).unwrap(), 1);
    publish(&ch, "", &name, "for-consumer");
    let mut c = ch
        .basic_consume("", "", BasicConsumeOptions::default(), FieldTable::new())
        .unwrap();
    let d = c.try_recv().unwrap();
    assert_eq!(body(&d), "for-consumer");
    d.ack(BasicAckOptions::default()).unwrap();
    drop(c);
    assert_eq!(ch.queue_delete("", Default::default()).unwrap(), 0);
    assert!(!queue_exists(&broker, &name));
    assert!(queue_exists(&broker, "first"));
    broker.check_invariants().unwrap();
}

/// §1.1: `""` with no queue declared on this channel is a 404 `no previously declared queue`;
/// the memory is per channel.
#[test]
fn empty_queue_name_without_declare_is_404() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    let ch2 = conn.channel().unwrap();
    let r = ch2.basic_get("", BasicGetOptions::default());
    channel_error(
        r.map(|_| ()),
        ReplyCode::NotFound,
        Some("NOT_FOUND - no previously declared queue"),
    );
    let ch3 = conn.channel().unwrap();
    let r = ch3.queue_bind("", "amq.direct", "", Default::default(), FieldTable::new());
    channel_error(
        r,
        ReplyCode::NotFound,
        Some("NOT_FOUND - no previously declared queue"),
    );
    assert!(!ch.is_closed());
    broker.check_invariants().unwrap();
}

/// §0: CR and LF are stripped from names.
#[test]
fn cr_lf_stripped_from_queue_names() {
    let (broker, _conn, ch) = setup();
    let ok = declare(&ch, "a\r\nb");
    assert_eq!(ok.name, "ab");
    publish(&ch, "", "ab", "m");
    assert_eq!(get_all(&ch, "a\nb"), ["m"]);
    broker.check_invariants().unwrap();
}

/// §1.2: a passive declare ignores flags and arguments (no equivalence check).
#[test]
fn passive_declare_ignores_flags_and_arguments() {
    let (broker, _conn, ch) = setup();
    ch.queue_declare("q", durable(), args("x-max-length", 3i64))
        .unwrap();
    let ok = ch
        .queue_declare(
            "q",
            QueueDeclareOptions {
                passive: true,
                auto_delete: true,
                ..Default::default()
            },
            args("x-max-length", 9i64),
        )
        .unwrap();
    assert_eq!(ok.name, "q");
    assert!(!ch.is_closed());
    broker.check_invariants().unwrap();
}

/// §1.1: with both queue and routing key empty, queue.unbind (like queue.bind) uses the last
/// declared queue's name as the routing key, so it removes the binding bind made.
#[test]
fn empty_queue_and_key_shortcut_applies_to_unbind() {
    let (broker, _conn, ch) = setup();
    let name = declare(&ch, "").name;
    ch.queue_bind("", "amq.direct", "", Default::default(), FieldTable::new())
        .unwrap();
    publish(&ch, "amq.direct", &name, "bound");
    ch.queue_unbind("", "amq.direct", "", FieldTable::new())
        .unwrap();
    publish(&ch, "amq.direct", &name, "unbound");
    assert_eq!(get_all(&ch, &name), ["bound"]);
    broker.check_invariants().unwrap();
}

/// §1.3: checks run in order, first failure wins: exclusivity (405) before durable (406)
/// before auto_delete (406) before arguments.
#[test]
fn redeclare_checks_run_in_order() {
    let (broker, conn, ch) = setup();
    ch.queue_declare("q", durable(), args("x-max-length", 1i64))
        .unwrap();
    let everything_differs = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let r = ch.queue_declare("q", everything_differs, args("x-max-length", 2i64));
    channel_error(r, ReplyCode::ResourceLocked, None);

    let ch = conn.channel().unwrap();
    let r = ch.queue_declare("q", auto_delete(), args("x-max-length", 2i64));
    let e = channel_error(r, ReplyCode::PreconditionFailed, None);
    assert!(e.text.contains("inequivalent arg 'durable'"), "{e}");

    let ch = conn.channel().unwrap();
    let durable_auto_delete = QueueDeclareOptions {
        durable: true,
        auto_delete: true,
        ..Default::default()
    };
    let r = ch.queue_declare("q", durable_auto_delete, args("x-max-length", 2i64));
    let e = channel_error(r, ReplyCode::PreconditionFailed, None);
    assert!(e.text.contains("inequivalent arg 'auto_delete'"), "{e}");
    broker.check_invariants().unwrap();
}

/// §1.6: auto-delete + exclusive: the queue goes at the earlier trigger, here the last
/// consumer's cancel while its connection is still open.
#[test]
fn exclusive_auto_delete_goes_with_last_consumer() {
    let (broker, conn, ch) = setup();
    let opts = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    ch.queue_declare("xa", opts, FieldTable::new()).unwrap();
    let c = consume(&ch, "xa", "c");
    ch.basic_cancel(c.tag(), Default::default()).unwrap();
    let ch2 = conn.channel().unwrap();
    channel_error(passive(&ch2, "xa"), ReplyCode::NotFound, None);
    broker.check_invariants().unwrap();
}

/// §1.6/§4.2: when a cancel auto-deletes the queue, the cancelled consumer's unacked messages
/// go with it and acking them later is silently accepted.
#[test]
fn acks_after_auto_delete_are_accepted() {
    let (broker, _conn, ch) = setup();
    ch.queue_declare("ad", auto_delete(), FieldTable::new())
        .unwrap();
    let mut c = consume(&ch, "ad", "c");
    publish_all(&ch, "ad", &["1", "2"]);
    let ds = drain(&mut c);
    assert_eq!(ds.len(), 2);
    ch.basic_cancel("c", Default::default()).unwrap();
    assert!(!queue_exists(&broker, "ad"));
    ds[0].ack(BasicAckOptions::default()).unwrap();
    ds[1]
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .unwrap();
    assert!(!ch.is_closed());
    broker.check_invariants().unwrap();
}

/// §1.1: a passive declare also sets the channel's last declared queue.
#[test]
fn passive_declare_sets_last_declared_queue() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish(&ch, "", "q", "m");
    let ch2 = conn.channel().unwrap();
    passive(&ch2, "q").unwrap();
    assert_eq!(get_all(&ch2, ""), ["m"]);
    broker.check_invariants().unwrap();
}
