//! The broker's side of the control socket: [`ControlListener`] (bind with mode 0600, accept with
//! SO_PEERCRED uid check) and [`ControlConn`] (one non-blocking connection: buffered reads that
//! yield typed messages, replies that never block on a peer that does not read).
//!
//! Both expose their fd for the fault loop's epoll; neither owns a thread.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

use super::error::ControlError;
use super::fdpass::{recv_with_fds, send_all};
use super::frame::{encode_message, MAX_FDS};
use super::message::{Incoming, ServerDecoder};
use super::protocol::Response;

/// Pending connections the kernel queues before `accept`.
const BACKLOG: i32 = 128;
/// At most this many `recvmsg` calls per [`ControlConn::read_up_to`], so one busy peer cannot
/// hold the loop; call again to continue.
const MAX_READS_PER_CALL: usize = 16;
/// Bytes per `recvmsg`. Read into the stack, not a buffer per connection: an idle connection
/// then costs only its decoder's (empty) buffer.
const READ_CHUNK: usize = 16 * 1024;

/// The peer's credentials as the kernel recorded them at `connect` (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCreds {
    /// Process id (0 if the peer is in a pid namespace we cannot see).
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Open a pidfd for `pid` (pidfd_open(2), Linux 5.3). It becomes readable when the process exits.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("pid {pid} cannot be watched (peer in another pid namespace?)"),
        ));
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(r).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidData, format!("pidfd_open returned {r}, not an fd"))
    })?;
    // SAFETY: fd is a new fd that this process owns and nobody else refers to.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pidfd of the process at the other end of a connected Unix socket (SO_PEERPIDFD, Linux 6.5),
/// the process that called `connect`. Unlike `pidfd_open` of the SO_PEERCRED pid it works for a
/// peer in a pid namespace the broker cannot see (whose pid reads as 0) and cannot name another
/// process that reused the pid. It becomes readable when that process exits.
pub fn peer_pidfd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    #[allow(clippy::cast_possible_truncation)] // the size of a c_int: 4
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`, a live c_int, and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if fd < 0 {
        return Err(io::Error::other("SO_PEERPIDFD returned no fd"));
    }
    // SAFETY: the kernel installed a new fd for us that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The listening control socket.
#[derive(Debug)]
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we created, so Drop removes only our own file.
    ident: Option<(u64, u64)>,
    allowed_uids: Vec<u32>,
}

impl ControlListener {
    /// The default allowed list: root and the broker's effective uid.
    pub fn default_allowed_uids() -> Vec<u32> {
        let euid = nix::unistd::geteuid().as_raw();
        if euid == 0 {
            vec![0]
        } else {
            vec![0, euid]
        }
    }

    /// Create the control socket at `path` with mode 0600, non-blocking, accepting peers whose uid
    /// is in `allowed_uids` (exactly this list; see [`Self::default_allowed_uids`]). A stale socket
    /// file at `path` is replaced; a live one (someone accepts connections) or a non-socket file
    /// is an error.
    pub fn bind(path: impl AsRef<Path>, allowed_uids: Vec<u32>) -> Result<ControlListener, ControlError> {
        let path = path.as_ref();
        let shown = path.display();
        match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ControlError::io(
                        format!("control socket {shown}"),
                        io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another process is listening on it; stop that broker or choose another path",
                        ),
                    ));
                }
                log::info!("removing stale control socket {shown}");
                fs::remove_file(path)
                    .map_err(|e| ControlError::io(format!("removing stale control socket {shown}"), e))?;
            }
            Ok(_) => {
                return Err(ControlError::Invalid(format!(
                    "{shown} exists and is not a socket; refusing to replace it, choose another control path"
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ControlError::io(format!("checking control socket path {shown}"), e)),
        }
        let nix_io =
            |what: &str, e: nix::Error| ControlError::io(format!("{what} {shown}"), io::Error::from(e));
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| nix_io("creating control socket", e))?;
        let addr = UnixAddr::new(path).map_err(|e| nix_io("control socket path too long?", e))?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(|e| nix_io("binding control socket", e))?;
        // Nobody can connect before listen(), so tightening the mode here leaves no window.
        let ident = match fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .and_then(|()| fs::symlink_metadata(path))
        {
            Ok(m) => Some((m.dev(), m.ino())),
            Err(e) => {
                let _ = fs::remove_file(path);
                return Err(ControlError::io(format!("setting mode 0600 on control socket {shown}"), e));
            }
        };
        let backlog = Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN);
        if let Err(e) = socket::listen(&fd, backlog) {
            let _ = fs::remove_file(path);
            return Err(nix_io("listening on control socket", e));
        }
        log::info!("control socket {shown} listening (mode 0600, allowed uids {allowed_uids:?})");
        Ok(ControlListener {
            listener: UnixListener::from(fd),
            path: path.to_path_buf(),
            ident,
            allowed_uids,
        })
    }

    /// Take over a listening Unix stream socket someone else created (socket activation: the
    /// service manager made the file and its mode, and removes it; so the file stays when this
    /// listener is dropped). It is made non-blocking; anything but a listening Unix stream
    /// socket is refused.
    pub fn from_fd(fd: OwnedFd, allowed_uids: Vec<u32>) -> Result<ControlListener, ControlError> {
        let bad = |what: String| ControlError::Invalid(format!("the inherited control socket {what}"));
        let e = |what: &str, err: nix::Error| bad(format!("{what}: {err}"));
        if socket::getsockopt(&fd, sockopt::SockType).map_err(|er| e("SO_TYPE", er))? != SockType::Stream {
            return Err(bad("is not a stream socket (ListenStream= in the .socket unit)".into()));
        }
        if !socket::getsockopt(&fd, sockopt::AcceptConn).map_err(|er| e("SO_ACCEPTCONN", er))? {
            return Err(bad("is not listening".into()));
        }
        let addr: UnixAddr = socket::getsockname(fd.as_raw_fd())
            .map_err(|_| bad("is not a Unix socket (give ListenStream= a path)".into()))?;
        let path = addr.path().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("(unnamed)"));
        let listener = UnixListener::from(fd);
        listener
            .set_nonblocking(true)
            .map_err(|er| ControlError::io("making the inherited control socket non-blocking", er))?;
        log::info!(
            "control socket {} inherited from the service manager (allowed uids {allowed_uids:?})",
            path.display()
        );
        Ok(ControlListener { listener, path, ident: None, allowed_uids })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The uids allowed to connect.
    pub fn allowed_uids(&self) -> &[u32] {
        &self.allowed_uids
    }

    /// Accept one pending connection. `Ok(None)`: none pending. A peer whose uid is not allowed
    /// gets an `error` reply with code `not-allowed`, is closed, and is reported as
    /// `Err(ControlError::NotAllowed)`; keep accepting after it. Other errors (EMFILE...) are
    /// `Err(ControlError::Io)`.
    pub fn accept(&self) -> Result<Option<ControlConn>, ControlError> {
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    return Err(ControlError::io(
                        format!("accepting on control socket {}", self.path.display()),
                        e,
                    ))
                }
            }
        };
        stream
            .set_nonblocking(true)
            .map_err(|e| ControlError::io("making a control connection non-blocking", e))?;
        let cred = socket::getsockopt(&stream, sockopt::PeerCredentials).map_err(|e| {
            ControlError::io("reading SO_PEERCRED of a control connection", io::Error::from(e))
        })?;
        let creds = PeerCreds { pid: cred.pid(), uid: cred.uid(), gid: cred.gid() };
        let mut conn = ControlConn::new(stream, creds);
        if !self.allowed_uids.contains(&creds.uid) {
            let err = ControlError::NotAllowed { uid: creds.uid, pid: creds.pid };
            log::warn!(
                "control socket: refusing pid {} uid {}: not in the allowed list",
                creds.pid,
                creds.uid
            );
            let _ = conn.send_error(&err);
            return Err(err);
        }
        log::debug!("control socket: accepted pid {} uid {} gid {}", creds.pid, creds.uid, creds.gid);
        Ok(Some(conn))
    }
}

impl AsRawFd for ControlListener {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl AsFd for ControlListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

impl Drop for ControlListener {
    /// Remove the socket file if it is still the one we created.
    fn drop(&mut self) {
        if let (Some((dev, ino)), Ok(m)) = (self.ident, fs::symlink_metadata(&self.path)) {
            if m.dev() == dev && m.ino() == ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// One accepted control connection (non-blocking).
#[derive(Debug)]
pub struct ControlConn {
    stream: UnixStream,
    creds: PeerCreds,
    decoder: ServerDecoder,
    /// An error or end of file found after messages that were returned first.
    pending: Option<ControlError>,
    /// The last [`Self::read_up_to`] stopped at its message budget: more may be decoded
    /// without the socket becoming readable again.
    budget_spent: bool,
}

impl ControlConn {
    fn new(stream: UnixStream, creds: PeerCreds) -> ControlConn {
        ControlConn { stream, creds, decoder: ServerDecoder::new(), pending: None, budget_spent: false }
    }

    /// The peer's credentials (SO_PEERCRED at accept).
    pub fn creds(&self) -> PeerCreds {
        self.creds
    }

    /// A pidfd for the peer process, to watch its exit.
    pub fn pidfd(&self) -> io::Result<OwnedFd> {
        pidfd_open(self.creds.pid)
    }

    /// A pidfd of the process that connected, also when its pid is not visible ([`peer_pidfd`]).
    pub fn peer_pidfd(&self) -> io::Result<OwnedFd> {
        peer_pidfd(self.stream.as_fd())
    }

    /// Whether the peer reads the broker's replies: every peer of our protocol does; one that
    /// began Firecracker's handshake (or whose first waiting byte is `[`) reads none.
    pub fn reads_replies(&self) -> bool {
        self.decoder.reads_replies(self.stream.as_fd())
    }

    /// Read what the socket holds and decode it. Call when epoll says readable, and keep calling
    /// until it returns an empty `Vec` (nothing more for now) or an `Err`. Same as
    /// [`Self::read_up_to`] without a message budget.
    pub fn read_ready(&mut self) -> Result<Vec<Incoming>, ControlError> {
        self.read_up_to(usize::MAX)
    }

    /// Decode at most `max` messages, reading the socket only when no complete message is
    /// buffered (so what a pipelining peer has sent waits in its own socket buffer, not in the
    /// broker's memory). When the budget stops it, [`Self::has_buffered`] is true: call again
    /// later even if epoll does not report the socket, because the rest may already be read.
    ///
    /// Messages received before a failure are returned first and the failure on the next call.
    /// `Err(ControlError::PeerClosed)` is a clean end of file; every other `Err` means the peer
    /// misbehaved: reply with [`Self::send_error`] and close this connection. Fds that came with
    /// a bad message are closed.
    pub fn read_up_to(&mut self, max: usize) -> Result<Vec<Incoming>, ControlError> {
        self.budget_spent = false;
        if let Some(e) = self.pending.take() {
            return Err(e);
        }
        let mut out = Vec::new();
        let mut failure = None;
        let mut reads = 0;
        let mut buf = [0u8; READ_CHUNK];
        while out.len() < max {
            match self.decoder.next_incoming() {
                Ok(Some(m)) => {
                    out.push(m);
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
            if reads == MAX_READS_PER_CALL {
                break;
            }
            reads += 1;
            let r = match recv_with_fds(self.stream.as_fd(), &mut buf, true) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    failure = Some(ControlError::PeerClosed);
                    break;
                }
                Err(e) => {
                    failure = Some(ControlError::io("reading a control connection", e));
                    break;
                }
            };
            if r.bytes == 0 {
                drop(r.fds);
                failure = Some(match self.decoder.finish() {
                    Ok(()) => ControlError::PeerClosed,
                    Err(e) => e,
                });
                break;
            }
            if r.fds_truncated {
                failure =
                    Some(ControlError::TooManyFds { op: "frame".into(), max: MAX_FDS, got: r.fds.len() + 1 });
                break;
            }
            self.decoder.push(&buf[..r.bytes], r.fds);
        }
        self.budget_spent = out.len() >= max && failure.is_none();
        match failure {
            Some(e) if out.is_empty() => Err(e),
            Some(e) => {
                self.pending = Some(e);
                Ok(out)
            }
            None => Ok(out),
        }
    }

    /// Whether messages or a failure may be waiting in this connection's buffers, where epoll
    /// cannot see them: the last read stopped at its budget, or a failure follows the messages
    /// it returned.
    pub fn has_buffered(&self) -> bool {
        self.budget_spent || self.pending.is_some()
    }

    /// Send one response with `fds` attached (at most 8). Never blocks: if the peer's socket
    /// buffer is full the result is `Err(ControlError::PeerNotReading)`; drop the connection.
    pub fn send(&mut self, resp: &Response, fds: &[BorrowedFd<'_>]) -> Result<(), ControlError> {
        self.send_message(resp, fds)
    }

    /// [`Self::send`] for any message that serializes as a response does, such as a
    /// [`StatusReply`](super::protocol::StatusReply) (serialized once, without an intermediate
    /// `serde_json::Value`).
    pub fn send_message<T: serde::Serialize>(
        &mut self,
        resp: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ControlError> {
        if fds.len() > MAX_FDS {
            return Err(ControlError::Invalid(format!(
                "a reply can carry at most {MAX_FDS} fds, asked to send {}",
                fds.len()
            )));
        }
        let frame = encode_message(resp)?;
        send_all(self.stream.as_fd(), &frame, fds, true).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => ControlError::PeerNotReading,
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ControlError::PeerClosed,
            _ => ControlError::io("replying on a control connection", e),
        })
    }

    /// Reply with the `error` response for `err`, if it has one ([`ControlError::to_response`]).
    /// Nothing is sent to a peer that reads no replies ([`Self::reads_replies`]: a `PCB1` frame
    /// would be garbage to Firecracker). Log the error instead.
    pub fn send_error(&mut self, err: &ControlError) -> Result<(), ControlError> {
        if !self.reads_replies() {
            return Ok(());
        }
        match err.to_response() {
            Some(r) => self.send(&r, &[]),
            None => Ok(()),
        }
    }
}

impl AsRawFd for ControlConn {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl AsFd for ControlConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}
