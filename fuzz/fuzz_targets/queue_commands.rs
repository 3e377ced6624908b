//! Fuzz target: command sequences on a core queue keep its invariants and every message
//! accounted for (see `coney::fuzzing::queue_commands`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| coney::fuzzing::queue_commands(data));
