//! [`EmbeddedBroker`]: a running in-process broker and its lifecycle after the start: progress,
//! the background fill, waiting for the last page, and the end ([`EmbeddedBroker::finish`] for
//! a complete migration, [`EmbeddedBroker::stop`] to give up, both done on drop if forgotten).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::embed::error::{at_end, at_start, EmbedError, EmbedResult};
use crate::fault::BrokerHandle;
use crate::incoming::Incoming;
use crate::ram::RamBlocks;
use crate::stats::StatusReport;

/// How often [`EmbeddedBroker::wait_complete`] looks at the received bitmaps.
const POLL: Duration = Duration::from_millis(5);

/// What an ended broker gives back.
#[derive(Debug)]
pub struct Finished {
    /// The fault loop's final status (pages by demand and background, clients, latencies).
    pub report: StatusReport,
    /// Whether every page had arrived ([`EmbeddedBroker::finish`]); after
    /// [`EmbeddedBroker::stop`] of an incomplete migration, false.
    pub complete: bool,
    /// The vhost-user backends' connections, in the order they joined: told POSTCOPY_END by
    /// `finish`, not told anything by `stop`.
    #[cfg(feature = "vhost-user")]
    pub backends: Vec<crate::vhost_user::BackendConn>,
}

/// A broker running in this process: the fault loop on its own thread serves the faults of the
/// VMM's guest memory, of vhost-user backends and of control-socket clients from the page
/// source. Made by [`BrokerBuilder::start`](crate::embed::BrokerBuilder::start).
#[derive(Debug)]
pub struct EmbeddedBroker {
    pub(crate) incoming: Incoming,
    /// `None` once ended.
    pub(crate) handle: Option<BrokerHandle>,
    #[cfg(feature = "vhost-user")]
    pub(crate) vmm: crate::embed::guest::VmmMapping,
    #[cfg(feature = "vhost-user")]
    pub(crate) backends: Vec<crate::embed::backends::Attached>,
}

impl EmbeddedBroker {
    pub(crate) fn new(
        incoming: Incoming,
        handle: BrokerHandle,
        #[cfg(feature = "vhost-user")] vmm: crate::embed::guest::VmmMapping,
    ) -> EmbeddedBroker {
        EmbeddedBroker {
            incoming,
            handle: Some(handle),
            #[cfg(feature = "vhost-user")]
            vmm,
            #[cfg(feature = "vhost-user")]
            backends: Vec::new(),
        }
    }

    /// The guest runs (Listening → Running).
    pub(crate) fn running(&mut self) -> EmbedResult<()> {
        self.incoming.run().map_err(at_start("run"))
    }

    /// The running fault loop (register more clients, read status); an error once ended.
    pub fn handle(&self) -> EmbedResult<&BrokerHandle> {
        self.handle.as_ref().ok_or(EmbedError::Ended)
    }

    /// The RAM blocks the broker serves (ids, names, received bitmaps).
    pub fn blocks(&self) -> &Arc<RamBlocks> {
        self.incoming.blocks()
    }

    /// The postcopy lifecycle (state, the broker's own userfaultfd).
    pub fn incoming(&self) -> &Incoming {
        &self.incoming
    }

    /// (received, total) pages.
    pub fn progress(&self) -> (u64, u64) {
        let b = self.blocks();
        (b.received_pages(), b.total_pages())
    }

    /// Whether every page of every block has arrived.
    pub fn is_complete(&self) -> bool {
        self.blocks().all_received()
    }

    /// The fault loop's status now.
    pub fn status(&self) -> EmbedResult<StatusReport> {
        self.handle()?.status().map_err(EmbedError::LoopDied)
    }

    /// Start (`true`) or stop (`false`) the background fill at any time: stopped, only pages
    /// somebody faults on are fetched; started, missing pages are pulled whenever the loop is
    /// idle until every page is there. Takes effect before any later request to the loop
    /// (status, registration) is answered.
    pub fn set_background(&self, on: bool) -> EmbedResult<()> {
        self.handle()?.set_background(on).map_err(EmbedError::LoopDied)
    }

    /// `Ok` while the fault loop runs; its reason once it died.
    pub fn check_alive(&mut self) -> EmbedResult<()> {
        match self.handle.as_mut() {
            Some(h) => h.check_alive().map_err(EmbedError::LoopDied),
            None => Err(EmbedError::Ended),
        }
    }

    /// Wait until every page has arrived, at most `timeout`, watching that the fault loop lives.
    pub fn wait_complete(&mut self, timeout: Duration) -> EmbedResult<()> {
        let start = Instant::now();
        loop {
            self.check_alive()?;
            if self.is_complete() {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                let (received, total) = self.progress();
                return Err(EmbedError::Timeout { received, total, waited: start.elapsed() });
            }
            std::thread::sleep(POLL);
        }
    }

    /// End a complete migration: stop the fault loop (control clients are told `postcopy_end`
    /// first), send POSTCOPY_END to the vhost-user backends, unregister the blocks, and release
    /// the VMM's userfaultfd. Refused while pages are missing: the broker keeps running then.
    pub fn finish(&mut self) -> EmbedResult<Finished> {
        if self.handle.is_none() {
            return Err(EmbedError::Ended);
        }
        let (received, total) = self.progress();
        if received != total {
            return Err(EmbedError::Incomplete { received, total });
        }
        let handle = self.handle.take().ok_or(EmbedError::Ended)?;
        let report = handle.finish_complete().map_err(at_end("stop the fault loop"));
        self.end(report, true)
    }

    /// Give up on the migration: stop the fault loop, unregister the blocks and release the
    /// VMM's userfaultfd (its missing pages then read as zeros instead of blocking forever). The
    /// backends are not told POSTCOPY_END: their missing pages stay missing.
    pub fn stop(&mut self) -> EmbedResult<Finished> {
        let handle = self.handle.take().ok_or(EmbedError::Ended)?;
        let complete = self.is_complete();
        let report = handle.stop().map_err(at_end("stop the fault loop"));
        self.end(report, complete)
    }

    /// After the loop stopped: POSTCOPY_END (when complete), cleanup. Every step is tried; the
    /// loop's error comes first, then the first of the others (the rest are logged).
    fn end(&mut self, report: EmbedResult<StatusReport>, complete: bool) -> EmbedResult<Finished> {
        let mut errors = Vec::new();
        #[cfg(feature = "vhost-user")]
        let backends = {
            let (conns, err) = crate::embed::backends::end_all(std::mem::take(&mut self.backends), complete);
            errors.extend(err);
            self.vmm.uffd = None;
            conns
        };
        if let Err(e) = self.incoming.cleanup() {
            errors.push(at_end("cleanup (unregister the blocks)")(e));
        }
        let report = report?;
        let mut errors = errors.into_iter();
        if let Some(e) = errors.next() {
            errors.for_each(|other| log::warn!("ending postcopy: {other}"));
            return Err(e);
        }
        Ok(Finished {
            report,
            complete,
            #[cfg(feature = "vhost-user")]
            backends,
        })
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        if self.handle.is_some() {
            if let Err(e) = self.stop() {
                log::warn!("stopping the embedded broker on drop: {e}");
            }
        }
    }
}
