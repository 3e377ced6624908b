//! Message TTL, queue TTL and the delayed-retry topology (SEMANTICS.md §6.3, §7.1, §7.2), all
//! on a manual clock: time moves only when a test moves it, and timers due run before
//! `advance` returns.

mod common;

use std::time::Duration;

use common::*;
use coney::store::MemoryStore;
use coney::*;

const START: u64 = 1_700_000_000_000;

fn manual() -> (ManualClock, Broker, Connection, Channel) {
    let clock = ManualClock::new(START);
    let broker = Broker::builder().clock(clock.clone()).in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    (clock, broker, conn, ch)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn ttl(n: i64) -> FieldTable {
    FieldTable::new().with("x-message-ttl", n)
}

fn publish_expiring(ch: &Channel, queue: &str, body: &str, expiration: &str) {
    let props = BasicProperties::default().with_expiration(expiration);
    ch.basic_publish(
        "",
        queue,
        Default::default(),
        body.as_bytes().to_vec(),
        props,
    )
    .unwrap();
}

/// §7.1: a queue's `x-message-ttl` expires messages at their deadline (enqueue + TTL, the
/// deadline itself included); an expired message is never returned by `basic.get`.
#[test]
fn queue_ttl_expires_at_the_deadline() {
    let (clock, broker, _conn, ch) = manual();
    declare_args(&ch, "q", ttl(1000));
    publish(&ch, "", "q", "a");
    clock.advance(ms(999));
    assert_eq!(ready(&ch, "q"), 1);
    clock.advance(ms(1));
    assert_eq!(ready(&ch, "q"), 0, "expired at enqueue + TTL");
    assert!(get(&ch, "q").is_none());
    let stats = broker.death_stats("q").unwrap();
    assert_eq!(
        stats.dropped.expired, 1,
        "no DLX: dropped, counted as expired"
    );
    broker.check_invariants().unwrap();
}

/// §7.1 (`publishAndGetWithExpiry`): with TTL 200 ms, A at 0, B at 150, C at 250 → a get at
/// 250 returns B then C, then nothing.
#[test]
fn publish_and_get_with_expiry() {
    let (clock, _broker, _conn, ch) = manual();
    declare_args(&ch, "q", ttl(200));
    publish(&ch, "", "q", "A");
    clock.advance(ms(150));
    publish(&ch, "", "q", "B");
    clock.advance(ms(100));
    publish(&ch, "", "q", "C");
    assert_eq!(get_all(&ch, "q"), ["B", "C"]);
}

/// §7.1: the per-message `expiration` and the queue TTL: the lower applies.
#[test]
fn the_lower_of_queue_and_message_ttl_applies() {
    let (clock, _broker, _conn, ch) = manual();
    declare_args(&ch, "q", ttl(1000));
    publish_expiring(&ch, "q", "short", "100");
    publish_expiring(&ch, "q", "long", "5000");
    clock.advance(ms(100));
    assert_eq!(ready(&ch, "q"), 1, "'short' expired after its own 100 ms");
    clock.advance(ms(900));
    assert_eq!(
        ready(&ch, "q"),
        0,
        "'long' expired after the queue's 1000 ms"
    );
}

/// §7.1: only the head expires: a short-TTL message behind a long-TTL one stays counted until
/// it reaches the head, and is never delivered once expired.
#[test]
fn expiry_happens_at_the_head_only() {
    let (clock, _broker, _conn, ch) = manual();
    declare(&ch, "q");
    publish_expiring(&ch, "q", "long", "10000");
    publish_expiring(&ch, "q", "short", "10");
    clock.advance(ms(100));
    assert_eq!(ready(&ch, "q"), 2, "the expired one is behind a live head");
    let head = get(&ch, "q").expect("the head is alive");
    assert_eq!(body(&head), "long");
    assert!(
        get(&ch, "q").is_none(),
        "the expired one is never delivered"
    );
    assert_eq!(ready(&ch, "q"), 0);
}

/// §7.1 (`zeroTTLDelivery`): a TTL of 0 delivers only to a consumer that can take the message
/// at once; otherwise it expires on arrival.
#[test]
fn zero_ttl_goes_to_a_ready_consumer_or_nowhere() {
    let (_clock, broker, _conn, ch) = manual();
    declare_args(&ch, "q", ttl(0));
    publish(&ch, "", "q", "nobody");
    assert_eq!(ready(&ch, "q"), 0, "expired on arrival");
    let mut c = consume(&ch, "q", "c");
    publish(&ch, "", "q", "taken");
    assert_eq!(drain_bodies(&mut c), ["taken"]);
    assert_eq!(broker.death_stats("q").unwrap().dropped.expired, 1);
}

/// §7.1: a TTL-0 message that could not go to a consumer as it arrived (it waited behind
/// another) has expired, even for a consumer arriving in the same millisecond; get-ok's count
/// leaves out an expired message at the new head.
#[test]
fn zero_ttl_behind_another_expires() {
    let (_clock, broker, _conn, ch) = manual();
    declare(&ch, "q");
    publish(&ch, "", "q", "a");
    publish_expiring(&ch, "q", "b", "0");
    let mut c = consume(&ch, "q", "c");
    assert_eq!(drain_bodies(&mut c), ["a"]);
    assert_eq!(broker.death_stats("q").unwrap().dropped.expired, 1);

    declare(&ch, "g");
    publish(&ch, "", "g", "a");
    publish_expiring(&ch, "g", "b", "0");
    let got = ch
        .basic_get("g", BasicGetOptions::default())
        .unwrap()
        .unwrap();
    assert_eq!(
        got.message_count, 0,
        "'b' expired at the new head, not counted"
    );
}

/// §7.1, §4.3: a requeued message keeps its deadline; a TTL-0 message requeued expires at once.
#[test]
fn requeue_keeps_the_original_deadline() {
    let (clock, broker, _conn, ch) = manual();
    declare_args(&ch, "q", ttl(1000));
    publish(&ch, "", "q", "m");
    let d = get(&ch, "q").unwrap();
    clock.advance(ms(1000)); // expires while unacked: nothing happens to it yet
    d.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .unwrap();
    assert!(get(&ch, "q").is_none(), "back past its deadline: expired");
    assert_eq!(broker.death_stats("q").unwrap().dropped.expired, 1);

    declare_args(&ch, "zero", ttl(0));
    let mut c = consume(&ch, "zero", "c");
    publish(&ch, "", "zero", "z");
    let d = c.try_recv().unwrap();
    d.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .unwrap();
    assert!(
        drain(&mut c).is_empty(),
        "a requeued TTL-0 message expires at once"
    );
    assert_eq!(ready(&ch, "zero"), 0);
}

/// §5.2, §5.3, §5.4: expired messages are dead-lettered with reason `expired`, by the timer
/// alone (no operation on the queue), with the `expiration` property removed and recorded as
/// `original-expiration`.
#[test]
fn expired_messages_are_dead_lettered_by_the_timer() {
    let (clock, broker, _conn, ch) = manual();
    declare(&ch, "dlq");
    let args = ttl(500)
        .with("x-dead-letter-exchange", "")
        .with("x-dead-letter-routing-key", "dlq");
    declare_args(&ch, "q", args);
    let mut c = consume(&ch, "dlq", "c");
    publish(&ch, "", "q", "a");
    publish_expiring(&ch, "q", "b", "200");
    clock.advance(ms(200));
    assert!(drain(&mut c).is_empty(), "'b' is behind a live head");
    clock.advance(ms(300));
    let got = drain(&mut c);
    assert_eq!(bodies(&got), ["a", "b"], "both went when the head expired");
    let b = &got[1];
    assert_eq!(b.properties().expiration, None, "expiration removed");
    let x = death(b, 0);
    assert_eq!(text(&x, "reason"), Some("expired"));
    assert_eq!(text(&x, "queue"), Some("q"));
    assert_eq!(text(&x, "original-expiration"), Some("200"));
    assert_eq!(death(&got[0], 0).get("original-expiration"), None);
    let stats = broker.death_stats("q").unwrap();
    assert_eq!(stats.dead_lettered.expired, 2);
    assert_eq!(stats.dropped, ReasonCounts::default());
}

/// §5.5 (`dead_letter_routing_key_cycle_ttl`): a message that expires back into the queue it
/// expired from, with no rejection in between, is dropped.
#[test]
fn an_expiry_cycle_is_dropped() {
    let (clock, broker, _conn, ch) = manual();
    declare_args(&ch, "q", ttl(10).with("x-dead-letter-exchange", ""));
    publish(&ch, "", "q", "m");
    clock.advance(ms(10));
    assert_eq!(ready(&ch, "q"), 0, "dropped, not cycled back");
    let stats = broker.death_stats("q").unwrap();
    assert_eq!(stats.dropped.expired, 1);
    assert_eq!(stats.dead_lettered.expired, 0);
}

/// §6.3: the classic delayed-retry loop. A rejection in W goes to W.retry, which holds it for
/// its TTL and dead-letters it back to W: retries come exactly one delay apart in virtual time
/// and `x-death` counts the round trips.
#[test]
fn delayed_retry_through_a_wait_queue() {
    let (clock, _broker, _conn, ch) = manual();
    declare_args(
        &ch,
        "W",
        FieldTable::new()
            .with("x-dead-letter-exchange", "")
            .with("x-dead-letter-routing-key", "W.retry"),
    );
    declare_args(
        &ch,
        "W.retry",
        ttl(5000)
            .with("x-dead-letter-exchange", "")
            .with("x-dead-letter-routing-key", "W"),
    );
    let mut c = consume(&ch, "W", "worker");
    publish(&ch, "", "W", "job");
    let mut seen_at = Vec::new();
    for round in 0..3u64 {
        let d = c.try_recv().expect("the job is back");
        seen_at.push(START + round * 5000);
        if round > 0 {
            let w_retry = death(&d, 0);
            assert_eq!(text(&w_retry, "queue"), Some("W.retry"));
            assert_eq!(text(&w_retry, "reason"), Some("expired"));
            assert_eq!(w_retry.get("count"), Some(&FieldValue::I64(round as i64)));
            let w = death(&d, 1);
            assert_eq!(text(&w, "reason"), Some("rejected"));
            assert_eq!(w.get("count"), Some(&FieldValue::I64(round as i64)));
        }
        d.reject(BasicRejectOptions::default()).unwrap();
        clock.advance(ms(4999));
        assert!(c.try_recv().is_err(), "not before the delay");
        clock.advance(ms(1));
    }
    assert_eq!(seen_at, [START, START + 5000, START + 10_000]);
}

/// §7.2: `x-expires` deletes a queue unused for that long; a consumer, a `basic.get` or a
/// redeclare keep it; its messages are not dead-lettered.
#[test]
fn unused_queue_expires() {
    let (clock, broker, _conn, ch) = manual();
    // Not a passive declare: that would renew the lease.
    let exists = |b: &Broker| b.death_stats("q").is_some();
    declare(&ch, "dlq");
    let args = FieldTable::new()
        .with("x-expires", 1000i32)
        .with("x-dead-letter-exchange", "")
        .with("x-dead-letter-routing-key", "dlq");
    declare_args(&ch, "q", args.clone());
    publish(&ch, "", "q", "m");
    clock.advance(ms(600));
    assert!(get(&ch, "q").is_some(), "a get uses the queue");
    clock.advance(ms(600));
    assert!(exists(&broker), "1200 ms after declare, 600 after the get");
    declare_args(&ch, "q", args.clone()); // a redeclare renews too
    clock.advance(ms(999));
    assert!(exists(&broker));
    let c = consume(&ch, "q", "c");
    clock.advance(ms(5000));
    assert!(exists(&broker), "a consumer keeps it in use");
    drop(c);
    clock.advance(ms(999));
    assert!(exists(&broker));
    clock.advance(ms(1));
    assert!(
        !exists(&broker),
        "unused for 1000 ms since its consumer left"
    );
    assert_eq!(ready(&ch, "dlq"), 0, "its messages are not dead-lettered");
}

/// §7.1 with §9.2: a persistent message's deadline survives a restart (it is computed from
/// the recorded enqueue time).
#[test]
fn deadlines_survive_a_restart() {
    let store = MemoryStore::new();
    let clock = ManualClock::new(START);
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    {
        let broker = Broker::builder()
            .clock(clock.clone())
            .open_store(store.clone())
            .unwrap();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        ch.queue_declare("q", durable, ttl(1000)).unwrap();
        let props = BasicProperties::default().with_delivery_mode(2);
        for b in ["a", "b"] {
            ch.basic_publish(
                "",
                "q",
                Default::default(),
                b.as_bytes().to_vec(),
                props.clone(),
            )
            .unwrap();
            clock.advance(ms(400));
        }
        broker.sync().unwrap();
    }
    store.crash();
    let broker = Broker::builder()
        .clock(clock.clone())
        .open_store(store)
        .unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    assert_eq!(ready(&ch, "q"), 2);
    clock.advance(ms(200)); // 1000 ms after 'a' was published
    assert_eq!(ready(&ch, "q"), 1, "'a' expired on its original deadline");
    clock.advance(ms(400));
    assert_eq!(ready(&ch, "q"), 0);
}

/// A clock that moves by itself (as the system clock does) and never calls back: the broker
/// watches it with its own timer thread.
#[derive(Clone, Default)]
struct SelfMovingClock(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Clock for SelfMovingClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// §7.1 on a clock without callbacks (the system clock's case): the broker's timer thread
/// notices the deadline and dead-letters the expired message with no operation on the queue.
#[test]
fn the_timer_thread_expires_messages_on_a_self_moving_clock() {
    let clock = SelfMovingClock::default();
    clock.0.store(START, std::sync::atomic::Ordering::SeqCst);
    let broker = Broker::builder().clock(clock.clone()).in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    declare(&ch, "dlq");
    let args = ttl(50)
        .with("x-dead-letter-exchange", "")
        .with("x-dead-letter-routing-key", "dlq");
    declare_args(&ch, "q", args);
    let mut c = consume(&ch, "dlq", "c");
    publish(&ch, "", "q", "m");
    clock.0.fetch_add(50, std::sync::atomic::Ordering::SeqCst);
    // The thread wakes by the deadline it computed (50 ms of real time at most) and finds the
    // clock past it.
    let d = c
        .recv_timeout(WAIT)
        .expect("expired into dlq by the timer thread");
    assert_eq!(body(&d), "m");
    assert_eq!(text(&death(&d, 0), "reason"), Some("expired"));
}
