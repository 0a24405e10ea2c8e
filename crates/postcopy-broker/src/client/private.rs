//! The address table of a private client (Firecracker-style guest memory): each region of the
//! client's private memory is backed by a range of the image file, and pages are placed through
//! the client's own userfaultfd. Ranges the client removed (balloon) fault in as zero.

use serde::{Deserialize, Serialize};

use crate::client::RemovedRanges;
use crate::error::{Error, Result};

/// The page sizes of private memory the broker serves (its staging page holds the largest).
pub const PRIVATE_PAGE_SIZES: [u64; 2] = [4096, 2 << 20];

/// One region of a private client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivateRegion {
    /// Start in the client's address space.
    pub client_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of the region's first byte in the image file.
    pub file_offset: u64,
    /// Page size of the region (the unit of placement).
    pub page_size: u64,
}

/// The validated regions of a private client plus its removed ranges.
#[derive(Debug, Clone, Default)]
pub struct PrivateTable {
    regions: Vec<PrivateRegion>,
    removed: RemovedRanges,
}

impl PrivateTable {
    /// Validate regions: page size 4 KiB or 2 MiB (the sizes a private fault is placed in),
    /// aligned, no overlap, inside `image_len` bytes of the image file.
    pub fn new(mut regions: Vec<PrivateRegion>, image_len: u64) -> Result<PrivateTable> {
        if regions.is_empty() {
            return Err(Error::Invalid("a private client must map at least one region".into()));
        }
        for r in &regions {
            if !PRIVATE_PAGE_SIZES.contains(&r.page_size) {
                return Err(Error::UnsupportedPageSize {
                    page_size: r.page_size,
                    why: "the broker serves private memory of 4 KiB and 2 MiB pages; back the guest with one of those".into(),
                });
            }
            if r.len == 0
                || r.len % r.page_size != 0
                || r.client_addr % r.page_size != 0
                || r.file_offset % 4096 != 0
            {
                return Err(Error::Invalid(format!(
                    "region at {:#x} len {:#x} file offset {:#x} is not aligned to its page size {}",
                    r.client_addr, r.len, r.file_offset, r.page_size
                )));
            }
            if r.client_addr.checked_add(r.len).is_none()
                || r.file_offset.checked_add(r.len).is_none_or(|e| e > image_len)
            {
                return Err(Error::Invalid(format!(
                    "region at {:#x} len {:#x} file offset {:#x} lies outside the image ({image_len} bytes)",
                    r.client_addr, r.len, r.file_offset
                )));
            }
        }
        regions.sort_by_key(|r| r.client_addr);
        for w in regions.windows(2) {
            if w[0].client_addr + w[0].len > w[1].client_addr {
                return Err(Error::Invalid(format!(
                    "regions at {:#x} and {:#x} overlap",
                    w[0].client_addr, w[1].client_addr
                )));
            }
        }
        Ok(PrivateTable { regions, removed: RemovedRanges::default() })
    }

    /// The regions.
    pub fn regions(&self) -> &[PrivateRegion] {
        &self.regions
    }

    /// The region holding `addr`, with the page-aligned address and its image file offset.
    pub fn translate(&self, addr: u64) -> Option<(PrivateRegion, u64, u64)> {
        let pos = self.regions.partition_point(|r| r.client_addr <= addr);
        let r = *self.regions.get(pos.checked_sub(1)?)?;
        if addr >= r.client_addr + r.len {
            return None;
        }
        let page = addr & !(r.page_size - 1);
        Some((r, page, r.file_offset + (page - r.client_addr)))
    }

    /// The client removed `[start, end)` (madvise): those pages fault in as zero from now on.
    pub fn remove(&mut self, start: u64, end: u64) {
        self.removed.insert(start, end);
    }

    /// Whether `addr` lies in a removed range (O(log n) in the number of disjoint ranges).
    pub fn is_removed(&self, addr: u64) -> bool {
        !self.removed.is_empty() && self.removed.contains(addr)
    }

    /// The removed ranges, merged.
    pub fn removed(&self) -> &RemovedRanges {
        &self.removed
    }

    /// The client unmapped `[start, end)`: its regions and removed ranges there are gone.
    pub fn unmap(&mut self, start: u64, end: u64) {
        self.removed.clear(start, end);
        self.unmap_regions(start, end);
    }

    fn unmap_regions(&mut self, start: u64, end: u64) {
        let mut out = Vec::new();
        for r in self.regions.drain(..) {
            let re = r.client_addr + r.len;
            if re <= start || r.client_addr >= end {
                out.push(r);
                continue;
            }
            if r.client_addr < start {
                out.push(PrivateRegion { len: start - r.client_addr, ..r });
            }
            if re > end {
                let cut = end - r.client_addr;
                out.push(PrivateRegion {
                    client_addr: end,
                    len: r.len - cut,
                    file_offset: r.file_offset + cut,
                    ..r
                });
            }
        }
        self.regions = out;
    }

    /// The client moved `[from, from+len)` to `to`: the regions and the removed ranges there
    /// move with it (a removed page that was not faulted in again is still missing there).
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        let end = from.saturating_add(len);
        let moved: Vec<PrivateRegion> = self
            .regions
            .iter()
            .filter(|r| r.client_addr + r.len > from && r.client_addr < end)
            .map(|r| {
                let s = r.client_addr.max(from);
                let t = (r.client_addr + r.len).min(end);
                PrivateRegion {
                    client_addr: to + (s - from),
                    len: t - s,
                    file_offset: r.file_offset + (s - r.client_addr),
                    ..*r
                }
            })
            .collect();
        self.unmap_regions(from, end);
        self.unmap_regions(to, to.saturating_add(len));
        self.removed.shift(from, to, len);
        self.regions.extend(moved);
        self.regions.sort_by_key(|r| r.client_addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_translate_and_validate() {
        let r = |a, l, o| PrivateRegion { client_addr: a, len: l, file_offset: o, page_size: 4096 };
        assert!(PrivateTable::new(vec![r(0x1000, 0x2000, 0x3000)], 0x4000).is_err(), "past the image");
        assert!(PrivateTable::new(vec![r(0x1001, 0x1000, 0)], 0x4000).is_err());
        assert!(PrivateTable::new(vec![r(0x1000, 0x2000, 0), r(0x2000, 0x1000, 0)], 0x4000).is_err());
        for ps in [1 << 30, 8192, 0, u64::MAX] {
            let big = PrivateRegion { client_addr: 0, len: 1 << 30, file_offset: 0, page_size: ps };
            let e = PrivateTable::new(vec![big], 1 << 31).unwrap_err();
            assert!(matches!(e, Error::UnsupportedPageSize { .. }), "page size {ps}: {e}");
        }
        let mut t = PrivateTable::new(vec![r(0x10000, 0x4000, 0x1000)], 0x8000).unwrap();
        assert_eq!(t.translate(0x12345).map(|(_, p, o)| (p, o)), Some((0x12000, 0x3000)));
        assert!(t.translate(0x14000).is_none());
        t.remove(0x11000, 0x12000);
        assert!(t.is_removed(0x11800) && !t.is_removed(0x12000));
        t.remap(0x12000, 0x50000, 0x2000);
        assert_eq!(t.translate(0x51000).map(|(_, p, o)| (p, o)), Some((0x51000, 0x4000)));
        assert!(t.translate(0x12000).is_none());
    }

    #[test]
    fn removed_ranges_follow_unmap_and_remap() {
        let r = PrivateRegion { client_addr: 0x100000, len: 0x10000, file_offset: 0, page_size: 4096 };
        let mut t = PrivateTable::new(vec![r], 0x10000).unwrap();
        for p in 0..16u64 {
            // Reported twice, and the pages next to each other: one range.
            t.remove(0x100000 + p * 0x1000, 0x101000 + p * 0x1000);
            t.remove(0x100000 + p * 0x1000, 0x101000 + p * 0x1000);
        }
        assert_eq!(t.removed().len(), 1);
        t.unmap(0x104000, 0x106000);
        assert!(!t.is_removed(0x104000) && t.is_removed(0x103fff) && t.is_removed(0x106000));
        assert!(t.translate(0x105000).is_none());
        // Moving [0x108000, 0x10a000) to 0x200000 takes its removed pages along.
        t.remap(0x108000, 0x200000, 0x2000);
        assert!(t.is_removed(0x200000) && t.is_removed(0x201fff) && !t.is_removed(0x202000));
        assert!(!t.is_removed(0x108000) && t.is_removed(0x10a000));
        assert_eq!(t.translate(0x201000).map(|(_, p, o)| (p, o)), Some((0x201000, 0x9000)));
        assert_eq!(t.removed().len(), 4);
    }
}
