//! A block's ledger: its received and removed bitmaps kept in a memfd of their own instead of
//! the heap, so that they outlive the broker. A broker under a service manager parks the memfd
//! beside the block's (`ledger.N`); the one restarted after its death maps it again and knows,
//! besides what page-cache residency tells ([`super::residency`]):
//!
//! - pages that arrived and were removed afterwards (a client's MADV_REMOVE punched a hole):
//!   still received, so they fault in as zeros instead of being fetched again as source data;
//! - pages removed before they arrived: still marked, so they are placed as zeros when the
//!   source sends them.
//!
//! A received bit is set after its page was placed, so the ledger never says received for a
//! page that is not (or was not) complete; a death between a placement and its bit is what the
//! residency rebuild adds. Layout: a magic word, the page count, the received words, the
//! removed words.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nix::sys::memfd::MemFdCreateFlag;

use super::bitmap::AtomicBitmap;
use super::block::new_memfd;
use super::words::AtomicWords;
use super::Mapping;
use crate::error::{Error, IoContext, Result};

/// "PCBLEDG1", little endian.
const MAGIC: u64 = u64::from_le_bytes(*b"PCBLEDG1");
/// Words before the bitmaps.
const HEADER_WORDS: usize = 2;

/// The bitmaps of a block in their memfd.
#[derive(Debug)]
pub(crate) struct Ledger {
    pub fd: OwnedFd,
    pub received: AtomicBitmap,
    pub removed: AtomicBitmap,
}

fn bytes_for(pages: usize) -> u64 {
    ((HEADER_WORDS + 2 * pages.div_ceil(64)) * 8) as u64
}

impl Ledger {
    /// The ledger of a block `name` of `pages` pages: a new one (all clear), or `parked`, the
    /// memfd of the same block that a broker before this one kept (checked to be one).
    pub fn open(name: &str, pages: usize, parked: Option<OwnedFd>) -> Result<Ledger> {
        let bytes = bytes_for(pages);
        let fresh = parked.is_none();
        let fd = match parked {
            Some(fd) => {
                let len = nix::sys::stat::fstat(fd.as_raw_fd())
                    .ctx(|| format!("inspect the parked ledger of block '{name}'"))?
                    .st_size;
                if u64::try_from(len).unwrap_or(0) < bytes {
                    return Err(Error::Invalid(format!(
                        "the parked ledger of block '{name}' holds {len} bytes, {pages} pages need {bytes}: it belongs to another block"
                    )));
                }
                fd
            }
            None => new_memfd(&format!("pcb-ledger:{name}"), MemFdCreateFlag::MFD_CLOEXEC, bytes)?,
        };
        let map = Arc::new(Mapping::shared(fd.as_fd(), crate::conv::usize_of(bytes))?);
        let words = pages.div_ceil(64);
        let header = AtomicWords::mapped(Arc::clone(&map), 0, HEADER_WORDS)?;
        let h = header.as_slice();
        if fresh {
            h[1].store(pages as u64, Ordering::Release);
            h[0].store(MAGIC, Ordering::Release);
        } else if h[0].load(Ordering::Acquire) != MAGIC || h[1].load(Ordering::Acquire) != pages as u64 {
            return Err(Error::Invalid(format!(
                "the parked ledger of block '{name}' is not the ledger of a {pages}-page block"
            )));
        }
        let received = AtomicWords::mapped(Arc::clone(&map), HEADER_WORDS, words)?;
        let removed = AtomicWords::mapped(map, HEADER_WORDS + words, words)?;
        Ok(Ledger {
            fd,
            received: AtomicBitmap::in_words(received, pages)?,
            removed: AtomicBitmap::in_words(removed, pages)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_ledger_keeps_both_bitmaps() {
        let l = Ledger::open("b", 200, None).unwrap();
        l.received.set_range(3, 70);
        l.removed.set(150);
        let again = Ledger::open("b", 200, Some(l.fd.try_clone().unwrap())).unwrap();
        assert_eq!(again.received.count_ones(), 70);
        assert!(again.received.test(3) && again.received.test(72) && !again.received.test(73));
        assert!(again.removed.test(150));
        assert_eq!(again.removed.count_ones(), 1);
    }

    #[test]
    fn a_ledger_of_another_block_is_refused() {
        let l = Ledger::open("b", 200, None).unwrap();
        assert!(Ledger::open("b", 100, Some(l.fd.try_clone().unwrap())).is_err());
        assert!(Ledger::open("b", 9000, Some(l.fd.try_clone().unwrap())).is_err());
        let other = new_memfd("x", MemFdCreateFlag::MFD_CLOEXEC, 4096).unwrap();
        assert!(Ledger::open("b", 200, Some(other)).is_err());
    }
}
