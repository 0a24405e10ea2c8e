//! The epoll plumbing of the fault loop and its handle.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::{AddressMap, Client, ClientId, MappingEntry, MappingTable, PrivateRegion, PrivateTable};
use crate::control::{ControlConn, ControlListener};
use crate::error::{Error, IoContext, Result};
use crate::fault::backoff::AcceptBackoff;
use crate::fault::core::Core;
use crate::fault::limits::{ControlLimits, Owners};
use crate::incoming::Incoming;
use crate::source::{FileSource, PageSource, SourceState};
use crate::stats::{BlockStatus, PendingRequest, PendingWaiter, StatusReport, PENDING_LISTED};
use crate::uffd::{message_buffer, Message, RawMsg, Uffd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const T_EVENT: u64 = 0;
const T_OWN: u64 = 1;
pub(crate) const T_LISTEN: u64 = 2;
const KIND_SHIFT: u32 = 56;
pub(crate) const K_UFFD: u64 = 1;
pub(crate) const K_PIDFD: u64 = 2;
const K_SOURCE: u64 = 3;
pub(crate) const K_CONN: u64 = 4;

/// Departed clients whose final statistics the status keeps.
const DEPARTED_KEPT: usize = 256;

pub(crate) fn token(kind: u64, id: u64) -> u64 {
    (kind << KIND_SHIFT) | id
}

/// What a client maps.
#[derive(Debug, Clone)]
pub enum RegistrationMap {
    /// Ranges of the shared RAM blocks.
    Shared(Vec<MappingEntry>),
    /// Private memory backed by the broker's image file.
    Private(Vec<PrivateRegion>),
}

/// A client to register.
#[derive(Debug)]
pub struct Registration {
    /// Name (idstr).
    pub name: String,
    /// Its userfaultfd (its ranges already registered in MISSING mode).
    pub uffd: OwnedFd,
    /// Its pid, to notice its exit.
    pub pid: Option<u32>,
    /// What it maps.
    pub map: RegistrationMap,
}

/// Settings of the fault loop.
#[derive(Debug, Clone, Default)]
pub struct BrokerConfig {
    /// Pull background pages from a local source when idle.
    pub background: bool,
    /// Bytes per background pull.
    pub background_chunk: u64,
    /// Start the background pull only once this many clients have registered.
    pub background_after_clients: u64,
    /// Image file that serves private clients.
    pub image: Option<PathBuf>,
    /// Busy-poll instead of blocking in epoll_wait.
    pub busy_poll: bool,
    /// Serve a control socket at this path.
    pub control: Option<PathBuf>,
    /// Serve this listening control socket instead (socket activation); `control` is then only
    /// its name in logs.
    pub control_fd: Option<Arc<OwnedFd>>,
    /// Peer uids allowed on the control socket (empty: root and the broker's own uid).
    pub allowed_uids: Vec<u32>,
    /// Blocks each other uid may map (root and the broker's own uid may map all).
    pub grants: HashMap<u32, Vec<String>>,
    /// What one control-socket peer may make the broker hold.
    pub limits: ControlLimits,
    /// Where every client's record and fds are parked for a restart (see [`super::park`]).
    pub parking: Option<Arc<dyn super::park::ClientParking>>,
    /// This loop runs in a broker restarted during postcopy: what was rebuilt so far (the
    /// adoptions add to it); reported in the status.
    pub restart: Option<super::park::Restart>,
    /// Serve the control socket only from [`BrokerHandle::open_control`] on (connections wait
    /// in its backlog until then): for a broker that must park its record before any client
    /// can register. A restarted broker (`restart`) always waits so.
    pub hold_control: bool,
}

/// Why a client stops being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Departure {
    /// Its process exited: its fds are released.
    Exited,
    /// It unregistered itself over the control socket: its own decision (it keeps its own copy
    /// of the uffd), so its fds are released at once.
    Unregistered,
    /// It failed, or the in-process VMM unregistered it: its uffd stays open while its process
    /// may live (closing the last reference would let its faults fill memory with zeros).
    Retired,
    /// A child it forked, released with it (the child's own exit cannot be seen).
    WithParent,
}

impl Departure {
    fn verb(self) -> &'static str {
        match self {
            Departure::Exited => "exited",
            Departure::Unregistered => "unregistered itself",
            Departure::Retired => "retired",
            Departure::WithParent => "released with its parent",
        }
    }
}

enum Command {
    Register(Registration, Sender<Result<ClientId>>),
    Unregister(ClientId, Sender<Result<()>>),
    Status(Sender<StatusReport>),
    Adopt(Box<super::park::Adoption>, Sender<Result<u64>>),
    /// A restarted broker took its parked clients back: serve the control socket now.
    OpenControl,
    Stop,
    /// Start (true) or stop (false) the background fill now.
    Background(bool),
    /// The migration is complete: tell control clients, then stop (see `ending`).
    End,
}

/// The running fault loop.
#[derive(Debug)]
pub struct Broker;

/// Talks to a running fault loop.
#[derive(Debug)]
pub struct BrokerHandle {
    tx: Sender<Command>,
    kick: Arc<EventFd>,
    thread: Option<JoinHandle<Result<StatusReport>>>,
    blocks: Arc<crate::ram::RamBlocks>,
}

/// pidfd_open(2) of a pid.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = i32::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    crate::control::pidfd_open(pid)
}

pub(crate) fn set_nonblocking(fd: RawFd) -> Result<()> {
    // SAFETY: fcntl on a valid fd with integer arguments.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(Error::io("set a client userfaultfd non-blocking", std::io::Error::last_os_error()));
    }
    Ok(())
}

pub(crate) struct Loop {
    epfd: OwnedFd,
    event: Arc<EventFd>,
    pub(crate) listener: Option<ControlListener>,
    pub(crate) conns: HashMap<u64, ControlConn>,
    pub(crate) next_conn: u64,
    /// Who registered each client over the control socket (while the broker holds its fds).
    pub(crate) owners: Owners,
    /// Control connections whose last turn ended at its budget with work left in their buffers.
    pub(crate) resume: Vec<u64>,
    /// The listener's pause after a failed accept (EMFILE...).
    pub(crate) accept: AcceptBackoff,
    rx: Receiver<Command>,
    pub(crate) core: Core,
    source: Box<dyn PageSource>,
    pub(crate) config: BrokerConfig,
    msgs: Vec<RawMsg>,
    /// Clients no longer served whose process may still live: their uffds stay open.
    retired: HashMap<ClientId, Client>,
    /// Forked children past their parent's limits, by parent: held, not served (see
    /// [`crate::fault::fork`]).
    pub(crate) held_children: HashMap<ClientId, Vec<Client>>,
    /// Final statistics of clients that are gone.
    departed: std::collections::VecDeque<crate::stats::ClientStatus>,
    pub(crate) stop: bool,
    /// Whether the background fill runs (it also waits for `background_after_clients`).
    background: bool,
    /// After [`BrokerHandle::finish_complete`]: the clients told `postcopy_end` not gone yet.
    pub(crate) ending: Option<super::ending::Ending>,
    /// What the restart rebuilt (a restarted broker only).
    pub(crate) restart: Option<super::park::Restart>,
    /// Whether faults waited after the last round (the page source hears of each change).
    pub(crate) demand: crate::sched::DemandEdge,
}

impl Loop {
    pub(crate) fn add(&self, fd: RawFd, tok: u64) -> Result<()> {
        let ev = epoll::Event::new(epoll::Events::EPOLLIN, tok);
        epoll::ctl(self.epfd.as_raw_fd(), epoll::ControlOptions::EPOLL_CTL_ADD, fd, ev)
            .ctx(|| format!("epoll add fd {fd}"))
    }

    pub(crate) fn del(&self, fd: RawFd) {
        let ev = epoll::Event::new(epoll::Events::empty(), 0);
        let _ = epoll::ctl(self.epfd.as_raw_fd(), epoll::ControlOptions::EPOLL_CTL_DEL, fd, ev);
    }

    pub(crate) fn register(&mut self, reg: Registration) -> Result<ClientId> {
        crate::uffd::check_userfaultfd(reg.uffd.as_raw_fd())
            .map_err(|what| Error::NotAUserfaultfd { client: reg.name.clone(), what })?;
        let map = match reg.map {
            RegistrationMap::Shared(entries) => {
                let table = MappingTable::new(&self.core.blocks, entries)?;
                self.core.check_unplaced(&reg.name, reg.pid, &table)?;
                AddressMap::Shared(table)
            }
            RegistrationMap::Private(regions) => {
                let len = self
                    .core
                    .image
                    .as_ref()
                    .ok_or_else(|| {
                        Error::Invalid(
                            "private clients need an image file: start the broker with --image FILE".into(),
                        )
                    })?
                    .len();
                AddressMap::Private(PrivateTable::new(regions, len)?)
            }
        };
        set_nonblocking(reg.uffd.as_raw_fd())?;
        let pidfd = match reg.pid.map(pidfd_open) {
            Some(Ok(fd)) => Some(fd),
            Some(Err(e)) => return Err(Error::io(format!("pidfd_open of client pid {:?}", reg.pid), e)),
            None => None,
        };
        let id = self.core.clients.next_id();
        self.add(reg.uffd.as_raw_fd(), token(K_UFFD, id.0))?;
        if let Some(p) = &pidfd {
            if let Err(e) = self.add(p.as_raw_fd(), token(K_PIDFD, id.0)) {
                self.del(reg.uffd.as_raw_fd());
                return Err(e);
            }
        }
        log::info!("client {} '{}' registered (pid {:?})", id.0, reg.name, reg.pid);
        self.core.clients.insert(Client {
            id,
            name: reg.name,
            uffd: Uffd::adopt(reg.uffd),
            pid: reg.pid,
            pidfd,
            map,
            stats: Default::default(),
            repeat: Default::default(),
        });
        self.core.stats.clients_registered += 1;
        Ok(id)
    }

    /// Stop serving a client, for the reason `how`. A [`Departure::Retired`] client's uffd stays
    /// open while its process may live; it is closed when the pidfd reports the exit, when the
    /// client unregisters itself, or when the loop ends.
    pub(crate) fn retire(&mut self, id: ClientId, how: Departure) {
        let c = match self.core.clients.remove(id) {
            Some(c) => {
                self.del(c.uffd.as_raw_fd());
                self.core.forget_client(id);
                self.core.stats.clients_gone += 1;
                if self.departed.len() == DEPARTED_KEPT {
                    self.departed.pop_front();
                }
                let mut st = c.status();
                st.departure = Some(how.verb().into());
                self.departed.push_back(st);
                log::info!("client {} '{}' {}", id.0, c.name, how.verb());
                c
            }
            None if how == Departure::Retired => return,
            None => match self.retired.remove(&id) {
                Some(c) => {
                    log::debug!("retired client {} '{}' {}: its fds are closed", id.0, c.name, how.verb());
                    c
                }
                None => return,
            },
        };
        if how == Departure::Retired {
            self.retired.insert(id, c);
            return;
        }
        if let Some(p) = &c.pidfd {
            self.del(p.as_raw_fd());
        }
        self.owners.remove(id);
        drop(c); // closes its uffd and pidfd
        self.unpark(id);
        self.held_children.remove(&id); // closes the held children's uffds
        for child in self.owners.children_of(id) {
            self.retire(child, Departure::WithParent);
        }
    }

    pub(crate) fn status(&self) -> StatusReport {
        let blocks = &self.core.blocks;
        let mut clients: Vec<_> = self
            .core
            .clients
            .iter()
            .map(|c| {
                let mut st = c.status();
                st.uffd_copy_held = c.pid.and_then(|p| super::park::holds_copy(p, c.uffd.as_raw_fd()));
                st
            })
            .collect();
        clients.sort_by_key(|c| c.id);
        let mut broker = self.core.stats.clone();
        broker.foreign_pages += self.core.placer.stats().counts().foreign_pages;
        let elsewhere = self.source.placed_elsewhere();
        broker.pages_demand += elsewhere.demand;
        broker.pages_background += elsewhere.background;
        broker.pages_zero += elsewhere.zero;
        broker.foreign_pages += elsewhere.foreign;
        let blocktime = self.core.blocktime.report();
        // Each block's bitmap is counted once and the total is their sum: the stream thread
        // places pages meanwhile, and two separate counts would not add up.
        let block_status: Vec<BlockStatus> = blocks
            .iter()
            .map(|(_, b)| BlockStatus {
                name: b.name().into(),
                size: b.size(),
                page_size: b.page_size(),
                received: b.received().count_ones() as u64,
            })
            .collect();
        StatusReport {
            state: "serving".into(),
            received_pages: block_status.iter().map(|b| b.received).sum(),
            total_pages: blocks.total_pages(),
            blocks: block_status,
            outstanding: self.core.pending.len() as u64,
            broker,
            clients,
            departed: self.departed.iter().cloned().collect(),
            pending: self
                .core
                .pending
                .snapshot(PENDING_LISTED)
                .into_iter()
                .map(|(block, page, ws)| {
                    let b = blocks.get(block);
                    PendingRequest {
                        block: b.map(|b| b.name().to_string()).unwrap_or_default(),
                        offset: page * b.map_or(4096, |b| b.page_size()),
                        waiters: ws
                            .iter()
                            .map(|w| PendingWaiter {
                                client: w.client,
                                addr: w.addr,
                                waiting_ms: u64::try_from(w.since.elapsed().as_millis()).unwrap_or(u64::MAX),
                            })
                            .collect(),
                    }
                })
                .collect(),
            clients_omitted: 0,
            departed_omitted: 0,
            postcopy: blocktime.qemu(),
            blocktime,
            restart: self.restart.clone(),
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Register(reg, reply) => {
                let r = self.register(reg);
                if let Ok(id) = &r {
                    self.park(*id);
                }
                let _ = reply.send(r);
            }
            Command::Adopt(a, reply) => {
                let r = self.adopt(*a);
                if r.is_err() {
                    self.lost_in_restart();
                }
                let _ = reply.send(r);
            }
            Command::Unregister(id, reply) => {
                let r = if self.core.clients.get(id).is_some() {
                    self.retire(id, Departure::Retired);
                    Ok(())
                } else {
                    Err(Error::Invalid(format!("no client {}", id.0)))
                };
                let _ = reply.send(r);
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::OpenControl => {
                if let Some(l) = &self.listener {
                    if let Err(e) = self.add(l.as_raw_fd(), T_LISTEN) {
                        log::error!("control socket: cannot poll the listener: {e}");
                    }
                }
                self.accept_peers();
            }
            Command::Stop => self.stop = true,
            Command::Background(on) => self.set_background(on),
            Command::End => self.begin_end(),
        }
    }

    /// Start or stop the background fill. Started by the embedder it runs at once, whatever
    /// `background_after_clients` said; a source that has nothing to pull (a network source
    /// whose sender pushes) is left alone.
    fn set_background(&mut self, on: bool) {
        if on && !self.source.wants_background_pull() {
            log::info!("background fill asked for, but the page source pushes its pages itself");
            return;
        }
        if on {
            self.config.background_after_clients = 0;
        }
        log::info!("background fill {}", if on { "started" } else { "stopped" });
        self.background = on;
    }

    /// Read every queued message of a uffd and handle them in order.
    fn drain_uffd(&mut self, id: ClientId) {
        let now = Instant::now();
        let mut moved = false;
        loop {
            let r = if id == ClientId::BROKER {
                self.core.own.read_messages(&mut self.msgs)
            } else {
                match self.core.clients.get(id) {
                    Some(c) => c.uffd.read_messages(&mut self.msgs),
                    None => return,
                }
            };
            let n = match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    log::error!("client {}: reading its userfaultfd failed: {e}; serving it no more", id.0);
                    self.core.failed.push(id);
                    break;
                }
            };
            for i in 0..n {
                let m = Message::decode(&self.msgs[i]);
                // The client's mapping table (or a private client's removed ranges) changes:
                // the parked record must follow it.
                moved |= matches!(m, Message::Remap { .. } | Message::Unmap { .. } | Message::Remove { .. });
                self.core.on_message(id, m, now);
            }
            if n < self.msgs.len() {
                break;
            }
        }
        if !self.core.deferred.is_empty() {
            self.core.retry_deferred(id);
        }
        if moved && self.config.parking.is_some() {
            self.park(id);
        }
    }

    fn dispatch(&mut self, tok: u64) -> Result<()> {
        match tok {
            T_EVENT => {
                let _ = self.event.read();
                while let Ok(cmd) = self.rx.try_recv() {
                    self.on_command(cmd);
                }
            }
            T_OWN => self.drain_uffd(ClientId::BROKER),
            T_LISTEN => self.accept_peers(),
            t => {
                let id = ClientId(t & ((1 << KIND_SHIFT) - 1));
                match t >> KIND_SHIFT {
                    K_UFFD => self.drain_uffd(id),
                    K_PIDFD => self.retire(id, Departure::Exited),
                    K_CONN => self.serve_conns(&[id.0]),
                    K_SOURCE => {
                        let fd = RawFd::try_from(id.0).unwrap_or(-1);
                        match self.source.on_ready(fd, &mut self.core) {
                            Ok(SourceState::Open) => {}
                            Ok(SourceState::Closed) => {
                                log::info!("page source closed (fd {fd})");
                                self.del(fd);
                            }
                            Err(e) => {
                                log::error!("page source failed: {e}");
                                self.del(fd);
                            }
                        }
                    }
                    _ => log::warn!("unknown epoll token {t:#x}"),
                }
            }
        }
        Ok(())
    }

    fn after_round(&mut self) {
        self.core.issue_requests(self.source.as_mut());
        self.core.flush_wakes();
        for (parent, child) in std::mem::take(&mut self.core.born) {
            self.adopt_child(parent, child);
        }
        for id in std::mem::take(&mut self.core.gone) {
            self.retire(id, Departure::Exited);
        }
        for id in std::mem::take(&mut self.core.failed) {
            self.retire(id, Departure::Retired);
        }
    }

    fn run(mut self) -> Result<StatusReport> {
        failpoint()?;
        let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); 64];
        let chunk = if self.config.background_chunk == 0 { 256 << 10 } else { self.config.background_chunk };
        self.background = self.config.background && self.source.wants_background_pull();
        let mut conns = Vec::new();
        while !self.stop {
            let bg_now =
                self.background && self.core.stats.clients_registered >= self.config.background_after_clients;
            // Control connections with work left in their buffers are invisible to epoll: poll.
            let busy =
                bg_now || !self.core.deferred.is_empty() || self.config.busy_poll || !self.resume.is_empty();
            let timeout = if busy { 0 } else { self.accept.timeout_ms(Instant::now()).unwrap_or(-1) };
            let timeout = match self.end_step() {
                Some(t) if timeout < 0 => t,
                Some(t) => timeout.min(t),
                None => timeout,
            };
            if self.stop {
                break;
            }
            let n = match epoll::wait(self.epfd.as_raw_fd(), timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("epoll_wait", e)),
            };
            // Faults first; control connections after this round's wakes, a bounded turn each.
            conns.clear();
            for ev in events.iter().take(n) {
                if ev.data >> KIND_SHIFT == K_CONN {
                    conns.push(ev.data & ((1 << KIND_SHIFT) - 1));
                } else {
                    self.dispatch(ev.data)?;
                }
            }
            self.after_round();
            self.serve_conns(&conns);
            self.resume_accepting();
            if n == 0 && bg_now {
                self.background = self.core.background_step(self.source.as_mut(), chunk);
                self.core.flush_wakes();
            }
            if !self.core.deferred.is_empty() && n == 0 {
                for id in self.core.deferred.iter().map(|d| d.0).collect::<Vec<_>>() {
                    self.core.retry_deferred(id);
                }
                self.after_round();
            }
            if let Some(waiting) = self.demand.update(!self.core.pending.is_empty()) {
                self.source.demand_waiting(waiting);
            }
        }
        self.final_wake();
        Ok(self.status())
    }

    /// Before the loop lets go of the clients: read what they still queued and wake every
    /// mapped range once, so no thread stays asleep on a fault the loop will never read (its
    /// own copy of the uffd keeps the registration alive after ours closes). Pages that are
    /// present map on retry; pages that are not fault again and wait in the client's queue.
    fn final_wake(&mut self) {
        for id in self.core.clients.ids() {
            self.drain_uffd(id);
        }
        self.after_round();
        for c in self.core.clients.iter() {
            let ranges: Vec<(u64, u64)> = match &c.map {
                AddressMap::Shared(t) => t.entries().iter().map(|e| (e.client_addr, e.len)).collect(),
                AddressMap::Private(t) => t.regions().iter().map(|r| (r.client_addr, r.len)).collect(),
            };
            for (a, l) in ranges {
                if let Err(e) = c.uffd.wake(a, l) {
                    log::debug!("final wake of client {} at {a:#x}: {e}", c.id.0);
                }
            }
        }
    }
}

/// Test hook: `POSTCOPY_BROKER_FAILPOINT=fault-loop-panic` or `fault-loop-error` makes the fault
/// loop die as it starts, so that tests can check that nothing waits on a dead loop.
fn failpoint() -> Result<()> {
    match std::env::var("POSTCOPY_BROKER_FAILPOINT").as_deref() {
        Ok("fault-loop-panic") => panic!("failpoint fault-loop-panic"),
        Ok("fault-loop-error") => Err(Error::Invalid("failpoint fault-loop-error".into())),
        _ => Ok(()),
    }
}

impl Broker {
    /// Start the fault loop over a listening [`Incoming`] with `source`.
    pub fn spawn(
        incoming: &Incoming,
        source: Box<dyn PageSource>,
        config: BrokerConfig,
    ) -> Result<BrokerHandle> {
        let own = incoming.uffd().cloned().ok_or_else(|| {
            Error::Invalid("the fault loop needs a listening Incoming (call listen() first)".into())
        })?;
        let blocks = Arc::clone(incoming.blocks());
        let image = config.image.as_deref().map(FileSource::open_raw).transpose()?;
        let core = Core::new(Arc::clone(&blocks), own, image)?;
        let epfd = epoll::create(true).ctx(|| "epoll_create".into())?;
        // SAFETY: epoll::create returned a fresh fd that nothing else owns.
        let epfd = unsafe { OwnedFd::from_raw_fd(epfd) };
        let event = Arc::new(EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).ctx(|| "eventfd".into())?);
        let (tx, rx) = mpsc::channel();
        let uids = if config.allowed_uids.is_empty() {
            ControlListener::default_allowed_uids()
        } else {
            config.allowed_uids.clone()
        };
        let listener = match (&config.control_fd, &config.control) {
            (Some(fd), _) => {
                let fd = fd.try_clone().ctx(|| "duplicating the inherited control socket".into())?;
                Some(ControlListener::from_fd(fd, uids)?)
            }
            (None, Some(path)) => Some(ControlListener::bind(path, uids)?),
            (None, None) => None,
        };
        let restart = config.restart.clone();
        let lp = Loop {
            epfd,
            event: Arc::clone(&event),
            listener,
            conns: HashMap::new(),
            next_conn: 1,
            owners: Owners::default(),
            resume: Vec::new(),
            accept: AcceptBackoff::default(),
            rx,
            core,
            source,
            config,
            msgs: message_buffer(64),
            retired: HashMap::new(),
            held_children: HashMap::new(),
            departed: Default::default(),
            stop: false,
            background: false,
            ending: None,
            restart,
            demand: crate::sched::DemandEdge::default(),
        };
        lp.add(event.as_raw_fd(), T_EVENT)?;
        lp.add(lp.core.own.as_raw_fd(), T_OWN)?;
        // A restarted broker serves the control socket only once its parked clients are back
        // ([`BrokerHandle::open_control`]): a client reattaching must find itself.
        if let (Some(l), None, false) = (&lp.listener, &lp.restart, lp.config.hold_control) {
            lp.add(l.as_raw_fd(), T_LISTEN)?;
        }
        for fd in lp.source.poll_fds() {
            lp.add(fd, token(K_SOURCE, u64::try_from(fd).unwrap_or(0)))?;
        }
        let thread = std::thread::Builder::new()
            .name("postcopy-fault".into())
            .spawn(move || lp.run())
            .ctx(|| "spawn the fault loop thread".into())?;
        Ok(BrokerHandle { tx, kick: event, thread: Some(thread), blocks })
    }
}

impl BrokerHandle {
    fn send(&self, c: Command) -> Result<()> {
        self.tx.send(c).map_err(|_| Error::Invalid("the fault loop has stopped".into()))?;
        let _ = self.kick.write(1);
        Ok(())
    }

    /// Register a client; returns its id.
    pub fn register(&self, reg: Registration) -> Result<ClientId> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Register(reg, tx))?;
        rx.recv().map_err(|_| Error::Invalid("the fault loop has stopped".into()))?
    }

    /// Serve a client parked by a broker that died (same id) and wake every range it
    /// registered; returns the threads that were blocked in a userfault (see [`super::park`]).
    pub fn adopt(&self, a: super::park::Adoption) -> Result<u64> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Adopt(Box::new(a), tx))?;
        rx.recv().map_err(|_| Error::Invalid("the fault loop has stopped".into()))?
    }

    /// In a restarted broker (`BrokerConfig::restart`), after the parked clients were adopted:
    /// start serving the control socket (connections wait in its backlog until then).
    pub fn open_control(&self) -> Result<()> {
        self.send(Command::OpenControl)
    }

    /// Stop serving a client (its uffd stays open while its process lives).
    pub fn unregister(&self, id: ClientId) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Unregister(id, tx))?;
        rx.recv().map_err(|_| Error::Invalid("the fault loop has stopped".into()))?
    }

    /// The current status.
    pub fn status(&self) -> Result<StatusReport> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Status(tx))?;
        rx.recv().map_err(|_| Error::Invalid("the fault loop has stopped".into()))
    }

    /// End a complete migration: send every control connection with live clients a
    /// `postcopy_end` notification, keep serving their faults and events until each has
    /// unregistered or gone (at most `END_GRACE`), then stop. Only
    /// when every page is present: a client that unregisters reads holes as zeros.
    pub fn finish_complete(mut self) -> Result<StatusReport> {
        let _ = self.send(Command::End);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| Error::Invalid("the fault loop thread panicked".into()))?,
            None => Err(Error::Invalid("already stopped".into())),
        }
    }

    /// Start (`true`) or stop (`false`) the background fill, at any time while the loop runs:
    /// stopped, only pages somebody faults on (demand) are fetched; started, the loop pulls the
    /// missing pages in the background whenever it is idle, until every page is there (it stops
    /// by itself then, and can be started again after a discard). Overrides
    /// [`BrokerConfig::background`] and `background_after_clients`. Returns once the loop has
    /// been told; it takes effect at its next round.
    pub fn set_background(&self, on: bool) -> Result<()> {
        self.send(Command::Background(on))
    }

    /// Whether every page of every block has been received.
    pub fn all_received(&self) -> bool {
        self.blocks.all_received()
    }

    /// Wait until every page is received or `timeout` passes; returns whether all arrived.
    pub fn wait_all_received(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while !self.blocks.all_received() {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// `Ok` while the fault loop runs; once its thread has ended on its own (an error, or a
    /// panic in a process that does not exit on panics), the reason. Whoever waits for the
    /// migration or restore to finish calls this as it waits: a broker without its loop serves
    /// nobody, and must say so instead of waiting forever.
    pub fn check_alive(&mut self) -> Result<()> {
        if !self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            return Ok(());
        }
        let why = match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => e.to_string(),
            Some(Ok(Ok(_))) => "it stopped without being asked to".into(),
            Some(Err(_)) => "its thread panicked".into(),
            None => "it was stopped".into(),
        };
        Err(Error::LoopDied(why))
    }

    /// Stop the loop and return its final status.
    pub fn stop(mut self) -> Result<StatusReport> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<StatusReport> {
        let _ = self.send(Command::Stop);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| Error::Invalid("the fault loop thread panicked".into()))?,
            None => Err(Error::Invalid("already stopped".into())),
        }
    }
}

impl Drop for BrokerHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop_inner();
        }
    }
}
