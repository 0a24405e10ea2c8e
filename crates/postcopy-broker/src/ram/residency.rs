//! Which pages of a block's shared backing are present in the page cache: how a broker that
//! restarted during postcopy rebuilds its received bitmap from the parked block fds. Placement
//! is atomic (a page appears whole through UFFDIO_COPY / UFFDIO_ZEROPAGE, or a fallocate of a
//! zero page), so a present page is a complete page, and a hole is a page that never arrived.
//!
//! The probe that decides: the block is mapped once more, registered with a userfaultfd of its
//! own with `UFFD_FEATURE_SIGBUS` (a missing fault fails instead of waiting), and a page is
//! populated with `MADV_POPULATE_READ`: a present page maps, a hole returns EFAULT without
//! allocating anything. Exactly what a client's fault would find.
//!
//! - Small-page memfds (tmpfs): `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)` (on a fresh open of the
//!   fd, `/proc/self/fd/N`, so that the file position of the description shared with the VMM
//!   and the clients does not move) finds the written pages at once (swapped-out pages count
//!   as data, as they should); only the pages in its holes are probed, because a zero page
//!   allocated with fallocate is present (a client reads it without a fault) but not yet
//!   "uptodate", and SEEK_DATA (like mincore) reports it as a hole.
//! - hugetlbfs: SEEK_DATA reports everything as data there, and mincore reports page table
//!   entries, not the page cache: every huge page is probed.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use super::{Mapping, RamBlock, SMALL_PAGE};
use crate::conv::usize_of;
use crate::error::{Error, IoContext, Result};
use crate::uffd::{feature, Uffd};

/// Set the received bit of every page of `b` that is present in its backing; returns how many.
/// For a block whose backing is still unregistered by this process (before `listen`).
pub fn mark_present(b: &RamBlock) -> Result<u64> {
    let fd = b.fd().ok_or_else(|| {
        Error::Invalid(format!("block '{}' has no shared backing: nothing to rebuild from", b.name()))
    })?;
    let ps = b.page_size();
    let runs = if ps == SMALL_PAGE {
        data_runs(fd, b.size()).and_then(|data| {
            let holes = gaps(&data, b.size());
            let mut runs = data;
            runs.extend(probe_present(fd, b.size(), ps, &holes)?);
            Ok(runs)
        })
    } else {
        probe_present(fd, b.size(), ps, &[(0, b.size())])
    }
    .ctx(|| format!("find the pages present in block '{}'", b.name()))?;
    let mut n = 0;
    for (off, len) in runs {
        let (first, pages) = (usize_of(off / ps), usize_of(len / ps));
        b.received().set_range(first, pages);
        n += len / ps;
    }
    Ok(n)
}

/// The data runs `(offset, len)` of a tmpfs file up to `size`, page aligned.
fn data_runs(fd: BorrowedFd<'_>, size: u64) -> io::Result<Vec<(u64, u64)>> {
    // A description of our own: lseek moves its position, not the shared one's.
    let own = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let seek = |off: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: lseek on a valid fd with integer arguments.
        let r = unsafe { libc::lseek(own.as_fd().as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after `off`.
            return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
        }
        Ok(u64::try_from(r).ok())
    };
    let mut runs = Vec::new();
    let mut at = 0;
    while at < size {
        let Some(start) = seek(at, libc::SEEK_DATA)? else { break };
        if start >= size {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        let (s, e) = (start / SMALL_PAGE * SMALL_PAGE, end.div_ceil(SMALL_PAGE) * SMALL_PAGE);
        runs.push((s, e.min(size) - s));
        at = end;
    }
    Ok(runs)
}

/// The complement of sorted, disjoint `runs` in `[0, size)`.
fn gaps(runs: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    for &(s, l) in runs {
        if s > at {
            out.push((at, s - at));
        }
        at = at.max(s + l);
    }
    if at < size {
        out.push((at, size - at));
    }
    out
}

/// The present pages of `ranges` of a shared file (see the module doc), as runs.
fn probe_present(
    fd: BorrowedFd<'_>,
    size: u64,
    ps: u64,
    ranges: &[(u64, u64)],
) -> io::Result<Vec<(u64, u64)>> {
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    let map = Mapping::shared(fd, usize_of(size)).map_err(io::Error::other)?;
    let missing = if ps == SMALL_PAGE { feature::MISSING_SHMEM } else { feature::MISSING_HUGETLBFS };
    let u = Uffd::open(missing | feature::SIGBUS)?;
    u.register_missing(map.addr(), size)?;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for off in ranges.iter().flat_map(|&(s, l)| (s..s + l).step_by(usize_of(ps))) {
        // SAFETY: the range lies inside our own mapping; MADV_POPULATE_READ only maps pages (a
        // missing one fails with EFAULT through the SIGBUS feature instead of allocating).
        let r = unsafe {
            libc::madvise(map.as_ptr().add(usize_of(off)).cast(), usize_of(ps), libc::MADV_POPULATE_READ)
        };
        if r == 0 {
            match runs.last_mut() {
                Some((s, l)) if *s + *l == off => *l += ps,
                _ => runs.push((off, ps)),
            }
            continue;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EFAULT) {
            return Err(e);
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::HUGE_2M;

    fn write(b: &RamBlock, page: u64, byte: u8) {
        let ps = b.page_size();
        // SAFETY: the page lies in the block's placement mapping, which no userfaultfd watches.
        unsafe { std::ptr::write_bytes(b.host_ptr().add(usize_of(page * ps)), byte, usize_of(ps)) };
    }

    fn rebuilt(b: &RamBlock) -> Vec<usize> {
        let fresh = RamBlock::from_fd(
            b.name(),
            b.fd().unwrap().try_clone_to_owned().unwrap(),
            b.size(),
            b.page_size(),
        )
        .unwrap();
        mark_present(&fresh).unwrap();
        (0..fresh.received().len()).filter(|&i| fresh.received().test(i)).collect()
    }

    #[test]
    fn small_pages_present_are_found_and_holes_are_not() {
        let b = RamBlock::memfd("r", 64 * 4096).unwrap();
        for p in [0, 1, 2, 17, 63] {
            write(&b, p, 0x5a);
        }
        write(&b, 30, 0); // a zero page that is present is received too
                          // Zero pages allocated with fallocate (as zero runs are placed), never written: SEEK_DATA
                          // calls them holes, but a client reads them without a fault.
        let fd = b.fd().unwrap();
        nix::fcntl::fallocate(
            fd.as_raw_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            40 * 4096,
            3 * 4096,
        )
        .unwrap();
        assert_eq!(rebuilt(&b), vec![0, 1, 2, 17, 30, 40, 41, 42, 63]);
        assert_eq!(rebuilt(&b), vec![0, 1, 2, 17, 30, 40, 41, 42, 63], "the check itself allocated no page");
    }

    #[test]
    fn gaps_complement_the_runs() {
        assert_eq!(gaps(&[], 10), vec![(0, 10)]);
        assert_eq!(gaps(&[(0, 2), (5, 1)], 10), vec![(2, 3), (6, 4)]);
        assert_eq!(gaps(&[(0, 10)], 10), vec![]);
    }

    #[test]
    fn huge_pages_present_are_found_without_allocating_the_holes() {
        crate::ram::huge_pool(HUGE_2M)
            .filter(|p| p.available() >= 8)
            .expect("8 free 2 MiB huge pages (scripts/setup.sh)");
        let b = RamBlock::hugetlb("h", 8 * HUGE_2M, HUGE_2M).unwrap();
        write(&b, 1, 7);
        write(&b, 2, 0);
        write(&b, 7, 9);
        assert_eq!(rebuilt(&b), vec![1, 2, 7]);
        assert_eq!(rebuilt(&b), vec![1, 2, 7], "the check itself allocated no page");
    }
}
