//! The frame vocabulary: [`FrameType`], the fixed [`Header`], and [`Frame`], one variant per
//! message with its decoded fields. Byte layouts are in docs/wire-protocol.md.

use super::blocks::BlockTable;
use super::error::WireError;

/// Magic number that opens every frame header: "PCB1" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PCB1");
/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 12;
/// Protocol version this code speaks (sent in Hello, chosen in HelloAck).
pub const PROTOCOL_VERSION: u16 = 2;
/// Size of an authentication nonce and of an HMAC-SHA256 proof.
pub const AUTH_LEN: usize = 32;

/// Header flag on `Page` and `ZeroRun`: this run answers a `Request` (demand), it is not background.
pub const FLAG_DEMAND: u8 = 0x01;

/// Capability: the receiver accepts `ZeroRun` frames (otherwise zero pages travel as `Page` data).
pub const CAP_ZERO_RUN: u64 = 1 << 0;
/// Capability: demand requests and their pages use a second, urgent connection.
pub const CAP_URGENT_CHANNEL: u64 = 1 << 1;
/// Capability: `Discard` frames are understood (needed after a precopy pass).
pub const CAP_DISCARD: u64 = 1 << 2;
/// Capability: postcopy recovery (`Pause`, `Resume`, `ResumeEnd`, `ResumeAck`).
pub const CAP_RESUME: u64 = 1 << 3;
/// Capability: the source sends the digests of the pages it sent (`Digests`) before Complete.
pub const CAP_DIGEST: u64 = 1 << 4;
/// Capability (version 2): the source confirms the destination's Complete with `CompleteAck`,
/// and a destination that got no confirmation answers a resume of the completed session.
pub const CAP_COMPLETE_ACK: u64 = 1 << 5;
/// Capability: the background stream may be split over extra `Stream` connections (the
/// HelloAck says how many background connections the destination takes, the `Streams` frame how
/// many extra ones the source opens).
pub const CAP_STREAMS: u64 = 1 << 6;
/// Every capability this version knows.
pub const CAP_ALL: u64 = CAP_ZERO_RUN
    | CAP_URGENT_CHANNEL
    | CAP_DISCARD
    | CAP_RESUME
    | CAP_DIGEST
    | CAP_COMPLETE_ACK
    | CAP_STREAMS;

/// The type byte of a frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Source → destination: version, capabilities, channel, session id, block list.
    Hello = 0x01,
    /// Destination → source: chosen version and accepted capabilities.
    HelloAck = 0x02,
    /// A run of contiguous whole pages with their data.
    Page = 0x03,
    /// A run of contiguous zero pages (no data).
    ZeroRun = 0x04,
    /// Ranges the destination must drop (dirtied after precopy sent them).
    Discard = 0x05,
    /// Destination → source: pages wanted now (demand fault).
    Request = 0x06,
    /// Postcopy advise: destination prepares (discards all RAM, state Advise).
    Advise = 0x07,
    /// Postcopy listen: destination registers RAM with userfaultfd (state Listening).
    Listen = 0x08,
    /// Postcopy run: the guest runs on the destination (state Running).
    Run = 0x09,
    /// Source: every page was sent. Destination: every page was placed.
    Complete = 0x0a,
    /// Orderly pause: the sender is about to drop the connection; resume later.
    Pause = 0x0b,
    /// Destination → source after a reconnect: one chunk of a block's received bitmap.
    Resume = 0x0c,
    /// Destination → source: every Resume chunk has been sent.
    ResumeEnd = 0x0d,
    /// Source → destination: the bitmaps are applied; the missing pages follow.
    ResumeAck = 0x0e,
    /// Either side: a fatal error with a human-readable text; the connection closes after it.
    Error = 0x0f,
    /// Source → destination, before Complete: the digest of the pages sent, per block.
    Digests = 0x10,
    /// Source → destination, after the destination's Complete: it was read, the source is done
    /// (only with `CAP_COMPLETE_ACK`).
    CompleteAck = 0x11,
    /// Source → destination on main, right after the urgent connection's HelloAck (only with
    /// `CAP_STREAMS`): how many extra background connections follow.
    Streams = 0x12,
    /// Authentication step 1 (both sides): role and a fresh random nonce.
    AuthNonce = 0x20,
    /// Authentication step 2 (both sides): HMAC proof of the pre-shared key.
    AuthProof = 0x21,
    /// Authentication step 3 (both sides): whether the peer's proof was accepted.
    AuthResult = 0x22,
    /// Pre-shared-key mode: one Noise handshake message.
    Handshake = 0x23,
}

impl FrameType {
    /// The type for a header byte, if this version knows it.
    pub fn from_u8(v: u8) -> Option<FrameType> {
        use FrameType::*;
        Some(match v {
            0x01 => Hello,
            0x02 => HelloAck,
            0x03 => Page,
            0x04 => ZeroRun,
            0x05 => Discard,
            0x06 => Request,
            0x07 => Advise,
            0x08 => Listen,
            0x09 => Run,
            0x0a => Complete,
            0x0b => Pause,
            0x0c => Resume,
            0x0d => ResumeEnd,
            0x0e => ResumeAck,
            0x0f => Error,
            0x10 => Digests,
            0x11 => CompleteAck,
            0x12 => Streams,
            0x20 => AuthNonce,
            0x21 => AuthProof,
            0x22 => AuthResult,
            0x23 => Handshake,
            _ => return None,
        })
    }

    /// Header flag bits defined for this type.
    pub fn allowed_flags(self) -> u8 {
        match self {
            FrameType::Page | FrameType::ZeroRun => FLAG_DEMAND,
            _ => 0,
        }
    }
}

/// The fixed 12-byte header in front of every payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Frame type.
    pub frame_type: FrameType,
    /// Flags (only bits in [`FrameType::allowed_flags`]).
    pub flags: u8,
    /// Payload length in bytes (the header not included).
    pub payload_len: u32,
}

impl Header {
    /// The header as bytes: magic, type, flags, reserved (0), payload length; little endian.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.frame_type as u8;
        b[5] = self.flags;
        b[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Parse and check a header: magic, known type, allowed flags, zero reserved field. The payload
    /// length is checked against limits by [`decode_payload`](super::decode_payload).
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if magic != MAGIC {
            return Err(WireError::BadMagic { found: magic, expected: MAGIC });
        }
        let frame_type = FrameType::from_u8(b[4]).ok_or(WireError::UnknownFrameType(b[4]))?;
        let flags = b[5];
        let allowed = frame_type.allowed_flags();
        if flags & !allowed != 0 {
            return Err(WireError::BadFlags { frame: frame_type, flags, allowed });
        }
        let reserved = u16::from_le_bytes([b[6], b[7]]);
        if reserved != 0 {
            return Err(WireError::ReservedNonZero { frame: frame_type, value: reserved });
        }
        let payload_len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        Ok(Header { frame_type, flags, payload_len })
    }
}

/// Which of the two TCP connections of a migration a Hello opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// The main stream: control frames, discards, background pages.
    Main = 0,
    /// The urgent channel: demand requests and the pages that answer them.
    Urgent = 1,
    /// An extra background stream (`CAP_STREAMS`): pages, then Complete.
    Stream = 2,
}

/// Which end of a migration a peer is (used by authentication).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The page server that has the RAM.
    Source = 0,
    /// The broker that receives the RAM.
    Destination = 1,
}

/// A byte range inside a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteRange {
    /// Offset from the start of the block.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl ByteRange {
    /// A range.
    pub fn new(offset: u64, len: u64) -> ByteRange {
        ByteRange { offset, len }
    }

    /// One past the last byte (saturating).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// The Hello frame: what the source announces on each connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Highest protocol version the source speaks.
    pub version: u16,
    /// Capabilities the source offers (`CAP_*` bits; unknown bits are ignored by the receiver).
    pub capabilities: u64,
    /// Which connection this is.
    pub channel: Channel,
    /// Random id shared by the main and urgent connections of one migration (and kept on resume).
    pub session_id: u64,
    /// This connection resumes a paused postcopy session (Hello flags bit 0; only with
    /// `CAP_RESUME` offered). A destination without that session refuses it.
    pub resume: bool,
    /// The RAM blocks, in index order (the index is the `block` field of later frames).
    pub blocks: BlockTable,
}

/// One decoded (or to-be-encoded) frame. Page data, resume bitmaps and error text borrow from the
/// decoder's buffer (or from the caller when encoding): no copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// See [`Hello`].
    Hello(Hello),
    /// The destination's answer to Hello.
    HelloAck {
        /// Version chosen (≤ the Hello's version).
        version: u16,
        /// Capabilities accepted (a subset of the Hello's).
        capabilities: u64,
        /// With `CAP_STREAMS` accepted: the background connections the destination takes, main
        /// included (at least 1); otherwise 0.
        streams: u16,
    },
    /// A run of whole pages at `offset` of `block`; `data.len()` is a multiple of the page size.
    Page {
        /// Block index.
        block: u32,
        /// Page-aligned offset in the block.
        offset: u64,
        /// Whether this answers a Request ([`FLAG_DEMAND`]).
        demand: bool,
        /// The pages' bytes.
        data: &'a [u8],
    },
    /// A run of zero pages.
    ZeroRun {
        /// Block index.
        block: u32,
        /// Page-aligned offset.
        offset: u64,
        /// Page-aligned length, not zero.
        len: u64,
        /// Whether this answers a Request ([`FLAG_DEMAND`]).
        demand: bool,
    },
    /// Ranges to discard in one block: sorted, not overlapping, page aligned.
    Discard {
        /// Block index.
        block: u32,
        /// The ranges.
        ranges: Vec<ByteRange>,
    },
    /// Demand request for `len` bytes at `offset` of `block`.
    Request {
        /// Block index.
        block: u32,
        /// Page-aligned offset.
        offset: u64,
        /// Page-aligned length, not zero.
        len: u64,
    },
    /// Postcopy advise.
    Advise,
    /// Postcopy listen.
    Listen,
    /// Postcopy run.
    Run,
    /// All pages sent (source) / all pages placed (destination).
    Complete,
    /// Orderly pause before a disconnect.
    Pause,
    /// A chunk of the received bitmap of `block`: bit `i` (LSB first in byte `i / 8`) is page
    /// `first_page + i`; set = the destination has that page.
    Resume {
        /// Block index.
        block: u32,
        /// First page the chunk covers.
        first_page: u64,
        /// Number of pages covered (not zero).
        page_count: u64,
        /// `ceil(page_count / 8)` bytes; bits past `page_count` are zero.
        bitmap: &'a [u8],
    },
    /// All Resume chunks sent.
    ResumeEnd,
    /// Resume bitmaps applied by the source.
    ResumeAck,
    /// The source read the destination's Complete.
    CompleteAck,
    /// The number of extra background connections the source opens next.
    Streams {
        /// Extra connections (0 keeps the one background stream on main).
        count: u16,
    },
    /// Fatal error text (UTF-8, at most [`MAX_ERROR_TEXT`](super::MAX_ERROR_TEXT) bytes).
    Error {
        /// What went wrong.
        text: &'a str,
    },
    /// Authentication: the sender's side and nonce.
    AuthNonce {
        /// The sender's side; must differ from the receiver's.
        side: Side,
        /// 32 random bytes.
        nonce: [u8; AUTH_LEN],
    },
    /// Authentication: HMAC-SHA256 proof.
    AuthProof {
        /// The proof.
        mac: [u8; AUTH_LEN],
    },
    /// Authentication: verdict on the peer's proof.
    AuthResult {
        /// Whether the peer's proof was valid.
        accepted: bool,
    },
    /// The source's digest of the pages it sent, one per block in block table order.
    Digests {
        /// The digests.
        digests: Vec<u64>,
    },
    /// One Noise handshake message of the pre-shared-key mode.
    Handshake {
        /// The message.
        bytes: &'a [u8],
    },
}

impl Frame<'_> {
    /// The frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::HelloAck { .. } => FrameType::HelloAck,
            Frame::Page { .. } => FrameType::Page,
            Frame::ZeroRun { .. } => FrameType::ZeroRun,
            Frame::Discard { .. } => FrameType::Discard,
            Frame::Request { .. } => FrameType::Request,
            Frame::Advise => FrameType::Advise,
            Frame::Listen => FrameType::Listen,
            Frame::Run => FrameType::Run,
            Frame::Complete => FrameType::Complete,
            Frame::Pause => FrameType::Pause,
            Frame::Resume { .. } => FrameType::Resume,
            Frame::ResumeEnd => FrameType::ResumeEnd,
            Frame::ResumeAck => FrameType::ResumeAck,
            Frame::CompleteAck => FrameType::CompleteAck,
            Frame::Streams { .. } => FrameType::Streams,
            Frame::Error { .. } => FrameType::Error,
            Frame::AuthNonce { .. } => FrameType::AuthNonce,
            Frame::AuthProof { .. } => FrameType::AuthProof,
            Frame::AuthResult { .. } => FrameType::AuthResult,
            Frame::Digests { .. } => FrameType::Digests,
            Frame::Handshake { .. } => FrameType::Handshake,
        }
    }
}
