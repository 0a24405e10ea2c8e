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

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::eventfd::EventFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, IoContext, Result};
use crate::migration::wire::{encode, Decoder, Frame, WireError};
use crate::ram::{BlockId, RamBlocks};
use crate::source::{PageRequest, PageSink, PageSource, SourceState, Urgency};
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
}

impl NetState {
    /// Why the connection failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|g| g.clone())
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

/// The network page source (see the module doc).
#[derive(Debug)]
pub struct NetworkSource {
    main: TcpStream,
    urgent: TcpStream,
    main_dec: Decoder,
    urgent_dec: Decoder,
    ep: OwnedFd,
    kick: EventFd,
    ctx: Ctx,
    outbox: Vec<u8>,
    want_out: bool,
    closed: bool,
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
        (main, main_dec): (TcpStream, Decoder),
        (urgent, urgent_dec): (TcpStream, Decoder),
        blocks: Arc<RamBlocks>,
        ids: Vec<BlockId>,
        state: Arc<StateCell>,
        net: Arc<NetState>,
    ) -> Result<NetworkSource> {
        main.set_nonblocking(true).ctx(|| "set the main connection non-blocking".into())?;
        urgent.set_nonblocking(true).ctx(|| "set the urgent connection non-blocking".into())?;
        let ep = epoll::create(true).ctx(|| "epoll_create".into())?;
        // SAFETY: epoll::create returned a fresh fd that nothing else owns.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let kickfd = EventFd::new()?;
        ep_ctl(
            &ep,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            main.as_raw_fd(),
            epoll::Events::EPOLLIN,
            TOK_MAIN,
        )?;
        ep_ctl(
            &ep,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            urgent.as_raw_fd(),
            epoll::Events::EPOLLIN,
            TOK_URGENT,
        )?;
        ep_ctl(
            &ep,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            kickfd.as_raw_fd(),
            epoll::Events::EPOLLIN,
            TOK_KICK,
        )?;
        // Frames read with the handshake may already wait in the decoders.
        kickfd.kick();
        Ok(NetworkSource {
            main,
            urgent,
            main_dec,
            urgent_dec,
            ep,
            kick: kickfd,
            ctx: Ctx { blocks, ids, state, net },
            outbox: Vec::new(),
            want_out: false,
            closed: false,
        })
    }

    fn flush_outbox(&mut self) -> Result<()> {
        while !self.outbox.is_empty() {
            match self.urgent.write(&self.outbox) {
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
            ep_ctl(&self.ep, epoll::ControlOptions::EPOLL_CTL_MOD, self.urgent.as_raw_fd(), ev, TOK_URGENT)?;
            self.want_out = want;
        }
        Ok(())
    }

    /// Read and handle everything the urgent connection has.
    fn pump_urgent(&mut self, sink: &mut dyn PageSink) -> Result<()> {
        loop {
            while let Some(f) = self.urgent_dec.next_frame()? {
                self.ctx.handle(f, true, sink)?;
            }
            match self.urgent_dec.read_from(&mut self.urgent) {
                Ok(0) => return Err(self.eof("urgent", self.urgent_dec.at_eof())),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(Error::io("read the urgent connection", e)),
            }
        }
    }

    fn eof(&self, which: &str, e: WireError) -> Error {
        Error::Invalid(format!(
            "the source closed the {which} connection before the migration completed ({e}); the missing pages cannot arrive"
        ))
    }

    fn pump(&mut self, sink: &mut dyn PageSink) -> Result<()> {
        self.kick.drain();
        self.flush_outbox()?;
        self.pump_urgent(sink)?;
        let mut budget = MAIN_BUDGET;
        loop {
            while budget > 0 {
                let Some(f) = self.main_dec.next_frame()? else { break };
                budget = budget.saturating_sub(frame_cost(&f));
                self.ctx.handle(f, false, sink)?;
                self.pump_urgent(sink)?;
            }
            if budget == 0 {
                break;
            }
            match self.main_dec.read_from(&mut self.main) {
                Ok(0) => return Err(self.eof("main", self.main_dec.at_eof())),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(Error::io("read the main connection", e)),
            }
        }
        if self.main_dec.frame_ready()? || self.urgent_dec.frame_ready()? {
            self.kick.kick();
        }
        Ok(())
    }

    fn send_error(&mut self, text: &str) {
        let mut buf = Vec::new();
        if encode(&Frame::Error { text }, &mut buf).is_ok() {
            let _ = self.main.write(&buf);
        }
    }
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
        let wire = self
            .ctx
            .ids
            .iter()
            .position(|&id| id == req.block)
            .ok_or_else(|| Error::UnknownBlock(format!("#{}", req.block)))?;
        let f = Frame::Request { block: wire as u32, offset: req.offset, len: req.len };
        encode(&f, &mut self.outbox)?;
        self.ctx.net.requests.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.flush_outbox() {
            self.ctx.net.fail(e.to_string());
            self.closed = true;
            return Err(e);
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
        match self.pump(sink) {
            Ok(()) => Ok(SourceState::Open),
            Err(e) => {
                // Errors end this source, never the fault loop: faults keep waiting (a later
                // resume can serve them) and the session reports the failure.
                let text = e.to_string();
                self.send_error(&text);
                self.ctx.net.fail(text);
                self.closed = true;
                Ok(SourceState::Closed)
            }
        }
    }

    fn wants_background_pull(&self) -> bool {
        false
    }
}
