//! A client's mapping table: which ranges of its address space map which RAM block ranges.
//! Translates client fault addresses to (block, offset) and back, and follows the client's
//! munmap / mremap events.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ram::{BlockId, RamBlocks};

/// One range of a client's address space that maps part of a RAM block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingEntry {
    /// Start in the client's address space.
    pub client_addr: u64,
    /// The block it maps.
    pub block: BlockId,
    /// Offset of `client_addr` in the block.
    pub block_offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl MappingEntry {
    fn end(&self) -> u64 {
        self.client_addr + self.len
    }
}

/// A validated, sorted, non-overlapping set of mapping entries.
#[derive(Debug, Clone, Default)]
pub struct MappingTable {
    entries: Vec<MappingEntry>,
}

impl MappingTable {
    /// Validate `entries` against `blocks`: page aligned to the block page size, inside the block,
    /// no two client ranges overlap. One client may map the same block range more than once.
    pub fn new(blocks: &RamBlocks, mut entries: Vec<MappingEntry>) -> Result<MappingTable> {
        if entries.is_empty() {
            return Err(Error::Invalid("a client must map at least one range".into()));
        }
        for e in &entries {
            let b = blocks.get(e.block).ok_or_else(|| Error::UnknownBlock(format!("#{}", e.block)))?;
            b.check_range(e.block_offset, e.len)?;
            if e.client_addr % b.page_size() != 0 {
                return Err(Error::Invalid(format!(
                    "client address {:#x} for block '{}' is not aligned to its page size {}",
                    e.client_addr,
                    b.name(),
                    b.page_size()
                )));
            }
            if e.client_addr.checked_add(e.len).is_none() {
                return Err(Error::Invalid(format!("client range at {:#x} wraps around", e.client_addr)));
            }
        }
        entries.sort_by_key(|e| e.client_addr);
        for w in entries.windows(2) {
            if w[0].end() > w[1].client_addr {
                return Err(Error::Invalid(format!(
                    "client ranges overlap: {:#x}+{:#x} and {:#x}",
                    w[0].client_addr, w[0].len, w[1].client_addr
                )));
            }
        }
        Ok(MappingTable { entries })
    }

    /// The entries, sorted by client address.
    pub fn entries(&self) -> &[MappingEntry] {
        &self.entries
    }

    /// Whether nothing is mapped any more.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn find(&self, addr: u64) -> Option<&MappingEntry> {
        let pos = self.entries.partition_point(|e| e.client_addr <= addr);
        let e = self.entries.get(pos.checked_sub(1)?)?;
        (addr < e.end()).then_some(e)
    }

    /// The entries that overlap `[start, end)`, found by binary search (the entries are sorted
    /// and do not overlap, so their ends are sorted too): the cost of an event over a range is
    /// that of the entries it touches, never of its length.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &MappingEntry> + '_ {
        let first = self.entries.partition_point(|e| e.end() <= start);
        self.entries[first..].iter().take_while(move |e| e.client_addr < end)
    }

    /// Translate a client address to (block, byte offset in the block).
    pub fn translate(&self, addr: u64) -> Option<(BlockId, u64)> {
        self.find(addr).map(|e| (e.block, e.block_offset + (addr - e.client_addr)))
    }

    /// Every client address at which `(block, offset)` is mapped.
    pub fn client_addrs(&self, block: BlockId, offset: u64) -> impl Iterator<Item = u64> + '_ {
        self.entries
            .iter()
            .filter(move |e| e.block == block && offset >= e.block_offset && offset < e.block_offset + e.len)
            .map(move |e| e.client_addr + (offset - e.block_offset))
    }

    /// The client unmapped `[start, end)`: cut it out of every entry.
    pub fn unmap(&mut self, start: u64, end: u64) {
        let mut out = Vec::with_capacity(self.entries.len() + 1);
        for e in self.entries.drain(..) {
            if e.end() <= start || e.client_addr >= end {
                out.push(e);
                continue;
            }
            if e.client_addr < start {
                out.push(MappingEntry { len: start - e.client_addr, ..e });
            }
            if e.end() > end {
                let cut = end - e.client_addr;
                out.push(MappingEntry {
                    client_addr: end,
                    block: e.block,
                    block_offset: e.block_offset + cut,
                    len: e.len - cut,
                });
            }
        }
        self.entries = out;
    }

    /// The client moved `[from, from+len)` to `to` (mremap).
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        let end = from.saturating_add(len);
        let moved: Vec<MappingEntry> = self
            .entries
            .iter()
            .filter(|e| e.end() > from && e.client_addr < end)
            .map(|e| {
                let s = e.client_addr.max(from);
                let t = e.end().min(end);
                MappingEntry {
                    client_addr: to.saturating_add(s - from),
                    block: e.block,
                    block_offset: e.block_offset + (s - e.client_addr),
                    len: t - s,
                }
            })
            .collect();
        self.unmap(from, end);
        // A mremap onto an existing range replaces it.
        self.unmap(to, to.saturating_add(len));
        self.entries.extend(moved);
        self.entries.sort_by_key(|e| e.client_addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::RamBlock;

    fn blocks() -> RamBlocks {
        let mut b = RamBlocks::new();
        b.add(RamBlock::memfd("a", 16 * 4096).unwrap()).unwrap();
        b
    }

    fn e(client_addr: u64, block_offset: u64, len: u64) -> MappingEntry {
        MappingEntry { client_addr, block: 0, block_offset, len }
    }

    #[test]
    fn validation_refuses_nonsense() {
        let b = blocks();
        assert!(MappingTable::new(&b, vec![]).is_err());
        assert!(MappingTable::new(&b, vec![e(0x10000, 0, 17 * 4096)]).is_err(), "past the block");
        assert!(MappingTable::new(&b, vec![e(0x10001, 0, 4096)]).is_err(), "unaligned address");
        assert!(MappingTable::new(&b, vec![e(0x10000, 100, 4096)]).is_err(), "unaligned offset");
        assert!(MappingTable::new(&b, vec![MappingEntry { block: 3, ..e(0x10000, 0, 4096) }]).is_err());
        assert!(MappingTable::new(&b, vec![e(0x10000, 0, 8192), e(0x11000, 0, 4096)]).is_err(), "overlap");
        assert!(MappingTable::new(&b, vec![e(u64::MAX - 4095, 0, 8192)]).is_err(), "wraps");
        let t = MappingTable::new(&b, vec![e(0x40000, 0, 8 * 4096), e(0x10000, 0, 16 * 4096)]).unwrap();
        assert_eq!(t.translate(0x10000 + 5 * 4096 + 7), Some((0, 5 * 4096 + 7)));
        assert_eq!(t.translate(0x40000 + 4096), Some((0, 4096)));
        assert_eq!(t.translate(0x30000), None);
        let addrs: Vec<u64> = t.client_addrs(0, 4096).collect();
        assert_eq!(addrs, vec![0x11000, 0x41000], "a block range mapped twice has two addresses");
    }

    #[test]
    fn unmap_and_remap_follow_the_client() {
        let b = blocks();
        let mut t = MappingTable::new(&b, vec![e(0x10000, 0, 16 * 4096)]).unwrap();
        t.unmap(0x12000, 0x14000);
        assert_eq!(t.translate(0x12000), None);
        assert_eq!(t.translate(0x14000), Some((0, 0x4000)));
        assert_eq!(t.translate(0x11000), Some((0, 0x1000)));
        t.remap(0x14000, 0x90000, 0x2000);
        assert_eq!(t.translate(0x14000), None);
        assert_eq!(t.translate(0x91000), Some((0, 0x5000)));
        assert_eq!(t.translate(0x16000), Some((0, 0x6000)));
        t.unmap(0, u64::MAX);
        assert!(t.is_empty());
    }
}
