//! The retry-topology helper (SEMANTICS.md §6.3): retries come back after each back-off delay
//! in virtual time, then park.

mod common;

use std::time::Duration;

use common::*;
use coney::retry::{FinalFailure, RetryOutcome, RetryTopology};
use coney::*;

/// §6.3: a message that keeps failing comes back after 1 s, 5 s and 30 s, one wait queue per
/// delay, and is parked after the last; a message that succeeds is simply acked.
#[test]
fn retries_are_spaced_by_the_delays_then_parked() {
    let clock = ManualClock::new(0);
    let broker = Broker::builder().clock(clock.clone()).in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    let delays = [1, 5, 30].map(Duration::from_secs);
    let retry =
        RetryTopology::declare(&ch, "work", &delays, QueueDeclareOptions::default()).unwrap();
    assert_eq!(
        retry.wait_queues().collect::<Vec<_>>(),
        [
            ("work.retry.1", delays[0]),
            ("work.retry.2", delays[1]),
            ("work.retry.3", delays[2])
        ]
    );
    let mut c = consume(&ch, "work", "worker");
    publish(&ch, "", "work", "flaky");
    let mut arrivals = Vec::new();
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        // Step the clock 1 s at a time until the message is back.
        let d = loop {
            if let Ok(d) = c.try_recv() {
                break d;
            }
            assert!(clock.now_ms() < 100_000, "the message never came back");
            clock.advance(Duration::from_secs(1));
        };
        arrivals.push((clock.now_ms(), RetryTopology::attempt(&d)));
        outcomes.push(retry.retry(&ch, &d).unwrap());
    }
    assert_eq!(arrivals, [(0, 0), (1_000, 1), (6_000, 2), (36_000, 3)]);
    assert_eq!(
        outcomes,
        [
            RetryOutcome::Delayed {
                attempt: 1,
                delay: delays[0]
            },
            RetryOutcome::Delayed {
                attempt: 2,
                delay: delays[1]
            },
            RetryOutcome::Delayed {
                attempt: 3,
                delay: delays[2]
            },
            RetryOutcome::Parked,
        ]
    );
    assert_eq!(get_all(&ch, "work.parking"), ["flaky"]);
    assert_eq!(ready(&ch, "work"), 0);
    broker.check_invariants().unwrap();
}

/// §6.3 pitfall: one wait queue per delay, so a short delay never waits behind a long one.
#[test]
fn a_short_delay_does_not_wait_behind_a_long_one() {
    let clock = ManualClock::new(0);
    let broker = Broker::builder().clock(clock.clone()).in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    let delays = [1, 60].map(Duration::from_secs);
    let retry = RetryTopology::declare(&ch, "w", &delays, QueueDeclareOptions::default()).unwrap();
    publish(&ch, "", "w", "slow");
    let d = get(&ch, "w").unwrap();
    retry.retry(&ch, &d).unwrap(); // attempt 1: 1 s
    clock.advance(Duration::from_secs(1));
    let d = get(&ch, "w").unwrap();
    retry.retry(&ch, &d).unwrap(); // attempt 2: 60 s
    publish(&ch, "", "w", "fast");
    let d = get(&ch, "w").unwrap();
    assert_eq!(body(&d), "fast");
    retry.retry(&ch, &d).unwrap(); // attempt 1: 1 s
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        get_all(&ch, "w"),
        ["fast"],
        "back after 1 s, not after 'slow'"
    );
}

/// The helper composes with a work queue of its own: a durable quorum queue with a
/// dead-letter exchange and a length limit, declared elsewhere with those arguments. The bare
/// form meets it with RabbitMQ's 406; the builder declares it equivalently, and a final failure
/// rejected to the queue's own dead-lettering reaches the user's dead-letter queue with an
/// `x-death` entry of reason `rejected`.
#[test]
fn a_work_queue_with_its_own_arguments_dead_letters_its_final_failures() {
    let clock = ManualClock::new(0);
    let broker = Broker::builder().clock(clock.clone()).in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    declare_exchange(&ch, "dlx", ExchangeKind::Fanout);
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("dead", durable, FieldTable::new())
        .unwrap();
    ch.queue_bind("dead", "dlx", "", Default::default(), FieldTable::new())
        .unwrap();
    let arguments = FieldTable::new()
        .with("x-queue-type", "quorum")
        .with("x-dead-letter-exchange", "dlx")
        .with("x-max-length", 100i64);
    ch.queue_declare("work", durable, arguments.clone())
        .unwrap();
    let delays = [Duration::from_secs(1)];
    let bare = conn.channel().unwrap();
    channel_error(
        RetryTopology::declare(&bare, "work", &delays, durable),
        ReplyCode::PreconditionFailed,
        None,
    );
    let retry = RetryTopology::builder("work")
        .delays(&delays)
        .options(durable)
        .arguments(arguments)
        .final_failure(FinalFailure::Reject)
        .declare(&ch)
        .unwrap();
    assert_eq!(retry.parking_queue(), None);
    assert!(!queue_exists(&broker, "work.parking"));
    publish(&ch, "", "work", "doomed");
    let d = get(&ch, "work").unwrap();
    assert!(matches!(
        retry.retry(&ch, &d).unwrap(),
        RetryOutcome::Delayed { attempt: 1, .. }
    ));
    clock.advance(Duration::from_secs(1));
    let d = get(&ch, "work").expect("back after the delay");
    assert_eq!(retry.retry(&ch, &d).unwrap(), RetryOutcome::DeadLettered);
    let dead = get(&ch, "dead").expect("in the user's dead-letter queue");
    assert_eq!(body(&dead), "doomed");
    let first = death(&dead, 0);
    assert_eq!(text(&first, "queue"), Some("work"));
    assert_eq!(text(&first, "reason"), Some("rejected"));
    assert_eq!(ready(&ch, "work"), 0);
    broker.check_invariants().unwrap();
}

/// A final failure can be republished to an exchange of the user's choosing, with the
/// delivery's routing key or a fixed one; the exchange must exist when the topology is declared.
#[test]
fn final_failures_can_go_to_an_exchange_of_your_choosing() {
    let (broker, conn, ch) = setup();
    declare_exchange(&ch, "failures", ExchangeKind::Direct);
    declare(&ch, "failed-payments");
    bind(&ch, "failed-payments", "failures", "payments");
    declare(&ch, "all-failures");
    bind(&ch, "all-failures", "failures", "any");
    let keep_key = RetryTopology::builder("payments")
        .final_failure(FinalFailure::Publish {
            exchange: "failures".into(),
            routing_key: None,
        })
        .declare(&ch)
        .unwrap();
    let fixed_key = RetryTopology::builder("refunds")
        .final_failure(FinalFailure::Publish {
            exchange: "failures".into(),
            routing_key: Some("any".into()),
        })
        .declare(&ch)
        .unwrap();
    publish(&ch, "", "payments", "p1");
    publish(&ch, "", "refunds", "r1");
    let d = get(&ch, "payments").unwrap();
    assert_eq!(keep_key.retry(&ch, &d).unwrap(), RetryOutcome::DeadLettered);
    let d = get(&ch, "refunds").unwrap();
    assert_eq!(
        fixed_key.retry(&ch, &d).unwrap(),
        RetryOutcome::DeadLettered
    );
    assert_eq!(get_all(&ch, "failed-payments"), ["p1"]);
    assert_eq!(get_all(&ch, "all-failures"), ["r1"]);
    let other = conn.channel().unwrap();
    let missing = RetryTopology::builder("x")
        .final_failure(FinalFailure::Publish {
            exchange: "no-such-exchange".into(),
            routing_key: None,
        })
        .declare(&other);
    channel_error(missing, ReplyCode::NotFound, None);
    broker.check_invariants().unwrap();
}
