//! The fuzzers' seed corpus (fuzz/corpus/<target>/seed-*): generated here from the real encoders,
//! checked here against the decoders (valid seeds decode to what was encoded, near-valid ones are
//! refused), and compared with the files under version control. Regenerate the files after a
//! protocol change with `PCB_WRITE_FUZZ_CORPUS=1 cargo test --test fuzz_corpus`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use postcopy_broker::control::firecracker::FcRegionWire;
use postcopy_broker::control::frame::{encode, encode_message, FrameDecoder};
use postcopy_broker::control::message::{decode_request, decode_response, Incoming, ServerDecoder};
use postcopy_broker::control::protocol::{BlockInfo as CtlBlock, BlockSpec};
use postcopy_broker::control::{
    fuzz_control_stream, fuzz_firecracker, fuzz_request, fuzz_response, ClientKind, MappingSpec, Request,
    Response,
};
use postcopy_broker::migration::fuzz_decode;
use postcopy_broker::migration::wire::{
    encode as wire_encode, BlockInfo, BlockTable, ByteRange, Channel, Decoder, Frame, Hello, Limits, Side,
    AUTH_LEN, CAP_ALL, CAP_ZERO_RUN, HEADER_LEN, PROTOCOL_VERSION,
};

/// Seeds of one target: file name (without the `seed-` prefix) → bytes.
type Seeds = BTreeMap<String, Vec<u8>>;

fn wire(frames: &[Frame<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        wire_encode(f, &mut out).unwrap();
    }
    out
}

/// The wire_decode target's input: a piece-size byte, then the stream.
fn wire_seed(piece: u8, frames: &[Frame<'_>]) -> Vec<u8> {
    let mut v = vec![piece];
    v.extend(wire(frames));
    v
}

fn hello(channel: Channel) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        capabilities: CAP_ALL,
        channel,
        session_id: 0x5eed_0000_0000_0001,
        resume: false,
        blocks: postcopy_broker::migration::fuzz_block_table(),
    }
}

fn wire_seeds() -> Seeds {
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let bitmap = [0xffu8, 0x1a];
    let singles: Vec<(&str, Frame<'_>)> = vec![
        ("hello", Frame::Hello(hello(Channel::Main))),
        ("hello-urgent", Frame::Hello(hello(Channel::Urgent))),
        ("hello-resume", Frame::Hello(Hello { resume: true, ..hello(Channel::Main) })),
        ("hello-ack", Frame::HelloAck { version: 1, capabilities: CAP_ZERO_RUN, streams: 0 }),
        ("streams", Frame::Streams { count: 3 }),
        ("page", Frame::Page { block: 2, offset: 0, demand: false, data: &page }),
        ("page-demand", Frame::Page { block: 0, offset: 4096, demand: true, data: &page }),
        ("zero-run", Frame::ZeroRun { block: 1, offset: 2 << 20, len: 4 << 20, demand: false }),
        ("zero-run-demand", Frame::ZeroRun { block: 0, offset: 0, len: 4096, demand: true }),
        (
            "discard",
            Frame::Discard {
                block: 0,
                ranges: vec![
                    ByteRange::new(0, 4096),
                    ByteRange::new(8192, 8192),
                    ByteRange::new(1 << 20, 4096),
                ],
            },
        ),
        ("discard-huge", Frame::Discard { block: 1, ranges: vec![ByteRange::new(2 << 20, 2 << 20)] }),
        ("request", Frame::Request { block: 0, offset: 4096, len: 8192 }),
        ("advise", Frame::Advise),
        ("listen", Frame::Listen),
        ("run", Frame::Run),
        ("complete", Frame::Complete),
        ("pause", Frame::Pause),
        ("resume", Frame::Resume { block: 0, first_page: 10, page_count: 13, bitmap: &bitmap }),
        ("resume-end", Frame::ResumeEnd),
        ("resume-ack", Frame::ResumeAck),
        ("complete-ack", Frame::CompleteAck),
        ("error", Frame::Error { text: "source: block 'pc.ram' vanished" }),
        ("auth-nonce", Frame::AuthNonce { side: Side::Source, nonce: [7; AUTH_LEN] }),
        ("auth-proof", Frame::AuthProof { mac: [0xa5; AUTH_LEN] }),
        ("auth-result", Frame::AuthResult { accepted: true }),
        ("digests", Frame::Digests { digests: vec![1, 0x5eed_d16e, u64::MAX] }),
        ("handshake", Frame::Handshake { bytes: &[0x42; 48] }),
    ];
    let mut seeds = Seeds::new();
    for (name, f) in &singles {
        seeds.insert(format!("ok-{name}"), wire_seed(63, std::slice::from_ref(f)));
    }
    // Whole conversations, in small and odd pieces.
    let session = [
        Frame::Hello(hello(Channel::Main)),
        Frame::Discard { block: 0, ranges: vec![ByteRange::new(0, 8192)] },
        Frame::Advise,
        Frame::Listen,
        Frame::Run,
        Frame::ZeroRun { block: 2, offset: 0, len: 4096, demand: false },
        Frame::Page { block: 0, offset: 0, demand: true, data: &page[..] },
        Frame::Complete,
    ];
    seeds.insert("ok-session-source".into(), wire_seed(6, &session));
    let dest = [
        Frame::HelloAck { version: 1, capabilities: CAP_ALL, streams: 4 },
        Frame::Request { block: 1, offset: 0, len: 2 << 20 },
        Frame::Pause,
    ];
    seeds.insert("ok-session-destination".into(), wire_seed(0, &dest));
    let resume = [
        Frame::Resume { block: 0, first_page: 0, page_count: 8, bitmap: &[0x0f] },
        Frame::Resume { block: 2, first_page: 0, page_count: 1, bitmap: &[1] },
        Frame::ResumeEnd,
        Frame::ResumeAck,
    ];
    seeds.insert("ok-session-resume".into(), wire_seed(12, &resume));
    let auth = [
        Frame::AuthNonce { side: Side::Destination, nonce: [1; AUTH_LEN] },
        Frame::AuthProof { mac: [2; AUTH_LEN] },
        Frame::AuthResult { accepted: false },
    ];
    seeds.insert("ok-session-auth".into(), wire_seed(31, &auth));
    // A Hello whose own table differs from the decoder's: several blocks, a long name.
    let other = BlockTable::new(vec![
        BlockInfo::new("x".repeat(255), 1 << 30, 1 << 30),
        BlockInfo::new("pc.ram", 4096, 4096),
    ])
    .unwrap();
    seeds.insert(
        "ok-hello-other-table".into(),
        wire_seed(63, &[Frame::Hello(Hello { blocks: other, ..hello(Channel::Main) })]),
    );

    // Near-valid: one field wrong each.
    let mut near = |name: &str, f: &Frame<'_>, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = wire_seed(63, std::slice::from_ref(f));
        edit(&mut b);
        seeds.insert(format!("bad-{name}"), b);
    };
    let req = Frame::Request { block: 0, offset: 4096, len: 4096 };
    near("magic", &req, &|b| b[1] = b'X');
    near("type", &req, &|b| b[5] = 0x7f);
    near("flags", &req, &|b| b[6] = 1);
    near("reserved", &req, &|b| b[7] = 1);
    near("length-huge", &req, &|b| b[9..13].copy_from_slice(&u32::MAX.to_le_bytes()));
    near("truncated", &req, &|b| b.truncate(b.len() - 3));
    near("request-block", &req, &|b| b[1 + HEADER_LEN] = 9);
    near("request-unaligned", &req, &|b| b[1 + HEADER_LEN + 4] = 1);
    near("request-len-zero", &Frame::Request { block: 0, offset: 0, len: 4096 }, &|b| {
        let n = b.len();
        b[n - 8..].copy_from_slice(&0u64.to_le_bytes())
    });
    near(
        "discard-unsorted",
        &Frame::Discard { block: 0, ranges: vec![ByteRange::new(0, 4096), ByteRange::new(8192, 4096)] },
        &|b| {
            let at = 1 + HEADER_LEN + 8;
            b[at..at + 8].copy_from_slice(&8192u64.to_le_bytes());
            b[at + 16..at + 24].copy_from_slice(&0u64.to_le_bytes());
        },
    );
    near("resume-tail-bits", &Frame::Resume { block: 0, first_page: 0, page_count: 3, bitmap: &[7] }, &|b| {
        *b.last_mut().unwrap() = 0xff
    });
    near("error-utf8", &Frame::Error { text: "abc" }, &|b| *b.last_mut().unwrap() = 0xc3);
    near("hello-channel", &Frame::Hello(hello(Channel::Main)), &|b| b[1 + HEADER_LEN + 2] = 5);
    near("auth-side", &Frame::AuthNonce { side: Side::Source, nonce: [0; AUTH_LEN] }, &|b| {
        b[1 + HEADER_LEN] = 7
    });
    seeds
}

/// The control_stream target's input: side byte, then reads `[fds, len, bytes]`.
fn stream_seed(server: bool, reads: &[(u8, Vec<u8>)]) -> Vec<u8> {
    postcopy_broker::control::stream_input(server, reads)
}

fn requests() -> Vec<(&'static str, Request)> {
    vec![
        ("hello", Request::Hello { version: 1, name: "qemu-vm0".into() }),
        (
            "register-shared",
            Request::Register {
                name: "vhost-user-blk".into(),
                kind: ClientKind::Shared,
                pid: Some(4242),
                mappings: vec![
                    MappingSpec {
                        client_addr: 0x7f00_0000_0000,
                        block: "pc.ram".into(),
                        offset: 0,
                        len: 1 << 20,
                    },
                    MappingSpec {
                        client_addr: 0x7f00_4000_0000,
                        block: "pc.ram".into(),
                        offset: 1 << 30,
                        len: 4096,
                    },
                ],
                vcpu_tids: vec![],
            },
        ),
        (
            "register-private",
            Request::Register {
                name: "fc".into(),
                kind: ClientKind::Private,
                pid: None,
                mappings: vec![],
                vcpu_tids: vec![],
            },
        ),
        ("unregister", Request::Unregister { client: 3 }),
        ("get-blocks", Request::GetBlocks { names: Some(vec!["pc.ram".into(), "vga.vram".into()]) }),
        ("get-blocks-all", Request::GetBlocks { names: None }),
        ("status", Request::Status),
        (
            "provide-blocks",
            Request::ProvideBlocks {
                blocks: vec![
                    BlockSpec { name: "pc.ram".into(), size: 1 << 30, page_size: 4096 },
                    BlockSpec { name: "huge".into(), size: 8 << 20, page_size: 2 << 20 },
                ],
            },
        ),
        ("dirty", Request::Dirty { block: "pc.ram".into(), offset: 8192, len: 4096 }),
        ("start-postcopy", Request::StartPostcopy),
    ]
}

fn responses() -> Vec<(&'static str, Response)> {
    vec![
        ("hello-ok", Response::hello_reply(1)),
        ("version", Response::hello_reply(2)),
        ("registered", Response::Registered { client: 7 }),
        ("ok", Response::Ok),
        (
            "blocks",
            Response::Blocks {
                blocks: vec![
                    CtlBlock { name: "pc.ram".into(), size: 1 << 30, page_size: 4096, fd_index: Some(0) },
                    CtlBlock { name: "huge".into(), size: 8 << 20, page_size: 2 << 20, fd_index: None },
                ],
            },
        ),
        (
            "status",
            Response::Status {
                report: serde_json::json!({"state": "running", "clients": [{"id": 1, "faults": 12}], "rate": 1.5}),
            },
        ),
        ("error", Response::error("refused", "block 'x' is not known; ask get_blocks for the names")),
    ]
}

/// Real Firecracker handshakes as Firecracker serializes them (both page size fields).
fn firecracker_json(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let wire: Vec<FcRegionWire> = regions
        .iter()
        .map(|&(base, size, offset, ps)| FcRegionWire {
            base_host_virt_addr: base,
            size,
            offset,
            page_size: Some(ps),
            page_size_kib: Some(ps),
        })
        .collect();
    serde_json::to_vec(&wire).unwrap()
}

fn firecracker_seeds() -> Seeds {
    let mut s = Seeds::new();
    let mib = 1u64 << 20;
    s.insert("ok-one-region".into(), firecracker_json(&[(0x7f12_3400_0000, 128 * mib, 0, 4096)]));
    // x86 guests above 3 GiB: two regions around the MMIO gap, back to back in the snapshot file.
    s.insert(
        "ok-two-regions".into(),
        firecracker_json(&[
            (0x7f00_0000_0000, 768 * mib, 0, 4096),
            (0x7f00_4000_0000, 64 * mib, 768 * mib, 4096),
        ]),
    );
    s.insert("ok-hugepages".into(), firecracker_json(&[(0x7e00_0000_0000, 256 * mib, 0, 2 * mib)]));
    // Older Firecracker: only the deprecated field, pretty printed.
    s.insert(
        "ok-page-size-kib-only".into(),
        br#"[
  {
    "base_host_virt_addr": 140737488355328,
    "size": 16777216,
    "offset": 0,
    "page_size_kib": 4096
  }
]
"#
        .to_vec(),
    );
    s.insert("ok-empty".into(), b"[]".to_vec());
    // Near-valid.
    s.insert(
        "bad-overlap".into(),
        firecracker_json(&[(0x10_0000, 2 * mib, 0, 4096), (0x18_0000, mib, 0, 4096)]),
    );
    s.insert("bad-unaligned".into(), firecracker_json(&[(0x10_0800, mib, 0, 4096)]));
    s.insert("bad-outside-image".into(), firecracker_json(&[(0x10_0000, 2 * mib, (1 << 30) - mib, 4096)]));
    s.insert("bad-page-size".into(), firecracker_json(&[(0x10_0000, mib, 0, 3000)]));
    s.insert("bad-wraps".into(), firecracker_json(&[(u64::MAX - 4095, 8192, 0, 4096)]));
    s.insert("bad-no-page-size".into(), br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0}]"#.to_vec());
    s.insert(
        "bad-negative".into(),
        br#"[{"base_host_virt_addr":-1,"size":4096,"offset":0,"page_size":4096}]"#.to_vec(),
    );
    s.insert(
        "bad-float".into(),
        br#"[{"base_host_virt_addr":4096.5,"size":4096,"offset":0,"page_size":4096}]"#.to_vec(),
    );
    let mut trailing = firecracker_json(&[(0x10_0000, mib, 0, 4096)]);
    trailing.extend_from_slice(b"\nPCB1");
    s.insert("bad-trailing".into(), trailing);
    let full = firecracker_json(&[(0x10_0000, mib, 0, 4096)]);
    s.insert("bad-truncated".into(), full[..full.len() - 5].to_vec());
    s
}

fn stream_seeds() -> Seeds {
    let mut s = Seeds::new();
    let reqs = requests();
    // A whole server-side conversation: every request, register with its uffd.
    let conv: Vec<(u8, Vec<u8>)> = reqs.iter().map(|(_, r)| (r.expected_fds() as u8, frame(r))).collect();
    s.insert("ok-server-conversation".into(), stream_seed(true, &conv));
    for (name, r) in &reqs {
        s.insert(format!("ok-server-{name}"), stream_seed(true, &[(r.expected_fds() as u8, frame(r))]));
    }
    // A frame split over reads, the fd on the read that ends it.
    let reg = frame(&reqs[1].1);
    s.insert(
        "ok-server-register-split".into(),
        stream_seed(true, &[(0, reg[..5].to_vec()), (0, reg[5..40].to_vec()), (1, reg[40..].to_vec())]),
    );
    let resps = responses();
    let conv: Vec<(u8, Vec<u8>)> =
        resps.iter().map(|(n, r)| (if *n == "blocks" { 1 } else { 0 }, frame(r))).collect();
    s.insert("ok-client-conversation".into(), stream_seed(false, &conv));
    for (name, r) in &resps {
        s.insert(format!("ok-client-{name}"), stream_seed(false, &[(0, frame(r))]));
    }
    for (name, json) in firecracker_seeds() {
        if let Some(rest) = name.strip_prefix("ok-") {
            s.insert(format!("ok-server-firecracker-{rest}"), stream_seed(true, &[(1, json)]));
        }
    }
    // Near-valid.
    let status = frame(&Request::Status);
    s.insert("bad-register-no-fd".into(), stream_seed(true, &[(0, reg.clone())]));
    s.insert("bad-status-with-fd".into(), stream_seed(true, &[(1, status.clone())]));
    s.insert("bad-too-many-fds".into(), stream_seed(true, &[(9, reg.clone())]));
    s.insert("bad-truncated".into(), stream_seed(true, &[(0, status[..status.len() - 2].to_vec())]));
    s.insert("bad-garbage".into(), stream_seed(true, &[(0, b"GET / HTTP/1.1\r\n\r\n".to_vec())]));
    let mut huge = b"PCB1".to_vec();
    huge.extend_from_slice(&0x0001_0001u32.to_le_bytes());
    s.insert("bad-length".into(), stream_seed(true, &[(0, huge)]));
    s.insert("bad-unknown-op".into(), stream_seed(true, &[(0, encode(br#"{"op":"format_disk"}"#).unwrap())]));
    s.insert(
        "bad-json".into(),
        stream_seed(true, &[(0, encode(br#"{"op":"hello","version":"1"}"#).unwrap())]),
    );
    s.insert("bad-client-firecracker".into(), stream_seed(false, &[(0, b"[]".to_vec())]));
    let mut after = firecracker_json(&[(0x10_0000, 1 << 20, 0, 4096)]);
    after.extend_from_slice(&status);
    s.insert("bad-frame-after-firecracker".into(), stream_seed(true, &[(1, after)]));
    s
}

/// A request or response as one control frame.
fn frame<T: serde::Serialize>(m: &T) -> Vec<u8> {
    encode_message(m).unwrap()
}

/// The control_message target's input: the first byte picks the request's fd count (`% 4`) and
/// is JSON whitespace, so the whole input is also a response payload.
fn message_seeds() -> Seeds {
    let mut s = Seeds::new();
    for (name, r) in requests() {
        // JSON whitespace whose value % 4 is the fd count: ' ' 0, '\t' 1, '\n' 2.
        let lead = [b' ', b'\t', b'\n'][r.expected_fds()];
        let mut v = vec![lead];
        v.extend(serde_json::to_vec(&r).unwrap());
        s.insert(format!("ok-request-{name}"), v);
    }
    for (name, r) in responses() {
        let mut v = vec![b' '];
        v.extend(serde_json::to_vec(&r).unwrap());
        s.insert(format!("ok-response-{name}"), v);
    }
    for (name, json) in [
        ("bad-unknown-op", &br#" {"op":"format_disk"}"#[..]),
        ("bad-op-type", br#" {"op":3}"#),
        ("bad-missing-op", br#" {"name":"x"}"#),
        ("bad-not-object", b" [1,2]"),
        ("bad-register-fields", br#"	{"op":"register","name":"vm","kind":"other","mappings":[]}"#),
        ("bad-register-no-fd", br#" {"op":"register","name":"vm","kind":"shared","mappings":[]}"#),
        ("bad-number-range", br#" {"op":"unregister","client":18446744073709551616}"#),
        ("bad-escape", br#" {"op":"hel\u006co","version":1,"name":"\ud800"}"#),
        ("bad-response-code", br#" {"op":"error","code":7,"message":"x"}"#),
    ] {
        s.insert(name.into(), json.to_vec());
    }
    // Nested deeper than the JSON parser's recursion limit.
    let deep = format!(r#" {{"op":"status","x":{}{}}}"#, "[".repeat(200), "]".repeat(200));
    s.insert("bad-nesting".into(), deep.into_bytes());
    s
}

fn all_seeds() -> BTreeMap<&'static str, Seeds> {
    BTreeMap::from([
        ("wire_decode", wire_seeds()),
        ("control_stream", stream_seeds()),
        ("control_message", message_seeds()),
        ("firecracker", firecracker_seeds()),
    ])
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../postcopy-broker/fuzz/corpus").join(target)
}

/// Valid wire seeds decode frame by frame without an error; near-valid ones fail.
#[test]
fn wire_seeds_decode_as_intended() {
    for (name, bytes) in wire_seeds() {
        let mut dec = Decoder::with_blocks(
            Limits { max_payload: 64 << 10, ..Limits::default() },
            postcopy_broker::migration::fuzz_block_table(),
        );
        dec.feed(&bytes[1..]);
        let mut frames = 0;
        let outcome = loop {
            match dec.next_frame() {
                Ok(Some(_)) => frames += 1,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        if name.starts_with("ok-") {
            assert!(outcome.is_ok() && frames > 0 && dec.buffered() == 0, "{name}: {outcome:?}");
        } else {
            assert!(outcome.is_err() || dec.buffered() > 0, "{name} was accepted");
        }
        fuzz_decode(&bytes);
    }
}

fn server_outcome(bytes: &[u8]) -> Result<usize, String> {
    let fds = |n: u8| (0..n).map(|_| std::fs::File::open("/dev/null").unwrap().into()).collect::<Vec<_>>();
    let server = bytes[0] == 1;
    let mut requests = ServerDecoder::new();
    let mut replies = FrameDecoder::new();
    let mut rest = &bytes[1..];
    let mut units = 0;
    while let [n, len, tail @ ..] = rest {
        let (b, next) = tail.split_at(usize::from(*len));
        rest = next;
        if server {
            requests.push(b, fds(*n));
            while requests.next_incoming().map_err(|e| e.to_string())?.is_some() {
                units += 1;
            }
        } else {
            replies.push(b, fds(*n));
            while let Some(f) = replies.next_frame().map_err(|e| e.to_string())? {
                units += 1;
                decode_response(&f.payload).map_err(|e| e.to_string())?;
            }
        }
    }
    if server { requests.finish() } else { replies.finish() }.map_err(|e| e.to_string())?;
    Ok(units)
}

#[test]
fn control_seeds_decode_as_intended() {
    for (name, bytes) in stream_seeds() {
        let outcome = server_outcome(&bytes);
        if name.starts_with("ok-") {
            assert!(matches!(outcome, Ok(n) if n > 0), "{name}: {outcome:?}");
        } else {
            assert!(outcome.is_err(), "{name} was accepted");
        }
        fuzz_control_stream(&bytes);
    }
    for (name, bytes) in message_seeds() {
        let fds = (0..bytes[0] % 4).map(|_| std::fs::File::open("/dev/null").unwrap().into()).collect();
        let req = decode_request(&bytes[1..], fds);
        let resp = decode_response(&bytes);
        if name.starts_with("ok-request") {
            assert!(matches!(req, Ok(Incoming::Request(..))), "{name}: {req:?}");
        } else if name.starts_with("ok-response") {
            assert!(resp.is_ok(), "{name}: {resp:?}");
        } else {
            assert!(req.is_err() && resp.is_err(), "{name} was accepted");
        }
        fuzz_request(&bytes);
        fuzz_response(&bytes);
    }
}

#[test]
fn firecracker_seeds_decode_as_intended() {
    for (name, bytes) in firecracker_seeds() {
        let mut dec = ServerDecoder::new();
        dec.push(&bytes, vec![std::fs::File::open("/dev/null").unwrap().into()]);
        let outcome = dec
            .next_incoming()
            .and_then(|m| dec.next_incoming().map(|_| m))
            .and_then(|m| dec.finish().map(|_| m));
        let valid = match outcome {
            Ok(Some(Incoming::Firecracker(regions, _))) => {
                let private = regions.iter().map(|r| r.private()).collect();
                postcopy_broker::client::PrivateTable::new(private, postcopy_broker::control::FUZZ_IMAGE_LEN)
                    .is_ok()
            }
            _ => false,
        };
        // An empty array is a valid handshake but not a valid private table (no region).
        assert_eq!(valid, name.starts_with("ok-") && name != "ok-empty", "{name}");
        fuzz_firecracker(&bytes);
    }
}

/// The files under fuzz/corpus are exactly what this file generates (or are rewritten with
/// PCB_WRITE_FUZZ_CORPUS=1), and stay small.
#[test]
fn corpus_files_match_the_generator() {
    let write = std::env::var_os("PCB_WRITE_FUZZ_CORPUS").is_some();
    let mut total = 0;
    for (target, seeds) in all_seeds() {
        let dir = corpus_dir(target);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.file_name().unwrap().to_string_lossy().starts_with("seed-") {
                    std::fs::remove_file(p).unwrap();
                }
            }
        }
        assert!(seeds.len() >= 12, "{target}: only {} seeds", seeds.len());
        for (name, bytes) in &seeds {
            let path = dir.join(format!("seed-{name}"));
            if write {
                std::fs::write(&path, bytes).unwrap();
            }
            let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; regenerate: PCB_WRITE_FUZZ_CORPUS=1 cargo test --test fuzz_corpus",
                    path.display()
                )
            });
            assert!(
                on_disk == *bytes,
                "{} is stale; regenerate: PCB_WRITE_FUZZ_CORPUS=1 cargo test --test fuzz_corpus",
                path.display()
            );
            total += bytes.len();
        }
        let on_disk = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("seed-"))
            .count();
        assert_eq!(on_disk, seeds.len(), "{target}: stray seed files in {}", dir.display());
    }
    assert!(total < 300 << 10, "the seed corpus is {total} bytes; keep it small");
}
