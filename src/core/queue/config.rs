//! What a queue's arguments (and a policy, where one applies) make of it: its type, TTL,
//! length limits and delivery limit (SEMANTICS.md §6, §7).
//!
//! Message priorities (`x-max-priority`) and single active consumer come from the arguments
//! alone: RabbitMQ's policies cannot set them.

use crate::types::FieldTable;

/// A queue's type (`x-queue-type`): the semantics it follows on this one engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueKind {
    /// Classic queue: requeue to the original position, no delivery limit.
    #[default]
    Classic,
    /// Quorum queue: durable only, requeue to the front, a delivery limit (default 20) and the
    /// `x-delivery-count` header.
    Quorum,
}

/// What happens when a publish would take a queue over a length limit (`x-overflow`, §7.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Accept, then drop (or dead-letter with `maxlen`) the oldest ready messages.
    #[default]
    DropHead,
    /// Refuse the new message: nacked under confirms, dropped silently otherwise.
    RejectPublish,
    /// As `RejectPublish`, and the refused message is dead-lettered with `maxlen` (classic).
    RejectPublishDlx,
}

/// How a quorum queue dead-letters (`x-dead-letter-strategy`, policy `dead-letter-strategy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeadLetterStrategy {
    /// Republished once, without confirms: lost if the dead-letter exchange is missing, routes
    /// nowhere or a target refuses it (every classic queue, and the default).
    #[default]
    AtMostOnce,
    /// Kept in the source queue (counting toward its length limits) until every target queue
    /// has it, retried periodically. Only with `x-overflow: reject-publish`; with any other
    /// overflow mode RabbitMQ falls back to at-most-once, and so does coney.
    AtLeastOnce,
}

impl Overflow {
    /// The mode named `name` as RabbitMQ names it (`x-overflow`, policy `overflow`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "drop-head" => Some(Self::DropHead),
            "reject-publish" => Some(Self::RejectPublish),
            "reject-publish-dlx" => Some(Self::RejectPublishDlx),
            _ => None,
        }
    }

    /// RabbitMQ's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            Self::DropHead => "drop-head",
            Self::RejectPublish => "reject-publish",
            Self::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

impl DeadLetterStrategy {
    /// The strategy named `name` as RabbitMQ names it (`x-dead-letter-strategy`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "at-most-once" => Some(Self::AtMostOnce),
            "at-least-once" => Some(Self::AtLeastOnce),
            _ => None,
        }
    }

    /// RabbitMQ's name of the strategy.
    pub fn name(self) -> &'static str {
        match self {
            Self::AtMostOnce => "at-most-once",
            Self::AtLeastOnce => "at-least-once",
        }
    }
}

/// The delivery limit quorum queues get when none is set (RabbitMQ 4.0 and later).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

/// Everything about a queue's behaviour that its arguments decide. Built once per queue; the
/// arguments were validated when the queue was declared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Its type.
    pub kind: QueueKind,
    /// `x-message-ttl`, in milliseconds.
    pub message_ttl: Option<u64>,
    /// `x-max-length`: ready messages.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`: body bytes of ready messages.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// Returns after which a message is dead-lettered (quorum queues; `None` = unlimited).
    pub delivery_limit: Option<u32>,
    /// `x-expires`: the queue is deleted after this many milliseconds unused.
    pub expires: Option<u64>,
    /// Whether dead letters are at-least-once: a quorum queue asking for it with
    /// `x-overflow: reject-publish` (otherwise at-most-once, as RabbitMQ falls back).
    pub at_least_once: bool,
    /// `x-max-priority` (classic queues, arguments only): the highest message priority the
    /// queue tells apart; `None` or 0 is a plain FIFO. Quorum queues always have their two
    /// priority levels and take no such argument.
    pub max_priority: Option<u8>,
    /// `x-single-active-consumer` (arguments only): one consumer receives at a time.
    pub single_active_consumer: bool,
}

/// The queue settings a broker-level policy can give every queue whose name matches its
/// pattern (RabbitMQ policy keys in brackets). Queue arguments and policy combine as RabbitMQ
/// combines them: see [`QueueConfig::resolve`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDefinition {
    /// `dead-letter-exchange`.
    pub dead_letter_exchange: Option<String>,
    /// `dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
    /// `message-ttl`, milliseconds.
    pub message_ttl: Option<u64>,
    /// `max-length`, messages.
    pub max_length: Option<u64>,
    /// `max-length-bytes`.
    pub max_length_bytes: Option<u64>,
    /// `overflow`.
    pub overflow: Option<Overflow>,
    /// `expires`, milliseconds (positive).
    pub expires: Option<u64>,
    /// `delivery-limit` (quorum queues; negative = unlimited).
    pub delivery_limit: Option<i64>,
    /// `dead-letter-strategy` (quorum queues).
    pub dead_letter_strategy: Option<DeadLetterStrategy>,
}

impl QueueConfig {
    /// The configuration declared by `arguments` (already validated; anything unreadable is
    /// taken as absent).
    pub fn from_arguments(arguments: &FieldTable) -> Self {
        Self::resolve(arguments, None)
    }

    /// The configuration of a queue with `arguments` under `policy` (§5.1, §6.1, §7): TTLs,
    /// length limits and `expires` take the lower of the two; the overflow mode of the
    /// arguments wins on a classic queue and the policy's on a quorum queue; delivery limits
    /// take the lower, or the higher if either is negative.
    pub fn resolve(arguments: &FieldTable, policy: Option<&PolicyDefinition>) -> Self {
        let arg = |key: &str| arguments.get(key).and_then(|v| v.as_i64());
        let non_negative = |key: &str| arg(key).and_then(|v| u64::try_from(v).ok());
        let lower = |a: Option<u64>, p: Option<u64>| match (a, p) {
            (Some(a), Some(p)) => Some(a.min(p)),
            (a, p) => a.or(p),
        };
        let p = policy.cloned().unwrap_or_default();
        let kind = match arguments.get("x-queue-type").and_then(|v| v.as_str()) {
            Some("quorum") => QueueKind::Quorum,
            _ => QueueKind::Classic,
        };
        let arg_overflow = arguments
            .get("x-overflow")
            .and_then(|v| v.as_str())
            .and_then(Overflow::from_name);
        let overflow = match kind {
            QueueKind::Classic => arg_overflow.or(p.overflow),
            QueueKind::Quorum => p.overflow.or(arg_overflow),
        };
        let overflow = match overflow.unwrap_or_default() {
            // Quorum queues take reject-publish-dlx as drop-head (§5.6).
            Overflow::RejectPublishDlx if kind == QueueKind::Quorum => Overflow::DropHead,
            o => o,
        };
        let delivery_limit = match kind {
            QueueKind::Classic => None,
            QueueKind::Quorum => {
                let limit = match (arg("x-delivery-limit"), p.delivery_limit) {
                    (Some(a), Some(p)) if a < 0 || p < 0 => Some(a.max(p)),
                    (Some(a), Some(p)) => Some(a.min(p)),
                    (a, p) => a.or(p),
                };
                match limit {
                    None => Some(DEFAULT_DELIVERY_LIMIT),
                    Some(v) if v < 0 => None, // negative disables (§6.1)
                    Some(v) => Some(u32::try_from(v).unwrap_or(u32::MAX)),
                }
            }
        };
        // The argument wins over the policy, as for the dead-letter exchange
        // (`queue_arg_has_precedence` in rabbit_quorum_queue's dead-letter handler).
        let strategy = arguments
            .get("x-dead-letter-strategy")
            .and_then(|v| v.as_str())
            .and_then(DeadLetterStrategy::from_name)
            .or(p.dead_letter_strategy);
        let at_least_once = kind == QueueKind::Quorum
            && strategy == Some(DeadLetterStrategy::AtLeastOnce)
            && overflow == Overflow::RejectPublish;
        Self {
            kind,
            at_least_once,
            message_ttl: lower(non_negative("x-message-ttl"), p.message_ttl),
            max_length: lower(non_negative("x-max-length"), p.max_length),
            max_length_bytes: lower(non_negative("x-max-length-bytes"), p.max_length_bytes),
            overflow,
            delivery_limit,
            expires: lower(non_negative("x-expires"), p.expires),
            max_priority: match kind {
                QueueKind::Classic => arg("x-max-priority").and_then(|v| u8::try_from(v).ok()),
                QueueKind::Quorum => None,
            },
            single_active_consumer: arguments
                .get("x-single-active-consumer")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        }
    }

    /// Whether a publish may be refused (a length limit with a reject overflow mode): the
    /// publisher must then learn the outcome before its confirm.
    pub fn refuses_publishes(&self) -> bool {
        self.overflow != Overflow::DropHead
            && (self.max_length.is_some() || self.max_length_bytes.is_some())
    }

    /// Whether a client's requeue (nack/reject with requeue, `basic.recover`) re-appends the
    /// message at the tail instead of returning it to the front: quorum queues without a
    /// delivery limit, in RabbitMQ 4.0-4.2 ([`RequeueTo::Tail`](super::RequeueTo::Tail)).
    pub fn requeues_to_tail(&self) -> bool {
        self.kind == QueueKind::Quorum && self.delivery_limit.is_none()
    }

    /// Whether the queue has a length limit at all.
    pub fn has_length_limit(&self) -> bool {
        self.max_length.is_some() || self.max_length_bytes.is_some()
    }

    /// The deadline of a message entering the queue at `now_ms` with the given per-message
    /// TTL (the `expiration` property): the lower of the two TTLs applies (§7.1); `None` if
    /// neither is set.
    pub fn deadline(&self, now_ms: u64, message_ttl: Option<u64>) -> Option<u64> {
        let ttl = match (self.message_ttl, message_ttl) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(now_ms.saturating_add(ttl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SEMANTICS.md §6.1: quorum queues default to a delivery limit of 20; a negative limit
    /// disables it; classic queues have none.
    #[test]
    fn delivery_limit_defaults() {
        let quorum = FieldTable::new().with("x-queue-type", "quorum");
        assert_eq!(
            QueueConfig::from_arguments(&quorum).delivery_limit,
            Some(20)
        );
        let three = quorum.clone().with("x-delivery-limit", 3i32);
        assert_eq!(QueueConfig::from_arguments(&three).delivery_limit, Some(3));
        let off = quorum.with("x-delivery-limit", -1i64);
        assert_eq!(QueueConfig::from_arguments(&off).delivery_limit, None);
        assert_eq!(
            QueueConfig::from_arguments(&FieldTable::new()).delivery_limit,
            None
        );
    }

    /// SEMANTICS.md §7.1: the lower of queue and message TTL applies.
    #[test]
    fn deadline_takes_the_lower_ttl() {
        let c = QueueConfig::from_arguments(&FieldTable::new().with("x-message-ttl", 1000i32));
        assert_eq!(c.deadline(50, None), Some(1050));
        assert_eq!(c.deadline(50, Some(10)), Some(60));
        assert_eq!(c.deadline(50, Some(5000)), Some(1050));
        assert_eq!(QueueConfig::default().deadline(50, None), None);
        assert_eq!(QueueConfig::default().deadline(50, Some(0)), Some(50));
    }

    /// SEMANTICS.md §6.1, §7.1, §7.3: how arguments and a policy combine.
    #[test]
    fn arguments_and_policy_combine() {
        let args = FieldTable::new()
            .with("x-message-ttl", 1000i32)
            .with("x-overflow", "reject-publish");
        let policy = PolicyDefinition {
            message_ttl: Some(500),
            max_length: Some(7),
            overflow: Some(Overflow::DropHead),
            ..Default::default()
        };
        let c = QueueConfig::resolve(&args, Some(&policy));
        assert_eq!(c.message_ttl, Some(500), "the lower TTL");
        assert_eq!(c.max_length, Some(7), "policy alone");
        assert_eq!(
            c.overflow,
            Overflow::RejectPublish,
            "classic: the argument wins"
        );
        let quorum = args
            .with("x-queue-type", "quorum")
            .with("x-delivery-limit", 5i32);
        let policy = PolicyDefinition {
            overflow: Some(Overflow::DropHead),
            delivery_limit: Some(3),
            ..Default::default()
        };
        let c = QueueConfig::resolve(&quorum, Some(&policy));
        assert_eq!(c.overflow, Overflow::DropHead, "quorum: the policy wins");
        assert_eq!(c.delivery_limit, Some(3), "the lower limit");
        let unlimited = PolicyDefinition {
            delivery_limit: Some(-1),
            ..Default::default()
        };
        let c = QueueConfig::resolve(&quorum, Some(&unlimited));
        assert_eq!(
            c.delivery_limit,
            Some(5),
            "with a negative one the higher applies (resolve_delivery_limit)"
        );
    }

    /// SEMANTICS.md §5.6: quorum queues treat reject-publish-dlx as drop-head.
    #[test]
    fn quorum_reject_publish_dlx_is_drop_head() {
        let args = FieldTable::new()
            .with("x-queue-type", "quorum")
            .with("x-overflow", "reject-publish-dlx")
            .with("x-max-length", 1i32);
        let c = QueueConfig::from_arguments(&args);
        assert_eq!(c.overflow, Overflow::DropHead);
        assert!(!c.refuses_publishes());
    }
}
