//! "Received implies present", and the clients that break it, with separate client processes:
//! precopy zero runs are present pages; a received page whose backing became a hole is placed
//! again (as zeros) instead of waking its faulting threads into the same fault forever; a client
//! that populated guest RAM before its userfaultfd could catch it is refused and its pages are
//! dropped, so nobody reads zeros where the source has data; a client that faults on present
//! pages from several threads is dropped; a hugetlbfs block the pool cannot back is refused when
//! it is created.

mod common;

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::clients::*;
use postcopy_broker::fault::{Broker, BrokerConfig, BrokerHandle};
use postcopy_broker::source::MemorySource;
use postcopy_broker::stats::StatusReport;
use postcopy_broker::{Error, Incoming, RamBlock, RamBlocks};

const PS: u64 = 4096;
const HP: u64 = 2 << 20;

fn config(sock: &std::path::Path) -> BrokerConfig {
    BrokerConfig { control: Some(sock.to_path_buf()), ..Default::default() }
}

fn one_block(b: RamBlock) -> RamBlocks {
    let mut blocks = RamBlocks::new();
    blocks.add(b).unwrap();
    blocks
}

fn punch(b: &RamBlock, offset: u64, len: u64) {
    let fd = b.fd().unwrap().as_raw_fd();
    // SAFETY: fallocate on a valid fd with integer arguments.
    let r = unsafe {
        libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset as i64, len as i64)
    };
    assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
}

fn status(h: &BrokerHandle) -> StatusReport {
    h.status().unwrap()
}

#[test]
fn precopy_zero_runs_and_pages_are_present_pages() {
    for (name, block) in [
        ("small", RamBlock::memfd("ram", 64 * PS).unwrap()),
        ("huge", RamBlock::hugetlb("ram", 4 * HP, HP).unwrap()),
    ] {
        let ps = block.page_size();
        let pages = block.pages();
        let mut inc = Incoming::new(one_block(block));
        inc.advise().unwrap();
        // Page 1 arrives with data first, then as zero (dirty again): both are present.
        let data = content(pages as usize, ps as usize, 3);
        inc.precopy_page(0, ps, &data[ps as usize..2 * ps as usize]).unwrap();
        inc.precopy_zero(0, 0, 3 * ps).unwrap();
        inc.precopy_page(0, 3 * ps, &data[3 * ps as usize..4 * ps as usize]).unwrap();
        let b = inc.blocks().get(0).unwrap();
        assert_eq!(b.received().count_ones(), 4, "{name}");
        assert_eq!(b.allocated_pages().unwrap(), 4, "{name}: every received page is allocated");
        assert_eq!(b.unplaced_count().unwrap(), 0, "{name}");
        inc.listen().unwrap();
        // The broker's own mapping reads them without faulting (a fault would wait forever on
        // this Incoming's uffd, which no loop serves here).
        let blocks = Arc::clone(inc.blocks());
        let r = common::spawn_reader(&blocks, 0, 0, 4 * ps);
        let got = r.result.recv_timeout(Duration::from_secs(20)).expect("the precopy pages are not present");
        assert!(got[..3 * ps as usize].iter().all(|&x| x == 0), "{name}");
        assert_eq!(&got[3 * ps as usize..], &data[3 * ps as usize..4 * ps as usize], "{name}");
        inc.cleanup().unwrap();
    }
}

#[test]
fn a_received_page_whose_backing_became_a_hole_is_placed_again_not_woken_forever() {
    let sock = socket_path("hole");
    let data = content(64, PS as usize, 11);
    let (inc, h) = broker(64, &data, config(&sock));
    let mut first = Peer::spawn(&control_args(&sock, "touch:0-15", &[]));
    first.go();
    assert_eq!(check_pages(&first.finish_within(30), &data, PS as usize), 16);
    // Someone punches holes under received pages behind the broker (a peer's fallocate).
    let b = inc.blocks().get(0).unwrap();
    punch(b, 4 * PS, 2 * PS);
    assert!(b.is_received(4 * PS) && !b.is_resident(4 * PS));
    let mut second = Peer::spawn(&control_args(&sock, "touch:3-6", &[]));
    second.go();
    let lines = second.finish_within(30);
    let pages = lines.iter().find_map(|l| l["pages"].as_array()).unwrap();
    let zero = fnv(&[0u8; PS as usize]);
    for p in pages {
        let i = p["page"].as_u64().unwrap() as usize;
        let want =
            if i == 4 || i == 5 { zero.clone() } else { fnv(&data[i * PS as usize..(i + 1) * PS as usize]) };
        assert_eq!(p["fnv"].as_str().unwrap(), want, "page {i}");
    }
    // The broker's own mapping takes the same path.
    punch(b, 7 * PS, PS);
    let blocks = Arc::clone(inc.blocks());
    let r = common::spawn_reader(&blocks, 0, 7 * PS, PS);
    let got = r.result.recv_timeout(Duration::from_secs(20)).expect("the broker's own read spins");
    assert!(got.iter().all(|&x| x == 0));
    let st = status(&h);
    assert_eq!(st.broker.holes_refilled, 3, "{:?}", st.broker);
    let c = st.all_clients().find(|c| c.stats.holes_refilled > 0).unwrap();
    assert_eq!(c.stats.holes_refilled, 2);
    assert_eq!(st.broker.pages_demand, 16, "a refilled page is not counted as received twice");
    h.stop().unwrap();
}

/// Run a pcb-client that prefaults its mapping (`how`) before registering; returns its stderr.
fn refused_client(sock: &std::path::Path, how: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pcb-client"))
        .args(control_args(sock, "touch:0", &["--prefault", how]))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a client that prefaulted with {how} was served");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_client_that_populated_guest_ram_before_registering_is_refused_and_its_pages_dropped() {
    for (k, how) in ["mlock", "populate", "touch"].iter().enumerate() {
        let sock = socket_path(&format!("prefault-{how}"));
        let data = content(32, PS as usize, 20 + k as u64);
        let (inc, h) = broker(32, &data, config(&sock));
        // Some pages arrive first: they are the broker's and must stay.
        let mut early = Peer::spawn(&control_args(&sock, "touch:0-3", &[]));
        early.go();
        early.finish_within(30);
        let err = refused_client(&sock, how);
        assert!(err.contains("populated") && err.contains("--no-mlockall"), "{how}: {err}");
        let b = inc.blocks().get(0).unwrap();
        assert_eq!(b.allocated_pages().unwrap(), 4, "{how}: the populated pages were dropped again");
        let st = status(&h);
        assert_eq!(st.broker.prefaulted_pages, 28, "{how}: {:?}", st.broker);
        assert_eq!(st.broker.clients_registered, 1, "{how}: the prefaulting client was not registered");
        // Nobody reads zeros: the next client gets the source's bytes everywhere.
        let mut next = Peer::spawn(&control_args(&sock, "touch:0-31", &[]));
        next.go();
        assert_eq!(check_pages(&next.finish_within(30), &data, PS as usize), 32, "{how}");
        h.stop().unwrap();
    }
}

#[test]
fn a_hugetlbfs_client_that_populated_guest_ram_is_refused_too() {
    let sock = socket_path("prefault-huge");
    let data = content(4, HP as usize, 31);
    let (inc, h) = broker_with(
        one_block(RamBlock::hugetlb("ram", 4 * HP, HP).unwrap()),
        Box::new(MemorySource::new(vec![(data.clone(), HP)])),
        config(&sock),
    );
    let err = refused_client(&sock, "mlock");
    assert!(err.contains("populated") && err.contains("--no-mlockall"), "{err}");
    assert_eq!(inc.blocks().get(0).unwrap().allocated_pages().unwrap(), 0);
    let mut next = Peer::spawn(&control_args(&sock, "touch:0-3", &[]));
    next.go();
    assert_eq!(check_pages(&next.finish_within(30), &data, HP as usize), 4);
    assert!(status(&h).broker.prefaulted_pages >= 4);
    h.stop().unwrap();
}

#[test]
fn a_client_faulting_on_present_pages_from_two_threads_is_dropped_and_the_others_served() {
    let sock = socket_path("alternate");
    let data = content(16, PS as usize, 41);
    let (_inc, h) = broker(16, &data, config(&sock));
    let mut first = Peer::spawn(&control_args(&sock, "touch:0-7", &[]));
    first.go();
    first.finish_within(30);
    // Its mapping is private memory registered as the shared block: every wake makes both of
    // its threads fault again, each on its own page, taking turns.
    let mut spinner = Peer::spawn(&control_args(&sock, "parallel:2,5", &["--anon"]));
    let id = spinner.ready["client"].as_u64().unwrap();
    spinner.go();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(&h);
        if st.departed.iter().any(|c| c.id.0 == id) {
            let c = st.departed.iter().find(|c| c.id.0 == id).unwrap();
            assert!(c.stats.already_there > 10_000, "{:?}", c.stats);
            break;
        }
        assert!(Instant::now() < end, "the spinning client was never dropped: {:?}", st.clients);
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut other = Peer::spawn(&control_args(&sock, "touch:0-15", &[]));
    other.go();
    assert_eq!(check_pages(&other.finish_within(30), &data, PS as usize), 16);
    drop(spinner);
    h.stop().unwrap();
}

#[test]
fn a_hugetlbfs_block_the_pool_cannot_back_is_refused_at_creation_with_what_to_reserve() {
    let e = RamBlock::hugetlb("big", 100_000 * HP, HP).unwrap_err();
    assert!(matches!(e, Error::HugePagePool { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains("reserve at least") && text.contains("nr_hugepages"), "{text}");
    // A block that fits takes its pages from the pool at once (no overcommit).
    let before = postcopy_broker::ram::huge_pool(HP).unwrap();
    let b = RamBlock::hugetlb("fits", 2 * HP, HP).unwrap();
    let after = postcopy_broker::ram::huge_pool(HP).unwrap();
    assert!(after.reserved >= 2 || before.reserved != after.reserved, "{before:?} -> {after:?}");
    drop(b);
}

#[test]
fn a_spawned_broker_serves_after_a_refused_registration() {
    // The in-process registration path refuses the same way (a vhost-user backend registered
    // by the VMM before its ack).
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", 8 * PS).unwrap()).unwrap();
    let mut inc = Incoming::new(blocks);
    inc.advise().unwrap();
    inc.listen().unwrap();
    let data = content(8, PS as usize, 51);
    let h =
        Broker::spawn(&inc, Box::new(MemorySource::new(vec![(data.clone(), PS)])), BrokerConfig::default())
            .unwrap();
    let b = inc.blocks().get(0).unwrap();
    let peer = Peer::spawn(&client_args(b, 1, "touch:0-7", &["--prefault", "touch"]));
    let reg = postcopy_broker::fault::Registration {
        name: "backend".into(),
        uffd: peer.take_uffd(),
        pid: Some(peer.pid()),
        map: postcopy_broker::fault::RegistrationMap::Shared(peer.mappings()),
    };
    let e = h.register(reg).unwrap_err();
    assert!(matches!(e, Error::Prefaulted { pages: 8, .. }), "{e}");
    assert_eq!(b.allocated_pages().unwrap(), 0);
    drop(peer);
    let mut good = Peer::spawn(&client_args(b, 1, "touch:0-7", &[]));
    good.register(&h, "good");
    good.go();
    assert_eq!(check_pages(&good.finish_within(30), &data, PS as usize), 8);
    h.stop().unwrap();
}

#[test]
fn a_destination_whose_pool_cannot_back_the_announced_blocks_refuses_the_hello_and_both_sides_exit() {
    let dir = common::mig::Dir::new("pool");
    let creds = common::mig::Creds::tls(&dir.0);
    // A (sparse) image announced as one hugetlbfs block larger than the whole pool.
    let pages = postcopy_broker::ram::huge_pool(HP).unwrap().total + 64;
    let img = dir.path("img");
    std::fs::File::create(&img).unwrap().set_len(pages * HP).unwrap();
    let spec = format!("big:{}M:2m", pages * 2);
    let (mut serve, addr, _out) =
        common::mig::spawn_serve(&dir.path("control.sock"), &creds, "127.0.0.1:0", &[]);
    let source = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["source", "--connect", &addr])
        .args(creds.args())
        .arg("--image")
        .arg(&img)
        .args(["--block", &spec])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sout = source.wait_with_output().unwrap();
    let mut derr = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut derr).unwrap();
    let dst = serve.wait().unwrap();
    let serr = String::from_utf8_lossy(&sout.stderr);
    assert!(!sout.status.success() && !dst.success(), "source {}, serve {dst}", sout.status);
    for (who, err) in [("destination", derr.as_str()), ("source", &*serr)] {
        assert!(
            err.contains("cannot reserve its huge pages") && err.contains("nr_hugepages"),
            "{who}: {err}"
        );
    }
}

#[test]
fn a_client_is_not_blamed_for_pages_another_process_populated() {
    // A process that is no client (pcb-peer reads the memfd through a mapping no userfaultfd
    // watches) populates ten pages; the next client to register did not: it is served, the
    // pages are dropped and counted as foreign, and it reads the source's bytes there.
    let sock = socket_path("not-blamed");
    let data = content(32, PS as usize, 61);
    let (inc, h) = broker(32, &data, config(&sock));
    let b = inc.blocks().get(0).unwrap();
    common::peer_read(b, 8 * PS, 10 * PS);
    assert_eq!(b.unplaced_count().unwrap(), 10);
    let mut innocent = Peer::spawn(&control_args(&sock, "touch:0-31", &[]));
    innocent.go();
    assert_eq!(check_pages(&innocent.finish_within(30), &data, PS as usize), 32);
    let st = status(&h);
    assert_eq!((st.broker.foreign_pages, st.broker.prefaulted_pages), (10, 0), "{:?}", st.broker);
    h.stop().unwrap();
}

#[test]
fn a_restore_whose_client_removed_a_received_page_writes_its_checksums_and_exits() {
    // Page 5 arrives, then its client removes it (a hole with its received bit set) and nobody
    // touches it again: the checksums are read after the blocks are unregistered, where a hole
    // reads as zeros, instead of faulting on the broker's own userfaultfd with no loop left.
    let dir = common::mig::Dir::new("checksums-hole");
    let pages = 64usize;
    let data = content(pages, PS as usize, 71);
    std::fs::write(dir.path("img"), &data).unwrap();
    let sock = dir.path("control.sock");
    let sums = dir.path("sums.json");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["serve", "--image"])
        .arg(dir.path("img"))
        .args(["--block", "ram:256K", "--no-background", "--control"])
        .arg(&sock)
        .arg("--checksums")
        .arg(&sums)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < end, "serve did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut remover = Peer::spawn(&control_args(&sock, "touch:5;remove:5;wait", &["--features", "remove"]));
    remover.go();
    assert_eq!(remover.line()["step"], "touch:5");
    assert_eq!(remover.line()["step"], "remove:5");
    let mut rest = Peer::spawn(&control_args(&sock, "touch:0-4;touch:6-63", &[]));
    rest.go();
    rest.finish_within(30);
    let st = loop {
        if let Some(st) = serve.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "serve hung after the last page arrived");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "{st}");
    let mut want = data.clone();
    want[5 * PS as usize..6 * PS as usize].fill(0);
    let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&sums).unwrap()).unwrap();
    assert_eq!(got["ram"], format!("{:016x}", common::fnv1a64(&want)));
    remover.go();
    remover.finish_within(30);
}
