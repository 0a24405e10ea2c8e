//! The fault loop's side of the control socket: accept peers, read their requests, register
//! and unregister clients, hand out RAM block fds, and answer status (Firecracker's UFFD
//! handshake, feature `firecracker`, is taken in fault/firecracker.rs). A peer that misbehaves
//! gets an error reply and is dropped alone; the loop serves on.
//!
//! One peer cannot starve the others: each connection gets a turn of [`MESSAGES_PER_TURN`]
//! message after the faults of a round were answered, and what it pipelined beyond that waits in
//! its buffers until its next turn; between two turns the loop polls every fd again, so a fault
//! waits behind at most one control message. What a peer may make the broker hold is bounded by
//! [`ControlLimits`](crate::fault::ControlLimits), and what it may reach by its grants.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use crate::client::{ClientId, MappingEntry, PrivateRegion};
use crate::control::frame::MAX_PAYLOAD;
use crate::control::protocol::{code, StatusReply};
use crate::control::{ClientKind, ControlError, Incoming, MappingSpec, PeerCreds, Request, Response};
use crate::error::Error;
use crate::fault::event_loop::{
    token, Departure, Loop, Registration, RegistrationMap, K_CONN, K_PIDFD, T_LISTEN,
};
use crate::fault::grants::Grants;
use crate::fault::limits::Owner;

/// Most fds in one Blocks reply.
const MAX_FDS_PER_REPLY: usize = 8;
/// Messages one connection has handled per turn. Measured with `bench --cases control`: with 4,
/// a client's mean fault latency beside a peer flooding `status` requests was 2.1-2.4x the quiet
/// figure (p50 2-3x); with 1 it is 0.6-0.8x (p50 0.6-1.2x; a flooded broker never sleeps).
const MESSAGES_PER_TURN: usize = 1;
/// Room left in a frame for the `status` reply around its report.
const STATUS_ENVELOPE: usize = 256;

/// What a registration over the socket asks for, before the peer's grants and limits are
/// checked.
pub(super) struct Ask {
    pub(super) name: String,
    /// The `pid` member of `register` (never set by a Firecracker handshake).
    pub(super) pid: Option<u32>,
    pub(super) map: RegistrationMap,
    pub(super) uffd: OwnedFd,
}

impl Loop {
    /// Accept every pending peer, unless accepting is paused after a failure.
    pub(crate) fn accept_peers(&mut self) {
        if self.accept.paused() {
            return;
        }
        loop {
            let Some(l) = &self.listener else { return };
            match l.accept() {
                Ok(Some(conn)) => {
                    self.accept.accepted();
                    let creds = conn.creds();
                    let open = self.conns.values().filter(|c| c.creds().uid == creds.uid).count();
                    if open >= self.config.limits.connections_per_uid {
                        self.refuse_connection(conn, open);
                        continue;
                    }
                    let id = self.next_conn;
                    self.next_conn += 1;
                    if let Err(e) = self.add(conn.as_raw_fd(), token(K_CONN, id)) {
                        log::error!("control connection: {e}");
                        continue;
                    }
                    log::debug!("control peer {creds:?} connected as #{id}");
                    self.conns.insert(id, conn);
                }
                Ok(None) => {
                    if let Some((failures, took)) = self.accept.drained(Instant::now()) {
                        log::info!(
                            "control socket: accepting again after {failures} failed accepts in {:.1}s",
                            took.as_secs_f64()
                        );
                    }
                    break;
                }
                Err(ControlError::NotAllowed { uid, pid }) => {
                    log::warn!("control peer pid {pid} uid {uid} refused: uid not allowed");
                    self.core.stats.control_errors += 1;
                }
                Err(e) => {
                    self.pause_accepting(&e);
                    break;
                }
            }
        }
    }

    fn refuse_connection(&mut self, mut conn: crate::control::ControlConn, open: usize) {
        let creds = conn.creds();
        let e = Error::Invalid(format!(
            "uid {} already has {open} control connections open, the limit per uid \
             (serve --max-connections-per-uid); close some first",
            creds.uid
        ));
        log::warn!("control peer pid {} uid {} refused: {e}", creds.pid, creds.uid);
        self.core.stats.control_errors += 1;
        if conn.reads_replies() {
            let _ = conn.send(&Response::error(code::REFUSED, e.to_string()), &[]);
        }
    }

    /// An accept failed (EMFILE, ENFILE, ENOBUFS...): stop polling the listener for a while, so a
    /// listener that stays readable does not spin the loop; peers wait in its backlog.
    fn pause_accepting(&mut self, e: &ControlError) {
        let (pause, first) = self.accept.failed(Instant::now());
        if first {
            log::warn!(
                "control socket: {e}; pausing accepts (first for {} ms, up to {} ms) until it succeeds",
                pause.as_millis(),
                super::backoff::AcceptBackoff::MAX.as_millis()
            );
        } else {
            log::debug!("control socket: {e}; pausing accepts for {} ms", pause.as_millis());
        }
        if let Some(l) = &self.listener {
            self.del(l.as_raw_fd());
        }
    }

    /// Poll the listener again once its pause is over, and accept what waits.
    pub(crate) fn resume_accepting(&mut self) {
        if !self.accept.due(Instant::now()) {
            return;
        }
        if let Some(l) = &self.listener {
            if let Err(e) = self.add(l.as_raw_fd(), T_LISTEN) {
                log::error!("control socket: cannot poll the listener again: {e}");
            }
        }
        self.accept_peers();
    }

    /// Give each connection in `ready` (epoll saw it readable) and each one with work left from
    /// its last turn one bounded turn.
    pub(crate) fn serve_conns(&mut self, ready: &[u64]) {
        let mut ids = std::mem::take(&mut self.resume);
        ids.extend_from_slice(ready);
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            self.serve_conn(id);
        }
    }

    /// One turn of a control connection.
    fn serve_conn(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        match conn.read_up_to(MESSAGES_PER_TURN) {
            Ok(msgs) => {
                for m in msgs {
                    self.handle(id, m);
                }
                if self.conns.get(&id).is_some_and(|c| c.has_buffered()) {
                    self.resume.push(id);
                }
            }
            Err(ControlError::PeerClosed) => self.drop_conn(id),
            Err(e) => self.fail_conn(id, &e),
        }
    }

    /// The peer misbehaved: tell it why (unless it reads no replies: only Firecracker's handshake
    /// does not) and close its connection.
    fn fail_conn(&mut self, id: u64, e: &ControlError) {
        self.core.stats.control_errors += 1;
        let Some(c) = self.conns.get_mut(&id) else { return };
        let creds = c.creds();
        if !c.reads_replies() {
            log::error!(
                "Firecracker handshake from pid {} uid {} refused: {e}; its connection is closed \
                 without a reply (Firecracker reads none)",
                creds.pid,
                creds.uid
            );
        } else {
            log::warn!(
                "control peer #{id} (pid {} uid {}): {e}; closing the connection",
                creds.pid,
                creds.uid
            );
            let _ = c.send_error(e);
        }
        self.drop_conn(id);
    }

    pub(super) fn drop_conn(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            self.del(c.as_raw_fd());
        }
        for cid in self.owners.exiting_with(id) {
            log::info!("client {}: its connection ended, which is its exit (its pid is not visible)", cid.0);
            self.retire(cid, Departure::Exited);
        }
    }

    pub(crate) fn reply<T: serde::Serialize>(&mut self, id: u64, r: &T, fds: &[BorrowedFd<'_>]) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        if let Err(e) = c.send_message(r, fds) {
            log::warn!("control peer #{id}: reply failed: {e}; closing the connection");
            self.drop_conn(id);
        }
    }

    fn refuse(&mut self, id: u64, e: &Error) {
        self.reply(id, &Response::error(code::REFUSED, e.to_string()), &[]);
    }

    fn handle(&mut self, id: u64, m: Incoming) {
        let creds = match self.conns.get(&id) {
            Some(c) => c.creds(),
            None => return,
        };
        match m {
            Incoming::Request(Request::Hello { version, name }, _) => {
                log::debug!("control peer #{id} is '{name}'");
                self.reply(id, &Response::hello_reply(version), &[]);
            }
            Incoming::Request(Request::Register { name, kind, pid, mappings, vcpu_tids }, mut fds) => {
                let Some(uffd) = fds.pop() else { return };
                if let Err(e) = crate::blocktime::check_vcpus(&vcpu_tids, uffd.as_raw_fd()) {
                    return self.refuse(id, &e);
                }
                if kind == ClientKind::Shared {
                    if let Some(m) = mappings.iter().find(|m| !self.grants().has(creds.uid, &m.block)) {
                        let msg = format!("uid {} was not given block '{}'", creds.uid, m.block);
                        return self.reply(id, &Response::error(code::NOT_ALLOWED, msg), &[]);
                    }
                }
                let map = match self.registration_map(kind, &mappings) {
                    Ok(map) => map,
                    Err(e) => return self.refuse(id, &e),
                };
                match self.register_peer(id, creds, Ask { name, pid, map, uffd }) {
                    Ok(cid) => {
                        self.core.blocktime.declare(cid, &vcpu_tids);
                        self.reply(id, &Response::Registered { client: cid.0 }, &[])
                    }
                    Err(PeerRefusal::NotAllowed(msg)) => {
                        self.reply(id, &Response::error(code::NOT_ALLOWED, msg), &[])
                    }
                    Err(PeerRefusal::Refused(e)) => self.refuse(id, &e),
                }
            }
            Incoming::Request(Request::Unregister { client }, _) => self.unregister(id, creds, client),
            Incoming::Request(Request::Reattach { clients }, _) => {
                match self.reattach(id, creds.uid, &clients) {
                    Ok(()) => self.reply(id, &Response::Ok, &[]),
                    Err(e) => self.refuse(id, &e),
                }
            }
            Incoming::Request(Request::GetBlocks { names }, _) => self.send_blocks(id, creds.uid, names),
            Incoming::Request(Request::Status, _) => {
                let mut report = self.status();
                report.fit(MAX_PAYLOAD - STATUS_ENVELOPE);
                self.reply(id, &StatusReply { report: &report }, &[]);
            }
            Incoming::Request(
                other @ (Request::ProvideBlocks { .. } | Request::Dirty { .. } | Request::StartPostcopy),
                _,
            ) => {
                let e =
                    Error::Invalid(format!("'{}' is for a source page server, not the broker", other.op()));
                self.refuse(id, &e);
            }
            #[cfg(feature = "firecracker")]
            Incoming::Firecracker(regions, uffd) => self.take_firecracker(id, creds, &regions, uffd),
        }
    }

    /// A client unregistered over the socket by its own peer is released at once: its own
    /// decision (it keeps its own copy of the uffd). This also releases a client retired earlier
    /// for misbehaving. Root may unregister any client; one registered in-process (by a VMM
    /// through the handle) is then only retired, as the handle does.
    fn unregister(&mut self, id: u64, creds: PeerCreds, client: u64) {
        let cid = ClientId(client);
        let owner = self.owners.get(cid);
        let how = match owner {
            Some(o) if creds.uid == 0 || o.uid == creds.uid => Departure::Unregistered,
            None if creds.uid == 0 && self.core.clients.get(cid).is_some() => Departure::Retired,
            None if self.core.clients.get(cid).is_none() => {
                let msg = format!("no client {client} (never registered, or already gone)");
                return self.refuse(id, &Error::Invalid(msg));
            }
            _ => {
                let msg = format!("client {client} belongs to another user");
                return self.reply(id, &Response::error(code::NOT_ALLOWED, msg), &[]);
            }
        };
        self.retire(cid, how);
        self.reply(id, &Response::Ok, &[]);
    }

    fn registration_map(&self, kind: ClientKind, mappings: &[MappingSpec]) -> crate::Result<RegistrationMap> {
        Ok(match kind {
            ClientKind::Shared => {
                let mut entries = Vec::with_capacity(mappings.len());
                for m in mappings {
                    let (block, _) = self.core.blocks.named(&m.block)?;
                    entries.push(MappingEntry {
                        client_addr: m.client_addr,
                        block,
                        block_offset: m.offset,
                        len: m.len,
                    });
                }
                RegistrationMap::Shared(entries)
            }
            ClientKind::Private => RegistrationMap::Private(
                mappings
                    .iter()
                    .map(|m| PrivateRegion {
                        client_addr: m.client_addr,
                        len: m.len,
                        file_offset: m.offset,
                        page_size: 4096,
                    })
                    .collect(),
            ),
        })
    }

    /// Register a client for the peer on connection `conn`: check what the peer may reach and
    /// hold, register, and watch the peer's exit (by pid when the broker can see it, else by a
    /// pidfd taken from the socket, else by the connection's end).
    pub(super) fn register_peer(
        &mut self,
        conn: u64,
        creds: PeerCreds,
        ask: Ask,
    ) -> Result<ClientId, PeerRefusal> {
        if let RegistrationMap::Private(regions) = &ask.map {
            let layout: Vec<(String, u64)> =
                self.core.blocks.iter().map(|(_, b)| (b.name().to_string(), b.size())).collect();
            for r in regions {
                self.grants()
                    .image_range(creds.uid, &layout, r.file_offset, r.len)
                    .map_err(PeerRefusal::NotAllowed)?;
            }
        }
        self.owners
            .may_register(&self.config.limits, conn, creds.uid)
            .map_err(|m| PeerRefusal::Refused(Error::Invalid(m)))?;
        let visible = u32::try_from(creds.pid).ok().filter(|&p| p > 0);
        let pid = match (ask.pid, visible) {
            (Some(_), None) => {
                return Err(PeerRefusal::Refused(Error::Invalid(
                    "'pid' names a process of the peer's pid namespace, which the broker cannot see; \
                     leave it out (the broker then watches the connecting process)"
                        .into(),
                )))
            }
            (Some(p), Some(_)) => Some(p),
            (None, v) => v,
        };
        let Ask { name, map, uffd, .. } = ask;
        let cid = self.register(Registration { name, uffd, pid, map }).map_err(PeerRefusal::Refused)?;
        let mut exits_with_conn = false;
        if pid.is_none() {
            exits_with_conn = !self.watch_peer(conn, cid);
        }
        self.owners.insert(cid, Owner { uid: creds.uid, conn, exits_with_conn, parent: None });
        self.park(cid);
        Ok(cid)
    }

    /// Watch the exit of a client's peer whose pid is not visible, through a pidfd of the
    /// socket's peer (SO_PEERPIDFD). False when the kernel cannot give one (before Linux 6.5):
    /// the connection's end then counts as the exit (Firecracker keeps it open for its life).
    fn watch_peer(&mut self, conn: u64, cid: ClientId) -> bool {
        let pidfd = match self.conns.get(&conn).map(|c| c.peer_pidfd()) {
            Some(Ok(fd)) => fd,
            Some(Err(e)) => {
                log::warn!(
                    "client {}: no pidfd of its peer ({e}; SO_PEERPIDFD needs Linux 6.5): its exit is \
                     taken from the end of its control connection",
                    cid.0
                );
                return false;
            }
            None => return false,
        };
        if let Err(e) = self.add(pidfd.as_raw_fd(), token(K_PIDFD, cid.0)) {
            log::error!("client {}: cannot poll its peer's pidfd: {e}", cid.0);
            return false;
        }
        if let Some(c) = self.core.clients.get_mut(cid) {
            c.pidfd = Some(pidfd);
        }
        true
    }

    fn grants(&self) -> Grants<'_> {
        Grants::new(&self.config.grants, nix::unistd::geteuid().as_raw())
    }

    fn send_blocks(&mut self, id: u64, uid: u32, names: Option<Vec<String>>) {
        let blocks = std::sync::Arc::clone(&self.core.blocks);
        let mut chosen = Vec::new();
        match names {
            Some(names) => {
                for n in names {
                    match blocks.named(&n) {
                        Ok((_, b)) if self.grants().has(uid, b.name()) => chosen.push(b),
                        Ok(_) => {
                            let msg = format!("uid {uid} was not given block '{n}'");
                            return self.reply(id, &Response::error(code::NOT_ALLOWED, msg), &[]);
                        }
                        Err(e) => return self.refuse(id, &e),
                    }
                }
            }
            None => chosen.extend(blocks.iter().map(|(_, b)| b).filter(|b| self.grants().has(uid, b.name()))),
        }
        let mut infos = Vec::new();
        let mut fds = Vec::new();
        for b in chosen {
            let fd = if fds.len() < MAX_FDS_PER_REPLY { b.fd() } else { None };
            #[allow(clippy::cast_possible_truncation)] // at most MAX_FDS_PER_REPLY (8) fds
            let fd_index = fd.map(|f| {
                fds.push(f);
                (fds.len() - 1) as u32
            });
            infos.push(crate::control::BlockInfo {
                name: b.name().into(),
                size: b.size(),
                page_size: b.page_size(),
                fd_index,
            });
        }
        self.reply(id, &Response::Blocks { blocks: infos }, &fds);
    }
}

/// Why a registration over the socket was refused.
#[derive(Debug)]
pub(super) enum PeerRefusal {
    /// The peer may not reach what it asked for (reply code `not-allowed`).
    NotAllowed(String),
    /// Anything else (reply code `refused`).
    Refused(Error),
}

impl std::fmt::Display for PeerRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerRefusal::NotAllowed(m) => f.write_str(m),
            PeerRefusal::Refused(e) => write!(f, "{e}"),
        }
    }
}
