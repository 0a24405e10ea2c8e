//! Scale case: many clients registered over a large sparse block (nothing is touched): how long
//! registration and teardown take and how much private memory the broker holds meanwhile.

use std::path::Path;
use std::time::Instant;

use crate::bench::peer::Peer;
use crate::bench::sys;
use postcopy_broker::error::{Error, Result};
use postcopy_broker::fault::{Broker, BrokerConfig};
use postcopy_broker::incoming::Incoming;
use postcopy_broker::ram::{BlockId, RamBlock, RamBlocks};
use postcopy_broker::source::{PageRequest, PageSink, PageSource};

/// A source of zero pages (nothing faults in this case; it only has to exist).
#[derive(Debug)]
struct ZeroSource;

impl PageSource for ZeroSource {
    fn request(&mut self, req: PageRequest, sink: &mut dyn PageSink) -> Result<()> {
        sink.zero(req.block as BlockId, req.offset, req.len, req.urgency)
    }
    fn wants_background_pull(&self) -> bool {
        false
    }
}

/// Figures of one scale run.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScaleFigures {
    /// Seconds to register every client.
    pub register_s: f64,
    /// Seconds to unregister every client, stop the loop and release the blocks.
    pub teardown_s: f64,
    /// Private memory of this process (the broker) with every client registered, bytes.
    pub private: u64,
    /// Of that, what appeared between before the blocks were created and after registration.
    pub private_delta: u64,
    /// Guest RAM in bytes.
    pub guest: u64,
}

/// Register `clients` clients, each mapping the whole of one sparse memfd block of `gib` GiB.
pub fn run(client: &Path, clients: usize, gib: u64) -> Result<ScaleFigures> {
    let size = gib << 30;
    let (before, _) = sys::private_memory()?;
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", size)?)?;
    let mut inc = Incoming::new(blocks);
    inc.advise()?;
    inc.listen()?;
    let h = Broker::spawn(&inc, Box::new(ZeroSource), BrokerConfig::default())?;
    let b = inc.blocks().get(0).ok_or_else(|| Error::Invalid("no block".into()))?;
    let mut peers = Vec::with_capacity(clients);
    for _ in 0..clients {
        peers.push(Peer::spawn(client, b, "", &[])?);
    }
    let t0 = Instant::now();
    let mut ids = Vec::with_capacity(clients);
    for (i, p) in peers.iter().enumerate() {
        ids.push(p.register(&h, &format!("scale-{i}"))?);
    }
    let register_s = t0.elapsed().as_secs_f64();
    let st = h.status()?;
    if st.clients.len() != clients {
        return Err(Error::Invalid(format!("{} of {clients} clients registered", st.clients.len())));
    }
    let (private, _) = sys::private_memory()?;
    let t1 = Instant::now();
    for id in ids {
        h.unregister(id)?;
    }
    h.stop()?;
    drop(inc);
    let teardown_s = t1.elapsed().as_secs_f64();
    drop(peers);
    Ok(ScaleFigures {
        register_s,
        teardown_s,
        private,
        private_delta: private.saturating_sub(before),
        guest: size,
    })
}
