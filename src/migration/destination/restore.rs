//! Lazy restore from a snapshot image: the destination's RAM blocks, a [`FileSource`] as the page
//! source, and the fault loop's background fill; clients fault on what they touch first while
//! the rest streams in from the file.

use std::path::Path;
use std::time::{Duration, Instant};

use super::session::create_blocks;
use super::summary::{Progress, Summary};
use crate::error::Result;
use crate::fault::{Broker, BrokerConfig, BrokerHandle};
use crate::incoming::Incoming;
use crate::migration::wire::{BlockInfo, BlockTable};
use crate::source::FileSource;

/// A lazy restore in progress.
#[derive(Debug)]
pub struct Restore {
    incoming: Incoming,
    broker: Option<BrokerHandle>,
    started: Instant,
    progress: Progress,
}

impl Restore {
    /// Create the blocks (memfd / hugetlbfs), listen, and start the fault loop serving from the
    /// image at `path` (blocks back to back) with background fill.
    pub fn start(
        path: &Path,
        infos: Vec<BlockInfo>,
        mut config: BrokerConfig,
        progress: Progress,
    ) -> Result<Restore> {
        let table = BlockTable::new(infos)?;
        let started = Instant::now();
        let mut incoming = Incoming::new(create_blocks(&table)?);
        let source = FileSource::open(path, incoming.blocks())?;
        incoming.advise()?;
        incoming.listen()?;
        config.background = true;
        let h = Broker::spawn(&incoming, Box::new(source), config)?;
        incoming.run()?;
        Ok(Restore { incoming, broker: Some(h), started, progress })
    }

    /// The fault loop: register clients with it.
    pub fn broker(&self) -> Option<&BrokerHandle> {
        self.broker.as_ref()
    }

    /// The Incoming.
    pub fn incoming(&self) -> &Incoming {
        &self.incoming
    }

    /// Wait until every page is in, stop the loop, clean up; the summary and the Incoming.
    pub fn finish(mut self) -> Result<(Summary, Incoming)> {
        let blocks = std::sync::Arc::clone(self.incoming.blocks());
        let mut p = self.progress.start(blocks.total_pages(), blocks.total_size());
        while !blocks.all_received() {
            p.update(blocks.received_pages(), 0);
            std::thread::sleep(Duration::from_millis(20));
        }
        p.clear();
        let status = match self.broker.take() {
            Some(h) => h.stop()?,
            None => Default::default(),
        };
        self.incoming.cleanup()?;
        let secs = self.started.elapsed().as_secs_f64();
        let s = Summary::from_status(secs, secs, blocks.total_size(), &status);
        Ok((s, self.incoming))
    }
}
