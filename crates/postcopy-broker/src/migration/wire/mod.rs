//! The migration wire protocol: versioned little-endian binary frames between the source page
//! server and the destination broker. The full byte layout, handshake order and limits are in
//! docs/wire-protocol.md.
//!
//! Sending: [`encode`] / [`write_frame`], and [`page_header`] + [`write_page`] for page runs
//! without copying. Receiving: [`Decoder`] (incremental, for non-blocking sockets) or
//! [`Header::parse`] + [`decode_payload`] (for callers that read payloads into their own
//! buffers). Everything received is checked against [`Limits`] and the announced [`BlockTable`].

mod blocks;
mod decode;
mod encode;
mod error;
mod frame;
#[cfg(test)]
mod tests;

pub use blocks::{
    wire_index, BlockInfo, BlockTable, MAX_BLOCKS, MAX_BLOCK_SIZE, MAX_NAME_LEN, MAX_PAGE_SIZE, MIN_PAGE_SIZE,
};
pub use decode::{
    decode_payload, Decoder, Limits, DEFAULT_MAX_DISCARD_RANGES, DEFAULT_MAX_RUN, MAX_ERROR_TEXT,
    PAGE_PREFIX_LEN,
};
pub use encode::{encode, page_header, write_all_vectored, write_frame, write_page, PAGE_HEADER_LEN};
pub use error::WireError;
pub use frame::{
    ByteRange, Channel, Frame, FrameType, Header, Hello, Side, AUTH_LEN, CAP_ALL, CAP_COMPLETE_ACK,
    CAP_DIGEST, CAP_DISCARD, CAP_RESUME, CAP_STREAMS, CAP_URGENT_CHANNEL, CAP_ZERO_RUN, FLAG_DEMAND,
    HEADER_LEN, MAGIC, PROTOCOL_VERSION,
};

/// The destination's answer to a Hello: the version to speak (the lower of the two sides') and
/// the capabilities both sides have. Fails if the source's version is 0 (no valid version).
pub fn negotiate(hello: &Hello, supported: u64) -> Result<(u16, u64), WireError> {
    if hello.version == 0 {
        return Err(WireError::malformed(FrameType::Hello, "version 0 is not a protocol version"));
    }
    Ok((hello.version.min(PROTOCOL_VERSION), hello.capabilities & supported & CAP_ALL))
}

/// The source's check of a HelloAck against its Hello: the version must be one it offered and
/// understands, the accepted capabilities a subset of the offered ones, and the stream count
/// 0 without `CAP_STREAMS` and at least 1 (main) with it.
pub fn check_ack(
    offered_version: u16,
    offered_caps: u64,
    version: u16,
    capabilities: u64,
    streams: u16,
) -> Result<(), WireError> {
    if (capabilities & CAP_STREAMS != 0) != (streams != 0) {
        return Err(WireError::malformed(
            FrameType::HelloAck,
            format!("{streams} streams with capabilities {capabilities:#x} (a count comes with CAP_STREAMS, and only then)"),
        ));
    }
    if version == 0 || version > offered_version.min(PROTOCOL_VERSION) {
        return Err(WireError::malformed(
            FrameType::HelloAck,
            format!("version {version} was not offered (offered up to {offered_version})"),
        ));
    }
    if capabilities & !offered_caps != 0 {
        return Err(WireError::malformed(
            FrameType::HelloAck,
            format!("accepted capabilities {capabilities:#x} include bits not offered ({offered_caps:#x})"),
        ));
    }
    Ok(())
}
