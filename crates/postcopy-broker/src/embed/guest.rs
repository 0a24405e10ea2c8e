//! The VMM's guest memory of an embedded broker (feature `vhost-user`): the broker's blocks made
//! from the VMM's own `GuestMemoryMmap`, or the broker's blocks mapped into a new one; either way
//! that mapping is registered with a userfaultfd of its own as the broker's client, so the VMM
//! and its devices read and write guest RAM through vm-memory (no `unsafe`) while pages are still
//! missing: a missing page faults, is fetched, placed and the VMM's thread woken.

use std::os::fd::AsFd;

use vm_memory::GuestMemoryMmap;

use crate::client::MappingEntry;
use crate::client_id::ClientId;
use crate::embed::broker::EmbeddedBroker;
use crate::embed::error::{EmbedError, EmbedResult};
use crate::error::{Error, IoContext, Result};
use crate::fault::{BrokerHandle, Registration, RegistrationMap};
use crate::ram::{shared_memory_page_size, RamBlock, RamBlocks};
use crate::uffd::{feature, Uffd};
use crate::vhost_user::procmaps::FileId;
use crate::vhost_user::register::block_names_by_fd;
use crate::vhost_user::GuestRam;

/// The VMM's mapping of guest RAM and its registration with the broker.
#[derive(Debug)]
pub(crate) struct VmmMapping {
    pub(crate) ram: GuestRam,
    pub(crate) client: ClientId,
    /// Open while postcopy runs: closed, the kernel would fill the mapping's missing pages with
    /// zeros. Released when the broker ends.
    pub(crate) uffd: Option<Uffd>,
}

/// One block per region of the VMM's memory (each the whole file it maps), in address order,
/// and the VMM's [`GuestRam`] over that memory.
pub(crate) fn blocks_of_memory(
    memory: GuestMemoryMmap,
    names: Vec<String>,
) -> EmbedResult<(RamBlocks, GuestRam)> {
    let config = |e: Error| EmbedError::Config(e.to_string());
    let ram = GuestRam::from_memory(memory, names).map_err(config)?;
    let mut blocks = RamBlocks::new();
    let mut files = Vec::new();
    for (r, b) in ram.mem_regions().iter().zip(ram.blocks()) {
        if r.mmap_offset != 0 {
            return Err(EmbedError::Config(format!(
                "guest memory region '{}' at {:#x} maps its file from offset {:#x}: the broker makes one \
                 RAM block of each region's whole file; map each region from offset 0 of a file of its own",
                b.name, b.gpa, r.mmap_offset
            )));
        }
        let id = FileId::of(r.fd).map_err(config)?;
        if files.contains(&id) {
            return Err(EmbedError::Config(format!(
                "guest memory region '{}' at {:#x} maps the same file as an earlier region; give each \
                 region a file (memfd) of its own",
                b.name, b.gpa
            )));
        }
        files.push(id);
        let step = "make RAM blocks of the VMM's guest memory";
        let fd =
            r.fd.try_clone_to_owned().ctx(|| format!("dup the fd of region '{}'", b.name)).map_err(config)?;
        let page_size = shared_memory_page_size(r.fd).map_err(config)?;
        let block = RamBlock::from_fd(b.name, fd, b.size, page_size)
            .map_err(|source| EmbedError::Start { step, source })?;
        blocks.add(block).map_err(config)?;
    }
    Ok((blocks, ram))
}

/// The broker's blocks mapped back to back from guest address 0 (the VMM gave blocks, not its
/// memory).
fn map_blocks(blocks: &RamBlocks) -> Result<GuestRam> {
    let mut ram = GuestRam::new();
    let mut gpa = 0;
    for (_, b) in blocks.iter() {
        let fd = b.fd().ok_or_else(|| {
            Error::Invalid(format!(
                "RAM block '{}' is private memory, which the VMM's guest memory and vhost-user backends \
                 cannot share; make it with RamBlock::memfd, hugetlb or file",
                b.name()
            ))
        })?;
        ram.add_fd(gpa, b.name(), fd, b.size(), b.page_size())?;
        gpa += b.size();
    }
    Ok(ram)
}

/// Register `ram` (every region one of `blocks`) with a new userfaultfd, and that with the
/// running fault loop as client `name`. Nothing may touch `ram` before this returns.
pub(crate) fn register_vmm(
    handle: &BrokerHandle,
    blocks: &RamBlocks,
    ram: Option<GuestRam>,
    name: &str,
) -> Result<VmmMapping> {
    let ram = match ram {
        Some(r) => r,
        None => map_blocks(blocks)?,
    };
    let regions = ram.mem_regions();
    let names = block_names_by_fd(&regions, blocks)?;
    let want = blocks.iter().fold(0, |w, (_, b)| {
        w | if b.is_hugetlb() { feature::MISSING_HUGETLBFS } else { feature::MISSING_SHMEM }
    });
    let uffd = Uffd::open(want).map_err(|e| {
        Error::UffdUnavailable(format!(
            "a userfaultfd for the VMM's guest memory: {e}; run `postcopy-broker probe`"
        ))
    })?;
    let mut entries = Vec::with_capacity(regions.len());
    for (r, n) in regions.iter().zip(&names) {
        let n = n.as_deref().ok_or_else(|| {
            Error::Invalid(format!(
                "guest memory at {:#x} is none of the broker's RAM blocks",
                r.guest_phys_addr
            ))
        })?;
        let (block, _) = blocks.named(n)?;
        uffd.register_missing(r.user_addr, r.size)
            .ctx(|| format!("register the VMM's mapping of block '{n}' with its userfaultfd"))?;
        entries.push(MappingEntry {
            client_addr: r.user_addr,
            block,
            block_offset: r.mmap_offset,
            len: r.size,
        });
    }
    let dup = uffd.as_fd().try_clone_to_owned().ctx(|| "dup the VMM's userfaultfd".into())?;
    let client = handle.register(Registration {
        name: name.to_string(),
        uffd: dup,
        pid: None,
        map: RegistrationMap::Shared(entries),
    })?;
    drop(regions);
    log::info!("the VMM's guest memory is client {client} '{name}' ({} region(s))", names.len());
    Ok(VmmMapping { ram, client, uffd: Some(uffd) })
}

impl EmbeddedBroker {
    /// The VMM's guest memory (cloning it shares the mappings): read and write it, hand
    /// [`GuestRam::memory`] to devices that take vm-memory's `GuestMemory`. Missing pages fault
    /// and are served while the broker runs; after [`EmbeddedBroker::finish`] every page is there.
    pub fn guest_ram(&self) -> &GuestRam {
        &self.vmm.ram
    }

    /// The vm-memory view of [`EmbeddedBroker::guest_ram`].
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        self.vmm.ram.memory()
    }

    /// The client id of the VMM's guest memory mapping (in the status report).
    pub fn vmm_client(&self) -> ClientId {
        self.vmm.client
    }
}
