//! Request-reply mode: the order side calls the payment service through `coney::rpc` (direct
//! reply-to) and applies each reply itself, instead of reading results from `order_queue`.
//!
//! The creating thread creates orders (durable first) and sends their calls a batch at a
//! time; waiter threads each take a batch, wait for its replies (until the batch's deadline),
//! apply them, flush the order store, publish the stock updates with confirms and then note
//! on each paid order that its stock update is confirmed. So a call that never gets its reply
//! holds up one waiter for a while, not the creation. A resumed run first sends again the
//! stock updates of paid orders without that note: unlike a result in `order_queue`, a reply
//! is not redelivered after a crash.
//!
//! A call without a reply in time is not an error: the payment service may be retrying it,
//! be down, or have given up on it (then the dead-letter watcher settles the order). Orders
//! still `created` once everything is sent are called again, every [`RECALL_AFTER`]; the
//! payment service answers a repeat from its records, so an order called twice is charged
//! once. A reply to an earlier call is dropped by the client, as RabbitMQ drops a direct reply
//! to a requester that has gone. After a crash the replies to the old process went with it,
//! so a resumed run calls every order still `created` again.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coney::Connection;
use coney::rpc::{PendingReply, ReplyMode, RpcClient, RpcError};
use parking_lot::Mutex;

use super::error::AppError;
use super::model::{self, PAYMENT_QUEUE, PaymentResult, PaymentStatus};
use super::order::{Order, OrderService, OrderStatus, OrderStore};
use super::service::{Outbox, Service, SharedTally, publish_confirmed};

/// How long a batch of calls waits for its replies: about what the payment service does
/// with [`BATCHES_IN_FLIGHT_MAX`] batches, so a reply that is merely queued rarely misses it.
const REPLY_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Threads waiting for replies: a call that never gets one (its request was dead-lettered)
/// holds up one of them until its batch's deadline, not the others.
const WAITERS: usize = 8;
/// How long an order without an outcome waits before it is called again.
const RECALL_AFTER: Duration = Duration::from_millis(250);
/// Batches sent and not yet taken by a waiter, at most: beyond, the creator waits.
const BATCHES_IN_FLIGHT_MAX: usize = 2;
/// Calls per batch when calling again.
const RECALL_BATCH: usize = 256;

/// A batch of calls and when to stop waiting for them.
struct Batch<'c> {
    deadline: Instant,
    calls: Vec<(u64, PendingReply<'c>)>,
}

/// What the two threads share.
struct Shared<'a> {
    client: RpcClient,
    orders: &'a OrderStore,
    tally: &'a SharedTally,
    /// Orders called whose reply did not come in time.
    unsettled: Mutex<BTreeSet<u64>>,
    /// Batches sent and not yet applied.
    in_flight: AtomicU64,
}

/// Runs the order side in request-reply mode on `conn`: with `recall_open` (a resumed run)
/// first calls every order still `created`, then `create_all` creates the orders through the
/// function it is given (which creates a range of ids and calls their payments), then calls
/// again every order still without an outcome until there is none, or `stop`. Returns how
/// many orders it called at the start.
pub fn run(
    conn: &Connection,
    orders: &OrderStore,
    tally: &SharedTally,
    seed: u64,
    recall_open: bool,
    stop: &AtomicBool,
    create_all: impl FnOnce(&mut dyn FnMut(Range<u64>) -> Result<(), AppError>) -> Result<(), AppError>,
) -> Result<u64, AppError> {
    let shared = Shared {
        client: RpcClient::new(conn, ReplyMode::DirectReplyTo)?,
        orders,
        tally,
        unsettled: Mutex::new(BTreeSet::new()),
        in_flight: AtomicU64::new(0),
    };
    if recall_open {
        resend_stock_updates(conn, orders)?;
    }
    let shared = &shared;
    std::thread::scope(|scope| {
        let (tx, rx) = crossbeam_channel::bounded::<Batch<'_>>(BATCHES_IN_FLIGHT_MAX);
        let waiters: Vec<_> = (0..WAITERS)
            .map(|_| {
                let rx = rx.clone();
                let channel = conn.channel();
                let mut service = OrderService::new(orders.clone(), tally.clone());
                scope.spawn(move || -> Result<(), AppError> {
                    let channel = channel?;
                    channel.confirm_select(Default::default())?;
                    for batch in rx {
                        let r = apply(shared, &mut service, &channel, batch);
                        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                        r?;
                    }
                    Ok(())
                })
            })
            .collect();
        drop(rx);
        let send = |orders: &[Order]| -> Result<(), AppError> {
            let mut calls = Vec::with_capacity(orders.len());
            for order in orders {
                let body = model::encode_json(&order.payment_request());
                let call = shared
                    .client
                    .send("", PAYMENT_QUEUE, body, model::json_properties(order.id))
                    .map_err(rpc_error)?;
                calls.push((order.id, call));
            }
            shared.in_flight.fetch_add(1, Ordering::SeqCst);
            let batch = Batch {
                deadline: Instant::now() + REPLY_TIMEOUT,
                calls,
            };
            tx.send(batch)
                .map_err(|_| AppError::Usage("the reply waiter stopped".into()))
        };
        let result = (|| -> Result<u64, AppError> {
            let mut recalled = 0;
            if recall_open {
                let open: Vec<Order> = orders
                    .all()
                    .filter(|o| {
                        o.as_ref()
                            .map_or(true, |o| o.status == OrderStatus::Created)
                    })
                    .collect::<Result<_, _>>()?;
                recalled = open.len() as u64;
                for chunk in open.chunks(RECALL_BATCH) {
                    send(chunk)?;
                }
            }
            create_all(&mut |ids: Range<u64>| {
                let end = ids.end;
                let created = orders.create(seed, ids)?;
                tally.created.store(end, Ordering::Relaxed);
                send(&created)
            })?;
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(RECALL_AFTER);
                if shared.in_flight.load(Ordering::SeqCst) > 0 {
                    continue;
                }
                let ids = std::mem::take(&mut *shared.unsettled.lock());
                let mut again = Vec::new();
                for id in ids {
                    if let Some(order) = orders.get(id)?
                        && order.status == OrderStatus::Created
                    {
                        again.push(order);
                    }
                }
                if again.is_empty() {
                    break;
                }
                for chunk in again.chunks(RECALL_BATCH) {
                    send(chunk)?;
                }
            }
            Ok(recalled)
        })();
        drop(tx);
        let mut waited = Ok(());
        for waiter in waiters {
            let r = waiter
                .join()
                .unwrap_or(Err(AppError::Panicked("reply waiter")));
            if waited.is_ok() {
                waited = r;
            }
        }
        let recalled = result?;
        waited?;
        Ok(recalled)
    })
}

/// Waits for a batch's replies, applies them, flushes the order store, then publishes the
/// stock updates with confirms.
fn apply(
    shared: &Shared<'_>,
    service: &mut OrderService,
    channel: &coney::Channel,
    batch: Batch<'_>,
) -> Result<(), AppError> {
    let mut outbox = Outbox::default();
    let mut missed = Vec::new();
    let mut paid = Vec::new();
    for (id, call) in batch.calls {
        match call.wait(batch.deadline.saturating_duration_since(Instant::now())) {
            Ok(reply) => {
                let result: PaymentResult = serde_json::from_slice(reply.body())
                    .map_err(|e| AppError::BadMessage(format!("payment reply: {e}")))?;
                service.apply_result(&result, &mut outbox)?;
                if result.status == PaymentStatus::Paid {
                    paid.push(result.order_id);
                }
            }
            Err(RpcError::Timeout { .. }) => missed.push(id),
            Err(e) => return Err(rpc_error(e)),
        }
    }
    service.commit()?;
    publish_confirmed(channel, &mut outbox, "order")?;
    shared.orders.note_stock_requested(&paid)?;
    shared
        .tally
        .rpc_timeouts
        .fetch_add(missed.len() as u64, Ordering::Relaxed);
    shared.unsettled.lock().extend(missed);
    Ok(())
}

/// Sends again, with confirms, the stock updates of paid orders not noted as confirmed (the
/// inventory applies each order once), and notes them.
fn resend_stock_updates(conn: &Connection, orders: &OrderStore) -> Result<(), AppError> {
    let channel = conn.channel()?;
    channel.confirm_select(Default::default())?;
    let mut outbox = Outbox::default();
    let mut ids = Vec::new();
    for order in orders.all() {
        let order = order?;
        if order.status == OrderStatus::Paid && !order.stock_requested {
            super::order::publish_stock_update(&order, &mut outbox);
            ids.push(order.id);
        }
    }
    publish_confirmed(&channel, &mut outbox, "order")?;
    orders.note_stock_requested(&ids)?;
    channel.close();
    Ok(())
}

fn rpc_error(e: RpcError) -> AppError {
    match e {
        RpcError::Broker(e) => AppError::Broker(e),
        other => AppError::Usage(format!("payment call: {other}")),
    }
}
