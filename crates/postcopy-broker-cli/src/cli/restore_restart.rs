//! The lazy restore (`serve --image`) across the broker's own death: what its parked record
//! holds beside the fds ([`RestoreRecord`]: the blocks, the image's identity, the daemon-mode
//! vhost-user backends), which fds it parks ([`parkable_blocks`], [`backend_fd_name`]), and the
//! rebuild of the blocks at the next start ([`rebuild_blocks`]: the parked fds, their received
//! bitmaps from page-cache residency). `crate::cli::serve` drives both; `crate::cli::park` keeps
//! the record.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fdstore::Parked;
use postcopy_broker::error::{Error, Result};
use postcopy_broker::fault::park::Restart;
use postcopy_broker::migration::destination::{block_fd_name, ledger_fd_name};
use postcopy_broker::ram::{residency, RamBlock, RamBlocks};
use postcopy_broker::vhost_user::daemon::ParkedBackend;

/// Version of [`RestoreRecord`]'s layout.
pub const RESTORE_RECORD_VERSION: u32 = 1;

/// The image file as the first broker opened it: a restarted broker re-opens it by path and
/// refuses a different file (pages already placed came from this one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIdentity {
    /// The path given with `--image`.
    pub path: PathBuf,
    /// Device and inode.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

impl ImageIdentity {
    /// The identity of the file at `path` now.
    pub fn of(path: &Path) -> Result<ImageIdentity> {
        let m = std::fs::metadata(path)
            .map_err(|e| Error::io(format!("stat the image {}", path.display()), e))?;
        Ok(ImageIdentity {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec()),
        })
    }

    /// Refuse an image at `path` that is not the recorded file, unchanged.
    pub fn check(&self, path: &Path) -> Result<()> {
        let now = ImageIdentity::of(path)?;
        if now.dev != self.dev
            || now.ino != self.ino
            || now.size != self.size
            || now.mtime_ns != self.mtime_ns
        {
            return Err(Error::Invalid(format!(
                "the image {} is not the file the parked restore read ({} then: dev {} ino {} size {} mtime {} ns; now dev {} ino {} size {} mtime {} ns): pages already placed came from that file; give it again, or empty the fd store to start over",
                path.display(),
                self.path.display(),
                self.dev,
                self.ino,
                self.size,
                self.mtime_ns,
                now.dev,
                now.ino,
                now.size,
                now.mtime_ns
            )));
        }
        Ok(())
    }
}

/// What a restarted `serve --image` needs besides the parked fds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreRecord {
    /// [`RESTORE_RECORD_VERSION`].
    pub version: u32,
    /// The blocks in `--block` order: (name, size, page size).
    pub blocks: Vec<(String, u64, u64)>,
    /// The image.
    pub image: Option<ImageIdentity>,
    /// The daemon-mode vhost-user backends, in `--vhost-user-backend` order (their
    /// connections are parked as [`backend_fd_name`]).
    #[serde(default)]
    pub backends: Vec<ParkedBackend>,
    /// Restarts before this one.
    #[serde(default)]
    pub restarts: Vec<Restart>,
}

impl RestoreRecord {
    /// Refuse to rebuild under options that describe another restore.
    pub fn check_options(&self, blocks: &[(String, u64, u64)], image: Option<&Path>) -> Result<()> {
        if self.version != RESTORE_RECORD_VERSION {
            return Err(Error::Invalid(format!(
                "the parked restore record has version {}, this broker reads {RESTORE_RECORD_VERSION}; empty the fd store to start over",
                self.version
            )));
        }
        if self.blocks != blocks {
            return Err(Error::Invalid(format!(
                "the parked restore has the blocks {:?}, this start gives {blocks:?}: start with the same --block options (or empty the fd store to start over)",
                self.blocks
            )));
        }
        match (&self.image, image) {
            (Some(id), Some(p)) => id.check(p),
            (None, None) => Ok(()),
            _ => Err(Error::Invalid(
                "the parked restore and this start disagree on --image: give the same options".into(),
            )),
        }
    }
}

/// The name under which the connection to backend `i` is parked.
pub fn backend_fd_name(i: usize) -> String {
    format!("vhost.{i}")
}

/// Every fd of the blocks to park, by name (each block's memfd or hugetlbfs fd and its ledger,
/// in order).
pub fn parkable_blocks(blocks: &RamBlocks) -> Vec<(String, BorrowedFd<'_>)> {
    let mut out = Vec::new();
    for (i, (_, b)) in blocks.iter().enumerate() {
        out.extend(b.fd().map(|fd| (block_fd_name(i), fd)));
        out.extend(b.ledger_fd().map(|fd| (ledger_fd_name(i), fd)));
    }
    out
}

/// The blocks of the parked restore from their fds and ledgers (the received and removed bits
/// as the dead broker left them), each page present in the page cache marked received too.
/// Returns them and how many pages are there.
pub fn rebuild_blocks(record: &RestoreRecord, parked: &Parked) -> Result<(RamBlocks, u64)> {
    let mut ram = RamBlocks::new();
    let mut present = 0;
    for (i, (name, size, ps)) in record.blocks.iter().enumerate() {
        let fd = parked.take(&block_fd_name(i)).ok_or_else(|| {
            Error::Invalid(format!(
                "the parked restore lacks the fd of block '{name}': its placed pages are lost; empty the fd store to start over"
            ))
        })?;
        let b = RamBlock::from_parked(name, fd, parked.take(&ledger_fd_name(i)), *size, *ps)?;
        residency::mark_present(&b)?;
        present += b.received().count_ones() as u64;
        ram.add(b)?;
    }
    Ok((ram, present))
}

/// The parked backends with their connections (a backend whose connection is missing is left
/// out, with an error: it cannot be told POSTCOPY_END).
pub fn take_backends(record: &RestoreRecord, parked: &Parked) -> Vec<(ParkedBackend, OwnedFd)> {
    let mut out = Vec::new();
    for (i, b) in record.backends.iter().enumerate() {
        match parked.take(&backend_fd_name(i)) {
            Some(fd) => out.push((b.clone(), fd)),
            None => log::error!(
                "the connection to vhost-user backend {} is not parked: it is served as a client but hears no POSTCOPY_END",
                b.socket.display()
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_that_changed_is_refused() {
        let p = std::env::temp_dir().join(format!("pcb-image-id-{}", std::process::id()));
        std::fs::write(&p, [1u8; 4096]).unwrap();
        let id = ImageIdentity::of(&p).unwrap();
        id.check(&p).unwrap();
        std::fs::write(&p, [1u8; 8192]).unwrap();
        let e = id.check(&p).unwrap_err().to_string();
        assert!(e.contains("not the file"), "{e}");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn other_blocks_are_refused() {
        let r = RestoreRecord {
            version: RESTORE_RECORD_VERSION,
            blocks: vec![("ram".into(), 4096, 4096)],
            image: None,
            backends: Vec::new(),
            restarts: Vec::new(),
        };
        r.check_options(&[("ram".into(), 4096, 4096)], None).unwrap();
        assert!(r.check_options(&[("ram".into(), 8192, 4096)], None).is_err());
        assert!(r.check_options(&[("ram".into(), 4096, 4096)], Some(Path::new("/dev/null"))).is_err());
    }
}
