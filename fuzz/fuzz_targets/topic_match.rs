//! Fuzz target: topic trie routing against the naive matcher (see `coney::fuzzing::topic_match`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| coney::fuzzing::topic_match(data));
