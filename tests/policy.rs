//! Broker-level policies (SEMANTICS.md §5.1, §6.1, §7.1, §7.3): settings for every queue whose
//! name matches a pattern, combined with its arguments.

mod common;

use common::*;
use coney::*;

fn dlx_policy(pattern: &str, routing_key: &str) -> Policy {
    Policy {
        pattern: pattern.into(),
        priority: 0,
        definition: PolicyDefinition {
            dead_letter_exchange: Some(String::new()),
            dead_letter_routing_key: Some(routing_key.into()),
            ..Default::default()
        },
    }
}

fn reject_one(ch: &Channel, queue: &str) {
    get(ch, queue)
        .expect("a message")
        .reject(BasicRejectOptions::default())
        .unwrap();
}

/// §5.1: a dead-letter exchange set by policy applies to the queues its pattern matches, to
/// queues declared before and after it; queue arguments override it; clearing it stops it.
#[test]
fn dead_letter_exchange_by_policy() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "dlq");
    declare(&ch, "other-dlq");
    declare(&ch, "orders.before");
    broker
        .set_policy("dlx", dlx_policy("^orders\\.", "dlq"))
        .unwrap();
    declare(&ch, "orders.after");
    declare(&ch, "payments");
    let own = FieldTable::new()
        .with("x-dead-letter-exchange", "")
        .with("x-dead-letter-routing-key", "other-dlq");
    ch.queue_declare("orders.own", QueueDeclareOptions::default(), own)
        .unwrap();
    for q in ["orders.before", "orders.after", "payments", "orders.own"] {
        publish(&ch, "", q, q);
        reject_one(&ch, q);
    }
    assert_eq!(get_all(&ch, "dlq"), ["orders.before", "orders.after"]);
    assert_eq!(
        get_all(&ch, "other-dlq"),
        ["orders.own"],
        "the argument wins"
    );
    assert_eq!(broker.death_stats("payments").unwrap().dropped.rejected, 1);
    broker.clear_policy("dlx").unwrap();
    publish(&ch, "", "orders.after", "m");
    reject_one(&ch, "orders.after");
    assert_eq!(ready(&ch, "dlq"), 0, "no policy, no dead-lettering");
}

/// §7.3: lowering a drop-head length limit by policy drops from the head at once; §7.1: the
/// lower of policy and argument TTL applies.
#[test]
fn limits_and_ttl_by_policy() {
    let clock = ManualClock::new(0);
    let broker = Broker::builder().clock(clock.clone()).in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    declare(&ch, "q");
    publish_all(&ch, "q", &["1", "2", "3"]);
    let limit = Policy {
        pattern: "^q$".into(),
        priority: 0,
        definition: PolicyDefinition {
            max_length: Some(1),
            message_ttl: Some(100),
            ..Default::default()
        },
    };
    broker.set_policy("limit", limit).unwrap();
    assert_eq!(ready(&ch, "q"), 1, "dropped from the head at once");
    let ttl = FieldTable::new().with("x-message-ttl", 1000i32);
    ch.queue_declare("q2", QueueDeclareOptions::default(), ttl.clone())
        .unwrap();
    let p = Policy {
        pattern: "^q2$".into(),
        priority: 0,
        definition: PolicyDefinition {
            message_ttl: Some(100),
            ..Default::default()
        },
    };
    broker.set_policy("ttl", p).unwrap();
    publish(&ch, "", "q2", "m");
    clock.advance(std::time::Duration::from_millis(100));
    assert_eq!(ready(&ch, "q2"), 0, "the policy's lower TTL applied");
    assert_eq!(get_all(&ch, "q"), ["3"]);
}

/// Only the highest-priority matching policy applies; a bad pattern is a typed error.
#[test]
fn priority_and_bad_patterns() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "low-dlq");
    declare(&ch, "high-dlq");
    let mut high = dlx_policy("^w", "high-dlq");
    high.priority = 5;
    broker
        .set_policy("a-low", dlx_policy("^w", "low-dlq"))
        .unwrap();
    broker.set_policy("b-high", high).unwrap();
    declare(&ch, "w");
    publish(&ch, "", "w", "m");
    reject_one(&ch, "w");
    assert_eq!(get_all(&ch, "high-dlq"), ["m"]);
    let bad = broker.set_policy("bad", dlx_policy("(", "x"));
    assert!(matches!(bad, Err(Error::InvalidInput(_))), "{bad:?}");
}

/// A durable broker keeps its policies, as RabbitMQ does: after a reopen the policy-given
/// dead-letter exchange and length limit still apply, to recovered queues and to new ones; a
/// cleared policy stays cleared; and an in-memory broker's policies stay in memory.
#[test]
fn policies_survive_a_restart() {
    let dir = TempDir::new("policies");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    {
        let broker = Broker::open(dir.path()).unwrap();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        for q in ["dlq", "orders.eu"] {
            ch.queue_declare(q, durable, FieldTable::new()).unwrap();
        }
        broker
            .set_policy("dlx", dlx_policy("^orders\\.", "dlq"))
            .unwrap();
        let limit = Policy {
            pattern: "^orders\\.".into(),
            priority: -1,
            definition: PolicyDefinition {
                max_length: Some(1),
                overflow: Some(Overflow::RejectPublish),
                ..Default::default()
            },
        };
        broker.set_policy("limit", limit.clone()).unwrap();
        broker.set_policy("limit-too", limit).unwrap();
        broker.clear_policy("limit").unwrap();
    }
    let broker = Broker::open(dir.path()).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare("orders.us", durable, FieldTable::new())
        .unwrap();
    for q in ["orders.eu", "orders.us"] {
        publish(&ch, "", q, q);
        reject_one(&ch, q);
    }
    assert_eq!(
        get_all(&ch, "dlq"),
        ["orders.eu", "orders.us"],
        "the dead-letter policy came back and applies to old and new queues"
    );
    // "dlx" has the higher priority, so only it applies: no length limit from "limit-too".
    publish(&ch, "", "orders.eu", "1");
    publish(&ch, "", "orders.eu", "2");
    assert_eq!(ready(&ch, "orders.eu"), 2);
    broker.clear_policy("dlx").unwrap();
    publish(&ch, "", "orders.eu", "3");
    assert_eq!(
        ready(&ch, "orders.eu"),
        2,
        "now 'limit-too' applies: refused"
    );
    drop((ch, conn, broker));
    let broker = Broker::open(dir.path()).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    // The messages were transient: the queue is empty after the restart.
    publish(&ch, "", "orders.eu", "4");
    publish(&ch, "", "orders.eu", "5");
    assert_eq!(
        ready(&ch, "orders.eu"),
        1,
        "'limit-too' came back: '5' refused"
    );
    reject_one(&ch, "orders.eu");
    assert_eq!(ready(&ch, "dlq"), 0, "'dlx' stayed cleared: dropped");
    assert!(
        broker
            .set_policy(&"p".repeat(256), dlx_policy("x", "y"))
            .is_err()
    );
}
