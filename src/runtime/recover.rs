//! Recovery on open: definitions first (exchanges, queues, bindings), then each queue's
//! messages in sequence order. Messages come back flagged redelivered: the broker cannot know
//! which had reached a consumer before the restart (as RabbitMQ classic queues after an
//! unclean stop).

use std::sync::Arc;

use super::Snapshot;
use super::persist::Persistence;
use super::policy::{Compiled, policy_for};
use super::queue::QueueCell;
use crate::core::channel::QueueId;
use crate::core::queue::Entry;
use crate::core::queue::dead_letter::DeathReason;
use crate::core::shared::Map;
use crate::core::topology::{ConnectionId, DestinationName, Topology};
use crate::error::{AmqpError, Result};
use crate::store::codec::policy_key;
use crate::store::{
    Batch, BindingRecord, DestinationRecord, ExchangeRecord, MessageRecord, Op, PolicyRecord,
    QueueRecord, Recovered, RecoverySink, StoreError,
};
use crate::types::{ExchangeDeclareOptions, Message};

/// The connection id recovery acts as (recovered queues are never exclusive).
const RECOVERY: ConnectionId = ConnectionId(0);

/// Rebuilds the broker's state from what its store holds. Messages become queue entries as
/// they are read; messages of a queue that has no record (its deletion reached the store, its
/// messages' removal did not) are deleted.
pub(crate) fn rebuild(
    persistence: &Arc<Persistence>,
    now_ms: u64,
) -> Result<(Snapshot, Vec<Compiled>)> {
    let mut read = Read::default();
    let store = persistence
        .store()
        .expect("a broker being opened has not been closed");
    store.recover_into(&mut read)?;
    let Read {
        definitions,
        messages,
        held,
        ..
    } = read;
    let Recovered {
        exchanges,
        queues: queue_records,
        bindings,
        policies: policy_records,
        ..
    } = definitions;
    // Policies first: each queue is built with the one that applies to it.
    let mut policies = Vec::with_capacity(policy_records.len());
    for record in policy_records {
        let key = policy_key(&record.name);
        let compiled =
            Compiled::from_record(record).map_err(|reason| StoreError::Corrupt { key, reason })?;
        policies.push(compiled);
    }
    let mut topology = Topology::new();
    for e in &exchanges {
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
    let mut queues = Map::default();
    for q in &queue_records {
        let meta = topology
            .restore_queue(QueueId(q.id), &q.name, q.auto_delete, q.arguments.clone())
            .map_err(|err| inconsistent(b'Q', &q.id.to_be_bytes(), &err))?;
        queues.insert(
            meta.id,
            QueueCell::new(
                meta.clone(),
                Some(persistence.clone()),
                policy_for(&policies, &meta.name),
            ),
        );
    }
    for b in &bindings {
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
    // What was read back is already stored: nothing to write.
    drop(topology.poll_durable_changes());
    let mut orphans = Batch::new();
    for (queue, entries) in messages {
        match queues.get(&QueueId(queue)) {
            Some(cell) => cell.restore(entries, now_ms),
            None => orphans.push(Op::DeleteQueue(queue)),
        }
    }
    for (queue, entries) in held {
        match queues.get(&QueueId(queue)) {
            Some(cell) => cell.restore_held(entries),
            None => orphans.push(Op::DeleteQueue(queue)),
        }
    }
    if !orphans.is_empty() {
        persistence.write_definitions(orphans).wait()?;
    }
    Ok((Snapshot { topology, queues }, policies))
}

/// What recovery reads: definitions as records, messages straight into queue entries (flagged
/// possibly delivered), grouped by queue in the order the store gives them.
#[derive(Default)]
struct Read {
    /// The definitions, gathered as [`Store::recover`](crate::store::Store::recover) does.
    definitions: Recovered,
    messages: Vec<(u64, Vec<Entry>)>,
    /// At-least-once dead letters that were waiting for their targets, by queue.
    held: Vec<(u64, Vec<(Entry, DeathReason)>)>,
    /// Consecutive messages mostly share their exchange and routing key: one `Arc` each.
    last_exchange: Option<Arc<str>>,
    last_key: Option<Arc<str>>,
}

impl RecoverySink for Read {
    fn exchange(&mut self, record: ExchangeRecord) -> Result<(), StoreError> {
        self.definitions.exchange(record)
    }

    fn queue(&mut self, record: QueueRecord) -> Result<(), StoreError> {
        self.definitions.queue(record)
    }

    fn binding(&mut self, record: BindingRecord) -> Result<(), StoreError> {
        self.definitions.binding(record)
    }

    fn policy(&mut self, record: PolicyRecord) -> Result<(), StoreError> {
        self.definitions.policy(record)
    }

    fn message(&mut self, queue: u64, seq: u64, r: MessageRecord) -> Result<(), StoreError> {
        let pending = match r.pending_dead_letter.as_deref() {
            None => None,
            Some(name) => Some(DeathReason::parse(name).ok_or_else(|| StoreError::Corrupt {
                key: crate::store::codec::message_key(queue, seq).to_vec(),
                reason: format!("unknown pending dead-letter reason '{name}'"),
            })?),
        };
        let exchange = interned(&mut self.last_exchange, r.exchange);
        let routing_key = interned(&mut self.last_key, r.routing_key);
        let entry = Entry {
            seq,
            message: Arc::new(Message {
                exchange,
                routing_key,
                properties: r.properties,
                body: r.body,
                dead_lettered: r.dead_lettered,
                bcc: r.bcc,
            }),
            delivered: true,
            delivery_count: r.delivery_count,
            enqueued_at_ms: r.enqueued_at_ms,
            expires_at_ms: None, // computed by the queue, which knows its TTL
        };
        if let Some(reason) = pending {
            match self.held.last_mut() {
                Some((q, entries)) if *q == queue => entries.push((entry, reason)),
                _ => self.held.push((queue, vec![(entry, reason)])),
            }
            return Ok(());
        }
        match self.messages.last_mut() {
            Some((q, entries)) if *q == queue => entries.push(entry),
            _ => self.messages.push((queue, vec![entry])),
        }
        Ok(())
    }
}

/// `name` as an `Arc`, reusing `last` when it holds the same text.
fn interned(last: &mut Option<Arc<str>>, name: String) -> Arc<str> {
    match last {
        Some(l) if **l == *name => l.clone(),
        _ => last.insert(Arc::from(name)).clone(),
    }
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
