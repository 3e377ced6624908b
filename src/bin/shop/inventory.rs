//! The inventory service: consumes `inventory_queue` and takes each paid order's items from
//! stock, once. The stock change and the note that the order is applied are one atomic
//! write, so a redelivered update (after a crash, or re-emitted by the order service) finds
//! the note and is acked without touching the stock again.

use coney::Delivery;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::ConflictableTransactionError;

use super::error::AppError;
use super::model::{self, INITIAL_STOCK, INVENTORY_QUEUE, ITEM_KINDS, InventoryUpdate, Item};
use super::service::{Outbox, Service, Settle, SharedTally, Tally};

/// The note that an order's stock update is applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
    /// What was taken.
    pub items: Vec<Item>,
}

/// The inventory's store: `stock` (item id -> units, big-endian i64) and `applied`
/// (order id -> [`Applied`]).
#[derive(Clone)]
pub struct InventoryStore {
    db: super::model::ShopDb,
    stock: sled::Tree,
    applied: sled::Tree,
}

impl InventoryStore {
    /// The inventory trees of `db`.
    pub fn open(db: &super::model::ShopDb) -> Result<InventoryStore, AppError> {
        Ok(InventoryStore {
            db: db.clone(),
            stock: db.open_tree("stock")?,
            applied: db.open_tree("stock_applied")?,
        })
    }

    /// Fills the stock of a new shop: [`INITIAL_STOCK`] of every kind.
    pub fn stock_up(&self) -> Result<(), AppError> {
        for id in 0..ITEM_KINDS {
            self.stock
                .insert(id.to_be_bytes(), &INITIAL_STOCK.to_be_bytes())?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Units of every kind now, by item id.
    pub fn stock(&self) -> Result<Vec<(u32, i64)>, AppError> {
        self.stock
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let id = k
                    .as_ref()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| AppError::Corrupt("stock key".into()))?;
                Ok((id, decode_units(&v)?))
            })
            .collect()
    }

    /// Every applied update, by order id.
    pub fn applied(&self) -> Result<Vec<(u64, Applied)>, AppError> {
        self.applied
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((model::key_order(&k)?, model::decode_record(&v, "applied")?))
            })
            .collect()
    }

    /// Applies `update` unless it was applied before; `true` if it changed the stock.
    pub fn apply(&self, update: &InventoryUpdate) -> Result<bool, AppError> {
        let key = model::order_key(update.order_id);
        let note = model::encode_record(&Applied {
            at_ms: model::now_ms(),
            items: update.items.clone(),
        });
        let changed = (&self.stock, &self.applied).transaction(|(stock, applied)| {
            if applied.get(key)?.is_some() {
                return Ok(false);
            }
            for item in &update.items {
                let id = item.id.to_be_bytes();
                let units = match stock.get(id)? {
                    Some(v) => decode_units(&v).map_err(ConflictableTransactionError::Abort)?,
                    None => {
                        return Err(ConflictableTransactionError::Abort(AppError::BadMessage(
                            format!("order {} names unknown item {}", update.order_id, item.id),
                        )));
                    }
                };
                let left = units - i64::from(item.quantity);
                stock.insert(&id, &left.to_be_bytes())?;
            }
            applied.insert(&key, note.as_slice())?;
            Ok(true)
        })?;
        Ok(changed)
    }
}

fn decode_units(v: &[u8]) -> Result<i64, AppError> {
    v.try_into()
        .map(i64::from_be_bytes)
        .map_err(|_| AppError::Corrupt("stock units".into()))
}

/// Consumes `inventory_queue`.
pub struct InventoryService {
    store: InventoryStore,
    tally: SharedTally,
    dirty: bool,
}

impl InventoryService {
    /// The service on `store`.
    pub fn new(store: InventoryStore, tally: SharedTally) -> Self {
        Self {
            store,
            tally,
            dirty: false,
        }
    }
}

impl Service for InventoryService {
    fn name(&self) -> &'static str {
        "inventory"
    }

    fn queue(&self) -> &'static str {
        INVENTORY_QUEUE
    }

    fn handle(&mut self, delivery: &Delivery, _outbox: &mut Outbox) -> Result<Settle, AppError> {
        let update: InventoryUpdate = model::decode_json(delivery)?;
        if self.store.apply(&update)? {
            self.dirty = true;
            Tally::bump(&self.tally.stock_updates);
        } else {
            Tally::bump(&self.tally.repeats);
        }
        Ok(Settle::Ack)
    }

    /// The stock change must be durable before the update is acked: an ack that survived a
    /// crash its stock change did not would lose the update for good.
    fn commit(&mut self) -> Result<(), AppError> {
        if std::mem::take(&mut self.dirty) {
            self.db_flush()?;
        }
        Ok(())
    }
}

impl InventoryService {
    fn db_flush(&self) -> Result<(), AppError> {
        self.store.db.flush()?;
        Ok(())
    }
}
