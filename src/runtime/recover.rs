//! Recovery on open: definitions first (exchanges, queues, bindings), then each queue's
//! messages in sequence order. Messages come back flagged redelivered: the broker cannot know
//! which had reached a consumer before the restart (as RabbitMQ classic queues after an
//! unclean stop, SEMANTICS.md §3.6).

use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::Snapshot;
use super::persist::Persistence;
use super::queue::QueueCell;
use crate::core::channel::QueueId;
use crate::core::queue::Entry;
use crate::core::topology::{ConnectionId, DestinationName, Topology};
use crate::error::{AmqpError, Result};
use crate::store::{Batch, DestinationRecord, Op, Recovered, StoreError};
use crate::types::{ExchangeDeclareOptions, Message};

/// The connection id recovery acts as (recovered queues are never exclusive).
const RECOVERY: ConnectionId = ConnectionId(0);

/// Rebuilds the broker's state from what the store holds. Messages of a queue that has no
/// record (its deletion reached the store, its messages' removal did not) are deleted.
pub(crate) fn rebuild(recovered: Recovered, persistence: &Arc<Persistence>) -> Result<Snapshot> {
    let mut topology = Topology::new();
    for e in &recovered.exchanges {
        let options = ExchangeDeclareOptions {
            durable: true,
            auto_delete: e.auto_delete,
            internal: e.internal,
            ..Default::default()
        };
        topology
            .declare_exchange(&e.name, &e.kind, options, e.arguments.clone())
            .map_err(|err| inconsistent(b'E', e.name.as_bytes(), &err))?;
    }
    let mut queues = FxHashMap::default();
    for q in &recovered.queues {
        let meta = topology
            .restore_queue(QueueId(q.id), &q.name, q.auto_delete, q.arguments.clone())
            .map_err(|err| inconsistent(b'Q', &q.id.to_be_bytes(), &err))?;
        queues.insert(
            meta.id,
            Arc::new(QueueCell::new(meta, Some(persistence.clone()))),
        );
    }
    for b in &recovered.bindings {
        let destination = match &b.destination {
            DestinationRecord::Queue(q) => DestinationName::Queue(q),
            DestinationRecord::Exchange(e) => DestinationName::Exchange(e),
        };
        topology
            .bind(
                &b.source,
                destination,
                &b.routing_key,
                b.arguments.clone(),
                RECOVERY,
            )
            .map_err(|err| inconsistent(b'B', b.source.as_bytes(), &err))?;
    }
    let mut orphans = Batch::new();
    for qm in recovered.messages {
        let Some(cell) = queues.get(&QueueId(qm.queue)) else {
            orphans.push(Op::DeleteQueue(qm.queue));
            continue;
        };
        let name: Arc<str> = cell.meta.name.clone();
        // Consecutive messages mostly share their exchange and routing key: reuse the last.
        let mut last_exchange: Arc<str> = Arc::from("");
        let mut last_key: Arc<str> = name.clone();
        cell.restore(qm.messages.into_iter().map(|(seq, r)| {
            if *r.routing_key != *last_key {
                last_key = if *r.routing_key == *name {
                    name.clone()
                } else {
                    Arc::from(r.routing_key)
                };
            }
            if *r.exchange != *last_exchange {
                last_exchange = topology
                    .exchange(&r.exchange)
                    .map_or_else(|| Arc::from(r.exchange.as_str()), |e| e.name.clone());
            }
            let (exchange, routing_key) = (last_exchange.clone(), last_key.clone());
            Entry {
                seq,
                message: Arc::new(Message {
                    exchange,
                    routing_key,
                    properties: r.properties,
                    body: r.body,
                }),
                delivered: true,
                delivery_count: r.delivery_count,
                enqueued_at_ms: r.enqueued_at_ms,
            }
        }));
    }
    if !orphans.is_empty() {
        persistence.write_definitions(orphans).wait()?;
    }
    Ok(Snapshot { topology, queues })
}

/// A definition the store holds that the broker cannot take back: reported as corrupt.
fn inconsistent(prefix: u8, key: &[u8], err: &AmqpError) -> crate::Error {
    let mut full = vec![prefix];
    full.extend_from_slice(key);
    StoreError::Corrupt {
        key: full,
        reason: format!("recovered definition refused: {}", err.text),
    }
    .into()
}
