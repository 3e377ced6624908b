//! coney: an embedded, in-process message broker engine with RabbitMQ's semantics.
//!
//! Services in one process (or one test) get AMQP 0-9-1-style messaging without running a
//! broker: exchanges (default, direct, fanout, topic, headers), queues with durable / exclusive /
//! auto-delete flags, bindings, push consumers with prefetch, `basic_get`, ack / nack / reject
//! with requeue, and the reply codes and channel-closing errors RabbitMQ uses. Method names and
//! option structs follow the Rust client lapin, so code moves between the two with little change.
//!
//! The dead-letter path follows RabbitMQ 4.x: `x-dead-letter-exchange` (or a [`Policy`]) for
//! rejected, expired, over-length and over-the-delivery-limit messages, with `x-death` headers;
//! message and queue TTL, length limits, and quorum-queue semantics (`x-queue-type: quorum`).
//! Time comes from the broker's [`Clock`]: with a [`ManualClock`], expiry and retries happen when
//! the test moves the clock, never by sleeping:
//!
//! ```
//! use std::time::Duration;
//! use coney::*;
//!
//! let clock = ManualClock::new(0);
//! let broker = Broker::builder().clock(clock.clone()).in_memory();
//! let conn = broker.connect();
//! let ch = conn.channel()?;
//! ch.queue_declare("parked", QueueDeclareOptions::default(), FieldTable::new())?;
//! let args = FieldTable::new()
//!     .with("x-message-ttl", 5_000i64)
//!     .with("x-dead-letter-exchange", "")
//!     .with("x-dead-letter-routing-key", "parked");
//! ch.queue_declare("orders", QueueDeclareOptions::default(), args)?;
//! ch.basic_publish("", "orders", Default::default(), b"o-1".to_vec(), Default::default())?;
//! clock.advance(Duration::from_secs(5));
//! let parked = ch.basic_get("parked", BasicGetOptions::default())?.expect("expired into 'parked'");
//! assert_eq!(&parked.delivery.body()[..], b"o-1");
//! assert_eq!(broker.death_stats("orders").unwrap().dead_lettered.expired, 1);
//! # Ok::<(), coney::Error>(())
//! ```
//!
//! ```
//! use coney::*;
//!
//! let broker = Broker::in_memory();
//! let conn = broker.connect();
//! let ch = conn.channel()?;
//! ch.queue_declare("payment_queue", QueueDeclareOptions::default(), FieldTable::new())?;
//! ch.basic_publish("", "payment_queue", BasicPublishOptions::default(), b"order 42".to_vec(),
//!     BasicProperties::default().with_correlation_id("42"))?;
//!
//! let mut consumer = ch.basic_consume("payment_queue", "payments",
//!     BasicConsumeOptions::default(), FieldTable::new())?;
//! let delivery = consumer.recv().expect("a delivery");
//! assert_eq!(&delivery.body()[..], b"order 42");
//! assert_eq!(delivery.properties().correlation_id.as_deref(), Some("42"));
//! delivery.ack(BasicAckOptions::default())?;
//!
//! // RabbitMQ's errors, with its reply codes: a missing queue is a 404 that closes the channel.
//! let err = ch.basic_get("no_such_queue", BasicGetOptions::default()).unwrap_err();
//! assert_eq!(err.reply_code(), Some(ReplyCode::NotFound));
//! assert!(ch.is_closed());
//! # Ok::<(), coney::Error>(())
//! ```
//!
//! # Durability, limits and flow control
//! A durable broker ([`Broker::open`]) keeps durable exchanges, queues, bindings and persistent
//! messages in sled. A publisher confirm, [`Broker::sync`] and a per-message publish are
//! answered only once what they cover is on stable storage (`fdatasync`/`fsync`, not only the
//! page cache), and `sync` also covers acks that another thread's hold on a queue delayed.
//! The first storage failure poisons the store: later durable calls fail with it, and
//! [`Broker::health`] reports it. [`Broker::close`] (or dropping the last [`Broker`] handle)
//! closes every connection, flushes the store and releases its directory, so it can be opened
//! again at once; handles still held then fail with [`Error::is_broker_closed`]. Properties and argument tables that cannot be carried (a
//! content header over [`Limits::frame_max`], headers nested deeper than
//! [`FIELD_DEPTH_MAX`](types::field::FIELD_DEPTH_MAX), a short string over 255 bytes) are
//! refused at the call with [`Error::InvalidInput`], alone.
//!
//! Publish never waits for a consumer. It waits for flow control, as RabbitMQ blocks
//! publishing connections: while the queued messages are over
//! [`Limits::memory_high_watermark_bytes`] or the store's backlog is over
//! [`Limits::store_backlog_max_bytes`]; [`Connection::set_blocked_handler`] hears each change and
//! [`Channel::basic_publish_timeout`] gives up after a while. Queues that drain give their
//! memory back, and a durable broker's store gives its disk back once most of it is no longer
//! live (it compacts when idle; [`Broker::compact_store`] compacts on demand).
//!
//! ```
//! use std::time::Duration;
//! use coney::*;
//!
//! let limits = Limits { memory_high_watermark_bytes: 64 * 1024, ..Limits::default() };
//! let broker = Broker::builder().limits(limits).in_memory();
//! let conn = broker.connect();
//! conn.set_blocked_handler(|notice| println!("{notice:?}"));
//! let ch = conn.channel()?;
//! ch.queue_declare("backlog", QueueDeclareOptions::default(), FieldTable::new())?;
//! let publish = |ch: &Channel| ch.basic_publish_timeout("", "backlog", Default::default(),
//!     vec![0u8; 1024], Default::default(), Duration::from_millis(10));
//! while publish(&ch).is_ok() {}                      // until the watermark blocks it
//! assert!(broker.health().publishers_blocked);
//! ch.queue_purge("backlog", Default::default())?;    // the memory goes: publishing resumes
//! publish(&ch)?;
//! # Ok::<(), coney::Error>(())
//! ```
//!
//! # Request-reply and monitoring
//! [`RpcClient`] publishes a request with `reply_to` and a fresh `correlation_id` and waits
//! for the matching reply with a timeout (late, duplicate and unknown replies are counted and
//! dropped); [`RpcServer`] answers a queue's requests, publishing each reply before it acks the
//! request. [`Broker::stats`] reads every queue's counters without taking a lock that
//! publishing, delivering or settling take; [`stats::BrokerStats::to_prometheus`] renders them
//! with RabbitMQ's metric names. The [`rpc`] and [`stats`] modules show both at work.
//!
//! # Layout
//! - [`core`]: the broker as pure state machines (topology and routing, queues, channels):
//!   commands in through `handle_*`, output through `poll_*`, time passed in. No threads,
//!   locks, clocks or I/O.
//! - [`runtime`]: the threaded runtime behind the public API ([`Broker`], [`Connection`],
//!   [`Channel`], [`Consumer`], [`Delivery`]): a lock-free topology snapshot for publish, a
//!   mutex per queue and per channel, crossbeam channels to consumers.
//! - [`types`]: field tables, message properties, per-method option structs.
//! - [`error`]: [`Error`] with AMQP reply codes.
//! - [`clock`]: the system clock and a manual clock for tests.
//! - [`store`]: the `Store` trait, the sled, memory and fault-injecting stores, record format.
//! - [`retry`]: a retry topology with back-off delays.
//! - [`rpc`]: request-reply: a client that waits for replies (direct reply-to or a reply
//!   queue) and a server that answers a request queue.
//! - [`sim`]: the deterministic simulation (seeded steps, virtual time, faults, traces);
//!   [`service`]: services as handlers, on threads or in a simulation.
//! - [`stats`]: monitoring: [`Broker::stats`] snapshots (per-queue counts, counters, rates,
//!   error rate, processing-time histograms, broker totals) and their Prometheus text.

pub mod clock;
pub mod core;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod retry;
pub mod rpc;
pub mod runtime;
pub mod service;
pub mod sim;
pub mod stats;
pub mod store;
pub mod types;

pub use clock::{Clock, ManualClock, SystemClock};
pub use core::confirm::ConfirmEvent;
pub use core::queue::{DeadLetterStrategy, Overflow, PolicyDefinition};
pub use error::{AmqpError, CloseCause, Error, ReplyCode, Result};
pub use rpc::{
    PendingReply, Reply, ReplyMode, Response, RpcClient, RpcError, RpcServer, RpcServerOptions,
    RpcServerStats, RpcStats,
};
pub use runtime::Durability;
pub use runtime::{
    BlockedNotice, Broker, BrokerBuilder, Channel, ConfirmListener, Connection, Consumer,
    DEFAULT_USER, DeathStats, Delivery, FRAME_MAX_CEILING, GetMessage, Health, Limits, Policy,
    QueueDeclareOk, ReasonCounts, RecvTimeoutError, Returned, TryRecvError,
};
pub use stats::BrokerStats;
pub use types::*;

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
