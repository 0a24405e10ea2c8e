//! The check a shared client passes when it registers: the ranges it maps must hold no page the
//! broker never placed. A process that populated guest RAM before its userfaultfd could catch it
//! (mlock / mlockall, MAP_POPULATE, a prefault loop; dpdk-testpmd does it by default) leaves zero
//! pages in the shared page cache that never fault: every mapper would read zeros there and the
//! source's data would be lost. Such pages are dropped again (so they fault like every missing
//! page) and the client is refused with an error that names the cause and the fix, before it is
//! served and, for a vhost-user backend, before its memory table is acknowledged.
//!
//! Small-page blocks locate the pages exactly; hugetlbfs blocks only count them (see
//! [`crate::ram::RamBlock::unplaced_count`]), so there the registering client is held
//! responsible for any it finds in a block it maps. Unplaced pages outside the client's ranges
//! of a small-page block are somebody else's: they are dropped and counted, and the client is
//! served.

use crate::client::MappingTable;
use crate::error::{Error, Result};
use crate::fault::core::Core;
use crate::ram::BlockId;

impl Core {
    /// Refuse (after repairing the blocks) a client whose mapped ranges hold unplaced pages.
    pub(crate) fn check_unplaced(&mut self, client: &str, table: &MappingTable) -> Result<()> {
        let mut ids: Vec<BlockId> = table.entries().iter().map(|e| e.block).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut refusal = None;
        for id in ids {
            let blocks = std::sync::Arc::clone(&self.blocks);
            let Some(b) = blocks.get(id) else { continue };
            let found = b.unplaced_count()?;
            if found == 0 {
                continue;
            }
            let ranges = table.entries().iter().filter(|e| e.block == id).map(|e| (e.block_offset, e.len));
            let mut mine = 0;
            let mut located = true;
            for (offset, len) in ranges {
                match b.find_unplaced(offset, len)? {
                    Some(runs) => {
                        for (o, l) in runs {
                            mine += l / b.page_size();
                            b.drop_unplaced(o, l)?;
                        }
                    }
                    None => {
                        located = false;
                        b.drop_unplaced(offset, len)?;
                    }
                }
            }
            if !located {
                // hugetlbfs: the count is all we know; the client that maps the block answers
                // for it.
                mine = mine.max(found);
            }
            // What is left anywhere else in the block was populated by somebody else.
            let elsewhere = match b.find_unplaced(0, b.size())? {
                Some(runs) => runs
                    .iter()
                    .try_fold(0, |n, &(o, l)| b.drop_unplaced(o, l).map(|_| n + l / b.page_size()))?,
                None => b.drop_unplaced(0, b.size())?,
            };
            if elsewhere > 0 {
                self.stats.foreign_pages += elsewhere;
                log::error!(
                    "block '{}': {elsewhere} page(s) outside the ranges of client '{client}' were populated behind the broker (through a mapping no userfaultfd watches); dropped them so that they fault",
                    b.name()
                );
            }
            if mine > 0 {
                self.stats.prefaulted_pages += mine;
                let e = Error::Prefaulted {
                    client: client.to_string(),
                    block: b.name().to_string(),
                    pages: mine,
                };
                log::error!("{e}");
                refusal.get_or_insert(e);
            }
        }
        refusal.map_or(Ok(()), Err)
    }
}
