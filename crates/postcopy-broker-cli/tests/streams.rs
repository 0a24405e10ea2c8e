//! Parallel background streams (`CAP_STREAMS`) end to end, with the `postcopy-broker source`
//! and `serve --incoming` processes: migrations over 2 and 4 streams in the plaintext, TLS and
//! PSK modes arrive byte for byte, every stream placed pages and their counts add up to the
//! whole RAM; a source asking for more streams than `--max-streams` gets that many; a cut of one
//! extra stream (through a proxy) pauses the session, the resume reopens every stream and every
//! byte arrives.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::mig::{contents, Creds, Dir};
use common::proxy::Proxy;
use postcopy_broker::migration::verify::{checksum, VerifyReport};

const BIN: &str = env!("CARGO_BIN_EXE_postcopy-broker");
const SIZE: usize = 32 << 20;
const PS: usize = 4096;

/// The three protections: the credentials and the extra option of the plaintext mode.
fn modes(dir: &Dir) -> Vec<(&'static str, Creds, Vec<&'static str>)> {
    vec![
        ("plaintext", Creds::psk(&dir.path("plain.key")), vec!["--insecure-plaintext"]),
        ("tls", Creds::tls(&dir.0), vec![]),
        ("psk", Creds::psk(&dir.path("psk.key")), vec![]),
    ]
}

fn source(addr: &str, creds: &Creds, image: &Path, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args(["source", "--connect", addr])
        .args(creds.args())
        .arg("--image")
        .arg(image)
        .args(["--block", "ram:32M"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn end(mut child: Child) -> (bool, String) {
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap().success(), err)
}

fn sums(path: &Path) -> Vec<String> {
    VerifyReport::read(path).unwrap().blocks.iter().map(|b| b.checksum.clone()).collect()
}

/// Pages each destination stream thread placed, by stream number, from its log.
fn placed_by_stream(log: &str) -> Vec<(usize, u64)> {
    let mut out: Vec<(usize, u64)> = log
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("stream thread ")? + "stream thread ".len()..];
            let (index, rest) = rest.split_once(": placed ")?;
            let pages = rest.split_whitespace().next()?;
            Some((index.parse().ok()?, pages.parse().ok()?))
        })
        .collect();
    out.sort_unstable();
    out
}

/// Migrate `ram` over `streams` background streams into a `serve --incoming` that takes at most
/// `max`: the destination's log and summary, the source's log, and whether both sides matched.
fn migrate(
    dir: &Dir,
    creds: &Creds,
    extra: &[&str],
    ram: &[u8],
    streams: u16,
    max: u16,
) -> (String, serde_json::Value, String) {
    std::fs::write(dir.path("img"), ram).unwrap();
    let (dv, sv, sj) = (dir.path("d.json"), dir.path("s.json"), dir.path("summary.json"));
    let max = max.to_string();
    let mut serve_args = vec![
        "--max-streams",
        &max,
        "--verify-file",
        dv.to_str().unwrap(),
        "--summary-json",
        sj.to_str().unwrap(),
    ];
    serve_args.extend_from_slice(extra);
    let (mut serve, addr, _out) =
        common::mig::spawn_serve(&dir.path("ctl.sock"), creds, "127.0.0.1:0", &serve_args);
    let n = streams.to_string();
    let mut src_args = vec!["--streams", &n, "--verify-file", sv.to_str().unwrap()];
    src_args.extend_from_slice(extra);
    let (ok, serr) = end(source(&addr, creds, &dir.path("img"), &src_args));
    let mut derr = String::new();
    serve.stderr.take().unwrap().read_to_string(&mut derr).unwrap();
    assert!(ok, "source failed: {serr}\ndestination: {derr}");
    assert!(serve.wait().unwrap().success(), "destination failed: {derr}");
    let want = vec![format!("{:016x}", checksum(ram))];
    assert_eq!(sums(&dv), want, "the destination's RAM is the image, byte for byte");
    assert_eq!(sums(&sv), want);
    let summary = serde_json::from_str(&std::fs::read_to_string(&sj).unwrap()).unwrap();
    (derr, summary, serr)
}

#[test]
fn migrations_over_2_and_4_streams_arrive_byte_for_byte_in_every_mode() {
    let dir = Dir::new("streams-modes");
    let ram = contents(SIZE, PS, 0x57e4, 3);
    let pages = (SIZE / PS) as u64;
    for (mode, creds, extra) in modes(&dir) {
        for n in [2u16, 4] {
            let (derr, summary, serr) = migrate(&dir, &creds, &extra, &ram, n, 4);
            let what = format!("{mode}, {n} streams");
            assert!(
                serr.contains(&format!("{n} background streams")),
                "{what}: the source opened them: {serr}"
            );
            assert!(derr.contains(&format!("{n} background streams attached")), "{what}: {derr}");
            let placed = placed_by_stream(&derr);
            let indexes: Vec<usize> = placed.iter().map(|&(i, _)| i).collect();
            assert_eq!(
                indexes,
                (0..usize::from(n)).collect::<Vec<_>>(),
                "{what}: one placer per stream: {derr}"
            );
            assert!(placed.iter().all(|&(_, p)| p > 0), "{what}: every stream placed pages: {placed:?}");
            // No client: every page came over a background stream, each placed once.
            let total: u64 = placed.iter().map(|&(_, p)| p).sum();
            assert_eq!(total, pages, "{what}: the streams' pages add up to the RAM: {placed:?}");
            assert_eq!(summary["background_pages"].as_u64(), Some(pages), "{what}: {summary}");
            assert_eq!(summary["duplicate_pages"].as_u64(), Some(0), "{what}: no page went twice: {summary}");
        }
    }
}

#[test]
fn a_source_asking_for_more_streams_than_the_destination_takes_gets_as_many_as_it_takes() {
    let dir = Dir::new("streams-max");
    let ram = contents(SIZE, PS, 0x3a11, 4);
    let creds = Creds::psk(&dir.path("k"));
    let (derr, _, serr) = migrate(&dir, &creds, &[], &ram, 4, 2);
    assert!(serr.contains("2 background streams"), "{serr}");
    assert!(derr.contains("2 background streams attached"), "{derr}");
    assert_eq!(placed_by_stream(&derr).len(), 2, "{derr}");
    // And one stream is the protocol as it was: no Streams frame, no extra connection.
    let (derr, _, serr) = migrate(&dir, &creds, &[], &ram, 1, 4);
    assert!(serr.contains("1 background streams"), "{serr}");
    assert_eq!(placed_by_stream(&derr).len(), 1, "{derr}");
    assert!(!derr.contains("background streams attached"), "{derr}");
}

#[test]
fn a_cut_of_one_extra_stream_pauses_and_the_resume_reopens_every_stream() {
    let dir = Dir::new("streams-cut");
    let size = 64 << 20;
    let ram = contents(size, PS, 0xc07, 0);
    std::fs::write(dir.path("img"), &ram).unwrap();
    let key = dir.path("k");
    let creds = Creds::psk(&key);
    let (dv, sj) = (dir.path("d.json"), dir.path("summary.json"));
    let (mut serve, addr, _out) = common::mig::spawn_serve(
        &dir.path("ctl.sock"),
        &creds,
        "127.0.0.1:0",
        &[
            "--max-streams",
            "4",
            "--verify-file",
            dv.to_str().unwrap(),
            "--summary-json",
            sj.to_str().unwrap(),
        ],
    );
    let proxy = Proxy::start(addr.parse().unwrap(), vec![], false, None);
    // Paced, so the stream is still running when the cut comes.
    let src = Command::new(BIN)
        .args(["source", "--connect", &proxy.addr()])
        .args(creds.args())
        .arg("--image")
        .arg(dir.path("img"))
        .args(["--block", "ram:64M", "--streams", "3", "--bandwidth", "24M"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Main, urgent, then the two extra streams: cut the first extra stream (connection 3).
    while proxy.connections() < 4 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    proxy.cut_connection(3);
    let (ok, serr) = end(src);
    let mut derr = String::new();
    serve.stderr.take().unwrap().read_to_string(&mut derr).unwrap();
    assert!(ok, "source failed: {serr}\ndestination: {derr}");
    assert!(serve.wait().unwrap().success(), "destination failed: {derr}");
    assert!(proxy.connections() >= 8, "the resume reopened all four connections: {}", proxy.connections());
    assert!(serr.contains("with 3 background streams"), "the source resumed with every stream: {serr}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sj).unwrap()).unwrap();
    assert!(summary["pauses"].as_u64().unwrap() >= 1, "{summary}");
    assert_eq!(summary["pauses"], summary["resumes"], "{summary}");
    assert_eq!(sums(&dv), vec![format!("{:016x}", checksum(&ram))], "every byte arrived after the resume");
}
