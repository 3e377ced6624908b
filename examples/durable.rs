//! The README's durable example: persistent messages confirmed on disk, the broker closed, and
//! the same directory opened again at once with the messages in it.
//!
//! `cargo run --example durable`

use coney::*;

/// Runs the example; public so that `tests/examples.rs` runs it too.
pub fn main() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("coney-readme-{}", std::process::id()));
    let broker = Broker::open(&dir)?;
    let conn = broker.connect();
    let ch = conn.channel()?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("orders", durable, FieldTable::new())?;
    ch.confirm_select(ConfirmSelectOptions::default())?;
    ch.basic_publish(
        "",
        "orders",
        BasicPublishOptions::default(),
        b"order 7",
        BasicProperties::default().with_delivery_mode(2),
    )?;
    assert!(ch.wait_for_confirms()?, "on disk");
    broker.close()?; // the channel is closed with it

    let broker = Broker::open(&dir)?; // the same directory, at once
    let ch = broker.connect().channel()?; // a channel keeps its connection open
    let got = ch
        .basic_get("orders", BasicGetOptions::default())?
        .expect("recovered");
    assert_eq!(&got.delivery.body()[..], b"order 7");
    got.delivery.ack(BasicAckOptions::default())?;
    broker.close()?;
    std::fs::remove_dir_all(&dir).ok();
    println!("recovered {:?} after a close and a reopen", "order 7");
    Ok(())
}
