//! Starting the broker side of a scenario: the destination (`serve --incoming`) with the source
//! page server (from an image, or from memfds this test hands over as the VMM, writing the dirty
//! ranges into them and reporting them), optionally through the cutting proxy; or `serve
//! --image` for a lazy restore. Also taking the destination's block memfds, which the oracle
//! reads once every process has exited.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postcopy_broker::control::protocol::BlockSpec;
use postcopy_broker::control::{ControlClient, Request, Response};
use postcopy_broker::ram::RamBlock;

use super::model::Model;
use super::plan::{Mode, Scenario, SourceKind, HUGE};
use super::procs::Procs;
use crate::common::proxy::Proxy;

const BIN: &str = env!("CARGO_BIN_EXE_postcopy-broker");

/// `NAME:SIZE[:2m]` for `--block`.
fn block_arg(s: &Scenario, i: usize) -> String {
    let b = &s.blocks[i];
    if b.page_size == HUGE {
        format!("{}:{}:2m", b.name, b.size)
    } else {
        format!("{}:{}", b.name, b.size)
    }
}

/// The broker side of a running scenario.
pub struct BrokerSide {
    /// Index of the destination / serve process.
    pub broker: usize,
    /// Index of the source process.
    pub source: Option<usize>,
    /// Between source and destination (migration): holds postcopy after Listen, cuts.
    pub proxy: Option<Proxy>,
    /// The memfd source's VMM conversation (hand over, dirty, start postcopy).
    pub vmm: Option<JoinHandle<Result<Vec<RamBlock>, String>>>,
}

/// Start the destination and the source (migration) or `serve --image` (restore). A migration
/// goes through the proxy, which holds it right after Listen until the runner releases it.
pub fn start(
    s: &Scenario,
    model: &Model,
    dir: &Path,
    ctl: &Path,
    procs: &mut Procs,
) -> Result<BrokerSide, String> {
    std::fs::write(dir.join("image"), model.image()).unwrap();
    match &s.mode {
        Mode::Restore { background } => {
            let mut c = Command::new(BIN);
            c.arg("serve");
            for i in 0..s.blocks.len() {
                c.args(["--block", &block_arg(s, i)]);
            }
            c.arg("--image").arg(dir.join("image")).arg("--control").arg(ctl);
            c.arg("--checksums").arg(dir.join("sums.json"));
            if *background {
                // The fill waits until the clients registered, so they find pages missing.
                c.args(["--wait-clients", &super::counters::initial_registrations(s).to_string()]);
            } else {
                c.arg("--no-background");
            }
            let broker = procs.spawn("serve", &mut c, false, false);
            Ok(BrokerSide { broker, source: None, proxy: None, vmm: None })
        }
        Mode::Migration { precopy, source, dirty, bandwidth_mib, streams, end_cut, .. } => {
            let key = dir.join("key");
            crate::common::mig::write_key(&key);
            let mut d = Command::new(BIN);
            // The plaintext transport: the proxy's hold after Listen reads the frames (with TLS or
            // the PSK's Noise records it cannot find Listen).
            d.args(["serve", "--incoming", "127.0.0.1:0", "--resume-timeout", "30", "--insecure-plaintext"]);
            d.arg("--key").arg(&key);
            d.arg("--control").arg(ctl).arg("--verify-file").arg(dir.join("dst-verify.json"));
            d.arg("--summary-json").arg(dir.join("dst-summary.json"));
            let end_failpoint = end_cut.map(|e| e.failpoint());
            if let Some((fp, false)) = end_failpoint {
                d.env(postcopy_broker::failpoint::VAR, fp);
            }
            let broker = procs.spawn("destination", &mut d, false, false);
            let addr = listening_addr(procs, broker)?;
            // Postcopy waits at the proxy, right after Listen, until the clients registered.
            let proxy = Proxy::start(addr.parse().unwrap(), Vec::new(), false, None);
            proxy.hold_after_listen();
            let connect = proxy.addr();
            let mut c = Command::new(BIN);
            c.args(["source", "--connect", &connect, "--resume-timeout", "30", "--insecure-plaintext"]);
            c.arg("--key").arg(&key);
            if let Some((fp, true)) = end_failpoint {
                c.env(postcopy_broker::failpoint::VAR, fp);
            }
            c.arg("--verify-file").arg(dir.join("src-verify.json"));
            c.arg("--summary-json").arg(dir.join("src-summary.json"));
            if *precopy {
                c.arg("--precopy");
            }
            if let Some(b) = bandwidth_mib {
                c.args(["--bandwidth", &format!("{b}M")]);
            }
            c.args(["--streams", &streams.to_string()]);
            let mut vmm = None;
            match source {
                SourceKind::Image => {
                    c.arg("--image").arg(dir.join("image"));
                    for i in 0..s.blocks.len() {
                        c.args(["--block", &block_arg(s, i)]);
                    }
                    if !dirty.is_empty() {
                        let spec: Vec<String> = dirty
                            .iter()
                            .map(|d| {
                                let ps = s.blocks[d.block].page_size;
                                format!("{}:{}+{}", s.blocks[d.block].name, d.first * ps, d.pages * ps)
                            })
                            .collect();
                        c.args(["--dirty", &spec.join(",")]);
                    }
                }
                SourceKind::Memfd => {
                    let sock = dir.join("source.sock");
                    c.arg("--control").arg(&sock);
                    let blocks = source_memfds(s, model);
                    let specs = s
                        .blocks
                        .iter()
                        .map(|b| BlockSpec { name: b.name.clone(), size: b.size, page_size: b.page_size })
                        .collect();
                    let writes = dirty
                        .iter()
                        .map(|d| {
                            let ps = s.blocks[d.block].page_size as usize;
                            let (off, len) = (d.first as usize * ps, d.pages as usize * ps);
                            (d.block, off as u64, model.blocks[d.block].last[off..off + len].to_vec())
                        })
                        .collect();
                    vmm = Some(std::thread::spawn(move || vmm_conversation(&sock, blocks, specs, writes)));
                }
            }
            let source = procs.spawn("source", &mut c, false, false);
            Ok(BrokerSide { broker, source: Some(source), proxy: Some(proxy), vmm })
        }
    }
}

/// The address on the destination's first stdout line.
fn listening_addr(procs: &mut Procs, broker: usize) -> Result<String, String> {
    let t = Instant::now();
    loop {
        let out = procs.stdout_file(broker);
        if let Some(a) = out.lines().find_map(|l| l.strip_prefix("listening ")) {
            return Ok(a.trim().to_string());
        }
        procs.poll();
        if !procs.running(broker) || t.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "the destination never said where it listens: {}",
                procs.stderr_tail(broker, 10)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The VMM's guest RAM on the source: memfds holding the initial contents.
fn source_memfds(s: &Scenario, model: &Model) -> Vec<RamBlock> {
    s.blocks
        .iter()
        .zip(&model.blocks)
        .map(|(b, m)| {
            let blk = if b.page_size == HUGE {
                RamBlock::hugetlb(&b.name, b.size, HUGE).unwrap()
            } else {
                RamBlock::memfd(&b.name, b.size).unwrap()
            };
            write_block(&blk, 0, &m.initial);
            blk
        })
        .collect()
}

fn write_block(b: &RamBlock, off: u64, data: &[u8]) {
    assert!(off + data.len() as u64 <= b.size());
    // SAFETY: the range lies inside this test's own mapping of the memfd, which no userfaultfd
    // watches and no Rust reference points into.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), b.host_ptr().add(off as usize), data.len()) };
}

fn wait_path(p: &Path, what: &str) -> Result<(), String> {
    let t = Instant::now();
    while !p.exists() {
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!("{what} never appeared at {}", p.display()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn connect(p: &Path) -> Result<ControlClient, String> {
    let t = Instant::now();
    loop {
        match ControlClient::connect(p) {
            Ok(c) => return Ok(c),
            Err(e) if t.elapsed() > Duration::from_secs(10) => {
                return Err(format!("connect {}: {e}", p.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The VMM on the source: hand the memfds over, write the guest's changes (while precopy may
/// be running), report them as dirty (answered once precopy is done), start postcopy.
fn vmm_conversation(
    sock: &Path,
    blocks: Vec<RamBlock>,
    specs: Vec<BlockSpec>,
    writes: Vec<(usize, u64, Vec<u8>)>,
) -> Result<Vec<RamBlock>, String> {
    wait_path(sock, "the source's control socket")?;
    let mut c = connect(sock)?;
    let fds: Vec<_> = blocks.iter().map(|b| b.fd().unwrap()).collect();
    let ok = |r: Result<(Response, Vec<OwnedFd>), _>, what: &str| match r {
        Ok((Response::Ok, _)) => Ok(()),
        Ok((other, _)) => Err(format!("source control: {what}: {other:?}")),
        Err(e) => Err(format!("source control: {what}: {e}")),
    };
    let names: Vec<String> = specs.iter().map(|b| b.name.clone()).collect();
    ok(
        c.request(
            &Request::ProvideBlocks { blocks: specs },
            &fds.iter().map(|f| f.as_fd()).collect::<Vec<_>>(),
        ),
        "provide_blocks",
    )?;
    for (b, off, data) in &writes {
        write_block(&blocks[*b], *off, data);
    }
    for (b, off, data) in &writes {
        let d = Request::Dirty { block: names[*b].clone(), offset: *off, len: data.len() as u64 };
        ok(c.request(&d, &[]), "dirty")?;
    }
    ok(c.request(&Request::StartPostcopy, &[]), "start_postcopy")?;
    Ok(blocks)
}

/// A destination block's memfd, held by this test to read the block after every process exited.
#[derive(Debug)]
pub struct Held {
    pub name: String,
    pub size: u64,
    pub page_size: u64,
    pub fd: OwnedFd,
}

/// Take every block's memfd from the broker (GetBlocks; nothing is mapped or registered).
pub fn hold_blocks(ctl: &Path) -> Result<Vec<Held>, String> {
    let mut c = connect(ctl)?;
    c.hello("scenario-oracle").map_err(|e| format!("hello: {e}"))?;
    let blocks = c.get_blocks(None).map_err(|e| format!("get_blocks: {e}"))?;
    blocks
        .into_iter()
        .map(|(info, fd)| {
            let fd = fd.ok_or_else(|| format!("block {} came without its fd", info.name))?;
            Ok(Held { name: info.name, size: info.size, page_size: info.page_size, fd })
        })
        .collect()
}

/// The control socket path of a scenario's broker.
pub fn control_path(dir: &Path) -> PathBuf {
    dir.join("broker.sock")
}
