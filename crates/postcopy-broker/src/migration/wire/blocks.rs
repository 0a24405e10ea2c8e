//! [`BlockTable`]: the RAM blocks announced in Hello (name, size, page size), validated once, and
//! the range checks every block-addressed frame goes through.

use super::error::WireError;
use super::frame::FrameType;
use crate::ram::RamBlocks;

/// Most blocks one Hello may announce.
pub const MAX_BLOCKS: usize = 4096;
/// The wire index of the block at position `i` of a table: tables hold at most [`MAX_BLOCKS`]
/// blocks, so it fits; a position past `u32` would be `u32::MAX`, which no table has.
pub fn wire_index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// Smallest page size accepted.
pub const MIN_PAGE_SIZE: u64 = 4096;
/// Largest page size accepted (1 GiB huge pages).
pub const MAX_PAGE_SIZE: u64 = 1 << 30;
/// Largest block size accepted (256 TiB): keeps every offset + length far from u64 overflow.
pub const MAX_BLOCK_SIZE: u64 = 1 << 48;
/// Longest block name in bytes (it travels with a u8 length).
pub const MAX_NAME_LEN: usize = 255;

/// One announced RAM block.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockInfo {
    /// Unique name, 1..=255 bytes of UTF-8.
    pub name: String,
    /// Size in bytes: a positive multiple of `page_size`.
    pub size: u64,
    /// Page size: a power of two in [`MIN_PAGE_SIZE`]..=[`MAX_PAGE_SIZE`].
    pub page_size: u64,
}

impl BlockInfo {
    /// A block description (checked when it goes into a [`BlockTable`]).
    pub fn new(name: impl Into<String>, size: u64, page_size: u64) -> BlockInfo {
        BlockInfo { name: name.into(), size, page_size }
    }

    /// Number of pages in the block.
    pub fn pages(&self) -> u64 {
        self.size / self.page_size
    }
}

/// The validated list of blocks; a block's index in it is its wire `block` number.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct BlockTable {
    blocks: Vec<BlockInfo>,
}

impl BlockTable {
    /// Validate and build a table: 1..=[`MAX_BLOCKS`] blocks, unique non-empty names of at most
    /// 255 bytes, page sizes that are powers of two in range, sizes that are positive multiples of
    /// the page size and at most [`MAX_BLOCK_SIZE`].
    pub fn new(blocks: Vec<BlockInfo>) -> Result<BlockTable, WireError> {
        if blocks.is_empty() {
            return Err(WireError::BadBlockTable(
                "no blocks announced; a migration needs at least one".into(),
            ));
        }
        if blocks.len() > MAX_BLOCKS {
            return Err(WireError::BadBlockTable(format!(
                "{} blocks announced, at most {MAX_BLOCKS} are supported",
                blocks.len()
            )));
        }
        let mut names = std::collections::HashSet::with_capacity(blocks.len());
        for (i, b) in blocks.iter().enumerate() {
            if b.name.is_empty() || b.name.len() > MAX_NAME_LEN {
                return Err(WireError::BadBlockTable(format!(
                    "block {i}: name length {} is not in 1..={MAX_NAME_LEN}",
                    b.name.len()
                )));
            }
            if !names.insert(b.name.as_str()) {
                return Err(WireError::BadBlockTable(format!(
                    "block {i}: name '{}' announced twice",
                    b.name
                )));
            }
            if !b.page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&b.page_size) {
                return Err(WireError::BadBlockTable(format!(
                    "block '{}': page size {} is not a power of two between {MIN_PAGE_SIZE} and {MAX_PAGE_SIZE}",
                    b.name, b.page_size
                )));
            }
            if b.size == 0 || b.size % b.page_size != 0 || b.size > MAX_BLOCK_SIZE {
                return Err(WireError::BadBlockTable(format!(
                    "block '{}': size {} is not a positive multiple of its page size {} up to {MAX_BLOCK_SIZE}",
                    b.name, b.size, b.page_size
                )));
            }
        }
        Ok(BlockTable { blocks })
    }

    /// The table describing the broker's RAM blocks, in their id order.
    pub fn from_ram(ram: &RamBlocks) -> Result<BlockTable, WireError> {
        BlockTable::new(ram.iter().map(|(_, b)| BlockInfo::new(b.name(), b.size(), b.page_size())).collect())
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether the table is empty (never true for a table built by [`BlockTable::new`]).
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Block `index`, if announced.
    pub fn get(&self, index: u32) -> Option<&BlockInfo> {
        self.blocks.get(index as usize)
    }

    /// Index of the block called `name`.
    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.blocks.iter().position(|b| b.name == name).map(wire_index)
    }

    /// The blocks in index order.
    pub fn iter(&self) -> std::slice::Iter<'_, BlockInfo> {
        self.blocks.iter()
    }

    /// The block for `index`, or [`WireError::UnknownBlock`] naming `frame`.
    pub fn block(&self, frame: FrameType, index: u32) -> Result<&BlockInfo, WireError> {
        self.get(index).ok_or(WireError::UnknownBlock { frame, index, count: self.blocks.len() })
    }

    /// Check that `[offset, offset + len)` is non-empty, aligned to the page size of block `index`
    /// and inside it; returns the block.
    pub fn check_range(
        &self,
        frame: FrameType,
        index: u32,
        offset: u64,
        len: u64,
    ) -> Result<&BlockInfo, WireError> {
        let b = self.block(frame, index)?;
        let bad = |why| WireError::BadRange {
            frame,
            block: b.name.clone(),
            offset,
            len,
            size: b.size,
            page_size: b.page_size,
            why,
        };
        if len == 0 {
            return Err(bad("empty"));
        }
        if offset % b.page_size != 0 || len % b.page_size != 0 {
            return Err(bad("not page aligned"));
        }
        match offset.checked_add(len) {
            Some(end) if end <= b.size => Ok(b),
            _ => Err(bad("outside the block")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> BlockTable {
        BlockTable::new(vec![
            BlockInfo::new("pc.ram", 1 << 20, 4096),
            BlockInfo::new("huge", 4 << 20, 2 << 20),
        ])
        .unwrap()
    }

    #[test]
    fn rejects_bad_tables() {
        assert!(BlockTable::new(vec![]).is_err());
        assert!(BlockTable::new(vec![BlockInfo::new("", 4096, 4096)]).is_err());
        assert!(BlockTable::new(vec![BlockInfo::new("a".repeat(256), 4096, 4096)]).is_err());
        assert!(
            BlockTable::new(vec![BlockInfo::new("a", 4096, 4096), BlockInfo::new("a", 4096, 4096)]).is_err()
        );
        assert!(BlockTable::new(vec![BlockInfo::new("a", 4096, 3000)]).is_err());
        assert!(BlockTable::new(vec![BlockInfo::new("a", 4096, 2048)]).is_err());
        assert!(BlockTable::new(vec![BlockInfo::new("a", 6000, 4096)]).is_err());
        assert!(BlockTable::new(vec![BlockInfo::new("a", 0, 4096)]).is_err());
        assert!(BlockTable::new(vec![BlockInfo::new("a", 1 << 49, 4096)]).is_err());
        let many = (0..=MAX_BLOCKS).map(|i| BlockInfo::new(format!("b{i}"), 4096, 4096)).collect();
        assert!(BlockTable::new(many).is_err());
    }

    #[test]
    fn range_checks() {
        let t = table();
        let f = FrameType::Request;
        assert!(t.check_range(f, 0, 0, 4096).is_ok());
        assert!(t.check_range(f, 0, (1 << 20) - 4096, 4096).is_ok());
        assert!(t.check_range(f, 0, 1 << 20, 4096).is_err());
        assert!(t.check_range(f, 0, 0, 0).is_err());
        assert!(t.check_range(f, 0, 1, 4096).is_err());
        assert!(t.check_range(f, 0, u64::MAX - 4095, 4096).is_err());
        assert!(t.check_range(f, 1, 4096, 4096).is_err());
        assert!(t.check_range(f, 1, 2 << 20, 2 << 20).is_ok());
        assert!(matches!(t.check_range(f, 2, 0, 4096), Err(WireError::UnknownBlock { index: 2, .. })));
        assert_eq!(t.index_of("huge"), Some(1));
    }
}
