//! Flow control: publishers wait while the queued messages are over the memory high watermark
//! or the store's backlog is over its bound, and go on once back under, with blocked and
//! unblocked notices to every connection (RabbitMQ's `connection.blocked` /
//! `connection.unblocked`).

mod common;

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use coney::store::{Batch, MemoryStore, RecoverySink, Store, StoreError};
use coney::*;

/// A broker whose watermark is reached by `messages` queued 100-byte messages.
fn broker_with_watermark(bytes: u64) -> Broker {
    Broker::builder()
        .limits(Limits {
            memory_high_watermark_bytes: bytes,
            ..Limits::default()
        })
        .in_memory()
}

fn notices(conn: &Connection) -> Arc<Mutex<Vec<BlockedNotice>>> {
    let heard = Arc::new(Mutex::new(Vec::new()));
    let h = heard.clone();
    conn.set_blocked_handler(move |n| h.lock().unwrap().push(n.clone()));
    heard
}

fn publish_timeout(ch: &Channel, timeout: Duration) -> Result<()> {
    ch.basic_publish_timeout(
        "",
        "q",
        Default::default(),
        vec![0u8; 100],
        BasicProperties::default(),
        timeout,
    )
}

/// Publishes until publishers are blocked; returns how many were published.
fn fill_until_blocked(broker: &Broker, ch: &Channel) -> u32 {
    let mut n = 0;
    while !broker.health().publishers_blocked {
        publish_timeout(ch, Duration::ZERO).unwrap();
        n += 1;
        assert!(n < 1_000_000, "never blocked: {:?}", broker.health());
    }
    n
}

#[test]
fn the_memory_watermark_blocks_publishers_until_consumers_drain() {
    let broker = broker_with_watermark(64 * 1024);
    let conn = broker.connect();
    let heard = notices(&conn);
    let ch = conn.channel().unwrap();
    common::declare(&ch, "q");
    let published = fill_until_blocked(&broker, &ch);
    let health = broker.health();
    assert!(health.memory_bytes > 64 * 1024, "{health:?}");
    // Roughly the watermark over the estimate per message (body + overhead).
    assert!((50..=200).contains(&published), "{published}");
    assert_eq!(
        *heard.lock().unwrap(),
        [BlockedNotice::Blocked {
            reason: "low on memory".into()
        }]
    );

    // A timed publish gives up, and publishes nothing.
    let err = publish_timeout(&ch, Duration::from_millis(1)).unwrap_err();
    assert_eq!(err, Error::Timeout);
    assert_eq!(common::ready(&ch, "q"), published);

    // A plain publish waits; a consumer draining the queue releases it.
    let publisher = {
        let ch = ch.clone();
        thread::spawn(move || {
            ch.basic_publish(
                "",
                "q",
                Default::default(),
                b"after".to_vec(),
                BasicProperties::default(),
            )
        })
    };
    let consumer_conn = broker.connect();
    let consumer_ch = consumer_conn.channel().unwrap();
    let mut drained = 0;
    while drained < published {
        let got = consumer_ch
            .basic_get("q", BasicGetOptions::default())
            .unwrap()
            .expect("a queued message");
        got.delivery.ack(BasicAckOptions::default()).unwrap();
        drained += 1;
    }
    publisher.join().unwrap().unwrap();
    assert!(!broker.health().publishers_blocked);
    assert_eq!(
        heard.lock().unwrap().last(),
        Some(&BlockedNotice::Unblocked)
    );
    let last = consumer_ch
        .basic_get("q", BasicGetOptions::default())
        .unwrap()
        .expect("the waiting publish went through");
    assert_eq!(&last.delivery.body()[..], b"after");
}

#[test]
fn purging_or_deleting_a_queue_gives_its_memory_back() {
    let broker = broker_with_watermark(64 * 1024);
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    common::declare(&ch, "q");
    fill_until_blocked(&broker, &ch);
    ch.queue_purge("q", QueuePurgeOptions::default()).unwrap();
    assert!(!broker.health().publishers_blocked);
    assert_eq!(broker.health().memory_bytes, 0);
    fill_until_blocked(&broker, &ch);
    ch.queue_delete("q", QueueDeleteOptions::default()).unwrap();
    assert!(!broker.health().publishers_blocked);
    assert_eq!(broker.health().memory_bytes, 0);
}

#[test]
fn unacked_messages_count_until_settled() {
    let broker = broker_with_watermark(1 << 20);
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    common::declare(&ch, "q");
    for _ in 0..10 {
        publish_timeout(&ch, Duration::ZERO).unwrap();
    }
    let queued = broker.health().memory_bytes;
    assert!(queued >= 10 * 100, "{queued}");
    let got = ch
        .basic_get("q", BasicGetOptions::default())
        .unwrap()
        .unwrap();
    assert_eq!(broker.health().memory_bytes, queued, "unacked still held");
    got.delivery.ack(BasicAckOptions::default()).unwrap();
    assert_eq!(broker.health().memory_bytes, queued / 10 * 9);
}

/// A store whose applies wait at a gate the test opens.
struct GatedStore {
    inner: MemoryStore,
    open: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl Store for GatedStore {
    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        let (lock, cvar) = &*self.open;
        let mut open = lock.lock().unwrap();
        while !*open {
            open = cvar.wait(open).unwrap();
        }
        drop(open);
        self.inner.apply(batch)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
    fn recover_into(&self, sink: &mut dyn RecoverySink) -> Result<(), StoreError> {
        self.inner.recover_into(sink)
    }
    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.inner.size_on_disk()
    }
}

#[test]
fn a_store_backlog_blocks_publishers_until_the_flusher_catches_up() {
    let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let store = GatedStore {
        inner: MemoryStore::new(),
        open: gate.clone(),
    };
    let broker = Broker::builder()
        .limits(Limits {
            store_backlog_max_bytes: 64 * 1024,
            ..Limits::default()
        })
        .open_store(store)
        .unwrap();
    let conn = broker.connect();
    let heard = notices(&conn);
    let ch = conn.channel().unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    // The declare's own record passes the gate: open it for that, then close it.
    *gate.0.lock().unwrap() = true;
    ch.queue_declare("q", durable, FieldTable::new()).unwrap();
    *gate.0.lock().unwrap() = false;

    let persistent = BasicProperties::default().with_delivery_mode(2);
    let mut published = 0;
    while !broker.health().publishers_blocked {
        ch.basic_publish_timeout(
            "",
            "q",
            Default::default(),
            vec![1u8; 1024],
            persistent.clone(),
            Duration::ZERO,
        )
        .unwrap();
        published += 1;
        assert!(published < 10_000, "never blocked: {:?}", broker.health());
    }
    assert!(broker.health().store_backlog_bytes > 64 * 1024);
    assert_eq!(
        *heard.lock().unwrap(),
        [BlockedNotice::Blocked {
            reason: "store backlog".into()
        }]
    );
    let err = ch
        .basic_publish_timeout(
            "",
            "q",
            Default::default(),
            vec![1u8; 1024],
            persistent.clone(),
            Duration::from_millis(1),
        )
        .unwrap_err();
    assert_eq!(err, Error::Timeout);

    let (lock, cvar) = &*gate;
    *lock.lock().unwrap() = true;
    cvar.notify_all();
    broker.sync().unwrap();
    assert!(!broker.health().publishers_blocked);
    assert_eq!(broker.health().store_backlog_bytes, 0);
    assert_eq!(
        heard.lock().unwrap().last(),
        Some(&BlockedNotice::Unblocked)
    );
    assert_eq!(common::ready(&ch, "q"), published);
}
