//! Where a local process maps a file: /proc/PID/maps parsed and searched by (device, inode) and
//! file offset. Used to find a vhost-user backend's real mapping base of each shared memfd.

use std::os::fd::BorrowedFd;

use nix::sys::stat::fstat;

use crate::error::{IoContext, Result};

/// One line of /proc/PID/maps (adjacent lines of one file mapping are merged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    /// Device major number.
    pub major: u64,
    /// Device minor number.
    pub minor: u64,
    /// Inode (0 for anonymous memory).
    pub inode: u64,
}

/// The identity of an open file: (device major, device minor, inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    /// Device major number.
    pub major: u64,
    /// Device minor number.
    pub minor: u64,
    /// Inode number.
    pub inode: u64,
}

impl FileId {
    /// The identity of `fd` (fstat).
    pub fn of(fd: BorrowedFd<'_>) -> Result<FileId> {
        let st = fstat(std::os::fd::AsRawFd::as_raw_fd(&fd)).ctx(|| "fstat of a guest RAM fd".into())?;
        let dev = st.st_dev;
        Ok(FileId { major: libc::major(dev).into(), minor: libc::minor(dev).into(), inode: st.st_ino })
    }
}

/// Parse the text of /proc/PID/maps; malformed lines are skipped. Adjacent entries that continue
/// the same file mapping are merged (uffd registration or madvise can split one mmap).
pub fn parse_maps(text: &str) -> Vec<MapEntry> {
    let mut out: Vec<MapEntry> = Vec::new();
    for line in text.lines() {
        let Some(e) = parse_line(line) else { continue };
        if let Some(last) = out.last_mut() {
            if e.inode != 0
                && last.inode == e.inode
                && last.major == e.major
                && last.minor == e.minor
                && last.end == e.start
                && last.offset + (last.end - last.start) == e.offset
            {
                last.end = e.end;
                continue;
            }
        }
        out.push(e);
    }
    out
}

fn parse_line(line: &str) -> Option<MapEntry> {
    let mut it = line.split_ascii_whitespace();
    let (s, e) = it.next()?.split_once('-')?;
    let _perms = it.next()?;
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let (maj, min) = it.next()?.split_once(':')?;
    let inode = it.next()?.parse().ok()?;
    Some(MapEntry {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        offset,
        major: u64::from_str_radix(maj, 16).ok()?,
        minor: u64::from_str_radix(min, 16).ok()?,
        inode,
    })
}

/// Read and parse /proc/`pid`/maps.
pub fn read_maps(pid: i32) -> Result<Vec<MapEntry>> {
    let path = format!("/proc/{pid}/maps");
    let text = std::fs::read_to_string(&path).ctx(|| format!("reading {path}"))?;
    Ok(parse_maps(&text))
}

/// Every address at which `entries` map bytes `file_offset..file_offset+len` of file `id`
/// contiguously.
pub fn bases_of(entries: &[MapEntry], id: FileId, file_offset: u64, len: u64) -> Vec<u64> {
    entries
        .iter()
        .filter(|e| e.inode == id.inode && e.major == id.major && e.minor == id.minor)
        .filter(|e| e.offset <= file_offset && file_offset + len <= e.offset + (e.end - e.start))
        .map(|e| e.start + (file_offset - e.offset))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 rw-s 00000000 00:01 4242                       /memfd:guest (deleted)
7f0000100000-7f0004000000 ---s 00100000 00:01 4242                       /memfd:guest (deleted)
7f1000000000-7f1000001000 rw-s 00000000 00:01 4243                       /memfd:other (deleted)
garbage line
7f2000000000-7f2004000000 rw-s 00002000 00:01 4242                       /memfd:guest (deleted)
";

    #[test]
    fn merges_split_mappings_and_finds_bases() {
        let e = parse_maps(MAPS);
        assert_eq!(e.len(), 4);
        assert_eq!(e[1].start, 0x7f00_0000_0000);
        assert_eq!(e[1].end, 0x7f00_0400_0000);
        let id = FileId { major: 0, minor: 1, inode: 4242 };
        assert_eq!(bases_of(&e, id, 0, 0x400_0000), vec![0x7f00_0000_0000]);
        assert_eq!(bases_of(&e, id, 0x2000, 0x1000), vec![0x7f00_0000_2000, 0x7f20_0000_0000]);
        assert!(bases_of(&e, FileId { major: 0, minor: 2, inode: 4242 }, 0, 0x1000).is_empty());
        assert!(bases_of(&e, id, 0, 0x500_0000).is_empty());
    }
}
