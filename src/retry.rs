//! Delayed retries with back-off: a work queue, one wait queue per delay and a final target,
//! declared in one call.
//!
//! Each wait queue `<queue>.retry.<n>` holds messages for its delay (`x-message-ttl`, one queue
//! per delay so a short delay never waits behind a long one, as RabbitMQ expires messages only
//! at the head of a queue) and dead-letters them back to the work queue through the default
//! exchange. A failed delivery is handed to [`RetryTopology::retry`], which republishes it to
//! the wait queue of its next attempt and acks the original; once every delay is used, the
//! message meets its [`FinalFailure`]: the `<queue>.parking` queue (the default), the work
//! queue's own dead-lettering, or an exchange of your choosing. The attempt number travels in
//! the message's own `x-retry-count` header: RabbitMQ 4.x does not carry `x-death` over a
//! republish, so applications that republish keep their own counter.
//!
//! The work queue is declared with your options and arguments (a quorum queue, a dead-letter
//! exchange, a length limit...), so the helper composes with a queue declared elsewhere with
//! the same ones.
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
//!
//! A durable quorum work queue whose final failures go to the user's dead-letter exchange:
//!
//! ```
//! use std::time::Duration;
//! use coney::*;
//! use coney::retry::{FinalFailure, RetryTopology};
//!
//! let broker = Broker::in_memory();
//! let conn = broker.connect();
//! let ch = conn.channel()?;
//! ch.exchange_declare("dlx", ExchangeKind::Fanout, Default::default(), FieldTable::new())?;
//! let retry = RetryTopology::builder("orders")
//!     .delays(&[Duration::from_secs(1), Duration::from_secs(30)])
//!     .options(QueueDeclareOptions { durable: true, ..Default::default() })
//!     .arguments(FieldTable::new()
//!         .with("x-queue-type", "quorum")
//!         .with("x-dead-letter-exchange", "dlx"))
//!     .final_failure(FinalFailure::Reject)
//!     .declare(&ch)?;
//! assert_eq!(retry.queue(), "orders");
//! # Ok::<(), coney::Error>(())
//! ```

use std::time::Duration;

use crate::error::{Error, Result};
use crate::runtime::{Channel, Delivery};
use crate::types::{
    BasicPublishOptions, BasicRejectOptions, ExchangeDeclareOptions, ExchangeKind, FieldTable,
    QueueDeclareOptions,
};

/// The header holding how many times a message was retried.
pub const RETRY_COUNT_HEADER: &str = "x-retry-count";

/// A work queue with its wait queues and the target of its final failures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryTopology {
    queue: String,
    waits: Vec<(String, Duration)>,
    last: Last,
}

/// Where a message goes once every delay is used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum FinalFailure {
    /// Republished to the queue `<queue>.parking`, declared with the work queue's durability.
    #[default]
    Park,
    /// Rejected without requeue, so the work queue's own dead-lettering takes it (its
    /// `x-dead-letter-exchange` argument or a policy), with an `x-death` entry of reason
    /// `rejected`. Without a dead-letter exchange the message is dropped, as RabbitMQ drops
    /// any rejected message then.
    Reject,
    /// Republished to `exchange` (which must exist when the topology is declared) with
    /// `routing_key`, or with the delivery's own routing key when `None`.
    Publish {
        /// The exchange (`""` is the default exchange).
        exchange: String,
        /// The routing key; `None` keeps the delivery's.
        routing_key: Option<String>,
    },
}

/// The final target, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Last {
    Park(String),
    Reject,
    Publish {
        exchange: String,
        routing_key: Option<String>,
    },
}

/// Declares a [`RetryTopology`] with a work queue of your own options and arguments; from
/// [`RetryTopology::builder`].
#[derive(Clone, Debug)]
pub struct RetryBuilder {
    queue: String,
    delays: Vec<Duration>,
    options: QueueDeclareOptions,
    arguments: FieldTable,
    final_failure: FinalFailure,
}

impl RetryBuilder {
    /// The back-off delays, first retry first (none: a failure meets the final target at once).
    pub fn delays(mut self, delays: &[Duration]) -> Self {
        self.delays = delays.to_vec();
        self
    }

    /// The work queue's declare options; the wait queues (and the parking queue) take its
    /// durability.
    pub fn options(mut self, options: QueueDeclareOptions) -> Self {
        self.options = options;
        self
    }

    /// The work queue's arguments (`x-queue-type`, `x-dead-letter-exchange`, limits...), as
    /// it is or will be declared elsewhere: a different set is RabbitMQ's 406 inequivalent arg.
    pub fn arguments(mut self, arguments: FieldTable) -> Self {
        self.arguments = arguments;
        self
    }

    /// Where a message goes once every delay is used (default [`FinalFailure::Park`]).
    pub fn final_failure(mut self, final_failure: FinalFailure) -> Self {
        self.final_failure = final_failure;
        self
    }

    /// Declares the work queue, a wait queue `<queue>.retry.<n>` per delay and the final
    /// target. Fails like `queue_declare` (for example a 406 if the work queue exists with
    /// other arguments; a 404 if the [`FinalFailure::Publish`] exchange does not exist), and
    /// with [`Error::InvalidInput`] for a delay above RabbitMQ's TTL maximum (ten years).
    pub fn declare(self, channel: &Channel) -> Result<RetryTopology> {
        let RetryBuilder {
            queue,
            delays,
            options,
            arguments,
            final_failure,
        } = self;
        let ttls = delays
            .iter()
            .map(|delay| {
                i64::try_from(delay.as_millis())
                    .ok()
                    .filter(|&ms| ms <= crate::core::topology::TTL_MAX_MS)
                    .ok_or_else(|| Error::InvalidInput(format!("retry delay {delay:?} too long")))
            })
            .collect::<Result<Vec<_>>>()?;
        let wait_options = QueueDeclareOptions {
            durable: options.durable,
            ..QueueDeclareOptions::default()
        };
        channel.queue_declare(&queue, options, arguments)?;
        let mut waits = Vec::with_capacity(delays.len());
        for (n, (delay, ttl)) in delays.iter().zip(ttls).enumerate() {
            let name = format!("{queue}.retry.{}", n + 1);
            let arguments = FieldTable::new()
                .with("x-message-ttl", ttl)
                .with("x-dead-letter-exchange", "")
                .with("x-dead-letter-routing-key", queue.as_str());
            channel.queue_declare(&name, wait_options, arguments)?;
            waits.push((name, *delay));
        }
        let last = match final_failure {
            FinalFailure::Park => {
                let parking = format!("{queue}.parking");
                channel.queue_declare(&parking, wait_options, FieldTable::new())?;
                Last::Park(parking)
            }
            FinalFailure::Reject => Last::Reject,
            FinalFailure::Publish {
                exchange,
                routing_key,
            } => {
                if !exchange.is_empty() {
                    let passive = ExchangeDeclareOptions {
                        passive: true,
                        ..Default::default()
                    };
                    channel.exchange_declare(
                        &exchange,
                        ExchangeKind::Direct,
                        passive,
                        FieldTable::new(),
                    )?;
                }
                Last::Publish {
                    exchange,
                    routing_key,
                }
            }
        };
        Ok(RetryTopology { queue, waits, last })
    }
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
    /// Every delay was used: it went to the parking queue ([`FinalFailure::Park`]).
    Parked,
    /// Every delay was used: it was rejected to the work queue's dead-lettering
    /// ([`FinalFailure::Reject`]) or republished to the chosen exchange
    /// ([`FinalFailure::Publish`]).
    DeadLettered,
}

impl RetryTopology {
    /// Declares work queue `queue` (with `options` and no arguments), a wait queue
    /// `<queue>.retry.<n>` per delay, and the parking queue `<queue>.parking`, all with the
    /// same durability. For a work queue with arguments or another final target, see
    /// [`RetryTopology::builder`]. Fails as [`RetryBuilder::declare`] does.
    pub fn declare(
        channel: &Channel,
        queue: &str,
        delays: &[Duration],
        options: QueueDeclareOptions,
    ) -> Result<RetryTopology> {
        Self::builder(queue)
            .delays(delays)
            .options(options)
            .declare(channel)
    }

    /// A builder for work queue `queue`: no delays, default options, no arguments, final
    /// failures parked.
    pub fn builder(queue: &str) -> RetryBuilder {
        RetryBuilder {
            queue: queue.to_owned(),
            delays: Vec::new(),
            options: QueueDeclareOptions::default(),
            arguments: FieldTable::new(),
            final_failure: FinalFailure::Park,
        }
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
    /// retry count incremented) to the wait queue of its next attempt, then acks the original.
    /// Once every delay is used it meets the [`FinalFailure`]: republished (then acked) to the
    /// parking queue or the chosen exchange, or rejected without requeue. The republish comes
    /// first, so a crash in between duplicates rather than loses it; with confirms on
    /// `channel`, wait for them before relying on the copy.
    pub fn retry(&self, channel: &Channel, delivery: &Delivery) -> Result<RetryOutcome> {
        let done = Self::attempt(delivery);
        let mut properties = delivery.properties().clone();
        let (exchange, routing_key, outcome) = match self.waits.get(done as usize) {
            Some((wait, delay)) => {
                let attempt = done + 1;
                properties
                    .headers
                    .get_or_insert_with(FieldTable::new)
                    .insert(RETRY_COUNT_HEADER, i64::from(attempt));
                let outcome = RetryOutcome::Delayed {
                    attempt,
                    delay: *delay,
                };
                ("", wait.as_str(), outcome)
            }
            None => match &self.last {
                Last::Park(parking) => ("", parking.as_str(), RetryOutcome::Parked),
                Last::Reject => {
                    delivery.reject(BasicRejectOptions { requeue: false })?;
                    return Ok(RetryOutcome::DeadLettered);
                }
                Last::Publish {
                    exchange,
                    routing_key,
                } => {
                    let key = routing_key.as_deref().unwrap_or(delivery.routing_key());
                    (exchange.as_str(), key, RetryOutcome::DeadLettered)
                }
            },
        };
        channel.basic_publish(
            exchange,
            routing_key,
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

    /// The parking queue, if final failures are parked.
    pub fn parking_queue(&self) -> Option<&str> {
        match &self.last {
            Last::Park(parking) => Some(parking),
            _ => None,
        }
    }
}
