//! Delayed retries with back-off (SEMANTICS.md §6.3): a work queue, one wait queue per delay
//! and a parking queue, declared in one call.
//!
//! Each wait queue `<queue>.retry.<n>` holds messages for its delay (`x-message-ttl`, one queue
//! per delay so a short delay never waits behind a long one) and dead-letters them back to the
//! work queue through the default exchange. A failed delivery is handed to
//! [`RetryTopology::retry`], which republishes it to the wait queue of its next attempt, or to
//! `<queue>.parking` once every delay is used, and acks the original. The attempt number
//! travels in the message's own `x-retry-count` header: RabbitMQ 4.x does not carry `x-death`
//! over a republish, so applications that republish keep their own counter (§5.4).
//!
//! ```
//! use std::time::Duration;
//! use coney::*;
//! use coney::retry::{RetryOutcome, RetryTopology};
//!
//! let clock = ManualClock::new(0);
//! let broker = Broker::builder().clock(clock.clone()).in_memory();
//! let conn = broker.connect();
//! let ch = conn.channel()?;
//! let delays = [Duration::from_secs(1), Duration::from_secs(10)];
//! let retry = RetryTopology::declare(&ch, "payments", &delays, QueueDeclareOptions::default())?;
//! ch.basic_publish("", "payments", Default::default(), b"p1".to_vec(), Default::default())?;
//!
//! let failed = ch.basic_get("payments", BasicGetOptions::default())?.unwrap().delivery;
//! assert_eq!(retry.retry(&ch, &failed)?, RetryOutcome::Delayed { attempt: 1, delay: delays[0] });
//! clock.advance(Duration::from_secs(1));
//! let again = ch.basic_get("payments", BasicGetOptions::default())?.unwrap().delivery;
//! assert_eq!(RetryTopology::attempt(&again), 1);
//! # Ok::<(), coney::Error>(())
//! ```

use std::time::Duration;

use crate::error::{Error, Result};
use crate::runtime::{Channel, Delivery};
use crate::types::{BasicPublishOptions, FieldTable, QueueDeclareOptions};

/// The header holding how many times a message was retried.
pub const RETRY_COUNT_HEADER: &str = "x-retry-count";

/// A work queue with its wait queues and parking queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryTopology {
    queue: String,
    waits: Vec<(String, Duration)>,
    parking: String,
}

/// Where [`RetryTopology::retry`] sent a failed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    /// To a wait queue: it comes back to the work queue after `delay`, as attempt `attempt`.
    Delayed {
        /// The retry number it will carry (1 for the first retry).
        attempt: u32,
        /// How long it waits.
        delay: Duration,
    },
    /// Every delay was used: it went to the parking queue.
    Parked,
}

impl RetryTopology {
    /// Declares work queue `queue` (with `options`), a wait queue `<queue>.retry.<n>` per
    /// delay, and the parking queue `<queue>.parking`, all with the same durability. Fails
    /// like `queue_declare` (for example a 406 if `queue` exists with other arguments), and
    /// with [`Error::InvalidInput`] for a delay above RabbitMQ's TTL maximum (ten years).
    pub fn declare(
        channel: &Channel,
        queue: &str,
        delays: &[Duration],
        options: QueueDeclareOptions,
    ) -> Result<RetryTopology> {
        let wait_options = QueueDeclareOptions {
            durable: options.durable,
            ..QueueDeclareOptions::default()
        };
        channel.queue_declare(queue, options, FieldTable::new())?;
        let mut waits = Vec::with_capacity(delays.len());
        for (n, delay) in delays.iter().enumerate() {
            let ttl = i64::try_from(delay.as_millis())
                .ok()
                .filter(|&ms| ms <= crate::core::topology::TTL_MAX_MS)
                .ok_or_else(|| Error::InvalidInput(format!("retry delay {delay:?} too long")))?;
            let name = format!("{queue}.retry.{}", n + 1);
            let arguments = FieldTable::new()
                .with("x-message-ttl", ttl)
                .with("x-dead-letter-exchange", "")
                .with("x-dead-letter-routing-key", queue);
            channel.queue_declare(&name, wait_options, arguments)?;
            waits.push((name, *delay));
        }
        let parking = format!("{queue}.parking");
        channel.queue_declare(&parking, wait_options, FieldTable::new())?;
        Ok(RetryTopology {
            queue: queue.to_owned(),
            waits,
            parking,
        })
    }

    /// How many times `delivery` was retried so far (0 for a first delivery).
    pub fn attempt(delivery: &Delivery) -> u32 {
        delivery
            .properties()
            .headers
            .as_ref()
            .and_then(|h| h.get(RETRY_COUNT_HEADER))
            .and_then(|v| v.as_i64())
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    }

    /// Retries a failed delivery: republishes it on `channel` (same body and properties, its
    /// retry count incremented) to the wait queue of its next attempt, or to the parking
    /// queue when every delay is used, then acks the original. The republish comes first, so
    /// a crash in between duplicates rather than loses it; with confirms on `channel`, wait
    /// for them before relying on the copy.
    pub fn retry(&self, channel: &Channel, delivery: &Delivery) -> Result<RetryOutcome> {
        let done = Self::attempt(delivery);
        let mut properties = delivery.properties().clone();
        let headers = properties.headers.get_or_insert_with(FieldTable::new);
        let (target, outcome) = match self.waits.get(done as usize) {
            Some((wait, delay)) => {
                let attempt = done + 1;
                headers.insert(RETRY_COUNT_HEADER, i64::from(attempt));
                (
                    wait.as_str(),
                    RetryOutcome::Delayed {
                        attempt,
                        delay: *delay,
                    },
                )
            }
            None => (self.parking.as_str(), RetryOutcome::Parked),
        };
        channel.basic_publish(
            "",
            target,
            BasicPublishOptions::default(),
            delivery.body().clone(),
            properties,
        )?;
        delivery.ack(crate::types::BasicAckOptions::default())?;
        Ok(outcome)
    }

    /// The work queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The wait queues with their delays, first retry first.
    pub fn wait_queues(&self) -> impl Iterator<Item = (&str, Duration)> {
        self.waits
            .iter()
            .map(|(name, delay)| (name.as_str(), *delay))
    }

    /// The parking queue.
    pub fn parking_queue(&self) -> &str {
        &self.parking
    }
}
