//! Where the broker's time comes from: the system clock, or a manual clock for tests.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// What a clock calls when it moves: the broker's timers, run with the new time.
pub type Waker = Weak<dyn Fn(u64) + Send + Sync>;

/// A source of wall-clock milliseconds. Every TTL and timestamp the broker uses comes from here.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;

    /// Microseconds on a monotonic scale with an arbitrary origin, for durations (the
    /// processing time of a delivery). Defaults to `now_ms` in microseconds, which is what a
    /// manual clock moves in.
    fn now_us(&self) -> u64 {
        self.now_ms().saturating_mul(1_000)
    }

    /// Asks the clock to call `waker` with the new time whenever it moves, on the thread that
    /// moved it. Returns `false` if the clock moves by itself (the system clock), so the
    /// broker must watch it with a timer thread of its own.
    fn on_advance(&self, waker: Waker) -> bool {
        let _ = waker;
        false
    }
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    }

    /// Microseconds since the first reading in this process, on the monotonic clock (never
    /// steps back when the wall clock is set). Starts at 1 so that 0 can mean "never".
    fn now_us(&self) -> u64 {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        let origin = *ORIGIN.get_or_init(Instant::now);
        u64::try_from(origin.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }
}

/// A clock that moves only when told to. Clones share the same time.
///
/// Moving it runs every timer that became due (message expiry, dead-lettering of expired
/// messages, queue expiry) on the calling thread before `advance` / `set` returns, so a test
/// sees their effects at once and never sleeps.
#[derive(Clone, Default)]
pub struct ManualClock {
    now_ms: Arc<AtomicU64>,
    wakers: Arc<Mutex<Vec<Waker>>>,
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock")
            .field("now_ms", &self.now_ms())
            .finish_non_exhaustive()
    }
}

impl ManualClock {
    /// A clock reading `start_ms`.
    pub fn new(start_ms: u64) -> Self {
        Self {
            now_ms: Arc::new(AtomicU64::new(start_ms)),
            wakers: Arc::default(),
        }
    }

    /// Moves the clock forward, then runs what became due.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.now_ms.fetch_add(ms, Ordering::SeqCst);
        self.wake();
    }

    /// Sets the clock (it never moves backwards), then runs what became due.
    pub fn set(&self, ms: u64) {
        self.now_ms.fetch_max(ms, Ordering::SeqCst);
        self.wake();
    }

    fn wake(&self) {
        let wakers: Vec<_> = {
            let mut w = self.wakers.lock();
            w.retain(|w| w.strong_count() > 0);
            w.iter().filter_map(Weak::upgrade).collect()
        };
        let now = self.now_ms();
        for waker in wakers {
            waker(now);
        }
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }

    fn on_advance(&self, waker: Waker) -> bool {
        self.wakers.lock().push(waker);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_forward() {
        let c = ManualClock::new(1_000);
        let shared = c.clone();
        c.advance(Duration::from_millis(250));
        assert_eq!(shared.now_ms(), 1_250);
        c.set(10);
        assert_eq!(c.now_ms(), 1_250);
    }

    #[test]
    fn manual_clock_wakes_with_the_new_time() {
        let c = ManualClock::new(0);
        let seen = Arc::new(AtomicU64::new(0));
        let s = seen.clone();
        let waker: Arc<dyn Fn(u64) + Send + Sync> =
            Arc::new(move |now| s.store(now, Ordering::SeqCst));
        assert!(c.on_advance(Arc::downgrade(&waker)));
        c.advance(Duration::from_millis(40));
        assert_eq!(seen.load(Ordering::SeqCst), 40);
        drop(waker);
        c.advance(Duration::from_millis(1)); // a dropped waker is forgotten, not called
        assert_eq!(seen.load(Ordering::SeqCst), 40);
    }
}
