//! vhost-user backends of an embedded broker (feature `vhost-user`): the caller gives a socket
//! or a negotiated connection and nothing else; the broker sends its own guest memory table (the
//! VMM's mapping of its blocks), takes the backend through the postcopy handshake, registers it
//! in process before the ack, and sends POSTCOPY_END when the migration is complete.

use std::path::{Path, PathBuf};

use crate::client_id::ClientId;
use crate::embed::broker::EmbeddedBroker;
use crate::embed::builder::BackendSpec;
use crate::embed::error::{EmbedError, EmbedResult};
use crate::error::Error;
use crate::notify::Notifiers;
use crate::vhost_user::notifier::add_probe_notifier;
use crate::vhost_user::postcopy::{self, BackendPostcopy};
use crate::vhost_user::register::{block_names_by_fd, handshake_and_register, BrokerLink};
use crate::vhost_user::virtq::VIRTIO_F_VERSION_1;
use crate::vhost_user::{BackendConn, Negotiation};

/// A backend in postcopy with this broker.
#[derive(Debug)]
pub(crate) struct Attached {
    conn: BackendConn,
    client: ClientId,
    /// Its uffd (the broker holds a copy) and corrected mapping table.
    _postcopy: BackendPostcopy,
}

fn backend_error(socket: &Path) -> impl FnOnce(Error) -> EmbedError + '_ {
    move |source| EmbedError::Backend { socket: socket.display().to_string(), source }
}

/// Connect to a backend socket as the daemon does: default negotiation, VIRTIO_F_VERSION_1.
fn connect_socket(socket: &Path) -> EmbedResult<BackendConn> {
    let mut conn = BackendConn::connect(socket, &Negotiation::default()).map_err(backend_error(socket))?;
    conn.set_features(VIRTIO_F_VERSION_1).map_err(backend_error(socket))?;
    Ok(conn)
}

/// The builder's backends, connected, each with a Probe notifier (a backend without PAGEFAULT
/// or REPLY_ACK vetoes postcopy before anything is touched).
pub(crate) fn connect(specs: Vec<BackendSpec>, notifiers: &mut Notifiers) -> EmbedResult<Vec<BackendConn>> {
    let mut out = Vec::with_capacity(specs.len());
    for s in specs {
        let conn = match s {
            BackendSpec::Socket(path) => connect_socket(&path)?,
            BackendSpec::Conn(c) => c,
        };
        add_probe_notifier(notifiers, &conn);
        out.push(conn);
    }
    Ok(out)
}

/// POSTCOPY_END to every backend (when `complete`); the connections go back to the VMM.
pub(crate) fn end_all(backends: Vec<Attached>, complete: bool) -> (Vec<BackendConn>, Option<EmbedError>) {
    let mut first = None;
    let mut conns = Vec::with_capacity(backends.len());
    for mut b in backends {
        if complete {
            if let Err(e) = postcopy::end(&mut b.conn) {
                log::warn!("client {}: {e}", b.client);
                first.get_or_insert(EmbedError::Backend {
                    socket: b.conn.socket().display().to_string(),
                    source: e,
                });
            }
        }
        conns.push(b.conn);
    }
    (conns, first)
}

impl EmbeddedBroker {
    /// Join a vhost-user backend through a connection the VMM negotiated (device features
    /// acknowledged, no memory table yet): the postcopy handshake with the broker's guest memory
    /// table, the backend registered as a client before the ack. Returns its client id; the
    /// connection stays with the broker ([`EmbeddedBroker::backend_mut`]) until
    /// [`EmbeddedBroker::finish`] gives it back. A refused backend is not registered and nothing
    /// else changes.
    pub fn register_vhost_user(&mut self, mut conn: BackendConn) -> EmbedResult<ClientId> {
        let socket: PathBuf = conn.socket().to_path_buf();
        let handle = self.handle()?;
        let blocks = self.incoming.blocks();
        let regions = self.vmm.ram.mem_regions();
        let names = block_names_by_fd(&regions, blocks).map_err(backend_error(&socket))?;
        let name = format!("vhost-user:{}", socket.display());
        let mut link = BrokerLink::InProcess { handle, blocks };
        let reg = handshake_and_register(&mut conn, &regions, &mut link, &name, &names)
            .map_err(backend_error(&socket))?;
        drop(regions);
        log::info!(
            "backend {} is client {} ({} region(s), {} base(s) corrected)",
            socket.display(),
            reg.client,
            reg.postcopy.mappings.len(),
            reg.postcopy.corrected
        );
        self.backends.push(Attached { conn, client: reg.client, _postcopy: reg.postcopy });
        Ok(reg.client)
    }

    /// Connect to the vhost-user backend listening on `socket` (default negotiation,
    /// VIRTIO_F_VERSION_1) and join it as [`EmbeddedBroker::register_vhost_user`] does.
    pub fn connect_vhost_user(&mut self, socket: &Path) -> EmbedResult<ClientId> {
        let conn = connect_socket(socket)?;
        postcopy::check_capable(&conn).map_err(backend_error(socket))?;
        self.register_vhost_user(conn)
    }

    /// The connection of backend `client`, to set its vrings up or send it requests.
    pub fn backend_mut(&mut self, client: ClientId) -> EmbedResult<&mut BackendConn> {
        self.backends
            .iter_mut()
            .find(|b| b.client == client)
            .map(|b| &mut b.conn)
            .ok_or(EmbedError::UnknownBackend(client))
    }

    /// The client ids of the joined backends, in the order they joined.
    pub fn backend_clients(&self) -> Vec<ClientId> {
        self.backends.iter().map(|b| b.client).collect()
    }
}
