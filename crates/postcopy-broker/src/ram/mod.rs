//! Guest RAM as the broker sees it: named blocks, each with a placement mapping and a received
//! bitmap, and the set of blocks with lookup by name and by placement address.

mod bitmap;
mod block;
mod foreign;
mod hugepool;
mod ledger;
mod mapping;
pub mod residency;
mod words;

pub use bitmap::AtomicBitmap;
#[cfg(feature = "migration")]
pub(crate) use block::new_memfd;
pub use block::{shared_memory_page_size, Backing, RamBlock, HUGE_1G, HUGE_2M, SMALL_PAGE};
pub use hugepool::{pool as huge_pool, pools as huge_pools, HugePool};
pub use mapping::Mapping;
pub use words::AtomicWords;

use crate::error::{Error, Result};

/// Index of a block in its [`RamBlocks`].
pub type BlockId = usize;

/// The RAM blocks of one guest, in the order they were added.
#[derive(Debug, Default)]
pub struct RamBlocks {
    blocks: Vec<RamBlock>,
    /// (host address, block id), sorted by address, for lookups by placement address.
    by_addr: Vec<(u64, BlockId)>,
}

impl RamBlocks {
    /// An empty set.
    pub fn new() -> RamBlocks {
        RamBlocks::default()
    }

    /// Add a block; names must be unique.
    pub fn add(&mut self, block: RamBlock) -> Result<BlockId> {
        if self.by_name(block.name()).is_some() {
            return Err(Error::DuplicateBlock(block.name().to_string()));
        }
        let id = self.blocks.len();
        let addr = block.host_addr();
        self.blocks.push(block);
        let pos = self.by_addr.partition_point(|&(a, _)| a < addr);
        self.by_addr.insert(pos, (addr, id));
        Ok(id)
    }

    /// All blocks.
    pub fn iter(&self) -> impl Iterator<Item = (BlockId, &RamBlock)> {
        self.blocks.iter().enumerate()
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The block with this id.
    pub fn get(&self, id: BlockId) -> Option<&RamBlock> {
        self.blocks.get(id)
    }

    /// The block id of a name.
    pub fn by_name(&self, name: &str) -> Option<BlockId> {
        self.blocks.iter().position(|b| b.name() == name)
    }

    /// The block named `name`, or a typed error.
    pub fn named(&self, name: &str) -> Result<(BlockId, &RamBlock)> {
        let id = self.by_name(name).ok_or_else(|| Error::UnknownBlock(name.to_string()))?;
        Ok((id, &self.blocks[id]))
    }

    /// The block and offset of a placement-mapping address.
    pub fn by_host_addr(&self, addr: u64) -> Option<(BlockId, u64)> {
        let pos = self.by_addr.partition_point(|&(a, _)| a <= addr);
        let &(base, id) = self.by_addr.get(pos.checked_sub(1)?)?;
        let off = addr - base;
        (off < self.blocks[id].size()).then_some((id, off))
    }

    /// Total bytes of all blocks.
    pub fn total_size(&self) -> u64 {
        self.blocks.iter().map(|b| b.size()).sum()
    }

    /// The largest page size of any block (4 KiB when empty).
    pub fn largest_page_size(&self) -> u64 {
        self.blocks.iter().map(|b| b.page_size()).max().unwrap_or(SMALL_PAGE)
    }

    /// Whether every page of every block has been received.
    pub fn all_received(&self) -> bool {
        self.blocks.iter().all(|b| b.received().all_set())
    }

    /// Pages received over all blocks.
    pub fn received_pages(&self) -> u64 {
        self.blocks.iter().map(|b| b.received().count_ones() as u64).sum()
    }

    /// Pages over all blocks.
    pub fn total_pages(&self) -> u64 {
        self.blocks.iter().map(|b| b.pages()).sum()
    }
}
