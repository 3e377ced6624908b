//! The payment service: consumes `payment_queue`, charges or declines each order once,
//! answers with the result (to `order_queue`, or to the request's `reply_to`), then acks.
//!
//! A processing failure (injected with `--payment-failure-rate`, drawn from the seed, the
//! order and the attempt) is nacked with requeue; `payment_queue` is a quorum queue with
//! `x-delivery-limit: 3`, so the broker dead-letters a request on its 4th failed delivery
//! (at most 3 retries).
//!
//! Never twice: the service records its decision per order (`payments`: paid with its
//! transaction id, declined, or given up on the last attempt) in the same atomic write as
//! the charge itself (`charges`, a ledger the invariant reads), and flushes before publishing
//! the result. A request seen again (a redelivery after a crash, a republished request)
//! gets the recorded answer, not a second charge; one given up on goes on to the dead-letter
//! queue even if a copy of it would now succeed.

use coney::Delivery;
use serde::{Deserialize, Serialize};
use sled::Transactional;

use super::error::AppError;
use super::model::{
    self, DECLINE_ABOVE_CENTS, ORDER_QUEUE, PAYMENT_DELIVERY_LIMIT, PAYMENT_QUEUE, PaymentRequest,
    PaymentResult, PaymentStatus,
};
use super::service::{Outbox, Service, Settle, SharedTally, Tally};

/// What the payment service decided for an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentRecord {
    /// Charged.
    Paid {
        /// The charge.
        transaction_id: String,
    },
    /// Declined by a business rule.
    Declined {
        /// Why.
        reason: String,
    },
    /// Failed on its last allowed attempt: the request goes to the dead-letter queue.
    GaveUp,
}

/// The payment service's store: `payments` (order id -> [`PaymentRecord`]) and `charges`
/// (charge number -> order id: one entry per charge ever made).
#[derive(Clone)]
pub struct PaymentStore {
    db: super::model::ShopDb,
    payments: sled::Tree,
    charges: sled::Tree,
}

impl PaymentStore {
    /// The payment trees of `db`.
    pub fn open(db: &super::model::ShopDb) -> Result<PaymentStore, AppError> {
        Ok(PaymentStore {
            db: db.clone(),
            payments: db.open_tree("payments")?,
            charges: db.open_tree("charges")?,
        })
    }

    /// The decision recorded for `order_id`.
    pub fn record(&self, order_id: u64) -> Result<Option<PaymentRecord>, AppError> {
        match self.payments.get(model::order_key(order_id))? {
            Some(v) => Ok(Some(model::decode_record(&v, "payment")?)),
            None => Ok(None),
        }
    }

    /// Every decision, by order id.
    pub fn records(&self) -> Result<Vec<(u64, PaymentRecord)>, AppError> {
        self.payments
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((model::key_order(&k)?, model::decode_record(&v, "payment")?))
            })
            .collect()
    }

    /// The order id of every charge ever made, in charge order.
    pub fn charges(&self) -> Result<Vec<u64>, AppError> {
        self.charges
            .iter()
            .values()
            .map(|v| model::key_order(&v?))
            .collect()
    }

    /// Records `record` for `order_id` and, when it is a payment, the charge, atomically.
    fn decide(&self, order_id: u64, record: &PaymentRecord) -> Result<(), AppError> {
        let key = model::order_key(order_id);
        let value = model::encode_record(record);
        let charge = matches!(record, PaymentRecord::Paid { .. });
        (&self.payments, &self.charges).transaction(|(payments, charges)| {
            payments.insert(&key, value.as_slice())?;
            if charge {
                let n = charges.generate_id()?;
                charges.insert(&n.to_be_bytes(), &key)?;
            }
            Ok::<_, sled::transaction::ConflictableTransactionError<AppError>>(())
        })?;
        Ok(())
    }
}

/// Consumes `payment_queue`.
pub struct PaymentService {
    store: PaymentStore,
    tally: SharedTally,
    seed: u64,
    failure_rate: f64,
    dirty: bool,
}

impl PaymentService {
    /// The service on `store`; each attempt fails with probability `failure_rate`.
    pub fn new(store: PaymentStore, tally: SharedTally, seed: u64, failure_rate: f64) -> Self {
        Self {
            store,
            tally,
            seed,
            failure_rate,
            dirty: false,
        }
    }

    /// The charge of `order_id`: fixed by the seed and the order, so it is the same however
    /// often the order is seen.
    fn transaction_id(&self, order_id: u64) -> String {
        format!(
            "tx-{order_id}-{:08x}",
            model::draw(self.seed, order_id, 7) >> 32
        )
    }

    /// Answers `request` with `record` (nothing for [`PaymentRecord::GaveUp`]).
    fn answer(
        delivery: &Delivery,
        request: &PaymentRequest,
        record: &PaymentRecord,
        outbox: &mut Outbox,
    ) {
        let result = match record {
            PaymentRecord::Paid { transaction_id } => PaymentResult {
                order_id: request.order_id,
                status: PaymentStatus::Paid,
                transaction_id: Some(transaction_id.clone()),
                reason: None,
            },
            PaymentRecord::Declined { reason } => PaymentResult {
                order_id: request.order_id,
                status: PaymentStatus::Failed,
                transaction_id: None,
                reason: Some(reason.clone()),
            },
            PaymentRecord::GaveUp => return,
        };
        let props = delivery.properties();
        let correlation_id = props
            .correlation_id
            .clone()
            .unwrap_or_else(|| request.order_id.to_string());
        let properties =
            model::json_properties(request.order_id).with_correlation_id(correlation_id);
        // A request-reply caller waits on its reply address; otherwise the order service
        // reads results from its queue.
        let to = props.reply_to.as_deref().unwrap_or(ORDER_QUEUE);
        outbox.send_to(to, model::encode_json(&result), properties);
    }
}

impl Service for PaymentService {
    fn name(&self) -> &'static str {
        "payment"
    }

    fn queue(&self) -> &'static str {
        PAYMENT_QUEUE
    }

    fn handle(&mut self, delivery: &Delivery, outbox: &mut Outbox) -> Result<Settle, AppError> {
        let request: PaymentRequest = model::decode_json(delivery)?;
        if let Some(record) = self.store.record(request.order_id)? {
            Tally::bump(&self.tally.repeats);
            if record == PaymentRecord::GaveUp {
                // Keep failing it: the queue dead-letters it once over the limit.
                return Ok(Settle::Requeue);
            }
            Self::answer(delivery, &request, &record, outbox);
            return Ok(Settle::Ack);
        }
        Tally::bump(&self.tally.payment_attempts);
        let retries = model::delivery_count(delivery);
        let attempt = retries + 1;
        if model::chance(
            self.seed,
            request.order_id,
            100 + u64::from(retries),
            self.failure_rate,
        ) {
            Tally::bump(&self.tally.payment_failures);
            let reason = "payment gateway timed out (injected failure)";
            if retries >= PAYMENT_DELIVERY_LIMIT {
                self.store
                    .decide(request.order_id, &PaymentRecord::GaveUp)?;
                self.dirty = true;
                tracing::warn!(
                    order_id = request.order_id,
                    attempt,
                    reason,
                    "payment failed on its last attempt: the request goes to the dead-letter queue"
                );
            } else {
                tracing::info!(
                    order_id = request.order_id,
                    attempt,
                    reason,
                    "payment failed, will retry"
                );
            }
            return Ok(Settle::Requeue);
        }
        let record = if request.amount > DECLINE_ABOVE_CENTS {
            PaymentRecord::Declined {
                reason: format!(
                    "amount {} over the limit {DECLINE_ABOVE_CENTS}",
                    request.amount
                ),
            }
        } else {
            PaymentRecord::Paid {
                transaction_id: self.transaction_id(request.order_id),
            }
        };
        self.store.decide(request.order_id, &record)?;
        self.dirty = true;
        Self::answer(delivery, &request, &record, outbox);
        Ok(Settle::Ack)
    }

    /// Decisions must be durable before their results are published: otherwise a crash could
    /// leave an order paid whose charge the payment service has forgotten, and charge again.
    fn commit(&mut self) -> Result<(), AppError> {
        if std::mem::take(&mut self.dirty) {
            self.store.db.flush()?;
        }
        Ok(())
    }
}
