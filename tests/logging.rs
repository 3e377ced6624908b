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
        let mut fields = Fields(Vec::new());
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
            get(&ch, queue).unwrap().reject(BasicRejectOptions::default()).unwrap();
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
    let dropped = find("m-2");
    assert!(dropped.contains("queue=plain") && dropped.contains("reason=rejected"));
    assert!(dropped.contains("dropped"), "{dropped}");
    assert!(
        events.iter().flatten().all(|f| !f.contains("secret")),
        "bodies never logged"
    );
}
