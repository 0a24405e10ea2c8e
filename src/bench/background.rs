//! Background placement case: the fault loop pulls a whole block from a memory source with no
//! client faulting, while idle clients stay registered; throughput in GiB/s and wakes per page.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::bench::peer::Peer;
use crate::bench::sys;
use crate::error::{Error, Result};
use crate::fault::{Broker, BrokerConfig};
use crate::incoming::Incoming;
use crate::ram::{RamBlock, RamBlocks};
use crate::source::{MemorySource, PageRequest, PageSink, PageSource, Urgency};

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
    for (i, page) in data.chunks_mut(4096).enumerate() {
        page.fill((i % 251) as u8 | 1);
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
    let t0 = Instant::now();
    gate.store(true, Ordering::Release);
    while !inc.blocks().all_received() {
        sys::nap();
    }
    let secs = t0.elapsed().as_secs_f64();
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
