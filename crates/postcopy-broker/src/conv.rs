//! Integer conversions the cast lints would otherwise flag, for the 64-bit Linux targets this
//! crate is built for (it refuses to build anywhere else): a `u64` that counts bytes or pages
//! always fits a `usize` there, as Firecracker's `u64_to_usize` assumes. Everything else is
//! converted with `try_from` at the place where a peer's value comes in.

use std::time::Duration;

#[cfg(not(target_pointer_width = "64"))]
compile_error!(
    "postcopy-broker supports 64-bit targets only (page counts and offsets are u64 and index memory)"
);

/// `v` as a `usize`: lossless on the 64-bit targets this crate builds for.
#[inline]
pub const fn usize_of(v: u64) -> usize {
    #[allow(clippy::cast_possible_truncation)] // usize is 64 bits wide: see the compile_error above
    {
        v as usize
    }
}

/// The part of `width` that `done` of `total` fills (all of it when `total` is 0), for
/// progress bars.
#[inline]
pub fn share(done: u64, total: u64, width: usize) -> usize {
    if total == 0 {
        return width;
    }
    let w = width as u64;
    usize_of(done.min(total).saturating_mul(w) / total)
}

/// Nanoseconds of `d`, saturating at `u64::MAX` (584 years).
#[inline]
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_lossless_or_saturate() {
        assert_eq!(usize_of(u64::MAX), usize::MAX);
        assert_eq!(nanos(Duration::from_micros(3)), 3000);
        assert_eq!(nanos(Duration::MAX), u64::MAX);
        assert_eq!((share(1, 2, 40), share(5, 0, 30), share(9, 4, 10)), (20, 30, 10));
    }
}
