//! Testing two services with coney's deterministic simulation: `billing` turns orders into
//! receipts, `mailer` sends each receipt once. Every seed interleaves them differently and
//! crashes services at moments of its choosing; the check must hold for all of them, and a
//! failing seed replays alone, exactly.
//!
//! `cargo run --example simulation` checks 200 seeds and prints one run's trace.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coney::service::ServiceOptions;
use coney::sim::{FaultRates, SimOptions, Simulation, check_seeds};
use coney::*;

/// One run of the scenario under `seed`; `Err` says what went wrong.
fn scenario(seed: u64) -> Result<Simulation, String> {
    let options = SimOptions {
        faults: FaultRates {
            service_crash: 0.1, // a service crashes at 10% of its steps...
            restart_after: Duration::from_millis(200), // ...and is back 200 ms later
            ..FaultRates::default()
        },
        ..SimOptions::default()
    };
    let mut sim = Simulation::with_options(seed, options).map_err(|e| e.to_string())?;
    let ch = sim.connect().channel().map_err(|e| e.to_string())?;
    for queue in ["orders", "receipts"] {
        ch.queue_declare(queue, QueueDeclareOptions::default(), FieldTable::new())
            .map_err(|e| e.to_string())?;
    }
    // The services: plain functions of a delivery and a channel, as they would run on
    // threads with `coney::service::spawn`.
    sim.add_service(
        "billing",
        "orders",
        ServiceOptions::default(),
        |order: &Delivery, ch: &Channel| {
            let id = order.properties().message_id.clone().unwrap_or_default();
            ch.basic_publish(
                "",
                "receipts",
                BasicPublishOptions::default(),
                format!("receipt for {id}"),
                BasicProperties::default().with_message_id(format!("receipt-{id}")),
            )?;
            order.ack(BasicAckOptions::default())?;
            Ok(())
        },
    )
    .map_err(|e| e.to_string())?;
    let mailed = Arc::new(Mutex::new(HashSet::new()));
    let outbox = mailed.clone();
    sim.add_service(
        "mailer",
        "receipts",
        ServiceOptions::default(),
        move |receipt: &Delivery, _: &Channel| {
            // Idempotent: a receipt seen again (redelivered after a crash) is not mailed twice.
            let id = receipt.properties().message_id.clone().unwrap_or_default();
            outbox.lock().expect("not poisoned").insert(id);
            receipt.ack(BasicAckOptions::default())?;
            Ok(())
        },
    )
    .map_err(|e| e.to_string())?;
    for i in 0..5 {
        ch.basic_publish(
            "",
            "orders",
            BasicPublishOptions::default(),
            format!("order {i}"),
            BasicProperties::default().with_message_id(format!("o{i}")),
        )
        .map_err(|e| e.to_string())?;
    }
    // Virtual time: a second passes at once, with every TTL, retry and restart due in it.
    sim.run_for(Duration::from_secs(1))
        .map_err(|e| e.to_string())?;
    sim.assert_empty("orders");
    sim.assert_empty("receipts");
    let mailed = mailed.lock().expect("not poisoned").len();
    if mailed != 5 {
        return Err(format!("{mailed} receipts mailed, 5 expected"));
    }
    Ok(sim)
}

/// Checks 200 seeds, then shows the trace of one around its first crash.
pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A failing seed panics with: "seed N failed: ... replay it alone: CONEY_SIM_SEED=N ...".
    check_seeds("--example simulation", 0..200, |seed| {
        scenario(seed).map(drop)
    });
    let (seed, text) = (0..200)
        .map(|seed| (seed, scenario(seed).map(|sim| sim.trace().to_text())))
        .find_map(|(seed, text)| text.ok().filter(|t| t.contains("FAULT")).map(|t| (seed, t)))
        .ok_or("no seed crashed a service")?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.contains(" route ")).collect();
    let fault = lines.iter().position(|l| l.contains("FAULT")).unwrap_or(0);
    println!("seed {seed}:");
    for line in &lines[fault.saturating_sub(4)..(fault + 18).min(lines.len())] {
        println!("{line}");
    }
    Ok(())
}
