//! End-to-end use of the wire pieces over loopback TCP: authentication, Hello/HelloAck, Advise,
//! batched Discards, Listen, Run, a page stream with zero runs, Complete — with the destination
//! reading through a non-blocking socket and the incremental decoder.

use std::io::{ErrorKind, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::thread;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::auth::authenticate_tcp;
use super::discard::DiscardBatcher;
use super::wire::*;
use super::zero::split_zero_runs;

const KEY: &[u8] = b"flow test key, thirty-two bytes!";

fn table() -> BlockTable {
    BlockTable::new(vec![BlockInfo::new("pc.ram", 8 << 20, 4096), BlockInfo::new("huge", 8 << 20, 2 << 20)])
        .unwrap()
}

/// Source RAM: pseudo-random pages, every third page (or huge page) zero.
fn source_ram(t: &BlockTable) -> Vec<Vec<u8>> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    t.iter()
        .map(|b| {
            let mut v = vec![0u8; b.size as usize];
            for (i, page) in v.chunks_mut(b.page_size as usize).enumerate() {
                if i % 3 != 0 {
                    for byte in page.iter_mut().step_by(61) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *byte = (x >> 24) as u8 | 1;
                    }
                }
            }
            v
        })
        .collect()
}

fn run_source(mut s: TcpStream, t: BlockTable, ram: Vec<Vec<u8>>) -> Result<(), WireError> {
    authenticate_tcp(&mut s, KEY, Side::Source, None).map_err(|e| WireError::Poisoned(e.to_string()))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let caps = CAP_ZERO_RUN | CAP_DISCARD;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        capabilities: caps,
        channel: Channel::Main,
        session_id: 7,
        resume: false,
        blocks: t.clone(),
    };
    write_frame(&mut s, &Frame::Hello(hello))?;
    let mut dec = Decoder::with_blocks(Limits::default(), t.clone());
    let accepted = match dec.read_frame(&mut s)? {
        Frame::HelloAck { version, capabilities, streams } => {
            check_ack(PROTOCOL_VERSION, caps, version, capabilities, streams)?;
            capabilities
        }
        f => panic!("{f:?}"),
    };
    write_frame(&mut s, &Frame::Advise)?;
    // Pages "dirtied after precopy", added out of order, partly overlapping, with sub-page ranges
    // in the huge page block.
    let mut d0 = DiscardBatcher::for_block(&t, 0, 12)?;
    for p in (0..2048u64).rev().step_by(7) {
        d0.add(p * 4096, (4096 * (1 + p % 3)).min((2048 - p) * 4096))?;
    }
    let mut d1 = DiscardBatcher::for_block(&t, 1, 12)?;
    d1.add((2 << 20) + 100, 10)?;
    for f in d0.finish().iter().chain(d1.finish().iter()) {
        write_frame(&mut s, f)?;
    }
    write_frame(&mut s, &Frame::Listen)?;
    write_frame(&mut s, &Frame::Run)?;
    for (i, b) in t.iter().enumerate() {
        for (n, run) in ram[i].chunks(DEFAULT_MAX_RUN as usize).enumerate() {
            let base = (n * DEFAULT_MAX_RUN as usize) as u64;
            for piece in split_zero_runs(run, b.page_size as usize) {
                let offset = base + piece.offset as u64;
                if piece.zero && accepted & CAP_ZERO_RUN != 0 {
                    let f = Frame::ZeroRun { block: i as u32, offset, len: piece.len as u64, demand: false };
                    write_frame(&mut s, &f)?;
                } else {
                    write_page(
                        &mut s,
                        i as u32,
                        offset,
                        false,
                        &run[piece.offset..piece.offset + piece.len],
                    )?;
                }
            }
        }
    }
    write_frame(&mut s, &Frame::Complete)?;
    match dec.read_frame(&mut s)? {
        Frame::Complete => Ok(()),
        f => panic!("{f:?}"),
    }
}

#[derive(Default)]
struct Seen {
    discards: usize,
    zero_runs: usize,
    pages: usize,
    order: Vec<FrameType>,
}

fn run_destination(mut s: TcpStream) -> (Vec<Vec<u8>>, Seen) {
    authenticate_tcp(&mut s, KEY, Side::Destination, None).unwrap();
    s.set_nonblocking(true).unwrap();
    let mut dec = Decoder::default();
    let mut ram: Vec<Vec<u8>> = Vec::new();
    let mut seen = Seen::default();
    // The pattern for a non-blocking session: take every buffered frame, then read; poll only
    // when a read would block.
    loop {
        let mut reply = None;
        let mut hello_table = None;
        while let Some(f) = dec.next_frame().unwrap() {
            seen.order.push(f.frame_type());
            match f {
                Frame::Hello(h) => {
                    let (version, capabilities) = negotiate(&h, CAP_ZERO_RUN).unwrap();
                    ram = h.blocks.iter().map(|b| vec![0xee; b.size as usize]).collect();
                    hello_table = Some(h.blocks);
                    reply = Some(Frame::HelloAck { version, capabilities, streams: 0 });
                    break; // the table must be set before the next frame is decoded
                }
                Frame::Discard { block, ranges } => {
                    seen.discards += ranges.len();
                    assert!(block < 2);
                }
                Frame::Page { block, offset, data, .. } => {
                    seen.pages += 1;
                    ram[block as usize][offset as usize..offset as usize + data.len()].copy_from_slice(data);
                }
                Frame::ZeroRun { block, offset, len, .. } => {
                    seen.zero_runs += 1;
                    ram[block as usize][offset as usize..(offset + len) as usize].fill(0);
                }
                Frame::Complete => {
                    s.set_nonblocking(false).unwrap();
                    write_frame(&mut s, &Frame::Complete).unwrap();
                    return (ram, seen);
                }
                Frame::Advise | Frame::Listen | Frame::Run => {}
                f => panic!("unexpected {f:?}"),
            }
        }
        if let Some(t) = hello_table.take() {
            dec.set_blocks(t);
        }
        if let Some(r) = reply.take() {
            let mut b = Vec::new();
            encode(&r, &mut b).unwrap();
            s.set_nonblocking(false).unwrap();
            s.write_all(&b).unwrap();
            s.set_nonblocking(true).unwrap();
            continue;
        }
        match dec.read_from(&mut s) {
            Ok(0) => panic!("{}", dec.at_eof()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
                assert!(poll(&mut fds, PollTimeout::from(20_000u16)).unwrap() > 0, "source went silent");
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn a_whole_migration_stream_over_tcp() {
    let t = table();
    let src_ram = source_ram(&t);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dst = thread::spawn(move || run_destination(l.accept().unwrap().0));
    let (t2, r2) = (t.clone(), src_ram.clone());
    run_source(TcpStream::connect(addr).unwrap(), t2, r2).unwrap();
    let (dst_ram, seen) = dst.join().unwrap();
    assert_eq!(dst_ram, src_ram, "destination RAM differs from the source");
    assert!(seen.zero_runs > 0 && seen.pages > 0);
    assert!(seen.discards > 0);
    let pos = |ft| seen.order.iter().position(|&x| x == ft).unwrap();
    assert!(pos(FrameType::Hello) < pos(FrameType::Advise));
    assert!(pos(FrameType::Advise) < pos(FrameType::Discard));
    assert!(pos(FrameType::Discard) < pos(FrameType::Listen));
    assert!(pos(FrameType::Listen) < pos(FrameType::Run));
    assert!(pos(FrameType::Run) < pos(FrameType::Page));
    assert_eq!(seen.order.last(), Some(&FrameType::Complete));
}
