//! Arrays of atomic 64-bit words on the heap or in a shared mapping of a memfd. The mapped kind
//! is what outlives the broker: a block's received and removed bitmaps (`ram::ledger`) and the
//! digest table live in memfds that a broker under a service manager parks in its fd store, so
//! the one restarted after its death finds them as they were.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::Mapping;
use crate::error::{Error, Result};

/// `n` atomic words, on the heap or at word `first` of a shared mapping.
#[derive(Debug)]
pub enum AtomicWords {
    /// Words of this process only.
    Heap(Box<[AtomicU64]>),
    /// Words in a shared mapping (of a memfd another process may hold too).
    Mapped {
        /// The mapping.
        map: Arc<Mapping>,
        /// Index of the first word in the mapping.
        first: usize,
        /// Number of words.
        n: usize,
    },
}

impl AtomicWords {
    /// `n` zero words on the heap.
    pub fn heap(n: usize) -> AtomicWords {
        AtomicWords::Heap((0..n).map(|_| AtomicU64::new(0)).collect())
    }

    /// Words `[first, first + n)` of `map`, which must hold them.
    pub fn mapped(map: Arc<Mapping>, first: usize, n: usize) -> Result<AtomicWords> {
        let end = first.checked_add(n).and_then(|e| e.checked_mul(8));
        if end.is_none_or(|e| e > map.len()) {
            return Err(Error::Invalid(format!(
                "words {first}..+{n} do not fit a shared mapping of {} bytes",
                map.len()
            )));
        }
        Ok(AtomicWords::Mapped { map, first, n })
    }

    /// The words.
    #[inline]
    pub fn as_slice(&self) -> &[AtomicU64] {
        match self {
            AtomicWords::Heap(v) => v,
            // SAFETY: the mapping is page aligned (so aligned for u64), holds `first + n` words
            // (checked in `mapped`), lives as long as `map`, and is only ever accessed through
            // atomics, by this process and by any other that maps the same memfd.
            AtomicWords::Mapped { map, first, n } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().cast::<AtomicU64>().add(*first), *n)
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn mapped_words_are_the_memfds_bytes() {
        let fd =
            crate::ram::new_memfd("words-test", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC, 4096).unwrap();
        let map = Arc::new(Mapping::shared(std::os::fd::AsFd::as_fd(&fd), 4096).unwrap());
        let w = AtomicWords::mapped(Arc::clone(&map), 3, 2).unwrap();
        w.as_slice()[1].store(0xdead_beef, Ordering::Release);
        let again = Mapping::shared(std::os::fd::AsFd::as_fd(&fd), 4096).unwrap();
        // SAFETY: word 4 of a 4096-byte mapping, read atomically.
        let seen = unsafe { (*again.as_ptr().cast::<AtomicU64>().add(4)).load(Ordering::Acquire) };
        assert_eq!(seen, 0xdead_beef);
        assert!(AtomicWords::mapped(map, 511, 2).is_err());
        assert_eq!(AtomicWords::heap(3).as_slice().len(), 3);
    }
}
