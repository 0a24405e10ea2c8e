//! The check a shared client passes when it registers: the ranges it maps must hold no page the
//! broker never placed. A process that populated guest RAM before its userfaultfd could catch it
//! (mlock / mlockall, MAP_POPULATE, a prefault loop; dpdk-testpmd does it by default) leaves zero
//! pages in the shared page cache that never fault: every mapper would read zeros there and the
//! source's data would be lost. Such pages are dropped again (so they fault like every missing
//! page) and the client is refused with an error that names the cause and the fix, before it is
//! served and, for a vhost-user backend, before its memory table is acknowledged.
//!
//! Blame goes only to a client that holds such pages in its own page tables
//! ([`crate::client::Pagemap`]): a process that prefaulted maps them, one that merely registers
//! does not, so a client is never refused for pages another process populated (those are dropped
//! and counted as foreign, and the client is served). Small-page blocks locate the pages exactly
//! (SEEK_DATA); hugetlbfs blocks only count them (see [`crate::ram::RamBlock::unplaced_count`]),
//! so there the client's pages that are not received are looked up one by one. When the
//! client's pagemap cannot be read (no ptrace access to it, no pid), the client is held
//! responsible for every unplaced page in the ranges it maps.

use crate::client::{MappingEntry, MappingTable, Pagemap};
use crate::error::{Error, Result};
use crate::fault::core::Core;
use crate::ram::{BlockId, RamBlock, SMALL_PAGE};

impl Core {
    /// Refuse (after repairing the blocks) a client whose own mappings hold unplaced pages.
    pub(crate) fn check_unplaced(
        &mut self,
        client: &str,
        pid: Option<u32>,
        table: &MappingTable,
    ) -> Result<()> {
        let pagemap = pid.and_then(|p| match Pagemap::open(p) {
            Ok(m) => Some(m),
            Err(e) => {
                log::debug!("client '{client}': its pagemap cannot be read ({e}); unplaced pages in its ranges count as its own");
                None
            }
        });
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
            let entries: Vec<MappingEntry> =
                table.entries().iter().filter(|e| e.block == id).copied().collect();
            let mine = match own_unplaced(b, &entries, pagemap.as_ref()) {
                Ok(n) => n,
                Err(e) => {
                    log::debug!("client '{client}': reading its pagemap failed ({e}); unplaced pages in its ranges count as its own");
                    own_unplaced(b, &entries, None)?
                }
            };
            let dropped = drop_all_unplaced(b)?;
            let mine = if b.holes_visible() { mine } else { mine.min(found.max(dropped)) };
            let elsewhere = dropped.saturating_sub(mine);
            if elsewhere > 0 {
                self.stats.foreign_pages += elsewhere;
                log::error!(
                    "block '{}': {elsewhere} page(s) that client '{client}' does not map itself were populated behind the broker (through a mapping no userfaultfd watches); dropped them so that they fault",
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

/// How many unplaced pages of `b` the client maps itself through `entries`: by its pagemap, or,
/// without one, every unplaced page in its ranges (on hugetlbfs, every page not received).
fn own_unplaced(b: &RamBlock, entries: &[MappingEntry], pagemap: Option<&Pagemap>) -> Result<u64> {
    let read = |e| Error::io("read the client's pagemap", e);
    let ps = b.page_size();
    let mut mine = 0;
    for e in entries {
        let runs = match b.find_unplaced(e.block_offset, e.len)? {
            Some(runs) => runs,
            None => {
                // hugetlbfs: no list of holes; the pages not received stand for them.
                let (first, end) = (b.page_index(e.block_offset), b.page_index(e.block_offset + e.len));
                b.received().runs(first, end, false).map(|(i, n)| (i as u64 * ps, n as u64 * ps)).collect()
            }
        };
        for (o, l) in runs {
            let addr = e.client_addr + (o - e.block_offset);
            mine += match pagemap {
                // A huge page mapped in the client shows in its first 4 KiB entry.
                Some(pm) if ps > SMALL_PAGE => {
                    let mut n = 0;
                    for p in (0..l).step_by(crate::conv::usize_of(ps)) {
                        n += u64::from(pm.mapped(addr + p, SMALL_PAGE).map_err(read)? > 0);
                    }
                    n
                }
                Some(pm) => pm.mapped(addr, l).map_err(read)?,
                None => l / ps,
            };
        }
    }
    Ok(mine)
}

/// Drop every unplaced page of the block, whoever populated it; returns how many there were.
fn drop_all_unplaced(b: &RamBlock) -> Result<u64> {
    match b.find_unplaced(0, b.size())? {
        Some(runs) => {
            runs.iter().try_fold(0, |n, &(o, l)| b.drop_unplaced(o, l).map(|_| n + l / b.page_size()))
        }
        None => b.drop_unplaced(0, b.size()),
    }
}
