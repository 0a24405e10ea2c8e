//! The stream thread of a postcopy destination: it reads one background connection (main, or an
//! extra `Stream` connection of `CAP_STREAMS`; one thread each) with blocking reads and places
//! its pages with a placer of its own, so the fault loop
//! keeps only client faults, the urgent connection and demand answers, and a fault never waits
//! behind background placement. The placers claim pages before filling them (see
//! [`crate::place`]), so a page that comes both as a demand answer and in the stream is filled
//! once.
//!
//! The thread tells the fault loop only about placed pages somebody asked for. The fault loop
//! marks a page *wanted* when it requests it and then tests its received bit; this thread sets
//! received bits (the placer does) and then tests the wanted bits. A SeqCst fence between the
//! two steps on both sides means at least one of them sees the other, so no waiter is left
//! asleep (when both see it, the second wake finds no waiter).
//!
//! The source's Complete is the last frame of a background connection: the thread ends after
//! it, and leaves the connection open (on main, for the source's CompleteAck, which the session
//! reads).

use crate::conv::usize_of;
use std::net::Shutdown;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::kick::Kick;
use super::network::{Conn, Ctx};
use crate::error::{Error, IoContext, Result};
use crate::migration::transport::Transport;
use crate::migration::wire::{Decoder, Frame};
use crate::place::{Placed, Placer};
use crate::ram::{AtomicBitmap, BlockId, RamBlocks};
use crate::source::{PageSink, PlacedElsewhere, Urgency};

/// Pages the fault loop has requested, one bitmap per block (bits are never cleared: a page is
/// placed once, so a stale bit costs at most one needless notification).
#[derive(Debug)]
pub(crate) struct Wanted(Vec<AtomicBitmap>);

impl Wanted {
    /// No page wanted yet.
    pub(crate) fn new(blocks: &RamBlocks) -> Wanted {
        Wanted(blocks.iter().map(|(_, b)| AtomicBitmap::new(usize_of(b.pages()))).collect())
    }

    /// Mark `n` pages from `first` of `block` wanted, then fence (see the module doc).
    pub(crate) fn mark(&self, block: BlockId, first: usize, n: usize) {
        if let Some(b) = self.0.get(block) {
            b.set_range(first, n);
        }
        fence(Ordering::SeqCst);
    }

    fn count(&self, block: BlockId, first: usize, n: usize) -> usize {
        self.0.get(block).map_or(0, |b| b.count_range(first, n))
    }
}

/// Counters of the pages the stream threads placed (shared across resumes).
#[derive(Debug, Default)]
pub(crate) struct StreamCounts {
    demand: AtomicU64,
    background: AtomicU64,
    zero: AtomicU64,
    foreign: AtomicU64,
}

impl StreamCounts {
    pub(crate) fn snapshot(&self) -> PlacedElsewhere {
        PlacedElsewhere {
            demand: self.demand.load(Ordering::Relaxed),
            background: self.background.load(Ordering::Relaxed),
            zero: self.zero.load(Ordering::Relaxed),
            foreign: self.foreign.load(Ordering::Relaxed),
        }
    }
}

/// What one stream thread hands to the fault loop.
#[derive(Debug, Default)]
struct Shared {
    /// Placed ranges with wanted pages: (block, offset, len).
    landed: Mutex<Vec<(BlockId, u64, u64)>>,
    /// Why the thread stopped, when it stopped on its own.
    error: Mutex<Option<Error>>,
    /// The fault loop asked the thread to stop: errors from then on are not reported.
    stopping: AtomicBool,
    /// The thread read the source's Complete, the last frame the source sends before it waits
    /// for the destination's, and ended: the connection is left readable for the
    /// confirmation (CompleteAck) that follows the destination's Complete.
    finished: AtomicBool,
}

/// A running stream thread over one main connection.
#[derive(Debug)]
pub(crate) struct Stream {
    shared: Arc<Shared>,
    /// A handle on the main connection, to send an Error frame and to shut it down.
    sock: Transport,
    thread: Option<JoinHandle<()>>,
}

/// What a stream thread needs besides its connection.
pub(crate) struct StreamParts {
    pub(crate) ctx: Ctx,
    pub(crate) placer: Placer,
    pub(crate) wanted: Arc<Wanted>,
    pub(crate) counts: Arc<StreamCounts>,
    pub(crate) kick: Arc<Kick>,
    /// The thread's priority, which follows the fault loop's demand.
    pub(crate) priority: Arc<crate::sched::DemandPriority>,
    /// Main or an extra stream.
    pub(crate) conn: Conn,
    /// The background connection's number (0: main), for the thread's name and log.
    pub(crate) index: usize,
}

impl Stream {
    /// Start reading `main` (blocking) with `dec`, which may already hold frames.
    pub(crate) fn spawn(main: Transport, dec: Decoder, parts: StreamParts) -> Result<Stream> {
        main.set_nonblocking(false).ctx(|| "set the main connection blocking".into())?;
        // Records are opened on a thread of their own, beside placement (the stream thread is
        // the migration's critical path).
        main.read_ahead().ctx(|| "start opening the main connection's records ahead".into())?;
        let sock = main.try_clone().ctx(|| "clone the main connection".into())?;
        let shared = Arc::new(Shared::default());
        let sh = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(if parts.index == 0 {
                "postcopy-stream".into()
            } else {
                format!("postcopy-stream-{}", parts.index)
            })
            .spawn(move || run(main, dec, parts, &sh))
            .ctx(|| "spawn the stream thread".into())?;
        Ok(Stream { shared, sock, thread: Some(thread) })
    }

    /// Move the ranges placed since the last call into `out`.
    pub(crate) fn take_landed(&self, out: &mut Vec<(BlockId, u64, u64)>) {
        if let Ok(mut g) = self.shared.landed.lock() {
            out.append(&mut g);
        }
    }

    /// Why the thread stopped, if it stopped on its own (taken once).
    pub(crate) fn take_error(&self) -> Option<Error> {
        self.shared.error.lock().ok().and_then(|mut g| g.take())
    }

    /// The main connection (to send an Error frame on it).
    pub(crate) fn sock(&self) -> &Transport {
        &self.sock
    }

    /// Stop the thread and wait for it. `how` shuts the connection down: `Read` leaves the
    /// destination able to write its final frame (and, once the thread has ended on the
    /// source's Complete, is skipped: the source's confirmation is still to be read); `Both`
    /// drops the connection.
    pub(crate) fn stop(&mut self, how: Shutdown) {
        self.shared.stopping.store(true, Ordering::Release);
        if how == Shutdown::Both || !self.shared.finished.load(Ordering::Acquire) {
            let _ = self.sock.shutdown(how);
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the stream thread panicked");
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop(Shutdown::Read);
    }
}

fn run(mut main: Transport, mut dec: Decoder, parts: StreamParts, shared: &Shared) {
    let StreamParts { mut ctx, placer, wanted, counts, kick, priority, conn, index } = parts;
    let _priority = priority.enter();
    let started = std::time::Instant::now();
    let mut sink =
        StreamSink { placer, blocks: Arc::clone(&ctx.blocks), wanted, counts, shared, kick: &kick };
    let r = (|| -> Result<()> {
        loop {
            // Back down once no fault has waited for a while (see `sched`).
            priority.relax(crate::sched::DEMAND_HOLD);
            while let Some(f) = dec.next_frame()? {
                let last = matches!(f, Frame::Complete);
                if last {
                    shared.finished.store(true, Ordering::Release);
                }
                ctx.handle(f, conn, &mut sink)?;
                if last {
                    return Ok(());
                }
            }
            match fill(&mut dec, &mut main) {
                Ok(0) => {
                    return Err(super::network::eof(if index == 0 { "main" } else { "stream" }, dec.at_eof()))
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read the main connection", e)),
            }
        }
    })();
    sink.placer.flush_zap(&sink.blocks);
    let c = sink.counts.snapshot();
    log::info!(
        "stream thread {index}: placed {} pages in {:.3} s, {:.3} s of CPU (all streams so far: {} pages, {} zero)",
        sink.placer.stats().filled(),
        started.elapsed().as_secs_f64(),
        crate::sched::thread_cpu_secs(),
        c.demand + c.background,
        c.zero,
    );
    if let Err(e) = r {
        if !shared.stopping.load(Ordering::Acquire) {
            if let Ok(mut g) = shared.error.lock() {
                *g = Some(e);
            }
            kick.kick();
        }
    }
}

/// Read the next bytes of the main connection into `dec`: a chunk of records opened ahead is
/// adopted whole (no copy, see `transport::readahead`), a plaintext connection is read straight
/// into the decoder's buffer. `Ok(0)`: end of file.
fn fill(dec: &mut Decoder, main: &mut Transport) -> std::io::Result<usize> {
    match main.take_opened() {
        None => dec.read_from(main),
        Some(Ok(None)) => Ok(0),
        Some(Ok(Some(o))) => {
            let n = o.end - o.start;
            main.recycle(dec.adopt(o.buf, o.start, o.end));
            Ok(n)
        }
        Some(Err(e)) => Err(e),
    }
}

/// Places the stream's pages and reports the wanted ones.
struct StreamSink<'a> {
    placer: Placer,
    blocks: Arc<RamBlocks>,
    wanted: Arc<Wanted>,
    counts: Arc<StreamCounts>,
    shared: &'a Shared,
    kick: &'a Kick,
}

impl StreamSink<'_> {
    /// Place `[offset, offset+len)` of `block` with `op`, then count what this placer filled
    /// (and any foreign page it repaired), and hand the range to the fault loop when a page of
    /// it is wanted.
    fn place_with(
        &mut self,
        block: BlockId,
        offset: u64,
        len: u64,
        zero: bool,
        op: impl FnOnce(&Placer, &RamBlocks) -> Result<Placed>,
    ) -> Result<()> {
        let stats = Arc::clone(self.placer.stats());
        let (filled, foreign) = (stats.filled(), stats.foreign_pages.load(Ordering::Relaxed));
        op(&self.placer, &self.blocks)?;
        let filled = stats.filled() - filled;
        let foreign = stats.foreign_pages.load(Ordering::Relaxed) - foreign;
        let ps = self.blocks.get(block).map_or(4096, |b| b.page_size());
        fence(Ordering::SeqCst);
        let wanted = self.wanted.count(block, usize_of(offset / ps), usize_of(len / ps)) as u64;
        let demand = wanted.min(filled);
        self.counts.demand.fetch_add(demand, Ordering::Relaxed);
        self.counts.background.fetch_add(filled - demand, Ordering::Relaxed);
        self.counts.foreign.fetch_add(foreign, Ordering::Relaxed);
        if zero {
            self.counts.zero.fetch_add(filled, Ordering::Relaxed);
        }
        if wanted > 0 {
            if let Ok(mut g) = self.shared.landed.lock() {
                g.push((block, offset, len));
            }
            self.kick.kick();
        }
        Ok(())
    }
}

impl PageSink for StreamSink<'_> {
    fn page(&mut self, block: BlockId, offset: u64, data: &[u8], _: Urgency) -> Result<()> {
        self.place_with(block, offset, data.len() as u64, false, |p, b| p.place(b, block, offset, data))
    }

    fn zero(&mut self, block: BlockId, offset: u64, len: u64, _: Urgency) -> Result<()> {
        self.place_with(block, offset, len, true, |p, b| p.place_zero(b, block, offset, len))
    }
}
