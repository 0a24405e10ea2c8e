//! A TCP proxy for fault injection: it forwards every connection to a target and, when the bytes
//! forwarded from clients to the target reach a cut point, runs a hook and cuts every live
//! connection (shutdown of both sides, then close). Cut points come in ascending order; after
//! the last one connections pass untouched, unless `refuse_after_cut` makes the proxy close
//! every new connection at once (a peer that never comes back) until `set_refuse(false)`.
//! [`Tamper`] makes it an attacker on the path too: flip a bit at given offsets of the client →
//! target bytes, and watch both directions for a marker. `cut_now` cuts at a moment of the
//! caller's choosing instead of a byte count, `cut_connection` only the n-th connection. `hold_after_listen` makes it hold the first
//! connection (the migration's main one, in the plaintext transport) right after the Listen frame
//! until `release`: the destination listens and serves demand faults (urgent connection), but no
//! background page and no Complete arrives, so clients can register before the end. The extra
//! background streams (connections after the urgent one, while the first lives) are held at
//! their first page for the same reason. Connections made after the first one ended and before
//! the release (a resume after an early cut) are held from their first byte. `stall_connection`
//! is a middlebox that stops reading one connection's client → target bytes for good without
//! closing anything (the client's writes then block once the buffers are full).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

type Hook = Box<dyn Fn(u64) + Send + Sync>;

/// What an on-path attacker does besides cutting.
#[derive(Default)]
pub struct Tamper {
    /// Flip bit 4 of the byte at each of these offsets of the client → target bytes (all
    /// connections together).
    pub flip_at: Vec<u64>,
    /// Bytes to look for in the traffic, both directions.
    pub watch: Option<Vec<u8>>,
}

struct State {
    target: SocketAddr,
    /// Cut points still to come, ascending (bytes client → target, all connections together).
    cuts: Mutex<Vec<u64>>,
    forwarded: AtomicU64,
    live: Mutex<Vec<TcpStream>>,
    /// Both sockets of every connection, by accept order (1: the first).
    numbered: Mutex<Vec<(u64, TcpStream)>>,
    cuts_done: AtomicU64,
    refuse_after_cut: bool,
    refuse: AtomicBool,
    stop: AtomicBool,
    hook: Option<Hook>,
    connections: AtomicU64,
    flips: Mutex<Vec<u64>>,
    flips_done: AtomicU64,
    watch: Option<Vec<u8>>,
    watched: AtomicBool,
    hold_armed: AtomicBool,
    /// The first connection's client-to-target direction has ended.
    first_ended: AtomicBool,
    released: AtomicBool,
    /// Connections (by accept order) whose client → target bytes are no longer read.
    stalled: Mutex<Vec<u64>>,
}

/// A running proxy.
pub struct Proxy {
    addr: SocketAddr,
    st: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Forward to `target`, cutting at each of `cuts` (bytes). `hook(n)` runs before the n-th cut.
    pub fn start(target: SocketAddr, cuts: Vec<u64>, refuse_after_cut: bool, hook: Option<Hook>) -> Proxy {
        Proxy::tampering(target, cuts, refuse_after_cut, hook, Tamper::default())
    }

    /// [`start`](Proxy::start) with an attacker's `tamper`.
    pub fn tampering(
        target: SocketAddr,
        mut cuts: Vec<u64>,
        refuse_after_cut: bool,
        hook: Option<Hook>,
        mut tamper: Tamper,
    ) -> Proxy {
        cuts.sort_unstable();
        tamper.flip_at.sort_unstable();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let st = Arc::new(State {
            target,
            cuts: Mutex::new(cuts),
            forwarded: AtomicU64::new(0),
            live: Mutex::new(Vec::new()),
            numbered: Mutex::new(Vec::new()),
            cuts_done: AtomicU64::new(0),
            refuse_after_cut,
            refuse: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            hook,
            connections: AtomicU64::new(0),
            flips: Mutex::new(tamper.flip_at),
            flips_done: AtomicU64::new(0),
            watch: tamper.watch,
            watched: AtomicBool::new(false),
            hold_armed: AtomicBool::new(false),
            first_ended: AtomicBool::new(false),
            released: AtomicBool::new(false),
            stalled: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&st);
        let thread = std::thread::spawn(move || accept_loop(listener, s));
        Proxy { addr, st, thread: Some(thread) }
    }

    /// The address to connect to.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Cuts made so far.
    pub fn cuts_done(&self) -> u64 {
        self.st.cuts_done.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.st.connections.load(Ordering::SeqCst)
    }

    /// Bits flipped so far.
    pub fn flips_done(&self) -> u64 {
        self.st.flips_done.load(Ordering::SeqCst)
    }

    /// Whether the watched bytes passed through (either direction).
    pub fn saw_watched(&self) -> bool {
        self.st.watched.load(Ordering::SeqCst)
    }

    /// Cut every live connection now, as a cut point does (the hook runs first).
    pub fn cut_now(&self) {
        cut(&self.st);
    }

    /// Cut only the `n`-th connection accepted (1: the first), now.
    pub fn cut_connection(&self, n: u64) {
        // The clones are closed too (dropped), as a real cut closes the sockets: a peer still
        // writing into one that nobody reads then gets a reset instead of blocking for good.
        self.st.numbered.lock().unwrap().retain(|(i, s)| {
            if *i == n {
                let _ = s.shutdown(Shutdown::Both);
            }
            *i != n
        });
    }

    /// Client → target bytes forwarded so far (all connections together).
    pub fn forwarded(&self) -> u64 {
        self.st.forwarded.load(Ordering::SeqCst)
    }

    /// Stop reading the `n`-th connection's client → target bytes (1: the first) from now on,
    /// keeping both its sockets open: a peer that stops reading without closing.
    pub fn stall_connection(&self, n: u64) {
        self.st.stalled.lock().unwrap().push(n);
    }

    /// Hold the first connection's client → target bytes after the Listen frame (call before
    /// the first connection; the frames must travel in the clear) until
    /// [`release`](Proxy::release).
    pub fn hold_after_listen(&self) {
        self.st.hold_armed.store(true, Ordering::SeqCst);
    }

    /// Let the held bytes through.
    pub fn release(&self) {
        self.st.released.store(true, Ordering::SeqCst);
    }

    /// Refuse (close at once) new connections, or let them through again.
    pub fn set_refuse(&self, on: bool) {
        self.st.refuse.store(on, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.st.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for s in self.st.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, st: Arc<State>) {
    for conn in listener.incoming() {
        if st.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if st.refuse.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect(st.target) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let index = st.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let first = index == 1;
        {
            let mut numbered = st.numbered.lock().unwrap();
            numbered.push((index, client.try_clone().unwrap()));
            numbered.push((index, server.try_clone().unwrap()));
        }
        // The first connection is held right after its Listen; once it has ended (a cut before
        // the release, by the proxy or by a peer), every new one (the resume's) from its first
        // byte, so the migration cannot end around the hold.
        let armed = st.hold_armed.load(Ordering::SeqCst) && !st.released.load(Ordering::SeqCst);
        let hold = if !armed {
            Hold::No
        } else if first {
            Hold::AfterListen
        } else if st.first_ended.load(Ordering::SeqCst) {
            Hold::FromStart
        } else if index > 2 {
            Hold::AtFirstPage
        } else {
            Hold::No
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        {
            let mut live = st.live.lock().unwrap();
            live.push(client.try_clone().unwrap());
            live.push(server.try_clone().unwrap());
        }
        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let a = Arc::clone(&st);
        std::thread::spawn(move || {
            forward(client, server, &a, Some(index), hold);
            if first {
                a.first_ended.store(true, Ordering::SeqCst);
            }
        });
        let b = Arc::clone(&st);
        std::thread::spawn(move || forward(s2, c2, &b, None, Hold::No));
    }
}

fn cut(st: &State) {
    let n = st.cuts_done.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(h) = &st.hook {
        h(n);
    }
    if st.refuse_after_cut {
        st.refuse.store(true, Ordering::SeqCst);
    }
    for s in st.live.lock().unwrap().drain(..) {
        let _ = s.shutdown(Shutdown::Both);
    }
    // Close the numbered clones as well: an fd left open keeps the cut connection half alive,
    // and a source blocked writing into it (the proxy no longer reads) would wait forever
    // instead of seeing the reset a closed socket sends.
    st.numbered.lock().unwrap().clear();
}

/// Whether `watch` occurs in `tail` + `buf`; keeps the last bytes of `buf` in `tail`.
fn scan(watch: &[u8], tail: &mut Vec<u8>, buf: &[u8]) -> bool {
    tail.extend_from_slice(buf);
    let found = tail.windows(watch.len()).any(|w| w == watch);
    let keep = watch.len().saturating_sub(1).min(tail.len());
    tail.drain(..tail.len() - keep);
    found
}

/// Finds, in a stream of wire frames (12-byte header: magic, type, flags, reserved, payload
/// length; docs/wire-protocol.md), the end of the header of the first frame `stop` picks (by
/// type and payload length): the Listen frame, or the first page.
struct FrameScan {
    header: [u8; 12],
    have: usize,
    skip: u64,
    stop: fn(u8, u64) -> bool,
}

impl FrameScan {
    fn new(stop: fn(u8, u64) -> bool) -> FrameScan {
        FrameScan { header: [0; 12], have: 0, skip: 0, stop }
    }

    /// The index just after the picked frame's header if it ends in `data`.
    fn feed(&mut self, data: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < data.len() {
            if self.skip > 0 {
                let k = self.skip.min((data.len() - i) as u64);
                self.skip -= k;
                i += k as usize;
                continue;
            }
            self.header[self.have] = data[i];
            self.have += 1;
            i += 1;
            if self.have == 12 {
                self.have = 0;
                self.skip = u64::from(u32::from_le_bytes(self.header[8..12].try_into().unwrap()));
                if (self.stop)(self.header[4], self.skip) {
                    return Some(i);
                }
            }
        }
        None
    }
}

/// Where a direction of a connection waits for [`Proxy::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    No,
    AfterListen,
    /// At the first Page or ZeroRun frame (after its header).
    AtFirstPage,
    FromStart,
}

fn wait_release(st: &State) {
    while !st.released.load(Ordering::SeqCst) && !st.stop.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Forward `from` to `to`; `index`: the connection's number when this is its client → target
/// direction (counted, cut, tampered with, stalled).
fn forward(mut from: TcpStream, mut to: TcpStream, st: &State, index: Option<u64>, hold: Hold) {
    let counting = index.is_some();
    let mut listen = match hold {
        Hold::AfterListen => Some(FrameScan::new(|t, len| t == 0x08 && len == 0)),
        Hold::AtFirstPage => Some(FrameScan::new(|t, _| t == 0x03 || t == 0x04)),
        Hold::No | Hold::FromStart => None,
    };
    if hold == Hold::FromStart {
        wait_release(st);
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut tail = Vec::new();
    loop {
        while index.is_some_and(|i| st.stalled.lock().unwrap().contains(&i))
            && !st.stop.load(Ordering::SeqCst)
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(w) = &st.watch {
            if scan(w, &mut tail, &buf[..n]) {
                st.watched.store(true, Ordering::SeqCst);
            }
        }
        let mut keep = n;
        let mut cut_now = false;
        if counting {
            let mut cuts = st.cuts.lock().unwrap();
            let before = st.forwarded.fetch_add(n as u64, Ordering::SeqCst);
            let mut flips = st.flips.lock().unwrap();
            while let Some(&f) = flips.first() {
                if f >= before + n as u64 {
                    break;
                }
                if f >= before {
                    buf[(f - before) as usize] ^= 0x10;
                    st.flips_done.fetch_add(1, Ordering::SeqCst);
                }
                flips.remove(0);
            }
            drop(flips);
            if let Some(&c) = cuts.first() {
                if before + n as u64 >= c {
                    keep = c.saturating_sub(before) as usize;
                    cuts.remove(0);
                    cut_now = true;
                }
            }
        }
        let mut from_here = 0;
        if let Some(at) = listen.as_mut().and_then(|s| s.feed(&buf[..keep])) {
            listen = None;
            if to.write_all(&buf[..at]).is_err() {
                break;
            }
            wait_release(st);
            from_here = at;
        }
        if keep > from_here && to.write_all(&buf[from_here..keep]).is_err() {
            break;
        }
        if cut_now {
            cut(st);
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
