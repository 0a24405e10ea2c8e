//! One control payload, parsed as a request (server) and as a response (client).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    postcopy_broker::control::fuzz_request(data);
    postcopy_broker::control::fuzz_response(data);
});
