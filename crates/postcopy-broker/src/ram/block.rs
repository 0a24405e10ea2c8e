//! One RAM block: its backing (memfd, hugetlbfs memfd, shared file or private anonymous memory),
//! the broker's placement mapping of it, and its received and removed bitmaps (in a ledger
//! memfd for shared blocks, see `ram::ledger`, so that they can outlive the broker).

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{fallocate, FallocateFlags};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{madvise, MmapAdvise};
use serde::Serialize;

use super::bitmap::AtomicBitmap;
use super::ledger::Ledger;
use super::mapping::Mapping;
use crate::error::{Error, IoContext, Result};

/// The small page size of this architecture.
pub const SMALL_PAGE: u64 = 4096;
/// The 2 MiB huge page size.
pub const HUGE_2M: u64 = 2 << 20;
/// The 1 GiB huge page size.
pub const HUGE_1G: u64 = 1 << 30;

/// What memory backs a block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Backing {
    /// A memfd of small pages.
    Memfd,
    /// A hugetlbfs memfd of `page_size` pages.
    Hugetlb {
        /// 2 MiB or 1 GiB.
        page_size: u64,
    },
    /// A shared file on tmpfs or hugetlbfs.
    File {
        /// The file's path.
        path: PathBuf,
    },
    /// A memfd received from another process (for example the VMM's guest RAM).
    Fd,
    /// Private anonymous memory: only the broker sees it.
    Private,
}

/// A named region of guest RAM.
#[derive(Debug)]
pub struct RamBlock {
    name: String,
    backing: Backing,
    fd: Option<OwnedFd>,
    size: u64,
    page_size: u64,
    map: Mapping,
    received: AtomicBitmap,
    /// Pages a placer is placing right now (claimed before the ioctl, released after the
    /// received bit is set), so two placing threads never fill the same page.
    placing: AtomicBitmap,
    /// Pages a client removed (MADV_REMOVE / DONTNEED, a REMOVE event) before they were
    /// received: they must appear as zeros, not as the source's data, whichever placer fills them.
    removed: AtomicBitmap,
    /// The memfd under `received` and `removed` (shared blocks only).
    ledger: Option<OwnedFd>,
    zeropage: AtomicBool,
    /// Whether zero runs over holes may be allocated with fallocate (fd-backed small pages,
    /// until the filesystem refuses).
    falloc_zero: AtomicBool,
}

fn check_size(name: &str, size: u64, page_size: u64) -> Result<()> {
    if size == 0 || size % page_size != 0 {
        return Err(Error::InvalidSize { block: name.to_string(), size, page_size });
    }
    Ok(())
}

fn huge_flag(page_size: u64) -> Result<MemFdCreateFlag> {
    // MFD_HUGE_SHIFT is 26: the log2 of the page size goes in bits 26..31.
    let bits = match page_size {
        HUGE_2M => 21u32 << 26,
        HUGE_1G => 30u32 << 26,
        _ => {
            return Err(Error::UnsupportedPageSize {
                page_size,
                why: "hugetlbfs blocks take 2 MiB or 1 GiB pages".into(),
            })
        }
    };
    Ok(MemFdCreateFlag::MFD_HUGETLB | MemFdCreateFlag::from_bits_retain(bits))
}

/// statfs magic numbers of the file systems where MISSING faults work on shared files.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

impl RamBlock {
    fn build(
        name: &str,
        backing: Backing,
        fd: Option<OwnedFd>,
        size: u64,
        page_size: u64,
    ) -> Result<RamBlock> {
        Self::build_with(name, backing, fd, None, size, page_size)
    }

    /// `build`, with the ledger a broker before this one parked (shared blocks only).
    fn build_with(
        name: &str,
        backing: Backing,
        fd: Option<OwnedFd>,
        parked_ledger: Option<OwnedFd>,
        size: u64,
        page_size: u64,
    ) -> Result<RamBlock> {
        check_size(name, size, page_size)?;
        if name.is_empty() || name.len() > 255 {
            return Err(Error::Invalid(format!("RAM block name '{name}' must be 1 to 255 bytes")));
        }
        let len = usize::try_from(size).map_err(|_| Error::Invalid(format!("block '{name}' too large")))?;
        let map = match &fd {
            // A hugetlbfs block reserves its whole pool share now, so placement never finds the
            // pool empty (see `hugepool`); small pages are allocated as they are placed.
            Some(fd) if page_size > SMALL_PAGE => {
                Mapping::shared_reserved(fd.as_fd(), len).map_err(|e| pool_error(name, size, page_size, e))?
            }
            Some(fd) => Mapping::shared(fd.as_fd(), len)?,
            None => Mapping::private(len)?,
        };
        let pages = usize::try_from(size / page_size).map_err(|_| Error::Invalid("too many pages".into()))?;
        // hugetlbfs reports every offset as data to SEEK_DATA, so holes cannot be told apart.
        let falloc_zero = fd.is_some() && page_size == SMALL_PAGE;
        // Shared blocks keep their bitmaps in a memfd that can be parked with theirs.
        let (received, removed, ledger) = match fd {
            Some(_) => {
                let l = Ledger::open(name, pages, parked_ledger)?;
                (l.received, l.removed, Some(l.fd))
            }
            None => (AtomicBitmap::new(pages), AtomicBitmap::new(pages), None),
        };
        Ok(RamBlock {
            name: name.to_string(),
            backing,
            fd,
            size,
            page_size,
            map,
            received,
            placing: AtomicBitmap::new(pages),
            removed,
            ledger,
            zeropage: AtomicBool::new(false),
            falloc_zero: AtomicBool::new(falloc_zero),
        })
    }

    /// A block backed by a new memfd of 4 KiB pages.
    pub fn memfd(name: &str, size: u64) -> Result<RamBlock> {
        check_size(name, size, SMALL_PAGE)?;
        let fd = new_memfd(name, MemFdCreateFlag::MFD_CLOEXEC, size)?;
        Self::build(name, Backing::Memfd, Some(fd), size, SMALL_PAGE)
    }

    /// A block backed by a new hugetlbfs memfd of `page_size` pages (huge pages must be reserved).
    pub fn hugetlb(name: &str, size: u64, page_size: u64) -> Result<RamBlock> {
        let flag = huge_flag(page_size)?;
        check_size(name, size, page_size)?;
        let fd = new_memfd(name, MemFdCreateFlag::MFD_CLOEXEC | flag, size).map_err(|e| match e {
            Error::Io { source, .. } => Error::UnsupportedPageSize {
                page_size,
                why: format!(
                    "hugetlbfs memfd failed ({source}); reserve pages with echo N > /proc/sys/vm/nr_hugepages"
                ),
            },
            other => other,
        })?;
        Self::build(name, Backing::Hugetlb { page_size }, Some(fd), size, page_size)
    }

    /// A block backed by a file on tmpfs or hugetlbfs (created or grown to `size`).
    pub fn file(name: &str, path: &Path, size: u64) -> Result<RamBlock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .ctx(|| format!("open RAM file {}", path.display()))?;
        let page_size = shared_page_size(file.as_fd()).ctx(|| format!("statfs {}", path.display()))?.ok_or_else(|| {
            Error::Invalid(format!(
                "{}: userfaultfd MISSING faults work only on tmpfs or hugetlbfs files; put the file under /dev/shm or a hugetlbfs mount",
                path.display()
            ))
        })?;
        check_size(name, size, page_size)?;
        if file.metadata().ctx(|| format!("stat {}", path.display()))?.len() < size {
            file.set_len(size).ctx(|| format!("grow {} to {size}", path.display()))?;
        }
        Self::build(name, Backing::File { path: path.to_path_buf() }, Some(file.into()), size, page_size)
    }

    /// A block over a memfd received from elsewhere (its page size must be given). The fd must be
    /// shared memory (tmpfs or hugetlbfs) of that page size holding at least `size` bytes, so that
    /// no access to the block can run past its end (SIGBUS).
    pub fn from_fd(name: &str, fd: OwnedFd, size: u64, page_size: u64) -> Result<RamBlock> {
        Self::from_parked(name, fd, None, size, page_size)
    }

    /// [`RamBlock::from_fd`] for a block a broker before this one served: `ledger` is the memfd
    /// it parked beside the block's ([`RamBlock::ledger_fd`]), whose received and removed bits
    /// this block starts from (None: all clear).
    pub fn from_parked(
        name: &str,
        fd: OwnedFd,
        ledger: Option<OwnedFd>,
        size: u64,
        page_size: u64,
    ) -> Result<RamBlock> {
        if page_size != SMALL_PAGE {
            huge_flag(page_size)?;
        }
        check_size(name, size, page_size)?;
        let what = || format!("inspect the fd of RAM block '{name}'");
        let actual = shared_page_size(fd.as_fd()).ctx(what)?.ok_or_else(|| {
            Error::Invalid(format!(
                "the fd of RAM block '{name}' is not shared memory on tmpfs or hugetlbfs; pass a memfd (memfd_create) or a file under /dev/shm or a hugetlbfs mount"
            ))
        })?;
        if actual != page_size {
            return Err(Error::Invalid(format!(
                "the fd of RAM block '{name}' has {actual}-byte pages but page size {page_size} was given; pass {actual}"
            )));
        }
        let len = u64::try_from(nix::sys::stat::fstat(fd.as_raw_fd()).ctx(what)?.st_size).unwrap_or(0);
        if len < size {
            return Err(Error::Invalid(format!(
                "the fd of RAM block '{name}' holds {len} bytes, less than the block size {size}; pass the size it was created with, or grow it first"
            )));
        }
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        if seals(fd.as_fd()) & want != want && add_seals(fd.as_fd(), want).is_err() {
            log::warn!(
                "the fd of RAM block '{name}' cannot be sealed against resizing (create it with MFD_ALLOW_SEALING): a process that truncates it makes the others' accesses fail with SIGBUS"
            );
        }
        Self::build_with(name, Backing::Fd, Some(fd), ledger, size, page_size)
    }

    /// A block of private anonymous memory (4 KiB pages).
    pub fn private(name: &str, size: u64) -> Result<RamBlock> {
        Self::build(name, Backing::Private, None, size, SMALL_PAGE)
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Backing.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }
    /// The backing fd, for sharing with clients (None for private memory).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }
    /// The memfd holding the received and removed bitmaps, to park beside [`RamBlock::fd`] so
    /// that a restarted broker starts from them ([`RamBlock::from_parked`]; None for private
    /// memory).
    pub fn ledger_fd(&self) -> Option<BorrowedFd<'_>> {
        self.ledger.as_ref().map(|f| f.as_fd())
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.size / self.page_size
    }
    /// Start of the broker's placement mapping.
    pub fn host_addr(&self) -> u64 {
        self.map.addr()
    }
    /// The placement mapping's base pointer.
    pub fn host_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }
    /// The received bitmap (one bit per page).
    pub fn received(&self) -> &AtomicBitmap {
        &self.received
    }
    /// Pages being placed at this moment (see [`crate::place::Placer`]).
    pub(crate) fn placing(&self) -> &AtomicBitmap {
        &self.placing
    }
    /// Pages removed by a client before they were received (see [`crate::place::Placer`]: they
    /// are placed as zeros, and a page that took the source's data while a removal raced with
    /// its placement is punched out again).
    pub fn removed(&self) -> &AtomicBitmap {
        &self.removed
    }
    /// Whether the page at `offset` has been received.
    pub fn is_received(&self, offset: u64) -> bool {
        self.received.test(self.page_index(offset))
    }
    /// Page index of a byte offset.
    pub fn page_index(&self, offset: u64) -> usize {
        usize::try_from(offset / self.page_size).unwrap_or(usize::MAX)
    }
    /// Whether the placement range may use UFFDIO_ZEROPAGE (recorded at registration).
    pub fn zeropage_supported(&self) -> bool {
        self.zeropage.load(Ordering::Acquire)
    }
    pub(crate) fn set_zeropage_supported(&self, v: bool) {
        self.zeropage.store(v, Ordering::Release)
    }
    /// Whether the backing uses huge pages.
    pub fn is_hugetlb(&self) -> bool {
        self.page_size > SMALL_PAGE
    }

    /// Make the pages of `[offset, offset+len)` zero pages without any process faulting on them
    /// again, if the range is a hole of the backing file: fallocate puts pages in the page cache
    /// (shmem clears each page on its first access, under the page lock, so nobody sees a
    /// partial page), which costs about half of UFFDIO_ZEROPAGE's allocate-clear-map. Returns
    /// false, having done nothing, when the block has no fd, the range holds data (possibly a
    /// foreign page: the caller's userfaultfd placement detects it), or the filesystem refuses
    /// (then the block stops trying). Waiters are not woken and received bits are not set.
    pub(crate) fn allocate_zero_hole(&self, offset: u64, len: u64) -> Result<bool> {
        if !self.falloc_zero.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let Some(fd) = &self.fd else { return Ok(false) };
        let (o, l) = (to_off(offset)?, to_off(len)?);
        // SAFETY: lseek on an fd this block owns; it moves only the file offset, which nothing
        // else uses (all access is through mappings).
        let data = unsafe { libc::lseek(fd.as_raw_fd(), o, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENXIO) {
                self.falloc_zero.store(false, Ordering::Relaxed);
                log::debug!(
                    "block '{}': SEEK_DATA fails ({e}); zero pages go through the userfaultfd",
                    self.name
                );
                return Ok(false);
            }
        } else if data < o + l {
            return Ok(false);
        }
        match fallocate(fd.as_raw_fd(), FallocateFlags::FALLOC_FL_KEEP_SIZE, o, l) {
            Ok(()) => Ok(true),
            Err(e @ (nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL | nix::errno::Errno::ENODEV)) => {
                self.falloc_zero.store(false, Ordering::Relaxed);
                log::debug!("block '{}': fallocate fails ({e}); zero pages go through the userfaultfd", self.name);
                Ok(false)
            }
            Err(e) => Err(Error::io(
                format!(
                    "allocate zero pages of block '{}' at {offset:#x}+{len:#x} (for hugetlbfs blocks, reserve more huge pages in /proc/sys/vm/nr_hugepages)",
                    self.name
                ),
                std::io::Error::from(e),
            )),
        }
    }

    /// Check that `[offset, offset+len)` is inside the block and page aligned.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let bad = |why| Error::BadRange {
            block: self.name.clone(),
            offset,
            len,
            size: self.size,
            page_size: self.page_size,
            why,
        };
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(bad("out of range"));
        }
        if offset % self.page_size != 0 || len % self.page_size != 0 {
            return Err(bad("not page aligned"));
        }
        Ok(())
    }

    /// Discard `[offset, offset+len)`: clear the received bits, then drop the pages from the
    /// backing (fallocate PUNCH_HOLE for fd-backed blocks, which zaps every process's mapping;
    /// MADV_DONTNEED for private memory). Afterwards the pages fault again.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.received.clear_range(self.page_index(offset), self.page_index(len));
        self.punch(offset, len)
    }

    /// Drop the pages of `[offset, offset+len)` from the backing (every mapper faults on them
    /// again) without touching the received bits; hugetlbfs blocks take their reservation again.
    pub(crate) fn punch(&self, offset: u64, len: u64) -> Result<()> {
        let what = || format!("discard of block '{}' offset {offset:#x} len {len:#x}", self.name);
        match &self.fd {
            Some(fd) => {
                let (o, l) = (to_off(offset)?, to_off(len)?);
                fallocate(
                    fd.as_raw_fd(),
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    o,
                    l,
                )
                .ctx(what)?;
                self.reserve_again(offset, len)?;
            }
            None => self.advise(offset, len, MmapAdvise::MADV_DONTNEED).ctx(what)?,
        }
        Ok(())
    }

    /// A hole punched into a hugetlbfs file gives up the range's pool reservation with its
    /// pages; mapping the range once more without MAP_NORESERVE takes it again (reservations
    /// belong to the file and outlive the mapping), so placement there cannot meet an empty pool.
    fn reserve_again(&self, offset: u64, len: u64) -> Result<()> {
        let Some(fd) = self.fd.as_ref().filter(|_| self.is_hugetlb()) else { return Ok(()) };
        let (o, l) = (to_off(offset)?, to_usize(len)?);
        let Some(n) = std::num::NonZeroUsize::new(l) else { return Ok(()) };
        // SAFETY: a fresh mapping chosen by the kernel aliases no Rust object; it is unmapped
        // right away and nothing reads or writes it.
        let p = unsafe {
            nix::sys::mman::mmap(
                None,
                n,
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_SHARED,
                fd.as_fd(),
                o,
            )
        }
        .map_err(|e| {
            pool_error(
                &self.name,
                len,
                self.page_size,
                Error::io("reserve huge pages", std::io::Error::from(e)),
            )
        })?;
        // SAFETY: p and l describe exactly the mapping made above.
        if let Err(e) = unsafe { nix::sys::mman::munmap(p, l) } {
            log::warn!("munmap of a reservation mapping failed: {e}");
        }
        Ok(())
    }

    /// The next range of `[from, end)` that holds data in the backing file (SEEK_DATA, then
    /// SEEK_HOLE), or None. None as well where holes cannot be seen (hugetlbfs reports every
    /// offset as data, private memory has no file): see [`RamBlock::holes_visible`].
    pub(crate) fn next_data(&self, from: u64, end: u64) -> Result<Option<(u64, u64)>> {
        let Some(fd) = self.fd.as_ref().filter(|_| self.holes_visible()) else { return Ok(None) };
        let seek = |pos: u64, whence| -> Result<Option<u64>> {
            // SAFETY: lseek on an fd this block owns; it moves only the file offset, which
            // nothing else uses (all access is through mappings).
            let r = unsafe { libc::lseek(fd.as_raw_fd(), to_off(pos)?, whence) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::ENXIO) => Ok(None),
                    _ => Err(Error::io(format!("seek the data of block '{}'", self.name), e)),
                };
            }
            Ok(Some(u64::try_from(r).unwrap_or(u64::MAX)))
        };
        let Some(data) = seek(from, libc::SEEK_DATA)?.filter(|&d| d < end) else { return Ok(None) };
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        Ok(Some((data, hole)))
    }

    /// Whether SEEK_DATA/SEEK_HOLE tell holes from data in this block's backing (memfd and tmpfs
    /// files; not hugetlbfs).
    pub fn holes_visible(&self) -> bool {
        self.fd.is_some() && !self.is_hugetlb()
    }

    /// Pages allocated in the backing file (st_blocks), whoever allocated them; 0 for private
    /// memory. Exact on tmpfs and hugetlbfs, also for pages allocated by fallocate.
    pub fn allocated_pages(&self) -> Result<u64> {
        let Some(fd) = &self.fd else { return Ok(0) };
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).ctx(|| format!("fstat block '{}'", self.name))?;
        let bytes = u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512);
        Ok(bytes / self.page_size)
    }

    /// Make `[offset, offset+len)` present zero pages through the placement mapping
    /// (MADV_POPULATE_WRITE), so that "received" always means "present": a received page that is
    /// a hole makes every registered process fault on it, and the fault finds it received. Only
    /// before the block is registered with a userfaultfd (precopy), since the population faults
    /// like any access.
    pub(crate) fn populate_zero(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        // MADV_POPULATE_WRITE (Linux 5.14) allocates and maps zeroed pages without writing them
        // from user space; nix does not name it.
        let (o, l) = (to_usize(offset)?, to_usize(len)?);
        // SAFETY: the range lies inside this block's own live mapping (checked above); no Rust
        // reference points into it.
        let r = unsafe { libc::madvise(self.map.as_ptr().add(o).cast(), l, libc::MADV_POPULATE_WRITE) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOMEM) if self.is_hugetlb() => Error::HugePagePool {
                    block: self.name.clone(),
                    why: super::hugepool::shortfall(self.page_size, len / self.page_size),
                },
                _ => Error::io(
                    format!("populate zero pages of block '{}' at {offset:#x}+{len:#x}", self.name),
                    e,
                ),
            });
        }
        Ok(())
    }

    /// madvise a range of the placement mapping.
    pub(crate) fn advise(&self, offset: u64, len: u64, advice: MmapAdvise) -> nix::Result<()> {
        let (o, l) = (usize::try_from(offset).unwrap_or(usize::MAX), usize::try_from(len).unwrap_or(0));
        if o.checked_add(l).is_none_or(|e| e > self.map.len()) {
            return Err(nix::errno::Errno::EINVAL);
        }
        // SAFETY: the range lies inside this block's own mapping; advice does not invalidate
        // Rust references because none are handed out into this memory.
        let p = unsafe { std::ptr::NonNull::new_unchecked(self.map.as_ptr().add(o)) };
        // SAFETY: see above: the range is inside the live mapping.
        unsafe { madvise(p.cast(), l, advice) }
    }

    /// Whether the page at `offset` is present in the backing (mincore on the placement mapping;
    /// it never populates anything).
    pub fn is_resident(&self, offset: u64) -> bool {
        let page = offset / self.page_size * self.page_size;
        let Ok(o) = usize::try_from(page) else { return false };
        if o >= self.map.len() {
            return false;
        }
        let mut vec = [0u8; 1];
        // SAFETY: the range [o, o+4096) lies inside this block's live mapping and `vec` has room
        // for the one page mincore reports on.
        let r = unsafe { libc::mincore(self.map.as_ptr().add(o).cast(), 4096, vec.as_mut_ptr()) };
        r == 0 && vec[0] & 1 != 0
    }

    /// Switch transparent huge pages off (before discards and registration) or back on.
    pub(crate) fn set_thp(&self, enabled: bool) -> Result<()> {
        if self.is_hugetlb() {
            return Ok(());
        }
        let advice = if enabled { MmapAdvise::MADV_HUGEPAGE } else { MmapAdvise::MADV_NOHUGEPAGE };
        match self.advise(0, self.size, advice) {
            Ok(()) => Ok(()),
            // Kernels without THP refuse the advice; that is what we want anyway.
            Err(nix::errno::Errno::EINVAL) => Ok(()),
            Err(e) => Err(e).ctx(|| format!("madvise THP on block '{}'", self.name)),
        }
    }
}

/// The page size of shared memory behind `fd`: 4 KiB on tmpfs (memfds included), the huge page
/// size on hugetlbfs; None on file systems where userfaultfd MISSING faults do not work.
/// The page size of the shared memory `fd` (a memfd, or a file on tmpfs or hugetlbfs), to make
/// a block of it with [`RamBlock::from_fd`]; an error for any other kind of file.
pub fn shared_memory_page_size(fd: BorrowedFd<'_>) -> Result<u64> {
    shared_page_size(fd).ctx(|| "statfs of a guest memory fd".into())?.ok_or_else(|| {
        Error::Invalid(
            "guest memory fd is not shared memory on tmpfs or hugetlbfs; use a memfd (memfd_create) \
             or a file under /dev/shm or a hugetlbfs mount"
                .into(),
        )
    })
}

fn shared_page_size(fd: BorrowedFd<'_>) -> nix::Result<Option<u64>> {
    let st = nix::sys::statfs::fstatfs(fd)?;
    #[allow(clippy::unnecessary_cast)]
    let magic = st.filesystem_type().0 as i64;
    Ok(match magic {
        TMPFS_MAGIC => Some(SMALL_PAGE),
        HUGETLBFS_MAGIC => Some(u64::try_from(st.block_size()).unwrap_or(HUGE_2M)),
        _ => None,
    })
}

fn to_usize(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::Invalid(format!("offset {v} too large")))
}

fn to_off(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Invalid(format!("offset {v} too large")))
}

/// A new memfd of `size` bytes, sealed against resizing before anybody else can see it: a peer
/// that shrank it would make every other mapper's access past the new end a SIGBUS, and one that
/// grew it could make the broker's bitmaps disagree with the file. F_SEAL_SEAL keeps peers from
/// adding seals of their own (a write seal would stop placement).
/// A new memfd of `size` bytes, sealed against resizing.
pub(crate) fn new_memfd(name: &str, flags: MemFdCreateFlag, size: u64) -> Result<OwnedFd> {
    let cname =
        CString::new(name).map_err(|_| Error::Invalid(format!("block name '{name}' contains a NUL byte")))?;
    let fd = memfd_create(&cname, flags | MemFdCreateFlag::MFD_ALLOW_SEALING)
        .ctx(|| format!("memfd_create for block '{name}'"))?;
    nix::unistd::ftruncate(&fd, to_off(size)?).ctx(|| format!("size block '{name}' to {size} bytes"))?;
    add_seals(fd.as_fd(), libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL)
        .ctx(|| format!("seal the memfd of block '{name}' against resizing"))?;
    Ok(fd)
}

/// The seals of a memfd (0 for files that cannot be sealed).
pub(crate) fn seals(fd: BorrowedFd<'_>) -> i32 {
    // SAFETY: F_GET_SEALS takes no argument and only reads the file's seal set.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    r.max(0)
}

fn add_seals(fd: BorrowedFd<'_>, seals: libc::c_int) -> std::io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an integer seal mask and changes only the file's seal set.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The error of a hugetlbfs block whose pages the pool cannot promise.
fn pool_error(name: &str, size: u64, page_size: u64, e: Error) -> Error {
    match e {
        Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOMEM) => Error::HugePagePool {
            block: name.to_string(),
            why: super::hugepool::shortfall(page_size, size / page_size),
        },
        other => other,
    }
}
