//! The shop's messages (JSON on the wire), its stored records (bincode in sled), the queue
//! names, and the seeded draws every service makes from `(seed, order id)`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use coney::{BasicProperties, Delivery, FieldValue};

use super::error::AppError;

/// Payment requests, from the order service to the payment service (a quorum queue).
pub const PAYMENT_QUEUE: &str = "payment_queue";
/// Payment results, back to the order service.
pub const ORDER_QUEUE: &str = "order_queue";
/// Stock updates of paid orders, to the inventory service.
pub const INVENTORY_QUEUE: &str = "inventory_queue";
/// Where `payment_queue` dead-letters a request that failed every allowed attempt.
pub const DEAD_LETTER_EXCHANGE: &str = "payment_dlx";
/// The queue bound to [`DEAD_LETTER_EXCHANGE`], watched by the order service.
pub const DEAD_LETTER_QUEUE: &str = "payment_dlq";
/// Every queue of the shop, in the order the report lists them.
pub const QUEUES: [&str; 4] = [
    PAYMENT_QUEUE,
    ORDER_QUEUE,
    INVENTORY_QUEUE,
    DEAD_LETTER_QUEUE,
];

/// `x-delivery-limit` of `payment_queue`: a quorum queue dead-letters a message whose return
/// count goes over it (SEMANTICS.md §6.2), so a request is delivered at most 4 times: the
/// first attempt and at most 3 retries.
pub const PAYMENT_DELIVERY_LIMIT: u32 = 3;

/// Kinds of item the shop sells.
pub const ITEM_KINDS: u32 = 10;
/// Each kind's stock when a run starts afresh: more than any run sells (a signed counter, so
/// even an absurd run is still checked rather than clamped).
pub const INITIAL_STOCK: i64 = 1_000_000_000;
/// Orders over this amount (in cents) are declined by the payment service's business rule.
pub const DECLINE_ABOVE_CENTS: u64 = 95_000;

/// A payment request: `payment_queue`'s body, correlation id = the order id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRequest {
    /// The order.
    pub order_id: u64,
    /// What to charge, in cents.
    pub amount: u64,
    /// Who pays.
    pub user_id: u64,
}

/// What the payment service decided: `order_queue`'s body (or a direct reply).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentResult {
    /// The order.
    pub order_id: u64,
    /// `paid` or `failed`.
    pub status: PaymentStatus,
    /// The charge, when paid.
    pub transaction_id: Option<String>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A payment's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Charged.
    Paid,
    /// Declined by a business rule; nothing charged.
    Failed,
}

/// One line of an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The item kind, below [`ITEM_KINDS`].
    pub id: u32,
    /// How many.
    pub quantity: u32,
}

/// A stock update: `inventory_queue`'s body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryUpdate {
    /// The paid order.
    pub order_id: u64,
    /// What to take from stock.
    pub items: Vec<Item>,
}

/// Persistent JSON message properties with a correlation id, as every shop message has.
pub fn json_properties(correlation_id: u64) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json")
        .with_correlation_id(correlation_id.to_string())
}

/// The body as `T`.
pub fn decode_json<T: DeserializeOwned>(delivery: &Delivery) -> Result<T, AppError> {
    serde_json::from_slice(delivery.body()).map_err(|e| {
        AppError::BadMessage(format!(
            "{} on {}: {e}",
            std::any::type_name::<T>(),
            delivery.routing_key()
        ))
    })
}

/// The body of a message.
pub fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("shop messages are plain structs that always serialize")
}

/// A stored record's bytes.
pub fn encode_record<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("shop records are plain structs that always encode")
}

/// A stored record, or [`AppError::Corrupt`] naming `what`.
pub fn decode_record<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, AppError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(value, _)| value)
        .map_err(|e| AppError::Corrupt(format!("{what}: {e}")))
}

/// A sled key for an order id: big-endian, so orders iterate by id.
pub fn order_key(order_id: u64) -> [u8; 8] {
    order_id.to_be_bytes()
}

/// The order id of a sled key written by [`order_key`].
pub fn key_order(key: &[u8]) -> Result<u64, AppError> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| AppError::Corrupt(format!("order key of {} bytes", key.len())))
}

/// How many times a quorum queue's message came back before this delivery: its
/// `x-delivery-count` header, absent on the first delivery (SEMANTICS.md §6.2).
pub fn delivery_count(delivery: &Delivery) -> u32 {
    delivery
        .properties()
        .headers
        .as_ref()
        .and_then(|h| h.get("x-delivery-count"))
        .and_then(FieldValue::as_i64)
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0)
}

/// The reason of a dead letter's latest death: `reason` of the first `x-death` entry.
pub fn death_reason(delivery: &Delivery) -> Option<String> {
    let headers = delivery.properties().headers.as_ref()?;
    match headers.get("x-death")? {
        FieldValue::Array(entries) => match entries.first()? {
            FieldValue::Table(entry) => entry
                .get("reason")
                .and_then(FieldValue::as_str)
                .map(str::to_owned),
            _ => None,
        },
        _ => None,
    }
}

/// A draw in `0..2^64` fixed by the seed, the order and what it is for (SplitMix64 over the
/// three): services on any thread, in any run, draw the same for the same order.
pub fn draw(seed: u64, order_id: u64, purpose: u64) -> u64 {
    let mut z = seed
        .wrapping_add(order_id.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(purpose.wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether a draw falls under probability `p` (0.0 ..= 1.0).
pub fn chance(seed: u64, order_id: u64, purpose: u64, p: f64) -> bool {
    // 53 bits are what an f64 holds exactly.
    let unit = (draw(seed, order_id, purpose) >> 11) as f64 / (1u64 << 53) as f64;
    unit < p
}

/// Milliseconds since the Unix epoch: order times survive a restart and compare across runs.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The services' sled database, and whether the run is durable: a durable run flushes it
/// where a crash must not lose a write ([`ShopDb::flush`]); an in-memory run (`--in-memory`)
/// never does, as its broker keeps nothing either.
#[derive(Clone)]
pub struct ShopDb {
    db: sled::Db,
    durable: bool,
}

impl ShopDb {
    /// `db`, flushed at each commit if `durable`.
    pub fn new(db: sled::Db, durable: bool) -> Self {
        Self { db, durable }
    }

    /// Flushes everything written so far to the file system (a durable run only). sled's
    /// flush hands the writes to the kernel, which keeps them through a crash of the process
    /// (what `--crash-after` and a SIGKILL do); it does not fsync them against a power cut.
    pub fn flush(&self) -> Result<(), super::error::AppError> {
        if self.durable {
            self.db.flush()?;
        }
        Ok(())
    }
}

impl std::ops::Deref for ShopDb {
    type Target = sled::Db;

    fn deref(&self) -> &sled::Db {
        &self.db
    }
}
