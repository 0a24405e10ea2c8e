//! `pcb-peer`: a test and diagnostic helper that plays "another process mapping the guest RAM".
//!
//! `pcb-peer read --fd-path /proc/PID/fd/N --size S --offset O --len L` re-opens a memfd (or a
//! tmpfs/hugetlbfs file) through its /proc path, maps `S` bytes of it MAP_SHARED, read-only, and
//! prints one JSON line with the FNV-1a 64 checksum of bytes `[O, O+L)` and their first bytes:
//! `{"fnv1a64":"<16 hex digits>","len":L,"head":"<hex of up to 32 bytes>"}`.
//!
//! The mapping is not registered with any userfaultfd, so reading a page that was never placed
//! would allocate a zero page in the shared memory: only read ranges the broker has placed.

#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

use std::fs::OpenOptions;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use postcopy_broker::conv::usize_of;

/// A peer process for postcopy-broker tests and diagnostics.
#[derive(Debug, Parser)]
#[command(name = "pcb-peer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Map a shared memory object and print the checksum of a byte range of it.
    Read {
        /// Path that opens the memory object, e.g. /proc/PID/fd/N of the broker's memfd.
        #[arg(long)]
        fd_path: PathBuf,
        /// Bytes to map from offset 0 (a multiple of the object's page size).
        #[arg(long)]
        size: u64,
        /// First byte to read.
        #[arg(long)]
        offset: u64,
        /// Bytes to read.
        #[arg(long)]
        len: u64,
    },
}

/// FNV-1a, 64 bit.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read(fd_path: &PathBuf, size: u64, offset: u64, len: u64) -> Result<String, String> {
    let end = offset.checked_add(len).filter(|&e| e <= size && len > 0).ok_or_else(|| {
        format!("range offset {offset} len {len} does not fit in {size} mapped bytes; pass a non-empty range inside --size")
    })?;
    let map_len = usize::try_from(size)
        .ok()
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| format!("--size {size} must be a positive size that fits this machine"))?;
    let file = OpenOptions::new().read(true).open(fd_path).map_err(|e| {
        format!("open {}: {e}; is the process alive and are you allowed to see its fds?", fd_path.display())
    })?;
    // SAFETY: a fresh mapping chosen by the kernel aliases no Rust object; it is unmapped below.
    let p = unsafe { mmap(None, map_len, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, &file, 0) }.map_err(
        |e| {
            format!(
                "mmap {map_len} bytes of {}: {e}; is --size a multiple of its page size?",
                fd_path.display()
            )
        },
    )?;
    let (start, n) = (usize_of(offset), usize_of(end - offset));
    // SAFETY: `[start, start+n)` lies inside the `map_len`-byte mapping created above (checked
    // against --size), which stays mapped until the munmap below; nothing writes through it here.
    let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr().cast::<u8>().add(start), n) };
    let line = format!(
        "{{\"fnv1a64\":\"{:016x}\",\"len\":{n},\"head\":\"{}\"}}",
        fnv1a64(bytes),
        hex(&bytes[..n.min(32)])
    );
    // SAFETY: `p`/`map_len` describe exactly the mapping created above; `bytes` is no longer used.
    if let Err(e) = unsafe { munmap(p, map_len.get()) } {
        eprintln!("pcb-peer: munmap failed: {e}");
    }
    Ok(line)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Read { fd_path, size, offset, len } => match read(&fd_path, size, offset, len) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pcb-peer: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
