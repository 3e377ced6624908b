//! The requesting side: [`RpcClient`] publishes requests and hands each reply to the caller
//! whose request it answers, with the callers themselves receiving the replies in turn.
//!
//! # Who receives the replies
//! No thread of the client's own reads the reply consumer: a later deterministic simulation
//! runs everything on the callers' threads. Waiting callers take turns instead (leader and
//! followers). At most one waiting caller, the leader, holds the consumer and receives; it
//! files every reply under its correlation id and wakes the caller it belongs to (each waiting
//! caller sleeps on a condition variable of its own). The others, followers, sleep until their
//! reply is filed, their deadline passes or the consumer ends. The leader steps down when its
//! own call is over (its reply arrived, it timed out, the consumer ended) and wakes one
//! follower, the earliest waiting, which takes the consumer over. A follower woken to take
//! over that finds its own call over (its reply was filed meanwhile, or it timed out) passes
//! the turn on before it leaves; a caller that starts waiting while nobody leads leads at once.
//! So while any caller waits, one of them leads or has been woken to.
//!
//! # Invariants (kept under the `shared` lock)
//! - a call is in `calls` from its request's publish until its caller takes the outcome or
//!   drops the [`PendingReply`]; then it moves to `finished` (bounded by
//!   [`FINISHED_IDS_MAX`]);
//! - `waiters` holds exactly the calls whose caller is waiting now, each also in `calls`;
//! - `leader` is set while one waiting caller holds (or is about to take) the consumer;
//! - once `ended` is set it stays set, and every waiter has been woken.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, MutexGuard};
use rustc_hash::FxHashMap as HashMap;

use super::RpcError;
use crate::error::{CloseCause, Error};
use crate::runtime::{
    Channel, Connection, Consumer, Delivery, RecvTimeoutError, Returned, TryRecvError,
};
use crate::types::{
    BasicConsumeOptions, BasicProperties, BasicPublishOptions, FieldTable, IntoBody,
    QueueDeclareOptions,
};

/// How many finished calls a client remembers, to tell a late or duplicate reply from one it
/// never asked for. A reply to a call that finished more than this many calls ago is counted
/// as [`unknown`](RpcStats::unknown). About 20 bytes each.
pub const FINISHED_IDS_MAX: usize = 4096;

/// The direct reply-to pseudo-queue.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Where replies come back to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplyMode {
    /// RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`): replies go straight to the
    /// client's channel, nothing is queued; a reply to a client that is gone is dropped.
    #[default]
    DirectReplyTo,
    /// A server-named, exclusive, auto-delete queue declared by the client: it goes with the
    /// client (or its connection). Replies are consumed without acks: a reply is only of use
    /// to this client, and if the client goes its queue goes too, so an ack would buy no
    /// redelivery; it would only cost a settle per reply.
    ReplyQueue,
}

/// What a client counted since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RpcStats {
    /// Requests published.
    pub calls: u64,
    /// Replies handed to their caller.
    pub replies: u64,
    /// Calls that gave up waiting ([`RpcError::Timeout`]).
    pub timeouts: u64,
    /// Requests returned as unroutable ([`RpcError::Unroutable`]).
    pub unroutable: u64,
    /// Replies dropped because their call had timed out (or its [`PendingReply`] was dropped).
    pub late: u64,
    /// Replies dropped because their call had its reply already.
    pub duplicate: u64,
    /// Replies dropped because their correlation id is none this client issued (or remembers:
    /// see [`FINISHED_IDS_MAX`]), or they have none.
    pub unknown: u64,
}

/// A reply: the body and properties of the message the server sent back.
#[derive(Debug)]
pub struct Reply {
    delivery: Delivery,
}

impl Reply {
    /// Its body.
    pub fn body(&self) -> &Bytes {
        self.delivery.body()
    }

    /// Its properties (the `correlation_id` is the request's).
    pub fn properties(&self) -> &BasicProperties {
        self.delivery.properties()
    }

    /// The correlation id of the request it answers.
    pub fn correlation_id(&self) -> &str {
        self.properties().correlation_id.as_deref().unwrap_or("")
    }
}

/// A request-reply client on a channel of its own.
///
/// Usable from several threads at once (`&RpcClient` is enough): each caller gets only the
/// reply to its own request. Replies to calls that are over, duplicate replies and replies
/// it never asked for are counted ([`RpcClient::stats`]), logged and dropped.
///
/// # Receiving replies
/// Nothing runs in the background: the waiting callers receive the replies themselves. One
/// of them at a time, the leader, holds the reply consumer, files every reply it receives
/// under its correlation id and wakes that reply's caller; the others sleep until their
/// reply is filed or their timeout passes. When the leader's own call is over (its reply
/// came, it timed out, or the consumer ended) it wakes the earliest other waiting caller,
/// which takes the consumer over. Replies are taken off the consumer only while some caller
/// waits, so a reply to a [`PendingReply`] not yet waited for waits in the consumer (or in
/// the client, once another caller received it) until then.
///
/// Requests are published `mandatory`, so one that no queue takes fails at once with
/// [`RpcError::Unroutable`]. A request has no expiry unless its properties give one; an
/// `expiration` as long as the call's timeout keeps servers from answering requests whose
/// caller gave up.
pub struct RpcClient {
    /// Only the leader locks it (see the module doc), so it is never contended.
    consumer: Mutex<Consumer>,
    channel: Channel,
    reply_to: String,
    mode: ReplyMode,
    state: Arc<State>,
}

/// The bookkeeping shared by the callers and the channel's return handler.
struct State {
    /// Correlation ids are `<prefix>.<sequence number>`.
    prefix: String,
    shared: Mutex<Shared>,
}

struct Shared {
    next_seq: u64,
    calls: HashMap<u64, Call>,
    /// The waiting callers, by sequence number: the earliest is woken to take over.
    waiters: BTreeMap<u64, Arc<Condvar>>,
    leader: bool,
    /// Set once the reply consumer ended, with the channel's close cause if it was closed.
    ended: Option<Option<Arc<CloseCause>>>,
    finished: Finished,
    stats: RpcStats,
}

/// A call in flight.
enum Call {
    Waiting,
    Replied(Delivery),
    /// Returned unroutable while its request was being published.
    Returned,
}

impl RpcClient {
    /// A client on a new channel of `connection`, receiving replies as `mode` says. With
    /// [`ReplyMode::DirectReplyTo`] it consumes `amq.rabbitmq.reply-to` before any request
    /// is published, as RabbitMQ requires; with [`ReplyMode::ReplyQueue`] it declares its
    /// queue and consumes it.
    pub fn new(connection: &Connection, mode: ReplyMode) -> crate::Result<Self> {
        let channel = connection.channel()?;
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let (reply_to, consumer) = match mode {
            ReplyMode::DirectReplyTo => {
                let consumer =
                    channel.basic_consume(DIRECT_REPLY_TO, "", no_ack, FieldTable::new())?;
                (DIRECT_REPLY_TO.to_owned(), consumer)
            }
            ReplyMode::ReplyQueue => {
                let options = QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                };
                let queue = channel.queue_declare("", options, FieldTable::new())?.name;
                let consumer = channel.basic_consume(&queue, "", no_ack, FieldTable::new())?;
                (queue, consumer)
            }
        };
        // The server-generated consumer tag is unique on the broker (and follows its seed):
        // its random part makes the correlation ids of this client unlike any other's.
        let tag = consumer.tag();
        let prefix = tag.strip_prefix("amq.ctag-").unwrap_or(tag).to_owned();
        let state = Arc::new(State {
            prefix,
            shared: Mutex::new(Shared {
                next_seq: 1,
                calls: HashMap::default(),
                waiters: BTreeMap::new(),
                leader: false,
                ended: None,
                finished: Finished::default(),
                stats: RpcStats::default(),
            }),
        });
        let returns = state.clone();
        channel.set_return_handler(move |returned| returns.returned(returned));
        Ok(Self {
            consumer: Mutex::new(consumer),
            channel,
            reply_to,
            mode,
            state,
        })
    }

    /// Publishes a request to `exchange` with `routing_key` and waits up to `timeout` for its
    /// reply. `reply_to` and `correlation_id` are set by the client (overriding any in
    /// `properties`). The publish itself waits for flow control within the same `timeout`.
    pub fn call(
        &self,
        exchange: &str,
        routing_key: &str,
        body: impl IntoBody,
        properties: BasicProperties,
        timeout: Duration,
    ) -> Result<Reply, RpcError> {
        let started = Instant::now();
        let request = Request {
            exchange,
            routing_key,
            body: body.into_body(),
            properties,
        };
        let mut pending = self.publish(request, Some(timeout))?;
        pending.done = true;
        self.wait(pending.seq, &pending.correlation_id, started, timeout)
    }

    /// Publishes a request and returns at once: [`PendingReply::wait`] waits for its reply, so
    /// one thread can have several requests in flight. Sets `reply_to` and `correlation_id`
    /// as [`RpcClient::call`] does; waits for flow control as [`Channel::basic_publish`] does.
    pub fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: impl IntoBody,
        properties: BasicProperties,
    ) -> Result<PendingReply<'_>, RpcError> {
        let request = Request {
            exchange,
            routing_key,
            body: body.into_body(),
            properties,
        };
        self.publish(request, None)
    }

    /// What the client counted so far. Replies are counted when a waiting caller receives
    /// them, so a late or duplicate reply shows once some call has waited after it arrived.
    pub fn stats(&self) -> RpcStats {
        self.state.shared.lock().stats
    }

    /// Its reply mode.
    pub fn mode(&self) -> ReplyMode {
        self.mode
    }

    /// The `reply_to` its requests carry: `amq.rabbitmq.reply-to` (which the broker rewrites
    /// to the channel's own address) or the name of its reply queue.
    pub fn reply_to(&self) -> &str {
        &self.reply_to
    }

    /// The client's channel. Closing it ends the client: calls fail from then on. Its return
    /// handler is the client's: replacing it leaves unroutable requests to their timeout.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Registers a call, then publishes its request `mandatory` (registered first: the reply,
    /// or the return, may come before the publish returns). With `flow_timeout`, waits for
    /// flow control at most that long.
    fn publish(
        &self,
        request: Request<'_>,
        flow_timeout: Option<Duration>,
    ) -> Result<PendingReply<'_>, RpcError> {
        let seq = self.state.start()?;
        let mut pending = PendingReply {
            client: self,
            seq,
            correlation_id: self.state.correlation_id(seq),
            done: false,
        };
        let Request {
            exchange,
            routing_key,
            body,
            mut properties,
        } = request;
        properties.correlation_id = Some(pending.correlation_id.clone());
        properties.reply_to = Some(self.reply_to.clone());
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let ch = &self.channel;
        let published = match flow_timeout {
            Some(t) => {
                ch.basic_publish_timeout(exchange, routing_key, options, body, properties, t)
            }
            None => ch.basic_publish(exchange, routing_key, options, body, properties),
        };
        // From here on the outcome is settled here, not by the pending reply's drop.
        let mut shared = self.state.shared.lock();
        if let Err(e) = published {
            pending.done = true;
            shared.calls.remove(&seq); // never published: nothing will answer it
            return Err(match (e, flow_timeout) {
                (Error::Timeout, Some(waited)) => {
                    shared.stats.timeouts += 1;
                    RpcError::Timeout {
                        correlation_id: std::mem::take(&mut pending.correlation_id),
                        waited,
                    }
                }
                (e, _) => RpcError::Broker(e),
            });
        }
        shared.stats.calls += 1;
        if matches!(shared.calls.get(&seq), Some(Call::Returned)) {
            pending.done = true;
            shared.calls.remove(&seq);
            shared.stats.unroutable += 1;
            tracing::debug!(
                correlation_id = %pending.correlation_id,
                exchange,
                routing_key,
                "request returned unroutable"
            );
            return Err(RpcError::Unroutable {
                correlation_id: std::mem::take(&mut pending.correlation_id),
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            });
        }
        Ok(pending)
    }

    /// Waits until `timeout` after `started` for the reply to call `seq`, leading or following
    /// (see the module doc), then settles the call.
    fn wait(
        &self,
        seq: u64,
        correlation_id: &str,
        started: Instant,
        timeout: Duration,
    ) -> Result<Reply, RpcError> {
        // `None`: too far to represent, so no deadline.
        let deadline = started.checked_add(timeout);
        let wake = Arc::new(Condvar::new());
        let mut shared = self.state.shared.lock();
        shared.waiters.insert(seq, wake.clone());
        let outcome = loop {
            if let Some(outcome) = shared.outcome(seq, deadline) {
                break outcome;
            }
            if !shared.leader {
                shared.leader = true;
                self.lead(&mut shared, seq, deadline);
                shared.leader = false;
                continue;
            }
            match deadline {
                Some(deadline) => {
                    wake.wait_until(&mut shared, deadline);
                }
                None => wake.wait(&mut shared),
            }
        };
        shared.waiters.remove(&seq);
        if !shared.leader {
            // Nobody holds the consumer: the next waiting caller takes it over.
            shared.wake_next();
        }
        match outcome {
            Outcome::Replied(delivery) => {
                shared.finished.insert(seq, Finish::Answered);
                shared.stats.replies += 1;
                Ok(Reply { delivery })
            }
            Outcome::TimedOut => {
                shared.calls.remove(&seq);
                shared.finished.insert(seq, Finish::Abandoned);
                shared.stats.timeouts += 1;
                Err(RpcError::Timeout {
                    correlation_id: correlation_id.to_owned(),
                    waited: started.elapsed(),
                })
            }
            Outcome::Ended(cause) => {
                shared.calls.remove(&seq);
                shared.finished.insert(seq, Finish::Abandoned);
                Err(RpcError::Closed { cause })
            }
        }
    }

    /// As the leader: receives replies and files each, until call `seq` is over. The shared
    /// lock is let go while receiving.
    fn lead(&self, shared: &mut MutexGuard<'_, Shared>, seq: u64, deadline: Option<Instant>) {
        while shared.outcome_ready(seq, deadline).is_none() {
            let received = MutexGuard::unlocked(shared, || {
                // Only the leader takes the consumer, so this never waits.
                let mut consumer = self.consumer.lock();
                match deadline {
                    Some(deadline) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match consumer.recv_timeout(left) {
                            Ok(delivery) => Received::Reply(delivery),
                            Err(RecvTimeoutError::Timeout) => Received::Nothing,
                            Err(RecvTimeoutError::Disconnected) => {
                                Received::Ended(self.channel.close_cause())
                            }
                        }
                    }
                    None => match consumer.recv() {
                        Some(delivery) => Received::Reply(delivery),
                        None => Received::Ended(self.channel.close_cause()),
                    },
                }
            });
            match received {
                Received::Reply(delivery) => shared.file(&self.state.prefix, delivery),
                Received::Nothing => {}
                Received::Ended(cause) => shared.end(cause),
            }
        }
    }
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("mode", &self.mode)
            .field("reply_to", &self.reply_to)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// A request's parts, as `call` and `send` take them.
struct Request<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    body: Bytes,
    properties: BasicProperties,
}

/// A request in flight, from [`RpcClient::send`]. Dropping it without waiting gives up on
/// the reply: one that comes later counts as [`late`](RpcStats::late).
pub struct PendingReply<'a> {
    client: &'a RpcClient,
    seq: u64,
    correlation_id: String,
    /// Whether the call's outcome was taken (or settled while publishing).
    done: bool,
}

impl PendingReply<'_> {
    /// The request's correlation id.
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }

    /// The reply if it has come, without waiting: `None` while it has not (and after the
    /// outcome was taken). Replies already received for other calls are filed for them. For
    /// callers that cannot block, such as a test driving a
    /// [`Simulation`](crate::sim::Simulation): they decide when to give up (by the simulation's
    /// clock) by dropping the pending reply, which makes a later reply count as
    /// [`late`](RpcStats::late).
    pub fn try_reply(&mut self) -> Option<Result<Reply, RpcError>> {
        if self.done {
            return None;
        }
        let client = self.client;
        let mut shared = client.state.shared.lock();
        if !shared.leader
            && let Some(mut consumer) = client.consumer.try_lock()
        {
            // Nobody is receiving: take what has arrived, without waiting.
            loop {
                match consumer.try_recv() {
                    Ok(delivery) => shared.file(&client.state.prefix, delivery),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        shared.end(client.channel.close_cause());
                        break;
                    }
                }
            }
        }
        let outcome = shared.outcome(self.seq, None)?;
        self.done = true;
        Some(match outcome {
            Outcome::Replied(delivery) => {
                shared.finished.insert(self.seq, Finish::Answered);
                shared.stats.replies += 1;
                Ok(Reply { delivery })
            }
            Outcome::Ended(cause) => {
                shared.calls.remove(&self.seq);
                shared.finished.insert(self.seq, Finish::Abandoned);
                Err(RpcError::Closed { cause })
            }
            Outcome::TimedOut => {
                // No deadline was given: never reached.
                shared.calls.remove(&self.seq);
                shared.finished.insert(self.seq, Finish::Abandoned);
                shared.stats.timeouts += 1;
                Err(RpcError::Timeout {
                    correlation_id: self.correlation_id.clone(),
                    waited: Duration::ZERO,
                })
            }
        })
    }

    /// Waits up to `timeout` (from now) for the reply.
    pub fn wait(mut self, timeout: Duration) -> Result<Reply, RpcError> {
        self.done = true;
        let correlation_id = std::mem::take(&mut self.correlation_id);
        (self.client).wait(self.seq, &correlation_id, Instant::now(), timeout)
    }
}

impl Drop for PendingReply<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.client.state.shared.lock().abandon(self.seq);
        }
    }
}

impl std::fmt::Debug for PendingReply<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingReply")
            .field("correlation_id", &self.correlation_id)
            .finish_non_exhaustive()
    }
}

/// How a waiting caller's call ended.
enum Outcome {
    Replied(Delivery),
    TimedOut,
    Ended(Option<Arc<CloseCause>>),
}

/// What the leader got from one receive.
enum Received {
    Reply(Delivery),
    Nothing,
    Ended(Option<Arc<CloseCause>>),
}

impl State {
    /// Registers a new call; fails once the reply consumer has ended.
    fn start(&self) -> Result<u64, RpcError> {
        let mut shared = self.shared.lock();
        if let Some(cause) = &shared.ended {
            return Err(RpcError::Closed {
                cause: cause.clone(),
            });
        }
        let seq = shared.next_seq;
        shared.next_seq += 1;
        shared.calls.insert(seq, Call::Waiting);
        Ok(seq)
    }

    fn correlation_id(&self, seq: u64) -> String {
        format!("{}.{seq}", self.prefix)
    }

    /// The channel's return handler: marks the call whose request came back unroutable. It
    /// runs on the publishing thread, inside `basic_publish`.
    fn returned(&self, returned: Returned) {
        let seq = returned
            .properties
            .correlation_id
            .as_deref()
            .and_then(|id| seq_of(&self.prefix, id));
        let mut shared = self.shared.lock();
        if let Some(call) = seq.and_then(|seq| shared.calls.get_mut(&seq))
            && matches!(call, Call::Waiting)
        {
            *call = Call::Returned;
        }
    }
}

impl Shared {
    /// The outcome of call `seq` if it is over, taking its reply out.
    fn outcome(&mut self, seq: u64, deadline: Option<Instant>) -> Option<Outcome> {
        match self.outcome_ready(seq, deadline)? {
            Ready::Replied => match self.calls.remove(&seq) {
                Some(Call::Replied(delivery)) => Some(Outcome::Replied(delivery)),
                // `outcome_ready` just saw the reply under the same lock.
                _ => None,
            },
            Ready::Ended(cause) => Some(Outcome::Ended(cause)),
            Ready::TimedOut => Some(Outcome::TimedOut),
        }
    }

    /// Whether call `seq` is over, and how (a reply filed for it comes first).
    fn outcome_ready(&self, seq: u64, deadline: Option<Instant>) -> Option<Ready> {
        if matches!(self.calls.get(&seq), Some(Call::Replied(_))) {
            return Some(Ready::Replied);
        }
        if let Some(cause) = &self.ended {
            return Some(Ready::Ended(cause.clone()));
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Some(Ready::TimedOut);
        }
        None
    }

    /// Files a reply the leader received: hands it to its call (waking its caller), or
    /// counts and drops it.
    fn file(&mut self, prefix: &str, delivery: Delivery) {
        let id = delivery.properties().correlation_id.as_deref();
        let Some(seq) = id.and_then(|id| seq_of(prefix, id)) else {
            self.stats.unknown += 1;
            tracing::warn!(correlation_id = ?id, "dropped a reply this client never asked for");
            return;
        };
        match self.calls.get_mut(&seq) {
            Some(call @ Call::Waiting) => {
                *call = Call::Replied(delivery);
                if let Some(waiter) = self.waiters.get(&seq) {
                    waiter.notify_one();
                }
            }
            Some(Call::Replied(_) | Call::Returned) => self.duplicate(id),
            None => match self.finished.get(seq) {
                Some(Finish::Answered) => self.duplicate(id),
                Some(Finish::Abandoned) => {
                    self.stats.late += 1;
                    tracing::debug!(correlation_id = ?id, "dropped a reply to a call that gave up");
                }
                None => {
                    self.stats.unknown += 1;
                    tracing::warn!(correlation_id = ?id, "dropped a reply to a call this client does not know");
                }
            },
        }
    }

    fn duplicate(&mut self, id: Option<&str>) {
        self.stats.duplicate += 1;
        tracing::debug!(correlation_id = ?id, "dropped a second reply to a call");
    }

    /// The reply consumer ended: every call fails from now on; every waiter hears it.
    fn end(&mut self, cause: Option<Arc<CloseCause>>) {
        tracing::debug!(cause = ?cause, "the reply consumer ended");
        self.ended = Some(cause);
        for waiter in self.waiters.values() {
            waiter.notify_one();
        }
    }

    /// Wakes the earliest waiting caller, to take the consumer over.
    fn wake_next(&self) {
        if let Some(waiter) = self.waiters.values().next() {
            waiter.notify_one();
        }
    }

    /// A pending reply was dropped without waiting.
    fn abandon(&mut self, seq: u64) {
        let finish = match self.calls.remove(&seq) {
            None => return,
            Some(Call::Replied(_)) => Finish::Answered,
            Some(Call::Waiting | Call::Returned) => Finish::Abandoned,
        };
        self.finished.insert(seq, finish);
    }
}

/// Whether a call is over, seen without taking anything out.
enum Ready {
    Replied,
    TimedOut,
    Ended(Option<Arc<CloseCause>>),
}

/// The sequence number in one of this client's correlation ids.
fn seq_of(prefix: &str, correlation_id: &str) -> Option<u64> {
    let n = correlation_id.strip_prefix(prefix)?.strip_prefix('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// How a finished call ended, as far as its later replies go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Finish {
    /// It got its reply: another one is a duplicate.
    Answered,
    /// It timed out, failed or was dropped: a reply now is late.
    Abandoned,
}

/// The last [`FINISHED_IDS_MAX`] finished calls.
#[derive(Default)]
struct Finished {
    order: VecDeque<u64>,
    finish: HashMap<u64, Finish>,
}

impl Finished {
    fn insert(&mut self, seq: u64, finish: Finish) {
        if self.order.len() >= FINISHED_IDS_MAX
            && let Some(oldest) = self.order.pop_front()
        {
            self.finish.remove(&oldest);
        }
        self.order.push_back(seq);
        self.finish.insert(seq, finish);
    }

    fn get(&self, seq: u64) -> Option<Finish> {
        self.finish.get(&seq).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids_parse_back_to_their_sequence_number() {
        assert_eq!(seq_of("abc", "abc.17"), Some(17));
        assert_eq!(seq_of("abc", "abd.17"), None);
        assert_eq!(seq_of("abc", "abc.+17"), None);
        assert_eq!(seq_of("abc", "abc."), None);
        assert_eq!(seq_of("abc", "abc17"), None);
        assert_eq!(seq_of("abc", "abc.99999999999999999999999"), None);
    }

    #[test]
    fn finished_calls_are_remembered_up_to_the_bound() {
        let mut finished = Finished::default();
        let n = u64::try_from(FINISHED_IDS_MAX).expect("the bound fits u64");
        for seq in 0..=n {
            finished.insert(seq, Finish::Abandoned);
        }
        assert_eq!(finished.get(0), None, "the oldest is forgotten");
        assert_eq!(finished.get(1), Some(Finish::Abandoned));
        assert_eq!(finished.get(n), Some(Finish::Abandoned));
        assert_eq!(finished.order.len(), FINISHED_IDS_MAX);
        assert_eq!(finished.finish.len(), FINISHED_IDS_MAX);
    }
}
