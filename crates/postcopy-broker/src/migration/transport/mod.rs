//! The protection of a migration connection. [`Security`] is what the command line chose, the
//! same on both ends:
//!
//! - **TLS** (`--tls-dir DIR`): mutual TLS 1.3 with rustls; both ends present a certificate
//!   signed by the CA of `DIR/ca-cert.pem` (QEMU's tls-creds-x509 directory layout, see [`tls`]);
//! - **pre-shared key** (`--key FILE`): the Noise protocol's `NNpsk0` pattern keyed by the file
//!   (see [`noise`]);
//! - **authenticated plaintext** (`--key FILE --insecure-plaintext`): the PSK challenge-response
//!   of [`auth`](super::auth) and then no protection at all, for links the operator trusts.
//!
//! The handshake ([`Security::connect`] on the source, [`Security::accept`] on the destination,
//! both under one deadline) turns a [`TcpStream`] into a [`Transport`]. From then on every byte of
//! the wire protocol goes through the transport: encrypted, integrity-protected and numbered (a
//! changed, dropped, reordered or replayed record fails the connection) in the TLS and PSK modes.
//! A transport behaves like the socket under it: clones share the connection, one thread may
//! read while another writes, reads and writes are blocking or not as the socket is, and every
//! `write` sends what it was given before it returns (non-blocking: see
//! [`Transport::wants_write`]).

pub mod deadline;
pub mod noise;
mod readahead;
mod sealed;
#[cfg(test)]
mod tests;
pub mod throwaway;
pub mod tls;
mod write_bound;

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::auth::{authenticate, load_key, AuthError};
use super::wire::{write_frame, Frame, Side, MAGIC};
use deadline::Deadline;
pub use readahead::{Opened, HEADROOM};
use readahead::{ReadAhead, Wait};
use sealed::{Rx, Tx};
pub use write_bound::DEFAULT_WRITE_TIMEOUT;

/// How long a handshake may take, per connection, when the caller gives no other deadline.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which protection a transport has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Mutual TLS 1.3.
    Tls,
    /// Noise NNpsk0 with the pre-shared key.
    Psk,
    /// Plaintext after the PSK challenge-response (`--insecure-plaintext`).
    Plaintext,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Tls => "TLS 1.3",
            Mode::Psk => "pre-shared key (Noise NNpsk0)",
            Mode::Plaintext => "INSECURE plaintext",
        })
    }
}

/// Why a transport could not be set up, or its handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A file of the TLS directory or the key file cannot be used.
    #[error("{path}: {why}")]
    Setup {
        /// The file or directory.
        path: String,
        /// What is wrong and what to do.
        why: String,
    },
    /// The command line does not name a usable protection.
    #[error("{0}")]
    Options(String),
    /// Authentication failed: one end refused the other's certificate or key. Retrying cannot
    /// help.
    #[error("{0}")]
    Refused(String),
    /// The two ends use different protections (TLS on one, a pre-shared key on the other).
    #[error("{0}")]
    Mismatch(String),
    /// The PSK challenge-response of the plaintext mode failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The peer closed the connection during the handshake.
    #[error("the peer at {0} closed the connection during the handshake")]
    Closed(SocketAddr),
    /// The handshake did not finish in time.
    #[error("the peer at {peer} did not finish the handshake within {timeout:?}")]
    Timeout {
        /// The peer.
        peer: SocketAddr,
        /// The deadline it missed.
        timeout: Duration,
    },
    /// A socket error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl TransportError {
    /// Whether one end refused the other (wrong certificate, key, or protection): trying again
    /// with the same settings cannot succeed.
    pub fn is_refusal(&self) -> bool {
        match self {
            TransportError::Refused(_) | TransportError::Mismatch(_) | TransportError::Setup { .. } => true,
            TransportError::Auth(e) => matches!(
                e,
                AuthError::WrongKey
                    | AuthError::RefusedByPeer
                    | AuthError::SameSide(_)
                    | AuthError::PeerError(_)
            ),
            _ => false,
        }
    }

    fn io(context: impl Into<String>, source: io::Error) -> TransportError {
        TransportError::Io { context: context.into(), source }
    }
}

/// The protection options of `source` and `serve --incoming`, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct TransportOptions {
    /// `--tls-dir`: the TLS directory (mutual TLS 1.3).
    pub tls_dir: Option<PathBuf>,
    /// `--tls-peer-name`: the name the peer's certificate must be valid for.
    pub tls_peer_name: Option<String>,
    /// `--key`: the pre-shared key file.
    pub key: Option<PathBuf>,
    /// `--insecure-plaintext`: no encryption after the PSK challenge-response.
    pub insecure_plaintext: bool,
}

impl TransportOptions {
    /// The [`Security`] of `side` these options ask for (reads only that side's files).
    pub fn security(&self, side: Side) -> Result<Security, TransportError> {
        match (&self.tls_dir, &self.key, self.insecure_plaintext) {
            (Some(_), Some(_), _) => Err(TransportError::Options(
                "give either --tls-dir (mutual TLS) or --key (pre-shared key), not both".into(),
            )),
            (Some(_), None, true) | (None, None, true) => Err(TransportError::Options(
                "--insecure-plaintext needs --key FILE (the plaintext mode still authenticates both ends with the key)".into(),
            )),
            (Some(dir), None, false) => match side {
                Side::Source => tls::TlsSetup::source(dir, self.tls_peer_name.as_deref()).map(Security::tls),
                Side::Destination => {
                    tls::TlsSetup::destination(dir, self.tls_peer_name.as_deref()).map(Security::tls)
                }
            },
            (None, Some(_), _) if self.tls_peer_name.is_some() => {
                Err(TransportError::Options("--tls-peer-name needs --tls-dir".into()))
            }
            (None, Some(path), plaintext) => {
                let key = load_key(path)?;
                if plaintext {
                    Ok(Security::insecure_plaintext(key))
                } else {
                    Security::psk(&key)
                }
            }
            (None, None, false) => Err(TransportError::Options(
                "the migration connection needs a protection: --tls-dir DIR (mutual TLS, see docs/security.md) or --key FILE (pre-shared key)".into(),
            )),
        }
    }
}

#[derive(Clone)]
enum Kind {
    Tls(Arc<tls::TlsSetup>),
    Psk(noise::Psk),
    Plaintext(Arc<Vec<u8>>),
}

/// The protection both ends of a migration use, ready to run handshakes (cheap to clone).
#[derive(Clone)]
pub struct Security {
    kind: Kind,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "Security({})", self.mode())
    }
}

impl Security {
    /// Mutual TLS with `setup` (see [`tls::TlsSetup::source`] and
    /// [`tls::TlsSetup::destination`]).
    pub fn tls(setup: tls::TlsSetup) -> Security {
        Security { kind: Kind::Tls(Arc::new(setup)) }
    }

    /// Noise NNpsk0 keyed by `key` (the bytes of a key file, at least 16).
    pub fn psk(key: &[u8]) -> Result<Security, TransportError> {
        if key.len() < super::auth::MIN_KEY_LEN {
            return Err(AuthError::ShortKey(key.len()).into());
        }
        Ok(Security { kind: Kind::Psk(noise::Psk::derive(key)?) })
    }

    /// Plaintext after the PSK challenge-response with `key`: no confidentiality, no integrity.
    pub fn insecure_plaintext(key: Vec<u8>) -> Security {
        Security { kind: Kind::Plaintext(Arc::new(key)) }
    }

    /// The protection.
    pub fn mode(&self) -> Mode {
        match self.kind {
            Kind::Tls(_) => Mode::Tls,
            Kind::Psk(_) => Mode::Psk,
            Kind::Plaintext(_) => Mode::Plaintext,
        }
    }

    /// The source's handshake on a connection to `addr` (HOST:PORT, whose host the destination's
    /// certificate must name unless `--tls-peer-name` says otherwise), within `timeout`.
    pub fn connect(
        &self,
        stream: TcpStream,
        addr: &str,
        timeout: Duration,
    ) -> Result<Transport, TransportError> {
        let peer = stream.peer_addr().map_err(|e| TransportError::io("peer address", e))?;
        let end = Instant::now() + timeout;
        prepare(&stream)?;
        let done = {
            let mut io = Deadline::new(&stream, end);
            match &self.kind {
                Kind::Tls(setup) => {
                    setup.connect(&mut io, addr).map(|(c, id)| (Some(Sealer::Tls(Box::new(c))), id))
                }
                Kind::Psk(psk) => psk.connect(&mut io).map(|s| (Some(Sealer::Noise(Box::new(s))), None)),
                Kind::Plaintext(key) => {
                    authenticate(&mut io, key, Side::Source).map(|()| (None, None)).map_err(Into::into)
                }
            }
        };
        let (sealer, identity) = done.map_err(|e| timed_out(e, &stream, peer, timeout))?;
        Transport::new(stream, peer, sealer, identity)
    }

    /// The destination's handshake on an accepted connection, within `timeout`. A peer that uses
    /// another protection is told so (an Error frame) and refused.
    pub fn accept(&self, stream: TcpStream, timeout: Duration) -> Result<Transport, TransportError> {
        let peer = stream.peer_addr().map_err(|e| TransportError::io("peer address", e))?;
        let end = Instant::now() + timeout;
        prepare(&stream)?;
        let done = (|| {
            let mut io = Deadline::new(&stream, end);
            self.check_peer_mode(&stream, &mut io, peer)?;
            match &self.kind {
                Kind::Tls(setup) => setup.accept(&mut io).map(|(c, id)| (Some(Sealer::Tls(Box::new(c))), id)),
                Kind::Psk(psk) => psk.accept(&mut io).map(|s| (Some(Sealer::Noise(Box::new(s))), None)),
                Kind::Plaintext(key) => {
                    authenticate(&mut io, key, Side::Destination).map(|()| (None, None)).map_err(Into::into)
                }
            }
        })();
        let (sealer, identity) = done.map_err(|e| timed_out(e, &stream, peer, timeout))?;
        Transport::new(stream, peer, sealer, identity)
    }

    /// Peek at the peer's first bytes: a TLS record, or one of our frames (AuthNonce: plaintext
    /// mode, Handshake: PSK mode). Refuse a peer of another mode with a message that says so.
    fn check_peer_mode(
        &self,
        stream: &TcpStream,
        io: &mut Deadline<'_, TcpStream>,
        peer: SocketAddr,
    ) -> Result<(), TransportError> {
        let mut head = [0u8; 5];
        let n = io.peek(&mut head).map_err(|e| TransportError::io("read the peer's first bytes", e))?;
        if n == 0 {
            return Err(TransportError::Closed(peer));
        }
        let theirs = if head[0] == tls::RECORD_HANDSHAKE {
            Mode::Tls
        } else if n >= 5 && head[..4] == MAGIC.to_le_bytes() {
            if head[4] == super::wire::FrameType::Handshake as u8 {
                Mode::Psk
            } else {
                Mode::Plaintext
            }
        } else if n < 5 && MAGIC.to_le_bytes().starts_with(&head[..n]) {
            return Ok(()); // too few bytes to tell yet; the handshake itself will see
        } else {
            return Err(TransportError::Refused(format!(
                "the peer at {peer} does not speak the migration protocol (its first bytes are {:02x?})",
                &head[..n]
            )));
        };
        let ours = self.mode();
        if theirs == ours {
            return Ok(());
        }
        let text = format!(
            "this destination uses {ours} ({}) but the source at {peer} uses {theirs}; give both ends the same --tls-dir or --key options",
            mode_option(ours)
        );
        let mut s = stream;
        let _ = write_frame(&mut s, &Frame::Error { text: &text });
        Err(TransportError::Mismatch(text))
    }
}

fn mode_option(m: Mode) -> &'static str {
    match m {
        Mode::Tls => "--tls-dir",
        Mode::Psk => "--key",
        Mode::Plaintext => "--key --insecure-plaintext",
    }
}

fn prepare(stream: &TcpStream) -> Result<(), TransportError> {
    stream.set_nonblocking(false).map_err(|e| TransportError::io("set the connection blocking", e))?;
    stream.set_nodelay(true).map_err(|e| TransportError::io("set TCP_NODELAY", e))
}

/// Turn the errors of a handshake that ran out of time into [`TransportError::Timeout`].
fn timed_out(e: TransportError, stream: &TcpStream, peer: SocketAddr, timeout: Duration) -> TransportError {
    let _ = stream.shutdown(Shutdown::Both);
    let late = |k: io::ErrorKind| matches!(k, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut);
    match &e {
        TransportError::Io { source, .. } if late(source.kind()) => TransportError::Timeout { peer, timeout },
        TransportError::Auth(AuthError::Timeout(_)) => TransportError::Timeout { peer, timeout },
        _ => e,
    }
}

/// The record protection of a protected transport.
enum Sealer {
    Tls(Box<tls::Records>),
    Noise(Box<snow::StatelessTransportState>),
}

struct Inner {
    sock: TcpStream,
    peer: SocketAddr,
    /// None: plaintext (reads and writes go straight to the socket).
    sealer: Option<Arc<Sealer>>,
    rx: Mutex<Rx>,
    /// Records opened by a thread of their own ([`Transport::read_ahead`]); `rx` is then unused.
    ahead: Mutex<Option<ReadAhead>>,
    /// The read timeout last set (what a read-ahead consumer waits at most).
    read_timeout: Mutex<Option<Duration>>,
    tx: Mutex<Tx>,
    nonblocking: AtomicBool,
    identity: Option<Vec<u8>>,
    /// The bound of [`Transport::bound_writes`], ms (0: none).
    write_bound_ms: AtomicU64,
}

/// One migration connection after its handshake (see the module doc). Clones share it.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("peer", &self.inner.peer).field("mode", &self.mode()).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a half-sealed record behind (records are
    // appended whole), so the state stays usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Transport {
    fn new(
        sock: TcpStream,
        peer: SocketAddr,
        sealer: Option<Sealer>,
        identity: Option<Vec<u8>>,
    ) -> Result<Transport, TransportError> {
        sock.set_read_timeout(None).map_err(|e| TransportError::io("clear the read timeout", e))?;
        sock.set_write_timeout(None).map_err(|e| TransportError::io("clear the write timeout", e))?;
        let (rx_seq, tx_seq) = match &sealer {
            Some(Sealer::Tls(r)) => r.seqs,
            _ => (0, 0),
        };
        let inner = Inner {
            sock,
            peer,
            sealer: sealer.map(Arc::new),
            rx: Mutex::new(Rx { nonce: rx_seq, ..Rx::default() }),
            ahead: Mutex::new(None),
            read_timeout: Mutex::new(None),
            tx: Mutex::new(Tx::starting_at(tx_seq)),
            nonblocking: AtomicBool::new(false),
            identity,
            write_bound_ms: AtomicU64::new(0),
        };
        Ok(Transport { inner: Arc::new(inner) })
    }

    /// A transport without protection over `sock`, for tests and tools that speak the wire
    /// protocol on a connection they trust (the migration itself always runs a handshake).
    pub fn unprotected(sock: TcpStream) -> io::Result<Transport> {
        let peer = sock.peer_addr()?;
        Transport::new(sock, peer, None, None).map_err(|e| io::Error::other(e.to_string()))
    }

    /// The protection of this connection.
    pub fn mode(&self) -> Mode {
        match self.inner.sealer.as_deref() {
            None => Mode::Plaintext,
            Some(Sealer::Tls(_)) => Mode::Tls,
            Some(Sealer::Noise(_)) => Mode::Psk,
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer
    }

    /// The peer's certificate (DER) in the TLS mode: what binds the connections of one
    /// session to one source.
    pub fn peer_identity(&self) -> Option<&[u8]> {
        self.inner.identity.as_deref()
    }

    /// Another handle on the same connection (like `TcpStream::try_clone`; never fails).
    pub fn try_clone(&self) -> io::Result<Transport> {
        Ok(self.clone())
    }

    /// Shut the connection down (reads and writes of every handle fail or end).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.sock.shutdown(how)
    }

    /// Make reads and writes non-blocking (they return `WouldBlock`) or blocking.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.inner.sock.set_nonblocking(on)?;
        self.inner.nonblocking.store(on, Ordering::Release);
        Ok(())
    }

    /// Read timeout of blocking reads (`WouldBlock` when it passes).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.inner.sock.set_read_timeout(t)?;
        *lock(&self.inner.read_timeout) = t;
        Ok(())
    }

    /// Open the records of this connection on a thread of its own from now on, ahead of the
    /// reads (see the `readahead` module): for a bulk connection whose reader has other work per byte. A
    /// plaintext connection has nothing to open and stays as it is; a second call does nothing.
    pub fn read_ahead(&self) -> io::Result<()> {
        let Some(sealer) = &self.inner.sealer else { return Ok(()) };
        let mut ahead = lock(&self.inner.ahead);
        if ahead.is_some() {
            return Ok(());
        }
        let rx = std::mem::take(&mut *lock(&self.inner.rx));
        *ahead = Some(ReadAhead::start(self.inner.sock.try_clone()?, Arc::clone(sealer), rx)?);
        Ok(())
    }

    /// The opened bytes of a connection whose records are opened ahead, handed over as a whole
    /// chunk instead of copied out ([`Opened`]; `Ok(None)` at end of file), waiting as a read
    /// would. `None`: the connection has no read-ahead, read it with `read`.
    pub fn take_opened(&self) -> Option<io::Result<Option<Opened>>> {
        let wait = self.read_wait();
        lock(&self.inner.ahead).as_mut().map(|ahead| ahead.take(wait))
    }

    /// Give a buffer back to the read-ahead, for chunks to come (see [`take_opened`](Self::take_opened)).
    pub fn recycle(&self, buf: Vec<u8>) {
        if let Some(ahead) = lock(&self.inner.ahead).as_ref() {
            ahead.recycle(buf);
        }
    }

    /// How a read of a read-ahead connection waits: not in non-blocking mode, else up to the
    /// read timeout.
    fn read_wait(&self) -> Wait {
        if self.nonblocking() {
            Wait::No
        } else {
            lock(&self.inner.read_timeout).map_or(Wait::Forever, Wait::For)
        }
    }

    /// Bound every write on this connection by `t` (zero: no bound of ours, the kernel's
    /// default): once bytes written stay unacknowledged or unsent behind a zero window for `t`,
    /// the connection is dropped and its reads and writes fail with a "write timeout" error
    /// (see `write_bound`). Blocking and non-blocking, plaintext, TLS and Noise alike.
    pub fn bound_writes(&self, t: Duration) -> io::Result<()> {
        write_bound::arm(&self.inner.sock, t)?;
        let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
        self.inner.write_bound_ms.store(ms, Ordering::Relaxed);
        Ok(())
    }

    /// `e`, explained if it is the drop of a bounded connection.
    fn explain(&self, e: io::Error) -> io::Error {
        let t = Duration::from_millis(self.inner.write_bound_ms.load(Ordering::Relaxed));
        write_bound::explain(e, self.inner.peer, t)
    }

    /// Write timeout of blocking writes.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.inner.sock.set_write_timeout(t)
    }

    /// Whether sealed bytes wait to be sent (non-blocking mode): call
    /// [`flush`](Write::flush) when the socket is writable.
    pub fn wants_write(&self) -> bool {
        self.inner.sealer.is_some() && lock(&self.inner.tx).pending()
    }

    fn nonblocking(&self) -> bool {
        self.inner.nonblocking.load(Ordering::Acquire)
    }

    fn read_sealed(&self, sealer: &Sealer, out: &mut [u8]) -> io::Result<usize> {
        let wait = self.read_wait();
        if let Some(ahead) = lock(&self.inner.ahead).as_mut() {
            return ahead.read(out, wait);
        }
        let mut rx = lock(&self.inner.rx);
        match sealer {
            Sealer::Tls(rec) => tls::read(&self.inner.sock, rec, &mut rx, out),
            Sealer::Noise(state) => noise::read(&self.inner.sock, state, &mut rx, out),
        }
    }

    fn write_sealed(&self, sealer: &Sealer, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let nonblocking = self.nonblocking();
        let mut tx = lock(&self.inner.tx);
        tx.drain(&self.inner.sock)?;
        for piece in sealed::pieces(bufs, sealed::SEAL_CHUNK) {
            match sealer {
                Sealer::Tls(rec) => tls::seal(rec, &piece, &mut tx)?,
                Sealer::Noise(state) => noise::seal(state, &piece, &mut tx)?,
            }
            match tx.drain(&self.inner.sock) {
                Ok(()) => {}
                // Sealed bytes stay queued; the caller flushes when the socket is writable.
                Err(e) if nonblocking && e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }
}

impl AsRawFd for Transport {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.sock.as_raw_fd()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The opener thread reads a handle of its own: end its read so that it ends too.
        if self.ahead.get_mut().map(|a| a.is_some()).unwrap_or(true) {
            let _ = self.sock.shutdown(Shutdown::Read);
        }
    }
}

impl Read for &Transport {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self.inner.sealer.as_deref() {
            None => (&self.inner.sock).read(out),
            Some(s) => self.read_sealed(s, out),
        }
        .map_err(|e| self.explain(e))
    }
}

impl Write for &Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.inner.sealer.as_deref() {
            None => (&self.inner.sock).write(buf),
            Some(s) => self.write_sealed(s, &[IoSlice::new(buf)]),
        }
        .map_err(|e| self.explain(e))
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.inner.sealer.as_deref() {
            None => (&self.inner.sock).write_vectored(bufs),
            Some(s) => self.write_sealed(s, bufs),
        }
        .map_err(|e| self.explain(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.inner.sealer {
            None => Ok(()),
            Some(_) => lock(&self.inner.tx).drain(&self.inner.sock),
        }
        .map_err(|e| self.explain(e))
    }
}

impl Read for Transport {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        (&*self).read(out)
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}

/// A transport failure as the broker's [`crate::Error::Transport`] (error.rs is below migration).
impl From<TransportError> for crate::error::Error {
    fn from(e: TransportError) -> crate::error::Error {
        crate::error::Error::Transport(Box::new(e))
    }
}
