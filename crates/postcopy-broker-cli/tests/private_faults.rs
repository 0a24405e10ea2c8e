//! Private (Firecracker-style) clients as Firecracker runs them: pcb-client processes with private
//! anonymous memory (4 KiB pages, or hugetlb 2 MiB pages) handed to the broker with Firecracker's
//! UFFD handshake over the control socket, served from an image file. Balloon free page reporting
//! removes ranges by the tens of thousands; removed pages read zero, the rest read the image; an
//! image truncated under the broker fails the client that faults past its end, not the broker.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::clients::*;
use postcopy_broker::fault::{BrokerConfig, BrokerHandle};
use postcopy_broker::source::MemorySource;
use postcopy_broker::{Incoming, RamBlock, RamBlocks};
use serde_json::Value;

/// A broker serving private clients from an image holding `data`, its control socket at a fresh
/// path named after `name`. Returns the socket, the image's path and the Incoming and handle.
fn image_broker(name: &str, data: &[u8]) -> (PathBuf, PathBuf, Incoming, BrokerHandle) {
    let sock = socket_path(name);
    let image = std::env::temp_dir().join(format!("pcb-test-{}-{name}.img", std::process::id()));
    std::fs::write(&image, data).unwrap();
    let config =
        BrokerConfig { control: Some(sock.clone()), image: Some(image.clone()), ..Default::default() };
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", 4096).unwrap()).unwrap();
    let (inc, h) = broker_with(blocks, Box::new(MemorySource::new(vec![(vec![0; 4096], 4096)])), config);
    (sock, image, inc, h)
}

/// pcb-client arguments of a Firecracker-style client of `pages` pages of `ps` bytes.
fn fc_args(sock: &std::path::Path, script: &str, pages: usize, ps: usize) -> Vec<String> {
    let (size, ps) = ((pages * ps).to_string(), ps.to_string());
    control_args(
        sock,
        script,
        &["--firecracker", "--features", "remove", "--size", &size, "--page-size", &ps],
    )
}

/// Check every page a client read: once it has removed pages (a `dontneed-each` step), pages in
/// `zero` read zeros; every other read is the image. Returns how many pages were checked.
fn check_private(lines: &[Value], data: &[u8], ps: usize, zero: impl Fn(usize) -> bool) -> usize {
    let zeros = fnv(&vec![0u8; ps]);
    let mut n = 0;
    let mut removed = false;
    for l in lines {
        removed |= l["step"].as_str().is_some_and(|s| s.starts_with("dontneed"));
        let Some(pages) = l["pages"].as_array() else { continue };
        for p in pages {
            let i = p["page"].as_u64().unwrap() as usize;
            let zero = |i| removed && zero(i);
            let want = if zero(i) { zeros.clone() } else { fnv(&data[i * ps..(i + 1) * ps]) };
            assert_eq!(
                p["fnv"].as_str().unwrap(),
                want,
                "page {i} (removed: {}) in step {}",
                zero(i),
                l["step"]
            );
            n += 1;
        }
    }
    n
}

#[test]
fn tens_of_thousands_of_removed_ranges_fault_in_as_zero() {
    const PAGES: usize = 65_536;
    // Every fourth page non-zero data, so a zero read proves the page was served as removed.
    let data = content(PAGES, 4096, 41);
    let (sock, image, _inc, h) = image_broker("fc-removed", &data);
    let last = PAGES - 1;
    let script = format!(
        // Fault in a quarter of the pages from the image, then report every other page free, one
        // madvise each (32768 REMOVE events, 32768 disjoint ranges), some of them twice, then
        // read every page.
        "touch:0-{last}/4,1-{last}/4;dontneed-each:0-{last}/2;dontneed-each:0-8191/2;touch:0-{last}"
    );
    let mut p = Peer::spawn(&fc_args(&sock, &script, PAGES, 4096));
    p.go();
    let lines = p.finish_within(300);
    let n = check_private(&lines, &data, 4096, |i| i % 2 == 0);
    assert_eq!(n, PAGES / 2 + PAGES);
    let st = h.status().unwrap();
    let c = st.all_clients().find(|c| c.kind == "private").unwrap();
    // The odd pages faulted in first are still present; every other page faults once more.
    assert_eq!(c.stats.faults, (PAGES / 2 + PAGES - PAGES / 4) as u64, "{:?}", c.stats);
    assert_eq!(c.stats.events, (PAGES / 2 + 4096) as u64, "one REMOVE per madvise");
    assert_eq!(st.broker.pages_zero, (PAGES / 2) as u64);
    assert_eq!(c.stats.unmapped_faults, 0);
    std::fs::remove_file(&image).unwrap();
    h.stop().unwrap();
}

#[test]
fn private_two_mib_pages_are_copied_from_the_image() {
    const PS: usize = 2 << 20;
    const PAGES: usize = 6;
    let data = content(PAGES * 512, 4096, 43);
    let (sock, image, _inc, h) = image_broker("fc-huge", &data);
    let mut p = Peer::spawn(&fc_args(&sock, "touch:0-5;dontneed-each:1,4;touch:0-5", PAGES, PS));
    p.go();
    let n = check_private(&p.finish_within(60), &data, PS, |i| i == 1 || i == 4);
    assert_eq!(n, 2 * PAGES);
    let st = h.status().unwrap();
    let c = st.all_clients().find(|c| c.kind == "private").unwrap();
    assert_eq!(c.stats.faults, (PAGES + 2) as u64);
    assert_eq!(st.broker.pages_zero, 2);
    std::fs::remove_file(&image).unwrap();
    h.stop().unwrap();
}

#[test]
fn an_image_truncated_under_the_broker_fails_only_the_client_that_faults_past_its_end() {
    const PAGES: usize = 64;
    let data = content(PAGES, 4096, 47);
    let (sock, image, _inc, h) = image_broker("fc-truncated", &data);
    let mut a = Peer::spawn(&fc_args(&sock, "touch:0-7;wait;touch:40", PAGES, 4096));
    a.go();
    assert_eq!(check_private(&[a.line()], &data, 4096, |_| false), 8);
    // The snapshot shrinks to 16 pages while it is served.
    std::fs::OpenOptions::new().write(true).open(&image).unwrap().set_len(16 * 4096).unwrap();
    a.go();
    // Page 40 is gone: the broker stops serving the client (it stays blocked) and lives on.
    let mut waited = 0;
    while !h.status().unwrap().departed.iter().any(|c| c.kind == "private") {
        std::thread::sleep(Duration::from_millis(10));
        waited += 1;
        assert!(waited < 3000, "the client that faulted past the end was not dropped");
    }
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    // Another client of the same image reads what is left of it.
    let mut b = Peer::spawn(&fc_args(&sock, "touch:0-15", PAGES, 4096));
    b.go();
    assert_eq!(check_private(&b.finish_within(60), &data, 4096, |_| false), 16);
    std::fs::remove_file(&image).unwrap();
    h.stop().unwrap();
}
