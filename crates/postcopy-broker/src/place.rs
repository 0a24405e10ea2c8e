//! Atomic placement of pages into RAM blocks through the broker's own userfaultfd
//! (QEMU's postcopy_place_page / _zero and postcopy_get_tmp_page).
//!
//! A page appears only through UFFDIO_COPY or UFFDIO_ZEROPAGE, so every process that maps the
//! block sees either no page (and faults) or the whole page. The received bit is set only after
//! the ioctl succeeded. EEXIST on a page whose received bit is clear means someone populated
//! shared RAM behind the broker's back: it is counted, logged, repaired (the page is punched out
//! and placed again) and reported.
//!
//! Several placers may fill one block at once (the fault loop placing demand answers, a stream
//! thread placing the background stream): a placer first claims the pages of a run in the
//! block's `placing` bitmap and fills only the pages it claimed; a page another placer is filling
//! at that moment is skipped (that placer sets its received bit). So no page is filled twice and
//! an EEXIST with a clear received bit can only be a foreign page.

mod zap;

use crate::conv::usize_of;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::ram::{BlockId, Mapping, RamBlock, RamBlocks};
use crate::uffd::{Fill, Uffd};

/// How a placement ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Every page of the range was placed by this call.
    Placed,
    /// Some pages were already placed by the broker before (harmless EEXIST); the rest placed now.
    AlreadyPresent,
    /// A page had been populated by someone else; it was punched out and placed again.
    Repaired,
}

/// Counters of the placer.
#[derive(Debug, Default)]
pub struct PlaceStats {
    /// Pages placed with data.
    pub data_pages: AtomicU64,
    /// Pages placed as zero.
    pub zero_pages: AtomicU64,
    /// Placement calls issued (COPY and ZEROPAGE ioctls, fallocates of zero runs).
    pub ioctls: AtomicU64,
    /// Of the zero pages, those allocated over a hole with fallocate (no ioctl).
    pub zero_fallocated: AtomicU64,
    /// EEXIST on pages the broker had placed (harmless).
    pub already_present: AtomicU64,
    /// EEXIST on pages the broker never placed (shared RAM touched behind its back).
    pub foreign_pages: AtomicU64,
    /// Retries after EAGAIN / partial copies.
    pub retries: AtomicU64,
    /// Pages skipped because another placer was filling them at that moment.
    pub busy_skipped: AtomicU64,
}

/// A snapshot of [`PlaceStats`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct PlaceCounts {
    /// Pages placed with data.
    pub data_pages: u64,
    /// Pages placed as zero.
    pub zero_pages: u64,
    /// Placement calls issued.
    pub ioctls: u64,
    /// Zero pages allocated with fallocate.
    pub zero_fallocated: u64,
    /// Harmless EEXIST.
    pub already_present: u64,
    /// Foreign pages detected and repaired.
    pub foreign_pages: u64,
    /// Retries.
    pub retries: u64,
    /// Pages skipped because another placer was filling them.
    pub busy_skipped: u64,
}

impl PlaceStats {
    /// Pages filled so far, data and zero (a placer's share when several fill one block).
    pub fn filled(&self) -> u64 {
        self.data_pages.load(Ordering::Relaxed) + self.zero_pages.load(Ordering::Relaxed)
    }

    /// Snapshot the counters.
    pub fn counts(&self) -> PlaceCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PlaceCounts {
            data_pages: g(&self.data_pages),
            zero_pages: g(&self.zero_pages),
            ioctls: g(&self.ioctls),
            zero_fallocated: g(&self.zero_fallocated),
            already_present: g(&self.already_present),
            foreign_pages: g(&self.foreign_pages),
            retries: g(&self.retries),
            busy_skipped: g(&self.busy_skipped),
        }
    }
}

/// Reusable staging memory, one page of the largest block page size, page aligned.
#[derive(Debug)]
pub struct StagingPage {
    map: Mapping,
}

impl StagingPage {
    /// A zeroed staging page of `size` bytes.
    pub fn new(size: u64) -> Result<StagingPage> {
        let len = usize::try_from(size).map_err(|_| Error::Invalid("staging page too large".into()))?;
        Ok(StagingPage { map: Mapping::private(len)? })
    }
    /// The page as bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is private to this value, readable and writable for its length,
        // and the &mut borrow of self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr(), self.map.len()) }
    }
    /// The page as bytes, read-only.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as above, shared borrow.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// Never empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// How many times a placement retries EAGAIN before giving up.
const MAX_AGAIN: u32 = 10_000;

/// Places pages into the blocks through the broker's own userfaultfd.
#[derive(Debug)]
pub struct Placer {
    uffd: Arc<Uffd>,
    zero: StagingPage,
    stats: Arc<PlaceStats>,
    wake: bool,
    /// Drop the broker's own page-table entries of placed data runs (see `zap`).
    zap: Option<zap::Zapper>,
}

impl Placer {
    /// A placer over `uffd`, where every block is registered; `largest_page` sizes the zero page.
    pub fn new(uffd: Arc<Uffd>, largest_page: u64) -> Result<Placer> {
        Ok(Placer {
            uffd,
            zero: StagingPage::new(largest_page)?,
            stats: Arc::new(PlaceStats::default()),
            wake: true,
            zap: None,
        })
    }

    /// Drop the broker's own page-table entries of the data runs this placer fills, batched,
    /// as it goes (off by default): the pages stay in the shared page cache, and the broker's
    /// exit no longer tears down one entry per page it placed. For a placer off the demand path
    /// (a stream thread); [`Placer::flush_zap`] at its end zaps the last batch.
    pub fn set_zap_placed(&mut self, on: bool) {
        self.zap = on.then(zap::Zapper::default);
    }

    /// Zap the runs still pending (see [`Placer::set_zap_placed`]).
    pub fn flush_zap(&self, blocks: &RamBlocks) {
        if let Some(z) = &self.zap {
            z.flush(blocks);
        }
    }

    /// Whether the placement ioctls themselves wake threads of this process waiting on the
    /// placed pages (the default). A fault loop that tracks its own waiters turns this off and
    /// wakes them after the received bits are set, so a woken thread always sees its bit.
    pub fn set_wake_on_place(&mut self, wake: bool) {
        self.wake = wake;
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<PlaceStats> {
        &self.stats
    }

    /// Place `data` (one or more whole pages) at `offset` of block `id` in as few ioctls as the
    /// kernel allows; sets the received bits of the placed pages after success.
    pub fn place(&self, blocks: &RamBlocks, id: BlockId, offset: u64, data: &[u8]) -> Result<Placed> {
        let b = block(blocks, id)?;
        let len = data.len() as u64;
        if len == 0 || len % b.page_size() != 0 {
            return Err(Error::BadPageData {
                block: b.name().into(),
                got: data.len(),
                page_size: b.page_size(),
            });
        }
        b.check_range(offset, len)?;
        let ps = b.page_size();
        let placed = self.claimed(b, offset, len, |o, l| {
            let (first, end) = (b.page_index(o), b.page_index(o + l));
            let mut outcome = Placed::Placed;
            let mut i = first;
            while i < end {
                // Pages a client removed before they arrived are zeros, not the source's data.
                let removed = b.removed().test(i);
                let next =
                    if removed { b.removed().next_clear_in(i, end) } else { b.removed().next_set(i, end) };
                let (ro, rl) = (i as u64 * ps, (next - i) as u64 * ps);
                let r = if removed {
                    let r = self.zero_by_uffd(b, ro, rl)?;
                    b.removed().clear_range(i, next - i);
                    r
                } else {
                    // Test hook (tests/remove_race.rs): stop between the check and the copy.
                    crate::failpoint::hold("place-after-removed-check");
                    let base = ro - offset;
                    self.fill(b, ro, rl, &self.stats.data_pages, |dst, done, n| {
                        let src = data[usize_of(base + done)..].as_ptr();
                        // SAFETY: `src` points at `n` readable bytes of `data`: the run [ro, ro+rl)
                        // lies inside [offset, offset+len) and base + done + n <= data.len().
                        unsafe { self.uffd.copy(dst, src, n, self.wake) }
                    })?
                };
                outcome = worst(outcome, r);
                i = next;
            }
            // A removal that raced with the copy (marked after the check above, the range
            // punched before the copy landed) leaves the source's data where zeros belong:
            // punch it out again. The page is received and keeps its mark, so its next fault
            // places zeros. The fault loop marks, fences and punches in the opposite order
            // (`Core::removed`): either it sees this copy or this check sees its mark.
            std::sync::atomic::fence(Ordering::SeqCst);
            for (p, k) in b.removed().runs(first, end, true) {
                b.punch(p as u64 * ps, k as u64 * ps)?;
            }
            Ok(outcome)
        })?;
        if let Some(z) = &self.zap {
            z.placed(blocks, id, offset, len);
        }
        Ok(placed)
    }

    /// Place zero pages over `[offset, offset+len)`: a hole of an fd-backed block is allocated
    /// with one fallocate (see `RamBlock::allocate_zero_hole`); otherwise one UFFDIO_ZEROPAGE
    /// where the block supports it, or UFFDIO_COPY from a zeroed staging page (hugetlbfs).
    pub fn place_zero(&self, blocks: &RamBlocks, id: BlockId, offset: u64, len: u64) -> Result<Placed> {
        let b = block(blocks, id)?;
        b.check_range(offset, len)?;
        let ps = b.page_size();
        self.claimed(b, offset, len, |o, l| {
            // fallocate does not fail on pages that exist (as UFFDIO_ZEROPAGE's EEXIST does):
            // skip the received ones here (claimed, so their bits cannot change meanwhile).
            let (first, end) = (b.page_index(o), b.page_index(o + l));
            let mut outcome = Placed::Placed;
            let mut missing = 0;
            for (i, n) in b.received().runs(first, end, false) {
                let (ro, rl) = (i as u64 * ps, n as u64 * ps);
                let r = if b.allocate_zero_hole(ro, rl)? {
                    self.allocated_zero(b, ro, rl);
                    Placed::Placed
                } else {
                    self.zero_by_uffd(b, ro, rl)?
                };
                outcome = worst(outcome, r);
                missing += n;
            }
            let present = (end - first - missing) as u64;
            if present > 0 {
                self.stats.already_present.fetch_add(present, Ordering::Relaxed);
                outcome = worst(outcome, Placed::AlreadyPresent);
            }
            // Zeros are what a removed page must hold: its mark is done with.
            b.removed().clear_range(first, end - first);
            Ok(outcome)
        })
    }

    /// Fill the page at `offset` of block `id` with zeros although its received bit is set: a
    /// received page that is absent (a hole was punched into the backing behind the broker, for
    /// example by a client's MADV_REMOVE, whose hole reads as zeros) makes every registered
    /// process fault on it, and waking them only makes them fault again. Returns
    /// [`Placed::Placed`] if this call filled it, [`Placed::AlreadyPresent`] if the page was
    /// there after all (another placer, or a page that only looked absent).
    pub fn refill_zero(&self, blocks: &RamBlocks, id: BlockId, offset: u64) -> Result<Placed> {
        let b = block(blocks, id)?;
        let ps = b.page_size();
        b.check_range(offset, ps)?;
        self.claimed(b, offset, ps, |o, l| self.zero_by_uffd(b, o, l))
    }

    /// Book-keeping after `allocate_zero_hole` filled `[offset, offset+len)`.
    fn allocated_zero(&self, b: &RamBlock, offset: u64, len: u64) {
        let pages = len / b.page_size();
        self.stats.ioctls.fetch_add(1, Ordering::Relaxed);
        b.received().set_range(b.page_index(offset), usize_of(pages));
        self.stats.zero_pages.fetch_add(pages, Ordering::Relaxed);
        self.stats.zero_fallocated.fetch_add(pages, Ordering::Relaxed);
        if self.wake {
            // No ioctl woke this process's threads waiting on the range: wake them now.
            let _ = self.uffd.wake(b.host_addr() + offset, len);
        }
    }

    fn zero_by_uffd(&self, b: &RamBlock, offset: u64, len: u64) -> Result<Placed> {
        let zero_pages = &self.stats.zero_pages;
        if b.zeropage_supported() {
            self.fill(b, offset, len, zero_pages, |dst, _, n| self.uffd.zeropage(dst, n, self.wake))
        } else {
            let ps = b.page_size();
            let zero = self.zero.as_slice().as_ptr();
            let mut outcome = Placed::Placed;
            let mut p = offset;
            while p < offset + len {
                // SAFETY: the zero page is at least one block page long and lives as long as
                // self; one page at a time, so done + n <= its length.
                let r = self.fill(b, p, ps, zero_pages, |dst, done, n| unsafe {
                    self.uffd.copy(dst, zero.add(usize_of(done)), n, self.wake)
                })?;
                outcome = worst(outcome, r);
                p += ps;
            }
            Ok(outcome)
        }
    }

    /// Fill `[offset, offset+len)` with `fill_run(run_offset, run_len)` over the runs of pages
    /// this placer claims; pages another placer is filling right now are skipped. Each run's
    /// claims are released once it is filled (its received bits are set by then) or failed.
    fn claimed(
        &self,
        b: &RamBlock,
        offset: u64,
        len: u64,
        mut fill_run: impl FnMut(u64, u64) -> Result<Placed>,
    ) -> Result<Placed> {
        let ps = b.page_size();
        let placing = b.placing();
        let first = b.page_index(offset);
        let end = first.saturating_add(usize_of(len / ps));
        let mut outcome = Placed::Placed;
        let mut i = first;
        while i < end {
            let k = (64 - i % 64).min(end - i);
            let got = placing.claim_in_word(i, k);
            let mut j = 0;
            while j < k {
                if got & (1u64 << j) == 0 {
                    self.stats.busy_skipped.fetch_add(1, Ordering::Relaxed);
                    outcome = worst(outcome, Placed::AlreadyPresent);
                    j += 1;
                    continue;
                }
                let run = ((got >> j).trailing_ones() as usize).min(k - j);
                let r = fill_run((i + j) as u64 * ps, run as u64 * ps);
                placing.clear_range(i + j, run);
                match r {
                    Ok(p) => outcome = worst(outcome, p),
                    Err(e) => {
                        for rest in j + run..k {
                            if got & (1u64 << rest) != 0 {
                                placing.clear(i + rest);
                            }
                        }
                        return Err(e);
                    }
                }
                j += run;
            }
            i += k;
        }
        Ok(outcome)
    }

    /// Run `op(dst, done, remaining)` until the range is filled, handling partial progress,
    /// EAGAIN and EEXIST page by page. `placed` counts the pages this call filled (not those that
    /// were already present), also when it fails part way.
    fn fill(
        &self,
        b: &RamBlock,
        offset: u64,
        len: u64,
        placed: &AtomicU64,
        mut op: impl FnMut(u64, u64, u64) -> std::io::Result<Fill>,
    ) -> Result<Placed> {
        let ps = b.page_size();
        let base = b.host_addr() + offset;
        let mut done = 0u64;
        let mut outcome = Placed::Placed;
        let mut again = 0u32;
        // After an EEXIST inside a run, go page by page to find which pages exist.
        let mut page_by_page = false;
        let mut last_repaired = None;
        while done < len {
            let n = if page_by_page { ps } else { len - done };
            self.stats.ioctls.fetch_add(1, Ordering::Relaxed);
            let ctx = || {
                let hint = if b.is_hugetlb() {
                    " (ENOMEM here means no free huge page: reserve more in /proc/sys/vm/nr_hugepages)"
                } else {
                    ""
                };
                format!("placing block '{}' offset {:#x}{hint}", b.name(), offset + done)
            };
            match op(base + done, done, n).ctx(ctx)? {
                Fill::Done(k) => {
                    let k = k.min(n) / ps * ps;
                    if k == 0 {
                        again += 1;
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        if again > MAX_AGAIN {
                            return Err(Error::io(ctx(), std::io::Error::from_raw_os_error(libc::EAGAIN)));
                        }
                        continue;
                    }
                    b.received().set_range(b.page_index(offset + done), usize_of(k / ps));
                    placed.fetch_add(k / ps, Ordering::Relaxed);
                    done += k;
                }
                Fill::Again => {
                    again += 1;
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    if again > MAX_AGAIN {
                        return Err(Error::io(ctx(), std::io::Error::from_raw_os_error(libc::EAGAIN)));
                    }
                    std::thread::yield_now();
                }
                Fill::Exists if !page_by_page && n > ps => page_by_page = true,
                Fill::Exists => {
                    let page = offset + done;
                    if b.is_received(page) {
                        self.stats.already_present.fetch_add(1, Ordering::Relaxed);
                        outcome = worst(outcome, Placed::AlreadyPresent);
                        done += ps;
                    } else if last_repaired == Some(page) {
                        // Repopulated right after the repair: someone keeps writing it.
                        return Err(Error::ForeignPage { block: b.name().into(), offset: page });
                    } else {
                        outcome = Placed::Repaired;
                        self.repair_foreign(b, page)?;
                        last_repaired = Some(page);
                    }
                }
            }
        }
        Ok(outcome)
    }

    /// A page exists that the broker never placed: count it, log it, punch it out so that the
    /// next attempt places the right contents (and every mapper faults again).
    fn repair_foreign(&self, b: &RamBlock, page: u64) -> Result<()> {
        let n = self.stats.foreign_pages.fetch_add(1, Ordering::Relaxed) + 1;
        log::error!(
            "{} (foreign page #{n}); repairing by discarding it and placing again",
            Error::ForeignPage { block: b.name().into(), offset: page }
        );
        // A failure to punch (or, on hugetlbfs, to reserve the page again) is its own error,
        // not another foreign page.
        b.discard(page, b.page_size())
    }
}

fn worst(a: Placed, b: Placed) -> Placed {
    match (a, b) {
        (Placed::Repaired, _) | (_, Placed::Repaired) => Placed::Repaired,
        (Placed::AlreadyPresent, _) | (_, Placed::AlreadyPresent) => Placed::AlreadyPresent,
        _ => Placed::Placed,
    }
}

fn block(blocks: &RamBlocks, id: BlockId) -> Result<&RamBlock> {
    blocks.get(id).ok_or_else(|| Error::UnknownBlock(format!("#{id}")))
}
