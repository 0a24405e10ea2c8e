//! A tiny control-socket server for tests: a thread that polls a real `ControlListener` and its
//! connections, answers requests like a broker would, and reports what it saw over a channel.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use postcopy_broker::control::{
    BlockInfo, ControlConn, ControlError, ControlListener, FcRegion, Incoming, MappingSpec, PeerCreds,
    Request, Response,
};

/// What the test server saw.
#[derive(Debug)]
pub enum Event {
    /// A connection was accepted; `pidfd_ok` says whether a pidfd could be opened for its peer.
    Accepted { creds: PeerCreds, pidfd_ok: bool },
    /// A peer was refused.
    Refused { uid: u32 },
    /// A registration and the /proc link and number of its one fd.
    Register { name: String, mappings: Vec<MappingSpec>, fd_link: String, fd_num: RawFd },
    /// Any other request, by op.
    Request { op: &'static str },
    /// A Firecracker handshake and the /proc link of its uffd.
    Firecracker { regions: Vec<FcRegion>, fd_link: String },
    /// A connection failed; the error code replied (if any) and the error text.
    Failed { code: Option<&'static str>, text: String },
    /// A connection ended cleanly.
    Closed,
}

/// A running test server.
pub struct TestServer {
    pub path: PathBuf,
    pub events: Receiver<Event>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl TestServer {
    /// Next event, waiting up to a generous bound (a hang fails instead of blocking the suite).
    pub fn event(&self) -> Event {
        self.events.recv_timeout(Duration::from_secs(20)).expect("no event from the test server")
    }

    /// Skip events until one matches.
    pub fn wait_for(&self, mut f: impl FnMut(&Event) -> bool) -> Event {
        loop {
            let e = self.event();
            if f(&e) {
                return e;
            }
        }
    }
}

/// A unique socket path for this test.
pub fn temp_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("pcb-test-{}-{n}-{name}.sock", std::process::id()))
}

/// The /proc link of an fd of this process.
pub fn fd_link(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("<{e}>"))
}

/// A memfd of `size` bytes filled with `byte`.
pub fn memfd(name: &str, size: usize, byte: u8) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(
        &std::ffi::CString::new(name).unwrap(),
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .unwrap();
    let f = std::fs::File::from(fd);
    std::io::Write::write_all(&mut &f, &vec![byte; size]).unwrap();
    f.into()
}

/// Start a server on a fresh path with `allowed_uids`, serving `blocks` (name, size, fill byte).
pub fn start(name: &str, allowed_uids: Vec<u32>, blocks: Vec<(String, usize, u8)>) -> TestServer {
    let path = temp_path(name);
    let listener = ControlListener::bind(&path, allowed_uids).unwrap();
    let (tx, rx) = channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let blocks: Vec<(BlockInfo, OwnedFd)> = blocks
        .into_iter()
        .map(|(n, size, byte)| {
            let fd = memfd(&n, size, byte);
            (BlockInfo { name: n, size: size as u64, page_size: 4096, fd_index: None }, fd)
        })
        .collect();
    let thread = std::thread::spawn(move || serve(listener, tx, stop2, blocks));
    TestServer { path, events: rx, stop, thread: Some(thread) }
}

fn serve(
    listener: ControlListener,
    tx: Sender<Event>,
    stop: Arc<AtomicBool>,
    blocks: Vec<(BlockInfo, OwnedFd)>,
) {
    let mut conns: Vec<ControlConn> = Vec::new();
    let mut next_client = 1u64;
    while !stop.load(Ordering::SeqCst) {
        let ready: Vec<bool> = {
            let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            fds.extend(conns.iter().map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)));
            poll(&mut fds, PollTimeout::from(50u16)).unwrap();
            fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect()
        };
        if ready[0] {
            loop {
                match listener.accept() {
                    Ok(Some(c)) => {
                        let pidfd_ok = c.pidfd().is_ok();
                        let _ = tx.send(Event::Accepted { creds: c.creds(), pidfd_ok });
                        conns.push(c);
                    }
                    Ok(None) => break,
                    Err(ControlError::NotAllowed { uid, .. }) => {
                        let _ = tx.send(Event::Refused { uid });
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        }
        let mut keep = Vec::new();
        for (i, mut c) in conns.drain(..).enumerate() {
            if !ready.get(i + 1).copied().unwrap_or(true) {
                keep.push(c);
                continue;
            }
            // Events about a connection's end are sent after it is dropped, so a test that
            // counts fds after the event sees the connection closed.
            let ended = loop {
                match c.read_ready() {
                    Ok(msgs) if msgs.is_empty() => break None,
                    Ok(msgs) => {
                        for m in msgs {
                            handle(&mut c, m, &tx, &mut next_client, &blocks);
                        }
                    }
                    Err(ControlError::PeerClosed) => break Some(Event::Closed),
                    Err(e) => {
                        let _ = c.send_error(&e);
                        break Some(Event::Failed { code: e.code(), text: e.to_string() });
                    }
                }
            };
            match ended {
                None => keep.push(c),
                Some(ev) => {
                    drop(c);
                    let _ = tx.send(ev);
                }
            }
        }
        conns = keep;
    }
}

fn handle(
    c: &mut ControlConn,
    m: Incoming,
    tx: &Sender<Event>,
    next_client: &mut u64,
    blocks: &[(BlockInfo, OwnedFd)],
) {
    match m {
        Incoming::Request(req, fds) => match req {
            Request::Hello { version, .. } => {
                let _ = tx.send(Event::Request { op: "hello" });
                c.send(&Response::hello_reply(version), &[]).unwrap();
            }
            Request::Register { name, mappings, .. } => {
                let fd = &fds[0];
                let _ = tx.send(Event::Register {
                    name,
                    mappings,
                    fd_link: fd_link(fd.as_fd()),
                    fd_num: fd.as_raw_fd(),
                });
                c.send(&Response::Registered { client: *next_client }, &[]).unwrap();
                *next_client += 1;
            }
            Request::ProvideBlocks { .. }
            | Request::Dirty { .. }
            | Request::StartPostcopy
            | Request::Reattach { .. } => {
                let _ = tx.send(Event::Request { op: req.op() });
                c.send(&Response::error("refused", "not a source"), &[]).unwrap();
            }
            Request::Unregister { .. } => {
                let _ = tx.send(Event::Request { op: "unregister" });
                c.send(&Response::Ok, &[]).unwrap();
            }
            Request::GetBlocks { names } => {
                let _ = tx.send(Event::Request { op: "get_blocks" });
                let mut infos = Vec::new();
                let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
                for (info, fd) in blocks {
                    if names.as_ref().is_some_and(|n| !n.contains(&info.name)) {
                        continue;
                    }
                    let mut info = info.clone();
                    if fds.len() < 8 {
                        info.fd_index = Some(fds.len() as u32);
                        fds.push(fd.as_fd());
                    }
                    infos.push(info);
                }
                c.send(&Response::Blocks { blocks: infos }, &fds).unwrap();
            }
            Request::Status => {
                let _ = tx.send(Event::Request { op: "status" });
                c.send(&Response::Status { report: serde_json::json!({"clients": *next_client - 1}) }, &[])
                    .unwrap();
            }
        },
        Incoming::Firecracker(regions, uffd) => {
            let _ = tx.send(Event::Firecracker { regions, fd_link: fd_link(uffd.as_fd()) });
        }
    }
}

/// Read one raw reply frame's JSON from a plain stream (no client library).
pub fn read_reply(path_for_msg: &Path, s: &mut std::os::unix::net::UnixStream) -> serde_json::Value {
    use std::io::Read;
    let mut h = [0u8; 8];
    s.read_exact(&mut h).unwrap_or_else(|e| panic!("no reply header on {}: {e}", path_for_msg.display()));
    assert_eq!(&h[..4], b"PCB1");
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    serde_json::from_slice(&p).unwrap()
}
