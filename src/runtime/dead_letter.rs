//! Routing dead letters (SEMANTICS.md §5.3): a message a queue removed for a dead-letter reason
//! is republished through the queue's dead-letter exchange, without `mandatory` or confirms;
//! for a persistent message its removal and its new records are one atomic batch.

use std::sync::Arc;

use smallvec::SmallVec;

use super::BrokerInner;
use super::persist::Job;
use super::queue::QueueCell;
use crate::core::queue::Entry;
use crate::core::queue::dead_letter::{DeadLetterTarget, DeathReason, dead_letter, is_cycle};
use crate::core::topology::Targets;

impl BrokerInner {
    /// Dead-letters `entry`, removed from `source` for `reason`. A missing dead-letter exchange,
    /// no route, or a cycle without a rejection (§5.5) drops it.
    pub(crate) fn dead_letter(
        &self,
        source: &QueueCell,
        target: &DeadLetterTarget,
        entry: Entry,
        reason: DeathReason,
    ) {
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
        let routed: SmallVec<[&Arc<QueueCell>; 4]> =
            targets.iter().filter_map(|q| snap.queues.get(q)).collect();
        let cells: SmallVec<[&Arc<QueueCell>; 4]> = routed
            .iter()
            .copied()
            .filter(|c| !is_cycle(&out.message, &c.meta.name, reason))
            .collect();
        if cells.is_empty() {
            let why = if routed.is_empty() {
                "dead-letter exchange missing or no route"
            } else {
                "dead-letter cycle"
            };
            source.dropped(&entry, reason, why);
            return;
        }
        source.deaths.count(reason, true);
        tracing::info!(
            queue = &*source.meta.name,
            reason = reason.as_str(),
            message_id = entry.message.properties.message_id.as_deref().unwrap_or(""),
            dead_letter_exchange = target.exchange.as_str(),
            "message dead-lettered"
        );
        let message = Arc::new(out.message);
        let placed: SmallVec<[(&Arc<QueueCell>, u64); 4]> =
            cells.iter().map(|c| (*c, c.reserve_seq())).collect();
        let persistent = message.properties.is_persistent();
        let now = if persistent || cells.iter().any(|c| c.timed()) {
            now
        } else {
            0
        };
        if let Some(p) = &self.persistence {
            let remove = (source.has_store() && entry.message.properties.is_persistent())
                .then_some((source.meta.id.0, entry.seq));
            let puts: SmallVec<[(u64, u64); 1]> = placed
                .iter()
                .filter(|(c, _)| persistent && c.has_store())
                .map(|(c, seq)| (c.meta.id.0, *seq))
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
        // The expiration property is gone (§5.3): only the target's own TTL applies.
        for (cell, seq) in placed {
            cell.publish(cell.entry(seq, message.clone(), now, None));
        }
    }
}
