//! Many threads at once: producers and consumers on several queues, with acks, requeues and
//! channels closing mid-stream. Nothing may be lost or acked twice, and the broker's invariants
//! must hold when the threads are done (SEMANTICS.md §4.3, §4.4).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use coney::*;

const QUEUES: usize = 3;
const PRODUCERS: u64 = 4;
const PER_PRODUCER: u64 = 2_000;

/// Which queue message `id` goes to (deterministic, uneven).
fn queue_of(id: u64) -> usize {
    ((id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) % QUEUES as u64) as usize
}

fn id_of(d: &Delivery) -> u64 {
    u64::from_le_bytes(d.body()[..8].try_into().unwrap())
}

/// §4.3: every message is acked exactly once even when consumers nack-requeue a share of first
/// deliveries while producers keep publishing; requeued messages come back flagged redelivered.
#[test]
fn producers_and_consumers_with_requeues_lose_nothing() {
    let broker = Broker::in_memory();
    let conn = Arc::new(broker.connect());
    let setup = conn.channel().unwrap();
    for q in 0..QUEUES {
        setup
            .queue_declare(
                &format!("q{q}"),
                QueueDeclareOptions::default(),
                FieldTable::new(),
            )
            .unwrap();
    }
    let expected: Vec<u64> = (0..QUEUES)
        .map(|q| {
            (0..PRODUCERS * PER_PRODUCER)
                .filter(|&id| queue_of(id) == q)
                .count() as u64
        })
        .collect();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut consumers = Vec::new();
    for (q, &want) in expected.iter().enumerate() {
        let ch = conn.channel().unwrap();
        let acked = acked.clone();
        consumers.push(thread::spawn(move || {
            ch.basic_qos(10, BasicQosOptions::default()).unwrap();
            let mut c = ch
                .basic_consume(
                    &format!("q{q}"),
                    "",
                    BasicConsumeOptions::default(),
                    FieldTable::new(),
                )
                .unwrap();
            let (mut done, mut requeued, mut redelivered) = (0, 0u64, 0u64);
            while done < want {
                let d = c
                    .recv_timeout(Duration::from_secs(30))
                    .expect("a delivery within 30 s");
                let id = id_of(&d);
                if d.redelivered() {
                    redelivered += 1;
                }
                if !d.redelivered() && id.is_multiple_of(7) {
                    d.nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .unwrap();
                    requeued += 1;
                } else {
                    d.ack(BasicAckOptions::default()).unwrap();
                    acked.lock().unwrap().push(id);
                    done += 1;
                }
            }
            assert_eq!(
                requeued, redelivered,
                "q{q}: every requeue comes back exactly once, redelivered"
            );
        }));
    }
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let ch = conn.channel().unwrap();
            thread::spawn(move || {
                for i in 0..PER_PRODUCER {
                    let id = p * PER_PRODUCER + i;
                    let q = format!("q{}", queue_of(id));
                    ch.basic_publish(
                        "",
                        &q,
                        BasicPublishOptions::default(),
                        id.to_le_bytes().to_vec(),
                        BasicProperties::default(),
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for t in producers.into_iter().chain(consumers) {
        t.join().unwrap();
    }
    let mut acked = acked.lock().unwrap().clone();
    acked.sort_unstable();
    assert_eq!(acked, (0..PRODUCERS * PER_PRODUCER).collect::<Vec<_>>());
    for q in 0..QUEUES {
        let ok = setup
            .queue_declare(
                &format!("q{q}"),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::new(),
            )
            .unwrap();
        assert_eq!(ok.message_count, 0);
    }
    broker.check_invariants().unwrap();
}

/// §4.4: a consumer whose channel closes mid-stream loses nothing: its unacked messages are
/// requeued and a second consumer receives every message not acked by the first.
#[test]
fn channel_closing_mid_stream_requeues_to_the_next_consumer() {
    const N: u64 = 5_000;
    let broker = Broker::in_memory();
    let conn = broker.connect();
    let setup = conn.channel().unwrap();
    setup
        .queue_declare("work", QueueDeclareOptions::default(), FieldTable::new())
        .unwrap();
    let producer = {
        let ch = conn.channel().unwrap();
        thread::spawn(move || {
            for id in 0..N {
                ch.basic_publish(
                    "",
                    "work",
                    BasicPublishOptions::default(),
                    id.to_le_bytes().to_vec(),
                    BasicProperties::default(),
                )
                .unwrap();
            }
        })
    };
    let first = conn.channel().unwrap();
    first.basic_qos(50, BasicQosOptions::default()).unwrap();
    let mut c1 = first
        .basic_consume(
            "work",
            "c1",
            BasicConsumeOptions::default(),
            FieldTable::new(),
        )
        .unwrap();
    let mut acked = HashSet::new();
    for _ in 0..1_000 {
        let d = c1.recv_timeout(Duration::from_secs(30)).unwrap();
        d.ack(BasicAckOptions::default()).unwrap();
        assert!(acked.insert(id_of(&d)));
    }
    // Take some more without acking, then close: they must come back.
    for _ in 0..20 {
        c1.recv_timeout(Duration::from_secs(30)).unwrap();
    }
    first.close();
    assert!(
        c1.try_recv().is_err(),
        "a closed channel's consumer yields nothing more"
    );
    let second = conn.channel().unwrap();
    let mut c2 = second
        .basic_consume(
            "work",
            "c2",
            BasicConsumeOptions::default(),
            FieldTable::new(),
        )
        .unwrap();
    while acked.len() < N as usize {
        let d = c2.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(acked.insert(id_of(&d)), "message {} acked twice", id_of(&d));
        d.ack(BasicAckOptions::default()).unwrap();
    }
    producer.join().unwrap();
    assert!(c2.try_recv().is_err());
    broker.check_invariants().unwrap();
}
