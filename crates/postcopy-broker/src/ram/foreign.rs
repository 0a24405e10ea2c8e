//! Pages of a block's backing that the broker never placed ("unplaced" pages): present in the
//! shared page cache, yet neither received nor being placed. A process that maps guest RAM and
//! populates it before its userfaultfd is registered (mlock / mlockall, MAP_POPULATE, a prefault
//! loop) creates them: they are zero pages that never fault, so every mapper would read zeros
//! where the source has data. They are looked for when a client registers and dropped again
//! (punched out) so that they fault like every missing page.
//!
//! How they are seen: the pages allocated in the file (st_blocks, exact on tmpfs and hugetlbfs)
//! against the pages received and being placed gives a count; SEEK_DATA then locates them on
//! small-page blocks. hugetlbfs cannot list its holes, so there a range is dropped as a whole
//! (its pages that are not received) and the count says how many were found.
//!
//! Ordering against placers: a placer claims a page (the `placing` bitmap), fills it, sets its
//! received bit, then releases the claim. Reading the allocation first, then the claims, then
//! the received bits never counts a page that a placer is filling as unplaced.

use super::RamBlock;
use crate::error::Result;

impl RamBlock {
    /// A lower bound of the unplaced pages anywhere in the block; 0 when there are none (or
    /// when pages the clients removed mask them). Cost: one fstat and two bitmap counts.
    pub fn unplaced_count(&self) -> Result<u64> {
        let allocated = self.allocated_pages()?;
        let placing = self.placing().count_ones() as u64;
        let received = self.received().count_ones() as u64;
        Ok(allocated.saturating_sub(placing + received))
    }

    /// The unplaced pages of `[offset, offset+len)` as (offset, len) runs, or None where holes
    /// cannot be listed (hugetlbfs, private memory).
    pub fn find_unplaced(&self, offset: u64, len: u64) -> Result<Option<Vec<(u64, u64)>>> {
        self.check_range(offset, len)?;
        if !self.holes_visible() {
            return Ok(None);
        }
        let (ps, end) = (self.page_size(), offset + len);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while let Some((data, hole)) = self.next_data(pos, end)? {
            let mut p = data / ps * ps;
            while p < hole {
                let i = self.page_index(p);
                // Claims before received bits (see the module doc).
                if !self.placing().test(i) && !self.received().test(i) {
                    match runs.last_mut() {
                        Some((o, l)) if *o + *l == p => *l += ps,
                        _ => runs.push((p, ps)),
                    }
                }
                p += ps;
            }
            pos = hole.max(pos + ps);
        }
        Ok(Some(runs))
    }

    /// Punch out the pages of `[offset, offset+len)` that are neither received nor being placed,
    /// so that they fault again. Claims them while doing so, so no placer fills one meanwhile.
    /// Returns how many pages the backing held fewer afterwards.
    pub fn drop_unplaced(&self, offset: u64, len: u64) -> Result<u64> {
        self.check_range(offset, len)?;
        let before = self.allocated_pages()?;
        let ps = self.page_size();
        let (first, end) = (self.page_index(offset), self.page_index(offset + len));
        let mut i = first;
        let mut result = Ok(());
        while i < end && result.is_ok() {
            let k = (64 - i % 64).min(end - i);
            let got = self.placing().claim_in_word(i, k);
            // Of the pages claimed here, punch those still not received, in runs.
            let mut j = 0;
            while j < k {
                let mine = |j: usize| got & (1u64 << j) != 0 && !self.received().test(i + j);
                if !mine(j) {
                    j += 1;
                    continue;
                }
                let start = j;
                while j < k && mine(j) {
                    j += 1;
                }
                if result.is_ok() {
                    let (o, l) = ((i + start) as u64 * ps, (j - start) as u64 * ps);
                    result = self.punch(o, l);
                }
            }
            for b in 0..k {
                if got & (1u64 << b) != 0 {
                    self.placing().clear(i + b);
                }
            }
            i += k;
        }
        result?;
        Ok(before.saturating_sub(self.allocated_pages()?))
    }
}
