//! Which RAM a control-socket peer may reach, by its uid (`serve --grant UID=NAME,...`). Root
//! and the broker's own uid reach everything; any other allowed uid only what it was granted,
//! through every way the socket offers: shared registrations and `get_blocks` name blocks,
//! private registrations and Firecracker handshakes name byte ranges of the image file.
//!
//! With RAM blocks the image holds them back to back in block order (lazy restore), so a range
//! of the image is allowed when every byte of it lies in granted blocks; bytes past the last
//! block belong to no block and only root and the broker's uid reach them. Without blocks
//! (Firecracker-only: `serve --image FILE`) the image is one unnamed memory file, granted under
//! the name [`IMAGE_GRANT`].

use std::collections::HashMap;

/// The grant name of the whole image file when the broker has no RAM blocks.
pub const IMAGE_GRANT: &str = "image";

/// The grants of a broker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grants<'a> {
    by_uid: &'a HashMap<u32, Vec<String>>,
    euid: u32,
}

impl<'a> Grants<'a> {
    /// Grants from the configuration; `euid` is the broker's effective uid.
    pub(crate) fn new(by_uid: &'a HashMap<u32, Vec<String>>, euid: u32) -> Grants<'a> {
        Grants { by_uid, euid }
    }

    fn trusted(&self, uid: u32) -> bool {
        uid == 0 || uid == self.euid
    }

    /// Whether peers of `uid` may have the block (or, without blocks, the image) named `name`.
    pub(crate) fn has(&self, uid: u32, name: &str) -> bool {
        self.trusted(uid) || self.by_uid.get(&uid).is_some_and(|g| g.iter().any(|b| b == name))
    }

    /// Whether peers of `uid` may have bytes `[offset, offset+len)` of the image, whose layout is
    /// `blocks` (name, size) back to back from offset 0; `Err` says why not, for the refusal.
    pub(crate) fn image_range(
        &self,
        uid: u32,
        blocks: &[(String, u64)],
        offset: u64,
        len: u64,
    ) -> Result<(), String> {
        if self.trusted(uid) {
            return Ok(());
        }
        let end = offset.saturating_add(len);
        if blocks.is_empty() {
            return if self.has(uid, IMAGE_GRANT) {
                Ok(())
            } else {
                Err(format!(
                    "uid {uid} was not given the image (the broker can grant it with --grant {uid}={IMAGE_GRANT})"
                ))
            };
        }
        let mut start = 0u64;
        for (name, size) in blocks {
            let block_end = start.saturating_add(*size);
            if offset < block_end && end > start && !self.has(uid, name) {
                return Err(format!(
                    "uid {uid} was not given block '{name}', which holds image bytes {start:#x}..{block_end:#x}; \
                     the range {offset:#x}..{end:#x} reaches into it"
                ));
            }
            start = block_end;
        }
        if end > start {
            return Err(format!(
                "the range {offset:#x}..{end:#x} reaches past the RAM blocks (image bytes from {start:#x} \
                 belong to no block and are not granted to uid {uid})"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Vec<(String, u64)> {
        vec![("a".into(), 0x4000), ("b".into(), 0x2000), ("c".into(), 0x1000)]
    }

    #[test]
    fn block_names() {
        let m: HashMap<u32, Vec<String>> = [(1000, vec!["a".to_string()])].into_iter().collect();
        let g = Grants::new(&m, 500);
        assert!(g.has(0, "b") && g.has(500, "b"), "root and the broker's uid have every block");
        assert!(g.has(1000, "a"));
        assert!(!g.has(1000, "b") && !g.has(1001, "a"));
    }

    #[test]
    fn image_ranges_lie_in_granted_blocks() {
        let m: HashMap<u32, Vec<String>> =
            [(1000, vec!["a".to_string()]), (1001, vec!["a".to_string(), "b".to_string()])]
                .into_iter()
                .collect();
        let g = Grants::new(&m, 500);
        let l = layout();
        assert!(g.image_range(1000, &l, 0, 0x4000).is_ok());
        assert!(g.image_range(1000, &l, 0x1000, 0x1000).is_ok());
        let e = g.image_range(1000, &l, 0x4000, 0x1000).unwrap_err();
        assert!(e.contains("block 'b'"), "{e}");
        let e = g.image_range(1000, &l, 0x3000, 0x2000).unwrap_err();
        assert!(e.contains("block 'b'"), "straddling into b: {e}");
        assert!(g.image_range(1001, &l, 0x3000, 0x3000).is_ok(), "a and b together");
        assert!(g.image_range(1001, &l, 0x5000, 0x2000).unwrap_err().contains("block 'c'"));
        let e = g.image_range(0x1001, &l, 0, 0x1000).unwrap_err();
        assert!(e.contains("block 'a'"), "{e}");
        // Past the blocks: nobody but root and the broker's uid.
        let all: HashMap<u32, Vec<String>> =
            [(1000, vec!["a".into(), "b".into(), "c".into()])].into_iter().collect();
        let g = Grants::new(&all, 500);
        assert!(g.image_range(1000, &l, 0, 0x7000).is_ok());
        assert!(g.image_range(1000, &l, 0x6000, 0x2000).unwrap_err().contains("past the RAM blocks"));
        assert!(g.image_range(1000, &l, u64::MAX - 10, 0x2000).is_err(), "no overflow");
        assert!(g.image_range(0, &l, 0x6000, 0x2000).is_ok());
        assert!(g.image_range(500, &l, 0x6000, 0x2000).is_ok());
    }

    #[test]
    fn the_image_without_blocks() {
        let m: HashMap<u32, Vec<String>> = [(1000, vec![IMAGE_GRANT.to_string()])].into_iter().collect();
        let g = Grants::new(&m, 500);
        assert!(g.image_range(1000, &[], 0x1000_0000, 0x1000).is_ok());
        let e = g.image_range(1001, &[], 0, 0x1000).unwrap_err();
        assert!(e.contains("--grant 1001=image"), "{e}");
        assert!(g.image_range(0, &[], 0, 0x1000).is_ok());
    }
}
