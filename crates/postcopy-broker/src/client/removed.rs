//! The ranges a private client removed (REMOVE events: balloon inflation, free page reporting),
//! which must fault in as zero rather than as image data. Firecracker's free page reporting sends
//! them for the whole life of a VM, often the same or neighbouring ranges again, so they are kept
//! merged — disjoint, non-adjacent `[start, end)` ranges in a `BTreeMap` keyed by start — and both
//! a lookup and an insertion cost O(log n) in the number of disjoint ranges, which re-reporting
//! never increases.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent `[start, end)` address ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemovedRanges {
    /// start → end; for consecutive entries a, b: a.end < b.start.
    ranges: BTreeMap<u64, u64>,
}

impl RemovedRanges {
    /// Add `[start, end)`, merged with every range it overlaps or touches.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &pe)) = self.ranges.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
            }
        }
        // Every range starting in [s, e] is swallowed (this includes the predecessor above).
        while let Some((&ns, &ne)) = self.ranges.range(s..=e).next() {
            e = e.max(ne);
            self.ranges.remove(&ns);
        }
        self.ranges.insert(s, e);
    }

    /// Whether `addr` lies in a range.
    pub fn contains(&self, addr: u64) -> bool {
        self.ranges.range(..=addr).next_back().is_some_and(|(_, &e)| addr < e)
    }

    /// Forget `[start, end)` (the memory there was unmapped), splitting ranges that straddle it.
    pub fn clear(&mut self, start: u64, end: u64) {
        self.take(start, end);
    }

    /// Forget `[start, end)` and return the pieces of ranges that lay inside it, in order.
    pub fn take(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        if let Some((&ps, &pe)) = self.ranges.range(..start).next_back() {
            if pe > start {
                self.ranges.insert(ps, start);
                out.push((start, pe.min(end)));
                if pe > end {
                    self.ranges.insert(end, pe);
                }
            }
        }
        while let Some((&ns, &ne)) = self.ranges.range(start..end).next() {
            self.ranges.remove(&ns);
            out.push((ns, ne.min(end)));
            if ne > end {
                self.ranges.insert(end, ne);
            }
        }
        out
    }

    /// Move the ranges inside `[from, from+len)` to `to` (mremap), replacing whatever lay at
    /// `[to, to+len)`.
    pub fn shift(&mut self, from: u64, to: u64, len: u64) {
        let moved = self.take(from, from.saturating_add(len));
        self.clear(to, to.saturating_add(len));
        for (s, e) in moved {
            let (ns, ne) = (to.saturating_add(s - from), to.saturating_add(e - from));
            self.insert(ns, ne);
        }
    }

    /// Number of disjoint ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether no range is kept.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges in address order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn merges_overlapping_and_adjacent_ranges() {
        let mut r = RemovedRanges::default();
        r.insert(0x3000, 0x4000);
        r.insert(0x1000, 0x2000);
        assert_eq!(r.len(), 2);
        r.insert(0x2000, 0x3000);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(0x1000, 0x4000)]);
        r.insert(0x1000, 0x4000);
        r.insert(0x1800, 0x2800);
        r.insert(0x5000, 0x5000);
        assert_eq!(r.len(), 1);
        assert!(r.contains(0x1000) && r.contains(0x3fff) && !r.contains(0x4000) && !r.contains(0xfff));
        r.insert(0x8000, 0x9000);
        r.insert(0, 0x10000);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(0, 0x10000)]);
    }

    #[test]
    fn clear_and_shift_split_ranges() {
        let mut r = RemovedRanges::default();
        r.insert(0x1000, 0x9000);
        r.clear(0x3000, 0x4000);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(0x1000, 0x3000), (0x4000, 0x9000)]);
        assert_eq!(r.take(0x2000, 0x5000), vec![(0x2000, 0x3000), (0x4000, 0x5000)]);
        r.shift(0x5000, 0x100000, 0x2000);
        assert_eq!(
            r.iter().collect::<Vec<_>>(),
            vec![(0x1000, 0x2000), (0x7000, 0x9000), (0x100000, 0x102000)]
        );
        r.shift(0, u64::MAX - 0x3000, 0x3000);
        assert!(r.contains(u64::MAX - 0x1001) && !r.contains(u64::MAX - 0x1000) && !r.contains(0x1000));
    }

    #[test]
    fn reporting_the_same_ranges_forever_does_not_grow() {
        let mut r = RemovedRanges::default();
        for round in 0..5 {
            for p in (0..10_000u64).step_by(2) {
                r.insert(p * 4096, (p + 1) * 4096);
            }
            assert_eq!(r.len(), 5000, "round {round}");
        }
        // Reporting the gaps as well leaves one range.
        for p in (1..10_000u64).step_by(2) {
            r.insert(p * 4096, (p + 1) * 4096);
        }
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(0, 10_000 * 4096)]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Clear(u64, u64),
        Shift(u64, u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Addresses in units of a page over a small space, so that ranges meet often.
        let a = 0u64..64;
        prop_oneof![
            4 => (a.clone(), 0u64..12).prop_map(|(s, l)| Op::Insert(s, s + l)),
            1 => (a.clone(), 0u64..12).prop_map(|(s, l)| Op::Clear(s, s + l)),
            1 => (a.clone(), a, 0u64..12).prop_map(|(f, t, l)| Op::Shift(f, t, l)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        /// Against a set of removed pages: same membership, ranges sorted, disjoint, non-adjacent.
        #[test]
        fn matches_a_set_of_pages(ops in proptest::collection::vec(op(), 0..60)) {
            let mut r = RemovedRanges::default();
            let mut model = BTreeSet::new();
            for o in &ops {
                match *o {
                    Op::Insert(s, e) => {
                        r.insert(s, e);
                        model.extend(s..e);
                    }
                    Op::Clear(s, e) => {
                        r.clear(s, e);
                        for p in s..e {
                            model.remove(&p);
                        }
                    }
                    Op::Shift(f, t, l) => {
                        r.shift(f, t, l);
                        let moved: Vec<u64> = (f..f + l).filter(|p| model.contains(p)).collect();
                        for p in f..f + l {
                            model.remove(&p);
                        }
                        for p in t..t + l {
                            model.remove(&p);
                        }
                        model.extend(moved.iter().map(|p| p - f + t));
                    }
                }
            }
            for p in 0..160 {
                prop_assert_eq!(r.contains(p), model.contains(&p), "page {} after {:?}", p, ops);
            }
            let v: Vec<_> = r.iter().collect();
            for w in v.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "not merged: {:?}", v);
            }
            prop_assert!(v.iter().all(|&(s, e)| s < e));
            // As few ranges as the model has runs.
            let runs = model.iter().filter(|&&p| p == 0 || !model.contains(&(p - 1))).count();
            prop_assert_eq!(v.len(), runs);
        }
    }
}
