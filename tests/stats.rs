//! Monitoring: `Broker::stats` counters, gauges, rates on a manual clock, processing-time
//! percentiles, the error rate, and the Prometheus text parsed back.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use coney::stats::RATE_WINDOW_MS;
use coney::*;

fn manual() -> (ManualClock, Broker, Connection, Channel) {
    let clock = ManualClock::new(1_000_000);
    let broker = Broker::builder().clock(clock.clone()).in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    (clock, broker, conn, ch)
}

fn recv(c: &mut Consumer) -> Delivery {
    c.recv_timeout(Duration::from_secs(5)).expect("a delivery")
}

/// Every counter and gauge moves with what happened to the queue's messages.
#[test]
fn counters_and_gauges_follow_the_messages() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    for i in 0..10 {
        publish(&ch, "", "q", &format!("m{i}"));
    }
    let s = broker.stats();
    let q = s.queue("q").unwrap();
    assert_eq!(
        (q.messages_ready, q.messages_unacked, q.consumers),
        (10, 0, 0)
    );
    assert_eq!(q.counters.published, 10);

    ch.basic_qos(4, BasicQosOptions::default()).unwrap();
    let mut c = consume(&ch, "q", "c");
    let first: Vec<Delivery> = (0..4).map(|_| recv(&mut c)).collect();
    let q = broker.stats().queue("q").unwrap().clone();
    assert_eq!(
        (q.messages_ready, q.messages_unacked, q.consumers),
        (6, 4, 1)
    );
    assert_eq!(q.counters.delivered, 4);

    first[0].ack(BasicAckOptions::default()).unwrap();
    first[1].ack(BasicAckOptions::default()).unwrap();
    first[2]
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .unwrap();
    first[3]
        .reject(BasicRejectOptions { requeue: false })
        .unwrap();
    // The rest, the requeued one among them (redelivered), acked as they come.
    for _ in 0..7 {
        recv(&mut c).ack(BasicAckOptions::default()).unwrap();
    }
    let s = broker.stats();
    let q = s.queue("q").unwrap();
    assert_eq!(
        (q.messages_ready, q.messages_unacked),
        (0, 0),
        "all settled"
    );
    let k = &q.counters;
    assert_eq!(
        (k.delivered, k.redelivered, k.acked, k.nacked, k.requeued),
        (11, 1, 9, 2, 1)
    );
    assert_eq!(
        k.dropped.rejected, 1,
        "rejected without a dead-letter exchange"
    );
    assert_eq!(
        q.processing.count(),
        11,
        "every settle by the client is timed"
    );

    // basic.get, both modes, and an empty one.
    ch.basic_cancel("c", BasicCancelOptions::default()).unwrap();
    publish(&ch, "", "q", "g1");
    publish(&ch, "", "q", "g2");
    let got = ch
        .basic_get("q", BasicGetOptions::default())
        .unwrap()
        .unwrap();
    got.delivery.ack(BasicAckOptions::default()).unwrap();
    let _ = ch
        .basic_get("q", BasicGetOptions { no_ack: true })
        .unwrap()
        .unwrap();
    assert!(
        ch.basic_get("q", BasicGetOptions::default())
            .unwrap()
            .is_none()
    );
    let s = broker.stats();
    let k = s.queue("q").unwrap().counters;
    assert_eq!((k.get, k.get_no_ack, k.get_empty), (1, 1, 1));
    assert_eq!(k.delivered_total(), 13);
    assert_eq!(s.totals.counters.published, 12);
    assert_eq!((s.connections, s.channels, s.consumers), (1, 1, 0));
}

/// Rates are exact on a manual clock: the average over the queue's life at first, then over
/// the window from the newest snapshot at least a window old.
#[test]
fn rates_follow_a_manual_clock() {
    let (clock, broker, _conn, ch) = manual();
    declare(&ch, "q");
    for _ in 0..10 {
        publish(&ch, "", "q", "x");
    }
    clock.advance(Duration::from_secs(2));
    let s = broker.stats();
    assert_eq!(s.queue("q").unwrap().rates.published, 5.0, "10 in 2 s");

    clock.advance(Duration::from_millis(RATE_WINDOW_MS));
    for _ in 0..40 {
        publish(&ch, "", "q", "x");
    }
    let mut c = consume(&ch, "q", "c");
    for _ in 0..50 {
        recv(&mut c).ack(BasicAckOptions::default()).unwrap();
    }
    clock.advance(Duration::from_secs(3));
    // The base is the snapshot 8 s ago (at 2 s): 40 publishes and 50 deliveries since.
    let s = broker.stats();
    let r = s.queue("q").unwrap().rates;
    assert_eq!((r.published, r.delivered, r.acked), (5.0, 6.25, 6.25));
    assert_eq!(s.totals.rates.published, 5.0);

    // Nothing happens for a whole window: the rates fall to zero.
    clock.advance(Duration::from_millis(RATE_WINDOW_MS));
    let _ = broker.stats();
    clock.advance(Duration::from_millis(RATE_WINDOW_MS));
    let r = broker.stats().queue("q").unwrap().rates;
    assert_eq!((r.published, r.delivered), (0.0, 0.0));
}

/// The error rate is the share of negative settles in the window.
#[test]
fn error_rate_is_negative_settles_in_the_window() {
    let (clock, broker, _conn, ch) = manual();
    declare(&ch, "q");
    for _ in 0..8 {
        publish(&ch, "", "q", "x");
    }
    let mut c = consume(&ch, "q", "c");
    for i in 0..8 {
        let d = recv(&mut c);
        if i % 4 == 0 {
            d.reject(BasicRejectOptions { requeue: false }).unwrap();
        } else {
            d.ack(BasicAckOptions::default()).unwrap();
        }
    }
    clock.advance(Duration::from_secs(1));
    let s = broker.stats();
    assert_eq!(s.queue("q").unwrap().error_rate, 0.25);
    assert_eq!(s.totals.error_rate, 0.25);
    clock.advance(Duration::from_millis(2 * RATE_WINDOW_MS));
    let _ = broker.stats();
    clock.advance(Duration::from_millis(RATE_WINDOW_MS));
    assert_eq!(
        broker.stats().queue("q").unwrap().error_rate,
        0.0,
        "no settles in the window"
    );
}

/// Processing time runs from delivery to settle on the broker's clock; percentiles come
/// from the histogram (within its 1%).
#[test]
fn processing_time_percentiles() {
    let (clock, broker, _conn, ch) = manual();
    declare(&ch, "q");
    ch.basic_qos(1, BasicQosOptions::default()).unwrap();
    let mut c = consume(&ch, "q", "c");
    // 100 messages, the i-th held for i ms (1..=100).
    for i in 1..=100u64 {
        publish(&ch, "", "q", "x");
        let d = recv(&mut c);
        clock.advance(Duration::from_millis(i));
        d.ack(BasicAckOptions::default()).unwrap();
    }
    let p = broker.stats().queue("q").unwrap().processing.clone();
    assert_eq!(p.count(), 100);
    let close = |got: Duration, ms: u64| {
        let want = ms as f64 / 1000.0;
        (got.as_secs_f64() - want).abs() <= want * 0.01 + 1e-6
    };
    assert!(close(p.p50(), 50), "p50 {:?}", p.p50());
    assert!(close(p.p99(), 99), "p99 {:?}", p.p99());
    assert!(close(p.max(), 100), "max {:?}", p.max());
    assert!(
        close(p.mean(), 50) || close(p.mean(), 51),
        "mean {:?}",
        p.mean()
    );
}

/// A message a closed channel gave back was not processed: it is not timed, nor counted as
/// nacked.
#[test]
fn returns_by_a_closed_channel_are_not_settles() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    publish(&ch, "", "q", "x");
    let other = conn.channel().unwrap();
    let mut c = consume(&other, "q", "c");
    let _d = recv(&mut c);
    other.close();
    let q = broker.stats().queue("q").unwrap().clone();
    assert_eq!((q.counters.nacked, q.processing.count()), (0, 0));
    assert_eq!(q.messages_ready, 1);
}

/// Dead letters count on the queue they left.
#[test]
fn dead_letters_count_by_reason() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "dlq");
    let args = FieldTable::new()
        .with("x-dead-letter-exchange", "")
        .with("x-dead-letter-routing-key", "dlq")
        .with("x-max-length", 1i64);
    ch.queue_declare("work", QueueDeclareOptions::default(), args)
        .unwrap();
    publish(&ch, "", "work", "a");
    publish(&ch, "", "work", "b"); // drops "a" from the head, to the DLQ
    let s = broker.stats();
    assert_eq!(s.queue("work").unwrap().counters.dead_lettered.maxlen, 1);
    assert_eq!(s.queue("dlq").unwrap().messages_ready, 1);
    assert_eq!(s.totals.counters.dead_lettered.maxlen, 1);
}

/// A snapshot never waits for a queue's lock: taken while another holder has it.
#[test]
fn stats_do_not_take_a_queues_lock() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    publish(&ch, "", "q", "x");
    let (tx, rx) = std::sync::mpsc::channel();
    let b = broker.clone();
    std::thread::spawn(move || {
        b.with_queue_locked("q", || {
            let ready = b.stats().queue("q").map(|q| q.messages_ready);
            tx.send(ready).unwrap();
        });
    });
    let ready = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("stats() returned while the queue was locked");
    assert_eq!(ready, Some(1));
}

/// The exposition parses back: every sample belongs to a family declared with HELP and TYPE
/// before it, label values are escaped, and the values are the snapshot's.
#[test]
fn prometheus_text_parses_back() {
    let (clock, broker, _conn, ch) = manual();
    let odd = "orders \"eu\"\\1";
    ch.queue_declare(odd, QueueDeclareOptions::default(), FieldTable::new())
        .unwrap();
    declare(&ch, "q");
    for _ in 0..3 {
        publish(&ch, "", "q", "x");
    }
    publish(&ch, "", odd, "y");
    let got = ch
        .basic_get("q", BasicGetOptions::default())
        .unwrap()
        .unwrap();
    clock.advance(Duration::from_millis(20));
    got.delivery.ack(BasicAckOptions::default()).unwrap();
    let other = broker.connect().channel().unwrap();
    let _c = consume(&other, odd, "c");
    let stats = broker.stats();
    let text = stats.to_prometheus();
    let samples = parse(&text);

    let q = |name: &str, queue: &str| -> f64 {
        let key = (
            name.to_string(),
            vec![
                ("vhost".to_string(), "/".to_string()),
                ("queue".to_string(), queue.to_string()),
            ],
        );
        *samples
            .get(&key)
            .unwrap_or_else(|| panic!("no {name} for {queue} in\n{text}"))
    };
    assert_eq!(q("rabbitmq_queue_messages_ready", "q"), 2.0);
    assert_eq!(q("rabbitmq_queue_messages_unacked", "q"), 0.0);
    assert_eq!(q("rabbitmq_queue_messages_unacked", odd), 1.0);
    assert_eq!(q("rabbitmq_queue_messages", odd), 1.0);
    assert_eq!(q("rabbitmq_queue_consumers", odd), 1.0);
    assert_eq!(q("rabbitmq_queue_consumers", "q"), 0.0);
    assert_eq!(q("rabbitmq_queue_messages_published_total", "q"), 3.0);
    assert_eq!(q("rabbitmq_queue_get_ack_total", "q"), 1.0);
    assert_eq!(q("rabbitmq_queue_messages_delivered_ack_total", odd), 1.0);
    assert_eq!(q("rabbitmq_queue_messages_acked_total", "q"), 1.0);
    assert_eq!(q("coney_queue_processing_seconds_count", "q"), 1.0);
    let p50 = samples[&(
        "coney_queue_processing_seconds".to_string(),
        vec![
            ("vhost".to_string(), "/".to_string()),
            ("queue".to_string(), "q".to_string()),
            ("quantile".to_string(), "0.5".to_string()),
        ],
    )];
    assert!((p50 - 0.020).abs() < 0.001, "p50 {p50}");
    let global = |name: &str| samples[&(name.to_string(), vec![])];
    assert_eq!(global("rabbitmq_queues"), 2.0);
    assert_eq!(global("rabbitmq_connections"), 2.0);
    assert_eq!(global("rabbitmq_channels"), 2.0);
    assert_eq!(global("rabbitmq_consumers"), 1.0);
    assert_eq!(global("coney_publishers_blocked"), 0.0);
    assert_eq!(
        global("rabbitmq_resident_memory_limit_bytes"),
        stats.memory.high_watermark_bytes as f64
    );
}

type Key = (String, Vec<(String, String)>);

/// A strict reader of the text format: families must be declared (HELP then TYPE) before
/// their samples, and a sample's name is its family's or the family's with `_sum` /
/// `_count` (summaries).
fn parse(text: &str) -> HashMap<Key, f64> {
    let mut families: HashMap<String, String> = HashMap::new();
    let mut helped: Option<String> = None;
    let mut out = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            helped = Some(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let name = it.next().unwrap().to_string();
            let kind = it.next().unwrap().to_string();
            assert!(
                ["gauge", "counter", "summary"].contains(&kind.as_str()),
                "{line}"
            );
            assert_eq!(helped.as_deref(), Some(name.as_str()), "HELP before TYPE");
            assert!(families.insert(name, kind).is_none(), "one TYPE per family");
            continue;
        }
        let (name, labels, value) = sample(line);
        let family = families
            .get_key_value(&name)
            .or_else(|| {
                let base = name.strip_suffix("_sum").or(name.strip_suffix("_count"))?;
                families
                    .get_key_value(base)
                    .filter(|(_, k)| *k == "summary")
            })
            .unwrap_or_else(|| panic!("sample of an undeclared family: {line}"));
        assert!(!family.0.is_empty());
        assert!(
            out.insert((name, labels), value).is_none(),
            "duplicate sample {line}"
        );
    }
    out
}

fn sample(line: &str) -> (String, Vec<(String, String)>, f64) {
    let (head, value) = line.rsplit_once(' ').expect("name and value");
    let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
    let Some((name, labels)) = head.split_once('{') else {
        return (head.to_string(), vec![], value);
    };
    let labels = labels.strip_suffix('}').expect("closing brace");
    let mut out = Vec::new();
    let mut chars = labels.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "quoted value in {line}");
        let mut v = String::new();
        loop {
            match chars.next().expect("unterminated label value") {
                '\\' => match chars.next().expect("escape") {
                    'n' => v.push('\n'),
                    c @ ('\\' | '"') => v.push(c),
                    c => panic!("bad escape \\{c} in {line}"),
                },
                '"' => break,
                c => v.push(c),
            }
        }
        out.push((key, v));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    (name.to_string(), out, value)
}

#[cfg(feature = "http")]
mod http {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;

    fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// `GET /metrics` serves the exposition; other paths 404; a closed broker 503.
    #[test]
    fn metrics_over_http() {
        let (broker, _conn, ch) = setup();
        declare(&ch, "q");
        publish(&ch, "", "q", "x");
        let server = coney::stats::serve_prometheus(&broker, "127.0.0.1:0").unwrap();
        let (status, body) = get(server.local_addr(), "/metrics");
        assert_eq!(status, 200);
        let samples = parse(&body);
        let key = (
            "rabbitmq_queue_messages_ready".to_string(),
            vec![
                ("vhost".to_string(), "/".to_string()),
                ("queue".to_string(), "q".to_string()),
            ],
        );
        assert_eq!(samples[&key], 1.0);
        assert_eq!(get(server.local_addr(), "/").0, 404);
        broker.close().unwrap();
        assert_eq!(get(server.local_addr(), "/metrics").0, 503);
    }
}

/// A settle at virtual time 0 is counted like any other (0 is not "unmeasured").
#[test]
fn settles_at_time_zero_are_counted() {
    let clock = ManualClock::new(0);
    let broker = Broker::builder().clock(clock).in_memory();
    let ch = broker.connect().channel().unwrap();
    ch.queue_declare("q", QueueDeclareOptions::default(), FieldTable::new())
        .unwrap();
    ch.basic_publish(
        "",
        "q",
        Default::default(),
        b"m".to_vec(),
        Default::default(),
    )
    .unwrap();
    let mut c = ch
        .basic_consume("q", "", BasicConsumeOptions::default(), FieldTable::new())
        .unwrap();
    recv(&mut c).ack(BasicAckOptions::default()).unwrap();
    let q = broker.stats().queue("q").cloned().unwrap();
    assert_eq!((q.counters.acked, q.processing.count()), (1, 1));
}
