//! Helpers shared by the integration tests: patterns and checksums, an unregistered second
//! mapping of a block, the pcb-peer process, evidence that a thread is blocked on a fault, and
//! huge page reservation.

#![allow(dead_code)]

use std::fs;
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use postcopy_broker::ram::{Mapping, HUGE_2M};
use postcopy_broker::uffd::{message_buffer, Message, Uffd};
use postcopy_broker::{BlockId, Incoming, RamBlock, RamBlocks};

/// FNV-1a 64, the checksum pcb-peer prints.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// `len` bytes that differ from page to page and from seed to seed, and are never all zero.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ ((i / 4096) as u8).wrapping_mul(7) ^ seed | 1).collect()
}

/// An Incoming over `blocks`, advised and listening.
pub fn listening(blocks: RamBlocks) -> Incoming {
    let mut inc = Incoming::new(blocks);
    inc.advise().unwrap();
    inc.listen().unwrap();
    inc
}

/// One memfd block of `pages` small pages, listening.
pub fn listening_memfd(name: &str, pages: u64) -> Incoming {
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd(name, pages * 4096).unwrap()).unwrap();
    listening(blocks)
}

/// A second mapping of a block's shared memory, NOT registered with any userfaultfd. Touching
/// a page through it that was never placed allocates that page behind the broker's back.
pub fn second_mapping(b: &RamBlock) -> Mapping {
    let fd = b.fd().expect("fd-backed block");
    Mapping::shared(fd.as_fd(), b.size() as usize).unwrap()
}

/// A copy of `[offset, offset+len)` of a mapping (only of pages that are present!).
pub fn read_mapping(m: &Mapping, offset: u64, len: u64) -> Vec<u8> {
    assert!(offset + len <= m.len() as u64);
    let mut v = vec![0u8; len as usize];
    // SAFETY: the range lies inside the live mapping; the caller only reads placed pages.
    unsafe { std::ptr::copy_nonoverlapping(m.as_ptr().add(offset as usize), v.as_mut_ptr(), v.len()) };
    v
}

/// Write `data` at `offset` of a mapping.
pub fn write_mapping(m: &Mapping, offset: u64, data: &[u8]) {
    assert!(offset + data.len() as u64 <= m.len() as u64);
    // SAFETY: the range lies inside the live mapping, which no Rust reference points into.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), m.as_ptr().add(offset as usize), data.len()) };
}

/// A copy of `[offset, offset+len)` of a block's own placement mapping (faults if absent).
pub fn read_block(b: &RamBlock, offset: u64, len: u64) -> Vec<u8> {
    assert!(offset + len <= b.size());
    let mut v = vec![0u8; len as usize];
    // SAFETY: the range lies inside the block's live placement mapping.
    unsafe { std::ptr::copy_nonoverlapping(b.host_ptr().add(offset as usize), v.as_mut_ptr(), v.len()) };
    v
}

/// What pcb-peer printed.
#[derive(Debug, serde::Deserialize)]
pub struct PeerRead {
    pub fnv1a64: String,
    pub len: u64,
    pub head: String,
}

/// Run `pcb-peer read` in a separate process on this process's fd of block `b`.
pub fn peer_read(b: &RamBlock, offset: u64, len: u64) -> PeerRead {
    let fd = b.fd().expect("fd-backed block").as_raw_fd();
    let path = format!("/proc/{}/fd/{fd}", std::process::id());
    let out = Command::new(env!("CARGO_BIN_EXE_pcb-peer"))
        .args(["read", "--fd-path", &path])
        .args(["--size", &b.size().to_string()])
        .args(["--offset", &offset.to_string()])
        .args(["--len", &len.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "pcb-peer failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Assert that a separate process sees exactly `expected` at `offset` of block `b`.
pub fn assert_peer_sees(b: &RamBlock, offset: u64, expected: &[u8]) {
    let r = peer_read(b, offset, expected.len() as u64);
    assert_eq!(r.len, expected.len() as u64);
    let head: String = expected[..expected.len().min(32)].iter().map(|x| format!("{x:02x}")).collect();
    assert_eq!(r.head, head);
    assert_eq!(r.fnv1a64, format!("{:016x}", fnv1a64(expected)));
}

/// A thread reading `[offset, offset+len)` of block `id` through the placement mapping.
pub struct Reader {
    pub result: Receiver<Vec<u8>>,
    pub handle: JoinHandle<()>,
}

/// Start a thread that reads a range of the broker's own placement mapping (keeping the blocks
/// alive) and sends the bytes back.
pub fn spawn_reader(blocks: &Arc<RamBlocks>, id: BlockId, offset: u64, len: u64) -> Reader {
    let blocks = Arc::clone(blocks);
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let b = blocks.get(id).unwrap();
        let _ = tx.send(read_block(b, offset, len));
    });
    Reader { result: rx, handle }
}

/// Wait (up to a minute, as a safety net) until the broker's userfaultfd reports a missing-page
/// fault inside `[addr, addr+len)`: proof that a thread touched the absent page and is blocked.
pub fn wait_for_fault(uffd: &Uffd, addr: u64, len: u64) -> Message {
    wait_for_faults(uffd, &[(addr, len)])[0]
}

/// Like [`wait_for_fault`] for several ranges at once (messages are consumed as they are read).
pub fn wait_for_faults(uffd: &Uffd, ranges: &[(u64, u64)]) -> Vec<Message> {
    let mut found: Vec<Option<Message>> = vec![None; ranges.len()];
    let mut buf = message_buffer(16);
    for _ in 0..600 {
        let mut fds = [PollFd::new(uffd.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(100u16)).unwrap();
        let n = uffd.read_messages(&mut buf).unwrap();
        for m in &buf[..n] {
            let msg = Message::decode(m);
            if let Message::Pagefault { addr: a, .. } = msg {
                for (i, &(start, len)) in ranges.iter().enumerate() {
                    if a >= start && a < start + len {
                        found[i].get_or_insert(msg);
                    }
                }
            }
        }
        if found.iter().all(Option::is_some) {
            return found.into_iter().flatten().collect();
        }
    }
    panic!("no fault reported in some of {ranges:#x?}");
}

/// Assert that a reader thread has not produced a result (it is blocked on the fault).
pub fn assert_still_blocked(r: &Reader) {
    assert!(
        matches!(r.result.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "the reader returned before the page was placed"
    );
}

/// Receive the reader's bytes and join it.
pub fn finish(r: Reader) -> Vec<u8> {
    let v = r.result.recv_timeout(Duration::from_secs(60)).expect("reader was not woken");
    r.handle.join().unwrap();
    v
}

static HUGE_LOCK: Mutex<()> = Mutex::new(());

fn read_num(path: &str) -> u64 {
    fs::read_to_string(path).unwrap().trim().parse().unwrap()
}

/// Make sure at least `min_free` 2 MiB huge pages are free, raising vm.nr_hugepages if needed
/// (never lowering it: other tests and processes may be using huge pages).
pub fn ensure_free_huge_pages(min_free: u64) {
    let _g = HUGE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let base = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let free = read_num(&format!("{base}/free_hugepages"));
    if free >= min_free {
        return;
    }
    let total = read_num("/proc/sys/vm/nr_hugepages");
    let want = total + (min_free - free);
    fs::write("/proc/sys/vm/nr_hugepages", format!("{want}\n"))
        .expect("cannot write /proc/sys/vm/nr_hugepages (tests run as root)");
    let free = read_num(&format!("{base}/free_hugepages"));
    assert!(free >= min_free, "asked for {want} huge pages of 2 MiB, only {free} free");
    assert_eq!(HUGE_2M, 2 << 20);
}

pub mod clients;
pub mod control_server;
pub mod mig;
pub mod proxy;
pub mod serve;
pub mod vhost;
pub mod wired;
