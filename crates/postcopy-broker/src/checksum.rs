//! The project's checksum of guest RAM contents, the one `--verify-file` and the vhost-user
//! guest driver print: below migration and vhost_user, which both use it.

/// Checksum of `data`: 8-byte little-endian words mixed with a multiply-rotate step (a trailing
/// partial word is zero-padded), then the length. Not cryptographic; it detects any changed page.
pub fn checksum(data: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = 0x243f_6a88_85a3_08d3u64;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(K).rotate_left(29);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(K).rotate_left(29);
    }
    (h ^ data.len() as u64).wrapping_mul(K)
}
