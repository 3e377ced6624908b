//! One bad message never harms the others: properties that cannot be carried (headers nested
//! too deep, a content header over the frame size, an over-long short string) are refused at
//! publish with a typed error, alone, on any stack; the store stays healthy and every later
//! durable operation works. A real storage failure, by contrast, poisons the store, and then
//! settles and `sync` say so and `Broker::health` reports it.

mod common;

use coney::store::{Faults, FaultyStore, MemoryStore, StoreError};
use coney::*;

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// A table nested `depth` deep (a plain table is depth 1), built without recursion.
fn nested(depth: u32) -> FieldTable {
    let mut table = FieldTable::new().with("leaf", 1i32);
    for _ in 1..depth {
        table = FieldTable::new().with("n", FieldValue::Table(table));
    }
    table
}

fn durable_broker() -> (Broker, Connection, Channel) {
    let broker = Broker::builder().open_store(MemoryStore::new()).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    (broker, conn, ch)
}

fn publish(ch: &Channel, properties: BasicProperties) -> Result<()> {
    ch.basic_publish(
        "",
        "q",
        BasicPublishOptions::default(),
        b"m".to_vec(),
        properties,
    )
}

/// After a refusal: the channel is open, persistent publishes confirm, durable declares and
/// `sync` work, the broker is healthy.
fn assert_unharmed(broker: &Broker, ch: &Channel) {
    publish(ch, persistent().with_headers(nested(32))).unwrap();
    publish(ch, persistent()).unwrap();
    assert!(ch.wait_for_confirms().unwrap(), "later publishes confirm");
    ch.queue_declare("later", durable(), FieldTable::new())
        .unwrap();
    broker.sync().unwrap();
    assert!(broker.health().is_healthy(), "{:?}", broker.health());
    assert_eq!(
        common::ready(ch, "q"),
        2,
        "only the accepted messages are queued"
    );
}

#[test]
fn headers_nested_too_deep_are_refused_alone() {
    let (broker, _conn, ch) = durable_broker();
    let err = publish(&ch, persistent().with_headers(nested(33))).unwrap_err();
    match &err {
        Error::InvalidInput(text) => assert!(text.contains("deeper than 32"), "{text}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert_unharmed(&broker, &ch);
}

#[test]
fn a_content_header_over_the_frame_size_is_refused_alone() {
    let (broker, _conn, ch) = durable_broker();
    let big = FieldTable::new().with("blob", FieldValue::LongString(vec![b'x'; 2 << 20].into()));
    let err = publish(&ch, persistent().with_headers(big)).unwrap_err();
    match &err {
        Error::InvalidInput(text) => assert!(text.contains("frame payload limit"), "{text}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    // Just under the limit (131,072 - 8 payload bytes) is accepted.
    let fits = FieldTable::new().with("blob", FieldValue::LongString(vec![b'x'; 130_000].into()));
    publish(&ch, persistent().with_headers(fits)).unwrap();
    assert!(ch.wait_for_confirms().unwrap());
    ch.queue_purge("q", QueuePurgeOptions::default()).unwrap();
    assert_unharmed(&broker, &ch);
}

#[test]
fn an_over_long_short_string_property_is_refused() {
    let (broker, _conn, ch) = durable_broker();
    let err = publish(&ch, persistent().with_correlation_id("c".repeat(256))).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    assert_unharmed(&broker, &ch);
}

/// Headers 10,000 deep are refused on a thread with a 256 KiB stack: nothing on the way (the
/// check, the refusal, the drop of the refused properties) recurses through them.
#[test]
fn very_deep_headers_are_refused_without_recursion() {
    let (broker, _conn, ch) = durable_broker();
    let headers = nested(10_000);
    let publisher = ch.clone();
    let outcome = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || publish(&publisher, persistent().with_headers(headers)))
        .unwrap()
        .join()
        .expect("no stack overflow");
    assert!(
        matches!(outcome, Err(Error::InvalidInput(_))),
        "{outcome:?}"
    );
    assert_unharmed(&broker, &ch);
}

#[test]
fn arguments_nested_too_deep_are_refused_on_every_method() {
    let (broker, _conn, ch) = durable_broker();
    let deep = || FieldTable::new().with("x-custom", FieldValue::Table(nested(32)));
    let refused = |r: Result<()>| assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    refused(ch.queue_declare("d", durable(), deep()).map(|_| ()));
    refused(ch.exchange_declare("e", ExchangeKind::Headers, Default::default(), deep()));
    refused(ch.queue_bind("q", "amq.headers", "", Default::default(), deep()));
    refused(ch.exchange_bind("amq.fanout", "amq.direct", "k", Default::default(), deep()));
    refused(
        ch.basic_consume("q", "c", Default::default(), deep())
            .map(|_| ()),
    );
    assert_unharmed(&broker, &ch);
}

/// A real storage failure poisons the store: a settle of a durable queue's message and
/// `sync` report it, and so does `Broker::health`.
#[test]
fn after_a_storage_failure_settles_sync_and_health_say_so() {
    let faults = Faults::new();
    let broker = Broker::builder()
        .open_store(FaultyStore::new(MemoryStore::new(), faults.clone()))
        .unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
    ch.queue_declare("mem", QueueDeclareOptions::default(), FieldTable::new())
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    publish(&ch, persistent()).unwrap();
    ch.basic_publish("", "mem", Default::default(), b"t".to_vec(), persistent())
        .unwrap();
    assert!(ch.wait_for_confirms().unwrap());
    let stored = ch
        .basic_get("q", BasicGetOptions::default())
        .unwrap()
        .unwrap()
        .delivery;
    let transient = ch
        .basic_get("mem", BasicGetOptions::default())
        .unwrap()
        .unwrap()
        .delivery;
    assert!(broker.health().is_healthy());

    faults.fail_next_flush();
    let err = broker.sync().unwrap_err();
    assert!(
        matches!(err, Error::Storage(StoreError::Storage(_))),
        "{err:?}"
    );

    let health = broker.health();
    assert!(!health.is_healthy());
    assert!(health.durable);
    assert!(
        matches!(&health.store_failure, Some(StoreError::Poisoned(text)) if text.contains("flush")),
        "{health:?}"
    );
    let err = stored.ack(BasicAckOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::Storage(StoreError::Poisoned(_))),
        "{err:?}"
    );
    transient.ack(BasicAckOptions::default()).unwrap(); // an in-memory queue's settle is unaffected
    let err = broker.sync().unwrap_err();
    assert!(
        matches!(err, Error::Storage(StoreError::Poisoned(_))),
        "{err:?}"
    );
}
