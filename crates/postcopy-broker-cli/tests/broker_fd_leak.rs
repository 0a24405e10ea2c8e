//! A bad actor on the control socket cannot make the broker leak fds: its own test binary, so no
//! other test opens fds in this process meanwhile.

mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use common::clients::*;
use postcopy_broker::fault::BrokerConfig;
use postcopy_broker::source::MemorySource;
use postcopy_broker::{RamBlock, RamBlocks};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn bad_registrations_with_fds_leak_nothing() {
    let sock = socket_path("leak");
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", 16 * 4096).unwrap()).unwrap();
    let data = content(16, 4096, 1);
    let (_inc, h) = broker_with(
        blocks,
        Box::new(MemorySource::new(vec![(data, 4096)])),
        BrokerConfig { control: Some(sock.clone()), ..Default::default() },
    );
    // Warm up: one status round trip, so lazily created state exists before counting.
    h.status().unwrap();
    let before = open_fds();
    for i in 0..30 {
        let s = UnixStream::connect(&sock).unwrap();
        let body = match i % 3 {
            0 => br#"{"op":"register","name":"x","kind":"shared","mappings":[{"client_addr":4096,"block":"ram","offset":0,"len":4096}]}"#.to_vec(),
            1 => br#"{"op":"status"}"#.to_vec(),
            _ => br#"{"op":"register","name":"x","kind":"shared","mappings":[{"client_addr":4096,"block":"nope","offset":0,"len":4096}]}"#.to_vec(),
        };
        let mut frame = b"PCB1".to_vec();
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        // Three fds where at most one is allowed (or none, for status).
        let f1 = std::fs::File::open("/dev/null").unwrap();
        let f2 = std::fs::File::open("/dev/null").unwrap();
        let f3 = std::fs::File::open("/dev/null").unwrap();
        let fds = [f1.as_fd(), f2.as_fd(), f3.as_fd()];
        postcopy_broker::control::fdpass::send_with_fds(s.as_fd(), &frame, &fds, false).unwrap();
        let _ = (&s).flush();
        let mut reply = Vec::new();
        let _ = std::io::Read::read_to_end(&mut &s, &mut reply);
        assert!(String::from_utf8_lossy(&reply).contains("error"), "round {i}");
    }
    let st = h.status().unwrap();
    assert_eq!(st.broker.control_errors, 30);
    assert!(st.clients.is_empty());
    assert_eq!(open_fds(), before, "the broker kept fds of bad peers");
    h.stop().unwrap();
}
