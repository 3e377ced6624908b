//! Unit tests of the queue state machine.

use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::types::BasicProperties;

fn msg(body: &str) -> Arc<Message> {
    Arc::new(Message {
        exchange: "".into(),
        routing_key: "q".into(),
        properties: BasicProperties::default(),
        body: Bytes::copy_from_slice(body.as_bytes()),
        dead_lettered: false,
        bcc: Vec::new(),
    })
}

fn consumer(id: u64, prefetch: u32) -> ConsumerSpec {
    ConsumerSpec {
        id: ConsumerId(id),
        prefetch,
        no_ack: false,
        exclusive: false,
        priority: 0,
    }
}

fn bodies(q: &Queue) -> Vec<String> {
    q.ready()
        .map(|e| String::from_utf8_lossy(&e.message.body).into_owned())
        .collect()
}

#[test]
fn prefetch_limits_in_flight_and_acks_release_credit() {
    let mut q = Queue::new();
    for b in ["a", "b", "c"] {
        q.handle_enqueue(msg(b), 0);
    }
    q.handle_consume(consumer(1, 2));
    let d1 = q.poll_dispatch(0).unwrap();
    let _d2 = q.poll_dispatch(0).unwrap();
    assert!(q.poll_dispatch(0).is_none(), "prefetch 2 reached");
    assert!(q.handle_ack(d1.entry.seq).is_some());
    let d3 = q.poll_dispatch(0).unwrap();
    assert_eq!(&d3.entry.message.body[..], b"c");
    q.check_invariants().unwrap();
}

#[test]
fn requeue_restores_original_position_and_flags_redelivered() {
    let mut q = Queue::new();
    for b in ["a", "b", "c"] {
        q.handle_enqueue(msg(b), 0);
    }
    let a = q.handle_get(0, false).unwrap();
    let b = q.handle_get(0, false).unwrap();
    assert!(!a.entry.delivered);
    q.handle_enqueue(msg("d"), 0);
    q.handle_requeue(b.entry.seq);
    q.handle_requeue(a.entry.seq);
    assert_eq!(bodies(&q), ["a", "b", "c", "d"]);
    let again = q.handle_get(0, true).unwrap();
    assert!(again.entry.delivered, "requeued message is redelivered");
    assert_eq!(again.entry.delivery_count, 1);
    q.check_invariants().unwrap();
}

#[test]
fn round_robin_between_equal_consumers() {
    let mut q = Queue::new();
    q.handle_consume(consumer(1, 0));
    q.handle_consume(consumer(2, 0));
    for b in ["a", "b", "c", "d"] {
        q.handle_enqueue(msg(b), 0);
    }
    let to: Vec<u64> = std::iter::from_fn(|| q.poll_dispatch(0))
        .map(|d| d.consumer.unwrap().0)
        .collect();
    assert_eq!(to, [1, 2, 1, 2]);
    q.check_invariants().unwrap();
}

#[test]
fn higher_priority_consumer_served_first_until_blocked() {
    let mut q = Queue::new();
    q.handle_consume(consumer(1, 0));
    q.handle_consume(ConsumerSpec {
        priority: 5,
        ..consumer(2, 1)
    });
    for b in ["a", "b", "c"] {
        q.handle_enqueue(msg(b), 0);
    }
    let to: Vec<u64> = std::iter::from_fn(|| q.poll_dispatch(0))
        .map(|d| d.consumer.unwrap().0)
        .collect();
    assert_eq!(to, [2, 1, 1]);
}

#[test]
fn purge_leaves_unacked_alone() {
    let mut q = Queue::new();
    q.handle_enqueue(msg("a"), 0);
    q.handle_enqueue(msg("b"), 0);
    let a = q.handle_get(0, false).unwrap();
    assert_eq!(q.handle_purge().len(), 1);
    assert_eq!(q.unacked_len(), 1);
    q.handle_requeue(a.entry.seq);
    assert_eq!(bodies(&q), ["a"]);
    q.check_invariants().unwrap();
}

#[test]
fn reject_emits_a_removal_effect() {
    let mut q = Queue::new();
    q.handle_enqueue(msg("a"), 0);
    let a = q.handle_get(0, false).unwrap();
    assert!(q.handle_reject(a.entry.seq));
    assert!(matches!(
        q.poll_effect(),
        Some(Effect::Removed {
            reason: Removal::Rejected,
            ..
        })
    ));
    assert!(q.handle_ack(a.entry.seq).is_none(), "already settled");
}
