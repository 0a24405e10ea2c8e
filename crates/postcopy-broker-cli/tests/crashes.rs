//! Crashed processes around a migration: clients killed with SIGKILL at several points (one
//! while its fault is outstanding: the broker-side view of a backend that dies mid-request), a
//! source that dies before postcopy starts, a destination restarted before postcopy starts, and
//! a source that never comes back during postcopy (the destination gives up after its resume
//! timeout). docs/recovery.md says what is and is not recoverable.

mod common;

use std::io::{BufReader, Read};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::clients::{fnv, Peer};
use common::mig::{contents, Creds, Dir};
use common::proxy::Proxy;
use postcopy_broker::fault::BrokerConfig;
use postcopy_broker::migration::destination::{verify_report, Destination, DestinationOptions, Progress};
use postcopy_broker::migration::verify::{checksum, VerifyReport};

const BIN: &str = env!("CARGO_BIN_EXE_postcopy-broker");

fn source_cmd(addr: &str, key: &Creds, image: &Path, block: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["source", "--connect", addr]).args(key.args()).arg("--image").arg(image);
    c.args(["--block", block]).args(extra);
    c.env("RUST_LOG", "info").stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn serve_cmd(
    dir: &Dir,
    key: &Creds,
    listen: &str,
    extra: &[&str],
) -> (Child, String, BufReader<std::process::ChildStdout>) {
    common::mig::spawn_serve(&dir.path("control.sock"), key, listen, extra)
}

fn end(mut child: Child) -> (bool, String) {
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap().success(), err)
}

fn kill_pid(pid: u32) {
    // SAFETY: kill(2) of a process this test spawned.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn client(sock: &Path, script: &str) -> Peer {
    let a = ["--control", sock.to_str().unwrap(), "--block", "ram", "--script", script];
    Peer::spawn(&a.map(String::from))
}

fn sum(d: &[u8]) -> String {
    format!("{:016x}", checksum(d))
}

/// Three clients are killed with SIGKILL — one registered but idle, one between two steps of its
/// script, one blocked on a fault whose request is outstanding while the connection to the
/// source is down — and two others run to the end; the migration resumes and completes and the
/// RAM equals the source plus the survivors' writes.
#[test]
fn clients_killed_with_sigkill_at_any_point_do_not_stop_the_others_or_the_migration() {
    let dir = Dir::new("sigkill");
    let size = 64usize << 20;
    let pages = (size / 4096) as u64;
    let ram = contents(size, 4096, 0x1357, 3);
    std::fs::write(dir.path("img"), &ram).unwrap();
    let key_path = Creds::tls(&dir.0);
    let key = key_path.destination();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // Cut after 4 MiB and refuse reconnects until released: the migration pauses.
    let proxy = Proxy::start(listener.local_addr().unwrap(), vec![4 << 20], true, None);
    let source = source_cmd(&proxy.addr(), &key_path, &dir.path("img"), "ram:64M", &["--bandwidth", "64M"])
        .spawn()
        .unwrap();
    let sock = dir.path("ctl.sock");
    let opts = DestinationOptions {
        progress: Progress::Off,
        broker: BrokerConfig { control: Some(sock.clone()), ..Default::default() },
        ..Default::default()
    };
    let mut dest = Destination::accept(&listener, &key, None, opts).unwrap();
    dest.run_until_listening().unwrap();
    let net = Arc::clone(dest.net());
    wait_until("the pause", || net.paused().is_some());
    let h = dest.broker().unwrap();

    // Victim 1: registered, never started.
    let mut idle = client(&sock, "touch:1");
    // Victim 2: killed between two steps (waiting on stdin).
    let mut mid = client(&sock, "touch:0;wait;touch:5");
    mid.go();
    assert_eq!(mid.line()["step"], "touch:0", "page 0 arrived before the cut");
    // Victim 3: blocked on a page that cannot arrive while the connection is down.
    let before = h.status().unwrap().outstanding;
    let mut blocked = client(&sock, &format!("touch:{}", pages - 1));
    blocked.go();
    wait_until("the victim's outstanding request", || h.status().unwrap().outstanding > before);
    for v in [&mut idle, &mut mid, &mut blocked] {
        v.child.kill().unwrap();
        v.child.wait().unwrap();
    }
    wait_until("the broker to see the exits", || h.status().unwrap().clients.is_empty());
    // Survivors: they also wait on missing pages, then finish after the resume.
    // c2 writes none of the pages c1 reads (they run concurrently once the pages arrive).
    let (w1, w2): (Vec<u64>, Vec<u64>) = ((1000..1010).collect(), vec![pages - 2, pages - 4]);
    let s1 = format!("touch:{},{};write:1000-1009:77;touch:{}", pages - 1, pages / 2, pages / 3);
    let s2 = format!("touch:{};write:{},{}:88", pages - 3, pages - 2, pages - 4);
    let (mut c1, mut c2) = (client(&sock, &s1), client(&sock, &s2));
    c1.go();
    c2.go();
    proxy.set_refuse(false);
    let (summary, incoming) = dest.finish().unwrap();
    let (l1, l2) = (c1.finish(), c2.finish());
    let (ok, err) = end(source);
    assert!(ok, "source: {err}");
    assert!(summary.resumes >= 1, "{summary:?}");
    let p = |l: &serde_json::Value, i: usize| l["pages"][i]["fnv"].as_str().unwrap().to_string();
    let page = |i: u64| fnv(&ram[i as usize * 4096..(i as usize + 1) * 4096]);
    assert_eq!(p(&l1[0], 0), page(pages - 1));
    assert_eq!(p(&l1[0], 1), page(pages / 2));
    assert_eq!(p(&l2[0], 0), page(pages - 3));
    let mut want = ram.clone();
    for (list, b) in [(&w1, 77u8), (&w2, 88)] {
        for &q in list {
            want[q as usize * 4096..q as usize * 4096 + 8].fill(b);
        }
    }
    let got = verify_report(incoming.blocks());
    assert_eq!(got.blocks[0].checksum, sum(&want));
}

/// The source dies (SIGKILL) during precopy: the destination says so, exits non-zero, and never
/// opened its control socket (no client could attach to incomplete RAM). A cut connection during
/// precopy ends both sides the same way.
#[test]
fn a_source_that_dies_before_postcopy_is_reported_and_the_destination_exits_non_zero() {
    let dir = Dir::new("srcdies");
    std::fs::write(dir.path("img"), contents(32 << 20, 4096, 0x2468, 3)).unwrap();
    let key = Creds::psk(&dir.path("key"));
    for kill in [true, false] {
        let (serve, addr, _out) = serve_cmd(&dir, &key, "127.0.0.1:0", &[]);
        let pid = Arc::new(AtomicU32::new(0));
        let p2 = Arc::clone(&pid);
        let hook: Box<dyn Fn(u64) + Send + Sync> = Box::new(move |_| {
            if kill {
                kill_pid(p2.load(Ordering::SeqCst));
            }
        });
        let proxy = Proxy::start(addr.parse().unwrap(), vec![8 << 20], true, Some(hook));
        let source = source_cmd(
            &proxy.addr(),
            &key,
            &dir.path("img"),
            "ram:32M",
            &["--precopy", "--bandwidth", "64M"],
        )
        .spawn()
        .unwrap();
        pid.store(source.id(), Ordering::SeqCst);
        let (sok, serr) = end(source);
        let (dok, derr) = end(serve);
        assert!(!sok && !dok, "kill {kill}: both fail: source {serr}\nserve {derr}");
        assert!(derr.contains("before postcopy started"), "kill {kill}: {derr}");
        assert!(!dir.path("control.sock").exists(), "no control socket before Listen");
        if !kill {
            assert!(serr.contains("error:"), "the source reports the failure: {serr}");
        }
    }
}

/// The destination is killed during precopy: the source reports it and exits non-zero; a new
/// destination on the same address takes a second run of the source to the end.
#[test]
fn a_destination_restarted_before_postcopy_lets_the_migration_run_again() {
    let dir = Dir::new("dstdies");
    let ram = contents(32 << 20, 4096, 0x3579, 3);
    std::fs::write(dir.path("img"), &ram).unwrap();
    let key = Creds::psk(&dir.path("key"));
    let (serve, addr, _out) = serve_cmd(&dir, &key, "127.0.0.1:0", &[]);
    let pid = Arc::new(AtomicU32::new(serve.id()));
    let p2 = Arc::clone(&pid);
    let hook: Box<dyn Fn(u64) + Send + Sync> = Box::new(move |_| kill_pid(p2.load(Ordering::SeqCst)));
    let proxy = Proxy::start(addr.parse().unwrap(), vec![8 << 20], false, Some(hook));
    let run =
        |extra: &[&str]| source_cmd(&proxy.addr(), &key, &dir.path("img"), "ram:32M", extra).spawn().unwrap();
    let (sok, serr) = end(run(&["--precopy", "--bandwidth", "64M"]));
    let (dok, _) = end(serve);
    assert!(!sok && !dok);
    assert!(serr.contains("error:"), "the source reports the lost destination: {serr}");
    // A new destination on the same address; the source runs again from the start.
    let _ = std::fs::remove_file(dir.path("control.sock"));
    let dv = dir.path("d.json");
    let (serve2, _, _out2) = serve_cmd(&dir, &key, &addr, &["--verify-file", dv.to_str().unwrap()]);
    let (sok, serr) = end(run(&["--precopy"]));
    assert!(sok, "second run: {serr}");
    let (dok, derr) = end(serve2);
    assert!(dok, "{derr}");
    let got = VerifyReport::read(&dv).unwrap();
    assert_eq!(got.blocks[0].checksum, sum(&ram));
}

/// During postcopy the connection drops and the source never comes back: the destination gives
/// up after its resume timeout with an error that says so, exits non-zero, never zero-fills the
/// missing pages (a client blocked on one stays blocked), and the source gives up too.
#[test]
fn a_source_that_never_comes_back_makes_the_destination_give_up_after_its_timeout() {
    let dir = Dir::new("giveup");
    let size = 64usize << 20;
    std::fs::write(dir.path("img"), contents(size, 4096, 0x4444, 3)).unwrap();
    let key = Creds::psk(&dir.path("key"));
    let (serve, addr, _out) = serve_cmd(&dir, &key, "127.0.0.1:0", &["--resume-timeout", "5"]);
    let proxy = Proxy::start(addr.parse().unwrap(), vec![4 << 20], true, None);
    let source = source_cmd(
        &proxy.addr(),
        &key,
        &dir.path("img"),
        "ram:64M",
        &["--bandwidth", "64M", "--resume-timeout", "2"],
    )
    .spawn()
    .unwrap();
    let sock = dir.path("control.sock");
    wait_until("the control socket", || sock.exists());
    wait_until("the cut", || proxy.cuts_done() == 1);
    let mut c = client(&sock, &format!("touch:{}", size / 4096 - 1));
    c.go();
    let (sok, serr) = end(source);
    let (dok, derr) = end(serve);
    assert!(!sok, "the source gives up: {serr}");
    assert!(serr.contains("resuming failed"), "{serr}");
    assert!(!dok, "the destination gives up: {derr}");
    assert!(derr.contains("did not resume within"), "{derr}");
    assert!(derr.contains("never zero-filled"), "{derr}");
    assert!(proxy.cuts_done() == 1 && proxy.connections() >= 2);
    assert!(c.child.try_wait().unwrap().is_none(), "the client waits on a page that never came");
}
