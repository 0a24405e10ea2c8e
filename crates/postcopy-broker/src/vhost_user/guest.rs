//! The frontend's view of guest RAM: RAM blocks placed at guest physical addresses, accessed
//! through the frontend's own shared mappings, and described to vhost-user backends.

use crate::conv::usize_of;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use crate::checksum::checksum;
use crate::error::{Error, Result};
use crate::ram::RamBlock;
use crate::vhost_user::blk::{fnv1a64, FNV_OFFSET};
use crate::vhost_user::frontend::MemRegion;

/// One RAM block at a guest physical address.
#[derive(Debug, Clone)]
struct Slot {
    gpa: u64,
    block: Arc<RamBlock>,
}

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

/// Guest RAM made of fd-backed RAM blocks, each placed at a guest physical address.
#[derive(Debug, Clone, Default)]
pub struct GuestRam {
    slots: Vec<Slot>,
}

impl GuestRam {
    /// Empty guest RAM.
    pub fn new() -> GuestRam {
        GuestRam::default()
    }

    /// Place `block` at guest physical address `gpa`. The block must be fd-backed (vhost-user
    /// backends map it) and must not overlap another block.
    pub fn add(&mut self, gpa: u64, block: Arc<RamBlock>) -> Result<()> {
        if block.fd().is_none() {
            return Err(Error::Invalid(format!(
                "RAM block '{}' has no file descriptor; vhost-user backends can only share memfd, hugetlbfs or file blocks",
                block.name()
            )));
        }
        let end = gpa
            .checked_add(block.size())
            .ok_or_else(|| Error::Invalid(format!("RAM block '{}' at {gpa:#x} overflows", block.name())))?;
        if let Some(o) = self.slots.iter().find(|s| gpa < s.gpa + s.block.size() && s.gpa < end) {
            return Err(Error::Invalid(format!(
                "RAM block '{}' at {gpa:#x} overlaps block '{}' at {:#x}",
                block.name(),
                o.block.name(),
                o.gpa
            )));
        }
        self.slots.push(Slot { gpa, block });
        Ok(())
    }

    /// The regions for SET_MEM_TABLE: one per block, mmap offset 0, the frontend's own address.
    pub fn mem_regions(&self) -> Vec<MemRegion<'_>> {
        self.slots
            .iter()
            .filter_map(|s| {
                s.block.fd().map(|fd| MemRegion {
                    guest_phys_addr: s.gpa,
                    size: s.block.size(),
                    fd,
                    mmap_offset: 0,
                    user_addr: s.block.host_addr(),
                })
            })
            .collect()
    }

    /// The blocks and their guest physical addresses.
    pub fn blocks(&self) -> impl Iterator<Item = (u64, &Arc<RamBlock>)> {
        self.slots.iter().map(|s| (s.gpa, &s.block))
    }

    /// The frontend's address of `len` bytes at `gpa`, checked to lie inside one block.
    pub fn host_addr(&self, gpa: u64, len: u64) -> Result<u64> {
        let slot = self
            .slots
            .iter()
            .find(|s| gpa >= s.gpa && gpa - s.gpa < s.block.size())
            .ok_or(Error::UnknownAddress(gpa))?;
        let off = gpa - slot.gpa;
        if len > slot.block.size() - off {
            return Err(Error::Invalid(format!(
                "guest range {gpa:#x}+{len:#x} crosses the end of RAM block '{}'",
                slot.block.name()
            )));
        }
        Ok(slot.block.host_addr() + off)
    }

    /// Read every page of each block placed below guest address `limit` through this mapping
    /// (missing pages fault and are served) and return the blocks' checksums.
    pub fn read_all_sums(&self, limit: u64) -> Result<Vec<BlockSums>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        for s in self.slots.iter().filter(|s| s.gpa < limit) {
            let size = s.block.size();
            let mut fnv = FNV_OFFSET;
            let mut off = 0;
            while off < size {
                let n = usize_of((size - off).min(buf.len() as u64));
                self.read(s.gpa + off, &mut buf[..n])?;
                fnv = fnv1a64(fnv, &buf[..n]);
                off += n as u64;
            }
            // SAFETY: every page has been read once, so the whole block can be looked at as one
            // slice; the mapping is live for as long as `self` holds the Arc, `size` bytes long,
            // and only read here. A device may write it concurrently, which is as racy as any
            // guest memory and cannot break a byte slice read.
            let all = unsafe { std::slice::from_raw_parts(s.block.host_ptr(), usize_of(size)) };
            out.push(BlockSums { name: s.block.name().to_string(), fnv, checksum: checksum(all) });
        }
        Ok(out)
    }

    /// Copy `data` into guest RAM at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let host = self.host_addr(gpa, data.len() as u64)?;
        // SAFETY: `host..host+len` lies inside a live shared mapping owned by a RamBlock this GuestRam
        // holds an Arc to; guest RAM is plain bytes shared with devices, never a Rust object.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host as *mut u8, data.len()) };
        Ok(())
    }

    /// Copy guest RAM at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let host = self.host_addr(gpa, buf.len() as u64)?;
        // SAFETY: as in `write`; the source range is inside a live mapping.
        unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Fill `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<()> {
        let host = self.host_addr(gpa, len)?;
        // SAFETY: as in `write`.
        unsafe { std::ptr::write_bytes(host as *mut u8, byte, usize_of(len)) };
        Ok(())
    }

    /// The u16 at `gpa` (2-byte aligned) as an atomic shared with the device.
    pub(crate) fn atomic_u16(&self, gpa: u64) -> Result<&AtomicU16> {
        if gpa % 2 != 0 {
            return Err(Error::Invalid(format!("guest address {gpa:#x} is not 2-byte aligned")));
        }
        let host = self.host_addr(gpa, 2)?;
        // SAFETY: aligned, inside a live mapping that outlives `&self` (the Arc'd block), and the
        // location is only accessed atomically by both sides of the virtqueue.
        Ok(unsafe { AtomicU16::from_ptr(host as *mut u16) })
    }

    /// Load the little-endian u16 at `gpa` with acquire ordering.
    pub fn load_u16(&self, gpa: u64) -> Result<u16> {
        Ok(u16::from_le(self.atomic_u16(gpa)?.load(Ordering::Acquire)))
    }

    /// Store the little-endian u16 at `gpa` with release ordering (publishes earlier writes).
    pub fn store_u16(&self, gpa: u64, v: u16) -> Result<()> {
        self.atomic_u16(gpa)?.store(v.to_le(), Ordering::Release);
        Ok(())
    }
}
