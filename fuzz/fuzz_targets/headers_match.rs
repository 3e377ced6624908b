//! Fuzz target: headers-exchange matching against a plain reference matcher (see
//! `coney::fuzzing::headers_match`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| coney::fuzzing::headers_match(data));
