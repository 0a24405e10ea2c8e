//! The source's guest RAM: which pages are zero and what every other page holds, all derived
//! from the seed, plus the two checksums the project prints (FNV-1a 64 and `verify::checksum`).

use super::plan::{BlockPlan, DirtyFill, Zeros, HUGE};
use super::rng::{mix, Rng};

/// FNV-1a 64 as pcb-client, `serve --checksums` and the guest driver print it.
pub fn fnv(data: &[u8]) -> String {
    let h =
        data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{h:016x}")
}

/// Which pages of block `index` are zero.
pub fn zero_map(seed: u64, index: usize, b: &BlockPlan) -> Vec<bool> {
    let n = b.pages() as usize;
    let mut r = Rng::new(mix(&[seed, index as u64, 0x2e60]));
    match b.zeros {
        Zeros::None => vec![false; n],
        Zeros::Sparse => (0..n).map(|_| r.below(16) == 0).collect(),
        Zeros::Dense => (0..n).map(|_| r.chance(50)).collect(),
        Zeros::Runs => {
            let mut v = Vec::with_capacity(n);
            let mut zero = r.chance(50);
            while v.len() < n {
                let len = if b.page_size == HUGE { r.range(1, 3) } else { r.range(16, 1024) } as usize;
                v.extend(std::iter::repeat_n(zero, len.min(n - v.len())));
                zero = !zero;
            }
            v
        }
    }
}

/// The zero pages of every block, as page numbers.
pub fn zero_pages(seed: u64, blocks: &[BlockPlan]) -> Vec<Vec<u64>> {
    blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            zero_map(seed, i, b).iter().enumerate().filter(|(_, z)| **z).map(|(p, _)| p as u64).collect()
        })
        .collect()
}

/// Fill `page` with the pseudo-random bytes of (seed, block, page, salt); never all zero.
fn random_page(page: &mut [u8], key: &[u64]) {
    let mut r = Rng::new(mix(key));
    for w in page.chunks_mut(8) {
        w.copy_from_slice(&r.next_u64().to_le_bytes()[..w.len()]);
    }
    page[0] |= 1;
}

/// The initial bytes of block `index`.
pub fn initial(seed: u64, index: usize, b: &BlockPlan) -> Vec<u8> {
    let ps = b.page_size as usize;
    let mut v = vec![0u8; b.size as usize];
    for (p, (page, zero)) in v.chunks_mut(ps).zip(zero_map(seed, index, b)).enumerate() {
        if !zero {
            random_page(page, &[seed, index as u64, p as u64]);
        }
    }
    v
}

/// What the guest wrote over page `p` of block `index` (after precopy sent it).
pub fn dirty_page(seed: u64, index: usize, p: u64, page: &mut [u8], fill: DirtyFill) {
    match fill {
        DirtyFill::Invert => page.iter_mut().for_each(|b| *b = !*b),
        DirtyFill::Random => random_page(page, &[seed, index as u64, p, 0xd1]),
        DirtyFill::Zero => page.fill(0),
    }
}
