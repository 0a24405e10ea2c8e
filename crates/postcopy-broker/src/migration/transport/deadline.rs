//! [`Deadline`]: reads and writes that all end by one instant, so that a peer that drips one byte
//! at a time cannot stretch a handshake (a per-read timeout restarts with every byte). Before
//! each operation the socket's timeouts are set to the time left; past the instant operations
//! fail with `TimedOut`.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::Transport;

/// A connection whose read and write timeouts can be set.
pub trait Timed {
    /// Set both timeouts.
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Timed for TcpStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Timed for Transport {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// `s` with every operation bounded by `end` (see the module doc). Dropping it clears the
/// timeouts.
#[derive(Debug)]
pub struct Deadline<'a, S: Timed> {
    s: &'a S,
    end: Instant,
}

impl<'a, S: Timed> Deadline<'a, S> {
    /// Bound operations on `s` by `end`.
    pub fn new(s: &'a S, end: Instant) -> Deadline<'a, S> {
        Deadline { s, end }
    }

    fn arm(&self) -> io::Result<()> {
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the deadline passed"));
        }
        self.s.set_timeouts(Some(left))
    }
}

impl Deadline<'_, TcpStream> {
    /// Peek at the first bytes waiting on the socket (at least one, unless it closed).
    pub fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        loop {
            match self.s.peek(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl<S: Timed> Drop for Deadline<'_, S> {
    fn drop(&mut self) {
        let _ = self.s.set_timeouts(None);
    }
}

impl<S: Timed> Read for Deadline<'_, S>
where
    for<'b> &'b S: Read,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        let mut s = self.s;
        s.read(buf)
    }
}

impl<S: Timed> Write for Deadline<'_, S>
where
    for<'b> &'b S: Write,
{
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        let mut s = self.s;
        s.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.arm()?;
        let mut s = self.s;
        s.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.arm()?;
        let mut s = self.s;
        s.flush()
    }
}
