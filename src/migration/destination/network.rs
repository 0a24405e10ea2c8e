//! [`NetworkSource`]: the fault loop's page source during postcopy. It owns the main and urgent
//! connections (non-blocking) with their decoders, and exposes one pollable fd: an epoll over both
//! sockets and an eventfd it kicks itself when whole frames are still buffered in a decoder
//! (buffered bytes do not make a socket readable).
//!
//! On every call it drains the urgent connection first (demand answers are placed at once), then
//! takes a bounded amount of the background stream so the loop gets back to client faults soon,
//! checking the urgent connection again after every background frame. Pages that arrive for
//! pages already received are ignored (a demand answer and the background copy may both come).
//! Demand faults become Request frames on the urgent connection.
//!
//! Postcopy recovery (when `CAP_RESUME` was accepted): an error on either connection drops both
//! and *pauses* the source instead of closing it. While paused, faults keep waiting (their
//! requests are kept), pages already present still wake at once (the fault loop checks the
//! received bitmap), and nothing is placed. The session accepts the reconnect off this thread
//! and hands the new connections over through a [`Resumer`]; on the next call the source installs
//! them and re-sends every outstanding demand Request on the new urgent connection before it
//! reads anything.

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::{Error, IoContext, Result};
use crate::eventfd::EventFd;
use crate::migration::wire::{encode, Decoder, Frame, WireError};
use crate::ram::{BlockId, RamBlocks};
use crate::source::{PageRequest, PageSink, PageSource, SourceState, Urgency};

/// Outstanding requests kept beyond this many are pruned of those already answered.
const PRUNE_AT: usize = 4096;
use crate::state::{PostcopyState, StateCell};

/// Background bytes taken from the main connection per call before yielding to the fault loop.
/// Placing them takes about 0.1-0.3 ms here; client faults are read only between calls, so this
/// bounds how long a demand fault waits behind the stream (4 MiB made it several milliseconds).
const MAIN_BUDGET: usize = 256 << 10;

const TOK_MAIN: u64 = 1;
const TOK_URGENT: u64 = 2;
const TOK_KICK: u64 = 3;

/// What the network source shares with the destination session: completion, failure, counters.
#[derive(Debug, Default)]
pub struct NetState {
    /// The source sent Complete (it has sent every page).
    pub complete: AtomicBool,
    failed: Mutex<Option<String>>,
    /// Pages that arrived on the urgent connection (demand answers and prefetch).
    pub urgent_pages: AtomicU64,
    /// Pages that arrived flagged DEMAND.
    pub demand_flagged_pages: AtomicU64,
    /// Pages that arrived on the main connection during postcopy.
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

    fn pause(&self, why: String) {
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
    pub main: TcpStream,
    /// Its decoder (block table set).
    pub main_dec: Decoder,
    /// Urgent connection.
    pub urgent: TcpStream,
    /// Its decoder (block table set).
    pub urgent_dec: Decoder,
}

/// Hands new connections to a paused [`NetworkSource`] from another thread.
#[derive(Debug, Clone)]
pub struct Resumer {
    slot: Arc<Mutex<Option<Connections>>>,
    kick: Arc<EventFd>,
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

/// The network page source (see the module doc).
#[derive(Debug)]
pub struct NetworkSource {
    conns: Option<Connections>,
    ep: OwnedFd,
    kick: Arc<EventFd>,
    slot: Arc<Mutex<Option<Connections>>>,
    ctx: Ctx,
    outbox: Vec<u8>,
    want_out: bool,
    closed: bool,
    /// Pause instead of closing on a connection error.
    resumable: bool,
    /// Demand requests not known to be answered: (block id, offset, len).
    outstanding: Vec<(BlockId, u64, u64)>,
}

#[derive(Debug)]
struct Ctx {
    blocks: Arc<RamBlocks>,
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
    /// moves it to Running); `net` is shared with the session.
    pub fn new(
        conns: Connections,
        blocks: Arc<RamBlocks>,
        ids: Vec<BlockId>,
        state: Arc<StateCell>,
        net: Arc<NetState>,
    ) -> Result<NetworkSource> {
        let ep = epoll::create(true).ctx(|| "epoll_create".into())?;
        // SAFETY: epoll::create returned a fresh fd that nothing else owns.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let kickfd = Arc::new(EventFd::new()?);
        ep_ctl(
            &ep,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            kickfd.as_raw_fd(),
            epoll::Events::EPOLLIN,
            TOK_KICK,
        )?;
        let mut s = NetworkSource {
            conns: None,
            ep,
            kick: kickfd,
            slot: Arc::new(Mutex::new(None)),
            ctx: Ctx { blocks, ids, state, net },
            outbox: Vec::new(),
            want_out: false,
            closed: false,
            resumable: false,
            outstanding: Vec::new(),
        };
        s.install(conns)?;
        Ok(s)
    }

    /// Pause (instead of failing) when a connection drops, and accept new connections from the
    /// returned [`Resumer`]. Only when both sides accepted `CAP_RESUME`.
    pub fn resumer(&mut self) -> Resumer {
        self.resumable = true;
        Resumer { slot: Arc::clone(&self.slot), kick: Arc::clone(&self.kick) }
    }

    /// Start using `c`: watch both sockets, then (after a resume) send every outstanding request.
    fn install(&mut self, c: Connections) -> Result<()> {
        c.main.set_nonblocking(true).ctx(|| "set the main connection non-blocking".into())?;
        c.urgent.set_nonblocking(true).ctx(|| "set the urgent connection non-blocking".into())?;
        let add = |fd: RawFd, tok| {
            ep_ctl(&self.ep, epoll::ControlOptions::EPOLL_CTL_ADD, fd, epoll::Events::EPOLLIN, tok)
        };
        add(c.main.as_raw_fd(), TOK_MAIN)?;
        if let Err(e) = add(c.urgent.as_raw_fd(), TOK_URGENT) {
            self.unwatch(&c);
            return Err(e);
        }
        self.conns = Some(c);
        self.outbox.clear();
        self.want_out = false;
        self.prune();
        for i in 0..self.outstanding.len() {
            let (block, offset, len) = self.outstanding[i];
            self.encode_request(block, offset, len)?;
        }
        // Frames read with the handshake may already wait in the decoders.
        self.kick.kick();
        Ok(())
    }

    fn unwatch(&self, c: &Connections) {
        for fd in [c.main.as_raw_fd(), c.urgent.as_raw_fd()] {
            let _ = ep_ctl(&self.ep, epoll::ControlOptions::EPOLL_CTL_DEL, fd, epoll::Events::empty(), 0);
        }
    }

    /// Drop the connections after an error: pause (resumable) or close.
    fn lose(&mut self, e: Error) -> SourceState {
        let text = e.to_string();
        self.send_error(&text);
        if let Some(c) = self.conns.take() {
            self.unwatch(&c);
            let _ = c.main.shutdown(std::net::Shutdown::Both);
            let _ = c.urgent.shutdown(std::net::Shutdown::Both);
        }
        self.outbox.clear();
        self.want_out = false;
        if self.resumable {
            self.ctx.net.pause(text);
            SourceState::Open
        } else {
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
                b.received().count_range((offset / ps) as usize, (len / ps) as usize) < (len / ps) as usize
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
        let f = Frame::Request { block: wire as u32, offset, len };
        encode(&f, &mut self.outbox)?;
        self.ctx.net.requests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn flush_outbox(&mut self) -> Result<()> {
        let Some(c) = self.conns.as_mut() else { return Ok(()) };
        while !self.outbox.is_empty() {
            match c.urgent.write(&self.outbox) {
                Ok(0) => return Err(Error::Invalid("the urgent connection stopped accepting bytes".into())),
                Ok(n) => {
                    self.outbox.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(Error::io("send a Request on the urgent connection", e)),
            }
        }
        let want = !self.outbox.is_empty();
        if want != self.want_out {
            let ev =
                if want { epoll::Events::EPOLLIN | epoll::Events::EPOLLOUT } else { epoll::Events::EPOLLIN };
            ep_ctl(&self.ep, epoll::ControlOptions::EPOLL_CTL_MOD, c.urgent.as_raw_fd(), ev, TOK_URGENT)?;
            self.want_out = want;
        }
        Ok(())
    }

    /// Read and handle everything the urgent connection has.
    fn pump_urgent(c: &mut Connections, ctx: &mut Ctx, sink: &mut dyn PageSink) -> Result<()> {
        loop {
            while let Some(f) = c.urgent_dec.next_frame()? {
                ctx.handle(f, true, sink)?;
            }
            match c.urgent_dec.read_from(&mut c.urgent) {
                Ok(0) => return Err(eof("urgent", c.urgent_dec.at_eof())),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(Error::io("read the urgent connection", e)),
            }
        }
    }

    fn pump(&mut self, sink: &mut dyn PageSink) -> Result<()> {
        self.flush_outbox()?;
        let ctx = &mut self.ctx;
        let Some(c) = self.conns.as_mut() else { return Ok(()) };
        Self::pump_urgent(c, ctx, sink)?;
        let mut budget = MAIN_BUDGET;
        loop {
            while budget > 0 {
                let Some(f) = c.main_dec.next_frame()? else { break };
                budget = budget.saturating_sub(frame_cost(&f));
                ctx.handle(f, false, sink)?;
                Self::pump_urgent(c, ctx, sink)?;
            }
            if budget == 0 {
                break;
            }
            match c.main_dec.read_from(&mut c.main) {
                Ok(0) => return Err(eof("main", c.main_dec.at_eof())),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(Error::io("read the main connection", e)),
            }
        }
        if c.main_dec.frame_ready()? || c.urgent_dec.frame_ready()? {
            self.kick.kick();
        }
        Ok(())
    }

    fn send_error(&mut self, text: &str) {
        let mut buf = Vec::new();
        if let Some(c) = self.conns.as_mut() {
            if encode(&Frame::Error { text }, &mut buf).is_ok() {
                let _ = c.main.write(&buf);
            }
        }
    }
}

fn eof(which: &str, e: WireError) -> Error {
    Error::Invalid(format!(
        "the source closed the {which} connection before the migration completed ({e}); the missing pages cannot arrive over it"
    ))
}

fn frame_cost(f: &Frame<'_>) -> usize {
    match f {
        Frame::Page { data, .. } => data.len() + 24,
        _ => 32,
    }
}

impl Ctx {
    fn handle(&mut self, f: Frame<'_>, urgent: bool, sink: &mut dyn PageSink) -> Result<()> {
        match f {
            Frame::Page { block, offset, demand, data } => {
                self.net.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                self.deliver(block, offset, data.len() as u64, Some(data), demand, urgent, sink)
            }
            Frame::ZeroRun { block, offset, len, demand } => {
                self.deliver(block, offset, len, None, demand, urgent, sink)
            }
            Frame::Run if !urgent => {
                if self.state.get() == PostcopyState::Listening {
                    self.state.transition(PostcopyState::Running)?;
                    log::info!("postcopy running");
                }
                Ok(())
            }
            Frame::Complete if !urgent => {
                self.net.complete.store(true, Ordering::Release);
                log::info!("the source has sent every page");
                Ok(())
            }
            Frame::Error { text } => Err(Error::Invalid(format!("the source reported an error: {text}"))),
            f => Err(Error::Invalid(format!(
                "unexpected {:?} frame on the {} connection during postcopy",
                f.frame_type(),
                if urgent { "urgent" } else { "main" }
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
        let mut i = 0;
        while i < pages {
            if b.received().test((first + i) as usize) {
                n.duplicate_pages.fetch_add(1, Ordering::Relaxed);
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < pages && !b.received().test((first + j) as usize) {
                j += 1;
            }
            let off = offset + i * ps;
            match data {
                Some(d) => sink.page(id, off, &d[(i * ps) as usize..(j * ps) as usize], urgency)?,
                None => sink.zero(id, off, (j - i) * ps, urgency)?,
            }
            i = j;
        }
        Ok(())
    }
}

impl PageSource for NetworkSource {
    fn request(&mut self, req: PageRequest, _sink: &mut dyn PageSink) -> Result<()> {
        if self.closed {
            return Err(Error::Invalid("the connection to the source is down; the request waits".into()));
        }
        if self.resumable {
            if self.outstanding.len() >= PRUNE_AT {
                self.prune();
            }
            self.outstanding.push((req.block, req.offset, req.len));
        }
        if self.conns.is_none() {
            // Paused: sent when the source reconnects.
            return Ok(());
        }
        self.encode_request(req.block, req.offset, req.len)?;
        if let Err(e) = self.flush_outbox() {
            let _ = self.lose(e);
        }
        Ok(())
    }

    fn poll_fds(&self) -> Vec<RawFd> {
        vec![self.ep.as_raw_fd()]
    }

    fn on_ready(&mut self, _fd: RawFd, sink: &mut dyn PageSink) -> Result<SourceState> {
        if self.closed {
            return Ok(SourceState::Closed);
        }
        self.kick.drain();
        if self.conns.is_none() {
            let Some(c) = self.slot.lock().ok().and_then(|mut g| g.take()) else {
                return Ok(SourceState::Open);
            };
            let before = self.ctx.net.requests.load(Ordering::Relaxed);
            if let Err(e) = self.install(c) {
                return Ok(self.lose(e));
            }
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
}
