//! The destination's gate on its listening socket: a thread accepts every connection and hands
//! it to a handshake thread of its own, which runs the transport handshake and reads the Hello
//! under one per-connection deadline; authenticated connections with their Hello wait in a short
//! queue for the session to take them ([`Gate::next`]). So strangers cannot stop the
//! destination: a connection that sends garbage, drips bytes or stays silent costs one
//! handshake slot until its deadline, its failure is logged with its address and nothing else
//! happens, and the real source is authenticated beside it, before it or after it — during the
//! first accept and during a postcopy pause alike.
//!
//! Resources before authentication are bounded: at most [`GateLimits::max_pending`]
//! handshakes run at once (a new connection beyond that drops the *oldest* pending one, so a
//! flood cannot lock the real source out for long: its own handshake takes milliseconds), each
//! with the record layer's bounded buffers. Authenticated arrivals queue up to
//! [`GateLimits::max_arrivals`] (older ones are dropped).

use std::collections::VecDeque;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::error::{Error, IoContext, Result};
use crate::migration::transport::deadline::Deadline;
use crate::migration::transport::{Security, Transport, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_WRITE_TIMEOUT};
use crate::migration::wire::{write_frame, Decoder, Frame, Hello, Limits};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Bounds of the gate.
#[derive(Debug, Clone, Copy)]
pub struct GateLimits {
    /// Deadline of one connection's handshake and Hello.
    pub handshake_timeout: Duration,
    /// Handshakes running at once.
    pub max_pending: usize,
    /// Authenticated connections waiting to be taken.
    pub max_arrivals: usize,
    /// Bound of the writes on every authenticated connection (`Transport::bound_writes`).
    pub write_timeout: Duration,
}

impl Default for GateLimits {
    fn default() -> GateLimits {
        GateLimits {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_pending: 32,
            max_arrivals: 8,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }
}

/// An authenticated connection and the Hello it sent.
#[derive(Debug)]
pub struct Arrival {
    /// The connection.
    pub transport: Transport,
    /// Its decoder (it may hold frames after the Hello already).
    pub dec: Decoder,
    /// The Hello.
    pub hello: Hello,
}

impl Arrival {
    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.transport.peer_addr()
    }

    /// Refuse this connection: log why, tell the peer (an Error frame), close it.
    pub fn refuse(self, why: &str) {
        log::warn!("migration connection from {} refused: {why}", self.peer());
        let mut t = &self.transport;
        let _ = write_frame(&mut t, &Frame::Error { text: why });
        let _ = self.transport.shutdown(Shutdown::Both);
    }
}

#[derive(Debug, Default)]
struct Shared {
    arrivals: Mutex<VecDeque<Arrival>>,
    ready: Condvar,
    /// Handshakes running: id and a handle to drop the connection.
    pending: Mutex<VecDeque<(u64, TcpStream)>>,
    stopping: AtomicBool,
    refused: AtomicU64,
}

/// The gate (see the module doc). Dropping it stops accepting and ends pending handshakes.
#[derive(Debug)]
pub struct Gate {
    shared: Arc<Shared>,
    stop: Arc<EventFd>,
}

impl Gate {
    /// Start accepting on `listener` with `security`.
    pub fn open(listener: &TcpListener, security: Security, limits: GateLimits) -> Result<Gate> {
        let listener = listener.try_clone().ctx(|| "clone the listening socket".into())?;
        listener.set_nonblocking(true).ctx(|| "set the listening socket non-blocking".into())?;
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).ctx(|| "eventfd".into())?);
        let (sh, st) = (Arc::clone(&shared), Arc::clone(&stop));
        // Detached: dropping the gate wakes the thread and it ends on its own, owning what it
        // uses (its listener clone, the shared queue); nobody waits for it (issue #15: the
        // session's end is not held up by a join of a thread that has nothing left to do).
        std::thread::Builder::new()
            .name("migration-gate".into())
            .spawn(move || accept_loop(&listener, &security, limits, &sh, &st))
            .ctx(|| "spawn the migration gate thread".into())?;
        Ok(Gate { shared, stop })
    }

    /// The next authenticated connection, waiting at most `timeout` (None: for ever).
    pub fn next(&self, timeout: Option<Duration>) -> Option<Arrival> {
        let end = timeout.map(|t| Instant::now() + t);
        let mut q = self.shared.arrivals.lock().ok()?;
        loop {
            if let Some(a) = q.pop_front() {
                return Some(a);
            }
            q = match end {
                None => self.shared.ready.wait(q).ok()?,
                Some(end) => {
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.shared.ready.wait_timeout(q, left).ok()?.0
                }
            };
        }
    }

    /// Connections whose handshake failed so far.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        if let Ok(p) = self.shared.pending.lock() {
            for (_, s) in p.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    security: &Security,
    limits: GateLimits,
    shared: &Arc<Shared>,
    stop: &EventFd,
) {
    let mut next_id = 0u64;
    // SAFETY: `stop` is borrowed for this whole function, so its fd stays open while borrowed.
    let stop_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(stop.as_raw_fd()) };
    while !shared.stopping.load(Ordering::Acquire) {
        let mut fds =
            [PollFd::new(listener.as_fd(), PollFlags::POLLIN), PollFd::new(stop_fd, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                log::error!("migration gate: poll the listening socket: {e}");
                return;
            }
        }
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        loop {
            match listener.accept() {
                Ok((s, peer)) => {
                    next_id += 1;
                    admit(s, peer, next_id, security, limits, shared);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of fds or memory: wait a little instead of spinning.
                    log::warn!("migration gate: accept on fd {}: {e}", listener.as_raw_fd());
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
    }
}

fn admit(
    s: TcpStream,
    peer: SocketAddr,
    id: u64,
    security: &Security,
    limits: GateLimits,
    shared: &Arc<Shared>,
) {
    let Ok(handle) = s.try_clone() else {
        log::warn!("migration connection from {peer} dropped: cannot duplicate its socket");
        return;
    };
    if let Ok(mut p) = shared.pending.lock() {
        while p.len() >= limits.max_pending.max(1) {
            if let Some((_, old)) = p.pop_front() {
                log::warn!(
                    "migration gate: {} handshakes pending; dropping the oldest ({}) for {peer}",
                    limits.max_pending,
                    old.peer_addr().map_or("?".into(), |a| a.to_string())
                );
                let _ = old.shutdown(Shutdown::Both);
            }
        }
        p.push_back((id, handle));
    }
    let (security, sh) = (security.clone(), Arc::clone(shared));
    let spawned = std::thread::Builder::new().name("migration-handshake".into()).spawn(move || {
        let r = handshake(s, &security, limits.handshake_timeout, limits.write_timeout);
        if let Ok(mut p) = sh.pending.lock() {
            p.retain(|(i, _)| *i != id);
        }
        match r {
            Ok(a) if !sh.stopping.load(Ordering::Acquire) => {
                log::info!(
                    "migration connection from {peer}: {} authenticated, {:?} Hello",
                    a.transport.mode(),
                    a.hello.channel
                );
                if let Ok(mut q) = sh.arrivals.lock() {
                    while q.len() >= limits.max_arrivals.max(1) {
                        if let Some(old) = q.pop_front() {
                            old.refuse("too many connections wait to be taken; dropping the oldest");
                        }
                    }
                    q.push_back(a);
                }
                sh.ready.notify_all();
            }
            Ok(_) => {}
            Err(e) => {
                sh.refused.fetch_add(1, Ordering::Relaxed);
                log::warn!("migration connection from {peer} refused: {e}; still listening for the source");
            }
        }
    });
    if let Err(e) = spawned {
        log::warn!("migration connection from {peer} dropped: cannot start its handshake thread: {e}");
    }
}

/// The handshake and the Hello, both within `timeout`; the connection's writes bounded by
/// `write_timeout` from then on.
fn handshake(
    s: TcpStream,
    security: &Security,
    timeout: Duration,
    write_timeout: Duration,
) -> Result<Arrival> {
    let end = Instant::now() + timeout;
    let transport = security.accept(s, timeout)?;
    transport.bound_writes(write_timeout).ctx(|| "set the write timeout (TCP_USER_TIMEOUT)".into())?;
    let mut dec = Decoder::new(Limits::default());
    let hello = {
        let mut io = Deadline::new(&transport, end);
        match dec.read_frame(&mut io) {
            Ok(Frame::Hello(h)) => h,
            Ok(Frame::Error { text }) => return Err(Error::Invalid(format!("the source reported: {text}"))),
            Ok(f) => return Err(Error::Invalid(format!("expected Hello, got a {:?} frame", f.frame_type()))),
            Err(e) => return Err(Error::Invalid(format!("no Hello after the handshake: {e}"))),
        }
    };
    Ok(Arrival { transport, dec, hello })
}
