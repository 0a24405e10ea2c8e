//! Wire protocol tests: round trips of every frame, byte-exact layouts, every refusal, and
//! property tests that random and mutated input never panics the decoder.

use proptest::prelude::*;

use super::*;
use crate::migration::fuzz::{fuzz_block_table, fuzz_decode};

fn table() -> BlockTable {
    fuzz_block_table()
}

fn hello() -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        capabilities: CAP_ALL,
        channel: Channel::Main,
        session_id: 0x1122_3344_5566_7788,
        resume: false,
        blocks: table(),
    }
}

fn all_frames(page: &[u8], bitmap: &[u8]) -> Vec<Frame<'static>> {
    // Leak the test buffers so the frames are 'static; tests only.
    let page: &'static [u8] = Box::leak(page.to_vec().into_boxed_slice());
    let bitmap: &'static [u8] = Box::leak(bitmap.to_vec().into_boxed_slice());
    vec![
        Frame::Hello(hello()),
        Frame::Hello(Hello { channel: Channel::Urgent, ..hello() }),
        Frame::HelloAck { version: 1, capabilities: CAP_ZERO_RUN | CAP_RESUME, streams: 0 },
        Frame::HelloAck { version: 2, capabilities: CAP_STREAMS, streams: 4 },
        Frame::Hello(Hello { channel: Channel::Stream, resume: true, ..hello() }),
        Frame::Streams { count: 3 },
        Frame::Page { block: 0, offset: 8192, demand: false, data: page },
        Frame::Page { block: 0, offset: 0, demand: true, data: &page[..4096] },
        Frame::ZeroRun { block: 1, offset: 2 << 20, len: 4 << 20, demand: false },
        Frame::ZeroRun { block: 2, offset: 0, len: 4096, demand: true },
        Frame::Discard {
            block: 0,
            ranges: vec![ByteRange::new(0, 4096), ByteRange::new(8192, 8192), ByteRange::new(1 << 20, 4096)],
        },
        Frame::Request { block: 0, offset: 4096, len: 4096 },
        Frame::Advise,
        Frame::Listen,
        Frame::Run,
        Frame::Complete,
        Frame::Pause,
        Frame::Resume { block: 0, first_page: 10, page_count: 13, bitmap },
        Frame::ResumeEnd,
        Frame::ResumeAck,
        Frame::CompleteAck,
        Frame::Error { text: "source: block 'pc.ram' vanished ✗" },
        Frame::AuthNonce { side: Side::Destination, nonce: [7; AUTH_LEN] },
        Frame::AuthProof { mac: [0xa5; AUTH_LEN] },
        Frame::AuthResult { accepted: true },
        Frame::AuthResult { accepted: false },
        Frame::Digests { digests: vec![7, 0, u64::MAX] },
        Frame::Handshake { bytes: &page[..48] },
    ]
}

fn sample_frames() -> Vec<Frame<'static>> {
    let page: Vec<u8> = (0..3 * 4096).map(|i| (i * 7 % 251) as u8).collect();
    all_frames(&page, &[0xff, 0x1a])
}

fn decode_all(bytes: &[u8], piece: usize) -> Vec<String> {
    let mut dec = Decoder::with_blocks(Limits::default(), table());
    let mut out = Vec::new();
    for c in bytes.chunks(piece) {
        dec.feed(c);
        while let Some(f) = dec.next_frame().unwrap() {
            out.push(format!("{f:?}"));
        }
    }
    assert_eq!(dec.buffered(), 0);
    out
}

#[test]
fn every_frame_round_trips_whole_and_byte_by_byte() {
    let frames = sample_frames();
    let mut bytes = Vec::new();
    for f in &frames {
        encode(f, &mut bytes).unwrap();
    }
    let want: Vec<String> = frames.iter().map(|f| format!("{f:?}")).collect();
    for piece in [1, 3, 12, 13, 4096, 1 << 20] {
        assert_eq!(decode_all(&bytes, piece), want, "piece size {piece}");
    }
}

/// Chunks adopted with a headroom in front of their bytes (as a read-ahead hands them over),
/// in pieces of every size: the frames come out the same, whether the unfinished frame fits in
/// the headroom (the chunk becomes the buffer) or not (the chunk is copied in).
#[test]
fn adopted_chunks_decode_like_fed_bytes() {
    let frames = sample_frames();
    let mut bytes = Vec::new();
    for f in &frames {
        encode(f, &mut bytes).unwrap();
    }
    let want: Vec<String> = frames.iter().map(|f| format!("{f:?}")).collect();
    // (piece, headroom, whether some unfinished frame is longer than the headroom: the longest
    // frame is three pages)
    for (piece, headroom, some_copied) in [
        (1, 0, true),
        (7, 16, true),
        (100, 5000, true),
        (4096, 64, true),
        (5000, 20000, false),
        (1 << 20, 0, false),
    ] {
        let mut dec = Decoder::with_blocks(Limits::default(), table());
        let mut out = Vec::new();
        let (mut adopted, mut copied) = (0, 0);
        for c in bytes.chunks(piece) {
            let mut buf = vec![0xee; headroom];
            buf.extend_from_slice(c);
            buf.extend_from_slice(&[0xdd; 3]);
            let fits = dec.buffered() <= headroom;
            let back = dec.adopt(buf, headroom, headroom + c.len());
            if fits {
                adopted += 1;
            } else {
                copied += 1;
                assert_eq!(
                    &back[headroom..headroom + c.len()],
                    c,
                    "a chunk that was copied comes back as it was"
                );
            }
            while let Some(f) = dec.next_frame().unwrap() {
                out.push(format!("{f:?}"));
            }
        }
        assert_eq!(out, want, "piece {piece}, headroom {headroom}");
        assert_eq!(dec.buffered(), 0);
        assert!(adopted > 0, "piece {piece}, headroom {headroom}: no chunk was adopted");
        assert_eq!(copied > 0, some_copied, "piece {piece}, headroom {headroom}: chunks copied");
    }
}

#[test]
fn header_layout_is_little_endian() {
    let mut b = Vec::new();
    encode(&Frame::Request { block: 2, offset: 0, len: 4096 }, &mut b).unwrap();
    assert_eq!(&b[0..4], b"PCB1");
    assert_eq!(b[4], FrameType::Request as u8);
    assert_eq!(b[5], 0);
    assert_eq!(&b[6..8], &[0, 0]);
    assert_eq!(&b[8..12], &20u32.to_le_bytes());
    assert_eq!(&b[12..16], &2u32.to_le_bytes());
    assert_eq!(&b[16..24], &0u64.to_le_bytes());
    assert_eq!(&b[24..32], &4096u64.to_le_bytes());
    assert_eq!(b.len(), 32);
}

#[test]
fn page_header_plus_data_equals_encode() {
    let data = vec![0x5a; 8192];
    let mut whole = Vec::new();
    encode(&Frame::Page { block: 0, offset: 4096, demand: true, data: &data }, &mut whole).unwrap();
    let h = page_header(0, 4096, data.len(), true).unwrap();
    assert_eq!(&whole[..PAGE_HEADER_LEN], &h);
    assert_eq!(&whole[PAGE_HEADER_LEN..], &data[..]);
    let mut written = Vec::new();
    write_page(&mut written, 0, 4096, true, &data).unwrap();
    assert_eq!(written, whole);
    let mut via_frame = Vec::new();
    write_frame(&mut via_frame, &Frame::Page { block: 0, offset: 4096, demand: true, data: &data }).unwrap();
    assert_eq!(via_frame, whole);
    assert!(page_header(0, 0, 0, false).is_err());
}

#[test]
fn page_data_is_a_slice_of_the_decoder_buffer_read_in_place() {
    let data: Vec<u8> = (0..(2 << 20)).map(|i| (i % 253) as u8).collect();
    let mut bytes = Vec::new();
    write_page(&mut bytes, 1, 2 << 20, false, &data).unwrap();
    let mut dec = Decoder::with_blocks(Limits::default(), table());
    let mut src = &bytes[..];
    let f = dec.read_frame(&mut src).unwrap();
    match f {
        Frame::Page { block: 1, offset, data: d, demand: false } => {
            assert_eq!(offset, 2 << 20);
            assert_eq!(d, &data[..]);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(dec.read_frame(&mut src), Err(WireError::Closed)));
}

#[test]
fn eof_inside_a_frame_is_truncated() {
    let mut bytes = Vec::new();
    encode(&Frame::Request { block: 0, offset: 0, len: 4096 }, &mut bytes).unwrap();
    let mut src = &bytes[..bytes.len() - 1];
    let mut dec = Decoder::with_blocks(Limits::default(), table());
    assert!(matches!(dec.read_frame(&mut src), Err(WireError::Truncated { have: 31, need: 32 })));
}

fn decode_one(bytes: &[u8], blocks: Option<BlockTable>) -> Result<(), WireError> {
    let mut dec = match blocks {
        Some(t) => Decoder::with_blocks(Limits::default(), t),
        None => Decoder::new(Limits::default()),
    };
    dec.feed(bytes);
    let r = dec.next_frame().map(|f| assert!(f.is_some(), "frame incomplete"));
    if r.is_err() {
        // Poisoned from now on.
        assert!(matches!(dec.next_frame(), Err(WireError::Poisoned(_))));
    }
    r
}

fn frame_bytes(f: &Frame<'_>) -> Vec<u8> {
    let mut b = Vec::new();
    encode(f, &mut b).unwrap();
    b
}

fn raw(ft: FrameType, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = Header { frame_type: ft, flags, payload_len: payload.len() as u32 }.to_bytes().to_vec();
    b.extend_from_slice(payload);
    b
}

#[test]
fn refusals_say_what_was_wrong() {
    let t = Some(table());
    let err = |b: &[u8]| decode_one(b, t.clone()).unwrap_err().to_string();

    let mut b = frame_bytes(&Frame::Advise);
    b[0] = b'X';
    assert!(err(&b).contains("bad frame magic"));
    let mut b = frame_bytes(&Frame::Advise);
    b[4] = 0x7f;
    assert!(err(&b).contains("unknown frame type"));
    let mut b = frame_bytes(&Frame::Advise);
    b[5] = FLAG_DEMAND;
    assert!(err(&b).contains("flags"));
    let mut b = frame_bytes(&Frame::Advise);
    b[6] = 1;
    assert!(err(&b).contains("reserved"));
    assert!(err(&raw(FrameType::Advise, 0, &[0])).contains("trailing"));

    // Payload over the limit is refused from the header alone.
    let mut h = Header { frame_type: FrameType::Page, flags: 0, payload_len: u32::MAX }.to_bytes().to_vec();
    h.truncate(HEADER_LEN);
    assert!(matches!(decode_one(&h, t.clone()), Err(WireError::PayloadTooLarge { .. })));

    // Block index, alignment, bounds, emptiness.
    let page = vec![0u8; 4096];
    let e = err(&frame_bytes(&Frame::Page { block: 3, offset: 0, demand: false, data: &page }));
    assert!(e.contains("block index 3 is not announced"), "{e}");
    let e = err(&frame_bytes(&Frame::Page { block: 0, offset: 100, demand: false, data: &page }));
    assert!(e.contains("not page aligned"), "{e}");
    let e = err(&frame_bytes(&Frame::Page { block: 0, offset: 0, demand: false, data: &page[..100] }));
    assert!(e.contains("not page aligned"), "{e}");
    let e = err(&frame_bytes(&Frame::Page { block: 1, offset: 0, demand: false, data: &page }));
    assert!(e.contains("not page aligned"), "{e}");
    let e = err(&frame_bytes(&Frame::Page { block: 2, offset: 4096, demand: false, data: &page }));
    assert!(e.contains("outside the block"), "{e}");
    let e = err(&frame_bytes(&Frame::ZeroRun { block: 0, offset: 0, len: 0, demand: false }));
    assert!(e.contains("empty"), "{e}");
    let e = err(&frame_bytes(&Frame::Request { block: 0, offset: u64::MAX - 4095, len: 8192 }));
    assert!(e.contains("outside the block"), "{e}");
    let e = err(&raw(FrameType::Page, 0, &[0; 11]));
    assert!(e.contains("ends inside offset"), "{e}");

    // Block-addressed frames need the table.
    let e = decode_one(&frame_bytes(&Frame::Request { block: 0, offset: 0, len: 4096 }), None).unwrap_err();
    assert!(matches!(e, WireError::NoBlockTable { frame: FrameType::Request }));

    // Discard: overlap, order, count.
    let d = |ranges: Vec<ByteRange>| frame_bytes(&Frame::Discard { block: 0, ranges });
    let e = err(&d(vec![ByteRange::new(0, 8192), ByteRange::new(4096, 4096)]));
    assert!(e.contains("overlaps"), "{e}");
    let e = err(&d(vec![ByteRange::new(8192, 4096), ByteRange::new(0, 4096)]));
    assert!(e.contains("overlaps or precedes"), "{e}");
    let many: Vec<ByteRange> =
        (0..=DEFAULT_MAX_DISCARD_RANGES as u64).map(|i| ByteRange::new(i * 8192, 4096)).collect();
    assert!(err(&d(many)).contains("range count"));
    let mut b = d(vec![ByteRange::new(0, 4096)]);
    b.truncate(b.len() - 1);
    let plen = ((b.len() - HEADER_LEN) as u32).to_le_bytes();
    b[8..12].copy_from_slice(&plen);
    assert!(err(&b).contains("ranges need"));

    // Resume: length, tail bits, range.
    let r = |first_page, page_count, bitmap: &[u8]| {
        let mut p = Vec::new();
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&u64::to_le_bytes(first_page));
        p.extend_from_slice(&u64::to_le_bytes(page_count));
        p.extend_from_slice(bitmap);
        raw(FrameType::Resume, 0, &p)
    };
    assert!(decode_one(&r(0, 9, &[0xff, 0x01]), t.clone()).is_ok());
    assert!(err(&r(0, 9, &[0xff])).contains("expected 2"));
    assert!(err(&r(0, 9, &[0xff, 0x03])).contains("bits past the page count"));
    assert!(err(&r(16380, 5, &[0x1f])).contains("inside block"));
    assert!(err(&r(u64::MAX, 2, &[0x03])).contains("inside block"));
    assert!(err(&r(0, 0, &[])).contains("non-empty"));

    // Texts and names must be UTF-8.
    assert!(err(&raw(FrameType::Error, 0, &[0xff, 0xfe])).contains("UTF-8"));
    let mut h = frame_bytes(&Frame::Hello(Hello {
        blocks: BlockTable::new(vec![BlockInfo::new("ab", 4096, 4096)]).unwrap(),
        ..hello()
    }));
    let name_at = HEADER_LEN + 2 + 1 + 1 + 8 + 8 + 4 + 1;
    h[name_at] = 0xc3;
    h[name_at + 1] = 0x28;
    assert!(err(&h).contains("UTF-8"));

    // Hello with a huge block count does not allocate for it.
    let mut p = vec![1, 0, 0, 0];
    p.extend_from_slice(&[0; 16]);
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(err(&raw(FrameType::Hello, 0, &p)).contains("block count"));

    // Auth fields.
    assert!(err(&raw(FrameType::AuthNonce, 0, &[2; 33])).contains("side 2"));
    assert!(err(&raw(FrameType::AuthResult, 0, &[2])).contains("verdict"));
    assert!(err(&raw(FrameType::AuthProof, 0, &[0; 31])).contains("ends inside proof"));
}

#[test]
fn hello_table_is_validated() {
    let b = raw(FrameType::Hello, 0, &{
        let mut p = vec![1, 0, 0, 0];
        p.extend_from_slice(&[0; 16]);
        p.extend_from_slice(&1u32.to_le_bytes());
        p.push(1);
        p.push(b'a');
        p.extend_from_slice(&5000u64.to_le_bytes());
        p.extend_from_slice(&4096u64.to_le_bytes());
        p
    });
    let e = decode_one(&b, None).unwrap_err().to_string();
    assert!(e.contains("not a positive multiple"), "{e}");
}

#[test]
fn negotiation() {
    let h = Hello { version: 7, capabilities: CAP_ZERO_RUN | CAP_RESUME | (1 << 40), ..hello() };
    let (v, caps) = negotiate(&h, CAP_ZERO_RUN | CAP_DISCARD).unwrap();
    assert_eq!((v, caps), (PROTOCOL_VERSION, CAP_ZERO_RUN));
    assert!(check_ack(7, h.capabilities, v, caps, 0).is_ok());
    assert!(check_ack(7, CAP_RESUME, v, caps, 0).is_err());
    assert!(check_ack(7, caps, PROTOCOL_VERSION + 1, caps, 0).is_err());
    // A stream count comes with CAP_STREAMS, and only then.
    assert!(check_ack(7, caps, v, caps, 2).is_err());
    assert!(check_ack(7, caps | CAP_STREAMS, v, caps | CAP_STREAMS, 0).is_err());
    assert!(check_ack(7, caps | CAP_STREAMS, v, caps | CAP_STREAMS, 2).is_ok());
    assert!(negotiate(&Hello { version: 0, ..hello() }, CAP_ALL).is_err());
}

#[test]
fn decoder_buffer_stays_bounded_with_interleaved_reads() {
    // 64 frames of 2 MiB through read_from with small reads: the buffer never needs more than
    // one frame plus a read chunk.
    let data = vec![1u8; 2 << 20];
    let mut bytes = Vec::new();
    for i in 0..64u64 {
        write_page(&mut bytes, 0, (i % 16) * (2 << 20), false, &data).unwrap();
    }
    struct Dribble<'a>(&'a [u8]);
    impl std::io::Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(100_000);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let mut src = Dribble(&bytes);
    let mut dec = Decoder::with_blocks(Limits::default(), table());
    for _ in 0..64 {
        assert!(
            matches!(dec.read_frame(&mut src).unwrap(), Frame::Page { data, .. } if data.len() == 2 << 20)
        );
        assert!(dec.capacity() <= (2 << 20) + 2 * (64 << 10) + 100_000, "buffer grew to {}", dec.capacity());
    }
}

#[test]
fn frames_queue_in_buffer_without_losing_bytes() {
    // Many small frames fed before any is taken: read_buf must never be empty.
    let mut bytes = Vec::new();
    for i in 0..20_000u64 {
        encode(&Frame::Request { block: 0, offset: (i % 16384) * 4096, len: 4096 }, &mut bytes).unwrap();
    }
    let mut dec = Decoder::with_blocks(Limits::default(), table());
    let mut src = &bytes[..];
    while dec.read_from(&mut src).unwrap() > 0 {}
    let mut n = 0;
    while let Some(f) = dec.next_frame().unwrap() {
        assert!(matches!(f, Frame::Request { len: 4096, .. }));
        n += 1;
    }
    assert_eq!(n, 20_000);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        fuzz_decode(&data);
    }

    #[test]
    fn random_payloads_behind_valid_headers_never_panic(
        ft in prop::sample::select(vec![1u8, 2, 3, 4, 5, 6, 7, 12, 15, 0x20, 0x21, 0x22]),
        flags in 0u8..2,
        payload in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut b = vec![0u8];
        b.extend_from_slice(b"PCB1");
        b.push(ft);
        b.push(flags);
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(&payload);
        fuzz_decode(&b);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        piece in any::<u8>(),
    ) {
        let page: Vec<u8> = vec![0x33; 4096];
        let frames = all_frames(&page, &[0x0f, 0x00]);
        let mut stream = Vec::new();
        for f in &frames {
            encode(f, &mut stream).unwrap();
        }
        for (at, v) in &edits {
            let i = at.index(stream.len());
            stream[i] = *v;
        }
        stream.truncate(cut.index(stream.len() + 1));
        let mut data = vec![piece];
        data.extend_from_slice(&stream);
        fuzz_decode(&data);
    }

    #[test]
    fn valid_runs_round_trip(block in 0u32..3, page in 0u64..16, pages in 1u64..4, demand in any::<bool>()) {
        let t = table();
        let b = t.get(block).unwrap();
        let offset = (page * b.page_size) % b.size;
        let len = (pages * b.page_size).min(b.size - offset);
        let f = Frame::ZeroRun { block, offset, len, demand };
        let bytes = frame_bytes(&f);
        let mut dec = Decoder::with_blocks(Limits::default(), t.clone());
        dec.feed(&bytes);
        prop_assert_eq!(dec.next_frame().unwrap(), Some(f));
    }
}

#[test]
fn hello_resume_flag_round_trips_and_needs_cap_resume() {
    let h = Hello { resume: true, capabilities: CAP_RESUME | CAP_ZERO_RUN, ..hello() };
    let b = frame_bytes(&Frame::Hello(h.clone()));
    assert_eq!(b[HEADER_LEN + 3], 1, "flags byte");
    let mut dec = Decoder::new(Limits::default());
    dec.feed(&b);
    assert_eq!(dec.next_frame().unwrap(), Some(Frame::Hello(h)));
    let no_cap = frame_bytes(&Frame::Hello(Hello { resume: true, capabilities: CAP_ZERO_RUN, ..hello() }));
    assert!(decode_one(&no_cap, None).unwrap_err().to_string().contains("CAP_RESUME"));
    let mut bad = frame_bytes(&Frame::Hello(hello()));
    bad[HEADER_LEN + 3] = 2;
    assert!(decode_one(&bad, None).unwrap_err().to_string().contains("undefined bits"));
}
