//! The README's first example: an in-memory broker, a queue, a publish, a consumer and an ack.
//!
//! `cargo run --example quickstart`

use coney::*;

/// Runs the example; public so that `tests/examples.rs` runs it too.
pub fn main() -> Result<()> {
    let broker = Broker::in_memory(); // or Broker::open("data/coney")? for a durable one
    let conn = broker.connect();
    let ch = conn.channel()?;
    ch.queue_declare(
        "payment_queue",
        QueueDeclareOptions::default(),
        FieldTable::new(),
    )?;
    ch.basic_publish(
        "",
        "payment_queue",
        BasicPublishOptions::default(),
        b"order 42".to_vec(),
        BasicProperties::default().with_correlation_id("42"),
    )?;

    let mut consumer = ch.basic_consume(
        "payment_queue",
        "payments",
        BasicConsumeOptions::default(),
        FieldTable::new(),
    )?;
    let delivery = consumer.recv().expect("a delivery");
    assert_eq!(&delivery.body()[..], b"order 42");
    delivery.ack(BasicAckOptions::default())?;
    println!(
        "consumed and acked {:?}",
        String::from_utf8_lossy(delivery.body())
    );
    Ok(())
}
