//! A published message as the broker holds it: shared, immutable, routed to any number of queues.

use std::sync::Arc;

use bytes::Bytes;

use super::BasicProperties;

/// A message as published. Queues share one `Arc<Message>`; nothing in it changes after publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// The exchange it was published to (`""` for the default exchange).
    pub exchange: Arc<str>,
    /// The routing key it was published with.
    pub routing_key: Arc<str>,
    /// Its properties.
    pub properties: BasicProperties,
    /// Its body.
    pub body: Bytes,
    /// Whether the broker dead-lettered it: only then are its `x-death` headers the broker's
    /// own history, continued at the next dead-lettering. A client-supplied `x-death` is not
    /// interpreted and is overwritten (RabbitMQ 4.x).
    pub dead_lettered: bool,
    /// The keys of its `BCC` header, which publish removed from the headers: RabbitMQ still
    /// routes a dead letter with them when no dead-letter routing key replaces its keys.
    /// Empty for most messages (no allocation).
    pub bcc: Vec<String>,
}

impl Message {
    /// Body size in bytes, the unit of `x-max-length-bytes` and the message size limit.
    pub fn body_size(&self) -> u64 {
        self.body.len() as u64
    }
}
