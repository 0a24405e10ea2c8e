//! DPDK as a scenario client: dpdk-testpmd with its vhost-user PMD (`postcopy-support=1`,
//! `--no-mlockall`, txonly forwarding) and examples/net_driver.rs playing the VMM over the
//! broker's control socket. The driver posts receive buffers in guest pages; testpmd writes
//! packets into them during postcopy (faulting on pages that have not arrived). It owns where
//! the driver puts its buffers (the same choice as net_driver's, checked against its summary),
//! the two commands, and the check of the driver's summary: POSTCOPY_END went through and every
//! buffer holds a well-formed txonly packet. The bytes of those pages outside the buffers are
//! the byte oracle's (`model::Mutation::Rx`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::plan::{DpdkPlan, RxBuf};

/// net_driver places its buffers in pages of this size.
const PAGE: u64 = 4096;
/// Bytes per buffer (net_driver's `--buffer-len` default).
const BUFFER_LEN: u64 = 2048;
/// The last buffer starts this many bytes before the end of its page (net_driver's SPAN_TAIL).
const SPAN_TAIL: u64 = 40;
/// The Ethernet destination testpmd's txonly mode is told to use.
const PEER_MAC: [u8; 6] = [0x02, 0x50, 0x43, 0x42, 0x00, 0x01];
/// Name of the backend's client in the broker.
const BACKEND: &str = "dpdk";
/// A virtio_net_hdr with num_buffers.
const NET_HDR_LEN: usize = 12;

fn examples_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("examples")
}

/// The receive buffers net_driver posts with `--seed seed --buffers n` over `ram_size` bytes of
/// guest RAM: its xorshift64 page choice, a buffer at an 8-byte aligned offset in the first half
/// of each page, the last one [`SPAN_TAIL`] bytes before its page's end (it spans two pages).
/// `dpdk::check` compares them with the pages the driver reports.
pub fn buffers(seed: u64, n: u64, ram_size: u64) -> Vec<RxBuf> {
    let pages = ram_size / PAGE;
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut below = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n.max(1)
    };
    let mut used = std::collections::HashSet::new();
    let mut bufs = Vec::new();
    while (bufs.len() as u64) < n {
        let last = bufs.len() as u64 + 1 == n;
        let p = below(pages - 1);
        if used.contains(&p) || (last && used.contains(&(p + 1))) {
            continue;
        }
        used.insert(p);
        if last {
            used.insert(p + 1);
            bufs.push(RxBuf { gpa: (p + 1) * PAGE - SPAN_TAIL, len: BUFFER_LEN });
        } else {
            let off = 8 * below(PAGE / 16);
            bufs.push(RxBuf { gpa: p * PAGE + off, len: BUFFER_LEN.min(PAGE - off) });
        }
    }
    bufs
}

/// The 4 KiB pages the buffers lie in, in net_driver's order (its summary's `pages`).
fn pages_of(bufs: &[RxBuf]) -> Vec<u64> {
    let mut v = Vec::new();
    for (i, b) in bufs.iter().enumerate() {
        v.push(b.gpa / PAGE * PAGE);
        if i + 1 == bufs.len() {
            v.push((b.gpa / PAGE + 1) * PAGE);
        }
    }
    v
}

/// dpdk-testpmd serving `sock`: two lcores, no huge pages, no shared files or telemetry socket,
/// no PCI, a small mbuf pool, txonly forwarding (started by "start" on its stdin), and
/// `--no-mlockall` (mlockall() would populate guest RAM before its userfaultfd exists).
pub fn testpmd_command(sock: &Path) -> Command {
    let peer: Vec<String> = PEER_MAC.iter().map(|b| format!("{b:02x}")).collect();
    let mut c = Command::new("dpdk-testpmd");
    c.args(["-l", "0-1", "--no-huge", "-m", "128", "--no-shconf", "--no-telemetry", "--no-pci"])
        .arg("--vdev")
        .arg(format!("net_vhost0,iface={},postcopy-support=1", sock.display()))
        .args(["--", "-i", "--forward-mode=txonly", "--total-num-mbufs=2048", "--no-mlockall"])
        .arg(format!("--eth-peer=0,{}", peer.join(":")));
    c
}

/// net_driver against testpmd on `sock`: it registers the backend, then waits for its go (a line
/// on stdin) before the ack.
pub fn driver_command(d: &DpdkPlan, sock: &Path, ctl: &Path) -> Command {
    let mut c = Command::new(examples_dir().join("net_driver"));
    c.arg("--socket").arg(sock).arg("--control").arg(ctl).args(["--name", BACKEND]);
    c.args(["--buffers", &d.bufs.len().to_string(), "--seed", &d.seed.to_string(), "--pause-before-ack"]);
    c
}

/// Whether the driver printed phase `name` (`rx-posted`: start testpmd's traffic; `rx-done`:
/// stop it, so it does not busy-poll a core for the rest of the run).
pub fn phase(lines: &[String], name: &str) -> bool {
    lines.iter().any(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["phase"] == name))
}

/// The MAC address testpmd gave port 0 ("Port 0: 56:48:4F:53:54:00" on its stdout).
fn port_mac(out: &str) -> Option<Vec<u8>> {
    let line = out.lines().find_map(|l| l.strip_prefix("Port 0: "))?;
    line.trim().split(':').map(|h| u8::from_str_radix(h, 16).ok()).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()).collect()
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// What testpmd's txonly mode sends: a 12-byte virtio_net_hdr without offloads (num_buffers 1),
/// an Ethernet frame to [`PEER_MAC`] from the port's MAC with IPv4 (valid header checksum,
/// 198.18.0.1 -> 198.18.0.2) and UDP (9 -> 9), lengths matching. Returns what is wrong.
fn txonly_packet_error(bytes: &[u8], mac: Option<&[u8]>) -> Option<String> {
    if bytes.len() < NET_HDR_LEN + 14 + 20 + 8 {
        return Some(format!("{} bytes are no UDP packet", bytes.len()));
    }
    let f = &bytes[NET_HDR_LEN..];
    let ip = &f[14..34];
    let sum: u32 = (0..20).step_by(2).map(|i| u32::from(be16(ip, i))).sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let udp = &f[34..];
    let checks: [(&str, bool); 12] = [
        ("virtio_net_hdr without offloads", bytes[..10] == [0u8; 10]),
        ("num_buffers 1", u16::from_le_bytes([bytes[10], bytes[11]]) == 1),
        ("destination MAC", f[0..6] == PEER_MAC),
        ("source MAC (testpmd's port 0)", mac.is_none_or(|m| f[6..12] == *m)),
        ("ethertype IPv4", be16(f, 12) == 0x0800),
        ("IPv4 without options", ip[0] == 0x45),
        ("IPv4 total length", be16(ip, 2) as usize == f.len() - 14),
        ("protocol UDP", ip[9] == 17),
        ("IPv4 header checksum", (folded & 0xffff) + (folded >> 16) == 0xffff),
        ("addresses 198.18.0.1 -> 198.18.0.2", ip[12..20] == [198, 18, 0, 1, 198, 18, 0, 2]),
        ("UDP ports 9 -> 9", (be16(udp, 0), be16(udp, 2)) == (9, 9)),
        ("UDP length", be16(udp, 4) as usize == f.len() - 34),
    ];
    checks.iter().find(|c| !c.1).map(|c| format!("not a txonly packet: {} wrong", c.0))
}

/// Check the driver's summary: POSTCOPY_END went through, the driver posted the planned buffers
/// (the pages the generator took), and testpmd wrote a well-formed packet into every one.
/// `testpmd_out` is testpmd's stdout. Returns the number of buffers checked.
pub fn check(i: usize, d: &DpdkPlan, lines: &[String], testpmd_out: &str, errs: &mut Vec<String>) -> u64 {
    let who = format!("client #{i} (net_driver + dpdk-testpmd)");
    let Some(summary) = lines.iter().rev().find_map(|l| serde_json::from_str::<Value>(l).ok()) else {
        errs.push(format!("{who} printed no summary"));
        return 0;
    };
    if summary["pagefault"] != true {
        errs.push(format!("{who}: testpmd did not offer PAGEFAULT"));
    }
    if summary["postcopy_end"] != "ok" {
        errs.push(format!("{who}: POSTCOPY_END to testpmd: {}", summary["postcopy_end"]));
    }
    let pages: Vec<u64> =
        summary["pages"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
    if pages != pages_of(&d.bufs) {
        errs.push(format!(
            "{who}: the driver's buffers lie in pages {pages:x?}, the plan took {:x?} (dpdk::buffers no longer matches net_driver)",
            pages_of(&d.bufs)
        ));
        return 0;
    }
    let mac = port_mac(testpmd_out);
    if mac.is_none() {
        errs.push(format!("{who}: testpmd printed no MAC address of port 0"));
    }
    let rx = summary["rx"].as_array().map(Vec::as_slice).unwrap_or_default();
    if rx.len() != d.bufs.len() {
        errs.push(format!("{who}: testpmd used {} of {} receive buffers", rx.len(), d.bufs.len()));
    }
    let mut checked = 0;
    for (r, b) in rx.iter().zip(&d.bufs) {
        let (gpa, n) = (r["gpa"].as_u64().unwrap_or(0), r["written"].as_u64().unwrap_or(0));
        let data = unhex(r["bytes"].as_str().unwrap_or(""));
        let wrong = if gpa != b.gpa || r["len"].as_u64() != Some(b.len) {
            Some(format!("buffer at {gpa:#x}+{}, the plan's is {:#x}+{}", r["len"], b.gpa, b.len))
        } else if n > b.len || data.len() as u64 != n {
            Some(format!("{n} bytes written into a {}-byte buffer ({} reported)", b.len, data.len()))
        } else {
            txonly_packet_error(&data, mac.as_deref())
        };
        if let Some(w) = wrong {
            errs.push(format!("{who}: receive buffer {:#x}: {w}", b.gpa));
        }
        checked += 1;
    }
    checked
}
