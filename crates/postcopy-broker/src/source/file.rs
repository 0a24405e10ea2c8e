//! A page source backed by an image file (a snapshot): the blocks are laid out one after the
//! other in block order. Used for lazy restore (read with pread), and for private (Firecracker)
//! clients, whose regions name file offsets directly and whose pages the kernel copies straight
//! from a read-only mapping of the file ([`ImageMap`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::ram::RamBlocks;
use crate::source::image_map::ImageMap;
use crate::source::{deliver_runs, PageRequest, PageSink, PageSource};

/// An image file read with pread, or mapped for private clients.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
    /// The whole file, mapped read-only (private clients only).
    map: Option<ImageMap>,
    /// (file offset, size, page size) of each block.
    layout: Vec<(u64, u64, u64)>,
    buf: Vec<u8>,
}

impl FileSource {
    /// Open `path` as an image of `blocks` laid out back to back. The file must be large enough.
    pub fn open(path: &Path, blocks: &RamBlocks) -> Result<FileSource> {
        let mut s = Self::open_file(path)?;
        let mut off = 0;
        for (_, b) in blocks.iter() {
            s.layout.push((off, b.size(), b.page_size()));
            off += b.size();
        }
        if off > s.len {
            return Err(Error::Invalid(format!(
                "image {} holds {} bytes but the RAM blocks need {off}; is it the right image?",
                path.display(),
                s.len
            )));
        }
        Ok(s)
    }

    /// Open `path` without a block layout, for private clients (which name file offsets), and
    /// map it read-only. Its length now bounds every region a client may register; the file
    /// stays open, and it must not shrink while it is served (a page past a new end fails the
    /// client that faults there, see [`ImageMap`]).
    pub fn open_raw(path: &Path) -> Result<FileSource> {
        let mut s = Self::open_file(path)?;
        if s.len > 0 {
            s.map = Some(
                ImageMap::new(&s.file, s.len)
                    .map_err(|e| Error::Invalid(format!("image {}: {e}", path.display())))?,
            );
        }
        Ok(s)
    }

    fn open_file(path: &Path) -> Result<FileSource> {
        let file = File::open(path).ctx(|| format!("open image {}", path.display()))?;
        let len = file.metadata().ctx(|| format!("stat image {}", path.display()))?.len();
        Ok(FileSource { file, len, map: None, layout: Vec::new(), buf: Vec::new() })
    }

    /// The image's read-only mapping, for UFFDIO_COPY to copy from (None unless opened with
    /// [`FileSource::open_raw`], or for an empty file). Only the kernel may read it.
    pub fn image_map(&self) -> Option<&ImageMap> {
        self.map.as_ref()
    }

    /// Bytes in the file.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Read `buf.len()` bytes at `offset` (short files read as zero past their end).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .file
                .read_at(&mut buf[done..], offset + done as u64)
                .ctx(|| format!("read image at {:#x}", offset + done as u64))?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }
}

impl PageSource for FileSource {
    fn request(&mut self, req: PageRequest, sink: &mut dyn PageSink) -> Result<()> {
        let &(base, size, ps) =
            self.layout.get(req.block).ok_or_else(|| Error::UnknownBlock(format!("#{}", req.block)))?;
        if req.offset.checked_add(req.len).is_none_or(|e| e > size) {
            return Err(Error::Invalid(format!(
                "request {:#x}+{:#x} outside block #{}",
                req.offset, req.len, req.block
            )));
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(usize::try_from(req.len).unwrap_or(0), 0);
        let r = self
            .read_at(base + req.offset, &mut buf)
            .and_then(|()| deliver_runs(sink, req.block, req.offset, &buf, ps, req.urgency));
        self.buf = buf;
        r
    }
}
