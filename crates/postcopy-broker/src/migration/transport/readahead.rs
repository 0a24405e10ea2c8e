//! Read-ahead of a protected connection: a thread of its own reads the socket and opens the
//! records ahead of the consumer, and hands the opened bytes over in chunks. On the destination's
//! main connection this puts decryption beside placement instead of in front of it: the stream
//! thread, which places every page, is the migration's critical path, and with TLS it spent a
//! fifth of its time opening records (BENCHMARKS.md, "The migration transport").
//!
//! The opener thread owns the receive state from the moment read-ahead starts (bytes already
//! opened or buffered come with it), so every byte is delivered once and in order. A socket error
//! or a record that fails to open ends the chunks with that error, which the consumer then gets
//! from every later read. The thread ends when the socket reaches end of file (a shutdown of the
//! connection's reading side, as the last handle's drop does, makes it so) or when the consumer
//! is gone. The consumer keeps the transport's semantics: blocking reads wait (up to the read
//! timeout, then `WouldBlock`), non-blocking reads return `WouldBlock` when no chunk is there.
//!
//! A consumer that decodes frames can also take the chunks themselves ([`ReadAhead::take`])
//! instead of copying out of them: each chunk has [`HEADROOM`] free bytes in front of its opened
//! bytes, where the consumer puts the unfinished frame it still holds, so the chunk becomes its
//! buffer without copying the chunk (BENCHMARKS.md: that copy was a sixth of what TLS added to
//! the receiving side). Emptied buffers come back through [`ReadAhead::recycle`].

use std::io;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use super::sealed::Rx;
use super::Sealer;

/// Opened bytes handed over at a time (at most).
const CHUNK: usize = 1 << 20;
/// Chunks opened ahead of the consumer: with the spare buffers, bounds the memory of one
/// connection to about 15 MiB.
const AHEAD: usize = 4;
/// Free bytes in front of every chunk's opened bytes: room for a consumer's unfinished frame
/// (a run of 128 pages of 4 KiB and its header; the chunk is copied behind a longer one).
pub const HEADROOM: usize = (512 << 10) + 64;

/// Opened bytes handed over whole: `buf[start..end]`; `buf[..start]` is free (at least
/// [`HEADROOM`] bytes when the chunk is new).
#[derive(Debug)]
pub struct Opened {
    /// The buffer.
    pub buf: Vec<u8>,
    /// First opened byte.
    pub start: usize,
    /// End of the opened bytes.
    pub end: usize,
}

/// What the opener thread hands over.
enum Piece {
    /// `buf[HEADROOM..HEADROOM + len]` are opened bytes.
    Bytes(Vec<u8>, usize),
    /// End of file.
    End,
    /// The connection failed; every later read fails the same way.
    Failed(io::ErrorKind, String),
}

/// The consumer's side of a read-ahead.
pub(super) struct ReadAhead {
    pieces: Receiver<Piece>,
    /// Emptied buffers go back to the opener.
    spare: SyncSender<Vec<u8>>,
    /// The chunk being consumed: `cur[pos..len]` are not read yet (`len` is an index into
    /// `cur`, past its headroom).
    cur: Vec<u8>,
    pos: usize,
    len: usize,
    /// How the pieces ended, once they did.
    end: Option<Piece>,
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAhead").field("buffered", &(self.len - self.pos)).finish()
    }
}

/// How a consumer waits for the next piece.
#[derive(Debug, Clone, Copy)]
pub(super) enum Wait {
    /// Not at all (non-blocking mode).
    No,
    /// Up to this long (the read timeout).
    For(Duration),
    /// Until it comes.
    Forever,
}

impl ReadAhead {
    /// Start the opener thread on `sock` (a handle of its own on the connection) with the
    /// receive state `rx`.
    pub(super) fn start(sock: TcpStream, sealer: Arc<Sealer>, rx: Rx) -> io::Result<ReadAhead> {
        let (tx, pieces) = sync_channel(AHEAD);
        let (spare, spares) = sync_channel(AHEAD);
        std::thread::Builder::new()
            .name("postcopy-open".into())
            .spawn(move || open_ahead(&sock, &sealer, rx, &tx, &spares))?;
        Ok(ReadAhead { pieces, spare, cur: Vec::new(), pos: 0, len: 0, end: None })
    }

    /// Read opened bytes into `out` (see the module doc).
    pub(super) fn read(&mut self, out: &mut [u8], wait: Wait) -> io::Result<usize> {
        if out.is_empty() || !self.ready(wait)? {
            return Ok(0);
        }
        let n = (self.len - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.len {
            let done = std::mem::take(&mut self.cur);
            self.recycle(done);
        }
        Ok(n)
    }

    /// Take the opened bytes not read yet as a whole chunk: the rest of the current one, or the
    /// next. `Ok(None)` at end of file; errors as [`read`](ReadAhead::read)'s.
    pub(super) fn take(&mut self, wait: Wait) -> io::Result<Option<Opened>> {
        if !self.ready(wait)? {
            return Ok(None);
        }
        let (start, end) = (self.pos, self.len);
        self.pos = 0;
        self.len = 0;
        Ok(Some(Opened { buf: std::mem::take(&mut self.cur), start, end }))
    }

    /// Make the current chunk hold unread bytes: `Ok(false)` at end of file.
    fn ready(&mut self, wait: Wait) -> io::Result<bool> {
        loop {
            if self.pos < self.len {
                return Ok(true);
            }
            if let Some(end) = &self.end {
                return match end {
                    Piece::Failed(kind, why) => Err(io::Error::new(*kind, why.clone())),
                    _ => Ok(false),
                };
            }
            match self.next_piece(wait)? {
                Piece::Bytes(buf, len) => {
                    self.cur = buf;
                    self.pos = HEADROOM;
                    self.len = HEADROOM + len;
                }
                end => self.end = Some(end),
            }
        }
    }

    /// Give an emptied buffer back to the opener (it allocates a new one otherwise).
    pub(super) fn recycle(&self, buf: Vec<u8>) {
        let _ = self.spare.try_send(buf);
    }

    /// The next piece from the opener.
    fn next_piece(&mut self, wait: Wait) -> io::Result<Piece> {
        Ok(match wait {
            Wait::No => match self.pieces.try_recv() {
                Ok(p) => p,
                Err(TryRecvError::Empty) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(TryRecvError::Disconnected) => gone(),
            },
            Wait::For(t) => match self.pieces.recv_timeout(t) {
                Ok(p) => p,
                Err(RecvTimeoutError::Timeout) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(RecvTimeoutError::Disconnected) => gone(),
            },
            Wait::Forever => self.pieces.recv().unwrap_or_else(|_| gone()),
        })
    }
}

/// The opener thread stopped without saying why (it cannot, short of a panic, which ends the
/// process).
fn gone() -> Piece {
    Piece::Failed(io::ErrorKind::BrokenPipe, "the record opener of this connection stopped".into())
}

/// The opener thread: read and open records into chunks until end of file, an error, or until
/// the consumer is gone.
fn open_ahead(
    sock: &TcpStream,
    sealer: &Sealer,
    mut rx: Rx,
    tx: &SyncSender<Piece>,
    spares: &Receiver<Vec<u8>>,
) {
    loop {
        let mut buf = spares.try_recv().unwrap_or_default();
        buf.resize(HEADROOM + CHUNK, 0);
        let got = match sealer {
            Sealer::Tls(rec) => super::tls::read(sock, rec, &mut rx, &mut buf[HEADROOM..]),
            Sealer::Noise(state) => super::noise::read(sock, state, &mut rx, &mut buf[HEADROOM..]),
        };
        let piece = match got {
            Ok(0) => Piece::End,
            Ok(n) => Piece::Bytes(buf, n),
            // A read timeout or non-blocking mode set on the connection is the consumer's
            // business: this thread waits until the socket has bytes.
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                wait_readable(sock);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Piece::Failed(e.kind(), e.to_string()),
        };
        let last = !matches!(piece, Piece::Bytes(..));
        if tx.send(piece).is_err() || last {
            return;
        }
    }
}

/// Wait until `sock` is readable (or has an error or hung up).
fn wait_readable(sock: &TcpStream) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    // An error here (EINTR) just means: try the read again.
    let _ = poll(&mut fds, PollTimeout::NONE);
}
