//! [`ServerDecoder`]: a server connection speaks one of two dialects, told apart by its first
//! byte: `[` starts a Firecracker handshake, anything else our frames (`PCB1`).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use super::handshake::HandshakeDecoder;
use crate::control::error::ControlError;
use crate::control::message::{Incoming, RequestDecoder};

/// A server connection's decoder: our requests, or a Firecracker handshake in their place.
#[derive(Debug)]
pub struct ServerDecoder {
    dialect: Dialect,
}

#[derive(Debug)]
enum Dialect {
    /// No byte yet; fds that came with an empty read wait for the first byte.
    Undecided(Vec<OwnedFd>),
    Requests(RequestDecoder),
    Firecracker(HandshakeDecoder),
}

impl Default for ServerDecoder {
    fn default() -> ServerDecoder {
        ServerDecoder { dialect: Dialect::Undecided(Vec::new()) }
    }
}

impl ServerDecoder {
    /// A decoder of a fresh connection.
    pub fn new() -> ServerDecoder {
        ServerDecoder::default()
    }

    /// Feed the bytes of one read and the fds that arrived with them.
    pub fn push(&mut self, bytes: &[u8], fds: Vec<OwnedFd>) {
        if let Dialect::Undecided(held) = &mut self.dialect {
            let Some(&first) = bytes.first() else {
                held.extend(fds);
                return;
            };
            let held = std::mem::take(held);
            self.dialect = if first == b'[' {
                Dialect::Firecracker(HandshakeDecoder::new())
            } else {
                Dialect::Requests(RequestDecoder::new())
            };
            if !held.is_empty() {
                self.push(&[], held);
            }
        }
        match &mut self.dialect {
            Dialect::Undecided(_) => {}
            Dialect::Requests(d) => d.push(bytes, fds),
            Dialect::Firecracker(d) => d.push(bytes, fds),
        }
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_incoming(&mut self) -> Result<Option<Incoming>, ControlError> {
        match &mut self.dialect {
            Dialect::Undecided(_) => Ok(None),
            Dialect::Requests(d) => d.next_incoming(),
            Dialect::Firecracker(d) => d.next_incoming(),
        }
    }

    /// Call at end of stream: `Ok` if it ended cleanly, else what was cut off.
    pub fn finish(&mut self) -> Result<(), ControlError> {
        match &mut self.dialect {
            Dialect::Undecided(held) => {
                held.clear();
                Ok(())
            }
            Dialect::Requests(d) => d.finish(),
            Dialect::Firecracker(d) => d.finish(),
        }
    }

    /// Whether the peer speaks Firecracker's handshake: it began one (also when it failed), or,
    /// before anything was read, the first byte waiting in `sock` is `[`.
    pub fn speaks_firecracker(&self, sock: BorrowedFd<'_>) -> bool {
        match self.dialect {
            Dialect::Undecided(_) => {
                let mut b = [0u8; 1];
                // SAFETY: recv writes at most 1 byte into `b`; MSG_PEEK leaves it in the socket.
                let n = unsafe {
                    libc::recv(
                        sock.as_raw_fd(),
                        b.as_mut_ptr().cast(),
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                n == 1 && b[0] == b'['
            }
            Dialect::Requests(_) => false,
            Dialect::Firecracker(_) => true,
        }
    }

    /// Whether the peer reads the broker's replies: Firecracker reads none, and a `PCB1` frame
    /// would be garbage to it.
    pub fn reads_replies(&self, sock: BorrowedFd<'_>) -> bool {
        !self.speaks_firecracker(sock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::frame::encode;
    use crate::control::protocol::Request;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn the_first_byte_picks_the_dialect() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut d = ServerDecoder::new();
        assert!(d.reads_replies(b.as_fd()));
        std::io::Write::write_all(&mut &a, b"[").unwrap();
        assert!(!d.reads_replies(b.as_fd()), "a waiting '[' is Firecracker");
        // Fds of an empty read wait for the first byte and go to the handshake.
        d.push(&[], vec![fd()]);
        d.push(br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]"#, Vec::new());
        assert!(matches!(d.next_incoming(), Ok(Some(Incoming::Firecracker(r, _))) if r.len() == 1));
        assert!(!d.reads_replies(b.as_fd()));
        d.finish().unwrap();

        let mut d = ServerDecoder::new();
        d.push(&encode(br#"{"op":"status"}"#).unwrap(), Vec::new());
        assert!(matches!(d.next_incoming(), Ok(Some(Incoming::Request(Request::Status, _)))));
        assert!(d.reads_replies(b.as_fd()), "a peer of our frames reads replies");
        d.push(b"[", Vec::new());
        assert!(matches!(d.next_incoming(), Err(ControlError::Garbage { .. })), "no handshake after frames");
    }
}
