//! The reference application end to end: the services in-process with real threads (the
//! invariant and the counts, with payment failures and with the payment service down for a
//! while), and the real binary killed with SIGKILL or aborting mid-run, then resumed.

#[allow(dead_code, unused_imports)]
#[path = "../src/bin/shop/app.rs"]
mod app;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use app::{Config, Report};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("coney-shop-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(config: &Config) -> Report {
    app::run(config, &mut |_| {}).expect("the run completes")
}

/// The counts every complete run must show.
fn assert_settled(report: &Report, orders: u64) {
    let a = &report.audit;
    assert!(a.holds, "invariant: {:?}", a.violations);
    assert!(!report.timed_out);
    assert_eq!(a.orders, orders);
    assert_eq!(a.paid + a.failed + a.dead_lettered, orders, "none lost");
    assert_eq!(a.stock_updates, a.paid, "one stock update per paid order");
    assert_eq!(a.charges, a.paid, "one charge per paid order");
    assert!(a.paid > orders / 2, "most orders are paid: {}", a.paid);
    assert!(a.failed > 0, "the business rule declines some orders");
    for q in &report.queues {
        assert_eq!((q.ready, q.unacked), (0, 0), "{} drained", q.name);
    }
}

/// With a payment failure rate of 0.2, a request fails its 4 allowed deliveries now and
/// then (seed 1: twice in 800 orders): those orders are dead-lettered with reason
/// `delivery_limit`, every other one is paid or declined, none is lost.
#[test]
fn full_flow_with_payment_failures_dead_letters_some_and_loses_none() {
    let config = Config {
        orders: 800,
        payment_failure_rate: 0.2,
        seed: 1,
        ..Config::default()
    };
    let report = run(&config);
    assert_settled(&report, 800);
    let a = &report.audit;
    assert!(a.dead_lettered > 0, "some orders dead-letter");
    assert_eq!(
        a.dead_letter_reasons.get("delivery_limit").copied(),
        Some(a.dead_lettered),
        "each with reason delivery_limit: {:?}",
        a.dead_letter_reasons
    );
    let payment_queue = &report.queues[0];
    assert_eq!(payment_queue.name, "payment_queue");
    assert_eq!(
        payment_queue.dead_lettered, a.dead_lettered,
        "the broker's count agrees"
    );
    assert_eq!(payment_queue.dropped, 0);
    assert_eq!(
        payment_queue.nacked, report.payment_failures,
        "every failed attempt was nacked"
    );
    assert!(
        (0.1..0.3).contains(&report.error_rate),
        "error rate {} near 0.2",
        report.error_rate
    );
    // Every failure is retried, except a dead-lettered order's 4th: it goes to the
    // dead-letter queue instead.
    assert_eq!(
        report.payment_attempts,
        800 + report.payment_failures - a.dead_lettered
    );
}

/// Without durability (an in-memory broker and unflushed stores) the flow is the same,
/// failures and dead letters included.
#[test]
fn in_memory_run_keeps_the_invariant() {
    let config = Config {
        orders: 500,
        payment_failure_rate: 0.2,
        seed: 7,
        in_memory: true,
        ..Config::default()
    };
    let report = run(&config);
    assert_settled(&report, 500);
    assert!(report.audit.dead_lettered > 0, "some orders dead-letter");
    assert_eq!(report.queues[0].dead_lettered, report.audit.dead_lettered);
}

/// The payment service leaves its queue for a while: requests pile up in `payment_queue`,
/// then drain once it is back, and the invariant holds.
#[test]
fn payment_service_down_then_back_drains_the_backlog() {
    let config = Config {
        orders: 1000,
        rate: Some(2000.0),
        payment_down: Some(Duration::from_millis(700)),
        ..Config::default()
    };
    let mut backlog_while_down = 0u32;
    let mut consumers_seen_down = false;
    let report = app::run(&config, &mut |p| {
        if p.payment_down {
            consumers_seen_down = true;
            backlog_while_down = backlog_while_down.max(p.ready[0]);
        }
    })
    .expect("the run completes");
    assert!(consumers_seen_down, "the payment service went down");
    assert!(
        backlog_while_down > 0,
        "payment_queue grew while the service was down"
    );
    assert_eq!(report.payment_failures, 0);
    assert_settled(&report, 1000);
    assert_eq!(
        report.audit.dead_lettered, 0,
        "no failures, no dead letters"
    );
}

/// The check is not vacuous: a second charge for a paid order and a unit of stock gone
/// astray are each reported, and the invariant fails.
#[test]
fn invariant_check_catches_a_double_charge_and_stock_drift() {
    let dir = TempDir::new("tamper");
    let config = Config {
        orders: 200,
        data: Some(dir.0.clone()),
        ..Config::default()
    };
    let report = run(&config);
    assert_settled(&report, 200);
    let db = sled::open(dir.0.join("shop")).expect("the shop store reopens");
    let db = app::model::ShopDb::new(db, true);
    let orders = app::order::OrderStore::open(&db).unwrap();
    let payments = app::payment::PaymentStore::open(&db).unwrap();
    let inventory = app::inventory::InventoryStore::open(&db).unwrap();
    let clean = app::invariant::check(&orders, &payments, &inventory, 200).unwrap();
    assert!(clean.holds, "{:?}", clean.violations);

    let paid = orders
        .all()
        .map(Result::unwrap)
        .find(|o| o.status == app::order::OrderStatus::Paid)
        .expect("a paid order");
    let charges = db.open_tree("charges").unwrap();
    charges
        .insert(u64::MAX.to_be_bytes(), &paid.id.to_be_bytes())
        .unwrap();
    let stock = db.open_tree("stock").unwrap();
    let item = 0u32.to_be_bytes();
    let units = i64::from_be_bytes(
        stock
            .get(item)
            .unwrap()
            .unwrap()
            .as_ref()
            .try_into()
            .unwrap(),
    );
    stock.insert(item, &(units - 1).to_be_bytes()).unwrap();
    let tampered = app::invariant::check(&orders, &payments, &inventory, 200).unwrap();
    assert!(!tampered.holds);
    let text = tampered.violations.join("\n");
    assert!(
        text.contains(&format!("paid order {} charged 2 times", paid.id)),
        "{text}"
    );
    assert!(text.contains("item 0:"), "{text}");
    assert_eq!(tampered.violation_count, 2, "{text}");
}

fn shop() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shop"));
    cmd.env_remove("RUST_LOG");
    cmd
}

fn json_report(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "shop failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("--json prints a JSON report")
}

fn resume(dir: &Path, orders: u64, extra: &[&str]) -> serde_json::Value {
    let output = shop()
        .args(extra)
        .args([
            "--quiet",
            "--json",
            "--resume",
            "--payment-failure-rate",
            "0.2",
            "--orders",
        ])
        .arg(orders.to_string())
        .arg("--data")
        .arg(dir)
        .output()
        .expect("shop runs");
    json_report(&output)
}

/// The counts of a resumed run's JSON report, over both runs.
fn assert_json_settled(report: &serde_json::Value, orders: u64) {
    let audit = &report["audit"];
    assert_eq!(audit["holds"], true, "invariant: {}", audit["violations"]);
    assert_eq!(report["timed_out"], false);
    assert_eq!(audit["orders"], orders);
    let n = |k: &str| audit[k].as_u64().unwrap();
    assert_eq!(n("paid") + n("failed") + n("dead_lettered"), orders);
    assert_eq!(n("stock_updates"), n("paid"));
    assert_eq!(n("charges"), n("paid"));
    assert_eq!(report["resumed"], true);
}

/// The real binary, killed with SIGKILL mid-run, then resumed: the second run finishes the
/// orders and the invariant holds over both.
#[test]
fn sigkill_mid_run_then_resume_keeps_the_invariant() {
    let dir = TempDir::new("sigkill");
    let orders = 3000u64;
    let mut child = shop()
        .args([
            "--quiet",
            "--rate",
            "2500",
            "--payment-failure-rate",
            "0.2",
            "--orders",
        ])
        .arg(orders.to_string())
        .arg("--data")
        .arg(&dir.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("shop starts");
    // Kill it once it has created orders (its store exists), well before it can finish.
    let started = Instant::now();
    while !dir.0.join("shop").exists() && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = i32::try_from(child.id()).expect("a pid fits an i32");
    // SAFETY: kill(2) on our own child's pid, which we have not waited for yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = child.wait().expect("the child is reaped");
    assert!(!status.success(), "killed mid-run, not finished: {status}");
    let report = resume(&dir.0, orders, &[]);
    assert_json_settled(&report, orders);
    assert!(
        report["created_this_run"].as_u64().unwrap() > 0,
        "the kill came before every order was created"
    );
}

/// `--crash-after N` aborts the process after N orders; `--resume` creates the rest.
#[test]
fn crash_after_then_resume_creates_the_rest() {
    let dir = TempDir::new("crash-after");
    let status = shop()
        .args([
            "--quiet",
            "--orders",
            "1500",
            "--crash-after",
            "500",
            "--payment-failure-rate",
            "0.2",
            "--data",
        ])
        .arg(&dir.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("shop runs");
    assert!(!status.success(), "it aborted: {status}");
    let report = resume(&dir.0, 1500, &[]);
    assert_json_settled(&report, 1500);
    assert_eq!(report["created_this_run"], 1000);
}

/// Request-reply mode: each payment is a `coney::rpc` call answered on the caller's direct
/// reply-to address; results never go through `order_queue`. Only the calls whose request was
/// dead-lettered go unanswered (and are made again, then settled by the dead-letter watcher).
#[test]
fn request_reply_mode_keeps_the_invariant() {
    let config = Config {
        orders: 800,
        payment_failure_rate: 0.2,
        seed: 1,
        mode: app::Mode::RequestReply,
        ..Config::default()
    };
    let report = run(&config);
    assert_settled(&report, 800);
    assert_eq!(report.mode, "request-reply");
    assert!(report.audit.dead_lettered > 0);
    assert!(report.rpc_timeouts >= report.audit.dead_lettered);
    let order_queue = &report.queues[1];
    assert_eq!(order_queue.name, "order_queue");
    assert_eq!(order_queue.published, 0, "results came back as replies");
}

/// Request-reply mode across `--crash-after` and `--resume`: the replies to the first process
/// are gone, so the resumed run calls every open order again and sends again the stock updates
/// it cannot know were confirmed; the invariant holds over both runs.
#[test]
fn request_reply_crash_after_then_resume() {
    let dir = TempDir::new("rr-crash-after");
    let status = shop()
        .args([
            "--quiet",
            "--mode",
            "request-reply",
            "--orders",
            "1200",
            "--crash-after",
            "600",
            "--data",
        ])
        .arg(&dir.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("shop runs");
    assert!(!status.success(), "it aborted: {status}");
    let report = resume(&dir.0, 1200, &["--mode", "request-reply"]);
    assert_json_settled(&report, 1200);
    assert_eq!(report["mode"], "request-reply");
    assert_eq!(report["created_this_run"], 600);
}

/// A plain run of the binary with `--json` reports that the invariant holds.
#[test]
fn binary_json_report_says_the_invariant_holds() {
    let output = shop()
        .args(["--quiet", "--json", "--orders", "300"])
        .output()
        .expect("shop runs");
    let report = json_report(&output);
    assert_eq!(report["audit"]["holds"], true);
    assert_eq!(report["audit"]["orders"], 300);
    assert_eq!(report["mode"], "fire-and-forget");
    assert_eq!(report["queues"].as_array().map(Vec::len), Some(4));
}

/// A run that cannot settle before its deadline says so, lists what is missing, and exits 1.
/// Payment goes down (a quarter of the way through the orders) for longer than the deadline,
/// so orders stay pending; on a loaded machine the deadline may even come before the first
/// order is placed, and then the report says how many were never created.
#[test]
fn deadline_reports_what_is_missing_and_fails() {
    let output = shop()
        .args([
            "--quiet",
            "--json",
            "--orders",
            "2000",
            "--payment-down-secs",
            "60",
            "--deadline-secs",
            "1",
        ])
        .output()
        .expect("shop runs");
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    assert_eq!(report["timed_out"], true);
    assert_eq!(report["audit"]["holds"], false);
    let orders = report["audit"]["orders"].as_u64().expect("an order count");
    let pending = report["audit"]["pending"]
        .as_u64()
        .expect("a pending count");
    let violations = report["audit"]["violations"].to_string();
    if orders == 0 {
        assert!(
            violations.contains("0 orders created, 2000 asked for"),
            "{violations}"
        );
    } else {
        assert!(
            pending > 0 && pending <= orders,
            "{pending} of {orders} pending"
        );
        assert!(
            violations.contains(&format!("{pending} orders never reached a final state")),
            "{violations}"
        );
    }
}

/// Bad flags are refused with a message and exit code 2, never a panic.
#[test]
fn bad_flags_are_refused_clearly() {
    for (args, expected) in [
        (
            &["--payment-failure-rate", "2"][..],
            "--payment-failure-rate",
        ),
        (&["--orders", "many"][..], "--orders"),
        (&["--rate", "0"][..], "--rate"),
        (&["--resume"][..], "--data"),
        (&["--in-memory", "--crash-after", "5"][..], "--in-memory"),
        (&["--payment-down-secs=-1"][..], "--payment-down-secs"),
    ] {
        let output = shop().args(args).output().expect("shop runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
