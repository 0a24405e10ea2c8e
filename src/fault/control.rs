//! The fault loop's side of the control socket: accept peers, read their requests, register
//! and unregister clients, hand out RAM block fds, answer status, and take Firecracker's UFFD
//! handshake as a private client. A peer that misbehaves gets an error reply and is dropped
//! alone; the loop serves on.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use crate::client::{ClientId, MappingEntry, PrivateRegion};
use crate::control::protocol::code;
use crate::control::{ClientKind, ControlError, FcRegion, Incoming, MappingSpec, Request, Response};
use crate::error::Error;
use crate::fault::event_loop::{Loop, Registration, RegistrationMap, K_CONN, T_LISTEN};

/// Most fds in one Blocks reply.
const MAX_FDS_PER_REPLY: usize = 8;

impl Loop {
    /// Accept every pending peer.
    pub(crate) fn accept_peers(&mut self) {
        let Some(l) = &self.listener else { return };
        loop {
            match l.accept() {
                Ok(Some(conn)) => {
                    let id = self.next_conn;
                    self.next_conn += 1;
                    if let Err(e) = self.add(conn.as_raw_fd(), super::event_loop::token(K_CONN, id)) {
                        log::error!("control connection: {e}");
                        continue;
                    }
                    log::debug!("control peer {:?} connected as #{id}", conn.creds());
                    self.conns.insert(id, conn);
                }
                Ok(None) => break,
                Err(ControlError::NotAllowed { uid, pid }) => {
                    log::warn!("control peer pid {pid} uid {uid} refused: uid not allowed");
                    self.core.stats.control_errors += 1;
                }
                Err(e) => {
                    log::error!("accepting a control peer: {e}");
                    break;
                }
            }
        }
        let _ = T_LISTEN;
    }

    /// A control connection is readable.
    pub(crate) fn serve_conn(&mut self, id: u64) {
        loop {
            let Some(conn) = self.conns.get_mut(&id) else { return };
            match conn.read_ready() {
                Ok(msgs) if msgs.is_empty() => return,
                Ok(msgs) => {
                    for m in msgs {
                        self.handle(id, m);
                    }
                }
                Err(ControlError::PeerClosed) => {
                    self.drop_conn(id);
                    return;
                }
                Err(e) => {
                    log::warn!("control peer #{id}: {e}; closing the connection");
                    self.core.stats.control_errors += 1;
                    if let Some(c) = self.conns.get_mut(&id) {
                        let _ = c.send_error(&e);
                    }
                    self.drop_conn(id);
                    return;
                }
            }
        }
    }

    fn drop_conn(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            self.del(c.as_raw_fd());
        }
    }

    fn reply(&mut self, id: u64, r: &Response, fds: &[BorrowedFd<'_>]) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        if let Err(e) = c.send(r, fds) {
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
            Incoming::Request(Request::Register { name, kind, pid, mappings }, mut fds) => {
                let Some(uffd) = fds.pop() else { return };
                let pid = pid.or_else(|| u32::try_from(creds.pid).ok());
                if let Some(m) = mappings.iter().find(|m| !self.granted(creds.uid, &m.block)) {
                    let msg = format!("uid {} was not given block '{}'", creds.uid, m.block);
                    return self.reply(id, &Response::error(code::NOT_ALLOWED, msg), &[]);
                }
                let r = self.register_spec(name, kind, pid, &mappings, uffd);
                match r {
                    Ok(cid) => {
                        self.owners.insert(cid, creds.uid);
                        self.reply(id, &Response::Registered { client: cid.0 }, &[]);
                    }
                    Err(e) => self.refuse(id, &e),
                }
            }
            Incoming::Request(Request::Unregister { client }, _) => {
                let cid = ClientId(client);
                let owner = self.owners.get(&cid).copied();
                if self.core.clients.get(cid).is_none() {
                    self.refuse(id, &Error::Invalid(format!("no client {client}")));
                } else if creds.uid != 0 && owner != Some(creds.uid) {
                    self.reply(
                        id,
                        &Response::error(
                            code::NOT_ALLOWED,
                            format!("client {client} belongs to another user"),
                        ),
                        &[],
                    );
                } else {
                    self.retire(cid, false);
                    self.reply(id, &Response::Ok, &[]);
                }
            }
            Incoming::Request(Request::GetBlocks { names }, _) => self.send_blocks(id, creds.uid, names),
            Incoming::Request(Request::Status, _) => {
                let report = serde_json::to_value(self.status()).unwrap_or(serde_json::Value::Null);
                self.reply(id, &Response::Status { report }, &[]);
            }
            Incoming::Request(
                other @ (Request::ProvideBlocks { .. } | Request::Dirty { .. } | Request::StartPostcopy),
                _,
            ) => {
                let e =
                    Error::Invalid(format!("'{}' is for a source page server, not the broker", other.op()));
                self.refuse(id, &e);
            }
            Incoming::Firecracker(regions, uffd) => {
                let pid = u32::try_from(creds.pid).ok();
                match self.register(Registration {
                    name: format!("firecracker-{}", creds.pid),
                    uffd,
                    pid,
                    map: RegistrationMap::Private(regions.iter().map(fc_region).collect()),
                }) {
                    Ok(cid) => log::info!("Firecracker pid {} served as private client {}", creds.pid, cid.0),
                    Err(e) => {
                        // Firecracker reads nothing back: log loudly and drop the connection.
                        log::error!("Firecracker handshake from pid {} refused: {e}", creds.pid);
                        self.core.stats.control_errors += 1;
                        self.drop_conn(id);
                    }
                }
            }
        }
    }

    fn register_spec(
        &mut self,
        name: String,
        kind: ClientKind,
        pid: Option<u32>,
        mappings: &[MappingSpec],
        uffd: OwnedFd,
    ) -> crate::Result<ClientId> {
        let map = match kind {
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
        };
        self.register(Registration { name, uffd, pid, map })
    }

    /// Whether peers of `uid` may map `block`: root and the broker's own uid may map every
    /// block; other allowed uids only the blocks granted to them.
    fn granted(&self, uid: u32, block: &str) -> bool {
        uid == 0
            || uid == nix::unistd::geteuid().as_raw()
            || self.config.grants.get(&uid).is_some_and(|g| g.iter().any(|b| b == block))
    }

    fn send_blocks(&mut self, id: u64, uid: u32, names: Option<Vec<String>>) {
        let blocks = std::sync::Arc::clone(&self.core.blocks);
        let mut chosen = Vec::new();
        match names {
            Some(names) => {
                for n in names {
                    match blocks.named(&n) {
                        Ok((_, b)) if self.granted(uid, b.name()) => chosen.push(b),
                        Ok(_) => {
                            let msg = format!("uid {uid} was not given block '{n}'");
                            return self.reply(id, &Response::error(code::NOT_ALLOWED, msg), &[]);
                        }
                        Err(e) => return self.refuse(id, &e),
                    }
                }
            }
            None => chosen.extend(blocks.iter().map(|(_, b)| b).filter(|b| self.granted(uid, b.name()))),
        }
        let mut infos = Vec::new();
        let mut fds = Vec::new();
        for b in chosen {
            let fd = if fds.len() < MAX_FDS_PER_REPLY { b.fd() } else { None };
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

fn fc_region(r: &FcRegion) -> PrivateRegion {
    PrivateRegion {
        client_addr: r.base_host_virt_addr,
        len: r.size,
        file_offset: r.offset,
        page_size: r.page_size,
    }
}
