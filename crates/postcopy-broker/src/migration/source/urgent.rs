//! The urgent connection's thread on the source: read Requests, answer each at once with its
//! pages flagged DEMAND (whether or not the background stream sent them already: that copy may
//! still sit in a socket buffer), prefetch the pages after it that were not sent, and point the
//! background stream at the demanded address.

use crate::conv::usize_of;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use super::ram::SourceRam;
use super::sender::{send_run, Kind, SourceStats};
use crate::error::{Error, Result};
use crate::migration::transport::Transport;
use crate::migration::wire::{Decoder, Frame, Limits, WireError};

/// Where the background stream should continue: the page after the last demanded run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hint {
    /// Block index.
    pub block: u32,
    /// Page index.
    pub page: u64,
}

/// Serve Requests on `stream` until it closes. Returns Ok on an orderly close.
pub fn serve_urgent(
    mut stream: Transport,
    ram: &SourceRam,
    stats: &SourceStats,
    hint: &Mutex<Option<Hint>>,
    priority: &crate::sched::DemandPriority,
    zero_runs: bool,
    prefetch: u64,
) -> Result<()> {
    let mut dec = Decoder::with_blocks(Limits::default(), ram.table().clone());
    loop {
        let (block, offset, len) = match dec.read_frame(&mut stream) {
            Ok(Frame::Request { block, offset, len }) => (block, offset, len),
            Ok(Frame::Complete) | Err(WireError::Closed) => return Ok(()),
            Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::NotConnected => return Ok(()),
            Ok(Frame::Error { text }) => {
                return Err(Error::Invalid(format!(
                    "the destination reported on the urgent connection: {text}"
                )))
            }
            Ok(f) => {
                return Err(Error::Invalid(format!(
                    "unexpected {:?} frame on the urgent connection",
                    f.frame_type()
                )))
            }
            Err(e) => return Err(e.into()),
        };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        // Somebody waits at the destination: the background stream runs at full priority.
        priority.note_demand();
        let Some(b) = ram.block(block) else { continue };
        let ps = b.info().page_size;
        send_run(&mut stream, block, b, offset, len, Kind::Demand, zero_runs, stats)?;
        b.sent().set_range(usize_of(offset / ps), usize_of(len / ps));
        let next = (offset + len) / ps;
        // Prefetch: the following pages nobody sent yet, claimed one by one.
        let mut p = next;
        while p < next + prefetch && p < b.info().pages() {
            let first = p;
            while p < next + prefetch && p < b.info().pages() && !b.sent().set(usize_of(p)) {
                p += 1;
            }
            if p > first {
                send_run(
                    &mut stream,
                    block,
                    b,
                    first * ps,
                    (p - first) * ps,
                    Kind::Prefetch,
                    zero_runs,
                    stats,
                )?;
            } else {
                p += 1;
            }
        }
        if let Ok(mut h) = hint.lock() {
            *h = Some(Hint { block, page: p });
        }
    }
}
