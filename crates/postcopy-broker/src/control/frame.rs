//! The frame codec: `PCB1` magic, u32 little-endian payload length, JSON payload; plus
//! recognition of Firecracker's UFFD handshake (a bare JSON array) on the same stream.
//!
//! [`FrameDecoder`] is pure: it is fed bytes and the fds that arrived with them, and hands out
//! whole frames with their fds. A batch of fds received by one `recvmsg` belongs to the frame that
//! contains the last byte of that read: on a Unix stream socket the kernel ends a read right after
//! the message that carried fds, and senders attach fds to the sendmsg of the frame's first bytes.
//!
//! What a peer can make the decoder hold is bounded: the bytes of one unfinished frame (at most
//! [`HEADER_LEN`] + [`MAX_PAYLOAD`]) plus what the caller fed after it, and the fds of one
//! unfinished frame ([`MAX_FDS`]; one for a Firecracker handshake). A peer that sends more fds
//! than its frame may carry is refused as soon as they arrive, not when the frame completes.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use serde::Serialize;

use super::error::{escape_prefix, ControlError};
use super::protocol::FcRegionWire;

/// The frame magic: "PCB1" (postcopy broker, protocol version 1).
pub const MAGIC: [u8; 4] = *b"PCB1";
/// Bytes before the payload: magic and length.
pub const HEADER_LEN: usize = 8;
/// The largest payload (and the largest Firecracker handshake) accepted.
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

/// One unit decoded from the stream.
#[derive(Debug)]
pub enum Decoded {
    /// A frame's JSON payload (not yet parsed) and the fds that came with it.
    Frame {
        /// The payload bytes.
        payload: Vec<u8>,
        /// Fds attached to the frame.
        fds: Vec<OwnedFd>,
    },
    /// A complete Firecracker handshake and every fd that came with it.
    Firecracker {
        /// The regions as sent.
        regions: Vec<FcRegionWire>,
        /// Fds attached to the handshake.
        fds: Vec<OwnedFd>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing received yet.
    Start,
    /// Our frames.
    Frames,
    /// Collecting a Firecracker handshake.
    Firecracker,
    /// The handshake was delivered; nothing else may follow.
    FirecrackerDone,
    /// An error was reported; input is ignored.
    Failed,
}

/// Incremental decoder for one connection's byte stream.
#[derive(Debug)]
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
    mode: Mode,
    accept_firecracker: bool,
    /// The stream began as a Firecracker handshake (kept after a failure).
    firecracker: bool,
    /// Where the Firecracker handshake's closing bracket is looked for next.
    fc_scan: JsonScan,
    /// Buffer length at the last full JSON parse of a handshake that was not complete yet.
    fc_parsed_at: usize,
    /// Full parses of the handshake so far (tests check that it stays logarithmic).
    fc_parses: usize,
}

/// Incremental bracket matching over a JSON text: finds where the top-level value ends without
/// parsing it again for every read, so a handshake trickled in byte by byte costs linear time.
#[derive(Debug, Default, Clone, Copy)]
struct JsonScan {
    /// Bytes already scanned.
    pos: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl JsonScan {
    /// Scan the new bytes of `buf`; true once the top-level array or object has closed.
    fn closes(&mut self, buf: &[u8]) -> bool {
        while let Some(&b) = buf.get(self.pos) {
            self.pos += 1;
            if self.in_string {
                match b {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'[' | b'{' => self.depth += 1,
                b']' | b'}' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return true;
                    }
                }
                _ => {}
            }
        }
        false
    }
}

impl FrameDecoder {
    /// A decoder; `accept_firecracker` lets a stream that starts with `[` be a Firecracker
    /// handshake (server side).
    pub fn new(accept_firecracker: bool) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            base: 0,
            batches: VecDeque::new(),
            mode: Mode::Start,
            accept_firecracker,
            firecracker: false,
            fc_scan: JsonScan::default(),
            fc_parsed_at: 0,
            fc_parses: 0,
        }
    }

    /// Feed the bytes of one read and the fds that arrived with them.
    pub fn push(&mut self, bytes: &[u8], fds: Vec<OwnedFd>) {
        if self.mode == Mode::Failed {
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

    /// Fds received but not yet handed out with a unit.
    pub fn held_fds(&self) -> usize {
        self.batches.iter().map(|(_, b)| b.len()).sum()
    }

    /// The bytes not yet decoded.
    fn data(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Whether this stream began as a Firecracker handshake (also after it failed).
    pub fn is_firecracker(&self) -> bool {
        self.firecracker
    }

    /// Whether no byte was fed yet (the dialect is not known).
    pub fn is_fresh(&self) -> bool {
        self.mode == Mode::Start && self.data().is_empty()
    }

    /// The next complete unit, `Ok(None)` if more bytes are needed. After an error the decoder
    /// ignores all further input (and closes any fds pushed).
    pub fn next_unit(&mut self) -> Result<Option<Decoded>, ControlError> {
        let r = self.next_inner();
        if r.is_err() {
            self.fail();
        }
        r
    }

    fn fail(&mut self) {
        self.mode = Mode::Failed;
        self.buf = Vec::new();
        self.start = 0;
        self.batches.clear();
    }

    /// Call at end of stream: `Ok` if it ended cleanly between units, else the error describing
    /// what was cut off. Fds still held are closed.
    pub fn finish(&mut self) -> Result<(), ControlError> {
        let data = self.data();
        let r = match self.mode {
            Mode::Failed => Ok(()),
            _ if data.is_empty() => Ok(()),
            Mode::Firecracker => Err(ControlError::Truncated {
                what: "Firecracker handshake",
                have: data.len(),
                need: data.len() + 1,
            }),
            Mode::FirecrackerDone => Ok(()), // only whitespace can be left
            Mode::Start | Mode::Frames => {
                let need = if data.len() < HEADER_LEN {
                    HEADER_LEN
                } else {
                    HEADER_LEN + u32::from_le_bytes([data[4], data[5], data[6], data[7]]) as usize
                };
                Err(ControlError::Truncated { what: "frame", have: data.len(), need })
            }
        };
        self.fail();
        r
    }

    fn next_inner(&mut self) -> Result<Option<Decoded>, ControlError> {
        if self.mode == Mode::Start {
            match self.data().first() {
                None => return Ok(None),
                Some(b'[') if self.accept_firecracker => {
                    self.mode = Mode::Firecracker;
                    self.firecracker = true;
                }
                Some(_) => self.mode = Mode::Frames,
            }
        }
        match self.mode {
            Mode::Frames => self.next_frame(),
            Mode::Firecracker => self.next_firecracker(),
            Mode::FirecrackerDone => {
                let data = self.data();
                if let Some(pos) = data.iter().position(|b| !b.is_ascii_whitespace()) {
                    return Err(ControlError::BadFrame(format!(
                        "data after the Firecracker handshake ({}); nothing may follow it",
                        escape_prefix(&data[pos..])
                    )));
                }
                if !self.batches.is_empty() {
                    return Err(ControlError::BadFrame(
                        "file descriptors after the Firecracker handshake; nothing may follow it".into(),
                    ));
                }
                self.consume(self.buffered());
                Ok(None)
            }
            Mode::Start | Mode::Failed => Ok(None),
        }
    }

    fn next_frame(&mut self) -> Result<Option<Decoded>, ControlError> {
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
            return self.unfinished("frame", MAX_FDS);
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
            return self.unfinished("frame", MAX_FDS);
        }
        let payload = data[HEADER_LEN..total].to_vec();
        let fds = self.take_fds(self.base + total as u64);
        self.consume(total);
        if fds.len() > MAX_FDS {
            return Err(ControlError::TooManyFds { op: "frame".into(), max: MAX_FDS, got: fds.len() });
        }
        Ok(Some(Decoded::Frame { payload, fds }))
    }

    fn next_firecracker(&mut self) -> Result<Option<Decoded>, ControlError> {
        // Parse only when the array has closed, or the buffer has doubled since the last parse (to
        // refuse garbage early): re-parsing on every read would be quadratic in a trickled
        // handshake (found while fuzzing: 64 KiB sent a byte per read took seconds of CPU).
        // Nothing is consumed before the handshake completes: `start` is 0 here.
        let closed = self.fc_scan.closes(&self.buf);
        if !closed && self.buf.len() <= MAX_PAYLOAD && self.buf.len() < 2 * self.fc_parsed_at.max(64) {
            return self.unfinished("Firecracker handshake", 1);
        }
        self.fc_parsed_at = self.buf.len();
        self.fc_parses += 1;
        let mut stream = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Vec<FcRegionWire>>();
        match stream.next() {
            Some(Ok(regions)) => {
                let end = stream.byte_offset();
                let fds = self.take_all_fds();
                self.consume(end);
                self.mode = Mode::FirecrackerDone;
                // Whitespace after the array is fine; anything else is reported on the next call.
                Ok(Some(Decoded::Firecracker { regions, fds }))
            }
            Some(Err(e)) if e.is_eof() => {
                if self.buf.len() > MAX_PAYLOAD {
                    Err(ControlError::TooLarge {
                        what: "Firecracker handshake",
                        len: self.buf.len() as u64,
                        max: MAX_PAYLOAD as u64,
                    })
                } else {
                    self.unfinished("Firecracker handshake", 1)
                }
            }
            Some(Err(e)) => Err(ControlError::BadJson(format!("Firecracker handshake: {e}"))),
            None => self.unfinished("Firecracker handshake", 1),
        }
    }

    /// More bytes are needed for the unit being received: every fd held belongs to it, and it may
    /// carry at most `max`. Refusing here bounds what a peer can pin with a unit it never ends.
    fn unfinished(&self, what: &str, max: usize) -> Result<Option<Decoded>, ControlError> {
        let got = self.held_fds();
        if got > max {
            return Err(ControlError::TooManyFds { op: format!("unfinished {what}"), max, got });
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

    fn take_all_fds(&mut self) -> Vec<OwnedFd> {
        self.batches.drain(..).flat_map(|(_, b)| b).collect()
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

    fn payload(d: Decoded) -> (String, usize) {
        match d {
            Decoded::Frame { payload, fds } => (String::from_utf8(payload).unwrap(), fds.len()),
            Decoded::Firecracker { .. } => panic!("not a frame"),
        }
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
        let mut d = FrameDecoder::new(true);
        let mut got = Vec::new();
        for b in &bytes {
            d.push(&[*b], Vec::new());
            while let Some(x) = d.next_unit().unwrap() {
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
        let mut d = FrameDecoder::new(true);
        // Read 1: all of a and the first 3 bytes of b, with b's fds (the kernel ends a read with the
        // message that carried fds, so the fds belong to the frame holding the read's last byte).
        let mut r1 = a.clone();
        r1.extend_from_slice(&b[..3]);
        d.push(&r1, vec![fd(), fd()]);
        assert_eq!(payload(d.next_unit().unwrap().unwrap()), ("a".into(), 0));
        assert!(d.next_unit().unwrap().is_none());
        let mut r2 = b[3..].to_vec();
        r2.extend_from_slice(&c);
        d.push(&r2, vec![fd()]);
        assert_eq!(payload(d.next_unit().unwrap().unwrap()), ("bb".into(), 2));
        assert_eq!(payload(d.next_unit().unwrap().unwrap()), ("ccc".into(), 1));
        assert!(d.next_unit().unwrap().is_none());
    }

    #[test]
    fn oversized_length_is_rejected_from_the_header_alone() {
        let mut d = FrameDecoder::new(true);
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        d.push(&h, Vec::new());
        match d.next_unit() {
            Err(ControlError::TooLarge { len, max, .. }) => {
                assert_eq!(len, MAX_PAYLOAD as u64 + 1);
                assert_eq!(max, MAX_PAYLOAD as u64);
            }
            other => panic!("{other:?}"),
        }
        // After an error the decoder ignores input.
        d.push(&frame("{}"), vec![fd()]);
        assert!(d.next_unit().unwrap().is_none());
    }

    #[test]
    fn garbage_is_detected_on_the_first_wrong_byte() {
        let mut d = FrameDecoder::new(true);
        d.push(b"G", Vec::new());
        assert!(matches!(d.next_unit(), Err(ControlError::Garbage { .. })));
        let mut d = FrameDecoder::new(true);
        d.push(b"PCB2", Vec::new());
        let e = d.next_unit().unwrap_err();
        assert!(e.to_string().contains("PCB2"), "{e}");
        // Garbage after a good frame.
        let mut d = FrameDecoder::new(true);
        let mut bytes = frame("{}");
        bytes.extend_from_slice(b"\x00\x01");
        d.push(&bytes, Vec::new());
        assert!(d.next_unit().unwrap().is_some());
        assert!(matches!(d.next_unit(), Err(ControlError::Garbage { .. })));
        // A client-side decoder does not accept '['.
        let mut d = FrameDecoder::new(false);
        d.push(b"[]", Vec::new());
        assert!(matches!(d.next_unit(), Err(ControlError::Garbage { .. })));
    }

    #[test]
    fn truncated_at_eof() {
        let f = frame(r#"{"op":"status"}"#);
        let mut d = FrameDecoder::new(true);
        d.push(&f[..10], Vec::new());
        assert!(d.next_unit().unwrap().is_none());
        match d.finish() {
            Err(ControlError::Truncated { have, need, .. }) => {
                assert_eq!(have, 10);
                assert_eq!(need, f.len());
            }
            other => panic!("{other:?}"),
        }
        let mut d = FrameDecoder::new(true);
        d.push(b"PC", Vec::new());
        assert!(d.next_unit().unwrap().is_none());
        assert!(matches!(d.finish(), Err(ControlError::Truncated { need: HEADER_LEN, .. })));
        let mut d = FrameDecoder::new(true);
        d.push(b"[{\"size\":", Vec::new());
        assert!(d.next_unit().unwrap().is_none());
        assert!(matches!(d.finish(), Err(ControlError::Truncated { what: "Firecracker handshake", .. })));
        let mut d = FrameDecoder::new(true);
        d.finish().unwrap();
    }

    #[test]
    fn fd_limit_per_frame() {
        let mut d = FrameDecoder::new(true);
        d.push(&frame("{}"), (0..MAX_FDS).map(|_| fd()).collect());
        assert_eq!(payload(d.next_unit().unwrap().unwrap()).1, MAX_FDS);
        d.push(&frame("{}"), (0..MAX_FDS + 1).map(|_| fd()).collect());
        assert!(matches!(d.next_unit(), Err(ControlError::TooManyFds { got, .. }) if got == MAX_FDS + 1));
    }

    /// A peer that sends fds with byte after byte of a frame it never ends used to pin every fd
    /// (3,201 on one connection); now the decoder refuses once the unfinished frame holds more
    /// than a frame may carry, and closes them.
    #[test]
    fn fds_of_an_unfinished_frame_are_bounded() {
        let f = frame(r#"{"op":"status"}"#);
        let mut d = FrameDecoder::new(true);
        let mut refused = None;
        for (i, b) in f[..f.len() - 1].iter().enumerate() {
            d.push(&[*b], vec![fd()]);
            match d.next_unit() {
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
        // A Firecracker handshake carries exactly one fd: a second is refused before it ends.
        let mut d = FrameDecoder::new(true);
        d.push(b"[{\"size\":", vec![fd()]);
        assert!(d.next_unit().unwrap().is_none());
        d.push(b"4096", vec![fd()]);
        assert!(matches!(d.next_unit(), Err(ControlError::TooManyFds { max: 1, got: 2, .. })));
    }

    #[test]
    fn many_frames_in_one_read_then_a_partial_one() {
        let mut bytes = Vec::new();
        for i in 0..2000 {
            bytes.extend(frame(&format!("{i}")));
        }
        let next = frame("last");
        bytes.extend_from_slice(&next[..5]);
        let mut d = FrameDecoder::new(true);
        d.push(&bytes, Vec::new());
        for i in 0..2000 {
            assert_eq!(payload(d.next_unit().unwrap().unwrap()).0, i.to_string());
        }
        assert!(d.next_unit().unwrap().is_none());
        assert_eq!(d.buffered(), 5);
        d.push(&next[5..], vec![fd()]);
        assert_eq!(payload(d.next_unit().unwrap().unwrap()), ("last".into(), 1));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn fds_of_a_failed_stream_are_closed() {
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut d = FrameDecoder::new(true);
        d.push(b"XXXX", vec![w]);
        assert!(d.next_unit().is_err());
        // The write end was the only one: a read now sees end of file, not EAGAIN.
        let mut b = [0u8; 1];
        assert_eq!(nix::unistd::read(r.as_raw_fd(), &mut b).unwrap(), 0);
    }

    #[test]
    fn firecracker_handshake_in_pieces() {
        let json = br#"[{"base_host_virt_addr":140000000000,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
        let mut d = FrameDecoder::new(true);
        d.push(&json[..20], vec![fd()]);
        assert!(d.next_unit().unwrap().is_none());
        assert!(d.is_firecracker());
        d.push(&json[20..], Vec::new());
        match d.next_unit().unwrap().unwrap() {
            Decoded::Firecracker { regions, fds } => {
                assert_eq!(regions.len(), 1);
                assert_eq!(regions[0].size, 8192);
                assert_eq!(fds.len(), 1);
            }
            Decoded::Frame { .. } => panic!("not a handshake"),
        }
        assert!(d.next_unit().unwrap().is_none());
        d.push(b"\n", Vec::new());
        assert!(d.next_unit().unwrap().is_none());
        d.finish().unwrap();
    }

    /// Found while fuzzing: the handshake was parsed again for every read, so 64 KiB trickled a
    /// byte per read cost a quadratic amount of parsing. Now a parse happens when the array closes
    /// or the buffer has doubled.
    #[test]
    fn trickled_firecracker_handshake_is_parsed_a_logarithmic_number_of_times() {
        let region =
            r#"{"base_host_virt_addr":1048576,"size":4096,"offset":0,"page_size":4096,"x":"]}[{\\\""}"#;
        let mut json = String::from("[");
        while json.len() + 2 * (region.len() + 1) < MAX_PAYLOAD {
            json.push_str(region);
            json.push(',');
        }
        json.push_str(region);
        json.push(']');
        let mut d = FrameDecoder::new(true);
        let mut done = None;
        for (i, b) in json.as_bytes().iter().enumerate() {
            d.push(&[*b], if i == 0 { vec![fd()] } else { Vec::new() });
            if let Some(u) = d.next_unit().unwrap() {
                done = Some((i, u));
            }
        }
        let (at, unit) = done.unwrap();
        assert_eq!(at, json.len() - 1, "complete exactly at the closing bracket");
        match unit {
            Decoded::Firecracker { regions, fds } => {
                assert_eq!(regions.len(), json.matches("base_host").count());
                assert_eq!(fds.len(), 1);
            }
            Decoded::Frame { .. } => panic!("not a handshake"),
        }
        assert!(d.fc_parses <= 12, "{} parses", d.fc_parses);
        // Garbage trickled in is still refused long before the size limit.
        let mut d = FrameDecoder::new(true);
        let mut refused_at = None;
        for (i, b) in b"[1,{\"a\":2".iter().chain([b' '; 200].iter()).enumerate() {
            d.push(&[*b], Vec::new());
            if d.next_unit().is_err() {
                refused_at = Some(i);
                break;
            }
        }
        assert!(refused_at.is_some_and(|i| i < 130), "{refused_at:?}");
    }

    #[test]
    fn firecracker_errors() {
        let mut d = FrameDecoder::new(true);
        d.push(b"[1,2]", Vec::new());
        assert!(matches!(d.next_unit(), Err(ControlError::BadJson(_))));
        let mut d = FrameDecoder::new(true);
        d.push(b"[]x", Vec::new());
        assert!(d.next_unit().unwrap().is_some());
        assert!(matches!(d.next_unit(), Err(ControlError::BadFrame(_))));
        let mut d = FrameDecoder::new(true);
        d.push(b"[", Vec::new());
        d.push(&vec![b' '; MAX_PAYLOAD + 1], Vec::new());
        assert!(matches!(d.next_unit(), Err(ControlError::TooLarge { .. })));
    }
}
