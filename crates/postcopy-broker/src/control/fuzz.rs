//! Fuzzing entry points for the control socket's decoders (cargo-fuzz targets in fuzz/ are one line
//! each). They feed hostile bytes, and fds, to [`FrameDecoder`], [`ServerDecoder`],
//! [`decode_request`] and [`decode_response`] (with the `firecracker` feature the server side also
//! takes Firecracker handshakes, whose regions go on to a private table: control::firecracker's
//! fuzz). They never panic on bad input; a panic means a bug: a decoder panicked, an accepted
//! message does not survive re-encoding, an error cannot be sent back as a reply, or a private
//! table accepted regions that break its own invariants.
//!
//! Fds are real (`/dev/null` opened per fd), because the decoders own and close them.

use std::fs::File;
use std::os::fd::OwnedFd;

use super::frame::{encode_message, Frame, FrameDecoder, MAX_PAYLOAD};
use super::message::{decode_request, decode_response, Incoming, ServerDecoder};
use super::protocol::Response;
use super::ControlError;

/// Fuzz the control stream. `data[0]` bit 0 picks the side: set = server (requests are decoded,
/// and a Firecracker handshake with that feature), clear = client (responses are decoded). The
/// rest is a list of reads, each `[fds, len, len bytes]`: `fds % 10` fds arrive with that read
/// (10 → more than a frame may carry). After the last read the stream ends.
pub fn fuzz_control_stream(data: &[u8]) {
    let Some((&side, rest)) = data.split_first() else { return };
    if side & 1 == 1 {
        let mut dec = ServerDecoder::new();
        for (bytes, nfds) in reads(rest) {
            dec.push(bytes, fake_fds(nfds));
            if !drain(|| dec.next_incoming(), check_incoming) {
                return;
            }
        }
        if let Err(e) = dec.finish() {
            check_error_reply(&e);
        }
    } else {
        let mut dec = FrameDecoder::new();
        for (bytes, nfds) in reads(rest) {
            dec.push(bytes, fake_fds(nfds));
            if !drain(|| dec.next_frame(), check_reply_frame) {
                return;
            }
        }
        if let Err(e) = dec.finish() {
            check_error_reply(&e);
        }
    }
}

/// The reads of a control_stream input: each `[fds, len, len bytes]`, as (bytes, fds % 10).
fn reads(mut rest: &[u8]) -> impl Iterator<Item = (&[u8], usize)> {
    std::iter::from_fn(move || {
        let [nfds, len, tail @ ..] = rest else { return None };
        let n = usize::from(*len).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        rest = next;
        Some((bytes, usize::from(*nfds % 10)))
    })
}

/// Fuzz one request payload (the JSON inside a frame) on the server side; `data[0] % 4` fds come
/// with it.
pub fn fuzz_request(data: &[u8]) {
    let Some((&nfds, payload)) = data.split_first() else { return };
    match decode_request(payload, fake_fds(usize::from(nfds % 4))) {
        Ok(m) => check_incoming(m),
        Err(e) => check_error_reply(&e),
    }
}

/// Fuzz one response payload on the client side.
pub fn fuzz_response(data: &[u8]) {
    if let Ok(r) = decode_response(data) {
        check_response(&r);
    }
}

/// Take every unit out of a decoder and check it; false once the stream failed.
fn drain<T>(mut next: impl FnMut() -> Result<Option<T>, ControlError>, check: impl Fn(T)) -> bool {
    loop {
        match next() {
            Ok(Some(unit)) => check(unit),
            Ok(None) => return true,
            Err(e) => {
                check_error_reply(&e);
                return false;
            }
        }
    }
}

/// A frame the client decoded: within the size limit, and a response it accepts re-encodes.
fn check_reply_frame(frame: Frame) {
    if frame.payload.len() > MAX_PAYLOAD {
        panic!("a frame of {} bytes passed the {MAX_PAYLOAD}-byte limit", frame.payload.len());
    }
    if let Ok(r) = decode_response(&frame.payload) {
        check_response(&r);
    }
}

/// An accepted message: fd count as promised, and a request re-encodes to the same request.
fn check_incoming(m: Incoming) {
    match m {
        Incoming::Request(req, fds) => {
            if fds.len() != req.expected_fds() {
                panic!("'{}' accepted with {} fds, expects {}", req.op(), fds.len(), req.expected_fds());
            }
            let again = match serde_json::to_vec(&req) {
                Ok(bytes) => decode_request(&bytes, fds),
                Err(e) => panic!("an accepted request does not serialize: {req:?}: {e}"),
            };
            match again {
                Ok(Incoming::Request(r, _)) if r == req => {}
                other => panic!("request {req:?} re-decoded as {other:?}"),
            }
        }
        #[cfg(feature = "firecracker")]
        Incoming::Firecracker(regions, _uffd) => super::firecracker::fuzz::check_private(&regions),
    }
}

/// A response the client accepted re-encodes into a frame that decodes again.
fn check_response(r: &Response) {
    let frame = match encode_message(r) {
        Ok(f) => f,
        // A response larger than a frame cannot have come in one; re-encoding may only grow it by
        // escaping, which is still a valid refusal, not a bug.
        Err(ControlError::TooLarge { .. }) => return,
        Err(e) => panic!("an accepted response does not re-encode: {r:?}: {e}"),
    };
    if let Err(e) = decode_response(&frame[super::frame::HEADER_LEN..]) {
        panic!("response {r:?} does not decode after re-encoding: {e}");
    }
}

/// The server answers an error with an `error` reply before closing: that reply must fit a frame.
pub(crate) fn check_error_reply(e: &ControlError) {
    if let Some(resp) = e.to_response() {
        if let Err(x) = encode_message(&resp) {
            panic!("the error reply to '{e}' cannot be sent: {x}");
        }
    }
}

/// `n` fds; fewer if the process runs out (the decoders only count and close them).
pub(crate) fn fake_fds(n: usize) -> Vec<OwnedFd> {
    (0..n).filter_map(|_| File::open("/dev/null").ok().map(OwnedFd::from)).collect()
}

/// Encode an input of the control_stream target: the side byte, then each read as
/// `[fds, len, bytes]` (reads longer than 255 bytes are split; only the first piece carries fds).
pub fn stream_input<B: AsRef<[u8]>>(server: bool, reads: &[(u8, B)]) -> Vec<u8> {
    let mut v = vec![u8::from(server)];
    for (fds, bytes) in reads {
        for (i, c) in bytes.as_ref().chunks(255).enumerate() {
            v.push(if i == 0 { *fds } else { 0 });
            #[allow(clippy::cast_possible_truncation)] // chunks of at most 255 bytes
            v.push(c.len() as u8);
            v.extend_from_slice(c);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::frame::encode;

    #[test]
    fn entry_points_accept_valid_and_garbage_input() {
        let reg = encode(br#"{"op":"register","name":"vm","kind":"private","mappings":[]}"#).unwrap();
        fuzz_control_stream(&stream_input(true, &[(1, &reg[..]), (0, &b"PCB1\xff\xff"[..])]));
        let ok = encode(br#"{"op":"registered","client":3}"#).unwrap();
        fuzz_control_stream(&stream_input(false, &[(0, &ok)]));
        fuzz_control_stream(&[]);
        fuzz_request(b"\x00{\"op\":\"status\"}");
        fuzz_request(b"\x01{\"op\":\"register\"");
        fuzz_response(br#"{"op":"status","report":{"a":[1,2.5,null]}}"#);
    }
}
