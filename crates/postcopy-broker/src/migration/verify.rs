//! End-of-migration verification: a fast 64-bit checksum of a block's bytes and the JSON
//! verification file (`--verify-file`) that both the source and the destination can write, so a
//! test or an operator can compare the two hosts' RAM byte for byte without moving it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

pub use crate::checksum::checksum;

/// The checksum of one block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockChecksum {
    /// Block name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// [`checksum`] of the whole block, 16 hex digits.
    pub checksum: String,
}

impl BlockChecksum {
    /// The entry for a block's bytes.
    pub fn of(name: &str, page_size: u64, data: &[u8]) -> BlockChecksum {
        BlockChecksum {
            name: name.to_string(),
            size: data.len() as u64,
            page_size,
            checksum: format!("{:016x}", checksum(data)),
        }
    }
}

/// What a verification file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// "source" or "destination".
    pub side: String,
    /// One entry per block, in block order.
    pub blocks: Vec<BlockChecksum>,
}

impl VerifyReport {
    /// Write the report as JSON to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Invalid(format!("cannot encode the verification report: {e}")))?;
        std::fs::write(path, text + "\n").ctx(|| format!("write verification file {}", path.display()))
    }

    /// Read a report written by [`VerifyReport::write`].
    pub fn read(path: &Path) -> Result<VerifyReport> {
        let text =
            std::fs::read_to_string(path).ctx(|| format!("read verification file {}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: not a verification file: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_changed_byte_changes_the_checksum() {
        let mut v = vec![0u8; 3 * 4096 + 5];
        let base = checksum(&v);
        for i in [0, 7, 8, 4095, 8191, v.len() - 1] {
            v[i] = 1;
            assert_ne!(checksum(&v), base, "byte {i}");
            v[i] = 0;
        }
        assert_ne!(checksum(&[0; 8]), checksum(&[0; 16]), "length counts");
        assert_eq!(BlockChecksum::of("a", 4096, &v).checksum, format!("{base:016x}"));
    }
}
