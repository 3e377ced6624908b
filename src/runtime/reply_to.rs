//! Direct reply-to (`amq.rabbitmq.reply-to`), as RabbitMQ does it
//! (<https://www.rabbitmq.com/docs/direct-reply-to>): a requester consumes the pseudo-queue
//! `amq.rabbitmq.reply-to` (no-ack) on a channel, then publishes requests on that channel with
//! `reply_to: amq.rabbitmq.reply-to`; the broker rewrites that to the channel's own address
//! `amq.rabbitmq.reply-to.<suffix>`, and a reply published to the default exchange with that
//! address as routing key goes straight to the requester's consumer. Nothing is buffered: a
//! reply to a requester that is gone is dropped, and counts as routed (no `basic.return`).
//!
//! The misuses get RabbitMQ's errors (406 PRECONDITION_FAILED, a channel error): consuming
//! with manual acks (`reply consumer cannot acknowledge`), a second reply consumer on a channel
//! (`reply consumer already set`), publishing with `reply_to: amq.rabbitmq.reply-to` on a
//! channel without one (`fast reply consumer does not exist`). Declaring the pseudo-queue (or
//! a live address) answers `(name, 0 messages, 1 consumer)`; a gone address is a 404.

use std::sync::{Arc, Weak};

use crossbeam_channel::Sender;
use parking_lot::Mutex;
use rustc_hash::FxHashMap as HashMap;

use super::channel::ChannelInner;
use super::consumer::Pending;
use crate::core::channel::QueueId;
use crate::types::Message;

/// The pseudo-queue a requester consumes and names in `reply_to`.
pub(crate) const REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// What every channel's reply address starts with.
pub(crate) const REPLY_TO_PREFIX: &str = "amq.rabbitmq.reply-to.";
/// The queue id a reply consumer is registered under in its channel's state: no queue has it,
/// so a cancel or a channel close finds no queue to leave.
pub(crate) const REPLY_QUEUE: QueueId = QueueId(u64::MAX);

/// The reply consumers of a broker, by address.
#[derive(Default)]
pub(crate) struct ReplyRoutes {
    routes: Mutex<HashMap<Arc<str>, Route>>,
}

#[derive(Clone)]
struct Route {
    channel: Weak<ChannelInner>,
    tx: Sender<Pending>,
}

impl ReplyRoutes {
    /// Registers the reply consumer of `channel` under `address`.
    pub(crate) fn add(&self, address: Arc<str>, channel: &Arc<ChannelInner>, tx: Sender<Pending>) {
        let route = Route {
            channel: Arc::downgrade(channel),
            tx,
        };
        self.routes.lock().insert(address, route);
    }

    /// Removes the reply consumer registered under `address`.
    pub(crate) fn remove(&self, address: &str) {
        self.routes.lock().remove(address);
    }

    /// Whether `address` leads to a live reply consumer.
    pub(crate) fn exists(&self, address: &str) -> bool {
        self.route(address).is_some()
    }

    fn route(&self, address: &str) -> Option<(Arc<ChannelInner>, Sender<Pending>)> {
        let route = self.routes.lock().get(address).cloned()?;
        let channel = route.channel.upgrade().filter(|c| !c.is_closed())?;
        Some((channel, route.tx))
    }

    /// Hands a reply to the consumer at `address` (a no-ack delivery with the next tag of its
    /// channel); `false` if there is none (the reply is dropped).
    pub(crate) fn deliver(&self, address: &str, message: Arc<Message>) -> bool {
        let Some((channel, tx)) = self.route(address) else {
            return false;
        };
        let tag = channel
            .state
            .lock()
            .handle_delivery(REPLY_QUEUE, 0, true, false);
        tx.send(Pending::reply(tag, message)).is_ok()
    }
}
