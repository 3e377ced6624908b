//! Broker-level policies: queue settings applied to every queue whose name matches a pattern,
//! combined with the queue's own arguments as RabbitMQ combines them
//! (<https://www.rabbitmq.com/docs/policies>). A durable broker stores them with its other
//! definitions.

use regex_lite::Regex;

use super::{Broker, BrokerInner};
use crate::core::queue::{DeadLetterStrategy, Overflow, PolicyDefinition};
use crate::error::{Error, Result};
use crate::store::{Batch, Op, PolicyRecord};
use crate::types::{FieldTable, FieldValue};

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
    /// The pattern as given.
    source: String,
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
    /// invalid name (over 255 bytes), pattern or setting is [`Error::InvalidInput`]. A durable
    /// broker stores it with the other definitions, as RabbitMQ keeps policies across a
    /// restart: the call returns once it is on stable storage (a storage failure is returned;
    /// the policy stands in memory all the same).
    pub fn set_policy(&self, name: &str, policy: Policy) -> Result<()> {
        let compiled = compile(name, policy.pattern, policy.priority, policy.definition)?;
        let record = compiled.record();
        self.inner
            .change_policies(Op::PutPolicy(record), |policies| {
                policies.retain(|p| p.name != name);
                policies.push(compiled);
                policies.sort_by(|a, b| a.name.cmp(&b.name));
            })
    }

    /// Removes policy `name` (a no-op if there is none); its queues fall back to their
    /// arguments, or to another matching policy. A durable broker removes it from the store
    /// too, and returns once that is on stable storage.
    pub fn clear_policy(&self, name: &str) -> Result<()> {
        if name.len() > POLICY_NAME_BYTES_MAX {
            return Err(name_too_long(name));
        }
        self.inner
            .change_policies(Op::DeletePolicy(name.to_owned()), |policies| {
                policies.retain(|p| p.name != name)
            })
    }
}

/// Longest policy name: it is stored under its name, as queue and exchange names are.
const POLICY_NAME_BYTES_MAX: usize = 255;

fn name_too_long(name: &str) -> Error {
    Error::InvalidInput(format!(
        "policy name is {} bytes, over the {POLICY_NAME_BYTES_MAX}-byte limit",
        name.len()
    ))
}

/// Checks and compiles a policy.
fn compile(
    name: &str,
    pattern: String,
    priority: i32,
    definition: PolicyDefinition,
) -> Result<Compiled> {
    if name.len() > POLICY_NAME_BYTES_MAX {
        return Err(name_too_long(name));
    }
    let regex = Regex::new(&pattern)
        .map_err(|e| Error::InvalidInput(format!("policy '{name}': invalid pattern: {e}")))?;
    let d = &definition;
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
    Ok(Compiled {
        name: name.to_owned(),
        source: pattern,
        pattern: regex,
        priority,
        definition,
    })
}

impl Compiled {
    /// The policy as the store keeps it.
    fn record(&self) -> PolicyRecord {
        PolicyRecord {
            name: self.name.clone(),
            pattern: self.source.clone(),
            priority: self.priority,
            definition: definition_table(&self.definition),
        }
    }

    /// A stored policy, checked as [`Broker::set_policy`] checks a new one; `Err` says what is
    /// wrong with it.
    pub(crate) fn from_record(record: PolicyRecord) -> std::result::Result<Self, String> {
        let definition = definition_from_table(&record.definition)?;
        compile(&record.name, record.pattern, record.priority, definition).map_err(|e| match e {
            Error::InvalidInput(text) => text,
            other => other.to_string(),
        })
    }
}

/// The definition under RabbitMQ's policy keys.
fn definition_table(d: &PolicyDefinition) -> FieldTable {
    let mut t = FieldTable::new();
    let mut int = |key: &str, v: Option<u64>| {
        if let Some(v) = v {
            t.insert(key, FieldValue::I64(i64::try_from(v).unwrap_or(i64::MAX)));
        }
    };
    int("message-ttl", d.message_ttl);
    int("max-length", d.max_length);
    int("max-length-bytes", d.max_length_bytes);
    int("expires", d.expires);
    if let Some(v) = d.delivery_limit {
        t.insert("delivery-limit", FieldValue::I64(v));
    }
    if let Some(v) = &d.dead_letter_exchange {
        t.insert("dead-letter-exchange", FieldValue::from(v.as_str()));
    }
    if let Some(v) = &d.dead_letter_routing_key {
        t.insert("dead-letter-routing-key", FieldValue::from(v.as_str()));
    }
    if let Some(strategy) = d.dead_letter_strategy {
        t.insert("dead-letter-strategy", FieldValue::from(strategy.name()));
    }
    if let Some(overflow) = d.overflow {
        t.insert("overflow", FieldValue::from(overflow.name()));
    }
    t
}

/// The definition a stored table gives; an unknown key or a value of the wrong type is an
/// error (a store written by a later version that knows more keys is not read half).
fn definition_from_table(t: &FieldTable) -> std::result::Result<PolicyDefinition, String> {
    let mut d = PolicyDefinition::default();
    for (key, value) in t.iter() {
        let int = || {
            value
                .as_i64()
                .ok_or_else(|| format!("policy key '{key}' is not an integer"))
        };
        let unsigned = || {
            int().and_then(|v| {
                u64::try_from(v).map_err(|_| format!("policy key '{key}' is negative"))
            })
        };
        let text = || {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("policy key '{key}' is not a string"))
        };
        match key {
            "message-ttl" => d.message_ttl = Some(unsigned()?),
            "max-length" => d.max_length = Some(unsigned()?),
            "max-length-bytes" => d.max_length_bytes = Some(unsigned()?),
            "expires" => d.expires = Some(unsigned()?),
            "delivery-limit" => d.delivery_limit = Some(int()?),
            "dead-letter-exchange" => d.dead_letter_exchange = Some(text()?),
            "dead-letter-routing-key" => d.dead_letter_routing_key = Some(text()?),
            "dead-letter-strategy" => {
                let name = text()?;
                let strategy = DeadLetterStrategy::from_name(&name)
                    .ok_or_else(|| format!("unknown dead-letter-strategy '{name}'"))?;
                d.dead_letter_strategy = Some(strategy);
            }
            "overflow" => {
                let name = text()?;
                let overflow = Overflow::from_name(&name)
                    .ok_or_else(|| format!("unknown overflow '{name}'"))?;
                d.overflow = Some(overflow);
            }
            other => return Err(format!("unknown policy key '{other}'")),
        }
    }
    Ok(d)
}

impl BrokerInner {
    /// Changes the policies under the admin lock, re-applies them to every queue, and records
    /// `op` in the store of a durable broker, returning once it is durable. The record is
    /// queued under the lock, so the store sees policy changes in the order memory does.
    fn change_policies(&self, op: Op, change: impl FnOnce(&mut Vec<Compiled>)) -> Result<()> {
        let mut admin = self.admin.lock();
        let written = self
            .persistence
            .as_ref()
            .map(|p| p.write_definitions(Batch::from(vec![op])));
        change(&mut admin.policies);
        let snap = self.snapshot.load_full();
        for cell in snap.queues.values() {
            cell.apply_policy(policy_for(&admin.policies, &cell.meta.name));
        }
        drop(admin);
        match written {
            Some(w) => Ok(w.wait()?),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every setting survives the trip through the stored table, and unknown keys are refused.
    #[test]
    fn definitions_round_trip_through_tables() {
        let d = PolicyDefinition {
            dead_letter_exchange: Some("dlx".into()),
            dead_letter_routing_key: Some("dead".into()),
            message_ttl: Some(1_000),
            max_length: Some(7),
            max_length_bytes: Some(1 << 20),
            overflow: Some(Overflow::RejectPublishDlx),
            expires: Some(60_000),
            delivery_limit: Some(-1),
            dead_letter_strategy: Some(DeadLetterStrategy::AtLeastOnce),
        };
        assert_eq!(definition_from_table(&definition_table(&d)), Ok(d));
        let empty = PolicyDefinition::default();
        assert_eq!(definition_from_table(&definition_table(&empty)), Ok(empty));
        let unknown = FieldTable::new().with("ha-mode", "all");
        assert!(definition_from_table(&unknown).is_err());
        let negative = FieldTable::new().with("message-ttl", -5i64);
        assert!(definition_from_table(&negative).is_err());
    }
}
