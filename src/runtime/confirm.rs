//! A channel's publisher confirms as the runtime holds them: the core's numbering and
//! coalescing behind a lock, waiters, and an optional listener for the ack/nack frames.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use crate::core::confirm::{ConfirmEvent, Confirms};
use crate::sim::trace::{Event, Trace};

#[derive(Default)]
pub(crate) struct ConfirmCell {
    enabled: AtomicBool,
    state: Mutex<ConfirmState>,
    answered: Condvar,
    /// The broker's trace and the channel's number, if the broker keeps a trace.
    trace: Option<(Trace, u64)>,
}

#[derive(Default)]
struct ConfirmState {
    core: Confirms,
    /// A nack was sent since the last `wait_for_confirms`.
    nacked: bool,
    /// Whether the channel closed: waiters stop waiting.
    closed: bool,
    listener: Option<Sender<ConfirmEvent>>,
}

/// How a wait for confirms ended.
pub(crate) enum Waited {
    /// Everything answered; `true` if nothing was nacked since the last wait.
    Done(bool),
    TimedOut,
    Closed,
}

impl ConfirmCell {
    /// The confirms of channel `channel`, recorded in `trace` if there is one.
    pub(crate) fn new(trace: Option<Trace>, channel: u64) -> Self {
        Self {
            trace: trace.map(|t| (t, channel)),
            ..Self::default()
        }
    }

    /// `confirm.select`: numbering starts at 1; selecting again changes nothing.
    pub(crate) fn select(&self) {
        self.enabled.store(true, Ordering::SeqCst);
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Numbers a publish if the channel is in confirm mode.
    pub(crate) fn publish(&self) -> Option<u64> {
        self.enabled()
            .then(|| self.state.lock().core.handle_publish())
    }

    /// The number the next publish will get (1 before any publish).
    pub(crate) fn next_seq(&self) -> u64 {
        self.state.lock().core.next_seq()
    }

    /// Answers publishes; frames go to the listener in order; waiters wake when none is left.
    pub(crate) fn answer(&self, acks: &[u64], nacks: &[u64]) {
        let mut st = self.state.lock();
        let events = st.core.handle_outcomes(acks, nacks);
        if let Some((trace, channel)) = &self.trace {
            for e in &events {
                trace.record(Event::Confirm {
                    channel: *channel,
                    tag: e.delivery_tag,
                    multiple: e.multiple,
                    ack: e.ack,
                });
            }
        }
        st.nacked |= events.iter().any(|e| !e.ack);
        if let Some(tx) = &st.listener {
            for e in events {
                if tx.send(e).is_err() {
                    st.listener = None;
                    break;
                }
            }
        }
        if st.core.unconfirmed_len() == 0 {
            self.answered.notify_all();
        }
    }

    /// A receiver of every ack/nack frame from now on.
    pub(crate) fn listen(&self) -> Receiver<ConfirmEvent> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.state.lock().listener = Some(tx);
        rx
    }

    /// The channel closed: pending numbers stay unanswered, waiters return.
    pub(crate) fn close(&self) {
        let mut st = self.state.lock();
        st.closed = true;
        st.listener = None;
        self.answered.notify_all();
    }

    /// Waits until every publish so far is answered.
    pub(crate) fn wait(&self, timeout: Option<Duration>) -> Waited {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.state.lock();
        loop {
            if st.closed {
                return Waited::Closed;
            }
            if st.core.unconfirmed_len() == 0 {
                return Waited::Done(!std::mem::take(&mut st.nacked));
            }
            match deadline {
                None => self.answered.wait(&mut st),
                Some(d) => {
                    if self.answered.wait_until(&mut st, d).timed_out() {
                        return Waited::TimedOut;
                    }
                }
            }
        }
    }
}
