//! Helpers shared by the integration tests: broker set-up, publishing, draining consumers and
//! checking AMQP errors against SEMANTICS.md.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use coney::{
    AmqpError, BasicConsumeOptions, BasicGetOptions, BasicProperties, BasicPublishOptions, Broker,
    Channel, CloseCause, Connection, Consumer, Delivery, Error, ExchangeDeclareOptions,
    ExchangeKind, FieldTable, FieldValue, QueueDeclareOk, QueueDeclareOptions, ReplyCode,
};

/// Safety net for waits that involve another thread; never reached when the broker is right.
pub const WAIT: Duration = Duration::from_secs(5);

/// A fresh in-memory broker with one connection and one channel.
pub fn setup() -> (Broker, Connection, Channel) {
    let broker = Broker::in_memory();
    let conn = broker.connect();
    let ch = conn.channel().expect("a new connection opens a channel");
    (broker, conn, ch)
}

/// Declares a plain (non-durable, non-exclusive, no arguments) queue.
pub fn declare(ch: &Channel, name: &str) -> QueueDeclareOk {
    ch.queue_declare(name, QueueDeclareOptions::default(), FieldTable::new())
        .unwrap_or_else(|e| panic!("declaring queue '{name}': {e}"))
}

/// Declares a non-durable exchange of `kind` with default options.
pub fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) {
    ch.exchange_declare(
        name,
        kind,
        ExchangeDeclareOptions::default(),
        FieldTable::new(),
    )
    .unwrap_or_else(|e| panic!("declaring exchange '{name}': {e}"));
}

/// Binds `queue` to `exchange` with `key` and no arguments.
pub fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    ch.queue_bind(queue, exchange, key, Default::default(), FieldTable::new())
        .unwrap_or_else(|e| panic!("binding '{queue}' to '{exchange}' with '{key}': {e}"));
}

/// Publishes `body` with default options and properties.
pub fn publish(ch: &Channel, exchange: &str, key: &str, body: &str) {
    ch.basic_publish(
        exchange,
        key,
        BasicPublishOptions::default(),
        body.as_bytes().to_vec(),
        BasicProperties::default(),
    )
    .unwrap_or_else(|e| panic!("publishing to '{exchange}' with key '{key}': {e}"));
}

/// Publishes `body` with the given application headers.
pub fn publish_headers(ch: &Channel, exchange: &str, key: &str, body: &str, headers: FieldTable) {
    ch.basic_publish(
        exchange,
        key,
        BasicPublishOptions::default(),
        body.as_bytes().to_vec(),
        BasicProperties::default().with_headers(headers),
    )
    .unwrap_or_else(|e| panic!("publishing to '{exchange}' with key '{key}': {e}"));
}

/// Publishes each body to the default exchange, routed to `queue`.
pub fn publish_all(ch: &Channel, queue: &str, bodies: &[&str]) {
    for body in bodies {
        publish(ch, "", queue, body);
    }
}

/// A manual-ack consumer with default options.
pub fn consume(ch: &Channel, queue: &str, tag: &str) -> Consumer {
    ch.basic_consume(
        queue,
        tag,
        BasicConsumeOptions::default(),
        FieldTable::new(),
    )
    .unwrap_or_else(|e| panic!("consuming from '{queue}': {e}"))
}

/// The body as UTF-8 text.
pub fn body(d: &Delivery) -> String {
    String::from_utf8(d.body().to_vec()).expect("test bodies are UTF-8")
}

/// Every delivery already waiting for the consumer (deliveries are made synchronously, so
/// after a publish returns they are there).
pub fn drain(c: &mut Consumer) -> Vec<Delivery> {
    let mut out = Vec::new();
    while let Ok(d) = c.try_recv() {
        out.push(d);
    }
    out
}

/// The bodies of deliveries, in order.
pub fn bodies(ds: &[Delivery]) -> Vec<String> {
    ds.iter().map(body).collect()
}

/// The bodies of every delivery waiting for the consumer.
pub fn drain_bodies(c: &mut Consumer) -> Vec<String> {
    bodies(&drain(c))
}

/// `basic.get` with manual ack; panics on error.
pub fn get(ch: &Channel, queue: &str) -> Option<Delivery> {
    ch.basic_get(queue, BasicGetOptions { no_ack: false })
        .unwrap_or_else(|e| panic!("basic_get on '{queue}': {e}"))
        .map(|g| g.delivery)
}

/// Fetches (no-ack) every ready message of `queue`, returning the bodies.
pub fn get_all(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(g) = ch
        .basic_get(queue, BasicGetOptions { no_ack: true })
        .unwrap_or_else(|e| panic!("basic_get on '{queue}': {e}"))
    {
        out.push(body(&g.delivery));
    }
    out
}

/// Ready messages of `queue` (passive declare on `ch`).
pub fn ready(ch: &Channel, queue: &str) -> u32 {
    passive(ch, queue)
        .unwrap_or_else(|e| panic!("passive declare of '{queue}': {e}"))
        .message_count
}

/// A passive `queue.declare`.
pub fn passive(ch: &Channel, queue: &str) -> coney::Result<QueueDeclareOk> {
    ch.queue_declare(
        queue,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::new(),
    )
}

/// Whether queue `name` exists, asked on a throw-away connection (405 counts as existing).
pub fn queue_exists(broker: &Broker, name: &str) -> bool {
    let conn = broker.connect();
    let ch = conn.channel().expect("a new connection opens a channel");
    match passive(&ch, name) {
        Ok(_) => true,
        Err(e) if e.reply_code() == Some(ReplyCode::NotFound) => false,
        Err(e) if e.reply_code() == Some(ReplyCode::ResourceLocked) => true,
        Err(e) => panic!("passive declare of '{name}': {e}"),
    }
}

/// Whether exchange `name` exists, asked on a throw-away connection.
pub fn exchange_exists(broker: &Broker, name: &str) -> bool {
    let conn = broker.connect();
    let ch = conn.channel().expect("a new connection opens a channel");
    let r = ch.exchange_declare(
        name,
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::new(),
    );
    match r {
        Ok(()) => true,
        Err(e) if e.reply_code() == Some(ReplyCode::NotFound) => false,
        Err(e) => panic!("passive declare of exchange '{name}': {e}"),
    }
}

/// Asserts `r` is a soft (channel) error with `code` and, if given, exactly `text`; returns it.
#[track_caller]
pub fn channel_error<T: std::fmt::Debug>(
    r: coney::Result<T>,
    code: ReplyCode,
    text: Option<&str>,
) -> AmqpError {
    match r {
        Err(Error::Channel(e)) => {
            assert_eq!(e.code, code, "reply code of {e}");
            if let Some(text) = text {
                assert_eq!(e.text, text);
            }
            e
        }
        other => panic!("expected a {} channel error, got {other:?}", code.code()),
    }
}

/// Asserts `r` is a hard (connection) error with `code` and, if given, exactly `text`.
#[track_caller]
pub fn connection_error<T: std::fmt::Debug>(
    r: coney::Result<T>,
    code: ReplyCode,
    text: Option<&str>,
) -> AmqpError {
    match r {
        Err(Error::Connection(e)) => {
            assert_eq!(e.code, code, "reply code of {e}");
            if let Some(text) = text {
                assert_eq!(e.text, text);
            }
            e
        }
        other => panic!("expected a {} connection error, got {other:?}", code.code()),
    }
}

/// Asserts `r` is `ChannelClosed` whose cause carries `code`.
#[track_caller]
pub fn closed_with<T: std::fmt::Debug>(r: coney::Result<T>, code: Option<ReplyCode>) {
    match r {
        Err(e @ Error::ChannelClosed(_)) => assert_eq!(e.reply_code(), code, "cause of {e}"),
        other => panic!("expected ChannelClosed, got {other:?}"),
    }
}

/// The close cause of a channel closed by `error`.
pub fn error_cause(error: &AmqpError) -> CloseCause {
    CloseCause::Error(error.clone())
}

/// Declares a plain queue with `arguments`; panics on error.
pub fn declare_args(ch: &Channel, name: &str, arguments: FieldTable) {
    ch.queue_declare(name, QueueDeclareOptions::default(), arguments)
        .unwrap_or_else(|e| panic!("declaring '{name}': {e}"));
}

/// The `x-death` entries of a delivery, most recent first; panics if there is no such header
/// or it is malformed (SEMANTICS.md §5.4).
pub fn deaths(d: &Delivery) -> Vec<FieldTable> {
    match d
        .properties()
        .headers
        .as_ref()
        .and_then(|h| h.get("x-death"))
    {
        Some(FieldValue::Array(items)) => items
            .iter()
            .map(|v| match v {
                FieldValue::Table(t) => t.clone(),
                other => panic!("x-death entry {other:?}"),
            })
            .collect(),
        other => panic!("x-death {other:?}"),
    }
}

/// Entry `i` of a delivery's `x-death` header.
pub fn death(d: &Delivery, i: usize) -> FieldTable {
    deaths(d).swap_remove(i)
}

/// A string field of a table.
pub fn text<'a>(t: &'a FieldTable, key: &str) -> Option<&'a str> {
    t.get(key).and_then(FieldValue::as_str)
}

/// A fresh directory under the system temp dir, removed on drop unless `keep` is set (to
/// look at what a failing test left).
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// A new, empty (not yet created) directory named after the test binary's process and
    /// `name`.
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("coney-test-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        Self { path, keep: false }
    }

    /// Keeps the directory after the test when `keep` is true.
    pub fn keep_if(mut self, keep: bool) -> Self {
        self.keep = keep;
        self
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Declare options of a durable queue.
pub fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}
