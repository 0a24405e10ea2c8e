//! The migration wire decoder: arbitrary bytes, fed in irregular pieces.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| postcopy_broker::migration::fuzz_decode(data));
