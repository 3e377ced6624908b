//! Broker-level policies (SEMANTICS.md §5.1, §6.1, §7): queue settings applied to every queue
//! whose name matches a pattern, combined with the queue's own arguments.

use regex_lite::Regex;

use super::{Broker, BrokerInner};
use crate::core::queue::PolicyDefinition;
use crate::error::{Error, Result};

/// A policy: the settings in `definition` apply to every queue whose name matches `pattern`
/// (a regular expression, unanchored as in RabbitMQ: use `^...$` for a whole name). Where
/// several policies match a queue, the one with the highest `priority` applies (on a tie, the
/// first in name order), and only that one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The queue-name pattern.
    pub pattern: String,
    /// Higher wins.
    pub priority: i32,
    /// The settings.
    pub definition: PolicyDefinition,
}

/// A policy with its compiled pattern, held by the broker.
pub(crate) struct Compiled {
    name: String,
    pattern: Regex,
    priority: i32,
    definition: PolicyDefinition,
}

/// The policy that applies to queue `name`, if any.
pub(crate) fn policy_for<'a>(policies: &'a [Compiled], name: &str) -> Option<&'a PolicyDefinition> {
    policies
        .iter()
        .filter(|p| p.pattern.is_match(name))
        .max_by(|a, b| a.priority.cmp(&b.priority).then(b.name.cmp(&a.name)))
        .map(|p| &p.definition)
}

impl Broker {
    /// Sets (or replaces) policy `name` and applies it to the matching queues at once. An
    /// invalid pattern or setting is [`Error::InvalidInput`]. Policies live in memory only:
    /// a durable broker must be given them again after it is opened.
    pub fn set_policy(&self, name: &str, policy: Policy) -> Result<()> {
        let pattern = Regex::new(&policy.pattern)
            .map_err(|e| Error::InvalidInput(format!("policy '{name}': invalid pattern: {e}")))?;
        let d = &policy.definition;
        if d.expires == Some(0) {
            return Err(Error::InvalidInput(format!(
                "policy '{name}': expires must be positive"
            )));
        }
        if d.dead_letter_routing_key.is_some() && d.dead_letter_exchange.is_none() {
            return Err(Error::InvalidInput(format!(
                "policy '{name}': dead-letter-routing-key needs dead-letter-exchange"
            )));
        }
        let compiled = Compiled {
            name: name.to_owned(),
            pattern,
            priority: policy.priority,
            definition: policy.definition,
        };
        self.inner.change_policies(|policies| {
            policies.retain(|p| p.name != name);
            policies.push(compiled);
            policies.sort_by(|a, b| a.name.cmp(&b.name));
        });
        Ok(())
    }

    /// Removes policy `name` (a no-op if there is none); its queues fall back to their
    /// arguments, or to another matching policy.
    pub fn clear_policy(&self, name: &str) {
        self.inner
            .change_policies(|policies| policies.retain(|p| p.name != name));
    }
}

impl BrokerInner {
    /// Changes the policies under the admin lock and re-applies them to every queue.
    fn change_policies(&self, change: impl FnOnce(&mut Vec<Compiled>)) {
        let mut admin = self.admin.lock();
        change(&mut admin.policies);
        let snap = self.snapshot.load_full();
        for cell in snap.queues.values() {
            cell.apply_policy(policy_for(&admin.policies, &cell.meta.name));
        }
    }
}
