//! The source's view of guest RAM: named blocks held in memory mappings (copied from bytes or an
//! image file, or mapped from a memfd the caller hands in), each with the shared "sent" bitmap
//! that lets the background stream and the urgent thread send every page once, and the digest
//! of what was sent (see [`crate::migration::digest`]).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::migration::digest::BlockDigest;
use crate::migration::wire::{BlockInfo, BlockTable};
use crate::ram::{AtomicBitmap, Mapping};

/// One block served by the source.
#[derive(Debug)]
pub struct SourceBlock {
    info: BlockInfo,
    map: Mapping,
    sent: AtomicBitmap,
    digest: BlockDigest,
}

fn checked_len(info: &BlockInfo) -> Result<usize> {
    BlockTable::new(vec![info.clone()]).map_err(|e| Error::Invalid(e.to_string()))?;
    usize::try_from(info.size).map_err(|_| Error::Invalid(format!("block '{}' is too large", info.name)))
}

impl SourceBlock {
    /// A block holding a copy of `data` (its length is the block size).
    pub fn from_bytes(name: &str, page_size: u64, data: &[u8]) -> Result<SourceBlock> {
        let info = BlockInfo::new(name, data.len() as u64, page_size);
        let len = checked_len(&info)?;
        let map = Mapping::private(len)?;
        // SAFETY: the fresh private mapping is `len` bytes long, `data` is `len` bytes, and they
        // cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), map.as_ptr(), len) };
        Ok(SourceBlock::new(info, map))
    }

    /// A block over a memfd (or any shared-memory fd) of at least `size` bytes, mapped shared: the
    /// caller may keep changing the memory (report changes with `mark_dirty` before postcopy).
    pub fn from_fd(name: &str, page_size: u64, fd: &OwnedFd, size: u64) -> Result<SourceBlock> {
        let info = BlockInfo::new(name, size, page_size);
        let len = checked_len(&info)?;
        let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(fd))
            .ctx(|| format!("fstat the fd of source block '{name}'"))?;
        if u64::try_from(st.st_size).unwrap_or(0) < size {
            return Err(Error::Invalid(format!(
                "the fd of source block '{name}' holds {} bytes, less than its size {size}",
                st.st_size
            )));
        }
        Ok(SourceBlock::new(info, Mapping::shared(fd.as_fd(), len)?))
    }

    /// A block read from `file` at `file_offset` (a private copy: changes stay in this process).
    pub fn from_file(info: BlockInfo, file: &File, file_offset: u64) -> Result<SourceBlock> {
        let len = checked_len(&info)?;
        let map = Mapping::private(len)?;
        // SAFETY: the mapping is private to this value, `len` bytes long, and not yet shared.
        let buf = unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), len) };
        let mut done = 0;
        while done < len {
            let n = file
                .read_at(&mut buf[done..], file_offset + done as u64)
                .ctx(|| format!("read block '{}' from the image", info.name))?;
            if n == 0 {
                return Err(Error::Invalid(format!(
                    "the image ends inside block '{}' (at file offset {}); is the block list right?",
                    info.name,
                    file_offset + done as u64
                )));
            }
            done += n;
        }
        Ok(SourceBlock::new(info, map))
    }

    fn new(info: BlockInfo, map: Mapping) -> SourceBlock {
        let pages = usize::try_from(info.pages()).unwrap_or(0);
        let digest = BlockDigest::new(info.page_size, info.pages());
        SourceBlock { info, map, sent: AtomicBitmap::new(pages), digest }
    }

    /// Name, size and page size.
    pub fn info(&self) -> &BlockInfo {
        &self.info
    }

    /// The bitmap of pages already sent (set by whoever claims a page for sending).
    pub fn sent(&self) -> &AtomicBitmap {
        &self.sent
    }

    /// The hashes of the pages as they were last sent.
    pub fn digest(&self) -> &BlockDigest {
        &self.digest
    }

    /// The bytes `[offset, offset + len)`, clamped to the block.
    ///
    /// The memory may be changed by another process (a shared memfd): the slice then shows
    /// whatever is there when it is read, which is what a source of a running guest sends; the
    /// pages are re-sent after the caller reports them dirty.
    pub fn bytes(&self, offset: u64, len: u64) -> &[u8] {
        let total = self.map.len();
        let s = usize::try_from(offset).unwrap_or(total).min(total);
        let e = s.saturating_add(usize::try_from(len).unwrap_or(total)).min(total);
        // SAFETY: [s, e) lies inside the live mapping, which lives as long as self; nothing in
        // this process writes it while the slice is used except `invert`, which callers use only
        // before postcopy starts (no sender thread runs then).
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(s), e - s) }
    }

    /// Invert every byte of `[offset, offset + len)` (clamped): the CLI's simulation of a guest
    /// that wrote these pages after precopy sent them.
    pub fn invert(&self, offset: u64, len: u64) {
        let total = self.map.len();
        let s = usize::try_from(offset).unwrap_or(total).min(total);
        let e = s.saturating_add(usize::try_from(len).unwrap_or(total)).min(total);
        // SAFETY: [s, e) lies inside the live mapping; no slice from `bytes` is alive while the
        // CLI dirties pages (before postcopy, on the only thread that touches the memory).
        let buf = unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr().add(s), e - s) };
        for b in buf {
            *b = !*b;
        }
    }
}

/// Every block the source serves, in wire order.
#[derive(Debug)]
pub struct SourceRam {
    blocks: Vec<SourceBlock>,
    table: BlockTable,
}

impl SourceRam {
    /// The blocks (names unique, sizes multiples of their page sizes).
    pub fn new(blocks: Vec<SourceBlock>) -> Result<SourceRam> {
        let table = BlockTable::new(blocks.iter().map(|b| b.info.clone()).collect())
            .map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(SourceRam { blocks, table })
    }

    /// Blocks laid out back to back in the image file at `path`, as `infos` describe them.
    pub fn from_image(path: &Path, infos: Vec<BlockInfo>) -> Result<SourceRam> {
        let file = File::open(path).ctx(|| format!("open image {}", path.display()))?;
        let len = file.metadata().ctx(|| format!("stat image {}", path.display()))?.len();
        let need: u64 = infos.iter().map(|b| b.size).sum();
        if len < need {
            return Err(Error::Invalid(format!(
                "image {} holds {len} bytes but the blocks need {need}; check the --block list",
                path.display()
            )));
        }
        let mut off = 0;
        let mut blocks = Vec::with_capacity(infos.len());
        for info in infos {
            let size = info.size;
            blocks.push(SourceBlock::from_file(info, &file, off)?);
            off += size;
        }
        SourceRam::new(blocks)
    }

    /// The block table announced in Hello.
    pub fn table(&self) -> &BlockTable {
        &self.table
    }

    /// Block `index`.
    pub fn block(&self, index: u32) -> Option<&SourceBlock> {
        self.blocks.get(index as usize)
    }

    /// The blocks in wire order.
    pub fn blocks(&self) -> &[SourceBlock] {
        &self.blocks
    }

    /// Total bytes.
    pub fn total_size(&self) -> u64 {
        self.blocks.iter().map(|b| b.info.size).sum()
    }

    /// Every block's digest of what was sent, in wire order (the `Digests` frame).
    pub fn digests(&self) -> Vec<u64> {
        self.blocks.iter().map(|b| b.digest.fold()).collect()
    }

    /// Whether every page of every block has been sent.
    pub fn all_sent(&self) -> bool {
        self.blocks.iter().all(|b| b.sent.all_set())
    }
}
