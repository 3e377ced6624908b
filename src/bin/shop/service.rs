//! Services as handlers: a [`Service`] turns one delivery into store writes, messages to send
//! and a settle decision, without touching the broker; [`run`] is the threaded runner that
//! consumes its queue, calls it, and performs what it decided in the order that keeps the
//! shop's invariant across a crash.
//!
//! The order of a batch, and why:
//! 1. `handle` every delivery received (up to [`BATCH_MAX`]): store writes and an outbox;
//! 2. `commit`: the service's store is flushed, so what the messages and acks below announce
//!    is durable before anyone can see them;
//! 3. publish the outbox and wait for the broker's confirms: the messages are on disk;
//! 4. settle the deliveries. An ack is only sent once its consequences are durable, so a
//!    crash at any point leaves each delivery either unacked (it comes back, and every
//!    service is idempotent for a repeat) or fully done.
//!
//! A handler sees a [`Delivery`] and returns data, so the same services can be driven by a
//! single-threaded, seeded runner instead of threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use coney::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicProperties,
    BasicPublishOptions, BasicRejectOptions, Broker, Channel, ConfirmSelectOptions, Connection,
    Consumer, Delivery, FieldTable, RecvTimeoutError,
};

use super::error::AppError;

/// Most deliveries handled between two commits: bounds the work a crash can make redo.
pub const BATCH_MAX: usize = 256;
/// Unacked deliveries a service may hold (its consumer's prefetch).
pub const PREFETCH: u16 = 512;
/// How often an idle runner looks at its [`Control`].
const POLL: Duration = Duration::from_millis(20);

/// One service: the queue it consumes and what it does with a delivery.
pub trait Service: Send + 'static {
    /// Its name, for logs and errors.
    fn name(&self) -> &'static str;
    /// The queue it consumes.
    fn queue(&self) -> &'static str;
    /// Handles one delivery: writes to the service's store (not yet flushed), adds what to
    /// publish to `outbox`, and says how to settle it. An error stops the service, except
    /// [`AppError::BadMessage`], which rejects that delivery alone.
    fn handle(&mut self, delivery: &Delivery, outbox: &mut Outbox) -> Result<Settle, AppError>;
    /// Makes what `handle` wrote since the last commit durable.
    fn commit(&mut self) -> Result<(), AppError>;
}

/// How a handled delivery is settled, once the batch is committed and its messages confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Done (or already done before: a repeat).
    Ack,
    /// Failed for now: back to the queue (counted against a quorum queue's delivery limit).
    Requeue,
    /// Cannot ever succeed: dead-lettered or dropped by the queue.
    Reject,
}

impl Settle {
    /// Settles `delivery` so.
    fn apply(self, delivery: &Delivery) -> Result<(), coney::Error> {
        match self {
            Settle::Ack => delivery.ack(BasicAckOptions::default()),
            Settle::Requeue => delivery.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            }),
            Settle::Reject => delivery.reject(BasicRejectOptions { requeue: false }),
        }
    }
}

/// A message a handler wants published once its batch is committed.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The exchange (`""`: the default exchange).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
    /// The body.
    pub body: Vec<u8>,
    /// The properties.
    pub properties: BasicProperties,
}

/// What a batch's handlers want published.
#[derive(Debug, Default)]
pub struct Outbox {
    messages: Vec<Outgoing>,
}

impl Outbox {
    /// Publishes `body` to `queue` through the default exchange.
    pub fn send_to(&mut self, queue: &str, body: Vec<u8>, properties: BasicProperties) {
        self.messages.push(Outgoing {
            exchange: String::new(),
            routing_key: queue.to_owned(),
            body,
            properties,
        });
    }

    /// Takes the messages out.
    pub fn drain(&mut self) -> std::vec::Drain<'_, Outgoing> {
        self.messages.drain(..)
    }

    /// How many messages it holds.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether there is nothing to publish.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// Publishes every message of `outbox` on `channel` (in confirm mode) and waits until the
/// broker has them on disk.
pub fn publish_confirmed(
    channel: &Channel,
    outbox: &mut Outbox,
    what: &'static str,
) -> Result<(), AppError> {
    if outbox.is_empty() {
        return Ok(());
    }
    for m in outbox.drain() {
        channel.basic_publish(
            &m.exchange,
            &m.routing_key,
            BasicPublishOptions::default(),
            m.body,
            m.properties,
        )?;
    }
    if channel.wait_for_confirms()? {
        Ok(())
    } else {
        Err(AppError::Nacked(what))
    }
}

/// Tells a running service to stop, or to leave its queue for a while.
#[derive(Debug, Default)]
pub struct Control {
    stop: AtomicBool,
    paused: AtomicBool,
}

impl Control {
    /// Asks the service to stop for good.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Takes the service off its queue (`true`: consumer cancelled, channel closed) or puts
    /// it back (`false`).
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }
}

/// Runs `service` on its own connection until `control` says stop: consumes its queue with
/// manual acks and handles deliveries in batches (see the module doc).
pub fn run(broker: &Broker, mut service: impl Service, control: &Control) -> Result<(), AppError> {
    let conn = broker.connect();
    let mut open: Option<(Channel, Consumer)> = None;
    let mut batch = Vec::with_capacity(BATCH_MAX);
    let mut outbox = Outbox::default();
    while !control.stop.load(Ordering::SeqCst) {
        if control.paused.load(Ordering::SeqCst) {
            if let Some((channel, consumer)) = open.take() {
                leave(&mut service, channel, consumer, &mut outbox)?;
            }
            std::thread::sleep(POLL);
            continue;
        }
        let (channel, consumer) = match &mut open {
            Some(open) => open,
            None => open.insert(subscribe(&conn, service.queue(), service.name())?),
        };
        match consumer.recv_timeout(POLL) {
            Ok(delivery) => batch.push(delivery),
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                return Err(AppError::Usage(format!(
                    "{}: the consumer of {} ended",
                    service.name(),
                    service.queue()
                )));
            }
        }
        while batch.len() < BATCH_MAX {
            match consumer.try_recv() {
                Ok(delivery) => batch.push(delivery),
                Err(_) => break,
            }
        }
        handle_batch(&mut service, channel, &mut batch, &mut outbox)?;
    }
    if let Some((channel, consumer)) = open.take() {
        leave(&mut service, channel, consumer, &mut outbox)?;
    }
    Ok(())
}

/// A channel in confirm mode with a manual-ack consumer on `queue`.
fn subscribe(conn: &Connection, queue: &str, name: &str) -> Result<(Channel, Consumer), AppError> {
    let channel = conn.channel()?;
    channel.confirm_select(ConfirmSelectOptions::default())?;
    channel.basic_qos(PREFETCH, Default::default())?;
    let consumer = channel.basic_consume(
        queue,
        name,
        BasicConsumeOptions::default(),
        FieldTable::new(),
    )?;
    Ok((channel, consumer))
}

/// Cancels the consumer, handles what it had already received (returning those would count
/// as failed deliveries on a quorum queue), and closes the channel.
fn leave(
    service: &mut impl Service,
    channel: Channel,
    mut consumer: Consumer,
    outbox: &mut Outbox,
) -> Result<(), AppError> {
    channel.basic_cancel(consumer.tag(), BasicCancelOptions::default())?;
    let mut rest = Vec::new();
    while let Ok(delivery) = consumer.try_recv() {
        rest.push(delivery);
    }
    if !rest.is_empty() {
        handle_batch(service, &channel, &mut rest, outbox)?;
    }
    drop(consumer);
    channel.close();
    Ok(())
}

/// Handles, commits, publishes and settles one batch, in that order.
fn handle_batch(
    service: &mut impl Service,
    channel: &Channel,
    batch: &mut Vec<Delivery>,
    outbox: &mut Outbox,
) -> Result<(), AppError> {
    let mut settles = Vec::with_capacity(batch.len());
    for delivery in batch.iter() {
        settles.push(handle_or_reject(service, delivery, outbox)?);
    }
    service.commit()?;
    publish_confirmed(channel, outbox, service.name())?;
    for (delivery, settle) in batch.drain(..).zip(settles) {
        settle.apply(&delivery)?;
    }
    Ok(())
}

/// `service.handle`, with a message that does not decode rejected (and logged) instead of
/// failing the service.
fn handle_or_reject(
    service: &mut impl Service,
    delivery: &Delivery,
    outbox: &mut Outbox,
) -> Result<Settle, AppError> {
    match service.handle(delivery, outbox) {
        Err(AppError::BadMessage(why)) => {
            tracing::error!(service = service.name(), %why, "rejecting a message that does not decode");
            Ok(Settle::Reject)
        }
        other => other,
    }
}

/// Counts the run shows while it goes (the stores are what the final check reads).
#[derive(Debug, Default)]
pub struct Tally {
    /// Orders created (both runs, on a resume).
    pub created: AtomicU64,
    /// Orders paid.
    pub paid: AtomicU64,
    /// Orders whose payment was declined.
    pub failed: AtomicU64,
    /// Orders whose payment request was dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Stock updates applied.
    pub stock_updates: AtomicU64,
    /// Payment attempts (deliveries of requests not already decided).
    pub payment_attempts: AtomicU64,
    /// Payment attempts that failed and were nacked.
    pub payment_failures: AtomicU64,
    /// Orders settled before this run (a resume), for this run's rate.
    pub settled_before: AtomicU64,
    /// Payment calls without a reply in time (request-reply mode), called again later.
    pub rpc_timeouts: AtomicU64,
    /// Deliveries found already handled (redeliveries, republished requests).
    pub repeats: AtomicU64,
}

impl Tally {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A tally shared by the services and the run.
pub type SharedTally = Arc<Tally>;

/// `service` as a handler of one delivery at a time for `coney::service` runners and the
/// deterministic simulation (`coney::sim`): handle, commit, publish with confirms, settle,
/// the order [`run`] keeps for a batch. An error other than a bad message is returned to the
/// runner (which, with `OnError::Crash`, crashes the service: its deliveries come back).
/// The binary runs its services with [`run`]; the simulation tests run them with this.
#[allow(dead_code)]
pub fn handler(
    mut service: impl Service,
) -> impl FnMut(&Delivery, &Channel) -> coney::service::HandlerResult + Send + 'static {
    let mut outbox = Outbox::default();
    move |delivery: &Delivery, channel: &Channel| {
        outbox.drain().for_each(drop);
        // A service's channel may be new (a restart): selecting again changes nothing.
        channel.confirm_select(ConfirmSelectOptions::default())?;
        let settle = handle_or_reject(&mut service, delivery, &mut outbox)?;
        service.commit()?;
        publish_confirmed(channel, &mut outbox, service.name())?;
        settle.apply(delivery)?;
        Ok(())
    }
}
