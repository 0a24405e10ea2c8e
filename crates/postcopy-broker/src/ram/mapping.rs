//! A memory mapping owned by the broker (munmapped on drop).

use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;

use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

use crate::error::{IoContext, Result};

/// A read-write mapping of `len` bytes.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory; access to its contents is synchronised by the
// userfaultfd placement protocol (pages appear atomically), not by Rust references.
unsafe impl Send for Mapping {}
// SAFETY: see Send; the struct itself is immutable after creation.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes of `fd` at offset 0, shared, read-write, reserving nothing (the pages of
    /// small-page shared memory are allocated as they are placed).
    pub fn shared(fd: BorrowedFd<'_>, len: usize) -> Result<Mapping> {
        Self::shared_with(fd, len, MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE)
    }

    /// Map `len` bytes of a hugetlbfs `fd` shared, read-write, reserving every huge page of the
    /// range in the pool now (the reservation belongs to the file and outlives this mapping), so
    /// that placement never meets an empty pool. Fails with ENOMEM if the pool is too small.
    pub fn shared_reserved(fd: BorrowedFd<'_>, len: usize) -> Result<Mapping> {
        Self::shared_with(fd, len, MapFlags::MAP_SHARED)
    }

    fn shared_with(fd: BorrowedFd<'_>, len: usize, flags: MapFlags) -> Result<Mapping> {
        let n = std::num::NonZeroUsize::new(len)
            .ok_or_else(|| crate::Error::Invalid("cannot map 0 bytes".into()))?;
        // SAFETY: a fresh mapping chosen by the kernel aliases no Rust object.
        let p = unsafe { mmap(None, n, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, flags, fd.as_fd(), 0) }
            .ctx(|| format!("mmap of {len} shared bytes"))?;
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// Map `len` bytes of private anonymous memory.
    pub fn private(len: usize) -> Result<Mapping> {
        let n = std::num::NonZeroUsize::new(len)
            .ok_or_else(|| crate::Error::Invalid("cannot map 0 bytes".into()))?;
        // SAFETY: a fresh anonymous mapping aliases no Rust object.
        let p = unsafe {
            mmap_anonymous(
                None,
                n,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .ctx(|| format!("mmap of {len} private bytes"))?;
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Start pointer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mappings are at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe exactly the mapping this value created and owns.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            log::warn!("munmap of {} bytes failed: {e}", self.len);
        }
    }
}
