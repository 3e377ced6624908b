//! The reference application: for now a small publish / consume / ack demo on the embedded broker.

use coney::BasicAckOptions;
use coney::{
    BasicConsumeOptions, BasicProperties, BasicPublishOptions, Broker, FieldTable,
    QueueDeclareOptions,
};

fn main() -> coney::Result<()> {
    let broker = Broker::in_memory();
    let conn = broker.connect();
    let ch = conn.channel()?;
    let q = ch.queue_declare(
        "orders",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )?;
    let total = 100_000u32;
    let producer = {
        let ch = conn.channel()?;
        std::thread::spawn(move || -> coney::Result<()> {
            for i in 0..total {
                ch.basic_publish(
                    "",
                    "orders",
                    BasicPublishOptions::default(),
                    i.to_le_bytes().to_vec(),
                    BasicProperties::default(),
                )?;
            }
            Ok(())
        })
    };
    ch.basic_qos(100, Default::default())?;
    let mut consumer = ch.basic_consume(
        &q.name,
        "",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )?;
    let start = std::time::Instant::now();
    let mut received = 0u32;
    while received < total {
        let d = consumer
            .recv()
            .expect("consumer ends only when the channel closes");
        d.ack(BasicAckOptions::default())?;
        received += 1;
    }
    producer.join().expect("producer thread panicked")?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "published and acked {received} messages in {secs:.3}s ({:.0} msg/s)",
        f64::from(received) / secs
    );
    broker
        .check_invariants()
        .map_err(|e| coney::Error::InvalidInput(format!("invariant broken: {e}")))?;
    println!("invariants hold");
    Ok(())
}
