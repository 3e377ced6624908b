//! Fuzz target: stored records must decode or fail with a typed error, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| coney::fuzzing::record_decode(data));
