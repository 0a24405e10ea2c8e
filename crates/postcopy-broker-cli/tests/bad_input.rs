//! Bad input gets a typed error whose message says what to do, never a panic: wrong sizes,
//! unknown and duplicate block names, out-of-range and unaligned offsets, unsupported page sizes,
//! files on file systems where userfaultfd MISSING faults do not work.

use std::os::fd::OwnedFd;

use postcopy_broker::ram::SMALL_PAGE;
use postcopy_broker::{Error, RamBlock, RamBlocks};

const PS: u64 = SMALL_PAGE;

#[test]
fn sizes_that_are_not_whole_pages_are_rejected() {
    for size in [0, 1, PS - 1, PS + 1, 3 * PS + 100] {
        let e = RamBlock::memfd("ram", size).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidSize { block, size: s, page_size: PS } if block == "ram" && *s == size),
            "{e}"
        );
        assert!(e.to_string().contains("round the size up to a whole number of pages"), "{e}");
        let e = RamBlock::private("ram", size).unwrap_err();
        assert!(matches!(e, Error::InvalidSize { .. }), "{e}");
    }
}

#[test]
fn unknown_block_names_are_a_typed_error() {
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("pc.ram", 4 * PS).unwrap()).unwrap();
    let e = blocks.named("pc.rom").unwrap_err();
    assert!(matches!(&e, Error::UnknownBlock(n) if n == "pc.rom"), "{e}");
    assert!(e.to_string().contains("no RAM block named 'pc.rom'"), "{e}");
    assert!(blocks.by_name("").is_none());
    assert!(blocks.get(1).is_none());
}

#[test]
fn duplicate_and_malformed_names_are_rejected() {
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", 4 * PS).unwrap()).unwrap();
    let e = blocks.add(RamBlock::memfd("ram", 8 * PS).unwrap()).unwrap_err();
    assert!(matches!(&e, Error::DuplicateBlock(n) if n == "ram"), "{e}");
    assert!(e.to_string().contains("must be unique"), "{e}");
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks.get(0).unwrap().size(), 4 * PS, "the first block is kept");

    let e = RamBlock::memfd("a\0b", PS).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)) && e.to_string().contains("NUL"), "{e}");
    let e = RamBlock::private("", PS).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    let e = RamBlock::private(&"x".repeat(256), PS).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
}

#[test]
fn out_of_range_and_unaligned_ranges_are_rejected() {
    let b = RamBlock::memfd("ram", 4 * PS).unwrap();
    let cases: [(u64, u64, &str); 8] = [
        (0, 0, "out of range"),
        (4 * PS, PS, "out of range"),
        (3 * PS, 2 * PS, "out of range"),
        (0, 5 * PS, "out of range"),
        (u64::MAX - PS + 1, PS, "out of range"),
        (u64::MAX, u64::MAX, "out of range"),
        (1, PS, "not page aligned"),
        (0, PS + 1, "not page aligned"),
    ];
    for (offset, len, why) in cases {
        let e = b.check_range(offset, len).unwrap_err();
        assert!(matches!(&e, Error::BadRange { why: w, .. } if *w == why), "({offset}, {len}): {e}");
        let e = b.discard(offset, len).unwrap_err();
        assert!(matches!(&e, Error::BadRange { why: w, .. } if *w == why), "({offset}, {len}): {e}");
        assert!(e.to_string().contains("block size 16384, page size 4096"), "{e}");
    }
    b.check_range(3 * PS, PS).unwrap();
    b.check_range(0, 4 * PS).unwrap();
}

#[test]
fn unsupported_page_sizes_are_rejected() {
    for ps in [4 << 20, 8192, 1 << 21 | 1] {
        let e = RamBlock::hugetlb("h", 8 << 20, ps).unwrap_err();
        assert!(matches!(e, Error::UnsupportedPageSize { page_size, .. } if page_size == ps), "{e}");
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let e = RamBlock::from_fd("h", fd, 8 << 20, ps).unwrap_err();
        assert!(matches!(e, Error::UnsupportedPageSize { .. }), "{e}");
        assert!(e.to_string().contains("postcopy-broker probe"), "{e}");
    }
}

#[test]
fn a_foreign_fd_must_be_large_enough_shared_memory_of_the_given_page_size() {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd: OwnedFd = memfd_create(c"short", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&fd, (4 * PS) as i64).unwrap();
    // Larger than the memfd: accesses past its end would SIGBUS, placements would EFAULT.
    let e = RamBlock::from_fd("short", fd.try_clone().unwrap(), 8 * PS, PS).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    assert!(e.to_string().contains("holds 16384 bytes, less than the block size 32768"), "{e}");
    let e = RamBlock::from_fd("short", fd.try_clone().unwrap(), 4 * PS + 1, PS).unwrap_err();
    assert!(matches!(e, Error::InvalidSize { .. }), "{e}");
    let b = RamBlock::from_fd("short", fd, 2 * PS, PS).unwrap();
    assert_eq!(b.size(), 2 * PS);

    // Not shared memory at all.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("pcb-disk-fd-{}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(4 * PS).unwrap();
    let _ = std::fs::remove_file(&path);
    let e = RamBlock::from_fd("disk", file.into(), 4 * PS, PS).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)) && e.to_string().contains("memfd"), "{e}");
}

#[test]
fn a_file_block_off_tmpfs_is_rejected_with_advice() {
    // The cargo target directory is on the worktree's disk file system, not on tmpfs.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let st = nix::sys::statfs::statfs(dir).unwrap();
    assert_ne!(st.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC, "this test needs a non-tmpfs directory");
    let path = dir.join(format!("pcb-not-tmpfs-{}", std::process::id()));
    let r = RamBlock::file("f", &path, 4 * PS);
    let _ = std::fs::remove_file(&path);
    let e = r.unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("tmpfs") && msg.contains("/dev/shm"), "{msg}");
}

#[test]
fn a_file_block_with_a_bad_size_or_path_is_rejected() {
    let path = std::path::PathBuf::from(format!("/dev/shm/pcb-test-{}-bad-size", std::process::id()));
    let r = RamBlock::file("f", &path, PS + 1);
    let _ = std::fs::remove_file(&path);
    assert!(matches!(r.unwrap_err(), Error::InvalidSize { .. }));
    let e = RamBlock::file("f", std::path::Path::new("/dev/shm/no/such/dir/ram"), PS).unwrap_err();
    assert!(matches!(&e, Error::Io { .. }) && e.to_string().contains("/dev/shm/no/such/dir/ram"), "{e}");
}
