//! Control socket end to end: a real `ControlListener` on a temp path, real Unix sockets, real
//! userfaultfds and memfds. The server side is a thread polling `ControlConn`s (tests/common).

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use common::control_server::{self as cs, read_reply, start, temp_path, Event};
use postcopy_broker::client_id::ClientId;
use postcopy_broker::control::frame::{encode, MAGIC, MAX_PAYLOAD};
use postcopy_broker::control::protocol::code;
use postcopy_broker::control::{
    send_firecracker_handshake, ClientKind, ControlClient, ControlError, ControlListener, FcRegion,
    MappingSpec, Request, Response, PROTOCOL_VERSION,
};
use postcopy_broker::uffd::Uffd;

fn root_only() -> Vec<u32> {
    vec![0]
}

fn raw(path: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Send `data` with `fds` attached in one sendmsg (any number of fds).
fn send_fds(s: &UnixStream, data: &[u8], fds: &[RawFd]) {
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(fds)];
    let iov = [std::io::IoSlice::new(data)];
    let cm: &[nix::sys::socket::ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    nix::sys::socket::sendmsg::<()>(s.as_raw_fd(), &iov, cm, nix::sys::socket::MsgFlags::empty(), None)
        .unwrap();
}

fn expect_failed(srv: &cs::TestServer, want: &str) -> String {
    match srv.wait_for(|e| matches!(e, Event::Failed { .. } | Event::Closed)) {
        Event::Failed { code, text } => {
            assert_eq!(code, Some(want), "{text}");
            text
        }
        other => panic!("expected a failure with {want}, got {other:?}"),
    }
}

fn reply_code(srv: &cs::TestServer, s: &mut UnixStream) -> String {
    let v = read_reply(&srv.path, s);
    assert_eq!(v["op"], "error", "{v}");
    // After an error the broker closes the connection.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    v["code"].as_str().unwrap().to_string()
}

#[test]
fn socket_is_0600_and_stale_files_are_handled() {
    let path = temp_path("mode");
    // A stale socket left behind by a dead broker is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let l = ControlListener::bind(&path, root_only()).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    assert_eq!(l.path(), path.as_path());
    assert_eq!(l.allowed_uids(), &[0]);
    // A live socket is not stolen.
    assert!(matches!(ControlListener::bind(&path, root_only()), Err(ControlError::Io { .. })));
    drop(l);
    assert!(!path.exists(), "the listener removes its socket file");
    // A regular file is never replaced.
    std::fs::write(&path, b"precious").unwrap();
    assert!(matches!(ControlListener::bind(&path, root_only()), Err(ControlError::Invalid(_))));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
    let d = ControlListener::default_allowed_uids();
    assert!(d.contains(&0) && d.contains(&nix::unistd::geteuid().as_raw()));
}

#[test]
fn register_passes_a_real_userfaultfd() {
    let srv = start("register", root_only(), Vec::new());
    let mut c = ControlClient::connect(&srv.path).unwrap();
    match srv.event() {
        Event::Accepted { creds, pidfd_ok } => {
            assert_eq!(creds.pid, std::process::id() as i32);
            assert_eq!(creds.uid, 0);
            assert!(pidfd_ok);
        }
        other => panic!("{other:?}"),
    }
    let hello = c.hello("test-peer").unwrap();
    assert_eq!(hello.version, PROTOCOL_VERSION);
    assert!(!hello.broker_version.is_empty());
    let uffd = Uffd::open(0).unwrap();
    let mappings = vec![
        MappingSpec { client_addr: 0x7f00_0000_0000, block: "ram0".into(), offset: 0, len: 1 << 20 },
        MappingSpec { client_addr: 0x7f00_1000_0000, block: "ram0".into(), offset: 0, len: 4096 },
    ];
    let id = c.register("vhost-blk", ClientKind::Shared, Some(42), &mappings, uffd.as_fd()).unwrap();
    assert_eq!(id, ClientId(1));
    match srv.wait_for(|e| matches!(e, Event::Register { .. })) {
        Event::Register { name, mappings: got, fd_link, fd_num } => {
            assert_eq!(name, "vhost-blk");
            assert_eq!(got, mappings);
            assert_eq!(fd_link, "anon_inode:[userfaultfd]");
            // The server received its own copy, not our fd number.
            assert_ne!(fd_num, uffd.as_raw_fd());
        }
        _ => unreachable!(),
    }
    let id2 = c.register("vmm", ClientKind::Private, None, &[], uffd.as_fd()).unwrap();
    assert_eq!(id2, ClientId(2));
    c.unregister(id).unwrap();
    assert_eq!(c.status().unwrap(), serde_json::json!({"clients": 2}));
    drop(c);
    srv.wait_for(|e| matches!(e, Event::Closed));
}

#[test]
fn get_blocks_returns_memfds_that_map() {
    // Ten blocks: more than one reply can carry fds for, so the client asks again by name.
    let blocks: Vec<(String, usize, u8)> =
        (0..10).map(|i| (format!("ram{i}"), 8192 * (i + 1), 0xa0 + i as u8)).collect();
    let srv = start("blocks", root_only(), blocks.clone());
    let mut c = ControlClient::connect(&srv.path).unwrap();
    let got = c.get_blocks(None).unwrap();
    assert_eq!(got.len(), 10);
    for ((info, fd), (name, size, byte)) in got.iter().zip(&blocks) {
        assert_eq!(&info.name, name);
        assert_eq!(info.size, *size as u64);
        assert_eq!(info.page_size, 4096);
        let fd = fd.as_ref().expect("every block comes with its memfd");
        assert!(cs::fd_link(fd.as_fd()).starts_with("/memfd:"));
        // SAFETY: mapping a memfd of `size` bytes shared read-only; unmapped below.
        let p = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(*size).unwrap(),
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_SHARED,
                fd,
                0,
            )
            .unwrap()
        };
        // SAFETY: p maps `size` readable bytes.
        let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr() as *const u8, *size) };
        assert!(bytes.iter().all(|b| b == byte));
        // SAFETY: unmapping what we mapped.
        unsafe { nix::sys::mman::munmap(p, *size).unwrap() };
    }
    let some = c.get_blocks(Some(vec!["ram3".into()])).unwrap();
    assert_eq!(some.len(), 1);
    assert_eq!(some[0].0.name, "ram3");
    assert!(some[0].1.is_some());
}

#[test]
fn firecracker_handshake_is_accepted() {
    let srv = start("fc", root_only(), Vec::new());
    let uffd = Uffd::open(0).unwrap();
    let regions = vec![
        FcRegion { base_host_virt_addr: 0x7f12_3400_0000, size: 128 << 20, offset: 0, page_size: 4096 },
        FcRegion {
            base_host_virt_addr: 0x7f13_0000_0000,
            size: 64 << 20,
            offset: 128 << 20,
            page_size: 4096,
        },
    ];
    let s = send_firecracker_handshake(&srv.path, &regions, uffd.as_fd()).unwrap();
    match srv.wait_for(|e| matches!(e, Event::Firecracker { .. })) {
        Event::Firecracker { regions: got, fd_link } => {
            assert_eq!(got, regions);
            assert_eq!(fd_link, "anon_inode:[userfaultfd]");
        }
        _ => unreachable!(),
    }
    drop(s);
    srv.wait_for(|e| matches!(e, Event::Closed));

    // Firecracker's exact JSON (deprecated page_size_kib only), arriving in two pieces.
    let json =
        br#"[{"base_host_virt_addr":139637976727552,"size":268435456,"offset":0,"page_size_kib":4096}]"#;
    let mut s = raw(&srv.path);
    send_fds(&s, &json[..30], &[uffd.as_raw_fd()]);
    s.write_all(&json[30..]).unwrap();
    match srv.wait_for(|e| matches!(e, Event::Firecracker { .. })) {
        Event::Firecracker { regions, .. } => {
            assert_eq!(regions[0].page_size, 4096);
            assert_eq!(regions[0].size, 268435456);
        }
        _ => unreachable!(),
    }
    // Anything after the handshake is a protocol error. Firecracker reads nothing back, so the
    // connection is closed without a PCB1 frame written onto it.
    s.write_all(b"{\"more\":1}").unwrap();
    expect_failed(&srv, code::BAD_FRAME);
    assert_closed_without_reply(&mut s);

    // A handshake without its uffd.
    let mut s = raw(&srv.path);
    s.write_all(json).unwrap();
    expect_failed(&srv, code::MISSING_FD);
    assert_closed_without_reply(&mut s);
}

fn assert_closed_without_reply(s: &mut UnixStream) {
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "a Firecracker peer got bytes back: {rest:?}");
}

#[test]
fn bad_messages_get_typed_errors_and_the_broker_serves_on() {
    let srv = start("bad", root_only(), Vec::new());
    let uffd = Uffd::open(0).unwrap();

    // Garbage.
    let mut s = raw(&srv.path);
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(reply_code(&srv, &mut s), code::BAD_FRAME);
    assert!(expect_failed(&srv, code::BAD_FRAME).contains("GET"));

    // Truncated: half a frame, then end of file (our write side shut down, we still read).
    let mut s = raw(&srv.path);
    let f = encode(br#"{"op":"status"}"#).unwrap();
    s.write_all(&f[..12]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(reply_code(&srv, &mut s), code::BAD_FRAME);
    assert!(expect_failed(&srv, code::BAD_FRAME).contains("truncated"));

    // Oversized: the header alone is refused.
    let mut s = raw(&srv.path);
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
    s.write_all(&h).unwrap();
    assert_eq!(reply_code(&srv, &mut s), code::TOO_LARGE);
    expect_failed(&srv, code::TOO_LARGE);

    // Bad JSON, unknown op, wrong field types.
    for (payload, want) in [
        (&b"{not json"[..], code::BAD_JSON),
        (br#"{"op":"reboot"}"#, code::UNKNOWN_OP),
        (br#"{"op":"unregister","client":"one"}"#, code::BAD_JSON),
    ] {
        let mut s = raw(&srv.path);
        s.write_all(&encode(payload).unwrap()).unwrap();
        assert_eq!(reply_code(&srv, &mut s), want);
        expect_failed(&srv, want);
    }

    // Fd counts: register without its uffd, with two, status with one, a frame with 9.
    let reg = serde_json::to_vec(&Request::Register {
        name: "x".into(),
        kind: ClientKind::Shared,
        pid: None,
        mappings: Vec::new(),
        vcpu_tids: Vec::new(),
    })
    .unwrap();
    let status = encode(br#"{"op":"status"}"#).unwrap();
    let u = uffd.as_raw_fd();
    for (frame, fds, want) in [
        (encode(&reg).unwrap(), vec![], code::MISSING_FD),
        (encode(&reg).unwrap(), vec![u, u], code::TOO_MANY_FDS),
        (status.clone(), vec![u], code::TOO_MANY_FDS),
        (status.clone(), vec![u; 9], code::TOO_MANY_FDS),
    ] {
        let mut s = raw(&srv.path);
        send_fds(&s, &frame, &fds);
        assert_eq!(reply_code(&srv, &mut s), want, "{} fds", fds.len());
        expect_failed(&srv, want);
    }

    // The client library reports the broker's error reply as Remote.
    let mut c = ControlClient::connect(&srv.path).unwrap();
    c.send_payload(br#"{"op":"nope"}"#, &[]).unwrap();
    let (r, _) = c.recv_response().unwrap();
    assert!(matches!(r, Response::Error { code: ref c, .. } if c == code::UNKNOWN_OP), "{r:?}");
    expect_failed(&srv, code::UNKNOWN_OP);

    // A good request followed by garbage in the same write: the request is served first.
    let mut s = raw(&srv.path);
    let mut bytes = status.clone();
    bytes.extend_from_slice(b"XYZW");
    s.write_all(&bytes).unwrap();
    assert_eq!(read_reply(&srv.path, &mut s)["op"], "status");
    assert_eq!(reply_code(&srv, &mut s), code::BAD_FRAME);
    expect_failed(&srv, code::BAD_FRAME);

    // Through all that the broker kept serving.
    let mut c = ControlClient::connect(&srv.path).unwrap();
    c.hello("after").unwrap();
    assert_eq!(c.register("ok", ClientKind::Private, None, &[], uffd.as_fd()).unwrap(), ClientId(1));
    // And a version mismatch is refused with `version`.
    let (r, _) = c.request(&Request::Hello { version: 99, name: "future".into() }, &[]).unwrap();
    assert!(matches!(r, Response::Error { code: ref c, .. } if c == code::VERSION), "{r:?}");
}

#[test]
fn disallowed_uid_is_refused() {
    // We run as root; an allowed list without 0 refuses us.
    assert_eq!(nix::unistd::geteuid().as_raw(), 0, "the tests run as root");
    let srv = start("refused", vec![54321], Vec::new());
    let mut s = raw(&srv.path);
    match srv.event() {
        Event::Refused { uid } => assert_eq!(uid, 0),
        other => panic!("{other:?}"),
    }
    assert_eq!(reply_code(&srv, &mut s), code::NOT_ALLOWED);
    let mut c = ControlClient::connect(&srv.path).unwrap();
    match c.hello("me") {
        Err(ControlError::Remote { code: c, message }) => {
            assert_eq!(c, code::NOT_ALLOWED);
            assert!(message.contains("uid 0"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn replies_never_block_on_a_peer_that_does_not_read() {
    let path = temp_path("noread");
    let l = ControlListener::bind(&path, root_only()).unwrap();
    let _peer = UnixStream::connect(&path).unwrap();
    let mut conn = loop {
        if let Some(c) = l.accept().unwrap() {
            break c;
        }
    };
    let big = Response::Status { report: serde_json::Value::String("x".repeat(60_000)) };
    let mut sent = 0;
    let err = loop {
        match conn.send(&big, &[]) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 10_000, "the socket buffer never filled");
    };
    assert!(matches!(err, ControlError::PeerNotReading), "{err:?}");
    // Too many fds for one reply is refused locally.
    let uffd = Uffd::open(0).unwrap();
    assert!(matches!(conn.send(&Response::Ok, &[uffd.as_fd(); 9]), Err(ControlError::Invalid(_))));
}
