//! A middlebox that stops reading without closing: the test's proxy sits between the
//! `postcopy-broker source` process and the destination (this test process driving the
//! library's `Destination`) and, during postcopy, stops reading the source's main connection for
//! good while keeping both its sockets open. The source's sender blocks writing into it until
//! `--write-timeout` drops the connection; the source reports the timeout, treats it as a cut,
//! resumes through the proxy by itself (new connections pass), and the migration ends with every
//! page equal to the source's. Over TLS and the pre-shared key (Noise), so the bound fires
//! inside a sealed record's write. A watchdog kills the run's processes if it hangs.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::mig::{contents, Creds, Dir};
use common::proxy::Proxy;
use postcopy_broker::migration::destination::{Destination, DestinationOptions, Progress};

const BIN: &str = env!("CARGO_BIN_EXE_postcopy-broker");
const SIZE: usize = 64 << 20;

/// Kills the source and ends the test binary if the run hangs.
struct Watchdog {
    _tx: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    fn arm(pid: u32, limit: Duration) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                // SAFETY: kill(2) with the pid of the source process this test spawned.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                eprintln!("the stalled-peer run hung for {limit:?}: killed the source");
                std::process::exit(101);
            }
        });
        Watchdog { _tx: tx }
    }
}

fn finish_child(mut child: Child) -> (bool, String) {
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap().success(), err)
}

fn stalled_run(dir: &Dir, creds: &Creds, ram: &[u8]) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = Proxy::start(listener.local_addr().unwrap(), Vec::new(), false, None);
    let source = Command::new(BIN)
        .args(["source", "--connect", &proxy.addr()])
        .args(creds.args())
        .arg("--image")
        .arg(dir.path("img"))
        .args(["--block", "pc.ram:64M", "--bandwidth", "16M", "--write-timeout", "2"])
        .args(["--resume-timeout", "60"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _dog = Watchdog::arm(source.id(), Duration::from_secs(150));
    let opts = DestinationOptions {
        progress: Progress::Off,
        resume_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let mut dest = Destination::accept(&listener, &creds.destination(), None, opts).unwrap();
    dest.run_until_listening().unwrap();

    // Postcopy runs at 16 MiB/s: let a few MiB of background pages through, then stop reading
    // main (the first connection) for good, sockets open.
    let at = proxy.forwarded() + (4 << 20);
    let end = Instant::now() + Duration::from_secs(60);
    while proxy.forwarded() < at && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(proxy.forwarded() >= at, "the background stream never started");
    proxy.stall_connection(1);

    let (summary, incoming) = dest.finish().unwrap();
    let (ok, err) = finish_child(source);
    assert!(ok, "the source failed:\n{err}");
    assert!(
        err.contains("write timeout: the peer at 127.0.0.1:")
            && err.contains("took none of the bytes written to it for 2s (--write-timeout)"),
        "the source reports the write timeout:\n{err}"
    );
    assert!(err.contains("reconnecting"), "the source treats it as a cut:\n{err}");
    assert!(summary.resumes >= 1, "{summary:?}\n{err}");
    assert!(
        proxy.connections() >= 4,
        "the resume came through the proxy: {} connections",
        proxy.connections()
    );
    let b = incoming.blocks().get(0).unwrap();
    let got = common::read_block(b, 0, SIZE as u64);
    let differ = got.chunks(4096).zip(ram.chunks(4096)).filter(|(g, w)| g != w).count();
    assert_eq!(differ, 0, "{differ} pages differ from the source");
}

#[test]
fn a_middlebox_that_stops_reading_main_is_a_cut_after_the_write_timeout_and_the_source_resumes() {
    let dir = Dir::new("stall");
    let ram = contents(SIZE, 4096, 0x5a11_0fee, 3);
    std::fs::write(dir.path("img"), &ram).unwrap();
    for creds in [Creds::tls(&dir.0), Creds::psk(&dir.path("key"))] {
        stalled_run(&dir, &creds, &ram);
    }
}
