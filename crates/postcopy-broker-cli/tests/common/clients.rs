//! Client processes (pcb-client) for the fault-loop tests: guest RAM contents, spawning clients,
//! and taking a client's userfaultfd with pidfd_getfd(2).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use postcopy_broker::client::MappingEntry;
use postcopy_broker::fault::{Broker, BrokerConfig, BrokerHandle, Registration, RegistrationMap};
use postcopy_broker::ram::{RamBlock, RamBlocks};
use postcopy_broker::source::{MemorySource, PageSource};
use postcopy_broker::Incoming;
use serde_json::Value;

/// Deterministic contents: every fourth page zero, the rest pseudo-random.
pub fn content(pages: usize, ps: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; pages * ps];
    let mut x = seed | 1;
    for p in 0..pages {
        if p % 4 == 3 {
            continue;
        }
        for chunk in v[p * ps..(p + 1) * ps].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
    v
}

/// FNV-1a 64 as the client prints it.
pub fn fnv(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// /proc path that re-opens the block's memfd from another process.
pub fn memfd_path(b: &RamBlock) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), b.fd().expect("fd-backed block").as_raw_fd())
}

/// A broker over one memfd block of `pages` 4 KiB pages filled from `data`.
pub fn broker(pages: usize, data: &[u8], config: BrokerConfig) -> (Incoming, BrokerHandle) {
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", (pages * 4096) as u64).unwrap()).unwrap();
    broker_with(blocks, Box::new(MemorySource::new(vec![(data.to_vec(), 4096)])), config)
}

/// A broker over `blocks` with `source`.
pub fn broker_with(
    blocks: RamBlocks,
    source: Box<dyn PageSource>,
    config: BrokerConfig,
) -> (Incoming, BrokerHandle) {
    let mut inc = Incoming::new(blocks);
    inc.advise().unwrap();
    inc.listen().unwrap();
    let h = Broker::spawn(&inc, source, config).unwrap();
    (inc, h)
}

/// A running pcb-client process.
pub struct Peer {
    pub child: Child,
    out: BufReader<ChildStdout>,
    stdin: ChildStdin,
    pub ready: Value,
}

impl Peer {
    /// Start pcb-client with `args` and read its ready line.
    pub fn spawn(args: &[String]) -> Peer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pcb-client"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let stdin = child.stdin.take().unwrap();
        let mut p = Peer { child, out, stdin, ready: Value::Null };
        p.ready = p.line();
        assert_eq!(p.ready["ready"], true, "client did not start: {}", p.ready);
        p
    }

    /// The next JSON line.
    pub fn line(&mut self) -> Value {
        let mut s = String::new();
        self.out.read_line(&mut s).unwrap();
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("bad client line {s:?}: {e}"))
    }

    /// The client's pid.
    pub fn pid(&self) -> u32 {
        self.ready["pid"].as_u64().unwrap() as u32
    }

    /// Take a duplicate of the client's userfaultfd with pidfd_getfd(2).
    pub fn take_uffd(&self) -> OwnedFd {
        let pidfd = postcopy_broker::fault::pidfd_open(self.pid()).unwrap();
        let target = self.ready["uffd_fd"].as_i64().unwrap();
        // SAFETY: pidfd_getfd returns a new fd in this process or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target as libc::c_int, 0) };
        assert!(fd >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    /// The mapping table the client printed.
    pub fn mappings(&self) -> Vec<MappingEntry> {
        serde_json::from_value(self.ready["mappings"].clone()).unwrap()
    }

    /// Register this client with the broker (shared kind).
    pub fn register(&self, h: &BrokerHandle, name: &str) -> postcopy_broker::client::ClientId {
        self.register_fd(h, name, self.take_uffd())
    }

    /// Register this client with the broker using an already taken uffd.
    pub fn register_fd(
        &self,
        h: &BrokerHandle,
        name: &str,
        uffd: OwnedFd,
    ) -> postcopy_broker::client::ClientId {
        h.register(Registration {
            name: name.into(),
            uffd,
            pid: Some(self.pid()),
            map: RegistrationMap::Shared(self.mappings()),
        })
        .unwrap()
    }

    /// Send a line (starts the script, or answers a `wait` step).
    pub fn go(&mut self) {
        writeln!(self.stdin).unwrap();
        self.stdin.flush().unwrap();
    }

    /// [`Peer::finish`], killing the client after `secs` so that one that would fault forever
    /// fails the test instead of hanging it.
    pub fn finish_within(&mut self, secs: u64) -> Vec<Value> {
        let pid = self.pid();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let guard = std::thread::spawn(move || {
            if rx.recv_timeout(std::time::Duration::from_secs(secs)).is_err() {
                // SAFETY: kill(2) with a pid and a signal number.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        });
        let lines = self.finish();
        let _ = tx.send(());
        let _ = guard.join();
        lines
    }

    /// Read lines until the parent's done line; returns every line.
    pub fn finish(&mut self) -> Vec<Value> {
        let mut lines = Vec::new();
        loop {
            let v = self.line();
            let done = v["who"] == "parent" && v["done"] == true;
            lines.push(v);
            if done {
                break;
            }
        }
        let st = self.child.wait().unwrap();
        assert!(st.success(), "client exited with {st}");
        lines
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // A failed test must not leave a client blocked on a fault forever.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait until `fd` is readable (a fault is queued on a uffd), up to 20 s.
pub fn wait_readable(fd: &OwnedFd) {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, 20_000) };
    assert_eq!(n, 1, "no fault was queued");
}

/// Check every page a client reported against `data`; returns how many were checked.
pub fn check_pages(lines: &[Value], data: &[u8], ps: usize) -> usize {
    let mut n = 0;
    for l in lines {
        let Some(pages) = l["pages"].as_array() else { continue };
        for p in pages {
            let i = p["page"].as_u64().unwrap() as usize;
            assert_eq!(p["fnv"].as_str().unwrap(), fnv(&data[i * ps..(i + 1) * ps]), "page {i} in {l}");
            n += 1;
        }
    }
    n
}

/// pcb-client arguments for a shared client of `b`.
pub fn client_args(b: &RamBlock, maps: usize, script: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "--memfd".to_string(),
        memfd_path(b),
        "--size".into(),
        b.size().to_string(),
        "--page-size".into(),
        b.page_size().to_string(),
        "--maps".into(),
        maps.to_string(),
        "--script".into(),
        script.into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// A memory source that never answers requests for the pages in `held` (to keep a client
/// blocked on a fault) and answers every other request at once.
#[derive(Debug)]
pub struct HoldSource {
    pub inner: postcopy_broker::source::MemorySource,
    pub held: Vec<u64>,
}

impl postcopy_broker::source::PageSource for HoldSource {
    fn request(
        &mut self,
        req: postcopy_broker::source::PageRequest,
        sink: &mut dyn postcopy_broker::source::PageSink,
    ) -> postcopy_broker::Result<()> {
        let first = req.offset / 4096;
        let n = req.len / 4096;
        for p in first..first + n {
            if !self.held.contains(&p) {
                let one = postcopy_broker::source::PageRequest { offset: p * 4096, len: 4096, ..req };
                self.inner.request(one, sink)?;
            }
        }
        Ok(())
    }
    fn wants_background_pull(&self) -> bool {
        false
    }
}

/// A unique control socket path for a test.
pub fn socket_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("pcb-test-{}-{name}.sock", std::process::id()))
}

/// pcb-client arguments for a client that talks to the broker's control socket.
pub fn control_args(sock: &std::path::Path, script: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec!["--control".to_string(), sock.display().to_string(), "--script".into(), script.into()];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}
