//! Channel and connection errors: what closes, what later calls return, and how errors read
//! (SEMANTICS.md §12).

mod common;

use std::sync::Arc;

use coney::runtime::RecvTimeoutError;
use coney::{
    BasicAckOptions, BasicNackOptions, BasicProperties, BasicPublishOptions, BasicRecoverOptions,
    BasicRejectOptions, Broker, Channel, CloseCause, Error, ExchangeDeclareOptions,
    ExchangeDeleteOptions, ExchangeKind, FieldTable, Limits, QueueDeclareOptions, ReplyCode,
};

use common::*;

/// Every channel method, each returning `Result<()>`, for "after close" checks.
fn every_call(ch: &Channel) -> Vec<(&'static str, coney::Result<()>)> {
    vec![
        (
            "basic_publish",
            ch.basic_publish(
                "",
                "q",
                BasicPublishOptions::default(),
                b"m".to_vec(),
                BasicProperties::default(),
            ),
        ),
        (
            "queue_declare",
            ch.queue_declare("q", QueueDeclareOptions::default(), FieldTable::new())
                .map(|_| ()),
        ),
        ("passive_declare", passive(ch, "q").map(|_| ())),
        (
            "exchange_declare",
            ch.exchange_declare(
                "x",
                ExchangeKind::Direct,
                ExchangeDeclareOptions::default(),
                FieldTable::new(),
            ),
        ),
        (
            "exchange_delete",
            ch.exchange_delete("x", ExchangeDeleteOptions::default()),
        ),
        (
            "queue_bind",
            ch.queue_bind(
                "q",
                "amq.direct",
                "k",
                Default::default(),
                FieldTable::new(),
            ),
        ),
        (
            "queue_unbind",
            ch.queue_unbind("q", "amq.direct", "k", FieldTable::new()),
        ),
        (
            "exchange_bind",
            ch.exchange_bind(
                "amq.fanout",
                "amq.direct",
                "k",
                Default::default(),
                FieldTable::new(),
            ),
        ),
        (
            "queue_purge",
            ch.queue_purge("q", Default::default()).map(|_| ()),
        ),
        (
            "queue_delete",
            ch.queue_delete("q", Default::default()).map(|_| ()),
        ),
        ("basic_qos", ch.basic_qos(5, Default::default())),
        (
            "basic_consume",
            ch.basic_consume("q", "c", Default::default(), FieldTable::new())
                .map(|_| ()),
        ),
        (
            "basic_get",
            ch.basic_get("q", Default::default()).map(|_| ()),
        ),
        ("basic_ack", ch.basic_ack(1, BasicAckOptions::default())),
        (
            "basic_nack",
            ch.basic_nack(
                1,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            ),
        ),
        (
            "basic_reject",
            ch.basic_reject(1, BasicRejectOptions { requeue: true }),
        ),
        ("basic_cancel", ch.basic_cancel("c", Default::default())),
        (
            "basic_recover",
            ch.basic_recover(BasicRecoverOptions::default()),
        ),
    ]
}

/// Asserts every call on `ch` fails with `ChannelClosed(expected)`.
#[track_caller]
fn assert_all_closed(ch: &Channel, expected: &CloseCause) {
    for (name, r) in every_call(ch) {
        match r {
            Err(Error::ChannelClosed(cause)) => assert_eq!(&*cause, expected, "{name}"),
            other => panic!("{name}: expected ChannelClosed, got {other:?}"),
        }
    }
}

/// §12: after a soft error closes the channel, every later call returns ChannelClosed whose
/// cause is the original error (reply_code() gives its code); deliveries from it cannot be
/// settled either.
#[test]
fn every_call_after_channel_error_is_channel_closed() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish(&ch, "", "q", "m");
    let d = get(&ch, "q").unwrap();
    let e = channel_error(
        passive(&ch, "missing"),
        ReplyCode::NotFound,
        Some("NOT_FOUND - no queue 'missing' in vhost '/'"),
    );
    assert!(ch.is_closed());
    let cause = CloseCause::Error(e.clone());
    assert_eq!(ch.close_cause().as_deref(), Some(&cause));
    assert_all_closed(&ch, &cause);
    closed_with(d.ack(BasicAckOptions::default()), Some(ReplyCode::NotFound));
    closed_with(
        d.nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        }),
        Some(ReplyCode::NotFound),
    );
    let late = ch.basic_get("q", Default::default()).unwrap_err();
    assert_eq!(late.reply_code(), Some(ReplyCode::NotFound));
    assert_eq!(
        late.amqp(),
        None,
        "ChannelClosed is not itself the AMQP error"
    );

    assert!(!conn.is_closed());
    let ch2 = conn.channel().unwrap();
    assert_eq!(
        get_all(&ch2, "q"),
        ["m"],
        "the errored channel's unacked message was requeued"
    );
    broker.check_invariants().unwrap();
}

/// §12: a soft error closes only its channel: the connection and its other channels (their
/// consumers and unacked messages) keep working.
#[test]
fn other_channels_survive_a_soft_error() {
    let (broker, conn, ch1) = setup();
    declare(&ch1, "q");
    let mut c = consume(&ch1, "q", "c");
    publish(&ch1, "", "q", "before");
    let held = c.try_recv().unwrap();

    let ch2 = conn.channel().unwrap();
    let r = ch2.basic_publish(
        "no-such-exchange",
        "k",
        BasicPublishOptions::default(),
        b"m".to_vec(),
        BasicProperties::default(),
    );
    channel_error(r, ReplyCode::NotFound, None);
    assert!(ch2.is_closed());

    assert!(!conn.is_closed());
    assert!(!ch1.is_closed());
    held.ack(BasicAckOptions::default()).unwrap();
    publish(&ch1, "", "q", "after");
    let d = c
        .try_recv()
        .expect("the consumer on the healthy channel still receives");
    assert_eq!(body(&d), "after");
    d.ack(BasicAckOptions::default()).unwrap();
    let ch3 = conn.channel().expect("the connection still opens channels");
    assert_eq!(ready(&ch3, "q"), 0);
    broker.check_invariants().unwrap();
}

/// §12: a hard error (540) closes the connection and every channel on it: unacked messages
/// are requeued, consumers end, exclusive queues are deleted, later calls on any of its
/// channels return ChannelClosed carrying the error, and opening a channel fails with
/// ConnectionClosed.
#[test]
fn hard_error_closes_every_channel() {
    let broker = Broker::in_memory();
    let observer = broker.connect();
    let och = observer.channel().unwrap();
    declare(&och, "shared");
    publish_all(&och, "shared", &["1", "2"]);

    let conn = broker.connect();
    let ch1 = conn.channel().unwrap();
    let ch2 = conn.channel().unwrap();
    let ch3 = conn.channel().unwrap();
    ch3.queue_declare(
        "mine",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::new(),
    )
    .unwrap();
    let mut c = consume(&ch2, "shared", "c");
    assert_eq!(drain(&mut c).len(), 2);
    assert_eq!(ready(&och, "shared"), 0);

    let e = connection_error(
        ch1.basic_recover(BasicRecoverOptions { requeue: false }),
        ReplyCode::NotImplemented,
        Some("NOT_IMPLEMENTED - requeue=false"),
    );
    assert!(conn.is_closed());
    let via_connection = CloseCause::Connection(Arc::new(CloseCause::Error(e.clone())));
    for (i, ch) in [&ch2, &ch3].into_iter().enumerate() {
        assert!(ch.is_closed(), "channel {i}");
        assert_all_closed(ch, &via_connection);
    }
    assert!(ch1.is_closed());
    closed_with(
        ch1.basic_get("shared", Default::default()).map(|_| ()),
        Some(ReplyCode::NotImplemented),
    );
    match conn.channel() {
        Err(err @ Error::ConnectionClosed(_)) => {
            assert_eq!(err.reply_code(), Some(ReplyCode::NotImplemented))
        }
        other => panic!("expected ConnectionClosed, got {:?}", other.map(|_| ())),
    }
    assert!(matches!(
        c.recv_timeout(WAIT),
        Err(RecvTimeoutError::Disconnected)
    ));
    assert_eq!(ready(&och, "shared"), 2, "unacked messages requeued");
    assert!(!queue_exists(&broker, "mine"), "exclusive queue deleted");
    assert!(!observer.is_closed(), "other connections are unaffected");
    broker.check_invariants().unwrap();
}

/// §12: opening more channels than channel_max is a 530 connection error; closed channels
/// free their slot.
#[test]
fn channel_max_exceeded_is_530() {
    let broker = Broker::builder()
        .limits(Limits {
            channel_max: 2,
            ..Default::default()
        })
        .in_memory();

    let conn = broker.connect();
    let a = conn.channel().unwrap();
    let b = conn.channel().unwrap();
    b.close();
    let c = conn.channel().expect("a closed channel frees its slot");
    let e = connection_error(conn.channel().map(|_| ()), ReplyCode::NotAllowed, None);
    assert!(e.text.starts_with("NOT_ALLOWED - "), "{e}");
    assert!(conn.is_closed());
    assert!(a.is_closed());
    assert!(c.is_closed());
    closed_with(
        a.basic_qos(1, Default::default()),
        Some(ReplyCode::NotAllowed),
    );
    match conn.channel() {
        Err(err @ Error::ConnectionClosed(_)) => {
            assert_eq!(err.reply_code(), Some(ReplyCode::NotAllowed))
        }
        other => panic!("expected ConnectionClosed, got {:?}", other.map(|_| ())),
    }
    let other = broker.connect();
    assert!(other.channel().is_ok(), "the limit is per connection");
    broker.check_invariants().unwrap();
}

/// §12: closing a channel or connection from the application: later calls return
/// ChannelClosed with no reply code.
#[test]
fn client_close_gives_channel_closed_without_code() {
    let broker = Broker::in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    let other = conn.channel().unwrap();
    ch.close();
    ch.close();
    assert!(ch.is_closed());
    assert_eq!(ch.close_cause().as_deref(), Some(&CloseCause::Client));
    assert_all_closed(&ch, &CloseCause::Client);
    closed_with(ch.basic_get("q", Default::default()).map(|_| ()), None);
    assert!(!other.is_closed());

    conn.close();
    assert!(other.is_closed());
    assert_all_closed(
        &other,
        &CloseCause::Connection(Arc::new(CloseCause::Client)),
    );
    broker.check_invariants().unwrap();
}

/// §0/§12: an error's Display shows the numeric reply code and RabbitMQ's reply text, for the
/// error itself and for ChannelClosed carrying it.
#[test]
fn error_display_includes_code_and_text() {
    let (broker, conn, ch) = setup();
    let err = passive(&ch, "q1").unwrap_err();
    let shown = err.to_string();
    assert!(shown.contains("404"), "{shown}");
    assert!(
        shown.contains("NOT_FOUND - no queue 'q1' in vhost '/'"),
        "{shown}"
    );
    let later = ch.basic_get("q1", Default::default()).unwrap_err();
    let shown = later.to_string();
    assert!(shown.contains("404"), "{shown}");
    assert!(
        shown.contains("NOT_FOUND - no queue 'q1' in vhost '/'"),
        "{shown}"
    );

    let ch2 = conn.channel().unwrap();
    let hard = ch2
        .basic_recover(BasicRecoverOptions { requeue: false })
        .unwrap_err();
    let shown = hard.to_string();
    assert!(shown.contains("540"), "{shown}");
    assert!(shown.contains("NOT_IMPLEMENTED - requeue=false"), "{shown}");
    broker.check_invariants().unwrap();
}

/// §12: reply codes map to their numbers and classes: 3xx/4xx soft (channel), 5xx and 320
/// hard (connection).
#[test]
fn reply_code_classes() {
    let soft = [
        (ReplyCode::NoRoute, 312),
        (ReplyCode::AccessRefused, 403),
        (ReplyCode::NotFound, 404),
        (ReplyCode::ResourceLocked, 405),
        (ReplyCode::PreconditionFailed, 406),
    ];
    let hard = [
        (ReplyCode::ConnectionForced, 320),
        (ReplyCode::ChannelError, 504),
        (ReplyCode::NotAllowed, 530),
        (ReplyCode::NotImplemented, 540),
        (ReplyCode::InternalError, 541),
    ];
    for (code, n) in soft {
        assert_eq!(code.code(), n);
        assert!(!code.is_hard(), "{code:?}");
    }
    for (code, n) in hard {
        assert_eq!(code.code(), n);
        assert!(code.is_hard(), "{code:?}");
    }
}

/// §12/§1.6: a channel closed by an error drops its consumers, which can auto-delete their
/// queue.
#[test]
fn channel_error_removes_consumers_and_may_auto_delete() {
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
    let mut c = consume(&ch, "ad", "c");
    channel_error(passive(&ch, "missing"), ReplyCode::NotFound, None);
    assert!(matches!(
        c.recv_timeout(WAIT),
        Err(RecvTimeoutError::Disconnected)
    ));
    assert!(!queue_exists(&broker, "ad"));
    assert!(!conn.is_closed());
    broker.check_invariants().unwrap();
}

/// A reply text over 255 bytes keeps its first 252 bytes and ends with `...`, as RabbitMQ's
/// `rabbit_binary_generator` cuts it.
#[test]
fn a_long_reply_text_is_cut_to_252_bytes_and_an_ellipsis() {
    let broker = Broker::in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    let name = "q".repeat(250);
    let err = ch
        .basic_get(&name, coney::BasicGetOptions::default())
        .unwrap_err();
    let text = &err.amqp().expect("a channel error").text;
    assert_eq!(text.len(), 255);
    assert_eq!(
        &text[..252],
        &format!("NOT_FOUND - no queue '{name}' in vhost '/'")[..252]
    );
    assert!(text.ends_with("..."));
}
