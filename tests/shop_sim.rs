//! The reference application's order flow in the deterministic simulation: the shop's own
//! order, payment, inventory and dead-letter services (the code its threads run), driven
//! step by step by a seed, with payment failures, service crashes, channels closed by the
//! broker and whole-process crashes that keep only what the store flushed. After every step:
//! no order charged twice, no stock update applied twice or to an order that is not paid, no
//! stock drift; at the end: the shop's full invariant (every order paid with its stock
//! updated once, declined, or dead-lettered with its reason; none lost).
//!
//! `CONEY_SIM_SEEDS=N` runs more seeds; a failure names its seed and how to replay it.

#[allow(dead_code, unused_imports)]
#[path = "../src/bin/shop/app.rs"]
mod app;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use app::inventory::{InventoryService, InventoryStore};
use app::model::{
    DEAD_LETTER_QUEUE, INITIAL_STOCK, INVENTORY_QUEUE, ORDER_QUEUE, PAYMENT_QUEUE, ShopDb,
};
use app::order::{DeadLetterService, OrderService, OrderStatus, OrderStore};
use app::payment::{PaymentService, PaymentStore};
use app::service::{Tally, handler};
use coney::service::{OnError, ServiceOptions};
use coney::sim::{FaultRates, SimOptions, SimRng, Simulation, check_seeds};
use coney::{Channel, ConfirmSelectOptions};

/// Seeds run by default.
const SEEDS: u64 = 1000;
/// Orders per seed.
const ORDERS: u64 = 8;

/// The services' stores (sled, in a temporary directory; they are never crashed: every
/// service writes its store before it publishes or acks, so a crash of the process can only
/// fall after such a write).
struct Stores {
    orders: OrderStore,
    payments: PaymentStore,
    inventory: InventoryStore,
}

impl Stores {
    fn open() -> Stores {
        let db = sled::Config::new()
            .temporary(true)
            .flush_every_ms(None)
            .open()
            .expect("a temporary sled database");
        let db = ShopDb::new(db, false);
        let stores = Stores {
            orders: OrderStore::open(&db).unwrap(),
            payments: PaymentStore::open(&db).unwrap(),
            inventory: InventoryStore::open(&db).unwrap(),
        };
        stores.inventory.stock_up().unwrap();
        stores
    }

    /// What must hold after every step: nothing done twice, nothing done to the wrong order.
    fn check_safety(&self) -> Result<(), String> {
        let e = |e: app::AppError| e.to_string();
        let mut charges: HashMap<u64, u32> = HashMap::new();
        for id in self.payments.charges().map_err(e)? {
            *charges.entry(id).or_default() += 1;
        }
        if let Some((id, n)) = charges.iter().find(|(_, n)| **n > 1) {
            return Err(format!("order {id} charged {n} times"));
        }
        let applied: HashMap<u64, app::inventory::Applied> =
            self.inventory.applied().map_err(e)?.into_iter().collect();
        let mut sold: HashMap<u32, i64> = HashMap::new();
        for (id, note) in &applied {
            let order = self.orders.get(*id).map_err(e)?;
            if order.as_ref().map(|o| o.status) != Some(OrderStatus::Paid) {
                return Err(format!("stock applied for order {id}, which is not paid"));
            }
            for item in &note.items {
                *sold.entry(item.id).or_default() += i64::from(item.quantity);
            }
        }
        for (item, units) in self.inventory.stock().map_err(e)? {
            let expected = INITIAL_STOCK - sold.get(&item).copied().unwrap_or(0);
            if units != expected {
                return Err(format!(
                    "item {item}: {units} in stock, {expected} expected"
                ));
            }
        }
        for order in self.orders.all() {
            let order = order.map_err(e)?;
            let charged = charges.contains_key(&order.id);
            if matches!(
                order.status,
                OrderStatus::Failed | OrderStatus::DeadLettered
            ) && (charged || applied.contains_key(&order.id))
            {
                return Err(format!(
                    "{:?} order {} charged or given stock",
                    order.status, order.id
                ));
            }
        }
        Ok(())
    }
}

/// A channel in confirm mode on the simulation's (current) broker.
fn creator_channel(sim: &Simulation) -> Channel {
    let ch = sim.connect().channel().expect("a channel");
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    ch
}

/// What the seeds exercised, added up (to show the swarm is not vacuous).
#[derive(Default)]
struct Exercised {
    process_crashes: AtomicU64,
    store_failures: AtomicU64,
    service_faults: AtomicU64,
    dead_lettered: AtomicU64,
    declined: AtomicU64,
    paid: AtomicU64,
}

fn run_seed(seed: u64, exercised: &Exercised) -> Result<(), String> {
    let options = SimOptions {
        durable: true,
        faults: FaultRates {
            service_crash: 0.02,
            channel_close: 0.01,
            connection_close: 0.005,
            process_crash: 0.005,
            store_failure: 0.005,
            restart_after: Duration::from_millis(100),
        },
        ..SimOptions::default()
    };
    let mut sim = Simulation::with_options(seed, options).map_err(|e| e.to_string())?;
    let stores = Stores::open();
    let tally = Arc::new(Tally::default());
    app::declare_topology(&sim.connect().channel().unwrap()).map_err(|e| e.to_string())?;
    let on_crash = |prefetch: u16| ServiceOptions {
        prefetch,
        on_error: OnError::Crash,
        ..ServiceOptions::default()
    };
    let failure_rate = 0.3;
    let services = [
        (
            "payment",
            PAYMENT_QUEUE,
            Box::new(handler(PaymentService::new(
                stores.payments.clone(),
                tally.clone(),
                seed,
                failure_rate,
            ))) as Box<dyn FnMut(&_, &_) -> _ + Send>,
        ),
        (
            "order",
            ORDER_QUEUE,
            Box::new(handler(OrderService::new(
                stores.orders.clone(),
                tally.clone(),
            ))),
        ),
        (
            "inventory",
            INVENTORY_QUEUE,
            Box::new(handler(InventoryService::new(
                stores.inventory.clone(),
                tally.clone(),
            ))),
        ),
        (
            "dead-letters",
            DEAD_LETTER_QUEUE,
            Box::new(handler(DeadLetterService::new(
                stores.orders.clone(),
                tally.clone(),
            ))),
        ),
    ];
    for (name, queue, mut handle) in services {
        sim.add_service(name, queue, on_crash(4), move |d, ch| handle(d, ch))
            .map_err(|e| e.to_string())?;
    }
    // The customers: orders created a few at a time, between the simulation's steps.
    let mut customers = SimRng::new(seed ^ 0xC0FFEE);
    let mut channel = creator_channel(&sim);
    let mut created = 0;
    let mut steps = 0u64;
    loop {
        if created < ORDERS && customers.chance(0.3) {
            if channel.is_closed() {
                // The process crashed: the new broker needs a new channel, and orders whose
                // requests were not confirmed are asked for again (as `shop --resume` does).
                channel = creator_channel(&sim);
                app::order::republish_unconfirmed(&stores.orders, &channel)
                    .map_err(|e| e.to_string())?;
            }
            let n = (1 + customers.below(3)).min(ORDERS - created);
            let made = app::order::create_and_request(
                &stores.orders,
                &channel,
                seed,
                created..created + n,
                &tally,
            );
            match made {
                Ok(()) => {}
                // The store failed under the broker: the orders exist, their requests are
                // not confirmed; once the process restarts they are asked for again.
                Err(app::AppError::Broker(_) | app::AppError::Nacked(_))
                    if !sim.broker().health().is_healthy() => {}
                Err(e) => return Err(format!("creating orders: {e}")),
            }
            created = stores.orders.created().map_err(|e| e.to_string())?;
        }
        let ran = sim.step().map_err(|e| e.to_string())?;
        steps += 1;
        stores
            .check_safety()
            .map_err(|e| format!("step {steps}: {e}"))?;
        if !ran && created == ORDERS {
            // Idle: let time pass for services that are down to come back.
            let before = sim.steps();
            sim.run_for(Duration::from_secs(1))
                .map_err(|e| e.to_string())?;
            stores
                .check_safety()
                .map_err(|e| format!("after step {steps}: {e}"))?;
            if sim.steps() == before {
                break;
            }
        }
        if steps > 100_000 {
            return Err("no end after 100,000 steps".into());
        }
    }
    if channel.is_closed() {
        channel = creator_channel(&sim);
    }
    // A crash may have lost requests whose orders were created but not yet confirmed.
    app::order::republish_unconfirmed(&stores.orders, &channel).map_err(|e| e.to_string())?;
    sim.run_for(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let audit = app::invariant::check(&stores.orders, &stores.payments, &stores.inventory, ORDERS)
        .map_err(|e| e.to_string())?;
    if !audit.holds {
        return Err(format!("invariant: {:?}", audit.violations));
    }
    let text = sim.trace().to_text();
    let add = |c: &AtomicU64, n: u64| c.fetch_add(n, Ordering::Relaxed);
    add(
        &exercised.process_crashes,
        text.matches("FAULT crash").count() as u64,
    );
    add(
        &exercised.store_failures,
        text.matches("FAULT store_write").count() as u64,
    );
    add(
        &exercised.service_faults,
        (text.matches("FAULT service_crash").count()
            + text.matches("FAULT channel_closed").count()
            + text.matches("FAULT connection_closed").count()) as u64,
    );
    add(&exercised.dead_lettered, audit.dead_lettered);
    add(&exercised.declined, audit.failed);
    add(&exercised.paid, audit.paid);
    for q in [
        PAYMENT_QUEUE,
        ORDER_QUEUE,
        INVENTORY_QUEUE,
        DEAD_LETTER_QUEUE,
    ] {
        let c = sim.queue_counts(q).map_err(|e| e.to_string())?;
        if (c.ready, c.unacked) != (0, 0) {
            return Err(format!("{q} left with {c:?}"));
        }
    }
    Ok(())
}

#[test]
fn order_flow_swarm() {
    let exercised = Exercised::default();
    check_seeds("--test shop_sim order_flow_swarm", 0..SEEDS, |seed| {
        run_seed(seed, &exercised)
    });
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (crashes, faults) = (
        get(&exercised.process_crashes),
        get(&exercised.service_faults),
    );
    let store_failures = get(&exercised.store_failures);
    let (dead, declined, paid) = (
        get(&exercised.dead_lettered),
        get(&exercised.declined),
        get(&exercised.paid),
    );
    println!(
        "{crashes} process crashes, {store_failures} store failures, {faults} service faults; \
         orders: {paid} paid, \
         {declined} declined, {dead} dead-lettered"
    );
    if std::env::var("CONEY_SIM_SEED").is_err() {
        assert!(crashes > 0 && store_failures > 0 && faults > 0);
        assert!(dead > 0 && declined > 0 && paid > 0);
    }
}

/// The same seed replays the same run: the broker's trace is equal byte for byte.
#[test]
fn order_flow_replays_byte_for_byte() {
    let trace = |seed: u64| {
        let options = SimOptions {
            durable: true,
            faults: FaultRates {
                service_crash: 0.05,
                process_crash: 0.01,
                restart_after: Duration::from_millis(100),
                ..FaultRates::default()
            },
            ..SimOptions::default()
        };
        let mut sim = Simulation::with_options(seed, options).unwrap();
        let stores = Stores::open();
        let tally = Arc::new(Tally::default());
        app::declare_topology(&sim.connect().channel().unwrap()).unwrap();
        let mut payment = handler(PaymentService::new(
            stores.payments.clone(),
            tally.clone(),
            seed,
            0.3,
        ));
        let mut order = handler(OrderService::new(stores.orders.clone(), tally.clone()));
        sim.add_service(
            "payment",
            PAYMENT_QUEUE,
            ServiceOptions::default(),
            move |d, c| payment(d, c),
        )
        .unwrap();
        sim.add_service(
            "order",
            ORDER_QUEUE,
            ServiceOptions::default(),
            move |d, c| order(d, c),
        )
        .unwrap();
        let ch = creator_channel(&sim);
        app::order::create_and_request(&stores.orders, &ch, seed, 0..6, &tally).unwrap();
        sim.run_for(Duration::from_secs(2)).unwrap();
        sim.trace().to_text()
    };
    let one = trace(17);
    assert!(one.contains("handle order order_queue"), "{one}");
    assert_eq!(one, trace(17));
    assert_ne!(one, trace(18));
}
