//! A read-only mapping of an image file that only the kernel reads: the private fault path hands
//! its addresses to UFFDIO_COPY as the source of a client's page, so the bytes travel once, from
//! the page cache into the client (as Firecracker's own example handler does).
//!
//! The broker never dereferences it. If the file shrinks after it was mapped (someone truncates
//! the snapshot) or the disk fails to read a page, a user-space read of the mapping there would
//! raise SIGBUS and kill the broker with every client it serves; the kernel's copy instead fails
//! with EFAULT, which costs the one client that faulted there. The length is checked once, at
//! open, and the file stays open for the mapping's life: the image must not shrink while it is
//! served (README, "Firecracker").

use std::fs::File;
use std::os::fd::AsFd;
use std::ptr::NonNull;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::error::{Error, IoContext, Result};

/// `len` bytes of an image file mapped shared and read-only.
#[derive(Debug)]
pub struct ImageMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and never read through Rust references; only its address is
// handed to the kernel.
unsafe impl Send for ImageMap {}
// SAFETY: as above; the struct is immutable after creation.
unsafe impl Sync for ImageMap {}

impl ImageMap {
    /// Map the first `len` bytes of `file` (`len` > 0: its length at open).
    pub fn new(file: &File, len: u64) -> Result<ImageMap> {
        let n = usize::try_from(len)
            .ok()
            .and_then(std::num::NonZeroUsize::new)
            .ok_or_else(|| Error::Invalid(format!("cannot map an image of {len} bytes")))?;
        // SAFETY: a fresh read-only mapping chosen by the kernel aliases no Rust object, and none
        // is ever made of it (see the module doc).
        let p = unsafe {
            mmap(
                None,
                n,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE,
                file.as_fd(),
                0,
            )
        }
        .ctx(|| format!("mmap of the {len}-byte image (it must be a regular file)"))?;
        Ok(ImageMap { ptr: p.cast(), len: n.get() })
    }

    /// The address of `[offset, offset+len)` for the kernel to copy from, if the mapping holds
    /// it. Never dereference it in user space.
    pub fn copy_source(&self, offset: u64, len: u64) -> Option<*const u8> {
        let end = offset.checked_add(len)?;
        if end > self.len as u64 {
            return None;
        }
        // In bounds: `offset < end <= self.len`, a usize.
        Some(self.ptr.as_ptr().wrapping_add(crate::conv::usize_of(offset)).cast_const())
    }

    /// Map `[offset, offset+len)` of the image into the broker's page tables now
    /// (MADV_POPULATE_READ: the kernel reads the page cache, nothing is read in user space), so
    /// that a copy from it does not take the slow path of faulting its source page by page: for
    /// a 2 MiB page this halves UFFDIO_COPY's time here (BENCHMARKS.md, private faults). Fails
    /// with EFAULT past the end of a shrunken file, EINVAL before Linux 5.14.
    pub fn populate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let src =
            self.copy_source(offset, len).ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let len = usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the range lies inside this read-only mapping (checked by copy_source);
        // MADV_POPULATE_READ only faults its pages in, changing no contents.
        let r = unsafe { libc::madvise(src.cast_mut().cast(), len, libc::MADV_POPULATE_READ) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Mapped bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for ImageMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe exactly the mapping this value created and owns.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            log::warn!("munmap of the {}-byte image failed: {e}", self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_sources_stay_inside_the_mapping() {
        let path = std::env::temp_dir().join(format!("pcb-image-map-{}.img", std::process::id()));
        std::fs::write(&path, vec![5u8; 3 * 4096]).unwrap();
        let f = File::open(&path).unwrap();
        let m = ImageMap::new(&f, 3 * 4096).unwrap();
        let base = m.copy_source(0, 4096).unwrap();
        assert_eq!(m.copy_source(8192, 4096), Some(base.wrapping_add(8192)));
        assert_eq!(m.copy_source(8192, 4097), None);
        assert_eq!(m.copy_source(u64::MAX, 2), None);
        m.populate(4096, 8192).unwrap();
        assert!(m.populate(8192, 8192).is_err());
        assert!(ImageMap::new(&f, 0).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
