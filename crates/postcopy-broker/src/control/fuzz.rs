//! Fuzzing entry points for the control socket's decoders (cargo-fuzz targets in fuzz/ are one line
//! each). They feed hostile bytes, and fds, to [`FrameDecoder`], [`decode_incoming`],
//! [`decode_request`] and [`decode_response`], and the Firecracker handshake's regions on to
//! [`PrivateTable::new`]. They never panic on bad input; a panic means a bug: a decoder panicked,
//! an accepted message does not survive re-encoding, an error cannot be sent back as a reply, or a
//! private table accepted regions that break its own invariants.
//!
//! Fds are real (`/dev/null` opened per fd), because the decoders own and close them.

use std::fs::File;
use std::os::fd::OwnedFd;

use super::frame::{encode_message, Decoded, FrameDecoder, MAX_PAYLOAD};
use super::message::{decode_incoming, decode_request, decode_response, Incoming};
use super::protocol::{FcRegion, Response};
use super::ControlError;
use crate::client::{PrivateRegion, PrivateTable};

/// Image file length the Firecracker target validates regions against (1 GiB).
pub const FUZZ_IMAGE_LEN: u64 = 1 << 30;

/// Fuzz the control stream. `data[0]` bit 0 picks the side: set = server (accepts a Firecracker
/// handshake, requests are decoded), clear = client (responses are decoded). The rest is a list of
/// reads, each `[fds, len, len bytes]`: `fds % 10` fds arrive with that read (10 → more than a
/// frame may carry). After the last read the stream ends.
pub fn fuzz_control_stream(data: &[u8]) {
    let Some((&side, mut rest)) = data.split_first() else { return };
    let server = side & 1 == 1;
    let mut dec = FrameDecoder::new(server);
    while let [nfds, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        rest = next;
        dec.push(bytes, fake_fds(usize::from(*nfds % 10)));
        if !drain(&mut dec, server) {
            return;
        }
    }
    if let Err(e) = dec.finish() {
        check_error_reply(&e);
    }
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

/// Fuzz a Firecracker UFFD handshake: `data` is the whole byte stream a Firecracker-like peer
/// sends, with one uffd attached to its first read. It is decoded in one read and again split in
/// two reads: both must accept the same regions or both refuse (the reason may differ: a number
/// at the end of a read is taken as complete, so a split can turn "truncated" into "bad JSON"). Accepted regions are validated into a [`PrivateTable`] against an
/// image of [`FUZZ_IMAGE_LEN`] bytes, whose invariants are then checked.
pub fn fuzz_firecracker(data: &[u8]) {
    let whole = firecracker_outcome(&[data]);
    let (a, b) = data.split_at(data.len() / 2);
    let split = firecracker_outcome(&[a, b]);
    if whole != split {
        panic!("the handshake decodes differently in one read and in two: {whole:?} vs {split:?}");
    }
    if let Some(Ok(regions)) = whole {
        check_private(&regions);
    }
}

/// The regions of the first Firecracker handshake on a stream made of `reads` (the first carries
/// one fd), `None` if there was none, `Some(Err)` if the stream failed first.
fn firecracker_outcome(reads: &[&[u8]]) -> Option<Result<Vec<FcRegion>, ()>> {
    let mut dec = FrameDecoder::new(true);
    for (i, bytes) in reads.iter().enumerate() {
        dec.push(bytes, fake_fds(usize::from(i == 0)));
        loop {
            match dec.next_unit().and_then(|u| u.map(decode_incoming).transpose()) {
                Ok(Some(Incoming::Firecracker(regions, _uffd))) => return Some(Ok(regions)),
                Ok(Some(Incoming::Request(..))) => {}
                Ok(None) => break,
                Err(e) => {
                    check_error_reply(&e);
                    return Some(Err(()));
                }
            }
        }
    }
    dec.finish().err().map(|e| {
        check_error_reply(&e);
        Err(())
    })
}

/// Take every unit out of the decoder; false once the stream failed.
fn drain(dec: &mut FrameDecoder, server: bool) -> bool {
    loop {
        match dec.next_unit() {
            Ok(Some(unit)) => check_unit(unit, server),
            Ok(None) => return true,
            Err(e) => {
                check_error_reply(&e);
                return false;
            }
        }
    }
}

fn check_unit(unit: Decoded, server: bool) {
    if let Decoded::Frame { payload, .. } = &unit {
        if payload.len() > MAX_PAYLOAD {
            panic!("a frame of {} bytes passed the {MAX_PAYLOAD}-byte limit", payload.len());
        }
    }
    if !server {
        match unit {
            Decoded::Frame { payload, .. } => {
                if let Ok(r) = decode_response(&payload) {
                    check_response(&r);
                }
            }
            Decoded::Firecracker { .. } => panic!("a client-side decoder produced a Firecracker handshake"),
        }
        return;
    }
    match decode_incoming(unit) {
        Ok(m) => check_incoming(m),
        Err(e) => check_error_reply(&e),
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
        Incoming::Firecracker(regions, _uffd) => check_private(&regions),
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
fn check_error_reply(e: &ControlError) {
    if let Some(resp) = e.to_response() {
        if let Err(x) = encode_message(&resp) {
            panic!("the error reply to '{e}' cannot be sent: {x}");
        }
    }
}

/// Validate Firecracker regions as a private client's table and check what the table promises:
/// sorted disjoint regions inside the image, every page of them translating inside its region and
/// the image, and nothing translating outside them.
fn check_private(regions: &[FcRegion]) {
    let wanted: Vec<PrivateRegion> = regions
        .iter()
        .map(|r| PrivateRegion {
            client_addr: r.base_host_virt_addr,
            len: r.size,
            file_offset: r.offset,
            page_size: r.page_size,
        })
        .collect();
    let Ok(table) = PrivateTable::new(wanted.clone(), FUZZ_IMAGE_LEN) else { return };
    let got = table.regions();
    if got.len() != wanted.len() {
        panic!("the table holds {} regions, {} were given", got.len(), wanted.len());
    }
    let mut prev_end = 0u64;
    for (i, r) in got.iter().enumerate() {
        if !wanted.contains(r) {
            panic!("region {r:?} was not given");
        }
        let Some(end) = r.client_addr.checked_add(r.len) else { panic!("region {r:?} wraps around") };
        if i > 0 && r.client_addr < prev_end {
            panic!("regions overlap or are unsorted: {got:?}");
        }
        prev_end = end;
        if r.file_offset.checked_add(r.len).is_none_or(|e| e > FUZZ_IMAGE_LEN) {
            panic!("region {r:?} lies outside the image");
        }
        for addr in [r.client_addr, r.client_addr + r.len / 2, end - 1] {
            match table.translate(addr) {
                Some((tr, page, off)) if tr == *r => {
                    if page > addr || addr - page >= r.page_size || (page - r.client_addr) % r.page_size != 0
                    {
                        panic!("address {addr:#x} of {r:?} translated to page {page:#x}");
                    }
                    if off.checked_add(r.page_size).is_none_or(|e| e > r.file_offset + r.len) {
                        panic!("page {page:#x} of {r:?} translated to file offset {off:#x}");
                    }
                }
                other => panic!("address {addr:#x} of {r:?} translated to {other:?}"),
            }
        }
        // The byte before a region is not in it.
        if let Some(before) = r.client_addr.checked_sub(1) {
            if table.translate(before).is_some_and(|(tr, ..)| tr == *r) {
                panic!("address {before:#x} before {r:?} translated into it");
            }
        }
    }
    // Past the last region nothing translates.
    if let Some(last) = got.last() {
        let end = last.client_addr + last.len;
        if table.translate(end).is_some() || table.translate(u64::MAX).is_some() {
            panic!("an address past the last region {last:?} translated");
        }
    }
}

/// `n` fds; fewer if the process runs out (the decoders only count and close them).
fn fake_fds(n: usize) -> Vec<OwnedFd> {
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
        fuzz_firecracker(
            br#"[{"base_host_virt_addr":1073741824,"size":8192,"offset":4096,"page_size":4096,"page_size_kib":4096}]"#,
        );
        fuzz_firecracker(b"[{\"size\":");
        // Found by the fuzzer: "[1" refuses the number as a region at once, "[11e" waits for more.
        fuzz_firecracker(b"[11e");
    }
}
