//! A control peer in another process: its credentials are the child's, its userfaultfd arrives,
//! and the pidfd from `ControlConn::pidfd` turns readable when the child is killed.
//!
//! The child is this test executable run again (a separate process started with exec, not a
//! fork of the test harness) with `PCB_PEER_SOCKET` set: it then plays the peer.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Stdio};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use postcopy_broker::control::{
    ClientKind, ControlClient, ControlError, ControlListener, Incoming, MappingSpec, Request, Response,
};
use postcopy_broker::uffd::Uffd;

const ENV: &str = "PCB_PEER_SOCKET";

fn readable(fd: std::os::fd::BorrowedFd<'_>, timeout_ms: u16) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::from(timeout_ms)).unwrap() > 0
}

/// The child's role: register a uffd, report the id, then wait to be killed.
fn peer(path: &str) {
    let mut c = ControlClient::connect(path).unwrap();
    c.hello("child-peer").unwrap();
    let uffd = Uffd::open(0).unwrap();
    let m = [MappingSpec { client_addr: 0x10000, block: "ram0".into(), offset: 0, len: 4096 }];
    let id = c.register("child", ClientKind::Shared, None, &m, uffd.as_fd()).unwrap();
    // Straight to the stdout pipe: the test harness captures `println!`.
    let mut out = std::fs::OpenOptions::new().write(true).open("/dev/stdout").unwrap();
    writeln!(out, "registered {id}").unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line); // blocks until killed
}

#[test]
fn peer_in_another_process() {
    if let Ok(path) = std::env::var(ENV) {
        peer(&path);
        return;
    }
    let path = std::env::temp_dir().join(format!("pcb-test-{}-peerproc.sock", std::process::id()));
    let listener = ControlListener::bind(&path, vec![0]).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "peer_in_another_process", "--nocapture", "--test-threads=1"])
        .env(ENV, &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(readable(listener.as_fd(), 20_000), "the child never connected");
    let mut conn = listener.accept().unwrap().expect("a pending connection");
    assert_eq!(conn.creds().pid, child.id() as i32);
    assert_eq!(conn.creds().uid, 0);
    let pidfd = conn.pidfd().unwrap();
    assert!(!readable(pidfd.as_fd(), 0), "the child is alive");

    let mut registered = false;
    while !registered {
        assert!(readable(conn.as_fd(), 20_000), "the child sent nothing");
        for m in conn.read_ready().unwrap() {
            match m {
                Incoming::Request(Request::Hello { version, .. }, _) => {
                    conn.send(&Response::hello_reply(version), &[]).unwrap()
                }
                Incoming::Request(Request::Register { name, mappings, .. }, fds) => {
                    assert_eq!(name, "child");
                    assert_eq!(mappings.len(), 1);
                    assert_eq!(fds.len(), 1);
                    let link = std::fs::read_link(format!("/proc/self/fd/{}", fds[0].as_raw_fd())).unwrap();
                    assert_eq!(link.to_str().unwrap(), "anon_inode:[userfaultfd]");
                    conn.send(&Response::Registered { client: 7 }, &[]).unwrap();
                    registered = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the child ended without reporting");
        // The harness prints "test <name> ... " without a newline before the test runs.
        if let Some(i) = line.find("registered ") {
            line = line[i..].trim().to_string();
            break;
        }
    }
    assert_eq!(line, "registered 7");

    child.kill().unwrap();
    child.wait().unwrap();
    assert!(readable(pidfd.as_fd(), 20_000), "the pidfd reports the exit");
    assert!(readable(conn.as_fd(), 20_000));
    assert!(matches!(conn.read_ready(), Err(ControlError::PeerClosed)));
}
