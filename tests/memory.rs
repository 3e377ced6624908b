//! Memory goes back after a drain: a child process fills a queue with a backlog, drains it,
//! and does so again, reporting its resident memory at each point; the parent checks that a
//! drain brings it back near where it started and that a second fill does not grow it further.
//!
//! The child is this test binary re-run with `CONEY_MEMORY_CHILD` set (a process of its own, so
//! other tests' allocations do not blur the figures).

use std::process::Command;

use coney::*;

/// Messages per fill (100-byte bodies); `CONEY_MEMORY_MESSAGES` overrides.
const MESSAGES: u32 = 300_000;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn memory_child() {
    let Ok(messages) = std::env::var("CONEY_MEMORY_CHILD") else {
        return; // not a child run
    };
    let messages: u32 = messages.parse().unwrap();
    let broker = Broker::in_memory();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare("q", QueueDeclareOptions::default(), FieldTable::new())
        .unwrap();
    println!("\nRSS start {}", resident_bytes());
    for round in 0..2 {
        for i in 0..messages {
            let mut body = vec![0u8; 100];
            body[..4].copy_from_slice(&i.to_le_bytes());
            ch.basic_publish(
                "",
                "q",
                Default::default(),
                body,
                BasicProperties::default(),
            )
            .unwrap();
        }
        println!("RSS full{round} {}", resident_bytes());
        let mut consumer = ch
            .basic_consume("q", "", BasicConsumeOptions::default(), FieldTable::new())
            .unwrap();
        for _ in 0..messages {
            consumer
                .recv()
                .expect("a delivery")
                .ack(BasicAckOptions::default())
                .unwrap();
        }
        ch.basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .unwrap();
        drop(consumer);
        println!("RSS drained{round} {}", resident_bytes());
    }
}

#[test]
fn resident_memory_returns_after_a_backlog_drains() {
    let messages: u32 = std::env::var("CONEY_MEMORY_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(MESSAGES);
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["memory_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("CONEY_MEMORY_CHILD", messages.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let figure = |name: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("RSS {name} ")))
            .unwrap_or_else(|| panic!("no {name} figure in {stdout}"))
            .parse()
            .unwrap()
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let (start, full0, drained0, full1, drained1) = (
        figure("start"),
        figure("full0"),
        figure("drained0"),
        figure("full1"),
        figure("drained1"),
    );
    eprintln!(
        "resident MiB: start {:.1}, full {:.1}, drained {:.1}, full again {:.1}, drained again {:.1}",
        mib(start),
        mib(full0),
        mib(drained0),
        mib(full1),
        mib(drained1)
    );
    let grown = full0 - start;
    assert!(grown > u64::from(messages) * 100, "the backlog took memory");
    // Back within a tenth of what the backlog took, plus the last step of the give-back (the
    // broker returns memory in steps of at least 32 MiB of its estimate, so up to that much
    // may stay with the allocator) and a little slack.
    let near = |rss: u64| rss <= start + grown / 10 + (40 << 20);
    assert!(
        near(drained0),
        "after the first drain: {:.1} MiB",
        mib(drained0)
    );
    assert!(
        near(drained1),
        "after the second drain: {:.1} MiB",
        mib(drained1)
    );
    assert!(
        full1 <= full0 + full0 / 10,
        "a second fill grew further: {:.1} then {:.1} MiB",
        mib(full0),
        mib(full1)
    );
}
