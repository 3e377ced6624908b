//! Flow control: publishers wait while the broker holds too much, as RabbitMQ blocks publishing
//! connections under its memory alarm.
//!
//! Two alarms, each with its own threshold:
//! - **memory**: the estimated memory of the messages the queues hold (ready and unacked; see
//!   [`message_memory_bytes`]) is over [`Limits::memory_high_watermark_bytes`]. Cleared once it
//!   is back under.
//! - **store backlog**: the bytes waiting for the flusher (records not yet written) are over
//!   [`Limits::store_backlog_max_bytes`]. Cleared once back under half of it, so a publisher
//!   that waits lets the flusher catch up a whole group rather than flapping at the edge.
//!
//! While either alarm is raised, `basic_publish` waits at its start (before it takes any lock)
//! until both are cleared; `basic_publish_timeout` gives up with [`Error::Timeout`] and
//! publishes nothing. Nothing else waits: consumers, acks, `basic_get`, dead-lettering and
//! requeues go on, and they are what brings the numbers down. Each raise and clear is told to
//! every connection's blocked handler ([`Connection::set_blocked_handler`]), as RabbitMQ sends
//! `connection.blocked` / `connection.unblocked`.
//!
//! Publish never waits for a consumer; it waits only for this.
//!
//! # Invariants
//! - `blocked` is true exactly when an alarm is raised (both change under `state`'s lock).
//! - the memory count equals the sum of what every live queue last reported (each queue
//!   reports its estimate in steps, see `QueueCell::account`).
//!
//! [`Limits::memory_high_watermark_bytes`]: super::Limits::memory_high_watermark_bytes
//! [`Limits::store_backlog_max_bytes`]: super::Limits::store_backlog_max_bytes
//! [`Error::Timeout`]: crate::Error::Timeout
//! [`Connection::set_blocked_handler`]: super::Connection::set_blocked_handler

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::core::queue::Queue;

/// Estimated memory of one queued message besides its body: the entry in the queue, the shared
/// message with its properties, names and reference counts, and the allocator's own overhead.
/// Measured: 5 million 100-byte messages in one queue took ~2.7 GB resident, ~530 bytes each.
pub(crate) const MESSAGE_OVERHEAD_BYTES: u64 = 448;

/// The estimated memory of the messages a queue holds: their bodies plus
/// [`MESSAGE_OVERHEAD_BYTES`] each. A message routed to several queues is counted in each.
pub(crate) fn message_memory_bytes(queue: &Queue) -> u64 {
    let count = queue.ready_len() + queue.unacked_len();
    queue.ready_bytes() + queue.unacked_bytes() + count * MESSAGE_OVERHEAD_BYTES
}

/// What a blocked handler is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockedNotice {
    /// Publishing now waits (`connection.blocked`), with RabbitMQ-style reason text: `low on
    /// memory`, or `store backlog` when the flusher is behind.
    Blocked {
        /// Why.
        reason: String,
    },
    /// Publishing goes on (`connection.unblocked`).
    Unblocked,
}

/// A connection's blocked handler.
pub(crate) type BlockedHandler = Box<dyn FnMut(&BlockedNotice) + Send>;

/// The broker's flow control: counts, thresholds, the alarm state and who waits on it.
pub(crate) struct FlowControl {
    memory_bytes: AtomicI64,
    watermark_bytes: u64,
    backlog_bytes: AtomicI64,
    backlog_max_bytes: u64,
    /// Whether publishers must wait; read without a lock on every publish.
    blocked: AtomicBool,
    /// The highest memory estimate since memory was last given back to the system.
    peak_bytes: AtomicI64,
    state: Mutex<FlowState>,
    unblocked: Condvar,
}

#[derive(Default)]
struct FlowState {
    memory_alarm: bool,
    backlog_alarm: bool,
    /// The broker closed: nobody waits any more (a waiting publisher finds its channel closed).
    shut: bool,
    /// Each connection's handler, by connection; dropped connections are pruned.
    handlers: Vec<(Weak<()>, Arc<Mutex<BlockedHandler>>)>,
}

impl FlowControl {
    pub(crate) fn new(watermark_bytes: u64, backlog_max_bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            memory_bytes: AtomicI64::new(0),
            watermark_bytes,
            backlog_bytes: AtomicI64::new(0),
            backlog_max_bytes,
            blocked: AtomicBool::new(false),
            peak_bytes: AtomicI64::new(0),
            state: Mutex::new(FlowState::default()),
            unblocked: Condvar::new(),
        })
    }

    /// Adds `delta` bytes to the queues' memory estimate.
    pub(crate) fn add_memory(&self, delta: i64) {
        if delta == 0 {
            return;
        }
        let now = self.memory_bytes.fetch_add(delta, Ordering::Relaxed) + delta;
        if delta > 0 {
            if now > self.peak_bytes.load(Ordering::Relaxed) {
                self.peak_bytes.fetch_max(now, Ordering::Relaxed);
            }
        } else {
            self.maybe_give_back(now);
        }
        let over = to_u64(now) > self.watermark_bytes;
        // Only a possible change of state takes the lock; the flag is read without it.
        if over != self.is_blocked() {
            self.reevaluate();
        }
    }

    /// Adds `delta` bytes to the flusher's backlog.
    pub(crate) fn add_backlog(&self, delta: i64) {
        if delta == 0 {
            return;
        }
        let now = to_u64(self.backlog_bytes.fetch_add(delta, Ordering::Relaxed) + delta);
        let raise = now > self.backlog_max_bytes;
        let clear = now <= self.backlog_max_bytes / 2;
        if (raise && !self.is_blocked()) || (clear && self.is_blocked()) {
            self.reevaluate();
        }
    }

    /// After a drain of at least [`GIVE_BACK_MIN_BYTES`] from the peak that left at most half
    /// of it, asks the allocator to return its free pages to the system (see
    /// [`give_back_memory`]); the peak then starts again from here, so a long drain gives back
    /// in a few steps, each at most half of the last. A queue that fills and empties by less
    /// than that (a consumer keeping up) never triggers it: the pages are reused. One caller
    /// wins the race; the others go on.
    fn maybe_give_back(&self, now: i64) {
        let peak = self.peak_bytes.load(Ordering::Relaxed);
        if peak.saturating_sub(now) < GIVE_BACK_MIN_BYTES || now > peak / 2 {
            return;
        }
        if self
            .peak_bytes
            .compare_exchange(peak, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            give_back_memory();
        }
    }

    /// The queues' memory estimate, in bytes.
    pub(crate) fn memory_bytes(&self) -> u64 {
        to_u64(self.memory_bytes.load(Ordering::Relaxed))
    }

    /// Bytes waiting for the flusher.
    pub(crate) fn backlog_bytes(&self) -> u64 {
        to_u64(self.backlog_bytes.load(Ordering::Relaxed))
    }

    /// Whether publishers wait now.
    pub(crate) fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }

    /// Waits until no alarm is raised, or until `deadline`; false if the deadline came first.
    pub(crate) fn wait(&self, deadline: Option<Instant>) -> bool {
        if !self.is_blocked() {
            return true;
        }
        let mut state = self.state.lock();
        while (state.memory_alarm || state.backlog_alarm) && !state.shut {
            match deadline {
                None => self.unblocked.wait(&mut state),
                Some(deadline) => {
                    if self.unblocked.wait_until(&mut state, deadline).timed_out()
                        && (state.memory_alarm || state.backlog_alarm)
                        && !state.shut
                    {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Lets every waiting publisher go, and every later one pass: the broker closed.
    pub(crate) fn shutdown(&self) {
        self.state.lock().shut = true;
        self.unblocked.notify_all();
    }

    /// Registers a connection's handler; it lives as long as `owner`. If an alarm is raised,
    /// the handler hears of it at once.
    pub(crate) fn register(&self, owner: &Arc<()>, handler: BlockedHandler) {
        let handler = Arc::new(Mutex::new(handler));
        let notice = {
            let mut state = self.state.lock();
            state.handlers.retain(|(o, _)| o.strong_count() > 0);
            state
                .handlers
                .retain(|(o, _)| !std::ptr::eq(o.as_ptr(), Arc::as_ptr(owner)));
            state
                .handlers
                .push((Arc::downgrade(owner), handler.clone()));
            state.notice()
        };
        if let Some(notice @ BlockedNotice::Blocked { .. }) = notice {
            (handler.lock())(&notice);
        }
    }

    /// Recomputes the alarms from the counts; on a change, wakes waiters and tells handlers
    /// (outside the state lock, so a handler may publish or read the broker).
    fn reevaluate(&self) {
        let (notice, handlers) = {
            let mut state = self.state.lock();
            let was = state.memory_alarm || state.backlog_alarm;
            state.memory_alarm = self.memory_bytes() > self.watermark_bytes;
            let backlog = self.backlog_bytes();
            if backlog > self.backlog_max_bytes {
                state.backlog_alarm = true;
            } else if backlog <= self.backlog_max_bytes / 2 {
                state.backlog_alarm = false;
            }
            let now = state.memory_alarm || state.backlog_alarm;
            self.blocked.store(now, Ordering::Relaxed);
            if was == now {
                return;
            }
            if !now {
                self.unblocked.notify_all();
            }
            state.handlers.retain(|(o, _)| o.strong_count() > 0);
            let handlers: Vec<_> = state.handlers.iter().map(|(_, h)| h.clone()).collect();
            (state.notice(), handlers)
        };
        let notice = notice.unwrap_or(BlockedNotice::Unblocked);
        tracing::info!(?notice, "flow control");
        for handler in handlers {
            (handler.lock())(&notice);
        }
    }
}

impl FlowState {
    fn notice(&self) -> Option<BlockedNotice> {
        let reason = if self.memory_alarm {
            "low on memory"
        } else if self.backlog_alarm {
            "store backlog"
        } else {
            return None;
        };
        Some(BlockedNotice::Blocked {
            reason: reason.to_owned(),
        })
    }
}

/// The least drain (in estimated bytes) after which memory is given back to the system: far
/// above what a consumer keeping up with its publisher holds, so a steady stream never pays
/// for it.
const GIVE_BACK_MIN_BYTES: i64 = 32 << 20;

/// Returns free heap pages to the system. glibc's allocator keeps the pages of freed small
/// allocations (a drained queue's messages) in its arenas, so without this a process keeps
/// the peak of its backlog resident for good; `malloc_trim` releases every free page (tens of
/// milliseconds for a heap of a few hundred MiB, once per large drain). Other allocators return
/// memory on their own schedule: nothing to do.
fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The default memory high watermark: 40% of the machine's memory, or of the process's cgroup
/// limit where that is lower (Linux); 1 GiB where neither can be read.
pub(crate) fn default_watermark_bytes() -> u64 {
    const FALLBACK_BYTES: u64 = 1 << 30;
    match total_memory_bytes() {
        Some(total) => total / 5 * 2,
        None => FALLBACK_BYTES,
    }
}

fn total_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let machine = kib.checked_mul(1024)?;
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    Some(cgroup.map_or(machine, |c| c.min(machine)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_alarm_raises_over_the_watermark_and_clears_under_it() {
        let flow = FlowControl::new(1000, 1 << 30);
        let owner = Arc::new(());
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        flow.register(&owner, Box::new(move |n| h.lock().push(n.clone())));
        flow.add_memory(1000);
        assert!(!flow.is_blocked(), "at the watermark is not over it");
        flow.add_memory(1);
        assert!(flow.is_blocked());
        assert!(!flow.wait(Some(Instant::now())), "a deadline gives up");
        flow.add_memory(-1);
        assert!(!flow.is_blocked());
        assert!(flow.wait(None));
        assert_eq!(
            *heard.lock(),
            [
                BlockedNotice::Blocked {
                    reason: "low on memory".into()
                },
                BlockedNotice::Unblocked
            ]
        );
    }

    #[test]
    fn backlog_alarm_clears_at_half() {
        let flow = FlowControl::new(u64::MAX, 100);
        flow.add_backlog(101);
        assert!(flow.is_blocked());
        flow.add_backlog(-40);
        assert!(flow.is_blocked(), "61 is not yet under half of 100");
        flow.add_backlog(-11);
        assert!(!flow.is_blocked());
    }

    #[test]
    fn a_waiter_wakes_when_the_alarm_clears() {
        let flow = FlowControl::new(10, 1 << 30);
        flow.add_memory(11);
        let waiter = {
            let flow = flow.clone();
            std::thread::spawn(move || flow.wait(None))
        };
        flow.add_memory(-11);
        assert!(waiter.join().unwrap());
    }

    #[test]
    fn a_handler_registered_during_an_alarm_hears_of_it() {
        let flow = FlowControl::new(10, 1 << 30);
        flow.add_memory(11);
        let owner = Arc::new(());
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        flow.register(&owner, Box::new(move |n| h.lock().push(n.clone())));
        assert_eq!(heard.lock().len(), 1);
        drop(owner);
        flow.add_memory(-11); // the dropped connection's handler is not called
        assert_eq!(heard.lock().len(), 1);
    }
}
