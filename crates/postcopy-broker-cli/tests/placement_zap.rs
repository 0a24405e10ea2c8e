//! A placer that drops the broker's own page-table entries of what it placed (the stream
//! thread's, issue #15 item 5) keeps "received implies present": on a memfd block the entries
//! are gone from the placement mapping (its Rss in /proc/self/smaps), yet every page is in the
//! page cache (mincore), reads back right through the mapping without a userfaultfd message and
//! from another process, and placing it again finds it there. A hugetlbfs block is left mapped
//! (mincore reports its entries, not its page cache).

mod common;

use common::*;
use postcopy_broker::ram::HUGE_2M;
use postcopy_broker::{Placed, Placer, RamBlock, RamBlocks};

/// The Rss of the mapping that starts at `addr` (kB), and its hugetlb pages (kB).
fn rss_kib(addr: u64) -> (u64, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let head = format!("{addr:x}-");
    let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
    assert!(lines.next().is_some(), "no mapping at {addr:#x}");
    let field = |lines: &[&str], name: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(name))
            .map_or(0, |v| v.trim().trim_end_matches(" kB").trim().parse().unwrap())
    };
    // Its fields, up to the next mapping's header ("start-end perms ...").
    let header = |l: &str| l.split(' ').next().is_some_and(|r| r.contains('-') && !r.ends_with(':'));
    let body: Vec<&str> = lines.take_while(|l| !header(l)).collect();
    (field(&body, "Rss:"), field(&body, "Shared_Hugetlb:") + field(&body, "Private_Hugetlb:"))
}

/// Place `data` in runs of `run` bytes with a zapping placer, then flush it.
fn place_zapping(inc: &postcopy_broker::Incoming, id: usize, data: &[u8], run: usize) {
    let b = inc.blocks().get(id).unwrap();
    let mut p = Placer::new(std::sync::Arc::clone(inc.uffd().unwrap()), b.page_size()).unwrap();
    p.set_zap_placed(true);
    for (i, chunk) in data.chunks(run).enumerate() {
        assert_eq!(p.place(inc.blocks(), id, (i * run) as u64, chunk).unwrap(), Placed::Placed);
    }
    p.flush_zap(inc.blocks());
}

#[test]
fn placed_memfd_pages_leave_the_placement_mapping_and_stay_present() {
    const PAGES: u64 = 4096; // 16 MiB: two full batches
    let inc = listening_memfd("ram", PAGES);
    let (id, b) = inc.blocks().named("ram").unwrap();
    let data = pattern(0x5c, (PAGES * 4096) as usize);
    // 2 MiB runs, and a last run of 64 KiB that only the flush zaps.
    place_zapping(&inc, id, &data[..(PAGES * 4096 - 65536) as usize], 2 << 20);
    let mut p = Placer::new(std::sync::Arc::clone(inc.uffd().unwrap()), 4096).unwrap();
    p.set_zap_placed(true);
    let tail = (PAGES * 4096 - 65536) as usize;
    p.place(inc.blocks(), id, tail as u64, &data[tail..]).unwrap();
    p.flush_zap(inc.blocks());

    assert_eq!(rss_kib(b.host_addr()).0, 0, "the broker's own entries are gone");
    assert_eq!(b.received().count_ones() as u64, PAGES);
    assert!((0..PAGES).all(|i| b.is_resident(i * 4096)), "every received page is present");
    assert_peer_sees(b, 0, &data);
    // Through the (still registered) placement mapping: page-cache hits, no missing fault (a
    // missing fault would block this thread: nobody serves it).
    assert_eq!(read_block(b, 0, PAGES * 4096), data);
    let mut msgs = postcopy_broker::uffd::message_buffer(4);
    assert_eq!(inc.uffd().unwrap().read_messages(&mut msgs).unwrap(), 0, "no userfaultfd message");
    // Placing again finds the pages there (EEXIST with the bit set), nothing foreign.
    let p2 = Placer::new(std::sync::Arc::clone(inc.uffd().unwrap()), 4096).unwrap();
    let again = p2.place(inc.blocks(), id, 0, &data[..8192]).unwrap();
    assert_ne!(again, Placed::Repaired);
    assert_eq!(p2.stats().foreign_pages.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn placed_huge_pages_are_left_mapped() {
    ensure_free_huge_pages(8);
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::hugetlb("huge", 4 * HUGE_2M, HUGE_2M).unwrap()).unwrap();
    let inc = listening(blocks);
    let (id, b) = inc.blocks().named("huge").unwrap();
    let data = pattern(0x3d, (4 * HUGE_2M) as usize);
    place_zapping(&inc, id, &data, HUGE_2M as usize);
    assert_eq!(rss_kib(b.host_addr()).1, 4 * HUGE_2M / 1024, "hugetlbfs entries stay");
    assert!((0..4).all(|i| b.is_resident(i * HUGE_2M)));
    assert_peer_sees(b, 0, &data);
    assert_eq!(read_block(b, 0, 4 * HUGE_2M), data);
}
