//! The shop's invariant, checked over the stores at the end of a run (both runs, after a
//! resume): every order is paid with its stock updated exactly once, or failed, or
//! dead-lettered with its reason; none lost, none processed twice.
//!
//! What is walked, and what must agree:
//! - orders: ids `0..created` all present, `created` = what the run was asked for, each in a
//!   final state;
//! - payment: one charge per paid order, with the order's transaction id, none for any other
//!   order; a declined order has a recorded decline;
//! - inventory: the applied set is the paid set, each with the order's items, and for every
//!   item kind, initial stock - the paid orders' quantities = the stock now;
//! - no conflicting outcomes were recorded by the order service.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::error::AppError;
use super::inventory::{Applied, InventoryStore};
use super::model::{INITIAL_STOCK, ITEM_KINDS};
use super::order::{OrderStatus, OrderStore};
use super::payment::{PaymentRecord, PaymentStore};

/// Violations listed in full; beyond, only counted.
const VIOLATIONS_SHOWN_MAX: usize = 20;
/// Ids of orders without a final state listed.
const PENDING_SHOWN_MAX: usize = 10;

/// What the check found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Audit {
    /// Orders in the store.
    pub orders: u64,
    /// Paid (with their stock updated, if the invariant holds).
    pub paid: u64,
    /// Declined.
    pub failed: u64,
    /// Dead-lettered.
    pub dead_lettered: u64,
    /// Dead-lettered orders per reason (`delivery_limit`, ...).
    pub dead_letter_reasons: BTreeMap<String, u64>,
    /// Still `created`.
    pub pending: u64,
    /// Stock updates applied.
    pub stock_updates: u64,
    /// Charges made.
    pub charges: u64,
    /// Whether the invariant holds.
    pub holds: bool,
    /// How many violations were found.
    pub violation_count: u64,
    /// The first violations.
    pub violations: Vec<String>,
    /// Create -> final state, per settled order, in ms (for a paid order: until its stock
    /// update was applied).
    #[serde(skip)]
    pub latencies_ms: Vec<u64>,
}

impl Audit {
    fn violate(&mut self, text: String) {
        self.violation_count += 1;
        if self.violations.len() < VIOLATIONS_SHOWN_MAX {
            self.violations.push(text);
        }
    }
}

/// Checks the invariant; `expected` is how many orders the run was asked to create.
pub fn check(
    orders: &OrderStore,
    payments: &PaymentStore,
    inventory: &InventoryStore,
    expected: u64,
) -> Result<Audit, AppError> {
    let mut audit = Audit::default();
    let created = orders.created()?;
    if created != expected {
        audit.violate(format!("{created} orders created, {expected} asked for"));
    }
    let records: HashMap<u64, PaymentRecord> = payments.records()?.into_iter().collect();
    let mut charges: HashMap<u64, u64> = HashMap::new();
    for order_id in payments.charges()? {
        *charges.entry(order_id).or_default() += 1;
        audit.charges += 1;
    }
    let applied: HashMap<u64, Applied> = inventory.applied()?.into_iter().collect();
    audit.stock_updates = applied.len() as u64;
    let mut sold = vec![0i64; ITEM_KINDS as usize];
    let mut next_id = 0u64;
    let mut pending_ids = Vec::new();
    for order in orders.all() {
        let order = order?;
        audit.orders += 1;
        if order.id != next_id {
            audit.violate(format!("orders {next_id}..{} missing", order.id));
        }
        next_id = order.id + 1;
        let charged = charges.get(&order.id).copied().unwrap_or(0);
        let record = records.get(&order.id);
        let note = applied.get(&order.id);
        let final_latency = order.final_ms.map(|t| t.saturating_sub(order.created_ms));
        match order.status {
            OrderStatus::Created => {
                audit.pending += 1;
                if pending_ids.len() < PENDING_SHOWN_MAX {
                    pending_ids.push(order.id);
                }
            }
            OrderStatus::Paid => {
                audit.paid += 1;
                let tx = order.transaction_id.as_deref();
                match record {
                    Some(PaymentRecord::Paid { transaction_id })
                        if Some(transaction_id.as_str()) == tx => {}
                    other => audit.violate(format!(
                        "order {} paid with {tx:?}, payment recorded {other:?}",
                        order.id
                    )),
                }
                if charged != 1 {
                    audit.violate(format!("paid order {} charged {charged} times", order.id));
                }
                match note {
                    Some(note) if note.items == order.items => {
                        audit
                            .latencies_ms
                            .push(note.at_ms.saturating_sub(order.created_ms));
                    }
                    Some(note) => audit.violate(format!(
                        "order {} applied {:?}, ordered {:?}",
                        order.id, note.items, order.items
                    )),
                    None => audit.violate(format!("paid order {} has no stock update", order.id)),
                }
                for item in &order.items {
                    match sold.get_mut(item.id as usize) {
                        Some(units) => *units += i64::from(item.quantity),
                        None => audit
                            .violate(format!("order {} names unknown item {}", order.id, item.id)),
                    }
                }
            }
            OrderStatus::Failed => {
                audit.failed += 1;
                if !matches!(record, Some(PaymentRecord::Declined { .. })) {
                    audit.violate(format!(
                        "failed order {} has payment record {record:?}",
                        order.id
                    ));
                }
                audit.latencies_ms.extend(final_latency);
            }
            OrderStatus::DeadLettered => {
                audit.dead_lettered += 1;
                match &order.reason {
                    Some(reason) => {
                        *audit.dead_letter_reasons.entry(reason.clone()).or_default() += 1
                    }
                    None => {
                        audit.violate(format!("dead-lettered order {} has no reason", order.id))
                    }
                }
                if !matches!(record, None | Some(PaymentRecord::GaveUp)) {
                    audit.violate(format!(
                        "dead-lettered order {} has payment record {record:?}",
                        order.id
                    ));
                }
                audit.latencies_ms.extend(final_latency);
            }
        }
        if order.status != OrderStatus::Paid {
            if charged > 0 && order.status == OrderStatus::Created {
                audit.violate(format!(
                    "order {} charged {charged} times, its payment result not applied",
                    order.id
                ));
            } else if charged > 0 {
                audit.violate(format!(
                    "{:?} order {} charged {charged} times",
                    order.status, order.id
                ));
            }
            if note.is_some() {
                audit.violate(format!(
                    "{:?} order {} has a stock update",
                    order.status, order.id
                ));
            }
        }
    }
    if next_id != created {
        audit.violate(format!("orders {next_id}..{created} missing"));
    }
    if audit.pending > 0 {
        // First in the list: what a run cut short by its deadline is missing.
        audit.violation_count += audit.pending;
        audit.violations.insert(
            0,
            format!(
                "{} orders never reached a final state (the first: {pending_ids:?})",
                audit.pending
            ),
        );
        audit.violations.truncate(VIOLATIONS_SHOWN_MAX);
    }
    for order_id in charges.keys().filter(|id| **id >= next_id) {
        audit.violate(format!("charge for unknown order {order_id}"));
    }
    for order_id in applied.keys().filter(|id| **id >= next_id) {
        audit.violate(format!("stock update for unknown order {order_id}"));
    }
    let stock = inventory.stock()?;
    if stock.len() != ITEM_KINDS as usize {
        audit.violate(format!(
            "{} item kinds in stock, {ITEM_KINDS} expected",
            stock.len()
        ));
    }
    for (id, units) in stock {
        let expected_units = INITIAL_STOCK - sold.get(id as usize).copied().unwrap_or(0);
        if units != expected_units {
            audit.violate(format!(
                "item {id}: {units} in stock, {expected_units} = initial - paid orders' quantities"
            ));
        }
    }
    for conflict in orders.conflicts()? {
        audit.violate(format!("conflict: {conflict}"));
    }
    audit.holds = audit.violation_count == 0;
    Ok(audit)
}
