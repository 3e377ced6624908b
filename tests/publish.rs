//! basic.publish outcomes: properties, returns, errors, limits and concurrent publishers
//! (SEMANTICS.md §2.4, §2.7, §9.1, §12).

mod common;

use std::sync::{Arc, Mutex};
use std::thread;

use bytes::Bytes;
use coney::{
    BasicAckOptions, BasicProperties, BasicPublishOptions, Broker, CloseCause, Error, FieldTable,
    FieldValue, Limits, QueueDeclareOptions, ReplyCode, Returned,
};

use common::*;

fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    }
}

/// Records every returned message of `ch`.
fn record_returns(ch: &coney::Channel) -> Arc<Mutex<Vec<Returned>>> {
    let returned: Arc<Mutex<Vec<Returned>>> = Arc::default();
    let sink = returned.clone();
    ch.set_return_handler(move |r| sink.lock().unwrap().push(r));
    returned
}

/// A headers table holding one value of every field kind (§9.1).
fn every_kind() -> FieldTable {
    let nested = FieldTable::new()
        .with("inner", "v")
        .with("n", FieldValue::I64(-1));
    FieldTable::new()
        .with("bool", true)
        .with("i8", FieldValue::I8(-8))
        .with("u8", FieldValue::U8(8))
        .with("i16", FieldValue::I16(-16))
        .with("u16", FieldValue::U16(16))
        .with("i32", FieldValue::I32(-32))
        .with("u32", FieldValue::U32(32))
        .with("i64", FieldValue::I64(i64::MIN))
        .with("f32", FieldValue::F32(1.5))
        .with("f64", FieldValue::F64(-2.25))
        .with(
            "decimal",
            FieldValue::Decimal {
                scale: 2,
                value: 12345,
            },
        )
        .with("longstr", "text")
        .with(
            "bytes",
            FieldValue::ByteArray(Bytes::from_static(&[0, 1, 255])),
        )
        .with(
            "array",
            vec![
                FieldValue::I32(1),
                FieldValue::from("two"),
                FieldValue::Array(vec![FieldValue::Void]),
            ],
        )
        .with("timestamp", FieldValue::Timestamp(1_700_000_000))
        .with("table", nested)
        .with("void", FieldValue::Void)
}

/// §9.1: all 14 basic properties reach the consumer unchanged.
#[test]
fn all_fourteen_properties_round_trip() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    let props = BasicProperties {
        content_type: Some("application/json".into()),
        content_encoding: Some("gzip".into()),
        headers: Some(FieldTable::new().with("h", "v")),
        delivery_mode: Some(2),
        priority: Some(7),
        correlation_id: Some("corr-1".into()),
        reply_to: Some("replies".into()),
        expiration: Some("60000".into()),
        message_id: Some("msg-1".into()),
        timestamp: Some(1_700_000_000),
        kind: Some("order.created".into()),
        user_id: Some("guest".into()),
        app_id: Some("shop".into()),
        cluster_id: Some("cluster-a".into()),
    };
    ch.basic_publish("", "q", Default::default(), b"{}".to_vec(), props.clone())
        .unwrap();
    let mut c = consume(&ch, "q", "c");
    let d = c.try_recv().expect("delivered at consume");
    assert_eq!(d.properties(), &props);
    assert_eq!(&d.body()[..], b"{}");
    d.ack(BasicAckOptions::default()).unwrap();
    ch.basic_publish("", "q", Default::default(), Vec::new(), props.clone())
        .unwrap();
    let d = c.try_recv().unwrap();
    assert_eq!(d.properties(), &props);
    assert!(d.body().is_empty());
    d.ack(BasicAckOptions::default()).unwrap();
    broker.check_invariants().unwrap();
}

/// §9.1: headers of every field-value kind round-trip (through basic.get and a consumer).
#[test]
fn headers_of_every_kind_round_trip() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    publish_headers(&ch, "", "q", "get", every_kind());
    publish_headers(&ch, "", "q", "consume", every_kind());
    let g = get(&ch, "q").unwrap();
    assert_eq!(g.properties().headers.as_ref(), Some(&every_kind()));
    g.ack(BasicAckOptions::default()).unwrap();
    let mut c = consume(&ch, "q", "c");
    let d = c.try_recv().unwrap();
    assert_eq!(body(&d), "consume");
    assert_eq!(d.properties().headers.as_ref(), Some(&every_kind()));
    d.ack(BasicAckOptions::default()).unwrap();
    broker.check_invariants().unwrap();
}

/// §2.7: an unroutable mandatory message is returned with 312 NO_ROUTE, the exchange, the
/// routing key, the properties and the body; nothing is enqueued.
#[test]
fn mandatory_unroutable_is_returned() {
    let (broker, _conn, ch) = setup();
    let returned = record_returns(&ch);
    declare(&ch, "q");
    bind(&ch, "q", "amq.direct", "bound");
    let props = BasicProperties::default().with_message_id("m-1");
    ch.basic_publish(
        "amq.direct",
        "unbound",
        mandatory(),
        b"payload".to_vec(),
        props.clone(),
    )
    .unwrap();
    ch.basic_publish(
        "",
        "no-such-queue",
        mandatory(),
        b"x".to_vec(),
        props.clone(),
    )
    .unwrap();
    ch.basic_publish(
        "amq.direct",
        "bound",
        mandatory(),
        b"ok".to_vec(),
        props.clone(),
    )
    .unwrap();

    let returned = returned.lock().unwrap();
    assert_eq!(returned.len(), 2, "{returned:?}");
    let r = &returned[0];
    assert_eq!(r.reply_code, ReplyCode::NoRoute);
    assert_eq!(r.reply_code.code(), 312);
    assert_eq!(r.reply_text, "NO_ROUTE");
    assert_eq!(r.exchange, "amq.direct");
    assert_eq!(r.routing_key, "unbound");
    assert_eq!(r.properties, props);
    assert_eq!(&r.body[..], b"payload");
    assert_eq!(returned[1].exchange, "");
    assert_eq!(returned[1].routing_key, "no-such-queue");
    assert_eq!(get_all(&ch, "q"), ["ok"]);
    broker.check_invariants().unwrap();
}

/// §2.7/§2.4: a returned message has its BCC header removed; CC stays.
#[test]
fn returned_message_has_bcc_stripped() {
    let (broker, _conn, ch) = setup();
    let returned = record_returns(&ch);
    let headers = FieldTable::new()
        .with("CC", vec![FieldValue::from("nowhere-cc")])
        .with("BCC", vec![FieldValue::from("nowhere-bcc")]);
    ch.basic_publish(
        "amq.direct",
        "nowhere",
        mandatory(),
        b"m".to_vec(),
        BasicProperties::default().with_headers(headers),
    )
    .unwrap();
    let returned = returned.lock().unwrap();
    assert_eq!(returned.len(), 1);
    let h = returned[0].properties.headers.as_ref().unwrap();
    assert!(!h.contains_key("BCC"));
    assert!(h.contains_key("CC"));
    broker.check_invariants().unwrap();
}

/// §2.7: an unroutable message without mandatory is silently dropped (no return, no error).
#[test]
fn non_mandatory_unroutable_is_dropped() {
    let (broker, _conn, ch) = setup();
    let returned = record_returns(&ch);
    ch.basic_publish(
        "amq.topic",
        "no.binding",
        BasicPublishOptions::default(),
        b"m".to_vec(),
        BasicProperties::default(),
    )
    .unwrap();
    publish(&ch, "", "no-such-queue", "m");
    assert!(returned.lock().unwrap().is_empty());
    assert!(!ch.is_closed());
    broker.check_invariants().unwrap();
}

/// §2.7/§12: publishing to a missing exchange is a 404 that closes the channel; later calls
/// get ChannelClosed carrying that 404.
#[test]
fn publish_to_missing_exchange_closes_channel() {
    let (broker, conn, ch) = setup();
    let r = ch.basic_publish(
        "nope",
        "k",
        BasicPublishOptions::default(),
        b"m".to_vec(),
        BasicProperties::default(),
    );
    let e = channel_error(
        r,
        ReplyCode::NotFound,
        Some("NOT_FOUND - no exchange 'nope' in vhost '/'"),
    );
    assert!(ch.is_closed());
    assert_eq!(ch.close_cause().as_deref(), Some(&error_cause(&e)));
    let later = ch.queue_declare("q", QueueDeclareOptions::default(), FieldTable::new());
    match later {
        Err(Error::ChannelClosed(cause)) => assert_eq!(*cause, CloseCause::Error(e)),
        other => panic!("expected ChannelClosed, got {other:?}"),
    }
    assert!(!conn.is_closed());
    assert!(conn.channel().is_ok());
    broker.check_invariants().unwrap();
}

/// §2.7/§12: `immediate=true` is a 540 connection error: the connection and all its channels
/// close.
#[test]
fn immediate_is_a_connection_error() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    let other = conn.channel().unwrap();
    let r = ch.basic_publish(
        "",
        "q",
        BasicPublishOptions {
            immediate: true,
            ..Default::default()
        },
        b"m".to_vec(),
        BasicProperties::default(),
    );
    connection_error(
        r,
        ReplyCode::NotImplemented,
        Some("NOT_IMPLEMENTED - immediate=true"),
    );
    assert!(conn.is_closed());
    assert!(ch.is_closed());
    assert!(other.is_closed());
    closed_with(
        other.basic_get("q", Default::default()).map(|_| ()),
        Some(ReplyCode::NotImplemented),
    );
    match conn.channel() {
        Err(e @ Error::ConnectionClosed(_)) => {
            assert_eq!(e.reply_code(), Some(ReplyCode::NotImplemented))
        }
        other => panic!("expected ConnectionClosed, got {:?}", other.map(|_| ())),
    }
    let c2 = broker.connect();
    let ch2 = c2.channel().unwrap();
    assert_eq!(ready(&ch2, "q"), 0, "nothing was enqueued");
    broker.check_invariants().unwrap();
}

/// §2.7: a body larger than the configured max message size is a 406 and nothing is enqueued;
/// the size is checked before the exchange lookup (§14).
#[test]
fn oversized_message_is_refused() {
    let broker = Broker::builder()
        .limits(Limits {
            max_message_size: 10,
            ..Default::default()
        })
        .in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    declare(&ch, "q");
    publish(&ch, "", "q", "0123456789");
    let r = ch.basic_publish(
        "",
        "q",
        BasicPublishOptions::default(),
        b"0123456789A".to_vec(),
        BasicProperties::default(),
    );
    channel_error(
        r,
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - message size 11 is larger than max size 10"),
    );
    let ch = conn.channel().unwrap();
    assert_eq!(get_all(&ch, "q"), ["0123456789"]);

    let r = ch.basic_publish(
        "missing-exchange",
        "q",
        BasicPublishOptions::default(),
        vec![0u8; 11],
        BasicProperties::default(),
    );
    channel_error(r, ReplyCode::PreconditionFailed, None);
    broker.check_invariants().unwrap();
}

/// §0: names are short strings (≤ 255 bytes); a longer one is refused before reaching the
/// broker (`InvalidInput`) and the channel stays open.
#[test]
fn over_long_names_are_invalid_input() {
    let (broker, _conn, ch) = setup();
    let long = "x".repeat(256);
    let max = "y".repeat(255);
    let r = ch.basic_publish(
        "",
        &long,
        BasicPublishOptions::default(),
        b"m".to_vec(),
        BasicProperties::default(),
    );
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    let r = ch.basic_publish(
        &long,
        "k",
        BasicPublishOptions::default(),
        b"m".to_vec(),
        BasicProperties::default(),
    );
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    let r = ch.queue_declare(&long, QueueDeclareOptions::default(), FieldTable::new());
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    assert_eq!(r.unwrap_err().reply_code(), None);
    assert!(!ch.is_closed());

    declare(&ch, &max);
    publish(&ch, "", &max, "fits");
    assert_eq!(get_all(&ch, &max), ["fits"]);
    broker.check_invariants().unwrap();
}

/// §2.4/§2.7: deliveries report the exchange and routing key the message was published with,
/// and `redelivered=false` on first delivery.
#[test]
fn delivery_reports_exchange_and_routing_key() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    bind(&ch, "q", "amq.topic", "order.*");
    publish(&ch, "amq.topic", "order.created", "m");
    let d = get(&ch, "q").unwrap();
    assert_eq!(d.exchange(), "amq.topic");
    assert_eq!(d.routing_key(), "order.created");
    assert!(!d.redelivered());
    assert_eq!(d.consumer_tag(), None);
    d.ack(BasicAckOptions::default()).unwrap();
    broker.check_invariants().unwrap();
}

/// §3.2: many publishers at once (4 threads × 1000, one channel each) into one queue: every
/// message arrives exactly once and each publisher's messages keep their order.
#[test]
fn concurrent_publishers_keep_per_publisher_order() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 1000;
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    let mut consumer = consume(&ch, "q", "c");
    let publishers: Vec<_> = (0..THREADS)
        .map(|t| {
            let pch = conn.channel().unwrap();
            thread::spawn(move || {
                for i in 0..PER_THREAD {
                    publish(&pch, "", "q", &format!("{t}:{i}"));
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().expect("publisher thread");
    }
    let ds = drain(&mut consumer);
    assert_eq!(ds.len(), THREADS * PER_THREAD);
    let mut next = [0usize; THREADS];
    for d in &ds {
        let b = body(d);
        let (t, i) = b.split_once(':').unwrap();
        let (t, i): (usize, usize) = (t.parse().unwrap(), i.parse().unwrap());
        assert_eq!(i, next[t], "publisher {t} out of order");
        next[t] += 1;
    }
    assert_eq!(next, [PER_THREAD; THREADS]);
    let tags: Vec<u64> = ds.iter().map(|d| d.delivery_tag()).collect();
    assert_eq!(
        tags,
        (1..=(THREADS * PER_THREAD) as u64).collect::<Vec<_>>()
    );
    ch.basic_ack(
        ds.last().unwrap().delivery_tag(),
        BasicAckOptions { multiple: true },
    )
    .unwrap();
    assert_eq!(ready(&ch, "q"), 0);
    broker.check_invariants().unwrap();
}

/// §2.7/§14: `immediate` is checked first: even towards a missing exchange it is the 540.
#[test]
fn immediate_is_checked_before_the_exchange() {
    let (broker, conn, ch) = setup();
    let r = ch.basic_publish(
        "missing",
        "k",
        BasicPublishOptions {
            immediate: true,
            mandatory: true,
        },
        b"m".to_vec(),
        BasicProperties::default(),
    );
    connection_error(r, ReplyCode::NotImplemented, None);
    assert!(conn.is_closed());
    broker.check_invariants().unwrap();
}

/// §0/§2.4: only queue and exchange names have CR/LF stripped; a routing key is delivered
/// exactly as published (RabbitMQ's basic.publish passes it through unchanged).
#[test]
fn routing_key_is_not_stripped_of_cr_lf() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    bind(&ch, "q", "amq.topic", "#");
    publish(&ch, "amq.topic", "line\r\nbreak", "m");
    let d = get(&ch, "q").unwrap();
    assert_eq!(d.routing_key(), "line\r\nbreak");
    d.ack(BasicAckOptions::default()).unwrap();
    broker.check_invariants().unwrap();
}

/// §7.1: an `expiration` that is not a whole decimal number of milliseconds in range is a 406
/// at publish (channel closed, nothing enqueued); valid ones, `"0"` included, are accepted.
#[test]
fn invalid_expiration_is_refused_at_publish() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    for ok in ["0", "60000"] {
        let props = BasicProperties::default().with_expiration(ok);
        ch.basic_publish("", "q", Default::default(), b"m".to_vec(), props)
            .unwrap();
    }
    for (bad, reason) in [
        ("", "no_integer"),
        ("foobar", "no_integer"),
        ("10000foobar", "{leftover_string,\"foobar\"}"),
        ("-10", "{value_negative,-10}"),
        ("315360000001", "{value_too_large,315360000001}"),
    ] {
        let ch = conn.channel().unwrap();
        let props = BasicProperties::default().with_expiration(bad);
        let r = ch.basic_publish("", "q", Default::default(), b"x".to_vec(), props);
        let text = format!("PRECONDITION_FAILED - invalid expiration '{bad}': {reason}");
        channel_error(r, ReplyCode::PreconditionFailed, Some(&text));
    }
    // "0" is valid, and with no consumer to take it at once it expired on arrival (§7.1).
    assert_eq!(ready(&ch, "q"), 1, "refused publishes enqueue nothing");
    broker.check_invariants().unwrap();
}

/// RabbitMQ validates `user_id`: it must name the user the connection logged in as
/// (`guest` by default), else 406 and the channel closes; `connect_as` logs in as another.
#[test]
fn user_id_must_name_the_connections_user() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    let as_guest = BasicProperties::default().with_user_id("guest");
    ch.basic_publish("", "q", Default::default(), b"ok", as_guest)
        .unwrap();
    let other = conn.channel().unwrap();
    let as_svc = BasicProperties::default().with_user_id("svc");
    let r = other.basic_publish("", "q", Default::default(), b"no", as_svc.clone());
    channel_error(
        r,
        ReplyCode::PreconditionFailed,
        Some(
            "PRECONDITION_FAILED - user_id property set to 'svc' but authenticated user was 'guest'",
        ),
    );
    let svc = broker.connect_as("svc");
    let svc_ch = svc.channel().unwrap();
    svc_ch
        .basic_publish("", "q", Default::default(), b"svc", as_svc)
        .unwrap();
    assert_eq!(get_all(&ch, "q"), ["ok", "svc"]);
}
