//! Decoding: [`decode_payload`] turns one header + payload into a checked [`Frame`], and
//! [`Decoder`] does it incrementally for non-blocking sockets (feed bytes, take frames) with page
//! data handed out as slices of its own buffer.
//!
//! Every length and index is checked before it is used: payload size against [`Limits`], block
//! indexes against the announced [`BlockTable`], offsets and lengths for page alignment and for
//! lying inside their block, bitmaps for their exact length, names and texts for UTF-8. Nothing
//! here panics on any input.

use std::io::{self, Read};

use super::blocks::{BlockInfo, BlockTable, MAX_BLOCKS};
use super::error::WireError;
use super::frame::{
    ByteRange, Channel, Frame, FrameType, Header, Hello, Side, AUTH_LEN, CAP_RESUME, FLAG_DEMAND, HEADER_LEN,
};

/// Longest Error text in bytes.
pub const MAX_ERROR_TEXT: usize = 4096;
/// Bytes of a Page payload before the data: block u32, offset u64.
pub const PAGE_PREFIX_LEN: usize = 12;
/// Default largest page run in one Page frame (2 MiB, one x86 huge page).
pub const DEFAULT_MAX_RUN: u32 = 2 << 20;
/// Default most ranges in one Discard frame.
pub const DEFAULT_MAX_DISCARD_RANGES: usize = 256;
/// Bytes the decoder asks the socket for when it does not know the next frame's size.
const READ_CHUNK: usize = 64 << 10;

/// Bounds the decoder enforces besides the block table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes. The default fits a 2 MiB page run plus its prefix;
    /// blocks with 1 GiB pages need it raised to at least 1 GiB + [`PAGE_PREFIX_LEN`].
    pub max_payload: u32,
    /// Most ranges in one Discard frame.
    pub max_discard_ranges: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            // The prefix is a handful of bytes.
            #[allow(clippy::cast_possible_truncation)]
            max_payload: DEFAULT_MAX_RUN + PAGE_PREFIX_LEN as u32,
            max_discard_ranges: DEFAULT_MAX_DISCARD_RANGES,
        }
    }
}

impl Limits {
    /// Limits for the authentication exchange: small payloads only (an Error text at most).
    pub fn auth() -> Limits {
        // An error text is limited to a few KiB.
        #[allow(clippy::cast_possible_truncation)]
        Limits { max_payload: MAX_ERROR_TEXT as u32, max_discard_ranges: 0 }
    }
}

/// Reads little-endian fields from a payload, failing (not panicking) past its end.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    frame: FrameType,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            WireError::malformed(
                self.frame,
                format!(
                    "payload of {} bytes ends inside {what} (needs {n} bytes at offset {})",
                    self.buf.len(),
                    self.pos
                ),
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn finish(&self) -> Result<(), WireError> {
        if self.pos != self.buf.len() {
            return Err(WireError::malformed(
                self.frame,
                format!(
                    "{} unexpected trailing bytes after the payload's last field",
                    self.buf.len() - self.pos
                ),
            ));
        }
        Ok(())
    }

    fn zero_u16(&mut self, what: &str) -> Result<(), WireError> {
        match self.u16(what)? {
            0 => Ok(()),
            v => Err(WireError::malformed(self.frame, format!("{what} is {v:#x}, must be 0"))),
        }
    }
}

fn need_table(frame: FrameType, blocks: Option<&BlockTable>) -> Result<&BlockTable, WireError> {
    blocks.ok_or(WireError::NoBlockTable { frame })
}

/// Decode and check one frame's payload. `payload` must be exactly `header.payload_len` bytes.
/// `blocks` is the announced block table (None before Hello: block-addressed frames are then
/// refused with [`WireError::NoBlockTable`]).
pub fn decode_payload<'a>(
    header: &Header,
    payload: &'a [u8],
    blocks: Option<&BlockTable>,
    limits: &Limits,
) -> Result<Frame<'a>, WireError> {
    let frame = header.frame_type;
    if payload.len() as u64 > u64::from(limits.max_payload) {
        return Err(WireError::PayloadTooLarge {
            frame,
            len: payload.len() as u64,
            max: limits.max_payload.into(),
        });
    }
    if payload.len() as u64 != u64::from(header.payload_len) {
        return Err(WireError::malformed(
            frame,
            format!("payload is {} bytes but the header says {}", payload.len(), header.payload_len),
        ));
    }
    let demand = header.flags & FLAG_DEMAND != 0;
    let mut f = Fields { buf: payload, pos: 0, frame };
    let out = match frame {
        FrameType::Hello => Frame::Hello(decode_hello(&mut f)?),
        FrameType::HelloAck => {
            let version = f.u16("version")?;
            let streams = f.u16("streams")?;
            let capabilities = f.u64("capabilities")?;
            Frame::HelloAck { version, capabilities, streams }
        }
        FrameType::Page => {
            let table = need_table(frame, blocks)?;
            let block = f.u32("block index")?;
            let offset = f.u64("offset")?;
            let data = f.rest();
            table.check_range(frame, block, offset, data.len() as u64)?;
            Frame::Page { block, offset, demand, data }
        }
        FrameType::ZeroRun | FrameType::Request => {
            let table = need_table(frame, blocks)?;
            let block = f.u32("block index")?;
            let offset = f.u64("offset")?;
            let len = f.u64("length")?;
            table.check_range(frame, block, offset, len)?;
            if frame == FrameType::ZeroRun {
                Frame::ZeroRun { block, offset, len, demand }
            } else {
                Frame::Request { block, offset, len }
            }
        }
        FrameType::Discard => {
            let table = need_table(frame, blocks)?;
            let block = f.u32("block index")?;
            let count = usize::from(f.u16("range count")?);
            f.zero_u16("reserved field")?;
            table.block(frame, block)?;
            if count == 0 || count > limits.max_discard_ranges {
                return Err(WireError::malformed(
                    frame,
                    format!("range count {count} is not in 1..={}", limits.max_discard_ranges),
                ));
            }
            if f.remaining() != count * 16 {
                return Err(WireError::malformed(
                    frame,
                    format!("{count} ranges need {} bytes but {} follow", count * 16, f.remaining()),
                ));
            }
            let mut ranges = Vec::with_capacity(count);
            let mut prev_end = 0u64;
            for i in 0..count {
                let offset = f.u64("range offset")?;
                let len = f.u64("range length")?;
                table.check_range(frame, block, offset, len)?;
                if i > 0 && offset < prev_end {
                    return Err(WireError::malformed(
                        frame,
                        format!("range {i} at {offset:#x} overlaps or precedes the previous one (ending at {prev_end:#x}); ranges must be sorted and disjoint"),
                    ));
                }
                prev_end = offset + len; // cannot overflow: check_range proved offset + len <= size
                ranges.push(ByteRange { offset, len });
            }
            Frame::Discard { block, ranges }
        }
        FrameType::Resume => {
            let table = need_table(frame, blocks)?;
            let block = f.u32("block index")?;
            let first_page = f.u64("first page")?;
            let page_count = f.u64("page count")?;
            let b = table.block(frame, block)?;
            if page_count == 0 || first_page.checked_add(page_count).is_none_or(|end| end > b.pages()) {
                return Err(WireError::malformed(
                    frame,
                    format!(
                        "pages {first_page}+{page_count} are not a non-empty range inside block '{}' ({} pages)",
                        b.name,
                        b.pages()
                    ),
                ));
            }
            let bitmap = f.rest();
            let want = page_count.div_ceil(8);
            if bitmap.len() as u64 != want {
                return Err(WireError::malformed(
                    frame,
                    format!("bitmap of {} bytes for {page_count} pages, expected {want}", bitmap.len()),
                ));
            }
            let tail_bits = (page_count % 8) as u32;
            if let (true, Some(last)) = (tail_bits != 0, bitmap.last()) {
                if last >> tail_bits != 0 {
                    return Err(WireError::malformed(
                        frame,
                        "bits past the page count are set in the bitmap's last byte",
                    ));
                }
            }
            Frame::Resume { block, first_page, page_count, bitmap }
        }
        FrameType::Advise
        | FrameType::Listen
        | FrameType::Run
        | FrameType::Complete
        | FrameType::Pause
        | FrameType::ResumeEnd
        | FrameType::ResumeAck
        | FrameType::CompleteAck => {
            f.finish()?;
            match frame {
                FrameType::Advise => Frame::Advise,
                FrameType::Listen => Frame::Listen,
                FrameType::Run => Frame::Run,
                FrameType::Complete => Frame::Complete,
                FrameType::Pause => Frame::Pause,
                FrameType::ResumeEnd => Frame::ResumeEnd,
                FrameType::ResumeAck => Frame::ResumeAck,
                _ => Frame::CompleteAck,
            }
        }
        FrameType::Streams => {
            let count = f.u16("stream count")?;
            f.zero_u16("reserved field")?;
            Frame::Streams { count }
        }
        FrameType::Error => {
            let bytes = f.rest();
            if bytes.len() > MAX_ERROR_TEXT {
                return Err(WireError::malformed(
                    frame,
                    format!("text of {} bytes exceeds {MAX_ERROR_TEXT}", bytes.len()),
                ));
            }
            let text = std::str::from_utf8(bytes)
                .map_err(|e| WireError::malformed(frame, format!("text is not valid UTF-8: {e}")))?;
            Frame::Error { text }
        }
        FrameType::AuthNonce => {
            let side = match f.u8("side")? {
                0 => Side::Source,
                1 => Side::Destination,
                v => {
                    return Err(WireError::malformed(
                        frame,
                        format!("side {v} is neither 0 (source) nor 1 (destination)"),
                    ))
                }
            };
            let nonce = f.array::<AUTH_LEN>("nonce")?;
            Frame::AuthNonce { side, nonce }
        }
        FrameType::AuthProof => Frame::AuthProof { mac: f.array::<AUTH_LEN>("proof")? },
        FrameType::Digests => {
            let table = need_table(frame, blocks)?;
            let count = f.u32("digest count")? as usize;
            if f.u32("reserved field")? != 0 {
                return Err(WireError::malformed(frame, "reserved field must be 0"));
            }
            if count != table.len() || f.remaining() != count * 8 {
                return Err(WireError::malformed(
                    frame,
                    format!(
                        "{count} digests in {} bytes; the block table has {} blocks (8 bytes each)",
                        f.remaining(),
                        table.len()
                    ),
                ));
            }
            let digests = (0..count).map(|_| f.u64("digest")).collect::<Result<Vec<_>, _>>()?;
            Frame::Digests { digests }
        }
        FrameType::Handshake => {
            let bytes = f.rest();
            if bytes.is_empty() {
                return Err(WireError::malformed(frame, "an empty handshake message"));
            }
            Frame::Handshake { bytes }
        }
        FrameType::AuthResult => match f.u8("verdict")? {
            0 => Frame::AuthResult { accepted: false },
            1 => Frame::AuthResult { accepted: true },
            v => return Err(WireError::malformed(frame, format!("verdict {v} is neither 0 nor 1"))),
        },
    };
    f.finish()?;
    Ok(out)
}

fn decode_hello(f: &mut Fields<'_>) -> Result<Hello, WireError> {
    let frame = f.frame;
    let version = f.u16("version")?;
    let channel = match f.u8("channel")? {
        0 => Channel::Main,
        1 => Channel::Urgent,
        2 => Channel::Stream,
        v => {
            return Err(WireError::malformed(
                frame,
                format!("channel {v} is not 0 (main), 1 (urgent) or 2 (stream)"),
            ))
        }
    };
    let resume = match f.u8("flags")? {
        0 => false,
        1 => true,
        v => {
            return Err(WireError::malformed(
                frame,
                format!("flags {v:#x} has undefined bits (only bit 0, resume)"),
            ))
        }
    };
    let capabilities = f.u64("capabilities")?;
    if resume && capabilities & CAP_RESUME == 0 {
        return Err(WireError::malformed(frame, "the resume flag is set but CAP_RESUME is not offered"));
    }
    let session_id = f.u64("session id")?;
    let count = f.u32("block count")? as usize;
    // Each entry takes at least 1 + 1 + 8 + 8 bytes: refuse counts the payload cannot hold before
    // allocating for them.
    if count > MAX_BLOCKS || count.saturating_mul(18) > f.remaining() {
        return Err(WireError::malformed(
            frame,
            format!(
                "block count {count} is above {MAX_BLOCKS} or does not fit in the {} remaining bytes",
                f.remaining()
            ),
        ));
    }
    let mut blocks = Vec::with_capacity(count);
    for i in 0..count {
        let name_len = usize::from(f.u8("block name length")?);
        let name = std::str::from_utf8(f.take(name_len, "block name")?)
            .map_err(|e| WireError::malformed(frame, format!("block {i}: name is not valid UTF-8: {e}")))?;
        let size = f.u64("block size")?;
        let page_size = f.u64("block page size")?;
        blocks.push(BlockInfo::new(name, size, page_size));
    }
    let blocks = BlockTable::new(blocks)?;
    Ok(Hello { version, capabilities, channel, session_id, resume, blocks })
}

/// Incremental frame decoder for a byte stream.
///
/// Put bytes in with [`feed`](Decoder::feed), or read straight into its buffer with
/// [`read_from`](Decoder::read_from) (or [`read_buf`](Decoder::read_buf) +
/// [`commit`](Decoder::commit)); then call [`next_frame`](Decoder::next_frame) until it returns
/// `Ok(None)`. Frames borrow the decoder's buffer (Page data is never copied again), so drop a
/// frame before asking for the next. The buffer grows to one whole frame (at most the header plus
/// [`Limits::max_payload`]); a payload over the limit is refused from its header, before it is
/// buffered.
///
/// With a non-blocking socket, take every buffered frame (`next_frame` until `Ok(None)`) before
/// reading again, and poll only after a read returned `WouldBlock`: bytes already buffered do
/// not make the socket readable. When a frame changes how later frames decode (Hello → block
/// table), stop taking frames, call [`set_blocks`](Decoder::set_blocks), then continue.
///
/// After any error the decoder is poisoned: every later call returns [`WireError::Poisoned`]
/// (framing cannot be trusted after a bad frame). Send an Error frame and close the connection.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    limits: Limits,
    blocks: Option<BlockTable>,
    poisoned: Option<String>,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder::new(Limits::default())
    }
}

fn poison(poisoned: &mut Option<String>, e: WireError) -> WireError {
    *poisoned = Some(e.to_string());
    e
}

impl Decoder {
    /// A decoder without a block table (only Hello, control and auth frames decode until
    /// [`set_blocks`](Decoder::set_blocks)).
    pub fn new(limits: Limits) -> Decoder {
        Decoder { buf: Vec::new(), start: 0, end: 0, limits, blocks: None, poisoned: None }
    }

    /// A decoder that checks block-addressed frames against `blocks` from the start.
    pub fn with_blocks(limits: Limits, blocks: BlockTable) -> Decoder {
        Decoder { blocks: Some(blocks), ..Decoder::new(limits) }
    }

    /// Set (or replace) the block table, normally right after Hello was accepted.
    pub fn set_blocks(&mut self, blocks: BlockTable) {
        self.blocks = Some(blocks);
    }

    /// The block table, if set.
    pub fn blocks(&self) -> Option<&BlockTable> {
        self.blocks.as_ref()
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Bytes allocated for the buffer (one frame plus a read chunk in steady state).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Whether an error poisoned the decoder.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Total length of the frame at the front of the buffer, if its header is buffered and sane.
    fn front_frame_len(&self) -> Option<usize> {
        let h: &[u8; HEADER_LEN] = self.buf.get(self.start..self.start + HEADER_LEN)?.try_into().ok()?;
        if self.end - self.start < HEADER_LEN {
            return None;
        }
        let h = Header::parse(h).ok()?;
        if h.payload_len > self.limits.max_payload {
            return None;
        }
        Some(HEADER_LEN + h.payload_len as usize)
    }

    /// Make room so that the front frame fits whole in the buffer and some bytes can be read.
    fn make_room(&mut self, extra: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let want = self.front_frame_len().unwrap_or(HEADER_LEN).max(READ_CHUNK).max(self.buffered() + extra);
        if self.buf.len() - self.start < want {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
        }
        if self.end == self.buf.len() {
            // Whole frames are waiting to be taken; grow rather than offer an empty buffer (a read
            // into an empty buffer would look like end of file).
            let n = self.buf.len() + READ_CHUNK.max(extra);
            self.buf.resize(n, 0);
        }
    }

    /// Copy `data` into the buffer.
    pub fn feed(&mut self, data: &[u8]) {
        self.make_room(data.len());
        let end = self.end + data.len();
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.buf[self.end..end].copy_from_slice(data);
        self.end = end;
    }

    /// Take `buf[start..end]` as the next bytes, adopting `buf` as the buffer when the bytes
    /// still buffered fit in front of `start` (they are moved there), so that the new bytes are
    /// not copied; otherwise they are copied in as [`feed`](Decoder::feed) does. Returns the
    /// buffer that is no longer used (the old one, or `buf`), for the next chunk.
    pub fn adopt(&mut self, mut buf: Vec<u8>, start: usize, end: usize) -> Vec<u8> {
        let (start, end) = (start.min(buf.len()), end.min(buf.len()));
        let start = start.min(end);
        let have = self.buffered();
        if have > start {
            self.feed(&buf[start..end]);
            return buf;
        }
        let at = start - have;
        buf[at..start].copy_from_slice(&self.buf[self.start..self.end]);
        let old = std::mem::replace(&mut self.buf, buf);
        self.start = at;
        self.end = end;
        old
    }

    /// Free space to read socket bytes into (never empty); follow with
    /// [`commit`](Decoder::commit) of the number of bytes read.
    pub fn read_buf(&mut self) -> &mut [u8] {
        self.make_room(1);
        &mut self.buf[self.end..]
    }

    /// Declare that `n` bytes were written at the start of [`read_buf`](Decoder::read_buf)
    /// (clamped to its length).
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// One `read` from `r` straight into the buffer. `Ok(0)` means end of file (then see
    /// [`at_eof`](Decoder::at_eof)); `WouldBlock` and `Interrupted` are passed through.
    pub fn read_from<R: Read + ?Sized>(&mut self, r: &mut R) -> io::Result<usize> {
        let n = r.read(self.read_buf())?;
        self.commit(n);
        Ok(n)
    }

    /// The error to report when the peer closed the stream: [`WireError::Closed`] between frames,
    /// [`WireError::Truncated`] inside one.
    pub fn at_eof(&self) -> WireError {
        if self.buffered() == 0 {
            return WireError::Closed;
        }
        let need = self.front_frame_len().unwrap_or(HEADER_LEN);
        WireError::Truncated { have: self.buffered(), need }
    }

    /// Whether a whole frame is buffered (its header is checked now; a bad header poisons).
    pub fn frame_ready(&mut self) -> Result<bool, WireError> {
        if let Some(p) = &self.poisoned {
            return Err(WireError::Poisoned(p.clone()));
        }
        if self.buffered() < HEADER_LEN {
            return Ok(false);
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&self.buf[self.start..self.start + HEADER_LEN]);
        let header = Header::parse(&h).map_err(|e| poison(&mut self.poisoned, e))?;
        if header.payload_len > self.limits.max_payload {
            let e = WireError::PayloadTooLarge {
                frame: header.frame_type,
                len: header.payload_len.into(),
                max: self.limits.max_payload.into(),
            };
            return Err(poison(&mut self.poisoned, e));
        }
        Ok(self.buffered() >= HEADER_LEN + header.payload_len as usize)
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, WireError> {
        if !self.frame_ready()? {
            return Ok(None);
        }
        let Decoder { buf, start, limits, blocks, poisoned, .. } = self;
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&buf[*start..*start + HEADER_LEN]);
        let header = Header::parse(&h).map_err(|e| poison(poisoned, e))?;
        let s = *start + HEADER_LEN;
        let e = s + header.payload_len as usize;
        *start = e;
        match decode_payload(&header, &buf[s..e], blocks.as_ref(), limits) {
            Ok(frame) => Ok(Some(frame)),
            Err(err) => Err(poison(poisoned, err)),
        }
    }

    /// Blocking helper: read from `r` until a whole frame is buffered and return it.
    /// End of file gives [`WireError::Closed`] or [`WireError::Truncated`]; a read timeout gives
    /// [`WireError::Io`] with `WouldBlock`/`TimedOut`.
    pub fn read_frame<R: Read + ?Sized>(&mut self, r: &mut R) -> Result<Frame<'_>, WireError> {
        while !self.frame_ready()? {
            match self.read_from(r) {
                Ok(0) => return Err(self.at_eof()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::Io(e)),
            }
        }
        self.next_frame()?.ok_or_else(|| WireError::Poisoned("frame vanished from the buffer".into()))
    }
}
