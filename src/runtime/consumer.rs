//! What consumers receive: [`Delivery`] (with ack / nack / reject), and [`Consumer`], a blocking
//! iterator of deliveries fed by a crossbeam channel.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};

use super::channel::{Channel, ChannelInner};
use super::queue::QueueCell;
use crate::core::queue::{ConsumerId, Dispatch};
use crate::error::Result;
use crate::types::{
    BasicAckOptions, BasicNackOptions, BasicProperties, BasicRejectOptions, FieldTable, Message,
};

/// A delivery on its way to a consumer's receiver: what the queue decided, without the
/// handles the receiving thread attaches (so the delivering thread touches no reference
/// counts of the channel).
pub(crate) struct Pending {
    tag: u64,
    redelivered: bool,
    delivery_count: u32,
    /// Whether the delivery carries the `x-delivery-count` header (quorum queues).
    count_header: bool,
    message: Arc<Message>,
}

impl Pending {
    /// A direct reply-to reply (no-ack, never redelivered).
    pub(crate) fn reply(tag: u64, message: Arc<Message>) -> Self {
        Self {
            tag,
            redelivered: false,
            delivery_count: 0,
            count_header: false,
            message,
        }
    }

    pub(crate) fn new(tag: u64, d: &Dispatch, count_header: bool) -> Self {
        Self {
            tag,
            redelivered: d.entry.delivered,
            delivery_count: d.entry.delivery_count,
            count_header,
            message: d.entry.message.clone(),
        }
    }
}

/// A message delivered to a consumer or fetched by `basic_get`.
pub struct Delivery {
    delivery_tag: u64,
    redelivered: bool,
    delivery_count: u32,
    message: Arc<Message>,
    consumer_tag: Option<Arc<str>>,
    channel: Arc<ChannelInner>,
}

impl Delivery {
    pub(crate) fn from_pending(
        p: Pending,
        consumer_tag: Option<Arc<str>>,
        channel: Arc<ChannelInner>,
    ) -> Self {
        let message = if p.count_header && p.delivery_count > 0 {
            // Quorum queues: absent on the first delivery, then the number of returns (§6.2).
            let mut m = Message::clone(&p.message);
            m.properties
                .headers
                .get_or_insert_with(FieldTable::new)
                .insert("x-delivery-count", i64::from(p.delivery_count));
            Arc::new(m)
        } else {
            p.message
        };
        Self {
            delivery_tag: p.tag,
            redelivered: p.redelivered,
            delivery_count: p.delivery_count,
            message,
            consumer_tag,
            channel,
        }
    }

    /// The channel-scoped delivery tag (from 1).
    pub fn delivery_tag(&self) -> u64 {
        self.delivery_tag
    }

    /// Whether the message was delivered before and came back.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// How many times the message came back to its queue before this delivery.
    pub fn delivery_count(&self) -> u32 {
        self.delivery_count
    }

    /// The exchange the message was published to.
    pub fn exchange(&self) -> &str {
        &self.message.exchange
    }

    /// The routing key it was published with.
    pub fn routing_key(&self) -> &str {
        &self.message.routing_key
    }

    /// Its properties.
    pub fn properties(&self) -> &BasicProperties {
        &self.message.properties
    }

    /// Its body.
    pub fn body(&self) -> &Bytes {
        &self.message.body
    }

    /// The consumer it was delivered to (`None` for `basic_get`).
    pub fn consumer_tag(&self) -> Option<&str> {
        self.consumer_tag.as_deref()
    }

    /// Acknowledges this delivery on its channel (`basic.ack`; with `multiple`, every
    /// outstanding delivery of the channel up to this one), as lapin's `Acker::ack`.
    pub fn ack(&self, options: BasicAckOptions) -> Result<()> {
        self.channel.basic_ack(self.delivery_tag, options)
    }

    /// Negatively acknowledges this delivery (`basic.nack`): `requeue` puts it back in its
    /// queue, else it is dead-lettered or dropped; `multiple` as for [`Delivery::ack`].
    pub fn nack(&self, options: BasicNackOptions) -> Result<()> {
        self.channel.basic_nack(self.delivery_tag, options)
    }

    /// Rejects this delivery (`basic.reject`): `requeue` puts it back in its queue, else it is
    /// dead-lettered or dropped.
    pub fn reject(&self, options: BasicRejectOptions) -> Result<()> {
        self.channel.basic_reject(self.delivery_tag, options)
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("delivery_tag", &self.delivery_tag)
            .field("redelivered", &self.redelivered)
            .field("exchange", &self.exchange())
            .field("routing_key", &self.routing_key())
            .field("body_len", &self.message.body.len())
            .finish()
    }
}

/// A push consumer: a blocking iterator of deliveries. Ends when the consumer is cancelled
/// (by `basic_cancel` or the queue's deletion) or its channel closes. Dropping it cancels it
/// and requeues the deliveries it had not handed out yet.
pub struct Consumer {
    rx: Receiver<Pending>,
    tag: Arc<str>,
    channel: Channel,
    /// The queue it consumes from (`None` for a direct reply-to consumer).
    queue: Option<Arc<QueueCell>>,
    id: ConsumerId,
    no_ack: bool,
    /// No-ack deliveries taken but not yet reported to the queue as window credit.
    unreported: u32,
}

impl Consumer {
    pub(crate) fn new(
        rx: Receiver<Pending>,
        tag: Arc<str>,
        channel: Channel,
        queue: Option<Arc<QueueCell>>,
        id: ConsumerId,
        no_ack: bool,
    ) -> Self {
        Self {
            rx,
            tag,
            channel,
            queue,
            id,
            no_ack,
            unreported: 0,
        }
    }

    /// The consumer tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Whether a delivery is waiting to be taken (or the consumer has ended: then
    /// [`Consumer::try_recv`] says so without waiting).
    pub(crate) fn is_ready(&self) -> bool {
        !self.rx.is_empty() || self.channel.inner.is_closed()
    }

    /// Waits for the next delivery; `None` once the consumer has ended.
    pub fn recv(&mut self) -> Option<Delivery> {
        let d = self.rx.recv().ok()?;
        self.accept(d)
    }

    /// Waits up to `timeout` for the next delivery.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Delivery, RecvTimeoutError> {
        let d = self.rx.recv_timeout(timeout)?;
        self.accept(d).ok_or(RecvTimeoutError::Disconnected)
    }

    /// The next delivery if one is waiting.
    pub fn try_recv(&mut self) -> Result<Delivery, TryRecvError> {
        let d = self.rx.try_recv()?;
        self.accept(d).ok_or(TryRecvError::Disconnected)
    }

    fn accept(&mut self, p: Pending) -> Option<Delivery> {
        if self.channel.inner.is_closed() {
            return None; // its deliveries were requeued when the channel closed
        }
        if self.no_ack
            && let Some(queue) = &self.queue
        {
            self.unreported += 1;
            if self.unreported >= self.channel.inner.broker.limits.no_ack_window / 2 {
                let n = std::mem::take(&mut self.unreported);
                let mut s = queue.lock();
                s.core.handle_credit(self.id, n);
                queue.dispatch(&mut s);
            }
        }
        Some(Delivery::from_pending(
            p,
            Some(self.tag.clone()),
            self.channel.inner.clone(),
        ))
    }
}

impl Iterator for Consumer {
    type Item = Delivery;

    fn next(&mut self) -> Option<Delivery> {
        self.recv()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if self.channel.inner.is_closed() {
            return;
        }
        self.channel.inner.cancel_consumer(&self.tag, self.id);
        // Deliveries still buffered never reached the application: requeue those not settled
        // meanwhile (an `ack` with `multiple` may have covered some).
        let tags: Vec<u64> = self.rx.try_iter().map(|p| p.tag).collect();
        if !self.no_ack && !tags.is_empty() {
            self.channel.inner.requeue_outstanding(&tags);
        }
    }
}
