//! Fuzz target: properties built from the input are published whole or refused alone, with no
//! recursion through deep headers (see `coney::fuzzing::publish_properties`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| coney::fuzzing::publish_properties(data));
