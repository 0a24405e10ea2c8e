//! [`HandshakeDecoder`]: one connection's Firecracker handshake, a bare JSON array of regions
//! (at most [`MAX_PAYLOAD`] bytes) with exactly one fd, the userfaultfd; nothing may follow it
//! but whitespace. Like the frame decoder it is pure (fed bytes and fds), bounded (the bytes of
//! the handshake and one fd; a second fd is refused as it arrives), and closes every fd it holds
//! once it fails.

use std::os::fd::OwnedFd;

use super::regions::FcRegionWire;
use crate::control::error::{escape_prefix, ControlError};
use crate::control::frame::MAX_PAYLOAD;
use crate::control::message::{check_fds, Incoming};

/// What errors call the handshake.
const WHAT: &str = "Firecracker handshake";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Collecting the array.
    #[default]
    Collecting,
    /// The handshake was delivered; nothing else may follow.
    Done,
    /// An error was reported; input is ignored.
    Failed,
}

/// Incremental decoder of a Firecracker handshake.
#[derive(Debug, Default)]
pub struct HandshakeDecoder {
    /// Bytes received and not yet decoded.
    buf: Vec<u8>,
    /// Fds received with them.
    fds: Vec<OwnedFd>,
    state: State,
    /// Where the array's closing bracket is looked for next.
    scan: JsonScan,
    /// Buffer length at the last full JSON parse of a handshake that was not complete yet.
    parsed_at: usize,
    /// Full parses so far (tests check that it stays logarithmic).
    parses: usize,
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

impl HandshakeDecoder {
    /// A decoder of a stream that began with `[`.
    pub fn new() -> HandshakeDecoder {
        HandshakeDecoder::default()
    }

    /// Feed the bytes of one read and the fds that arrived with them.
    pub fn push(&mut self, bytes: &[u8], fds: Vec<OwnedFd>) {
        if self.state == State::Failed {
            return; // fds dropped (closed) here
        }
        self.buf.extend_from_slice(bytes);
        self.fds.extend(fds);
    }

    /// The handshake once complete (regions with their page size resolved, and the uffd),
    /// `Ok(None)` if more bytes are needed or it was delivered already. After an error all
    /// further input is ignored.
    pub fn next_incoming(&mut self) -> Result<Option<Incoming>, ControlError> {
        let r = match self.state {
            State::Collecting => self.collect(),
            State::Done => self.after().map(|()| None),
            State::Failed => Ok(None),
        };
        if r.is_err() {
            self.fail();
        }
        r
    }

    /// Call at end of stream: `Ok` if the handshake was complete, else the error saying it was
    /// cut off. Fds still held are closed.
    pub fn finish(&mut self) -> Result<(), ControlError> {
        let r = match self.state {
            State::Collecting if !self.buf.is_empty() => {
                Err(ControlError::Truncated { what: WHAT, have: self.buf.len(), need: self.buf.len() + 1 })
            }
            _ => Ok(()), // after the handshake only whitespace can be left
        };
        self.fail();
        r
    }

    fn fail(&mut self) {
        self.state = State::Failed;
        self.buf = Vec::new();
        self.fds.clear();
    }

    fn collect(&mut self) -> Result<Option<Incoming>, ControlError> {
        // Parse only when the array has closed, or the buffer has doubled since the last parse (to
        // refuse garbage early): re-parsing on every read would be quadratic in a trickled
        // handshake (found while fuzzing: 64 KiB sent a byte per read took seconds of CPU).
        let closed = self.scan.closes(&self.buf);
        if !closed && self.buf.len() <= MAX_PAYLOAD && self.buf.len() < 2 * self.parsed_at.max(64) {
            return self.unfinished();
        }
        self.parsed_at = self.buf.len();
        self.parses += 1;
        let mut stream = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Vec<FcRegionWire>>();
        match stream.next() {
            Some(Ok(regions)) => {
                let end = stream.byte_offset();
                self.buf.drain(..end);
                self.state = State::Done;
                // Whitespace after the array is fine; anything else is reported on the next call.
                let fds = std::mem::take(&mut self.fds);
                decode(&regions, fds).map(Some)
            }
            Some(Err(e)) if e.is_eof() => {
                if self.buf.len() > MAX_PAYLOAD {
                    Err(ControlError::TooLarge {
                        what: WHAT,
                        len: self.buf.len() as u64,
                        max: MAX_PAYLOAD as u64,
                    })
                } else {
                    self.unfinished()
                }
            }
            Some(Err(e)) => Err(ControlError::BadJson(format!("{WHAT}: {e}"))),
            None => self.unfinished(),
        }
    }

    /// After the handshake: whitespace is skipped, anything else is refused.
    fn after(&mut self) -> Result<(), ControlError> {
        if let Some(pos) = self.buf.iter().position(|b| !b.is_ascii_whitespace()) {
            return Err(ControlError::BadFrame(format!(
                "data after the {WHAT} ({}); nothing may follow it",
                escape_prefix(&self.buf[pos..])
            )));
        }
        if !self.fds.is_empty() {
            return Err(ControlError::BadFrame(format!(
                "file descriptors after the {WHAT}; nothing may follow it"
            )));
        }
        self.buf.clear();
        Ok(())
    }

    /// More bytes are needed: the handshake carries one fd, so a second is refused at once (a
    /// peer cannot pin fds with a handshake it never ends).
    fn unfinished(&self) -> Result<Option<Incoming>, ControlError> {
        if self.fds.len() > 1 {
            return Err(ControlError::TooManyFds {
                op: format!("unfinished {WHAT}"),
                max: 1,
                got: self.fds.len(),
            });
        }
        Ok(None)
    }
}

/// The handshake as a message: exactly one fd, and every region with a page size.
fn decode(regions: &[FcRegionWire], fds: Vec<OwnedFd>) -> Result<Incoming, ControlError> {
    check_fds(WHAT, 1, fds.len())?;
    let mut resolved = Vec::with_capacity(regions.len());
    for (i, r) in regions.iter().enumerate() {
        resolved.push(r.resolve().ok_or_else(|| {
            ControlError::BadJson(format!(
                "{WHAT} region {i}: neither 'page_size' nor 'page_size_kib' is given"
            ))
        })?);
    }
    let uffd = fds.into_iter().next().ok_or_else(|| ControlError::MissingFd {
        op: WHAT.into(),
        expected: 1,
        got: 0,
    })?;
    Ok(Incoming::Firecracker(resolved, uffd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    fn regions(m: Incoming) -> Vec<super::super::FcRegion> {
        match m {
            Incoming::Firecracker(regions, _) => regions,
            other => panic!("not a handshake: {other:?}"),
        }
    }

    #[test]
    fn firecracker_handshake_in_pieces() {
        let json = br#"[{"base_host_virt_addr":140000000000,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
        let mut d = HandshakeDecoder::new();
        d.push(&json[..20], vec![fd()]);
        assert!(d.next_incoming().unwrap().is_none());
        d.push(&json[20..], Vec::new());
        let r = regions(d.next_incoming().unwrap().unwrap());
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].size, r[0].page_size), (8192, 4096));
        assert!(d.next_incoming().unwrap().is_none());
        d.push(b"\n", Vec::new());
        assert!(d.next_incoming().unwrap().is_none());
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
        let mut d = HandshakeDecoder::new();
        let mut done = None;
        for (i, b) in json.as_bytes().iter().enumerate() {
            d.push(&[*b], if i == 0 { vec![fd()] } else { Vec::new() });
            if let Some(u) = d.next_incoming().unwrap() {
                done = Some((i, u));
            }
        }
        let (at, unit) = done.unwrap();
        assert_eq!(at, json.len() - 1, "complete exactly at the closing bracket");
        assert_eq!(regions(unit).len(), json.matches("base_host").count());
        assert!(d.parses <= 12, "{} parses", d.parses);
        // Garbage trickled in is still refused long before the size limit.
        let mut d = HandshakeDecoder::new();
        let mut refused_at = None;
        for (i, b) in b"[1,{\"a\":2".iter().chain([b' '; 200].iter()).enumerate() {
            d.push(&[*b], Vec::new());
            if d.next_incoming().is_err() {
                refused_at = Some(i);
                break;
            }
        }
        assert!(refused_at.is_some_and(|i| i < 130), "{refused_at:?}");
    }

    #[test]
    fn firecracker_errors() {
        let mut d = HandshakeDecoder::new();
        d.push(b"[1,2]", Vec::new());
        assert!(matches!(d.next_incoming(), Err(ControlError::BadJson(_))));
        let mut d = HandshakeDecoder::new();
        d.push(b"[]x", vec![fd()]);
        assert!(regions(d.next_incoming().unwrap().unwrap()).is_empty());
        assert!(matches!(d.next_incoming(), Err(ControlError::BadFrame(_))));
        let mut d = HandshakeDecoder::new();
        d.push(b"[]", vec![fd()]);
        assert!(d.next_incoming().unwrap().is_some());
        d.push(b" ", vec![fd()]);
        assert!(matches!(d.next_incoming(), Err(ControlError::BadFrame(_))));
        let mut d = HandshakeDecoder::new();
        d.push(b"[", Vec::new());
        d.push(&vec![b' '; MAX_PAYLOAD + 1], Vec::new());
        assert!(matches!(d.next_incoming(), Err(ControlError::TooLarge { .. })));
        let mut d = HandshakeDecoder::new();
        d.push(b"[{\"size\":", Vec::new());
        assert!(d.next_incoming().unwrap().is_none());
        assert!(matches!(d.finish(), Err(ControlError::Truncated { what: WHAT, .. })));
    }

    /// A handshake carries exactly one fd: a second is refused before it ends, none is refused
    /// when it ends.
    #[test]
    fn firecracker_fds_are_bounded() {
        let mut d = HandshakeDecoder::new();
        d.push(b"[{\"size\":", vec![fd()]);
        assert!(d.next_incoming().unwrap().is_none());
        d.push(b"4096", vec![fd()]);
        assert!(matches!(d.next_incoming(), Err(ControlError::TooManyFds { max: 1, got: 2, .. })));
        assert_eq!(d.fds.len(), 0, "closed");
        let mut d = HandshakeDecoder::new();
        d.push(b"[]", Vec::new());
        assert!(matches!(d.next_incoming(), Err(ControlError::MissingFd { expected: 1, got: 0, .. })));
    }

    #[test]
    fn firecracker_regions_need_a_page_size() {
        let json = br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size_kib":4096}]"#;
        let mut d = HandshakeDecoder::new();
        d.push(json, vec![fd()]);
        assert_eq!(regions(d.next_incoming().unwrap().unwrap())[0].page_size, 4096);
        let mut d = HandshakeDecoder::new();
        d.push(br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0}]"#, vec![fd()]);
        assert!(matches!(d.next_incoming(), Err(ControlError::BadJson(_))));
    }
}
