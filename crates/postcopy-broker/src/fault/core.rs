//! The fault path's state and logic, without the epoll plumbing: translate a fault to
//! (block, page), wake at once if the page is there, otherwise join or create a request; place
//! pages that arrive and owe a wake to exactly the clients that wait. It is the [`PageSink`] of
//! every page source.

use crate::conv::{nanos, usize_of};
use std::sync::Arc;
use std::time::Instant;

use crate::blocktime::Blocktime;
use crate::client::{AddressMap, Client, ClientId, Registry, RepeatGuard};
use crate::error::Result;
use crate::fault::pending::{Pending, Waiter};
use crate::fault::wake::WakeQueue;
use crate::place::{Placer, StagingPage};
use crate::ram::{BlockId, RamBlocks};
use crate::source::{FileSource, PageRequest, PageSink, PageSource, Urgency};
use crate::stats::BrokerStats;
use crate::uffd::{Message, Uffd};

/// Faults in a row on present pages it was just woken for, after which a client is considered
/// broken (see [`RepeatGuard`]).
const REPEAT_LIMIT: u32 = 10_000;

/// Largest run asked of a source in one request.
pub const MAX_RUN: u64 = 2 << 20;

/// The fault path's state (owned by the fault loop thread).
#[derive(Debug)]
pub struct Core {
    pub(crate) blocks: Arc<RamBlocks>,
    pub(crate) own: Arc<Uffd>,
    pub(crate) placer: Placer,
    pub(crate) pending: Pending,
    pub(crate) wakes: WakeQueue,
    wake_buf: Vec<(ClientId, u64, u64)>,
    /// Waiters of a landed page (reused: the fault path does not allocate).
    taken: Vec<Waiter>,
    pub(crate) clients: Registry,
    pub(crate) stats: BrokerStats,
    /// Who waited how long in remote faults (QEMU's postcopy blocktime and latency).
    pub(crate) blocktime: Blocktime,
    /// (block, page index) newly requested in this round.
    new_requests: Vec<(BlockId, u64)>,
    /// Image file for private clients.
    pub(crate) image: Option<FileSource>,
    pub(super) staging: StagingPage,
    /// Private faults that got EAGAIN: retried after the client's events are drained.
    pub(crate) deferred: Vec<(ClientId, u64, u32, Instant)>,
    /// Children that clients forked in this round: (parent, child), to be adopted or released
    /// by the loop (which knows the parent's limits).
    pub(crate) born: Vec<(ClientId, Client)>,
    /// Clients that failed in this round (to be retired).
    pub(crate) failed: Vec<ClientId>,
    /// Clients whose process is gone (the kernel said ESRCH) seen in this round: to be released.
    pub(crate) gone: Vec<ClientId>,
    /// Background cursor: (block, page index).
    bg_cursor: (BlockId, u64),
    /// Faults of the broker's own mapping on present pages.
    broker_repeat: RepeatGuard,
}

impl Core {
    /// A core over `blocks`, placing through `own`.
    pub fn new(blocks: Arc<RamBlocks>, own: Arc<Uffd>, image: Option<FileSource>) -> Result<Core> {
        let largest = blocks.largest_page_size();
        Ok(Core {
            placer: {
                let mut p = Placer::new(Arc::clone(&own), largest)?;
                // Own waiters are woken by `landed` after their bits are set.
                p.set_wake_on_place(false);
                p
            },
            staging: StagingPage::new(largest.max(2 << 20))?,
            blocks,
            own,
            pending: Pending::default(),
            wakes: WakeQueue::default(),
            wake_buf: Vec::new(),
            taken: Vec::with_capacity(64),
            clients: Registry::new(),
            stats: BrokerStats::default(),
            blocktime: Blocktime::default(),
            new_requests: Vec::new(),
            image,
            deferred: Vec::new(),
            born: Vec::new(),
            failed: Vec::new(),
            gone: Vec::new(),
            bg_cursor: (0, 0),
            broker_repeat: RepeatGuard::default(),
        })
    }

    /// Handle one message read from `client`'s uffd (or the broker's own, `ClientId::BROKER`).
    pub fn on_message(&mut self, client: ClientId, msg: Message, now: Instant) {
        match msg {
            Message::Pagefault { addr, tid, .. } => {
                self.stats.faults += 1;
                let private =
                    matches!(self.clients.get(client).map(|c| &c.map), Some(AddressMap::Private(_)));
                if private {
                    self.private_fault(client, addr, tid, now);
                } else {
                    self.shared_fault(client, addr, tid, now);
                }
            }
            Message::Fork { child_fd } => self.adopt_fork(client, child_fd),
            Message::Remap { from, to, len } => {
                self.count_event(client);
                if let Some(c) = self.clients.get_mut(client) {
                    match &mut c.map {
                        AddressMap::Shared(t) => t.remap(from, to, len),
                        AddressMap::Private(t) => t.remap(from, to, len),
                    }
                }
                self.rewake_range(client, from, from.saturating_add(len));
            }
            Message::Unmap { start, end } => {
                self.count_event(client);
                if let Some(c) = self.clients.get_mut(client) {
                    match &mut c.map {
                        AddressMap::Shared(t) => t.unmap(start, end),
                        AddressMap::Private(t) => t.unmap(start, end),
                    }
                }
                self.rewake_range(client, start, end);
            }
            Message::Remove { start, end } => {
                self.count_event(client);
                self.removed(client, start, end);
            }
            Message::Unknown(e) => log::warn!("client {}: unknown userfaultfd event {e:#x}", client.0),
        }
    }

    fn count_event(&mut self, client: ClientId) {
        if let Some(c) = self.clients.get_mut(client) {
            c.stats.events += 1;
        }
    }

    /// Waiters of a client in a range that changed under them: wake them so they fault again
    /// at wherever the memory is now.
    fn rewake_range(&mut self, client: ClientId, start: u64, end: u64) {
        for w in self.pending.take_client_range(client, start, end) {
            self.wakes.push(w.client, w.addr, 4096);
        }
        self.blocktime.abandon_range(client, start, end, Instant::now());
    }

    fn translate(&self, client: ClientId, addr: u64) -> Option<(BlockId, u64)> {
        if client == ClientId::BROKER {
            return self.blocks.by_host_addr(addr);
        }
        match &self.clients.get(client)?.map {
            AddressMap::Shared(t) => t.translate(addr),
            AddressMap::Private(_) => None,
        }
    }

    fn shared_fault(&mut self, client: ClientId, addr: u64, tid: u32, now: Instant) {
        let Some((block, off)) = self.translate(client, addr) else {
            log::error!(
                "client {}: fault at {addr:#x} outside its mapping table; it stays blocked",
                client.0
            );
            if let Some(c) = self.clients.get_mut(client) {
                c.stats.faults += 1;
                c.stats.unmapped_faults += 1;
            }
            return;
        };
        let Some(b) = self.blocks.get(block) else { return };
        let ps = b.page_size();
        let page_off = off / ps * ps;
        let page_addr = addr - (off - page_off);
        let idx = page_off / ps;
        let received = b.is_received(page_off);
        let marked = b.removed().test(usize_of(idx));
        if let Some(c) = self.clients.get_mut(client) {
            c.stats.faults += 1;
        }
        if received {
            if b.is_resident(page_off) {
                // The page landed before we read the fault: the kernel cannot see a placement
                // made through another mapping, so wake now.
                self.woken_at_once(client, page_addr, ps, now);
                return;
            }
            // Received but absent: a hole was punched under it (a client's MADV_REMOVE, a
            // fallocate by a peer), which reads as zeros. Waking would only make the thread
            // fault here again.
            if marked {
                b.removed().clear(usize_of(idx));
            }
            self.refill_hole(client, block, page_off, page_addr, ps, now, marked);
            return;
        }
        if let Some(c) = self.clients.get_mut(client) {
            c.repeat.progress();
        }
        let first = self.pending.join(block, idx, Waiter { client, addr: page_addr, since: now });
        self.blocktime.begin(client, tid, page_addr, now);
        if let Some(c) = self.clients.get_mut(client) {
            if first {
                c.stats.pages_requested += 1;
            } else {
                c.stats.joined += 1;
            }
        }
        if marked {
            // A client removed this page: it comes back as zero, not as source data.
            if let Err(e) = self.place_zero_marked(block, page_off, ps) {
                log::error!("zero placement after remove failed: {e}");
            }
        } else if first {
            self.new_requests.push((block, idx));
            // Background transfer resumes near the last demanded address.
            self.bg_cursor = (block, idx + 1);
        }
    }

    /// A fault on a page that is present: wake the client now, unless it keeps faulting on
    /// present pages (see [`crate::client::RepeatGuard`]), which waking cannot help.
    fn woken_at_once(&mut self, client: ClientId, page_addr: u64, ps: u64, now: Instant) {
        let repeats = match self.clients.get_mut(client) {
            Some(c) => {
                c.stats.already_there += 1;
                c.stats.latency.record(nanos(now.elapsed()));
                c.repeat.present(page_addr)
            }
            None if client == ClientId::BROKER => self.broker_repeat.present(page_addr),
            None => return,
        };
        if repeats > REPEAT_LIMIT {
            if client == ClientId::BROKER {
                // Our own mapping is the shared block: a present page cannot fault there. Say so
                // once per run of repeats instead of spinning silently.
                if repeats == REPEAT_LIMIT + 1 {
                    log::error!("the broker's own mapping faults again and again at {page_addr:#x} although the page is present");
                }
            } else if let Some(c) = self.clients.get(client) {
                // Its mapping is not the shared RAM block (private or another file): waking it
                // only makes it fault again. Stop serving it rather than spin.
                log::error!(
                    "client {} '{}' faulted {repeats} times in a row on pages that are present (last at {page_addr:#x}): its mapping is not the shared RAM block; dropping it",
                    client.0,
                    c.name
                );
                self.failed.push(client);
                return;
            }
        }
        self.wakes.push(client, page_addr, ps);
    }

    /// Place zeros into a received page whose backing is a hole, then wake the client.
    /// `removed`: a client said it removed the page (REMOVE event), so the hole is expected.
    #[allow(clippy::too_many_arguments)]
    fn refill_hole(
        &mut self,
        client: ClientId,
        block: BlockId,
        page_off: u64,
        page_addr: u64,
        ps: u64,
        now: Instant,
        removed: bool,
    ) {
        match self.placer.refill_zero(&self.blocks, block, page_off) {
            Ok(crate::Placed::AlreadyPresent) => self.woken_at_once(client, page_addr, ps, now),
            Ok(_) => {
                self.stats.holes_refilled += 1;
                let name = self.blocks.get(block).map_or("?", |b| b.name());
                if removed {
                    log::debug!("block '{name}' offset {page_off:#x}: removed page faults in as zero");
                } else {
                    log::warn!(
                        "block '{name}' offset {page_off:#x}: a received page was a hole (punched behind the broker); placed zeros there (hole #{})",
                        self.stats.holes_refilled
                    );
                }
                if let Some(c) = self.clients.get_mut(client) {
                    c.repeat.progress();
                    c.stats.holes_refilled += 1;
                    c.stats.latency.record(nanos(now.elapsed()));
                }
                self.wakes.push(client, page_addr, ps);
            }
            Err(e) => {
                log::error!("refilling a received page that was a hole failed: {e}; the client stays blocked")
            }
        }
    }

    /// A page a client removed before it arrived was faulted on: it comes back as zero now (the
    /// placer clears its mark).
    fn place_zero_marked(&mut self, block: BlockId, off: u64, ps: u64) -> Result<()> {
        let before = self.placer.stats().filled();
        self.placer.place_zero(&self.blocks, block, off, ps)?;
        let filled = self.placer.stats().filled() - before;
        self.landed(block, off, ps, Urgency::Demand, true, filled);
        Ok(())
    }

    /// A client madvise'd a range away: during postcopy a REMOVE event over shared guest RAM is
    /// a discard (MADV_REMOVE; an MADV_DONTNEED there is taken as one too, docs/control-protocol.md),
    /// so its pages read as zeros from now on, for every process, whether they had arrived or
    /// not. Every page is marked removed (in the block's ledger, so a restarted broker knows it
    /// too), then the range is punched by the broker itself. The kernel punches it as well, but
    /// only after this event was read, and a page that a stream thread copied in between would
    /// otherwise keep the source's data: the placer checks the mark after each copy and punches
    /// what it placed over a marked page (`place.rs`), and the fence between the marks and this
    /// punch makes one of the two always see the other. A marked page faults in as zeros (a
    /// received one through `refill_hole`, a missing one through `place_zero_marked`).
    fn removed(&mut self, client: ClientId, start: u64, end: u64) {
        let Some(c) = self.clients.get_mut(client) else { return };
        match &mut c.map {
            AddressMap::Private(t) => t.remove(start, end),
            AddressMap::Shared(t) => {
                for e in t.overlapping(start, end) {
                    let Some(b) = self.blocks.get(e.block) else { continue };
                    let ps = b.page_size();
                    let (s, en) = (e.client_addr.max(start), (e.client_addr + e.len).min(end));
                    let off = e.block_offset + (s - e.client_addr);
                    let first = usize_of(off / ps);
                    let n = usize_of((off + (en - s)).div_ceil(ps)).saturating_sub(first);
                    b.removed().set_range(first, n);
                    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                    // Whole pages only: a partly removed huge page keeps its other bytes.
                    let (lo, hi) = (off.div_ceil(ps) * ps, (off + (en - s)) / ps * ps);
                    if hi > lo {
                        if let Err(err) = b.punch(lo, hi - lo) {
                            log::error!(
                                "client {}: discarding block '{}' [{lo:#x}, {hi:#x}) after its REMOVE event failed: {err}; pages placed there meanwhile may keep the source's data",
                                client.0,
                                b.name()
                            );
                        }
                    }
                }
            }
        }
    }

    fn adopt_fork(&mut self, parent: ClientId, child_fd: std::os::fd::RawFd) {
        // The message is the kernel's only if the parent's fd is a real userfaultfd (checked at
        // registration); check the fd anyway before owning it: a forged number could name one
        // of the broker's own fds, which must then be neither adopted nor closed.
        if let Err(what) = crate::uffd::check_userfaultfd(child_fd) {
            log::error!(
                "client {}: a FORK event names fd {child_fd}, which is not a new userfaultfd ({what}); serving this client no more",
                parent.0
            );
            self.failed.push(parent);
            return;
        }
        // SAFETY: the kernel installed `child_fd` in this process while delivering the FORK event
        // (it is a userfaultfd, checked above); nothing else owns it.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(child_fd) };
        let Some(p) = self.clients.get_mut(parent) else { return };
        p.stats.events += 1;
        // The child's addresses are the parent's as of the fork (later events change the parent's).
        let (name, map) = (format!("{}/fork", p.name), p.map.clone());
        let id = self.clients.next_id();
        let child = Client {
            id,
            name,
            uffd: Uffd::adopt(fd),
            pid: None,
            pidfd: None,
            map,
            stats: Default::default(),
            repeat: Default::default(),
        };
        self.born.push((parent, child));
    }

    /// Send the requests created in this round to the source, adjacent pages merged into runs.
    pub fn issue_requests(&mut self, source: &mut dyn PageSource) {
        if self.new_requests.is_empty() {
            return;
        }
        let mut reqs = std::mem::take(&mut self.new_requests);
        reqs.sort_unstable();
        let mut i = 0;
        while i < reqs.len() {
            let (block, first) = reqs[i];
            let ps = self.blocks.get(block).map_or(4096, |b| b.page_size());
            let mut n = 1;
            while i + n < reqs.len()
                && reqs[i + n] == (block, first + n as u64)
                && (n as u64 + 1) * ps <= MAX_RUN
            {
                n += 1;
            }
            let req = PageRequest { block, offset: first * ps, len: n as u64 * ps, urgency: Urgency::Demand };
            self.stats.requests += 1;
            if let Err(e) = source.request(req, self) {
                log::error!("page request {req:?} failed: {e}");
            }
            i += n;
        }
        source.flush_requests();
        reqs.clear();
        self.new_requests = reqs;
    }

    /// Pull one background run from a local source; returns false when every page is received.
    pub fn background_step(&mut self, source: &mut dyn PageSource, chunk: u64) -> bool {
        let nblocks = self.blocks.len();
        let mut scanned = 0;
        while scanned <= nblocks {
            let (block, from) = self.bg_cursor;
            let Some(b) = self.blocks.get(block) else {
                self.bg_cursor = (0, 0);
                scanned += 1;
                continue;
            };
            let ps = b.page_size();
            let Some(start) = b.received().next_clear(usize_of(from)) else {
                self.bg_cursor = ((block + 1) % nblocks.max(1), 0);
                scanned += 1;
                continue;
            };
            let start = start as u64;
            if self.pending.contains(block, start) {
                self.bg_cursor = (block, start + 1);
                continue;
            }
            let max = (chunk / ps).max(1);
            let limit = (start + max).min(b.pages());
            // The run ends at the next received page, or at the next requested one.
            let mut n = b.received().next_set(usize_of(start) + 1, usize_of(limit)) as u64 - start;
            if !self.pending.is_empty() {
                n = (1..n).find(|&k| self.pending.contains(block, start + k)).unwrap_or(n);
            }
            self.bg_cursor = (block, start + n);
            let req = PageRequest { block, offset: start * ps, len: n * ps, urgency: Urgency::Background };
            let r = source.request(req, self);
            source.flush_requests();
            if let Err(e) = r {
                log::error!("background request {req:?} failed: {e}");
                return false;
            }
            return true;
        }
        false
    }

    /// Pages `[offset, offset+len)` of `block` are placed: take their waiters and owe them wakes.
    /// `filled` of them were filled by this core's placer and are counted (pages another placer
    /// filled meanwhile are counted by that one).
    fn landed(&mut self, block: BlockId, offset: u64, len: u64, urgency: Urgency, zero: bool, filled: u64) {
        let Some(b) = self.blocks.get(block) else { return };
        let ps = b.page_size();
        let pages = len / ps;
        let mut waited = false;
        if !self.pending.is_empty() {
            let now = Instant::now();
            let mut ws = std::mem::take(&mut self.taken);
            for i in 0..pages {
                ws.clear();
                // A page another placer is still filling (claimed elsewhere) has no received bit
                // yet: its waiters are woken when that placer reports it.
                let page = offset / ps + i;
                if !b.received().test(usize_of(page)) || !self.pending.take_into(block, page, &mut ws) {
                    continue;
                }
                waited = true;
                for &w in &ws {
                    let ns = nanos(now.duration_since(w.since));
                    if let Some(c) = self.clients.get_mut(w.client) {
                        c.stats.latency.record(ns);
                        c.stats.blocked_ns = c.stats.blocked_ns.saturating_add(ns);
                    }
                    self.wakes.push(w.client, w.addr, ps);
                    self.blocktime.resolve(w.client, w.addr, now);
                }
            }
            ws.clear();
            self.taken = ws;
        }
        if urgency == Urgency::Demand || waited {
            self.stats.pages_demand += filled;
        } else {
            self.stats.pages_background += filled;
        }
        if zero {
            self.stats.pages_zero += filled;
        }
    }

    /// Issue the owed wakes, coalesced; a failing client does not stop the others.
    pub fn flush_wakes(&mut self) {
        if self.wakes.is_empty() {
            return;
        }
        let mut buf = std::mem::take(&mut self.wake_buf);
        self.wakes.drain_coalesced(&mut buf);
        for &(client, addr, len) in &buf {
            let r = if client == ClientId::BROKER {
                self.own.wake(addr, len)
            } else if let Some(c) = self.clients.get_mut(client) {
                c.stats.wakes += 1;
                c.uffd.wake(addr, len)
            } else {
                continue;
            };
            self.stats.wakes += 1;
            if let Err(e) = r {
                log::warn!("wake of client {} at {addr:#x} failed: {e}", client.0);
            }
        }
        self.wake_buf = buf;
    }

    /// Forget a client's waiters.
    pub fn forget_client(&mut self, id: ClientId) {
        self.pending.drop_client(id);
        self.deferred.retain(|d| d.0 != id);
        self.blocktime.drop_client(id, Instant::now());
    }
}

impl PageSink for Core {
    fn page(&mut self, block: BlockId, offset: u64, data: &[u8], urgency: Urgency) -> Result<()> {
        let before = self.placer.stats().filled();
        self.placer.place(&self.blocks, block, offset, data)?;
        let filled = self.placer.stats().filled() - before;
        self.landed(block, offset, data.len() as u64, urgency, false, filled);
        Ok(())
    }

    fn zero(&mut self, block: BlockId, offset: u64, len: u64, urgency: Urgency) -> Result<()> {
        let before = self.placer.stats().filled();
        self.placer.place_zero(&self.blocks, block, offset, len)?;
        let filled = self.placer.stats().filled() - before;
        self.landed(block, offset, len, urgency, true, filled);
        Ok(())
    }

    fn landed_elsewhere(&mut self, block: BlockId, offset: u64, len: u64) {
        self.landed(block, offset, len, Urgency::Background, false, 0);
    }
}
