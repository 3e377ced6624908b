//! Fuzz target: a damaged store opens to exactly its data or fails with a typed error, never
//! panics (see `coney::fuzzing::store_open`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| coney::fuzzing::store_open(data));
