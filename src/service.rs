//! Services as handlers: a function of a delivery and a channel that processes one message
//! and settles it. The same handler runs on a thread of its own against any broker
//! ([`spawn`]) or, step by step and in an order a seed decides, in a
//! [`Simulation`](crate::sim::Simulation).
//!
//! A handler acks (or nacks) the delivery itself, usually after publishing what it produced.
//! If it returns an error without having settled the delivery, the runner settles it as
//! [`ServiceOptions::on_error`] says; a handler that panics is treated as a crash of its
//! service: its channel closes and its unacked messages go back to their queues.
//!
//! ```
//! use coney::*;
//! use coney::service::{self, ServiceOptions};
//!
//! let broker = Broker::in_memory();
//! let conn = broker.connect();
//! let ch = conn.channel()?;
//! ch.queue_declare("work", QueueDeclareOptions::default(), FieldTable::new())?;
//! ch.queue_declare("done", QueueDeclareOptions::default(), FieldTable::new())?;
//! let worker = service::spawn(&conn, "upper", "work", ServiceOptions::default(),
//!     |delivery: &Delivery, channel: &Channel| {
//!         let upper = delivery.body().to_ascii_uppercase();
//!         channel.basic_publish("", "done", BasicPublishOptions::default(), upper,
//!             BasicProperties::default())?;
//!         delivery.ack(BasicAckOptions::default())?;
//!         Ok(())
//!     })?;
//! ch.basic_publish("", "work", BasicPublishOptions::default(), b"hello",
//!     BasicProperties::default())?;
//! let mut done = ch.basic_consume("done", "", BasicConsumeOptions::default(), FieldTable::new())?;
//! assert_eq!(&done.recv().expect("a result").body()[..], b"HELLO");
//! let report = worker.stop()?;
//! assert_eq!(report.handled, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::runtime::{Channel, Connection, Consumer, Delivery};
use crate::types::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, FieldTable,
};

/// What a handler returns when it fails.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// A service's handler: processes one delivery, settling it.
pub type BoxedHandler = Box<dyn FnMut(&Delivery, &Channel) -> HandlerResult + Send>;

/// What a handler returns.
pub type HandlerResult = std::result::Result<(), HandlerError>;

/// What the runner does with a delivery whose handler returned an error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    /// `basic.nack` with requeue: it comes back, flagged redelivered (a quorum queue counts
    /// the attempt against its delivery limit).
    #[default]
    Requeue,
    /// `basic.nack` without requeue: it is dead-lettered (reason `rejected`) or dropped.
    Reject,
    /// The service crashes: its channel closes and every message it holds goes back.
    Crash,
}

/// How a service consumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceOptions {
    /// Unacked deliveries it may hold at once (`basic.qos`); 0 = no limit.
    pub prefetch: u16,
    /// What a failed handler's delivery gets.
    pub on_error: OnError,
    /// In a simulation: the virtual time each delivery takes to process (the service takes
    /// no other delivery meanwhile). On threads time is real: [`spawn`] refuses anything but
    /// zero.
    pub processing_time: Duration,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            prefetch: 10,
            on_error: OnError::Requeue,
            processing_time: Duration::ZERO,
        }
    }
}

/// How one delivery's handling ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handled {
    /// The handler returned `Ok`.
    Done,
    /// The handler returned an error (its text); the delivery was settled per
    /// [`ServiceOptions::on_error`].
    Failed(String),
    /// The handler panicked (its message), or failed with [`OnError::Crash`]: the service's
    /// channel was closed.
    Crashed(String),
}

/// Runs `handler` on `delivery` and settles a failure as `on_error` says.
pub(crate) fn handle_one(
    handler: &mut BoxedHandler,
    delivery: &Delivery,
    channel: &Channel,
    on_error: OnError,
) -> Handled {
    match catch_unwind(AssertUnwindSafe(|| handler(delivery, channel))) {
        Ok(Ok(())) => Handled::Done,
        Ok(Err(e)) => {
            let text = e.to_string();
            match on_error {
                OnError::Crash => {
                    channel.close();
                    Handled::Crashed(text)
                }
                OnError::Requeue | OnError::Reject => {
                    let requeue = on_error == OnError::Requeue;
                    // A handler that settled before failing makes this a second settle:
                    // RabbitMQ closes the channel for that (406), and so does the broker.
                    let _ = delivery.nack(BasicNackOptions {
                        multiple: false,
                        requeue,
                    });
                    Handled::Failed(text)
                }
            }
        }
        Err(panic) => {
            channel.close();
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a handler panicked".into());
            Handled::Crashed(text)
        }
    }
}

/// Opens a channel on `connection` and consumes `queue` on it for a service.
pub(crate) fn consume(
    connection: &Connection,
    name: &str,
    queue: &str,
    options: &ServiceOptions,
) -> Result<(Channel, Consumer)> {
    let channel = connection.channel()?;
    channel.basic_qos(options.prefetch, BasicQosOptions::default())?;
    let consumer = channel.basic_consume(
        queue,
        name,
        BasicConsumeOptions::default(),
        FieldTable::new(),
    )?;
    Ok((channel, consumer))
}

/// What a service thread counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceReport {
    /// Deliveries handled.
    pub handled: u64,
    /// Of which the handler failed.
    pub failed: u64,
    /// The crash that ended the service, if one did.
    pub crashed: Option<String>,
}

/// A service running on a thread of its own ([`spawn`]).
pub struct ServiceHandle {
    channel: Channel,
    tag: String,
    thread: Option<JoinHandle<ServiceReport>>,
}

impl ServiceHandle {
    /// Cancels the service's consumer: it handles what it was already given, then its thread
    /// ends. Returns what it counted.
    pub fn stop(self) -> Result<ServiceReport> {
        if !self.channel.is_closed() {
            self.channel
                .basic_cancel(&self.tag, BasicCancelOptions::default())?;
        }
        self.join()
    }

    /// Waits until the service ends by itself (its consumer was cancelled, its queue deleted,
    /// its channel or connection closed, or it crashed).
    pub fn join(mut self) -> Result<ServiceReport> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(report)) => Ok(report),
            Some(Err(_)) | None => Err(Error::InvalidInput("the service thread panicked".into())),
        }
    }
}

/// Runs a service on a thread of its own: a channel on `connection` with `options.prefetch`,
/// a consumer of `queue` tagged `name`, and `handler` called on each delivery until the
/// consumer ends. A non-zero [`ServiceOptions::processing_time`] is refused
/// ([`Error::InvalidInput`]).
pub fn spawn<F>(
    connection: &Connection,
    name: &str,
    queue: &str,
    options: ServiceOptions,
    handler: F,
) -> Result<ServiceHandle>
where
    F: FnMut(&Delivery, &Channel) -> HandlerResult + Send + 'static,
{
    if !options.processing_time.is_zero() {
        return Err(Error::InvalidInput(
            "ServiceOptions::processing_time is virtual time: it applies in a simulation only"
                .into(),
        ));
    }
    let (channel, mut consumer) = consume(connection, name, queue, &options)?;
    let tag = consumer.tag().to_owned();
    let thread_channel = channel.clone();
    let mut handler: BoxedHandler = Box::new(handler);
    let thread = std::thread::Builder::new()
        .name(format!("coney-service-{name}"))
        .spawn(move || {
            let mut report = ServiceReport::default();
            while let Some(delivery) = consumer.recv() {
                report.handled += 1;
                match handle_one(&mut handler, &delivery, &thread_channel, options.on_error) {
                    Handled::Done => {}
                    Handled::Failed(_) => report.failed += 1,
                    Handled::Crashed(why) => {
                        report.failed += 1;
                        report.crashed = Some(why);
                        break;
                    }
                }
            }
            report
        })
        .map_err(|e| Error::InvalidInput(format!("cannot start a service thread: {e}")))?;
    Ok(ServiceHandle {
        channel,
        tag,
        thread: Some(thread),
    })
}
