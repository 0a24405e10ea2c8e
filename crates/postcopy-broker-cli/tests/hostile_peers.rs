//! Hostile and broken control-socket peers, with real processes: each tries to hurt the broker
//! or another peer, and the test checks that only the peer itself is harmed, that the broker's
//! resources stay bounded, and that every refusal says what the peer did wrong. The broker is a
//! `postcopy-broker serve` child where its fds, CPU time or log are looked at, and an in-process
//! fault loop elsewhere. docs/security.md has the table of these tests.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::clients::*;
use common::serve::Serve;
use postcopy_broker::client_id::ClientId;
use postcopy_broker::control::frame::{MAGIC, MAX_FDS};
use postcopy_broker::control::protocol::code;
use postcopy_broker::control::{ClientKind, ControlClient, ControlError, MappingSpec, Response};
use postcopy_broker::fault::{BrokerConfig, ControlLimits};
use postcopy_broker::source::MemorySource;
use postcopy_broker::stats::StatusReport;
use postcopy_broker::uffd::Uffd;
use postcopy_broker::{RamBlock, RamBlocks};

const PAGES: usize = 64;
const SIZE: u64 = PAGES as u64 * 4096;

fn block_arg() -> String {
    format!("ram:{}", SIZE)
}

/// A registration of `count`-th fake mapping (the broker only records the table; the uffd is
/// real and its ranges are nobody's).
fn mapping(i: u64) -> MappingSpec {
    MappingSpec { client_addr: 0x6000_0000_0000 + i * 0x10_0000, block: "ram".into(), offset: 0, len: 4096 }
}

fn register(c: &mut ControlClient, i: u64) -> Result<ClientId, ControlError> {
    let u = Uffd::open(0).unwrap();
    c.register("hostile", ClientKind::Shared, None, &[mapping(i)], u.as_fd())
}

fn remote(e: ControlError) -> (String, String) {
    match e {
        ControlError::Remote { code, message } => (code, message),
        other => panic!("not a refusal from the broker: {other}"),
    }
}

/// A pcb-client that maps the block from the broker and reads `pages`; checks every page.
fn served_client(sock: &std::path::Path, data: &[u8], script: &str, extra: &[&str]) -> usize {
    let mut p = Peer::spawn(&control_args(sock, script, extra));
    p.go();
    check_pages(&p.finish(), data, 4096)
}

#[test]
fn an_fd_flood_in_a_frame_that_never_ends_pins_at_most_one_frame_of_fds() {
    let data = content(PAGES, 4096, 3);
    let srv = Serve::start("fdflood", &data, &["--block", &block_arg()]);
    let base = srv.fds();
    let s = UnixStream::connect(&srv.sock).unwrap();
    // A frame header that announces 60000 bytes, then one byte per sendmsg, each with an fd.
    let mut head = MAGIC.to_vec();
    head.extend_from_slice(&60_000u32.to_le_bytes());
    s.try_clone().unwrap().write_all(&head).unwrap();
    let spare: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    let mut sent = 0;
    let mut peak = 0;
    for _ in 0..3200 {
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&[spare.as_raw_fd()])];
        let iov = [std::io::IoSlice::new(b" ")];
        let r = nix::sys::socket::sendmsg::<()>(
            s.as_raw_fd(),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            None,
        );
        if r.is_err() {
            break; // the broker closed the connection
        }
        sent += 1;
        peak = peak.max(srv.fds());
    }
    assert!(peak <= base + 1 + MAX_FDS + 1, "the broker held {peak} fds, {base} before the flood");
    let (code, message) = match ControlClient::from_stream(s).recv_response().unwrap().0 {
        Response::Error { code, message } => (code, message),
        other => panic!("{other:?}"),
    };
    assert_eq!(code, code::TOO_MANY_FDS, "{message} (after {sent} fds)");
    assert!(message.contains("unfinished frame"), "{message}");
    srv.wait_until("the broker closing the flood's fds", |s| s.fds() == base);
    assert_eq!(served_client(&srv.sock, &data, "touch:0-15", &[]), 16, "another peer is served");
}

#[test]
fn registrations_past_the_limits_are_refused_and_unregistering_frees_them() {
    let data = content(PAGES, 4096, 4);
    let srv = Serve::start(
        "reglimit",
        &data,
        &[
            "--block",
            &block_arg(),
            "--max-registrations-per-connection",
            "4",
            "--max-registrations-per-uid",
            "6",
        ],
    );
    let mut a = srv.client();
    let ids: Vec<ClientId> = (0..4).map(|i| register(&mut a, i).unwrap()).collect();
    let (code, message) = remote(register(&mut a, 4).unwrap_err());
    assert_eq!(code, code::REFUSED);
    assert!(message.contains("4 registrations, the limit per connection"), "{message}");
    let mut b = srv.client();
    register(&mut b, 5).unwrap();
    register(&mut b, 6).unwrap();
    let (_, message) = remote(register(&mut b, 7).unwrap_err());
    assert!(message.contains("uid 0 already holds 6 registrations, the limit per uid"), "{message}");
    // The connection stays usable after a refusal, and unregistering frees a place.
    a.unregister(ids[0]).unwrap();
    register(&mut b, 8).unwrap();
    assert_eq!(srv.status().clients.len(), 6);
}

#[test]
fn unregister_releases_the_uffd_and_pidfd_at_once() {
    let data = content(PAGES, 4096, 5);
    let srv = Serve::start("unreg", &data, &["--block", &block_arg()]);
    let base = srv.fds();
    let mut c = srv.client();
    let ids: Vec<ClientId> = (0..10).map(|i| register(&mut c, i).unwrap()).collect();
    // The connection, and a uffd and a pidfd per client (ours are closed already).
    assert_eq!(srv.fds(), base + 1 + 2 * ids.len());
    for id in &ids {
        c.unregister(*id).unwrap();
    }
    assert_eq!(srv.fds(), base + 1, "the replies come after the fds are closed");
    let (code, message) = remote(c.unregister(ids[0]).unwrap_err());
    assert_eq!(code, code::REFUSED);
    assert!(message.contains("no client"), "{message}");
    let st = srv.status();
    assert!(st.clients.is_empty() && st.departed.len() == ids.len(), "{st:?}");
    drop(c);
    srv.wait_until("the connection to close", |s| s.fds() == base);
}

#[test]
fn a_uid_past_its_connection_limit_is_refused_and_others_are_served() {
    let data = content(PAGES, 4096, 6);
    let srv = Serve::start("connlimit", &data, &["--block", &block_arg(), "--max-connections-per-uid", "3"]);
    let mut held: Vec<ControlClient> = (0..3).map(|_| srv.client()).collect();
    for c in &mut held {
        c.hello("held").unwrap();
    }
    let (code, message) = remote(srv.client().hello("one too many").unwrap_err());
    assert_eq!(code, code::REFUSED);
    assert!(message.contains("3 control connections open, the limit per uid"), "{message}");
    held.pop();
    let mut again = None;
    srv.wait_until("a place to free up", |s| {
        again = s.client().hello("again").ok();
        again.is_some()
    });
}

#[test]
fn accept_backs_off_when_the_broker_runs_out_of_fds_and_recovers() {
    let data = content(PAGES, 4096, 7);
    let srv = Serve::start("emfile", &data, &["--block", &block_arg()]);
    let base = srv.fds();
    srv.limit_fds(base as u64 + 2);
    // Two connections fit; the rest wait in the backlog while accept fails with EMFILE.
    let held: Vec<UnixStream> = (0..20).map(|_| UnixStream::connect(&srv.sock).unwrap()).collect();
    srv.wait_log("pausing accepts");
    let (cpu0, log0) = (srv.cpu_ticks(), srv.log_text().len());
    std::thread::sleep(Duration::from_secs(2));
    let (cpu1, log1) = (srv.cpu_ticks(), srv.log_text().len());
    // A loop retrying at once spins a core: about 200 ticks in 2 s. Generous bounds.
    assert!(cpu1 - cpu0 < 50, "the broker used {} ticks of CPU while out of fds", cpu1 - cpu0);
    assert!(log1 - log0 < 2048, "the broker logged {} bytes while out of fds", log1 - log0);
    assert_eq!(srv.log_text().matches("pausing accepts").count(), 1, "one warning per episode");
    drop(held);
    // Freed fds: the broker accepts again and answers.
    let st: StatusReport = srv.status();
    assert_eq!(st.total_pages, PAGES as u64);
    srv.wait_log("accepting again");
}

#[test]
fn status_answers_after_a_thousand_clients_came_and_went() {
    let sock = socket_path("status1000");
    let data = content(PAGES, 4096, 8);
    let limits = ControlLimits { registrations_per_connection: 2000, ..Default::default() };
    let config = BrokerConfig { control: Some(sock.clone()), limits, ..Default::default() };
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", SIZE).unwrap()).unwrap();
    let (_inc, h) = broker_with(blocks, Box::new(MemorySource::new(vec![(data, 4096)])), config);
    let mut c = ControlClient::connect(&sock).unwrap();
    for i in 0..1000 {
        let id = register(&mut c, i).unwrap();
        c.unregister(id).unwrap();
    }
    let st: StatusReport = serde_json::from_value(c.status().unwrap()).unwrap();
    assert_eq!(st.broker.clients_registered, 1000);
    assert_eq!(st.broker.clients_gone, 1000);
    assert_eq!(st.departed.len() as u64 + st.departed_omitted, 256, "the loop keeps the last 256");
    assert!(st.departed_omitted > 0 && !st.departed.is_empty());
    assert_eq!(st.departed.last().unwrap().id.0, 1000, "the newest are listed");
    // As many live clients as would never fit a frame: the live ones come first.
    for i in 0..250 {
        register(&mut c, i).unwrap();
    }
    let st: StatusReport = serde_json::from_value(c.status().unwrap()).unwrap();
    assert_eq!(st.clients.len() as u64 + st.clients_omitted, 250);
    assert!(st.clients_omitted > 0 && st.departed.is_empty(), "{} listed", st.clients.len());
    let out = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["status", "--control"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("clients not listed"));
    drop(c);
    h.stop().unwrap();
}

/// `pcb-hostile` as uid 65534.
fn hostile_as_nobody(sock: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pcb-hostile"))
        .arg("--control")
        .arg(sock)
        .args(args)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(out.status.success(), "pcb-hostile {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn grants_hold_for_private_registrations_and_firecracker_handshakes() {
    // The image holds block a (4 pages) then block b (4 pages); uid 65534 was given only a.
    let data = content(8, 4096, 9);
    let srv = Serve::start(
        "grants",
        &data,
        &[
            "--block",
            "a:16k",
            "--block",
            "b:16k",
            "--allow-uid",
            "0",
            "--allow-uid",
            "65534",
            "--grant",
            "65534=a",
        ],
    );
    std::os::unix::fs::chown(&srv.sock, Some(65534), Some(65534)).unwrap();
    let private = |offset: u64, len: u64| {
        hostile_as_nobody(
            &srv.sock,
            &["register", "--kind", "private", "--offset", &offset.to_string(), "--len", &len.to_string()],
        )
    };
    for (offset, len) in [(16384, 4096), (12288, 8192), (32768, 4096)] {
        let r = private(offset, len);
        assert_eq!(r["code"], code::NOT_ALLOWED, "private {offset:#x}+{len:#x}: {r}");
    }
    assert!(private(16384, 4096)["message"].as_str().unwrap().contains("block 'b'"));
    assert!(private(32768, 4096)["message"].as_str().unwrap().contains("past the RAM blocks"));
    assert!(private(4096, 8192)["registered"].is_u64(), "a range inside block a is served");
    let fc = |offset: u64| {
        hostile_as_nobody(&srv.sock, &["firecracker", "--offset", &offset.to_string(), "--wait-ms", "1000"])
    };
    let r = fc(16384);
    assert_eq!(r, serde_json::json!({"closed": true, "reply_bytes": 0}), "refused, nothing written back");
    let log = srv.wait_log("was not given block 'b'");
    assert!(log.contains("Firecracker handshake from pid") && log.contains("uid 65534 refused"), "{log}");
    assert_eq!(fc(0), serde_json::json!({"closed": false, "reply_bytes": 0}), "block a: served");
    // The shared path as before.
    let r = hostile_as_nobody(&srv.sock, &["register", "--block", "b"]);
    assert_eq!(r["code"], code::NOT_ALLOWED, "{r}");
}

#[test]
fn another_uids_client_cannot_be_unregistered() {
    let data = content(PAGES, 4096, 14);
    let srv = Serve::start(
        "otheruid",
        &data,
        &["--block", &block_arg(), "--allow-uid", "0", "--allow-uid", "65534"],
    );
    std::os::unix::fs::chown(&srv.sock, Some(65534), Some(65534)).unwrap();
    let mut c = srv.client();
    let id = register(&mut c, 0).unwrap();
    let r = hostile_as_nobody(&srv.sock, &["unregister", "--client", &id.to_string()]);
    assert_eq!(r["code"], code::NOT_ALLOWED, "{r}");
    assert!(r["message"].as_str().unwrap().contains("belongs to another user"), "{r}");
    assert_eq!(srv.status().clients.len(), 1, "still served");
    c.unregister(id).unwrap();
}

#[test]
fn without_blocks_the_image_is_granted_by_name() {
    let data = content(8, 4096, 10);
    let srv = Serve::start("imagegrant", &data, &["--allow-uid", "0", "--allow-uid", "65534"]);
    std::os::unix::fs::chown(&srv.sock, Some(65534), Some(65534)).unwrap();
    let r = hostile_as_nobody(&srv.sock, &["register", "--kind", "private"]);
    assert_eq!(r["code"], code::NOT_ALLOWED, "{r}");
    assert!(r["message"].as_str().unwrap().contains("--grant 65534=image"), "{r}");
    let r = hostile_as_nobody(&srv.sock, &["firecracker", "--wait-ms", "1000"]);
    assert_eq!(r["closed"], true, "{r}");
    drop(srv);
    let srv = Serve::start(
        "imagegrant2",
        &data,
        &["--allow-uid", "0", "--allow-uid", "65534", "--grant", "65534=image"],
    );
    std::os::unix::fs::chown(&srv.sock, Some(65534), Some(65534)).unwrap();
    let r = hostile_as_nobody(&srv.sock, &["register", "--kind", "private"]);
    assert!(r["registered"].is_u64(), "{r}");
    // A grant that names nothing the broker serves is refused at start.
    let out = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["serve", "--control", "/nonexistent/x.sock", "--image"])
        .arg(srv.image_path())
        .args(["--grant", "65534=ram"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only grant is 'image'"));
}

#[test]
fn a_refused_firecracker_handshake_gets_no_bytes_back_and_the_next_one_is_served() {
    let data = content(PAGES, 4096, 11);
    let srv = Serve::start("fcrefused", &data, &[]);
    let uffd = Uffd::open(0).unwrap();
    let bad: [&[u8]; 3] = [
        // A region outside the image.
        br#"[{"base_host_virt_addr":1048576,"size":4096,"offset":1073741824,"page_size":4096}]"#,
        // Not a region list.
        br#"[{"base_host_virt_addr":"x"}]"#,
        // A page size the broker does not serve.
        br#"[{"base_host_virt_addr":1048576,"size":4096,"offset":0,"page_size":1000}]"#,
    ];
    for (i, json) in bad.iter().enumerate() {
        let mut s = UnixStream::connect(&srv.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&[uffd.as_raw_fd()])];
        nix::sys::socket::sendmsg::<()>(
            s.as_raw_fd(),
            &[std::io::IoSlice::new(json)],
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        assert!(back.is_empty(), "case {i}: the broker wrote {back:?} to a Firecracker peer");
    }
    let log = srv.log_text();
    assert_eq!(log.matches("Firecracker handshake from pid").count(), 3, "{log}");
    assert!(log.contains("outside the image") && log.contains("bad JSON"), "{log}");
    let size = SIZE.to_string();
    let n = served_client(&srv.sock, &data, "touch:0-63", &["--firecracker", "--size", &size]);
    assert_eq!(n, PAGES);
}

#[test]
fn a_peer_in_a_pid_namespace_the_broker_cannot_see_is_served_and_its_exit_noticed() {
    let data = content(PAGES, 4096, 12);
    // The broker has a pid namespace of its own: our pids are invisible to it (SO_PEERCRED 0).
    // (A client in a new pid namespace of its own would not do: a parent namespace sees the pids
    // of its descendants, so SO_PEERCRED gives a broker outside the client's real pid.)
    let srv = Serve::start_in_pid_namespace("pidns", &data, &["--block", &block_arg()]);
    let base = srv.fds();
    let size = SIZE.to_string();
    let mut fc = Peer::spawn(&control_args(&srv.sock, "touch:0-31", &["--firecracker", "--size", &size]));
    let mut shared = Peer::spawn(&control_args(&srv.sock, "touch:32-63", &[]));
    fc.go();
    shared.go();
    assert_eq!(check_pages(&fc.finish(), &data, 4096), 32);
    assert_eq!(check_pages(&shared.finish(), &data, 4096), 32);
    srv.wait_until("both exits noticed", |s| {
        let st = s.status();
        st.clients.is_empty() && st.departed.len() == 2
    });
    let st = srv.status();
    for c in &st.departed {
        assert_eq!(c.pid, None, "the broker cannot see the pid: {c:?}");
        assert_eq!(c.stats.faults, 32, "{c:?}");
    }
    assert!(
        st.departed.iter().any(|c| c.kind == "private") && st.departed.iter().any(|c| c.kind == "shared")
    );
    srv.wait_until("their fds to be released", |s| s.fds() == base);
    // A `pid` member is meaningless from where the broker stands: refused with the reason.
    let mut c = srv.client();
    let u = Uffd::open(0).unwrap();
    let e =
        c.register("x", ClientKind::Shared, Some(std::process::id()), &[mapping(0)], u.as_fd()).unwrap_err();
    assert!(remote(e).1.contains("pid namespace"));
}

#[test]
fn a_pipelining_peer_does_not_stop_other_clients_faults() {
    let sock = socket_path("pipelining");
    let data = content(256, 4096, 13);
    let config = BrokerConfig { control: Some(sock.clone()), ..Default::default() };
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", 256 * 4096).unwrap()).unwrap();
    let (_inc, h) = broker_with(blocks, Box::new(MemorySource::new(vec![(data.clone(), 4096)])), config);
    let mut flood = Command::new(env!("CARGO_BIN_EXE_pcb-hostile"))
        .arg("--control")
        .arg(&sock)
        .args(["flood", "--op", "status", "--depth", "64"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the flood runs.
    let mut out = std::io::BufReader::new(flood.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(line.contains("flooding"), "{line}");
    assert_eq!(served_client(&sock, &data, "touch:0-255", &[]), 256);
    drop(flood.stdin.take());
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(flood.wait().unwrap().success());
    let r: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(r["wrong"], 0, "{r}");
    assert_eq!(r["sent"], r["replies"], "every pipelined request answered, in order: {r}");
    assert!(r["sent"].as_u64().unwrap() > 64, "{r}");
    h.stop().unwrap();
}

#[test]
fn a_forking_client_past_its_limit_has_its_child_held_and_is_served_on() {
    let data = content(PAGES, 4096, 15);
    // pcb-client registers on a connection of its own: its registration fills that connection.
    let srv = Serve::start(
        "forklimit",
        &data,
        &["--block", &block_arg(), "--max-registrations-per-connection", "1"],
    );
    let base = srv.fds();
    let mut p = Peer::spawn(&control_args(&srv.sock, "touch:0-7;fork;touch:0-7", &["--features", "fork"]));
    let pid = p.pid();
    p.go();
    let lines = p.finish_within(60);
    // The child's pages had arrived already: a held child reads them without a fault.
    assert!(lines.iter().any(|l| l["who"] == "child" && l["done"] == true), "{lines:?}");
    let (child, parent): (Vec<_>, Vec<_>) = lines.iter().cloned().partition(|l| l["who"] == "child");
    assert_eq!(check_pages(&child, &data, 4096), 8);
    assert_eq!(check_pages(&parent, &data, 4096), 16, "the parent is served before and after its fork");
    let log = srv.wait_log("child's userfaultfd is held unserved instead of adopted");
    assert!(log.contains(&format!("(pid {pid}, uid 0) forked")), "the refusal names the parent's pid: {log}");
    assert!(log.contains("the limit per connection"), "{log}");
    let st = srv.status();
    assert_eq!((st.broker.forks_refused, st.broker.clients_registered), (1, 1), "{:?}", st.broker);
    srv.wait_until("the parent's exit to release its fds", |s| s.fds() == base);
}

#[test]
fn forked_children_count_against_the_parents_limits_and_go_with_it() {
    let data = content(PAGES, 4096, 16);
    let srv =
        Serve::start("forkcount", &data, &["--block", &block_arg(), "--max-registrations-per-uid", "2"]);
    let base = srv.fds();
    let mut p = Peer::spawn(&control_args(&srv.sock, "fork;touch:0-3;wait", &["--features", "fork"]));
    p.go();
    let first = p.line();
    assert_eq!(first["who"], "child", "{first}");
    assert_eq!(check_pages(std::slice::from_ref(&first), &data, 4096), 4, "the adopted child is served");
    // Parent and child hold the uid's two registrations: a third is refused.
    let st = srv.status();
    assert_eq!(st.clients.len(), 2, "{:?}", st.clients);
    assert!(st.clients.iter().any(|c| c.name.ends_with("/fork")), "{:?}", st.clients);
    let (code, message) = remote(register(&mut srv.client(), 0).unwrap_err());
    assert_eq!(code, code::REFUSED);
    assert!(message.contains("uid 0 already holds 2 registrations"), "{message}");
    // Let the child end (one line at a time: the child must not read the parent's line).
    p.go();
    loop {
        let l = p.line();
        if l["who"] == "child" && l["done"] == true {
            break;
        }
    }
    p.go();
    let rest = p.finish_within(60);
    assert_eq!(check_pages(&rest, &data, 4096), 4);
    srv.wait_until("the child released with its parent", |s| s.status().clients.is_empty());
    let st = srv.status();
    let how: Vec<_> = st.departed.iter().map(|c| (c.name.ends_with("/fork"), c.departure.clone())).collect();
    assert!(how.contains(&(true, Some("released with its parent".into()))), "{how:?}");
    assert!(how.contains(&(false, Some("exited".into()))), "{how:?}");
    srv.wait_until("their fds to be released", |s| s.fds() == base);
}

#[test]
fn a_private_client_killed_with_sigkill_is_released_at_once() {
    let data = content(PAGES, 4096, 17);
    let srv = Serve::start("fckill", &data, &[]);
    let base = srv.fds();
    let size = SIZE.to_string();
    let mut p = Peer::spawn(&control_args(&srv.sock, "touch:0-15;wait", &["--firecracker", "--size", &size]));
    p.go();
    assert_eq!(check_pages(&[p.line()], &data, 4096), 16);
    let st = srv.status();
    assert_eq!(st.clients.len(), 1);
    assert_eq!(st.clients[0].kind, "private");
    assert!(srv.fds() > base, "the broker holds the client's fds");
    p.child.kill().unwrap(); // SIGKILL
    p.child.wait().unwrap();
    srv.wait_until("the kill to show in the status", |s| s.status().clients.is_empty());
    let st = srv.status();
    assert_eq!(st.broker.clients_gone, 1);
    let gone = st.departed.last().unwrap();
    assert_eq!((gone.kind.as_str(), gone.departure.as_deref()), ("private", Some("exited")), "{gone:?}");
    assert_eq!(gone.stats.faults, 16, "{gone:?}");
    srv.wait_until("its uffd, pidfd and connection to be released", |s| s.fds() == base);
    let out = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["status", "--control"])
        .arg(&srv.sock)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(exited)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn serve_incoming_has_the_same_limits() {
    use common::mig::{write_key, Creds, Dir};
    let dir = Dir::new("incoming-limits");
    write_key(&dir.path("key"));
    let creds = Creds::psk(&dir.path("key"));
    let ram = content(4096, 4096, 18); // 16 MiB
    std::fs::write(dir.path("img"), &ram).unwrap();
    let sock = dir.path("ctl.sock");
    let (mut serve, addr, _out) = common::mig::spawn_serve(
        &sock,
        &creds,
        "127.0.0.1:0",
        &["--max-registrations-per-uid", "1", "--max-connections-per-uid", "8"],
    );
    // A slow source keeps postcopy (and the control socket) up for about 16 s.
    let mut source = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["source", "--connect", &addr])
        .args(creds.args())
        .arg("--image")
        .arg(dir.path("img"))
        .args(["--block", "ram:16M", "--bandwidth", "1M"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    let mut a = loop {
        if let Ok(c) = ControlClient::connect(&sock) {
            break c;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the destination's control socket never came up");
        std::thread::sleep(Duration::from_millis(20));
    };
    register(&mut a, 0).unwrap();
    let (code, message) = remote(register(&mut ControlClient::connect(&sock).unwrap(), 1).unwrap_err());
    assert_eq!(code, code::REFUSED);
    assert!(message.contains("uid 0 already holds 1 registrations, the limit per uid"), "{message}");
    assert!(message.contains("serve --max-registrations-per-uid"), "{message}");
    let _ = source.kill();
    let _ = source.wait();
    let _ = serve.kill();
    let _ = serve.wait();
}
