//! The frontend's view of guest RAM: a vm-memory [`GuestMemoryMmap`] of shared (memfd,
//! hugetlbfs or tmpfs file) regions, each a named RAM block at a guest physical address,
//! accessed through vm-memory's [`Bytes`] and described to vhost-user backends.
//!
//! A VMM that already has its guest memory as a `GuestMemoryMmap` of shared file-backed regions
//! wraps it with [`GuestRam::from_memory`]; otherwise [`GuestRam::add`] maps a RAM block's fd.
//! Either way the caller reads and writes guest RAM without `unsafe`.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::checksum::Checksum;
use crate::conv::usize_of;
use crate::error::{Error, IoContext, Result};
use crate::ram::{RamBlock, SMALL_PAGE};
use crate::vhost_user::blk::{fnv1a64, FNV_OFFSET};
use crate::vhost_user::frontend::MemRegion;

/// The checksums of one RAM block's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSums {
    /// The block's name.
    pub name: String,
    /// FNV-1a 64 (as `serve --checksums` writes it).
    pub fnv: u64,
    /// The migration checksum (as `--verify-file` writes it).
    pub checksum: u64,
}

/// One named region of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBlock<'a> {
    /// Guest physical address of its first byte.
    pub gpa: u64,
    /// The RAM block's name.
    pub name: &'a str,
    /// Length in bytes.
    pub size: u64,
}

/// Guest RAM made of shared file-backed regions, each a named RAM block placed at a guest
/// physical address. Cloning shares the mappings.
#[derive(Debug, Clone, Default)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    /// (gpa, block name), in address order as the memory's regions.
    names: Vec<(u64, String)>,
}

impl GuestRam {
    /// Empty guest RAM.
    pub fn new() -> GuestRam {
        GuestRam::default()
    }

    /// Guest RAM over a VMM's own memory: every region must be a shared mapping of a file (a
    /// memfd, hugetlbfs or tmpfs file: what vhost-user backends can map), named by `names` in
    /// address order.
    pub fn from_memory(memory: GuestMemoryMmap, names: Vec<String>) -> Result<GuestRam> {
        if names.len() != memory.num_regions() {
            return Err(Error::Invalid(format!(
                "{} names for {} guest memory regions: give one per region, in address order",
                names.len(),
                memory.num_regions()
            )));
        }
        for r in memory.iter() {
            if r.file_offset().is_none() || r.flags() & libc::MAP_SHARED == 0 {
                return Err(Error::Invalid(format!(
                    "the guest memory region at {:#x} is not a shared mapping of a file; vhost-user \
                     backends and the broker can only share memfd, hugetlbfs or tmpfs-backed memory \
                     (map it with MmapRegion::from_file)",
                    r.start_addr().0
                )));
            }
        }
        let names = memory.iter().map(|r| r.start_addr().0).zip(names).collect();
        Ok(GuestRam { memory, names })
    }

    /// Map `block`'s fd at guest physical address `gpa`. The block must be fd-backed (vhost-user
    /// backends map it) and must not overlap another block. The mapping is this `GuestRam`'s own:
    /// during postcopy it must be registered with a userfaultfd before it is touched.
    pub fn add(&mut self, gpa: u64, block: Arc<RamBlock>) -> Result<()> {
        let fd = block.fd().ok_or_else(|| {
            Error::Invalid(format!(
                "RAM block '{}' has no file descriptor; vhost-user backends can only share memfd, hugetlbfs or file blocks",
                block.name()
            ))
        })?;
        self.add_fd(gpa, block.name(), fd, block.size(), block.page_size()).map(|_| ())
    }

    /// Map `size` bytes of the shared memory `fd` (from offset 0, `page_size` pages) at guest
    /// physical address `gpa` as block `name`; returns the mapping's address in this process.
    pub fn add_fd(
        &mut self,
        gpa: u64,
        name: &str,
        fd: BorrowedFd<'_>,
        size: u64,
        page_size: u64,
    ) -> Result<u64> {
        let end = gpa
            .checked_add(size)
            .ok_or_else(|| Error::Invalid(format!("RAM block '{name}' at {gpa:#x} overflows")))?;
        if let Some(o) = self.blocks().find(|b| gpa < b.gpa + b.size && b.gpa < end) {
            return Err(Error::Invalid(format!(
                "RAM block '{name}' at {gpa:#x} overlaps block '{}' at {:#x}",
                o.name, o.gpa
            )));
        }
        let file = File::from(fd.try_clone_to_owned().ctx(|| format!("dup the fd of RAM block '{name}'"))?);
        let have = file.metadata().ctx(|| format!("stat the fd of RAM block '{name}'"))?.len();
        if have < size {
            // Touching the mapping past the file's end would raise SIGBUS.
            return Err(Error::Invalid(format!(
                "the fd of RAM block '{name}' holds {have} bytes, less than its size {size}"
            )));
        }
        let len =
            usize::try_from(size).map_err(|_| Error::Invalid(format!("RAM block '{name}' too large")))?;
        // Huge pages are reserved (for the file, once) when mapped; small pages as they appear.
        let reserve = if page_size > SMALL_PAGE { 0 } else { libc::MAP_NORESERVE };
        let region = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(file, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | reserve)
            .with_hugetlbfs(page_size > SMALL_PAGE)
            .build()
            .map_err(|e| Error::Invalid(format!("map RAM block '{name}' ({size} bytes): {e}")))?;
        let region = GuestRegionMmap::new(region, GuestAddress(gpa))
            .ok_or_else(|| Error::Invalid(format!("RAM block '{name}' at {gpa:#x} overflows")))?;
        let addr = region.as_ptr() as u64;
        self.memory = self
            .memory
            .insert_region(Arc::new(region))
            .map_err(|e| Error::Invalid(format!("place RAM block '{name}' at {gpa:#x}: {e}")))?;
        let pos = self.names.partition_point(|(g, _)| *g < gpa);
        self.names.insert(pos, (gpa, name.to_string()));
        Ok(addr)
    }

    /// The vm-memory guest memory (for the VMM's devices, or anything that takes
    /// `GuestMemory`): reading and writing it needs no `unsafe` ([`Bytes`]).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    fn regions(&self) -> impl Iterator<Item = (&GuestRegionMmap, &str)> {
        self.memory.iter().zip(self.names.iter().map(|(_, n)| n.as_str()))
    }

    /// The regions for SET_MEM_TABLE: one per block, its file and offset, the frontend's own
    /// address.
    pub fn mem_regions(&self) -> Vec<MemRegion<'_>> {
        self.memory
            .iter()
            .filter_map(|r| {
                r.file_offset().map(|f| MemRegion {
                    guest_phys_addr: r.start_addr().0,
                    size: r.len(),
                    fd: f.file().as_fd(),
                    mmap_offset: f.start(),
                    user_addr: r.as_ptr() as u64,
                })
            })
            .collect()
    }

    /// The blocks, in guest address order (the order of [`GuestRam::mem_regions`]).
    pub fn blocks(&self) -> impl Iterator<Item = GuestBlock<'_>> {
        self.regions().map(|(r, name)| GuestBlock { gpa: r.start_addr().0, name, size: r.len() })
    }

    /// The frontend's address of `len` bytes at `gpa`, checked to lie inside one block.
    pub fn host_addr(&self, gpa: u64, len: u64) -> Result<u64> {
        let (r, name) = self
            .regions()
            .find(|(r, _)| gpa >= r.start_addr().0 && gpa - r.start_addr().0 < r.len())
            .ok_or(Error::UnknownAddress(gpa))?;
        let off = gpa - r.start_addr().0;
        if len > r.len() - off {
            return Err(Error::Invalid(format!(
                "guest range {gpa:#x}+{len:#x} crosses the end of RAM block '{name}'"
            )));
        }
        Ok(r.as_ptr() as u64 + off)
    }

    /// Read every page of each block placed below guest address `limit` through this mapping
    /// (missing pages fault and are served) and return the blocks' checksums.
    pub fn read_all_sums(&self, limit: u64) -> Result<Vec<BlockSums>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        let blocks: Vec<(u64, String, u64)> =
            self.blocks().filter(|b| b.gpa < limit).map(|b| (b.gpa, b.name.to_string(), b.size)).collect();
        for (gpa, name, size) in blocks {
            let (mut fnv, mut sum) = (FNV_OFFSET, Checksum::new());
            let mut off = 0;
            while off < size {
                let n = usize_of((size - off).min(buf.len() as u64));
                self.read(gpa + off, &mut buf[..n])?;
                fnv = fnv1a64(fnv, &buf[..n]);
                sum.update(&buf[..n]);
                off += n as u64;
            }
            out.push(BlockSums { name, fnv, checksum: sum.finish() });
        }
        Ok(out)
    }

    fn access(&self, gpa: u64, len: usize, what: &str, e: vm_memory::GuestMemoryError) -> Error {
        Error::Invalid(format!("{what} {len} bytes of guest RAM at {gpa:#x}: {e}"))
    }

    /// Copy `data` into guest RAM at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.host_addr(gpa, data.len() as u64)?;
        self.memory.write_slice(data, GuestAddress(gpa)).map_err(|e| self.access(gpa, data.len(), "write", e))
    }

    /// Copy guest RAM at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.host_addr(gpa, buf.len() as u64)?;
        let len = buf.len();
        self.memory.read_slice(buf, GuestAddress(gpa)).map_err(|e| self.access(gpa, len, "read", e))
    }

    /// Fill `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<()> {
        self.host_addr(gpa, len)?;
        let chunk = vec![byte; usize_of(len.min(1 << 16))];
        let mut off = 0;
        while off < len {
            let n = usize_of((len - off).min(chunk.len() as u64));
            self.write(gpa + off, &chunk[..n])?;
            off += n as u64;
        }
        Ok(())
    }

    fn check_u16(&self, gpa: u64) -> Result<()> {
        if gpa % 2 != 0 {
            return Err(Error::Invalid(format!("guest address {gpa:#x} is not 2-byte aligned")));
        }
        self.host_addr(gpa, 2).map(|_| ())
    }

    /// Load the little-endian u16 at `gpa` (2-byte aligned) with acquire ordering: a location
    /// shared with the device (a ring index).
    pub fn load_u16(&self, gpa: u64) -> Result<u16> {
        self.check_u16(gpa)?;
        let v: u16 = self
            .memory
            .load(GuestAddress(gpa), Ordering::Acquire)
            .map_err(|e| self.access(gpa, 2, "load", e))?;
        Ok(u16::from_le(v))
    }

    /// Store the little-endian u16 at `gpa` with release ordering (publishes earlier writes).
    pub fn store_u16(&self, gpa: u64, v: u16) -> Result<()> {
        self.check_u16(gpa)?;
        self.memory
            .store(v.to_le(), GuestAddress(gpa), Ordering::Release)
            .map_err(|e| self.access(gpa, 2, "store", e))
    }
}
