//! Demand-fault case: a pcb-client process reads one byte of each page of a shared memfd in
//! order, timing every access; the broker (a fault loop in this process) serves every fault from
//! a memory source, as uffd_limit.c's `demand` handler does.

use std::path::Path;

use crate::bench::peer::Peer;
use crate::bench::sys;
use postcopy_broker::error::{Error, Result};
use postcopy_broker::fault::{Broker, BrokerConfig};
use postcopy_broker::incoming::Incoming;
use postcopy_broker::ram::{RamBlock, RamBlocks};
use postcopy_broker::source::{MemorySource, PageRequest, PageSink, PageSource};

/// The client's figures of one demand run (microseconds).
#[derive(Debug, Clone, Copy, Default)]
pub struct DemandFigures {
    /// Total time over pages.
    pub us_per_fault: f64,
    /// Median access latency.
    pub p50: f64,
    /// 99th percentile access latency.
    pub p99: f64,
    /// Slowest access.
    pub max: f64,
    /// Accesses that waited for a page (10 us or more; a page in the page cache maps faster).
    pub blocked: u64,
    /// Median of the accesses that blocked.
    pub blocked_p50: f64,
    /// 99th percentile of the accesses that blocked.
    pub blocked_p99: f64,
}

impl DemandFigures {
    /// Parse the `timed` object that pcb-client prints.
    pub fn from_json(t: &serde_json::Value) -> Result<DemandFigures> {
        let f = |k: &str| t[k].as_f64().ok_or_else(|| Error::Invalid(format!("no {k} in {t}")));
        Ok(DemandFigures {
            us_per_fault: f("us_per_fault")?,
            p50: f("p50")?,
            p99: f("p99")?,
            max: f("max")?,
            blocked: t["blocked"].as_u64().unwrap_or(0),
            blocked_p50: f("blocked_p50")?,
            blocked_p99: f("blocked_p99")?,
        })
    }
}

/// One demand run over `pages` pages with the broker blocking or busy-polling, the client pinned
/// to `cpus` (the broker's thread inherits the caller's affinity).
pub fn run(client: &Path, cpus: &[usize], pages: usize, busy_poll: bool) -> Result<DemandFigures> {
    run_with(client, cpus, pages, busy_poll, |n| Box::new(MemorySource::new(vec![(vec![7u8; n], 4096)])))
}

/// One demand run with the given source (built for `pages * 4096` bytes of block 0, every byte 7).
pub fn run_with(
    client: &Path,
    cpus: &[usize],
    pages: usize,
    busy_poll: bool,
    source: impl FnOnce(usize) -> Box<dyn PageSource>,
) -> Result<DemandFigures> {
    let n = pages * 4096;
    sys::warm_memory(2 * n)?;
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", n as u64)?)?;
    let mut inc = Incoming::new(blocks);
    inc.advise()?;
    inc.listen()?;
    let h = Broker::spawn(&inc, source(n), BrokerConfig { busy_poll, ..Default::default() })?;
    let b = inc.blocks().get(0).ok_or_else(|| Error::Invalid("no block".into()))?;
    let mut p = Peer::spawn(client, b, &format!("timed:0-{}", pages - 1), cpus)?;
    p.register(&h, "bench-demand")?;
    p.go()?;
    let lines = p.finish()?;
    h.stop()?;
    let t = lines
        .iter()
        .find_map(|l| l.get("timed"))
        .ok_or_else(|| Error::Invalid("the client printed no timed figures".into()))?;
    let sum = t["checksum"].as_u64().unwrap_or(0);
    if sum != 7 * pages as u64 {
        return Err(Error::Invalid(format!(
            "the client read wrong bytes: checksum {sum}, want {}",
            7 * pages
        )));
    }
    DemandFigures::from_json(t)
}

/// A source that answers every request with copies of one 4 KiB page of 7s (uffd_limit.c's
/// handler copies from one such page, which stays in the cache).
#[derive(Debug)]
pub struct HotPageSource {
    page: Vec<u8>,
}

impl HotPageSource {
    /// A source of pages full of 7s.
    pub fn new() -> HotPageSource {
        HotPageSource { page: vec![7u8; 4096] }
    }
}

impl Default for HotPageSource {
    fn default() -> Self {
        Self::new()
    }
}

impl PageSource for HotPageSource {
    fn request(&mut self, req: PageRequest, sink: &mut dyn PageSink) -> Result<()> {
        let mut o = 0;
        while o < req.len {
            sink.page(req.block, req.offset + o, &self.page, req.urgency)?;
            o += 4096;
        }
        Ok(())
    }
    fn wants_background_pull(&self) -> bool {
        false
    }
}
