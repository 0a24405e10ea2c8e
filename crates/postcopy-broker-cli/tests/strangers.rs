//! Strangers on the migration port cannot stop the destination: connections that come first and
//! stay silent, send garbage, drip bytes or hold a connection open through a postcopy pause are
//! refused (logged with their address) while the real source migrates and resumes beside them;
//! nobody but the session's own source (same session id, same certificate) attaches an extra
//! background stream.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::mig::{contents, Creds, Dir};
use common::proxy::Proxy;
use postcopy_broker::migration::verify::{checksum, VerifyReport};

const BIN: &str = env!("CARGO_BIN_EXE_postcopy-broker");

fn source_cmd(addr: &str, creds: &Creds, image: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["source", "--connect", addr]).args(creds.args()).arg("--image").arg(image);
    c.args(["--block", "ram:32M"]).args(extra);
    c.env("RUST_LOG", "info").stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn end(mut child: Child) -> (bool, String) {
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap().success(), err)
}

/// Strangers of every kind against `addr`, until `stop`: `silent` connections that say nothing,
/// one that sends an HTTP request, one that drips a plausible frame header a byte at a time.
fn strangers(addr: &str, silent: usize, stop: &Arc<AtomicBool>) -> Vec<JoinHandle<()>> {
    let mut v = Vec::new();
    for _ in 0..silent {
        let s = TcpStream::connect(addr).unwrap();
        let stop = Arc::clone(stop);
        v.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(s);
        }));
    }
    let mut g = TcpStream::connect(addr).unwrap();
    v.push(std::thread::spawn(move || {
        let _ = g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let _ = g.read_to_end(&mut Vec::new());
    }));
    let mut d = TcpStream::connect(addr).unwrap();
    let stop = Arc::clone(stop);
    v.push(std::thread::spawn(move || {
        for b in b"PCB1\x23\x00\x00\x00\x30\x00\x00\x00".iter().cycle() {
            if stop.load(Ordering::SeqCst) || d.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }));
    v
}

#[test]
fn strangers_connecting_first_do_not_stop_the_migration() {
    let dir = Dir::new("strangers-first");
    let ram = contents(32 << 20, 4096, 0x57a4, 3);
    std::fs::write(dir.path("img"), &ram).unwrap();
    for creds in [Creds::tls(&dir.0), Creds::psk(&dir.path("key"))] {
        let dv = dir.path("d.json");
        let (serve, addr, _out) = common::mig::spawn_serve(
            &dir.path("ctl.sock"),
            &creds,
            "127.0.0.1:0",
            &["--verify-file", dv.to_str().unwrap()],
        );
        let stop = Arc::new(AtomicBool::new(false));
        let threads = strangers(&addr, 6, &stop);
        // The source comes last, while the strangers still hold their connections.
        std::thread::sleep(Duration::from_millis(300));
        let (ok, err) = end(source_cmd(&addr, &creds, &dir.path("img"), &[]).spawn().unwrap());
        assert!(ok, "{creds:?}: {err}");
        let (ok, derr) = end(serve);
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        assert!(ok, "{creds:?}: {derr}");
        assert!(derr.contains("refused") && derr.contains("127.0.0.1:"), "refusals are logged: {derr}");
        let got: Vec<String> =
            VerifyReport::read(&dv).unwrap().blocks.iter().map(|b| b.checksum.clone()).collect();
        assert_eq!(got, vec![format!("{:016x}", checksum(&ram))]);
    }
}

#[test]
fn strangers_holding_connections_during_a_postcopy_pause_do_not_stop_the_resume() {
    let dir = Dir::new("strangers-pause");
    let ram = contents(32 << 20, 4096, 0x9a05, 3);
    std::fs::write(dir.path("img"), &ram).unwrap();
    let creds = Creds::tls(&dir.0);
    let (dv, ds) = (dir.path("d.json"), dir.path("ds.json"));
    let (serve, addr, _out) = common::mig::spawn_serve(
        &dir.path("ctl.sock"),
        &creds,
        "127.0.0.1:0",
        &["--verify-file", dv.to_str().unwrap(), "--summary-json", ds.to_str().unwrap()],
    );
    // Cut after 8 MiB and keep the source out until the strangers are in.
    let proxy = Proxy::start(addr.parse().unwrap(), vec![8 << 20], true, None);
    let source =
        source_cmd(&proxy.addr(), &creds, &dir.path("img"), &["--bandwidth", "32M"]).spawn().unwrap();
    let t = std::time::Instant::now();
    while proxy.cuts_done() == 0 {
        assert!(t.elapsed() < Duration::from_secs(60), "no cut");
        std::thread::sleep(Duration::from_millis(10));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let threads = strangers(&addr, 8, &stop);
    std::thread::sleep(Duration::from_millis(300));
    proxy.set_refuse(false);
    let (ok, err) = end(source);
    assert!(ok, "{err}");
    let (ok, derr) = end(serve);
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    assert!(ok, "{derr}");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ds).unwrap()).unwrap();
    assert_eq!(s["resumes"], 1, "{s}");
    let got: Vec<String> =
        VerifyReport::read(&dv).unwrap().blocks.iter().map(|b| b.checksum.clone()).collect();
    assert_eq!(got, vec![format!("{:016x}", checksum(&ram))]);
}

/// One connection of a hand-made source to `addr`: the handshake under `sec`, then `hello`;
/// the destination's answer (HelloAck or Error) and the connection.
fn hello_to(
    addr: &str,
    sec: &postcopy_broker::migration::transport::Security,
    hello: postcopy_broker::migration::wire::Hello,
) -> (postcopy_broker::migration::transport::Transport, Result<u16, String>) {
    use postcopy_broker::migration::wire::{write_frame, Decoder, Frame, Limits};
    let table = hello.blocks.clone();
    let mut t = sec.connect(TcpStream::connect(addr).unwrap(), addr, Duration::from_secs(10)).unwrap();
    write_frame(&mut t, &Frame::Hello(hello)).unwrap();
    let mut dec = Decoder::with_blocks(Limits::default(), table);
    let answer = match dec.read_frame(&mut t).unwrap() {
        Frame::HelloAck { streams, .. } => Ok(streams),
        Frame::Error { text } => Err(text.to_string()),
        f => panic!("unexpected answer {f:?}"),
    };
    (t, answer)
}

#[test]
fn neither_another_session_nor_another_certificate_can_attach_a_stream() {
    use postcopy_broker::migration::transport::throwaway::{Leaf, ThrowawayCa};
    use postcopy_broker::migration::transport::tls::TlsSetup;
    use postcopy_broker::migration::transport::Security;
    use postcopy_broker::migration::wire::{
        write_frame, BlockInfo, BlockTable, Channel, Frame, Hello, CAP_ALL, PROTOCOL_VERSION,
    };
    let dir = Dir::new("strangers-streams");
    let ca = ThrowawayCa::new("streams CA").unwrap();
    let tls = dir.path("tls");
    ca.write_dir(&tls, &["127.0.0.1"]).unwrap();
    // A trusted peer of the same CA, but not the session's source.
    let other = dir.path("other");
    std::fs::create_dir_all(&other).unwrap();
    ca.write_ca(&other).unwrap();
    ca.issue(&other, Leaf::Client, &["127.0.0.1"]).unwrap();
    let creds = Creds::Tls(tls.clone());
    let (mut serve, addr, _out) =
        common::mig::spawn_serve(&dir.path("ctl.sock"), &creds, "127.0.0.1:0", &["--max-streams", "3"]);
    let ours = Security::tls(TlsSetup::source(&tls, None).unwrap());
    let theirs = Security::tls(TlsSetup::source(&other, None).unwrap());
    let blocks = BlockTable::new(vec![BlockInfo::new("ram", 4 << 20, 4096)]).unwrap();
    let hello = |channel, session_id| Hello {
        version: PROTOCOL_VERSION,
        capabilities: CAP_ALL,
        channel,
        session_id,
        resume: false,
        blocks: blocks.clone(),
    };
    let session = 0x5e55_1011_0000_0001;
    let (stray, a) = hello_to(&addr, &ours, hello(Channel::Stream, session));
    let why = a.unwrap_err();
    assert!(why.contains("the main connection comes first"), "a stream before any session: {why}");
    drop(stray);
    let (mut main, a) = hello_to(&addr, &ours, hello(Channel::Main, session));
    assert_eq!(a, Ok(3), "the destination takes 3 background connections");
    let (_urgent, a) = hello_to(&addr, &ours, hello(Channel::Urgent, session));
    assert_eq!(a, Ok(3));
    write_frame(&mut main, &Frame::Streams { count: 2 }).unwrap();
    let (_s, a) = hello_to(&addr, &ours, hello(Channel::Stream, session + 1));
    let why = a.unwrap_err();
    assert!(why.contains("takes no other"), "a stream of another session: {why}");
    let (_s, a) = hello_to(&addr, &theirs, hello(Channel::Stream, session));
    let why = a.unwrap_err();
    assert!(why.contains("another certificate"), "the right session id from another peer: {why}");
    let (_s1, a) = hello_to(&addr, &ours, hello(Channel::Stream, session));
    assert_eq!(a, Ok(3), "the session's own stream is taken");
    let (_s2, a) = hello_to(&addr, &ours, hello(Channel::Stream, session));
    assert_eq!(a, Ok(3));
    // The hand-made source stops here: the destination gives up the unstarted session.
    drop(main);
    let mut derr = String::new();
    serve.stderr.take().unwrap().read_to_string(&mut derr).unwrap();
    assert!(!serve.wait().unwrap().success());
    assert!(derr.contains("3 background streams attached"), "{derr}");
    assert!(
        derr.contains("takes no other") && derr.contains("another certificate"),
        "refusals logged: {derr}"
    );
}
