//! DPDK (dpdk-testpmd with its vhost-user PMD, from Debian's dpdk-dev) as a real third-party
//! vhost-user backend under postcopy, with a broker process restoring lazily from an image and
//! the net_driver example playing the VMM:
//! - the postcopy handshake: PAGEFAULT offered with `postcopy-support=1`, DPDK's real mapping
//!   bases (no correction), registration with the broker before the ack, POSTCOPY_END;
//! - DPDK's forwarding thread writes packets (txonly) into receive buffers in guest pages that
//!   have not arrived: it faults, the broker serves the image's bytes, and every byte of those
//!   pages outside the packet equals the image;
//! - DPDK without `postcopy-support=1` is refused before anything is touched;
//! - DPDK with mlockall() (testpmd without `--no-mlockall`) populates guest RAM before its
//!   userfaultfd exists: the registration is refused before the ack, and no client reads zeros.
//!
//! One testpmd runs at a time (its forwarding thread busy-polls a core while it forwards).

mod common;

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::vhost::{client, examples_dir, fnv, JsonLines, Setup, PAGE};

const RAM: u64 = 16 << 20;
/// The Ethernet destination testpmd's txonly mode is told to use.
const PEER_MAC: [u8; 6] = [0x02, 0x50, 0x43, 0x42, 0x00, 0x01];
/// Name of the backend's client in the broker.
const BACKEND: &str = "dpdk";

static ONE_TESTPMD: Mutex<()> = Mutex::new(());

/// How testpmd is started.
#[derive(Debug, Clone, Copy)]
struct TestpmdOpts {
    /// `postcopy-support=1` on the vhost vdev (PAGEFAULT is offered only then).
    postcopy: bool,
    /// Let testpmd call mlockall() (its default); otherwise `--no-mlockall`.
    mlockall: bool,
}

const POSTCOPY: TestpmdOpts = TestpmdOpts { postcopy: true, mlockall: false };

/// A running dpdk-testpmd (in `Setup::kids`, killed with it): its vhost-user socket, its pid,
/// its command line on stdin, its log.
struct Testpmd {
    socket: PathBuf,
    pid: u32,
    stdin: ChildStdin,
    log: PathBuf,
}

impl Testpmd {
    /// Two lcores pinned to the machine's two cores, no huge pages, no shared files or telemetry
    /// socket (nothing is left in /var/run/dpdk when it is killed), no PCI, a small mbuf pool;
    /// txonly forwarding, started and stopped by [`Testpmd::command`].
    fn spawn(s: &mut Setup, o: TestpmdOpts) -> Testpmd {
        let socket = s.path("dpdk.sock");
        let log = s.path("testpmd.log");
        let mut vdev = format!("net_vhost0,iface={}", socket.display());
        if o.postcopy {
            vdev.push_str(",postcopy-support=1");
        }
        let peer: Vec<String> = PEER_MAC.iter().map(|b| format!("{b:02x}")).collect();
        let mut cmd = Command::new("dpdk-testpmd");
        cmd.args(["-l", "0-1", "--no-huge", "-m", "128", "--no-shconf", "--no-telemetry", "--no-pci"])
            .arg("--log-level=lib.vhost.config:debug")
            .arg("--vdev")
            .arg(vdev)
            .args(["--", "-i", "--forward-mode=txonly", "--total-num-mbufs=2048"])
            .arg(format!("--eth-peer=0,{}", peer.join(":")));
        if !o.mlockall {
            cmd.arg("--no-mlockall");
        }
        // testpmd prints on stdout, DPDK's log (every vhost-user message) goes to stderr.
        let file = fs::File::create(&log).unwrap();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("dpdk-testpmd (Debian's dpdk-dev; scripts/setup.sh installs it)");
        let stdin = child.stdin.take().unwrap();
        let pid = child.id();
        s.kids.push(child);
        let t = Instant::now();
        while !socket.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "testpmd never created {}:\n{}",
                socket.display(),
                fs::read_to_string(&log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
        Testpmd { socket, pid, stdin, log }
    }

    /// A line for testpmd's command prompt ("start", "stop").
    fn command(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The MAC address testpmd gave port 0 ("Port 0: 56:48:4F:53:54:00").
    fn port_mac(&self) -> [u8; 6] {
        let log = self.log();
        let line =
            log.lines().find_map(|l| l.strip_prefix("Port 0: ")).expect("testpmd printed port 0's MAC");
        let v: Vec<u8> = line.trim().split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
        v.try_into().unwrap()
    }
}

/// The net_driver example against testpmd, with the broker at `ctl.sock`: its index in
/// `s.kids` and its stdout.
fn net_driver(s: &mut Setup, tp: &Testpmd, extra: &[&str]) -> (usize, JsonLines) {
    s.wait_for(&s.path("ctl.sock"), "the broker's control socket");
    let mut child = Command::new(examples_dir().join("net_driver"))
        .arg("--socket")
        .arg(&tp.socket)
        .arg("--control")
        .arg(s.path("ctl.sock"))
        .args(["--name", BACKEND])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(s.path("driver.err")).unwrap())
        .spawn()
        .unwrap();
    let out = JsonLines::new(&mut child);
    (s.adopt(child), out)
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// What testpmd's txonly mode sends, checked field by field: a 12-byte virtio_net_hdr with no
/// offloads and num_buffers 1, then an Ethernet frame to [`PEER_MAC`] from the port's MAC
/// carrying IPv4 (valid header checksum, 198.18.0.1 -> 198.18.0.2) and UDP (port 9 -> 9) whose
/// lengths match the frame. Returns the frame length.
fn check_txonly_packet(bytes: &[u8], port_mac: [u8; 6]) -> usize {
    assert!(bytes.len() >= 12 + 14 + 20 + 8, "{} bytes are no UDP packet", bytes.len());
    assert_eq!(&bytes[..10], &[0u8; 10], "virtio_net_hdr with offloads");
    assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), 1, "num_buffers");
    let f = &bytes[12..];
    assert_eq!(&f[0..6], &PEER_MAC, "destination MAC");
    assert_eq!(&f[6..12], &port_mac, "source MAC");
    assert_eq!(be16(f, 12), 0x0800, "ethertype");
    let ip = &f[14..34];
    assert_eq!(ip[0], 0x45, "IPv4 without options");
    assert_eq!(be16(ip, 2) as usize, f.len() - 14, "IPv4 total length");
    assert_eq!(ip[9], 17, "UDP");
    let sum: u32 = (0..20).step_by(2).map(|i| u32::from(be16(ip, i))).sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    assert_eq!((folded & 0xffff) + (folded >> 16), 0xffff, "IPv4 header checksum");
    assert_eq!(&ip[12..16], &[198, 18, 0, 1], "source address");
    assert_eq!(&ip[16..20], &[198, 18, 0, 2], "destination address");
    let udp = &f[34..];
    assert_eq!((be16(udp, 0), be16(udp, 2)), (9, 9), "UDP ports");
    assert_eq!(be16(udp, 4) as usize, f.len() - 34, "UDP length");
    f.len()
}

/// Where process `pid` maps something at exactly `addr`: the path column of /proc/PID/maps.
fn mapping_at(pid: u32, addr: u64) -> Option<String> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let start = format!("{addr:x}-");
    maps.lines()
        .find(|l| l.starts_with(&start))
        .map(|l| l.split_whitespace().skip(5).collect::<Vec<_>>().join(" "))
}

fn as_u64s(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// pcb-client reads `pages` of block "ram" (bounded); returns each page's FNV-1a as it read it.
fn client_reads(s: &mut Setup, pages: &[u64]) -> Vec<String> {
    let list: Vec<String> = pages.iter().map(u64::to_string).collect();
    let mut c = Command::new(env!("CARGO_BIN_EXE_pcb-client"))
        .arg("--control")
        .arg(s.path("ctl.sock"))
        .args(["--block", "ram", "--no-wait", "--script"])
        .arg(format!("touch:{}", list.join(",")))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = JsonLines::new(&mut c);
    let c = s.adopt(c);
    let step = out.next_with("pages", 60);
    assert!(s.wait_kid(c, 60, "pcb-client").success());
    step["pages"].as_array().unwrap().iter().map(|p| p["fnv"].as_str().unwrap().to_string()).collect()
}

/// The handshake against DPDK: PAGEFAULT is offered, DPDK reports the bases where it really maps
/// guest RAM (nothing to correct, unlike libvhost-user), it is a registered client of the broker
/// while it still waits for the ack (its userfaultfd not yet registered), and POSTCOPY_END ends
/// it after every page arrived.
#[test]
fn dpdk_postcopy_handshake_reports_its_real_bases() {
    let _one = ONE_TESTPMD.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Setup::new("dpdk-hs");
    let serve = s.serve(&["--no-background"]);
    let tp = Testpmd::spawn(&mut s, POSTCOPY);
    let (drv, out) = net_driver(&mut s, &tp, &["--buffers", "0", "--pause-before-ack", "--touch-all"]);
    let reg = out.next_with("phase", 60);
    assert_eq!(reg["phase"], "registered");
    let hs = &reg["handshake"];
    assert_eq!(hs["corrected"], 0, "{hs}");
    assert_eq!(hs["client_addrs"], hs["reported_bases"]);
    assert_eq!(hs["backend_pid"], tp.pid);
    let (reported, frontend) = (as_u64s(&hs["reported_bases"]), as_u64s(&hs["frontend_addrs"]));
    assert_eq!(reported.len(), 2, "guest RAM and the driver block");
    for (base, ours) in reported.iter().zip(&frontend) {
        assert_ne!(base, ours, "DPDK reported the frontend's address");
        let what = mapping_at(tp.pid, *base).unwrap_or_else(|| panic!("testpmd maps nothing at {base:#x}"));
        assert!(what.contains("memfd:"), "testpmd maps {what} at {base:#x}");
    }
    // Registered before the ack: the broker knows DPDK, which has not registered its uffd yet.
    let st = s.status();
    let be = client(&st, BACKEND);
    assert_eq!(be["stats"]["faults"], 0, "{st}");
    assert_eq!(st["broker"]["clients_registered"], 2, "{st}");
    let log = tp.log();
    assert!(log.contains("read message VHOST_USER_SET_MEM_TABLE"), "{log}");
    assert!(!log.contains("userfaultfd registered"), "DPDK registered before the ack:\n{log}");
    s.say(drv, "go");
    let summary = out.next_with("summary", 120);
    assert!(s.wait_kid(drv, 60, "net_driver").success(), "{}", s.log("driver.err"));
    s.wait_serve(serve);
    assert_eq!(summary["pagefault"], true);
    assert_eq!(summary["postcopy_end"], "ok");
    assert_eq!(summary["ram_checksums"]["ram"]["fnv"], fnv(&s.image).as_str());
    s.check_broker_sums();
    let log = tp.log();
    assert_eq!(log.matches("userfaultfd registered for range").count(), 2, "one per region:\n{log}");
    assert!(log.contains("read message VHOST_USER_POSTCOPY_END"), "{log}");
}

/// testpmd's forwarding thread writes packets into receive buffers posted in guest pages that
/// have not arrived (no background fill): DPDK faults on each, the broker fetches it from the
/// image, and afterwards each page holds the image's bytes except exactly the bytes DPDK wrote,
/// which are a well-formed txonly packet.
#[test]
fn dpdk_writes_packets_into_pages_that_have_not_arrived() {
    let _one = ONE_TESTPMD.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Setup::new("dpdk-rx");
    let serve = s.serve(&["--no-background"]);
    let mut tp = Testpmd::spawn(&mut s, POSTCOPY);
    let dump = s.path("rx-pages");
    let args = ["--buffers", "32", "--pause-after-rx", "--touch-all", "--dump", dump.to_str().unwrap()];
    let (drv, out) = net_driver(&mut s, &tp, &args);
    let posted = out.next_with("buffers", 60);
    assert_eq!(posted["phase"], "rx-posted");
    assert_eq!(s.status()["received_pages"], 0, "a receive page arrived before DPDK wrote it");
    tp.command("start");
    let done = out.next_with("used", 120);
    tp.command("stop");
    assert_eq!(done["used"], 32);
    // DPDK faulted on each of the 33 pages (the last buffer spans two), and only on those.
    let st = s.status();
    let be = &client(&st, BACKEND)["stats"];
    assert_eq!(be["pages_requested"], 33, "{st}");
    assert!(be["faults"].as_u64().unwrap() >= 33, "{st}");
    assert_eq!(be["unmapped_faults"], 0, "{st}");
    assert_eq!(st["received_pages"], 33, "{st}");
    assert_eq!(st["broker"]["pages_background"], 0, "{st}");
    s.say(drv, "go");
    let summary = out.next_with("summary", 120);
    assert!(s.wait_kid(drv, 60, "net_driver").success(), "{}", s.log("driver.err"));
    s.wait_serve(serve);
    assert_eq!(summary["postcopy_end"], "ok");

    // Every used buffer holds a txonly packet; its page holds the image's bytes around it.
    let mac = tp.port_mac();
    let pages = as_u64s(&summary["pages"]);
    assert_eq!(pages.len(), 33);
    let bytes = fs::read(&dump).unwrap();
    assert_eq!(bytes.len(), pages.len() * PAGE as usize);
    let mut expect = s.image.clone();
    let rx = summary["rx"].as_array().unwrap();
    assert_eq!(rx.len(), 32);
    let mut written = vec![false; bytes.len()];
    for r in rx {
        let (gpa, len, n) =
            (r["gpa"].as_u64().unwrap(), r["len"].as_u64().unwrap(), r["written"].as_u64().unwrap());
        let data = unhex(r["bytes"].as_str().unwrap());
        assert_eq!(data.len() as u64, n);
        assert!(n <= len);
        let frame = check_txonly_packet(&data, mac);
        assert_eq!((r["num_buffers"].clone(), r["gso_type"].clone()), (1.into(), 0.into()), "{r}");
        assert_eq!(n as usize, 12 + frame);
        expect[gpa as usize..(gpa + n) as usize].copy_from_slice(&data);
        for a in gpa..gpa + n {
            let i =
                pages.iter().position(|p| a / PAGE == p / PAGE).expect("a buffer outside the reported pages");
            written[i * PAGE as usize + (a % PAGE) as usize] = true;
        }
    }
    let mut changed = 0;
    for (i, p) in pages.iter().enumerate() {
        let got = &bytes[i * PAGE as usize..(i + 1) * PAGE as usize];
        let src = &s.image[*p as usize..(*p + PAGE) as usize];
        for (j, (a, b)) in got.iter().zip(src).enumerate() {
            if !written[i * PAGE as usize + j] {
                assert_eq!(a, b, "page {p:#x} byte {j}: not the source's byte (zero-filled, not fetched?)");
            }
        }
        changed += usize::from(got != src);
        assert_eq!(got, &expect[*p as usize..(*p + PAGE) as usize]);
    }
    assert_eq!(changed, pages.len(), "DPDK changed every page it wrote into");
    // The broker's RAM at the end: the image with the packets on top, as the driver saw it too.
    let sums: serde_json::Value = serde_json::from_slice(&fs::read(s.path("sums.json")).unwrap()).unwrap();
    assert_eq!(sums["ram"], fnv(&expect).as_str());
    assert_eq!(summary["ram_checksums"]["ram"]["fnv"], fnv(&expect).as_str());
}

/// Without `postcopy-support=1` DPDK does not offer PAGEFAULT: the driver refuses it before it
/// maps or registers anything, naming the feature and the socket; DPDK never hears of postcopy.
#[test]
fn dpdk_without_postcopy_support_is_refused_before_anything_is_touched() {
    let _one = ONE_TESTPMD.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Setup::new("dpdk-nopc");
    let serve = s.serve(&["--no-background"]);
    let tp = Testpmd::spawn(&mut s, TestpmdOpts { postcopy: false, mlockall: false });
    let (drv, _out) = net_driver(&mut s, &tp, &["--buffers", "4"]);
    assert!(!s.wait_kid(drv, 60, "net_driver").success());
    let err = s.log("driver.err");
    assert!(err.contains("PAGEFAULT") && err.contains(&tp.socket.display().to_string()), "{err}");
    let st = s.status();
    assert_eq!(st["broker"]["clients_registered"], 0, "{st}");
    assert_eq!(st["received_pages"], 0, "{st}");
    let log = tp.log();
    assert!(log.contains("read message VHOST_USER_GET_PROTOCOL_FEATURES"), "{log}");
    for msg in ["POSTCOPY_ADVISE", "SET_MEM_TABLE", "SET_FEATURES"] {
        assert!(!log.contains(&format!("VHOST_USER_{msg}")), "DPDK got {msg}:\n{log}");
    }
    assert!(s.kids[serve].try_wait().unwrap().is_none(), "the broker went away");
}

/// testpmd calls mlockall() unless told --no-mlockall: its SET_MEM_TABLE mapping is populated
/// with zero pages before its userfaultfd exists. The broker refuses to register it (before the
/// ack: DPDK never registers its uffd), the driver fails with an error that names the cause and
/// the fix, and the pages DPDK populated do not stay zero for anyone: a client then reads the
/// image's bytes and the restore ends equal to the image.
#[test]
fn dpdk_with_mlockall_is_refused_before_the_ack() {
    let _one = ONE_TESTPMD.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Setup::new("dpdk-mlock");
    let serve = s.serve(&["--no-background"]);
    let tp = Testpmd::spawn(&mut s, TestpmdOpts { postcopy: true, mlockall: true });
    let (drv, _out) = net_driver(&mut s, &tp, &["--buffers", "4", "--rx-timeout", "10"]);
    assert!(!s.wait_kid(drv, 120, "net_driver").success(), "the driver went on with a populated backend");
    let err = s.log("driver.err");
    for word in ["populated", "--no-mlockall", "mlock"] {
        assert!(err.contains(word), "the error does not say {word:?}:\n{err}");
    }
    let log = tp.log();
    assert!(!log.contains("userfaultfd registered"), "DPDK got the ack:\n{log}");
    let st = s.status();
    let registered = st["clients"].as_array().unwrap();
    assert!(registered.iter().all(|c| c["name"] != BACKEND), "DPDK stayed registered: {st}");
    // Nobody reads zeros: non-zero image pages read as the image, then every page arrives.
    let probe: Vec<u64> = (0..RAM / PAGE).filter(|p| p % 4 != 3).step_by(97).collect();
    let want: Vec<String> =
        probe.iter().map(|p| fnv(&s.image[(p * PAGE) as usize..((p + 1) * PAGE) as usize])).collect();
    assert_eq!(client_reads(&mut s, &probe), want, "a client read zeros DPDK's mlockall populated");
    s.run_client(&format!("touch:0-{}", RAM / PAGE - 1));
    s.wait_serve(serve);
    s.check_broker_sums();
}
