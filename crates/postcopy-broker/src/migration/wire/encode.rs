//! Encoding: [`encode`] appends a frame to a `Vec<u8>`, [`write_frame`] writes one to a stream,
//! and [`page_header`] + [`write_page`] send a page run without copying its data (header and
//! data go out together with `writev`).
//!
//! The encoder checks what the format itself cannot carry (lengths that overflow their fields,
//! empty runs, bitmaps of the wrong size). Range checks against the block table are the
//! receiver's job; a sender should respect the receiver's [`Limits`](super::Limits) (2 MiB runs by
//! default).

use super::blocks::wire_index;
use std::io::{self, IoSlice, Write};

use super::decode::{MAX_ERROR_TEXT, PAGE_PREFIX_LEN};
use super::error::WireError;
use super::frame::{Frame, FrameType, Header, FLAG_DEMAND, HEADER_LEN};

/// Bytes in front of a Page frame's data: frame header + block + offset.
pub const PAGE_HEADER_LEN: usize = HEADER_LEN + PAGE_PREFIX_LEN;

fn unencodable(frame: FrameType, why: impl Into<String>) -> WireError {
    WireError::Unencodable { frame, why: why.into() }
}

/// Append `frame` (header + payload) to `out`. On error `out` is left as it was.
pub fn encode(frame: &Frame<'_>, out: &mut Vec<u8>) -> Result<(), WireError> {
    let ft = frame.frame_type();
    let at = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let mut flags = 0u8;
    let r = encode_payload(frame, out, &mut flags);
    if let Err(e) = r {
        out.truncate(at);
        return Err(e);
    }
    let len = out.len() - at - HEADER_LEN;
    let Ok(payload_len) = u32::try_from(len) else {
        out.truncate(at);
        return Err(unencodable(ft, format!("payload of {len} bytes does not fit the u32 length field")));
    };
    let header = Header { frame_type: ft, flags, payload_len };
    out[at..at + HEADER_LEN].copy_from_slice(&header.to_bytes());
    Ok(())
}

fn encode_payload(frame: &Frame<'_>, out: &mut Vec<u8>, flags: &mut u8) -> Result<(), WireError> {
    let ft = frame.frame_type();
    match frame {
        Frame::Hello(h) => {
            out.extend_from_slice(&h.version.to_le_bytes());
            out.push(h.channel as u8);
            out.push(u8::from(h.resume));
            out.extend_from_slice(&h.capabilities.to_le_bytes());
            out.extend_from_slice(&h.session_id.to_le_bytes());
            out.extend_from_slice(&wire_index(h.blocks.len()).to_le_bytes());
            for b in h.blocks.iter() {
                // BlockTable guarantees 1..=255 bytes.
                let n = u8::try_from(b.name.len()).map_err(|_| {
                    unencodable(ft, format!("block name '{}' is longer than 255 bytes", b.name))
                })?;
                out.push(n);
                out.extend_from_slice(b.name.as_bytes());
                out.extend_from_slice(&b.size.to_le_bytes());
                out.extend_from_slice(&b.page_size.to_le_bytes());
            }
        }
        Frame::HelloAck { version, capabilities, streams } => {
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&streams.to_le_bytes());
            out.extend_from_slice(&capabilities.to_le_bytes());
        }
        Frame::Page { block, offset, demand, data } => {
            if data.is_empty() {
                return Err(unencodable(ft, "a page run needs at least one page of data"));
            }
            *flags = if *demand { FLAG_DEMAND } else { 0 };
            out.extend_from_slice(&block.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(data);
        }
        Frame::ZeroRun { block, offset, len, demand } => {
            *flags = if *demand { FLAG_DEMAND } else { 0 };
            put_run(out, *block, *offset, *len);
        }
        Frame::Request { block, offset, len } => put_run(out, *block, *offset, *len),
        Frame::Discard { block, ranges } => {
            let n = u16::try_from(ranges.len()).ok().filter(|&n| n > 0).ok_or_else(|| {
                unencodable(ft, format!("{} ranges; a Discard carries 1..=65535", ranges.len()))
            })?;
            out.extend_from_slice(&block.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            for r in ranges {
                out.extend_from_slice(&r.offset.to_le_bytes());
                out.extend_from_slice(&r.len.to_le_bytes());
            }
        }
        Frame::Resume { block, first_page, page_count, bitmap } => {
            if *page_count == 0 || bitmap.len() as u64 != page_count.div_ceil(8) {
                return Err(unencodable(
                    ft,
                    format!("bitmap of {} bytes does not match {page_count} pages", bitmap.len()),
                ));
            }
            out.extend_from_slice(&block.to_le_bytes());
            out.extend_from_slice(&first_page.to_le_bytes());
            out.extend_from_slice(&page_count.to_le_bytes());
            out.extend_from_slice(bitmap);
            // Bits past the page count must travel as zero.
            let tail = (page_count % 8) as u32;
            if let (true, Some(last)) = (tail != 0, out.last_mut()) {
                *last &= (1u8 << tail) - 1;
            }
        }
        Frame::Error { text } => {
            // Cut over-long texts at a character boundary rather than refusing to report an error.
            let mut end = text.len().min(MAX_ERROR_TEXT);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            out.extend_from_slice(&text.as_bytes()[..end]);
        }
        Frame::AuthNonce { side, nonce } => {
            out.push(*side as u8);
            out.extend_from_slice(nonce);
        }
        Frame::AuthProof { mac } => out.extend_from_slice(mac),
        Frame::AuthResult { accepted } => out.push(u8::from(*accepted)),
        Frame::Digests { digests } => {
            let n = u32::try_from(digests.len()).map_err(|_| {
                unencodable(ft, format!("{} digests do not fit the count field", digests.len()))
            })?;
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            for d in digests {
                out.extend_from_slice(&d.to_le_bytes());
            }
        }
        Frame::Handshake { bytes } => {
            if bytes.is_empty() {
                return Err(unencodable(ft, "an empty handshake message"));
            }
            out.extend_from_slice(bytes);
        }
        Frame::Streams { count } => {
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
        }
        Frame::Advise
        | Frame::Listen
        | Frame::Run
        | Frame::Complete
        | Frame::Pause
        | Frame::ResumeEnd
        | Frame::ResumeAck
        | Frame::CompleteAck => {}
    }
    Ok(())
}

fn put_run(out: &mut Vec<u8>, block: u32, offset: u64, len: u64) {
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
}

/// The 24 bytes that precede `data_len` bytes of page data in a Page frame. Send them and the data
/// back to back (e.g. with `writev`, see [`write_page`]).
pub fn page_header(
    block: u32,
    offset: u64,
    data_len: usize,
    demand: bool,
) -> Result<[u8; PAGE_HEADER_LEN], WireError> {
    let payload_len = data_len
        .checked_add(PAGE_PREFIX_LEN)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|_| data_len > 0)
        .ok_or_else(|| {
            unencodable(FrameType::Page, format!("{data_len} data bytes is not a sendable page run"))
        })?;
    let header =
        Header { frame_type: FrameType::Page, flags: if demand { FLAG_DEMAND } else { 0 }, payload_len };
    let mut b = [0u8; PAGE_HEADER_LEN];
    b[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    b[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&block.to_le_bytes());
    b[HEADER_LEN + 4..].copy_from_slice(&offset.to_le_bytes());
    Ok(b)
}

/// Write all of `bufs` with vectored writes (retrying on `Interrupted`).
pub fn write_all_vectored<W: Write + ?Sized>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "peer stopped accepting frame bytes"))
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Write one Page frame: header and data in one vectored write, the data not copied.
pub fn write_page<W: Write + ?Sized>(
    w: &mut W,
    block: u32,
    offset: u64,
    demand: bool,
    data: &[u8],
) -> Result<(), WireError> {
    let h = page_header(block, offset, data.len(), demand)?;
    write_all_vectored(w, &mut [IoSlice::new(&h), IoSlice::new(data)])?;
    Ok(())
}

/// Write one frame to a blocking stream (Page frames go out with [`write_page`]).
pub fn write_frame<W: Write + ?Sized>(w: &mut W, frame: &Frame<'_>) -> Result<(), WireError> {
    if let Frame::Page { block, offset, demand, data } = frame {
        return write_page(w, *block, *offset, *demand, data);
    }
    let mut buf = Vec::with_capacity(64);
    encode(frame, &mut buf)?;
    w.write_all(&buf)?;
    Ok(())
}
