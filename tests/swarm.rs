//! Engine swarm: seeded random commands (publish, get, consume, ack, nack, reject, channel
//! close, time passing) on several queues of a simulated broker, checking after every command
//! the broker's own invariants and a model of what may happen to a message: an acked message
//! never comes back, a message delivered before is flagged redelivered, and in the end every
//! message published is acked exactly once (dead-lettered ones in the dead-letter queue).
//!
//! `CONEY_SIM_SEEDS=N` runs more seeds; a failure names its seed and how to replay it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use coney::sim::{SimRng, Simulation, check_seeds};
use coney::*;

/// Seeds run by default.
const SEEDS: u64 = 300;
/// Commands per seed.
const COMMANDS: usize = 300;

const QUEUES: [&str; 3] = ["classic", "quorum", "timed"];

/// The quorum queue's `x-delivery-limit`.
const DELIVERY_LIMIT: u32 = 2;

/// What the model knows about the messages.
#[derive(Default)]
struct Model {
    published: u64,
    delivered: HashSet<String>,
    acked: HashMap<String, u32>,
}

impl Model {
    /// A delivery of message `id`, flagged `redelivered`, returned `count` times before.
    fn delivered(
        &mut self,
        id: &str,
        redelivered: bool,
        count: u32,
        queue: &str,
    ) -> Result<(), String> {
        if queue == "quorum" && count > DELIVERY_LIMIT {
            return Err(format!(
                "{id} delivered from {queue} after {count} returns; the limit is {DELIVERY_LIMIT}"
            ));
        }
        if self.acked.contains_key(id) {
            return Err(format!("{id} was acked and came back from {queue}"));
        }
        if !self.delivered.insert(id.to_owned()) && !redelivered && queue != "dlq" {
            return Err(format!(
                "{id} was delivered before but is not flagged redelivered ({queue})"
            ));
        }
        Ok(())
    }

    fn acked(&mut self, id: &str) {
        *self.acked.entry(id.to_owned()).or_default() += 1;
    }
}

/// A delivery the test holds, with where it came from.
struct Held {
    delivery: Delivery,
    channel: usize,
}

fn id_of(d: &Delivery) -> String {
    d.properties().message_id.clone().unwrap_or_default()
}

fn declare_all(ch: &Channel) -> Result<(), Error> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare("dlq", durable, FieldTable::new())?;
    let dlx = || {
        FieldTable::new()
            .with("x-dead-letter-exchange", "")
            .with("x-dead-letter-routing-key", "dlq")
    };
    ch.queue_declare("classic", durable, dlx())?;
    ch.queue_declare(
        "quorum",
        durable,
        dlx()
            .with("x-queue-type", "quorum")
            .with("x-delivery-limit", i64::from(DELIVERY_LIMIT)),
    )?;
    ch.queue_declare("timed", durable, dlx().with("x-message-ttl", 40i64))?;
    Ok(())
}

fn run_seed(seed: u64) -> Result<(), String> {
    let mut sim = Simulation::new(seed);
    let mut rng = SimRng::new(seed ^ 0x5eed);
    let conn = sim.connect();
    let admin = conn.channel().map_err(|e| e.to_string())?;
    declare_all(&admin).map_err(|e| e.to_string())?;
    let mut channels: Vec<Option<Channel>> = Vec::new();
    let mut consumers: Vec<(usize, Consumer)> = Vec::new();
    let mut held: Vec<Held> = Vec::new();
    let mut model = Model::default();
    let e = |e: Error| e.to_string();
    for step in 0..COMMANDS {
        let open: Vec<usize> = (0..channels.len())
            .filter(|&i| channels[i].is_some())
            .collect();
        match rng.below(12) {
            0..=2 => {
                let queue = QUEUES[rng.below(3) as usize];
                let id = format!("m{}", model.published);
                model.published += 1;
                admin
                    .basic_publish(
                        "",
                        queue,
                        BasicPublishOptions::default(),
                        id.clone(),
                        BasicProperties::default().with_message_id(id),
                    )
                    .map_err(e)?;
            }
            3 if channels.len() < 4 => {
                let ch = conn.channel().map_err(e)?;
                ch.basic_qos(1 + rng.below(3) as u16, BasicQosOptions::default())
                    .map_err(e)?;
                channels.push(Some(ch));
            }
            4 if !open.is_empty() => {
                let c = open[rng.below(open.len() as u64) as usize];
                let queue = QUEUES[rng.below(3) as usize];
                let ch = channels[c].as_ref().expect("open");
                let consumer = ch
                    .basic_consume(queue, "", BasicConsumeOptions::default(), FieldTable::new())
                    .map_err(e)?;
                consumers.push((c, consumer));
            }
            5 if !open.is_empty() => {
                let c = open[rng.below(open.len() as u64) as usize];
                let queue = QUEUES[rng.below(3) as usize];
                let ch = channels[c].as_ref().expect("open");
                if let Some(g) = ch.basic_get(queue, BasicGetOptions::default()).map_err(e)? {
                    model.delivered(
                        &id_of(&g.delivery),
                        g.delivery.redelivered(),
                        g.delivery.delivery_count(),
                        queue,
                    )?;
                    held.push(Held {
                        delivery: g.delivery,
                        channel: c,
                    });
                }
            }
            6 if !consumers.is_empty() => {
                let k = rng.below(consumers.len() as u64) as usize;
                let (c, consumer) = &mut consumers[k];
                if let Ok(d) = consumer.try_recv() {
                    let queue = d.routing_key().to_owned();
                    model.delivered(&id_of(&d), d.redelivered(), d.delivery_count(), &queue)?;
                    held.push(Held {
                        delivery: d,
                        channel: *c,
                    });
                }
            }
            7 | 8 if !held.is_empty() => {
                let h = held.swap_remove(rng.below(held.len() as u64) as usize);
                model.acked(&id_of(&h.delivery));
                h.delivery.ack(BasicAckOptions::default()).map_err(e)?;
            }
            9 if !held.is_empty() => {
                let h = held.swap_remove(rng.below(held.len() as u64) as usize);
                let requeue = rng.chance(0.7);
                h.delivery
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue,
                    })
                    .map_err(e)?;
            }
            10 if !open.is_empty() && rng.chance(0.3) => {
                // A channel closes: what it held goes back.
                let c = open[rng.below(open.len() as u64) as usize];
                if let Some(ch) = channels[c].take() {
                    ch.close();
                }
                held.retain(|h| h.channel != c);
                consumers.retain(|(ch, _)| *ch != c);
            }
            11 => {
                sim.run_for(Duration::from_millis(rng.below(30)))
                    .map_err(|e| e.to_string())?;
            }
            _ => {}
        }
        sim.broker()
            .check_invariants()
            .map_err(|e| format!("step {step}: {e}"))?;
    }
    // The end: every channel closes (what they held goes back), time passes for the TTLs,
    // and everything left is fetched and acked.
    drop(consumers);
    drop(held);
    for ch in channels.into_iter().flatten() {
        ch.close();
    }
    sim.run_for(Duration::from_millis(100))
        .map_err(|e| e.to_string())?;
    for queue in QUEUES.iter().chain(&["dlq"]) {
        while let Some(g) = admin
            .basic_get(queue, BasicGetOptions::default())
            .map_err(e)?
        {
            model.delivered(
                &id_of(&g.delivery),
                g.delivery.redelivered(),
                g.delivery.delivery_count(),
                queue,
            )?;
            model.acked(&id_of(&g.delivery));
            g.delivery.ack(BasicAckOptions::default()).map_err(e)?;
        }
    }
    sim.broker().check_invariants()?;
    if model.acked.len() as u64 != model.published {
        return Err(format!(
            "{} published, {} acked in the end",
            model.published,
            model.acked.len()
        ));
    }
    if let Some((id, n)) = model.acked.iter().find(|(_, n)| **n != 1) {
        return Err(format!("{id} acked {n} times"));
    }
    Ok(())
}

#[test]
fn engine_swarm() {
    check_seeds("--test swarm engine_swarm", 0..SEEDS, run_seed);
}
