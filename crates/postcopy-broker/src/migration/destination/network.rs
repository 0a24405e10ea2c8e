//! [`NetworkSource`]: the fault loop's page source during postcopy. It owns the urgent connection
//! (non-blocking) with its decoder and the stream thread of the main connection, and exposes one
//! pollable fd: an epoll over the urgent socket and an eventfd that the stream thread kicks (wanted
//! pages placed, or the main connection failed), as does the resumer and the source itself after
//! installing connections whose decoders already hold frames.
//!
//! The background stream (the main connection, and each extra `Stream` connection of
//! `CAP_STREAMS`) is read and placed by a stream thread of its own per connection (the `stream`
//! module); the fault loop keeps the urgent connection: on every call it places
//! the demand answers that arrived and wakes the waiters of wanted pages the stream thread
//! placed. Pages that arrive for pages already received are ignored (a demand answer and the
//! background copy may both come). Demand faults become Request frames on the urgent connection.
//!
//! Postcopy recovery (when `CAP_RESUME` was accepted): an error on either connection drops both
//! and *pauses* the source instead of closing it. While paused, faults keep waiting (their
//! requests are kept), pages already present still wake at once (the fault loop checks the
//! received bitmap), and nothing is placed. The session accepts the reconnect off this thread
//! and hands the new connections over through a [`Resumer`]; on the next call the source installs
//! them (starting a new stream thread) and re-sends every outstanding demand Request on the new
//! urgent connection before it reads anything.

use crate::conv::usize_of;
use crate::migration::wire::wire_index;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::kick::Kick;
use super::stream::{Stream, StreamCounts, StreamParts, Wanted};
use crate::error::{Error, IoContext, Result};
use crate::migration::transport::{Mode, Transport};
use crate::migration::wire::{encode, Decoder, Frame, WireError};
use crate::place::Placer;
use crate::ram::{BlockId, RamBlocks};
use crate::sched::{DemandPriority, StreamPriority};
use crate::source::{PageRequest, PageSink, PageSource, PlacedElsewhere, SourceState, Urgency};
use crate::uffd::Uffd;

/// Outstanding requests kept beyond this many are pruned of those already answered.
const PRUNE_AT: usize = 4096;
/// Request frames gathered beyond this many bytes are sent without waiting for the round's end.
const REQUEST_BATCH_BYTES: usize = 64 << 10;
use crate::state::{PostcopyState, StateCell};

const TOK_URGENT: u64 = 2;
const TOK_KICK: u64 = 3;

/// What the network source shares with the destination session: completion, failure, counters.
#[derive(Debug, Default)]
pub struct NetState {
    /// The source sent Complete on main (it has sent every page).
    pub complete: AtomicBool,
    /// Extra background streams of the current connections that have not ended with their
    /// Complete yet (the end waits for every stream to drain).
    pub streams_pending: AtomicU64,
    failed: Mutex<Option<String>>,
    /// Pages that arrived on the urgent connection (demand answers and prefetch).
    pub urgent_pages: AtomicU64,
    /// Pages that arrived flagged DEMAND.
    pub demand_flagged_pages: AtomicU64,
    /// Pages that arrived on the background connections (main and the extra streams) during
    /// postcopy.
    pub main_pages: AtomicU64,
    /// Pages that arrived as zero runs.
    pub zero_pages: AtomicU64,
    /// Pages that arrived for pages already received (ignored).
    pub duplicate_pages: AtomicU64,
    /// Page data bytes received during postcopy.
    pub bytes: AtomicU64,
    /// Request frames sent.
    pub requests: AtomicU64,
    /// Connection losses during postcopy (each one pauses the migration).
    pub pauses: AtomicU64,
    /// Successful resumes (new connections installed).
    pub resumes: AtomicU64,
    /// Requests sent again on a new urgent connection after a resume.
    pub reissued: AtomicU64,
    /// Digests of the pages that arrived (checked against the source's at the end).
    pub digests: crate::migration::digest::Received,
    paused: Mutex<Option<(String, Instant)>>,
}

impl NetState {
    /// Why the connection failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|g| g.clone())
    }

    /// Why and since when the migration is paused (the connections dropped), if it is.
    pub fn paused(&self) -> Option<(String, Instant)> {
        self.paused.lock().ok().and_then(|g| g.clone())
    }

    /// Record a failure that no resume can mend (the session reports it and stops).
    pub fn give_up(&self, why: String) {
        self.fail(why);
    }

    pub(super) fn pause(&self, why: String) {
        if let Ok(mut g) = self.paused.lock() {
            log::warn!("migration paused: {why}; waiting for the source to reconnect");
            *g = Some((why, Instant::now()));
        }
        self.pauses.fetch_add(1, Ordering::AcqRel);
    }

    fn unpause(&self) {
        if let Ok(mut g) = self.paused.lock() {
            *g = None;
        }
        self.resumes.fetch_add(1, Ordering::AcqRel);
    }

    fn fail(&self, why: String) {
        if let Ok(mut g) = self.failed.lock() {
            if g.is_none() {
                log::error!("migration connection: {why}");
                *g = Some(why);
            }
        }
    }
}

/// The two connections of one migration (after their handshake), each with its decoder, which
/// may already hold frames.
#[derive(Debug)]
pub struct Connections {
    /// Main connection.
    pub main: Transport,
    /// Its decoder (block table set).
    pub main_dec: Decoder,
    /// Urgent connection.
    pub urgent: Transport,
    /// Its decoder (block table set).
    pub urgent_dec: Decoder,
    /// The extra background streams (`CAP_STREAMS`), each with its decoder (block table set).
    pub streams: Vec<(Transport, Decoder)>,
}

/// Which connection a frame came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Conn {
    /// Main: control frames and the first background stream.
    Main,
    /// Urgent: demand answers and prefetch.
    Urgent,
    /// An extra background stream: pages, then Complete.
    Stream,
}

/// Hands new connections to a paused [`NetworkSource`] from another thread.
#[derive(Debug, Clone)]
pub struct Resumer {
    slot: Arc<Mutex<Option<Connections>>>,
    kick: Arc<Kick>,
}

impl Resumer {
    /// Give the source new connections (resume handshake done); it installs them on the fault
    /// loop thread, re-issues the outstanding requests, and unpauses.
    pub fn resume(&self, conns: Connections) {
        if let Ok(mut g) = self.slot.lock() {
            *g = Some(conns);
        }
        self.kick.kick();
    }
}

/// The urgent connection with its decoder.
#[derive(Debug)]
struct Urgent {
    sock: Transport,
    dec: Decoder,
}

/// The network page source (see the module doc).
#[derive(Debug)]
pub struct NetworkSource {
    /// The urgent connection, while connected.
    urgent: Option<Urgent>,
    /// The stream threads while connected: main's first, then one per extra stream.
    streams: Vec<Stream>,
    uffd: Arc<Uffd>,
    wanted: Arc<Wanted>,
    counts: Arc<StreamCounts>,
    /// Ranges the stream thread placed (reused).
    landed: Vec<(BlockId, u64, u64)>,
    /// The stream threads' priority, following the fault loop's demand.
    priority: Arc<DemandPriority>,
    ep: OwnedFd,
    kick: Arc<Kick>,
    slot: Arc<Mutex<Option<Connections>>>,
    ctx: Ctx,
    outbox: Vec<u8>,
    want_out: bool,
    closed: bool,
    /// Pause instead of closing on a connection error.
    resumable: bool,
    /// Demand requests not known to be answered: (block id, offset, len).
    outstanding: Vec<(BlockId, u64, u64)>,
    /// Connections installed after a pause.
    resumes_installed: u64,
    /// Received pages when the current connections were installed.
    received_at_install: u64,
    /// The last error that dropped the connections.
    last_loss: Option<String>,
    /// Resumes in a row that failed again with the same error before any page arrived.
    stalled_resumes: u32,
}

/// Resumes in a row that fail the same way, with nothing placed in between, before giving up.
const MAX_STALLED_RESUMES: u32 = 3;

#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub(crate) blocks: Arc<RamBlocks>,
    /// Wire block index → RamBlocks id.
    ids: Vec<BlockId>,
    state: Arc<StateCell>,
    net: Arc<NetState>,
}

fn ep_ctl(ep: &OwnedFd, op: epoll::ControlOptions, fd: RawFd, events: epoll::Events, tok: u64) -> Result<()> {
    epoll::ctl(ep.as_raw_fd(), op, fd, epoll::Event::new(events, tok)).ctx(|| format!("epoll_ctl fd {fd}"))
}

impl NetworkSource {
    /// A source over the two connections (each with its decoder, which may hold frames already
    /// read).
    /// `ids[i]` is the RAM block of wire block `i`; `state` is the Incoming's state cell (Run
    /// moves it to Running); `net` is shared with the session; `uffd` is the broker's own
    /// userfaultfd (where every block is registered), through which the stream thread places;
    /// `stream_nice` is the stream threads' priority.
    pub fn new(
        conns: Connections,
        uffd: Arc<Uffd>,
        blocks: Arc<RamBlocks>,
        ids: Vec<BlockId>,
        state: Arc<StateCell>,
        net: Arc<NetState>,
        stream_nice: StreamPriority,
    ) -> Result<NetworkSource> {
        let mut s = Self::paused(uffd, blocks, ids, state, net, stream_nice)?;
        s.install(conns)?;
        Ok(s)
    }

    /// A source with no connections yet, for a broker rebuilt after its own death (`restart`):
    /// with its [`resumer`](NetworkSource::resumer), faults wait and their requests are kept
    /// until the session hands it the resumed connections.
    pub fn paused(
        uffd: Arc<Uffd>,
        blocks: Arc<RamBlocks>,
        ids: Vec<BlockId>,
        state: Arc<StateCell>,
        net: Arc<NetState>,
        stream_nice: StreamPriority,
    ) -> Result<NetworkSource> {
        let ep = epoll::create(true).ctx(|| "epoll_create".into())?;
        // SAFETY: epoll::create returned a fresh fd that nothing else owns.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let kickfd = Arc::new(Kick::new()?);
        ep_ctl(
            &ep,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            kickfd.as_raw_fd(),
            epoll::Events::EPOLLIN,
            TOK_KICK,
        )?;
        let wanted = Arc::new(Wanted::new(&blocks));
        Ok(NetworkSource {
            urgent: None,
            streams: Vec::new(),
            uffd,
            wanted,
            counts: Arc::new(StreamCounts::default()),
            landed: Vec::new(),
            priority: DemandPriority::new(stream_nice, "stream thread"),
            ep,
            kick: kickfd,
            slot: Arc::new(Mutex::new(None)),
            ctx: Ctx { blocks, ids, state, net },
            outbox: Vec::new(),
            want_out: false,
            closed: false,
            resumable: false,
            outstanding: Vec::new(),
            resumes_installed: 0,
            received_at_install: 0,
            last_loss: None,
            stalled_resumes: 0,
        })
    }

    /// Pause (instead of failing) when a connection drops, and accept new connections from the
    /// returned [`Resumer`]. Only when both sides accepted `CAP_RESUME`.
    pub fn resumer(&mut self) -> Resumer {
        self.resumable = true;
        Resumer { slot: Arc::clone(&self.slot), kick: Arc::clone(&self.kick) }
    }

    /// Start using `c`: watch the urgent connection, start a stream thread on the main one, then
    /// (after a resume) send every outstanding request.
    fn install(&mut self, c: Connections) -> Result<()> {
        c.urgent.set_nonblocking(true).ctx(|| "set the urgent connection non-blocking".into())?;
        ep_ctl(
            &self.ep,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            c.urgent.as_raw_fd(),
            epoll::Events::EPOLLIN,
            TOK_URGENT,
        )?;
        let extras = c.streams.len() as u64;
        let all = std::iter::once((c.main, c.main_dec, Conn::Main))
            .chain(c.streams.into_iter().map(|(t, d)| (t, d, Conn::Stream)));
        // Before any thread runs: a stream's Complete may wait in its decoder already.
        self.ctx.net.streams_pending.store(extras, Ordering::Release);
        let mut started = Vec::with_capacity(1 + usize_of(extras));
        for (i, (sock, dec, conn)) in all.enumerate() {
            match self.stream_parts(conn, i).and_then(|parts| Stream::spawn(sock, dec, parts)) {
                Ok(s) => started.push(s),
                Err(e) => {
                    for mut s in started {
                        s.stop(Shutdown::Both);
                    }
                    self.unwatch(&c.urgent);
                    return Err(e);
                }
            }
        }
        self.streams = started;
        self.urgent = Some(Urgent { sock: c.urgent, dec: c.urgent_dec });
        self.outbox.clear();
        self.want_out = false;
        self.prune();
        for i in 0..self.outstanding.len() {
            let (block, offset, len) = self.outstanding[i];
            self.encode_request(block, offset, len)?;
        }
        // Frames read with the handshake may already wait in the urgent decoder.
        self.kick.kick();
        Ok(())
    }

    /// What the stream thread of background connection `index` (`conn`) needs.
    fn stream_parts(&self, conn: Conn, index: usize) -> Result<StreamParts> {
        let mut placer = Placer::new(Arc::clone(&self.uffd), self.ctx.blocks.largest_page_size())?;
        // Waiters are woken by the fault loop once it hears of the range.
        placer.set_wake_on_place(false);
        // Off the demand path: the exit no longer tears down these pages' entries.
        placer.set_zap_placed(true);
        Ok(StreamParts {
            ctx: self.ctx.clone(),
            placer,
            wanted: Arc::clone(&self.wanted),
            counts: Arc::clone(&self.counts),
            kick: Arc::clone(&self.kick),
            priority: Arc::clone(&self.priority),
            conn,
            index,
        })
    }

    fn unwatch(&self, urgent: &Transport) {
        let _ = ep_ctl(
            &self.ep,
            epoll::ControlOptions::EPOLL_CTL_DEL,
            urgent.as_raw_fd(),
            epoll::Events::empty(),
            0,
        );
    }

    /// Drop the connections after an error: pause (resumable) or close. A local failure
    /// (placement) closes even when resumable: a new connection would meet it again. So does a
    /// resume that fails again, with the same error, before a single page arrived over it.
    fn lose(&mut self, e: Error) -> SourceState {
        let text = e.to_string();
        let received = self.ctx.blocks.received_pages();
        let again = self.resumes_installed > 0
            && received == self.received_at_install
            && self.last_loss.as_deref() == Some(text.as_str());
        self.stalled_resumes = if again { self.stalled_resumes + 1 } else { 0 };
        self.last_loss = Some(text.clone());
        let fatal = matches!(e, Error::Placement(_)) || self.stalled_resumes >= MAX_STALLED_RESUMES;
        self.send_error(&text);
        for mut st in self.streams.drain(..) {
            st.stop(Shutdown::Both);
        }
        if let Some(u) = self.urgent.take() {
            self.unwatch(&u.sock);
            let _ = u.sock.shutdown(Shutdown::Both);
        }
        self.outbox.clear();
        self.want_out = false;
        if self.resumable && !fatal {
            self.ctx.net.pause(text);
            SourceState::Open
        } else {
            let text = if self.stalled_resumes >= MAX_STALLED_RESUMES {
                format!("{text} (the same failure after {} resumes in a row with no page placed in between: resuming again cannot help)", self.stalled_resumes)
            } else {
                text
            };
            self.ctx.net.fail(text);
            self.closed = true;
            SourceState::Closed
        }
    }

    /// Forget outstanding requests whose pages have all arrived.
    fn prune(&mut self) {
        let blocks = &self.ctx.blocks;
        self.outstanding.retain(|&(block, offset, len)| {
            blocks.get(block).is_some_and(|b| {
                let ps = b.page_size();
                b.received().count_range(usize_of(offset / ps), usize_of(len / ps)) < usize_of(len / ps)
            })
        });
    }

    fn encode_request(&mut self, block: BlockId, offset: u64, len: u64) -> Result<()> {
        let wire = self
            .ctx
            .ids
            .iter()
            .position(|&id| id == block)
            .ok_or_else(|| Error::UnknownBlock(format!("#{block}")))?;
        let f = Frame::Request { block: wire_index(wire), offset, len };
        encode(&f, &mut self.outbox)?;
        self.ctx.net.requests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn flush_outbox(&mut self) -> Result<()> {
        let Some(c) = self.urgent.as_mut() else { return Ok(()) };
        while !self.outbox.is_empty() {
            match c.sock.write(&self.outbox) {
                Ok(0) => return Err(Error::Invalid("the urgent connection stopped accepting bytes".into())),
                Ok(n) => {
                    self.outbox.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(Error::io("send a Request on the urgent connection", e)),
            }
        }
        match c.sock.flush() {
            Err(e) if e.kind() != ErrorKind::WouldBlock => {
                return Err(Error::io("send a Request on the urgent connection", e))
            }
            _ => {}
        }
        let want = !self.outbox.is_empty() || c.sock.wants_write();
        if want != self.want_out {
            let ev =
                if want { epoll::Events::EPOLLIN | epoll::Events::EPOLLOUT } else { epoll::Events::EPOLLIN };
            ep_ctl(&self.ep, epoll::ControlOptions::EPOLL_CTL_MOD, c.sock.as_raw_fd(), ev, TOK_URGENT)?;
            self.want_out = want;
        }
        Ok(())
    }

    /// Read and handle everything the urgent connection has. A plaintext socket that filled
    /// less than the room it was given is empty for now, and epoll (level-triggered) reports
    /// its next bytes: the read that would only say EAGAIN is skipped (one syscall of each
    /// demand page). A sealed transport may keep opened bytes of its own: it is read until it
    /// says EAGAIN.
    fn pump_urgent(c: &mut Urgent, ctx: &mut Ctx, sink: &mut dyn PageSink) -> Result<()> {
        let short_means_empty = c.sock.mode() == Mode::Plaintext;
        let mut empty = false;
        loop {
            while let Some(f) = c.dec.next_frame()? {
                ctx.handle(f, Conn::Urgent, sink)?;
            }
            if empty {
                return Ok(());
            }
            let room = c.dec.read_buf();
            let space = room.len();
            match c.sock.read(room) {
                Ok(0) => return Err(eof("urgent", c.dec.at_eof())),
                Ok(n) => {
                    c.dec.commit(n);
                    empty = short_means_empty && n < space;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(Error::io("read the urgent connection", e)),
            }
        }
    }

    fn pump(&mut self, sink: &mut dyn PageSink) -> Result<()> {
        self.flush_outbox()?;
        if let Some(c) = self.urgent.as_mut() {
            Self::pump_urgent(c, &mut self.ctx, sink)?;
        }
        for st in &self.streams {
            st.take_landed(&mut self.landed);
        }
        for &(block, offset, len) in &self.landed {
            sink.landed_elsewhere(block, offset, len);
        }
        self.landed.clear();
        match self.streams.iter().find_map(Stream::take_error) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn send_error(&mut self, text: &str) {
        let mut buf = Vec::new();
        if let Some(st) = self.streams.first() {
            if encode(&Frame::Error { text }, &mut buf).is_ok() {
                let mut sock = st.sock();
                let _ = sock.write(&buf);
            }
        }
    }
}

pub(crate) fn eof(which: &str, e: WireError) -> Error {
    Error::Invalid(format!(
        "the source closed the {which} connection before the migration completed ({e}); the missing pages cannot arrive over it"
    ))
}

impl Ctx {
    pub(crate) fn handle(&mut self, f: Frame<'_>, conn: Conn, sink: &mut dyn PageSink) -> Result<()> {
        if conn != Conn::Main && matches!(f, Frame::Digests { .. }) {
            return Err(Error::Invalid(format!("a Digests frame on the {conn:?} connection (only on main)")));
        }
        if self.net.digests.observe(&f) {
            return Ok(());
        }
        let urgent = conn == Conn::Urgent;
        match f {
            Frame::Page { block, offset, demand, data } => {
                self.net.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                self.deliver(block, offset, data.len() as u64, Some(data), demand, urgent, sink)
            }
            Frame::ZeroRun { block, offset, len, demand } => {
                self.deliver(block, offset, len, None, demand, urgent, sink)
            }
            Frame::Run if conn == Conn::Main => {
                if self.state.get() == PostcopyState::Listening {
                    self.state.transition(PostcopyState::Running)?;
                    log::info!("postcopy running");
                }
                Ok(())
            }
            Frame::Complete if conn == Conn::Main => {
                self.net.complete.store(true, Ordering::Release);
                log::info!("the source has sent every page");
                Ok(())
            }
            Frame::Complete if conn == Conn::Stream => {
                // Only a stream thread of the current connections gets here (the others were
                // stopped before a resume installed new ones and reset the count).
                let _ = self
                    .net
                    .streams_pending
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
                Ok(())
            }
            Frame::Error { text } => Err(Error::Invalid(format!("the source reported an error: {text}"))),
            f => Err(Error::Invalid(format!(
                "unexpected {:?} frame on the {conn:?} connection during postcopy",
                f.frame_type(),
            ))),
        }
    }

    /// Hand the not-yet-received pages of a run to the sink, in sub-runs.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        wire_block: u32,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        demand: bool,
        urgent: bool,
        sink: &mut dyn PageSink,
    ) -> Result<()> {
        let id = *self
            .ids
            .get(wire_block as usize)
            .ok_or_else(|| Error::UnknownBlock(format!("wire #{wire_block}")))?;
        let b = self.blocks.get(id).ok_or_else(|| Error::UnknownBlock(format!("#{id}")))?;
        let ps = b.page_size();
        let pages = len / ps;
        let first = offset / ps;
        let n = &self.net;
        if urgent {
            n.urgent_pages.fetch_add(pages, Ordering::Relaxed);
        } else {
            n.main_pages.fetch_add(pages, Ordering::Relaxed);
        }
        if demand {
            n.demand_flagged_pages.fetch_add(pages, Ordering::Relaxed);
        }
        if data.is_none() {
            n.zero_pages.fetch_add(pages, Ordering::Relaxed);
        }
        let urgency = if demand { Urgency::Demand } else { Urgency::Background };
        let (start, end) = (usize_of(first), usize_of(first + pages));
        let mut handed = 0;
        for (p, k) in b.received().runs(start, end, false) {
            let (i, k) = ((p - start) as u64, k as u64);
            let placed = match data {
                Some(d) => {
                    sink.page(id, offset + i * ps, &d[usize_of(i * ps)..usize_of((i + k) * ps)], urgency)
                }
                None => sink.zero(id, offset + i * ps, k * ps, urgency),
            };
            // A failure here is this host's (the ioctl, memory), not the connection's.
            placed.map_err(|e| Error::Placement(Box::new(e)))?;
            handed += k;
        }
        n.duplicate_pages.fetch_add(pages - handed, Ordering::Relaxed);
        Ok(())
    }
}

impl PageSource for NetworkSource {
    fn request(&mut self, req: PageRequest, sink: &mut dyn PageSink) -> Result<()> {
        self.mark_wanted(req, sink);
        if self.closed {
            return Err(Error::Invalid("the connection to the source is down; the request waits".into()));
        }
        if self.resumable {
            if self.outstanding.len() >= PRUNE_AT {
                self.prune();
            }
            self.outstanding.push((req.block, req.offset, req.len));
        }
        if self.urgent.is_none() {
            // Paused: sent when the source reconnects.
            return Ok(());
        }
        // Sent with the round's other requests in one write (`flush_requests`), unless the
        // batch is already large.
        self.encode_request(req.block, req.offset, req.len)?;
        if self.outbox.len() >= REQUEST_BATCH_BYTES {
            self.flush_requests();
        }
        Ok(())
    }

    fn flush_requests(&mut self) {
        if self.urgent.is_none() || self.outbox.is_empty() {
            return;
        }
        if let Err(e) = self.flush_outbox() {
            let _ = self.lose(e);
        }
    }

    fn poll_fds(&self) -> Vec<RawFd> {
        vec![self.ep.as_raw_fd()]
    }

    fn on_ready(&mut self, _fd: RawFd, sink: &mut dyn PageSink) -> Result<SourceState> {
        if self.closed {
            return Ok(SourceState::Closed);
        }
        self.kick.take();
        if self.urgent.is_none() {
            let Some(c) = self.slot.lock().ok().and_then(|mut g| g.take()) else {
                return Ok(SourceState::Open);
            };
            let before = self.ctx.net.requests.load(Ordering::Relaxed);
            if let Err(e) = self.install(c) {
                return Ok(self.lose(e));
            }
            self.resumes_installed += 1;
            self.received_at_install = self.ctx.blocks.received_pages();
            let n = self.ctx.net.requests.load(Ordering::Relaxed) - before;
            self.ctx.net.reissued.fetch_add(n, Ordering::Relaxed);
            self.ctx.net.unpause();
            log::info!("migration resumed: {n} outstanding requests sent again");
            if self.ctx.state.get() == PostcopyState::Listening {
                self.ctx.state.transition(PostcopyState::Running)?;
            }
        }
        match self.pump(sink) {
            Ok(()) => Ok(SourceState::Open),
            // Errors end the connections, never the fault loop: faults keep waiting (a resume
            // can serve them) and the session reports or recovers.
            Err(e) => Ok(self.lose(e)),
        }
    }

    fn wants_background_pull(&self) -> bool {
        false
    }

    fn placed_elsewhere(&self) -> PlacedElsewhere {
        self.counts.snapshot()
    }

    fn demand_waiting(&mut self, waiting: bool) {
        self.priority.set_demand(waiting);
    }
}

impl NetworkSource {
    /// Mark the requested pages wanted, so the stream thread reports them when it places them;
    /// pages it placed before it could see the mark are reported here (see `stream`).
    fn mark_wanted(&mut self, req: PageRequest, sink: &mut dyn PageSink) {
        let Some(b) = self.ctx.blocks.get(req.block) else { return };
        let ps = b.page_size();
        let (first, n) = (usize_of(req.offset / ps), usize_of(req.len / ps));
        self.wanted.mark(req.block, first, n);
        for (p, k) in b.received().runs(first, first + n, true) {
            sink.landed_elsewhere(req.block, p as u64 * ps, k as u64 * ps);
        }
    }
}
