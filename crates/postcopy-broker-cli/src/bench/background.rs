//! Background placement case: the fault loop pulls a whole block from a memory source with no
//! client faulting, while idle clients stay registered; throughput in GiB/s and wakes per page.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::bench::peer::Peer;
use crate::bench::sys;
use postcopy_broker::error::{Error, Result};
use postcopy_broker::fault::{Broker, BrokerConfig};
use postcopy_broker::incoming::Incoming;
use postcopy_broker::ram::{RamBlock, RamBlocks};
use postcopy_broker::source::{MemorySource, PageRequest, PageSink, PageSource, Urgency};

/// A source that ignores background requests until its gate opens (so that the clock starts,
/// and the idle clients are registered, before any page moves). Demand requests always pass.
#[derive(Debug)]
pub struct Gated<S> {
    inner: S,
    open: Arc<AtomicBool>,
}

impl<S> Gated<S> {
    /// `inner` behind a closed gate; returns the gate.
    pub fn new(inner: S) -> (Gated<S>, Arc<AtomicBool>) {
        let open = Arc::new(AtomicBool::new(false));
        (Gated { inner, open: Arc::clone(&open) }, open)
    }
}

impl<S: PageSource> PageSource for Gated<S> {
    fn request(&mut self, req: PageRequest, sink: &mut dyn PageSink) -> Result<()> {
        if req.urgency == Urgency::Background && !self.open.load(Ordering::Acquire) {
            return Ok(());
        }
        self.inner.request(req, sink)
    }

    fn flush_requests(&mut self) {
        self.inner.flush_requests()
    }
}

/// Figures of one background run.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackgroundFigures {
    /// Placement throughput.
    pub gibs: f64,
    /// UFFDIO_WAKEs issued per placed page.
    pub wakes_per_page: f64,
    /// Pages placed.
    pub pages: u64,
}

/// Fill `mib` MiB in background pulls of `chunk` bytes with `idle` idle clients registered.
pub fn run(client: &Path, cpus: &[usize], mib: usize, chunk: u64, idle: usize) -> Result<BackgroundFigures> {
    let n = mib << 20;
    sys::warm_memory(4 * n)?;
    let mut data = vec![0u8; n];
    for (page, b) in data.chunks_mut(4096).zip((0..251u8).cycle()) {
        page.fill(b | 1);
    }
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", n as u64)?)?;
    let mut inc = Incoming::new(blocks);
    inc.advise()?;
    inc.listen()?;
    let (src, gate) = Gated::new(MemorySource::new(vec![(data, 4096)]));
    let config = BrokerConfig { background: true, background_chunk: chunk, ..Default::default() };
    let h = Broker::spawn(&inc, Box::new(src), config)?;
    let b = inc.blocks().get(0).ok_or_else(|| Error::Invalid("no block".into()))?;
    let mut peers = Vec::new();
    for i in 0..idle {
        let p = Peer::spawn(client, b, "wait", cpus)?;
        p.register(&h, &format!("idle-{i}"))?;
        peers.push(p);
    }
    // Wait on another CPU than the fault loop's: polling there would preempt it.
    let pinned = sys::step_aside()?;
    let t0 = Instant::now();
    gate.store(true, Ordering::Release);
    while !inc.blocks().all_received() {
        sys::nap();
    }
    let secs = t0.elapsed().as_secs_f64();
    sys::set_affinity(&pinned)?;
    let st = h.status()?;
    for p in &mut peers {
        p.go()?;
        p.go()?;
        p.finish()?;
    }
    h.stop()?;
    let pages = st.broker.pages_background + st.broker.pages_demand;
    Ok(BackgroundFigures {
        gibs: n as f64 / (1u64 << 30) as f64 / secs,
        wakes_per_page: st.broker.wakes as f64 / pages.max(1) as f64,
        pages,
    })
}

/// The ceiling of a memory source: UFFDIO_COPY in 2 MiB ioctls, as uffd_limit's `copy_2m`, but
/// from a source as large as the destination (cold in the caches, like guest RAM) instead of
/// one hot 2 MiB buffer. GiB/s.
pub fn cold_copy(mib: usize) -> Result<f64> {
    const CHUNK: usize = 2 << 20;
    let n = (mib << 20).max(CHUNK) / CHUNK * CHUNK;
    sys::warm_memory(4 * n)?;
    let src = postcopy_broker::ram::Mapping::private(n)?;
    for (p, b) in (0..n).step_by(4096).zip((0..251u8).cycle()) {
        // SAFETY: the private mapping is n bytes long and writable; p + 4096 <= n.
        unsafe { std::ptr::write_bytes(src.as_ptr().add(p), b | 1, 4096) };
    }
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("cold-copy", n as u64)?)?;
    let mut inc = Incoming::new(blocks);
    inc.advise()?;
    inc.listen()?;
    let uffd = inc.uffd().ok_or_else(|| Error::Invalid("no userfaultfd after listen".into()))?;
    let base = inc.blocks().get(0).ok_or_else(|| Error::Invalid("no block".into()))?.host_addr();
    let t0 = Instant::now();
    let mut done = 0usize;
    while done < n {
        let len = (CHUNK - done % CHUNK) as u64;
        // SAFETY: `src + done` points at `len` readable bytes of the private mapping.
        let r = unsafe { uffd.copy(base + done as u64, src.as_ptr().add(done), len, false) };
        match r.map_err(|e| Error::io("UFFDIO_COPY (cold copy)", e))? {
            postcopy_broker::uffd::Fill::Done(k) => done += postcopy_broker::conv::usize_of(k),
            postcopy_broker::uffd::Fill::Again => {}
            postcopy_broker::uffd::Fill::Exists => {
                return Err(Error::Invalid("cold copy: a page of the fresh block exists".into()))
            }
        }
    }
    Ok(n as f64 / (1u64 << 30) as f64 / t0.elapsed().as_secs_f64())
}
