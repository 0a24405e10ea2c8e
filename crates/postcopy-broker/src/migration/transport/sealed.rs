//! The buffers of a protected transport, shared by the TLS and Noise record layers: [`Rx`] holds
//! sealed bytes read from the socket and not yet opened (and opened bytes the caller had no room
//! for), [`Tx`] holds sealed bytes not yet written (only ever in non-blocking mode, or after a
//! failed write, which breaks the connection). Writes are sealed in pieces of [`SEAL_CHUNK`]
//! bytes so that the sealed copy is still in the cache when it goes to the socket.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;

/// Plaintext bytes sealed at a time before they are written out.
pub(super) const SEAL_CHUNK: usize = 256 << 10;
/// Socket bytes read at a time.
const READ_CHUNK: usize = 512 << 10;

/// Receive state of a protected transport.
#[derive(Debug, Default)]
pub(super) struct Rx {
    /// Sealed bytes from the socket: `buf[start..end]` are not opened yet.
    pub(super) buf: Vec<u8>,
    pub(super) start: usize,
    pub(super) end: usize,
    /// The socket reached end of file.
    pub(super) eof: bool,
    /// Opened bytes the caller had no room for: `plain[plain_pos..]`.
    pub(super) plain: Vec<u8>,
    pub(super) plain_pos: usize,
    /// Number of the next record to open.
    pub(super) nonce: u64,
    /// Why the connection can no longer be read (a record failed to open).
    pub(super) broken: Option<String>,
}

impl Rx {
    /// The sealed bytes not opened yet.
    pub(super) fn sealed(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Read more sealed bytes from `sock` (blocking or not, as the socket is). `Ok(0)`: end of
    /// file.
    pub(super) fn fill(&mut self, sock: &TcpStream) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && self.buf.len() - self.end < READ_CHUNK / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < READ_CHUNK / 2 {
            self.buf.resize(self.end + READ_CHUNK, 0);
        }
        loop {
            match (&*sock).read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    if n == 0 {
                        self.eof = true;
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Copy buffered opened bytes into `out`; returns how many.
    pub(super) fn take_plain(&mut self, out: &mut [u8]) -> usize {
        let have = &self.plain[self.plain_pos..];
        let n = have.len().min(out.len());
        out[..n].copy_from_slice(&have[..n]);
        self.plain_pos += n;
        if self.plain_pos == self.plain.len() {
            self.plain.clear();
            self.plain_pos = 0;
        }
        n
    }

    /// Fail this and every later read: a record did not open.
    pub(super) fn break_with(&mut self, why: String) -> io::Error {
        self.broken = Some(why.clone());
        io::Error::new(io::ErrorKind::InvalidData, why)
    }

    /// The error of a broken connection, if it is.
    pub(super) fn check(&self) -> io::Result<()> {
        match &self.broken {
            Some(why) => Err(io::Error::new(io::ErrorKind::InvalidData, why.clone())),
            None => Ok(()),
        }
    }
}

/// Send state of a protected transport. A transport uses one of the two queues: records sealed
/// in place (`pending`, Noise) or records sealed into buffers of their own (`records`, TLS),
/// which go out with vectored writes instead of being copied once more.
#[derive(Debug, Default)]
pub(super) struct Tx {
    /// Sealed bytes; `pending[sent..]` are not written yet.
    pub(super) pending: Vec<u8>,
    sent: usize,
    /// Whole sealed records; of the first, `records_sent` bytes are written.
    records: VecDeque<Vec<u8>>,
    records_sent: usize,
    /// Number of the next record to seal.
    pub(super) nonce: u64,
    /// Plaintext gathered from several slices into one record (Noise).
    pub(super) stage: Vec<u8>,
    /// A write failed half way: the records on the wire are cut, nothing more can follow.
    broken: bool,
}

impl Tx {
    /// Nothing sent yet; the first record to seal is number `nonce`.
    pub(super) fn starting_at(nonce: u64) -> Tx {
        Tx { nonce, ..Tx::default() }
    }

    /// Whether sealed bytes wait to be written.
    pub(super) fn pending(&self) -> bool {
        self.sent < self.pending.len() || !self.records.is_empty()
    }

    /// Queue a sealed record.
    pub(super) fn push_record(&mut self, r: Vec<u8>) {
        self.records.push_back(r);
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        if e.kind() != io::ErrorKind::WouldBlock {
            self.broken = true;
        }
        e
    }

    /// Write the sealed bytes to `sock`. Blocking socket: all of them (or an error, which breaks
    /// the connection). Non-blocking: `WouldBlock` leaves the rest queued.
    pub(super) fn drain(&mut self, sock: &TcpStream) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier write on this connection failed half way; it cannot be used any more",
            ));
        }
        let stopped = || io::Error::new(io::ErrorKind::WriteZero, "the peer stopped accepting bytes");
        while self.sent < self.pending.len() {
            match (&*sock).write(&self.pending[self.sent..]) {
                Ok(0) => return Err(self.fail(stopped())),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
        self.pending.clear();
        self.sent = 0;
        while !self.records.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .records
                .iter()
                .take(64)
                .enumerate()
                .map(|(i, r)| IoSlice::new(if i == 0 { &r[self.records_sent..] } else { r }))
                .collect();
            let mut n = match (&*sock).write_vectored(&slices) {
                Ok(0) => return Err(self.fail(stopped())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.fail(e)),
            };
            while let Some(front) = self.records.front() {
                let left = front.len() - self.records_sent;
                if n < left {
                    self.records_sent += n;
                    break;
                }
                n -= left;
                self.records_sent = 0;
                self.records.pop_front();
            }
        }
        Ok(())
    }
}

/// `bufs` cut into consecutive groups of at most `max` bytes each (slices split where needed).
pub(super) fn pieces<'a>(bufs: &'a [IoSlice<'a>], max: usize) -> Vec<Vec<&'a [u8]>> {
    let slices: Vec<&'a [u8]> = bufs.iter().map(|b| &**b).collect();
    pieces_of(&slices, max)
}

/// [`pieces`] of plain slices.
pub(super) fn pieces_of<'a>(bufs: &[&'a [u8]], max: usize) -> Vec<Vec<&'a [u8]>> {
    let mut out = Vec::new();
    let mut cur: Vec<&'a [u8]> = Vec::new();
    let mut room = max;
    for b in bufs {
        let mut rest: &'a [u8] = b;
        while !rest.is_empty() {
            let (head, tail) = rest.split_at(rest.len().min(room));
            cur.push(head);
            room -= head.len();
            rest = tail;
            if room == 0 {
                out.push(std::mem::take(&mut cur));
                room = max;
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_every_byte_in_order_within_the_limit() {
        let a = vec![1u8; 10];
        let b = vec![2u8; 3];
        let c = vec![3u8; 25];
        let bufs = [IoSlice::new(&a), IoSlice::new(&b), IoSlice::new(&[]), IoSlice::new(&c)];
        let p = pieces(&bufs, 8);
        assert!(p.iter().all(|g| g.iter().map(|s| s.len()).sum::<usize>() <= 8));
        let flat: Vec<u8> = p.iter().flatten().flat_map(|s| s.iter().copied()).collect();
        let want: Vec<u8> = [a.clone(), b.clone(), c.clone()].concat();
        assert_eq!(flat, want);
        assert_eq!(p.len(), 5);
        assert!(pieces(&[], 8).is_empty());
    }
}
