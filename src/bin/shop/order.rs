//! The order service: creates orders in its own durable store and asks for their payment,
//! applies payment results (publishing the stock update of a paid order), and marks orders
//! whose payment request was dead-lettered.
//!
//! An order moves once from `created` to a final state. A payment result is the payment
//! service's recorded decision, so it also settles an order a late dead letter reached
//! first; a dead letter only settles an order still `created`. Every transition is
//! idempotent: a repeated result re-emits the stock update (the first may have been lost
//! before the broker confirmed it; the inventory applies each order once).

use std::cell::Cell;
use std::ops::Range;

use coney::{Channel, Delivery};
use serde::{Deserialize, Serialize};

use super::error::AppError;
use super::model::{
    self, DEAD_LETTER_QUEUE, INVENTORY_QUEUE, ITEM_KINDS, InventoryUpdate, Item, ORDER_QUEUE,
    PAYMENT_QUEUE, PaymentRequest, PaymentResult, PaymentStatus,
};
use super::service::{Outbox, Service, Settle, SharedTally, Tally, publish_confirmed};

/// Where an order is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Waiting for its payment.
    Created,
    /// Paid; its stock update is on its way or applied.
    Paid,
    /// Payment declined.
    Failed,
    /// Its payment request failed every attempt and was dead-lettered.
    DeadLettered,
}

/// An order as the order service stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Its id, from 0 in creation order.
    pub id: u64,
    /// Who ordered.
    pub user_id: u64,
    /// Its amount, in cents.
    pub amount: u64,
    /// What it takes from stock.
    pub items: Vec<Item>,
    /// Where it is.
    pub status: OrderStatus,
    /// The charge, once paid.
    pub transaction_id: Option<String>,
    /// Why it failed or was dead-lettered.
    pub reason: Option<String>,
    /// When it was created (ms since the Unix epoch).
    pub created_ms: u64,
    /// When it reached its final state.
    pub final_ms: Option<u64>,
    /// Whether the broker confirmed its stock update (noted in request-reply mode, where a
    /// resumed run must send the others again).
    pub stock_requested: bool,
}

impl Order {
    /// Order `id` of the run seeded `seed`: its contents depend on nothing else, so a resumed
    /// run creates the same orders.
    pub fn generate(seed: u64, id: u64, created_ms: u64) -> Order {
        let lines = 1 + model::draw(seed, id, 3) % 3;
        let items = (0..lines)
            .map(|line| Item {
                id: u32::try_from(model::draw(seed, id, 10 + line) % u64::from(ITEM_KINDS))
                    .expect("below ITEM_KINDS, a u32"),
                quantity: 1 + u32::try_from(model::draw(seed, id, 20 + line) % 3).expect("below 3"),
            })
            .collect();
        Order {
            id,
            user_id: model::draw(seed, id, 1) % 5_000,
            amount: 100 + model::draw(seed, id, 2) % 99_901,
            items,
            status: OrderStatus::Created,
            transaction_id: None,
            reason: None,
            created_ms,
            final_ms: None,
            stock_requested: false,
        }
    }

    /// Its payment request.
    pub fn payment_request(&self) -> PaymentRequest {
        PaymentRequest {
            order_id: self.id,
            amount: self.amount,
            user_id: self.user_id,
        }
    }

    /// Its stock update.
    pub fn inventory_update(&self) -> InventoryUpdate {
        InventoryUpdate {
            order_id: self.id,
            items: self.items.clone(),
        }
    }
}

/// Keys of the order store's `meta` tree.
const META_SEED: &[u8] = b"seed";
const META_CREATED: &[u8] = b"created";
const META_CONFIRMED: &[u8] = b"confirmed";
const META_MODE: &[u8] = b"mode";

/// The order service's store: `orders` (id -> [`Order`]), `meta` (the seed, how many orders
/// exist, below which id every request is confirmed in `payment_queue`) and `conflicts`
/// (outcomes that contradict each other; the invariant wants none).
#[derive(Clone)]
pub struct OrderStore {
    db: super::model::ShopDb,
    orders: sled::Tree,
    meta: sled::Tree,
    conflicts: sled::Tree,
}

/// What a transition found.
enum Transition {
    /// It moved the order.
    Applied(Order),
    /// The order was already there (a repeat); nothing changed.
    Repeat(Order),
    /// The order is settled otherwise; nothing changed.
    Ignored,
    /// Nothing changed: the two outcomes contradict each other.
    Conflict(Order),
    /// No such order.
    Missing,
}

impl OrderStore {
    /// The order trees of `db`.
    pub fn open(db: &super::model::ShopDb) -> Result<OrderStore, AppError> {
        Ok(OrderStore {
            db: db.clone(),
            orders: db.open_tree("orders")?,
            meta: db.open_tree("order_meta")?,
            conflicts: db.open_tree("order_conflicts")?,
        })
    }

    /// The seed the store was created with, if it was.
    pub fn seed(&self) -> Result<Option<u64>, AppError> {
        self.meta_u64(META_SEED)
    }

    /// Records the run's seed (a new store).
    pub fn set_seed(&self, seed: u64) -> Result<(), AppError> {
        self.meta.insert(META_SEED, &seed.to_be_bytes())?;
        Ok(())
    }

    /// The mode the store's first run used, if it was recorded.
    pub fn mode(&self) -> Result<Option<String>, AppError> {
        Ok(self
            .meta
            .get(META_MODE)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records the run's mode (a new store): a resumed run must use the same, since each
    /// mode recovers what it left in its own way.
    pub fn set_mode(&self, mode: &str) -> Result<(), AppError> {
        self.meta.insert(META_MODE, mode.as_bytes())?;
        Ok(())
    }

    /// How many orders exist (ids `0..created`).
    pub fn created(&self) -> Result<u64, AppError> {
        Ok(self.meta_u64(META_CREATED)?.unwrap_or(0))
    }

    /// Every order below this id has its payment request confirmed by the broker.
    pub fn confirmed(&self) -> Result<u64, AppError> {
        Ok(self.meta_u64(META_CONFIRMED)?.unwrap_or(0))
    }

    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, AppError> {
        match self.meta.get(key)? {
            Some(v) => Ok(Some(model::key_order(&v)?)),
            None => Ok(None),
        }
    }

    /// Order `id`.
    pub fn get(&self, id: u64) -> Result<Option<Order>, AppError> {
        match self.orders.get(model::order_key(id))? {
            Some(v) => Ok(Some(model::decode_record(&v, "order")?)),
            None => Ok(None),
        }
    }

    /// Every order, by id.
    pub fn all(&self) -> impl Iterator<Item = Result<Order, AppError>> + '_ {
        self.orders.iter().values().map(|v| {
            let v = v?;
            model::decode_record(&v, "order")
        })
    }

    /// The conflicts recorded, as text.
    pub fn conflicts(&self) -> Result<Vec<String>, AppError> {
        self.conflicts
            .iter()
            .values()
            .map(|v| Ok(String::from_utf8_lossy(&v?).into_owned()))
            .collect()
    }

    /// Creates orders `ids` and makes them durable: an order must be on disk before its
    /// payment request is published, or a crash could leave a charge for an order the store
    /// never had.
    pub fn create(&self, seed: u64, ids: Range<u64>) -> Result<Vec<Order>, AppError> {
        let now = model::now_ms();
        let mut batch = sled::Batch::default();
        let orders: Vec<Order> = ids
            .clone()
            .map(|id| Order::generate(seed, id, now))
            .collect();
        for order in &orders {
            batch.insert(&model::order_key(order.id), model::encode_record(order));
        }
        self.orders.apply_batch(batch)?;
        self.meta.insert(META_CREATED, &ids.end.to_be_bytes())?;
        self.db.flush()?;
        Ok(orders)
    }

    /// Notes that every request below `id` is confirmed. Not flushed: if a crash loses it, a
    /// resumed run republishes a few confirmed requests, which the payment service answers
    /// from its records.
    pub fn set_confirmed(&self, id: u64) -> Result<(), AppError> {
        self.meta.insert(META_CONFIRMED, &id.to_be_bytes())?;
        Ok(())
    }

    /// Notes on paid orders `ids` that their stock update is confirmed by the broker. Not
    /// flushed: losing the note only sends an update again.
    pub fn note_stock_requested(&self, ids: &[u64]) -> Result<(), AppError> {
        for &id in ids {
            self.transition(id, |order| {
                if order.status == OrderStatus::Paid && !order.stock_requested {
                    let mut next = order.clone();
                    next.stock_requested = true;
                    Transition::Applied(next)
                } else {
                    Transition::Ignored
                }
            })?;
        }
        Ok(())
    }

    /// Runs `decide` on order `id` atomically and stores what it returns.
    fn transition(
        &self,
        id: u64,
        decide: impl Fn(&Order) -> Transition,
    ) -> Result<Transition, AppError> {
        let found = Cell::new(None);
        let error = Cell::new(None);
        // sled may call the closure more than once (compare-and-swap); the last call is the
        // one stored.
        self.orders.update_and_fetch(model::order_key(id), |old| {
            let Some(old) = old else {
                found.set(Some(Transition::Missing));
                return None;
            };
            match model::decode_record::<Order>(old, "order") {
                Ok(order) => {
                    let t = decide(&order);
                    let new = match &t {
                        Transition::Applied(o) => model::encode_record(o),
                        _ => old.to_vec(),
                    };
                    found.set(Some(t));
                    Some(new)
                }
                Err(e) => {
                    error.set(Some(e));
                    Some(old.to_vec())
                }
            }
        })?;
        if let Some(e) = error.take() {
            return Err(e);
        }
        Ok(found.take().expect("the closure ran at least once"))
    }

    fn record_conflict(&self, id: u64, text: String) -> Result<(), AppError> {
        tracing::error!(order_id = id, %text, "conflicting order outcomes");
        self.conflicts
            .insert(model::order_key(id), text.into_bytes())?;
        Ok(())
    }

    /// Flushes the store (see the callers for why).
    pub fn flush(&self) -> Result<(), AppError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Creates orders `ids`, publishes their payment requests on `channel` (in confirm mode) and
/// waits for the broker's confirms. The order service does not wait for the payments.
pub fn create_and_request(
    store: &OrderStore,
    channel: &Channel,
    seed: u64,
    ids: Range<u64>,
    tally: &Tally,
) -> Result<(), AppError> {
    let end = ids.end;
    let orders = store.create(seed, ids)?;
    tally
        .created
        .store(end, std::sync::atomic::Ordering::Relaxed);
    let mut outbox = Outbox::default();
    for order in &orders {
        request_payment(order, &mut outbox);
    }
    publish_confirmed(channel, &mut outbox, "order")?;
    store.set_confirmed(end)
}

/// Republishes the payment requests that a crash may have lost: orders still `created` from
/// the first one whose request was not confirmed. Returns how many.
pub fn republish_unconfirmed(store: &OrderStore, channel: &Channel) -> Result<u64, AppError> {
    let mut outbox = Outbox::default();
    let from = model::order_key(store.confirmed()?);
    for v in store.orders.range(from..).values() {
        let order: Order = model::decode_record(&v?, "order")?;
        if order.status == OrderStatus::Created {
            request_payment(&order, &mut outbox);
        }
    }
    let n = outbox.len() as u64;
    publish_confirmed(channel, &mut outbox, "order")?;
    store.set_confirmed(store.created()?)?;
    Ok(n)
}

/// Adds order's payment request to `outbox` (persistent, correlation id = the order id).
fn request_payment(order: &Order, outbox: &mut Outbox) {
    outbox.send_to(
        PAYMENT_QUEUE,
        model::encode_json(&order.payment_request()),
        model::json_properties(order.id).with_message_id(format!("pay-{}", order.id)),
    );
}

/// Consumes `order_queue`: applies payment results.
pub struct OrderService {
    store: OrderStore,
    tally: SharedTally,
    dirty: bool,
}

impl OrderService {
    /// The service on `store`.
    pub fn new(store: OrderStore, tally: SharedTally) -> Self {
        Self {
            store,
            tally,
            dirty: false,
        }
    }

    /// Applies one payment result; adds the stock update of a paid order to `outbox`.
    pub fn apply_result(
        &mut self,
        result: &PaymentResult,
        outbox: &mut Outbox,
    ) -> Result<(), AppError> {
        let now = model::now_ms();
        let was = Cell::new(OrderStatus::Created);
        let t = self.store.transition(result.order_id, |order| {
            was.set(order.status);
            let same = match result.status {
                PaymentStatus::Paid => {
                    order.status == OrderStatus::Paid
                        && order.transaction_id == result.transaction_id
                }
                PaymentStatus::Failed => order.status == OrderStatus::Failed,
            };
            if same {
                return Transition::Repeat(order.clone());
            }
            match order.status {
                // A decision of the payment service settles a dead-lettered order too: the
                // dead letter was a later copy of a request already decided.
                OrderStatus::Created | OrderStatus::DeadLettered => {
                    let mut next = order.clone();
                    next.status = match result.status {
                        PaymentStatus::Paid => OrderStatus::Paid,
                        PaymentStatus::Failed => OrderStatus::Failed,
                    };
                    next.transaction_id = result.transaction_id.clone();
                    next.reason = result.reason.clone();
                    next.final_ms = Some(now);
                    Transition::Applied(next)
                }
                OrderStatus::Paid | OrderStatus::Failed => Transition::Conflict(order.clone()),
            }
        })?;
        match t {
            Transition::Applied(order) => {
                self.dirty = true;
                if order.status == OrderStatus::Paid {
                    Tally::bump(&self.tally.paid);
                    publish_stock_update(&order, outbox);
                } else {
                    Tally::bump(&self.tally.failed);
                }
                if was.get() == OrderStatus::DeadLettered {
                    self.tally
                        .dead_lettered
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Transition::Repeat(order) => {
                Tally::bump(&self.tally.repeats);
                if order.status == OrderStatus::Paid {
                    publish_stock_update(&order, outbox);
                }
            }
            Transition::Conflict(order) => {
                self.dirty = true;
                self.store.record_conflict(
                    order.id,
                    format!(
                        "order {} is {:?}, payment says {:?}",
                        order.id, order.status, result
                    ),
                )?;
            }
            Transition::Missing => {
                self.dirty = true;
                self.store.record_conflict(
                    result.order_id,
                    format!("payment result for unknown order: {result:?}"),
                )?;
            }
            Transition::Ignored => {}
        }
        Ok(())
    }
}

/// Adds the stock update of a paid order to `outbox`.
pub fn publish_stock_update(order: &Order, outbox: &mut Outbox) {
    outbox.send_to(
        INVENTORY_QUEUE,
        model::encode_json(&order.inventory_update()),
        model::json_properties(order.id),
    );
}

impl Service for OrderService {
    fn name(&self) -> &'static str {
        "order"
    }

    fn queue(&self) -> &'static str {
        ORDER_QUEUE
    }

    fn handle(&mut self, delivery: &Delivery, outbox: &mut Outbox) -> Result<Settle, AppError> {
        let result: PaymentResult = model::decode_json(delivery)?;
        self.apply_result(&result, outbox)?;
        Ok(Settle::Ack)
    }

    /// The new states must be durable before the results are acked; the stock updates are
    /// published after, so an order is `paid` on disk before its stock moves.
    fn commit(&mut self) -> Result<(), AppError> {
        if std::mem::take(&mut self.dirty) {
            self.store.flush()?;
        }
        Ok(())
    }
}

/// Consumes the dead-letter queue: marks orders whose payment request was dead-lettered,
/// with the reason of its `x-death` header.
pub struct DeadLetterService {
    store: OrderStore,
    tally: SharedTally,
    dirty: bool,
}

impl DeadLetterService {
    /// The watcher on `store`.
    pub fn new(store: OrderStore, tally: SharedTally) -> Self {
        Self {
            store,
            tally,
            dirty: false,
        }
    }
}

impl Service for DeadLetterService {
    fn name(&self) -> &'static str {
        "dead-letters"
    }

    fn queue(&self) -> &'static str {
        DEAD_LETTER_QUEUE
    }

    fn handle(&mut self, delivery: &Delivery, _outbox: &mut Outbox) -> Result<Settle, AppError> {
        let request: PaymentRequest = model::decode_json(delivery)?;
        let reason = model::death_reason(delivery).unwrap_or_else(|| "unknown".to_owned());
        let now = model::now_ms();
        let t = self
            .store
            .transition(request.order_id, |order| match order.status {
                OrderStatus::Created => {
                    let mut next = order.clone();
                    next.status = OrderStatus::DeadLettered;
                    next.reason = Some(reason.clone());
                    next.final_ms = Some(now);
                    Transition::Applied(next)
                }
                OrderStatus::DeadLettered => Transition::Repeat(order.clone()),
                // The payment service decided it: this dead letter is a later copy.
                OrderStatus::Paid | OrderStatus::Failed => Transition::Ignored,
            })?;
        match t {
            Transition::Applied(order) => {
                self.dirty = true;
                Tally::bump(&self.tally.dead_lettered);
                tracing::info!(order_id = order.id, %reason, "order dead-lettered");
            }
            Transition::Repeat(_) | Transition::Ignored => Tally::bump(&self.tally.repeats),
            Transition::Missing => {
                self.dirty = true;
                self.store.record_conflict(
                    request.order_id,
                    format!("dead letter for unknown order {}", request.order_id),
                )?;
            }
            Transition::Conflict(_) => unreachable!("a dead letter never conflicts"),
        }
        Ok(Settle::Ack)
    }

    /// The order's state must be durable before its dead letter is acked.
    fn commit(&mut self) -> Result<(), AppError> {
        if std::mem::take(&mut self.dirty) {
            self.store.flush()?;
        }
        Ok(())
    }
}
