//! The frame codec: `PCB1` magic, u32 little-endian payload length, JSON payload.
//!
//! [`FrameDecoder`] is pure: it is fed bytes and the fds that arrived with them, and hands out
//! whole frames with their fds. A batch of fds received by one `recvmsg` belongs to the frame that
//! contains the last byte of that read: on a Unix stream socket the kernel ends a read right after
//! the message that carried fds, and senders attach fds to the sendmsg of the frame's first bytes.
//!
//! What a peer can make the decoder hold is bounded: the bytes of one unfinished frame (at most
//! [`HEADER_LEN`] + [`MAX_PAYLOAD`]) plus what the caller fed after it, and the fds of one
//! unfinished frame ([`MAX_FDS`]). A peer that sends more fds than its frame may carry is refused
//! as soon as they arrive, not when the frame completes.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use serde::Serialize;

use super::error::{escape_prefix, ControlError};

/// The frame magic: "PCB1" (postcopy broker, protocol version 1).
pub const MAGIC: [u8; 4] = *b"PCB1";
/// Bytes before the payload: magic and length.
pub const HEADER_LEN: usize = 8;
/// The largest payload accepted (also the largest handshake of another dialect).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The most fds one frame may carry.
pub const MAX_FDS: usize = 8;

/// Encode one frame around `payload`.
pub fn encode(payload: &[u8]) -> Result<Vec<u8>, ControlError> {
    let too_large = || ControlError::TooLarge {
        what: "frame payload",
        len: payload.len() as u64,
        max: MAX_PAYLOAD as u64,
    };
    if payload.len() > MAX_PAYLOAD {
        return Err(too_large());
    }
    let len = u32::try_from(payload.len()).map_err(|_| too_large())?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Serialize `msg` to JSON and encode it as one frame.
pub fn encode_message<T: Serialize>(msg: &T) -> Result<Vec<u8>, ControlError> {
    let payload =
        serde_json::to_vec(msg).map_err(|e| ControlError::Invalid(format!("cannot encode: {e}")))?;
    encode(&payload)
}

/// One frame decoded from the stream: its JSON payload (not yet parsed) and the fds that came
/// with it.
#[derive(Debug)]
pub struct Frame {
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// Fds attached to the frame.
    pub fds: Vec<OwnedFd>,
}

/// Incremental decoder for one connection's byte stream.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Received bytes; those before `start` are decoded already.
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed (dropped from `buf` on the next push, so that decoding
    /// many small frames from one read moves the rest of the read once, not once per frame).
    start: usize,
    /// Stream offset of `buf[start]`.
    base: u64,
    /// Fd batches, each tagged with the stream offset just past the read that carried it.
    batches: VecDeque<(u64, Vec<OwnedFd>)>,
    /// An error was reported; input is ignored.
    failed: bool,
}

impl FrameDecoder {
    /// A decoder of a stream of frames.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Feed the bytes of one read and the fds that arrived with them.
    pub fn push(&mut self, bytes: &[u8], fds: Vec<OwnedFd>) {
        if self.failed {
            return; // fds dropped (closed) here
        }
        self.buf.drain(..self.start);
        self.start = 0;
        self.buf.extend_from_slice(bytes);
        if !fds.is_empty() {
            self.batches.push_back((self.base + self.buf.len() as u64, fds));
        }
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.data().len()
    }

    /// Fds received but not yet handed out with a frame.
    pub fn held_fds(&self) -> usize {
        self.batches.iter().map(|(_, b)| b.len()).sum()
    }

    /// The bytes not yet decoded.
    fn data(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After an error the decoder
    /// ignores all further input (and closes any fds pushed).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ControlError> {
        if self.failed {
            return Ok(None);
        }
        let r = self.next_inner();
        if r.is_err() {
            self.fail();
        }
        r
    }

    fn fail(&mut self) {
        self.failed = true;
        self.buf = Vec::new();
        self.start = 0;
        self.batches.clear();
    }

    /// Call at end of stream: `Ok` if it ended cleanly between frames, else the error describing
    /// what was cut off. Fds still held are closed.
    pub fn finish(&mut self) -> Result<(), ControlError> {
        let data = self.data();
        let r = if self.failed || data.is_empty() {
            Ok(())
        } else {
            let need = if data.len() < HEADER_LEN {
                HEADER_LEN
            } else {
                HEADER_LEN + u32::from_le_bytes([data[4], data[5], data[6], data[7]]) as usize
            };
            Err(ControlError::Truncated { what: "frame", have: data.len(), need })
        };
        self.fail();
        r
    }

    fn next_inner(&mut self) -> Result<Option<Frame>, ControlError> {
        let data = self.data();
        let avail = data.len();
        if avail == 0 {
            return Ok(None);
        }
        let m = avail.min(MAGIC.len());
        if data[..m] != MAGIC[..m] {
            return Err(ControlError::Garbage { got: escape_prefix(data) });
        }
        if avail < HEADER_LEN {
            return self.unfinished();
        }
        let len = u32::from_le_bytes([data[4], data[5], data[6], data[7]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(ControlError::TooLarge {
                what: "frame payload",
                len: len as u64,
                max: MAX_PAYLOAD as u64,
            });
        }
        let total = HEADER_LEN + len;
        if avail < total {
            return self.unfinished();
        }
        let payload = data[HEADER_LEN..total].to_vec();
        let fds = self.take_fds(self.base + total as u64);
        self.consume(total);
        if fds.len() > MAX_FDS {
            return Err(ControlError::TooManyFds { op: "frame".into(), max: MAX_FDS, got: fds.len() });
        }
        Ok(Some(Frame { payload, fds }))
    }

    /// More bytes are needed for the frame being received: every fd held belongs to it, and it
    /// may carry at most [`MAX_FDS`]. Refusing here bounds what a peer can pin with a frame it
    /// never ends.
    fn unfinished(&self) -> Result<Option<Frame>, ControlError> {
        let got = self.held_fds();
        if got > MAX_FDS {
            return Err(ControlError::TooManyFds { op: "unfinished frame".into(), max: MAX_FDS, got });
        }
        Ok(None)
    }

    /// Take every fd batch that arrived with a read ending at or before `end`.
    fn take_fds(&mut self, end: u64) -> Vec<OwnedFd> {
        let mut fds = Vec::new();
        while self.batches.front().is_some_and(|(e, _)| *e <= end) {
            if let Some((_, b)) = self.batches.pop_front() {
                fds.extend(b);
            }
        }
        fds
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.base += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    fn frame(payload: &str) -> Vec<u8> {
        encode(payload.as_bytes()).unwrap()
    }

    fn payload(f: Frame) -> (String, usize) {
        (String::from_utf8(f.payload).unwrap(), f.fds.len())
    }

    #[test]
    fn encode_layout() {
        let f = frame("{}");
        assert_eq!(&f[..4], b"PCB1");
        assert_eq!(&f[4..8], &[2, 0, 0, 0]);
        assert_eq!(&f[8..], b"{}");
        assert!(matches!(encode(&vec![b' '; MAX_PAYLOAD + 1]), Err(ControlError::TooLarge { .. })));
        assert!(encode(&vec![b' '; MAX_PAYLOAD]).is_ok());
    }

    #[test]
    fn partial_input_byte_by_byte() {
        let mut bytes = frame(r#"{"op":"status"}"#);
        bytes.extend(frame(r#"{"op":"hello"}"#));
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            d.push(&[*b], Vec::new());
            while let Some(x) = d.next_frame().unwrap() {
                got.push(payload(x).0);
            }
        }
        assert_eq!(got, vec![r#"{"op":"status"}"#, r#"{"op":"hello"}"#]);
        assert_eq!(d.buffered(), 0);
        d.finish().unwrap();
    }

    #[test]
    fn several_frames_in_one_read_and_fds_go_to_the_right_frame() {
        let a = frame("a");
        let b = frame("bb");
        let c = frame("ccc");
        let mut d = FrameDecoder::new();
        // Read 1: all of a and the first 3 bytes of b, with b's fds (the kernel ends a read with the
        // message that carried fds, so the fds belong to the frame holding the read's last byte).
        let mut r1 = a.clone();
        r1.extend_from_slice(&b[..3]);
        d.push(&r1, vec![fd(), fd()]);
        assert_eq!(payload(d.next_frame().unwrap().unwrap()), ("a".into(), 0));
        assert!(d.next_frame().unwrap().is_none());
        let mut r2 = b[3..].to_vec();
        r2.extend_from_slice(&c);
        d.push(&r2, vec![fd()]);
        assert_eq!(payload(d.next_frame().unwrap().unwrap()), ("bb".into(), 2));
        assert_eq!(payload(d.next_frame().unwrap().unwrap()), ("ccc".into(), 1));
        assert!(d.next_frame().unwrap().is_none());
    }

    #[test]
    fn oversized_length_is_rejected_from_the_header_alone() {
        let mut d = FrameDecoder::new();
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        d.push(&h, Vec::new());
        match d.next_frame() {
            Err(ControlError::TooLarge { len, max, .. }) => {
                assert_eq!(len, MAX_PAYLOAD as u64 + 1);
                assert_eq!(max, MAX_PAYLOAD as u64);
            }
            other => panic!("{other:?}"),
        }
        // After an error the decoder ignores input.
        d.push(&frame("{}"), vec![fd()]);
        assert!(d.next_frame().unwrap().is_none());
    }

    #[test]
    fn garbage_is_detected_on_the_first_wrong_byte() {
        let mut d = FrameDecoder::new();
        d.push(b"G", Vec::new());
        assert!(matches!(d.next_frame(), Err(ControlError::Garbage { .. })));
        let mut d = FrameDecoder::new();
        d.push(b"PCB2", Vec::new());
        let e = d.next_frame().unwrap_err();
        assert!(e.to_string().contains("PCB2"), "{e}");
        // Garbage after a good frame.
        let mut d = FrameDecoder::new();
        let mut bytes = frame("{}");
        bytes.extend_from_slice(b"\x00\x01");
        d.push(&bytes, Vec::new());
        assert!(d.next_frame().unwrap().is_some());
        assert!(matches!(d.next_frame(), Err(ControlError::Garbage { .. })));
        // Firecracker's handshake is not a frame (control::firecracker reads it).
        let mut d = FrameDecoder::new();
        d.push(b"[]", Vec::new());
        assert!(matches!(d.next_frame(), Err(ControlError::Garbage { .. })));
    }

    #[test]
    fn truncated_at_eof() {
        let f = frame(r#"{"op":"status"}"#);
        let mut d = FrameDecoder::new();
        d.push(&f[..10], Vec::new());
        assert!(d.next_frame().unwrap().is_none());
        match d.finish() {
            Err(ControlError::Truncated { have, need, .. }) => {
                assert_eq!(have, 10);
                assert_eq!(need, f.len());
            }
            other => panic!("{other:?}"),
        }
        let mut d = FrameDecoder::new();
        d.push(b"PC", Vec::new());
        assert!(d.next_frame().unwrap().is_none());
        assert!(matches!(d.finish(), Err(ControlError::Truncated { need: HEADER_LEN, .. })));
        let mut d = FrameDecoder::new();
        d.finish().unwrap();
    }

    #[test]
    fn fd_limit_per_frame() {
        let mut d = FrameDecoder::new();
        d.push(&frame("{}"), (0..MAX_FDS).map(|_| fd()).collect());
        assert_eq!(payload(d.next_frame().unwrap().unwrap()).1, MAX_FDS);
        d.push(&frame("{}"), (0..MAX_FDS + 1).map(|_| fd()).collect());
        assert!(matches!(d.next_frame(), Err(ControlError::TooManyFds { got, .. }) if got == MAX_FDS + 1));
    }

    /// A peer that sends fds with byte after byte of a frame it never ends used to pin every fd
    /// (3,201 on one connection); now the decoder refuses once the unfinished frame holds more
    /// than a frame may carry, and closes them.
    #[test]
    fn fds_of_an_unfinished_frame_are_bounded() {
        let f = frame(r#"{"op":"status"}"#);
        let mut d = FrameDecoder::new();
        let mut refused = None;
        for (i, b) in f[..f.len() - 1].iter().enumerate() {
            d.push(&[*b], vec![fd()]);
            match d.next_frame() {
                Ok(None) => assert!(d.held_fds() <= MAX_FDS),
                Err(ControlError::TooManyFds { max, got, .. }) => {
                    assert_eq!((max, got), (MAX_FDS, MAX_FDS + 1));
                    refused = Some(i);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(refused, Some(MAX_FDS), "refused at the first fd too many");
        assert_eq!(d.held_fds(), 0, "closed");
    }

    #[test]
    fn many_frames_in_one_read_then_a_partial_one() {
        let mut bytes = Vec::new();
        for i in 0..2000 {
            bytes.extend(frame(&format!("{i}")));
        }
        let next = frame("last");
        bytes.extend_from_slice(&next[..5]);
        let mut d = FrameDecoder::new();
        d.push(&bytes, Vec::new());
        for i in 0..2000 {
            assert_eq!(payload(d.next_frame().unwrap().unwrap()).0, i.to_string());
        }
        assert!(d.next_frame().unwrap().is_none());
        assert_eq!(d.buffered(), 5);
        d.push(&next[5..], vec![fd()]);
        assert_eq!(payload(d.next_frame().unwrap().unwrap()), ("last".into(), 1));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn fds_of_a_failed_stream_are_closed() {
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut d = FrameDecoder::new();
        d.push(b"XXXX", vec![w]);
        assert!(d.next_frame().is_err());
        // The write end was the only one: a read now sees end of file, not EAGAIN.
        let mut b = [0u8; 1];
        assert_eq!(nix::unistd::read(r.as_raw_fd(), &mut b).unwrap(), 0);
    }
}
