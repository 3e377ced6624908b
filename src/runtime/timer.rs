//! The broker's timers: when a queue's head message expires and when an unused queue
//! expires (`x-expires`).
//!
//! A queue schedules only the deadline of the message next in line, so the timers cost
//! O(expired) per tick, never a scan of a queue. With a [`ManualClock`](crate::ManualClock)
//! due timers run on the thread that moves the clock; with the system clock a thread of the
//! broker's sleeps until the earliest deadline.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::queue::QueueCell;
use crate::clock::Clock;

/// What a timer is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimerKind {
    /// The queue's head message may have expired.
    MessageExpiry,
    /// The queue may have been unused for its `x-expires`.
    QueueExpiry,
    /// The queue's held at-least-once dead letters are due for another attempt.
    DeadLetterRetry,
}

/// Pending timers by (due time, id).
type Due = BTreeMap<(u64, u64), (Weak<QueueCell>, TimerKind)>;

/// The function a manual clock calls when it moves.
type WakeFn = Arc<dyn Fn(u64) + Send + Sync>;

/// Due times of queues' timers.
pub(crate) struct Timers {
    due: Mutex<Due>,
    next_id: AtomicU64,
    wake: Condvar,
    stop: AtomicBool,
    /// The waker a manual clock calls (it holds only a weak reference).
    waker: Mutex<Option<WakeFn>>,
    /// The timer thread, if the clock needs one; joined by [`Timers::shutdown`].
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Timers {
    /// Timers driven by `clock`: through its waker if it has one, else by a thread.
    pub(crate) fn start(clock: Arc<dyn Clock>) -> Arc<Timers> {
        let timers = Arc::new(Timers {
            due: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            waker: Mutex::new(None),
            thread: Mutex::new(None),
        });
        let weak = Arc::downgrade(&timers);
        let waker: WakeFn = Arc::new(move |now| {
            if let Some(t) = weak.upgrade() {
                t.run_due(now);
            }
        });
        if clock.on_advance(Arc::downgrade(&waker)) {
            *timers.waker.lock() = Some(waker);
        } else {
            let weak = Arc::downgrade(&timers);
            let spawned = thread::Builder::new()
                .name("coney-timers".into())
                .spawn(move || watch(weak, clock));
            match spawned {
                Ok(thread) => *timers.thread.lock() = Some(thread),
                // Without the thread, expiry still happens on the queue's next operation.
                Err(_) => timers.stop.store(true, Ordering::Relaxed),
            }
        }
        timers
    }

    /// Runs `cell`'s timer of `kind` at `at_ms` (or soon after).
    pub(crate) fn schedule(&self, at_ms: u64, cell: Weak<QueueCell>, kind: TimerKind) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut due = self.due.lock();
        let earliest = due.keys().next().is_none_or(|&(first, _)| at_ms < first);
        due.insert((at_ms, id), (cell, kind));
        drop(due);
        if earliest {
            self.wake.notify_one();
        }
    }

    /// Runs every timer due at `now_ms`, on this thread (none once stopped: a manual clock
    /// moved after the broker closed).
    pub(crate) fn run_due(&self, now_ms: u64) {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let next = {
                let mut due = self.due.lock();
                match due.first_key_value() {
                    Some((&(at, _), _)) if at <= now_ms => due.pop_first(),
                    _ => None,
                }
            };
            let Some((_, (cell, kind))) = next else {
                return;
            };
            if let Some(cell) = cell.upgrade() {
                cell.on_timer(kind);
            }
        }
    }

    /// The earliest due time of a pending timer.
    pub(crate) fn next_due(&self) -> Option<u64> {
        self.due.lock().keys().next().map(|&(at, _)| at)
    }

    /// Ends the timer thread (the broker is going away).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _guard = self.due.lock();
        self.wake.notify_all();
    }

    /// Stops the timers and waits for the timer thread to end (unless called on it).
    pub(crate) fn shutdown(&self) {
        self.stop();
        let thread = self.thread.lock().take();
        if let Some(t) = thread
            && t.thread().id() != thread::current().id()
        {
            let _ = t.join();
        }
        self.due.lock().clear();
    }
}

/// The timer thread of a broker on a clock that moves by itself: sleeps until the earliest
/// due time (at most a second, so a clock jump is noticed), runs what is due.
fn watch(timers: Weak<Timers>, clock: Arc<dyn Clock>) {
    const MAX_SLEEP: Duration = Duration::from_secs(1);
    loop {
        let Some(t) = timers.upgrade() else { return };
        if t.stop.load(Ordering::Relaxed) {
            return;
        }
        let now = clock.now_ms();
        t.run_due(now);
        let mut due = t.due.lock();
        if t.stop.load(Ordering::Relaxed) {
            return;
        }
        let wait = match due.first_key_value() {
            Some((&(at, _), _)) => Duration::from_millis(at.saturating_sub(clock.now_ms())),
            None => MAX_SLEEP,
        };
        if !wait.is_zero() {
            t.wake.wait_for(&mut due, wait.min(MAX_SLEEP));
        }
    }
}
