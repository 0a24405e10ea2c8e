//! The broker daemon as the frontend of vhost-user backends (`serve --vhost-user-backend`): it
//! connects to each backend socket before postcopy starts (a Probe notifier vetoes postcopy for a
//! backend without PAGEFAULT), runs the postcopy part of the handshake with the memfds of its own
//! RAM blocks, registers each backend as a shared client in process, and sends POSTCOPY_END from
//! an InboundEnd notifier. A broker that parks its state for a restart parks each backend's
//! connection ([`DaemonBackends::parkable`]); the restarted one takes them back without a new
//! handshake ([`DaemonBackends::reattach`]) and still sends POSTCOPY_END at the end.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use log::info;
use serde::{Deserialize, Serialize};
use vhost::vhost_user::message::VhostUserProtocolFeatures;

use crate::client_id::ClientId;
use crate::error::{Error, Result};
use crate::fault::BrokerHandle;
use crate::notify::Notifiers;
use crate::ram::RamBlocks;
use crate::vhost_user::frontend::{BackendConn, MemRegion, Negotiation};
use crate::vhost_user::notifier::{add_end_notifier, add_probe_notifier};
use crate::vhost_user::register::{block_names_by_fd, handshake_and_register, BrokerLink};
use crate::vhost_user::virtq::VIRTIO_F_VERSION_1;

/// One backend the daemon drives.
#[derive(Debug)]
struct Attached {
    socket: PathBuf,
    conn: Arc<Mutex<BackendConn>>,
    client: Option<ClientId>,
}

/// What a restarted broker needs to know of a backend besides its connection's socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedBackend {
    /// The backend's socket path (for the logs and the client's name).
    pub socket: PathBuf,
    /// Its client id in the fault loop (its userfaultfd is parked with the clients).
    pub client: u64,
    /// Device features acknowledged.
    pub acked_features: u64,
    /// Protocol features negotiated (bits).
    pub acked_protocol: u64,
}

/// The backends the daemon is the frontend of.
#[derive(Debug, Default)]
pub struct DaemonBackends {
    backends: Vec<Attached>,
}

/// The memory table of `blocks`: each block at a guest physical address after the previous one,
/// its fd at offset 0, the broker's placement mapping as the frontend address.
pub fn regions_of(blocks: &RamBlocks) -> Result<Vec<MemRegion<'_>>> {
    let mut gpa = 0u64;
    let mut out = Vec::new();
    for (_, b) in blocks.iter() {
        let fd = b.fd().ok_or_else(|| {
            Error::Invalid(format!(
                "RAM block '{}' has no fd; vhost-user backends can only share fd-backed blocks",
                b.name()
            ))
        })?;
        out.push(MemRegion {
            guest_phys_addr: gpa,
            size: b.size(),
            fd,
            mmap_offset: 0,
            user_addr: b.host_addr(),
        });
        gpa += b.size();
    }
    Ok(out)
}

impl DaemonBackends {
    /// Connect to every socket, negotiate, and add a Probe notifier (veto without PAGEFAULT or
    /// REPLY_ACK) and an InboundEnd notifier (POSTCOPY_END) per backend. Call before
    /// [`crate::Incoming::probe`].
    pub fn connect(sockets: &[PathBuf], notifiers: &mut Notifiers) -> Result<DaemonBackends> {
        let mut backends = Vec::new();
        for s in sockets {
            let mut conn = BackendConn::connect(s, &Negotiation::default())?;
            conn.set_features(VIRTIO_F_VERSION_1)?;
            add_probe_notifier(notifiers, &conn);
            let conn = Arc::new(Mutex::new(conn));
            add_end_notifier(notifiers, Arc::clone(&conn));
            backends.push(Attached { socket: s.clone(), conn, client: None });
        }
        Ok(DaemonBackends { backends })
    }

    /// Take back backends whose connections a broker that died parked: each connection as it
    /// was negotiated (no new postcopy handshake: the backend still listens and its userfaultfd
    /// is adopted with the other clients), with an InboundEnd notifier for POSTCOPY_END.
    pub fn reattach(
        parked: Vec<(ParkedBackend, OwnedFd)>,
        notifiers: &mut Notifiers,
    ) -> Result<DaemonBackends> {
        let mut backends = Vec::new();
        for (p, fd) in parked {
            let protocol = VhostUserProtocolFeatures::from_bits_truncate(p.acked_protocol);
            let conn = BackendConn::reattach(fd.into(), &p.socket, p.acked_features, protocol)?;
            let conn = Arc::new(Mutex::new(conn));
            add_end_notifier(notifiers, Arc::clone(&conn));
            backends.push(Attached { socket: p.socket, conn, client: Some(ClientId(p.client)) });
        }
        Ok(DaemonBackends { backends })
    }

    /// What to park of each registered backend: its record and a duplicate of its connection's
    /// socket (see [`DaemonBackends::reattach`]).
    pub fn parkable(&self) -> Result<Vec<(ParkedBackend, OwnedFd)>> {
        let mut out = Vec::new();
        for b in &self.backends {
            let Some(client) = b.client else { continue };
            let conn =
                b.conn.lock().map_err(|_| Error::Invalid("backend connection lock poisoned".into()))?;
            let fd = conn
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::io(format!("duplicate the connection to {}", b.socket.display()), e))?;
            let record = ParkedBackend {
                socket: b.socket.clone(),
                client: client.0,
                acked_features: conn.acked_features(),
                acked_protocol: conn.acked_protocol().bits(),
            };
            out.push((record, fd));
        }
        Ok(out)
    }

    /// Number of backends.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// Run the postcopy handshake with each backend over the memfds of `blocks`, registering it
    /// with the running fault loop before the ack. Returns the client ids.
    pub fn register_all(&mut self, handle: &BrokerHandle, blocks: &RamBlocks) -> Result<Vec<ClientId>> {
        let regions = regions_of(blocks)?;
        let names = block_names_by_fd(&regions, blocks)?;
        let mut ids = Vec::new();
        for b in &mut self.backends {
            let mut conn =
                b.conn.lock().map_err(|_| Error::Invalid("backend connection lock poisoned".into()))?;
            let name = format!("vhost-user:{}", b.socket.display());
            let mut link = BrokerLink::InProcess { handle, blocks };
            let reg = handshake_and_register(&mut conn, &regions, &mut link, &name, &names)?;
            info!(
                "backend {} registered as client {} ({} region(s), {} base(s) corrected)",
                b.socket.display(),
                reg.client,
                reg.postcopy.mappings.len(),
                reg.postcopy.corrected
            );
            b.client = Some(reg.client);
            ids.push(reg.client);
        }
        Ok(ids)
    }
}
