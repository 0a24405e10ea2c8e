//! Which pages a process has in its own page tables (/proc/PID/pagemap: 8 bytes per 4 KiB
//! virtual page, bit 63 present, bit 62 swapped). A process that populated shared guest RAM
//! before its userfaultfd could catch it (mlock, MAP_POPULATE, a prefault loop) has those pages
//! mapped; one that only registered has none of the pages nobody placed. So the broker blames a
//! registering client only for unplaced pages it maps itself, not for pages another process put
//! there. Reading another process's pagemap needs ptrace-read access to it (root, or the same
//! uid and a dumpable process); without it the answer is unknown.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const ENTRY: u64 = 8;
const PAGE: u64 = 4096;

/// A process's pagemap, opened once.
#[derive(Debug)]
pub struct Pagemap(File);

impl Pagemap {
    /// Open the pagemap of `pid`.
    pub fn open(pid: u32) -> io::Result<Pagemap> {
        File::open(format!("/proc/{pid}/pagemap")).map(Pagemap)
    }

    /// How many of the 4 KiB pages of `[addr, addr+len)` the process has mapped (present or
    /// swapped out) in its own page tables.
    pub fn mapped(&self, addr: u64, len: u64) -> io::Result<u64> {
        let first = addr / PAGE;
        let n = len.div_ceil(PAGE);
        let mut buf = vec![0u8; 4096];
        let mut found = 0;
        let mut done = 0;
        while done < n {
            let k = (n - done).min(buf.len() as u64 / ENTRY);
            let bytes = &mut buf[..crate::conv::usize_of(k * ENTRY)];
            self.0.read_exact_at(bytes, (first + done) * ENTRY)?;
            for e in bytes.chunks_exact(8) {
                let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                if v & (PRESENT | SWAPPED) != 0 {
                    found += 1;
                }
            }
            done += k;
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_pages_show_as_mapped_only_once_touched() {
        let m = crate::ram::Mapping::private(8 * 4096).unwrap();
        let pm = Pagemap::open(std::process::id()).unwrap();
        assert_eq!(pm.mapped(m.addr(), 8 * 4096).unwrap(), 0);
        // SAFETY: writes inside the live private mapping made above.
        unsafe {
            m.as_ptr().write(1);
            m.as_ptr().add(3 * 4096).write(1);
        }
        assert_eq!(pm.mapped(m.addr(), 8 * 4096).unwrap(), 2);
        assert_eq!(pm.mapped(m.addr() + 4096, 2 * 4096).unwrap(), 0);
    }
}
