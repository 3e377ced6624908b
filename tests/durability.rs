//! Durable queues: what survives a restart, in what order, and what the store's failures do
//! (SEMANTICS.md §9.2, §8; DESIGN.md "Durability").

use std::path::PathBuf;
use std::time::Duration;

use coney::store::{Faults, FaultyStore, MemoryStore, StoreError};
use coney::*;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("coney-durability-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

fn publish(ch: &Channel, exchange: &str, key: &str, body: &str, props: BasicProperties) {
    ch.basic_publish(
        exchange,
        key,
        BasicPublishOptions::default(),
        body.as_bytes().to_vec(),
        props,
    )
    .unwrap();
}

fn get_all(ch: &Channel, queue: &str) -> Vec<(String, bool)> {
    std::iter::from_fn(|| {
        ch.basic_get(queue, BasicGetOptions { no_ack: true })
            .unwrap()
            .map(|g| {
                let d = g.delivery;
                (
                    String::from_utf8_lossy(d.body()).into_owned(),
                    d.redelivered(),
                )
            })
    })
    .collect()
}

/// §9.2: durable exchanges, durable queues, bindings between them and persistent messages
/// survive a restart, in FIFO order and flagged redelivered; transient messages, non-durable
/// queues and exchanges do not.
#[test]
fn durable_definitions_and_persistent_messages_survive_a_restart() {
    let dir = temp_dir("survive");
    {
        let broker = Broker::open(&dir).unwrap();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        let ex_opts = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare("orders", ExchangeKind::Topic, ex_opts, FieldTable::new())
            .unwrap();
        ch.exchange_declare(
            "scratch",
            ExchangeKind::Fanout,
            Default::default(),
            FieldTable::new(),
        )
        .unwrap();
        let args = FieldTable::new().with("x-max-length", 100i64);
        ch.queue_declare("payments", durable(), args).unwrap();
        ch.queue_declare("temp", QueueDeclareOptions::default(), FieldTable::new())
            .unwrap();
        ch.queue_bind(
            "payments",
            "orders",
            "order.*",
            Default::default(),
            FieldTable::new(),
        )
        .unwrap();
        for (body, props) in [
            ("p1", persistent()),
            ("t1", BasicProperties::default()),
            ("p2", persistent()),
        ] {
            publish(&ch, "orders", "order.new", body, props.clone());
            publish(&ch, "", "temp", body, props);
        }
        broker.sync().unwrap();
    }
    let broker = Broker::open(&dir).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.exchange_declare("orders", ExchangeKind::Topic, passive, FieldTable::new())
        .unwrap();
    let ok = ch
        .queue_declare(
            "payments",
            durable(),
            FieldTable::new().with("x-max-length", 100i64),
        )
        .unwrap();
    assert_eq!(ok.message_count, 2, "persistent messages only");
    assert_eq!(
        get_all(&ch, "payments"),
        [("p1".to_owned(), true), ("p2".to_owned(), true)]
    );
    publish(&ch, "orders", "order.paid", "p3", persistent());
    assert_eq!(
        get_all(&ch, "payments"),
        [("p3".to_owned(), false)],
        "the binding survived"
    );
    let err = ch
        .queue_declare(
            "temp",
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::new(),
        )
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(ReplyCode::NotFound));
    let ch = conn.channel().unwrap();
    let err = ch
        .exchange_declare("scratch", ExchangeKind::Fanout, passive, FieldTable::new())
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(ReplyCode::NotFound));
    broker.check_invariants().unwrap();
    drop((ch, conn, broker));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Acked messages do not come back; unacked ones do, redelivered.
#[test]
fn acked_messages_do_not_come_back() {
    let store = MemoryStore::new();
    {
        let broker = Broker::builder().open_store(store.clone()).unwrap();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
        for b in ["a", "b", "c", "d"] {
            publish(&ch, "", "q", b, persistent());
        }
        let mut c = ch
            .basic_consume("q", "", BasicConsumeOptions::default(), FieldTable::new())
            .unwrap();
        let a = c.recv().unwrap();
        let b = c.recv().unwrap();
        a.ack(BasicAckOptions::default()).unwrap();
        c.recv().unwrap().ack(BasicAckOptions::default()).unwrap(); // c
        drop(b); // delivered, never acked
        broker.sync().unwrap();
        store.crash();
    }
    let broker = Broker::builder().open_store(store.clone()).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    assert_eq!(
        get_all(&ch, "q"),
        [("b".to_owned(), true), ("d".to_owned(), true)]
    );
}

/// §8: a persistent message to a durable queue is confirmed after the flush that holds it;
/// `wait_for_confirms` sees every ack.
#[test]
fn persistent_publishes_are_confirmed_after_their_flush() {
    let store = MemoryStore::new();
    let broker = Broker::builder().open_store(store.clone()).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    let rx = ch.confirm_listener();
    for i in 0..100 {
        publish(&ch, "", "q", &i.to_string(), persistent());
    }
    assert!(
        ch.wait_for_confirms_timeout(Duration::from_secs(10))
            .unwrap()
    );
    let acked: Vec<ConfirmEvent> = rx.try_iter().collect();
    assert!(acked.iter().all(|e| e.ack));
    assert_eq!(
        acked.last().map(|e| (e.delivery_tag, e.multiple)),
        Some((100, true))
    );
    drop((ch, conn, broker));
    store.crash(); // everything confirmed was flushed
    let broker = Broker::builder().open_store(store).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    assert_eq!(get_all(&ch, "q").len(), 100);
}

/// The first store failure poisons the store: the publish whose write failed is nacked and
/// every later durable operation fails with a typed error; transient work goes on.
#[test]
fn a_store_failure_nacks_and_poisons() {
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
    faults.fail_apply_after(0);
    publish(&ch, "", "q", "lost", persistent());
    assert!(
        !ch.wait_for_confirms_timeout(Duration::from_secs(10))
            .unwrap(),
        "nacked"
    );
    let err = ch
        .basic_publish("", "q", Default::default(), b"x".to_vec(), persistent())
        .unwrap_err();
    assert!(
        matches!(err, Error::Storage(StoreError::Poisoned(_))),
        "{err:?}"
    );
    let err = ch
        .queue_declare("q2", durable(), FieldTable::new())
        .unwrap_err();
    assert!(matches!(err, Error::Storage(_)), "{err:?}");
    publish(&ch, "", "mem", "fine", BasicProperties::default());
    assert!(
        ch.wait_for_confirms().unwrap(),
        "in-memory publishes still confirm"
    );
}

/// A second broker on a directory already open is refused with a clear error.
#[test]
fn a_directory_in_use_is_refused() {
    let dir = temp_dir("locked");
    let first = Broker::open(&dir).unwrap();
    match Broker::open(&dir) {
        Err(Error::Storage(StoreError::Locked(_))) => {}
        Err(other) => panic!("expected Locked, got {other:?}"),
        Ok(_) => panic!("a second broker opened the same directory"),
    }
    drop(first);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Dropping a broker releases its directory: it can be opened again at once.
#[test]
fn a_dropped_broker_releases_its_directory() {
    let dir = temp_dir("release");
    for round in 0..3 {
        let broker = Broker::open(&dir).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
        ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
        for i in 0..2_000 {
            publish(&ch, "", "q", &i.to_string(), persistent());
        }
        assert!(ch.wait_for_confirms().unwrap());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A record that fails to decode stops recovery with a typed `Corrupt` error naming its key,
/// never a panic and never a silent skip.
#[test]
fn a_corrupt_record_is_reported_with_its_key() {
    let store = MemoryStore::new();
    {
        let broker = Broker::builder().open_store(store.clone()).unwrap();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        let q = ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
        assert_eq!(q.name, "q");
        publish(&ch, "", "q", "m", persistent());
        broker.sync().unwrap();
    }
    // The first queue has id 1 and its first message sequence number 0.
    let key = coney::store::codec::message_key(1, 0);
    assert!(store.corrupt_key(&key));
    match Broker::builder().open_store(store) {
        Err(Error::Storage(StoreError::Corrupt { key: k, .. })) => assert_eq!(k, key.to_vec()),
        Err(other) => panic!("expected Corrupt, got {other:?}"),
        Ok(_) => panic!("a corrupt store opened"),
    }
}

/// A persistent message's delivery count (the returns it went through) survives a restart
/// (needed by the quorum delivery limit); the restart itself does not count as a return.
#[test]
fn delivery_counts_survive_a_restart() {
    let store = MemoryStore::new();
    {
        let broker = Broker::builder().open_store(store.clone()).unwrap();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
        publish(&ch, "", "q", "m", persistent());
        for expected in 0..3 {
            let g = ch
                .basic_get("q", BasicGetOptions::default())
                .unwrap()
                .unwrap();
            assert_eq!(g.delivery.delivery_count(), expected);
            g.delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .unwrap();
        }
        broker.sync().unwrap();
    }
    store.crash();
    let broker = Broker::builder().open_store(store).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    let g = ch
        .basic_get("q", BasicGetOptions::default())
        .unwrap()
        .unwrap();
    assert_eq!(g.delivery.delivery_count(), 3);
    assert!(g.delivery.redelivered());
    g.delivery.ack(BasicAckOptions::default()).unwrap();
    broker.sync().unwrap();
    assert!(
        ch.basic_get("q", BasicGetOptions::default())
            .unwrap()
            .is_none()
    );
}

/// Periodic mode leaves flushing to the timer, but `Broker::sync` still makes everything before
/// it durable.
#[test]
fn sync_is_durable_in_periodic_mode_too() {
    let store = MemoryStore::new();
    {
        let broker = Broker::builder()
            .durability(Durability::Periodic { every_ms: 60_000 })
            .open_store(store.clone())
            .unwrap();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        ch.queue_declare("q", durable(), FieldTable::new()).unwrap();
        publish(&ch, "", "q", "m", persistent());
        broker.sync().unwrap();
    }
    store.crash();
    let broker = Broker::builder().open_store(store).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    assert_eq!(get_all(&ch, "q"), [("m".to_owned(), true)]);
}
