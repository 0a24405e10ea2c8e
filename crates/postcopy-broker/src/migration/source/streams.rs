//! The background senders of the source: one per background connection (main, plus the extra
//! `Stream` connections of `CAP_STREAMS`), each a thread that claims runs of unsent pages from
//! the blocks' shared sent bitmaps and writes them to its own connection. A page is claimed by
//! setting its sent bit (an atomic test-and-set, which the urgent thread uses too), so every page
//! goes once whatever the number of senders. The senders start at evenly spaced places of the
//! RAM so they rarely meet; the one on main also follows the urgent thread's hint (the page
//! after the last demanded run).

use crate::conv::usize_of;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::ram::SourceRam;
use super::sender::{send_run, Kind, RateLimit, SourceStats};
use super::urgent::Hint;
use crate::error::{Error, Result};
use crate::migration::transport::Transport;
use crate::migration::wire::{wire_index, DEFAULT_MAX_RUN};

/// What every sender shares.
#[derive(Debug, Clone, Copy)]
pub(super) struct Push<'a> {
    pub(super) ram: &'a SourceRam,
    pub(super) stats: &'a SourceStats,
    /// Zero pages travel as ZeroRun frames.
    pub(super) zero: bool,
    /// Bytes per second of this sender (0: unlimited).
    pub(super) bandwidth: u64,
    /// Set when any sender or connection failed: the others stop early (a resume follows).
    pub(super) abort: &'a AtomicBool,
    /// The senders' priority, which follows the demand requests (each sender entered it).
    pub(super) priority: &'a crate::sched::DemandPriority,
}

/// Where sender `j` of `n` starts: page `total * j / n` of the RAM, as (block, page).
pub(super) fn start_of(ram: &SourceRam, j: usize, n: usize) -> (usize, usize) {
    let total: u64 = ram.blocks().iter().map(|b| b.info().pages()).sum();
    let mut at = total * j as u64 / n.max(1) as u64;
    for (i, b) in ram.blocks().iter().enumerate() {
        if at < b.info().pages() {
            return (i, usize_of(at));
        }
        at -= b.info().pages();
    }
    (0, 0)
}

impl Push<'_> {
    /// Send every page nobody claimed yet on `conn`, from `cursor` on and wrapping around, in
    /// runs of up to 2 MiB; `hint` (main only) moves the cursor to the last demanded address.
    pub(super) fn run(
        &self,
        conn: &mut Transport,
        mut cursor: (usize, usize),
        hint: Option<&Mutex<Option<Hint>>>,
    ) -> Result<()> {
        let mut limit = RateLimit::new(self.bandwidth);
        let blocks = self.ram.blocks();
        let nblocks = blocks.len();
        let mut idle_blocks = 0;
        while idle_blocks <= nblocks {
            self.priority.relax(crate::sched::DEMAND_HOLD);
            if self.abort.load(Ordering::Relaxed) {
                return Err(Error::Invalid("another background connection failed".into()));
            }
            if let Some(h) = hint.and_then(|h| h.lock().ok().and_then(|mut g| g.take())) {
                cursor = (h.block as usize, usize_of(h.page));
                idle_blocks = 0;
            }
            let Some(b) = blocks.get(cursor.0) else {
                cursor = (0, 0);
                idle_blocks += 1;
                continue;
            };
            let Some(start) = b.sent().next_clear(cursor.1) else {
                cursor = ((cursor.0 + 1) % nblocks, 0);
                idle_blocks += 1;
                continue;
            };
            idle_blocks = 0;
            let ps = b.info().page_size;
            let max = usize_of((u64::from(DEFAULT_MAX_RUN) / ps).max(1));
            let mut n = 0;
            while n < max && start + n < b.sent().len() && !b.sent().set(start + n) {
                n += 1;
            }
            cursor = (cursor.0, start + n.max(1));
            if n == 0 {
                continue; // another sender or the urgent thread took it meanwhile
            }
            let w = send_run(
                conn,
                wire_index(cursor.0),
                b,
                start as u64 * ps,
                n as u64 * ps,
                Kind::Background,
                self.zero,
                self.stats,
            )?;
            limit.pace(w);
        }
        Ok(())
    }
}
