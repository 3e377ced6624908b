//! The pure broker core: commands in, effects out. No threads, clocks, locks or I/O.

pub mod exchange;
