//! Dropping a broker whose store failed for lack of space returns within a bounded time: a
//! child process fills a small filesystem (a 4 MiB tmpfs when the test may mount one, which
//! needs root; otherwise a file-size limit, `RLIMIT_FSIZE`, which fails writes past it the same
//! way), sees its store fail, drops the broker and reports how long the drop took. The parent
//! kills a child that does not finish.
//!
//! The child is this test binary re-run with `CONEY_DISK_FULL_DIR` set.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use coney::*;

/// How long the parent waits for the child before calling it hung.
const CHILD_DEADLINE: Duration = Duration::from_secs(60);

/// Children per test: sled hangs on drop only when the failed write is one its close waits
/// for (about one run in seven before the bounded close), so each test tries several times.
const ROUNDS: u32 = 8;

#[test]
fn disk_full_child() {
    let Ok(dir) = std::env::var("CONEY_DISK_FULL_DIR") else {
        return; // not a child run
    };
    if let Ok(limit) = std::env::var("CONEY_DISK_FULL_FSIZE") {
        let limit: u64 = limit.parse().unwrap();
        // SAFETY: plain libc calls on this process's own signal disposition and limits.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let rl = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &rl), 0);
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out).unwrap();
    let broker = Broker::open(&dir).unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("q", durable, FieldTable::new()).unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    let persistent = BasicProperties::default().with_delivery_mode(2);
    let mut failed = false;
    for _ in 0..10_000 {
        let published = ch.basic_publish(
            "",
            "q",
            BasicPublishOptions::default(),
            vec![7u8; 16 * 1024],
            persistent.clone(),
        );
        let confirmed = published.is_ok() && ch.wait_for_confirms().unwrap_or(false);
        if !confirmed || broker.sync().is_err() {
            failed = true;
            break;
        }
    }
    writeln!(out, "FAILED {failed}").unwrap();
    writeln!(out, "HEALTHY {}", broker.health().is_healthy()).unwrap();
    out.flush().unwrap();
    let started = Instant::now();
    drop(ch);
    drop(conn);
    drop(broker);
    writeln!(out, "DROPPED_MS {}", started.elapsed().as_millis()).unwrap();
}

/// Runs the child on `dir`, at most [`CHILD_DEADLINE`]; returns its output.
fn run_child(dir: &Path, fsize: Option<u64>) -> String {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "disk_full_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CONEY_DISK_FULL_DIR", dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(limit) = fsize {
        command.env("CONEY_DISK_FULL_FSIZE", limit.to_string());
    }
    let mut child = command.spawn().unwrap();
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > CHILD_DEADLINE {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the child did not finish within {CHILD_DEADLINE:?}: dropping the broker hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    out
}

fn check(out: &str) {
    assert!(
        out.contains("FAILED true"),
        "the store ran out of space: {out}"
    );
    assert!(
        out.contains("HEALTHY false"),
        "health reports the failure: {out}"
    );
    let dropped_ms: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("DROPPED_MS "))
        .unwrap_or_else(|| panic!("the child finished its drop: {out}"))
        .parse()
        .unwrap();
    assert!(dropped_ms < 30_000, "the drop took {dropped_ms} ms");
}

#[test]
fn dropping_a_broker_after_a_file_size_limit_returns() {
    for round in 0..ROUNDS {
        let dir = std::env::temp_dir().join(format!("coney-fsize-{}-{round}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = run_child(&dir, Some(4 << 20));
        let _ = std::fs::remove_dir_all(&dir);
        check(&out);
    }
}

#[test]
fn dropping_a_broker_on_a_full_tmpfs_returns() {
    for round in 0..ROUNDS {
        let mount =
            std::env::temp_dir().join(format!("coney-tmpfs-{}-{round}", std::process::id()));
        std::fs::create_dir_all(&mount).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(&mount)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            let _ = std::fs::remove_dir(&mount);
            eprintln!("skipped: cannot mount a tmpfs here (needs root); the file-size test runs");
            return;
        }
        let out = run_child(&mount.join("store"), None);
        let _ = Command::new("umount").arg(&mount).status();
        let _ = std::fs::remove_dir(&mount);
        check(&out);
    }
}
