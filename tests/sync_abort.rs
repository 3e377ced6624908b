//! An ack followed by `Broker::sync` is durable even when another thread holds the queue's
//! lock at the time of the ack (the ack then waits in the queue's inbox for that thread): a
//! child process acks while a second thread holds the lock, syncs, and aborts; the parent
//! reopens the store and checks that the acked message did not come back.
//!
//! The child is this test binary re-run with `CONEY_SYNC_ABORT_DIR` set.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use coney::*;

const QUEUE: &str = "work";

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

#[test]
fn sync_abort_child() {
    let Ok(dir) = std::env::var("CONEY_SYNC_ABORT_DIR") else {
        return; // not a child run
    };
    let broker = Broker::open(&dir).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare(QUEUE, durable(), FieldTable::new())
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    for i in 0..3u8 {
        ch.basic_publish(
            "",
            QUEUE,
            BasicPublishOptions::default(),
            vec![i],
            BasicProperties::default().with_delivery_mode(2),
        )
        .unwrap();
    }
    assert!(ch.wait_for_confirms().unwrap());
    let first = ch
        .basic_get(QUEUE, BasicGetOptions::default())
        .unwrap()
        .expect("a message")
        .delivery;
    let (locked_tx, locked_rx) = mpsc::channel();
    let holder = {
        let broker = broker.clone();
        thread::spawn(move || {
            broker.with_queue_locked(QUEUE, || {
                locked_tx.send(()).unwrap();
                // Long enough for the ack and the sync below to run while the lock is held,
                // were the sync not to wait for it.
                thread::sleep(Duration::from_millis(300));
            })
        })
    };
    locked_rx.recv().unwrap();
    first.ack(BasicAckOptions::default()).unwrap(); // the lock is held: the ack waits in the queue's inbox
    broker.sync().unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "\nSYNCED").unwrap();
    out.flush().unwrap();
    drop(holder);
    std::process::abort();
}

#[test]
fn an_ack_then_sync_survives_an_abort_while_another_thread_held_the_queue_lock() {
    let dir = std::env::temp_dir().join(format!("coney-sync-abort-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "sync_abort_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CONEY_SYNC_ABORT_DIR", &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l == "SYNCED"),
        "the child synced before aborting: {stdout}"
    );
    assert!(!out.status.success(), "the child aborted");

    let broker = Broker::open(&dir).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    let mut left = Vec::new();
    while let Some(got) = ch.basic_get(QUEUE, BasicGetOptions::default()).unwrap() {
        left.push(got.delivery.body()[0]);
    }
    assert_eq!(
        left,
        [1, 2],
        "the acked message stays acked, the others stay"
    );
    drop(conn);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
