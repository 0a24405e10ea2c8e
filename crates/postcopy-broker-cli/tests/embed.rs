//! The embedding API (postcopy_broker::embed) against the real kernel: the library's
//! `in_process` example with vhost-user-blk backends (ours and qemu-storage-daemon) in their own
//! processes, the background fill stopped and started while the VMM faults, a VMM's own
//! vm-memory guest memory served in place, and the errors that say what to do.

mod common;

use std::fs::File;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::clients::content;
use common::vhost::{examples_dir, Setup};
use postcopy_broker::embed::{BrokerBuilder, EmbedError};
use postcopy_broker::error::Result;
use postcopy_broker::ram::RamBlock;
use postcopy_broker::source::{MemorySource, PageRequest, PageSink, PageSource, Urgency};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

const PAGE: u64 = 4096;
const WAIT: Duration = Duration::from_secs(120);

/// Byte `j` of source page `i` in the in_process example (its doc says so).
fn example_source_page(page: u64) -> Vec<u8> {
    (0..PAGE).map(|j| ((page * 7 + j) % 251) as u8 + 1).collect()
}

fn in_process_example_with(kind: &str) {
    let mut s = Setup::new(&format!("embed-{kind}"));
    let (sock, _) = s.backend(kind);
    let exe = examples_dir().join("in_process");
    assert!(
        exe.exists(),
        "{} is missing: it is the library's example, built by `cargo test --workspace` (or `cargo build \
         --release -p postcopy-broker --examples`)",
        exe.display()
    );
    let out = Command::new(&exe).arg("--socket").arg(&sock).arg("--pages").arg("2048").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "in_process failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    // 2048 pages of pc.ram and 16 of the driver block.
    assert_eq!(v["pages"], 2048 + 16, "{v}");
    assert_eq!(v["complete"], true);
    assert_eq!(v["postcopy_end"], "ok");
    assert_eq!(v["ram_mismatches"].as_array().unwrap().len(), 0, "{v}");
    // The I/O ran on demand alone: 16 pages written from and 16 read into, each fetched once
    // for the backend's own faults.
    assert_eq!(v["background_during_io"], 0, "{v}");
    assert_eq!(v["backend_pages_requested"], 32, "{v}");
    let demand = v["demand_pages"].as_u64().unwrap();
    assert_eq!(v["received_during_io"].as_u64().unwrap(), demand, "{v}");
    assert_eq!(demand + v["background_pages"].as_u64().unwrap(), 2048 + 16, "{v}");
    // The disk holds the source's pages the backend read from missing guest memory.
    let disk = std::fs::read(s.path("disk")).unwrap();
    for w in v["writes"].as_array().unwrap() {
        let (page, sector) = (w[0].as_u64().unwrap(), w[1].as_u64().unwrap());
        let at = (sector * 512) as usize;
        assert_eq!(
            disk[at..at + PAGE as usize],
            example_source_page(page)[..],
            "sector {sector} (page {page})"
        );
    }
}

#[test]
fn in_process_example_with_our_backend() {
    in_process_example_with("ours");
}

#[test]
fn in_process_example_with_qemu_storage_daemon() {
    in_process_example_with("qsd");
}

/// A memory source whose `hold_at`-th background request waits until the test opens the gate:
/// the test stops the fill while the loop is in the middle of it.
#[derive(Debug)]
struct Gated {
    inner: MemorySource,
    seen: Arc<AtomicU64>,
    hold_at: u64,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl PageSource for Gated {
    fn request(&mut self, req: PageRequest, sink: &mut dyn PageSink) -> Result<()> {
        if req.urgency == Urgency::Background && self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.hold_at
        {
            let (open, cv) = &*self.gate;
            let mut o = open.lock().unwrap();
            while !*o {
                o = cv.wait(o).unwrap();
            }
        }
        self.inner.request(req, sink)
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < WAIT, "{what} never happened");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_background_fill_stops_and_starts_again() {
    let pages = 4096u64;
    let data = content(pages as usize, 4096, 21);
    let seen = Arc::new(AtomicU64::new(0));
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let source = Gated {
        inner: MemorySource::new(vec![(data.clone(), PAGE)]),
        seen: Arc::clone(&seen),
        hold_at: 8,
        gate: Arc::clone(&gate),
    };
    let mut broker = BrokerBuilder::new()
        .block(RamBlock::memfd("ram", pages * PAGE).unwrap())
        .source(source)
        .start()
        .unwrap();
    let ram = broker.guest_ram().clone();
    // Off by default: nothing moves until somebody faults.
    assert_eq!(broker.status().unwrap().broker.pages_background, 0);
    assert_eq!(broker.progress(), (0, pages));

    // Start it, and stop it while the loop is inside its 8th background request.
    broker.set_background(true).unwrap();
    wait_until("the 8th background request", || seen.load(Ordering::SeqCst) >= 8);
    broker.set_background(false).unwrap();
    {
        let (open, cv) = &*gate;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }
    let st = broker.status().unwrap();
    let filled = st.broker.pages_background;
    assert!(filled >= 7 && filled < pages, "{filled} background pages");
    assert_eq!(st.received_pages, filled);
    assert_eq!(st.broker.pages_demand, 0);
    let requests = seen.load(Ordering::SeqCst);

    // Stopped: the VMM's faults on pages the fill has not reached arrive, nothing else.
    let wanted: Vec<u64> = (pages - 10..pages).collect();
    let mut buf = vec![0u8; PAGE as usize];
    for &p in &wanted {
        ram.read(p * PAGE, &mut buf).unwrap();
        assert_eq!(buf[..], data[(p * PAGE) as usize..((p + 1) * PAGE) as usize], "page {p}");
    }
    // Give a fill that did not stop the chance to show (the counts must not move).
    std::thread::sleep(Duration::from_millis(200));
    let st = broker.status().unwrap();
    assert_eq!(st.broker.pages_background, filled, "the fill went on after it was stopped");
    assert_eq!(st.broker.pages_demand, wanted.len() as u64);
    assert_eq!(st.received_pages, filled + wanted.len() as u64);
    assert_eq!(seen.load(Ordering::SeqCst), requests, "no background request while stopped");
    let vmm = st.clients.iter().find(|c| c.id == broker.vmm_client()).unwrap();
    assert_eq!(vmm.name, "vmm");
    assert_eq!(vmm.stats.pages_requested, wanted.len() as u64);

    // Started again: it runs until every page is there.
    broker.set_background(true).unwrap();
    broker.wait_complete(WAIT).unwrap();
    let done = broker.finish().unwrap();
    assert!(done.complete);
    assert_eq!(done.report.broker.pages_demand, wanted.len() as u64);
    assert_eq!(done.report.broker.pages_background, pages - wanted.len() as u64);
    let mut all = vec![0u8; (pages * PAGE) as usize];
    ram.read(0, &mut all).unwrap();
    assert!(all == data, "guest RAM differs from the source after the end");
}

/// A memfd of `size` bytes mapped shared by vm-memory at `gpa`: how a VMM makes guest RAM that
/// vhost-user backends can map.
fn vmm_region(name: &str, gpa: u64, size: u64) -> GuestRegionMmap {
    let fd = nix::sys::memfd::memfd_create(
        &std::ffi::CString::new(name).unwrap(),
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC | nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .unwrap();
    let file = File::from(fd);
    file.set_len(size).unwrap();
    let region = MmapRegion::from_file(FileOffset::new(file, 0), size as usize).unwrap();
    GuestRegionMmap::new(region, GuestAddress(gpa)).unwrap()
}

#[test]
fn the_vmm_s_own_guest_memory_is_served_in_place() {
    const LOW: u64 = 256 * PAGE;
    const HIGH_GPA: u64 = 1 << 32;
    const HIGH: u64 = 128 * PAGE;
    let low = content(256, 4096, 5);
    let high = content(128, 4096, 6);
    let memory =
        GuestMemoryMmap::from_regions(vec![vmm_region("low", 0, LOW), vmm_region("high", HIGH_GPA, HIGH)])
            .unwrap();
    let mut broker = BrokerBuilder::new()
        .guest_memory(memory.clone(), vec!["pc.ram".into(), "pc.ram.high".into()])
        .source(MemorySource::new(vec![(low.clone(), PAGE), (high.clone(), PAGE)]))
        .start()
        .unwrap();
    // The broker serves the VMM's mappings themselves, at the VMM's guest addresses.
    let mine: Vec<_> = memory.iter().map(|r| (r.start_addr(), r.as_ptr())).collect();
    let its: Vec<_> = broker.guest_memory().iter().map(|r| (r.start_addr(), r.as_ptr())).collect();
    assert_eq!(mine, its);
    let names: Vec<&str> = broker.blocks().iter().map(|(_, b)| b.name()).collect();
    assert_eq!(names, ["pc.ram", "pc.ram.high"]);

    // The VMM reads and writes its own memory (vm-memory's Bytes, no unsafe): missing pages
    // arrive first.
    let mut buf = [0u8; 16];
    memory.read_slice(&mut buf, GuestAddress(HIGH_GPA + 5 * PAGE + 8)).unwrap();
    assert_eq!(buf[..], high[(5 * PAGE + 8) as usize..(5 * PAGE + 24) as usize]);
    memory.write_slice(b"written by the vmm", GuestAddress(7 * PAGE + 100)).unwrap();
    assert_eq!(broker.progress(), (2, 384));
    let st = broker.status().unwrap();
    assert_eq!(st.broker.pages_demand, 2);
    let vmm = st.clients.iter().find(|c| c.id == broker.vmm_client()).unwrap();
    assert_eq!(vmm.stats.pages_requested, 2);

    broker.set_background(true).unwrap();
    broker.wait_complete(WAIT).unwrap();
    broker.finish().unwrap();
    let mut got = vec![0u8; LOW as usize];
    memory.read_slice(&mut got, GuestAddress(0)).unwrap();
    let mut want = low.clone();
    want[(7 * PAGE + 100) as usize..(7 * PAGE + 118) as usize].copy_from_slice(b"written by the vmm");
    assert!(got == want, "low RAM differs");
    let mut got = vec![0u8; HIGH as usize];
    memory.read_slice(&mut got, GuestAddress(HIGH_GPA)).unwrap();
    assert!(got == high, "high RAM differs");
}

#[test]
fn a_backend_joins_with_its_socket_alone_and_is_told_the_end() {
    let mut s = Setup::new("embed-join");
    let (sock, _) = s.backend("ours");
    let pages = 512u64;
    let data = content(pages as usize, 4096, 9);
    let mut broker = BrokerBuilder::new()
        .block(RamBlock::memfd("ram", pages * PAGE).unwrap())
        .source(MemorySource::new(vec![(data, PAGE)]))
        .start()
        .unwrap();
    let id = broker.connect_vhost_user(&sock).unwrap();
    assert_eq!(broker.backend_clients(), [id]);
    let st = broker.status().unwrap();
    let c = st.clients.iter().find(|c| c.id == id).unwrap();
    assert_eq!(c.name, format!("vhost-user:{}", sock.display()));
    assert_eq!(c.mapped_bytes, pages * PAGE, "the whole guest memory table, from the broker's own blocks");
    assert!(broker
        .backend_mut(id)
        .unwrap()
        .acked_protocol()
        .contains(vhost::vhost_user::message::VhostUserProtocolFeatures::PAGEFAULT));
    broker.set_background(true).unwrap();
    broker.wait_complete(WAIT).unwrap();
    let done = broker.finish().unwrap();
    assert_eq!(done.backends.len(), 1, "the connection goes back to the VMM");
    assert!(done.report.departed.iter().chain(&done.report.clients).any(|c| c.id == id));
}

#[test]
fn a_snapshot_image_is_restored_lazily() {
    let s = Setup::new("embed-image");
    let data = &s.image; // one 16 MiB block "ram"
    let mut broker = BrokerBuilder::new()
        .block(RamBlock::memfd("ram", data.len() as u64).unwrap())
        .image(s.path("image"))
        .background(true)
        .start()
        .unwrap();
    broker.wait_complete(WAIT).unwrap();
    let done = broker.finish().unwrap();
    assert_eq!(
        done.report.broker.pages_background + done.report.broker.pages_demand,
        data.len() as u64 / PAGE
    );
    let mut got = vec![0u8; data.len()];
    broker.guest_ram().read(0, &mut got).unwrap();
    assert!(&got == data, "restored RAM differs from the image");
    let e = BrokerBuilder::new()
        .block(RamBlock::memfd("ram", 2 * data.len() as u64).unwrap())
        .image(s.path("image"))
        .start()
        .unwrap_err();
    assert!(matches!(e, EmbedError::Start { step: "open the image", .. }), "{e}");
    assert!(e.to_string().contains("right image"), "{e}");
}

#[test]
fn errors_say_what_to_do() {
    let block = || RamBlock::memfd("ram", 16 * PAGE).unwrap();
    let src = || MemorySource::new(vec![(vec![1u8; (16 * PAGE) as usize], PAGE)]);
    let e = BrokerBuilder::new().block(block()).start().unwrap_err();
    assert!(matches!(e, EmbedError::NoSource) && e.to_string().contains("BrokerBuilder::source"), "{e}");
    let e = BrokerBuilder::new().source(src()).start().unwrap_err();
    assert!(matches!(e, EmbedError::NoBlocks) && e.to_string().contains("BrokerBuilder::block"), "{e}");
    let e = BrokerBuilder::new().block(block()).block(block()).source(src()).start().unwrap_err();
    assert!(matches!(e, EmbedError::Config(_)) && e.to_string().contains("ram"), "{e}");

    // A backend without PAGEFAULT vetoes postcopy before any page is touched.
    let mut s = Setup::new("embed-nopf");
    let (sock, _) = s.backend("nopf");
    let e = BrokerBuilder::new().block(block()).source(src()).vhost_user_backend(&sock).start().unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, EmbedError::Start { .. }), "{e:?}");
    assert!(text.contains("PAGEFAULT") && text.contains(&sock.display().to_string()), "{text}");

    // finish() before the last page is refused, and the broker serves on.
    let mut broker = BrokerBuilder::new().block(block()).source(src()).start().unwrap();
    let e = broker.finish().unwrap_err();
    assert!(matches!(e, EmbedError::Incomplete { received: 0, total: 16 }), "{e}");
    assert!(e.to_string().contains("wait_complete"), "{e}");
    let e = broker.wait_complete(Duration::from_millis(50)).unwrap_err();
    assert!(matches!(e, EmbedError::Timeout { received: 0, total: 16, .. }), "{e}");
    assert!(e.to_string().contains("set_background"), "{e}");
    let mut page = [0u8; 8];
    broker.guest_ram().read(3 * PAGE, &mut page).unwrap();
    assert_eq!(page, [1u8; 8]);
    let e = broker.backend_mut(postcopy_broker::client_id::ClientId(99)).unwrap_err();
    assert!(matches!(e, EmbedError::UnknownBackend(_)), "{e}");
    // Giving up is always possible; then the broker has ended.
    let done = broker.stop().unwrap();
    assert!(!done.complete);
    assert_eq!(done.report.broker.pages_demand, 1);
    assert!(matches!(broker.status().unwrap_err(), EmbedError::Ended));
    assert!(matches!(broker.finish().unwrap_err(), EmbedError::Ended));
}
