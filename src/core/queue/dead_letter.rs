//! Dead-lettering as RabbitMQ does it: where a dead-lettered message goes
//! (the queue's dead-letter exchange and routing key) and what it becomes (`x-death` history,
//! `x-first-death-*` and `x-last-death-*` headers, no `expiration`), and the cycle rule that
//! drops a message looping without a rejection.
//!
//! Pure functions of a message; the runtime routes the result.

use bytes::Bytes;

use crate::types::{FieldTable, FieldValue, Message};

/// Why a message was dead-lettered (the `reason` of its `x-death` entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeathReason {
    /// `basic.reject` / `basic.nack` without requeue.
    Rejected,
    /// Its TTL elapsed.
    Expired,
    /// Dropped by a length limit.
    Maxlen,
    /// Returned more often than the queue's delivery limit allows.
    DeliveryLimit,
}

impl DeathReason {
    /// The reason as written in `x-death`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::Maxlen => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
        }
    }

    /// The reason named `name` as in `x-death`, if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        [
            DeathReason::Rejected,
            DeathReason::Expired,
            DeathReason::Maxlen,
            DeathReason::DeliveryLimit,
        ]
        .into_iter()
        .find(|r| r.as_str() == name)
    }
}

/// Where a queue's dead letters go: `x-dead-letter-exchange` and `x-dead-letter-routing-key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterTarget {
    /// The dead-letter exchange (`""` = the default exchange).
    pub exchange: String,
    /// Replaces the message's routing keys when set.
    pub routing_key: Option<String>,
}

impl DeadLetterTarget {
    /// The target of a queue with `arguments` under a policy's dead-letter exchange and routing
    /// key: each argument overrides the policy's value.
    pub fn resolve(
        arguments: &FieldTable,
        policy_exchange: Option<&str>,
        policy_routing_key: Option<&str>,
    ) -> Option<Self> {
        let arg = |key: &str| arguments.get(key).and_then(FieldValue::as_str);
        let exchange = arg("x-dead-letter-exchange")
            .or(policy_exchange)?
            .to_owned();
        let routing_key = arg("x-dead-letter-routing-key")
            .or(policy_routing_key)
            .map(str::to_owned);
        Some(Self {
            exchange,
            routing_key,
        })
    }
}

/// A message on its way to the dead-letter exchange.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLettered {
    /// The message as it will be routed (exchange = the DLX, routing key = the first key).
    pub message: Message,
    /// The keys to route it with.
    pub routing_keys: Vec<String>,
}

/// Dead-letters `message` from `queue` for `reason` at `now_ms`.
pub fn dead_letter(
    message: &Message,
    queue: &str,
    reason: DeathReason,
    now_ms: u64,
    target: &DeadLetterTarget,
) -> DeadLettered {
    let mut properties = message.properties.clone();
    let mut headers = properties.headers.take().unwrap_or_default();
    let keys_at_death = message_keys(message, &headers);
    // Only the broker's own history counts: a client-supplied x-death starts over (§5.4).
    let mut deaths = if message.dead_lettered {
        death_entries(&headers)
    } else {
        Vec::new()
    };
    let existing = deaths.iter().position(|d| entry_is(d, queue, reason));
    let entry = match existing {
        Some(i) => {
            let mut entry = deaths.remove(i);
            let count = entry.get("count").and_then(FieldValue::as_i64).unwrap_or(0);
            entry.insert("count", count.saturating_add(1));
            entry
        }
        None => {
            let mut entry = FieldTable::new();
            if let Some(expiration) = &properties.expiration {
                entry.insert("original-expiration", expiration.as_str());
            }
            entry.insert("count", 1i64);
            entry.insert("reason", reason.as_str());
            entry.insert("queue", queue);
            entry.insert("time", FieldValue::Timestamp(now_ms / 1000));
            entry.insert("exchange", &*message.exchange);
            let keys = keys_at_death
                .iter()
                .map(|k| FieldValue::from(k.as_str()))
                .collect::<Vec<_>>();
            entry.insert("routing-keys", keys);
            entry
        }
    };
    deaths.insert(0, entry);
    headers.insert(
        "x-death",
        deaths
            .into_iter()
            .map(FieldValue::Table)
            .collect::<Vec<_>>(),
    );
    if !message.dead_lettered || !headers.contains_key("x-first-death-queue") {
        headers.insert("x-first-death-queue", queue);
        headers.insert("x-first-death-reason", reason.as_str());
        headers.insert("x-first-death-exchange", &*message.exchange);
    }
    headers.insert("x-last-death-queue", queue);
    headers.insert("x-last-death-reason", reason.as_str());
    headers.insert("x-last-death-exchange", &*message.exchange);
    properties.headers = Some(headers);
    properties.expiration = None;
    // With no dead-letter routing key, all the keys it was published with route it, `BCC`
    // included (removed from the headers, not from routing), and it keeps them for a next
    // dead-lettering; a dead-letter routing key replaces them all.
    let (routing_keys, bcc) = match &target.routing_key {
        Some(k) => (vec![k.clone()], Vec::new()),
        None => {
            let mut keys = keys_at_death;
            keys.extend(message.bcc.iter().cloned());
            (keys, message.bcc.clone())
        }
    };
    let first = routing_keys.first().cloned().unwrap_or_default();
    DeadLettered {
        message: Message {
            exchange: target.exchange.as_str().into(),
            routing_key: first.into(),
            properties,
            body: Bytes::clone(&message.body),
            dead_lettered: true,
            bcc,
        },
        routing_keys,
    }
}

/// Whether a message dead-lettered for `reason` must be dropped instead of entering `target`
/// (RabbitMQ's cycle detection): only for `expired`, `maxlen` and `delivery_limit`, and only if the history from its
/// newest death back to its most recent death in `target` holds no rejection.
pub fn is_cycle(message: &Message, target: &str, reason: DeathReason) -> bool {
    if reason == DeathReason::Rejected {
        return false;
    }
    let Some(headers) = &message.properties.headers else {
        return false;
    };
    let deaths = death_entries(headers);
    let Some(last_in_target) = deaths.iter().position(|d| text(d, "queue") == Some(target)) else {
        return false;
    };
    !deaths[..=last_in_target]
        .iter()
        .any(|d| text(d, "reason") == Some("rejected"))
}

/// The routing keys a message had: its routing key, then the `CC` keys (`BCC` was removed at
/// publish).
fn message_keys(message: &Message, headers: &FieldTable) -> Vec<String> {
    let mut keys = vec![message.routing_key.to_string()];
    if let Some(FieldValue::Array(cc)) = headers.get("CC") {
        keys.extend(cc.iter().filter_map(FieldValue::as_str).map(str::to_owned));
    }
    keys
}

fn death_entries(headers: &FieldTable) -> Vec<FieldTable> {
    match headers.get("x-death") {
        Some(FieldValue::Array(items)) => items
            .iter()
            .filter_map(|v| match v {
                FieldValue::Table(t) => Some(t.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn entry_is(entry: &FieldTable, queue: &str, reason: DeathReason) -> bool {
    text(entry, "queue") == Some(queue) && text(entry, "reason") == Some(reason.as_str())
}

fn text<'a>(table: &'a FieldTable, key: &str) -> Option<&'a str> {
    table.get(key).and_then(FieldValue::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::BasicProperties;

    fn message(exchange: &str, key: &str, properties: BasicProperties) -> Message {
        Message {
            exchange: exchange.into(),
            routing_key: key.into(),
            properties,
            body: Bytes::from_static(b"m"),
            dead_lettered: false,
            bcc: Vec::new(),
        }
    }

    fn dlx(exchange: &str, key: Option<&str>) -> DeadLetterTarget {
        DeadLetterTarget {
            exchange: exchange.into(),
            routing_key: key.map(str::to_owned),
        }
    }

    fn deaths(m: &Message) -> Vec<FieldTable> {
        death_entries(m.properties.headers.as_ref().unwrap())
    }

    fn header<'a>(m: &'a Message, key: &str) -> Option<&'a str> {
        m.properties
            .headers
            .as_ref()
            .unwrap()
            .get(key)
            .and_then(FieldValue::as_str)
    }

    /// As in RabbitMQ's `dead_letter_headers`: the fields of a first death, and the expiration moved.
    #[test]
    fn a_first_death_records_everything() {
        let cc = FieldTable::new().with("CC", vec![FieldValue::from("cc1")]);
        let props = BasicProperties::default()
            .with_expiration("5000")
            .with_headers(cc);
        let m = message("orders", "order.new", props);
        let out = dead_letter(
            &m,
            "work",
            DeathReason::Rejected,
            1_700_000_123_456,
            &dlx("dlx", None),
        );
        assert_eq!(&*out.message.exchange, "dlx");
        assert_eq!(
            out.routing_keys,
            ["order.new", "cc1"],
            "no DLRK: the original keys, CC included"
        );
        assert_eq!(out.message.properties.expiration, None);
        let d = deaths(&out.message);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].get("count"), Some(&FieldValue::I64(1)));
        assert_eq!(text(&d[0], "reason"), Some("rejected"));
        assert_eq!(text(&d[0], "queue"), Some("work"));
        assert_eq!(
            d[0].get("time"),
            Some(&FieldValue::Timestamp(1_700_000_123))
        );
        assert_eq!(text(&d[0], "exchange"), Some("orders"));
        assert_eq!(text(&d[0], "original-expiration"), Some("5000"));
        assert_eq!(
            d[0].get("routing-keys"),
            Some(&FieldValue::Array(vec!["order.new".into(), "cc1".into()]))
        );
        assert_eq!(
            header(&out.message, "x-first-death-reason"),
            Some("rejected")
        );
        assert_eq!(header(&out.message, "x-last-death-queue"), Some("work"));
        assert!(
            out.message
                .properties
                .headers
                .as_ref()
                .unwrap()
                .contains_key("CC"),
            "CC kept"
        );
    }

    /// As in RabbitMQ's `dead_letter_headers_cycle`, `..._should_be_appended_for_each_event`
    /// and `..._first_death`: a repeat increments and moves to the front keeping its first
    /// values; a new pair is prepended; first-death headers never change.
    #[test]
    fn history_counts_repeats_and_keeps_the_first_death() {
        let m = message("", "work", BasicProperties::default());
        let once = dead_letter(
            &m,
            "work",
            DeathReason::Rejected,
            1_000,
            &dlx("", Some("work.retry")),
        );
        assert_eq!(
            once.routing_keys,
            ["work.retry"],
            "the DLRK replaces the keys"
        );
        let expired = dead_letter(
            &once.message,
            "work.retry",
            DeathReason::Expired,
            6_000,
            &dlx("", Some("work")),
        );
        let twice = dead_letter(
            &expired.message,
            "work",
            DeathReason::Rejected,
            9_000,
            &dlx("", Some("work.retry")),
        );
        let d = deaths(&twice.message);
        assert_eq!(d.len(), 2);
        assert_eq!(
            (text(&d[0], "queue"), d[0].get("count")),
            (Some("work"), Some(&FieldValue::I64(2)))
        );
        assert_eq!(
            d[0].get("time"),
            Some(&FieldValue::Timestamp(1)),
            "time of the first such death"
        );
        assert_eq!(
            text(&d[0], "exchange"),
            Some(""),
            "exchange at the first such death"
        );
        assert_eq!(
            (text(&d[1], "queue"), text(&d[1], "reason")),
            (Some("work.retry"), Some("expired"))
        );
        assert_eq!(header(&twice.message, "x-first-death-queue"), Some("work"));
        assert_eq!(
            header(&twice.message, "x-first-death-reason"),
            Some("rejected")
        );
        assert_eq!(
            header(&twice.message, "x-last-death-reason"),
            Some("rejected")
        );
        assert_eq!(
            header(&expired.message, "x-last-death-reason"),
            Some("expired")
        );
    }

    /// An expiry loop back into the same queue is a cycle; a loop through a rejection is
    /// not; a rejection itself never is.
    #[test]
    fn cycles_are_loops_without_a_rejection() {
        let m = message("", "q", BasicProperties::default());
        let expired = dead_letter(&m, "q", DeathReason::Expired, 0, &dlx("", None));
        assert!(is_cycle(&expired.message, "q", DeathReason::Expired));
        assert!(!is_cycle(&expired.message, "other", DeathReason::Expired));
        let rejected = dead_letter(&m, "w", DeathReason::Rejected, 0, &dlx("", Some("w.retry")));
        let back = dead_letter(
            &rejected.message,
            "w.retry",
            DeathReason::Expired,
            0,
            &dlx("", Some("w")),
        );
        assert!(
            !is_cycle(&back.message, "w", DeathReason::Expired),
            "the loop holds a rejection"
        );
        assert!(!is_cycle(&rejected.message, "w", DeathReason::Rejected));
    }

    #[test]
    fn the_target_comes_from_the_arguments() {
        let args = FieldTable::new()
            .with("x-dead-letter-exchange", "dlx")
            .with("x-dead-letter-routing-key", "k");
        assert_eq!(
            DeadLetterTarget::resolve(&args, None, None),
            Some(dlx("dlx", Some("k")))
        );
        assert_eq!(
            DeadLetterTarget::resolve(&FieldTable::new(), None, None),
            None
        );
    }
}
