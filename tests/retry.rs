//! The retry-topology helper (SEMANTICS.md §6.3): retries come back after each back-off delay
//! in virtual time, then park.

mod common;

use std::time::Duration;

use common::*;
use coney::retry::{RetryOutcome, RetryTopology};
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
