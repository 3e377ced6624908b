//! Topology changes: declare, bind, delete. Serialised by the admin lock; each change that
//! alters the topology publishes a new snapshot for the lock-free publish path.
//!
//! A change costs O(log n) in the number of queues and bindings: cloning the snapshot is O(1)
//! (persistent maps), the edit copies one path, and the store records are the durable changes
//! the topology noted while it was edited, never a comparison of two whole topologies.

use std::sync::Arc;

use super::policy::policy_for;
use super::queue::{QueueCell, Sink};
use super::{Admin, BrokerInner, Snapshot, persist};
use crate::core::channel::QueueId;
use crate::core::topology::{ConnectionId, QueueDeclared};
use crate::error::{AmqpError, ReplyCode};
use crate::store::StoreError;
use crate::types::{FieldTable, QueueDeclareOptions};

impl BrokerInner {
    /// Runs `f` on a copy of the current snapshot under the admin lock (an O(1) clone: the
    /// copy shares everything with the current one until `f` edits it); if it reports a
    /// change, the copy becomes the new snapshot, and the call returns once the durable part of
    /// the change is on disk. The change stands in memory even if the store fails; the failure
    /// is reported.
    pub(crate) fn update<R>(
        &self,
        f: impl FnOnce(&mut Snapshot, &mut Admin) -> Result<(R, bool), AmqpError>,
    ) -> Result<R, Failure> {
        let mut admin = self.admin.lock();
        let mut next = Snapshot::clone(&self.snapshot.load());
        let (r, changed) = f(&mut next, &mut admin)?;
        let durable = next.topology.poll_durable_changes();
        if !changed {
            debug_assert!(durable.is_empty(), "a durable change reported as none");
            return Ok(r);
        }
        // The records are queued before the snapshot is published, so they precede any message
        // record of a publish that sees the new topology.
        let written = self.persistence.as_ref().and_then(|p| {
            let ops = persist::definition_ops(&durable);
            (!ops.is_empty()).then(|| p.write_definitions(ops))
        });
        self.snapshot.store(Arc::new(next));
        // The next change may start while this one's records are flushed: the flusher writes
        // them in the order they were queued, so concurrent declares share one flush (group
        // commit) and the store still sees the changes in admin-lock order.
        drop(admin);
        // The change stands in memory either way; a store failure is reported, not hidden.
        match written {
            Some(w) => w.wait().map(|()| r).map_err(Failure::Storage),
            None => Ok(r),
        }
    }

    /// `queue.declare`: returns the queue and its ready and consumer counts.
    pub(crate) fn declare_queue(
        &self,
        name: &str,
        options: QueueDeclareOptions,
        arguments: FieldTable,
        conn: ConnectionId,
    ) -> Result<(QueueDeclared, u64, u32), Failure> {
        let max_queues = self.limits.max_queues;
        self.update(|snap, admin| {
            let creating =
                !options.passive && (name.is_empty() || snap.topology.queue(name).is_none());
            if creating && snap.queues.len() >= max_queues as usize {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!("cannot declare queue '{name}': queue limit ({max_queues}) reached"),
                ));
            }
            let declared = snap
                .topology
                .declare_queue(name, options, arguments, conn, || {
                    admin.rng.name("amq.gen-")
                })?;
            if declared.created {
                let persist = self.persistence.clone().filter(|_| declared.meta.durable);
                let policy = policy_for(&admin.policies, &declared.meta.name);
                let cell = QueueCell::new(declared.meta.clone(), persist, policy);
                cell.attach(self.queue_env());
                snap.queues.insert(declared.meta.id, cell);
                return Ok(((declared, 0, 0), true));
            }
            let cell = &snap.queues[&declared.meta.id];
            if !cell.is_quorum() {
                cell.touch(); // a redeclare renews a classic queue's lease, not a quorum one's (§7.2)
            }
            let s = cell.lock();
            let counts = (s.core.ready_len(), s.core.consumer_count());
            drop(s);
            Ok(((declared, counts.0, counts.1), false))
        })
    }

    /// `queue.delete`: 404-free (missing is fine), 405 for another connection's exclusive queue,
    /// 406 for if-empty / if-unused. Returns the ready messages deleted.
    pub(crate) fn delete_queue(
        &self,
        name: &str,
        conn: ConnectionId,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u64, Failure> {
        self.update(|snap, _| {
            let meta = match snap.topology.queue_for(name, conn) {
                Ok(meta) => meta.clone(),
                Err(e) if e.code == ReplyCode::NotFound => return Ok((0, false)),
                Err(e) => return Err(e),
            };
            let cell = snap.queues[&meta.id].clone();
            let mut s = cell.lock();
            if if_empty && s.core.ready_len() > 0 {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!("queue '{name}' in vhost '/' not empty"),
                ));
            }
            if if_unused && s.core.consumer_count() > 0 {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!("queue '{name}' in vhost '/' in use"),
                ));
            }
            let count = take_for_deletion(&mut s);
            drop(s);
            remove_queue(snap, &meta.name, meta.id);
            Ok((count, true))
        })
    }

    /// Deletes a queue unused since `due - x-expires`, if it is still unused; its
    /// messages are not dead-lettered.
    pub(crate) fn expire_queue(&self, id: QueueId, due: u64) -> Result<(), Failure> {
        self.update(|snap, _| {
            let Some(cell) = snap.queues.get(&id).cloned() else {
                return Ok(((), false));
            };
            let expires = cell.config().expires.unwrap_or(u64::MAX);
            let mut s = cell.lock();
            if s.core.consumer_count() > 0
                || cell.last_used_ms().saturating_add(expires) > due
                || self.clock.now_ms() < due
            {
                return Ok(((), false));
            }
            take_for_deletion(&mut s);
            drop(s);
            tracing::info!(queue = &*cell.meta.name, "queue expired (x-expires)");
            remove_queue(snap, &cell.meta.name, id);
            Ok(((), true))
        })
    }

    /// Deletes an auto-delete queue whose last consumer went, if it still has none.
    pub(crate) fn auto_delete_queue(&self, id: QueueId) -> Result<(), Failure> {
        self.update(|snap, _| {
            let Some(cell) = snap.queues.get(&id).cloned() else {
                return Ok(((), false));
            };
            let mut s = cell.lock();
            if !(cell.meta.auto_delete
                && s.core.has_had_consumers()
                && s.core.consumer_count() == 0)
            {
                return Ok(((), false));
            }
            take_for_deletion(&mut s);
            drop(s);
            remove_queue(snap, &cell.meta.name, id);
            Ok(((), true))
        })
    }

    /// Deletes the exclusive queues of a closing connection; their messages are discarded.
    pub(crate) fn delete_exclusive_queues(&self, conn: ConnectionId) -> Result<(), Failure> {
        self.update(|snap, _| {
            // By id: the owner's index is ordered so.
            let owned: Vec<_> = snap.topology.exclusive_queues(conn).cloned().collect();
            for meta in &owned {
                let cell = snap.queues[&meta.id].clone();
                take_for_deletion(&mut cell.lock());
                remove_queue(snap, &meta.name, meta.id);
            }
            Ok(((), !owned.is_empty()))
        })
    }
}

/// Why a topology change failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// RabbitMQ refuses it: the error closes the channel (or connection).
    Amqp(AmqpError),
    /// The store could not record it: nothing changed.
    Storage(StoreError),
}

impl From<AmqpError> for Failure {
    fn from(e: AmqpError) -> Self {
        Failure::Amqp(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Storage(e)
    }
}

/// Marks a locked queue deleted and cancels its consumers (their channels forget them, their
/// iterators end); returns its ready count.
fn take_for_deletion(s: &mut super::queue::QueueShared) -> u64 {
    s.deleted = true;
    let n = s.core.ready_len();
    let mut sinks: Vec<(crate::core::queue::ConsumerId, Sink)> = s.sinks.drain().collect();
    sinks.sort_by_key(|(id, _)| *id);
    server_cancel(sinks.into_iter().map(|(_, s)| s).collect());
    n
}

fn remove_queue(snap: &mut Snapshot, name: &str, id: QueueId) {
    snap.topology.remove_queue(name);
    snap.queues.remove(&id);
}

/// The queue is gone: its consumers' channels forget them and their iterators end.
fn server_cancel(sinks: Vec<Sink>) {
    for sink in sinks {
        sink.channel.state.lock().handle_cancel(&sink.tag);
    }
}

#[cfg(test)]
mod tests {
    use crate::ExchangeKind;
    use crate::runtime::Broker;
    use crate::types::{ExchangeDeclareOptions, FieldTable, QueueBindOptions, QueueDeclareOptions};
    use std::sync::Arc;

    #[test]
    fn a_declare_publishes_a_snapshot_sharing_everything_it_did_not_touch() {
        let broker = Broker::in_memory();
        let conn = broker.connect();
        let ch = conn.channel().expect("a new connection opens a channel");
        let options = ExchangeDeclareOptions::default();
        ch.exchange_declare("t", ExchangeKind::Topic, options, FieldTable::new())
            .expect("declare t");
        for i in 0..100 {
            let q = format!("q{i}");
            ch.queue_declare(&q, QueueDeclareOptions::default(), FieldTable::new())
                .expect("declare");
            ch.queue_bind(
                &q,
                "t",
                "a.#",
                QueueBindOptions::default(),
                FieldTable::new(),
            )
            .expect("bind");
        }
        let before = broker.inner.snapshot.load_full();
        ch.queue_declare("new", QueueDeclareOptions::default(), FieldTable::new())
            .expect("declare");
        let after = broker.inner.snapshot.load_full();
        assert!(
            !Arc::ptr_eq(&before, &after),
            "a new snapshot was published"
        );
        assert!(after.topology.shares_exchanges_with(&before.topology));
        let q0 = before.topology.queue("q0").expect("q0").id;
        assert!(Arc::ptr_eq(&before.queues[&q0], &after.queues[&q0]));
        assert_eq!(after.queues.len(), before.queues.len() + 1);
        broker.check_invariants().expect("invariants");
    }
}
