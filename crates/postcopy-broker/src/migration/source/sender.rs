//! Putting pages on the wire: a run of pages becomes Page frames (header + data in one writev,
//! never copied) and ZeroRun frames for its zero pages, each recorded in its block's digest;
//! the source's counters; the background bandwidth limit.

use crate::conv::usize_of;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::ram::SourceBlock;
use crate::migration::wire::{write_frame, write_page, Frame, WireError, DEFAULT_MAX_RUN};
use crate::migration::zero::split_zero_runs;

/// Why a run is sent (for the counters and the DEMAND flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Precopy pass.
    Precopy,
    /// Background push during postcopy.
    Background,
    /// Answer to a Request (flagged DEMAND).
    Demand,
    /// Pages after a demanded one, sent on the urgent connection.
    Prefetch,
}

/// Counters of a source session.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Pages sent by the precopy pass.
    pub precopy_pages: AtomicU64,
    /// Pages pushed in the background during postcopy.
    pub background_pages: AtomicU64,
    /// Pages sent in answer to Requests.
    pub demand_pages: AtomicU64,
    /// Pages prefetched after demanded ones.
    pub prefetch_pages: AtomicU64,
    /// Of all those, pages that went as ZeroRun (no data).
    pub zero_pages: AtomicU64,
    /// Bytes written to the sockets (headers included).
    pub bytes: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
    /// Pages covered by Discard frames.
    pub discarded_pages: AtomicU64,
    /// Successful resumes after a connection failure during postcopy.
    pub resumes: AtomicU64,
}

/// A snapshot of [`SourceStats`].
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SourceCounts {
    /// Pages sent by the precopy pass.
    pub precopy_pages: u64,
    /// Pages pushed in the background during postcopy.
    pub background_pages: u64,
    /// Pages sent in answer to Requests.
    pub demand_pages: u64,
    /// Pages prefetched after demanded ones.
    pub prefetch_pages: u64,
    /// Pages sent as ZeroRun.
    pub zero_pages: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Requests received.
    pub requests: u64,
    /// Pages covered by Discard frames.
    pub discarded_pages: u64,
    /// Successful resumes after a connection failure during postcopy.
    pub resumes: u64,
}

impl SourceStats {
    /// Snapshot the counters.
    pub fn counts(&self) -> SourceCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SourceCounts {
            precopy_pages: g(&self.precopy_pages),
            background_pages: g(&self.background_pages),
            demand_pages: g(&self.demand_pages),
            prefetch_pages: g(&self.prefetch_pages),
            zero_pages: g(&self.zero_pages),
            bytes: g(&self.bytes),
            requests: g(&self.requests),
            discarded_pages: g(&self.discarded_pages),
            resumes: g(&self.resumes),
        }
    }

    fn count(&self, kind: Kind, pages: u64) {
        let c = match kind {
            Kind::Precopy => &self.precopy_pages,
            Kind::Background => &self.background_pages,
            Kind::Demand => &self.demand_pages,
            Kind::Prefetch => &self.prefetch_pages,
        };
        c.fetch_add(pages, Ordering::Relaxed);
    }
}

/// Send `[offset, offset + len)` of block `index` (page aligned, inside the block) as Page and
/// ZeroRun frames of at most 2 MiB each. Returns the bytes written.
#[allow(clippy::too_many_arguments)] // the run's coordinates plus how to send it; a struct adds nothing
pub fn send_run<W: Write + ?Sized>(
    w: &mut W,
    index: u32,
    block: &SourceBlock,
    offset: u64,
    len: u64,
    kind: Kind,
    zero_runs: bool,
    stats: &SourceStats,
) -> Result<u64, WireError> {
    let ps = block.info().page_size;
    let demand = kind == Kind::Demand;
    let chunk = u64::from(DEFAULT_MAX_RUN).max(ps);
    let mut written = 0u64;
    let mut o = offset;
    while o < offset + len {
        let n = chunk.min(offset + len - o);
        let data = block.bytes(o, n);
        for piece in split_zero_runs(data, usize_of(ps)) {
            let at = o + piece.offset as u64;
            let pages = piece.len as u64 / ps;
            if piece.zero && zero_runs {
                write_frame(w, &Frame::ZeroRun { block: index, offset: at, len: piece.len as u64, demand })?;
                block.digest().set(at, None, piece.len as u64);
                written += 32;
                stats.zero_pages.fetch_add(pages, Ordering::Relaxed);
            } else {
                let bytes = &data[piece.offset..piece.offset + piece.len];
                write_page(w, index, at, demand, bytes)?;
                block.digest().set(at, Some(bytes), 0);
                written += 24 + piece.len as u64;
            }
            stats.count(kind, pages);
        }
        o += n;
    }
    stats.bytes.fetch_add(written, Ordering::Relaxed);
    Ok(written)
}

/// Paces a stream to a number of bytes per second (no limit when 0).
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: u64,
    start: Instant,
    sent: u64,
}

impl RateLimit {
    /// A limiter of `bytes_per_sec` (0: unlimited).
    pub fn new(bytes_per_sec: u64) -> RateLimit {
        RateLimit { bytes_per_sec, start: Instant::now(), sent: 0 }
    }

    /// Account `bytes` just sent and sleep until the average rate is back under the limit.
    pub fn pace(&mut self, bytes: u64) {
        if self.bytes_per_sec == 0 {
            return;
        }
        self.sent += bytes;
        let due = Duration::from_secs_f64(self.sent as f64 / self.bytes_per_sec as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::wire::{BlockInfo, BlockTable, Decoder, Limits};

    #[test]
    fn zero_pages_travel_as_zero_runs_and_data_is_unchanged() {
        let mut data = vec![0u8; 16 * 4096];
        for p in [1usize, 2, 9] {
            data[p * 4096 + 17] = p as u8;
        }
        let block = SourceBlock::from_bytes("ram", 4096, &data).unwrap();
        let stats = SourceStats::default();
        let mut out = Vec::new();
        send_run(&mut out, 0, &block, 0, 16 * 4096, Kind::Demand, true, &stats).unwrap();
        let table = BlockTable::new(vec![BlockInfo::new("ram", 16 * 4096, 4096)]).unwrap();
        let mut dec = Decoder::with_blocks(Limits::default(), table);
        dec.feed(&out);
        let mut got = vec![0xaau8; 16 * 4096];
        let mut frames = 0;
        while let Some(f) = dec.next_frame().unwrap() {
            frames += 1;
            match f {
                Frame::Page { offset, data: d, demand, .. } => {
                    assert!(demand);
                    got[offset as usize..offset as usize + d.len()].copy_from_slice(d);
                }
                Frame::ZeroRun { offset, len, demand, .. } => {
                    assert!(demand);
                    got[offset as usize..(offset + len) as usize].fill(0);
                }
                f => panic!("{f:?}"),
            }
        }
        assert_eq!(got, data);
        assert_eq!(frames, 5, "zero, data 1-2, zero 3-8, data 9, zero 10-15");
        let c = stats.counts();
        assert_eq!((c.demand_pages, c.zero_pages), (16, 13));
        assert_eq!(c.bytes, out.len() as u64);
    }
}
