//! Command-line specs shared by `postcopy-broker source` and `serve`: byte sizes (`4096`,
//! `0x1000`, `64K`, `192M`, `1G`, `2MiB`), RAM block specs (`name:size[:4k|2m|1g]`) and dirty
//! range lists (`name:offset+len[,name:offset+len...]`).

use crate::error::{Error, Result};
use crate::migration::wire::BlockInfo;

/// Parse a byte count: decimal or `0x` hex, with an optional K/M/G suffix (also KiB/MiB/GiB;
/// powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let bad = || Error::Invalid(format!("'{s}' is not a size; write bytes (4096, 0x1000) or 64K, 192M, 1G"));
    let lower = t.to_ascii_lowercase();
    let (num, mult) = [
        ("kib", 1u64 << 10),
        ("mib", 1 << 20),
        ("gib", 1 << 30),
        ("k", 1 << 10),
        ("m", 1 << 20),
        ("g", 1 << 30),
    ]
    .iter()
    .find_map(|(suf, m)| lower.strip_suffix(suf).map(|n| (n.to_string(), *m)))
    .unwrap_or((lower.clone(), 1));
    let v = match num.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).map_err(|_| bad())?,
        None => num.parse::<u64>().map_err(|_| bad())?,
    };
    v.checked_mul(mult).ok_or_else(bad)
}

/// Parse a page size: `4k`, `2m`, `1g` or a byte count.
pub fn parse_page_size(s: &str) -> Result<u64> {
    let ps = parse_size(s)?;
    if ![4096, 2 << 20, 1 << 30].contains(&ps) {
        return Err(Error::Invalid(format!("page size '{s}' must be 4k, 2m or 1g")));
    }
    Ok(ps)
}

/// Parse a block spec `name:size[:page]` (page size 4k by default).
pub fn parse_block(s: &str) -> Result<BlockInfo> {
    let mut parts = s.split(':');
    let (Some(name), Some(size)) = (parts.next(), parts.next()) else {
        return Err(Error::Invalid(format!(
            "block spec '{s}' must be NAME:SIZE[:4k|2m|1g], e.g. pc.ram:192M"
        )));
    };
    let page_size = parts.next().map(parse_page_size).transpose()?.unwrap_or(4096);
    if parts.next().is_some() || name.is_empty() {
        return Err(Error::Invalid(format!(
            "block spec '{s}' must be NAME:SIZE[:4k|2m|1g], e.g. pc.ram:192M"
        )));
    }
    let size = parse_size(size)?;
    if size == 0 || size % page_size != 0 {
        return Err(Error::Invalid(format!(
            "block spec '{s}': size {size} is not a positive multiple of the page size {page_size}"
        )));
    }
    Ok(BlockInfo::new(name, size, page_size))
}

/// One dirty range: block name, offset, length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyRange {
    /// Block name.
    pub block: String,
    /// Byte offset in the block.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Parse `name:offset+len[,name:offset+len...]`.
pub fn parse_dirty(s: &str) -> Result<Vec<DirtyRange>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let bad = || {
                Error::Invalid(format!("dirty range '{p}' must be NAME:OFFSET+LEN, e.g. pc.ram:0x10000+8K"))
            };
            let (name, range) = p.rsplit_once(':').ok_or_else(bad)?;
            let (off, len) = range.split_once('+').ok_or_else(bad)?;
            Ok(DirtyRange { block: name.trim().to_string(), offset: parse_size(off)?, len: parse_size(len)? })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_blocks_and_dirty_ranges() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("0x1000").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("192M").unwrap(), 192 << 20);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert!(parse_size("12Q").is_err() && parse_size("").is_err());
        assert_eq!(parse_block("pc.ram:192M").unwrap(), BlockInfo::new("pc.ram", 192 << 20, 4096));
        assert_eq!(parse_block("huge:64M:2m").unwrap(), BlockInfo::new("huge", 64 << 20, 2 << 20));
        assert!(parse_block("huge:3M:2m").is_err());
        assert!(parse_block("x").is_err() && parse_block("x:4k:3k").is_err());
        assert_eq!(
            parse_dirty("pc.ram:0x1000+8K, huge:2M+4k").unwrap(),
            vec![
                DirtyRange { block: "pc.ram".into(), offset: 4096, len: 8192 },
                DirtyRange { block: "huge".into(), offset: 2 << 20, len: 4096 },
            ]
        );
        assert!(parse_dirty("pc.ram:5").is_err());
    }
}
