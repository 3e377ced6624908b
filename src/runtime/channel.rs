//! A channel: the application's handle for declaring, publishing, consuming and settling.
//!
//! Soft errors close the channel (later calls return [`Error::ChannelClosed`] with the cause),
//! hard errors close the connection, as in RabbitMQ (§12). Dropping the last handle of a
//! channel (its clones and its consumers) closes it, requeueing its unacked messages. A channel
//! keeps its connection open: the connection closes once its handle and all its channels are
//! gone.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use smallvec::SmallVec;

use super::admin::Failure;
use super::confirm::{ConfirmCell, Waited};
use super::connection::{ConnectionHandle, ConnectionInner};
use super::consumer::{Consumer, Delivery};
use super::persist::Job;
use super::queue::{GetOutcome, QueueCell, QueueGuard, Settle, Sink};
use super::reply_to::{REPLY_QUEUE, REPLY_TO, REPLY_TO_PREFIX};
use super::{BrokerInner, Limits, Snapshot};
use crate::core::channel::{ChannelState, ConsumerRecord, Outstanding, QueueId};
use crate::core::confirm::ConfirmEvent;
use crate::core::queue::expiration::parse_expiration;
use crate::core::queue::{ConsumerId, ConsumerSpec};
use crate::core::topology::{DestinationName, Targets, no_queue};
use crate::error::{AmqpError, CloseCause, Error, ReplyCode, Result};
use crate::sim::trace::{Event, Trace};
use crate::types::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicProperties, BasicPublishOptions, BasicQosOptions, BasicRecoverOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    ExchangeKind, ExchangeUnbindOptions, FieldTable, FieldValue, IntoBody, Message,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};

/// Largest name (queue, exchange, routing key, consumer tag): an AMQP short string.
const NAME_MAX_BYTES: usize = 255;

/// A channel handle. Clones share the channel.
#[derive(Clone)]
pub struct Channel {
    pub(crate) inner: Arc<ChannelInner>,
    _guard: Arc<CloseOnDrop>,
}

/// Closes the channel when the last application handle goes; then lets go of the connection,
/// which closes if no other handle of it is left.
struct CloseOnDrop {
    channel: Arc<ChannelInner>,
    _connection: Arc<ConnectionHandle>,
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.channel.close_with(Arc::new(CloseCause::Client));
    }
}

pub(crate) struct ChannelInner {
    pub(crate) id: u64,
    pub(crate) conn: Arc<ConnectionInner>,
    pub(crate) broker: Arc<BrokerInner>,
    pub(crate) state: CachePadded<Mutex<ChannelState>>,
    closed: AtomicBool,
    /// Channel-wide prefetch (`basic.qos` with `global`, RabbitMQ <= 4.2); 0 = none.
    global_limit: AtomicU32,
    /// Unacked consumer deliveries on the channel, counted against `global_limit`.
    global_in_flight: AtomicU32,
    last_queue: Mutex<Option<Arc<str>>>,
    /// The channel's direct reply-to address while it has a reply consumer.
    reply_address: Mutex<Option<Arc<str>>>,
    returns: Mutex<Option<ReturnHandler>>,
    confirms: Arc<ConfirmCell>,
}

type ReturnHandler = Box<dyn FnMut(Returned) + Send>;

/// What [`Channel::confirm_listener`] returns: a receiver of the channel's publisher confirms
/// (a crossbeam channel's receiver, re-exported so users need not depend on crossbeam).
pub type ConfirmListener = crossbeam_channel::Receiver<ConfirmEvent>;

/// An unroutable message published with `mandatory`, handed back (`basic.return`, §2.7).
#[derive(Clone, Debug, PartialEq)]
pub struct Returned {
    /// 312 NO_ROUTE.
    pub reply_code: ReplyCode,
    /// `"NO_ROUTE"`.
    pub reply_text: String,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties (without `BCC`).
    pub properties: BasicProperties,
    /// Its body.
    pub body: Bytes,
}

/// Reply of `queue_declare`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueDeclareOk {
    /// The queue's name (server-generated if none was given).
    pub name: String,
    /// Ready messages.
    pub message_count: u32,
    /// Consumers.
    pub consumer_count: u32,
}

/// Reply of a successful `basic_get`.
#[derive(Debug)]
pub struct GetMessage {
    /// The message.
    pub delivery: Delivery,
    /// Ready messages left in the queue after this one.
    pub message_count: u32,
}

impl Channel {
    pub(crate) fn open(connection: Arc<ConnectionHandle>) -> Self {
        let conn = connection.inner().clone();
        let broker = conn.broker.clone();
        let id = broker.next_id();
        let trace = broker.trace.clone();
        let inner = Arc::new(ChannelInner {
            id,
            conn,
            broker,
            state: CachePadded::new(Mutex::new(ChannelState::new())),
            closed: AtomicBool::new(false),
            global_limit: AtomicU32::new(0),
            global_in_flight: AtomicU32::new(0),
            last_queue: Mutex::new(None),
            reply_address: Mutex::new(None),
            returns: Mutex::new(None),
            confirms: Arc::new(ConfirmCell::new(trace, id)),
        });
        inner
            .broker
            .channels
            .lock()
            .insert(inner.id, Arc::downgrade(&inner));
        Self {
            _guard: Arc::new(CloseOnDrop {
                channel: inner.clone(),
                _connection: connection,
            }),
            inner,
        }
    }

    /// Closes the channel: consumers are cancelled, unacked messages requeued.
    pub fn close(&self) {
        self.inner.close_with(Arc::new(CloseCause::Client));
    }

    /// Whether the channel is closed.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Why the channel closed, if it did.
    pub fn close_cause(&self) -> Option<Arc<CloseCause>> {
        self.inner.state.lock().closed().cloned()
    }

    /// Sets the handler that receives unroutable `mandatory` messages. It runs on the
    /// publishing thread before `basic_publish` returns.
    pub fn set_return_handler(&self, handler: impl FnMut(Returned) + Send + 'static) {
        *self.inner.returns.lock() = Some(Box::new(handler));
    }

    // ---- exchanges ------------------------------------------------------------------------

    /// `exchange.declare` (§2.2).
    pub fn exchange_declare(
        &self,
        exchange: &str,
        kind: ExchangeKind,
        options: ExchangeDeclareOptions,
        arguments: FieldTable,
    ) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        let name = name_arg("exchange", exchange)?;
        let arguments = table_arg("exchange arguments", arguments, &inner.broker.limits)?;
        let r = inner.broker.update(|snap, _| {
            let created = snap
                .topology
                .declare_exchange(&name, kind.kind(), options, arguments)?;
            Ok(((), created))
        });
        inner.admin_result(r)
    }

    /// `exchange.delete` (§2.2): missing exchanges are fine.
    pub fn exchange_delete(&self, exchange: &str, options: ExchangeDeleteOptions) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        let name = name_arg("exchange", exchange)?;
        let r = inner.broker.update(|snap, _| {
            let deleted = snap.topology.delete_exchange(&name, options.if_unused)?;
            Ok(((), deleted))
        });
        inner.admin_result(r)
    }

    /// `exchange.bind`: messages routed by `source` also go through `destination` (§2.6).
    pub fn exchange_bind(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        _options: ExchangeBindOptions,
        arguments: FieldTable,
    ) -> Result<()> {
        self.exchange_binding(true, destination, source, routing_key, arguments)
    }

    /// `exchange.unbind`: idempotent.
    pub fn exchange_unbind(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        _options: ExchangeUnbindOptions,
        arguments: FieldTable,
    ) -> Result<()> {
        self.exchange_binding(false, destination, source, routing_key, arguments)
    }

    fn exchange_binding(
        &self,
        add: bool,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        let destination = name_arg("exchange", destination)?;
        let source = name_arg("exchange", source)?;
        let key = key_arg(routing_key)?;
        let arguments = table_arg("binding arguments", arguments, &self.inner.broker.limits)?;
        self.inner.bind(
            add,
            &source,
            DestinationName::Exchange(&destination),
            key,
            arguments,
        )
    }

    // ---- queues ---------------------------------------------------------------------------

    /// `queue.declare` (§1.1-§1.4). An empty name asks for a server-named queue.
    ///
    /// Among the arguments, as RabbitMQ 4.2 treats them:
    /// - `x-max-priority` (classic queues, 0 to 255, <https://www.rabbitmq.com/docs/priority>):
    ///   messages with a higher `priority` property are delivered (and fetched by `basic.get`)
    ///   first, FIFO within a priority; a message without one counts as 0, one above the
    ///   maximum as the maximum; a requeued message returns to its own priority at its
    ///   original position; `drop-head` and TTL expiry take the head in that same order. A
    ///   quorum queue refuses the argument (406) and always has two levels instead: priority
    ///   above 4 is high, the rest normal, and while both wait, two high messages go for each
    ///   normal one;
    /// - `x-single-active-consumer: true` (classic and quorum,
    ///   <https://www.rabbitmq.com/docs/consumers#single-active-consumer>): only one consumer
    ///   receives at a time, the first registered; the others wait (and count in
    ///   `consumer_count`) until it is cancelled or its channel closes, when the waiting
    ///   consumer of highest priority, the earliest among equals, takes over (after a channel
    ///   close, it receives the requeued messages of the old one first). On a quorum queue a
    ///   waiting consumer of higher priority also takes over once the active one has settled
    ///   its deliveries. An exclusive consume of a classic such queue is refused (403), as is
    ///   `basic.get` on a quorum one (405);
    /// - `x-delivery-limit: -1` (quorum queues): no delivery limit; a nack or reject with
    ///   requeue (and `basic.recover`) then re-appends the message at the tail of the queue
    ///   (at normal priority), while messages of a closed channel still go back to the front.
    pub fn queue_declare(
        &self,
        queue: &str,
        options: QueueDeclareOptions,
        arguments: FieldTable,
    ) -> Result<QueueDeclareOk> {
        let inner = &self.inner;
        inner.check_open()?;
        let name = name_arg("queue", queue)?;
        let arguments = table_arg("queue arguments", arguments, &inner.broker.limits)?;
        if name == REPLY_TO || name.starts_with(REPLY_TO_PREFIX) {
            // The direct reply-to pseudo-queue, or a requester's address: any declare is
            // passive; a live address (or the pseudo-queue) has its one consumer.
            if name != REPLY_TO && !inner.broker.replies.exists(&name) {
                return Err(inner.fail(no_queue(&name)));
            }
            return Ok(QueueDeclareOk {
                name: name.into_owned(),
                message_count: 0,
                consumer_count: 1,
            });
        }
        let r = inner
            .broker
            .declare_queue(&name, options, arguments, inner.conn.id);
        let (declared, messages, consumers) = inner.admin_result(r)?;
        *inner.last_queue.lock() = Some(declared.meta.name.clone());
        Ok(QueueDeclareOk {
            name: declared.meta.name.to_string(),
            message_count: saturate(messages),
            consumer_count: consumers,
        })
    }

    /// `queue.bind` (§2.3).
    pub fn queue_bind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        _options: QueueBindOptions,
        arguments: FieldTable,
    ) -> Result<()> {
        self.queue_binding(true, queue, exchange, routing_key, arguments)
    }

    /// `queue.unbind`: idempotent.
    pub fn queue_unbind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        self.queue_binding(false, queue, exchange, routing_key, arguments)
    }

    /// With the queue name `""` (the last declared queue) and an empty key, the key is that
    /// queue's name too (§1.1).
    fn queue_binding(
        &self,
        add: bool,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        let q = self.inner.queue_name(queue)?;
        let key = if queue.is_empty() && routing_key.is_empty() {
            q.to_string()
        } else {
            key_arg(routing_key)?.to_owned()
        };
        let exchange = name_arg("exchange", exchange)?;
        let arguments = table_arg("binding arguments", arguments, &self.inner.broker.limits)?;
        self.inner
            .bind(add, &exchange, DestinationName::Queue(&q), &key, arguments)
    }

    /// `queue.purge`: removes ready messages, returns how many (§1.8).
    pub fn queue_purge(&self, queue: &str, _options: QueuePurgeOptions) -> Result<u32> {
        let inner = &self.inner;
        let name = inner.queue_name(queue)?;
        let snap = inner.broker.snapshot.load();
        let cell = inner.result(
            snap.topology
                .queue_for(&name, inner.conn.id)
                .map(|m| snap.queues[&m.id].clone()),
        )?;
        let mut s = cell.lock();
        if s.deleted {
            drop(s);
            return Err(inner.fail(no_queue(&name)));
        }
        let purged = s.core.handle_purge();
        for entry in &purged {
            cell.forget(entry);
        }
        drop(s);
        Ok(saturate(purged.len() as u64))
    }

    /// `queue.delete` (§1.7): returns the ready messages deleted; missing queues are fine.
    pub fn queue_delete(&self, queue: &str, options: QueueDeleteOptions) -> Result<u32> {
        let inner = &self.inner;
        let name = inner.queue_name(queue)?;
        let r =
            inner
                .broker
                .delete_queue(&name, inner.conn.id, options.if_unused, options.if_empty);
        inner.admin_result(r).map(saturate)
    }

    // ---- publishing -----------------------------------------------------------------------

    /// `basic.publish`: fire and forget (§2.7). Never waits for consumers.
    ///
    /// It waits only for flow control: while the broker's queued messages are over the memory
    /// high watermark, or the store's backlog is over its bound, it waits at its start until
    /// both are back under, as RabbitMQ blocks a publishing connection
    /// ([`Limits::memory_high_watermark_bytes`](crate::Limits::memory_high_watermark_bytes),
    /// [`Connection::set_blocked_handler`](crate::Connection::set_blocked_handler)). A thread
    /// that both consumes and publishes should settle what it consumed before it publishes
    /// more, or use [`Channel::basic_publish_timeout`]: while it waits, its unacked
    /// messages cannot bring the memory down.
    pub fn basic_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: impl IntoBody,
        properties: BasicProperties,
    ) -> Result<()> {
        self.inner.publish(
            exchange,
            routing_key,
            options,
            body.into_body(),
            properties,
            None,
        )
    }

    /// [`Channel::basic_publish`], waiting for flow control at most `timeout`: if publishers
    /// are still blocked then, returns [`Error::Timeout`] and publishes nothing (in confirm
    /// mode, no sequence number is used).
    pub fn basic_publish_timeout(
        &self,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: impl IntoBody,
        properties: BasicProperties,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Some(std::time::Instant::now() + timeout);
        self.inner.publish(
            exchange,
            routing_key,
            options,
            body.into_body(),
            properties,
            deadline,
        )
    }

    // ---- publisher confirms ---------------------------------------------------------------

    /// `confirm.select`: from now on every publish is numbered (from 1) and answered with an
    /// ack, or a nack if the broker could not take it (§8). Selecting again changes nothing.
    pub fn confirm_select(&self, _options: ConfirmSelectOptions) -> Result<()> {
        self.inner.check_open()?;
        self.inner.confirms.select();
        Ok(())
    }

    /// The sequence number the next publish will get in confirm mode.
    pub fn next_publish_seq(&self) -> u64 {
        self.inner.confirms.next_seq()
    }

    /// Waits until every publish so far is answered. `Ok(true)` if none was nacked since the
    /// previous wait.
    pub fn wait_for_confirms(&self) -> Result<bool> {
        self.wait_confirms(None)
    }

    /// [`Channel::wait_for_confirms`] giving up after `timeout` with [`Error::Timeout`].
    pub fn wait_for_confirms_timeout(&self, timeout: Duration) -> Result<bool> {
        self.wait_confirms(Some(timeout))
    }

    /// A receiver of the ack / nack frames from now on, as RabbitMQ sends them (coalesced
    /// with `multiple`). Replaces any earlier listener.
    pub fn confirm_listener(&self) -> ConfirmListener {
        self.inner.confirms.listen()
    }

    fn wait_confirms(&self, timeout: Option<Duration>) -> Result<bool> {
        let inner = &self.inner;
        inner.check_open()?;
        if !inner.confirms.enabled() {
            return Err(Error::InvalidInput(
                "the channel is not in confirm mode".into(),
            ));
        }
        if let Some(p) = &inner.broker.persistence {
            // Without a flusher thread (a simulation), whoever waits writes what is pending.
            p.run_pending();
        }
        match inner.confirms.wait(timeout) {
            Waited::Done(all_acked) => Ok(all_acked),
            Waited::TimedOut => Err(Error::Timeout),
            Waited::Closed => Err(inner.closed_error()),
        }
    }

    // ---- consuming ------------------------------------------------------------------------

    /// `basic.qos` (§3.3). Without `global`: the prefetch for consumers created afterwards on
    /// this channel, each on its own. With `global` (RabbitMQ <= 4.2): one limit shared by all
    /// the channel's consumers, in addition to their own; it applies at once.
    pub fn basic_qos(&self, prefetch_count: u16, options: BasicQosOptions) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        if options.global {
            inner
                .global_limit
                .store(u32::from(prefetch_count), Ordering::SeqCst);
            inner.kick_consumer_queues();
        } else {
            inner.state.lock().handle_qos(prefetch_count);
        }
        Ok(())
    }

    /// `basic.consume` (§3.1). An empty tag gets a server-generated `amq.ctag-...` tag.
    pub fn basic_consume(
        &self,
        queue: &str,
        consumer_tag: &str,
        options: BasicConsumeOptions,
        arguments: FieldTable,
    ) -> Result<Consumer> {
        let inner = &self.inner;
        let name = inner.queue_name(queue)?;
        let tag: Arc<str> = if consumer_tag.is_empty() {
            Arc::from(inner.broker.admin.lock().rng.name("amq.ctag-"))
        } else {
            Arc::from(name_arg("consumer tag", consumer_tag)?)
        };
        let arguments = table_arg("consumer arguments", arguments, &inner.broker.limits)?;
        if &*name == REPLY_TO {
            return self.consume_replies(tag, options);
        }
        let priority = match arguments.get("x-priority") {
            None => 0,
            Some(v) => match v.as_i64().and_then(|p| i32::try_from(p).ok()) {
                Some(p) => p,
                None => {
                    return Err(inner.fail(AmqpError::new(
                        ReplyCode::PreconditionFailed,
                        format!("invalid arg 'x-priority' for consumer '{tag}': {{unacceptable_type,{}}}", v.type_name()),
                    )));
                }
            },
        };
        let snap = inner.broker.snapshot.load_full();
        let cell = inner.result(
            snap.topology
                .queue_for(&name, inner.conn.id)
                .map(|m| snap.queues[&m.id].clone()),
        )?;
        let id = ConsumerId(inner.broker.next_id());
        let prefetch = {
            let mut st = inner.state.lock();
            if let Some(cause) = st.closed() {
                return Err(Error::ChannelClosed(cause.clone()));
            }
            let r = st.handle_consume(
                tag.clone(),
                ConsumerRecord {
                    id,
                    queue: cell.meta.id,
                },
            );
            if let Err(e) = r {
                drop(st);
                return Err(inner.fail(e));
            }
            st.prefetch()
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        cell.touch();
        let mut s = cell.lock();
        let refused = if s.deleted {
            Some(no_queue(&name))
        } else if s.core.can_consume(options.exclusive).is_err() {
            Some(AmqpError::new(
                ReplyCode::AccessRefused,
                format!("queue '{name}' in vhost '/' in exclusive use"),
            ))
        } else {
            None
        };
        if let Some(e) = refused {
            drop(s);
            inner.state.lock().handle_cancel(&tag);
            return Err(inner.fail(e));
        }
        let prefetch = if options.no_ack {
            inner.broker.limits.no_ack_window
        } else {
            u32::from(prefetch)
        };
        s.core.handle_consume(ConsumerSpec {
            id,
            prefetch,
            no_ack: options.no_ack,
            exclusive: options.exclusive,
            priority,
        });
        s.sinks.insert(
            id,
            Sink {
                tx,
                channel: inner.clone(),
                tag: tag.clone(),
            },
        );
        cell.dispatch(&mut s);
        drop(s);
        Ok(Consumer::new(
            rx,
            tag,
            self.clone(),
            Some(cell),
            id,
            options.no_ack,
        ))
    }

    /// `basic.get`: the head message (highest priority first on a priority queue), or
    /// `Ok(None)` if the queue is empty (§3.4). A quorum queue with single active consumer
    /// refuses it with 405, as RabbitMQ does.
    pub fn basic_get(&self, queue: &str, options: BasicGetOptions) -> Result<Option<GetMessage>> {
        let inner = &self.inner;
        let name = inner.queue_name(queue)?;
        let snap = inner.broker.snapshot.load();
        let cell = inner.result(
            snap.topology
                .queue_for(&name, inner.conn.id)
                .map(|m| snap.queues[&m.id].clone()),
        )?;
        if cell.is_quorum() && cell.config().single_active_consumer {
            return Err(inner.fail(AmqpError::new(
                ReplyCode::ResourceLocked,
                format!(
                    "cannot obtain access to locked queue '{name}' in vhost '/'. basic.get operations are not supported by quorum queues with single active consumer"
                ),
            )));
        }
        match cell.get(inner, options.no_ack) {
            GetOutcome::Got(delivery, remaining) => Ok(Some(GetMessage {
                delivery,
                message_count: saturate(remaining),
            })),
            GetOutcome::Empty => Ok(None),
            GetOutcome::Deleted => Err(inner.fail(no_queue(&name))),
            GetOutcome::ChannelClosed => Err(inner.closed_error()),
        }
    }

    /// `basic.consume` of the direct reply-to pseudo-queue: a no-ack consumer of the replies
    /// to this channel's requests.
    fn consume_replies(&self, tag: Arc<str>, options: BasicConsumeOptions) -> Result<Consumer> {
        let inner = &self.inner;
        let refuse = |text: &str| {
            Err(inner.fail(AmqpError::new(
                ReplyCode::PreconditionFailed,
                text.to_owned(),
            )))
        };
        if !options.no_ack {
            return refuse("reply consumer cannot acknowledge");
        }
        if inner.reply_address.lock().is_some() {
            return refuse("reply consumer already set");
        }
        let id = ConsumerId(inner.broker.next_id());
        {
            let mut st = inner.state.lock();
            if let Some(cause) = st.closed() {
                return Err(Error::ChannelClosed(cause.clone()));
            }
            let record = ConsumerRecord {
                id,
                queue: REPLY_QUEUE,
            };
            if let Err(e) = st.handle_consume(tag.clone(), record) {
                drop(st);
                return Err(inner.fail(e));
            }
        }
        let address: Arc<str> = Arc::from(inner.broker.admin.lock().rng.name(REPLY_TO_PREFIX));
        let (tx, rx) = crossbeam_channel::unbounded();
        inner.broker.replies.add(address.clone(), inner, tx);
        *inner.reply_address.lock() = Some(address);
        Ok(Consumer::new(rx, tag, self.clone(), None, id, true))
    }

    /// `basic.cancel`: the consumer stops; its unacked messages stay outstanding and ackable
    /// (§4.4). Unknown tags are fine.
    pub fn basic_cancel(&self, consumer_tag: &str, _options: BasicCancelOptions) -> Result<()> {
        self.inner.cancel(consumer_tag)
    }

    /// `basic.recover(requeue = true)`: every unacked message of the channel goes back to its
    /// queue. `requeue = false` is a 540 connection error, as in RabbitMQ.
    pub fn basic_recover(&self, options: BasicRecoverOptions) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        if !options.requeue {
            return Err(inner.fail(AmqpError::new(ReplyCode::NotImplemented, "requeue=false")));
        }
        let taken = inner.state.lock().handle_recover();
        inner.apply(&taken, Settle::Requeue);
        Ok(())
    }

    // ---- acknowledgements -----------------------------------------------------------------

    /// `basic.ack` (§4.1).
    pub fn basic_ack(&self, delivery_tag: u64, options: BasicAckOptions) -> Result<()> {
        self.inner.basic_ack(delivery_tag, options)
    }

    /// `basic.nack` (§4.1).
    pub fn basic_nack(&self, delivery_tag: u64, options: BasicNackOptions) -> Result<()> {
        self.inner.basic_nack(delivery_tag, options)
    }

    /// `basic.reject` (§4.1).
    pub fn basic_reject(&self, delivery_tag: u64, options: BasicRejectOptions) -> Result<()> {
        self.inner.basic_reject(delivery_tag, options)
    }
}

impl ChannelInner {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn basic_ack(&self, tag: u64, o: BasicAckOptions) -> Result<()> {
        self.settle(tag, o.multiple, Settle::Ack)
    }

    pub(crate) fn basic_nack(&self, tag: u64, o: BasicNackOptions) -> Result<()> {
        self.settle(
            tag,
            o.multiple,
            if o.requeue {
                Settle::Requeue
            } else {
                Settle::Reject
            },
        )
    }

    pub(crate) fn basic_reject(&self, tag: u64, o: BasicRejectOptions) -> Result<()> {
        self.settle(
            tag,
            false,
            if o.requeue {
                Settle::Requeue
            } else {
                Settle::Reject
            },
        )
    }

    fn settle(&self, tag: u64, multiple: bool, how: Settle) -> Result<()> {
        self.check_open()?;
        let taken = self.state.lock().handle_settle(tag, multiple);
        match taken {
            Ok(list) => {
                self.apply(&list, how);
                self.check_settled_durable(&list)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// After a settle took effect: an error if a settled message's queue is durable and the
    /// store is poisoned, so its removal (or rewrite) will never reach the disk. The settle
    /// stands in memory; the caller learns the store no longer follows.
    fn check_settled_durable(&self, list: &[(u64, Outstanding)]) -> Result<()> {
        let Some(p) = &self.broker.persistence else {
            return Ok(());
        };
        let Err(e) = p.check() else {
            return Ok(());
        };
        let snap = self.broker.snapshot.load();
        let durable = list.iter().any(|(_, o)| {
            snap.queues
                .get(&o.queue)
                .is_some_and(|cell| cell.has_store())
        });
        if durable {
            Err(Error::Storage(e))
        } else {
            Ok(())
        }
    }

    /// Reserves one delivery of the channel-wide prefetch; false if the channel is at its limit.
    pub(crate) fn reserve_global(&self) -> bool {
        let limit = self.global_limit.load(Ordering::SeqCst);
        self.global_in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (limit == 0 || n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Deliveries reserved against the channel-wide prefetch.
    pub(crate) fn global_in_flight(&self) -> u64 {
        u64::from(self.global_in_flight.load(Ordering::SeqCst))
    }

    /// Gives back `n` reserved deliveries (settled, or never handed over).
    pub(crate) fn release_global(&self, n: u32) {
        if n > 0 {
            self.global_in_flight.fetch_sub(n, Ordering::SeqCst);
        }
    }

    /// Delivers again from every queue this channel consumes from (its channel-wide credit
    /// grew). Called without the channel's lock held.
    fn kick_consumer_queues(&self) {
        let queues = self.state.lock().consumer_queues();
        let snap = self.broker.snapshot.load();
        for q in queues {
            if let Some(cell) = snap.queues.get(&q) {
                let mut g = cell.lock();
                cell.dispatch(&mut g);
            }
        }
    }

    /// Settles taken deliveries queue by queue, keeping tag order within each queue.
    fn apply(&self, list: &[(u64, Outstanding)], how: Settle) {
        let Some(&(_, first)) = list.first() else {
            return;
        };
        let counted = list.iter().filter(|(_, o)| o.counted).count();
        self.release_global(u32::try_from(counted).unwrap_or(u32::MAX));
        let snap = self.broker.snapshot.load();
        let mut queues: SmallVec<[QueueId; 1]> = SmallVec::new();
        queues.push(first.queue);
        if list.iter().any(|(_, o)| o.queue != first.queue) {
            queues.extend(list.iter().map(|(_, o)| o.queue));
            queues.sort_unstable();
            queues.dedup();
        }
        for q in queues {
            // A queue deleted since the delivery: the settle is silently accepted (§4.2).
            if let Some(cell) = snap.queues.get(&q) {
                cell.settle(
                    list.iter()
                        .filter(|(_, o)| o.queue == q)
                        .map(|(_, o)| o.seq),
                    how,
                );
            }
        }
        if counted > 0 && self.global_limit.load(Ordering::SeqCst) > 0 && !self.is_closed() {
            self.kick_consumer_queues();
        }
    }

    /// Requeues those of `tags` still outstanding; the rest are ignored.
    pub(crate) fn requeue_outstanding(&self, tags: &[u64]) {
        let taken = self.state.lock().handle_take_outstanding(tags);
        self.apply(&taken, Settle::Return);
    }

    pub(crate) fn cancel(&self, tag: &str) -> Result<()> {
        self.check_open()?;
        let record = self.state.lock().handle_cancel(tag);
        if let Some(record) = record {
            self.cancel_in_queue(record, &self.broker.snapshot.load(), true);
        }
        Ok(())
    }

    /// Cancels consumer `id` if `tag` still names it (a dropped [`Consumer`] handle).
    pub(crate) fn cancel_consumer(&self, tag: &str, id: ConsumerId) {
        let record = self.state.lock().handle_cancel_consumer(tag, id);
        if let Some(record) = record {
            self.cancel_in_queue(record, &self.broker.snapshot.load(), true);
        }
    }

    /// Removes a consumer from its queue (dropping its sender ends its iterator) and
    /// auto-deletes the queue if that was its last consumer. With `hand_over`, a
    /// single-active-consumer queue delivers to the consumer that takes over at once; a
    /// closing channel delivers later, after requeueing what it held, so that the consumer
    /// taking over receives those messages first.
    fn cancel_in_queue(&self, record: ConsumerRecord, snap: &Snapshot, hand_over: bool) {
        if record.queue == REPLY_QUEUE {
            if let Some(address) = self.reply_address.lock().take() {
                self.broker.replies.remove(&address);
            }
            return;
        }
        let Some(cell) = snap.queues.get(&record.queue) else {
            return;
        };
        let mut s = cell.lock();
        s.core.handle_cancel(record.id);
        s.sinks.remove(&record.id);
        if hand_over && !s.deleted && s.core.config().single_active_consumer {
            cell.dispatch(&mut s);
        }
        let unused = s.core.consumer_count() == 0;
        let auto_delete = cell.meta.auto_delete && unused;
        drop(s);
        if unused {
            cell.touch(); // its x-expires lease starts now
        }
        if auto_delete {
            // A store failure here has no caller to tell; the store is poisoned and says so next.
            let _ = self.broker.auto_delete_queue(record.queue);
        }
    }

    /// Closes the channel: cancels its consumers, then requeues its unacked messages in tag
    /// order (§4.4), as returns (a quorum queue serves them first). A single-active-consumer
    /// queue hands over to its next consumer only after that, so the new active consumer gets
    /// the requeued messages (`rabbit_amqqueue_process` requeues before
    /// `new_single_active_consumer_after_channel_down`). Closing twice does nothing.
    pub(crate) fn close_with(&self, cause: Arc<CloseCause>) {
        let closing = self.state.lock().handle_close(cause);
        self.closed.store(true, Ordering::Release);
        self.confirms.close();
        let snap = self.broker.snapshot.load_full();
        let mut handed_over: SmallVec<[QueueId; 1]> = SmallVec::new();
        for (_, record) in closing.consumers {
            handed_over.push(record.queue);
            self.cancel_in_queue(record, &snap, false);
        }
        self.apply(&closing.ledger, Settle::Return);
        handed_over.sort_unstable();
        handed_over.dedup();
        for q in handed_over {
            if let Some(cell) = snap.queues.get(&q)
                && cell.config().single_active_consumer
            {
                let mut s = cell.lock();
                if !s.deleted {
                    cell.dispatch(&mut s);
                }
            }
        }
        self.broker.channels.lock().remove(&self.id);
    }

    /// Closes the channel (soft error) or the connection (hard error) and returns the error.
    pub(crate) fn fail(&self, e: AmqpError) -> Error {
        let cause = Arc::new(CloseCause::Error(e.clone()));
        if e.code.is_hard() {
            self.conn.close(cause);
            Error::Connection(e)
        } else {
            self.close_with(cause);
            Error::Channel(e)
        }
    }

    /// A topology change's outcome: refusals close the channel, store failures are reported.
    fn admin_result<T>(&self, r: std::result::Result<T, Failure>) -> Result<T> {
        match r {
            Ok(v) => Ok(v),
            Err(Failure::Amqp(e)) => Err(self.fail(e)),
            Err(Failure::Storage(e)) => Err(Error::Storage(e)),
        }
    }

    fn result<T>(&self, r: std::result::Result<T, AmqpError>) -> Result<T> {
        r.map_err(|e| self.fail(e))
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        Ok(())
    }

    fn closed_error(&self) -> Error {
        let cause = self
            .state
            .lock()
            .closed()
            .cloned()
            .unwrap_or_else(|| Arc::new(CloseCause::Client));
        Error::ChannelClosed(cause)
    }

    /// Resolves `""` to the last queue declared on this channel (§1.1).
    fn queue_name(&self, queue: &str) -> Result<Arc<str>> {
        self.check_open()?;
        if queue.is_empty() {
            let last = self.last_queue.lock().clone();
            return last.ok_or_else(|| {
                self.fail(AmqpError::new(
                    ReplyCode::NotFound,
                    "no previously declared queue",
                ))
            });
        }
        Ok(Arc::from(name_arg("queue", queue)?))
    }

    fn bind(
        &self,
        add: bool,
        source: &str,
        dest: DestinationName<'_>,
        key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        self.check_open()?;
        let conn = self.conn.id;
        let r = self.broker.update(|snap, _| {
            let changed = if add {
                snap.topology.bind(source, dest, key, arguments, conn)?
            } else {
                snap.topology.unbind(source, dest, key, arguments, conn)?
            };
            Ok(((), changed))
        });
        self.admin_result(r)
    }

    /// Waits while flow control blocks publishers (see `basic_publish`), at most until
    /// `deadline`.
    #[inline]
    fn wait_for_flow(&self, deadline: Option<std::time::Instant>) -> Result<()> {
        if self.broker.flow.is_blocked() {
            self.wait_for_flow_slow(deadline)
        } else {
            Ok(())
        }
    }

    #[cold]
    fn wait_for_flow_slow(&self, deadline: Option<std::time::Instant>) -> Result<()> {
        let flow = &self.broker.flow;
        self.check_open()?;
        if let Some(p) = &self.broker.persistence {
            // Without a flusher thread, the store's backlog drains only when someone writes it.
            p.run_pending();
        }
        if flow.wait(deadline) {
            Ok(())
        } else {
            Err(Error::Timeout)
        }
    }

    fn publish(
        self: &Arc<Self>,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: Bytes,
        mut properties: BasicProperties,
        flow_deadline: Option<std::time::Instant>,
    ) -> Result<()> {
        self.wait_for_flow(flow_deadline)?;
        self.check_open()?;
        let exchange = name_arg("exchange", exchange)?;
        let routing_key = key_arg(routing_key)?;
        if let Some(refusal) = content_header_refusal(&properties, &self.broker.limits) {
            // Without recursion: the headers may nest deep enough to overflow an ordinary drop.
            properties.dismantle();
            return Err(Error::InvalidInput(refusal));
        }
        if options.immediate {
            return Err(self.fail(AmqpError::new(ReplyCode::NotImplemented, "immediate=true")));
        }
        let max = self.broker.limits.max_message_size;
        if body.len() as u64 > max {
            return Err(self.fail(AmqpError::new(
                ReplyCode::PreconditionFailed,
                format!("message size {} is larger than max size {max}", body.len()),
            )));
        }
        let snap = self.broker.snapshot.load();
        let ex = self.result(snap.topology.exchange_for_publish(&exchange))?;
        if properties.reply_to.as_deref() == Some(REPLY_TO) {
            // Direct reply-to: the channel's own address replaces the pseudo-queue's name.
            let address = self.reply_address.lock().clone();
            match address {
                Some(address) => properties.reply_to = Some(address.to_string()),
                None => {
                    return Err(self.fail(AmqpError::new(
                        ReplyCode::PreconditionFailed,
                        "fast reply consumer does not exist",
                    )));
                }
            }
        }
        let message_ttl = match properties.expiration.as_deref().map(parse_expiration) {
            None => None,
            Some(Ok(ttl)) => Some(ttl),
            Some(Err(reason)) => {
                let expiration = properties.expiration.as_deref().unwrap_or_default();
                let text = format!("invalid expiration '{expiration}': {reason}");
                return Err(self.fail(AmqpError::new(ReplyCode::PreconditionFailed, text)));
            }
        };
        let (extra_keys, bcc) = self.result(sender_selected_keys(&mut properties))?;
        if let Some(user) = properties.user_id.as_deref()
            && user != &*self.conn.user
        {
            let text = format!(
                "user_id property set to '{user}' but authenticated user was '{}'",
                self.conn.user
            );
            return Err(self.fail(AmqpError::new(ReplyCode::PreconditionFailed, text)));
        }
        let mut keys: SmallVec<[&str; 1]> = SmallVec::new();
        keys.push(routing_key);
        keys.extend(extra_keys.iter().chain(&bcc).map(String::as_str));
        let mut targets = Targets::new();
        snap.topology
            .route(ex, &keys, properties.headers.as_ref(), &mut targets);
        let cells: SmallVec<[&Arc<QueueCell>; 4]> =
            targets.iter().filter_map(|q| snap.queues.get(q)).collect();
        if let Some(trace) = &self.broker.trace {
            self.trace_publish(trace, &exchange, routing_key, &properties, &cells);
        }
        let recorded = properties.is_persistent() && cells.iter().any(|c| c.has_store());
        if recorded && let Some(p) = &self.broker.persistence {
            p.check()?; // nothing is enqueued if its record cannot be written
        }
        let seq = self.confirms.publish();
        // A reply to a direct reply-to address goes straight to its consumer; it counts as
        // routed even if the requester is gone (then it is dropped).
        let replied = ex.name.is_empty()
            && keys.iter().any(|k| k.starts_with(REPLY_TO_PREFIX))
            && self.reply(&keys, &properties, &body);
        if cells.is_empty() {
            if options.mandatory && !replied {
                self.return_unroutable(&exchange, routing_key, properties, body);
            }
            // Unroutable: confirmed at once, after the return (§8).
            if let Some(seq) = seq {
                self.confirms.answer(&[seq], &[]);
            }
            return Ok(());
        }
        // Through the default exchange the routing key is the queue's name: share it.
        let routing_key = match cells.first() {
            Some(cell) if &*cell.meta.name == routing_key => cell.meta.name.clone(),
            _ => Arc::from(routing_key),
        };
        let timed = message_ttl.is_some() || cells.iter().any(|c| c.timed());
        let now = if timed || recorded {
            self.broker.clock.now_ms()
        } else {
            0
        };
        let message = Arc::new(Message {
            exchange: ex.name.clone(),
            routing_key,
            properties,
            body,
            dead_lettered: false,
            bcc: bcc.clone(),
        });
        let placed: SmallVec<[(&Arc<QueueCell>, u64); 4]> =
            cells.iter().map(|c| (*c, c.reserve_seq())).collect();
        // Queues that may refuse it (`reject-publish`, §7.3) decide first, under their locks
        // (taken in id order), so the record and the confirm follow their answer: each entry of
        // `deciding` is a target's index, its lock and whether it refuses the message.
        let size = message.body_size();
        let mut order: SmallVec<[usize; 1]> = (0..placed.len())
            .filter(|&i| placed[i].0.refuses_publishes())
            .collect();
        order.sort_by_key(|&i| placed[i].0.meta.id);
        let mut deciding: SmallVec<[(usize, QueueGuard<'_>, bool); 1]> = order
            .into_iter()
            .map(|i| {
                let g = placed[i].0.lock();
                let refuses = !g.deleted && g.core.would_overflow(size);
                (i, g, refuses)
            })
            .collect();
        let refused_by = |i: usize| deciding.iter().any(|(at, _, r)| *at == i && *r);
        let refused = deciding.iter().any(|(_, _, r)| *r);
        let persistence = self.broker.persistence.as_ref().filter(|_| recorded);
        if let Some(p) = persistence {
            // One job, one atomic batch for every durable queue that takes it; sent before the
            // message is enqueued, so an ack's removal always follows its record.
            let targets: SmallVec<[(u64, u64); 1]> = placed
                .iter()
                .enumerate()
                .filter(|&(i, (c, _))| c.has_store() && !refused_by(i))
                .map(|(_, (c, seq))| (c.meta.id.0, *seq))
                .collect();
            let confirm = seq.filter(|_| !refused).map(|s| (self.confirms.clone(), s));
            if !targets.is_empty() || confirm.is_some() {
                p.send(Job::Publish {
                    message: message.clone(),
                    targets,
                    confirm,
                    enqueued_at_ms: now,
                });
            }
        }
        for (i, (cell, s)) in placed.iter().enumerate() {
            cell.trace(|queue| Event::Enqueue {
                queue: queue.into(),
                seq: *s,
            });
            let entry = cell.entry(*s, message.clone(), now, message_ttl);
            match deciding.iter_mut().find(|(at, _, _)| *at == i) {
                Some((_, g, _)) if !g.deleted => {
                    g.core.handle_publish(entry); // a refusal is carried out by the dispatch
                    cell.dispatch(g);
                }
                Some(_) => {}
                None => cell.publish(entry),
            }
        }
        drop(deciding);
        // Held in memory only: confirmed once every queue has it (§8); refused by one: nacked
        // (§7.3). A recorded message is confirmed by the flusher after the flush that holds
        // its record.
        if let Some(seq) = seq {
            if refused {
                self.confirms.answer(&[], &[seq]);
            } else if persistence.is_none() {
                self.confirms.answer(&[seq], &[]);
            }
        }
        Ok(())
    }

    /// Records a publish and where it was routed.
    #[cold]
    fn trace_publish(
        &self,
        trace: &Trace,
        exchange: &str,
        routing_key: &str,
        properties: &BasicProperties,
        cells: &[&Arc<QueueCell>],
    ) {
        let message = properties
            .message_id
            .as_deref()
            .or(properties.correlation_id.as_deref())
            .unwrap_or_default();
        trace.record(Event::Publish {
            channel: self.id,
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            message: message.into(),
        });
        trace.record(Event::Route {
            queues: cells.iter().map(|c| c.meta.name.to_string()).collect(),
        });
    }

    /// Delivers a message published to the default exchange to every direct reply-to address
    /// among `keys`; returns whether any key was such an address.
    #[cold]
    fn reply(&self, keys: &[&str], properties: &BasicProperties, body: &Bytes) -> bool {
        let mut any = false;
        for key in keys.iter().filter(|k| k.starts_with(REPLY_TO_PREFIX)) {
            any = true;
            let message = Arc::new(Message {
                exchange: Arc::from(""),
                routing_key: Arc::from(*key),
                properties: properties.clone(),
                body: body.clone(),
                dead_lettered: false,
                bcc: Vec::new(),
            });
            self.broker.replies.deliver(key, message);
        }
        any
    }

    fn return_unroutable(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: Bytes,
    ) {
        if let Some(handler) = self.returns.lock().as_mut() {
            handler(Returned {
                reply_code: ReplyCode::NoRoute,
                reply_text: "NO_ROUTE".into(),
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                properties,
                body,
            });
        }
    }
}

/// Routing keys from the `CC` and `BCC` headers, in that order (RabbitMQ's sender-selected
/// distribution); removes `BCC`. A non-array value is a 406; non-string elements are skipped.
#[allow(clippy::type_complexity)]
fn sender_selected_keys(
    properties: &mut BasicProperties,
) -> std::result::Result<(Vec<String>, Vec<String>), AmqpError> {
    let Some(headers) = properties.headers.as_mut() else {
        return Ok(Default::default());
    };
    if !headers.contains_key("CC") && !headers.contains_key("BCC") {
        return Ok(Default::default());
    }
    let (mut cc, mut bcc) = (Vec::new(), Vec::new());
    for (name, keys) in [("CC", &mut cc), ("BCC", &mut bcc)] {
        match headers.get(name) {
            None => {}
            Some(FieldValue::Array(items)) => {
                keys.extend(items.iter().filter_map(|v| v.as_str().map(str::to_owned)))
            }
            Some(other) => {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!(
                        "invalid message: {{unacceptable_type_in_header,\"{name}\",{}}}",
                        other.type_name()
                    ),
                ));
            }
        }
    }
    headers.remove("BCC");
    Ok((cc, bcc))
}

/// Bytes of a content header's payload before its property list: class id, weight, body size.
const CONTENT_HEADER_FIXED_BYTES: u64 = 12;

/// Checks that a message's properties can be encoded in one content-header frame (short
/// strings, header keys, headers nesting, size), as a client library would before sending
/// them; the refusal's text if not. Takes them by reference: the publish path must not move
/// them (they are a few hundred bytes).
fn content_header_refusal(properties: &BasicProperties, limits: &Limits) -> Option<String> {
    let max = limits.frame_payload_max();
    match properties.wire_size() {
        Ok(size) if size + CONTENT_HEADER_FIXED_BYTES <= max => None,
        Ok(size) => Some(format!(
            "content header is {} bytes, over the frame payload limit of {max} bytes",
            size + CONTENT_HEADER_FIXED_BYTES
        )),
        Err(reason) => Some(reason),
    }
}

/// Checks that a method's argument table can be encoded in one frame (keys, nesting, size);
/// a refused table is dismantled without recursion.
fn table_arg(what: &str, arguments: FieldTable, limits: &Limits) -> Result<FieldTable> {
    let max = limits.frame_payload_max();
    let refusal = match arguments.wire_size() {
        // Room for the method's other fields: names, key, flags.
        Ok(size) if size + METHOD_FIXED_BYTES_MAX <= max => return Ok(arguments),
        Ok(size) => format!("{what} are {size} bytes, over the frame payload limit of {max} bytes"),
        Err(reason) => format!("{what} {reason}"),
    };
    arguments.dismantle();
    Err(Error::InvalidInput(refusal))
}

/// The most a method frame holds besides its argument table: three short strings and flags.
const METHOD_FIXED_BYTES_MAX: u64 = 3 * 256 + 16;

/// Checks a routing key's length (an AMQP short string); unlike names, keys keep CR/LF.
fn key_arg(key: &str) -> Result<&str> {
    if key.len() > NAME_MAX_BYTES {
        return Err(Error::InvalidInput(format!(
            "routing key is {} bytes; at most {NAME_MAX_BYTES} allowed",
            key.len()
        )));
    }
    Ok(key)
}

/// Checks a name's length (an AMQP short string) and strips CR/LF as RabbitMQ does.
fn name_arg<'a>(what: &str, name: &'a str) -> Result<Cow<'a, str>> {
    if name.len() > NAME_MAX_BYTES {
        return Err(Error::InvalidInput(format!(
            "{what} name is {} bytes; at most {NAME_MAX_BYTES} allowed",
            name.len()
        )));
    }
    if name.contains(['\r', '\n']) {
        return Ok(Cow::Owned(name.replace(['\r', '\n'], "")));
    }
    Ok(Cow::Borrowed(name))
}

fn saturate(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
