//! Routing dead letters: a message a queue removed for a dead-letter reason is republished
//! through the queue's dead-letter exchange, without `mandatory` or confirms; for a persistent
//! message its removal and its new records are one atomic batch.
//!
//! At-most-once (every classic queue, and quorum queues by default): a missing exchange, no
//! route, or a cycle without a rejection drops it; a target that refuses it (a length limit
//! with `reject-publish`) loses it. At-least-once (a quorum queue with
//! `x-dead-letter-strategy: at-least-once` and `x-overflow: reject-publish`): it leaves its
//! source only once every target queue has it; until then the source holds it (counting
//! toward its length limits) and tries again after [`Limits::dead_letter_retry_ms`]
//! (crate::Limits::dead_letter_retry_ms), sending it only to the targets that do not have it
//! yet. A missing exchange, no route, a cycle and a refusal all keep it held, as in RabbitMQ
//! (<https://www.rabbitmq.com/docs/quorum-queues#dead-lettering>).

use std::sync::Arc;

use smallvec::SmallVec;

use super::BrokerInner;
use super::persist::Job;
use super::queue::{DeadLetter, QueueCell, QueueGuard};
use crate::core::queue::dead_letter::{DeadLetterTarget, dead_letter, is_cycle};
use crate::core::topology::Targets;
use crate::sim::trace::Event;

/// A target that takes the dead letter: its cell, the sequence number reserved there, and its
/// lock when it decided under it.
type Placed<'a> = (&'a Arc<QueueCell>, u64, Option<QueueGuard<'a>>);

impl BrokerInner {
    /// Dead-letters `dead`, removed from `source`. Returns it (with the targets it reached
    /// added) when it must be held for another attempt, which happens only `at_least_once`.
    pub(crate) fn dead_letter(
        &self,
        source: &QueueCell,
        target: &DeadLetterTarget,
        mut dead: DeadLetter,
        at_least_once: bool,
    ) -> Option<DeadLetter> {
        let (entry, reason) = (&dead.entry, dead.reason);
        let snap = self.snapshot.load();
        let now = self.clock.now_ms();
        let out = dead_letter(&entry.message, &source.meta.name, reason, now, target);
        let mut targets = Targets::new();
        if let Some(exchange) = snap.topology.exchange(&target.exchange) {
            let keys: SmallVec<[&str; 1]> = out.routing_keys.iter().map(String::as_str).collect();
            snap.topology.route(
                exchange,
                &keys,
                out.message.properties.headers.as_ref(),
                &mut targets,
            );
        }
        let routed: SmallVec<[&Arc<QueueCell>; 4]> = targets
            .iter()
            .filter(|q| !dead.delivered.contains(q))
            .filter_map(|q| snap.queues.get(q))
            .collect();
        let cells: SmallVec<[&Arc<QueueCell>; 4]> = routed
            .iter()
            .copied()
            .filter(|c| !is_cycle(&out.message, &c.meta.name, reason))
            .collect();
        let cycles = routed.len() - cells.len();
        if cells.is_empty() {
            if at_least_once && (targets.is_empty() || cycles > 0) {
                return Some(dead); // no route (yet), or only a cycle: held and retried
            }
            if !at_least_once {
                let why = if routed.is_empty() {
                    "dead-letter exchange missing or no route"
                } else {
                    "dead-letter cycle"
                };
                source.dropped(entry, reason, why);
                return None;
            }
        }
        let message = Arc::new(out.message);
        let persistent = message.properties.is_persistent();
        let now = if persistent || cells.iter().any(|c| c.timed()) {
            now
        } else {
            0
        };
        // At-least-once, a target that would refuse it (a length limit with reject-publish)
        // does not get it now; the others do. Such targets decide under their locks (taken in
        // id order, as a publish takes them) and are published to before the locks go, so
        // nothing slips in between.
        let mut cells = cells;
        cells.sort_by_key(|c| c.meta.id);
        let size = message.body_size();
        let mut placed: SmallVec<[Placed<'_>; 4]> = SmallVec::new();
        let mut refused = 0;
        for cell in cells {
            if at_least_once && cell.refuses_publishes() {
                let g = cell.lock();
                if g.deleted || g.core.would_overflow(size) {
                    refused += 1;
                    continue;
                }
                placed.push((cell, cell.reserve_seq(), Some(g)));
            } else {
                placed.push((cell, cell.reserve_seq(), None));
            }
        }
        let done = cycles == 0 && refused == 0;
        if done {
            source.deaths.count(reason, true);
            tracing::info!(
                queue = &*source.meta.name,
                reason = reason.as_str(),
                message_id = entry.message.properties.message_id.as_deref().unwrap_or(""),
                dead_letter_exchange = target.exchange.as_str(),
                "message dead-lettered"
            );
        }
        if let Some(p) = &self.persistence {
            let remove = (done && source.has_store() && entry.message.properties.is_persistent())
                .then_some((source.meta.id.0, entry.seq));
            let puts: SmallVec<[(u64, u64); 1]> = placed
                .iter()
                .filter(|(c, _, _)| persistent && c.has_store())
                .map(|(c, seq, _)| (c.meta.id.0, *seq))
                .collect();
            if remove.is_some() || !puts.is_empty() {
                // One job: the source's record goes and the new ones come in one batch.
                p.send(Job::Move {
                    remove,
                    message: message.clone(),
                    targets: puts,
                    enqueued_at_ms: now,
                });
            }
        }
        if let Some(trace) = &self.trace {
            trace.record(Event::Route {
                queues: placed
                    .iter()
                    .map(|(c, _, _)| c.meta.name.to_string())
                    .collect(),
            });
        }
        // The expiration property is gone: only the target's own TTL applies.
        for (cell, seq, guard) in placed {
            cell.trace(|queue| Event::Enqueue {
                queue: queue.into(),
                seq,
            });
            dead.delivered.push(cell.meta.id);
            let entry = cell.entry(seq, message.clone(), now, None);
            match guard {
                Some(mut g) => {
                    g.core.handle_publish(entry);
                    cell.dispatch(&mut g);
                }
                None => cell.publish(entry),
            }
        }
        (!done).then_some(dead)
    }
}
