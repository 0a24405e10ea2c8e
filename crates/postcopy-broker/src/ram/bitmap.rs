//! An atomic bitmap, one bit per page: the received map of a RAM block. Bits are set with
//! release ordering after a placement succeeded and tested with acquire ordering after a fault
//! was read, which is exactly the ordering the shared-wake rule needs. Its words live on the
//! heap or in a shared memfd mapping ([`AtomicWords`]; see `ram::ledger`).

use std::sync::atomic::{AtomicU64, Ordering};

use super::words::AtomicWords;
use crate::error::{Error, Result};

/// A fixed-size bitmap whose bits can be set, cleared and tested from any thread.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: AtomicWords,
    bits: usize,
}

impl AtomicBitmap {
    /// A bitmap of `bits` clear bits.
    pub fn new(bits: usize) -> AtomicBitmap {
        AtomicBitmap { words: AtomicWords::heap(bits.div_ceil(64)), bits }
    }

    /// A bitmap of `bits` bits over `words` (as they are: a shared mapping keeps what was set).
    pub fn in_words(words: AtomicWords, bits: usize) -> Result<AtomicBitmap> {
        if words.as_slice().len() < bits.div_ceil(64) {
            return Err(Error::Invalid(format!(
                "{} words cannot hold a bitmap of {bits} bits",
                words.as_slice().len()
            )));
        }
        Ok(AtomicBitmap { words, bits })
    }

    #[inline]
    fn w(&self) -> &[AtomicU64] {
        self.words.as_slice()
    }

    /// Number of bits.
    pub fn len(&self) -> usize {
        self.bits
    }

    /// Whether the bitmap has no bits.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Test bit `i` (false when out of range).
    pub fn test(&self, i: usize) -> bool {
        if i >= self.bits {
            return false;
        }
        self.w()[i / 64].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Set bit `i`; returns its previous value. Out of range is a no-op returning true.
    pub fn set(&self, i: usize) -> bool {
        if i >= self.bits {
            return true;
        }
        let m = 1u64 << (i % 64);
        self.w()[i / 64].fetch_or(m, Ordering::AcqRel) & m != 0
    }

    /// Clear bit `i`; returns its previous value.
    pub fn clear(&self, i: usize) -> bool {
        if i >= self.bits {
            return false;
        }
        let m = 1u64 << (i % 64);
        self.w()[i / 64].fetch_and(!m, Ordering::AcqRel) & m != 0
    }

    /// Apply `op` to every word overlapping `[start, start+n)` with the mask of those bits.
    fn for_range(&self, start: usize, n: usize, mut op: impl FnMut(&AtomicU64, u64)) {
        let end = start.saturating_add(n).min(self.bits);
        let mut i = start;
        while i < end {
            let w = i / 64;
            let lo = i % 64;
            let hi = (end - w * 64).min(64);
            let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
            op(&self.w()[w], mask);
            i = (w + 1) * 64;
        }
    }

    /// Set `n` bits from `start`.
    pub fn set_range(&self, start: usize, n: usize) {
        self.for_range(start, n, |w, m| {
            w.fetch_or(m, Ordering::AcqRel);
        });
    }

    /// Clear `n` bits from `start`.
    pub fn clear_range(&self, start: usize, n: usize) {
        self.for_range(start, n, |w, m| {
            w.fetch_and(!m, Ordering::AcqRel);
        });
    }

    /// Set the clear bits among `[start, start+n)`, which must lie in one word; returns which
    /// bits this call set, bit 0 standing for `start` (bits already set, or out of range, are 0).
    pub fn claim_in_word(&self, start: usize, n: usize) -> u64 {
        let n = n.min(64 - start % 64).min(self.bits.saturating_sub(start));
        if n == 0 {
            return 0;
        }
        let lo = start % 64;
        let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << lo };
        let prev = self.w()[start / 64].fetch_or(mask, Ordering::AcqRel);
        (mask & !prev) >> lo
    }

    /// Number of set bits in `[start, start+n)`.
    pub fn count_range(&self, start: usize, n: usize) -> usize {
        let mut c = 0;
        self.for_range(start, n, |w, m| c += (w.load(Ordering::Acquire) & m).count_ones() as usize);
        c
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> usize {
        self.count_range(0, self.bits)
    }

    /// Whether every bit is set.
    pub fn all_set(&self) -> bool {
        self.count_ones() == self.bits
    }

    /// The first clear bit at or after `from`.
    pub fn next_clear(&self, from: usize) -> Option<usize> {
        let mut i = from;
        while i < self.bits {
            let w = self.w()[i / 64].load(Ordering::Acquire) | ((1u64 << (i % 64)) - 1);
            if w != u64::MAX {
                let bit = (i / 64) * 64 + (!w).trailing_zeros() as usize;
                return (bit < self.bits).then_some(bit);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// The first set bit in `[from, end)`, or `end` (clipped to the length) when there is none.
    pub fn next_set(&self, from: usize, end: usize) -> usize {
        self.next_equal(from, end, true)
    }

    /// The first clear bit in `[from, end)`, or `end` (clipped to the length) when there is none.
    pub fn next_clear_in(&self, from: usize, end: usize) -> usize {
        self.next_equal(from, end, false)
    }

    /// The first bit in `[from, end)` equal to `value`, or `end` (clipped to the length).
    fn next_equal(&self, from: usize, end: usize, value: bool) -> usize {
        let end = end.min(self.bits);
        let mut i = from;
        while i < end {
            let w = self.w()[i / 64].load(Ordering::Acquire);
            let w = if value { w } else { !w } & !((1u64 << (i % 64)) - 1);
            if w != 0 {
                return ((i / 64) * 64 + w.trailing_zeros() as usize).min(end);
            }
            i = (i / 64 + 1) * 64;
        }
        end
    }

    /// The maximal runs `(first, n)` of bits equal to `value` in `[start, end)`, in order. Bits
    /// are read as the iteration goes: one that changes meanwhile may or may not be seen.
    pub fn runs(&self, start: usize, end: usize, value: bool) -> impl Iterator<Item = (usize, usize)> + '_ {
        let end = end.min(self.bits);
        let mut i = start;
        std::iter::from_fn(move || {
            let first = self.next_equal(i, end, value);
            if first >= end {
                return None;
            }
            i = self.next_equal(first + 1, end, !value);
            Some((first, i - first))
        })
    }

    /// The bits as little-endian words (for the resume message).
    pub fn to_words(&self) -> Vec<u64> {
        self.w().iter().map(|w| w.load(Ordering::Acquire)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_set_finds_the_end_of_a_clear_run() {
        let b = AtomicBitmap::new(200);
        assert_eq!(b.next_set(0, 200), 200);
        assert_eq!(b.next_set(0, 500), 200, "clipped to the length");
        b.set(130);
        assert_eq!(b.next_set(0, 200), 130);
        assert_eq!(b.next_set(130, 200), 130);
        assert_eq!(b.next_set(131, 200), 200);
        assert_eq!(b.next_set(5, 100), 100);
        b.set(3);
        assert_eq!(b.next_set(0, 64), 3);
        assert_eq!(b.next_set(4, 4), 4);
    }

    #[test]
    fn runs_of_set_and_clear_bits_across_words() {
        let b = AtomicBitmap::new(200);
        b.set_range(3, 2);
        b.set_range(60, 70);
        b.set(199);
        let set: Vec<_> = b.runs(0, 200, true).collect();
        assert_eq!(set, vec![(3, 2), (60, 70), (199, 1)]);
        let clear: Vec<_> = b.runs(0, 200, false).collect();
        assert_eq!(clear, vec![(0, 3), (5, 55), (130, 69)]);
        assert_eq!(b.runs(61, 100, true).collect::<Vec<_>>(), vec![(61, 39)], "clipped to the range");
        assert_eq!(b.runs(100, 300, false).collect::<Vec<_>>(), vec![(130, 69)], "clipped to the length");
        assert_eq!(b.runs(10, 10, false).count(), 0);
    }

    #[test]
    fn claim_in_word_returns_only_the_bits_it_set() {
        let b = AtomicBitmap::new(100);
        b.set(66);
        assert_eq!(b.claim_in_word(64, 4), 0b1011);
        assert_eq!(b.claim_in_word(64, 4), 0);
        assert_eq!(b.claim_in_word(0, 64), u64::MAX);
        assert_eq!(b.claim_in_word(98, 10), 0b11, "clipped at the end of the bitmap");
        assert_eq!(b.claim_in_word(100, 1), 0);
    }

    #[test]
    fn ranges_across_word_boundaries() {
        let b = AtomicBitmap::new(200);
        b.set_range(60, 70);
        assert_eq!(b.count_ones(), 70);
        assert!(!b.test(59) && b.test(60) && b.test(129) && !b.test(130));
        assert_eq!(b.next_clear(60), Some(130));
        assert_eq!(b.next_clear(0), Some(0));
        b.clear_range(64, 64);
        assert_eq!(b.count_ones(), 6);
        assert_eq!(b.count_range(60, 10), 4);
        assert!(!b.set(199));
        assert!(b.set(199));
        assert!(b.set(500), "out of range reads as set and changes nothing");
        assert!(!b.test(500));
        b.set_range(0, 200);
        assert!(b.all_set());
        assert_eq!(b.next_clear(0), None);
    }

    #[test]
    fn a_full_last_word_and_an_empty_map() {
        let b = AtomicBitmap::new(128);
        b.set_range(0, 128);
        assert_eq!(b.to_words(), vec![u64::MAX, u64::MAX]);
        let e = AtomicBitmap::new(0);
        assert!(e.is_empty() && e.all_set() && e.next_clear(0).is_none());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(usize),
        Clear(usize),
        SetRange(usize, usize),
        ClearRange(usize, usize),
    }

    /// A start or count: mostly near the bitmap's size, sometimes huge (saturation).
    fn arg() -> impl Strategy<Value = usize> {
        prop_oneof![8 => 0usize..400, 1 => Just(usize::MAX), 1 => (usize::MAX - 64)..=usize::MAX]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..400).prop_map(Op::Set),
            (0usize..400).prop_map(Op::Clear),
            (arg(), arg()).prop_map(|(s, n)| Op::SetRange(s, n)),
            (arg(), arg()).prop_map(|(s, n)| Op::ClearRange(s, n)),
        ]
    }

    /// The model's view of `[start, start+n)` clipped to the bitmap.
    fn span(model: &[bool], start: usize, n: usize) -> std::ops::Range<usize> {
        let end = start.saturating_add(n).min(model.len());
        start.min(end)..end
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// Every operation and query agrees with a `Vec<bool>` after every step.
        #[test]
        fn matches_a_vec_of_bools(
            bits in prop_oneof![0usize..4, 60usize..70, 126usize..131, 0usize..300],
            ops in proptest::collection::vec(op(), 0..40),
            queries in proptest::collection::vec((arg(), arg()), 1..8),
        ) {
            let b = AtomicBitmap::new(bits);
            let mut model = vec![false; bits];
            prop_assert_eq!(b.len(), bits);
            for o in &ops {
                match *o {
                    Op::Set(i) => {
                        let was = b.set(i);
                        prop_assert_eq!(was, model.get(i).copied().unwrap_or(true));
                        if let Some(m) = model.get_mut(i) { *m = true; }
                    }
                    Op::Clear(i) => {
                        let was = b.clear(i);
                        prop_assert_eq!(was, model.get(i).copied().unwrap_or(false));
                        if let Some(m) = model.get_mut(i) { *m = false; }
                    }
                    Op::SetRange(s, n) => {
                        b.set_range(s, n);
                        let r = span(&model, s, n);
                        model[r].iter_mut().for_each(|m| *m = true);
                    }
                    Op::ClearRange(s, n) => {
                        b.clear_range(s, n);
                        let r = span(&model, s, n);
                        model[r].iter_mut().for_each(|m| *m = false);
                    }
                }
                let ones = model.iter().filter(|&&m| m).count();
                prop_assert_eq!(b.count_ones(), ones);
                prop_assert_eq!(b.all_set(), ones == bits);
            }
            for i in 0..bits + 70 {
                prop_assert_eq!(b.test(i), model.get(i).copied().unwrap_or(false), "bit {}", i);
            }
            for &(s, n) in &queries {
                let want = model[span(&model, s, n)].iter().filter(|&&m| m).count();
                prop_assert_eq!(b.count_range(s, n), want, "count_range({}, {})", s, n);
                let want_clear = model.iter().enumerate().skip(s).find(|(_, &m)| !m).map(|(i, _)| i);
                prop_assert_eq!(b.next_clear(s), want_clear, "next_clear({})", s);
            }
            for from in 0..bits + 2 {
                let want_clear = model.iter().enumerate().skip(from).find(|(_, &m)| !m).map(|(i, _)| i);
                prop_assert_eq!(b.next_clear(from), want_clear, "next_clear({})", from);
            }
            // The words: bit i of the map is bit i % 64 of word i / 64, and nothing past the end.
            let words = b.to_words();
            prop_assert_eq!(words.len(), bits.div_ceil(64));
            for (w, word) in words.iter().enumerate() {
                for k in 0..64 {
                    let want = model.get(w * 64 + k).copied().unwrap_or(false);
                    prop_assert_eq!(word >> k & 1 == 1, want, "word {} bit {}", w, k);
                }
            }
        }
    }
}
