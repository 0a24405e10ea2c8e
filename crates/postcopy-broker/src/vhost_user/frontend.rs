//! A connection to one vhost-user backend, seen from the VMM: feature negotiation (always with
//! REPLY_ACK when offered), ownership, the memory table, and vring setup, in the order real
//! backends (libvhost-user, rust-vmm) expect.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use log::{debug, info};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};

/// Protocol features the frontend asks for when the backend offers them.
pub const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::PAGEFAULT);

/// What to negotiate on connect.
#[derive(Debug, Clone, Copy)]
pub struct Negotiation {
    /// Protocol features to accept when offered (intersected with the backend's offer).
    pub protocol: VhostUserProtocolFeatures,
}

impl Default for Negotiation {
    fn default() -> Self {
        Negotiation { protocol: WANTED_PROTOCOL_FEATURES }
    }
}

/// One region of guest RAM as the backend must map it (one fd per region).
#[derive(Debug, Clone, Copy)]
pub struct MemRegion<'a> {
    /// Guest physical address of the region's first byte.
    pub guest_phys_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// The memfd (or file) backing the region; the backend mmaps it.
    pub fd: BorrowedFd<'a>,
    /// Offset of the region's first byte inside `fd`.
    pub mmap_offset: u64,
    /// Where the frontend itself maps the region (vring addresses are given in this space).
    pub user_addr: u64,
}

impl MemRegion<'_> {
    pub(crate) fn to_info(self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.guest_phys_addr,
            memory_size: self.size,
            userspace_addr: self.user_addr,
            mmap_offset: self.mmap_offset,
            mmap_handle: self.fd.as_raw_fd(),
        }
    }
}

/// One vring's geometry, in the frontend's user addresses, and its eventfds.
#[derive(Debug, Clone, Copy)]
pub struct VringSetup<'a> {
    /// Queue index.
    pub index: usize,
    /// Number of descriptors (a power of two).
    pub size: u16,
    /// Frontend user address of the descriptor table.
    pub desc_addr: u64,
    /// Frontend user address of the available ring.
    pub avail_addr: u64,
    /// Frontend user address of the used ring.
    pub used_addr: u64,
    /// Eventfd the frontend writes to kick the backend.
    pub kick: &'a EventFd,
    /// Eventfd the backend writes when it used buffers.
    pub call: &'a EventFd,
}

/// A negotiated connection to one vhost-user backend.
pub struct BackendConn {
    frontend: Frontend,
    socket: PathBuf,
    offered_features: u64,
    acked_features: u64,
    offered_protocol: VhostUserProtocolFeatures,
    acked_protocol: VhostUserProtocolFeatures,
    queue_num: u64,
    peer_pid: Option<i32>,
}

impl std::fmt::Debug for BackendConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConn")
            .field("socket", &self.socket)
            .field("offered_features", &format_args!("{:#x}", self.offered_features))
            .field("acked_features", &format_args!("{:#x}", self.acked_features))
            .field("offered_protocol", &self.offered_protocol)
            .field("acked_protocol", &self.acked_protocol)
            .field("queue_num", &self.queue_num)
            .field("peer_pid", &self.peer_pid)
            .finish()
    }
}

impl BackendConn {
    /// Connect to the backend listening on `socket`, negotiate protocol features and claim
    /// ownership: GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (if MQ), SET_OWNER.
    ///
    /// When REPLY_ACK is negotiated every later request asks for a reply, so the frontend stays in
    /// step with backends that always answer (libvhost-user answers POSTCOPY_LISTEN and END).
    pub fn connect(socket: &Path, negotiation: &Negotiation) -> Result<BackendConn> {
        let name = socket.display().to_string();
        let frontend = Frontend::connect(socket, 1).map_err(|source| Error::VhostUser {
            op: "connect".into(),
            socket: name.clone(),
            source: Box::new(source),
        })?;
        let mut conn = BackendConn {
            frontend,
            socket: socket.to_path_buf(),
            offered_features: 0,
            acked_features: 0,
            offered_protocol: VhostUserProtocolFeatures::empty(),
            acked_protocol: VhostUserProtocolFeatures::empty(),
            queue_num: 1,
            peer_pid: None,
        };
        conn.peer_pid = conn.read_peer_pid();
        conn.negotiate(negotiation)?;
        info!(
            "vhost-user backend {name} (pid {:?}): features {:#x}, protocol {:?}, {} queue(s)",
            conn.peer_pid, conn.offered_features, conn.acked_protocol, conn.queue_num
        );
        Ok(conn)
    }

    /// Take back a connection negotiated earlier (by a broker that died during postcopy and
    /// parked the socket): no new handshake, only the frontend's own view of the negotiation
    /// restored. GET_FEATURES and SET_PROTOCOL_FEATURES with the `acked_protocol` set recorded
    /// then are sent again (both are idempotent for the backend; the vhost crate only allows
    /// protocol requests once it has seen them); the postcopy state, memory table and
    /// registration stay as they were.
    pub fn reattach(
        stream: std::os::unix::net::UnixStream,
        socket: &Path,
        acked_features: u64,
        acked_protocol: VhostUserProtocolFeatures,
    ) -> Result<BackendConn> {
        let mut conn = BackendConn {
            frontend: Frontend::from_stream(stream, 1),
            socket: socket.to_path_buf(),
            offered_features: 0,
            acked_features,
            offered_protocol: VhostUserProtocolFeatures::empty(),
            acked_protocol,
            queue_num: 1,
            peer_pid: None,
        };
        conn.peer_pid = conn.read_peer_pid();
        conn.offered_features = conn.frontend.get_features().map_err(|e| conn.err("GET_FEATURES", e))?;
        conn.frontend
            .set_protocol_features(acked_protocol)
            .map_err(|e| conn.err("SET_PROTOCOL_FEATURES", e))?;
        if acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            conn.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        info!(
            "vhost-user backend {} (pid {:?}) taken back after a restart: protocol {acked_protocol:?}",
            socket.display(),
            conn.peer_pid
        );
        Ok(conn)
    }

    /// The connection's socket (to park it across a restart of the broker).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the frontend's socket is open for as long as `self.frontend` lives, which the
        // borrow cannot outlive.
        unsafe { BorrowedFd::borrow_raw(self.frontend.as_raw_fd()) }
    }

    fn read_peer_pid(&self) -> Option<i32> {
        let raw = self.frontend.as_raw_fd();
        // SAFETY: `raw` is the frontend's socket, open for as long as `self.frontend` lives, and the
        // borrow does not outlive this call.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        match getsockopt(&fd, PeerCredentials) {
            Ok(cred) => Some(cred.pid()),
            Err(e) => {
                debug!("SO_PEERCRED on {}: {e}", self.socket.display());
                None
            }
        }
    }

    fn negotiate(&mut self, negotiation: &Negotiation) -> Result<()> {
        self.offered_features = self.frontend.get_features().map_err(|e| self.err("GET_FEATURES", e))?;
        if self.offered_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(Error::BackendFeature {
                socket: self.socket_name(),
                feature: "VHOST_USER_F_PROTOCOL_FEATURES",
                why: "the frontend needs for REPLY_ACK and vring enabling; use a vhost-user backend that offers it",
            });
        }
        self.offered_protocol =
            self.frontend.get_protocol_features().map_err(|e| self.err("GET_PROTOCOL_FEATURES", e))?;
        let acked = self.offered_protocol & negotiation.protocol;
        self.frontend.set_protocol_features(acked).map_err(|e| self.err("SET_PROTOCOL_FEATURES", e))?;
        self.acked_protocol = acked;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if acked.contains(VhostUserProtocolFeatures::MQ) {
            self.queue_num = self.frontend.get_queue_num().map_err(|e| self.err("GET_QUEUE_NUM", e))?;
        }
        self.frontend.set_owner().map_err(|e| self.err("SET_OWNER", e))?;
        Ok(())
    }

    /// Acknowledge device features: the backend's offer intersected with `driver_features`, plus
    /// VHOST_USER_F_PROTOCOL_FEATURES. Returns the acked set.
    pub fn set_features(&mut self, driver_features: u64) -> Result<u64> {
        let acked =
            self.offered_features & (driver_features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        self.frontend.set_features(acked).map_err(|e| self.err("SET_FEATURES", e))?;
        self.acked_features = acked;
        Ok(acked)
    }

    /// Read `len` bytes of the device config space at `offset` (needs the CONFIG protocol feature).
    pub fn get_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>> {
        if !self.acked_protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(Error::BackendFeature {
                socket: self.socket_name(),
                feature: "the CONFIG protocol feature",
                why: "reading the device config space needs",
            });
        }
        let buf = vec![0u8; len as usize];
        let (_, payload) = self
            .frontend
            .get_config(offset, len, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(|e| self.err("GET_CONFIG", e))?;
        Ok(payload)
    }

    /// Send the memory table (SET_MEM_TABLE) outside postcopy. While postcopy is listening use
    /// [`crate::vhost_user::postcopy::set_mem_table_listening`] instead.
    pub fn set_mem_table(&mut self, regions: &[MemRegion<'_>]) -> Result<()> {
        let infos: Vec<_> = regions.iter().map(|r| r.to_info()).collect();
        match self.frontend.set_mem_table(&infos).map_err(|e| self.err("SET_MEM_TABLE", e))? {
            None => Ok(()),
            Some(_) => Err(Error::Invalid(
                "SET_MEM_TABLE answered with postcopy bases although postcopy was not meant to listen; \
                 use postcopy::set_mem_table_listening"
                    .into(),
            )),
        }
    }

    /// Set one vring up and enable it: SET_VRING_NUM, SET_VRING_BASE 0, SET_VRING_ADDR,
    /// SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ENABLE. Send it after the memory table.
    pub fn setup_vring(&mut self, v: &VringSetup<'_>) -> Result<()> {
        self.check_queue(v.index)?;
        self.frontend.set_vring_num(v.index, v.size).map_err(|e| self.err("SET_VRING_NUM", e))?;
        self.frontend.set_vring_base(v.index, 0).map_err(|e| self.err("SET_VRING_BASE", e))?;
        self.set_vring_addr(v)?;
        self.frontend.set_vring_kick(v.index, v.kick).map_err(|e| self.err("SET_VRING_KICK", e))?;
        self.frontend.set_vring_call(v.index, v.call).map_err(|e| self.err("SET_VRING_CALL", e))?;
        self.frontend.set_vring_enable(v.index, true).map_err(|e| self.err("SET_VRING_ENABLE", e))?;
        Ok(())
    }

    /// (Re)send SET_VRING_ADDR for one vring: after a postcopy memory table, libvhost-user only
    /// remaps its rings when told their addresses again.
    pub fn set_vring_addr(&mut self, v: &VringSetup<'_>) -> Result<()> {
        self.check_queue(v.index)?;
        let config = VringConfigData {
            queue_max_size: v.size,
            queue_size: v.size,
            flags: 0,
            desc_table_addr: v.desc_addr,
            used_ring_addr: v.used_addr,
            avail_ring_addr: v.avail_addr,
            log_addr: None,
        };
        self.frontend.set_vring_addr(v.index, &config).map_err(|e| self.err("SET_VRING_ADDR", e))
    }

    fn check_queue(&self, index: usize) -> Result<()> {
        if index as u64 >= self.queue_num {
            return Err(Error::Invalid(format!(
                "queue {index} does not exist: the backend at {} has {} queue(s)",
                self.socket.display(),
                self.queue_num
            )));
        }
        Ok(())
    }

    /// The backend's socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Device features the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    /// Device features acknowledged by [`BackendConn::set_features`].
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Protocol features the backend offered.
    pub fn offered_protocol(&self) -> VhostUserProtocolFeatures {
        self.offered_protocol
    }

    /// Protocol features negotiated.
    pub fn acked_protocol(&self) -> VhostUserProtocolFeatures {
        self.acked_protocol
    }

    /// Number of queues the backend has (1 unless MQ was negotiated).
    pub fn queue_num(&self) -> u64 {
        self.queue_num
    }

    /// Process id of the backend (SO_PEERCRED), when the peer is local.
    pub fn peer_pid(&self) -> Option<i32> {
        self.peer_pid
    }

    /// The underlying vhost frontend, for requests this type does not wrap.
    pub fn frontend_mut(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    pub(crate) fn socket_name(&self) -> String {
        self.socket.display().to_string()
    }

    pub(crate) fn err(&self, op: &str, source: vhost::Error) -> Error {
        Error::VhostUser { op: op.to_string(), socket: self.socket_name(), source: Box::new(source) }
    }
}
