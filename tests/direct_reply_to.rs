//! Direct reply-to (`amq.rabbitmq.reply-to`) as RabbitMQ does it: a requester consumes the
//! pseudo-queue no-ack, publishes with `reply_to: amq.rabbitmq.reply-to`, and the reply
//! published to the channel's address comes straight back; misuses get RabbitMQ's errors.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use coney::*;

const REPLY_TO: &str = "amq.rabbitmq.reply-to";

fn no_ack() -> BasicConsumeOptions {
    BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    }
}

/// The whole round trip: the request carries the requester channel's address, the reply to
/// it reaches the requester's consumer with that address as routing key, and the reply's
/// delivery takes the channel's next delivery tag and cannot be acked.
#[test]
fn a_reply_comes_back_to_the_requesting_channel() {
    let (broker, conn, ch) = setup();
    declare(&ch, "rpc");
    let mut replies = ch
        .basic_consume(REPLY_TO, "replies", no_ack(), FieldTable::new())
        .unwrap();
    let request = BasicProperties::default()
        .with_reply_to(REPLY_TO)
        .with_correlation_id("c-1");
    ch.basic_publish("", "rpc", Default::default(), b"ping", request)
        .unwrap();
    let server = conn.channel().unwrap();
    let got = get(&server, "rpc").expect("the request");
    let address = got.properties().reply_to.clone().unwrap();
    assert!(
        address.starts_with("amq.rabbitmq.reply-to.") && address.len() > REPLY_TO.len() + 1,
        "rewritten to the channel's address: {address}"
    );
    let declared = server
        .queue_declare(&address, QueueDeclareOptions::default(), FieldTable::new())
        .unwrap();
    assert_eq!(
        (declared.message_count, declared.consumer_count),
        (0, 1),
        "a live address declares as a queue with its one consumer"
    );
    let reply = BasicProperties::default().with_correlation_id("c-1");
    server
        .basic_publish("", &address, Default::default(), b"pong", reply)
        .unwrap();
    got.ack(BasicAckOptions::default()).unwrap();
    let d = replies.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(&d.body()[..], b"pong");
    assert_eq!(d.exchange(), "");
    assert_eq!(d.routing_key(), address);
    assert_eq!(d.properties().correlation_id.as_deref(), Some("c-1"));
    assert!(!d.redelivered());
    assert_eq!(d.consumer_tag(), Some("replies"));
    let other = get(&ch, "rpc");
    assert!(other.is_none());
    channel_error(
        d.ack(BasicAckOptions::default()),
        ReplyCode::PreconditionFailed,
        Some(&format!(
            "PRECONDITION_FAILED - unknown delivery tag {}",
            d.delivery_tag()
        )),
    );
    broker.check_invariants().unwrap();
}

/// RabbitMQ's misuse errors: a manual-ack reply consumer, a second one on a channel, and a
/// request naming `amq.rabbitmq.reply-to` on a channel without one are 406 channel errors;
/// a reused consumer tag is a 530 connection error.
#[test]
fn misuses_get_rabbitmqs_errors() {
    let (_broker, conn, _ch) = setup();
    let ch = conn.channel().unwrap();
    let r = ch.basic_consume(
        REPLY_TO,
        "r",
        BasicConsumeOptions::default(),
        FieldTable::new(),
    );
    channel_error(
        r.map(|_| ()),
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - reply consumer cannot acknowledge"),
    );
    let ch = conn.channel().unwrap();
    let _first = ch
        .basic_consume(REPLY_TO, "r1", no_ack(), FieldTable::new())
        .unwrap();
    let r = ch.basic_consume(REPLY_TO, "r2", no_ack(), FieldTable::new());
    channel_error(
        r.map(|_| ()),
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - reply consumer already set"),
    );
    let ch = conn.channel().unwrap();
    declare(&ch, "rpc");
    let request = BasicProperties::default().with_reply_to(REPLY_TO);
    let r = ch.basic_publish("", "rpc", Default::default(), b"x", request);
    channel_error(
        r,
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - fast reply consumer does not exist"),
    );
    let ch = conn.channel().unwrap();
    declare(&ch, "tagged");
    let _c = consume(&ch, "tagged", "same");
    let r = ch.basic_consume(REPLY_TO, "same", no_ack(), FieldTable::new());
    connection_error(r.map(|_| ()), ReplyCode::NotAllowed, None);
}

/// Replies to a requester that is gone are dropped, yet count as routed: no `basic.return`
/// for a mandatory reply, and it is confirmed. Its address then declares as a 404. A cancel
/// ends the reply consumer, and the channel may not name the pseudo-queue any more.
#[test]
fn replies_to_a_gone_requester_are_dropped_and_count_as_routed() {
    let (_broker, conn, server) = setup();
    declare(&server, "rpc");
    let requester = conn.channel().unwrap();
    let mut replies = requester
        .basic_consume(REPLY_TO, "replies", no_ack(), FieldTable::new())
        .unwrap();
    let request = BasicProperties::default().with_reply_to(REPLY_TO);
    requester
        .basic_publish("", "rpc", Default::default(), b"q", request.clone())
        .unwrap();
    let address = get(&server, "rpc")
        .unwrap()
        .properties()
        .reply_to
        .clone()
        .unwrap();
    requester
        .basic_cancel("replies", Default::default())
        .unwrap();
    assert!(
        replies.recv_timeout(Duration::from_secs(5)).is_err(),
        "ended"
    );
    let r = requester.basic_publish("", "rpc", Default::default(), b"q", request);
    channel_error(r, ReplyCode::PreconditionFailed, None);

    let returned = Arc::new(Mutex::new(0));
    let seen = returned.clone();
    server.set_return_handler(move |_| *seen.lock().unwrap() += 1);
    server.confirm_select(Default::default()).unwrap();
    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    server
        .basic_publish("", &address, mandatory, b"late", BasicProperties::default())
        .unwrap();
    assert!(server.wait_for_confirms().unwrap());
    assert_eq!(*returned.lock().unwrap(), 0, "counts as routed");
    let r = server.queue_declare(&address, QueueDeclareOptions::default(), FieldTable::new());
    channel_error(r, ReplyCode::NotFound, None);
    let fresh = conn.channel().unwrap();
    let pseudo = fresh
        .queue_declare(REPLY_TO, QueueDeclareOptions::default(), FieldTable::new())
        .unwrap();
    assert_eq!(
        (
            pseudo.name.as_str(),
            pseudo.message_count,
            pseudo.consumer_count
        ),
        (REPLY_TO, 0, 1)
    );
}
