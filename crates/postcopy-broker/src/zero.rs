//! Zero-page detection: [`is_zero`] (16 bytes at a time, no `unsafe`) and
//! [`split_zero_runs`], which cuts a run of pages into alternating data and zero runs so zero pages
//! travel as ZeroRun frames instead of bytes.

/// Whether every byte of `page` is zero.
///
/// Looks at the first cache line alone first (a data page almost always shows itself there, and
/// a page not yet in cache then costs one miss instead of four), then reads 256-byte blocks as
/// sixteen `u128` words ORed together (which the compiler turns into vector instructions) and
/// stops at the first block that is not zero.
pub fn is_zero(page: &[u8]) -> bool {
    if page.len() >= 64 && !or_zero(&page[..64]) {
        return false;
    }
    let mut blocks = page.chunks_exact(256);
    for block in &mut blocks {
        if !or_zero(block) {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Whether `bytes` (a multiple of 16 long) is all zero, ORing 16-byte words.
fn or_zero(bytes: &[u8]) -> bool {
    let mut acc = 0u128;
    for w in bytes.chunks_exact(16) {
        let mut b = [0u8; 16];
        b.copy_from_slice(w);
        acc |= u128::from_ne_bytes(b);
    }
    acc == 0
}

/// A piece of a page run: `len` bytes at `offset` (relative to the run) that are all zero pages or
/// all data pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Offset from the start of the run, a multiple of the page size.
    pub offset: usize,
    /// Length, a multiple of the page size (the last piece may be shorter when `data` is not a
    /// whole number of pages).
    pub len: usize,
    /// Whether every page of the piece is zero.
    pub zero: bool,
}

/// Split `data` into maximal runs of zero pages and of data pages, in order. `page_size` 0 is
/// treated as one run of data. A trailing partial page counts as a page.
pub fn split_zero_runs(data: &[u8], page_size: usize) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    if data.is_empty() {
        return runs;
    }
    if page_size == 0 {
        runs.push(Run { offset: 0, len: data.len(), zero: is_zero(data) });
        return runs;
    }
    for (i, page) in data.chunks(page_size).enumerate() {
        let zero = is_zero(page);
        match runs.last_mut() {
            Some(r) if r.zero == zero => r.len += page.len(),
            _ => runs.push(Run { offset: i * page_size, len: page.len(), zero }),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_any_nonzero_byte() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        for i in [0, 1, 15, 16, 255, 256, 1000, 4095] {
            page[i] = 1;
            assert!(!is_zero(&page), "byte {i}");
            page[i] = 0;
        }
        assert!(is_zero(&[]));
        let mut odd = vec![0u8; 300];
        assert!(is_zero(&odd));
        odd[299] = 0x80;
        assert!(!is_zero(&odd));
    }

    #[test]
    fn splits_into_alternating_runs() {
        let ps = 4096;
        let mut data = vec![0u8; 8 * ps];
        data[2 * ps + 5] = 1;
        data[3 * ps] = 1;
        data[7 * ps + ps - 1] = 9;
        let runs = split_zero_runs(&data, ps);
        assert_eq!(
            runs,
            vec![
                Run { offset: 0, len: 2 * ps, zero: true },
                Run { offset: 2 * ps, len: 2 * ps, zero: false },
                Run { offset: 4 * ps, len: 3 * ps, zero: true },
                Run { offset: 7 * ps, len: ps, zero: false },
            ]
        );
        assert_eq!(split_zero_runs(&[], ps), vec![]);
        assert_eq!(split_zero_runs(&data[..ps], ps), vec![Run { offset: 0, len: ps, zero: true }]);
    }

    #[test]
    fn random_pages_match_the_naive_check() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let ps = 512;
        let mut data = vec![0u8; 64 * ps];
        for p in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 3 == 0 {
                data[p * ps + (x as usize >> 8) % ps] = (x >> 32) as u8 | 1;
            }
        }
        let runs = split_zero_runs(&data, ps);
        let mut covered = 0;
        for r in &runs {
            assert_eq!(r.offset, covered);
            covered += r.len;
            for page in data[r.offset..r.offset + r.len].chunks(ps) {
                assert_eq!(page.iter().all(|&b| b == 0), r.zero);
            }
        }
        assert_eq!(covered, data.len());
        assert!(runs.windows(2).all(|w| w[0].zero != w[1].zero));
    }
}
