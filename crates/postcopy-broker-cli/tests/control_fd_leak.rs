//! A burst of bad control connections, each sending fds, leaves no fd behind in the broker.
//! Its own test binary (one process, one test) so no other test opens or closes fds meanwhile.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::control_server::{start, Event};
use postcopy_broker::control::frame::{encode, MAGIC};
use postcopy_broker::control::{ClientKind, ControlClient};
use postcopy_broker::uffd::Uffd;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn send_fds(s: &UnixStream, data: &[u8], fds: &[RawFd]) {
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(fds)];
    let iov = [std::io::IoSlice::new(data)];
    nix::sys::socket::sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, nix::sys::socket::MsgFlags::empty(), None)
        .unwrap();
}

#[test]
fn bad_connections_leak_no_fds() {
    let srv = start("leak", vec![0], vec![("ram0".into(), 8192, 1)]);
    let uffd = Uffd::open(0).unwrap();
    let extra: Vec<OwnedFd> = (0..12).map(|_| std::fs::File::open("/dev/null").unwrap().into()).collect();
    let x: Vec<RawFd> = extra.iter().map(|f| f.as_raw_fd()).collect();
    // Warm up: one good session (the server thread's lazily made state exists afterwards).
    {
        let mut c = ControlClient::connect(&srv.path).unwrap();
        c.register("warm", ClientKind::Shared, None, &[], uffd.as_fd()).unwrap();
        drop(c.get_blocks(None).unwrap());
    }
    srv.wait_for(|e| matches!(e, Event::Closed));
    let before = open_fds();

    let status = encode(br#"{"op":"status"}"#).unwrap();
    let reg = encode(br#"{"op":"register","name":"r","kind":"shared","mappings":[]}"#).unwrap();
    let mut big = MAGIC.to_vec();
    big.extend_from_slice(&u32::MAX.to_le_bytes());
    let fc = br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]"#;
    // (bytes, fds, shut down our write side); a Firecracker peer gets no reply written back.
    let cases: Vec<(Vec<u8>, Vec<RawFd>, bool)> = vec![
        (b"garbage!".to_vec(), x[..3].to_vec(), false),
        (status.clone(), x[..2].to_vec(), false),
        (status.clone(), x.clone(), false), // 12 fds: the kernel truncates to 8
        (reg.clone(), x[..2].to_vec(), false),
        (big, x[..4].to_vec(), false),
        (b"{\"op\"".to_vec(), x[..1].to_vec(), false),
        (encode(b"{bad json").unwrap(), x[..5].to_vec(), false),
        (fc.to_vec(), x[..3].to_vec(), false), // Firecracker with 3 fds
        (status[..9].to_vec(), x[..2].to_vec(), true), // truncated at end of file
        (fc[..20].to_vec(), x[..1].to_vec(), true), // truncated handshake
    ];
    for round in 0..5 {
        for (i, (bytes, fds, shut)) in cases.iter().enumerate() {
            let mut s = UnixStream::connect(&srv.path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            send_fds(&s, bytes, fds);
            if *shut {
                s.shutdown(std::net::Shutdown::Write).unwrap();
            }
            match srv.wait_for(|e| matches!(e, Event::Failed { .. } | Event::Closed)) {
                Event::Failed { .. } => {}
                other => panic!("round {round} case {i}: {other:?}"),
            }
            let mut reply = Vec::new();
            let _ = s.read_to_end(&mut reply);
            if bytes.starts_with(b"[") {
                assert!(reply.is_empty(), "round {round} case {i}: Firecracker gets no reply");
            } else {
                assert!(reply.starts_with(b"PCB1"), "round {round} case {i}: an error reply");
            }
        }
        // A good Firecracker handshake followed by a good frame-protocol session.
        let mut s = UnixStream::connect(&srv.path).unwrap();
        send_fds(&s, fc, &[uffd.as_raw_fd()]);
        srv.wait_for(|e| matches!(e, Event::Firecracker { .. }));
        s.write_all(b" ").unwrap();
        drop(s);
        srv.wait_for(|e| matches!(e, Event::Closed));
    }
    drop(extra);
    assert_eq!(open_fds(), before - 12, "fds leaked by bad connections");
}
