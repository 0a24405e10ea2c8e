//! The frontend side of the vhost-user postcopy handshake, step by step, in the order real
//! backends accept (QEMU's order):
//!
//! 1. [`check_capable`]: PAGEFAULT and REPLY_ACK negotiated, else refuse before touching anything;
//! 2. [`advise`]: POSTCOPY_ADVISE, returns the backend's userfaultfd;
//! 3. [`listen`]: POSTCOPY_LISTEN, before any memory table (libvhost-user panics otherwise);
//! 4. [`set_mem_table_listening`]: SET_MEM_TABLE while listening, returns the bases the backend
//!    reports;
//! 5. [`correct_bases`]: checks each reported base against the backend's real mapping of the memfd
//!    (/proc/PID/maps by inode; libvhost-user echoes the frontend's own addresses) and corrects it;
//! 6. [`ack_mem_regions`]: the empty SET_MEM_TABLE ack; only now may the backend fault;
//! 7. then the caller (re)sends SET_VRING_ADDR / sets the vrings up (libvhost-user does not remap
//!    its rings on the postcopy memory table), and registers the uffd and the [`ClientMapping`]s
//!    with the broker;
//! 8. [`end`]: POSTCOPY_END when every page has arrived.
//!
//! [`Handshake`] runs steps 1-5, lets the caller register the backend with the broker, then acks
//! (step 6); [`handshake_with`] does the same with a closure; [`handshake`] runs 1-6 with no broker
//! (every page already present). [`crate::vhost_user::register`] turns the result into a broker
//! registration, in process or over the control socket.

use std::os::fd::OwnedFd;

use log::{info, warn};
use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

use crate::error::{Error, Result};
use crate::vhost_user::frontend::{BackendConn, MemRegion};
use crate::vhost_user::procmaps::{bases_of, read_maps, FileId};

/// Where a backend maps one region of guest RAM: what the broker needs to translate the
/// backend's fault addresses and to wake it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientMapping {
    /// Index of the region in the memory table sent (the order of [`MemRegion`]s given).
    pub region: usize,
    /// The backend's address of the region's first byte.
    pub client_addr: u64,
    /// Guest physical address of the region.
    pub guest_phys_addr: u64,
    /// Offset of the region's first byte in its fd (RAM block).
    pub block_offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A backend in postcopy: its userfaultfd and mapping table.
#[derive(Debug)]
pub struct BackendPostcopy {
    /// The backend's userfaultfd (from POSTCOPY_ADVISE): read its faults, wake it.
    pub uffd: OwnedFd,
    /// One entry per region, with the corrected client addresses.
    pub mappings: Vec<ClientMapping>,
    /// The bases the backend reported in its SET_MEM_TABLE reply.
    pub reported_bases: Vec<u64>,
    /// Number of reported bases that were wrong and corrected from /proc/PID/maps.
    pub corrected: usize,
    /// The backend's pid (SO_PEERCRED), when local.
    pub pid: Option<i32>,
}

/// Refuse postcopy with a clear error unless the backend negotiated PAGEFAULT and REPLY_ACK.
/// Sends nothing.
pub fn check_capable(conn: &BackendConn) -> Result<()> {
    check_features(&conn.socket_name(), conn.acked_protocol())
}

/// [`check_capable`] on a snapshot of a backend's negotiated protocol features (what a Probe
/// notifier holds after the connection moved elsewhere).
pub fn check_features(socket: &str, acked: VhostUserProtocolFeatures) -> Result<()> {
    if !acked.contains(VhostUserProtocolFeatures::PAGEFAULT) {
        return Err(Error::BackendFeature {
            socket: socket.to_string(),
            feature: "the PAGEFAULT protocol feature",
            why: "postcopy needs (the backend cannot fault on missing pages); migrate with precopy only or use a backend built with postcopy support",
        });
    }
    if !acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        return Err(Error::BackendFeature {
            socket: socket.to_string(),
            feature: "the REPLY_ACK protocol feature",
            why: "the postcopy handshake needs to stay in step with the backend's replies",
        });
    }
    Ok(())
}

/// POSTCOPY_ADVISE: the backend opens a userfaultfd and hands it over.
pub fn advise(conn: &mut BackendConn) -> Result<OwnedFd> {
    check_capable(conn)?;
    let file = conn.frontend_mut().postcopy_advise().map_err(|e| conn.err("POSTCOPY_ADVISE", e))?;
    Ok(OwnedFd::from(file))
}

/// POSTCOPY_LISTEN: from now on the backend registers every region it maps with its uffd.
pub fn listen(conn: &mut BackendConn) -> Result<()> {
    conn.frontend_mut().postcopy_listen().map_err(|e| conn.err("POSTCOPY_LISTEN", e))
}

/// SET_MEM_TABLE while listening: returns the mapping bases the backend reports, one per region.
/// Follow with [`correct_bases`] and [`ack_mem_regions`].
pub fn set_mem_table_listening(conn: &mut BackendConn, regions: &[MemRegion<'_>]) -> Result<Vec<u64>> {
    let infos: Vec<_> = regions.iter().map(|r| r.to_info()).collect();
    match conn.frontend_mut().set_mem_table(&infos).map_err(|e| conn.err("SET_MEM_TABLE (postcopy)", e))? {
        Some(bases) if bases.len() == regions.len() => Ok(bases),
        Some(bases) => Err(Error::Device(format!(
            "the backend at {} replied {} bases for {} regions",
            conn.socket_name(),
            bases.len(),
            regions.len()
        ))),
        None => {
            Err(Error::Invalid("SET_MEM_TABLE got no postcopy reply: call postcopy::listen first".into()))
        }
    }
}

/// Check each reported base against where process `pid` really maps the region's fd, and
/// correct it. Returns the mapping table and the number of corrections.
///
/// A reported base is kept when the backend maps the region there; otherwise the one mapping of
/// that fd range in the backend is used (libvhost-user reports the frontend's own address). No
/// mapping, or several with none matching, is an error.
pub fn correct_bases(
    pid: i32,
    regions: &[MemRegion<'_>],
    reported: &[u64],
) -> Result<(Vec<ClientMapping>, usize)> {
    let maps = read_maps(pid)?;
    let mut out = Vec::with_capacity(regions.len());
    let mut corrected = 0;
    for (i, (r, &base)) in regions.iter().zip(reported).enumerate() {
        let id = FileId::of(r.fd)?;
        let found = bases_of(&maps, id, r.mmap_offset, r.size);
        let client_addr = if found.contains(&base) {
            base
        } else if let [only] = found.as_slice() {
            warn!(
                "backend pid {pid} reported base {base:#x} for region {i} (gpa {:#x}) but maps it at {only:#x}; using {only:#x}",
                r.guest_phys_addr
            );
            corrected += 1;
            *only
        } else {
            return Err(Error::Device(format!(
                "backend pid {pid}: region {i} (gpa {:#x}, {} bytes) is mapped at {found:x?}, reported base {base:#x}; \
                 cannot tell where its faults come from",
                r.guest_phys_addr, r.size
            )));
        };
        out.push(ClientMapping {
            region: i,
            client_addr,
            guest_phys_addr: r.guest_phys_addr,
            block_offset: r.mmap_offset,
            len: r.size,
        });
    }
    Ok((out, corrected))
}

/// The empty SET_MEM_TABLE that acknowledges the postcopy memory table: the backend registers
/// (libvhost-user) or publishes (rust-vmm) its mappings and may fault from now on.
pub fn ack_mem_regions(conn: &mut BackendConn) -> Result<()> {
    conn.frontend_mut()
        .postcopy_ack_mem_regions(FrontendReq::SET_MEM_TABLE)
        .map_err(|e| conn.err("SET_MEM_TABLE ack (postcopy)", e))
}

/// POSTCOPY_END: the backend closes its uffd; all pages are present.
pub fn end(conn: &mut BackendConn) -> Result<()> {
    conn.frontend_mut().postcopy_end().map_err(|e| conn.err("POSTCOPY_END", e))
}

/// Steps 1-6 without a broker in between: check, advise, listen, memory table, base correction,
/// ack. Use [`Handshake`] (or [`handshake_with`]) when a broker must learn the backend's uffd and
/// mapping before the ack, which is always the case once pages can be missing.
pub fn handshake(conn: &mut BackendConn, regions: &[MemRegion<'_>]) -> Result<BackendPostcopy> {
    Ok(handshake_with(conn, regions, |_| Ok(()))?.0)
}

/// Steps 1-6 with `register` called between the base correction and the ack: the backend may
/// fault right after the ack, so the broker must know its uffd and mapping table by then.
/// Returns what `register` returned. If `register` fails the ack is not sent.
pub fn handshake_with<R>(
    conn: &mut BackendConn,
    regions: &[MemRegion<'_>],
    register: impl FnOnce(&BackendPostcopy) -> Result<R>,
) -> Result<(BackendPostcopy, R)> {
    let hs = Handshake::begin(conn, regions)?;
    let r = register(hs.postcopy())?;
    Ok((hs.ack()?, r))
}

/// A postcopy handshake stopped before its ack (steps 1-5 done): the backend listens, has its
/// memory table and waits for the ack before it may touch guest RAM. Register
/// [`Handshake::postcopy`] with the broker, then call [`Handshake::ack`].
#[derive(Debug)]
pub struct Handshake<'c> {
    conn: &'c mut BackendConn,
    pc: BackendPostcopy,
}

impl<'c> Handshake<'c> {
    /// Steps 1-5: check PAGEFAULT and REPLY_ACK (nothing is sent if they are missing), find the
    /// backend's pid (SO_PEERCRED; it must be local to verify its bases), POSTCOPY_ADVISE,
    /// POSTCOPY_LISTEN, SET_MEM_TABLE with reply, base correction from /proc/PID/maps.
    pub fn begin(conn: &'c mut BackendConn, regions: &[MemRegion<'_>]) -> Result<Handshake<'c>> {
        check_capable(conn)?;
        let pid = conn.peer_pid().ok_or_else(|| {
            Error::Invalid(format!(
                "the backend at {} is not a local process (no SO_PEERCRED pid): its mapping bases cannot be verified",
                conn.socket_name()
            ))
        })?;
        let uffd = advise(conn)?;
        listen(conn)?;
        let reported = set_mem_table_listening(conn, regions)?;
        let (mappings, corrected) = correct_bases(pid, regions, &reported)?;
        let pc = BackendPostcopy { uffd, mappings, reported_bases: reported, corrected, pid: Some(pid) };
        Ok(Handshake { conn, pc })
    }

    /// The backend's uffd and corrected mapping table, to register with the broker.
    pub fn postcopy(&self) -> &BackendPostcopy {
        &self.pc
    }

    /// Step 6: acknowledge the memory table; the backend registers its mappings and may fault
    /// from now on.
    pub fn ack(self) -> Result<BackendPostcopy> {
        ack_mem_regions(self.conn)?;
        info!(
            "postcopy handshake with {} (pid {:?}) done: {} region(s), {} base(s) corrected",
            self.conn.socket_name(),
            self.pc.pid,
            self.pc.mappings.len(),
            self.pc.corrected
        );
        Ok(self.pc)
    }
}
