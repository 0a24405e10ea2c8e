//! The foundation against the real kernel: placement through the broker's own userfaultfd and
//! what other mappings, threads and processes see; zero pages and runs; discard; the received
//! bitmap; foreign pages; the state machine and notifiers driven through `Incoming`.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use postcopy_broker::uffd::Message;
use postcopy_broker::{Error, Incoming, NotifyReason, Placed, PostcopyState, RamBlock, RamBlocks};

const PS: u64 = 4096;

#[test]
fn a_placed_page_is_visible_through_a_second_mapping_and_from_another_process() {
    let inc = listening_memfd("ram", 16);
    let (id, b) = inc.blocks().named("ram").unwrap();
    let placer = inc.placer().unwrap();
    let data = pattern(0x40, PS as usize);

    assert!(!b.is_received(3 * PS));
    assert_eq!(placer.place(inc.blocks(), id, 3 * PS, &data).unwrap(), Placed::Placed);
    assert!(b.is_received(3 * PS));
    assert_eq!(b.received().count_ones(), 1);

    // Only now, after placement, may an unregistered mapping touch the page.
    let second = second_mapping(b);
    assert_eq!(read_mapping(&second, 3 * PS, PS), data);
    assert_eq!(read_block(b, 3 * PS, PS), data);
    assert_peer_sees(b, 3 * PS, &data);

    let c = placer.stats().counts();
    assert_eq!((c.data_pages, c.ioctls, c.foreign_pages, c.already_present), (1, 1, 0, 0));
}

#[test]
fn a_thread_faulting_on_the_placement_mapping_blocks_until_the_page_is_placed() {
    let inc = listening_memfd("ram", 8);
    let (id, b) = inc.blocks().named("ram").unwrap();
    let reader = spawn_reader(inc.blocks(), id, 5 * PS, PS);

    // The broker's userfaultfd reports the reader's fault: the reader is parked in the kernel.
    let fault = wait_for_fault(inc.uffd().unwrap(), b.host_addr() + 5 * PS, PS);
    assert!(matches!(fault, Message::Pagefault { write: false, .. }));
    assert!(!b.is_received(5 * PS));
    assert_still_blocked(&reader);

    let data = pattern(0x50, PS as usize);
    inc.placer().unwrap().place(inc.blocks(), id, 5 * PS, &data).unwrap();
    assert_eq!(finish(reader), data, "the woken reader sees the placed bytes, never zeros");
    assert!(b.is_received(5 * PS));
}

#[test]
fn zero_pages_read_as_zero_and_are_marked_received() {
    let inc = listening_memfd("ram", 16);
    let (id, b) = inc.blocks().named("ram").unwrap();
    let placer = inc.placer().unwrap();
    assert!(b.zeropage_supported(), "memfd ranges allow UFFDIO_ZEROPAGE");

    let reader = spawn_reader(inc.blocks(), id, 2 * PS, PS);
    wait_for_fault(inc.uffd().unwrap(), b.host_addr() + 2 * PS, PS);
    assert_still_blocked(&reader);
    assert_eq!(placer.place_zero(inc.blocks(), id, 2 * PS, PS).unwrap(), Placed::Placed);
    assert_eq!(finish(reader), vec![0u8; PS as usize]);

    // A run of zero pages in one ioctl.
    assert_eq!(placer.place_zero(inc.blocks(), id, 8 * PS, 8 * PS).unwrap(), Placed::Placed);
    for p in 0..16 {
        assert_eq!(b.is_received(p * PS), p == 2 || p >= 8, "page {p}");
    }
    assert_eq!(read_block(b, 8 * PS, 8 * PS), vec![0u8; 8 * PS as usize]);
    assert_eq!(read_mapping(&second_mapping(b), 8 * PS, 8 * PS), vec![0u8; 8 * PS as usize]);
    assert_peer_sees(b, 8 * PS, &vec![0u8; 8 * PS as usize]);
    let c = placer.stats().counts();
    assert_eq!((c.zero_pages, c.data_pages, c.ioctls), (9, 0, 2));
    assert_eq!(c.zero_fallocated, 9, "zero runs over holes of a memfd are allocated, not ioctl'd");
}

#[test]
fn a_zero_run_over_a_foreign_page_goes_through_the_userfaultfd_and_repairs_it() {
    let inc = listening_with_foreign_page(8, 5);
    let (id, b) = inc.blocks().named("ram").unwrap();
    let placer = inc.placer().unwrap();

    // Pages 0-3 are a hole: allocated. Pages 4-7 hold the intruder's page 5: the userfaultfd
    // places them, sees EEXIST on page 5 and repairs it.
    assert_eq!(placer.place_zero(inc.blocks(), id, 0, 4 * PS).unwrap(), Placed::Placed);
    assert_eq!(placer.place_zero(inc.blocks(), id, 4 * PS, 4 * PS).unwrap(), Placed::Repaired);
    let c = placer.stats().counts();
    assert_eq!((c.zero_pages, c.zero_fallocated, c.foreign_pages), (8, 4, 1));
    assert_eq!(b.received().count_ones(), 8);
    assert_eq!(read_block(b, 0, 8 * PS), vec![0u8; 8 * PS as usize]);
    assert_peer_sees(b, 0, &vec![0u8; 8 * PS as usize]);
}

#[test]
fn two_placers_racing_over_the_same_pages_fill_each_page_exactly_once() {
    const PAGES: u64 = 4096;
    let inc = listening_memfd("ram", PAGES);
    let (id, b) = inc.blocks().named("ram").unwrap();
    // Every 7th page is zero, the rest data.
    let mut data = pattern(0x21, (PAGES * PS) as usize);
    for p in (3..PAGES).step_by(7) {
        data[(p * PS) as usize..((p + 1) * PS) as usize].fill(0);
    }
    let uffd = inc.uffd().unwrap();
    let placers: Vec<postcopy_broker::Placer> =
        (0..2).map(|_| postcopy_broker::Placer::new(Arc::clone(uffd), PS).unwrap()).collect();
    std::thread::scope(|s| {
        for (k, placer) in placers.iter().enumerate() {
            let (blocks, data) = (inc.blocks(), &data);
            s.spawn(move || {
                // One goes up in runs of 16 pages, the other down in runs of 11: they cross in
                // the middle, where both try the same pages at the same time.
                let run = if k == 0 { 16 } else { 11 };
                let starts: Vec<u64> = (0..PAGES).step_by(run).collect();
                let order: Vec<u64> = if k == 0 { starts } else { starts.into_iter().rev().collect() };
                for first in order {
                    let end = (first + run as u64).min(PAGES);
                    let mut p = first;
                    while p < end {
                        let zero = p % 7 == 3;
                        let mut q = p + 1;
                        while q < end && (q % 7 == 3) == zero {
                            q += 1;
                        }
                        let (o, l) = (p * PS, (q - p) * PS);
                        if zero {
                            placer.place_zero(blocks, id, o, l).unwrap();
                        } else {
                            placer.place(blocks, id, o, &data[o as usize..(o + l) as usize]).unwrap();
                        }
                        p = q;
                    }
                }
            });
        }
    });
    let counts: Vec<_> = placers.iter().map(|p| p.stats().counts()).collect();
    let filled: u64 = counts.iter().map(|c| c.data_pages + c.zero_pages).sum();
    assert_eq!(filled, PAGES, "every page filled by exactly one placer: {counts:?}");
    assert_eq!(counts.iter().map(|c| c.foreign_pages).sum::<u64>(), 0, "{counts:?}");
    assert_eq!(b.received().count_ones() as u64, PAGES);
    assert_eq!(read_block(b, 0, PAGES * PS), data);
    assert_peer_sees(b, 0, &data);
}

#[test]
fn a_run_of_pages_is_placed_in_one_ioctl() {
    let inc = listening_memfd("ram", 32);
    let (id, b) = inc.blocks().named("ram").unwrap();
    let placer = inc.placer().unwrap();
    let data = pattern(0x60, 8 * PS as usize);

    // A thread blocked on the last page of the run is woken by the one ioctl.
    let reader = spawn_reader(inc.blocks(), id, 11 * PS, PS);
    wait_for_fault(inc.uffd().unwrap(), b.host_addr() + 11 * PS, PS);
    assert_still_blocked(&reader);
    assert_eq!(placer.place(inc.blocks(), id, 4 * PS, &data).unwrap(), Placed::Placed);
    assert_eq!(finish(reader), data[7 * PS as usize..]);

    let c = placer.stats().counts();
    assert_eq!((c.ioctls, c.data_pages, c.retries), (1, 8, 0));
    for p in 0..32 {
        assert_eq!(b.is_received(p * PS), (4..12).contains(&p), "page {p}");
    }
    assert_eq!(b.received().count_ones(), 8);
    assert_eq!(inc.blocks().received_pages(), 8);
    assert_eq!(read_mapping(&second_mapping(b), 4 * PS, 8 * PS), data);
    assert_peer_sees(b, 4 * PS, &data);
}

#[test]
fn discard_makes_a_page_absent_again() {
    let inc = listening_memfd("ram", 8);
    let (id, b) = inc.blocks().named("ram").unwrap();
    let placer = inc.placer().unwrap();
    let old = pattern(0x70, 2 * PS as usize);
    placer.place(inc.blocks(), id, 2 * PS, &old).unwrap();
    assert_eq!(read_block(b, 2 * PS, 2 * PS), old);
    assert_peer_sees(b, 2 * PS, &old);

    b.discard(2 * PS, PS).unwrap();
    assert!(!b.is_received(2 * PS), "discard clears the received bit");
    assert!(b.is_received(3 * PS), "only the discarded page");

    // The page faults again on the placement mapping, and the new contents are what appears.
    let reader = spawn_reader(inc.blocks(), id, 2 * PS, PS);
    wait_for_fault(inc.uffd().unwrap(), b.host_addr() + 2 * PS, PS);
    assert_still_blocked(&reader);
    let new = pattern(0x80, PS as usize);
    assert_eq!(placer.place(inc.blocks(), id, 2 * PS, &new).unwrap(), Placed::Placed);
    assert_eq!(finish(reader), new);
    assert_peer_sees(b, 2 * PS, &new);
    assert_eq!(placer.stats().counts().foreign_pages, 0, "a discarded page is not foreign");
}

#[test]
fn discards_before_listening_go_through_the_discard_state() {
    let mut blocks = RamBlocks::new();
    let id = blocks.add(RamBlock::memfd("ram", 8 * PS).unwrap()).unwrap();
    let mut inc = Incoming::new(blocks);
    inc.advise().unwrap();
    assert_eq!(inc.state().get(), PostcopyState::Advise);
    inc.discard(id, 0, 4 * PS).unwrap();
    assert_eq!(inc.state().get(), PostcopyState::Discard);
    inc.discard(id, 4 * PS, PS).unwrap();
    assert_eq!(inc.state().get(), PostcopyState::Discard);
    let e = inc.discard(id, 4 * PS, 8 * PS).unwrap_err();
    assert!(matches!(e, Error::BadRange { why: "out of range", .. }), "{e}");
    let e = inc.discard(7, 0, PS).unwrap_err();
    assert!(matches!(e, Error::UnknownBlock(_)), "{e}");
    inc.listen().unwrap();
    assert_eq!(inc.state().get(), PostcopyState::Listening);
    let data = pattern(0x11, PS as usize);
    inc.placer().unwrap().place(inc.blocks(), id, 0, &data).unwrap();
    assert_peer_sees(inc.blocks().get(id).unwrap(), 0, &data);
}

#[test]
fn advise_discards_old_contents() {
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", 4 * PS).unwrap()).unwrap();
    let mut inc = Incoming::new(blocks);
    let (id, b) = inc.blocks().named("ram").unwrap();
    // Before advise nothing is registered: the broker may write freely.
    let stale = pattern(0x22, PS as usize);
    write_mapping(&second_mapping(b), PS, &stale);
    assert_peer_sees(b, PS, &stale);
    inc.advise().unwrap();
    inc.listen().unwrap();
    let b = inc.blocks().get(id).unwrap();
    let reader = spawn_reader(inc.blocks(), id, PS, PS);
    wait_for_fault(inc.uffd().unwrap(), b.host_addr() + PS, PS);
    assert_still_blocked(&reader);
    let fresh = pattern(0x33, PS as usize);
    assert_eq!(inc.placer().unwrap().place(inc.blocks(), id, PS, &fresh).unwrap(), Placed::Placed);
    assert_eq!(finish(reader), fresh);
    assert_eq!(inc.placer().unwrap().stats().counts().foreign_pages, 0);
}

#[test]
fn the_received_bit_is_set_only_after_a_successful_placement() {
    let inc = listening_memfd("ram", 4);
    let (id, b) = inc.blocks().named("ram").unwrap();
    let placer = inc.placer().unwrap();
    let page = pattern(0x90, PS as usize);

    let e = placer.place(inc.blocks(), id, 4 * PS, &page).unwrap_err();
    assert!(matches!(e, Error::BadRange { why: "out of range", offset, .. } if offset == 4 * PS), "{e}");
    let e = placer.place(inc.blocks(), id, 3 * PS, &pattern(1, 2 * PS as usize)).unwrap_err();
    assert!(matches!(e, Error::BadRange { why: "out of range", .. }), "{e}");
    let e = placer.place(inc.blocks(), id, u64::MAX - PS + 1, &page).unwrap_err();
    assert!(matches!(e, Error::BadRange { why: "out of range", .. }), "{e}");
    let e = placer.place(inc.blocks(), id, 100, &page).unwrap_err();
    assert!(matches!(e, Error::BadRange { why: "not page aligned", .. }), "{e}");
    let e = placer.place(inc.blocks(), id, 0, &page[..100]).unwrap_err();
    assert!(matches!(e, Error::BadPageData { got: 100, .. }), "{e}");
    let e = placer.place(inc.blocks(), id, 0, &[]).unwrap_err();
    assert!(matches!(e, Error::BadPageData { got: 0, .. }), "{e}");
    let e = placer.place_zero(inc.blocks(), id, 0, 0).unwrap_err();
    assert!(matches!(e, Error::BadRange { .. }), "{e}");
    let e = placer.place_zero(inc.blocks(), id, 2 * PS, 3 * PS).unwrap_err();
    assert!(matches!(e, Error::BadRange { .. }), "{e}");
    let e = placer.place(inc.blocks(), 9, 0, &page).unwrap_err();
    assert!(matches!(e, Error::UnknownBlock(_)), "{e}");

    assert_eq!(b.received().count_ones(), 0, "no failed placement set a bit");
    assert_eq!(placer.stats().counts().ioctls, 0, "bad input never reaches the kernel");
    assert!(e.to_string().contains("no RAM block"), "{e}");

    // A block of the same size placed right afterwards works: nothing was left half done.
    placer.place(inc.blocks(), id, 3 * PS, &page).unwrap();
    assert_eq!(b.received().count_ones(), 1);
}

/// A listening memfd block "ram" of `pages` whose page `foreign` was written through an
/// unregistered mapping after advise(): a page the broker never placed.
fn listening_with_foreign_page(pages: u64, foreign: u64) -> Incoming {
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", pages * PS).unwrap()).unwrap();
    let mut inc = Incoming::new(blocks);
    inc.advise().unwrap();
    let (_, b) = inc.blocks().named("ram").unwrap();
    write_mapping(&second_mapping(b), foreign * PS, &[0xEEu8; 16]);
    inc.listen().unwrap();
    inc
}

#[test]
fn eexist_on_a_page_the_broker_never_placed_is_detected_and_repaired() {
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", 4 * PS).unwrap()).unwrap();
    let mut inc = Incoming::new(blocks);
    inc.advise().unwrap();
    let (id, b) = inc.blocks().named("ram").unwrap();
    // On purpose: after advise() discarded everything, someone writes shared RAM through an
    // unregistered mapping. The page now exists in the memfd although the broker never placed it.
    let intruder = second_mapping(b);
    write_mapping(&intruder, PS, &vec![0xEEu8; PS as usize]);
    inc.listen().unwrap();
    let placer = inc.placer().unwrap();
    let b = inc.blocks().get(id).unwrap();

    let data = pattern(0xA0, PS as usize);
    assert_eq!(placer.place(inc.blocks(), id, PS, &data).unwrap(), Placed::Repaired);
    let c = placer.stats().counts();
    assert_eq!((c.foreign_pages, c.already_present), (1, 0));
    assert!(b.is_received(PS));
    assert_eq!(read_block(b, PS, PS), data);
    assert_eq!(read_mapping(&intruder, PS, PS), data, "the intruder's mapping was zapped too");
    assert_peer_sees(b, PS, &data);
}

#[test]
fn a_foreign_page_inside_a_run_is_repaired_and_the_rest_of_the_run_placed() {
    let inc = listening_with_foreign_page(8, 4);
    let (id, b) = inc.blocks().named("ram").unwrap();
    let placer = inc.placer().unwrap();

    let data = pattern(0xB0, 6 * PS as usize);
    assert_eq!(placer.place(inc.blocks(), id, PS, &data).unwrap(), Placed::Repaired);
    let c = placer.stats().counts();
    assert_eq!((c.foreign_pages, c.already_present, c.data_pages), (1, 0, 6));
    for p in 0..8 {
        assert_eq!(b.is_received(p * PS), (1..7).contains(&p), "page {p}");
    }
    assert_eq!(read_block(b, PS, 6 * PS), data);
    assert_peer_sees(b, PS, &data);
}

#[test]
fn eexist_on_a_page_the_broker_placed_is_harmless() {
    let inc = listening_memfd("ram", 8);
    let (id, b) = inc.blocks().named("ram").unwrap();
    let placer = inc.placer().unwrap();
    let first = pattern(0xC0, PS as usize);
    placer.place(inc.blocks(), id, 2 * PS, &first).unwrap();

    // The same page again (a duplicate reply): the first contents stay.
    assert_eq!(
        placer.place(inc.blocks(), id, 2 * PS, &pattern(0xD0, PS as usize)).unwrap(),
        Placed::AlreadyPresent
    );
    assert_eq!(placer.place_zero(inc.blocks(), id, 2 * PS, PS).unwrap(), Placed::AlreadyPresent);
    let c = placer.stats().counts();
    assert_eq!((c.already_present, c.foreign_pages), (2, 0));
    assert_eq!((c.data_pages, c.zero_pages), (1, 0), "pages already present are not counted as placed");
    assert_eq!(read_block(b, 2 * PS, PS), first);

    // A run over it: the other pages are placed, the present one kept.
    let run = pattern(0xE0, 4 * PS as usize);
    assert_eq!(placer.place(inc.blocks(), id, 0, &run).unwrap(), Placed::AlreadyPresent);
    let c = placer.stats().counts();
    assert_eq!((c.already_present, c.foreign_pages, c.data_pages), (3, 0, 4));
    assert_eq!(b.received().count_ones(), 4);
    let mut expect = run.clone();
    expect[2 * PS as usize..3 * PS as usize].copy_from_slice(&first);
    assert_eq!(read_block(b, 0, 4 * PS), expect);
    assert_peer_sees(b, 0, &expect);
}

#[test]
fn a_private_block_is_placed_the_same_way() {
    let mut blocks = RamBlocks::new();
    let id = blocks.add(RamBlock::private("priv", 4 * PS).unwrap()).unwrap();
    let inc = listening(blocks);
    let b = inc.blocks().get(id).unwrap();
    assert!(b.fd().is_none());
    let reader = spawn_reader(inc.blocks(), id, PS, PS);
    wait_for_fault(inc.uffd().unwrap(), b.host_addr() + PS, PS);
    assert_still_blocked(&reader);
    let data = pattern(0x12, PS as usize);
    inc.placer().unwrap().place(inc.blocks(), id, PS, &data).unwrap();
    assert_eq!(finish(reader), data);
    inc.placer().unwrap().place_zero(inc.blocks(), id, 2 * PS, 2 * PS).unwrap();
    assert_eq!(read_block(b, 2 * PS, 2 * PS), vec![0u8; 2 * PS as usize]);
    b.discard(PS, PS).unwrap();
    assert!(!b.is_received(PS));
    let reader = spawn_reader(inc.blocks(), id, PS, PS);
    wait_for_fault(inc.uffd().unwrap(), b.host_addr() + PS, PS);
    let again = pattern(0x13, PS as usize);
    inc.placer().unwrap().place(inc.blocks(), id, PS, &again).unwrap();
    assert_eq!(finish(reader), again);
}

#[test]
fn a_file_block_on_dev_shm_works_like_a_memfd() {
    let path = std::path::PathBuf::from(format!("/dev/shm/pcb-test-{}-file-block", std::process::id()));
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _rm = Rm(path.clone());
    let mut blocks = RamBlocks::new();
    let id = blocks.add(RamBlock::file("file", &path, 8 * PS).unwrap()).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * PS);
    let inc = listening(blocks);
    let b = inc.blocks().get(id).unwrap();
    assert_eq!(b.page_size(), PS);
    assert!(b.zeropage_supported());
    let placer = inc.placer().unwrap();

    let reader = spawn_reader(inc.blocks(), id, 3 * PS, PS);
    wait_for_fault(inc.uffd().unwrap(), b.host_addr() + 3 * PS, PS);
    assert_still_blocked(&reader);
    let data = pattern(0x14, 2 * PS as usize);
    assert_eq!(placer.place(inc.blocks(), id, 2 * PS, &data).unwrap(), Placed::Placed);
    assert_eq!(finish(reader), data[PS as usize..]);
    placer.place_zero(inc.blocks(), id, 4 * PS, PS).unwrap();

    // Another process opening the file by its path sees the placed bytes.
    let file = std::fs::File::open(&path).unwrap();
    let mut got = vec![0u8; 3 * PS as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut got, 2 * PS).unwrap();
    let mut expect = data.clone();
    expect.extend(vec![0u8; PS as usize]);
    assert_eq!(got, expect);
    assert_peer_sees(b, 2 * PS, &expect);
    assert_eq!(read_mapping(&second_mapping(b), 2 * PS, 3 * PS), expect);
    assert_eq!(placer.stats().counts().ioctls, 2);

    b.discard(2 * PS, PS).unwrap();
    let reader = spawn_reader(inc.blocks(), id, 2 * PS, PS);
    wait_for_fault(inc.uffd().unwrap(), b.host_addr() + 2 * PS, PS);
    assert_still_blocked(&reader);
    let new = pattern(0x15, PS as usize);
    placer.place(inc.blocks(), id, 2 * PS, &new).unwrap();
    assert_eq!(finish(reader), new);
}

#[test]
fn a_block_over_a_memfd_from_elsewhere_is_placed_like_its_own() {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    // The VMM's guest RAM: a memfd it created and passed over.
    let fd = memfd_create(c"guest-ram", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&fd, (8 * PS) as i64).unwrap();
    let vmm_view =
        postcopy_broker::ram::Mapping::shared(std::os::fd::AsFd::as_fd(&fd), 8 * PS as usize).unwrap();
    let dup = fd.try_clone().unwrap();
    let mut blocks = RamBlocks::new();
    let id = blocks.add(RamBlock::from_fd("pc.ram", dup, 8 * PS, PS).unwrap()).unwrap();
    let inc = listening(blocks);
    let b = inc.blocks().get(id).unwrap();
    assert_eq!(b.backing(), &postcopy_broker::ram::Backing::Fd);
    let data = pattern(0x1A, 2 * PS as usize);
    inc.placer().unwrap().place(inc.blocks(), id, 6 * PS, &data).unwrap();
    assert_eq!(read_mapping(&vmm_view, 6 * PS, 2 * PS), data);
    assert_peer_sees(b, 6 * PS, &data);
}

#[test]
fn blocks_are_found_by_name_and_placement_address() {
    let mut blocks = RamBlocks::new();
    let a = blocks.add(RamBlock::memfd("a", 4 * PS).unwrap()).unwrap();
    let b = blocks.add(RamBlock::memfd("b", 2 * PS).unwrap()).unwrap();
    let (ba, bb) = (blocks.get(a).unwrap(), blocks.get(b).unwrap());
    assert_eq!(blocks.by_host_addr(ba.host_addr()), Some((a, 0)));
    assert_eq!(blocks.by_host_addr(ba.host_addr() + 3 * PS + 17), Some((a, 3 * PS + 17)));
    assert_eq!(blocks.by_host_addr(bb.host_addr() + PS), Some((b, PS)));
    assert_eq!(blocks.by_host_addr(ba.host_addr() + 4 * PS).map(|(id, _)| id).filter(|&id| id == a), None);
    assert_eq!(blocks.by_host_addr(bb.host_addr() + 2 * PS).map(|(id, _)| id).filter(|&id| id == b), None);
    assert_eq!(blocks.by_host_addr(0), None);
    assert_eq!(blocks.named("b").unwrap().0, b);
    assert_eq!((blocks.total_pages(), blocks.total_size(), blocks.len()), (6, 6 * PS, 2));
}

#[test]
fn two_blocks_are_placed_independently() {
    let mut blocks = RamBlocks::new();
    let a = blocks.add(RamBlock::memfd("a", 4 * PS).unwrap()).unwrap();
    let b = blocks.add(RamBlock::memfd("b", 4 * PS).unwrap()).unwrap();
    let inc = listening(blocks);
    let placer = inc.placer().unwrap();
    let (da, db) = (pattern(0x16, 4 * PS as usize), pattern(0x17, 4 * PS as usize));
    placer.place(inc.blocks(), a, 0, &da).unwrap();
    assert!(!inc.blocks().all_received());
    placer.place(inc.blocks(), b, 0, &db).unwrap();
    assert!(inc.blocks().all_received());
    assert_peer_sees(inc.blocks().get(a).unwrap(), 0, &da);
    assert_peer_sees(inc.blocks().get(b).unwrap(), 0, &db);
}

fn assert_illegal(r: postcopy_broker::Result<()>, from: PostcopyState, to: PostcopyState) {
    match r {
        Err(Error::IllegalTransition { from: f, to: t }) => {
            assert_eq!((f, t), (from, to));
            let msg = Error::IllegalTransition { from: f, to: t }.to_string();
            assert!(msg.contains(&from.to_string()) && msg.contains(&to.to_string()), "{msg}");
        }
        other => panic!("expected an illegal transition {from} -> {to}, got {other:?}"),
    }
}

fn fresh() -> Incoming {
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", 4 * PS).unwrap()).unwrap();
    Incoming::new(blocks)
}

#[test]
fn every_illegal_transition_through_incoming_is_refused_and_changes_nothing() {
    use PostcopyState as S;
    // From None.
    let mut inc = fresh();
    assert_illegal(inc.listen(), S::None, S::Listening);
    assert_illegal(inc.prepare_discard(), S::None, S::Discard);
    assert_illegal(inc.discard(0, 0, PS), S::None, S::Discard);
    assert_illegal(inc.run(), S::None, S::Running);
    assert_illegal(inc.cleanup(), S::None, S::End);
    assert_eq!(inc.state().get(), S::None);
    assert!(inc.uffd().is_none() && inc.placer().is_none());

    // From Advise.
    inc.advise().unwrap();
    assert_illegal(inc.advise(), S::Advise, S::Advise);
    assert_illegal(inc.run(), S::Advise, S::Running);
    assert_eq!(inc.state().get(), S::Advise);

    // From Discard.
    inc.prepare_discard().unwrap();
    assert_illegal(inc.advise(), S::Discard, S::Advise);
    assert_illegal(inc.run(), S::Discard, S::Running);
    assert_eq!(inc.state().get(), S::Discard);

    // From Listening.
    inc.listen().unwrap();
    assert_illegal(inc.listen(), S::Listening, S::Listening);
    assert_illegal(inc.advise(), S::Listening, S::Advise);
    assert_illegal(inc.prepare_discard(), S::Listening, S::Discard);
    assert_illegal(inc.discard(0, 0, PS), S::Listening, S::Discard);
    assert_eq!(inc.state().get(), S::Listening);
    assert!(inc.placer().is_some(), "a refused step keeps the placer");

    // From Running.
    inc.run().unwrap();
    assert_illegal(inc.run(), S::Running, S::Running);
    assert_illegal(inc.listen(), S::Running, S::Listening);
    assert_illegal(inc.advise(), S::Running, S::Advise);
    assert_illegal(inc.prepare_discard(), S::Running, S::Discard);
    assert_eq!(inc.state().get(), S::Running);

    // From End.
    inc.cleanup().unwrap();
    assert_eq!(inc.state().get(), S::End);
    assert!(inc.uffd().is_none() && inc.placer().is_none());
    assert_illegal(inc.cleanup(), S::End, S::End);
    assert_illegal(inc.advise(), S::End, S::Advise);
    assert_illegal(inc.listen(), S::End, S::Listening);
    assert_illegal(inc.run(), S::End, S::Running);
    assert_illegal(inc.prepare_discard(), S::End, S::Discard);
    assert_eq!(inc.state().get(), S::End);
}

#[test]
fn cleanup_is_legal_from_every_started_state() {
    use PostcopyState as S;
    let steps: [fn(&mut Incoming); 4] = [
        |i| i.advise().unwrap(),
        |i| i.prepare_discard().unwrap(),
        |i| i.listen().unwrap(),
        |i| i.run().unwrap(),
    ];
    for n in 1..=steps.len() {
        let mut inc = fresh();
        for s in &steps[..n] {
            s(&mut inc);
        }
        let before = inc.state().get();
        inc.cleanup().unwrap_or_else(|e| panic!("cleanup from {before}: {e}"));
        assert_eq!(inc.state().get(), S::End);
        assert!(inc.uffd().is_none());
    }
}

#[test]
fn placed_pages_survive_cleanup() {
    let mut inc = listening_memfd("ram", 4);
    let id = inc.blocks().named("ram").unwrap().0;
    let data = pattern(0x18, 4 * PS as usize);
    inc.placer().unwrap().place(inc.blocks(), id, 0, &data).unwrap();
    inc.run().unwrap();
    inc.cleanup().unwrap();
    let b = inc.blocks().get(id).unwrap();
    assert_eq!(read_block(b, 0, 4 * PS), data);
    assert_peer_sees(b, 0, &data);
}

type Log = Arc<Mutex<Vec<String>>>;

fn recorder(
    log: &Log,
    name: &'static str,
    fail_on: Option<NotifyReason>,
) -> postcopy_broker::notify::NotifyFn {
    let log = Arc::clone(log);
    Box::new(move |reason| {
        log.lock().unwrap().push(format!("{name}:{reason}"));
        if Some(reason) == fail_on {
            Err(format!("{name} cannot do {reason}"))
        } else {
            Ok(())
        }
    })
}

#[test]
fn a_failing_listen_notifier_fails_listen_and_ends_postcopy() {
    let log = Log::default();
    let mut inc = fresh();
    inc.notifiers_mut().add("ok", recorder(&log, "ok", None));
    inc.notifiers_mut().add("backend", recorder(&log, "backend", Some(NotifyReason::InboundListen)));
    inc.notifiers_mut().add("after", recorder(&log, "after", None));
    inc.advise().unwrap();
    let e = inc.listen().unwrap_err();
    match &e {
        Error::Notifier { name, reason, message } => {
            assert_eq!((name.as_str(), *reason), ("backend", NotifyReason::InboundListen));
            assert_eq!(message, "backend cannot do InboundListen");
        }
        other => panic!("expected a notifier error, got {other:?}"),
    }
    assert_eq!(e.to_string(), "notifier 'backend' refused InboundListen: backend cannot do InboundListen");
    assert_eq!(inc.state().get(), PostcopyState::End, "a vetoed listen cleans up and ends postcopy");
    assert!(inc.uffd().is_none() && inc.placer().is_none());
    assert_eq!(
        *log.lock().unwrap(),
        [
            "ok:InboundAdvise",
            "backend:InboundAdvise",
            "after:InboundAdvise",
            "ok:InboundListen",
            "backend:InboundListen"
        ]
    );
    assert_illegal(inc.listen(), PostcopyState::End, PostcopyState::Listening);
}

#[test]
fn a_failing_advise_notifier_fails_advise_before_anything_is_discarded() {
    let log = Log::default();
    let mut inc = fresh();
    let veto = inc.notifiers_mut().add("veto", recorder(&log, "veto", Some(NotifyReason::InboundAdvise)));
    let (id, b) = inc.blocks().named("ram").unwrap();
    let data = pattern(0x19, PS as usize);
    write_mapping(&second_mapping(b), 0, &data);
    let e = inc.advise().unwrap_err();
    assert!(
        matches!(&e, Error::Notifier { name, reason: NotifyReason::InboundAdvise, .. } if name == "veto"),
        "{e}"
    );
    assert_eq!(inc.state().get(), PostcopyState::None);
    assert_peer_sees(inc.blocks().get(id).unwrap(), 0, &data);

    // Removed, the notifier no longer vetoes, and advise discards the RAM.
    assert!(inc.notifiers_mut().remove(veto));
    inc.advise().unwrap();
    assert_eq!(inc.state().get(), PostcopyState::Advise);
    inc.listen().unwrap();
    let b = inc.blocks().get(id).unwrap();
    let reader = spawn_reader(inc.blocks(), id, 0, PS);
    wait_for_fault(inc.uffd().unwrap(), b.host_addr(), PS);
    assert_still_blocked(&reader);
    inc.placer().unwrap().place_zero(inc.blocks(), id, 0, PS).unwrap();
    assert_eq!(finish(reader), vec![0u8; PS as usize]);
}

#[test]
fn a_failing_end_notifier_is_reported_but_postcopy_still_ends() {
    let log = Log::default();
    let mut inc = fresh();
    inc.notifiers_mut().add("end", recorder(&log, "end", Some(NotifyReason::InboundEnd)));
    inc.advise().unwrap();
    inc.listen().unwrap();
    inc.run().unwrap();
    let e = inc.cleanup().unwrap_err();
    assert!(matches!(&e, Error::Notifier { reason: NotifyReason::InboundEnd, .. }), "{e}");
    assert_eq!(inc.state().get(), PostcopyState::End);
    assert!(inc.uffd().is_none() && inc.placer().is_none());
}

#[test]
fn probe_passes_on_this_host_and_a_failing_probe_notifier_fails_it() {
    let log = Log::default();
    let mut inc = fresh();
    inc.notifiers_mut().add("ok", recorder(&log, "ok", None));
    inc.probe().unwrap();
    let veto =
        inc.notifiers_mut().add("no-pagefault", recorder(&log, "no-pagefault", Some(NotifyReason::Probe)));
    let e = inc.probe().unwrap_err();
    match &e {
        Error::Notifier { name, reason: NotifyReason::Probe, message } => {
            assert_eq!(name, "no-pagefault");
            assert_eq!(message, "no-pagefault cannot do Probe");
        }
        other => panic!("expected a Probe notifier error, got {other:?}"),
    }
    assert_eq!(inc.state().get(), PostcopyState::None, "probing changes no state");
    inc.notifiers_mut().remove(veto);
    inc.probe().unwrap();
    assert_eq!(*log.lock().unwrap(), ["ok:Probe", "ok:Probe", "no-pagefault:Probe", "ok:Probe"]);
}
