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
    q.handle_requeue(b.entry.seq, RequeueTo::Return);
    q.handle_requeue(a.entry.seq, RequeueTo::Return);
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
    q.handle_requeue(a.entry.seq, RequeueTo::Return);
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

fn prio(body: &str, priority: Option<u8>) -> Arc<Message> {
    let mut m = (*msg(body)).clone();
    m.properties.priority = priority;
    Arc::new(m)
}

fn with_args(args: crate::types::FieldTable) -> Queue {
    Queue::with_config(QueueConfig::from_arguments(&args))
}

fn drain_get(q: &mut Queue) -> Vec<String> {
    std::iter::from_fn(|| q.handle_get(0, true))
        .map(|d| String::from_utf8_lossy(&d.entry.message.body).into_owned())
        .collect()
}

/// Classic priority queue: highest first, FIFO within a level, absent = 0, above max = max;
/// a requeued message goes back to its own level at its original position.
#[test]
fn classic_priority_lanes() {
    let mut q = with_args(crate::types::FieldTable::new().with("x-max-priority", 5i32));
    for (b, p) in [
        ("n0", None),
        ("p3a", Some(3)),
        ("p9", Some(9)),
        ("p5", Some(5)),
        ("p3b", Some(3)),
        ("p0", Some(0)),
    ] {
        q.handle_enqueue(prio(b, p), 0);
    }
    q.check_invariants().unwrap();
    let first = q.handle_get(0, false).unwrap();
    assert_eq!(
        &first.entry.message.body[..],
        b"p9",
        "9 is taken as 5, first"
    );
    q.handle_requeue(first.entry.seq, RequeueTo::Return);
    q.check_invariants().unwrap();
    assert_eq!(drain_get(&mut q), ["p9", "p5", "p3a", "p3b", "n0", "p0"]);
}

/// Quorum queue (RabbitMQ 4.0-4.2 `rabbit_fifo_q`): two high for one normal while both wait,
/// the normal one only when it is older than the high head.
#[test]
fn quorum_weighted_lanes() {
    let mut q = with_args(crate::types::FieldTable::new().with("x-queue-type", "quorum"));
    for b in ["n1", "n2", "n3"] {
        q.handle_enqueue(prio(b, None), 0);
    }
    for b in ["h1", "h2", "h3", "h4", "h5"] {
        q.handle_enqueue(prio(b, Some(5)), 0);
    }
    q.handle_enqueue(prio("n4", Some(4)), 0);
    q.check_invariants().unwrap();
    assert_eq!(
        drain_get(&mut q),
        ["h1", "h2", "n1", "h3", "h4", "n2", "h5", "n3", "n4"]
    );
}

/// Classic single active consumer: the first consumer receives, a later higher-priority one
/// waits; when the active one goes, the highest-priority waiting one takes over.
#[test]
fn classic_single_active_consumer() {
    let mut q = with_args(crate::types::FieldTable::new().with("x-single-active-consumer", true));
    q.handle_consume(consumer(1, 0));
    q.handle_consume(consumer(2, 0));
    q.handle_consume(ConsumerSpec {
        priority: 3,
        ..consumer(3, 0)
    });
    assert_eq!(q.can_consume(true), Err(ExclusiveUse));
    for b in ["a", "b"] {
        q.handle_enqueue(msg(b), 0);
    }
    let to: Vec<u64> = std::iter::from_fn(|| q.poll_dispatch(0))
        .map(|d| d.consumer.unwrap().0)
        .collect();
    assert_eq!(to, [1, 1]);
    assert_eq!(q.consumer_count(), 3, "waiting consumers count");
    q.check_invariants().unwrap();
    q.handle_cancel(ConsumerId(1));
    assert_eq!(q.active_consumer(), Some(ConsumerId(3)));
    q.check_invariants().unwrap();
}

/// Quorum single active consumer: a higher-priority consumer takes over once the active one
/// has settled everything; meanwhile nobody receives.
#[test]
fn quorum_single_active_consumer_hands_over_by_priority() {
    let mut q = with_args(
        crate::types::FieldTable::new()
            .with("x-queue-type", "quorum")
            .with("x-single-active-consumer", true),
    );
    q.handle_consume(consumer(1, 0));
    for b in ["a", "b", "c"] {
        q.handle_enqueue(msg(b), 0);
    }
    let a = q.poll_dispatch(0).unwrap();
    let b = q.poll_dispatch(0).unwrap();
    let c = q.poll_dispatch(0).unwrap();
    q.handle_enqueue(msg("d"), 0);
    q.handle_consume(ConsumerSpec {
        priority: 1,
        ..consumer(2, 0)
    });
    q.check_invariants().unwrap();
    assert_eq!(q.active_consumer(), Some(ConsumerId(1)));
    assert!(q.poll_dispatch(0).is_none(), "quiescing");
    for d in [a, b, c] {
        q.handle_ack(d.entry.seq).unwrap();
        q.check_invariants().unwrap();
    }
    assert_eq!(q.active_consumer(), Some(ConsumerId(2)));
    assert_eq!(q.poll_dispatch(0).unwrap().consumer, Some(ConsumerId(2)));
    q.check_invariants().unwrap();
}

/// Quorum queue without delivery limit: a client's requeue re-appends at the tail under a new
/// number; a return still goes to the front.
#[test]
fn quorum_unlimited_requeue_goes_to_the_tail() {
    let mut q = with_args(
        crate::types::FieldTable::new()
            .with("x-queue-type", "quorum")
            .with("x-delivery-limit", -1i32),
    );
    for b in ["a", "b", "c"] {
        q.handle_enqueue(msg(b), 0);
    }
    let a = q.handle_get(0, false).unwrap();
    let b = q.handle_get(0, false).unwrap();
    let back = q.handle_requeue(a.entry.seq, RequeueTo::Tail(10));
    assert!(matches!(back, Some(Requeue::Back { seq: 10, .. })));
    q.handle_requeue(b.entry.seq, RequeueTo::Return);
    q.check_invariants().unwrap();
    assert_eq!(drain_get(&mut q), ["b", "c", "a"]);
}

/// Under reject-publish(-dlx) nothing is dropped from the head: a queue that requeues took over
/// its limit keeps every message, even when a publish accepted before the requeue is followed
/// by housekeeping only after it (the runtime applies a batch of publishes and settles, then
/// dispatches once). Found by the `queue_commands` fuzz target.
#[test]
fn reject_publish_never_drops_from_the_head() {
    for overflow in ["reject-publish", "reject-publish-dlx"] {
        let mut q = with_args(
            crate::types::FieldTable::new()
                .with("x-max-length", 2i32)
                .with("x-overflow", overflow),
        );
        q.handle_enqueue(msg("a"), 0);
        let a = q.handle_get(0, false).unwrap();
        q.handle_housekeeping(0);
        assert!(q.handle_enqueue(msg("b"), 0));
        assert!(q.handle_enqueue(msg("c"), 0));
        q.handle_requeue(a.entry.seq, RequeueTo::Return);
        assert!(!q.handle_enqueue(msg("d"), 0), "over the limit: refused");
        q.handle_housekeeping(0);
        assert!(matches!(
            q.poll_effect(),
            Some(Effect::Removed {
                reason: Removal::Refused,
                ..
            })
        ));
        assert!(
            q.poll_effect().is_none(),
            "{overflow}: nothing else removed"
        );
        assert_eq!(bodies(&q), ["a", "b", "c"]);
        q.check_invariants().unwrap();
    }
}
