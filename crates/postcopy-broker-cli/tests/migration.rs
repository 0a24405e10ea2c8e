//! Live migration end to end over loopback TCP: the `postcopy-broker source` process serves an
//! image; the destination is either the `postcopy-broker serve` process or this test process
//! driving the library's `Destination` (so that pcb-client processes can be registered with its
//! fault loop). Every test ends by comparing checksums of the whole RAM with the source's.

mod common;

use std::io::{BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use common::clients::{check_pages, client_args, control_args, Peer};
use common::ensure_free_huge_pages;
use common::mig::{contents, Creds};
use postcopy_broker::fault::{Registration, RegistrationMap};
use postcopy_broker::migration::destination::{verify_report, Destination, DestinationOptions, Progress};
use postcopy_broker::migration::verify::{checksum, VerifyReport};
use postcopy_broker::ram::RamBlock;

const BIN: &str = env!("CARGO_BIN_EXE_postcopy-broker");

/// A scratch directory removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("pcb-migration-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_image(path: &Path, blocks: &[&Vec<u8>]) {
    let mut all = Vec::new();
    for b in blocks {
        all.extend_from_slice(b);
    }
    std::fs::write(path, all).unwrap();
}

fn source_cmd(addr: &str, creds: &Creds, image: &Path, blocks: &[&str], extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["source", "--connect", addr]).args(creds.args()).arg("--image").arg(image);
    for b in blocks {
        c.args(["--block", b]);
    }
    c.args(extra).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn wait_ok(mut child: Child, what: &str) -> String {
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "{what} exited with {st}: {err}");
    err
}

fn sum(data: &[u8]) -> String {
    format!("{:016x}", checksum(data))
}

fn checksums(r: &VerifyReport) -> Vec<(String, String)> {
    r.blocks.iter().map(|b| (b.name.clone(), b.checksum.clone())).collect()
}

/// A `serve --incoming` process and the address it listens on.
fn spawn_serve(
    dir: &Dir,
    creds: &Creds,
    extra: &[&str],
) -> (Child, String, BufReader<std::process::ChildStdout>) {
    common::mig::spawn_serve(&dir.path("control.sock"), creds, "127.0.0.1:0", extra)
}

/// Pages `list` of a block with the first 8 bytes set to `byte` (what pcb-client's write does).
fn apply_writes(data: &mut [u8], ps: usize, list: &[usize], byte: u8) {
    for &p in list {
        data[p * ps..p * ps + 8].fill(byte);
    }
}

fn spread(n: usize, pages: usize, seed: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).map(|i| (i * 7919 + seed * 104_729) % pages).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn list(v: &[usize]) -> String {
    v.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
}

#[test]
fn migrates_256_mib_while_client_processes_read_and_write() {
    ensure_free_huge_pages(40);
    let dir = Dir::new("big");
    let (small, huge) = (192usize << 20, 64usize << 20);
    let mut ram = contents(small, 4096, 0x1234_5678, 3);
    let mut hram = contents(huge, 2 << 20, 0x9abc_def1, 4);
    write_image(&dir.path("img"), &[&ram, &hram]);
    let key = Creds::tls(&dir.0);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // A bandwidth limit keeps postcopy running while the clients work (about 1.5 s).
    let source = source_cmd(
        &addr,
        &key,
        &dir.path("img"),
        &["pc.ram:192M", "huge:64M:2m"],
        &["--bandwidth", "128M", "--prefetch", "4", "--verify-file", dir.path("src.json").to_str().unwrap()],
    )
    .spawn()
    .unwrap();

    let opts = DestinationOptions { progress: Progress::Log, ..Default::default() };
    let mut dest = Destination::accept(&listener, &key.destination(), None, opts).unwrap();
    dest.run_until_listening().unwrap();
    let h = dest.broker().unwrap();
    let blocks = Arc::clone(dest.incoming().blocks());
    let (b0, b1): (&RamBlock, &RamBlock) = (blocks.get(0).unwrap(), blocks.get(1).unwrap());

    // Two client processes, one per block: read pages, write some, read more.
    let reads0 = spread(600, small / 4096, 1);
    let writes0 = spread(200, small / 4096, 2);
    let reads1 = spread(12, huge >> 21, 3);
    let writes1 = spread(6, huge >> 21, 4);
    let script0 =
        format!("touch:{};write:{}:171;touch:{}", list(&reads0[..300]), list(&writes0), list(&reads0[300..]));
    let script1 = format!("touch:{};write:{}:93", list(&reads1), list(&writes1));
    let mut c0 = Peer::spawn(&client_args(b0, 1, &script0, &[]));
    let mut c1 = Peer::spawn(&client_args(b1, 1, &script1, &[]));
    c0.register(h, "client-small");
    let mut m1 = c1.mappings();
    for m in &mut m1 {
        m.block = 1;
    }
    h.register(Registration {
        name: "client-huge".into(),
        uffd: c1.take_uffd(),
        pid: Some(c1.pid()),
        map: RegistrationMap::Shared(m1),
    })
    .unwrap();
    c0.go();
    c1.go();
    let (l0, l1) = (c0.finish(), c1.finish());
    // Reads see the source's bytes (the reads after the writes touch other pages or see the write).
    let before_writes: Vec<_> = l0.iter().take(2).cloned().collect();
    assert_eq!(check_pages(&before_writes, &ram, 4096), 300);
    assert_eq!(check_pages(&l1[..1], &hram, 2 << 20), reads1.len());

    let (summary, incoming) = dest.finish().unwrap();
    wait_ok(source, "source");
    println!("{}", summary.render());

    // Every byte equals the source, with the clients' writes on top.
    let src = VerifyReport::read(&dir.path("src.json")).unwrap();
    assert_eq!(checksums(&src), vec![("pc.ram".into(), sum(&ram)), ("huge".into(), sum(&hram))]);
    apply_writes(&mut ram, 4096, &writes0, 171);
    apply_writes(&mut hram, 2 << 20, &writes1, 93);
    let got = verify_report(incoming.blocks());
    assert_eq!(checksums(&got), vec![("pc.ram".into(), sum(&ram)), ("huge".into(), sum(&hram))]);
    let total = (small / 4096 + (huge >> 21)) as u64;
    assert_eq!(summary.demand_pages + summary.background_pages, total, "{summary:?}");
    assert!(summary.zero_pages > 0, "zero pages travel as zero runs: {summary:?}");
    assert_eq!(summary.clients.len(), 2);
}

#[test]
fn pages_dirtied_after_precopy_are_discarded_and_sent_again() {
    ensure_free_huge_pages(8);
    let dir = Dir::new("dirty");
    let ram = contents(16 << 20, 4096, 77, 3);
    let hram = contents(8 << 20, 2 << 20, 78, 2);
    write_image(&dir.path("img"), &[&ram, &hram]);
    let key = Creds::psk(&dir.path("key"));
    let (dv, ds, sv, ss) = (dir.path("d.json"), dir.path("ds.json"), dir.path("s.json"), dir.path("ss.json"));
    let (serve, addr, _out) = spawn_serve(
        &dir,
        &key,
        &["--verify-file", dv.to_str().unwrap(), "--summary-json", ds.to_str().unwrap()],
    );
    // 3 + 1 + 2 small pages (one range overlaps another), and 1 byte of a huge page: the whole
    // 2 MiB page is discarded and sent again.
    let dirty = "pc.ram:0x3000+0x3000,pc.ram:0x5000+0x1000,pc.ram:0x100000+8K,huge:0x200005+1";
    let source = source_cmd(
        &addr,
        &key,
        &dir.path("img"),
        &["pc.ram:16M", "huge:8M:2m"],
        &[
            "--precopy",
            "--dirty",
            dirty,
            "--verify-file",
            sv.to_str().unwrap(),
            "--summary-json",
            ss.to_str().unwrap(),
        ],
    )
    .spawn()
    .unwrap();
    wait_ok(source, "source");
    wait_ok(serve, "serve");
    let src = VerifyReport::read(&sv).unwrap();
    let dst = VerifyReport::read(&dv).unwrap();
    assert_eq!(checksums(&dst), checksums(&src), "destination equals the source's final RAM");
    // The source's final RAM is the image with each dirty range inverted (page 5 twice).
    let (mut ram2, mut hram2) = (ram.clone(), hram.clone());
    for r in [0x3000..0x6000, 0x5000..0x6000, 0x100000..0x102000] {
        for b in &mut ram2[r] {
            *b = !*b;
        }
    }
    hram2[0x200005] = !hram2[0x200005];
    assert_eq!(checksums(&src), vec![("pc.ram".into(), sum(&ram2)), ("huge".into(), sum(&hram2))]);
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ss).unwrap()).unwrap();
    assert_eq!(s["counts"]["discarded_pages"], 3 + 2 + 1, "pages of their block: {s}");
    assert_eq!(s["counts"]["precopy_pages"], 4096 + 4, "{s}");
    assert_eq!(s["counts"]["background_pages"], 3 + 2 + 1, "exactly the dirty pages go again: {s}");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ds).unwrap()).unwrap();
    assert_eq!(d["precopy_pages"], 4096 + 4, "{d}");
    assert_eq!(
        d["background_pages"].as_u64().unwrap() + d["demand_pages"].as_u64().unwrap(),
        3 + 2 + 1,
        "{d}"
    );
}

#[test]
fn a_demand_fault_is_answered_on_the_urgent_connection_while_the_stream_is_saturated() {
    let dir = Dir::new("demand");
    let size = 192usize << 20;
    let ram = contents(size, 4096, 5, 0);
    write_image(&dir.path("img"), &[&ram]);
    let key = Creds::tls(&dir.0);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // No bandwidth limit: the background stream fills the socket buffers from the first page on.
    let source = source_cmd(&addr, &key, &dir.path("img"), &["ram:192M"], &[]).spawn().unwrap();
    let opts = DestinationOptions { progress: Progress::Off, ..Default::default() };
    let mut dest = Destination::accept(&listener, &key.destination(), None, opts).unwrap();
    dest.run_until_listening().unwrap();
    // Fault on the last pages (the background stream starts at the first) through the broker's
    // own mapping, from a thread of this process.
    let blocks = Arc::clone(dest.incoming().blocks());
    let b = blocks.get(0).unwrap();
    let offsets: Vec<u64> = (1..=4u64).map(|i| size as u64 - i * 997 * 4096).collect();
    let got: Vec<Vec<u8>> = offsets.iter().map(|&o| common::read_block(b, o, 4096)).collect();
    for (o, g) in offsets.iter().zip(&got) {
        assert_eq!(g[..], ram[*o as usize..*o as usize + 4096], "page at {o:#x}");
    }
    let st = dest.broker().unwrap().status().unwrap();
    assert!(st.broker.pages_demand >= 4, "the faulted pages count as demand: {:?}", st.broker);
    let (summary, incoming) = dest.finish().unwrap();
    wait_ok(source, "source");
    assert!(summary.demand_flagged_pages >= 4, "answers flagged DEMAND: {summary:?}");
    assert!(summary.urgent_pages >= 4, "answers came on the urgent connection: {summary:?}");
    assert!(summary.requests >= 4, "{summary:?}");
    let got = verify_report(incoming.blocks());
    assert_eq!(checksums(&got), vec![("ram".into(), sum(&ram))]);
}

/// A source with another key exits at once with an error naming its key file; the destination
/// logs the refusal (with the peer's address) and goes on to serve the real source.
#[test]
fn a_wrong_key_is_refused_and_the_destination_still_serves_the_real_source() {
    let dir = Dir::new("key");
    let ram = contents(1 << 20, 4096, 9, 3);
    write_image(&dir.path("img"), &[&ram]);
    let (k1, k2) = (Creds::psk(&dir.path("k1")), Creds::psk(&dir.path("k2")));
    std::fs::write(dir.path("k2"), "ff".repeat(32)).unwrap();
    let dv = dir.path("d.json");
    let (mut serve, addr, _out) = spawn_serve(&dir, &k1, &["--verify-file", dv.to_str().unwrap()]);
    let mut stranger = source_cmd(&addr, &k2, &dir.path("img"), &["ram:1M"], &[]).spawn().unwrap();
    let mut serr = String::new();
    stranger.stderr.take().unwrap().read_to_string(&mut serr).unwrap();
    assert!(!stranger.wait().unwrap().success(), "the refused source exits non-zero");
    assert!(serr.contains("different key files"), "{serr}");
    assert!(serr.contains(dir.path("k2").to_str().unwrap()), "the source names its key file: {serr}");
    assert!(serve.try_wait().unwrap().is_none(), "the destination keeps listening");
    wait_ok(source_cmd(&addr, &k1, &dir.path("img"), &["ram:1M"], &[]).spawn().unwrap(), "source");
    let mut derr = String::new();
    serve.stderr.take().unwrap().read_to_string(&mut derr).unwrap();
    assert!(serve.wait().unwrap().success(), "{derr}");
    assert!(derr.contains("refused") && derr.contains("different key files"), "{derr}");
    assert_eq!(checksums(&VerifyReport::read(&dv).unwrap()), vec![("ram".into(), sum(&ram))]);
}

#[test]
fn a_lazy_restore_from_an_image_gives_identical_memory() {
    ensure_free_huge_pages(8);
    let dir = Dir::new("restore");
    let ram = contents(24 << 20, 4096, 11, 3);
    let hram = contents(8 << 20, 2 << 20, 12, 3);
    write_image(&dir.path("img"), &[&ram, &hram]);
    let out = dir.path("sums.json");
    let o = Command::new(BIN)
        .args(["serve", "--control"])
        .arg(dir.path("control.sock"))
        .arg("--image")
        .arg(dir.path("img"))
        .args(["--block", "pc.ram:24M", "--block", "huge:8M:2m", "--checksums"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let fnv = |d: &[u8]| format!("{:016x}", common::fnv1a64(d));
    assert_eq!(got, serde_json::json!({"pc.ram": fnv(&ram), "huge": fnv(&hram)}));
}

#[test]
fn library_source_from_bytes_and_a_memfd_with_dirty_ranges() {
    use postcopy_broker::migration::source::{SourceBlock, SourceOptions, SourceRam, SourceSession};
    let a = contents(4 << 20, 4096, 21, 3);
    let mut b = contents(2 << 20, 4096, 22, 5);
    // Block "b" lives in a memfd the caller keeps writing (a running guest's RAM).
    let memfd = postcopy_broker::RamBlock::memfd("src-b", b.len() as u64).unwrap();
    // SAFETY: the test's own mapping of its memfd, b.len() bytes long.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), memfd.host_ptr(), b.len()) };
    let fd = memfd.fd().unwrap().try_clone_to_owned().unwrap();
    let ram = SourceRam::new(vec![
        SourceBlock::from_bytes("a", 4096, &a).unwrap(),
        SourceBlock::from_fd("b", 4096, &fd, b.len() as u64).unwrap(),
    ])
    .unwrap();
    let key = postcopy_broker::migration::transport::Security::psk(&[7u8; 32]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let writer_ptr = memfd.host_ptr() as usize;
    let skey = key.clone();
    let src = std::thread::spawn(move || {
        let mut s = SourceSession::connect(&addr, &skey, ram, SourceOptions::default()).unwrap();
        s.precopy().unwrap();
        // The guest writes pages 3 and 100 of "b" after precopy sent them.
        for p in [3usize, 100] {
            // SAFETY: inside the memfd mapping, which outlives this thread (joined below).
            unsafe { std::ptr::write_bytes((writer_ptr + p * 4096) as *mut u8, 0xee, 16) };
            s.mark_dirty("b", (p * 4096) as u64, 16).unwrap();
        }
        s.postcopy().unwrap()
    });
    let opts = DestinationOptions { progress: Progress::Off, ..Default::default() };
    let dest = Destination::accept(&listener, &key, None, opts).unwrap();
    let (summary, incoming) = dest.run().unwrap();
    let s = src.join().unwrap();
    for p in [3usize, 100] {
        b[p * 4096..p * 4096 + 16].fill(0xee);
    }
    let got = verify_report(incoming.blocks());
    assert_eq!(checksums(&got), vec![("a".into(), sum(&a)), ("b".into(), sum(&b))]);
    assert_eq!(s.counts.discarded_pages, 2);
    assert_eq!(s.counts.background_pages, 2);
    assert_eq!(summary.precopy_pages, (6 << 20) / 4096);
    drop(memfd);
}

#[test]
fn client_processes_register_over_the_control_socket_of_serve_incoming() {
    ensure_free_huge_pages(8);
    let dir = Dir::new("control");
    let mut ram = contents(64 << 20, 4096, 31, 3);
    let mut hram = contents(8 << 20, 2 << 20, 32, 3);
    write_image(&dir.path("img"), &[&ram, &hram]);
    let key = Creds::psk(&dir.path("key"));
    let (dv, sv) = (dir.path("d.json"), dir.path("s.json"));
    let (serve, addr, _out) = spawn_serve(&dir, &key, &["--verify-file", dv.to_str().unwrap()]);
    let source = source_cmd(
        &addr,
        &key,
        &dir.path("img"),
        &["pc.ram:64M", "huge:8M:2m"],
        &["--bandwidth", "24M", "--verify-file", sv.to_str().unwrap()],
    )
    .spawn()
    .unwrap();
    // The control socket appears when the destination listens.
    let sock = dir.path("control.sock");
    let t = std::time::Instant::now();
    while !sock.exists() {
        assert!(t.elapsed().as_secs() < 30, "no control socket");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let reads = spread(200, (64 << 20) / 4096, 5);
    let writes = spread(50, (64 << 20) / 4096, 6);
    let args = |block: &str, script: String| control_args(&sock, &script, &["--block", block]);
    let mut c0 = Peer::spawn(&args("pc.ram", format!("touch:{};write:{}:201", list(&reads), list(&writes))));
    let mut c1 = Peer::spawn(&args("huge", "touch:0,3;write:1,2:7".into()));
    c0.go();
    c1.go();
    let (l0, l1) = (c0.finish(), c1.finish());
    assert_eq!(check_pages(&l0[..1], &ram, 4096), reads.len());
    assert_eq!(check_pages(&l1[..1], &hram, 2 << 20), 2);
    wait_ok(source, "source");
    let err = wait_ok(serve, "serve");
    assert!(err.contains("registered"), "{err}");
    assert_eq!(
        checksums(&VerifyReport::read(&sv).unwrap()),
        vec![("pc.ram".into(), sum(&ram)), ("huge".into(), sum(&hram))]
    );
    apply_writes(&mut ram, 4096, &writes, 201);
    apply_writes(&mut hram, 2 << 20, &[1, 2], 7);
    let dst = VerifyReport::read(&dv).unwrap();
    assert_eq!(checksums(&dst), vec![("pc.ram".into(), sum(&ram)), ("huge".into(), sum(&hram))]);
}

/// Nice value of the thread of process `pid` named `comm`, if one lives now (field 19 of its
/// /proc stat line, counted after the ")" that ends the name).
fn thread_nice(pid: u32, comm: &str) -> Option<i64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|t| {
        let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
        if name.trim() != comm {
            return None;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
        stat.rsplit_once(") ")?.1.split_whitespace().nth(16)?.parse().ok()
    })
}

/// The background threads run at their nice values while the stream lasts: the source's at
/// `--background-nice` (fixed), the destination's stream thread at the adaptive default's low
/// value (10: no client, so no fault ever waits; tests/stream_priority.rs has the rest); the threads that
/// answer demand (the source's main and urgent threads, the fault loop) keep nice 0.
#[test]
fn background_threads_run_at_their_nice_values() {
    let dir = Dir::new("nice");
    let size = 16usize << 20;
    let ram = contents(size, 4096, 31, 3);
    write_image(&dir.path("img"), &[&ram]);
    let key = Creds::tls(&dir.0);
    let (serve, addr, _out) = spawn_serve(&dir, &key, &[]);
    // 4 MiB/s: the stream lasts about four seconds.
    let extra = ["--bandwidth", "4M", "--background-nice", "5"];
    let source = source_cmd(&addr, &key, &dir.path("img"), &["ram:16M"], &extra).spawn().unwrap();
    let t = std::time::Instant::now();
    let (mut src_bg, mut dst_stream) = (None, None);
    // A thread is seen in /proc a moment before it lowers its own priority: wait until both
    // show their settled value (or the deadline, and then report what was seen).
    while (src_bg != Some(5) || dst_stream != Some(10)) && t.elapsed() < std::time::Duration::from_secs(30) {
        src_bg = thread_nice(source.id(), "source-backgrou").or(src_bg);
        dst_stream = thread_nice(serve.id(), "postcopy-stream").or(dst_stream);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(src_bg, Some(5), "the source's background stream runs at --background-nice");
    assert_eq!(dst_stream, Some(10), "the destination's stream thread runs at the default nice");
    assert_eq!(thread_nice(source.id(), "source-urgent"), Some(0), "the urgent thread keeps nice 0");
    assert_eq!(thread_nice(serve.id(), "postcopy-fault"), Some(0), "the fault loop keeps nice 0");
    wait_ok(source, "source");
    let mut serve = serve;
    assert!(serve.wait().unwrap().success());
}
