//! What a peer hands in as a userfaultfd, and the kernel events that come through it, are
//! untrusted input: an fd that is not a userfaultfd is refused (a pipe would let the peer write
//! forged fault and FORK messages), and a REMOVE over a huge registered range costs what the
//! client's mapping entries cost, not what the range's length would.

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use common::clients::*;
use postcopy_broker::control::{ClientKind, ControlClient, MappingSpec};
use postcopy_broker::fault::{BrokerConfig, Registration, RegistrationMap};
use postcopy_broker::uffd::{check_userfaultfd, Uffd};
use postcopy_broker::Error;

const PS: u64 = 4096;

fn config(sock: &std::path::Path) -> BrokerConfig {
    BrokerConfig { control: Some(sock.to_path_buf()), ..Default::default() }
}

fn not_uffds() -> Vec<(&'static str, OwnedFd)> {
    let (r, _w) = nix::unistd::pipe().unwrap();
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let ev = nix::sys::eventfd::EventFd::new().unwrap();
    let memfd = nix::sys::memfd::memfd_create(c"x", nix::sys::memfd::MemFdCreateFlag::empty()).unwrap();
    vec![("pipe", r), ("socket", a.into()), ("eventfd", ev.into()), ("memfd", memfd)]
}

#[test]
fn only_a_real_userfaultfd_is_taken_for_one() {
    for (what, fd) in not_uffds() {
        let e = check_userfaultfd(fd.as_raw_fd()).unwrap_err();
        assert!(!e.contains("userfaultfd"), "{what}: {e}");
    }
    assert!(check_userfaultfd(-1).is_err());
    assert!(check_userfaultfd(999_999).is_err(), "a number that is no open fd");
    let u = Uffd::open(0).unwrap();
    check_userfaultfd(u.as_raw_fd()).unwrap();
}

#[test]
fn a_forged_userfaultfd_is_refused_over_the_control_socket_and_in_process() {
    let sock = socket_path("forged-uffd");
    let data = content(16, PS as usize, 3);
    let (inc, h) = broker(16, &data, config(&sock));
    let mut c = ControlClient::connect(&sock).unwrap();
    c.hello("forger").unwrap();
    let spec = [MappingSpec { client_addr: 0x7000_0000_0000, block: "ram".into(), offset: 0, len: 16 * PS }];
    for (what, fd) in not_uffds() {
        let e = c.register("forger", ClientKind::Shared, None, &spec, fd.as_fd()).unwrap_err().to_string();
        assert!(e.contains("not one") && e.contains("userfaultfd(2)"), "{what}: {e}");
        let reg = Registration {
            name: "forger".into(),
            uffd: fd,
            pid: None,
            map: RegistrationMap::Shared(vec![postcopy_broker::client::MappingEntry {
                client_addr: 0x7000_0000_0000,
                block: 0,
                block_offset: 0,
                len: 16 * PS,
            }]),
        };
        let e = h.register(reg).unwrap_err();
        assert!(matches!(e, Error::NotAUserfaultfd { .. }), "{what}: {e}");
    }
    assert_eq!(h.status().unwrap().broker.clients_registered, 0);
    // The broker serves the next, real client.
    let mut p = Peer::spawn(&control_args(&sock, "touch:0-15", &[]));
    p.go();
    assert_eq!(check_pages(&p.finish(), &data, PS as usize), 16);
    drop(inc);
    h.stop().unwrap();
}

#[test]
fn a_remove_event_over_a_huge_registered_range_costs_its_mapping_entries_only() {
    // A client that registered 64 TiB of address space besides its mapping of the block and
    // discards all of it at once: one REMOVE event over 2^46 bytes. Walking that range page by
    // page would keep the fault loop busy for minutes; the next fault must be served at once
    // (the watchdog of this test is far below the page-by-page time).
    let sock = socket_path("huge-remove");
    let data = content(16, PS as usize, 9);
    let (_inc, h) = broker(16, &data, config(&sock));
    let mut big = Peer::spawn(&control_args(
        &sock,
        "touch:0-3;dontneed-reserve;touch:4-7",
        &["--features", "remove", "--reserve-anon", &(1u64 << 46).to_string()],
    ));
    big.go();
    let lines = big.finish_within(30);
    assert_eq!(check_pages(&lines, &data, PS as usize), 8);
    let mut other = Peer::spawn(&control_args(&sock, "touch:8-15", &[]));
    other.go();
    assert_eq!(check_pages(&other.finish_within(30), &data, PS as usize), 8);
    let st = h.status().unwrap();
    let c = st.all_clients().find(|c| c.stats.events > 0).expect("the REMOVE event was read");
    assert_eq!(c.stats.events, 1, "{:?}", c.stats);
    h.stop().unwrap();
}
