//! The daemon as systemd runs it: `systemd-socket-activate` (systemd's own tool, doing what a
//! .socket unit does) creates the control socket, passes it as fd 3 with LISTEN_FDS/LISTEN_PID/
//! LISTEN_FDNAMES and starts `serve` on the first connection; a pcb-client registers through
//! the inherited socket and faults every page in; a notify socket of the test (abstract, as
//! systemd's) receives READY=1, STATUS= progress and STOPPING=1. LISTEN_* meant for another
//! process are ignored.

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::clients::{content, control_args, Peer};
use common::serve::temp;

const PAGES: usize = 16;

/// Receive notifications until one contains `want`; returns all received so far.
fn until(sock: &UnixDatagram, got: &mut Vec<String>, want: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while !got.iter().any(|m| m.contains(want)) {
        assert!(Instant::now() < end, "no {want:?} among the notifications {got:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[test]
fn socket_activated_broker_serves_through_the_inherited_socket_and_notifies() {
    let sock = temp("activated.sock");
    let image = temp("activated.img");
    let log = temp("activated.log");
    let data = content(PAGES, 4096, 3);
    std::fs::write(&image, &data).unwrap();
    let name = format!("pcb-notify-{}", std::process::id());
    let notify = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut broker = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(&sock)
        .arg("--fdname=control")
        .arg(format!("--setenv=NOTIFY_SOCKET=@{name}"))
        .arg("--setenv=RUST_LOG=info")
        .arg(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["serve", "--no-background", "--block", "ram:64K", "--image"])
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("systemd-socket-activate (scripts/setup.sh installs systemd)");
    let end = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < end, "systemd-socket-activate did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the broker, which then accepts it on the inherited socket.
    let mut c = Peer::spawn(&control_args(
        &sock,
        &format!("touch:0-{}", PAGES - 1),
        &["--block", "ram", "--no-wait"],
    ));
    assert!(c.ready["client"].as_u64().unwrap() > 0, "registered: {}", c.ready);
    let lines = c.finish_within(60);
    for (p, v) in lines[0]["pages"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            v["fnv"].as_str().unwrap(),
            common::clients::fnv(&data[p * 4096..(p + 1) * 4096]),
            "page {p}"
        );
    }
    let mut got = Vec::new();
    until(&notify, &mut got, "READY=1");
    until(&notify, &mut got, &format!("STATUS=postcopy: {PAGES}/{PAGES} pages received (100.0%)"));
    until(&notify, &mut got, "STOPPING=1");
    let ready = got.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(ready.contains(&format!("STATUS=postcopy: 0/{PAGES} pages received")), "{ready:?}");
    let end = Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Some(st) = broker.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "the broker did not end after every page arrived");
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "broker: {st}\n{text}");
    assert!(text.contains("inherited from the service manager"), "{text}");
    assert!(sock.exists(), "the socket file is the service manager's: the broker leaves it");
    for p in [&sock, &image, &log] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn listen_fds_for_another_process_are_ignored() {
    let sock = temp("not-activated.sock");
    let log = temp("not-activated.log");
    let image = temp("not-activated.img");
    std::fs::write(&image, content(4, 4096, 1)).unwrap();
    let mut broker = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["serve", "--no-background", "--block", "ram:16K", "--image"])
        .arg(&image)
        .arg("--control")
        .arg(&sock)
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        if t.contains("serving on") {
            break t;
        }
        assert!(broker.try_wait().unwrap().is_none(), "serve exited: {t}");
        assert!(Instant::now() < end, "serve did not start: {t}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(text.contains("listening (mode 0600"), "it bound its own socket: {text}");
    assert!(!text.contains("inherited"), "{text}");
    let st = postcopy_broker::control::ControlClient::connect(&sock).unwrap().status().unwrap();
    assert_eq!(st["total_pages"], 4);
    // SAFETY: kill(2) of the broker this test started.
    unsafe { libc::kill(broker.id() as i32, libc::SIGTERM) };
    assert!(broker.wait().unwrap().success());
    for p in [&sock, &image, &log] {
        let _ = std::fs::remove_file(p);
    }
}
