//! Strangers on the migration port cannot stop the destination: connections that come first and
//! stay silent, send garbage, drip bytes or hold a connection open through a postcopy pause are
//! refused (logged with their address) while the real source migrates and resumes beside them.

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
