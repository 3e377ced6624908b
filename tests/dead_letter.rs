//! Dead-lettering of rejected messages (SEMANTICS.md §5): routing through the queue's
//! dead-letter exchange, the `x-death` headers, missing exchanges, and the atomic move of a
//! persistent message between durable queues.

mod common;

use common::*;
use coney::store::MemoryStore;
use coney::*;

fn dlx_args(exchange: &str) -> FieldTable {
    FieldTable::new().with("x-dead-letter-exchange", exchange)
}

/// §5.2, §5.4 (`dead_letter_nack`, `dead_letter_headers`): nack without requeue moves the
/// message to the dead-letter queue with an `x-death` entry for reason `rejected`.
#[test]
fn nack_without_requeue_dead_letters() {
    let (broker, _conn, ch) = setup();
    declare_exchange(&ch, "dlx", ExchangeKind::Fanout);
    declare(&ch, "dlq");
    bind(&ch, "dlq", "dlx", "");
    declare_args(&ch, "work", dlx_args("dlx"));
    publish(&ch, "", "work", "m");
    let g = ch
        .basic_get("work", BasicGetOptions::default())
        .unwrap()
        .unwrap();
    g.delivery.nack(BasicNackOptions::default()).unwrap();
    let d = get(&ch, "dlq").expect("dead-lettered");
    assert_eq!(body(&d), "m");
    assert_eq!(d.exchange(), "dlx");
    assert_eq!(d.routing_key(), "work", "no DLRK: the original routing key");
    assert!(!d.redelivered(), "a dead-lettered copy is a new message");
    let x = death(&d, 0);
    assert_eq!(x.get("count"), Some(&FieldValue::I64(1)));
    assert_eq!(text(&x, "reason"), Some("rejected"));
    assert_eq!(text(&x, "queue"), Some("work"));
    assert_eq!(text(&x, "exchange"), Some(""));
    let headers = d.properties().headers.as_ref().unwrap();
    assert_eq!(
        headers
            .get("x-first-death-reason")
            .and_then(FieldValue::as_str),
        Some("rejected")
    );
    assert_eq!(ready(&ch, "work"), 0);
    broker.check_invariants().unwrap();
}

/// §5.2 (`dead_letter_multiple_nack`, `dead_letter_nack_requeue`): a multiple nack dead-letters
/// every message it covers in order; requeue never dead-letters.
#[test]
fn multiple_nack_keeps_order_and_requeue_does_not_dead_letter() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "dlq");
    let args = dlx_args("").with("x-dead-letter-routing-key", "dlq");
    declare_args(&ch, "work", args);
    publish_all(&ch, "work", &["a", "b", "c", "d"]);
    let mut c = consume(&ch, "work", "c");
    let got = drain(&mut c);
    got[3]
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .unwrap();
    ch.basic_nack(
        got[2].delivery_tag(),
        BasicNackOptions {
            multiple: true,
            requeue: false,
        },
    )
    .unwrap();
    assert_eq!(get_all(&ch, "dlq"), ["a", "b", "c"]);
    assert_eq!(
        drain_bodies(&mut c),
        ["d"],
        "the requeued one came back to its queue"
    );
    broker.check_invariants().unwrap();
}

/// §5.1 (`dead_letter_missing_exchange`): a dead-letter exchange that does not exist drops the
/// message; once declared, dead letters flow.
#[test]
fn missing_dead_letter_exchange_drops_until_declared() {
    let (broker, _conn, ch) = setup();
    declare_args(&ch, "work", dlx_args("later"));
    declare(&ch, "dlq");
    publish_all(&ch, "work", &["lost", "kept"]);
    let g = ch
        .basic_get("work", BasicGetOptions::default())
        .unwrap()
        .unwrap();
    g.delivery.reject(BasicRejectOptions::default()).unwrap();
    declare_exchange(&ch, "later", ExchangeKind::Fanout);
    bind(&ch, "dlq", "later", "");
    let g = ch
        .basic_get("work", BasicGetOptions::default())
        .unwrap()
        .unwrap();
    g.delivery.reject(BasicRejectOptions::default()).unwrap();
    assert_eq!(get_all(&ch, "dlq"), ["kept"]);
    broker.check_invariants().unwrap();
}

/// §5.4 (`dead_letter_headers_cycle`), §5.5: dead-lettering back into the same queue through
/// a rejection is no cycle; the entry's count grows instead of a new entry.
#[test]
fn rejecting_into_the_same_queue_counts_up() {
    let (broker, _conn, ch) = setup();
    declare_args(&ch, "q", dlx_args(""));
    publish(&ch, "", "q", "m");
    for expected in 1..=2 {
        let g = ch
            .basic_get("q", BasicGetOptions::default())
            .unwrap()
            .unwrap();
        g.delivery.nack(BasicNackOptions::default()).unwrap();
        let again = ch
            .basic_get("q", BasicGetOptions::default())
            .unwrap()
            .unwrap();
        let x = death(&again.delivery, 0);
        assert_eq!(x.get("count"), Some(&FieldValue::I64(expected)));
        assert_eq!(text(&x, "queue"), Some("q"));
        again
            .delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .unwrap();
    }
    broker.check_invariants().unwrap();
}

/// §5.3, DESIGN.md "Durability": a persistent message dead-lettered from a durable queue to a
/// durable queue moves in one batch; after a restart it is in the dead-letter queue only.
#[test]
fn a_persistent_dead_letter_moves_atomically_between_durable_queues() {
    let store = MemoryStore::new();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    {
        let broker = Broker::builder().open_store(store.clone()).unwrap();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        ch.queue_declare("dlq", durable, FieldTable::new()).unwrap();
        let args = dlx_args("").with("x-dead-letter-routing-key", "dlq");
        ch.queue_declare("work", durable, args).unwrap();
        let props = BasicProperties::default().with_delivery_mode(2);
        ch.basic_publish("", "work", Default::default(), b"m".to_vec(), props)
            .unwrap();
        broker.sync().unwrap();
        let g = ch
            .basic_get("work", BasicGetOptions::default())
            .unwrap()
            .unwrap();
        g.delivery.reject(BasicRejectOptions::default()).unwrap();
        broker.sync().unwrap();
    }
    store.crash();
    let broker = Broker::builder().open_store(store).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    assert_eq!(get_all(&ch, "work"), Vec::<String>::new());
    let d = get(&ch, "dlq").expect("the dead letter survived");
    assert_eq!(body(&d), "m");
    assert_eq!(text(&death(&d, 0), "reason"), Some("rejected"));
}

/// §5.4 (`dead_letter_headers_should_not_be_appended_for_republish`): RabbitMQ 4.x does not
/// interpret a client-supplied `x-death`: it reaches consumers as published, and the broker's
/// own history starts empty and overwrites it at the first dead-lettering.
#[test]
fn a_client_supplied_x_death_is_not_history() {
    let (_broker, _conn, ch) = setup();
    declare(&ch, "dlq");
    declare_args(
        &ch,
        "work",
        dlx_args("").with("x-dead-letter-routing-key", "dlq"),
    );
    let forged = FieldTable::new()
        .with("count", FieldValue::I64(5))
        .with("reason", "rejected")
        .with("queue", "work");
    let headers = FieldTable::new()
        .with(
            "x-death",
            FieldValue::Array(vec![FieldValue::Table(forged)]),
        )
        .with("x-first-death-queue", "elsewhere");
    publish_headers(&ch, "", "work", "m", headers);
    let d = get(&ch, "work").unwrap();
    assert_eq!(
        death(&d, 0).get("count"),
        Some(&FieldValue::I64(5)),
        "delivered as published"
    );
    d.reject(BasicRejectOptions::default()).unwrap();
    let d = get(&ch, "dlq").unwrap();
    assert_eq!(deaths(&d).len(), 1, "the broker's history only");
    assert_eq!(death(&d, 0).get("count"), Some(&FieldValue::I64(1)));
    let headers = d.properties().headers.as_ref().unwrap();
    assert_eq!(
        headers
            .get("x-first-death-queue")
            .and_then(FieldValue::as_str),
        Some("work")
    );
}

/// §5.4 with §9.2: the broker's own history survives a restart and keeps counting.
#[test]
fn the_death_history_survives_a_restart() {
    let store = MemoryStore::new();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let reject_once = |broker: &Broker| {
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        get(&ch, "work")
            .unwrap()
            .reject(BasicRejectOptions::default())
            .unwrap();
        broker.sync().unwrap();
    };
    {
        let broker = Broker::builder().open_store(store.clone()).unwrap();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        ch.queue_declare("work", durable, dlx_args("")).unwrap();
        let props = BasicProperties::default().with_delivery_mode(2);
        ch.basic_publish("", "work", Default::default(), b"m".to_vec(), props)
            .unwrap();
        reject_once(&broker);
    }
    store.crash();
    let broker = Broker::builder().open_store(store).unwrap();
    reject_once(&broker);
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    let d = get(&ch, "work").unwrap();
    assert_eq!(death(&d, 0).get("count"), Some(&FieldValue::I64(2)));
}

/// RabbitMQ routes a dead letter without a dead-letter routing key with every key it was
/// published with: the publish key, `CC` and `BCC`. `BCC` is gone from the headers (and from
/// `x-death`'s `routing-keys`) but not from routing, at the next dead-lettering too; a
/// dead-letter routing key replaces them all.
#[test]
fn dead_letters_keep_their_bcc_routes() {
    let (broker, _conn, ch) = setup();
    declare_exchange(&ch, "in", ExchangeKind::Direct);
    declare_exchange(&ch, "dlx", ExchangeKind::Direct);
    declare_args(&ch, "work", dlx_args("dlx"));
    bind(&ch, "work", "in", "orig");
    for (queue, key) in [("by-key", "orig"), ("by-cc", "cc1"), ("by-bcc", "bcc1")] {
        declare_args(&ch, queue, dlx_args("dlx"));
        bind(&ch, queue, "dlx", key);
    }
    let headers = FieldTable::new()
        .with("CC", vec![FieldValue::from("cc1")])
        .with("BCC", vec![FieldValue::from("bcc1")]);
    publish_headers(&ch, "in", "orig", "m", headers);
    get(&ch, "work")
        .unwrap()
        .reject(BasicRejectOptions::default())
        .unwrap();
    for queue in ["by-key", "by-cc", "by-bcc"] {
        assert_eq!(ready(&ch, queue), 1, "{queue}");
    }
    let d = get(&ch, "by-bcc").unwrap();
    let headers = d.properties().headers.clone().unwrap();
    assert!(!headers.contains_key("BCC"));
    let keys = death(&d, 0).get("routing-keys").cloned();
    assert_eq!(
        keys,
        Some(FieldValue::Array(vec!["orig".into(), "cc1".into()])),
        "x-death lists the publish key and CC, not BCC"
    );
    // Dead-lettered again from 'by-bcc' (no routing key): the BCC key still routes it.
    d.reject(BasicRejectOptions::default()).unwrap();
    assert_eq!(ready(&ch, "by-bcc"), 1, "BCC routes the second hop too");
    assert_eq!(ready(&ch, "by-key"), 2);
    assert_eq!(ready(&ch, "by-cc"), 2);
    // A dead-letter routing key replaces every key, BCC included.
    let replaced = dlx_args("dlx").with("x-dead-letter-routing-key", "orig");
    declare_args(&ch, "replaced", replaced);
    let headers = FieldTable::new().with("BCC", vec![FieldValue::from("bcc1")]);
    publish_headers(&ch, "", "replaced", "r", headers);
    get(&ch, "replaced")
        .unwrap()
        .reject(BasicRejectOptions::default())
        .unwrap();
    assert_eq!(ready(&ch, "by-bcc"), 1, "not routed by BCC");
    assert_eq!(ready(&ch, "by-key"), 3);
    broker.check_invariants().unwrap();
}

/// The BCC keys of a persistent message survive a restart with it.
#[test]
fn bcc_routes_survive_a_restart() {
    let dir = TempDir::new("bcc");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_x = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    {
        let broker = Broker::open(dir.path()).unwrap();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        ch.exchange_declare("dlx", ExchangeKind::Direct, durable_x, FieldTable::new())
            .unwrap();
        ch.queue_declare("work", durable, dlx_args("dlx")).unwrap();
        ch.queue_declare("by-bcc", durable, FieldTable::new())
            .unwrap();
        bind(&ch, "by-bcc", "dlx", "bcc1");
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(FieldTable::new().with("BCC", vec![FieldValue::from("bcc1")]));
        ch.basic_publish("", "work", Default::default(), b"m".to_vec(), properties)
            .unwrap();
        broker.sync().unwrap();
    }
    let broker = Broker::open(dir.path()).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    get(&ch, "work")
        .unwrap()
        .reject(BasicRejectOptions::default())
        .unwrap();
    assert_eq!(get_all(&ch, "by-bcc"), ["m"]);
}
