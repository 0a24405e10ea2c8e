//! The migration transport end to end, with the `postcopy-broker source` and `serve --incoming`
//! processes and, between them, a TCP proxy playing an attacker on the path: a source with a
//! certificate from another CA is refused and the real source migrates after it; a marker in
//! guest RAM does not show on the wire under TLS or the PSK mode (it does in plaintext, which
//! shows the check works); a flipped bit breaks a protected connection, the migration resumes
//! and every byte arrives; in plaintext the same flip ends in a loud digest failure, never in a
//! "complete" migration with a corrupted page.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::mig::{contents, Creds, Dir};
use common::proxy::{Proxy, Tamper};
use postcopy_broker::migration::transport::throwaway::{Leaf, ThrowawayCa};
use postcopy_broker::migration::verify::{checksum, VerifyReport};

const BIN: &str = env!("CARGO_BIN_EXE_postcopy-broker");
const SIZE: usize = 32 << 20;

fn source_cmd(addr: &str, creds: &[std::ffi::OsString], image: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["source", "--connect", addr]).args(creds).arg("--image").arg(image);
    c.args(["--block", "ram:32M"]).args(extra);
    c.env("RUST_LOG", "info").stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn end(mut child: Child) -> (bool, String) {
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap().success(), err)
}

fn sums(path: &Path) -> Vec<String> {
    VerifyReport::read(path).unwrap().blocks.iter().map(|b| b.checksum.clone()).collect()
}

fn want(ram: &[u8]) -> Vec<String> {
    vec![format!("{:016x}", checksum(ram))]
}

#[test]
fn a_certificate_from_another_ca_is_refused_and_the_real_source_migrates_after_it() {
    let dir = Dir::new("tls-other-ca");
    let ram = contents(SIZE, 4096, 0x0ca0, 3);
    std::fs::write(dir.path("img"), &ram).unwrap();
    let creds = Creds::tls(&dir.0);
    // The stranger trusts the destination's CA but its own certificate comes from another CA.
    let stranger = dir.path("stranger");
    std::fs::create_dir_all(&stranger).unwrap();
    std::fs::copy(dir.path("tls/ca-cert.pem"), stranger.join("ca-cert.pem")).unwrap();
    ThrowawayCa::new("a stranger's CA").unwrap().issue(&stranger, Leaf::Client, &["127.0.0.1"]).unwrap();
    let dv = dir.path("d.json");
    let (mut serve, addr, _out) = common::mig::spawn_serve(
        &dir.path("ctl.sock"),
        &creds,
        "127.0.0.1:0",
        &["--verify-file", dv.to_str().unwrap()],
    );
    let refused = source_cmd(&addr, &["--tls-dir".into(), stranger.clone().into()], &dir.path("img"), &[]);
    let (ok, err) = end({ refused }.spawn().unwrap());
    assert!(!ok, "the stranger's source exits non-zero");
    assert!(err.contains("refused our certificate"), "the source says it was refused: {err}");
    assert!(serve.try_wait().unwrap().is_none(), "the destination keeps listening");
    let (ok, err) = end(source_cmd(&addr, &creds.args(), &dir.path("img"), &[]).spawn().unwrap());
    assert!(ok, "{err}");
    let mut derr = String::new();
    serve.stderr.take().unwrap().read_to_string(&mut derr).unwrap();
    assert!(serve.wait().unwrap().success(), "{derr}");
    assert!(derr.contains("refused") && derr.contains("another CA"), "the destination logs why: {derr}");
    assert_eq!(sums(&dv), want(&ram));
}

/// A marker planted in guest RAM (on many pages) as the proxy sees the traffic.
fn marker_seen(creds: &Creds, plaintext: bool, dir: &Dir) -> bool {
    let marker = b"PCB-SECRET-MARKER-0123456789abcdef";
    let mut ram = contents(SIZE, 4096, 0x5ec7, 5);
    for p in (1..SIZE / 4096).step_by(97) {
        ram[p * 4096 + 100..p * 4096 + 100 + marker.len()].copy_from_slice(marker);
    }
    std::fs::write(dir.path("img"), &ram).unwrap();
    let extra: &[&str] = if plaintext { &["--insecure-plaintext"] } else { &[] };
    let dv = dir.path("d.json");
    let mut args = vec!["--verify-file", dv.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (serve, addr, _out) = common::mig::spawn_serve(&dir.path("ctl.sock"), creds, "127.0.0.1:0", &args);
    let tamper = Tamper { watch: Some(marker.to_vec()), ..Default::default() };
    let proxy = Proxy::tampering(addr.parse().unwrap(), vec![], false, None, tamper);
    let (ok, err) = end(source_cmd(&proxy.addr(), &creds.args(), &dir.path("img"), extra).spawn().unwrap());
    assert!(ok, "{err}");
    let (ok, derr) = end(serve);
    assert!(ok, "{derr}");
    if plaintext {
        assert!(
            err.contains("--insecure-plaintext") && derr.contains("--insecure-plaintext"),
            "both warn: {err}"
        );
    }
    assert_eq!(sums(&dv), want(&ram));
    proxy.saw_watched()
}

#[test]
fn a_marker_in_guest_ram_is_not_visible_on_the_wire() {
    let dir = Dir::new("marker");
    let tls = Creds::tls(&dir.0);
    let psk = Creds::psk(&dir.path("key"));
    assert!(!marker_seen(&tls, false, &dir), "TLS hides guest RAM");
    assert!(!marker_seen(&psk, false, &dir), "the PSK mode hides guest RAM");
    assert!(marker_seen(&psk, true, &dir), "in plaintext the proxy sees the marker (the check works)");
}

/// One bit flipped at 8 MiB of the source's bytes: inside page data of the background stream.
fn flipped(creds: &Creds, plaintext: bool, dir: &Dir) -> (bool, String, bool, String, Proxy) {
    let ram = contents(SIZE, 4096, 0xf11b, 0);
    std::fs::write(dir.path("img"), &ram).unwrap();
    let extra: &[&str] = if plaintext { &["--insecure-plaintext"] } else { &[] };
    let (dv, ds) = (dir.path("d.json"), dir.path("ds.json"));
    let mut args = vec!["--verify-file", dv.to_str().unwrap(), "--summary-json", ds.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (serve, addr, _out) = common::mig::spawn_serve(&dir.path("ctl.sock"), creds, "127.0.0.1:0", &args);
    let tamper = Tamper { flip_at: vec![8 << 20], ..Default::default() };
    let proxy = Proxy::tampering(addr.parse().unwrap(), vec![], false, None, tamper);
    let mut sargs = vec!["--bandwidth", "64M"];
    sargs.extend_from_slice(extra);
    let (sok, serr) =
        end(source_cmd(&proxy.addr(), &creds.args(), &dir.path("img"), &sargs).spawn().unwrap());
    let (dok, derr) = end(serve);
    assert_eq!(proxy.flips_done(), 1);
    if dok {
        // Every byte arrived intact, after a resume.
        assert_eq!(sums(&dv), want(&ram));
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ds).unwrap()).unwrap();
        assert!(s["resumes"].as_u64().unwrap() >= 1, "{s}");
    }
    (sok, serr, dok, derr, proxy)
}

#[test]
fn a_flipped_bit_breaks_a_protected_connection_and_the_migration_resumes_intact() {
    let dir = Dir::new("flip");
    for creds in [Creds::tls(&dir.0), Creds::psk(&dir.path("key"))] {
        let (sok, serr, dok, derr, _p) = flipped(&creds, false, &dir);
        assert!(sok && dok, "{creds:?}: source {serr}\ndestination {derr}");
        assert!(derr.contains("paused"), "the flip broke the connection: {derr}");
    }
}

#[test]
fn a_flipped_bit_in_plaintext_is_a_loud_digest_failure() {
    let dir = Dir::new("flip-plain");
    let creds = Creds::psk(&dir.path("key"));
    let (sok, serr, dok, derr, _p) = flipped(&creds, true, &dir);
    assert!(!dok && !sok, "both ends fail: source {serr}\ndestination {derr}");
    assert!(derr.contains("cannot be trusted") && derr.contains("'ram'"), "{derr}");
    assert!(serr.contains("cannot be trusted"), "the source is told: {serr}");
    assert!(!derr.contains("migration complete") && !serr.contains("migration complete"));
    assert!(!dir.path("d.json").exists(), "no checksums of a RAM that cannot be trusted");
}

/// A migration whose end is cut by a failpoint (`POSTCOPY_BROKER_FAILPOINT`: `on_source` in the
/// source, else in the destination): both sides must exit 0 and every byte must be here. Returns
/// the destination's log and summary.
fn cut_at_the_end(tag: &str, on_source: bool, failpoint: &str) -> (String, serde_json::Value) {
    let dir = Dir::new(tag);
    let ram = contents(SIZE, 4096, 0xe2d0, 4);
    std::fs::write(dir.path("img"), &ram).unwrap();
    let creds = Creds::psk(&dir.path("key"));
    let (dv, ds) = (dir.path("d.json"), dir.path("ds.json"));
    let args = ["--verify-file", dv.to_str().unwrap(), "--summary-json", ds.to_str().unwrap()];
    let fp = [("POSTCOPY_BROKER_FAILPOINT", failpoint)];
    let denv: &[(&str, &str)] = if on_source { &[] } else { &fp };
    let (serve, addr, _out) =
        common::mig::spawn_serve_env(&dir.path("ctl.sock"), &creds, "127.0.0.1:0", &args, denv);
    let mut src = source_cmd(&addr, &creds.args(), &dir.path("img"), &[]);
    if on_source {
        src.env("POSTCOPY_BROKER_FAILPOINT", failpoint);
    }
    let (sok, serr) = end(src.spawn().unwrap());
    let (dok, derr) = end(serve);
    assert!(sok && dok, "{failpoint}: both sides succeed\nsource: {serr}\ndestination: {derr}");
    for fp in failpoint.split(',').filter(|f| *f != "none") {
        let fired = format!("failpoint {fp} fires");
        assert!(serr.contains(&fired) || derr.contains(&fired), "failpoint {fp} fired: {serr}\n{derr}");
    }
    assert!(serr.contains("migration complete"), "{serr}");
    assert_eq!(sums(&dv), want(&ram), "every byte arrived");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ds).unwrap()).unwrap();
    (derr, s)
}

#[test]
fn a_cut_right_after_the_final_complete_ends_in_success_on_both_sides() {
    // The destination wrote Complete; the source never read it: it resumes the completed
    // session, which the lingering destination answers with full bitmaps and a second Complete.
    let (derr, s) = cut_at_the_end("end-missed", true, "source-miss-complete");
    assert_eq!(s["end"], "confirmed_after_resume", "{s}");
    assert!(derr.contains("did not confirm the end"), "{derr}");
    // The destination could not write its Complete at all (the connection died under it).
    let (derr, s) = cut_at_the_end("end-unwritable", false, "destination-complete-unwritable");
    assert_eq!(s["end"], "confirmed_after_resume", "{s}");
    assert!(derr.contains("resumed the completed session"), "{derr}");
}

#[test]
fn a_cut_right_before_the_final_complete_resumes_with_nothing_to_send() {
    let (derr, s) = cut_at_the_end("end-before", true, "source-cut-before-complete");
    assert_eq!(s["end"], "confirmed", "{s}");
    assert_eq!((s["pauses"].as_u64(), s["resumes"].as_u64()), (Some(1), Some(1)), "{s}");
    assert!(derr.contains("paused"), "{derr}");
}

#[test]
fn an_uncut_migration_is_confirmed_at_once() {
    let (_, s) = cut_at_the_end("end-plain", true, "none");
    assert_eq!(s["end"], "confirmed", "{s}");
    assert_eq!(s["pauses"].as_u64(), Some(0), "{s}");
}

#[test]
fn a_resume_attempt_abandoned_after_its_hello_ack_is_replaced_by_the_next() {
    // The cut before Complete makes the source resume; its first attempt dies between the main
    // connection's HelloAck and the urgent connection, as when a second cut lands there. The
    // destination must take the next attempt instead of waiting for that urgent connection.
    let (derr, s) =
        cut_at_the_end("resume-abandoned", true, "source-cut-before-complete,source-resume-abandoned");
    assert!(derr.contains("replaces the one waiting for its urgent connection"), "{derr}");
    assert_eq!(s["resumes"].as_u64(), Some(1), "{s}");
}
