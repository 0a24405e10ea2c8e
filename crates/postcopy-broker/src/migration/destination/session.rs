//! The destination side of one migration: accept and authenticate the two connections, read
//! Hello and create (or check) the RAM blocks, then follow the source through the postcopy
//! states with the [`Incoming`]: Advise (discard all RAM), precopy pages written directly and
//! marked received, Discards, Listen (own uffd, then the fault loop with the [`NetworkSource`]),
//! Run, and the end when every page is received and the source said Complete.
//!
//! Connections come through the [`Gate`]: it authenticates every connection concurrently (a
//! stranger cannot hold up or stop the session) and the session takes only those whose Hello
//! belongs to it: the main connection first, then the urgent one of the same session (same id,
//! same blocks, same peer certificate in the TLS mode), then (`CAP_STREAMS`) the extra background
//! streams the source announces on main, at most [`DestinationOptions::max_streams`] in all,
//! each placed by a stream thread of its own.
//!
//! If a connection drops during postcopy (and both sides accepted `CAP_RESUME`), the network
//! source pauses and [`finish`](Destination::finish) waits at the gate for the source to
//! reconnect with the same session id: it sends the received bitmaps (Resume frames,
//! ResumeEnd), reads ResumeAck and hands the connections to the fault loop. A source that does
//! not come back within `resume_timeout` ends the migration with an error (docs/recovery.md
//! says what state RAM and clients are left in).
//!
//! At the end the source's page digests must equal the destination's ([`crate::migration::digest`]);
//! otherwise the migration fails and the source is told so.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::end::{End, Ending};
use super::gate::{Arrival, Gate, GateLimits};
use super::network::{Connections, NetState, NetworkSource, Resumer};
use super::resume::{write_ack, Link, Streams};
use super::summary::{Progress, Summary};
use crate::error::{Error, IoContext, Result};
use crate::fault::{Broker, BrokerConfig, BrokerHandle};
use crate::incoming::Incoming;
use crate::migration::transport::{Security, Transport, DEFAULT_HANDSHAKE_TIMEOUT};
use crate::migration::wire::{
    negotiate, write_frame, BlockInfo, BlockTable, Channel, Decoder, Frame, WireError, CAP_DIGEST,
    CAP_RESUME, CAP_URGENT_CHANNEL,
};
use crate::ram::{BlockId, RamBlock, RamBlocks, HUGE_1G, HUGE_2M, SMALL_PAGE};
use crate::state::PostcopyState;

/// Capabilities this destination accepts: every one this version knows.
pub const DESTINATION_CAPS: u64 = crate::migration::wire::CAP_ALL;

/// Default of [`DestinationOptions::max_streams`].
pub const DEFAULT_MAX_STREAMS: u16 = 4;

/// Default of [`DestinationOptions::resume_timeout`].
pub const DEFAULT_RESUME_TIMEOUT: Duration = Duration::from_secs(60);

/// Default of [`DestinationOptions::end_linger`]: longer than the source's longest reconnect
/// backoff (1 s) several times over.
pub const DEFAULT_END_LINGER: Duration = Duration::from_secs(10);

/// Settings of a destination session.
#[derive(Debug, Clone)]
pub struct DestinationOptions {
    /// Deadline of each connection's handshake and Hello (a stranger holds a handshake slot at
    /// most this long).
    pub handshake_timeout: Duration,
    /// How long to wait for the source's urgent connection after the main one.
    pub accept_timeout: Duration,
    /// Fault loop settings (background pull is off for a network source in any case).
    pub broker: BrokerConfig,
    /// Progress display.
    pub progress: Progress,
    /// How long to wait for the source to reconnect after a connection drops during postcopy
    /// before giving up.
    pub resume_timeout: Duration,
    /// Priority of the stream threads that place the background stream: by default low while
    /// no fault waits and full while faults wait (see [`crate::sched`]).
    pub stream_nice: crate::sched::StreamPriority,
    /// After the final Complete: how long to wait for the source's confirmation and, without
    /// it, to keep answering a resume of the completed session (the source may have missed
    /// Complete). The migration succeeds here either way.
    pub end_linger: Duration,
    /// Background connections taken from one source, main included (`CAP_STREAMS`; 1 keeps the
    /// one stream on main). Each is authenticated and bound to the session like the urgent one.
    pub max_streams: u16,
    /// Bound of the destination's own writes on every connection (`--write-timeout`, zero:
    /// none): a source or middlebox that stops reading without closing cuts the connection
    /// after it, as any cut (a pause during postcopy).
    pub write_timeout: Duration,
}

impl Default for DestinationOptions {
    fn default() -> DestinationOptions {
        DestinationOptions {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            accept_timeout: Duration::from_secs(30),
            broker: BrokerConfig::default(),
            progress: Progress::Auto,
            resume_timeout: DEFAULT_RESUME_TIMEOUT,
            stream_nice: crate::sched::StreamPriority::default(),
            end_linger: DEFAULT_END_LINGER,
            max_streams: DEFAULT_MAX_STREAMS,
            write_timeout: crate::migration::transport::DEFAULT_WRITE_TIMEOUT,
        }
    }
}

/// A destination session (see the module doc for the order of calls).
#[derive(Debug)]
pub struct Destination {
    pub(super) incoming: Incoming,
    pub(super) main: Option<Transport>,
    pub(super) main_dec: Option<Decoder>,
    /// The urgent connection and the extra background streams, until listening.
    pub(super) urgent: Option<Extras>,
    /// Wire block index → RamBlocks id.
    pub(super) ids: Vec<BlockId>,
    pub(super) net: Arc<NetState>,
    pub(super) broker: Option<BrokerHandle>,
    pub(super) opts: DestinationOptions,
    pub(super) started: Instant,
    pub(super) listen_at: Option<Instant>,
    pub(super) precopy_pages: u64,
    pub(super) precopy_bytes: u64,
    pub(super) peer: SocketAddr,
    /// What a resume must match and repeat.
    pub(super) link: Link,
    pub(super) resumer: Option<Resumer>,
    /// Capabilities both sides accepted.
    pub(super) caps: u64,
    /// Pauses already answered by a resume handshake.
    pub(super) handled_pauses: u64,
}

/// The connections of a session besides main, with their decoders.
#[derive(Debug)]
pub(super) struct Extras {
    urgent: (Transport, Decoder),
    streams: Vec<(Transport, Decoder)>,
}

/// Naps of pages, at the last nap's rate, that count as near the end for [`finish_nap`].
const NEAR_NAPS: u64 = 4;

/// How long [`Destination::finish`] naps between its looks: 20 ms while the end is far, 1 ms
/// once it is near (the source's Complete came, every page is here, or at the rate of the last
/// nap the `missing` pages arrive within the next four: the last megabytes, already in the
/// socket buffers, come faster than the average), so that the end does not wait out a whole nap
/// begun just before the last page (issue #15: exit within 50 ms of it).
fn finish_nap(complete: bool, missing: u64, arrived_last_nap: u64) -> Duration {
    if complete || arrived_last_nap.saturating_mul(NEAR_NAPS) >= missing {
        Duration::from_millis(1)
    } else {
        Duration::from_millis(20)
    }
}

/// Send an Error frame (best effort) and return `e`.
pub(super) fn refuse(s: &Transport, e: Error) -> Error {
    let text = e.to_string();
    let mut s = s;
    let _ = write_frame(&mut s, &Frame::Error { text: &text });
    e
}

/// RAM blocks for an announced table: memfds for 4 KiB pages, hugetlbfs memfds for huge pages.
pub fn create_blocks(table: &BlockTable) -> Result<RamBlocks> {
    let mut blocks = RamBlocks::new();
    for b in table.iter() {
        let block = match b.page_size {
            SMALL_PAGE => RamBlock::memfd(&b.name, b.size)?,
            HUGE_2M | HUGE_1G => RamBlock::hugetlb(&b.name, b.size, b.page_size)?,
            ps => {
                return Err(Error::UnsupportedPageSize {
                    page_size: ps,
                    why: format!(
                        "block '{}' announces it; only 4 KiB, 2 MiB and 1 GiB pages exist here",
                        b.name
                    ),
                })
            }
        };
        blocks.add(block)?;
    }
    Ok(blocks)
}

/// Map each announced block to a block of `blocks` with the same name, size and page size.
fn match_blocks(table: &BlockTable, blocks: &RamBlocks) -> Result<Vec<BlockId>> {
    table
        .iter()
        .map(|b: &BlockInfo| {
            let (id, ours) = blocks.named(&b.name)?;
            if ours.size() != b.size || ours.page_size() != b.page_size {
                return Err(Error::Invalid(format!(
                    "block '{}': the source has {} bytes of {}-byte pages, this destination {} of {}",
                    b.name,
                    b.size,
                    b.page_size,
                    ours.size(),
                    ours.page_size()
                )));
            }
            Ok(id)
        })
        .collect()
}

impl Destination {
    /// Accept the source's main and urgent connections on `listener`, authenticated with
    /// `security`, and answer their Hellos. The RAM blocks are created from the Hello (`blocks`
    /// None) or must match the given ones. Connections that fail their handshake or do not
    /// belong to the session are refused and logged; waiting goes on.
    pub fn accept(
        listener: &TcpListener,
        security: &Security,
        blocks: Option<RamBlocks>,
        opts: DestinationOptions,
    ) -> Result<Destination> {
        let limits = GateLimits {
            handshake_timeout: opts.handshake_timeout,
            write_timeout: opts.write_timeout,
            ..GateLimits::default()
        };
        let gate = Gate::open(listener, security.clone(), limits)?;
        let first = loop {
            let a = gate.next(None).ok_or_else(|| Error::Invalid("the migration gate stopped".into()))?;
            if a.hello.resume {
                let why = format!(
                    "no paused session {:016x} to resume here: this destination was started after the migration began (a destination restarted during postcopy cannot resume it); start a new migration",
                    a.hello.session_id
                );
                a.refuse(&why);
                continue;
            }
            if a.hello.channel != Channel::Main {
                a.refuse("no migration session is open here yet: the main connection comes first");
                continue;
            }
            break a;
        };
        let Arrival { transport: main, dec: mut main_dec, hello } = first;
        let started = Instant::now();
        let peer = main.peer_addr();
        log::info!("migration connection from {peer} ({})", main.mode());
        let (version, caps) = negotiate(&hello, DESTINATION_CAPS).map_err(|e| refuse(&main, e.into()))?;
        for (cap, what) in
            [(CAP_URGENT_CHANNEL, "the urgent channel"), (CAP_DIGEST, "page digests (CAP_DIGEST)")]
        {
            if caps & cap == 0 {
                return Err(refuse(
                    &main,
                    Error::Invalid(format!(
                        "the source does not offer {what}, which this destination requires"
                    )),
                ));
            }
        }
        let setup = match blocks {
            Some(b) => match_blocks(&hello.blocks, &b).map(|ids| (b, ids)),
            None => create_blocks(&hello.blocks).map(|b| {
                let ids = (0..b.len()).collect();
                (b, ids)
            }),
        };
        let (blocks, ids) = setup.map_err(|e| refuse(&main, e))?;
        main_dec.set_blocks(hello.blocks.clone());
        write_ack(&main, version, caps, opts.max_streams)?;
        log::info!(
            "hello: {} blocks, {} bytes, session {:016x}, version {version}, capabilities {caps:#x}",
            hello.blocks.len(),
            blocks.total_size(),
            hello.session_id
        );
        let link = Link {
            gate,
            session_id: hello.session_id,
            table: hello.blocks.clone(),
            caps: DESTINATION_CAPS,
            identity: main.peer_identity().map(<[u8]>::to_vec),
            max_streams: opts.max_streams,
        };
        let deadline = Instant::now() + opts.accept_timeout;
        let (urgent, mut urgent_dec) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(a) = link.gate.next(Some(left)).filter(|_| !left.is_zero()) else {
                return Err(refuse(
                    &main,
                    Error::Invalid(format!(
                        "the source's urgent connection did not arrive within {:?} of the main one",
                        opts.accept_timeout
                    )),
                ));
            };
            match link.check(&a, Channel::Urgent, false) {
                Ok(()) => break (a.transport, a.dec),
                Err(why) => a.refuse(&why),
            }
        };
        urgent_dec.set_blocks(hello.blocks.clone());
        write_ack(&urgent, version, caps, opts.max_streams)?;
        let streams = match link.attach_streams(&main, &mut main_dec, caps, false, opts.accept_timeout)? {
            Streams::Attached(s) => s,
            Streams::Replaced(_) => {
                return Err(Error::Invalid("a resume Hello replaced a new session".into()))
            }
        };
        let net = Arc::new(NetState::default());
        // Shared, so that a restarted broker keeps what arrived (see `restart`).
        if let Err(e) = net.digests.set_blocks_shared(&hello.blocks, None) {
            log::warn!("digest table in memory only ({e}): a restarted broker could not check the pages");
            net.digests.set_blocks(&hello.blocks);
        }
        Ok(Destination {
            incoming: Incoming::new(blocks),
            main: Some(main),
            main_dec: Some(main_dec),
            urgent: Some(Extras { urgent: (urgent, urgent_dec), streams }),
            ids,
            net,
            broker: None,
            opts,
            started,
            listen_at: None,
            precopy_pages: 0,
            precopy_bytes: 0,
            peer,
            link,
            resumer: None,
            caps,
            handled_pauses: 0,
        })
    }

    /// The main connection (None only in a rebuilt session before the source resumed).
    fn main(&self) -> Result<&Transport> {
        self.main.as_ref().ok_or_else(|| Error::Invalid("the source has not reconnected yet".into()))
    }

    /// Send `e` to the source as an Error frame when connected; return it.
    fn refuse_main(&self, e: Error) -> Error {
        match &self.main {
            Some(m) => refuse(m, e),
            None => e,
        }
    }

    /// The Incoming (add notifiers before [`run_until_listening`](Destination::run_until_listening)).
    pub fn incoming_mut(&mut self) -> &mut Incoming {
        &mut self.incoming
    }

    /// The Incoming.
    pub fn incoming(&self) -> &Incoming {
        &self.incoming
    }

    /// The fault loop, once listening: register clients with it.
    pub fn broker(&self) -> Option<&BrokerHandle> {
        self.broker.as_ref()
    }

    /// The network counters.
    pub fn net(&self) -> &Arc<NetState> {
        &self.net
    }

    /// Follow the main connection through Advise, precopy pages and Discards up to Listen; then
    /// listen and start the fault loop with the network source. Returns the loop's handle.
    pub fn run_until_listening(&mut self) -> Result<&BrokerHandle> {
        let mut dec = self.main_dec.take().ok_or_else(|| Error::Invalid("already listening".into()))?;
        loop {
            let r = self.pre_listen_frame(&mut dec);
            match r {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => return Err(self.refuse_main(e)),
            }
        }
        let Extras { urgent: (urgent, urgent_dec), streams } =
            self.urgent.take().ok_or_else(|| Error::Invalid("no urgent connection".into()))?;
        let main = self.main()?.try_clone().ctx(|| "clone the main connection".into())?;
        let uffd = self
            .incoming
            .uffd()
            .cloned()
            .ok_or_else(|| Error::Invalid("the incoming migration has no userfaultfd".into()))?;
        let mut src = NetworkSource::new(
            Connections { main, main_dec: dec, urgent, urgent_dec, streams },
            uffd,
            Arc::clone(self.incoming.blocks()),
            self.ids.clone(),
            Arc::clone(self.incoming.state()),
            Arc::clone(&self.net),
            self.opts.stream_nice,
        )?;
        if self.caps & CAP_RESUME != 0 {
            self.resumer = Some(src.resumer());
        }
        let mut config = self.opts.broker.clone();
        config.background = false;
        let h = Broker::spawn(&self.incoming, Box::new(src), config)?;
        self.listen_at = Some(Instant::now());
        log::info!(
            "listening: {} of {} pages already here from precopy",
            self.incoming.blocks().received_pages(),
            self.incoming.blocks().total_pages()
        );
        Ok(self.broker.insert(h))
    }

    /// Handle one frame before Listen; true when it was Listen (and listen() succeeded).
    fn pre_listen_frame(&mut self, dec: &mut Decoder) -> Result<bool> {
        let state = self.incoming.state().get();
        let main = self.main()?;
        let f = match dec.read_frame(&mut &*main) {
            Ok(f) => f,
            Err(e) => {
                let why = match e {
                    WireError::Closed => "the source closed the connection".to_string(),
                    e => format!("the connection to the source failed ({e})"),
                };
                return Err(Error::Invalid(format!(
                    "{why} in state {state}, before postcopy started: the destination RAM is incomplete and no client was attached; run the migration again (docs/recovery.md)"
                )));
            }
        };
        let advised = matches!(state, PostcopyState::Advise | PostcopyState::Discard);
        self.net.digests.observe_precopy(&f);
        match f {
            Frame::Advise => self.incoming.advise()?,
            Frame::Page { block, offset, data, .. } if advised => {
                let id = self.id(block)?;
                self.incoming.precopy_page(id, offset, data)?;
                let ps = self.incoming.blocks().get(id).map_or(SMALL_PAGE, |b| b.page_size());
                self.precopy_pages += data.len() as u64 / ps;
                self.precopy_bytes += data.len() as u64;
            }
            Frame::ZeroRun { block, offset, len, .. } if advised => {
                let id = self.id(block)?;
                self.incoming.precopy_zero(id, offset, len)?;
                let ps = self.incoming.blocks().get(id).map_or(SMALL_PAGE, |b| b.page_size());
                self.precopy_pages += len / ps;
            }
            Frame::Discard { block, ranges } if advised => {
                let id = self.id(block)?;
                for r in ranges {
                    self.incoming.discard(id, r.offset, r.len)?;
                }
            }
            Frame::Listen if advised => {
                self.incoming.listen()?;
                return Ok(true);
            }
            Frame::Error { text } => return Err(Error::Invalid(format!("the source reported: {text}"))),
            f => {
                return Err(Error::Invalid(format!(
                    "a {:?} frame is not allowed in state {state} (order: Advise, pages, Discard, Listen)",
                    f.frame_type()
                )))
            }
        }
        Ok(false)
    }

    fn id(&self, wire: u32) -> Result<BlockId> {
        self.ids.get(wire as usize).copied().ok_or_else(|| Error::UnknownBlock(format!("wire #{wire}")))
    }

    /// Wait until every page is received and the source said Complete (showing progress), then
    /// stop the fault loop, clean up (state End, InboundEnd notifiers), deliver Complete to the
    /// source (see `end`: a source that missed it may resume the completed session), and return the summary and the Incoming (whose RAM now holds the guest's memory).
    pub fn finish(mut self) -> Result<(Summary, Incoming)> {
        if self.broker.is_none() {
            self.run_until_listening()?;
        }
        let blocks = Arc::clone(self.incoming.blocks());
        let total = blocks.total_pages();
        let mut progress = self.opts.progress.start(total, blocks.total_size());
        let mut received_before = blocks.received_pages();
        loop {
            if let Some(Err(e)) = self.broker.as_mut().map(|h| h.check_alive()) {
                progress.clear();
                return Err(e);
            }
            if let Some(why) = self.net.failure() {
                if let Some(h) = self.broker.take() {
                    let _ = h.stop();
                }
                progress.clear();
                return Err(Error::Invalid(format!(
                    "migration from {} failed during postcopy: {why}",
                    self.peer
                )));
            }
            if let Some(e) = self.net.digests.conflict() {
                progress.clear();
                return Err(self.fail_digests(e));
            }
            if self.net.pauses.load(Ordering::Acquire) > self.handled_pauses {
                if let Err(e) = self.recover() {
                    if let Some(h) = self.broker.take() {
                        let _ = h.stop();
                    }
                    progress.clear();
                    return Err(e);
                }
                continue;
            }
            let done = self.net.complete.load(Ordering::Acquire)
                && self.net.streams_pending.load(Ordering::Acquire) == 0
                && blocks.all_received()
                && self.net.paused().is_none();
            let received = blocks.received_pages();
            progress.update(received, self.precopy_bytes + self.net.bytes.load(Ordering::Relaxed));
            if done {
                break;
            }
            let complete = self.net.complete.load(Ordering::Acquire);
            std::thread::sleep(finish_nap(
                complete,
                total.saturating_sub(received),
                received.saturating_sub(received_before),
            ));
            received_before = received;
        }
        progress.clear();
        if let Err(e) = self.net.digests.verify() {
            return Err(self.fail_digests(e));
        }
        let h = self.broker.take().ok_or_else(|| Error::Invalid("no fault loop".into()))?;
        let status = h.finish_complete()?;
        self.incoming.cleanup()?;
        let end = End {
            link: &self.link,
            blocks: &blocks,
            ids: &self.ids,
            digests: &self.net.digests,
            caps: self.caps,
            linger: self.opts.end_linger,
            accept_timeout: self.opts.accept_timeout,
        };
        let ending = end.deliver(self.main()?)?;
        let mut summary = Summary::new(
            self.started.elapsed(),
            self.listen_at.map(|t| t.elapsed()).unwrap_or_default(),
            self.precopy_pages,
            self.precopy_bytes,
            &self.net,
            status,
        );
        if ending == Ending::ConfirmedAfterResume {
            // The loss at the end (a pause if the fault loop still saw it) and its resume.
            summary.pauses = summary.pauses.max(summary.resumes + 1);
            summary.resumes = summary.pauses;
        }
        summary.end = Some(ending);
        Ok((summary, self.incoming))
    }

    /// The digests say the RAM cannot be trusted: stop the fault loop, tell the source, fail.
    fn fail_digests(&mut self, e: crate::migration::digest::DigestError) -> Error {
        if let Some(h) = self.broker.take() {
            let _ = h.stop();
        }
        let e = Error::from(e);
        if let Some(m) = &self.main {
            let _ = m.set_nonblocking(false);
        }
        self.refuse_main(e)
    }

    /// The connections dropped during postcopy: wait for the source to reconnect (until
    /// `resume_timeout` after the drop), do the resume handshake and hand the new connections to
    /// the network source. Connections that fail the handshake are refused and waiting goes on.
    fn recover(&mut self) -> Result<()> {
        let pauses = self.net.pauses.load(Ordering::Acquire);
        let (why, since) =
            self.net.paused().unwrap_or_else(|| ("the connection dropped".into(), Instant::now()));
        let resumer =
            self.resumer.clone().ok_or_else(|| Error::Invalid(format!("migration failed: {why}")))?;
        let deadline = since + self.opts.resume_timeout;
        let blocks = Arc::clone(self.incoming.blocks());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let accepted = if left.is_zero() { None } else { self.link.gate.next(Some(left)) };
            let Some(arrival) = accepted else {
                let (have, total) = (blocks.received_pages(), blocks.total_pages());
                let e = format!(
                    "migration from {} failed during postcopy: {why}; the source did not resume within {:?}. \
                     {have} of {total} pages are here, {} never arrived: they stay unfilled (never zero-filled), \
                     clients that touch them stay blocked; stop the clients, this guest cannot run here \
                     (see docs/recovery.md)",
                    self.peer,
                    self.opts.resume_timeout,
                    total - have
                );
                self.net.give_up(e.clone());
                return Err(Error::Invalid(e));
            };
            let peer = arrival.peer();
            log::info!("reconnect from {peer}: resume handshake");
            match self.link.handshake(
                arrival,
                &blocks,
                &self.ids,
                Some(&self.net.digests),
                self.opts.accept_timeout,
            ) {
                Ok(conns) => {
                    self.main = Some(conns.main.clone());
                    self.peer = peer;
                    self.handled_pauses = pauses;
                    resumer.resume(conns);
                    return Ok(());
                }
                Err(e) => log::warn!("the reconnect from {peer} failed: {e}; still waiting for the source"),
            }
        }
    }

    /// [`run_until_listening`](Destination::run_until_listening) and
    /// [`finish`](Destination::finish).
    pub fn run(mut self) -> Result<(Summary, Incoming)> {
        self.run_until_listening()?;
        self.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finish_loop_looks_often_only_near_the_end() {
        let (short, long) = (Duration::from_millis(1), Duration::from_millis(20));
        assert_eq!(finish_nap(false, 1000, 10), long, "far: 100 naps of pages to go at this rate");
        assert_eq!(finish_nap(false, 0, 0), short, "every page is here: Complete is next");
        assert_eq!(finish_nap(false, 3900, 1000), short, "the last pages come within four naps");
        assert_eq!(finish_nap(false, 4100, 1000), long, "five naps to go");
        assert_eq!(finish_nap(true, 5000, 0), short, "the source sent everything");
    }
}
