//! The pure broker core: commands in, effects out. No threads, clocks, locks or I/O.
//!
//! - [`topology`]: exchanges, queue definitions, bindings, routing;
//! - [`queue`]: one queue's ready FIFO, unacked ledger and consumers;
//! - [`channel`]: one channel's delivery tags, ledger and consumer tags;
//! - [`confirm`]: one channel's publisher confirms;
//! - [`shared`]: the persistent collections topology snapshots share.
//!
//! The runtime composes them: it holds the topology as a read-mostly snapshot, each queue and
//! each channel behind its own lock, and carries out what they return.

pub mod channel;
pub mod confirm;
pub mod exchange;
pub mod queue;
pub mod shared;
pub mod topology;
