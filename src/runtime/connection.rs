//! A connection: owns channels and exclusive queues; closing it (or dropping it) closes every
//! channel, requeueing their unacked messages, and deletes its exclusive queues (§1.5, §4.4).

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::BrokerInner;
use super::channel::{Channel, ChannelInner};
use super::flow::BlockedNotice;
use crate::core::topology::ConnectionId;
use crate::error::{AmqpError, CloseCause, Error, ReplyCode, Result};

/// A connection to the broker. Dropping it closes it.
pub struct Connection {
    inner: Arc<ConnectionInner>,
    /// Keeps this connection's blocked handler registered; dropped with the connection.
    blocked_handler: Arc<()>,
}

pub(crate) struct ConnectionInner {
    pub(crate) id: ConnectionId,
    pub(crate) broker: Arc<BrokerInner>,
    state: Mutex<ConnectionState>,
}

struct ConnectionState {
    channels: Vec<Weak<ChannelInner>>,
    closed: Option<Arc<CloseCause>>,
}

impl Connection {
    pub(crate) fn open(broker: Arc<BrokerInner>) -> Self {
        let id = ConnectionId(broker.next_id());
        let state = Mutex::new(ConnectionState {
            channels: Vec::new(),
            closed: None,
        });
        Self {
            inner: Arc::new(ConnectionInner { id, broker, state }),
            blocked_handler: Arc::new(()),
        }
    }

    /// Opens a channel. More than `channel_max` open channels is a 530 connection error.
    pub fn channel(&self) -> Result<Channel> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        if let Some(cause) = &st.closed {
            return Err(Error::ConnectionClosed(cause.clone()));
        }
        st.channels
            .retain(|w| w.upgrade().is_some_and(|c| !c.is_closed()));
        let max = inner.broker.limits.channel_max;
        if st.channels.len() >= usize::from(max) {
            drop(st);
            let e = AmqpError::new(
                ReplyCode::NotAllowed,
                format!(
                    "number of channels opened ({max}) has reached the negotiated channel_max ({max})"
                ),
            );
            inner.close(Arc::new(CloseCause::Error(e.clone())));
            return Err(Error::Connection(e));
        }
        let ch = Channel::open(inner.clone());
        st.channels.push(Arc::downgrade(&ch.inner));
        Ok(ch)
    }

    /// Sets the handler told when publishing starts and stops waiting for flow control
    /// (RabbitMQ's `connection.blocked` / `connection.unblocked`). It runs on the thread whose
    /// call crossed the threshold, so it must not wait on the broker; if publishers are blocked
    /// when it is set, it hears so at once. Replaces any earlier handler; it goes with the
    /// connection.
    pub fn set_blocked_handler(&self, handler: impl FnMut(&BlockedNotice) + Send + 'static) {
        self.inner
            .broker
            .flow
            .register(&self.blocked_handler, Box::new(handler));
    }

    /// Closes the connection.
    pub fn close(self) {}

    /// Whether the connection is closed (by the application or by a hard error).
    pub fn is_closed(&self) -> bool {
        self.inner.closed().is_some()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.inner.close(Arc::new(CloseCause::Client));
    }
}

impl ConnectionInner {
    pub(crate) fn closed(&self) -> Option<Arc<CloseCause>> {
        self.state.lock().closed.clone()
    }

    /// Closes every channel, then deletes the connection's exclusive queues.
    pub(crate) fn close(&self, cause: Arc<CloseCause>) {
        let channels = {
            let mut st = self.state.lock();
            if st.closed.is_some() {
                return;
            }
            st.closed = Some(cause.clone());
            std::mem::take(&mut st.channels)
        };
        let channel_cause = Arc::new(CloseCause::Connection(cause));
        for ch in channels.iter().filter_map(Weak::upgrade) {
            ch.close_with(channel_cause.clone());
        }
        // Exclusive queues are never durable: no store is involved.
        let _ = self.broker.delete_exclusive_queues(self.id);
    }
}
