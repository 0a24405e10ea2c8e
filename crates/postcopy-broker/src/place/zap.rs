//! Dropping the broker's own page-table entries of placed runs while the migration goes on.
//!
//! UFFDIO_COPY fills the shared page cache *and* maps the page in the broker's placement
//! mapping. Nothing in the broker reads guest RAM through those entries, yet tearing them down
//! at the end (munmap at exit) cost about 130 ms per GiB here. MADV_DONTNEED on a shared
//! mapping drops only the mapping's entries: the pages stay in the page cache, so "received
//! implies present" still holds, mincore (which looks at the page cache for shmem) still says
//! present, and a later UFFDIO_COPY there still fails with EEXIST. The broker's own userfaultfd
//! has no REMOVE events, so nobody hears of it.
//!
//! Only 4 KiB-page (shmem) blocks are zapped: for hugetlbfs, mincore reports page-table
//! entries, not the page cache, so a zapped received page would look like a hole, and its 512x
//! fewer entries cost little to tear down anyway. Contiguous placed runs are merged and zapped
//! per [`BATCH`] bytes (each madvise may flush the other CPUs' TLBs).

use std::sync::Mutex;

use crate::ram::{BlockId, RamBlocks};
use nix::sys::mman::MmapAdvise;

/// Bytes of contiguous placed runs zapped in one madvise.
pub(crate) const BATCH: u64 = 8 << 20;

/// Placed runs not zapped yet: (block, offset, len), contiguous.
#[derive(Debug, Default)]
pub(crate) struct Zapper {
    pending: Mutex<Option<(BlockId, u64, u64)>>,
}

impl Zapper {
    /// `[offset, offset+len)` of block `id` was placed: merge it, and zap what is complete.
    pub(crate) fn placed(&self, blocks: &RamBlocks, id: BlockId, offset: u64, len: u64) {
        if blocks.get(id).is_none_or(|b| b.is_hugetlb()) {
            return;
        }
        let mut g = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let merged = match *g {
            Some((b, o, l)) if b == id && o + l == offset => (b, o, l + len),
            Some(old) => {
                zap(blocks, old);
                (id, offset, len)
            }
            None => (id, offset, len),
        };
        if merged.2 >= BATCH {
            zap(blocks, merged);
            *g = None;
        } else {
            *g = Some(merged);
        }
    }

    /// Zap whatever is pending (at the end of a stream).
    pub(crate) fn flush(&self, blocks: &RamBlocks) {
        if let Some(span) = self.pending.lock().unwrap_or_else(|p| p.into_inner()).take() {
            zap(blocks, span);
        }
    }
}

fn zap(blocks: &RamBlocks, (id, offset, len): (BlockId, u64, u64)) {
    let Some(b) = blocks.get(id) else { return };
    if let Err(e) = b.advise(offset, len, MmapAdvise::MADV_DONTNEED) {
        // Only the exit gets slower: the entries are torn down with the mapping.
        log::debug!("MADV_DONTNEED of block '{}' {offset:#x}+{len:#x}: {e}", b.name());
    }
}
