//! Fuzzing entry point for the wire decoder: [`fuzz_decode`] feeds arbitrary bytes to a
//! [`Decoder`] with a fixed block table, in irregular pieces, and checks that every accepted frame
//! re-encodes to bytes that decode to the same frame. It must never panic; a cargo-fuzz target is
//! one line: `fuzz_target!(|data: &[u8]| postcopy_broker::migration::fuzz_decode(data));`.

use super::wire::{encode, BlockInfo, BlockTable, Decoder, Frame, Limits};

/// The block table fuzzing uses: a 4 KiB-page block, a 2 MiB-page block and a one-page block.
pub fn fuzz_block_table() -> BlockTable {
    let blocks = vec![
        BlockInfo::new("pc.ram", 64 << 20, 4096),
        BlockInfo::new("huge", 8 << 20, 2 << 20),
        BlockInfo::new("rom", 4096, 4096),
    ];
    // A constant table that satisfies every rule; an empty table would only make fuzzing weaker.
    BlockTable::new(blocks).unwrap_or_default()
}

/// Feed `data` to a decoder (first byte picks the piece size, the rest is the stream) and take
/// every frame out. Accepted frames are re-encoded and decoded again; a mismatch panics, because
/// that is a bug the fuzzer should report. Errors from the decoder are the expected outcome for
/// garbage and end the run.
pub fn fuzz_decode(data: &[u8]) {
    let Some((&piece, stream)) = data.split_first() else { return };
    let piece = usize::from(piece % 64) + 1;
    let limits = Limits { max_payload: 64 << 10, ..Limits::default() };
    let mut dec = Decoder::with_blocks(limits, fuzz_block_table());
    for chunk in stream.chunks(piece) {
        dec.feed(chunk);
        loop {
            match dec.next_frame() {
                Ok(Some(frame)) => roundtrip(&frame, limits),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

fn roundtrip(frame: &Frame<'_>, limits: Limits) {
    let mut bytes = Vec::new();
    if encode(frame, &mut bytes).is_err() {
        panic!("a decoded frame failed to re-encode: {frame:?}");
    }
    let mut dec = Decoder::with_blocks(limits, fuzz_block_table());
    dec.feed(&bytes);
    match dec.next_frame() {
        Ok(Some(again)) if again == *frame => {}
        other => panic!("re-encoded frame decoded differently: {frame:?} -> {other:?}"),
    }
}
