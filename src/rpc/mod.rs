//! Request-reply (RPC) over the broker: [`RpcClient`] publishes requests and waits for their
//! replies, [`RpcServer`] consumes a request queue and answers each request.
//!
//! The client stamps every request with a fresh `correlation_id` and a `reply_to` address, and
//! the server publishes its reply to that address through the default exchange with the same
//! `correlation_id`, as in RabbitMQ's RPC pattern. Two reply paths ([`ReplyMode`]): RabbitMQ's
//! direct reply-to (`amq.rabbitmq.reply-to`, nothing is queued: a reply to a requester that is
//! gone is dropped by the broker), or a reply queue of the client's own (server-named,
//! exclusive, auto-delete).
//!
//! Neither side starts a thread. The client's waiting callers take turns receiving replies
//! (see [`RpcClient`]); the server's [`RpcServer::handle`] answers one request on the calling
//! thread, and [`RpcServer::serve`] is a blocking loop the application runs where it likes.
//!
//! ```
//! use std::time::Duration;
//! use coney::*;
//! use coney::rpc::{ReplyMode, Response, RpcClient, RpcServer, RpcServerOptions};
//!
//! let broker = Broker::in_memory();
//! let conn = broker.connect();
//! let ch = conn.channel()?;
//! ch.queue_declare("rpc.upper", QueueDeclareOptions::default(), FieldTable::new())?;
//!
//! let server = RpcServer::new(&ch, "rpc.upper", RpcServerOptions::default())?;
//! let client = RpcClient::new(&conn, ReplyMode::DirectReplyTo)?;
//! std::thread::scope(|s| -> std::result::Result<(), Box<dyn std::error::Error>> {
//!     let serving = s.spawn(|| {
//!         server.serve(|request: &Delivery| {
//!             let text = String::from_utf8_lossy(request.body()).to_uppercase();
//!             Ok::<_, std::convert::Infallible>(Response::new(text))
//!         })
//!     });
//!     let reply = client.call("", "rpc.upper", "hello", BasicProperties::default(),
//!         Duration::from_secs(5))?;
//!     assert_eq!(&reply.body()[..], b"HELLO");
//!     server.cancel()?; // `serve` returns once its consumer is cancelled
//!     serving.join().expect("the server thread does not panic")?;
//!     Ok(())
//! }).expect("a round trip");
//! assert_eq!(client.stats().replies, 1);
//! assert_eq!(server.stats().replied, 1);
//! # Ok::<(), coney::Error>(())
//! ```
//!
//! Files: `client.rs` (the requesting side and its reply bookkeeping), `server.rs` (the
//! answering side).

mod client;
mod server;

use std::sync::Arc;
use std::time::Duration;

pub use client::{FINISHED_IDS_MAX, PendingReply, Reply, ReplyMode, RpcClient, RpcStats};
pub use server::{Handled, Response, RpcServer, RpcServerOptions, RpcServerStats, reply};

use crate::error::{CloseCause, Error};

/// Why a call got no reply.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No reply came within the call's timeout (or flow control held the request's publish
    /// that long). A reply arriving later is dropped and counted as
    /// [`late`](RpcStats::late).
    #[error("no reply to request '{correlation_id}' within {waited:?}")]
    Timeout {
        /// The request's correlation id.
        correlation_id: String,
        /// How long the call waited.
        waited: Duration,
    },
    /// The request could not be routed to any queue (it was published `mandatory` and the
    /// broker returned it): nobody can answer it, so the call fails at once.
    #[error(
        "request '{correlation_id}' to exchange '{exchange}' with key '{routing_key}' is unroutable"
    )]
    Unroutable {
        /// The request's correlation id.
        correlation_id: String,
        /// The exchange it was published to.
        exchange: String,
        /// Its routing key.
        routing_key: String,
    },
    /// The client's reply consumer ended: its channel or connection was closed (by the
    /// application, an error or the broker's close), or its reply queue was deleted. Every
    /// call on the client fails so from then on.
    #[error("the reply consumer ended{}", closed_suffix(.cause))]
    Closed {
        /// Why the client's channel closed; `None` if it is still open (the reply queue was
        /// deleted under it).
        cause: Option<Arc<CloseCause>>,
    },
    /// The broker refused the request's publish (channel closed, invalid properties...).
    #[error("publishing the request: {0}")]
    Broker(#[from] Error),
}

fn closed_suffix(cause: &Option<Arc<CloseCause>>) -> String {
    match cause {
        Some(cause) => format!(": {cause}"),
        None => String::new(),
    }
}
