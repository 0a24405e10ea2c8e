//! Page sources: where the broker gets the pages that clients fault on. A source either answers
//! at once (memory, image file) or later when its fd becomes readable (the network source of a
//! migration). Either way it hands pages to a [`PageSink`], which places them and wakes waiters.

mod file;
mod image_map;
mod memory;

pub use file::FileSource;
pub use image_map::ImageMap;
pub use memory::MemorySource;

use std::os::fd::RawFd;

use crate::error::Result;
use crate::ram::BlockId;

/// Why a page is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// Someone is blocked on it.
    Demand,
    /// Background fill.
    Background,
}

/// A request for a page-aligned range of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// Block.
    pub block: BlockId,
    /// Offset in the block.
    pub offset: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
    /// Demand or background.
    pub urgency: Urgency,
}

/// Receives pages from a source.
pub trait PageSink {
    /// `data` (whole pages) arrived for `[offset, offset+len)` of `block`.
    fn page(&mut self, block: BlockId, offset: u64, data: &[u8], urgency: Urgency) -> Result<()>;
    /// `[offset, offset+len)` of `block` is zero.
    fn zero(&mut self, block: BlockId, offset: u64, len: u64, urgency: Urgency) -> Result<()>;
    /// `[offset, offset+len)` of `block` was placed by someone else (a source's own placing
    /// thread) and its received bits are set: wake whoever waits for it. The placer counted it.
    fn landed_elsewhere(&mut self, _block: BlockId, _offset: u64, _len: u64) {}
}

/// Pages a source placed itself, off the fault loop thread (see
/// [`PageSource::placed_elsewhere`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlacedElsewhere {
    /// Pages somebody had requested.
    pub demand: u64,
    /// Background pages.
    pub background: u64,
    /// Of both, pages placed as zero.
    pub zero: u64,
    /// Foreign pages found (and repaired) while placing them.
    pub foreign: u64,
}

/// Whether a source is still usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// More may come.
    Open,
    /// The source has nothing more to give (for example, its connection closed).
    Closed,
}

/// A supplier of guest pages.
pub trait PageSource: Send + std::fmt::Debug {
    /// Ask for a range. Synchronous sources deliver into `sink` before returning.
    fn request(&mut self, req: PageRequest, sink: &mut dyn PageSink) -> Result<()>;

    /// The requests of this round are all made: a source that gathers them (one write for all
    /// of a round's Request frames) sends them now. Callers of [`PageSource::request`] call
    /// this after their last request of a round.
    fn flush_requests(&mut self) {}

    /// Fds that become readable when pages arrive asynchronously (for example the main and the
    /// urgent connection of a migration). The fault loop watches them while the source is open.
    fn poll_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Called on the fault loop thread when `fd` (one of [`PageSource::poll_fds`]) is readable.
    /// Pages handed to `sink` are placed and their waiters woken before the loop sleeps again.
    fn on_ready(&mut self, _fd: RawFd, _sink: &mut dyn PageSink) -> Result<SourceState> {
        Ok(SourceState::Open)
    }

    /// Whether the fault loop should pull background pages with `Urgency::Background` requests
    /// when idle (true for local sources; a network source pushes them itself).
    fn wants_background_pull(&self) -> bool {
        true
    }

    /// Pages this source placed itself on a thread of its own (they are not in the fault loop's
    /// own counters); zero for sources that hand every page to the sink.
    fn placed_elsewhere(&self) -> PlacedElsewhere {
        PlacedElsewhere::default()
    }

    /// The fault loop's pending set turned non-empty (`true`: faults wait for pages) or empty,
    /// after a round: a source with background threads raises or lowers them (see
    /// [`crate::sched::DemandPriority`]).
    fn demand_waiting(&mut self, _waiting: bool) {}
}

pub use crate::zero::is_zero;

/// Hand `data` (pages of `page_size` covering `[offset, ..)` of `block`) to `sink`, as runs of
/// data pages and runs of zero pages.
pub fn deliver_runs(
    sink: &mut dyn PageSink,
    block: BlockId,
    offset: u64,
    data: &[u8],
    page_size: u64,
    urgency: Urgency,
) -> Result<()> {
    let ps = usize::try_from(page_size).unwrap_or(4096);
    let mut i = 0;
    while i < data.len() {
        let zero = is_zero(&data[i..(i + ps).min(data.len())]);
        let mut j = i + ps;
        while j < data.len() && is_zero(&data[j..(j + ps).min(data.len())]) == zero {
            j += ps;
        }
        let j = j.min(data.len());
        let off = offset + i as u64;
        if zero {
            sink.zero(block, off, (j - i) as u64, urgency)?;
        } else {
            sink.page(block, off, &data[i..j], urgency)?;
        }
        i = j;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec(Vec<(bool, u64, u64)>);
    impl PageSink for Rec {
        fn page(&mut self, _: BlockId, offset: u64, data: &[u8], _: Urgency) -> Result<()> {
            self.0.push((false, offset, data.len() as u64));
            Ok(())
        }
        fn zero(&mut self, _: BlockId, offset: u64, len: u64, _: Urgency) -> Result<()> {
            self.0.push((true, offset, len));
            Ok(())
        }
    }

    #[test]
    fn runs_split_at_zero_boundaries() {
        let mut data = vec![0u8; 5 * 4096];
        data[4096] = 1;
        data[2 * 4096 + 4095] = 9;
        let mut r = Rec::default();
        deliver_runs(&mut r, 0, 0x10000, &data, 4096, Urgency::Demand).unwrap();
        assert_eq!(r.0, vec![(true, 0x10000, 4096), (false, 0x11000, 8192), (true, 0x13000, 8192)]);
        assert!(is_zero(&[0; 13]) && !is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
