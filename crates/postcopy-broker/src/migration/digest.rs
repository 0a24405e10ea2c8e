//! End-to-end digests of what travelled: both ends keep, per block, a table with a 64-bit hash
//! (XXH3) of the last version of every page that went over the wire, zero runs included (a zero
//! page hashes like a page of zeros). At the end the source sends each block's table folded in
//! page order ([`BlockDigest::fold`]) in a `Digests` frame before its Complete, and the
//! destination compares them with its own folds: a mismatch fails the migration.
//!
//! Why a table and not a running hash of the stream: a page can travel more than once (a
//! precopy page dirtied and sent again, a demand answer and the background copy of the same
//! page, pages in flight when a connection dropped and sent again after the resume) and the
//! two connections interleave differently on each end. Keeping the last version per page makes
//! the result independent of order and repetition, and equal on both ends exactly when every
//! page the destination kept is the page the source meant. It costs 8 bytes per page (2 MiB per
//! GiB of 4 KiB pages) and one XXH3 pass over data that is in the cache anyway.
//!
//! Rules of the destination ([`Received`]): before Listen a page simply replaces its entry
//! (precopy) and a Discard clears its pages' entries; during postcopy the first copy of a page
//! sets the entry and every later copy must hash the same (the source's RAM does not change
//! during postcopy), otherwise the migration fails at once: one of the copies was changed on
//! the way and the one placed may be it. This applies in every transport mode; with TLS or the
//! PSK mode a changed record is caught earlier, by its authentication tag.

use crate::conv::usize_of;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::ram::{AtomicWords, Mapping};

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::wire::{BlockTable, Frame};

/// Words every [`DigestError`] text holds: a source that reads them from the destination stops
/// (a resume cannot mend RAM that is known to be wrong).
pub const UNTRUSTED: &str = "this RAM cannot be trusted";

/// Why the digests say the migration cannot be trusted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    /// The folds of some blocks differ between the ends.
    #[error("the pages that arrived differ from the pages the source sent, in block(s) {}: data was changed or lost on the way; this RAM cannot be trusted, run the migration again", .0.join(", "))]
    Mismatch(Vec<String>),
    /// Two copies of a page arrived with different contents during postcopy.
    #[error("page {page} of block '{block}' arrived twice with different contents: one copy was changed on the way and may be the one placed; this RAM cannot be trusted, run the migration again")]
    Conflict {
        /// Block name.
        block: String,
        /// Page index.
        page: u64,
    },
    /// The source finished without sending its digests.
    #[error("the source completed without sending its page digests, so what arrived cannot be checked and this RAM cannot be trusted; use a source of this version")]
    Missing,
}

/// XXH3 of one page; never 0 (0 marks a page not recorded).
pub fn page_hash(data: &[u8]) -> u64 {
    xxh3_64(data).max(1)
}

/// The per-page hash table of one block.
#[derive(Debug)]
pub struct BlockDigest {
    page_size: u64,
    zero: u64,
    pages: AtomicWords,
}

impl BlockDigest {
    /// A table of `pages` pages of `page_size` bytes, nothing recorded.
    pub fn new(page_size: u64, pages: u64) -> BlockDigest {
        let zero = page_hash(&vec![0u8; usize_of(page_size)]);
        BlockDigest { page_size, zero, pages: AtomicWords::heap(usize_of(pages)) }
    }

    /// Each page's hash of the run at `offset`: of `data`'s pages, or of zero pages for `len`.
    fn hashes<'a>(&'a self, data: Option<&'a [u8]>, len: u64) -> impl Iterator<Item = u64> + 'a {
        let ps = usize_of(self.page_size);
        let n = data.map_or(len / self.page_size, |d| (d.len() / ps) as u64);
        (0..usize_of(n)).map(move |i| match data {
            Some(d) => page_hash(&d[i * ps..(i + 1) * ps]),
            None => self.zero,
        })
    }

    fn slots(&self, offset: u64) -> impl Iterator<Item = (u64, &AtomicU64)> {
        let first = offset / self.page_size;
        self.pages.as_slice().iter().enumerate().skip(usize_of(first)).map(|(i, a)| (i as u64, a))
    }

    /// Record the run at `offset` (page data, or `len` bytes of zero pages), replacing what was
    /// recorded for its pages.
    pub fn set(&self, offset: u64, data: Option<&[u8]>, len: u64) {
        for ((_, slot), h) in self.slots(offset).zip(self.hashes(data, len)) {
            slot.store(h, Ordering::Relaxed);
        }
    }

    /// Record the run's pages not recorded yet; returns the first page already recorded with
    /// another hash, if any.
    pub fn set_first(&self, offset: u64, data: Option<&[u8]>, len: u64) -> Option<u64> {
        let mut conflict = None;
        for ((page, slot), h) in self.slots(offset).zip(self.hashes(data, len)) {
            match slot.compare_exchange(0, h, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {}
                Err(old) if old == h => {}
                Err(_) => {
                    conflict.get_or_insert(page);
                }
            }
        }
        conflict
    }

    /// Forget the pages of `[offset, offset + len)` (discarded: they will come again).
    pub fn clear(&self, offset: u64, len: u64) {
        let n = usize_of(len / self.page_size);
        for (_, slot) in self.slots(offset).take(n) {
            slot.store(0, Ordering::Relaxed);
        }
    }

    /// Clear the bits of `words` (a received bitmap of this block, 64 pages a word) of the pages
    /// no copy was recorded for; returns how many.
    fn mask_unrecorded(&self, words: &mut [u64]) -> u64 {
        let mut n = 0;
        for (i, slot) in self.pages.as_slice().iter().enumerate() {
            let (w, m) = (i / 64, 1u64 << (i % 64));
            if slot.load(Ordering::Acquire) == 0 && words.get(w).is_some_and(|x| x & m != 0) {
                words[w] &= !m;
                n += 1;
            }
        }
        n
    }

    /// The table folded in page order (XXH3 over the little-endian hashes).
    pub fn fold(&self) -> u64 {
        let mut h = Xxh3::new();
        for p in self.pages.as_slice() {
            h.update(&p.load(Ordering::Acquire).to_le_bytes());
        }
        h.digest()
    }
}

/// The tables of every block of an announced table, in wire order.
pub fn tables(table: &BlockTable) -> Vec<BlockDigest> {
    table.iter().map(|b| BlockDigest::new(b.page_size, b.pages())).collect()
}

/// The tables of `table` in one shared memfd mapping: `fd` (None: a new zeroed memfd), which
/// must hold 8 bytes per page of every block, blocks back to back in wire order.
fn shared_tables(table: &BlockTable, fd: Option<OwnedFd>) -> crate::Result<(OwnedFd, Vec<BlockDigest>)> {
    let total: u64 = table.iter().map(|b| b.pages()).sum();
    let bytes = (total * 8).max(8);
    let fd = match fd {
        Some(fd) => {
            let len =
                nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd)).map(|st| st.st_size).unwrap_or(0);
            if u64::try_from(len).unwrap_or(0) < bytes {
                return Err(crate::Error::Invalid(format!(
                    "the parked digest table holds {len} bytes, the blocks need {bytes}: it belongs to another migration"
                )));
            }
            fd
        }
        None => crate::ram::new_memfd("pcb-digests", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC, bytes)?,
    };
    let map = Arc::new(Mapping::shared(fd.as_fd(), usize_of(bytes))?);
    let mut first = 0;
    let tables = table
        .iter()
        .map(|b| {
            let n = usize_of(b.pages());
            let d = BlockDigest {
                page_size: b.page_size,
                zero: page_hash(&vec![0u8; usize_of(b.page_size)]),
                pages: AtomicWords::mapped(Arc::clone(&map), first, n)?,
            };
            first += n;
            Ok(d)
        })
        .collect::<crate::Result<Vec<_>>>()?;
    Ok((fd, tables))
}

/// The destination's digests: what arrived, and what the source says it sent.
#[derive(Debug, Default)]
pub struct Received {
    blocks: OnceLock<(Vec<String>, Vec<BlockDigest>)>,
    /// The memfd under the tables, when they are shared ([`Received::set_blocks_shared`]).
    shared: OnceLock<OwnedFd>,
    source: Mutex<Option<Vec<u64>>>,
    conflict: Mutex<Option<DigestError>>,
}

impl Received {
    /// Start recording for the blocks of `table` (once, at Hello; later calls do nothing).
    pub fn set_blocks(&self, table: &BlockTable) {
        let _ = self.blocks.set((table.iter().map(|b| b.name.clone()).collect(), tables(table)));
    }

    /// Start recording for the blocks of `table` in a shared memfd (`fd`: one parked by a
    /// broker that died, whose records go on; None: a new one), so that a restarted broker keeps
    /// what arrived before ([`Received::shared_fd`] is what to park). Once, like `set_blocks`.
    pub fn set_blocks_shared(&self, table: &BlockTable, fd: Option<OwnedFd>) -> crate::Result<()> {
        let (fd, tables) = shared_tables(table, fd)?;
        let names = table.iter().map(|b| b.name.clone()).collect();
        if self.blocks.set((names, tables)).is_ok() {
            let _ = self.shared.set(fd);
        }
        Ok(())
    }

    /// The memfd holding the tables, when they are shared.
    pub fn shared_fd(&self) -> Option<BorrowedFd<'_>> {
        self.shared.get().map(AsFd::as_fd)
    }

    fn block(&self, wire: u32) -> Option<&BlockDigest> {
        self.blocks.get().and_then(|(_, b)| b.get(wire as usize))
    }

    /// A frame read before Listen: precopy pages replace their entries, Discards clear them.
    pub fn observe_precopy(&self, f: &Frame<'_>) {
        match f {
            Frame::Page { block, offset, data, .. } => {
                if let Some(b) = self.block(*block) {
                    b.set(*offset, Some(data), 0);
                }
            }
            Frame::ZeroRun { block, offset, len, .. } => {
                if let Some(b) = self.block(*block) {
                    b.set(*offset, None, *len);
                }
            }
            Frame::Discard { block, ranges } => {
                if let Some(b) = self.block(*block) {
                    for r in ranges {
                        b.clear(r.offset, r.len);
                    }
                }
            }
            _ => {}
        }
    }

    /// A frame read during postcopy: record page copies (see the module doc) and keep the
    /// source's digests. True when the frame was the digests (nothing else to do with it).
    pub fn observe(&self, f: &Frame<'_>) -> bool {
        let (block, offset, data, len) = match f {
            Frame::Page { block, offset, data, .. } => (*block, *offset, Some(*data), 0),
            Frame::ZeroRun { block, offset, len, .. } => (*block, *offset, None, *len),
            Frame::Digests { digests } => {
                if let Ok(mut g) = self.source.lock() {
                    *g = Some(digests.clone());
                }
                return true;
            }
            _ => return false,
        };
        let Some(b) = self.block(block) else { return false };
        if let Some(page) = b.set_first(offset, data, len) {
            let name =
                self.blocks.get().and_then(|(n, _)| n.get(block as usize).cloned()).unwrap_or_default();
            let e = DigestError::Conflict { block: name, page };
            log::error!("{e}");
            if let Ok(mut g) = self.conflict.lock() {
                g.get_or_insert(e);
            }
        }
        false
    }

    /// Before a resume: clear, in `words` (the received bitmap of wire block `wire` as the
    /// Resume frames carry it), the pages received without a copy of the source's: a page a
    /// client removed before it arrived is placed here as zeros when it faults, and if the
    /// source's copy was lost in the cut, the digests would lack it. The source sends such pages
    /// again; their digests are recorded and their placement skipped (they are received).
    /// Returns how many were cleared (0 when digests are not kept).
    pub fn mask_unrecorded(&self, wire: usize, words: &mut [u64]) -> u64 {
        self.blocks.get().and_then(|(_, b)| b.get(wire)).map_or(0, |b| b.mask_unrecorded(words))
    }

    /// A conflict seen so far, if any.
    pub fn conflict(&self) -> Option<DigestError> {
        self.conflict.lock().ok().and_then(|g| g.clone())
    }

    /// At the end: the source's digests must equal ours, block by block.
    pub fn verify(&self) -> Result<(), DigestError> {
        if let Some(e) = self.conflict() {
            return Err(e);
        }
        let source = self.source.lock().ok().and_then(|g| g.clone()).ok_or(DigestError::Missing)?;
        let Some((names, ours)) = self.blocks.get() else { return Err(DigestError::Missing) };
        let bad: Vec<String> = names
            .iter()
            .zip(ours)
            .enumerate()
            .filter(|(i, (_, b))| source.get(*i) != Some(&b.fold()))
            .map(|(_, (n, _))| format!("'{n}'"))
            .collect();
        if bad.is_empty() {
            log::info!("digests of {} block(s) match the source's: every page arrived as sent", names.len());
            Ok(())
        } else {
            let e = DigestError::Mismatch(bad);
            log::error!("{e}");
            Err(e)
        }
    }
}

/// A digest mismatch as the broker's [`crate::Error::Digest`] (error.rs is below migration).
impl From<DigestError> for crate::error::Error {
    fn from(e: DigestError) -> crate::error::Error {
        crate::error::Error::Digest(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_repetition_do_not_change_the_fold() {
        let data: Vec<u8> = (0..8 * 4096).map(|i| (i * 13 % 251) as u8).collect();
        let a = BlockDigest::new(4096, 8);
        a.set(0, Some(&data), 0);
        let b = BlockDigest::new(4096, 8);
        b.set(4 * 4096, Some(&data[4 * 4096..]), 0);
        b.set(0, Some(&data[..4 * 4096]), 0);
        b.set(4096, Some(&data[4096..2 * 4096]), 0);
        assert_eq!(a.fold(), b.fold());
        let c = BlockDigest::new(4096, 8);
        c.set(0, Some(&data[..7 * 4096]), 0);
        assert_ne!(a.fold(), c.fold(), "a missing page changes the fold");
    }

    #[test]
    fn zero_runs_hash_like_zero_pages() {
        let a = BlockDigest::new(4096, 4);
        a.set(0, None, 4 * 4096);
        let b = BlockDigest::new(4096, 4);
        b.set(0, Some(&[0u8; 4 * 4096]), 0);
        assert_eq!(a.fold(), b.fold());
    }

    #[test]
    fn a_second_copy_must_match_the_first() {
        let b = BlockDigest::new(4096, 4);
        let page = vec![7u8; 4096];
        assert_eq!(b.set_first(4096, Some(&page), 0), None);
        assert_eq!(b.set_first(4096, Some(&page), 0), None);
        let mut bad = page.clone();
        bad[100] ^= 1;
        assert_eq!(b.set_first(0, Some(&[page.clone(), bad].concat()), 0), Some(1));
        b.clear(4096, 4096);
        assert_eq!(b.set_first(4096, Some(&page), 0), None, "a cleared page may come again");
    }

    #[test]
    fn shared_tables_survive_in_their_memfd() {
        let t = BlockTable::new(vec![
            crate::migration::wire::BlockInfo::new("a", 4 * 4096, 4096),
            crate::migration::wire::BlockInfo::new("b", 2 * 4096, 4096),
        ])
        .unwrap();
        let r = Received::default();
        r.set_blocks_shared(&t, None).unwrap();
        let page = vec![9u8; 4096];
        r.observe(&Frame::Page { block: 1, offset: 4096, demand: false, data: &page });
        let again = Received::default();
        again.set_blocks_shared(&t, Some(r.shared_fd().unwrap().try_clone_to_owned().unwrap())).unwrap();
        let fold = |x: &Received, i: usize| x.blocks.get().unwrap().1[i].fold();
        assert_eq!(fold(&again, 1), fold(&r, 1), "the second one reads what the first recorded");
        let heap = BlockDigest::new(4096, 2);
        heap.set(4096, Some(&page), 0);
        assert_eq!(fold(&again, 1), heap.fold());
        assert_eq!(fold(&again, 0), BlockDigest::new(4096, 4).fold());
    }

    #[test]
    fn a_resume_asks_again_for_received_pages_without_a_recorded_copy() {
        let t = BlockTable::new(vec![crate::migration::wire::BlockInfo::new("a", 70 * 4096, 4096)]).unwrap();
        let r = Received::default();
        let mut words = vec![u64::MAX, 0b11_1111];
        assert_eq!(r.mask_unrecorded(0, &mut words), 0, "no digests kept: nothing to ask for");
        r.set_blocks(&t);
        r.observe(&Frame::ZeroRun { block: 0, offset: 0, len: 64 * 4096, demand: false });
        r.observe(&Frame::Page { block: 0, offset: 65 * 4096, demand: false, data: &[1u8; 4096] });
        // Pages 64 and 66-69 were received without a copy of the source's.
        assert_eq!(r.mask_unrecorded(0, &mut words), 5);
        assert_eq!(words, vec![u64::MAX, 0b10]);
        assert_eq!(r.mask_unrecorded(1, &mut words), 0, "an unknown block is left alone");
    }

    #[test]
    fn received_checks_the_source_digests() {
        let t = BlockTable::new(vec![
            crate::migration::wire::BlockInfo::new("a", 4 * 4096, 4096),
            crate::migration::wire::BlockInfo::new("b", 4 * 4096, 4096),
        ])
        .unwrap();
        let r = Received::default();
        r.set_blocks(&t);
        assert_eq!(r.verify(), Err(DigestError::Missing));
        let page = vec![3u8; 4096];
        for block in 0..2 {
            r.observe_precopy(&Frame::Page { block, offset: 0, demand: false, data: &page });
            r.observe(&Frame::ZeroRun { block, offset: 4096, len: 3 * 4096, demand: false });
        }
        let src = tables(&t);
        for b in &src {
            b.set(0, Some(&page), 0);
            b.set(4096, None, 3 * 4096);
        }
        let mut digests: Vec<u64> = src.iter().map(BlockDigest::fold).collect();
        assert!(r.observe(&Frame::Digests { digests: digests.clone() }));
        assert_eq!(r.verify(), Ok(()));
        digests[1] ^= 1;
        r.observe(&Frame::Digests { digests });
        assert_eq!(r.verify(), Err(DigestError::Mismatch(vec!["'b'".into()])));
    }
}
