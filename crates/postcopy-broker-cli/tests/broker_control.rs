//! The broker daemon's side of the control socket, with separate client processes: they get the
//! RAM block fds over the socket, register their uffds, fault, exit, misbehave.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use common::clients::*;
use postcopy_broker::control::{ClientKind, ControlClient, MappingSpec};
use postcopy_broker::fault::{BrokerConfig, BrokerHandle};
use postcopy_broker::source::MemorySource;
use postcopy_broker::uffd::Uffd;
use postcopy_broker::{Incoming, RamBlock, RamBlocks};

fn config(sock: &std::path::Path) -> BrokerConfig {
    BrokerConfig { control: Some(sock.to_path_buf()), ..Default::default() }
}

fn blocks(pages: usize) -> RamBlocks {
    let mut b = RamBlocks::new();
    b.add(RamBlock::memfd("ram", (pages * 4096) as u64).unwrap()).unwrap();
    b
}

/// A broker over one memfd block "ram" of `pages` pages, served from a memory source holding
/// `content(pages, 4096, seed)`, its control socket at a fresh path named after `name`.
/// Returns the socket, the source's bytes, and the Incoming and handle to keep alive.
fn memory_broker(name: &str, pages: usize, seed: u64) -> (PathBuf, Vec<u8>, Incoming, BrokerHandle) {
    let sock = socket_path(name);
    let data = content(pages, 4096, seed);
    let (inc, h) =
        broker_with(blocks(pages), Box::new(MemorySource::new(vec![(data.clone(), 4096)])), config(&sock));
    (sock, data, inc, h)
}

#[test]
fn clients_register_over_the_control_socket_and_read_the_source() {
    let (sock, data, _inc, h) = memory_broker("register", 256, 21);
    let mut a = Peer::spawn(&control_args(&sock, "touch:0-127", &["--maps", "2"]));
    let mut b = Peer::spawn(&control_args(&sock, "touchall:64-191", &["--maps", "2"]));
    assert!(a.ready["client"].as_u64().is_some() && b.ready["client"].as_u64().is_some());
    a.go();
    b.go();
    let n = check_pages(&a.finish(), &data, 4096) + check_pages(&b.finish(), &data, 4096);
    assert_eq!(n, 128 + 256);
    // The status command reads the same counters over the socket.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["status", "--json", "--control"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st: postcopy_broker::stats::StatusReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st.received_pages, 192);
    assert_eq!(st.broker.clients_registered, 2);
    assert_eq!(st.broker.pages_demand, 192);
    let human = std::process::Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["status", "--control"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&human.stdout).contains("received 192/256 pages"));
    h.stop().unwrap();
}

#[test]
fn a_client_killed_mid_fault_does_not_disturb_the_others() {
    let sock = socket_path("sigkill");
    let data = content(64, 4096, 5);
    let src = HoldSource { inner: MemorySource::new(vec![(data.clone(), 4096)]), held: vec![7] };
    let (_inc, h) = broker_with(blocks(64), Box::new(src), config(&sock));
    let mut victim = Peer::spawn(&control_args(&sock, "touch:7", &[]));
    victim.go();
    // Wait until the victim's fault is known to the broker (an outstanding request for page 7).
    let mut waited = 0;
    while h.status().unwrap().outstanding == 0 {
        std::thread::sleep(Duration::from_millis(10));
        waited += 1;
        assert!(waited < 2000, "the victim never faulted");
    }
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    let mut other = Peer::spawn(&control_args(&sock, "touch:0-6;touch:8-20", &[]));
    other.go();
    assert_eq!(check_pages(&other.finish(), &data, 4096), 20);
    let st = h.status().unwrap();
    assert!(st.departed.iter().any(|c| c.stats.faults == 1 && c.stats.pages_requested == 1), "{st:?}");
    assert_eq!(st.broker.clients_gone, 2);
    h.stop().unwrap();
}

#[test]
fn garbage_truncated_and_oversized_messages_get_an_error_and_the_broker_serves_on() {
    let (sock, data, _inc, h) = memory_broker("garbage", 32, 9);
    let cases: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        {
            let mut v = b"PCB1".to_vec();
            v.extend_from_slice(&(100u32).to_le_bytes());
            v.extend_from_slice(b"{\"op\":");
            v
        },
        {
            let mut v = b"PCB1".to_vec();
            v.extend_from_slice(&(u32::MAX).to_le_bytes());
            v
        },
        {
            let body = br#"{"op":"register","name":"x","kind":"shared","mappings":[]}"#;
            let mut v = b"PCB1".to_vec();
            v.extend_from_slice(&(body.len() as u32).to_le_bytes());
            v.extend_from_slice(body);
            v
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(c).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).unwrap();
        let text = String::from_utf8_lossy(&reply);
        assert!(text.contains("\"error\""), "case {i}: reply {text:?}");
    }
    let st = h.status().unwrap();
    assert_eq!(st.broker.control_errors, 4);
    let mut p = Peer::spawn(&control_args(&sock, "touch:0-31", &[]));
    p.go();
    assert_eq!(check_pages(&p.finish(), &data, 4096), 32);
    h.stop().unwrap();
}

#[test]
fn registrations_outside_the_blocks_are_refused_with_a_reason() {
    let (sock, _, _inc, h) = memory_broker("refuse", 16, 2);
    let mut c = ControlClient::connect(&sock).unwrap();
    let u = Uffd::open(0).unwrap();
    let bad = [
        MappingSpec { client_addr: 0x1000_0000, block: "ram".into(), offset: 0, len: 17 * 4096 },
        MappingSpec { client_addr: 0x1000_0000, block: "nope".into(), offset: 0, len: 4096 },
        MappingSpec { client_addr: 0x1000_0001, block: "ram".into(), offset: 0, len: 4096 },
    ];
    for m in bad {
        let e = c.register(
            "bad",
            ClientKind::Shared,
            None,
            std::slice::from_ref(&m),
            std::os::fd::AsFd::as_fd(&u),
        );
        let msg = e.unwrap_err().to_string();
        assert!(msg.contains("refused"), "{msg}");
    }
    assert!(h.status().unwrap().clients.is_empty());
    h.stop().unwrap();
}

#[test]
fn removed_pages_fault_in_as_zero_and_unmapped_ranges_leave_the_table() {
    let (sock, data, _inc, h) = memory_broker("remove", 64, 13);
    let script = "touch:0-9;remove:2-3;touch:2-3;remove:40-41;touch:40-41;unmap:20-29;touch:10-11";
    let mut p = Peer::spawn(&control_args(&sock, script, &["--features", "remove,unmap"]));
    let id = p.ready["client"].as_u64().unwrap();
    p.go();
    let lines = p.finish();
    let zero = fnv(&[0u8; 4096]);
    let step = |name: &str| lines.iter().find(|l| l["step"] == name).unwrap().clone();
    check_pages(std::slice::from_ref(&step("touch:0-9")), &data, 4096);
    for name in ["touch:2-3", "touch:40-41"] {
        for pg in step(name)["pages"].as_array().unwrap() {
            assert_eq!(pg["fnv"], zero.as_str(), "{name}: removed pages come back as zero");
        }
    }
    check_pages(std::slice::from_ref(&step("touch:10-11")), &data, 4096);
    let st = h.status().unwrap();
    let c = st.all_clients().find(|c| c.id.0 == id).unwrap();
    assert_eq!(c.stats.events, 3, "two removes and one unmap: {c:?}");
    h.stop().unwrap();
}

#[test]
fn a_forked_child_becomes_a_client() {
    let (sock, data, _inc, h) = memory_broker("fork", 32, 17);
    let mut p = Peer::spawn(&control_args(&sock, "fork;touch:0-15", &["--features", "fork"]));
    p.go();
    let lines = p.finish();
    assert!(lines.iter().any(|l| l["who"] == "child" && l["done"] == true), "{lines:?}");
    let child_pages: usize = lines
        .iter()
        .filter(|l| l["who"] == "child")
        .map(|l| check_pages(std::slice::from_ref(l), &data, 4096))
        .sum();
    assert_eq!(child_pages, 16);
    let st = h.status().unwrap();
    assert_eq!(st.broker.clients_registered, 2, "the child's uffd was adopted: {st:?}");
    h.stop().unwrap();
}

#[test]
fn a_firecracker_style_private_client_is_served_from_the_image() {
    let sock = socket_path("firecracker");
    let image = std::env::temp_dir().join(format!("pcb-test-{}-fc.img", std::process::id()));
    let data = content(128, 4096, 29);
    std::fs::write(&image, &data).unwrap();
    let config =
        BrokerConfig { control: Some(sock.clone()), image: Some(image.clone()), ..Default::default() };
    let (_inc, h) = broker_with(blocks(1), Box::new(MemorySource::new(vec![(vec![0; 4096], 4096)])), config);
    let size = (128 * 4096).to_string();
    let mut p = Peer::spawn(&control_args(&sock, "touch:0-127", &["--firecracker", "--size", &size]));
    p.go();
    assert_eq!(check_pages(&p.finish(), &data, 4096), 128);
    let st = h.status().unwrap();
    let fc = st.all_clients().find(|c| c.kind == "private").unwrap();
    assert_eq!(fc.stats.faults, 128);
    std::fs::remove_file(&image).unwrap();
    h.stop().unwrap();
}

#[test]
fn a_peer_of_another_uid_is_refused() {
    let (sock, _, _inc, h) = memory_broker("uid", 8, 1);
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pcb-client"))
        .args(control_args(&sock, "touch:0", &[]))
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("denied") || err.contains("not-allowed"), "{err}");
    assert!(h.status().unwrap().clients.is_empty());
    h.stop().unwrap();
}

#[test]
fn a_peer_gets_only_the_blocks_it_was_given() {
    let sock = socket_path("grants");
    let mut b = RamBlocks::new();
    b.add(RamBlock::memfd("a", 8 * 4096).unwrap()).unwrap();
    b.add(RamBlock::memfd("b", 8 * 4096).unwrap()).unwrap();
    let src = MemorySource::new(vec![(content(8, 4096, 1), 4096), (content(8, 4096, 2), 4096)]);
    let config = BrokerConfig {
        control: Some(sock.clone()),
        allowed_uids: vec![0, 65534],
        grants: [(65534, vec!["a".to_string()])].into_iter().collect(),
        ..Default::default()
    };
    let (_inc, h) = broker_with(b, Box::new(src), config);
    // Let uid 65534 reach the socket at all (the broker creates it 0600 for its own uid).
    std::os::unix::fs::chown(&sock, Some(65534), Some(65534)).unwrap();
    use std::os::unix::process::CommandExt;
    let run = |block: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pcb-client"))
            .args(control_args(&sock, "touch:0", &["--block", block]))
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let denied = run("b");
    assert!(!denied.status.success());
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains("was not given block 'b'"), "{err}");
    // Block a is handed out; this unprivileged client then fails only at creating a userfaultfd
    // that catches kernel-mode faults, which needs root or /dev/userfaultfd access.
    let given = run("a");
    let err = String::from_utf8_lossy(&given.stderr);
    assert!(err.contains("userfaultfd"), "{err}");
    // A root peer may map either block.
    let mut c = ControlClient::connect(&sock).unwrap();
    assert_eq!(c.get_blocks(None).unwrap().len(), 2);
    h.stop().unwrap();
}
