//! Postcopy recovery under fault injection: a TCP proxy between the `postcopy-broker source`
//! process and the destination (this test process driving the library's `Destination` with a
//! control socket) cuts every connection after N bytes (N from a seeded PRNG), while pcb-client
//! processes registered over the control socket read and write pages. The source reconnects
//! through the proxy by itself and the migration resumes. Every run ends with every page of the
//! destination compared with the source (plus the clients' writes) and every client finished.
//! docs/recovery.md has the table these runs produce.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::clients::{control_args, fnv, Peer};
use common::ensure_free_huge_pages;
use common::mig::{contents, Creds, Dir, Rng};
use common::proxy::Proxy;
use postcopy_broker::fault::BrokerConfig;
use postcopy_broker::migration::destination::{Destination, DestinationOptions, Progress};
use postcopy_broker::ram::RamBlocks;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_postcopy-broker");
const SMALL: usize = 224 << 20;
const HUGE: usize = 32 << 20;
const HPS: usize = 2 << 20;

fn source_cmd(addr: &str, key: &Creds, image: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["source", "--connect", addr]).args(key.args()).arg("--image").arg(image);
    c.args(["--block", "pc.ram:224M", "--block", "huge:32M:2m"]);
    c.args(extra).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn finish_child(mut child: Child) -> (bool, String) {
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap().success(), err)
}

fn list(v: &[u64]) -> String {
    v.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
}

fn pick(r: &mut Rng, n: usize, pages: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).map(|_| r.below(pages)).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn client(sock: &Path, block: &str, script: String) -> Peer {
    Peer::spawn(&control_args(sock, &script, &["--block", block]))
}

/// Pages the client read, checked against `data` unless `skip` holds them; returns the count.
fn check_reads(lines: &[Value], data: &[u8], ps: usize, skip: &[u64]) -> usize {
    let mut n = 0;
    for l in lines {
        let Some(pages) = l["pages"].as_array() else { continue };
        for p in pages {
            let i = p["page"].as_u64().unwrap();
            if skip.binary_search(&i).is_ok() {
                continue;
            }
            let i = i as usize;
            assert_eq!(p["fnv"].as_str().unwrap(), fnv(&data[i * ps..(i + 1) * ps]), "page {i} in {l}");
            n += 1;
        }
    }
    n
}

/// Pages of `got` that differ from `want`.
fn lost_pages(got: &[u8], want: &[u8], ps: usize) -> u64 {
    got.chunks(ps).zip(want.chunks(ps)).filter(|(a, b)| a != b).count() as u64
}

fn block_bytes(blocks: &RamBlocks, i: usize) -> &[u8] {
    let b = blocks.get(i).unwrap();
    // SAFETY: after finish every page is placed and the fault loop is stopped; the mapping lives
    // as long as `blocks`.
    unsafe { std::slice::from_raw_parts(b.host_ptr(), b.size() as usize) }
}

#[derive(Default, Debug)]
struct Totals {
    runs: u64,
    cuts: u64,
    pages_checked: u64,
    pages_lost: u64,
    client_reads_checked: u64,
    resumes: u64,
    reissued: u64,
    pauses_with_waiting_clients: u64,
}

/// Kills the run's processes and ends the test binary if a run hangs (a hung client or session).
struct Watchdog {
    _tx: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    fn arm(pids: Arc<std::sync::Mutex<Vec<u32>>>, limit: Duration) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                for &p in pids.lock().unwrap().iter() {
                    // SAFETY: kill(2) with a pid this test spawned.
                    unsafe { libc::kill(p as i32, libc::SIGKILL) };
                }
                eprintln!("recovery run hung for {limit:?}: killed its processes");
                std::process::exit(101);
            }
        });
        Watchdog { _tx: tx }
    }
}

#[allow(clippy::too_many_arguments)]
fn cut_run(
    run: u64,
    rng: &mut Rng,
    dir: &Dir,
    key_path: &Creds,
    key: &postcopy_broker::migration::transport::Security,
    ram: &[u8],
    hram: &[u8],
    t: &mut Totals,
) {
    ensure_free_huge_pages(24);
    let ncuts = match rng.below(8) {
        0..=4 => 1,
        5..=6 => 2,
        _ => 3,
    };
    let mut cuts: Vec<u64> = (0..ncuts).map(|_| (256 << 10) + rng.below(160 << 20)).collect();
    cuts.sort_unstable();
    let pids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let _dog = Watchdog::arm(Arc::clone(&pids), Duration::from_secs(120));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = Proxy::start(listener.local_addr().unwrap(), cuts.clone(), false, None);
    let source = source_cmd(
        &proxy.addr(),
        key_path,
        &dir.path("img"),
        &["--bandwidth", "320M", "--prefetch", "2", "--resume-timeout", "60"],
    )
    .spawn()
    .unwrap();
    pids.lock().unwrap().push(source.id());
    let sock = dir.path(&format!("ctl-{run}.sock"));
    let opts = DestinationOptions {
        progress: Progress::Off,
        resume_timeout: Duration::from_secs(60),
        broker: BrokerConfig { control: Some(sock.clone()), ..Default::default() },
        ..Default::default()
    };
    let mut dest = Destination::accept(&listener, key, None, opts).unwrap();
    dest.run_until_listening().unwrap();

    // Two client processes registered over the control socket: read, write, read again.
    let (sp, hp) = ((SMALL / 4096) as u64, (HUGE / HPS) as u64);
    let reads0 = pick(rng, 400, sp);
    let writes0 = pick(rng, 120, sp);
    let reads1 = pick(rng, 10, hp);
    let writes1 = pick(rng, 4, hp);
    let (b0, b1) = (1 + (run % 200) as u8, 201 + (run % 50) as u8);
    let script0 = format!(
        "touch:{};write:{}:{b0};touch:{}",
        list(&reads0[..reads0.len() / 2]),
        list(&writes0),
        list(&reads0[reads0.len() / 2..])
    );
    let script1 = format!("touch:{};write:{}:{b1};touch:{}", list(&reads1), list(&writes1), list(&reads1));
    let mut c0 = client(&sock, "pc.ram", script0);
    let mut c1 = client(&sock, "huge", script1);
    pids.lock().unwrap().extend([c0.child.id(), c1.child.id()]);
    c0.go();
    c1.go();

    let (summary, incoming) = dest.finish().unwrap_or_else(|e| panic!("run {run} (cuts {cuts:?}): {e}"));
    let (l0, l1) = (c0.finish(), c1.finish());
    let (ok, err) = finish_child(source);
    assert!(ok, "run {run}: source failed: {err}");
    assert_eq!(proxy.cuts_done(), ncuts, "run {run}: every cut happened (cuts {cuts:?})");
    assert_eq!(summary.resumes, ncuts, "run {run}: {summary:?}\n{err}");

    // The clients read the source's bytes (pages they wrote themselves excepted).
    t.client_reads_checked += check_reads(&l0, ram, 4096, &writes0) as u64;
    t.client_reads_checked += check_reads(&l1, hram, HPS, &writes1) as u64;

    // Every page of the destination equals the source plus the clients' writes.
    let mut want0 = ram.to_vec();
    for &p in &writes0 {
        want0[p as usize * 4096..p as usize * 4096 + 8].fill(b0);
    }
    let mut want1 = hram.to_vec();
    for &p in &writes1 {
        want1[p as usize * HPS..p as usize * HPS + 8].fill(b1);
    }
    let blocks = incoming.blocks();
    let lost =
        lost_pages(block_bytes(blocks, 0), &want0, 4096) + lost_pages(block_bytes(blocks, 1), &want1, HPS);
    assert_eq!(lost, 0, "run {run}: {lost} pages differ from the source (cuts {cuts:?})");
    t.runs += 1;
    t.cuts += ncuts;
    t.pages_checked += sp + hp;
    t.pages_lost += lost;
    t.resumes += summary.resumes;
    t.reissued += summary.reissued_requests;
    if summary.reissued_requests > 0 {
        t.pauses_with_waiting_clients += 1;
    }
    println!(
        "run {run:2}: cuts at {:?} MiB, resumes {}, requests sent again {}, duplicates {}, postcopy {:.2}s",
        cuts.iter().map(|c| c >> 20).collect::<Vec<_>>(),
        summary.resumes,
        summary.reissued_requests,
        summary.duplicate_pages,
        summary.postcopy_secs
    );
}

#[test]
fn cutting_the_connections_at_random_points_of_a_256_mib_postcopy_loses_no_page() {
    let dir = Dir::new("cuts");
    let ram = contents(SMALL, 4096, 0xabcd_0123, 3);
    let hram = contents(HUGE, HPS, 0x7777_1111, 4);
    let mut img = ram.clone();
    img.extend_from_slice(&hram);
    std::fs::write(dir.path("img"), &img).unwrap();
    drop(img);
    // Even runs over TLS, odd ones with the pre-shared key.
    let (tls, psk) = (Creds::tls(&dir.0), Creds::psk(&dir.path("key")));
    let (tls_dst, psk_dst) = (tls.destination(), psk.destination());
    let mut rng = Rng(0x5eed_0fc0_ffee);
    let mut t = Totals::default();
    let runs: u64 = std::env::var("PCB_RECOVERY_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    for run in 0..runs {
        let (creds, key) = if run % 2 == 0 { (&tls, &tls_dst) } else { (&psk, &psk_dst) };
        cut_run(run, &mut rng, &dir, creds, key, &ram, &hram, &mut t);
    }
    println!("TOTALS {t:?}");
    assert_eq!(t.runs, runs);
    assert!(t.runs >= 20 || runs < 20);
    assert_eq!(t.pages_lost, 0);
}
