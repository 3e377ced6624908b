//! The shop as a library: its configuration and [`run`], which opens the broker and the
//! services' store, starts the services as threads, creates the orders, injects the faults
//! asked for, waits until every order is settled and the queues are empty, and checks the
//! invariant. `main.rs` parses flags and prints; the tests include this module.

#[path = "error.rs"]
pub mod error;
#[path = "invariant.rs"]
pub mod invariant;
#[path = "inventory.rs"]
pub mod inventory;
#[path = "model.rs"]
pub mod model;
#[path = "order.rs"]
pub mod order;
#[path = "payment.rs"]
pub mod payment;
#[path = "report.rs"]
pub mod report;
#[path = "request_reply.rs"]
pub mod request_reply;
#[path = "service.rs"]
pub mod service;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use coney::{Broker, Channel, ConfirmSelectOptions, ExchangeKind, FieldTable, QueueDeclareOptions};

pub use error::AppError;
use inventory::{InventoryService, InventoryStore};
use model::{
    DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, INVENTORY_QUEUE, ORDER_QUEUE, PAYMENT_DELIVERY_LIMIT,
    PAYMENT_QUEUE, QUEUES, ShopDb,
};
use order::{DeadLetterService, OrderService, OrderStatus, OrderStore};
use payment::{PaymentService, PaymentStore};
pub use report::Report;
use service::{Control, Service, SharedTally, Tally};

/// How the order service gets its payments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Publish the request to `payment_queue`, read the result from `order_queue` later.
    FireAndForget,
    /// Call the payment service and wait for its reply (`coney::rpc`).
    RequestReply,
}

impl Mode {
    /// Its flag spelling.
    pub fn name(self) -> &'static str {
        match self {
            Mode::FireAndForget => "fire-and-forget",
            Mode::RequestReply => "request-reply",
        }
    }
}

/// What a run does.
#[derive(Clone, Debug)]
pub struct Config {
    /// Orders in all (a resumed run creates those missing).
    pub orders: u64,
    /// Orders created per second; `None`: as fast as they go.
    pub rate: Option<f64>,
    /// Probability that one payment attempt fails.
    pub payment_failure_rate: f64,
    /// Seeds every draw (order contents, payment failures).
    pub seed: u64,
    /// How payments are asked for.
    pub mode: Mode,
    /// The data directory; `None`: a fresh temporary one, removed at the end.
    pub data: Option<PathBuf>,
    /// Takes the payment service off its queue for this long, once a quarter of the orders
    /// are created.
    pub payment_down: Option<Duration>,
    /// Aborts the process after this many orders created by this run.
    pub crash_after: Option<u64>,
    /// Reopens `data` and finishes the run found there.
    pub resume: bool,
    /// Gives up (and reports what is missing) after this long.
    pub deadline: Duration,
    /// Runs without durability: an in-memory broker, and service stores never flushed (to
    /// measure what durability costs; a crash loses everything).
    pub in_memory: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            orders: 20_000,
            rate: None,
            payment_failure_rate: 0.0,
            seed: 42,
            mode: Mode::FireAndForget,
            data: None,
            payment_down: None,
            crash_after: None,
            in_memory: false,
            resume: false,
            deadline: Duration::from_secs(300),
        }
    }
}

/// What [`run`] reports while it goes.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Orders created.
    pub created: u64,
    /// Paid.
    pub paid: u64,
    /// Declined.
    pub failed: u64,
    /// Dead-lettered.
    pub dead_lettered: u64,
    /// Stock updates applied.
    pub stock_updates: u64,
    /// Ready messages per queue, as [`QUEUES`].
    pub ready: [u32; 4],
    /// Whether the payment service is off its queue.
    pub payment_down: bool,
    /// Since the run started.
    pub elapsed: Duration,
}

/// Orders created per batch: one store flush and one wait for confirms each.
const CREATE_BATCH: u64 = 256;
/// How often the run looks at its progress.
const TICK: Duration = Duration::from_millis(50);

/// Runs the shop as `config` says, calling `on_progress` every tick.
pub fn run(config: &Config, on_progress: &mut dyn FnMut(&Progress)) -> Result<Report, AppError> {
    validate(config)?;
    let dir = DataDir::new(config)?;
    let result = run_in(config, dir.path(), on_progress);
    drop(dir);
    result
}

fn validate(config: &Config) -> Result<(), AppError> {
    if !(0.0..=1.0).contains(&config.payment_failure_rate) {
        return Err(AppError::Usage(format!(
            "--payment-failure-rate must be within 0..=1, not {}",
            config.payment_failure_rate
        )));
    }
    if let Some(rate) = config.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(AppError::Usage(format!(
            "--rate must be a positive number, not {rate}"
        )));
    }
    if config.in_memory && (config.resume || config.crash_after.is_some() || config.data.is_some())
    {
        return Err(AppError::Usage(
            "--in-memory keeps nothing to resume from: it goes with neither --data, --crash-after nor --resume".into(),
        ));
    }
    if config.resume && config.data.is_none() {
        return Err(AppError::Usage(
            "--resume needs --data DIR (the directory of the run to finish)".into(),
        ));
    }
    Ok(())
}

/// The data directory: given, or a temporary one removed when dropped.
struct DataDir {
    path: PathBuf,
    temporary: bool,
}

impl DataDir {
    fn new(config: &Config) -> Result<DataDir, AppError> {
        let (path, temporary) = match &config.data {
            Some(path) => (path.clone(), false),
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                let name = format!("coney-shop-{}-{nanos}", std::process::id());
                (std::env::temp_dir().join(name), true)
            }
        };
        let shop = path.join("shop");
        if config.resume && !shop.exists() {
            return Err(AppError::Usage(format!(
                "--resume: {} holds no shop run",
                path.display()
            )));
        }
        if !config.resume && shop.exists() {
            return Err(AppError::Usage(format!(
                "{} holds an earlier run: pass --resume to finish it, or another --data",
                path.display()
            )));
        }
        std::fs::create_dir_all(&path).map_err(|source| AppError::Io {
            what: format!("creating {}", path.display()),
            source,
        })?;
        Ok(DataDir { path, temporary })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The shop's queues and dead-letter exchange, all durable, none exclusive or auto-delete.
pub fn declare_topology(channel: &Channel) -> Result<(), AppError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.exchange_declare(
        DEAD_LETTER_EXCHANGE,
        ExchangeKind::Fanout,
        coney::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::new(),
    )?;
    channel.queue_declare(DEAD_LETTER_QUEUE, durable, FieldTable::new())?;
    channel.queue_bind(
        DEAD_LETTER_QUEUE,
        DEAD_LETTER_EXCHANGE,
        "",
        Default::default(),
        FieldTable::new(),
    )?;
    let payment_args = FieldTable::new()
        .with("x-queue-type", "quorum")
        .with("x-delivery-limit", i64::from(PAYMENT_DELIVERY_LIMIT))
        .with("x-dead-letter-exchange", DEAD_LETTER_EXCHANGE);
    channel.queue_declare(PAYMENT_QUEUE, durable, payment_args)?;
    channel.queue_declare(ORDER_QUEUE, durable, FieldTable::new())?;
    channel.queue_declare(INVENTORY_QUEUE, durable, FieldTable::new())?;
    Ok(())
}

/// A service running on its thread.
struct Running {
    name: &'static str,
    control: Arc<Control>,
    thread: JoinHandle<Result<(), AppError>>,
}

fn start(broker: &Broker, service: impl Service) -> Result<Running, AppError> {
    let name = service.name();
    let control = Arc::new(Control::default());
    let thread = {
        let broker = broker.clone();
        let control = control.clone();
        std::thread::Builder::new()
            .name(format!("shop-{name}"))
            .spawn(move || service::run(&broker, service, &control))
            .map_err(|source| AppError::Io {
                what: format!("starting {name}"),
                source,
            })?
    };
    Ok(Running {
        name,
        control,
        thread,
    })
}

fn stop_all(services: Vec<Running>) -> Result<(), AppError> {
    for s in &services {
        s.control.stop();
    }
    let mut first = Ok(());
    for s in services {
        let r = s.thread.join().unwrap_or(Err(AppError::Panicked(s.name)));
        if first.is_ok() {
            first = r;
        }
    }
    first
}

fn run_in(
    config: &Config,
    dir: &Path,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<Report, AppError> {
    let started = Instant::now();
    let (broker, db) = if config.in_memory {
        // A temporary sled database skips the sync of each log write; nothing flushes it.
        let db = sled::Config::new()
            .path(dir.join("shop"))
            .temporary(true)
            .flush_every_ms(None)
            .open()?;
        (Broker::in_memory(), ShopDb::new(db, false))
    } else {
        let db = sled::Config::new().path(dir.join("shop")).open()?;
        (Broker::open(dir.join("broker"))?, ShopDb::new(db, true))
    };
    let orders = OrderStore::open(&db)?;
    let payments = PaymentStore::open(&db)?;
    let inventory = InventoryStore::open(&db)?;
    let conn = broker.connect();
    let admin = conn.channel()?;
    declare_topology(&admin)?;

    let seed = match orders.seed()? {
        Some(stored) => {
            if stored != config.seed {
                tracing::warn!(
                    stored,
                    flag = config.seed,
                    "--seed differs from the first run's: resuming with the first run's"
                );
            }
            stored
        }
        None => {
            inventory.stock_up()?;
            orders.set_seed(config.seed)?;
            orders.set_mode(config.mode.name())?;
            config.seed
        }
    };
    if let Some(first) = orders.mode()?
        && first != config.mode.name()
    {
        return Err(AppError::Usage(format!(
            "the run in {} used --mode {first}: resume it with the same mode",
            dir.display()
        )));
    }
    let tally: SharedTally = Arc::new(Tally::default());
    count_settled(&orders, &inventory, &tally)?;
    let created_before = orders.created()?;
    if created_before > config.orders {
        return Err(AppError::Usage(format!(
            "{created_before} orders exist already, more than --orders {}",
            config.orders
        )));
    }

    let mut services = vec![
        start(&broker, OrderService::new(orders.clone(), tally.clone()))?,
        start(
            &broker,
            DeadLetterService::new(orders.clone(), tally.clone()),
        )?,
        start(
            &broker,
            PaymentService::new(
                payments.clone(),
                tally.clone(),
                seed,
                config.payment_failure_rate,
            ),
        )?,
        start(
            &broker,
            InventoryService::new(inventory.clone(), tally.clone()),
        )?,
    ];
    let payment_control = services[2].control.clone();

    let mut creator = Creator::spawn(config, &broker, &orders, &tally, seed)?;

    // The payment service goes down once a quarter of this run's orders exist.
    let mut outage = Outage::new(
        config.payment_down,
        created_before + (config.orders - created_before) / 4,
    );
    let mut peak = 0u32;
    let mut timed_out = false;
    loop {
        std::thread::sleep(TICK);
        let ready = ready_counts(&broker);
        peak = peak.max(ready[0]);
        let created_now = Tally::get(&tally.created).max(created_before);
        outage.step(created_now, &payment_control);
        let progress = Progress {
            created: created_now,
            paid: Tally::get(&tally.paid),
            failed: Tally::get(&tally.failed),
            dead_lettered: Tally::get(&tally.dead_lettered),
            stock_updates: Tally::get(&tally.stock_updates),
            ready,
            payment_down: outage.is_down(),
            elapsed: started.elapsed(),
        };
        on_progress(&progress);
        // A service or the creator that stops early stopped on an error: the run cannot
        // settle, so it ends now with that error rather than at the deadline.
        if let Some(index) = services.iter().position(|s| s.thread.is_finished()) {
            let failed = services.swap_remove(index);
            let _ = stop_all(services);
            creator.stop();
            let name = failed.name;
            return Err(match failed.thread.join() {
                Ok(Err(e)) => e,
                Ok(Ok(())) => AppError::Usage(format!("service {name} stopped early")),
                Err(_) => AppError::Panicked(name),
            });
        }
        creator.check().inspect_err(|_| {
            for s in &services {
                s.control.stop();
            }
        })?;
        let settled = progress.paid + progress.failed + progress.dead_lettered;
        if creator.is_done()
            && outage.is_over()
            && progress.created == config.orders
            && settled == config.orders
            && progress.stock_updates == progress.paid
            && ready.iter().all(|&n| n == 0)
            && queues_empty(&broker)
        {
            break;
        }
        if started.elapsed() > config.deadline {
            tracing::error!(?config.deadline, "deadline passed before every order settled");
            timed_out = true;
            break;
        }
    }
    creator.stop();
    let creator_result = creator.join();
    let queues_live = report::all_queue_stats(&broker);
    stop_all(services)?;
    creator_result?;
    // Consumers as they were while running; lengths once the services settled their last
    // batch.
    let queues = report::all_queue_stats(&broker)
        .into_iter()
        .zip(queues_live)
        .map(|(after, live)| report::QueueStats {
            consumers: live.consumers,
            ..after
        })
        .collect::<Vec<_>>();
    let audit = invariant::check(&orders, &payments, &inventory, config.orders)?;
    let elapsed = started.elapsed();
    drop(admin);
    drop(conn);
    broker.close()?;
    db.flush()?;
    let settled_here = audit.orders - audit.pending;
    let payment_attempts = Tally::get(&tally.payment_attempts);
    let payment_failures = Tally::get(&tally.payment_failures);
    let mut audit = audit;
    if queues.iter().any(|q| q.ready > 0 || q.unacked > 0) {
        audit.holds = false;
        audit.violation_count += 1;
        audit.violations.push(format!(
            "messages left in queues (ready, unacked): {:?}",
            queues
                .iter()
                .map(|q| (q.name.as_str(), q.ready, q.unacked))
                .collect::<Vec<_>>()
        ));
    }
    Ok(Report {
        mode: config.mode.name().to_owned(),
        seed,
        resumed: config.resume,
        orders_asked: config.orders,
        created_this_run: audit.orders.saturating_sub(created_before),
        republished: creator.republished(),
        elapsed_s: elapsed.as_secs_f64(),
        orders_per_s: settled_here.saturating_sub(settled_before(&tally)) as f64
            / report::secs(elapsed),
        payment_attempts,
        payment_failures,
        error_rate: if payment_attempts == 0 {
            0.0
        } else {
            payment_failures as f64 / payment_attempts as f64
        },
        repeats: Tally::get(&tally.repeats),
        rpc_timeouts: Tally::get(&tally.rpc_timeouts),
        payment_queue_peak: peak,
        queues,
        latency: report::Latency::of(&audit.latencies_ms),
        audit,
        timed_out,
    })
}

/// The thread that creates the orders and asks for their payments, as the mode says.
struct Creator {
    thread: Option<JoinHandle<Result<(), AppError>>>,
    /// Cleared once every order is created and (request-reply) has an outcome.
    creating: Arc<AtomicBool>,
    /// Tells it to give up (request-reply: stop calling again).
    stop: Arc<AtomicBool>,
    /// Payment requests a resumed run sent again.
    republished: Arc<AtomicU64>,
}

impl Creator {
    fn spawn(
        config: &Config,
        broker: &Broker,
        orders: &OrderStore,
        tally: &SharedTally,
        seed: u64,
    ) -> Result<Creator, AppError> {
        let creating = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let republished = Arc::new(AtomicU64::new(0));
        let thread = {
            let (orders, tally, conn) = (orders.clone(), tally.clone(), broker.connect());
            let (creating, stop, republished) =
                (creating.clone(), stop.clone(), republished.clone());
            let config = config.clone();
            std::thread::Builder::new()
                .name("shop-creator".into())
                .spawn(move || {
                    let r = create_and_ask(&config, &conn, &orders, &tally, seed, &stop)
                        .map(|n| republished.store(n, Ordering::Relaxed));
                    creating.store(false, Ordering::SeqCst);
                    r
                })
                .map_err(|source| AppError::Io {
                    what: "starting the creator".into(),
                    source,
                })?
        };
        Ok(Creator {
            thread: Some(thread),
            creating,
            stop,
            republished,
        })
    }

    /// Whether it is done.
    fn is_done(&self) -> bool {
        !self.creating.load(Ordering::SeqCst)
    }

    /// The error it stopped on, once it has stopped.
    fn check(&mut self) -> Result<(), AppError> {
        match self.thread.take_if(|t| t.is_finished()) {
            Some(thread) => thread.join().unwrap_or(Err(AppError::Panicked("creator"))),
            None => Ok(()),
        }
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn join(&mut self) -> Result<(), AppError> {
        match self.thread.take() {
            Some(thread) => thread.join().unwrap_or(Err(AppError::Panicked("creator"))),
            None => Ok(()),
        }
    }

    fn republished(&self) -> u64 {
        self.republished.load(Ordering::Relaxed)
    }
}

/// The creator's work: on a resume, first asks again for what the first run may have left
/// unasked; then creates the orders (paced by `--rate`) and asks for their payments. Returns
/// how many requests it sent again.
fn create_and_ask(
    config: &Config,
    conn: &coney::Connection,
    orders: &OrderStore,
    tally: &SharedTally,
    seed: u64,
    stop: &AtomicBool,
) -> Result<u64, AppError> {
    let pace = |create: &mut dyn FnMut(Range<u64>) -> Result<(), AppError>| {
        create_orders(orders, config, stop, create)
    };
    match config.mode {
        Mode::FireAndForget => {
            let channel = conn.channel()?;
            channel.confirm_select(ConfirmSelectOptions::default())?;
            let republished = if config.resume {
                order::republish_unconfirmed(orders, &channel)?
            } else {
                0
            };
            pace(&mut |ids| order::create_and_request(orders, &channel, seed, ids, tally))?;
            Ok(republished)
        }
        Mode::RequestReply => {
            request_reply::run(conn, orders, tally, seed, config.resume, stop, pace)
        }
    }
}

/// The payment service's planned outage (`--payment-down-secs`): it starts once `from`
/// orders exist and lasts `length`.
struct Outage {
    length: Option<Duration>,
    from: u64,
    since: Option<Instant>,
    over: bool,
}

impl Outage {
    fn new(length: Option<Duration>, from: u64) -> Self {
        Outage {
            length,
            from,
            since: None,
            over: length.is_none(),
        }
    }

    /// Starts or ends the outage, as `created` and the time say.
    fn step(&mut self, created: u64, payment: &Control) {
        let Some(length) = self.length else { return };
        match self.since {
            None if created >= self.from => {
                tracing::info!(?length, "payment service going down");
                payment.set_paused(true);
                self.since = Some(Instant::now());
            }
            Some(since) if !self.over && since.elapsed() >= length => {
                tracing::info!("payment service back");
                payment.set_paused(false);
                self.over = true;
            }
            _ => {}
        }
    }

    fn is_down(&self) -> bool {
        self.since.is_some() && !self.over
    }

    /// Whether there is none, or it is over.
    fn is_over(&self) -> bool {
        self.over
    }
}

/// Orders settled before this run started (a resume): kept aside so the rate is this run's.
fn settled_before(tally: &Tally) -> u64 {
    Tally::get(&tally.settled_before)
}

/// Starts the tally from the stores (a resumed run counts what the first one settled).
fn count_settled(
    orders: &OrderStore,
    inventory: &InventoryStore,
    tally: &Tally,
) -> Result<(), AppError> {
    let (mut paid, mut failed, mut dead) = (0, 0, 0);
    for order in orders.all() {
        match order?.status {
            OrderStatus::Created => {}
            OrderStatus::Paid => paid += 1,
            OrderStatus::Failed => failed += 1,
            OrderStatus::DeadLettered => dead += 1,
        }
    }
    tally.created.store(orders.created()?, Ordering::Relaxed);
    tally.paid.store(paid, Ordering::Relaxed);
    tally.failed.store(failed, Ordering::Relaxed);
    tally.dead_lettered.store(dead, Ordering::Relaxed);
    tally
        .settled_before
        .store(paid + failed + dead, Ordering::Relaxed);
    tally
        .stock_updates
        .store(inventory.applied()?.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Creates orders up to `--orders`, in batches, at `--rate` if given, until `stop`; aborts the
/// process after `--crash-after` orders created by this call.
fn create_orders(
    orders: &OrderStore,
    config: &Config,
    stop: &AtomicBool,
    create: &mut dyn FnMut(Range<u64>) -> Result<(), AppError>,
) -> Result<(), AppError> {
    let (total, rate, crash_after) = (config.orders, config.rate, config.crash_after);
    let start = Instant::now();
    let first = orders.created()?;
    let mut next = first;
    while next < total && !stop.load(Ordering::SeqCst) {
        let mut batch = CREATE_BATCH.min(total - next);
        if let Some(rate) = rate {
            let due = (rate * start.elapsed().as_secs_f64()) as u64;
            let allowed = due.saturating_sub(next - first);
            if allowed == 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            batch = batch.min(allowed);
        }
        if let Some(n) = crash_after {
            batch = batch.min((first + n).saturating_sub(next).max(1));
        }
        create(next..next + batch)?;
        next += batch;
        if crash_after.is_some_and(|n| next - first >= n) {
            // A crash, as a power cut or a kill -9 would make it: no destructor runs.
            eprintln!(
                "crashing after {} orders created (--crash-after)",
                next - first
            );
            std::process::abort();
        }
    }
    Ok(())
}

/// Whether every shop queue has nothing ready and nothing unacked.
fn queues_empty(broker: &Broker) -> bool {
    let stats = broker.stats();
    QUEUES.iter().all(|name| {
        stats
            .queue(name)
            .is_none_or(|q| q.messages_ready == 0 && q.messages_unacked == 0)
    })
}

/// Ready messages of every shop queue, as [`QUEUES`].
fn ready_counts(broker: &Broker) -> [u32; 4] {
    let stats = broker.stats();
    QUEUES.map(|name| {
        stats
            .queue(name)
            .map_or(0, |q| u32::try_from(q.messages_ready).unwrap_or(u32::MAX))
    })
}
