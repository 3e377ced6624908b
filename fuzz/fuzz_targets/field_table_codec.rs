//! Fuzz target: the AMQP field-table codec decodes any bytes without panicking and round-trips
//! what it decodes or is given (see `coney::fuzzing::field_table_codec`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| coney::fuzzing::field_table_codec(data));
