//! Source-side discard batching (the counterpart of QEMU's postcopy_discard_send_init / _range /
//! _finish): [`DiscardBatcher`] collects the dirty ranges of one block in any order, merges
//! adjacent and overlapping ones, widens each to whole host pages (a huge page that is partly dirty
//! is wholly dirty, the hugetlbfs rule), and emits Discard frames of at most N sorted, disjoint
//! ranges.

use std::collections::BTreeMap;

use super::bitmap::dirty_ranges;
use super::wire::{BlockInfo, BlockTable, ByteRange, Frame, FrameType, WireError};

/// Collects the ranges of one block to discard on the destination.
///
/// `new` is send_init, [`add`](DiscardBatcher::add) is send_range, [`finish`](DiscardBatcher::finish)
/// is send_finish. Ranges are held until `finish` because a later range may merge with an
/// earlier one; memory is one map entry per disjoint range.
#[derive(Clone, Debug)]
pub struct DiscardBatcher {
    block: u32,
    info: BlockInfo,
    max_ranges: usize,
    /// start → end, disjoint and never adjacent (adjacent ranges are merged).
    ranges: BTreeMap<u64, u64>,
}

impl DiscardBatcher {
    /// A batcher for block `block` described by `info`, emitting at most `max_ranges` ranges per
    /// frame (clamped to 1..=65535; the receiver's [`Limits::max_discard_ranges`] is the bound to
    /// respect, QEMU uses 12).
    ///
    /// [`Limits::max_discard_ranges`]: super::wire::Limits::max_discard_ranges
    pub fn new(block: u32, info: BlockInfo, max_ranges: usize) -> DiscardBatcher {
        DiscardBatcher {
            block,
            info,
            max_ranges: max_ranges.clamp(1, u16::MAX as usize),
            ranges: BTreeMap::new(),
        }
    }

    /// A batcher for block `block` of `table`.
    pub fn for_block(table: &BlockTable, block: u32, max_ranges: usize) -> Result<DiscardBatcher, WireError> {
        let info = table.block(FrameType::Discard, block)?.clone();
        Ok(DiscardBatcher::new(block, info, max_ranges))
    }

    /// The block index.
    pub fn block(&self) -> u32 {
        self.block
    }

    /// Add the dirty bytes `[offset, offset + len)`, widened to whole pages of the block. A zero
    /// length adds nothing. Bytes outside the block are an error (nothing is added).
    pub fn add(&mut self, offset: u64, len: u64) -> Result<(), WireError> {
        let ps = self.info.page_size;
        let outside = || WireError::BadRange {
            frame: FrameType::Discard,
            block: self.info.name.clone(),
            offset,
            len,
            size: self.info.size,
            page_size: ps,
            why: "outside the block",
        };
        let end = offset.checked_add(len).filter(|&e| e <= self.info.size).ok_or_else(outside)?;
        if len == 0 {
            return Ok(());
        }
        // size is a multiple of ps, so rounding end up stays inside the block.
        let mut start = offset - offset % ps;
        let mut end = end.div_ceil(ps) * ps;
        // Merge with every existing range that overlaps or touches [start, end).
        while let Some((&s, &e)) = self.ranges.range(..=end).next_back() {
            if e < start {
                break;
            }
            self.ranges.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
        Ok(())
    }

    /// Add the set bits of a dirty bitmap, one bit per `unit` bytes from the block's start (the
    /// unit may be smaller than the block's page size: pages are widened).
    pub fn add_bitmap(&mut self, words: &[u64], nbits: u64, unit: u64) -> Result<(), WireError> {
        for r in dirty_ranges(words, nbits, unit) {
            self.add(r.offset, r.len)?;
        }
        Ok(())
    }

    /// Number of disjoint ranges collected.
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// Whether nothing was collected.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Total bytes to discard.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// The collected ranges, sorted.
    pub fn ranges(&self) -> impl Iterator<Item = ByteRange> + '_ {
        self.ranges.iter().map(|(&s, &e)| ByteRange::new(s, e - s))
    }

    /// Emit the collected ranges as Discard frames (sorted, at most `max_ranges` each) and empty
    /// the batcher. No frames when nothing was added.
    pub fn finish(&mut self) -> Vec<Frame<'static>> {
        let all: Vec<ByteRange> = self.ranges().collect();
        self.ranges.clear();
        all.chunks(self.max_ranges)
            .map(|c| Frame::Discard { block: self.block, ranges: c.to_vec() })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::wire::{encode, Decoder, Limits};
    use proptest::prelude::*;

    fn batcher(page_size: u64, pages: u64, max: usize) -> DiscardBatcher {
        DiscardBatcher::new(2, BlockInfo::new("ram", page_size * pages, page_size), max)
    }

    #[test]
    fn merges_and_widens() {
        let mut b = batcher(4096, 64, 12);
        b.add(8192, 4096).unwrap();
        b.add(0, 4096).unwrap();
        b.add(4096, 1).unwrap(); // widened to page 1, joins pages 0 and 2
        b.add(20 * 4096 + 5, 10).unwrap();
        b.add(0, 0).unwrap();
        assert_eq!(
            b.ranges().collect::<Vec<_>>(),
            vec![ByteRange::new(0, 3 * 4096), ByteRange::new(20 * 4096, 4096)]
        );
        assert!(b.add(63 * 4096, 8192).is_err());
        assert!(b.add(u64::MAX, 2).is_err());
        assert_eq!(b.range_count(), 2);
        let frames = b.finish();
        assert_eq!(frames.len(), 1);
        assert!(b.is_empty());
        assert!(b.finish().is_empty());
    }

    #[test]
    fn huge_pages_partly_dirty_become_wholly_dirty() {
        let hp = 2 << 20;
        let mut b = batcher(hp, 8, 12);
        b.add(hp + 4096, 4096).unwrap();
        b.add(3 * hp - 1, 2).unwrap();
        assert_eq!(b.ranges().collect::<Vec<_>>(), vec![ByteRange::new(hp, 3 * hp)]);
        let mut b = batcher(hp, 8, 12);
        // A 4 KiB-granular dirty bitmap: bits 513 and 2047 dirty → huge pages 1 and 3.
        let mut words = vec![0u64; 4096 / 64];
        words[513 / 64] |= 1 << (513 % 64);
        words[2047 / 64] |= 1 << (2047 % 64);
        b.add_bitmap(&words, 4096, 4096).unwrap();
        assert_eq!(b.ranges().collect::<Vec<_>>(), vec![ByteRange::new(hp, hp), ByteRange::new(3 * hp, hp)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        #[test]
        fn frames_cover_exactly_the_widened_input(
            huge in any::<bool>(),
            adds in proptest::collection::vec((0u64..256 * 4096, 0u64..12 * 4096), 0..80),
            max in 1usize..16,
        ) {
            let (ps, pages) = if huge { (16384u64, 64u64) } else { (4096u64, 256u64) };
            let size = ps * pages;
            let mut b = batcher(ps, pages, max);
            let mut want = vec![false; pages as usize];
            for &(off, len) in &adds {
                let ok = b.add(off, len).is_ok();
                prop_assert_eq!(ok, off + len <= size);
                if ok && len > 0 {
                    for p in off / ps..(off + len).div_ceil(ps) {
                        want[p as usize] = true;
                    }
                }
            }
            let frames = b.finish();
            let table = BlockTable::new(vec![
                BlockInfo::new("a", 4096, 4096),
                BlockInfo::new("b", 4096, 4096),
                BlockInfo::new("ram", size, ps),
            ]).unwrap();
            let mut dec = Decoder::with_blocks(Limits { max_discard_ranges: max, ..Limits::default() }, table);
            let mut got = vec![false; pages as usize];
            let mut prev_end = 0;
            for f in &frames {
                let Frame::Discard { block, ranges } = f else { panic!("{f:?}") };
                prop_assert_eq!(*block, 2);
                prop_assert!(!ranges.is_empty() && ranges.len() <= max);
                for r in ranges {
                    prop_assert!(r.len > 0 && r.offset % ps == 0 && r.len % ps == 0);
                    // Sorted and disjoint within and across frames, never adjacent (merged).
                    prop_assert!(r.offset > prev_end || (prev_end == 0 && r.offset == 0));
                    prev_end = r.end();
                    for p in r.offset / ps..r.end() / ps {
                        prop_assert!(!got[p as usize]);
                        got[p as usize] = true;
                    }
                }
                // The receiver accepts every frame.
                let mut bytes = Vec::new();
                encode(f, &mut bytes).unwrap();
                dec.feed(&bytes);
                let got_frame = dec.next_frame().unwrap();
                prop_assert_eq!(got_frame.as_ref(), Some(f));
            }
            prop_assert_eq!(got, want);
        }

        /// A dirty bitmap at any unit (smaller than, equal to or larger than the page) adds the
        /// same pages as its bits added one by one, and the page model agrees.
        #[test]
        fn bitmap_equals_its_bits_added_one_by_one(
            huge in any::<bool>(),
            unit_shift in 0u32..4,
            words in proptest::collection::vec(any::<u64>(), 0..5),
            sparse in any::<bool>(),
            nbits in 0u64..320,
        ) {
            let (ps, pages) = if huge { (16384u64, 64u64) } else { (4096u64, 256u64) };
            let size = ps * pages;
            // 1 KiB, 2 KiB, 4 KiB or 8 KiB per bit.
            let unit = 1024u64 << unit_shift;
            let words: Vec<u64> = if sparse { words.iter().map(|w| w & w.rotate_left(7) & w.rotate_left(29)).collect() } else { words };
            let bit = |i: u64| words.get((i / 64) as usize).is_some_and(|w| w >> (i % 64) & 1 == 1);
            let mut by_bitmap = batcher(ps, pages, 12);
            let mut by_bits = batcher(ps, pages, 12);
            let mut want = vec![false; pages as usize];
            let mut in_block = true;
            for i in (0..nbits).filter(|&i| bit(i)) {
                let (off, len) = (i * unit, unit);
                if off + len > size {
                    in_block = false;
                    prop_assert!(by_bits.add(off, len).is_err());
                    continue;
                }
                by_bits.add(off, len).unwrap();
                for p in off / ps..(off + len).div_ceil(ps) {
                    want[p as usize] = true;
                }
            }
            let r = by_bitmap.add_bitmap(&words, nbits, unit);
            prop_assert_eq!(r.is_ok(), in_block);
            if in_block {
                prop_assert_eq!(by_bitmap.ranges().collect::<Vec<_>>(), by_bits.ranges().collect::<Vec<_>>());
            }
            let mut got = vec![false; pages as usize];
            for rg in by_bits.ranges() {
                for p in rg.offset / ps..rg.end() / ps {
                    got[p as usize] = true;
                }
            }
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(by_bits.bytes(), want.iter().filter(|&&w| w).count() as u64 * ps);
        }

        /// A refused add (outside the block, overflowing) changes nothing; any max per frame,
        /// including 0 and huge values, gives frames of 1..=65535 ranges that cover every range.
        #[test]
        fn refusals_change_nothing_and_frames_respect_any_max(
            adds in proptest::collection::vec(
                prop_oneof![
                    4 => (0u64..64 * 4096, 0u64..8 * 4096),
                    1 => (any::<u64>(), any::<u64>()),
                    1 => ((u64::MAX - 8192)..=u64::MAX, 0u64..16384),
                ],
                0..60,
            ),
            max in prop_oneof![Just(0usize), 1usize..5, Just(usize::MAX)],
        ) {
            let mut b = batcher(4096, 64, max);
            for &(off, len) in &adds {
                let before: Vec<ByteRange> = b.ranges().collect();
                let ok = b.add(off, len).is_ok();
                prop_assert_eq!(ok, off.checked_add(len).is_some_and(|e| e <= 64 * 4096));
                if !ok || len == 0 {
                    prop_assert_eq!(b.ranges().collect::<Vec<_>>(), before);
                }
            }
            let all: Vec<ByteRange> = b.ranges().collect();
            let bytes = b.bytes();
            prop_assert_eq!(b.range_count(), all.len());
            let frames = b.finish();
            prop_assert!(b.is_empty() && b.range_count() == 0 && b.bytes() == 0);
            let per = max.clamp(1, u16::MAX as usize);
            let mut seen = Vec::new();
            for f in &frames {
                let Frame::Discard { block, ranges } = f else { panic!("{f:?}") };
                prop_assert_eq!(*block, 2);
                prop_assert!(!ranges.is_empty() && ranges.len() <= per);
                seen.extend_from_slice(ranges);
            }
            prop_assert_eq!(frames.len(), all.len().div_ceil(per));
            prop_assert_eq!(seen.iter().map(|r| r.len).sum::<u64>(), bytes);
            prop_assert_eq!(seen, all);
        }
    }

    #[test]
    fn for_block_checks_the_index() {
        let table = BlockTable::new(vec![BlockInfo::new("a", 8192, 4096)]).unwrap();
        let b = DiscardBatcher::for_block(&table, 0, 12).unwrap();
        assert_eq!(b.block(), 0);
        assert!(DiscardBatcher::for_block(&table, 1, 12).is_err());
    }
}
