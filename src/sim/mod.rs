//! Deterministic simulation: a broker, its clock and the services that use it, all on the
//! caller's thread, in an order a seed decides.
//!
//! A [`Simulation`] owns an in-memory broker on a [`ManualClock`] with a [`Trace`] attached.
//! Code under test uses it through the usual API ([`Simulation::connect`] gives a
//! [`Connection`]); services are registered as handlers ([`Simulation::add_service`], the
//! same functions [`service::spawn`](crate::service::spawn()) runs on threads). Nothing runs by
//! itself: [`Simulation::step`] runs one handler on one delivery, chosen by the seed among the
//! services that have one waiting; [`Simulation::run_until_idle`] steps until none has;
//! [`Simulation::run_for`] also moves virtual time, firing TTLs, queue expiries and held dead
//! letters' retries as they fall due, and bringing back services that were down. Faults are
//! injected by hand ([`Simulation::crash_service`], [`Simulation::close_service_channel`]) or
//! by the seed ([`SimOptions::faults`]); each is an event of the trace.
//!
//! The same seed gives the same run, and the same trace byte for byte
//! ([`Trace::to_text`]): a failing seed replays exactly.
//!
//! Nothing may block: there is no other thread to unblock it. Handlers and the test use
//! non-waiting calls (`try_recv`, `basic_get`, [`PendingReply::try_reply`](crate::rpc::PendingReply::try_reply)
//! instead of `RpcClient::call`); waiting for confirms is fine, as it writes what is pending
//! first. A publish held by flow control would wait for ever: keep the limits of
//! [`SimOptions::limits`] above what the scenario queues.
//!
//! ```
//! use std::time::Duration;
//! use coney::*;
//! use coney::sim::Simulation;
//! use coney::service::ServiceOptions;
//!
//! let mut sim = Simulation::new(7);
//! let ch = sim.connect().channel()?;
//! ch.queue_declare("orders", QueueDeclareOptions::default(), FieldTable::new())?;
//! ch.queue_declare("receipts", QueueDeclareOptions::default(), FieldTable::new())?;
//! sim.add_service("billing", "orders", ServiceOptions::default(), |d: &Delivery, ch: &Channel| {
//!     ch.basic_publish("", "receipts", BasicPublishOptions::default(), d.body().clone(),
//!         BasicProperties::default())?;
//!     d.ack(BasicAckOptions::default())?;
//!     Ok(())
//! })?;
//! for i in 0..3 {
//!     ch.basic_publish("", "orders", BasicPublishOptions::default(), format!("order {i}"),
//!         BasicProperties::default())?;
//! }
//! assert_eq!(sim.run_until_idle()?, 3);           // three handler runs
//! assert_eq!(sim.queue_counts("receipts")?.ready, 3);
//! sim.run_for(Duration::from_secs(10))?;           // virtual time: no sleep
//! assert_eq!(sim.now_ms(), 10_000);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod trace;

use std::sync::Arc;
use std::time::Duration;

use crate::clock::ManualClock;
use crate::error::{AmqpError, CloseCause, Error, ReplyCode, Result};
use crate::runtime::Delivery;
use crate::runtime::{Broker, Channel, Connection, Consumer, Limits, TryRecvError};
use crate::service::{self, BoxedHandler, Handled, HandlerResult, ServiceOptions};
use crate::store::{Faults, FaultyStore, MemoryStore};

pub use trace::{Event, Trace, TraceEvent};

/// Steps [`Simulation::run_until_idle`] takes at most by default before it gives up (a
/// handler that republishes what it consumes never lets a simulation go idle).
pub const STEP_LIMIT: u64 = 10_000_000;

/// Why a simulation stopped.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// It ran [`SimOptions::step_limit`] steps without going idle.
    #[error("no idle state after {steps} steps (seed {seed})")]
    StepLimit {
        /// The steps taken.
        steps: u64,
        /// The simulation's seed.
        seed: u64,
    },
    /// A broker call the simulation made failed.
    #[error(transparent)]
    Broker(#[from] Error),
    /// No service has this id.
    #[error("no service #{0}")]
    NoService(usize),
    /// A crash or a store fault asked of a simulation without a store
    /// ([`SimOptions::durable`]).
    #[error("the simulation has no store: set SimOptions::durable")]
    NotDurable,
}

/// Faults the seed injects, as probabilities per step (0 = never).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FaultRates {
    /// A service crashes before it handles the delivery it was picked for: its channel
    /// closes, its unacked messages go back, and it comes back after
    /// [`FaultRates::restart_after`].
    pub service_crash: f64,
    /// The broker closes a service's channel (as RabbitMQ does on an internal error); the
    /// service comes back after [`FaultRates::restart_after`].
    pub channel_close: f64,
    /// The broker closes the services' connection (320 `CONNECTION_FORCED`, as when a node
    /// is shut down): every service loses its channel and comes back after
    /// [`FaultRates::restart_after`] on a new connection.
    pub connection_close: f64,
    /// The whole process crashes ([`Simulation::crash`]): only what the store flushed
    /// survives; the broker is reopened from it at once. Needs [`SimOptions::durable`].
    pub process_crash: f64,
    /// The store's next flush fails, as a failing disk would; the broker then refuses durable
    /// work, and the simulation restarts the process at its next step (as a supervisor
    /// would), which loses what was not flushed. Needs [`SimOptions::durable`].
    pub store_failure: f64,
    /// How long a faulted service stays down (virtual time; 0: it comes back at the next
    /// step that finds nothing else to do).
    pub restart_after: Duration,
}

/// How a simulation is set up.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The virtual clock's start, in milliseconds.
    pub start_ms: u64,
    /// The broker's limits.
    pub limits: Limits,
    /// Faults the seed injects.
    pub faults: FaultRates,
    /// Steps [`Simulation::run_until_idle`] takes at most.
    pub step_limit: u64,
    /// A durable broker on an in-memory store: durable queues and persistent messages are
    /// written to it, and flushed when the seed decides (or when someone waits for it: a
    /// confirm wait, a definition change), so [`Simulation::crash`] loses what was not.
    pub durable: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            start_ms: 0,
            limits: Limits::default(),
            faults: FaultRates::default(),
            step_limit: STEP_LIMIT,
            durable: false,
        }
    }
}

/// A durable simulation's store: what the broker writes, and the faults it can be given.
struct SimStore {
    store: MemoryStore,
    faults: Faults,
}

/// A service of a simulation, as [`Simulation::add_service`] returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(usize);

/// A waiting message, as [`Simulation::peek`] shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Peeked {
    /// Its number in the queue.
    pub seq: u64,
    /// The exchange it was published (or dead-lettered) to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties (with `x-death` headers if it was dead-lettered).
    pub properties: crate::types::BasicProperties,
    /// Its body.
    pub body: bytes::Bytes,
    /// Whether its next delivery will be flagged redelivered.
    pub redelivered: bool,
    /// How many times it came back to the queue.
    pub delivery_count: u32,
}

impl Peeked {
    /// The reason of its latest dead-lettering (`rejected`, `expired`, `maxlen`,
    /// `delivery_limit`), from its `x-last-death-reason` header (RabbitMQ 3.13+ sets it).
    pub fn death_reason(&self) -> Option<&str> {
        self.properties
            .headers
            .as_ref()?
            .get("x-last-death-reason")?
            .as_str()
    }

    /// The queue it was last dead-lettered from (`x-last-death-queue`).
    pub fn death_queue(&self) -> Option<&str> {
        self.properties
            .headers
            .as_ref()?
            .get("x-last-death-queue")?
            .as_str()
    }
}

/// Runs `check` for every seed in `seeds` (or only for `CONEY_SIM_SEED` if that is set;
/// `CONEY_SIM_SEEDS=N` runs seeds `0..N` instead), and panics at the first seed whose check
/// fails or panics, with the seed and the command line that replays it alone. `test` is the
/// test's name, for that command line.
pub fn check_seeds(
    test: &str,
    seeds: std::ops::Range<u64>,
    check: impl Fn(u64) -> std::result::Result<(), String>,
) {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds = match (var("CONEY_SIM_SEED"), var("CONEY_SIM_SEEDS")) {
        (Some(seed), _) => seed..seed + 1,
        (None, Some(n)) => 0..n,
        (None, None) => seeds,
    };
    for seed in seeds {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(seed)));
        let failure = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(panic) => panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panicked".into()),
        };
        panic!(
            "seed {seed} failed: {failure}\nreplay it alone: CONEY_SIM_SEED={seed} cargo test {test} -- --nocapture"
        );
    }
}

/// What a simulated service did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Deliveries its handler ran on.
    pub handled: u64,
    /// Of which the handler failed (returned an error or panicked).
    pub failed: u64,
    /// Times it went down (crashes, channels closed under it).
    pub crashes: u64,
    /// Whether it is consuming now.
    pub running: bool,
}

/// A queue's messages by state, read without consuming.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Waiting for a consumer.
    pub ready: u64,
    /// Delivered, not yet settled.
    pub unacked: u64,
    /// Consumers.
    pub consumers: u64,
    /// Dead-lettered since the queue was declared.
    pub dead_lettered: u64,
    /// Dropped since the queue was declared.
    pub dropped: u64,
}

struct Slot {
    name: String,
    queue: String,
    options: ServiceOptions,
    handler: BoxedHandler,
    running: Option<(Channel, Consumer)>,
    /// It takes no delivery before this time (its processing time).
    busy_until_ms: u64,
    /// When it comes back, if it is down.
    restart_at_ms: Option<u64>,
    stats: ServiceStats,
}

/// A seeded source of choices (SplitMix64): the simulation's own, and the test's through
/// [`Simulation::rng`].
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        // Lemire's multiply-shift; the bias is below 2^-32 for the sizes used here.
        ((u128::from(self.next_u64()) * u128::from(n.max(1))) >> 64) as u64
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// A broker and its services on one thread, driven step by step (see the module docs).
pub struct Simulation {
    seed: u64,
    options: SimOptions,
    rng: SimRng,
    user_rng: SimRng,
    clock: ManualClock,
    trace: Trace,
    broker: Broker,
    connection: Connection,
    services: Vec<Slot>,
    steps: u64,
    store: Option<SimStore>,
    /// Times the broker was reopened after a crash.
    generation: u64,
}

/// What a step may do.
#[derive(Clone, Copy)]
enum Choice {
    /// Run this service's handler on its next delivery.
    Service(usize),
    /// Write and flush the store's pending records.
    Flush,
}

impl Simulation {
    /// An in-memory simulation seeded with `seed`, with default options.
    pub fn new(seed: u64) -> Self {
        let clock = ManualClock::new(0);
        let trace = Trace::new();
        let broker = Broker::builder()
            .clock(clock.clone())
            .seed(seed)
            .trace(&trace)
            .in_memory();
        Self::assemble(seed, SimOptions::default(), clock, trace, broker, None)
    }

    /// A simulation seeded with `seed`. Fails only if a durable simulation's empty store
    /// cannot be opened.
    pub fn with_options(seed: u64, options: SimOptions) -> std::result::Result<Self, SimError> {
        let clock = ManualClock::new(options.start_ms);
        let trace = Trace::new();
        let store = options.durable.then(|| SimStore {
            store: MemoryStore::new(),
            faults: Faults::new(),
        });
        let broker = open_broker(seed, &options, &clock, &trace, store.as_ref())?;
        Ok(Self::assemble(seed, options, clock, trace, broker, store))
    }

    fn assemble(
        seed: u64,
        options: SimOptions,
        clock: ManualClock,
        trace: Trace,
        broker: Broker,
        store: Option<SimStore>,
    ) -> Self {
        let connection = broker.connect();
        let mut rng = SimRng::new(seed);
        let user_rng = SimRng::new(rng.next_u64());
        Self {
            seed,
            options,
            rng,
            user_rng,
            clock,
            trace,
            broker,
            connection,
            services: Vec::new(),
            steps: 0,
            store,
            generation: 0,
        }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// A new connection to the broker.
    pub fn connect(&self) -> Connection {
        self.broker.connect()
    }

    /// The virtual clock.
    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }

    /// The virtual time, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        use crate::clock::Clock;
        self.clock.now_ms()
    }

    /// The trace of everything that happened so far.
    pub fn trace(&self) -> &Trace {
        &self.trace
    }

    /// Randomness for the test itself (which payment fails, which order to send), drawn from
    /// the simulation's seed but apart from the simulation's own choices, so drawing from it
    /// does not change the interleaving the seed gives.
    pub fn rng(&mut self) -> &mut SimRng {
        &mut self.user_rng
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Registers a service: a consumer of `queue` tagged `name` on a channel of its own with
    /// `options.prefetch`, whose deliveries `handler` processes when the simulation picks it.
    pub fn add_service<F>(
        &mut self,
        name: &str,
        queue: &str,
        options: ServiceOptions,
        handler: F,
    ) -> Result<ServiceId>
    where
        F: FnMut(&Delivery, &Channel) -> HandlerResult + Send + 'static,
    {
        let running = service::consume(&self.connection, name, queue, &options)?;
        self.services.push(Slot {
            name: name.to_owned(),
            queue: queue.to_owned(),
            options,
            handler: Box::new(handler),
            running: Some(running),
            busy_until_ms: 0,
            restart_at_ms: None,
            stats: ServiceStats::default(),
        });
        Ok(ServiceId(self.services.len() - 1))
    }

    /// What a service did so far.
    pub fn service_stats(&self, id: ServiceId) -> Option<ServiceStats> {
        self.services.get(id.0).map(|s| ServiceStats {
            running: s.running.is_some(),
            ..s.stats.clone()
        })
    }

    /// Crashes a service: its channel closes (its unacked messages go back to their queues,
    /// flagged redelivered) and it stays down until [`Simulation::restart_service`], or for
    /// `down_for` of virtual time if given.
    pub fn crash_service(
        &mut self,
        id: ServiceId,
        down_for: Option<Duration>,
    ) -> std::result::Result<(), SimError> {
        self.take_down(id, "service_crash", down_for, |channel| channel.close())
    }

    /// The broker closes a service's channel, as RabbitMQ does on an internal error (541);
    /// its unacked messages go back. The service finds its consumer ended and stays down
    /// until [`Simulation::restart_service`], or for `down_for` if given.
    pub fn close_service_channel(
        &mut self,
        id: ServiceId,
        down_for: Option<Duration>,
    ) -> std::result::Result<(), SimError> {
        self.take_down(id, "channel_closed", down_for, |channel| {
            channel
                .inner
                .close_with(Arc::new(CloseCause::Error(AmqpError::new(
                    ReplyCode::InternalError,
                    "channel closed by a simulated fault",
                ))));
        })
    }

    /// Takes service `id` down with fault `kind`: its consumer goes and `close` closes its
    /// channel (what it held goes back); it comes back after `down_for`, if given.
    fn take_down(
        &mut self,
        id: ServiceId,
        kind: &str,
        down_for: Option<Duration>,
        close: impl FnOnce(&Channel),
    ) -> std::result::Result<(), SimError> {
        let now = self.now_ms();
        let slot = self
            .services
            .get_mut(id.0)
            .ok_or(SimError::NoService(id.0))?;
        self.trace.record(Event::Fault {
            kind: kind.into(),
            detail: slot.name.clone(),
        });
        if let Some((channel, consumer)) = slot.running.take() {
            drop(consumer);
            close(&channel);
            slot.stats.crashes += 1;
        }
        slot.restart_at_ms = down_for.map(|d| now.saturating_add(duration_ms(d)));
        Ok(())
    }

    /// The broker closes the connection the services share (320 `CONNECTION_FORCED`): every
    /// service loses its channel (what they held goes back) and stays down until
    /// [`Simulation::restart_service`], or for `down_for` if given; they come back on a new
    /// connection. Connections the test opened itself are not touched.
    pub fn close_connection(&mut self, down_for: Option<Duration>) {
        self.trace.record(Event::Fault {
            kind: "connection_closed".into(),
            detail: "the services' connection".into(),
        });
        self.connection
            .close_with(Arc::new(CloseCause::Error(AmqpError::new(
                ReplyCode::ConnectionForced,
                "broker forced connection closure with reason 'shutdown'",
            ))));
        let back = down_for.map(|d| self.now_ms().saturating_add(duration_ms(d)));
        for slot in &mut self.services {
            if slot.running.take().is_some() {
                slot.stats.crashes += 1;
            }
            slot.restart_at_ms = back;
        }
        self.connection = self.broker.connect();
    }

    /// Brings a service that is down back: a new channel and consumer.
    pub fn restart_service(&mut self, id: ServiceId) -> std::result::Result<(), SimError> {
        let slot = self
            .services
            .get_mut(id.0)
            .ok_or(SimError::NoService(id.0))?;
        if slot.running.is_none() {
            slot.restart_at_ms = None;
            match service::consume(&self.connection, &slot.name, &slot.queue, &slot.options) {
                Ok(running) => {
                    slot.running = Some(running);
                    self.trace.record(Event::Note {
                        text: format!("{} restarted", slot.name),
                    });
                }
                Err(e) if e.reply_code().is_some() => {
                    // Its queue is gone (a transient queue after a crash): it stays down.
                    self.trace.record(Event::Note {
                        text: format!("{} cannot consume: {e}", slot.name),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Runs one event: among the running services with a delivery waiting (and not busy with
    /// an earlier one), and the store's flush if records wait to be written, the seed picks
    /// one. Returns whether anything ran.
    pub fn step(&mut self) -> std::result::Result<bool, SimError> {
        if self.store.is_some() && !self.broker.health().is_healthy() {
            // A storage failure poisoned the store: the process restarts, as a supervisor
            // would restart it.
            self.trace.record(Event::Note {
                text: "restarting after a storage failure".into(),
            });
            self.crash()?;
            self.steps += 1;
            return Ok(true);
        }
        self.broker.run_due_timers();
        let now = self.now_ms();
        let mut choices: Vec<Choice> = self
            .services
            .iter()
            .enumerate()
            .filter(|(_, s)| s.busy_until_ms <= now)
            .filter(|(_, s)| s.running.as_ref().is_some_and(|(_, c)| c.is_ready()))
            .map(|(i, _)| Choice::Service(i))
            .collect();
        if self.broker.pending_writes() > 0 {
            choices.push(Choice::Flush);
        }
        if choices.is_empty() {
            return Ok(false);
        }
        let choice = choices[self.rng.below(choices.len() as u64) as usize];
        self.steps += 1;
        if self.inject_fault(choice)? {
            return Ok(true);
        }
        match choice {
            Choice::Flush => {
                let jobs = self.broker.run_pending_writes();
                self.trace.record(Event::Flush { jobs: jobs as u64 });
            }
            Choice::Service(i) => self.run_service(i, now),
        }
        Ok(true)
    }

    /// Runs service `i`'s handler on its next delivery.
    fn run_service(&mut self, i: usize, now: u64) {
        let slot = &mut self.services[i];
        let Some((channel, consumer)) = slot.running.as_mut() else {
            return;
        };
        let delivery = match consumer.try_recv() {
            Ok(d) => d,
            Err(TryRecvError::Empty) if !channel.is_closed() => return,
            Err(_) => {
                // Its consumer ended: cancelled, its queue deleted, or its channel closed.
                let cause = channel
                    .close_cause()
                    .map_or_else(|| "consumer cancelled".to_owned(), |c| c.to_string());
                self.trace.record(Event::Note {
                    text: format!("{}'s consumer ended: {cause}", slot.name),
                });
                slot.running = None;
                return;
            }
        };
        let channel = channel.clone();
        let outcome = service::handle_one(
            &mut slot.handler,
            &delivery,
            &channel,
            slot.options.on_error,
        );
        slot.stats.handled += 1;
        let failed = outcome != Handled::Done;
        if failed {
            slot.stats.failed += 1;
        }
        self.trace.record(Event::Handle {
            service: slot.name.clone(),
            queue: slot.queue.clone(),
            delivery_tag: delivery.delivery_tag(),
            failed,
        });
        if let Handled::Crashed(why) = outcome {
            self.trace.record(Event::Fault {
                kind: "handler_crash".into(),
                detail: format!("{}: {why}", slot.name),
            });
            slot.running = None;
            slot.stats.crashes += 1;
        }
        slot.busy_until_ms = now.saturating_add(duration_ms(slot.options.processing_time));
    }

    /// A fault the seed injects instead of the step's choice; `true` if one was.
    fn inject_fault(&mut self, choice: Choice) -> std::result::Result<bool, SimError> {
        let faults = self.options.faults;
        if self.store.is_some() {
            if self.rng.chance(faults.process_crash) {
                self.crash()?;
                return Ok(true);
            }
            if self.rng.chance(faults.store_failure) {
                self.fail_next_flush()?;
            }
        }
        let Choice::Service(picked) = choice else {
            return Ok(false);
        };
        let down_for = Some(faults.restart_after);
        if self.rng.chance(faults.connection_close) {
            self.close_connection(down_for);
            return Ok(true);
        }
        if self.rng.chance(faults.service_crash) {
            self.crash_service(ServiceId(picked), down_for)?;
            return Ok(true);
        }
        if self.rng.chance(faults.channel_close) {
            self.close_service_channel(ServiceId(picked), down_for)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Crashes the whole process: the broker is abandoned (nothing more is written), and
    /// reopened from what its store had flushed, as a restart after `kill -9` would; every
    /// service comes back on the new broker. Connections and channels the test opened before
    /// belong to the old broker and fail from now on ([`Error::BrokerClosed`]): open new ones
    /// with [`Simulation::connect`]. Needs [`SimOptions::durable`].
    pub fn crash(&mut self) -> std::result::Result<(), SimError> {
        let Some(store) = &self.store else {
            return Err(SimError::NotDurable);
        };
        self.trace.record(Event::Fault {
            kind: "crash".into(),
            detail: format!("process (generation {})", self.generation),
        });
        let image = SimStore {
            store: store.store.crash_image(),
            faults: Faults::new(),
        };
        // The old broker leaves no more events and writes only to the old store.
        if let Some(handle) = self.broker.trace_handle() {
            handle.mute();
        }
        for slot in &mut self.services {
            slot.running = None;
            slot.restart_at_ms = None;
            slot.busy_until_ms = 0;
        }
        let _ = self.broker.close();
        self.generation += 1;
        let seed = self.seed.wrapping_add(self.generation);
        self.broker = open_broker(seed, &self.options, &self.clock, &self.trace, Some(&image))?;
        self.store = Some(image);
        self.connection = self.broker.connect();
        self.trace.record(Event::Note {
            text: format!("broker reopened (generation {})", self.generation),
        });
        for i in 0..self.services.len() {
            self.restart_service(ServiceId(i))?;
        }
        Ok(())
    }

    /// Makes the store's next flush fail, as a full or failing disk would: the broker then
    /// refuses durable work ([`Broker::health`] reports it) until the process is restarted
    /// ([`Simulation::crash`]). Needs [`SimOptions::durable`].
    pub fn fail_next_flush(&mut self) -> std::result::Result<(), SimError> {
        let store = self.store.as_ref().ok_or(SimError::NotDurable)?;
        store.faults.fail_next_flush();
        self.trace.record(Event::Fault {
            kind: "store_write".into(),
            detail: "the next flush fails".into(),
        });
        Ok(())
    }

    /// Steps until no service has anything to do now; services due back come back first.
    /// Returns the steps taken.
    pub fn run_until_idle(&mut self) -> std::result::Result<u64, SimError> {
        let start = self.steps;
        loop {
            self.restart_due()?;
            if !self.step()? {
                return Ok(self.steps - start);
            }
            if self.steps - start >= self.options.step_limit {
                return Err(SimError::StepLimit {
                    steps: self.steps - start,
                    seed: self.seed,
                });
            }
        }
    }

    /// Runs for `duration` of virtual time: steps until idle, then moves the clock to the next
    /// thing due (a timer of the broker, a busy service becoming free, a service coming back)
    /// and goes on, until `duration` has passed. Returns the steps taken.
    pub fn run_for(&mut self, duration: Duration) -> std::result::Result<u64, SimError> {
        let end = self.now_ms().saturating_add(duration_ms(duration));
        let mut steps = 0;
        loop {
            steps += self.run_until_idle()?;
            let now = self.now_ms();
            match self.next_due(now) {
                Some(at) if at <= end => self.clock.set(at),
                _ => break,
            }
        }
        self.clock.set(end);
        steps += self.run_until_idle()?;
        Ok(steps)
    }

    /// The earliest time after `now` something is due.
    fn next_due(&self, now: u64) -> Option<u64> {
        let timer = self.broker.next_timer_ms().map(|at| at.max(now + 1));
        let services = self.services.iter().filter_map(|s| {
            let busy = (s.busy_until_ms > now && s.running.is_some()).then_some(s.busy_until_ms);
            let back = s.restart_at_ms.map(|at| at.max(now + 1));
            match (busy, back) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        });
        timer.into_iter().chain(services).min()
    }

    /// Restarts the services whose time to come back has come.
    fn restart_due(&mut self) -> std::result::Result<(), SimError> {
        let now = self.now_ms();
        for i in 0..self.services.len() {
            if self.services[i].restart_at_ms.is_some_and(|at| at <= now) {
                self.restart_service(ServiceId(i))?;
            }
        }
        Ok(())
    }

    /// The messages waiting in `queue`, in the order they would be delivered, without taking
    /// them (unacked ones are not shown: [`QueueCounts::unacked`] counts them).
    pub fn peek(&self, queue: &str) -> Result<Vec<Peeked>> {
        let entries = self
            .broker
            .peek(queue)
            .ok_or_else(|| Error::InvalidInput(format!("no queue '{queue}' in vhost '/'")))?;
        Ok(entries
            .into_iter()
            .map(|e| Peeked {
                seq: e.seq,
                exchange: e.message.exchange.to_string(),
                routing_key: e.message.routing_key.to_string(),
                properties: e.message.properties.clone(),
                body: e.message.body.clone(),
                redelivered: e.delivered,
                delivery_count: e.delivery_count,
            })
            .collect())
    }

    /// Panics, naming the seed, unless `queue` holds exactly `ready` waiting and `unacked`
    /// delivered-but-unsettled messages now.
    #[track_caller]
    pub fn assert_counts(&self, queue: &str, ready: u64, unacked: u64) {
        match self.queue_counts(queue) {
            Ok(c) if (c.ready, c.unacked) == (ready, unacked) => {}
            Ok(c) => panic!(
                "seed {}: queue '{queue}' holds {} ready and {} unacked, not {ready} and {unacked}",
                self.seed, c.ready, c.unacked
            ),
            Err(e) => panic!("seed {}: {e}", self.seed),
        }
    }

    /// Panics, naming the seed, unless `queue` is empty (nothing ready, nothing unacked).
    #[track_caller]
    pub fn assert_empty(&self, queue: &str) {
        self.assert_counts(queue, 0, 0);
    }

    /// Panics, naming the seed, unless `queue` dead-lettered exactly `n` messages so far.
    #[track_caller]
    pub fn assert_dead_lettered(&self, queue: &str, n: u64) {
        match self.queue_counts(queue) {
            Ok(c) if c.dead_lettered == n => {}
            Ok(c) => panic!(
                "seed {}: queue '{queue}' dead-lettered {}, not {n}",
                self.seed, c.dead_lettered
            ),
            Err(e) => panic!("seed {}: {e}", self.seed),
        }
    }

    /// Panics, naming the seed, unless the broker's internal invariants hold (every queue's
    /// and channel's bookkeeping agrees).
    #[track_caller]
    pub fn assert_invariants(&self) {
        if let Err(e) = self.broker.check_invariants() {
            panic!("seed {}: broker invariant broken: {e}", self.seed);
        }
    }

    /// A queue's messages by state, without consuming any.
    pub fn queue_counts(&self, queue: &str) -> Result<QueueCounts> {
        let stats = self.broker.stats();
        let q = stats
            .queue(queue)
            .ok_or_else(|| Error::InvalidInput(format!("no queue '{queue}' in vhost '/'")))?;
        Ok(QueueCounts {
            ready: q.messages_ready,
            unacked: q.messages_unacked,
            consumers: q.consumers,
            dead_lettered: q.counters.dead_lettered.total(),
            dropped: q.counters.dropped.total(),
        })
    }
}

/// The simulation's broker: in memory, or durable on `store` without a flusher thread.
fn open_broker(
    seed: u64,
    options: &SimOptions,
    clock: &ManualClock,
    trace: &Trace,
    store: Option<&SimStore>,
) -> Result<Broker> {
    let builder = Broker::builder()
        .clock(clock.clone())
        .limits(options.limits)
        .seed(seed)
        .trace(trace)
        .auto_compact(false);
    match store {
        None => Ok(builder.in_memory()),
        Some(s) => builder
            .stepped_store()
            .open_store(FaultyStore::new(s.store.clone(), s.faults.clone())),
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
