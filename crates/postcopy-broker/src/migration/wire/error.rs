//! [`WireError`]: everything the wire encoder and decoder can refuse, each with a message that says
//! what was wrong and what the peer or the caller should do about it.

use std::io;

use super::frame::FrameType;

/// An error from encoding, decoding or transporting wire frames.
///
/// A decoder that returned an error is poisoned (see [`Decoder`](super::Decoder)): the stream is
/// no longer trusted, and the connection should be answered with an `Error` frame and closed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The first four bytes of a frame header are not [`MAGIC`](super::MAGIC).
    #[error("bad frame magic {found:#010x} (expected {expected:#010x}): the peer does not speak the postcopy-broker wire protocol, or the stream lost framing")]
    BadMagic {
        /// The magic found.
        found: u32,
        /// The magic expected.
        expected: u32,
    },
    /// A frame type byte this version does not know.
    #[error("unknown frame type {0:#04x}: the peer speaks a newer or different protocol version")]
    UnknownFrameType(u8),
    /// Header flags that are not defined for this frame type.
    #[error("{frame:?} frame: flags {flags:#04x} contain bits not defined for this frame type (allowed {allowed:#04x})")]
    BadFlags {
        /// The frame type.
        frame: FrameType,
        /// The flags found.
        flags: u8,
        /// The flag bits this type allows.
        allowed: u8,
    },
    /// The header's reserved field is not zero.
    #[error("{frame:?} frame: reserved header field is {value:#06x}, must be 0")]
    ReservedNonZero {
        /// The frame type.
        frame: FrameType,
        /// The value found.
        value: u16,
    },
    /// A payload longer than the decoder's limit.
    #[error("{frame:?} frame: payload of {len} bytes exceeds the limit of {max} bytes; send shorter runs or raise Limits::max_payload on the receiver")]
    PayloadTooLarge {
        /// The frame type.
        frame: FrameType,
        /// Announced payload length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A payload whose structure is wrong (length, field values, trailing bytes).
    #[error("{frame:?} frame: {why}")]
    Malformed {
        /// The frame type.
        frame: FrameType,
        /// What was wrong.
        why: String,
    },
    /// A block-addressed frame arrived before the block table was known.
    #[error("{frame:?} frame arrived before the block table: Hello must come first and the receiver must call Decoder::set_blocks")]
    NoBlockTable {
        /// The frame type.
        frame: FrameType,
    },
    /// A block index that is not in the announced block table.
    #[error("{frame:?} frame: block index {index} is not announced (the Hello listed {count} blocks)")]
    UnknownBlock {
        /// The frame type.
        frame: FrameType,
        /// The index found.
        index: u32,
        /// Number of announced blocks.
        count: usize,
    },
    /// A byte range that is empty, not aligned to the block page size or not inside the block.
    #[error("{frame:?} frame: block '{block}' range offset {offset:#x} length {len:#x} is {why} (block size {size:#x}, page size {page_size:#x})")]
    BadRange {
        /// The frame type.
        frame: FrameType,
        /// Block name.
        block: String,
        /// Offset in the block.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Block size.
        size: u64,
        /// Block page size.
        page_size: u64,
        /// "empty", "not page aligned" or "outside the block".
        why: &'static str,
    },
    /// A block list entry that cannot be used (name, size, page size, duplicates, count).
    #[error("block table: {0}")]
    BadBlockTable(String),
    /// A frame the encoder cannot represent (e.g. a name longer than 255 bytes).
    #[error("cannot encode {frame:?} frame: {why}")]
    Unencodable {
        /// The frame type.
        frame: FrameType,
        /// What does not fit.
        why: String,
    },
    /// The decoder refused an earlier frame; the stream cannot be trusted any more.
    #[error("the wire decoder refused an earlier frame ({0}); close the connection and reconnect")]
    Poisoned(String),
    /// The peer closed the connection between frames.
    #[error("the peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("the peer closed the connection in the middle of a frame ({have} of {need} bytes received)")]
    Truncated {
        /// Bytes of the frame received.
        have: usize,
        /// Bytes the frame needs.
        need: usize,
    },
    /// A socket error.
    #[error("wire I/O error: {0}")]
    Io(#[from] io::Error),
}

impl WireError {
    /// Shorthand for [`WireError::Malformed`].
    pub(crate) fn malformed(frame: FrameType, why: impl Into<String>) -> WireError {
        WireError::Malformed { frame, why: why.into() }
    }
}

/// A wire failure as the broker's [`crate::Error::Wire`] (error.rs is below migration).
impl From<WireError> for crate::error::Error {
    fn from(e: WireError) -> crate::error::Error {
        crate::error::Error::Wire(Box::new(e))
    }
}
