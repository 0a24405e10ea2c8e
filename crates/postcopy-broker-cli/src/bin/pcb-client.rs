//! pcb-client: a client process for tests and diagnostics. It maps a RAM block's memfd (one or
//! more times), registers its mappings with its own userfaultfd in MISSING mode, hands the uffd
//! to the broker, then touches pages and reports what it read as JSON lines on stdout.
//!
//! Hand-over (`--handover pidfd`): it prints `{"ready":..}` with its pid, uffd fd number and
//! mapping table, and the broker side takes the fd with pidfd_getfd(2); then it waits for a
//! line on stdin before touching pages.

#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::ExitCode;

use clap::Parser;
use nix::sys::mman::{madvise, mmap, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};
use postcopy_broker::control::{
    send_firecracker_handshake, ClientKind, ControlClient, FcRegion, MappingSpec, ReattachPolicy,
};
use postcopy_broker::conv::usize_of;
use postcopy_broker::uffd::{feature, Uffd};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "test client of postcopy-broker")]
struct Args {
    /// Path that opens the block's memfd (for example /proc/PID/fd/N); without it the client
    /// maps private anonymous memory (a Firecracker-style private client; with --page-size
    /// 2097152 it is hugetlb memory, MAP_HUGETLB|MAP_HUGE_2MB, as Firecracker's 2M hugepages).
    #[arg(long)]
    memfd: Option<String>,
    /// Get the block's memfd from a broker's control socket and register there (instead of
    /// --memfd and a hand-over by pidfd_getfd).
    #[arg(long)]
    control: Option<String>,
    /// The block to map when using --control.
    #[arg(long, default_value = "ram")]
    block: String,
    /// With --control: act like Firecracker: private anonymous memory, handed over with
    /// Firecracker's UFFD handshake (served from the broker's image at file offset 0).
    #[arg(long)]
    firecracker: bool,
    /// Block (or private region) size in bytes (with --control: taken from the broker).
    #[arg(long)]
    size: Option<u64>,
    /// Page size of the block.
    #[arg(long, default_value_t = 4096)]
    page_size: u64,
    /// How many times to map the whole block.
    #[arg(long, default_value_t = 1)]
    maps: usize,
    /// uffd features to ask for: comma list of remove,unmap,remap,fork,thread_id.
    #[arg(long, default_value = "")]
    features: String,
    /// With --control: start N threads before registering and declare their thread ids as the
    /// client's vCPUs (`vcpu_tids`; the uffd then asks for thread_id); the `vcpus` step reads
    /// pages from them.
    #[arg(long, value_name = "N", default_value_t = 0)]
    vcpus: usize,
    /// Populate the mapping before registering the userfaultfd, as a misbehaving backend does:
    /// `mlock` (mlock(2) of the mapping, like dpdk-testpmd's mlockall), `populate`
    /// (MAP_POPULATE) or `touch` (read every page). The broker must refuse the registration.
    #[arg(long)]
    prefault: Option<String>,
    /// With --control: map private anonymous memory instead of the block's memfd, but register
    /// it as a shared mapping of the block (a client whose mapping is not the shared RAM: waking
    /// it never helps, the broker must stop serving it).
    #[arg(long)]
    anon: bool,
    /// Also map this many bytes of private anonymous memory (MAP_NORESERVE: address space only)
    /// and register it with the same userfaultfd, outside the mapping table given to the broker;
    /// the `dontneed-reserve` step then discards all of it at once (one huge REMOVE event).
    #[arg(long, value_name = "BYTES")]
    reserve_anon: Option<u64>,
    /// Start the script right after printing the ready line instead of waiting for a line on
    /// stdin (so the client may fault before the broker has its uffd).
    #[arg(long)]
    no_wait: bool,
    /// Steps, separated by ';': touch:LIST (read pages through mapping 0), touchall:LIST (through
    /// every mapping), write:LIST:BYTE (fill the first 8 bytes), remove:RANGE (MADV_REMOVE on
    /// mapping 0), dontneed:RANGE (MADV_DONTNEED on mapping 0: how a balloon frees private
    /// memory), unmap:RANGE (munmap on mapping 0), fork (the child runs the rest of the
    /// script, then the parent), wait (read a line from stdin), timed:LIST (read one byte of each
    /// page in order, timing every access; prints us_per_fault, p50, p99, max and the byte sum, as
    /// uffd_limit.c's demand client does, plus the same over the accesses that blocked, those of
    /// 10 us or more), parallel:LIST (read one byte of each page, each from a thread of its own, all
    /// at once), dontneed-each:LIST (MADV_DONTNEED of each page of LIST on mapping 0, one call per page,
    /// as a balloon's free page reporting does: one REMOVE event each), dontneed-reserve
    /// (MADV_DONTNEED over the whole --reserve-anon region). LIST is like 0,5,7-20,30-90/3 (the
    /// last: every third page from 30 to 90), vcpus:LIST (read one byte of each page through mapping
    /// 0, the pages dealt round-robin to the --vcpus threads, all at once), memtouch:FIRST-LAST:SEED
    /// (a guest's working set: until a line arrives on stdin, read one word of a random page
    /// between FIRST and LAST, timing every access, and count it; prints accesses, the accesses
    /// that blocked (10 us or more) and their total and mean time, the worst access and the
    /// elapsed time).
    #[arg(long, default_value = "")]
    script: String,
}

fn pages(spec: &str) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    for part in spec.split(',').filter(|s| !s.is_empty()) {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<usize>().ok().filter(|&s| s > 0).ok_or_else(|| part.to_string())?),
            None => (part, 1),
        };
        match range.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) =
                    (a.parse().map_err(|_| part.to_string())?, b.parse().map_err(|_| part.to_string())?);
                out.extend((a..=b).step_by(step));
            }
            None => out.push(range.parse().map_err(|_| part.to_string())?),
        }
    }
    Ok(out)
}

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

struct Client {
    bases: Vec<u64>,
    /// Bytes of each mapping.
    size: u64,
    page_size: u64,
    /// The --reserve-anon region: (start, len).
    reserve: Option<(u64, u64)>,
    vcpus: Vec<Vcpu>,
}

/// A thread declared as a vCPU: it reads the addresses it is sent and answers their byte sum.
struct Vcpu {
    tid: u32,
    work: std::sync::mpsc::Sender<Vec<u64>>,
    done: std::sync::mpsc::Receiver<u64>,
}

impl Vcpu {
    fn start() -> Result<Vcpu, String> {
        let (work, rx) = std::sync::mpsc::channel::<Vec<u64>>();
        let (tx, done) = std::sync::mpsc::channel();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tid_tx.send(nix::unistd::gettid().as_raw());
            for addrs in rx {
                let mut sum = 0u64;
                for a in addrs {
                    // SAFETY: the address lies inside a live mapping of this process (the main
                    // thread keeps it mapped while it waits for the answer); the read may block
                    // in the kernel until the broker places the page.
                    sum += u64::from(unsafe { std::ptr::read_volatile(a as *const u8) });
                }
                if tx.send(sum).is_err() {
                    break;
                }
            }
        });
        let tid = tid_rx.recv().map_err(|_| "a vCPU thread died")?;
        Ok(Vcpu { tid: u32::try_from(tid).map_err(|_| "negative tid")?, work, done })
    }
}

impl Client {
    fn read(&self, list: &[u64], maps: usize) -> Vec<serde_json::Value> {
        let ps = usize_of(self.page_size);
        let mut out = Vec::new();
        for &p in list {
            for (m, base) in self.bases.iter().enumerate().take(maps) {
                let addr = *base + p * self.page_size;
                // SAFETY: addr lies inside a live mapping made by this process; reading may block
                // in the kernel until the broker places the page.
                let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, ps) };
                out.push(json!({"page": p, "map": m, "fnv": format!("{:016x}", fnv(bytes))}));
            }
        }
        out
    }

    /// Read one byte of each page in `list` through mapping 0, timing each access (the benchmark's
    /// demand client). Latencies are kept in a buffer allocated before the first access.
    fn timed(&self, list: &[u64]) -> serde_json::Value {
        let mut lat = vec![0f64; list.len()];
        let mut sum = 0u64;
        let t0 = std::time::Instant::now();
        for (i, &p) in list.iter().enumerate() {
            let addr = self.bases[0] + p * self.page_size;
            let s = std::time::Instant::now();
            // SAFETY: addr lies inside a live mapping made by this process; the read may block in
            // the kernel until the broker places the page.
            sum += u64::from(unsafe { std::ptr::read_volatile(addr as *const u8) });
            lat[i] = s.elapsed().as_secs_f64() * 1e6;
        }
        let total = t0.elapsed().as_secs_f64() * 1e6;
        lat.sort_unstable_by(f64::total_cmp);
        let n = lat.len();
        let at = |k: usize| lat.get(k.min(n.saturating_sub(1))).copied().unwrap_or(0.0);
        // Accesses that waited for a page from a source: 10 us or more (a page already in the
        // page cache maps in a minor fault of a few microseconds).
        let first_blocked = lat.partition_point(|&l| l < 10.0);
        let blocked = &lat[first_blocked..];
        let bat = |k: usize| blocked.get(k.min(blocked.len().saturating_sub(1))).copied().unwrap_or(0.0);
        json!({
            "blocked": blocked.len(),
            "blocked_p50": bat(blocked.len() / 2),
            "blocked_p99": bat(blocked.len() * 99 / 100),
            "pages": n,
            "us_per_fault": if n == 0 { 0.0 } else { total / n as f64 },
            "p50": at(n / 2),
            "p99": at(n * 99 / 100),
            "max": at(n.saturating_sub(1)),
            "checksum": sum,
        })
    }

    /// The `memtouch` step (see `--script`): random pages of `first..=last` through mapping 0
    /// until a line arrives on stdin (checked every 256 accesses, without blocking).
    fn memtouch(&self, first: u64, last: u64, seed: u64) -> Result<serde_json::Value, String> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let span = last - first + 1;
        let words = self.page_size / 8;
        let mut x = seed | 1;
        let (mut accesses, mut blocked, mut blocked_us, mut worst_us, mut sum) =
            (0u64, 0u64, 0f64, 0f64, 0u64);
        let t0 = std::time::Instant::now();
        loop {
            for _ in 0..256 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = first + x % span;
                let word = (x >> 32) % words;
                let addr = self.bases[0] + page * self.page_size + word * 8;
                let s = std::time::Instant::now();
                // SAFETY: addr is an aligned word inside page `page` of mapping 0, a live mapping
                // of this process (checked against its size by the caller); the read may block
                // in the kernel until the broker places the page.
                sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(addr as *const u64) });
                let us = s.elapsed().as_secs_f64() * 1e6;
                accesses += 1;
                if us >= 10.0 {
                    blocked += 1;
                    blocked_us += us;
                }
                worst_us = worst_us.max(us);
            }
            let stdin = std::io::stdin();
            let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::ZERO).map_err(|e| format!("poll stdin: {e}"))? > 0 {
                read_stdin_line()?;
                break;
            }
        }
        Ok(json!({
            "accesses": accesses,
            "blocked": blocked,
            "blocked_us": blocked_us,
            "mean_blocked_us": if blocked == 0 { 0.0 } else { blocked_us / blocked as f64 },
            "worst_us": worst_us,
            "elapsed_us": t0.elapsed().as_secs_f64() * 1e6,
            "checksum": sum,
        }))
    }

    fn range(&self, spec: &str) -> Result<(std::ptr::NonNull<std::ffi::c_void>, usize), String> {
        let v = pages(spec)?;
        let (s, e) = (*v.first().ok_or("empty range")?, *v.last().ok_or("empty range")? + 1);
        let p = std::ptr::NonNull::new((self.bases[0] + s * self.page_size) as *mut std::ffi::c_void)
            .ok_or("null")?;
        Ok((p, usize_of((e - s) * self.page_size)))
    }

    fn step(&self, step: &str, who: &str, out: &mut impl Write) -> Result<(), String> {
        let (op, arg) = step.split_once(':').unwrap_or((step, ""));
        let result = match op {
            "touch" => json!({"who": who, "step": step, "pages": self.read(&pages(arg)?, 1)}),
            "touchall" => {
                json!({"who": who, "step": step, "pages": self.read(&pages(arg)?, self.bases.len())})
            }
            "timed" => {
                let t = self.timed(&pages(arg)?);
                json!({"who": who, "step": step, "timed": t})
            }
            "parallel" => {
                let list = pages(arg)?;
                let sums: Vec<u64> = std::thread::scope(|sc| {
                    let hs: Vec<_> = list
                        .iter()
                        .map(|&p| {
                            let addr = self.bases[0] + p * self.page_size;
                            // SAFETY: addr lies inside a live mapping made by this process; the
                            // read may block in the kernel until the broker places the page.
                            sc.spawn(move || u64::from(unsafe { std::ptr::read_volatile(addr as *const u8) }))
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap_or(0)).collect()
                });
                json!({"who": who, "step": step, "sum": sums.iter().sum::<u64>()})
            }
            "vcpus" => {
                if self.vcpus.is_empty() {
                    return Err("the vcpus step needs --vcpus N".into());
                }
                let mut shares = vec![Vec::new(); self.vcpus.len()];
                for (i, p) in pages(arg)?.into_iter().enumerate() {
                    shares[i % self.vcpus.len()].push(self.bases[0] + p * self.page_size);
                }
                for (v, share) in self.vcpus.iter().zip(shares) {
                    v.work.send(share).map_err(|_| "a vCPU thread died")?;
                }
                let mut sum = 0;
                for v in &self.vcpus {
                    sum += v.done.recv().map_err(|_| "a vCPU thread died")?;
                }
                let tids: Vec<u32> = self.vcpus.iter().map(|v| v.tid).collect();
                json!({"who": who, "step": step, "sum": sum, "vcpu_tids": tids})
            }
            "write" => {
                let (list, byte) = arg.rsplit_once(':').ok_or("write:LIST:BYTE")?;
                let byte: u8 = byte.parse().map_err(|_| "bad byte")?;
                for p in pages(list)? {
                    // SAFETY: the page lies inside this process's own writable mapping.
                    unsafe {
                        std::ptr::write_bytes((self.bases[0] + p * self.page_size) as *mut u8, byte, 8)
                    };
                }
                json!({"who": who, "step": step})
            }
            "remove" => {
                let (p, len) = self.range(arg)?;
                // SAFETY: the range lies inside this process's own mapping.
                unsafe { madvise(p, len, MmapAdvise::MADV_REMOVE) }.map_err(|e| format!("madvise: {e}"))?;
                json!({"who": who, "step": step})
            }
            "dontneed" => {
                let (p, len) = self.range(arg)?;
                // SAFETY: the range lies inside this process's own mapping.
                unsafe { madvise(p, len, MmapAdvise::MADV_DONTNEED) }.map_err(|e| format!("madvise: {e}"))?;
                json!({"who": who, "step": step})
            }
            "unmap" => {
                let (p, len) = self.range(arg)?;
                // SAFETY: unmapping part of this process's own mapping; the script must not touch
                // it afterwards.
                unsafe { munmap(p, len) }.map_err(|e| format!("munmap: {e}"))?;
                json!({"who": who, "step": step})
            }
            "dontneed-each" => {
                for p in pages(arg)? {
                    let addr =
                        std::ptr::NonNull::new((self.bases[0] + p * self.page_size) as *mut std::ffi::c_void)
                            .ok_or("null")?;
                    // SAFETY: the page lies inside this process's own private mapping; its
                    // contents may be dropped.
                    unsafe { madvise(addr, usize_of(self.page_size), MmapAdvise::MADV_DONTNEED) }
                        .map_err(|e| format!("madvise of page {p}: {e}"))?;
                }
                json!({"who": who, "step": step})
            }
            "dontneed-reserve" => {
                let (start, len) = self.reserve.ok_or("dontneed-reserve needs --reserve-anon")?;
                let p = std::ptr::NonNull::new(start as *mut std::ffi::c_void).ok_or("null")?;
                // SAFETY: the range is this process's own reserved mapping, holding nothing.
                unsafe { madvise(p, usize_of(len), MmapAdvise::MADV_DONTNEED) }
                    .map_err(|e| format!("madvise: {e}"))?;
                json!({"who": who, "step": step})
            }
            "memtouch" => {
                let (range, seed) = arg.rsplit_once(':').ok_or("memtouch:FIRST-LAST:SEED")?;
                let seed: u64 = seed.parse().map_err(|_| "memtouch: bad seed")?;
                let (first, last) = range.split_once('-').ok_or("memtouch:FIRST-LAST:SEED")?;
                let first: u64 = first.parse().map_err(|_| "memtouch: bad FIRST")?;
                let last: u64 = last.parse().map_err(|_| "memtouch: bad LAST")?;
                if last < first || (last + 1) * self.page_size > self.size {
                    return Err(format!("memtouch: pages {first}-{last} are not inside the mapping"));
                }
                json!({"who": who, "step": step, "memtouch": self.memtouch(first, last, seed)?})
            }
            "wait" => {
                read_stdin_line()?;
                json!({"who": who, "step": step})
            }
            other => return Err(format!("unknown step {other}")),
        };
        writeln!(out, "{result}").map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())
    }
}

/// Read one line from stdin, unbuffered (so polling fd 0 says whether another line is there).
fn read_stdin_line() -> Result<(), String> {
    let mut b = [0u8; 1];
    loop {
        match nix::unistd::read(std::io::stdin().as_raw_fd(), &mut b) {
            Ok(0) => return Ok(()),
            Ok(_) if b[0] == b'\n' => return Ok(()),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("read stdin: {e}")),
        }
    }
}

/// The registration over the control socket, and the client's duty at the broker's end: on
/// `postcopy_end` it unregisters its ranges, closes its userfaultfd and unregisters, so its
/// later fork(), MADV_REMOVE or munmap raise no event that nobody would read.
struct Registered {
    ctl: Option<ControlClient>,
    uffd: Option<Uffd>,
    ranges: Vec<(u64, u64)>,
    /// The control socket and the client ids, to reattach after a restart of the broker.
    path: Option<String>,
    ids: Vec<postcopy_broker::client_id::ClientId>,
}

impl Registered {
    /// Whether the broker's notification is waiting (or came with a response already).
    fn end_pending(&self, timeout: nix::poll::PollTimeout) -> Result<bool, String> {
        let Some(c) = &self.ctl else { return Ok(false) };
        if c.postcopy_ended().is_some() {
            return Ok(true);
        }
        let mut fds = [nix::poll::PollFd::new(c.as_fd(), nix::poll::PollFlags::POLLIN)];
        Ok(nix::poll::poll(&mut fds, timeout).map_err(|e| format!("poll: {e}"))? > 0)
    }

    /// Handle the broker's end if it has come.
    fn check(&mut self, out: &mut impl Write) -> Result<(), String> {
        if self.end_pending(nix::poll::PollTimeout::ZERO)? {
            self.end(out)?;
        }
        Ok(())
    }

    /// Read `postcopy_end` (or the broker's close) and do the client's part.
    fn end(&mut self, out: &mut impl Write) -> Result<(), String> {
        let Some(mut c) = self.ctl.take() else { return Ok(()) };
        let clients = match c.wait_postcopy_end() {
            Ok(clients) => clients,
            // The broker ended without a word (it died, or failed): keep the registration, the
            // pages that never arrived must not read as zeros. A broker restarted from the fd
            // store serves this client still: reattach, to hear its postcopy_end.
            Err(postcopy_broker::control::ControlError::PeerClosed) => {
                self.ctl = self.reattach(out)?;
                return Ok(());
            }
            Err(e) => return Err(format!("waiting for postcopy_end: {e}")),
        };
        if let Some(u) = self.uffd.take() {
            for &(start, len) in &self.ranges {
                u.unregister(start, len).map_err(|e| format!("UFFDIO_UNREGISTER at {start:#x}: {e}"))?;
            }
        }
        // Forked children (adopted after their parent, so later in the list) first: the
        // broker releases a parent's children with it.
        for &id in clients.iter().rev() {
            match c.unregister(id) {
                // The broker's grace after postcopy_end ran out while this client was busy: it
                // has stopped, and the ranges are unregistered here already.
                Ok(()) | Err(postcopy_broker::control::ControlError::PeerClosed) => {}
                Err(e) => return Err(format!("unregister {id}: {e}")),
            }
        }
        writeln!(out, "{}", json!({"who": "parent", "postcopy_end": clients})).map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())
    }

    /// After the broker's connection ended: connect again and reattach the client ids (the
    /// parked control socket queues the connection while a restarted broker starts; see
    /// [`ControlClient::reconnect`] for the retries). None when there is no broker that knows
    /// them (it died for good, or ran without an fd store, or ended).
    fn reattach(&self, out: &mut impl Write) -> Result<Option<ControlClient>, String> {
        let Some(path) = &self.path else { return Ok(None) };
        let r = ControlClient::reconnect(path, &self.ids, &ReattachPolicy::default())
            .and_then(|mut c| c.set_timeout(None).map(|()| c))
            .map_err(|e| e.to_string());
        let line = match &r {
            Ok(_) => json!({"who": "parent", "reattached": self.ids}),
            Err(e) => json!({"who": "parent", "reattach_failed": e}),
        };
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())?;
        Ok(r.ok())
    }

    /// Wait for a line on stdin, doing the client's part of the broker's end meanwhile.
    fn wait_line(&mut self, out: &mut impl Write) -> Result<(), String> {
        loop {
            let stdin = std::io::stdin();
            let mut fds = vec![nix::poll::PollFd::new(stdin.as_fd(), nix::poll::PollFlags::POLLIN)];
            if let Some(c) = &self.ctl {
                fds.push(nix::poll::PollFd::new(c.as_fd(), nix::poll::PollFlags::POLLIN));
            }
            if self.ctl.as_ref().is_some_and(|c| c.postcopy_ended().is_some()) {
                self.end(out)?;
                continue;
            }
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("poll: {e}")),
            }
            let ctl_ready = fds.get(1).and_then(|f| f.revents()).is_some_and(|r| !r.is_empty());
            let stdin_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
            if ctl_ready {
                self.end(out)?;
            } else if stdin_ready {
                return read_stdin_line();
            }
        }
    }
}

fn run(mut a: Args) -> Result<(), String> {
    let mut ctl = match (&a.control, a.firecracker) {
        (Some(path), false) => Some(ControlClient::connect(path).map_err(|e| e.to_string())?),
        _ => None,
    };
    let fd: Option<OwnedFd> = match (&a.memfd, &mut ctl) {
        (Some(path), _) => Some(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| format!("{path}: {e}"))?
                .into(),
        ),
        (None, Some(c)) => {
            c.hello("pcb-client").map_err(|e| e.to_string())?;
            let mut blocks = c.get_blocks(Some(vec![a.block.clone()])).map_err(|e| e.to_string())?;
            let (info, fd) = blocks.pop().ok_or("the broker sent no block")?;
            a.size = Some(info.size);
            a.page_size = info.page_size;
            Some(fd.ok_or("the broker sent the block without its fd")?)
        }
        (None, None) => None,
    };
    let size = a.size.ok_or("--size is needed without --control")?;
    let len = std::num::NonZeroUsize::new(usize_of(size)).ok_or("size 0")?;
    let mut want = match (&fd, a.page_size > 4096) {
        (None, _) => 0,
        (Some(_), true) => feature::MISSING_HUGETLBFS,
        (Some(_), false) => feature::MISSING_SHMEM,
    };
    for f in a.features.split(',').filter(|s| !s.is_empty()) {
        want |= match f {
            "remove" => feature::EVENT_REMOVE,
            "unmap" => feature::EVENT_UNMAP,
            "remap" => feature::EVENT_REMAP,
            "fork" => feature::EVENT_FORK,
            "thread_id" => feature::THREAD_ID,
            other => return Err(format!("unknown feature {other}")),
        };
    }
    if a.vcpus > 0 {
        want |= feature::THREAD_ID;
    }
    if a.anon {
        want &= !(feature::MISSING_SHMEM | feature::MISSING_HUGETLBFS);
    }
    let uffd = Uffd::open(want).map_err(|e| format!("userfaultfd: {e}"))?;
    let mut bases = Vec::new();
    for _ in 0..a.maps {
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        let populate = if a.prefault.as_deref() == Some("populate") {
            MapFlags::MAP_POPULATE
        } else {
            MapFlags::empty()
        };
        let p = match fd.as_ref().filter(|_| !a.anon) {
            // SAFETY: a fresh mapping chosen by the kernel; nothing in Rust aliases it.
            Some(fd) => unsafe { mmap(None, len, prot, MapFlags::MAP_SHARED | populate, fd.as_fd(), 0) },
            // SAFETY: as above.
            None if fd.is_none() && a.page_size == 2 << 20 => unsafe {
                mmap_anonymous(
                    None,
                    len,
                    prot,
                    MapFlags::MAP_PRIVATE | MapFlags::MAP_HUGETLB | MapFlags::MAP_HUGE_2MB,
                )
            },
            // SAFETY: as above.
            None => unsafe { mmap_anonymous(None, len, prot, MapFlags::MAP_PRIVATE) },
        }
        .map_err(|e| format!("mmap: {e}"))?;
        let base = p.as_ptr() as u64;
        match a.prefault.as_deref() {
            None | Some("populate") => {}
            Some("mlock") => {
                // SAFETY: the range is this process's own fresh mapping.
                unsafe { nix::sys::mman::mlock(p, usize_of(size)) }.map_err(|e| format!("mlock: {e}"))?
            }
            Some("touch") => {
                for off in (0..size).step_by(usize_of(a.page_size)) {
                    // SAFETY: the page lies inside the mapping just made; no uffd watches it yet.
                    let _ = unsafe { std::ptr::read_volatile((base + off) as *const u8) };
                }
            }
            Some(other) => return Err(format!("unknown --prefault {other}: mlock, populate or touch")),
        }
        uffd.register_missing(base, size).map_err(|e| format!("UFFDIO_REGISTER: {e}"))?;
        bases.push(base);
    }
    let reserve = match a.reserve_anon {
        Some(n) => {
            let len = std::num::NonZeroUsize::new(usize_of(n)).ok_or("--reserve-anon 0")?;
            // SAFETY: a fresh mapping chosen by the kernel; nothing in Rust aliases it.
            let p = unsafe {
                mmap_anonymous(
                    None,
                    len,
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
                )
            }
            .map_err(|e| format!("mmap of the reserve: {e}"))?;
            let start = p.as_ptr() as u64;
            uffd.register_missing(start, n).map_err(|e| format!("UFFDIO_REGISTER of the reserve: {e}"))?;
            Some((start, n))
        }
        None => None,
    };
    let mappings: Vec<_> =
        bases.iter().map(|b| json!({"client_addr": b, "block": 0, "block_offset": 0, "len": size})).collect();
    let mut client_id = None;
    let mut _fc_stream = None;
    let vcpus = (0..a.vcpus).map(|_| Vcpu::start()).collect::<Result<Vec<_>, _>>()?;
    let vcpu_tids: Vec<u32> = vcpus.iter().map(|v| v.tid).collect();
    if let Some(c) = &mut ctl {
        let specs: Vec<MappingSpec> = bases
            .iter()
            .map(|&b| MappingSpec { client_addr: b, block: a.block.clone(), offset: 0, len: size })
            .collect();
        let id = c
            .register_with_vcpus("pcb-client", ClientKind::Shared, None, &specs, &vcpu_tids, uffd.as_fd())
            .map_err(|e| format!("register: {e}"))?;
        client_id = Some(id);
    } else if let (Some(path), true) = (&a.control, a.firecracker) {
        let regions: Vec<FcRegion> = bases
            .iter()
            .map(|&b| FcRegion { base_host_virt_addr: b, size, offset: 0, page_size: a.page_size })
            .collect();
        _fc_stream =
            Some(send_firecracker_handshake(path, &regions, uffd.as_fd()).map_err(|e| e.to_string())?);
    }
    let mut out = std::io::stdout().lock();
    let ready = json!({"ready": true, "pid": std::process::id(), "uffd_fd": uffd.as_raw_fd(), "mappings": mappings, "client": client_id, "vcpu_tids": vcpu_tids});
    writeln!(out, "{ready}").map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    let mut ranges: Vec<(u64, u64)> = bases.iter().map(|&b| (b, size)).collect();
    ranges.extend(reserve);
    let mut reg = Registered {
        ctl: ctl.filter(|_| client_id.is_some()),
        uffd: Some(uffd),
        ranges,
        path: a.control.clone().filter(|_| client_id.is_some()),
        ids: client_id.into_iter().collect(),
    };
    if !a.no_wait {
        reg.wait_line(&mut out)?;
    }
    let client = Client { bases, size, page_size: a.page_size, reserve, vcpus };
    let steps: Vec<&str> = a.script.split(';').filter(|s| !s.is_empty()).collect();
    let mut i = 0;
    while i < steps.len() {
        reg.check(&mut out)?;
        if steps[i] == "fork" {
            if !client.vcpus.is_empty() {
                return Err("the fork step needs a single-threaded client: leave out --vcpus".into());
            }
            // SAFETY: this process is single-threaded; the child runs the rest of the script and
            // leaves with _exit.
            match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
                nix::unistd::ForkResult::Child => {
                    let mut failed = false;
                    for s in &steps[i + 1..] {
                        if let Err(e) = client.step(s, "child", &mut out) {
                            eprintln!("pcb-client child: {e}");
                            failed = true;
                            break;
                        }
                    }
                    let _ = writeln!(out, "{}", json!({"who": "child", "done": !failed}));
                    let _ = out.flush();
                    // SAFETY: _exit ends the forked child without running the parent's destructors.
                    unsafe { libc::_exit(i32::from(failed)) };
                }
                nix::unistd::ForkResult::Parent { child } => {
                    let _ = nix::sys::wait::waitpid(child, None);
                }
            }
            i += 1;
            continue;
        }
        if steps[i] == "wait" {
            reg.wait_line(&mut out)?;
            writeln!(out, "{}", json!({"who": "parent", "step": "wait"})).map_err(|e| e.to_string())?;
            out.flush().map_err(|e| e.to_string())?;
        } else {
            client.step(steps[i], "parent", &mut out)?;
        }
        i += 1;
    }
    writeln!(out, "{}", json!({"who": "parent", "done": true})).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    drop(reg);
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pcb-client: {e}");
            ExitCode::FAILURE
        }
    }
}
