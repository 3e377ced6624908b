//! The reference application: an order, a payment and an inventory service on one embedded,
//! durable broker, a load of orders, faults on demand, and a report that checks nothing was
//! lost or done twice. This file parses flags, shows progress and prints the report; the
//! shop itself is in `app.rs`.

mod app;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

use app::{Config, Mode, Progress};

/// Orders through payment and inventory services on an embedded coney broker.
#[derive(Debug, Parser)]
#[command(
    name = "shop",
    version,
    about = "Orders through payment and inventory services on an embedded coney broker, \
             with a report that checks none was lost or processed twice"
)]
struct Flags {
    /// Orders in all (a resumed run creates the missing ones).
    #[arg(long, default_value_t = 20_000)]
    orders: u64,
    /// Orders created per second (default: as fast as they go).
    #[arg(long)]
    rate: Option<f64>,
    /// Probability that one payment attempt fails (retried up to 3 times, then
    /// dead-lettered).
    #[arg(long, default_value_t = 0.0)]
    payment_failure_rate: f64,
    /// Seeds order contents and payment failures.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// How the order service asks for payments.
    #[arg(long, value_enum, default_value_t = ModeFlag::FireAndForget)]
    mode: ModeFlag,
    /// Data directory (broker and service stores); default: a temporary one, removed at
    /// the end.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Takes the payment service off its queue for this many seconds mid-run.
    #[arg(long)]
    payment_down_secs: Option<f64>,
    /// Aborts the process after this many orders are created (then run again with
    /// --resume).
    #[arg(long)]
    crash_after: Option<u64>,
    /// Reopens --data and finishes the run found there, checking the invariant over both.
    #[arg(long)]
    resume: bool,
    /// Prints the report as JSON.
    #[arg(long)]
    json: bool,
    /// No progress line, and only errors logged (RUST_LOG still applies).
    #[arg(long)]
    quiet: bool,
    /// Gives up after this many seconds, reporting what is missing.
    #[arg(long, default_value_t = 300)]
    deadline_secs: u64,
    /// Runs without durability (an in-memory broker, service stores never flushed), to see
    /// what durability costs
    #[arg(long)]
    in_memory: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeFlag {
    FireAndForget,
    RequestReply,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    init_logging(flags.quiet);
    let config = match config(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shop: {e}");
            return ExitCode::from(2);
        }
    };
    let mut line = ProgressLine::new(!flags.quiet && std::io::stderr().is_terminal());
    let result = app::run(&config, &mut |p| line.show(p));
    line.finish();
    match result {
        Ok(report) => {
            if flags.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("the report serializes")
                );
            } else {
                print!("{}", report.to_table());
            }
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("shop: {e}");
            ExitCode::from(2)
        }
    }
}

fn config(flags: &Flags) -> Result<Config, String> {
    let payment_down = match flags.payment_down_secs {
        Some(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(format!(
                "--payment-down-secs must be a non-negative number, not {s}"
            ));
        }
        None => None,
    };
    if flags.crash_after == Some(0) {
        return Err("--crash-after must be at least 1".into());
    }
    Ok(Config {
        orders: flags.orders,
        rate: flags.rate,
        payment_failure_rate: flags.payment_failure_rate,
        seed: flags.seed,
        mode: match flags.mode {
            ModeFlag::FireAndForget => Mode::FireAndForget,
            ModeFlag::RequestReply => Mode::RequestReply,
        },
        data: flags.data.clone(),
        payment_down,
        crash_after: flags.crash_after,
        resume: flags.resume,
        deadline: Duration::from_secs(flags.deadline_secs),
        in_memory: flags.in_memory,
    })
}

/// Logs to stderr at `warn` by default: a payment that fails its last attempt (and is
/// dead-lettered) is worth a line; retries and the broker's own dead-letter notes are `info`,
/// one per event, too many to show by default. The rpc client's notes of late replies are
/// left out too: in request-reply mode a call that timed out is made again, so the late
/// reply to the first one is expected. `RUST_LOG` overrides.
fn init_logging(quiet: bool) {
    let default = if quiet {
        "error"
    } else {
        "warn,coney::rpc=error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The live line on stderr: redrawn in place, at most five times a second.
struct ProgressLine {
    on: bool,
    last: Option<Instant>,
    drawn: bool,
}

impl ProgressLine {
    fn new(on: bool) -> Self {
        Self {
            on,
            last: None,
            drawn: false,
        }
    }

    fn show(&mut self, p: &Progress) {
        if !self.on
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        self.last = Some(Instant::now());
        let settled = p.paid + p.failed + p.dead_lettered;
        let rate = settled as f64 / p.elapsed.as_secs_f64().max(1e-3);
        let down = if p.payment_down {
            "  [payment DOWN]"
        } else {
            ""
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[Kcreated {} paid {} failed {} dead-lettered {} stock {} | ready: payment {} order {} inventory {} dlq {} | {:.0} orders/s{down}",
            p.created,
            p.paid,
            p.failed,
            p.dead_lettered,
            p.stock_updates,
            p.ready[0],
            p.ready[1],
            p.ready[2],
            p.ready[3],
            rate
        );
        let _ = err.flush();
        self.drawn = true;
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
        }
    }
}
