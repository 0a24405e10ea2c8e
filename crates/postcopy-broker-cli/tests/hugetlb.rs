//! hugetlbfs blocks (2 MiB pages) against the real kernel: placement, zero huge pages from the
//! zeroed staging page (hugetlbfs has no UFFDIO_ZEROPAGE), faults, discard, mixed page sizes.
//! Huge pages are reserved by raising vm.nr_hugepages (never lowered).

mod common;

use common::*;
use postcopy_broker::ram::{Backing, HUGE_2M};
use postcopy_broker::{Error, Placed, RamBlock, RamBlocks};

const HP: u64 = HUGE_2M;

/// A listening Incoming over one hugetlbfs block of `pages` 2 MiB pages.
fn listening_huge(name: &str, pages: u64) -> postcopy_broker::Incoming {
    ensure_free_huge_pages(16);
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::hugetlb(name, pages * HP, HP).unwrap()).unwrap();
    listening(blocks)
}

#[test]
fn a_huge_page_is_placed_atomically_and_seen_everywhere() {
    let inc = listening_huge("huge", 2);
    let (id, b) = inc.blocks().named("huge").unwrap();
    assert_eq!(b.backing(), &Backing::Hugetlb { page_size: HP });
    assert!((b.page_size(), b.pages(), b.is_hugetlb()) == (HP, 2, true));
    assert!(!b.zeropage_supported(), "hugetlbfs ranges have no UFFDIO_ZEROPAGE");

    // A thread touching the last byte of the second huge page waits for the whole huge page.
    let reader = spawn_reader(inc.blocks(), id, 2 * HP - 64, 64);
    wait_for_fault(inc.uffd().unwrap(), b.host_addr() + HP, HP);
    assert_still_blocked(&reader);
    assert!(!b.is_received(HP));

    let data = pattern(0x21, HP as usize);
    let placer = inc.placer().unwrap();
    assert_eq!(placer.place(inc.blocks(), id, HP, &data).unwrap(), Placed::Placed);
    assert_eq!(finish(reader), data[HP as usize - 64..]);
    assert!(b.is_received(HP) && !b.is_received(0));
    assert_eq!(read_block(b, HP, HP), data);
    assert_eq!(read_mapping(&second_mapping(b), HP, HP), data);
    assert_peer_sees(b, HP, &data);
    let c = placer.stats().counts();
    assert_eq!((c.data_pages, c.ioctls, c.foreign_pages), (1, 1, 0));
}

#[test]
fn a_zero_huge_page_is_copied_from_the_zeroed_staging_page() {
    let inc = listening_huge("huge", 3);
    let (id, b) = inc.blocks().named("huge").unwrap();
    let placer = inc.placer().unwrap();

    let reader = spawn_reader(inc.blocks(), id, 0, 4096);
    wait_for_fault(inc.uffd().unwrap(), b.host_addr(), HP);
    assert_still_blocked(&reader);
    assert_eq!(placer.place_zero(inc.blocks(), id, 0, HP).unwrap(), Placed::Placed);
    assert_eq!(finish(reader), vec![0u8; 4096]);

    // Two zero huge pages in one call: one UFFDIO_COPY per huge page.
    assert_eq!(placer.place_zero(inc.blocks(), id, HP, 2 * HP).unwrap(), Placed::Placed);
    assert!(inc.blocks().all_received());
    let zeros = vec![0u8; 3 * HP as usize];
    assert_eq!(read_block(b, 0, 3 * HP), zeros);
    assert_eq!(read_mapping(&second_mapping(b), 0, 3 * HP), zeros);
    assert_peer_sees(b, 0, &zeros);
    let c = placer.stats().counts();
    assert_eq!((c.zero_pages, c.data_pages, c.ioctls), (3, 0, 3));
    assert_eq!(c.zero_fallocated, 0, "hugetlbfs holes cannot be found with SEEK_DATA: copied");

    // Again on a present page: harmless.
    assert_eq!(placer.place_zero(inc.blocks(), id, HP, HP).unwrap(), Placed::AlreadyPresent);
    let c = placer.stats().counts();
    assert_eq!((c.already_present, c.zero_pages), (1, 3));
}

#[test]
fn a_run_of_huge_pages_is_one_ioctl() {
    let inc = listening_huge("huge", 2);
    let (id, b) = inc.blocks().named("huge").unwrap();
    let placer = inc.placer().unwrap();
    let data = pattern(0x31, 2 * HP as usize);
    assert_eq!(placer.place(inc.blocks(), id, 0, &data).unwrap(), Placed::Placed);
    assert_eq!(placer.stats().counts().ioctls, 1);
    assert_eq!(b.received().count_ones(), 2);
    assert_peer_sees(b, 0, &data);
}

#[test]
fn discarding_a_huge_page_makes_it_fault_again() {
    let inc = listening_huge("huge", 2);
    let (id, b) = inc.blocks().named("huge").unwrap();
    let placer = inc.placer().unwrap();
    let old = pattern(0x41, 2 * HP as usize);
    placer.place(inc.blocks(), id, 0, &old).unwrap();
    assert_peer_sees(b, 0, &old);

    let e = b.discard(0, 4096).unwrap_err();
    assert!(matches!(e, Error::BadRange { why: "not page aligned", .. }), "{e}");
    assert!(b.is_received(0), "a refused discard clears nothing");

    b.discard(HP, HP).unwrap();
    assert!(b.is_received(0) && !b.is_received(HP));
    let reader = spawn_reader(inc.blocks(), id, HP, 4096);
    wait_for_fault(inc.uffd().unwrap(), b.host_addr() + HP, HP);
    assert_still_blocked(&reader);
    let new = pattern(0x42, HP as usize);
    assert_eq!(placer.place(inc.blocks(), id, HP, &new).unwrap(), Placed::Placed);
    assert_eq!(finish(reader), new[..4096]);
    assert_peer_sees(b, HP, &new);
    assert_peer_sees(b, 0, &old[..HP as usize]);
    assert_eq!(placer.stats().counts().foreign_pages, 0);
}

#[test]
fn a_foreign_huge_page_is_detected_and_repaired() {
    ensure_free_huge_pages(16);
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::hugetlb("huge", 2 * HP, HP).unwrap()).unwrap();
    let mut inc = postcopy_broker::Incoming::new(blocks);
    inc.advise().unwrap();
    let (id, b) = inc.blocks().named("huge").unwrap();
    write_mapping(&second_mapping(b), HP + 100, b"behind the broker's back");
    inc.listen().unwrap();
    let b = inc.blocks().get(id).unwrap();
    let data = pattern(0x43, HP as usize);
    let placer = inc.placer().unwrap();
    assert_eq!(placer.place(inc.blocks(), id, HP, &data).unwrap(), Placed::Repaired);
    assert_eq!(placer.stats().counts().foreign_pages, 1);
    assert_peer_sees(b, HP, &data);
}

#[test]
fn memfd_and_hugetlb_blocks_share_one_userfaultfd() {
    ensure_free_huge_pages(16);
    let mut blocks = RamBlocks::new();
    let small = blocks.add(RamBlock::memfd("small", 16 * 4096).unwrap()).unwrap();
    let huge = blocks.add(RamBlock::hugetlb("huge", 2 * HP, HP).unwrap()).unwrap();
    assert_eq!(blocks.largest_page_size(), HP);
    let inc = listening(blocks);
    let placer = inc.placer().unwrap();
    let (bs, bh) = (inc.blocks().get(small).unwrap(), inc.blocks().get(huge).unwrap());
    assert!(bs.zeropage_supported() && !bh.zeropage_supported());

    let rs = spawn_reader(inc.blocks(), small, 4096, 4096);
    let rh = spawn_reader(inc.blocks(), huge, HP, 4096);
    wait_for_faults(inc.uffd().unwrap(), &[(bs.host_addr() + 4096, 4096), (bh.host_addr() + HP, HP)]);
    assert_still_blocked(&rs);
    assert_still_blocked(&rh);

    placer.place_zero(inc.blocks(), small, 0, 16 * 4096).unwrap();
    assert_eq!(finish(rs), vec![0u8; 4096]);
    assert_still_blocked(&rh);
    let data = pattern(0x44, HP as usize);
    placer.place(inc.blocks(), huge, HP, &data).unwrap();
    assert_eq!(finish(rh), data[..4096]);
    placer.place_zero(inc.blocks(), huge, 0, HP).unwrap();
    assert!(inc.blocks().all_received());
    let c = placer.stats().counts();
    assert_eq!((c.zero_pages, c.data_pages, c.ioctls), (17, 1, 3));
    assert_peer_sees(bh, 0, &[vec![0u8; HP as usize], data].concat());
}

#[test]
fn a_hugetlbfs_fd_from_elsewhere_must_be_given_its_page_size() {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    ensure_free_huge_pages(16);
    let flags = MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_HUGETLB | MemFdCreateFlag::MFD_HUGE_2MB;
    let fd = memfd_create(c"guest-huge", flags).unwrap();
    nix::unistd::ftruncate(&fd, (2 * HP) as i64).unwrap();
    let e = RamBlock::from_fd("h", fd.try_clone().unwrap(), 2 * HP, 4096).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)) && e.to_string().contains("pass 2097152"), "{e}");
    let e = RamBlock::from_fd("h", fd.try_clone().unwrap(), 4 * HP, HP).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)) && e.to_string().contains("less than the block size"), "{e}");
    let mut blocks = RamBlocks::new();
    let id = blocks.add(RamBlock::from_fd("h", fd, 2 * HP, HP).unwrap()).unwrap();
    let inc = listening(blocks);
    let b = inc.blocks().get(id).unwrap();
    assert!(b.is_hugetlb() && !b.zeropage_supported());
    let data = pattern(0x45, HP as usize);
    inc.placer().unwrap().place(inc.blocks(), id, HP, &data).unwrap();
    assert_peer_sees(b, HP, &data);
}

#[test]
fn huge_block_sizes_and_page_sizes_are_checked() {
    let e = RamBlock::hugetlb("h", HP + 4096, HP).unwrap_err();
    assert!(matches!(e, Error::InvalidSize { size, page_size: HP, .. } if size == HP + 4096), "{e}");
    assert!(e.to_string().contains("round the size up"), "{e}");
    let e = RamBlock::hugetlb("h", 0, HP).unwrap_err();
    assert!(matches!(e, Error::InvalidSize { .. }), "{e}");
    for ps in [4 << 20, 4096, 64 << 10, 0] {
        let e = RamBlock::hugetlb("h", 8 << 20, ps).unwrap_err();
        assert!(matches!(e, Error::UnsupportedPageSize { page_size, .. } if page_size == ps), "{e}");
        assert!(e.to_string().contains("postcopy-broker probe"), "{e}");
    }
}
