//! Retries with back-off and a parking queue, on a manual clock so it runs at once.
//!
//! `RetryTopology` declares the work queue `payments`, one wait queue per delay
//! (`payments.retry.1`, `payments.retry.2`: each holds a message for its delay with
//! `x-message-ttl`, then dead-letters it back to `payments`) and `payments.parking`. A worker
//! that fails a payment hands the delivery to `retry`; one that fails every attempt ends up
//! parked, where an operator can look at it.
//!
//! `cargo run --example retry`

use std::time::Duration;

use coney::retry::{RetryOutcome, RetryTopology};
use coney::*;

/// Waits this long at most for a delivery that must already be there.
const WAIT: Duration = Duration::from_secs(5);

/// Runs the example; public so that `tests/examples.rs` runs it too.
pub fn main() -> Result<()> {
    let clock = ManualClock::new(0);
    let broker = Broker::builder().clock(clock.clone()).in_memory();
    let conn = broker.connect();
    let ch = conn.channel()?;
    let delays = [Duration::from_secs(1), Duration::from_secs(10)];
    let retry = RetryTopology::declare(&ch, "payments", &delays, QueueDeclareOptions::default())?;

    // "p-flaky" goes through on its first retry; "p-broken" never does.
    for body in ["p-flaky", "p-broken"] {
        ch.basic_publish(
            "",
            "payments",
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_message_id(body),
        )?;
    }
    let mut worker = ch.basic_consume(
        "payments",
        "worker",
        BasicConsumeOptions::default(),
        FieldTable::new(),
    )?;

    let mut paid = Vec::new();
    let mut parked = Vec::new();
    // Each round handles what is in the work queue now, then lets the next delay pass.
    let rounds = [
        (2, Duration::from_secs(1)),
        (2, Duration::from_secs(10)),
        (1, Duration::ZERO),
    ];
    for (expected, then) in rounds {
        for _ in 0..expected {
            let delivery = worker.recv_timeout(WAIT).expect("a delivery in this round");
            let body = String::from_utf8_lossy(delivery.body()).into_owned();
            let attempt = RetryTopology::attempt(&delivery);
            if body == "p-flaky" && attempt >= 1 {
                println!("t={}ms {body}: paid on attempt {attempt}", clock.now_ms());
                delivery.ack(BasicAckOptions::default())?;
                paid.push(body);
                continue;
            }
            match retry.retry(&ch, &delivery)? {
                RetryOutcome::Delayed { attempt, delay } => {
                    println!(
                        "t={}ms {body}: failed, retry {attempt} in {delay:?}",
                        clock.now_ms()
                    )
                }
                RetryOutcome::Parked => {
                    println!("t={}ms {body}: failed every retry, parked", clock.now_ms());
                    parked.push(body);
                }
                RetryOutcome::DeadLettered => unreachable!("this topology parks final failures"),
            }
        }
        clock.advance(then);
    }

    assert_eq!(paid, ["p-flaky"]);
    assert_eq!(parked, ["p-broken"]);
    let in_parking = ch
        .basic_get(
            retry.parking_queue().expect("final failures are parked"),
            BasicGetOptions::default(),
        )?
        .expect("the broken payment waits in the parking queue");
    assert_eq!(&in_parking.delivery.body()[..], b"p-broken");
    assert_eq!(RetryTopology::attempt(&in_parking.delivery), 2);
    in_parking.delivery.ack(BasicAckOptions::default())?;
    for (wait_queue, delay) in retry.wait_queues() {
        let stats = broker.death_stats(wait_queue).expect("declared");
        println!(
            "{wait_queue} ({delay:?}): {} dead-lettered back to payments",
            stats.dead_lettered.expired
        );
    }
    broker.close()
}
