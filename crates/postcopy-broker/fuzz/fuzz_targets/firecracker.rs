//! Firecracker's UFFD handshake (a JSON array of regions) and its validation into a private table.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| postcopy_broker::control::fuzz_firecracker(data));
