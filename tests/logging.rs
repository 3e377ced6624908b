//! Dead-letterings and drops are reported through `tracing` with the queue, the reason and the
//! message id, never the body (issue rule "error logging"; SEMANTICS.md §5.2 reasons).

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use coney::*;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Collects every event's fields as `name=value` strings.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<Vec<String>>>>);

struct Fields(Vec<String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push(format!("{}={:?}", field.name(), value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push(format!("{}={value}", field.name()));
    }
}

impl Subscriber for Collect {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields(vec![format!("level={}", event.metadata().level())]);
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn dead_letters_and_drops_are_logged_without_bodies() {
    let collect = Collect::default();
    tracing::subscriber::with_default(collect.clone(), || {
        let (_broker, _conn, ch) = setup();
        declare(&ch, "dlq");
        let args = FieldTable::new()
            .with("x-dead-letter-exchange", "")
            .with("x-dead-letter-routing-key", "dlq");
        ch.queue_declare("work", QueueDeclareOptions::default(), args)
            .unwrap();
        declare(&ch, "plain");
        for (queue, id) in [("work", "m-1"), ("plain", "m-2")] {
            let props = BasicProperties::default().with_message_id(id);
            ch.basic_publish(
                "",
                queue,
                Default::default(),
                b"secret body".to_vec(),
                props,
            )
            .unwrap();
            get(&ch, queue)
                .unwrap()
                .reject(BasicRejectOptions::default())
                .unwrap();
        }
    });
    let events = collect.0.lock().unwrap().clone();
    let find = |needle: &str| {
        events
            .iter()
            .find(|e| e.iter().any(|f| f.contains(needle)))
            .unwrap_or_else(|| panic!("no event with {needle}: {events:?}"))
            .join(" ")
    };
    let dead = find("m-1");
    assert!(
        dead.contains("queue=work") && dead.contains("reason=rejected"),
        "{dead}"
    );
    assert!(dead.contains("dead-lettered"), "{dead}");
    assert!(
        dead.contains("level=INFO"),
        "a dead-lettering is an info: {dead}"
    );
    let dropped = find("m-2");
    assert!(dropped.contains("queue=plain") && dropped.contains("reason=rejected"));
    assert!(dropped.contains("dropped"), "{dropped}");
    assert!(
        dropped.contains("level=WARN"),
        "a drop is a warning: {dropped}"
    );
    assert!(
        events.iter().flatten().all(|f| !f.contains("secret")),
        "bodies never logged"
    );
}

/// Every way a message is lost for good is a warning: expired without a dead-letter exchange,
/// over a length limit without one, and dead-lettered to an exchange that routes it nowhere.
#[test]
fn messages_lost_for_good_are_warnings() {
    let collect = Collect::default();
    let clock = ManualClock::new(0);
    tracing::subscriber::with_default(collect.clone(), || {
        let broker = Broker::builder().clock(clock.clone()).in_memory();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        let declare = |name: &str, args: FieldTable| {
            ch.queue_declare(name, QueueDeclareOptions::default(), args)
                .unwrap()
        };
        declare("ttl", FieldTable::new().with("x-message-ttl", 1_000i64));
        declare("short", FieldTable::new().with("x-max-length", 1i64));
        declare(
            "nowhere",
            FieldTable::new()
                .with("x-dead-letter-exchange", "")
                .with("x-dead-letter-routing-key", "no-such-queue"),
        );
        let publish = |queue: &str, id: &str| {
            let props = BasicProperties::default().with_message_id(id);
            ch.basic_publish("", queue, Default::default(), b"body", props)
                .unwrap()
        };
        publish("ttl", "expired-1");
        publish("short", "maxlen-1");
        publish("short", "maxlen-2");
        publish("nowhere", "unrouted-1");
        get(&ch, "nowhere")
            .unwrap()
            .reject(BasicRejectOptions::default())
            .unwrap();
        clock.advance(std::time::Duration::from_secs(1));
        assert_eq!(ready(&ch, "ttl"), 0, "expired");
    });
    let events = collect.0.lock().unwrap().clone();
    for (id, reason) in [
        ("expired-1", "reason=expired"),
        ("maxlen-1", "reason=maxlen"),
        ("unrouted-1", "reason=rejected"),
    ] {
        let event = events
            .iter()
            .find(|e| e.iter().any(|f| f.contains(id)))
            .unwrap_or_else(|| panic!("no event for {id}: {events:?}"))
            .join(" ");
        assert!(event.contains(reason), "{event}");
        assert!(event.contains("dropped"), "{event}");
        assert!(event.contains("level=WARN"), "{event}");
    }
}
