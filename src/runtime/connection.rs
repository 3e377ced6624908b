//! A connection: owns channels and exclusive queues; closing it closes every channel,
//! requeueing their unacked messages, and deletes its exclusive queues.
//!
//! Lifetime: the [`Connection`] handle and every [`Channel`] opened on it share one
//! [`ConnectionHandle`]; the connection closes when the last of them is dropped (or at
//! [`Connection::close`], or when the broker closes). So `broker.connect().channel()?` gives a
//! working channel, as in lapin, where a channel holds the connection's internals.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::BrokerInner;
use super::channel::{Channel, ChannelInner};
use super::flow::BlockedNotice;
use crate::core::topology::ConnectionId;
use crate::error::{AmqpError, CloseCause, Error, ReplyCode, Result};

/// A connection to the broker. It stays open while this handle or any of its channels is
/// alive; [`Connection::close`] closes it (and its channels) at once.
pub struct Connection {
    inner: Arc<ConnectionInner>,
    handle: Arc<ConnectionHandle>,
}

/// Shared by a [`Connection`] and its [`Channel`]s: the last one dropped closes the connection.
pub(crate) struct ConnectionHandle {
    inner: Arc<ConnectionInner>,
    /// Keeps this connection's blocked handler registered; dropped with the last handle.
    blocked_handler: Arc<()>,
}

impl Drop for ConnectionHandle {
    fn drop(&mut self) {
        self.inner.close(Arc::new(CloseCause::Client));
    }
}

pub(crate) struct ConnectionInner {
    pub(crate) id: ConnectionId,
    pub(crate) broker: Arc<BrokerInner>,
    /// The user it acts as: a published `user_id` must name it.
    pub(crate) user: Arc<str>,
    state: Mutex<ConnectionState>,
}

struct ConnectionState {
    channels: Vec<Weak<ChannelInner>>,
    closed: Option<Arc<CloseCause>>,
}

impl Connection {
    /// Opens a connection on `broker`; one of a closed broker is closed already
    /// ([`CloseCause::BrokerClosed`]).
    pub(crate) fn open(broker: Arc<BrokerInner>, user: &str) -> Self {
        let id = ConnectionId(broker.next_id());
        let state = Mutex::new(ConnectionState {
            channels: Vec::new(),
            closed: None,
        });
        let inner = Arc::new(ConnectionInner {
            id,
            broker,
            user: Arc::from(user),
            state,
        });
        if !inner.broker.register_connection(&inner) {
            inner.state.lock().closed = Some(Arc::new(CloseCause::BrokerClosed));
        }
        Self {
            handle: Arc::new(ConnectionHandle {
                inner: inner.clone(),
                blocked_handler: Arc::new(()),
            }),
            inner,
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
        let ch = Channel::open(self.handle.clone());
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
            .register(&self.handle.blocked_handler, Box::new(handler));
    }

    /// Closes the connection and every channel on it (their unacked messages are requeued),
    /// and deletes its exclusive queues, even while channels of it are still held: their
    /// calls then return [`Error::ChannelClosed`].
    pub fn close(self) {
        self.inner.close(Arc::new(CloseCause::Client));
    }

    /// Whether the connection is closed (by the application, by a hard error or by the
    /// broker's close).
    pub fn is_closed(&self) -> bool {
        self.inner.closed().is_some()
    }

    /// Why the connection closed, if it did.
    pub fn close_cause(&self) -> Option<Arc<CloseCause>> {
        self.inner.closed()
    }

    /// Closes the connection as the broker would, with `cause`.
    pub(crate) fn close_with(&self, cause: Arc<CloseCause>) {
        self.inner.close(cause);
    }
}

impl ConnectionHandle {
    pub(crate) fn inner(&self) -> &Arc<ConnectionInner> {
        &self.inner
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
        self.broker.connections.lock().remove(&self.id.0);
        // Exclusive queues are never durable: no store is involved.
        let _ = self.broker.delete_exclusive_queues(self.id);
    }
}
