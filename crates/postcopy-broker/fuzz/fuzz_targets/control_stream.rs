//! The control socket's byte stream with fds: frames, Firecracker handshakes, requests, replies.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| postcopy_broker::control::fuzz_control_stream(data));
