//! vhost-user-blk end to end: the example backend and qemu-storage-daemon (libvhost-user) as real
//! processes, the guest driver example and the library frontend against each; the postcopy
//! handshake up to a real fault of the backend resolved through its own userfaultfd.

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use postcopy_broker::ram::RamBlock;
use postcopy_broker::uffd::{message_buffer, Message, Uffd};
use postcopy_broker::vhost_user::blk::{fnv1a64, DRIVER_FEATURES, FNV_OFFSET, SECTOR_SIZE};
use postcopy_broker::vhost_user::{
    postcopy, BackendConn, BlkConfig, BlkDriver, BlkRequest, BlkRequestKind, GuestRam, Negotiation,
};
use postcopy_broker::Error;
use vhost::vhost_user::message::VhostUserProtocolFeatures;

const DISK_SIZE: u64 = 16 << 20;
const PAGE: u64 = 4096;

fn examples_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("examples")
}

fn work_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pcb-vhost-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// A spawned backend process, killed on drop.
struct Backend {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    disk: PathBuf,
    log: PathBuf,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Backend {
    fn wait_ready(self) -> Backend {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "backend socket {} never appeared; log:\n{}",
                self.socket.display(),
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
        self
    }

    /// The disk file bytes of `sectors` at `first`.
    fn disk_bytes(&self, first: u64, sectors: u64) -> Vec<u8> {
        let f = fs::File::open(&self.disk).unwrap();
        let mut buf = vec![0u8; (sectors * SECTOR_SIZE) as usize];
        f.read_exact_at(&mut buf, first * SECTOR_SIZE).unwrap();
        buf
    }
}

fn spawn_ours(dir: &Path, extra: &[&str]) -> Backend {
    let socket = dir.join("vub.sock");
    let disk = dir.join("disk.img");
    let log = dir.join("backend.log");
    let child = Command::new(examples_dir().join("vhost_user_blk"))
        .arg("--socket")
        .arg(&socket)
        .arg("--disk")
        .arg(&disk)
        .arg("--size")
        .arg(DISK_SIZE.to_string())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("build the examples (cargo test builds them)");
    Backend { child, dir: dir.to_path_buf(), socket, disk, log }.wait_ready()
}

fn spawn_qsd(dir: &Path) -> Backend {
    let socket = dir.join("qsd.sock");
    let disk = dir.join("disk.img");
    let log = dir.join("qsd.log");
    fs::File::create(&disk).unwrap().set_len(DISK_SIZE).unwrap();
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=disk,filename={}", disk.display()))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ))
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("qemu-storage-daemon is installed on these machines");
    Backend { child, dir: dir.to_path_buf(), socket, disk, log }.wait_ready()
}

/// Run the guest driver example against `b` and return its JSON summary.
fn run_driver(b: &Backend, args: &[&str]) -> serde_json::Value {
    let out = Command::new(examples_dir().join("guest_driver"))
        .arg("--socket")
        .arg(&b.socket)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "guest driver failed: {}\nbackend log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        fs::read_to_string(&b.log).unwrap_or_default()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The driver verified every read against what it wrote; check the disk file holds the same
/// region it read back, and that the workload really wrote.
fn check_summary(b: &Backend, s: &serde_json::Value, requests: u64) {
    assert_eq!(s["writes"], requests);
    assert!(s["bytes_written"].as_u64().unwrap() >= requests * SECTOR_SIZE);
    assert!(s["reads"].as_u64().unwrap() > requests);
    assert_eq!(s["capacity_sectors"], DISK_SIZE / SECTOR_SIZE);
    assert_eq!(s["flushed"], true);
    let first = s["first_sector"].as_u64().unwrap();
    let sectors = s["sectors"].as_u64().unwrap();
    let disk = b.disk_bytes(first, sectors);
    assert!(disk.iter().any(|&x| x != 0), "the disk region is still all zero");
    let sum = format!("{:#018x}", fnv1a64(FNV_OFFSET, &disk));
    assert_eq!(s["checksum"], sum, "disk file differs from what the device read back");
}

#[test]
fn driver_against_example_backend() {
    let dir = work_dir("ours");
    let b = spawn_ours(&dir, &[]);
    let s =
        run_driver(&b, &["--requests", "48", "--seed", "11", "--first-sector", "100", "--sectors", "1500"]);
    check_summary(&b, &s, 48);
    assert_eq!(s["first_sector"], 100);
    assert_eq!(s["serial"], "pcb-vublk");
    assert_eq!(s["pagefault"], true);
    // The backend serves a second connection after the first one closed.
    let s2 = run_driver(&b, &["--requests", "8", "--seed", "12"]);
    check_summary(&b, &s2, 8);
}

#[test]
fn driver_against_qemu_storage_daemon() {
    let dir = work_dir("qsd");
    let b = spawn_qsd(&dir);
    let s = run_driver(&b, &["--requests", "48", "--seed", "21", "--max-request-sectors", "32"]);
    check_summary(&b, &s, 48);
    assert!(s["serial"].is_string(), "GET_ID answered: {}", s["serial"]);
    assert_eq!(s["pagefault"], true);
}

#[test]
fn no_pagefault_flag_withholds_the_feature_and_postcopy_refuses() {
    let dir = work_dir("nopf");
    let b = spawn_ours(&dir, &["--no-pagefault"]);
    let mut conn = BackendConn::connect(&b.socket, &Negotiation::default()).unwrap();
    assert!(!conn.offered_protocol().contains(VhostUserProtocolFeatures::PAGEFAULT));
    assert!(conn.offered_protocol().contains(VhostUserProtocolFeatures::REPLY_ACK));
    // Straight from the frontend as well.
    use vhost::vhost_user::VhostUserFrontend;
    let raw = conn.frontend_mut().get_protocol_features().unwrap();
    assert!(!raw.contains(VhostUserProtocolFeatures::PAGEFAULT));

    let block = Arc::new(RamBlock::memfd("nopf", 4 << 20).unwrap());
    let mut ram = GuestRam::new();
    ram.add(0, block).unwrap();
    let err = postcopy::handshake(&mut conn, &ram.mem_regions()).unwrap_err();
    assert!(matches!(err, Error::BackendFeature { feature, .. } if feature.contains("PAGEFAULT")), "{err}");
    assert!(err.to_string().contains("postcopy"), "{err}");
    // Nothing was sent: the connection still works normally.
    conn.set_features(DRIVER_FEATURES).unwrap();
    conn.set_mem_table(&ram.mem_regions()).unwrap();
    assert_eq!(BlkConfig::read(&mut conn).unwrap().capacity_sectors, DISK_SIZE / SECTOR_SIZE);

    // Control: the same backend without the flag offers it.
    let dir2 = work_dir("pf");
    let b2 = spawn_ours(&dir2, &[]);
    let conn2 = BackendConn::connect(&b2.socket, &Negotiation::default()).unwrap();
    assert!(conn2.acked_protocol().contains(VhostUserProtocolFeatures::PAGEFAULT));
    postcopy::check_capable(&conn2).unwrap();
}

#[test]
fn postcopy_handshake_via_driver_example_backend() {
    let dir = work_dir("pc-ours");
    let b = spawn_ours(&dir, &[]);
    let s = run_driver(&b, &["--requests", "24", "--seed", "31", "--postcopy-handshake"]);
    check_summary(&b, &s, 24);
    let pc = &s["handshake"];
    // rust-vmm reports its real bases.
    assert_eq!(pc["corrected"], 0);
    assert_eq!(pc["client_addrs"], pc["reported_bases"]);
}

#[test]
fn postcopy_handshake_via_driver_qemu_storage_daemon() {
    let dir = work_dir("pc-qsd");
    let b = spawn_qsd(&dir);
    let s = run_driver(&b, &["--requests", "24", "--seed", "41", "--postcopy-handshake"]);
    check_summary(&b, &s, 24);
    let pc = &s["handshake"];
    // libvhost-user echoes the frontend's addresses; the handshake found the real base.
    assert_eq!(pc["reported_bases"], pc["frontend_addrs"]);
    assert_eq!(pc["corrected"], 2); // the migrated RAM and the driver block
    assert_ne!(pc["client_addrs"], pc["reported_bases"]);
}

/// Full handshake in-process, then a write whose data page is missing: the backend faults on its
/// own uffd at exactly the corrected base + offset; the page is placed through the frontend's
/// mapping and the backend woken; the write lands on disk.
fn backend_fault_on_missing_page(b: &Backend) {
    const RAM: u64 = 8 << 20;
    const DATA: u64 = 0x40_0000; // the missing page
    const SECTOR: u64 = 77;
    let block = Arc::new(RamBlock::memfd("fault", RAM).unwrap());
    let mut ram = GuestRam::new();
    ram.add(0, block).unwrap();
    // Everything present except the data page.
    ram.fill(0, DATA, 0).unwrap();
    ram.fill(DATA + PAGE, RAM - DATA - PAGE, 0).unwrap();

    let mut conn = BackendConn::connect(&b.socket, &Negotiation::default()).unwrap();
    conn.set_features(DRIVER_FEATURES).unwrap();
    let regions = ram.mem_regions();
    let pc = postcopy::handshake(&mut conn, &regions).unwrap();
    assert_eq!(pc.mappings.len(), 1);
    let client = pc.mappings[0];
    assert_eq!((client.guest_phys_addr, client.block_offset, client.len), (0, 0, RAM));
    drop(regions);
    let mut drv = BlkDriver::start(&mut conn, &ram, 0x1_0000, 0x2_0000, 64).unwrap();

    let ram2 = ram.clone();
    let writer = thread::spawn(move || {
        let req = BlkRequest { kind: BlkRequestKind::Out, sector: SECTOR, data: vec![(DATA, PAGE as u32)] };
        drv.submit_ok(&ram2, &[req]).map(|_| drv)
    });

    let uffd = Uffd::adopt(pc.uffd);
    let mut msgs = message_buffer(8);
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        assert!(
            Instant::now() < deadline,
            "the backend never faulted; log:\n{}",
            fs::read_to_string(&b.log).unwrap()
        );
        let mut fds = [PollFd::new(uffd_fd(&uffd), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(100u16)).unwrap();
        let n = uffd.read_messages(&mut msgs).unwrap();
        if let Some(Message::Pagefault { addr, .. }) = msgs[..n].iter().map(Message::decode).next() {
            break addr;
        }
    };
    assert_eq!(addr & !(PAGE - 1), client.client_addr + DATA, "fault address outside the corrected mapping");

    let data: Vec<u8> = (0..PAGE).map(|i| (i * 7 + 3) as u8).collect();
    ram.write(DATA, &data).unwrap();
    uffd.wake(client.client_addr + DATA, PAGE).unwrap();
    let _drv = writer.join().unwrap().unwrap();
    assert_eq!(b.disk_bytes(SECTOR, PAGE / SECTOR_SIZE), data);
    postcopy::end(&mut conn).unwrap();
}

fn uffd_fd(u: &Uffd) -> std::os::fd::BorrowedFd<'_> {
    u.as_fd()
}

#[test]
fn postcopy_fault_example_backend() {
    let dir = work_dir("fault-ours");
    let b = spawn_ours(&dir, &[]);
    backend_fault_on_missing_page(&b);
}

#[test]
fn postcopy_fault_qemu_storage_daemon() {
    let dir = work_dir("fault-qsd");
    let b = spawn_qsd(&dir);
    backend_fault_on_missing_page(&b);
}
