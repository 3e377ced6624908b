//! Durability: the flusher thread that writes the broker's records to its [`Store`], group
//! commit, confirms released after the flush that holds them, and recovery on open.
//!
//! Durability modes ([`Durability`]):
//! - `GroupCommit` (default): the flusher takes every job waiting, applies them as one batch
//!   and flushes once; every confirm in the batch is released after that flush.
//! - `PerMessage`: one job, one batch, one flush.
//! - `Periodic`: batches are applied, and flushed only by sled's own timer or when a caller
//!   asks for durability outright (`Broker::sync`, definition changes). Confirms are released
//!   after the apply, so a confirmed message can be lost in a crash: the weakest mode, for
//!   data that may be replayed.
//!
//! A message acked before the batch holding its record is written cancels that record: it is
//! never written, but its confirm is still released with the batch.
//!
//! The broker's close sends a last job (`Job::Stop`), answered after a flush of everything sent
//! before it; the flusher then ends, and the store is dropped, which closes it.
//!
//! Compaction ([`Store::compact`]) runs on the flusher too, between groups: on demand
//! (`Broker::compact_store`, a job like any other, so it comes after everything sent before
//! it), and by itself when the store says one is due ([`Store::compaction_due`]: most of its
//! space on disk is dead) and the flusher has been idle for [`COMPACT_IDLE`], or for as long as
//! the compaction is expected to hold writes if that is longer, and at most once per
//! [`COMPACT_INTERVAL_MIN`] (or ten times as long as the last one took). Writes sent meanwhile
//! wait in the channel, as they would behind a slow flush; the idle wait keeps that pause out
//! of a busy stream, and the store decides compaction is due only when it gives back much more
//! than it copies.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use smallvec::SmallVec;

use super::confirm::ConfirmCell;
use super::flow::FlowControl;
use crate::core::queue::dead_letter::DeathReason;
use crate::core::topology::{DurableBinding, DurableChange, NamedDestination};
use crate::store::{
    Batch, BindingRecord, CompactStats, DestinationRecord, ExchangeRecord, MessageRecord, Op,
    QueueRecord, Store, StoreError,
};
use crate::types::Message;

/// How publishes are made durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// One flush covers every publish waiting (the default).
    #[default]
    GroupCommit,
    /// A flush after every publish.
    PerMessage,
    /// sled flushes every `every_ms`; the broker flushes only for `Broker::sync` and definition
    /// changes. Confirms do not mean "on disk".
    Periodic {
        /// sled's flush interval.
        every_ms: u64,
    },
}

/// Jobs taken in one group at most. Large, so that when the flusher falls behind a fast
/// producer, the acks queued behind a message's publish fall in the same group and cancel its
/// record (a consumer a few thousand messages behind would otherwise make every message be
/// written and then removed).
const GROUP_MAX: usize = 1 << 17;

/// Body bytes of the records a group may write at most (bounds the batch's memory).
const GROUP_BYTES_MAX: u64 = 64 << 20;

/// A confirm to release once the job holding it is durable. It holds the channel's confirm
/// state only, never the channel: the flusher must not be what keeps a broker alive (it would
/// then drop the broker, and the store, on its own thread while the application moved on).
pub(crate) type Ticket = (Arc<ConfirmCell>, u64);

pub(crate) enum Job {
    /// A persistent message enters durable queues (queue id, sequence number).
    Publish {
        message: Arc<Message>,
        targets: SmallVec<[(u64, u64); 1]>,
        confirm: Option<Ticket>,
        /// When it entered the queues (for TTLs after a restart).
        enqueued_at_ms: u64,
    },
    /// A persistent message left a durable queue (acked, rejected, purged, fetched no-ack).
    Remove { queue: u64, seq: u64 },
    /// A message moved by dead-lettering: the source's record (if it had one) is removed and
    /// the new records written in the same batch.
    Move {
        remove: Option<(u64, u64)>,
        message: Arc<Message>,
        targets: SmallVec<[(u64, u64); 1]>,
        enqueued_at_ms: u64,
    },
    /// A persistent message came back to its durable queue: its delivery count is rewritten so
    /// it survives a restart.
    Requeued {
        queue: u64,
        seq: u64,
        message: Arc<Message>,
        delivery_count: u32,
        enqueued_at_ms: u64,
        /// Set when it is an at-least-once dead letter held for its targets: the reason.
        held: Option<DeathReason>,
    },
    /// Definition changes; answered once durable.
    Definitions(Batch, Sender<Result<(), StoreError>>),
    /// Answered once everything sent before is durable.
    Sync(Sender<Result<(), StoreError>>),
    /// The broker closes: answered once everything sent before is durable; the flusher then
    /// stops.
    Stop(Sender<Result<(), StoreError>>),
    /// Compacts the store after everything sent before is written; answered with what it did.
    /// With `if_due`, only if the store says a compaction is due (`None` otherwise).
    Compact {
        if_due: bool,
        reply: Sender<Result<Option<CompactStats>, StoreError>>,
    },
}

/// What a job costs the backlog besides the bodies it writes: the job itself and its record's
/// fields.
const JOB_OVERHEAD_BYTES: u64 = 128;

impl Job {
    /// What the job counts for in the flusher's backlog (flow control).
    fn backlog_bytes(&self) -> u64 {
        self.written_bytes() + JOB_OVERHEAD_BYTES
    }

    /// Body bytes the job writes (before any cancellation).
    fn written_bytes(&self) -> u64 {
        match self {
            Job::Publish {
                message, targets, ..
            }
            | Job::Move {
                message, targets, ..
            } => message.body_size() * targets.len() as u64,
            Job::Requeued { message, .. } => message.body_size(),
            _ => 0,
        }
    }
}

/// Definition changes on their way to the store.
pub(crate) struct Written(Receiver<Result<(), StoreError>>);

impl Written {
    /// Waits until they are durable (or failed).
    pub(crate) fn wait(self) -> Result<(), StoreError> {
        self.0
            .recv()
            .unwrap_or_else(|_| Err(StoreError::Storage("the flusher stopped".into())))
    }
}

/// The broker's link to its store.
pub(crate) struct Persistence {
    /// Taken (and dropped, which closes the store) by [`Persistence::close`].
    store: Mutex<Option<Arc<dyn Store>>>,
    tx: Sender<Job>,
    /// The first failure the flusher met: later durable operations are refused with it.
    poisoned: Arc<OnceLock<StoreError>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Counts the bytes waiting for the flusher (flow control's store backlog).
    flow: Arc<FlowControl>,
    /// Set when there is no flusher thread ([`Persistence::start_stepped`]): jobs wait in the
    /// channel until [`Persistence::run_pending`] carries them out on the caller's thread.
    stepped: Option<Stepped>,
}

/// The flusher's part when it runs on the caller's thread.
struct Stepped {
    rx: Mutex<Receiver<Job>>,
    mode: Durability,
}

impl Persistence {
    /// Starts the flusher thread.
    /// Starts the flusher thread; `auto_compact`: whether it compacts the store by itself.
    /// Without a flusher thread, for deterministic simulation: publishes, acks and moves wait
    /// until [`Persistence::run_pending`] writes them (a simulation decides when); a job that
    /// someone waits for (definitions, a sync, a compaction, the close) writes everything sent
    /// before it at once, on the caller's thread. Nothing compacts by itself.
    pub(crate) fn start_stepped(
        store: Arc<dyn Store>,
        mode: Durability,
        flow: Arc<FlowControl>,
    ) -> Arc<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        Arc::new(Self {
            store: Mutex::new(Some(store)),
            tx,
            poisoned: Arc::new(OnceLock::new()),
            thread: Mutex::new(None),
            flow,
            stepped: Some(Stepped {
                rx: Mutex::new(rx),
                mode,
            }),
        })
    }

    /// Jobs waiting to be written (stepped mode; 0 with a flusher thread).
    pub(crate) fn pending(&self) -> usize {
        self.stepped.as_ref().map_or(0, |s| s.rx.lock().len())
    }

    /// In stepped mode, writes and flushes every job waiting, as one group (as the flusher
    /// thread would), answering their confirms and waiters. Returns the jobs carried out.
    pub(crate) fn run_pending(&self) -> usize {
        let Some(stepped) = &self.stepped else {
            return 0;
        };
        let Some(store) = self.store.lock().clone() else {
            return 0;
        };
        let rx = stepped.rx.lock();
        let mut jobs: Vec<Job> = Vec::new();
        let mut done = 0;
        loop {
            let Ok(first) = rx.try_recv() else {
                return done;
            };
            let mut bytes = first.written_bytes();
            jobs.push(first);
            if stepped.mode != Durability::PerMessage {
                while jobs.len() < GROUP_MAX && bytes < GROUP_BYTES_MAX {
                    let Ok(job) = rx.try_recv() else { break };
                    bytes += job.written_bytes();
                    jobs.push(job);
                }
            }
            done += jobs.len();
            let (_, stop) = run_group(&*store, stepped.mode, &mut jobs, &self.poisoned, &self.flow);
            if stop {
                return done;
            }
        }
    }

    /// Sends a job someone waits for: in stepped mode, carried out at once with everything
    /// before it.
    fn send_waited(&self, job: Job) {
        self.send(job);
        self.run_pending();
    }

    pub(crate) fn start(
        store: Arc<dyn Store>,
        mode: Durability,
        auto_compact: bool,
        flow: Arc<FlowControl>,
    ) -> Arc<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let flusher_store = store.clone();
        let poisoned = Arc::new(OnceLock::new());
        let flusher_poisoned = poisoned.clone();
        let flusher_flow = flow.clone();
        let thread = std::thread::Builder::new()
            .name("coney-flusher".into())
            .spawn(move || {
                let auto = auto_compact.then(|| AutoCompaction::new(Instant::now()));
                run(
                    &*flusher_store,
                    mode,
                    &rx,
                    &flusher_poisoned,
                    &flusher_flow,
                    auto,
                );
            })
            .expect("spawning the flusher thread");
        Arc::new(Self {
            store: Mutex::new(Some(store)),
            tx,
            poisoned,
            thread: Mutex::new(Some(thread)),
            flow,
            stepped: None,
        })
    }

    /// `Err` once a write has failed: nothing may pretend to be durable after that.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        match self.poisoned.get() {
            None => Ok(()),
            Some(StoreError::Poisoned(text) | StoreError::Storage(text)) => {
                Err(StoreError::Poisoned(text.clone()))
            }
            Some(other) => Err(StoreError::Poisoned(other.to_string())),
        }
    }

    /// The store; `None` once closed.
    pub(crate) fn store(&self) -> Option<Arc<dyn Store>> {
        self.store.lock().clone()
    }

    pub(crate) fn send(&self, job: Job) {
        self.flow
            .add_backlog(i64::try_from(job.backlog_bytes()).unwrap_or(i64::MAX));
        // The flusher only stops when the broker is dropped, after every sender.
        let _ = self.tx.send(job);
    }

    /// Queues definition changes; the returned handle waits until they are durable.
    pub(crate) fn write_definitions(&self, ops: Batch) -> Written {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send_waited(Job::Definitions(ops, tx));
        Written(rx)
    }

    /// Waits until everything sent so far is durable.
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send_waited(Job::Sync(tx));
        rx.recv()
            .unwrap_or_else(|_| Err(StoreError::Storage("the flusher stopped".into())))
    }

    /// Compacts the store once everything sent so far is written (with `if_due`, only if the
    /// store says a compaction is due); waits for it.
    pub(crate) fn compact(&self, if_due: bool) -> Result<Option<CompactStats>, StoreError> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.send_waited(Job::Compact { if_due, reply });
        rx.recv()
            .unwrap_or_else(|_| Err(StoreError::Storage("the flusher stopped".into())))
    }
}

impl Persistence {
    /// Writes and flushes everything sent so far, stops the flusher, then drops the store
    /// (closing it: a sled store releases its directory). Returns the last flush's outcome.
    /// Jobs sent afterwards are dropped (their waiters hear that the flusher stopped).
    pub(crate) fn close(&self) -> Result<(), StoreError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send_waited(Job::Stop(tx));
        let result = rx
            .recv()
            .unwrap_or_else(|_| Err(StoreError::Storage("the flusher stopped".into())));
        let thread = self.thread.lock().take();
        if let Some(t) = thread
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
        let store = self.store.lock().take();
        drop(store);
        result
    }
}

impl Drop for Persistence {
    fn drop(&mut self) {
        // Closing the channel ends the flusher after it has written what it holds.
        let (dead, _) = crossbeam_channel::bounded(0);
        drop(std::mem::replace(&mut self.tx, dead));
        if let Some(t) = self.thread.lock().take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

/// The flusher: takes a group of jobs, writes them as one batch, flushes, answers; compacts
/// the store when asked, and by itself (`auto`) when idle and the store says it is due.
fn run(
    store: &dyn Store,
    mode: Durability,
    rx: &Receiver<Job>,
    poisoned: &OnceLock<StoreError>,
    flow: &FlowControl,
    mut auto: Option<AutoCompaction>,
) {
    let mut jobs: Vec<Job> = Vec::new();
    loop {
        let received = match auto.as_ref().and_then(AutoCompaction::deadline) {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => rx.recv_deadline(at),
        };
        let first = match received {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                if let Some(auto) = &mut auto {
                    auto.check(store, poisoned, Instant::now());
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut bytes = first.written_bytes();
        jobs.push(first);
        if mode != Durability::PerMessage {
            while jobs.len() < GROUP_MAX && bytes < GROUP_BYTES_MAX {
                let Ok(job) = rx.try_recv() else { break };
                bytes += job.written_bytes();
                jobs.push(job);
            }
        }
        let (wrote, stop) = run_group(store, mode, &mut jobs, poisoned, flow);
        if stop {
            break;
        }
        if let Some(auto) = &mut auto {
            auto.after_group(Instant::now(), wrote);
        }
    }
}

/// Writes a group of jobs as one batch, flushes (as the mode says), answers the jobs' waiters
/// and confirms, then runs the compactions asked for. Empties `jobs`; returns whether it
/// wrote anything and whether the group held the broker's close.
fn run_group(
    store: &dyn Store,
    mode: Durability,
    jobs: &mut Vec<Job>,
    poisoned: &OnceLock<StoreError>,
    flow: &FlowControl,
) -> (bool, bool) {
    let (result, refused) = if let Some(first) = poisoned.get() {
        // Once a write failed nothing more is written, and every waiter hears why.
        (Err(StoreError::Poisoned(first.to_string())), Vec::new())
    } else {
        apply_group(store, jobs)
    };
    // Periodic mode leaves flushing to sled's timer, except where a caller asked for
    // durability outright (`Broker::sync`, definitions).
    let explicit = jobs
        .iter()
        .any(|j| matches!(j, Job::Sync(_) | Job::Definitions(..) | Job::Stop(_)));
    let stop = jobs.iter().any(|j| matches!(j, Job::Stop(_)));
    let wrote = result.as_ref().is_ok_and(|wrote| *wrote);
    let result = result.and_then(|_| match mode {
        Durability::Periodic { .. } if !explicit => Ok(()),
        _ if !wrote && !explicit => Ok(()),
        _ => store.flush(),
    });
    if let Err(e) = &result {
        let _ = poisoned.set(e.clone());
    }
    let backlog: u64 = jobs.iter().map(Job::backlog_bytes).sum();
    let compactions: Vec<_> = jobs
        .iter()
        .filter_map(|job| match job {
            Job::Compact { if_due, reply } => Some((*if_due, reply.clone())),
            _ => None,
        })
        .collect();
    answer(jobs.drain(..), &result, &refused);
    flow.add_backlog(-i64::try_from(backlog).unwrap_or(i64::MAX));
    // After the group's answers: its confirms do not wait for the compaction.
    for (if_due, reply) in compactions {
        let _ = reply.send(compact(store, if_due, poisoned));
    }
    (wrote, stop)
}

/// How long the flusher must have been idle before it compacts by itself (at least).
const COMPACT_IDLE: Duration = Duration::from_millis(250);
/// Shortest time between two compactions the flusher starts by itself.
const COMPACT_INTERVAL_MIN: Duration = Duration::from_secs(10);
/// How long the flusher waits before trying again after a compaction failed.
const COMPACT_RETRY_AFTER: Duration = Duration::from_secs(60);

/// When the flusher compacts by itself (see the module doc). Time is passed in.
struct AutoCompaction {
    /// Whether a check is pending: something was written since the last one (or the store
    /// was just opened).
    pending: bool,
    /// When the last group of jobs was done.
    last_job_at: Instant,
    /// How long the flusher must have been idle for the pending check.
    idle_needed: Duration,
    /// No compaction starts by itself before this.
    not_before: Instant,
}

impl AutoCompaction {
    fn new(now: Instant) -> Self {
        Self {
            pending: true,
            last_job_at: now,
            idle_needed: COMPACT_IDLE,
            not_before: now,
        }
    }

    /// When to check next, if a check is pending.
    fn deadline(&self) -> Option<Instant> {
        self.pending
            .then(|| (self.last_job_at + self.idle_needed).max(self.not_before))
    }

    /// A group of jobs was done at `now`; `wrote` if it wrote to the store.
    fn after_group(&mut self, now: Instant, wrote: bool) {
        self.last_job_at = now;
        if wrote {
            self.pending = true;
            self.idle_needed = COMPACT_IDLE;
        }
    }

    /// The flusher has been idle until `now`: compacts if the store says it is due and the
    /// flusher has been idle for as long as the compaction should take.
    fn check(&mut self, store: &dyn Store, poisoned: &OnceLock<StoreError>, now: Instant) {
        if poisoned.get().is_some() {
            self.pending = false;
            return;
        }
        let due = match store.compaction_due() {
            Ok(Some(due)) => due,
            Ok(None) => {
                self.pending = false;
                return;
            }
            Err(e) => {
                tracing::warn!("cannot tell whether the store needs compacting: {e}");
                note_failure(poisoned, &e);
                self.pending = false;
                return;
            }
        };
        let idle_needed = COMPACT_IDLE.max(due.pause_estimate);
        if now < self.last_job_at + idle_needed {
            self.idle_needed = idle_needed;
            return;
        }
        match store.compact() {
            Ok(stats) => {
                tracing::info!(
                    size_before_bytes = stats.size_before_bytes,
                    size_after_bytes = stats.size_after_bytes,
                    records = stats.records,
                    pause_ms = stats.pause.as_millis(),
                    took_ms = stats.took.as_millis(),
                    "compacted the store"
                );
                self.pending = false;
                self.not_before = Instant::now() + COMPACT_INTERVAL_MIN.max(stats.took * 10);
            }
            Err(e) => {
                tracing::warn!("compacting the store failed: {e}");
                note_failure(poisoned, &e);
                self.not_before = Instant::now() + COMPACT_RETRY_AFTER;
            }
        }
    }
}

/// A compaction asked for by a [`Job::Compact`].
fn compact(
    store: &dyn Store,
    if_due: bool,
    poisoned: &OnceLock<StoreError>,
) -> Result<Option<CompactStats>, StoreError> {
    if let Some(first) = poisoned.get() {
        return Err(StoreError::Poisoned(first.to_string()));
    }
    let result = (|| {
        if if_due && store.compaction_due()?.is_none() {
            return Ok(None);
        }
        store.compact().map(Some)
    })();
    if let Err(e) = &result {
        note_failure(poisoned, e);
    }
    result
}

/// Records a failure that poisoned the store, so later jobs are refused with it (a compaction
/// that failed before its switch, or found damage, leaves the store usable).
fn note_failure(poisoned: &OnceLock<StoreError>, error: &StoreError) {
    if matches!(error, StoreError::Storage(_) | StoreError::Poisoned(_)) {
        let _ = poisoned.set(error.clone());
    }
}

/// Applies a group of jobs as one batch; returns whether anything was written, and the jobs
/// refused alone.
///
/// A record the store refuses before writing anything ([`StoreError::Invalid`]: the batch was
/// not applied, the store is not poisoned) must not take the rest of the group with it: the
/// group is then applied job by job, and only the jobs whose own records are refused fail
/// (their confirms are nacked, their waiters told why). Publishes check what the store checks,
/// so this is a second line of defence. Any other failure fails the group.
fn apply_group(
    store: &dyn Store,
    jobs: &[Job],
) -> (Result<bool, StoreError>, Vec<(usize, StoreError)>) {
    let batch = group_batch(jobs);
    if batch.is_empty() {
        return (Ok(false), Vec::new());
    }
    match store.apply(&batch) {
        Ok(()) => (Ok(true), Vec::new()),
        Err(StoreError::Invalid(reason)) => {
            tracing::warn!(%reason, "a record was refused by the store; applying its group job by job");
            let mut refused = Vec::new();
            for (index, job) in jobs.iter().enumerate() {
                let batch = group_batch(std::slice::from_ref(job));
                if batch.is_empty() {
                    continue;
                }
                match store.apply(&batch) {
                    Ok(()) => {}
                    Err(e @ StoreError::Invalid(_)) => refused.push((index, e)),
                    Err(e) => return (Err(e), refused),
                }
            }
            (Ok(true), refused)
        }
        Err(e) => (Err(e), Vec::new()),
    }
}

/// One batch for a group of jobs, in job order, leaving out records written and removed within
/// the group (a message acked before its record reached the store), and keeping only the last
/// of several writes of one record.
fn group_batch(jobs: &[Job]) -> Batch {
    let mut ops: Vec<Option<Op>> = Vec::new();
    // (queue, seq) -> (index of its pending write, whether that write creates the record)
    let mut pending: HashMap<(u64, u64), (usize, bool)> = HashMap::new();
    for job in jobs {
        match job {
            Job::Publish {
                message,
                targets,
                enqueued_at_ms,
                ..
            } => {
                let record = Arc::new(message_record(message, 0, *enqueued_at_ms));
                for &(queue, seq) in targets {
                    pending.insert((queue, seq), (ops.len(), true));
                    ops.push(Some(Op::PutMessage {
                        queue,
                        seq,
                        record: record.clone(),
                    }));
                }
            }
            Job::Requeued {
                queue,
                seq,
                message,
                delivery_count,
                enqueued_at_ms,
                held,
            } => {
                let (queue, seq) = (*queue, *seq);
                let creates = match pending.remove(&(queue, seq)) {
                    Some((at, creates)) => {
                        ops[at] = None;
                        creates
                    }
                    None => false,
                };
                pending.insert((queue, seq), (ops.len(), creates));
                let mut record = message_record(message, *delivery_count, *enqueued_at_ms);
                record.pending_dead_letter = held.map(|reason| reason.as_str().to_owned());
                let record = Arc::new(record);
                ops.push(Some(Op::PutMessage { queue, seq, record }));
            }
            Job::Remove { queue, seq } => remove(&mut ops, &mut pending, *queue, *seq),
            Job::Move {
                remove: source,
                message,
                targets,
                enqueued_at_ms,
            } => {
                if let Some((queue, seq)) = source {
                    remove(&mut ops, &mut pending, *queue, *seq);
                }
                let record = Arc::new(message_record(message, 0, *enqueued_at_ms));
                for &(queue, seq) in targets {
                    pending.insert((queue, seq), (ops.len(), true));
                    ops.push(Some(Op::PutMessage {
                        queue,
                        seq,
                        record: record.clone(),
                    }));
                }
            }
            Job::Definitions(batch, _) => ops.extend(batch.ops().iter().cloned().map(Some)),
            Job::Sync(_) | Job::Stop(_) | Job::Compact { .. } => {}
        }
    }
    Batch::from(ops.into_iter().flatten().collect::<Vec<_>>())
}

/// Adds the removal of record (queue, seq) to a group: a pending first write of it is dropped
/// instead (never written, nothing to remove); a pending rewrite is dropped and the record
/// removed.
fn remove(
    ops: &mut Vec<Option<Op>>,
    pending: &mut HashMap<(u64, u64), (usize, bool)>,
    queue: u64,
    seq: u64,
) {
    match pending.remove(&(queue, seq)) {
        Some((at, true)) => ops[at] = None,
        Some((at, false)) => {
            ops[at] = None;
            ops.push(Some(Op::DeleteMessage { queue, seq }));
        }
        None => ops.push(Some(Op::DeleteMessage { queue, seq })),
    }
}

/// Releases confirms (acks, or nacks if the write failed) channel by channel, and answers
/// waiters; a job in `refused` (by index) fails alone with its own error.
fn answer(
    jobs: impl Iterator<Item = Job>,
    result: &Result<(), StoreError>,
    refused: &[(usize, StoreError)],
) {
    // (channel, acked seqs, nacked seqs)
    let mut by_channel: Vec<(Arc<ConfirmCell>, Vec<u64>, Vec<u64>)> = Vec::new();
    for (index, job) in jobs.enumerate() {
        let own = refused.iter().find(|(i, _)| *i == index).map(|(_, e)| e);
        let outcome = match own {
            Some(e) => Err(e.clone()),
            None => result.clone(),
        };
        match job {
            Job::Publish {
                confirm: Some((ch, seq)),
                ..
            } => {
                let at = match by_channel.iter().position(|(c, ..)| Arc::ptr_eq(c, &ch)) {
                    Some(at) => at,
                    None => {
                        by_channel.push((ch, Vec::new(), Vec::new()));
                        by_channel.len() - 1
                    }
                };
                let (_, acked, nacked) = &mut by_channel[at];
                match outcome {
                    Ok(()) => acked.push(seq),
                    Err(_) => nacked.push(seq),
                }
            }
            Job::Definitions(_, tx) | Job::Sync(tx) | Job::Stop(tx) => {
                let _ = tx.send(outcome);
            }
            _ => {}
        }
    }
    for (ch, acked, nacked) in by_channel {
        ch.answer(&acked, &nacked);
    }
}

fn message_record(m: &Message, delivery_count: u32, enqueued_at_ms: u64) -> MessageRecord {
    MessageRecord {
        exchange: m.exchange.to_string(),
        routing_key: m.routing_key.to_string(),
        properties: m.properties.clone(),
        body: m.body.clone(),
        delivery_count,
        delivered: false,
        enqueued_at_ms,
        dead_lettered: m.dead_lettered,
        bcc: m.bcc.clone(),
        pending_dead_letter: None,
    }
}

// ---- definitions --------------------------------------------------------------------------

/// The store records for durable definition changes, in the order they were made. O(changes):
/// nothing else of the topology is looked at.
pub(crate) fn definition_ops(changes: &[DurableChange]) -> Batch {
    let mut batch = Batch::new();
    for change in changes {
        batch.push(match change {
            DurableChange::ExchangeDeclared(ex) => Op::PutExchange(ExchangeRecord {
                name: ex.name.to_string(),
                kind: ex.kind.name().to_owned(),
                auto_delete: ex.auto_delete,
                internal: ex.internal,
                arguments: ex.arguments.clone(),
            }),
            DurableChange::ExchangeDeleted(name) => Op::DeleteExchange(name.to_string()),
            DurableChange::QueueDeclared(q) => Op::PutQueue(QueueRecord {
                id: q.id.0,
                name: q.name.to_string(),
                auto_delete: q.auto_delete,
                arguments: q.arguments.clone(),
            }),
            // Removes the queue's messages too.
            DurableChange::QueueDeleted(q) => Op::DeleteQueue(q.id.0),
            DurableChange::Bound(b) => Op::PutBinding(binding_record(b)),
            DurableChange::Unbound(b) => Op::DeleteBinding(binding_record(b)),
        });
    }
    batch
}

fn binding_record(b: &DurableBinding) -> BindingRecord {
    BindingRecord {
        source: b.source.to_string(),
        destination: match &b.destination {
            NamedDestination::Queue(q) => DestinationRecord::Queue(q.to_string()),
            NamedDestination::Exchange(e) => DestinationRecord::Exchange(e.to_string()),
        },
        routing_key: b.routing_key.to_string(),
        arguments: b.arguments.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::BasicProperties;

    fn message() -> Arc<Message> {
        Arc::new(Message {
            exchange: "".into(),
            routing_key: "q".into(),
            properties: BasicProperties::default().with_delivery_mode(2),
            body: bytes::Bytes::from_static(b"m"),
            dead_lettered: false,
            bcc: Vec::new(),
        })
    }

    fn kinds(batch: &Batch) -> Vec<String> {
        batch
            .ops()
            .iter()
            .map(|op| match op {
                Op::PutMessage { seq, record, .. } => {
                    format!("put {seq}#{}", record.delivery_count)
                }
                Op::DeleteMessage { seq, .. } => format!("delete {seq}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// A record the store refuses fails its own job only: the rest of the group is written,
    /// and nothing is poisoned.
    #[test]
    fn a_refused_record_fails_alone() {
        let store = crate::store::MemoryStore::new();
        let bad = Arc::new(Message {
            routing_key: "k".repeat(300).into(), // over the store's 255-byte limit
            ..Message::clone(&message())
        });
        let publish = |message: Arc<Message>, seq| Job::Publish {
            message,
            targets: [(1, seq)].into_iter().collect(),
            confirm: None,
            enqueued_at_ms: 0,
        };
        let jobs = [
            publish(message(), 0),
            publish(bad, 1),
            publish(message(), 2),
        ];
        let (result, refused) = apply_group(&store, &jobs);
        assert_eq!(result, Ok(true));
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, 1);
        assert!(matches!(refused[0].1, StoreError::Invalid(_)));
        store.flush().unwrap();
        let recovered = store.recover().unwrap();
        let seqs: Vec<u64> = recovered.messages[0]
            .messages
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(seqs, [0, 2]);
    }

    /// A store that says a compaction is due (with a given pause) and counts compactions.
    #[derive(Default)]
    struct DueStore {
        inner: crate::store::MemoryStore,
        due: Option<std::time::Duration>,
        compactions: std::sync::atomic::AtomicU32,
    }

    impl Store for DueStore {
        fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
            self.inner.apply(batch)
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush()
        }
        fn recover_into(
            &self,
            sink: &mut dyn crate::store::RecoverySink,
        ) -> Result<(), StoreError> {
            self.inner.recover_into(sink)
        }
        fn size_on_disk(&self) -> Result<u64, StoreError> {
            Ok(0)
        }
        fn compact(&self) -> Result<CompactStats, StoreError> {
            self.compactions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(CompactStats::default())
        }
        fn compaction_due(&self) -> Result<Option<crate::store::CompactionDue>, StoreError> {
            Ok(self.due.map(|pause_estimate| crate::store::CompactionDue {
                size_on_disk_bytes: 1 << 30,
                live_records: 0,
                live_bytes: 0,
                pause_estimate,
            }))
        }
    }

    impl DueStore {
        fn compactions(&self) -> u32 {
            self.compactions.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    /// The flusher compacts only once idle for as long as the compaction should pause writes
    /// (at least `COMPACT_IDLE`), not again before `COMPACT_INTERVAL_MIN`, and checks again
    /// only after a write.
    #[test]
    fn automatic_compaction_waits_for_an_idle_flusher() {
        let pause = std::time::Duration::from_secs(2);
        let store = DueStore {
            due: Some(pause),
            ..DueStore::default()
        };
        let poisoned = OnceLock::new();
        let start = Instant::now();
        let mut auto = AutoCompaction::new(start);
        assert_eq!(
            auto.deadline(),
            Some(start + COMPACT_IDLE),
            "checks once opened"
        );
        auto.after_group(start, true);
        auto.check(&store, &poisoned, start + COMPACT_IDLE);
        assert_eq!(store.compactions(), 0, "idle for less than the pause");
        assert_eq!(auto.deadline(), Some(start + pause), "waits for the pause");
        auto.check(&store, &poisoned, start + pause);
        assert_eq!(store.compactions(), 1);
        assert_eq!(auto.deadline(), None, "nothing written since");
        let later = Instant::now();
        auto.after_group(later, true);
        let next = auto.deadline().expect("a write makes a check pending");
        assert!(next >= later + COMPACT_INTERVAL_MIN - std::time::Duration::from_secs(1));
        auto.after_group(later, false);
        // Not due: the check ends until the next write.
        let not_due = DueStore::default();
        auto.check(&not_due, &poisoned, next);
        assert_eq!(auto.deadline(), None);
        assert_eq!(not_due.compactions(), 0);
    }

    #[test]
    fn a_record_written_and_removed_in_one_group_is_never_written() {
        let jobs = [
            Job::Publish {
                message: message(),
                targets: [(1, 0)].into_iter().collect(),
                confirm: None,
                enqueued_at_ms: 0,
            },
            Job::Requeued {
                queue: 1,
                seq: 0,
                message: message(),
                delivery_count: 1,
                enqueued_at_ms: 0,
                held: None,
            },
            Job::Remove { queue: 1, seq: 0 },
        ];
        assert!(group_batch(&jobs).is_empty());
    }

    #[test]
    fn an_update_of_a_written_record_keeps_its_removal() {
        let jobs = [
            Job::Requeued {
                queue: 1,
                seq: 4,
                message: message(),
                delivery_count: 2,
                enqueued_at_ms: 0,
                held: None,
            },
            Job::Remove { queue: 1, seq: 4 },
        ];
        assert_eq!(kinds(&group_batch(&jobs)), ["delete 4"]);
    }

    #[test]
    fn only_the_last_write_of_a_record_is_kept() {
        let jobs = [
            Job::Publish {
                message: message(),
                targets: [(1, 7)].into_iter().collect(),
                confirm: None,
                enqueued_at_ms: 0,
            },
            Job::Requeued {
                queue: 1,
                seq: 7,
                message: message(),
                delivery_count: 1,
                enqueued_at_ms: 0,
                held: None,
            },
            Job::Requeued {
                queue: 1,
                seq: 7,
                message: message(),
                delivery_count: 2,
                enqueued_at_ms: 0,
                held: None,
            },
        ];
        assert_eq!(kinds(&group_batch(&jobs)), ["put 7#2"]);
    }

    // ---- definition records against whole-topology snapshots --------------------------------

    use crate::core::exchange::Destination;
    use crate::core::topology::{ConnectionId, DestinationName, PREDECLARED, Topology};
    use crate::types::{ExchangeDeclareOptions, FieldTable, QueueDeclareOptions};
    use proptest::prelude::*;

    /// The durable records a topology implies, computed from the whole of it: the oracle the
    /// change-by-change records must keep the store equal to.
    #[derive(Debug, Default, PartialEq)]
    struct Records {
        exchanges: std::collections::BTreeMap<String, String>,
        queues: std::collections::BTreeMap<u64, String>,
        bindings: Vec<String>,
    }

    fn binding_text(b: &BindingRecord) -> String {
        format!("{b:?}")
    }

    fn records_of(t: &Topology) -> Records {
        let mut r = Records::default();
        for ex in t.exchanges() {
            if ex.durable && !PREDECLARED.iter().any(|(n, _)| *n == &*ex.name) {
                r.exchanges
                    .insert(ex.name.to_string(), ex.kind.name().to_string());
            }
        }
        for q in t.queues().filter(|q| q.durable) {
            r.queues.insert(q.id.0, q.name.to_string());
        }
        for ex in t.exchanges().filter(|e| e.durable) {
            for b in ex.bindings() {
                let destination = match b.destination {
                    Destination::Queue(id) => match t.queue_by_id(*id) {
                        Some(q) if q.durable => DestinationRecord::Queue(q.name.to_string()),
                        _ => continue,
                    },
                    Destination::Exchange(e) => match t.exchange(e) {
                        Some(x) if x.durable => DestinationRecord::Exchange(e.to_string()),
                        _ => continue,
                    },
                };
                r.bindings.push(binding_text(&BindingRecord {
                    source: ex.name.to_string(),
                    destination,
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments.clone(),
                }));
            }
        }
        r.bindings.sort();
        r
    }

    /// Applies definition ops to a model of the store.
    fn apply(store: &mut Records, batch: &Batch) {
        for op in batch.ops() {
            match op {
                Op::PutExchange(e) => {
                    store.exchanges.insert(e.name.clone(), e.kind.clone());
                }
                Op::DeleteExchange(n) => {
                    store.exchanges.remove(n);
                }
                Op::PutQueue(q) => {
                    store.queues.insert(q.id, q.name.clone());
                }
                Op::DeleteQueue(id) => {
                    store.queues.remove(id);
                }
                Op::PutBinding(b) => {
                    let text = binding_text(b);
                    if !store.bindings.contains(&text) {
                        store.bindings.push(text);
                    }
                }
                Op::DeleteBinding(b) => {
                    let text = binding_text(b);
                    store.bindings.retain(|x| *x != text);
                }
                other => panic!("not a definition op: {other:?}"),
            }
        }
        store.bindings.sort();
    }

    #[derive(Clone, Debug)]
    enum TopologyOp {
        DeclareExchange {
            e: usize,
            kind: usize,
            durable: bool,
            auto_delete: bool,
        },
        DeleteExchange {
            e: usize,
        },
        DeclareQueue {
            q: usize,
            durable: bool,
            exclusive: bool,
        },
        DeleteQueue {
            q: usize,
        },
        BindQueue {
            e: usize,
            q: usize,
            key: usize,
            args: bool,
            add: bool,
        },
        BindExchange {
            e: usize,
            to: usize,
            key: usize,
            add: bool,
        },
        CloseConnection,
    }

    /// Sources and destinations: a few user exchanges and the durable pre-declared ones.
    const EXCHANGES: [&str; 5] = ["e0", "e1", "e2", "amq.direct", "amq.fanout"];
    const KINDS: [&str; 4] = ["direct", "fanout", "topic", "headers"];
    const KEYS: [&str; 3] = ["k", "#", "a.*"];

    fn topology_op() -> impl Strategy<Value = TopologyOp> {
        use TopologyOp::*;
        prop_oneof![
            (0..3usize, 0..4usize, any::<bool>(), any::<bool>()).prop_map(
                |(e, kind, durable, auto_delete)| DeclareExchange {
                    e,
                    kind,
                    durable,
                    auto_delete
                }
            ),
            (0..3usize).prop_map(|e| DeleteExchange { e }),
            (0..4usize, any::<bool>(), any::<bool>()).prop_map(|(q, durable, exclusive)| {
                DeclareQueue {
                    q,
                    durable,
                    exclusive,
                }
            }),
            (0..4usize).prop_map(|q| DeleteQueue { q }),
            (
                0..5usize,
                0..4usize,
                0..3usize,
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(e, q, key, args, add)| BindQueue {
                    e,
                    q,
                    key,
                    args,
                    add
                }),
            (0..5usize, 0..5usize, 0..3usize, any::<bool>())
                .prop_map(|(e, to, key, add)| BindExchange { e, to, key, add }),
            Just(CloseConnection),
        ]
    }

    /// Runs one operation as the runtime's admin path does; refusals change nothing.
    fn run(t: &mut Topology, op: &TopologyOp) {
        let conn = ConnectionId(1);
        let _ = match *op {
            TopologyOp::DeclareExchange {
                e,
                kind,
                durable,
                auto_delete,
            } => {
                let options = ExchangeDeclareOptions {
                    durable,
                    auto_delete,
                    ..Default::default()
                };
                t.declare_exchange(EXCHANGES[e], KINDS[kind], options, FieldTable::new())
                    .map(|_| ())
            }
            TopologyOp::DeleteExchange { e } => t.delete_exchange(EXCHANGES[e], false).map(|_| ()),
            TopologyOp::DeclareQueue {
                q,
                durable,
                exclusive,
            } => {
                let options = QueueDeclareOptions {
                    durable,
                    exclusive,
                    ..Default::default()
                };
                t.declare_queue(
                    &format!("q{q}"),
                    options,
                    FieldTable::new(),
                    conn,
                    String::new,
                )
                .map(|_| ())
            }
            TopologyOp::DeleteQueue { q } => {
                t.remove_queue(&format!("q{q}"));
                Ok(())
            }
            TopologyOp::BindQueue {
                e,
                q,
                key,
                args,
                add,
            } => {
                let arguments: FieldTable = if args {
                    [("x-match", "any"), ("h", "v")].into_iter().collect()
                } else {
                    FieldTable::new()
                };
                let queue = format!("q{q}");
                let dest = DestinationName::Queue(&queue);
                if add {
                    t.bind(EXCHANGES[e], dest, KEYS[key], arguments, conn)
                        .map(|_| ())
                } else {
                    t.unbind(EXCHANGES[e], dest, KEYS[key], arguments, conn)
                        .map(|_| ())
                }
            }
            TopologyOp::BindExchange { e, to, key, add } => {
                let dest = DestinationName::Exchange(EXCHANGES[to]);
                if add {
                    t.bind(EXCHANGES[e], dest, KEYS[key], FieldTable::new(), conn)
                        .map(|_| ())
                } else {
                    t.unbind(EXCHANGES[e], dest, KEYS[key], FieldTable::new(), conn)
                        .map(|_| ())
                }
            }
            TopologyOp::CloseConnection => {
                let owned: Vec<String> = t
                    .exclusive_queues(conn)
                    .map(|q| q.name.to_string())
                    .collect();
                for name in owned {
                    t.remove_queue(&name);
                }
                Ok(())
            }
        };
    }

    proptest! {
        /// After every operation, the store as the change-by-change records leave it equals
        /// the records the whole topology implies; and the snapshot taken before the operation
        /// is unchanged by it.
        #[test]
        fn change_records_keep_the_store_equal_to_the_topology(
            ops in prop::collection::vec(topology_op(), 1..60),
        ) {
            let mut t = Topology::new();
            let mut store = Records::default();
            for op in &ops {
                let before = t.clone();
                let before_records = records_of(&before);
                run(&mut t, op);
                apply(&mut store, &definition_ops(&t.poll_durable_changes()));
                t.check_invariants().map_err(TestCaseError::fail)?;
                prop_assert_eq!(&store, &records_of(&t), "after {:?}", op);
                prop_assert_eq!(records_of(&before), before_records, "old snapshot changed by {:?}", op);
                before.check_invariants().map_err(TestCaseError::fail)?;
            }
        }
    }
}
