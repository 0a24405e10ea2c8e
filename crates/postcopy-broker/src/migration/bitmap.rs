//! Page bitmaps on the wire side: runs of set or clear bits as byte ranges (dirty pages to
//! discard, missing pages to resend), the destination's received bitmap cut into Resume chunks,
//! and [`ReceivedMap`], the source's reassembly of those chunks after a reconnect.
//!
//! Bitmaps are `u64` words, bit `i` in word `i / 64` at position `i % 64` (as
//! [`AtomicBitmap::to_words`](crate::ram::AtomicBitmap::to_words) returns them); on the wire they
//! are the same bits as little-endian bytes.

use super::wire::{ByteRange, Frame, FrameType, WireError};
use crate::conv::usize_of;

fn bit(words: &[u64], i: u64) -> bool {
    words.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// Maximal runs `(first_bit, count)` of bits equal to `value` among the first `nbits` bits
/// (bits beyond `words` read as clear). Whole words that cannot contain such a bit are skipped.
pub fn bit_runs(words: &[u64], nbits: u64, value: bool) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut i = 0u64;
    std::iter::from_fn(move || {
        // Find the start of the next run.
        while i < nbits {
            if i % 64 == 0 {
                let w = words.get((i / 64) as usize).copied().unwrap_or(0);
                let skip = if value { w == 0 } else { w == u64::MAX };
                if skip {
                    i += 64;
                    continue;
                }
            }
            if bit(words, i) == value {
                break;
            }
            i += 1;
        }
        if i >= nbits {
            return None;
        }
        let start = i;
        while i < nbits {
            if i % 64 == 0 && i + 64 <= nbits {
                let w = words.get((i / 64) as usize).copied().unwrap_or(0);
                let full = if value { w == u64::MAX } else { w == 0 };
                if full {
                    i += 64;
                    continue;
                }
            }
            if bit(words, i) != value {
                break;
            }
            i += 1;
        }
        Some((start, i - start))
    })
}

/// The set bits of a dirty bitmap as byte ranges, one bit per `unit` bytes.
pub fn dirty_ranges(words: &[u64], nbits: u64, unit: u64) -> impl Iterator<Item = ByteRange> + '_ {
    bit_runs(words, nbits, true).map(move |(s, n)| ByteRange::new(s * unit, n * unit))
}

/// The clear bits of a received bitmap as byte ranges (the pages still missing).
pub fn missing_ranges(words: &[u64], nbits: u64, page_size: u64) -> impl Iterator<Item = ByteRange> + '_ {
    bit_runs(words, nbits, false).map(move |(s, n)| ByteRange::new(s * page_size, n * page_size))
}

/// One Resume frame's worth of a received bitmap, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeChunk {
    /// Block index.
    pub block: u32,
    /// First page covered.
    pub first_page: u64,
    /// Pages covered.
    pub page_count: u64,
    /// The bits, little-endian bytes.
    pub bitmap: Vec<u8>,
}

impl ResumeChunk {
    /// The Resume frame carrying this chunk.
    pub fn frame(&self) -> Frame<'_> {
        Frame::Resume {
            block: self.block,
            first_page: self.first_page,
            page_count: self.page_count,
            bitmap: &self.bitmap,
        }
    }
}

/// Cut the received bitmap of `block` (`page_count` bits) into Resume chunks in ascending order,
/// each with at most `max_bitmap_bytes` bytes of bitmap (at least 1; use the peer's
/// `max_payload - 20`).
pub fn resume_chunks(
    block: u32,
    words: &[u64],
    page_count: u64,
    max_bitmap_bytes: usize,
) -> Vec<ResumeChunk> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let per_chunk = max_bitmap_bytes.max(1) as u64 * 8;
    let mut out = Vec::new();
    let mut first = 0u64;
    while first < page_count {
        let n = per_chunk.min(page_count - first);
        let lo = (first / 8) as usize;
        let mut bitmap: Vec<u8> =
            (lo..lo + usize_of(n.div_ceil(8))).map(|i| bytes.get(i).copied().unwrap_or(0)).collect();
        if n % 8 != 0 {
            if let Some(last) = bitmap.last_mut() {
                *last &= (1u8 << (n % 8)) - 1;
            }
        }
        out.push(ResumeChunk { block, first_page: first, page_count: n, bitmap });
        first += n;
    }
    out
}

/// The source's copy of one block's received bitmap, rebuilt from Resume chunks that arrive in
/// ascending, contiguous order starting at page 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedMap {
    words: Vec<u64>,
    page_count: u64,
    next: u64,
}

impl ReceivedMap {
    /// An empty map for a block of `page_count` pages.
    pub fn new(page_count: u64) -> ReceivedMap {
        ReceivedMap { words: vec![0; usize_of(page_count.div_ceil(64))], page_count, next: 0 }
    }

    /// Apply one chunk (already checked by the decoder against the block). Fails if it is not the
    /// next one in order.
    pub fn apply(&mut self, first_page: u64, page_count: u64, bitmap: &[u8]) -> Result<(), WireError> {
        if first_page != self.next || first_page.saturating_add(page_count) > self.page_count {
            return Err(WireError::Malformed {
                frame: FrameType::Resume,
                why: format!(
                    "chunk for pages {first_page}+{page_count} is out of order (expected page {} of {})",
                    self.next, self.page_count
                ),
            });
        }
        for i in 0..page_count {
            let set = bitmap.get((i / 8) as usize).is_some_and(|b| b & (1 << (i % 8)) != 0);
            if set {
                let p = first_page + i;
                if let Some(w) = self.words.get_mut((p / 64) as usize) {
                    *w |= 1 << (p % 64);
                }
            }
        }
        self.next += page_count;
        Ok(())
    }

    /// Whether every page of the block has been covered by a chunk.
    pub fn is_complete(&self) -> bool {
        self.next == self.page_count
    }

    /// The bitmap words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The ranges the destination does not have: exactly what must be resent.
    pub fn missing(&self, page_size: u64) -> Vec<ByteRange> {
        missing_ranges(&self.words, self.page_count, page_size).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive_runs(bits: &[bool], value: bool) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, &b) in bits.iter().enumerate() {
            if b == value {
                match out.last_mut() {
                    Some((s, n)) if *s + *n == i as u64 => *n += 1,
                    _ => out.push((i as u64, 1)),
                }
            }
        }
        out
    }

    fn words_of(bits: &[bool]) -> Vec<u64> {
        let mut w = vec![0u64; bits.len().div_ceil(64)];
        for (i, &b) in bits.iter().enumerate() {
            if b {
                w[i / 64] |= 1 << (i % 64);
            }
        }
        w
    }

    #[test]
    fn runs_of_simple_maps() {
        let w = [0b1011_0000u64, u64::MAX];
        assert_eq!(bit_runs(&w, 128, true).collect::<Vec<_>>(), vec![(4, 2), (7, 1), (64, 64)]);
        assert_eq!(bit_runs(&w, 128, false).collect::<Vec<_>>(), vec![(0, 4), (6, 1), (8, 56)]);
        assert_eq!(bit_runs(&w, 70, true).last(), Some((64, 6)));
        assert_eq!(
            dirty_ranges(&w, 8, 4096).collect::<Vec<_>>(),
            vec![ByteRange::new(4 * 4096, 2 * 4096), ByteRange::new(7 * 4096, 4096)]
        );
        assert_eq!(bit_runs(&[], 10, false).collect::<Vec<_>>(), vec![(0, 10)]);
    }

    proptest! {
        #[test]
        fn runs_match_naive(bits in proptest::collection::vec(any::<bool>(), 0..400), dense in any::<bool>()) {
            let bits: Vec<bool> = if dense { bits.iter().map(|b| !b || bits.len() % 3 == 0).collect() } else { bits };
            let w = words_of(&bits);
            let n = bits.len() as u64;
            prop_assert_eq!(bit_runs(&w, n, true).collect::<Vec<_>>(), naive_runs(&bits, true));
            prop_assert_eq!(bit_runs(&w, n, false).collect::<Vec<_>>(), naive_runs(&bits, false));
        }

        #[test]
        fn resume_chunks_rebuild_the_map(bits in proptest::collection::vec(any::<bool>(), 1..700), max in 1usize..20) {
            let w = words_of(&bits);
            let n = bits.len() as u64;
            let chunks = resume_chunks(3, &w, n, max);
            let mut map = ReceivedMap::new(n);
            let table = crate::migration::wire::BlockTable::new(vec![
                crate::migration::wire::BlockInfo::new("a", 4096, 4096),
                crate::migration::wire::BlockInfo::new("b", 4096, 4096),
                crate::migration::wire::BlockInfo::new("c", 4096, 4096),
                crate::migration::wire::BlockInfo::new("d", n * 4096, 4096),
            ]).unwrap();
            let mut dec = crate::migration::wire::Decoder::with_blocks(Default::default(), table);
            for c in &chunks {
                prop_assert!(c.bitmap.len() <= max);
                let mut b = Vec::new();
                crate::migration::wire::encode(&c.frame(), &mut b).unwrap();
                dec.feed(&b);
                match dec.next_frame().unwrap() {
                    Some(Frame::Resume { first_page, page_count, bitmap, .. }) => map.apply(first_page, page_count, bitmap).unwrap(),
                    other => panic!("{other:?}"),
                }
            }
            prop_assert!(map.is_complete());
            prop_assert_eq!(map.words(), &w[..]);
            let missing: Vec<ByteRange> = naive_runs(&bits, false).iter().map(|&(s, c)| ByteRange::new(s * 4096, c * 4096)).collect();
            prop_assert_eq!(map.missing(4096), missing);
        }
    }

    #[test]
    fn out_of_order_chunks_are_refused() {
        let mut m = ReceivedMap::new(16);
        assert!(m.apply(8, 8, &[0xff]).is_err());
        m.apply(0, 8, &[0xff]).unwrap();
        assert!(m.apply(0, 8, &[0xff]).is_err());
        assert!(m.apply(8, 9, &[0xff, 1]).is_err());
        m.apply(8, 8, &[0x0f]).unwrap();
        assert!(m.is_complete());
        assert_eq!(m.missing(4096), vec![ByteRange::new(12 * 4096, 4 * 4096)]);
    }
}
