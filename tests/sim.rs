//! The deterministic simulation: same seed, same trace; seeded interleavings; virtual time
//! firing TTLs; faults by hand and by seed.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use coney::service::{OnError, ServiceOptions};
use coney::sim::{Event, FaultRates, SimOptions, Simulation};
use coney::*;

fn declare(ch: &Channel, queue: &str, args: FieldTable) {
    ch.queue_declare(queue, QueueDeclareOptions::default(), args)
        .expect("queue.declare");
}

fn publish(ch: &Channel, queue: &str, body: &str) {
    ch.basic_publish(
        "",
        queue,
        BasicPublishOptions::default(),
        body.to_owned(),
        BasicProperties::default().with_message_id(body),
    )
    .expect("basic.publish");
}

/// Two producers' worth of work through three services: `a` and `b` both forward to `sink`,
/// whose handler acks. Returns the simulation after it ran to idle.
fn pipeline(seed: u64, options: SimOptions) -> Simulation {
    let mut sim = Simulation::with_options(seed, options).expect("a simulation");
    let ch = sim.connect().channel().unwrap();
    for q in ["a", "b", "sink"] {
        declare(&ch, q, FieldTable::new());
    }
    for (name, from) in [("svc-a", "a"), ("svc-b", "b")] {
        sim.add_service(
            name,
            from,
            ServiceOptions {
                prefetch: 2,
                ..ServiceOptions::default()
            },
            |d: &Delivery, ch: &Channel| {
                let id = d.properties().message_id.clone().unwrap_or_default();
                ch.basic_publish(
                    "",
                    "sink",
                    BasicPublishOptions::default(),
                    d.body().clone(),
                    BasicProperties::default().with_message_id(format!("{id}>sink")),
                )?;
                d.ack(BasicAckOptions::default())?;
                Ok(())
            },
        )
        .unwrap();
    }
    sim.add_service(
        "svc-sink",
        "sink",
        ServiceOptions::default(),
        |d: &Delivery, _: &Channel| {
            d.ack(BasicAckOptions::default())?;
            Ok(())
        },
    )
    .unwrap();
    for i in 0..6 {
        publish(&ch, "a", &format!("a{i}"));
        publish(&ch, "b", &format!("b{i}"));
    }
    sim.run_until_idle().expect("goes idle");
    sim
}

#[test]
fn same_seed_gives_the_same_trace_byte_for_byte() {
    let one = pipeline(42, SimOptions::default());
    let two = pipeline(42, SimOptions::default());
    let text = one.trace().to_text();
    assert!(text.contains("handle svc-sink"), "{text}");
    assert_eq!(text, two.trace().to_text());
    assert_eq!(one.trace().digest(), two.trace().digest());
    assert_eq!(one.queue_counts("sink").unwrap().ready, 0);
    assert_eq!(
        one.broker().stats().queue("sink").unwrap().counters.acked,
        12
    );
}

#[test]
fn different_seeds_interleave_differently() {
    let distinct: HashSet<u64> = (0..100)
        .map(|seed| pipeline(seed, SimOptions::default()).trace().digest())
        .collect();
    println!("distinct traces over 100 seeds: {}", distinct.len());
    assert!(
        distinct.len() >= 90,
        "only {} distinct traces",
        distinct.len()
    );
}

#[test]
fn run_for_fires_ttls_in_virtual_time() {
    let mut sim = Simulation::new(1);
    let ch = sim.connect().channel().unwrap();
    declare(&ch, "parked", FieldTable::new());
    declare(
        &ch,
        "orders",
        FieldTable::new()
            .with("x-message-ttl", 5_000i64)
            .with("x-dead-letter-exchange", "")
            .with("x-dead-letter-routing-key", "parked"),
    );
    publish(&ch, "orders", "o-1");
    sim.run_for(Duration::from_millis(4_999)).unwrap();
    assert_eq!(sim.queue_counts("orders").unwrap().ready, 1);
    sim.run_for(Duration::from_millis(1)).unwrap();
    assert_eq!(sim.now_ms(), 5_000);
    let orders = sim.queue_counts("orders").unwrap();
    assert_eq!((orders.ready, orders.dead_lettered), (0, 1));
    assert_eq!(sim.queue_counts("parked").unwrap().ready, 1);
    let text = sim.trace().to_text();
    assert!(text.contains("     5.000 expire orders#0"), "{text}");
    assert!(
        text.contains("     5.000 dead-letter orders#0 reason=expired"),
        "{text}"
    );
    assert!(text.contains("     5.000 enqueue parked#0"), "{text}");
}

#[test]
fn a_crashed_service_requeues_what_it_held_and_comes_back() {
    let mut sim = Simulation::new(3);
    let ch = sim.connect().channel().unwrap();
    declare(&ch, "work", FieldTable::new());
    let seen = Arc::new(AtomicU64::new(0));
    let redelivered = Arc::new(AtomicU64::new(0));
    let (s, r) = (seen.clone(), redelivered.clone());
    let id = sim
        .add_service(
            "worker",
            "work",
            ServiceOptions {
                prefetch: 5,
                ..ServiceOptions::default()
            },
            move |d: &Delivery, _: &Channel| {
                s.fetch_add(1, Ordering::Relaxed);
                if d.redelivered() {
                    r.fetch_add(1, Ordering::Relaxed);
                }
                d.ack(BasicAckOptions::default())?;
                Ok(())
            },
        )
        .unwrap();
    for i in 0..5 {
        publish(&ch, "work", &format!("w{i}"));
    }
    // Five are delivered (prefetch 5); one is handled, then the service crashes.
    assert!(sim.step().unwrap());
    assert_eq!(sim.queue_counts("work").unwrap().unacked, 4);
    sim.crash_service(id, Some(Duration::from_secs(2))).unwrap();
    let counts = sim.queue_counts("work").unwrap();
    assert_eq!((counts.ready, counts.unacked, counts.consumers), (4, 0, 0));
    assert_eq!(sim.run_until_idle().unwrap(), 0, "down: nothing runs");
    sim.run_for(Duration::from_secs(2)).unwrap();
    assert_eq!(seen.load(Ordering::Relaxed), 5);
    assert_eq!(redelivered.load(Ordering::Relaxed), 4);
    let stats = sim.service_stats(id).unwrap();
    assert_eq!((stats.handled, stats.crashes, stats.running), (5, 1, true));
    let text = sim.trace().to_text();
    assert!(text.contains("FAULT service_crash: worker"), "{text}");
    assert!(text.contains("requeue work#1"), "{text}");
    assert!(text.contains("     2.000 note worker restarted"), "{text}");
}

#[test]
fn a_failing_handler_is_requeued_or_rejected_as_configured() {
    let mut sim = Simulation::new(5);
    let ch = sim.connect().channel().unwrap();
    declare(&ch, "dead", FieldTable::new());
    ch.queue_declare(
        "flaky",
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::new()
            .with("x-queue-type", "quorum")
            .with("x-delivery-limit", 2i64)
            .with("x-dead-letter-exchange", "")
            .with("x-dead-letter-routing-key", "dead"),
    )
    .unwrap();
    declare(
        &ch,
        "strict",
        FieldTable::new()
            .with("x-dead-letter-exchange", "")
            .with("x-dead-letter-routing-key", "dead"),
    );
    let always_fails = |_: &Delivery, _: &Channel| -> coney::service::HandlerResult {
        Err("payment gateway down".into())
    };
    let flaky = sim
        .add_service("flaky", "flaky", ServiceOptions::default(), always_fails)
        .unwrap();
    let strict = sim
        .add_service(
            "strict",
            "strict",
            ServiceOptions {
                on_error: OnError::Reject,
                ..ServiceOptions::default()
            },
            always_fails,
        )
        .unwrap();
    publish(&ch, "flaky", "f");
    publish(&ch, "strict", "s");
    sim.run_until_idle().unwrap();
    // Quorum queue, delivery limit 2: three failed attempts, then dead-lettered.
    assert_eq!(sim.service_stats(flaky).unwrap().failed, 3);
    assert_eq!(sim.service_stats(strict).unwrap().failed, 1);
    assert_eq!(sim.queue_counts("dead").unwrap().ready, 2);
    let text = sim.trace().to_text();
    assert!(
        text.contains("dead-letter flaky#0 reason=delivery_limit"),
        "{text}"
    );
    assert!(
        text.contains("dead-letter strict#0 reason=rejected"),
        "{text}"
    );
}

#[test]
fn a_panicking_handler_crashes_its_service_without_losing_the_message() {
    let mut sim = Simulation::new(9);
    let ch = sim.connect().channel().unwrap();
    declare(&ch, "work", FieldTable::new());
    let id = sim
        .add_service(
            "doomed",
            "work",
            ServiceOptions::default(),
            |_: &Delivery, _: &Channel| panic!("out of cheese"),
        )
        .unwrap();
    publish(&ch, "work", "w");
    // The panic message goes to stderr through the default hook; the run goes on.
    sim.run_until_idle().unwrap();
    let stats = sim.service_stats(id).unwrap();
    assert_eq!((stats.failed, stats.crashes, stats.running), (1, 1, false));
    let counts = sim.queue_counts("work").unwrap();
    assert_eq!((counts.ready, counts.unacked), (1, 0));
    assert!(
        sim.trace()
            .to_text()
            .contains("FAULT handler_crash: doomed: out of cheese")
    );
}

#[test]
fn a_channel_closed_by_the_broker_ends_the_consumer_until_restarted() {
    let mut sim = Simulation::new(11);
    let ch = sim.connect().channel().unwrap();
    declare(&ch, "work", FieldTable::new());
    let id = sim
        .add_service(
            "worker",
            "work",
            ServiceOptions::default(),
            |d: &Delivery, _: &Channel| {
                d.ack(BasicAckOptions::default())?;
                Ok(())
            },
        )
        .unwrap();
    publish(&ch, "work", "w0");
    sim.close_service_channel(id, None).unwrap();
    assert_eq!(sim.run_until_idle().unwrap(), 0);
    assert_eq!(sim.queue_counts("work").unwrap().ready, 1);
    sim.restart_service(id).unwrap();
    sim.run_until_idle().unwrap();
    assert_eq!(sim.queue_counts("work").unwrap().ready, 0);
    assert_eq!(sim.service_stats(id).unwrap().handled, 1);
}

#[test]
fn a_connection_closed_by_the_broker_takes_every_service_down_for_a_while() {
    let mut sim = pipeline(4, SimOptions::default());
    let ch = sim.connect().channel().unwrap();
    publish(&ch, "a", "late");
    sim.close_connection(Some(Duration::from_millis(500)));
    assert!(!ch.is_closed(), "the test's own connection stays open");
    assert_eq!(sim.run_until_idle().unwrap(), 0, "every service is down");
    assert_eq!(sim.queue_counts("a").unwrap().consumers, 0);
    sim.run_for(Duration::from_millis(500)).unwrap();
    sim.assert_empty("a");
    sim.assert_empty("sink");
    let text = sim.trace().to_text();
    assert!(text.contains("FAULT connection_closed"), "{text}");
    assert!(
        text.contains("     0.500 note svc-sink restarted"),
        "{text}"
    );
}

#[test]
fn processing_time_paces_a_service_in_virtual_time() {
    let mut sim = Simulation::new(13);
    let ch = sim.connect().channel().unwrap();
    declare(&ch, "work", FieldTable::new());
    sim.add_service(
        "slow",
        "work",
        ServiceOptions {
            processing_time: Duration::from_millis(100),
            ..ServiceOptions::default()
        },
        |d: &Delivery, _: &Channel| {
            d.ack(BasicAckOptions::default())?;
            Ok(())
        },
    )
    .unwrap();
    for i in 0..10 {
        publish(&ch, "work", &format!("w{i}"));
    }
    assert_eq!(sim.run_until_idle().unwrap(), 1, "busy after the first");
    let acked = |sim: &Simulation| sim.broker().stats().queue("work").unwrap().counters.acked;
    sim.run_for(Duration::from_millis(450)).unwrap();
    assert_eq!(acked(&sim), 5, "handled at 0, 100, 200, 300 and 400 ms");
    sim.run_for(Duration::from_secs(1)).unwrap();
    assert_eq!(acked(&sim), 10);
    let handles: Vec<u64> = sim
        .trace()
        .events()
        .into_iter()
        .filter(|e| matches!(e.event, Event::Handle { .. }))
        .map(|e| e.at_ms)
        .collect();
    assert_eq!(handles, (0..10).map(|i| i * 100).collect::<Vec<_>>());
}

#[test]
fn seeded_faults_lose_nothing() {
    let options = SimOptions {
        faults: FaultRates {
            service_crash: 0.1,
            channel_close: 0.05,
            connection_close: 0.02,
            restart_after: Duration::from_millis(50),
            ..FaultRates::default()
        },
        ..SimOptions::default()
    };
    let mut faults = 0;
    for seed in 0..50 {
        let mut sim = pipeline(seed, options.clone());
        sim.run_for(Duration::from_secs(5)).unwrap();
        let acked = sim.broker().stats().queue("sink").unwrap().counters.acked;
        assert!(acked >= 12, "seed {seed}: {acked} acked at the sink");
        for q in ["a", "b", "sink"] {
            let c = sim.queue_counts(q).unwrap();
            assert_eq!((c.ready, c.unacked), (0, 0), "seed {seed}: {q} {c:?}");
        }
        faults += sim
            .trace()
            .events()
            .iter()
            .filter(|e| matches!(e.event, Event::Fault { .. }))
            .count();
    }
    assert!(faults > 20, "the seeds injected {faults} faults");
}

#[test]
fn a_service_runs_the_same_handler_on_a_thread() {
    let broker = Broker::in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    declare(&ch, "work", FieldTable::new());
    declare(&ch, "out", FieldTable::new());
    let handler = |d: &Delivery, ch: &Channel| -> coney::service::HandlerResult {
        ch.basic_publish(
            "",
            "out",
            BasicPublishOptions::default(),
            d.body().clone(),
            BasicProperties::default(),
        )?;
        d.ack(BasicAckOptions::default())?;
        Ok(())
    };
    let refused = coney::service::spawn(
        &conn,
        "worker",
        "work",
        ServiceOptions {
            processing_time: Duration::from_millis(1),
            ..ServiceOptions::default()
        },
        handler,
    );
    assert!(
        matches!(refused, Err(Error::InvalidInput(_))),
        "virtual processing time is refused on threads"
    );
    let worker =
        coney::service::spawn(&conn, "worker", "work", ServiceOptions::default(), handler).unwrap();
    for i in 0..20 {
        publish(&ch, "work", &format!("w{i}"));
    }
    let mut out = ch
        .basic_consume(
            "out",
            "",
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::new(),
        )
        .unwrap();
    for _ in 0..20 {
        out.recv_timeout(Duration::from_secs(10))
            .expect("forwarded");
    }
    let report = worker.stop().unwrap();
    assert_eq!((report.handled, report.failed), (20, 0));

    // And the same handler in a simulation.
    let mut sim = Simulation::new(1);
    let ch = sim.connect().channel().unwrap();
    declare(&ch, "work", FieldTable::new());
    declare(&ch, "out", FieldTable::new());
    sim.add_service("worker", "work", ServiceOptions::default(), handler)
        .unwrap();
    publish(&ch, "work", "w");
    sim.run_until_idle().unwrap();
    assert_eq!(sim.queue_counts("out").unwrap().ready, 1);
}

fn durable_options() -> SimOptions {
    SimOptions {
        durable: true,
        ..SimOptions::default()
    }
}

fn persistent(body: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(body)
}

/// A crash keeps what the store flushed (everything confirmed) and loses what it had not;
/// nothing acked comes back.
#[test]
fn a_crash_keeps_what_was_flushed_and_nothing_acked() {
    let mut sim = Simulation::with_options(21, durable_options()).unwrap();
    let ch = sim.connect().channel().unwrap();
    ch.queue_declare(
        "jobs",
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::new(),
    )
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    for i in 0..4 {
        ch.basic_publish(
            "",
            "jobs",
            Default::default(),
            format!("c{i}"),
            persistent(&format!("c{i}")),
        )
        .unwrap();
    }
    // Waiting for confirms writes and flushes what is pending (nobody else would).
    assert!(ch.wait_for_confirms().unwrap());
    let got = ch
        .basic_get("jobs", BasicGetOptions::default())
        .unwrap()
        .unwrap();
    got.delivery.ack(BasicAckOptions::default()).unwrap();
    sim.broker().sync().unwrap(); // the ack is durable
    for i in 0..3 {
        ch.basic_publish(
            "",
            "jobs",
            Default::default(),
            format!("u{i}"),
            persistent(&format!("u{i}")),
        )
        .unwrap();
    }
    sim.crash().unwrap();
    assert!(
        ch.basic_get("jobs", BasicGetOptions::default()).is_err(),
        "the old broker is gone"
    );
    let ch = sim.connect().channel().unwrap();
    let mut bodies = Vec::new();
    while let Some(g) = ch.basic_get("jobs", BasicGetOptions::default()).unwrap() {
        assert!(g.delivery.redelivered(), "recovered messages are flagged");
        bodies.push(String::from_utf8(g.delivery.body().to_vec()).unwrap());
    }
    assert_eq!(bodies, ["c1", "c2", "c3"]);
    let text = sim.trace().to_text();
    assert!(
        text.contains("FAULT crash: process (generation 0)"),
        "{text}"
    );
    assert!(
        text.contains("note broker reopened (generation 1)"),
        "{text}"
    );
}

/// The seed decides when the store flushes: a crash then loses a seed-dependent tail of the
/// unconfirmed publishes, never a confirmed one.
#[test]
fn flushes_are_steps_the_seed_orders() {
    let mut lost = HashSet::new();
    for seed in 0..20 {
        let mut sim = Simulation::with_options(seed, durable_options()).unwrap();
        let ch = sim.connect().channel().unwrap();
        ch.queue_declare(
            "jobs",
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::new(),
        )
        .unwrap();
        ch.queue_declare("echo", QueueDeclareOptions::default(), FieldTable::new())
            .unwrap();
        sim.add_service(
            "echo",
            "echo",
            ServiceOptions::default(),
            |d: &Delivery, ch: &Channel| {
                let body = String::from_utf8_lossy(d.body()).into_owned();
                ch.basic_publish(
                    "",
                    "jobs",
                    Default::default(),
                    body.clone(),
                    persistent(&body),
                )?;
                d.ack(BasicAckOptions::default())?;
                Ok(())
            },
        )
        .unwrap();
        for i in 0..10 {
            publish(&ch, "echo", &format!("e{i}"));
        }
        // Handlers and flushes interleave as the seed says; stop after 12 steps.
        for _ in 0..12 {
            sim.step().unwrap();
        }
        sim.crash().unwrap();
        let left = sim
            .connect()
            .channel()
            .unwrap()
            .queue_declare(
                "jobs",
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::new(),
            )
            .unwrap()
            .message_count;
        assert!(left <= 10, "seed {seed}: {left}");
        lost.insert(left);
    }
    assert!(
        lost.len() > 2,
        "the seeds flushed at different moments: {lost:?}"
    );
}

#[test]
fn a_failed_flush_poisons_the_store_until_the_process_restarts() {
    let mut sim = Simulation::with_options(5, durable_options()).unwrap();
    let ch = sim.connect().channel().unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare("jobs", durable, FieldTable::new())
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    sim.fail_next_flush().unwrap();
    ch.basic_publish(
        "",
        "jobs",
        Default::default(),
        b"lost".to_vec(),
        persistent("lost"),
    )
    .unwrap();
    assert!(!ch.wait_for_confirms().unwrap(), "the publish is nacked");
    assert!(!sim.broker().health().is_healthy());
    sim.crash().unwrap();
    assert!(sim.broker().health().is_healthy());
    let ch = sim.connect().channel().unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    ch.basic_publish(
        "",
        "jobs",
        Default::default(),
        b"kept".to_vec(),
        persistent("kept"),
    )
    .unwrap();
    assert!(ch.wait_for_confirms().unwrap());
    assert!(sim.trace().to_text().contains("FAULT store_write"));
}

/// Seeded process crashes in a durable pipeline: the same seed gives the same trace, and
/// every persistent message confirmed by a service's publish is processed in the end.
#[test]
fn seeded_process_crashes_replay_exactly() {
    let options = SimOptions {
        durable: true,
        faults: FaultRates {
            process_crash: 0.02,
            service_crash: 0.05,
            restart_after: Duration::from_millis(10),
            ..FaultRates::default()
        },
        ..SimOptions::default()
    };
    let run = |seed: u64| {
        let mut sim = Simulation::with_options(seed, options.clone()).unwrap();
        let ch = sim.connect().channel().unwrap();
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        for q in ["in", "out"] {
            ch.queue_declare(q, durable, FieldTable::new()).unwrap();
        }
        sim.add_service(
            "fwd",
            "in",
            ServiceOptions::default(),
            |d: &Delivery, ch: &Channel| {
                ch.confirm_select(ConfirmSelectOptions::default())?;
                let id = d.properties().message_id.clone().unwrap_or_default();
                ch.basic_publish(
                    "",
                    "out",
                    Default::default(),
                    d.body().clone(),
                    persistent(&id),
                )?;
                ch.wait_for_confirms()?;
                d.ack(BasicAckOptions::default())?;
                Ok(())
            },
        )
        .unwrap();
        ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
        for i in 0..20 {
            let id = format!("m{i}");
            ch.basic_publish("", "in", Default::default(), id.clone(), persistent(&id))
                .unwrap();
        }
        assert!(ch.wait_for_confirms().unwrap());
        sim.run_for(Duration::from_secs(1)).unwrap();
        sim
    };
    let mut crashes = 0;
    for seed in 0..10 {
        let one = run(seed);
        let two = run(seed);
        crashes += one.trace().to_text().matches("FAULT crash").count();
        assert_eq!(one.trace().to_text(), two.trace().to_text(), "seed {seed}");
        let ch = one.connect().channel().unwrap();
        let mut out = HashSet::new();
        while let Some(g) = ch.basic_get("out", BasicGetOptions::default()).unwrap() {
            out.insert(g.delivery.properties().message_id.clone().unwrap());
        }
        let left_in = one.queue_counts("in").unwrap();
        assert_eq!((left_in.ready, left_in.unacked), (0, 0), "seed {seed}");
        assert_eq!(
            out.len(),
            20,
            "seed {seed}: every message forwarded at least once"
        );
    }
    assert!(crashes >= 3, "{crashes} process crashes over 10 seeds");
}

/// Request-reply in a simulation: the client sends without blocking and takes the reply with
/// `try_reply`; it gives up by the virtual clock, and the reply that comes after is late.
#[test]
fn rpc_calls_in_virtual_time() {
    use coney::rpc::{ReplyMode, Response, RpcClient};
    let mut sim = Simulation::new(31);
    let conn = sim.connect();
    let ch = conn.channel().unwrap();
    declare(&ch, "pricing", FieldTable::new());
    sim.add_service(
        "pricing",
        "pricing",
        ServiceOptions {
            processing_time: Duration::from_millis(300),
            ..ServiceOptions::default()
        },
        |request: &Delivery, ch: &Channel| {
            let price = format!("{} costs 42", String::from_utf8_lossy(request.body()));
            coney::rpc::reply(ch, request, Response::new(price))?;
            request.ack(BasicAckOptions::default())?;
            Ok(())
        },
    )
    .unwrap();
    for mode in [ReplyMode::DirectReplyTo, ReplyMode::ReplyQueue] {
        let client = RpcClient::new(&conn, mode).unwrap();
        let mut first = client
            .send("", "pricing", "apple", BasicProperties::default())
            .unwrap();
        let second = client
            .send("", "pricing", "pear", BasicProperties::default())
            .unwrap();
        assert!(first.try_reply().is_none(), "nothing ran yet");
        sim.run_until_idle().unwrap();
        let reply = first.try_reply().expect("answered").unwrap();
        assert_eq!(&reply.body()[..], b"apple costs 42");
        // The second waits behind the first's 300 ms: the caller gives up at 100 ms.
        sim.run_for(Duration::from_millis(100)).unwrap();
        drop(second);
        sim.run_for(Duration::from_secs(1)).unwrap();
        let mut third = client
            .send("", "pricing", "fig", BasicProperties::default())
            .unwrap();
        sim.run_for(Duration::from_secs(1)).unwrap();
        assert!(third.try_reply().expect("answered").is_ok());
        let stats = client.stats();
        assert_eq!((stats.replies, stats.late), (2, 1), "{mode:?}: {stats:?}");
    }
}
