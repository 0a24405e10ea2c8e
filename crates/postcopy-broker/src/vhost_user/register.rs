//! A vhost-user backend in postcopy as a shared client of the broker: its corrected mapping
//! table translated into the broker's terms (block by name or by fd identity), registered in
//! process through a [`BrokerHandle`] or over the control socket with a [`ControlClient`], and
//! unregistered after POSTCOPY_END.

use crate::client::{ClientId, MappingEntry};
use crate::control::{ClientKind, ControlClient, MappingSpec};
use crate::error::{Error, IoContext, Result};
use crate::fault::{BrokerHandle, Registration, RegistrationMap};
use crate::ram::RamBlocks;
use crate::vhost_user::frontend::{BackendConn, MemRegion};
use crate::vhost_user::postcopy::{self, BackendPostcopy};
use crate::vhost_user::procmaps::FileId;

/// Where the broker runs, seen from the process that owns the vhost-user connection.
#[derive(Debug)]
pub enum BrokerLink<'a> {
    /// In this process (a Rust VMM holding the fault loop's handle, or the broker daemon itself).
    InProcess {
        /// The running fault loop.
        handle: &'a BrokerHandle,
        /// The broker's RAM blocks (to turn block names into ids).
        blocks: &'a RamBlocks,
    },
    /// Another process, reached through its control socket.
    Control(&'a mut ControlClient),
}

/// For each region of a memory table, the name of the broker block its fd is, or `None` for
/// memory the broker does not own (such regions are not registered). Matches by the fd's
/// (device, inode), so a region made from a block's memfd, or a dup of it, is found.
pub fn block_names_by_fd(regions: &[MemRegion<'_>], blocks: &RamBlocks) -> Result<Vec<Option<String>>> {
    let mut ids = Vec::new();
    for (_, b) in blocks.iter() {
        if let Some(fd) = b.fd() {
            ids.push((FileId::of(fd)?, b.name().to_string()));
        }
    }
    regions
        .iter()
        .map(|r| Ok(ids.iter().find(|(id, _)| Some(*id) == FileId::of(r.fd).ok()).map(|(_, n)| n.clone())))
        .collect()
}

/// The backend's mappings as control-protocol specs, one per region that has a block name.
pub fn mapping_specs(pc: &BackendPostcopy, block_names: &[Option<String>]) -> Result<Vec<MappingSpec>> {
    check_names(pc, block_names)?;
    Ok(pc
        .mappings
        .iter()
        .zip(block_names)
        .filter_map(|(m, name)| {
            name.as_ref().map(|n| MappingSpec {
                client_addr: m.client_addr,
                block: n.clone(),
                offset: m.block_offset,
                len: m.len,
            })
        })
        .collect())
}

/// The backend's mappings as fault-loop entries (block ids of `blocks`), one per named region.
pub fn mapping_entries(
    pc: &BackendPostcopy,
    block_names: &[Option<String>],
    blocks: &RamBlocks,
) -> Result<Vec<MappingEntry>> {
    let mut out = Vec::new();
    for spec in mapping_specs(pc, block_names)? {
        let (id, b) = blocks.named(&spec.block)?;
        b.check_range(spec.offset, spec.len)?;
        out.push(MappingEntry {
            client_addr: spec.client_addr,
            block: id,
            block_offset: spec.offset,
            len: spec.len,
        });
    }
    Ok(out)
}

fn check_names(pc: &BackendPostcopy, block_names: &[Option<String>]) -> Result<()> {
    if block_names.len() != pc.mappings.len() {
        return Err(Error::Invalid(format!(
            "{} block names for {} memory regions: give one (or None) per region, in memory-table order",
            block_names.len(),
            pc.mappings.len()
        )));
    }
    if block_names.iter().all(Option::is_none) {
        return Err(Error::Invalid(
            "no region of the memory table is a broker RAM block: nothing to register".into(),
        ));
    }
    Ok(())
}

/// Register the backend (its uffd, pid and mapping table) as a shared client; returns the
/// broker's client id. Call it before [`crate::vhost_user::postcopy::Handshake::ack`].
pub fn register_backend(
    link: &mut BrokerLink<'_>,
    name: &str,
    pc: &BackendPostcopy,
    block_names: &[Option<String>],
) -> Result<ClientId> {
    let pid = pc.pid.and_then(|p| u32::try_from(p).ok());
    match link {
        BrokerLink::InProcess { handle, blocks } => {
            let entries = mapping_entries(pc, block_names, blocks)?;
            let uffd = pc.uffd.try_clone().ctx(|| format!("dup the uffd of backend {name}"))?;
            let reg =
                Registration { name: name.to_string(), uffd, pid, map: RegistrationMap::Shared(entries) };
            handle.register(reg)
        }
        BrokerLink::Control(client) => {
            let specs = mapping_specs(pc, block_names)?;
            use std::os::fd::AsFd;
            Ok(client.register(name, ClientKind::Shared, pid, &specs, pc.uffd.as_fd())?)
        }
    }
}

/// A backend that went through the postcopy handshake and is registered with the broker.
#[derive(Debug)]
pub struct RegisteredBackend {
    /// Its uffd and mapping table.
    pub postcopy: BackendPostcopy,
    /// The broker's client id.
    pub client: ClientId,
}

/// The whole handshake with registration in the right place: steps 1-5, register with the
/// broker, ack. `block_names` gives, per region, the broker block it is (see
/// [`block_names_by_fd`]); `name` is the client's name in the broker's statistics.
pub fn handshake_and_register(
    conn: &mut BackendConn,
    regions: &[MemRegion<'_>],
    link: &mut BrokerLink<'_>,
    name: &str,
    block_names: &[Option<String>],
) -> Result<RegisteredBackend> {
    let (postcopy, client) =
        postcopy::handshake_with(conn, regions, |pc| register_backend(link, name, pc, block_names))?;
    Ok(RegisteredBackend { postcopy, client })
}

/// Postcopy is over: POSTCOPY_END to the backend (it unregisters and closes its uffd), then the
/// broker drops the client. Both steps are tried; the first error is returned.
pub fn end_and_unregister(conn: &mut BackendConn, link: &mut BrokerLink<'_>, client: ClientId) -> Result<()> {
    let ended = postcopy::end(conn);
    let dropped = match link {
        BrokerLink::InProcess { handle, .. } => handle.unregister(client),
        BrokerLink::Control(c) => c.unregister(client).map_err(Error::from),
    };
    ended.and(dropped)
}
