//! The answering side: [`RpcServer`] consumes a request queue, calls the application's
//! handler for each request and publishes the reply, then settles the request.
//!
//! A request is acked only after its reply is published: a server that dies in between
//! leaves the request unacked, so the broker requeues it and another server answers it (at
//! least once; the client drops a second reply as a duplicate).

use std::fmt::Display;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::error::{CloseCause, Error, Result};
use crate::runtime::{Channel, Consumer, Delivery};
use crate::types::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicProperties,
    BasicPublishOptions, BasicQosOptions, FieldTable, IntoBody,
};

/// How an [`RpcServer`] consumes and settles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcServerOptions {
    /// Requests a consumer of the server holds unacked at most (`basic.qos`). Default 1: a
    /// server handles one request at a time, so more would only sit in its buffer while other
    /// servers of the queue are idle, and a server that dies returns that many to the queue.
    pub prefetch_count: u16,
    /// Whether a request whose handler failed goes back to its queue. Default `false`: it is
    /// rejected without requeue, so it is dead-lettered if the queue has a dead-letter
    /// exchange (and dropped if not), rather than failing again and again.
    pub requeue_on_error: bool,
    /// The consumer tag of [`RpcServer::consume`] and [`RpcServer::serve`]; empty (the
    /// default) for a server-generated one.
    pub consumer_tag: String,
}

impl Default for RpcServerOptions {
    fn default() -> Self {
        Self {
            prefetch_count: 1,
            requeue_on_error: false,
            consumer_tag: String::new(),
        }
    }
}

/// A handler's answer to a request: the reply's body and properties.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Response {
    /// The reply's body.
    pub body: Bytes,
    /// The reply's properties; its `correlation_id` is replaced by the request's.
    pub properties: BasicProperties,
}

impl Response {
    /// A response with `body` and no properties.
    pub fn new(body: impl IntoBody) -> Self {
        Self {
            body: body.into_body(),
            properties: BasicProperties::default(),
        }
    }

    /// Sets the reply's properties (its `correlation_id` is replaced by the request's).
    pub fn with_properties(mut self, properties: BasicProperties) -> Self {
        self.properties = properties;
        self
    }
}

/// Publishes `response` as the reply to `request` on `channel`: through the default exchange
/// to the request's `reply_to`, with its `correlation_id` (replacing any in the response's
/// properties). Returns `false`, publishing nothing, if the request has no `reply_to`. It
/// neither acks nor rejects the request. For handlers that answer requests themselves, in a
/// [`Simulation`](crate::sim::Simulation) for instance.
pub fn reply(channel: &Channel, request: &Delivery, response: Response) -> Result<bool> {
    let request = request.properties();
    let Some(reply_to) = request.reply_to.as_deref() else {
        return Ok(false);
    };
    let mut properties = response.properties;
    properties.correlation_id = request.correlation_id.clone();
    channel.basic_publish(
        "",
        reply_to,
        BasicPublishOptions::default(),
        response.body,
        properties,
    )?;
    Ok(true)
}

/// What [`RpcServer::handle`] did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// The reply was published, then the request acked.
    Replied,
    /// The handler failed: the request was rejected (requeued if
    /// [`RpcServerOptions::requeue_on_error`]).
    Failed,
    /// The request had no `reply_to`: nobody can be answered, so it was acked without
    /// calling the handler.
    Unanswerable,
}

/// What a server counted since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RpcServerStats {
    /// Requests taken by [`RpcServer::handle`].
    pub handled: u64,
    /// Replies published.
    pub replied: u64,
    /// Requests whose handler failed, or whose reply could not be published.
    pub failed: u64,
    /// Requests without `reply_to`, acked unanswered.
    pub unanswerable: u64,
}

/// Answers requests from a queue on a channel: [`RpcServer::handle`] answers one delivery (no
/// thread needed), [`RpcServer::serve`] consumes and answers until its consumer ends.
///
/// The queue is the application's to declare (with the arguments it wants, a dead-letter
/// exchange for failed requests for instance). Several servers may consume one queue; one
/// server may be shared by several threads, each running `serve`.
pub struct RpcServer {
    channel: Channel,
    queue: String,
    options: RpcServerOptions,
    stats: Mutex<RpcServerStats>,
    /// The tags of the consumers `serve` is running, for `cancel`.
    serving: Mutex<Vec<String>>,
}

impl RpcServer {
    /// A server of `queue` on (a handle of) `channel`. Sets the channel's prefetch
    /// (`basic.qos`) to [`RpcServerOptions::prefetch_count`], for the consumers created on it
    /// afterwards.
    pub fn new(channel: &Channel, queue: &str, options: RpcServerOptions) -> Result<Self> {
        channel.basic_qos(options.prefetch_count, BasicQosOptions::default())?;
        Ok(Self {
            channel: channel.clone(),
            queue: queue.to_owned(),
            options,
            stats: Mutex::new(RpcServerStats::default()),
            serving: Mutex::new(Vec::new()),
        })
    }

    /// Answers one request: calls `handler`, publishes its response to the request's
    /// `reply_to` through the default exchange with the request's `correlation_id`, and only
    /// then acks the request. A handler error rejects the request instead (see
    /// [`RpcServerOptions::requeue_on_error`]); a request without `reply_to` is acked without
    /// calling the handler. `delivery` must come from a manual-ack consumer (or `basic_get`)
    /// on this server's channel.
    ///
    /// Fails if the reply cannot be published (the request is then rejected as for a handler
    /// error, if the channel is still open; a closed channel requeues it) or the request
    /// cannot be settled. Publishing the reply waits for flow control like any publish.
    pub fn handle<E: Display>(
        &self,
        delivery: &Delivery,
        handler: impl FnOnce(&Delivery) -> std::result::Result<Response, E>,
    ) -> Result<Handled> {
        self.stats.lock().handled += 1;
        let request = delivery.properties();
        let Some(reply_to) = request.reply_to.as_deref() else {
            self.stats.lock().unanswerable += 1;
            tracing::warn!(
                queue = %self.queue,
                correlation_id = ?request.correlation_id,
                "acked a request without reply_to: there is nobody to answer"
            );
            delivery.ack(BasicAckOptions::default())?;
            return Ok(Handled::Unanswerable);
        };
        let response = match handler(delivery) {
            Ok(response) => response,
            Err(e) => {
                tracing::warn!(
                    queue = %self.queue,
                    correlation_id = ?request.correlation_id,
                    requeue = self.options.requeue_on_error,
                    "the handler failed: {e}"
                );
                self.stats.lock().failed += 1;
                self.settle_failed(delivery)?;
                return Ok(Handled::Failed);
            }
        };
        let _ = reply_to;
        if let Err(e) = reply(&self.channel, delivery, response) {
            self.stats.lock().failed += 1;
            if !self.channel.is_closed() {
                // Refused alone (invalid properties): the request would stay unacked.
                let _ = self.settle_failed(delivery);
            }
            return Err(e);
        }
        self.stats.lock().replied += 1;
        delivery.ack(BasicAckOptions::default())?;
        Ok(Handled::Replied)
    }

    /// Consumes the queue (manual acks, [`RpcServerOptions::consumer_tag`]) and answers each
    /// request with [`RpcServer::handle`], until the consumer ends: [`RpcServer::cancel`],
    /// the queue's deletion, or the channel's close. Returns `Ok` if it was cancelled or the
    /// application closed the channel (or its connection); an error if the broker closed the
    /// channel (with [`Error::ChannelClosed`] and its cause) or a reply or settle failed.
    pub fn serve<E: Display>(
        &self,
        mut handler: impl FnMut(&Delivery) -> std::result::Result<Response, E>,
    ) -> Result<()> {
        let mut consumer = self.consume()?;
        let tag = consumer.tag().to_owned();
        self.serving.lock().push(tag.clone());
        let served = self.serve_consumer(&mut consumer, &mut handler);
        self.serving.lock().retain(|t| *t != tag);
        served
    }

    /// Cancels the consumers [`RpcServer::serve`] runs: each `serve` answers the requests
    /// already delivered to it, then returns `Ok`.
    pub fn cancel(&self) -> Result<()> {
        let tags = self.serving.lock().clone();
        for tag in tags {
            self.channel
                .basic_cancel(&tag, BasicCancelOptions::default())?;
        }
        Ok(())
    }

    /// A manual-ack consumer of the queue, for applications that run their own loop around
    /// [`RpcServer::handle`].
    pub fn consume(&self) -> Result<Consumer> {
        self.channel.basic_consume(
            &self.queue,
            &self.options.consumer_tag,
            BasicConsumeOptions::default(),
            FieldTable::new(),
        )
    }

    /// What the server counted so far.
    pub fn stats(&self) -> RpcServerStats {
        *self.stats.lock()
    }

    /// The queue it answers.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Its channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    fn serve_consumer<E: Display>(
        &self,
        consumer: &mut Consumer,
        handler: &mut impl FnMut(&Delivery) -> std::result::Result<Response, E>,
    ) -> Result<()> {
        while let Some(delivery) = consumer.recv() {
            self.handle(&delivery, &mut *handler)?;
        }
        match self.channel.close_cause() {
            Some(cause) if !closed_by_application(&cause) => Err(Error::ChannelClosed(cause)),
            _ => Ok(()),
        }
    }

    /// Rejects a request whose handling failed, requeued or not as the options say.
    fn settle_failed(&self, delivery: &Delivery) -> Result<()> {
        delivery.nack(BasicNackOptions {
            multiple: false,
            requeue: self.options.requeue_on_error,
        })
    }
}

impl std::fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcServer")
            .field("queue", &self.queue)
            .field("options", &self.options)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Whether the application closed the channel (or its connection) itself.
fn closed_by_application(cause: &Arc<CloseCause>) -> bool {
    match &**cause {
        CloseCause::Client => true,
        CloseCause::Connection(cause) => closed_by_application(cause),
        CloseCause::Error(_) | CloseCause::BrokerClosed => false,
    }
}
