//! Expiry costs O(expired) per tick, not O(queue length).
//!
//! Group `expiry_tick`: a queue with an `x-message-ttl` holds `L` messages whose deadlines are
//! spread 100 per millisecond, on a manual clock. Outside the timed region 100 new messages are
//! published (due one TTL later); the timed step moves the clock by 1 ms, which expires (and
//! drops) exactly the 100 messages due, so the queue stays at `L`. The time per tick is the same for `L` = 1,000 and
//! `L` = 1,000,000. Beside it, `scan_baseline` is what a full scan of the deadlines would cost
//! per tick at the same lengths (a linear pass over a `Vec` of `L` deadlines, cheaper than any
//! real scan of a queue).

use std::hint::black_box;
use std::time::{Duration, Instant};

use coney::{
    BasicProperties, BasicPublishOptions, Broker, Channel, Connection, FieldTable, ManualClock,
    QueueDeclareOptions,
};
use criterion::{BenchmarkId, Criterion, Throughput};

/// Messages due per millisecond (per tick).
const PER_TICK: u64 = 100;
/// Queue lengths compared.
const LENGTHS: [u64; 2] = [1_000, 1_000_000];

struct Rig {
    clock: ManualClock,
    broker: Broker,
    _conn: Connection,
    ch: Channel,
}

impl Rig {
    /// A queue of `len` messages, `PER_TICK` of them due each millisecond from now.
    fn new(len: u64) -> Rig {
        let clock = ManualClock::new(1_700_000_000_000);
        let broker = Broker::builder().clock(clock.clone()).in_memory();
        let conn = broker.connect();
        let ch = conn.channel().unwrap();
        let ttl = i64::try_from(len / PER_TICK).unwrap();
        let args = FieldTable::new().with("x-message-ttl", ttl);
        ch.queue_declare("q", QueueDeclareOptions::default(), args)
            .unwrap();
        let rig = Rig {
            clock,
            broker,
            _conn: conn,
            ch,
        };
        for _ in 0..len / PER_TICK {
            rig.top_up();
            rig.clock.advance(Duration::from_millis(1));
        }
        rig
    }

    fn top_up(&self) {
        for _ in 0..PER_TICK {
            self.ch
                .basic_publish(
                    "",
                    "q",
                    BasicPublishOptions::default(),
                    &b"0123456789abcdef"[..],
                    BasicProperties::default(),
                )
                .unwrap();
        }
    }

    fn expired(&self) -> u64 {
        self.broker.death_stats("q").unwrap().dropped.expired
    }
}

fn expiry_tick(c: &mut Criterion) {
    let mut group = c.benchmark_group("expiry_tick");
    group.throughput(Throughput::Elements(PER_TICK));
    for len in LENGTHS {
        let rig = Rig::new(len);
        group.bench_with_input(BenchmarkId::new("coney_tick", len), &len, |b, _| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    rig.top_up(); // due one TTL from now, at the tail
                    let before = rig.expired();
                    let start = Instant::now();
                    rig.clock.advance(Duration::from_millis(1));
                    spent += start.elapsed();
                    assert_eq!(rig.expired() - before, PER_TICK, "one tick's worth expired");
                }
                spent
            })
        });
        let deadlines: Vec<u64> = (0..len).map(|i| i / PER_TICK).collect();
        group.bench_with_input(BenchmarkId::new("scan_baseline", len), &len, |b, _| {
            b.iter(|| black_box(&deadlines).iter().filter(|&&d| d == 0).count())
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    expiry_tick(&mut c);
    c.final_summary();
}
