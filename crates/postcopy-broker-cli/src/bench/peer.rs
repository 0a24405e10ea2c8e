//! A pcb-client process driven by the benchmark: spawned (a shared client of a block, or a
//! private one), its userfaultfd taken with pidfd_getfd(2) and registered with the broker, then
//! started and its JSON lines read.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::Value;

use postcopy_broker::client::{ClientId, MappingEntry, PrivateRegion};
use postcopy_broker::error::{Error, Result};
use postcopy_broker::fault::{pidfd_open, BrokerHandle, Registration, RegistrationMap};
use postcopy_broker::ram::RamBlock;

/// A running pcb-client.
#[derive(Debug)]
pub struct Peer {
    child: Child,
    out: BufReader<ChildStdout>,
    stdin: ChildStdin,
    ready: Value,
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("benchmark client: {what}"))
}

impl Peer {
    /// Start `exe` as a shared client of `block` (mapped once) running `script`, pinned to `cpus`
    /// (unless empty); read its ready line.
    pub fn spawn(exe: &Path, block: &RamBlock, script: &str, cpus: &[usize]) -> Result<Peer> {
        let fd = block.fd().ok_or_else(|| bad("the block has no fd"))?;
        let memfd = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
        let args = ["--memfd", &memfd, "--size", &block.size().to_string()].map(String::from);
        Self::spawn_with(exe, &args, block.page_size(), script, cpus)
    }

    /// Start `exe` as a private (Firecracker-style) client of `size` bytes of private anonymous
    /// memory in pages of `page_size` (hugetlb for 2 MiB), asking for REMOVE events as
    /// Firecracker does, running `script`, pinned to `cpus` (unless empty).
    pub fn spawn_private(
        exe: &Path,
        size: u64,
        page_size: u64,
        script: &str,
        cpus: &[usize],
    ) -> Result<Peer> {
        let args = ["--size".to_string(), size.to_string(), "--features".into(), "remove".into()];
        Self::spawn_with(exe, &args, page_size, script, cpus)
    }

    fn spawn_with(exe: &Path, args: &[String], page_size: u64, script: &str, cpus: &[usize]) -> Result<Peer> {
        let mut child = Command::new(exe)
            .args(args)
            .args(["--page-size", &page_size.to_string(), "--script", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| {
                Error::io(format!("start {} (build it: cargo build --release)", exe.display()), e)
            })?;
        if !cpus.is_empty() {
            if let Err(e) = crate::bench::sys::pin_pid(child.id(), cpus) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
        let out = BufReader::new(child.stdout.take().ok_or_else(|| bad("no stdout"))?);
        let stdin = child.stdin.take().ok_or_else(|| bad("no stdin"))?;
        let mut p = Peer { child, out, stdin, ready: Value::Null };
        p.ready = p.line()?;
        if p.ready["ready"] != true {
            return Err(bad(format!("did not start: {}", p.ready)));
        }
        Ok(p)
    }

    /// The next JSON line.
    pub fn line(&mut self) -> Result<Value> {
        let mut s = String::new();
        let n = self.out.read_line(&mut s).map_err(|e| Error::io("read from the client", e))?;
        if n == 0 {
            return Err(bad("exited early (see its stderr)"));
        }
        serde_json::from_str(&s).map_err(|e| bad(format!("bad line {s:?}: {e}")))
    }

    fn pid(&self) -> Result<u32> {
        self.ready["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).ok_or_else(|| bad("no pid"))
    }

    /// Take a duplicate of the client's userfaultfd.
    pub fn take_uffd(&self) -> Result<OwnedFd> {
        let pidfd = pidfd_open(self.pid()?).map_err(|e| Error::io("pidfd_open of the client", e))?;
        let target = self.ready["uffd_fd"].as_i64().ok_or_else(|| bad("no uffd_fd"))?;
        let target = libc::c_int::try_from(target).map_err(|_| bad("uffd_fd out of range"))?;
        // SAFETY: pidfd_getfd takes a pidfd, a fd number in that process and flags; it returns a
        // new fd in this process or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
        if fd < 0 {
            return Err(Error::io(
                "pidfd_getfd of the client's userfaultfd",
                std::io::Error::last_os_error(),
            ));
        }
        let fd = i32::try_from(fd).map_err(|_| bad("fd out of range"))?;
        // SAFETY: a fresh fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Register the client with the broker.
    pub fn register(&self, h: &BrokerHandle, name: &str) -> Result<ClientId> {
        let map: Vec<MappingEntry> = serde_json::from_value(self.ready["mappings"].clone())
            .map_err(|e| bad(format!("mappings: {e}")))?;
        h.register(Registration {
            name: name.into(),
            uffd: self.take_uffd()?,
            pid: Some(self.pid()?),
            map: RegistrationMap::Shared(map),
        })
    }

    /// Register a private client with the broker: each of its mappings is a region served from
    /// the broker's image at file offset 0, in pages of `page_size`.
    pub fn register_private(&self, h: &BrokerHandle, name: &str, page_size: u64) -> Result<ClientId> {
        let map: Vec<MappingEntry> = serde_json::from_value(self.ready["mappings"].clone())
            .map_err(|e| bad(format!("mappings: {e}")))?;
        let regions = map
            .iter()
            .map(|m| PrivateRegion { client_addr: m.client_addr, len: m.len, file_offset: 0, page_size })
            .collect();
        h.register(Registration {
            name: name.into(),
            uffd: self.take_uffd()?,
            pid: Some(self.pid()?),
            map: RegistrationMap::Private(regions),
        })
    }

    /// Send a line: starts the script, or answers a `wait` step.
    pub fn go(&mut self) -> Result<()> {
        writeln!(self.stdin)
            .and_then(|()| self.stdin.flush())
            .map_err(|e| Error::io("write to the client", e))
    }

    /// Read lines until the parent's done line and wait for the exit; returns every line.
    pub fn finish(&mut self) -> Result<Vec<Value>> {
        let mut lines = Vec::new();
        loop {
            let v = self.line()?;
            let done = v["who"] == "parent" && v["done"] == true;
            lines.push(v);
            if done {
                break;
            }
        }
        let st = self.child.wait().map_err(|e| Error::io("wait for the client", e))?;
        if !st.success() {
            return Err(bad(format!("exited with {st}")));
        }
        Ok(lines)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
