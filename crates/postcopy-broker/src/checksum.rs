//! The project's checksum of guest RAM contents, the one `--verify-file` and the vhost-user
//! guest driver print: below migration and vhost_user, which both use it.

const K: u64 = 0x9e37_79b9_7f4a_7c15;
const SEED: u64 = 0x243f_6a88_85a3_08d3;

/// Checksum of `data`: 8-byte little-endian words mixed with a multiply-rotate step (a trailing
/// partial word is zero-padded), then the length. Not cryptographic; it detects any changed page.
pub fn checksum(data: &[u8]) -> u64 {
    let mut c = Checksum::new();
    c.update(data);
    c.finish()
}

/// [`checksum`] over data that comes in pieces (guest RAM read through a bounce buffer): the
/// same value as over the pieces joined.
#[derive(Debug, Clone)]
pub struct Checksum {
    h: u64,
    len: u64,
    carry: [u8; 8],
    carried: usize,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum::new()
    }
}

impl Checksum {
    /// Nothing seen yet.
    pub fn new() -> Checksum {
        Checksum { h: SEED, len: 0, carry: [0; 8], carried: 0 }
    }

    fn mix(&mut self, w: [u8; 8]) {
        self.h = (self.h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }

    /// The next piece.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.carried > 0 {
            let n = (8 - self.carried).min(data.len());
            self.carry[self.carried..self.carried + n].copy_from_slice(&data[..n]);
            self.carried += n;
            data = &data[n..];
            if self.carried < 8 {
                return;
            }
            self.mix(self.carry);
            self.carried = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.mix(b);
        }
        let rest = words.remainder();
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carried = rest.len();
    }

    /// The checksum of everything seen.
    pub fn finish(mut self) -> u64 {
        if self.carried > 0 {
            let mut b = [0u8; 8];
            b[..self.carried].copy_from_slice(&self.carry[..self.carried]);
            self.mix(b);
        }
        (self.h ^ self.len).wrapping_mul(K)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value the one-shot form has always had, and the same over any split.
    #[test]
    fn pieces_give_the_whole_checksum() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
        let whole = checksum(&data);
        for cut in [0, 1, 7, 8, 9, 500, 999, 1000] {
            let mut c = Checksum::new();
            c.update(&data[..cut]);
            c.update(&data[cut..]);
            assert_eq!(c.finish(), whole, "cut at {cut}");
        }
        let mut bytewise = Checksum::new();
        data.iter().for_each(|b| bytewise.update(std::slice::from_ref(b)));
        assert_eq!(bytewise.finish(), whole);
        assert_ne!(checksum(&data[..999]), whole);
    }
}
