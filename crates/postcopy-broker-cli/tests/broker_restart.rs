//! The destination broker's own death during postcopy (issue #16): `postcopy-broker serve
//! --incoming` runs under `pcb-keeper` (the service manager's part of the fd store protocol:
//! it receives the FDSTORE messages and restarts the broker with LISTEN_FDS / LISTEN_FDNAMES),
//! a `postcopy-broker source` process sends a 256 MiB guest (224 MiB of 4 KiB pages, 32 MiB of
//! 2 MiB pages), two pcb-client processes registered over the control socket read and write
//! pages (one of them also removes 64 pages with MADV_REMOVE before the first kill, 16 of them
//! received, and reads them again at the end: zeros), and the test SIGKILLs the broker at
//! random points of the postcopy phase (when a random share of the pages has arrived). The
//! restarted broker rebuilds the received bitmaps from the parked blocks and their ledgers,
//! takes the clients back from their parked userfaultfds, wakes them, and the source resumes.
//! A VMM runs meanwhile: the `guest_driver` example registers itself and its vhost-user-blk
//! backend (the `vhost_user_blk` example in even runs, qemu-storage-daemon in odd ones) over the
//! control socket and does virtio-blk I/O on migrated pages from before the first kill to the
//! end, so that the backend faults while no broker runs; the driver reconnects and reattaches
//! both registrations after each kill (`BrokerSession`). Every run ends with every byte of the
//! blocks (read through memfds the test got over the control socket) equal to the source plus
//! the clients' writes, the clients' reads equal to the source, the driver's disk holding the
//! source's pages it wrote from, POSTCOPY_END acknowledged by the backend, every client
//! finished (a watchdog fails a hung run), and the counters consistent.
//!
//! The lazy-restore variant runs `postcopy-broker serve --image` under `pcb-keeper` with every
//! kind of client at once: control-socket pcb-clients reading and writing pages (two of them
//! read every page: with no background fill their faults are the fill), a Firecracker-style
//! private client (Firecracker's UFFD handshake) reading random pages and removing a range, and
//! daemon-mode backends (the broker is their frontend): the `vhost_user_blk` example prefaulting
//! (it reads all guest memory from the moment its memory table is in use, so it faults before,
//! across and after every kill, and reports what it read), plus qemu-storage-daemon in odd runs.
//! The restarted broker rebuilds the blocks from their parked fds, takes every client and the
//! backends' connections back, and sends POSTCOPY_END at the end; the private client's removed
//! range still reads zeros, and everything the backend read equals the image. docs/recovery.md has the table these runs produce.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::clients::{control_args, fnv, Peer};
use common::ensure_free_huge_pages;
use common::mig::{contents, Creds, Dir, Rng};
use common::vhost::{client_faults, wait_exit, JsonLines};
use postcopy_broker::control::ControlClient;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_postcopy-broker");
const KEEPER: &str = env!("CARGO_BIN_EXE_pcb-keeper");
const SMALL: usize = 224 << 20;
const HUGE: usize = 32 << 20;
const HPS: usize = 2 << 20;
const TOTAL_PAGES: u64 = (SMALL / 4096 + HUGE / HPS) as u64;
/// The guest driver's disk in the incoming variant.
const DRIVER_DISK: u64 = 64 << 20;
/// Guest RAM from here to the end of pc.ram is the guest driver's: it writes to disk from its
/// pages and reads its mirror into them; the pcb-clients write and remove pages below it only.
const DRIVER_RANGE_GPA: u64 = 32 << 20;
/// Where the guest driver's disk mirrors guest RAM, and how many sectors.
const DRIVER_MIRROR_GPA: u64 = 128 << 20;
const DRIVER_MIRROR_SECTORS: u64 = 4096;

fn list(v: &[u64]) -> String {
    v.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
}

fn pick(r: &mut Rng, n: usize, pages: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).map(|_| r.below(pages)).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Pages a client read, checked against `data` unless `skip` holds them; returns the count.
fn check_reads(lines: &[Value], data: &[u8], ps: usize, skip: &[u64]) -> u64 {
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

/// What the keeper and the broker say on stderr: the keeper's events (JSON) arrive on the
/// channel, everything is kept for the failure message.
struct Keeper {
    child: Child,
    events: Receiver<Value>,
    log: Arc<Mutex<String>>,
    /// The pid of the broker the keeper started last.
    broker: Arc<Mutex<u32>>,
}

impl Keeper {
    /// Run the broker with `args` under a keeper; with `listening`, read the broker's first
    /// stdout line (`listening ADDR`) and return the address.
    fn spawn(
        notify: &str,
        args: &[std::ffi::OsString],
        pids: &Arc<Mutex<Vec<u32>>>,
        listening: bool,
    ) -> (Keeper, Option<String>) {
        Keeper::spawn_with(notify, args, pids, listening, &[])
    }

    /// [`Keeper::spawn`] with more environment for the keeper and so for the broker.
    fn spawn_with(
        notify: &str,
        args: &[std::ffi::OsString],
        pids: &Arc<Mutex<Vec<u32>>>,
        listening: bool,
        env: &[(&str, &str)],
    ) -> (Keeper, Option<String>) {
        let mut child = Command::new(KEEPER)
            .args(["--notify-socket", notify, "--restart-delay-ms", "50", "--", BIN])
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        pids.lock().unwrap().push(child.id());
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(String::new()));
        let broker = Arc::new(Mutex::new(0));
        let (err, log2, pids2, broker2) =
            (child.stderr.take().unwrap(), Arc::clone(&log), Arc::clone(pids), Arc::clone(&broker));
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if let Some(ev) =
                    line.strip_prefix("pcb-keeper: ").and_then(|j| serde_json::from_str::<Value>(j).ok())
                {
                    if let Some(pid) = ev["started"].as_u64() {
                        pids2.lock().unwrap().push(pid as u32);
                        *broker2.lock().unwrap() = pid as u32;
                    }
                    let _ = tx.send(ev);
                }
                let mut g = log2.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let addr = listening.then(|| {
            let mut first = String::new();
            out.read_line(&mut first).unwrap();
            first
                .trim()
                .strip_prefix("listening ")
                .unwrap_or_else(|| panic!("broker said {first:?}"))
                .to_string()
        });
        // The rest of stdout (a second `listening` line per restart, the summary) is not needed:
        // the summary comes as JSON. Drain it so the broker never blocks on a full pipe.
        std::thread::spawn(move || for _ in out.lines() {});
        (Keeper { child, events: rx, log, broker }, addr)
    }

    /// The next event `f` accepts, within `limit`.
    fn wait(&self, limit: Duration, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + limit;
        loop {
            match self.events.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(ev) if f(&ev) => return ev,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    panic!("no keeper event '{what}' within {limit:?}\n{}", self.log.lock().unwrap())
                }
            }
        }
    }
}

/// Kills the run's processes and ends the test binary if a run hangs.
struct Watchdog {
    _tx: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    fn arm(pids: Arc<Mutex<Vec<u32>>>, limit: Duration) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                for &p in pids.lock().unwrap().iter() {
                    // SAFETY: kill(2) with a pid this test spawned.
                    unsafe { libc::kill(p as i32, libc::SIGKILL) };
                }
                eprintln!("broker restart run hung for {limit:?}: killed its processes");
                std::process::exit(101);
            }
        });
        Watchdog { _tx: tx }
    }
}

/// A control connection to whichever broker runs now (reconnecting after a restart).
fn status(sock: &Path, ctl: &mut Option<ControlClient>) -> Option<Value> {
    if ctl.is_none() {
        *ctl = ControlClient::connect(sock).ok();
    }
    match ctl.as_mut()?.status() {
        Ok(v) => Some(v),
        Err(_) => {
            *ctl = None;
            None
        }
    }
}

fn map_bytes(fd: &OwnedFd, len: usize) -> Vec<u8> {
    // SAFETY: a fresh shared read-only mapping of the block's memfd; every page is present now
    // (the migration completed), so reading it allocates nothing; it is unmapped below.
    unsafe {
        let p = nix::sys::mman::mmap(
            None,
            std::num::NonZeroUsize::new(len).unwrap(),
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_SHARED,
            fd.as_fd(),
            0,
        )
        .unwrap();
        let v = std::slice::from_raw_parts(p.as_ptr().cast::<u8>(), len).to_vec();
        nix::sys::mman::munmap(p, len).unwrap();
        v
    }
}

/// Pages of `got` that differ from `want`; the first few are printed (index, and whether the
/// page is all zeros).
fn lost_pages(got: &[u8], want: &[u8], ps: usize) -> u64 {
    let bad: Vec<usize> = got
        .chunks(ps)
        .zip(want.chunks(ps))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    for &i in bad.iter().take(8) {
        let zero = got[i * ps..(i + 1) * ps].iter().all(|&b| b == 0);
        eprintln!("page {i} of a {ps}-byte block differs (zero: {zero})");
    }
    bad.len() as u64
}

#[derive(Default, Debug)]
struct Totals {
    runs: u64,
    kills: u64,
    pages_checked: u64,
    pages_lost: u64,
    client_reads_checked: u64,
    pages_rebuilt: u64,
    clients_adopted: u64,
    faults_rewoken: u64,
    reattached: u64,
    postcopy_end_heard: u64,
    /// Reads of the private (Firecracker-style) client checked (restore variant).
    private_reads_checked: u64,
    /// 4 KiB steps the prefaulting daemon-mode backend read, checked (restore variant).
    backend_reads_checked: u64,
    /// Pages the prefaulting backend asked the last (restarted) broker for (restore variant).
    backend_pages_after_restart: u64,
    /// Reattaches of the guest driver (incoming variant).
    driver_reattaches: u64,
    /// The guest driver's virtio-blk operations on migrated pages during postcopy.
    driver_ops: u64,
    /// Faults of the VMM's backend served by the last broker of each run (after the last kill).
    backend_faults_last_broker: u64,
    /// Threads of the VMM's backend blocked in a fault when a restarted broker woke them.
    backend_blocked_at_restart: u64,
    /// Kill to the restarted broker's READY=1, as the test sees it.
    downtimes_ms: Vec<u64>,
    /// The dead broker's last heartbeat to the new one serving its clients, as the broker says.
    heartbeat_downtimes_ms: Vec<u64>,
}

/// SIGKILL the broker the keeper runs when each share (per mille, increasing) of `total` pages
/// in `at` has arrived, and wait for each restarted broker to say READY (`STATUS=restarted`).
/// `release` runs once, right after the first kill (or at the end if there was none), so that
/// the clients it lets go fault while no broker runs. Returns the downtimes (kill to READY, ms),
/// one per kill.
fn kill_at_points(
    run: u64,
    at: &[u64],
    sock: &Path,
    ctl: &mut Option<ControlClient>,
    keeper: &Keeper,
    total: u64,
    mut release: impl FnMut(),
) -> Vec<u64> {
    let mut broker_pid = u64::from(*keeper.broker.lock().unwrap());
    assert_ne!(broker_pid, 0);
    let mut downtimes = Vec::new();
    for &permille in at {
        let target = total * permille / 1000;
        let late = loop {
            if let Some(s) = status(sock, ctl) {
                let got = s["received_pages"].as_u64().unwrap_or(0);
                if got >= total {
                    break true;
                }
                if got >= target {
                    break false;
                }
            }
            std::thread::sleep(Duration::from_millis(3));
        };
        if late {
            // A starved test process (the machine is shared) can miss the point: the run goes
            // on with the kills done so far, and the totals must still reach 20 kills.
            eprintln!("run {run}: the job ended before the kill at {permille}‰");
            break;
        }
        // SAFETY: kill(2) of the broker this test's keeper started.
        assert_eq!(unsafe { libc::kill(broker_pid as i32, libc::SIGKILL) }, 0);
        let killed = Instant::now();
        *ctl = None;
        if downtimes.is_empty() {
            release();
        }
        let started = keeper.wait(Duration::from_secs(10), "restarted", |e| e["started"].is_u64());
        broker_pid = started["started"].as_u64().unwrap();
        keeper.wait(Duration::from_secs(20), "ready after the restart", |e| {
            e["notify"].as_array().is_some_and(|l| {
                l.iter().any(|x| x.as_str().is_some_and(|s| s.starts_with("STATUS=restarted")))
            })
        });
        downtimes.push(killed.elapsed().as_millis() as u64);
    }
    if downtimes.is_empty() {
        release();
    }
    downtimes
}

/// The start of a kill run (both variants): huge pages for the 32 MiB block, the kill points
/// (when this share, per mille, of the pages has arrived, increasing; once, or in a quarter of
/// the runs twice), the list of the run's pids and the watchdog over them.
fn begin_run(rng: &mut Rng) -> (Vec<u64>, Arc<Mutex<Vec<u32>>>, Watchdog) {
    ensure_free_huge_pages(24);
    let planned = if rng.below(4) == 0 { 2 } else { 1 };
    let mut at: Vec<u64> = (0..planned).map(|_| 30 + rng.below(720)).collect();
    at.sort_unstable();
    let pids = Arc::new(Mutex::new(Vec::new()));
    let dog = Watchdog::arm(Arc::clone(&pids), Duration::from_secs(90));
    (at, pids, dog)
}

#[allow(clippy::too_many_arguments)]
fn kill_run(run: u64, rng: &mut Rng, dir: &Dir, creds: &Creds, ram: &[u8], hram: &[u8], t: &mut Totals) {
    let (at, pids, _dog) = begin_run(rng);
    let sock = dir.path(&format!("ctl-{run}.sock"));
    let summary_path = dir.path(&format!("summary-{run}.json"));
    // The VMM's backend: the vhost_user_blk example (even runs) or qemu-storage-daemon (odd
    // ones) on a disk whose first sectors mirror the source's RAM at DRIVER_MIRROR_GPA.
    let disk = dir.path(&format!("vdisk-{run}"));
    let mut bytes = vec![0u8; DRIVER_DISK as usize];
    let mirror = (DRIVER_MIRROR_SECTORS * 512) as usize;
    bytes[..mirror].copy_from_slice(&ram[DRIVER_MIRROR_GPA as usize..DRIVER_MIRROR_GPA as usize + mirror]);
    std::fs::write(&disk, &bytes).unwrap();
    drop(bytes);
    let qsd = run % 2 == 1;
    let (mut backend, vub) = spawn_blk_backend(dir, &format!("vub-in-{run}"), &disk, DRIVER_DISK, qsd, &[]);
    pids.lock().unwrap().push(backend.id());
    let mut args: Vec<std::ffi::OsString> = vec![
        "serve".into(),
        "--incoming".into(),
        "127.0.0.1:0".into(),
        "--control".into(),
        sock.clone().into(),
    ];
    args.extend(creds.args());
    args.extend([
        "--summary-json".into(),
        summary_path.clone().into(),
        "--resume-timeout".into(),
        "60".into(),
    ]);
    let notify = format!("@pcb-restart-test-{}-{run}", std::process::id());
    let (mut keeper, addr) = Keeper::spawn(&notify, &args, &pids, true);
    let addr = addr.unwrap();
    let mut source = Command::new(BIN)
        .args(["source", "--connect", &addr])
        .args(creds.args())
        .arg("--image")
        .arg(dir.path("img"))
        .args(["--block", "pc.ram:224M", "--block", "huge:32M:2m"])
        .args(["--bandwidth", "320M", "--prefetch", "2", "--resume-timeout", "60"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    pids.lock().unwrap().push(source.id());
    keeper.wait(Duration::from_secs(30), "parked state", |e| {
        e["stored"].as_str().is_some_and(|n| n.starts_with("state."))
    });
    // The test's own view of the blocks: their memfds, read at the end.
    let mut ctl = ControlClient::connect(&sock).unwrap();
    let memfds: Vec<(String, OwnedFd)> =
        ctl.get_blocks(None).unwrap().into_iter().map(|(b, fd)| (b.name, fd.unwrap())).collect();
    let mut ctl = Some(ctl);

    // Two clients: read, wait (the test says go right after the first kill, so they fault
    // while no broker runs), read, write, read.
    let (sp, hp) = ((SMALL / 4096) as u64, (HUGE / HPS) as u64);
    // The pc.ram client also removes (MADV_REMOVE) 64 pages before the first kill, the first 16
    // of them read just before (so received), and reads them again at the end: zeros, across
    // every restart (the ledger keeps both kinds of removal).
    // Both stay below the guest driver's range (DRIVER_RANGE_GPA on): its disk must hold the
    // source's bytes of the pages it wrote from, and its mirror pages the source's.
    let writable = DRIVER_RANGE_GPA / 4096;
    let r0 = rng.below(writable - 64);
    let removed = r0..r0 + 64;
    let outside = |v: Vec<u64>| v.into_iter().filter(|p| !removed.contains(p)).collect::<Vec<_>>();
    let (a0, b0, w0, c0) = (
        outside(pick(rng, 300, sp)),
        outside(pick(rng, 300, sp)),
        outside(pick(rng, 100, writable)),
        outside(pick(rng, 200, sp)),
    );
    let (a1, b1, w1, c1) = (pick(rng, 4, hp), pick(rng, 4, hp), pick(rng, 3, hp), pick(rng, 4, hp));
    let (v0, v1) = (1 + (run % 200) as u8, 201 + (run % 50) as u8);
    let script = |a: &[u64], b: &[u64], w: &[u64], c: &[u64], v: u8| {
        format!("touch:{};wait;touch:{};write:{}:{v};touch:{}", list(a), list(b), list(w), list(c))
    };
    // The pc.ram client waits at its end too, for the test's word after the migration: by then it
    // has heard postcopy_end over its reattached connection and unregistered.
    let (head, reread) = (format!("touch:{r0}-{}", r0 + 15), format!("touch:{r0}-{}", r0 + 63));
    let script0 = format!(
        "touch:{};{head};remove:{r0}-{};wait;touch:{};write:{}:{v0};touch:{};{reread};wait",
        list(&a0),
        r0 + 63,
        list(&b0),
        list(&w0),
        list(&c0)
    );
    let mut cl0 = Peer::spawn(&control_args(&sock, &script0, &["--block", "pc.ram", "--features", "remove"]));
    let mut cl1 = Peer::spawn(&control_args(&sock, &script(&a1, &b1, &w1, &c1, v1), &["--block", "huge"]));
    pids.lock().unwrap().extend([cl0.child.id(), cl1.child.id()]);
    // The VMM: the guest driver registers itself and its backend over the control socket and
    // does virtio-blk I/O on migrated pages until every page has arrived, across the kills.
    let mut driver = spawn_guest_driver(dir, run, &sock, &vub);
    pids.lock().unwrap().push(driver.id());
    let driver_out = JsonLines::new(&mut driver);
    cl0.go();
    cl1.go();
    // The removal is done before any kill.
    let mut early0 = Vec::new();
    while !early0.last().is_some_and(|l: &Value| l["step"].as_str().is_some_and(|s| s.starts_with("remove:")))
    {
        early0.push(cl0.line());
    }
    // The first kill waits until the backend has faulted (unless the migration ends first).
    driver_out.next_with("phase", 60);
    writeln!(driver.stdin.as_mut().unwrap()).unwrap();
    loop {
        if let Some(s) = status(&sock, &mut ctl) {
            if client_faults(&s, "vhost-user-blk") > 0 || s["received_pages"].as_u64() >= Some(TOTAL_PAGES) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(3));
    }

    let downtimes = kill_at_points(run, &at, &sock, &mut ctl, &keeper, TOTAL_PAGES, || {
        cl0.go();
        cl1.go();
    });
    let kills = downtimes.len() as u64;

    let st = keeper.child.wait().unwrap();
    cl0.go();
    let driver_st = wait_exit(&mut driver, 60, "the guest driver");
    let driver_err = std::fs::read_to_string(dir.path(&format!("driver-{run}.err"))).unwrap_or_default();
    assert!(driver_st.success(), "run {run}: the guest driver failed ({driver_st}):\n{driver_err}");
    let drv = driver_out.next_with("postcopy", 10);
    // qemu-storage-daemon serves on until it is stopped; ours ends with its connection.
    if qsd {
        backend.kill().unwrap();
    }
    let be = backend.wait().unwrap();
    let mut be_log = String::new();
    std::io::Read::read_to_string(&mut backend.stderr.take().unwrap(), &mut be_log).unwrap();
    assert!(qsd || be.success(), "run {run}: the backend failed ({be}):\n{be_log}");
    if let Some(d) = std::env::var_os("PCB_RESTART_LOGS") {
        std::thread::sleep(Duration::from_millis(100));
        let _ = std::fs::write(
            Path::new(&d).join(format!("run-{run}.log")),
            keeper.log.lock().unwrap().as_bytes(),
        );
    }
    let (mut l0, l1) = (cl0.finish_within(60), cl1.finish_within(60));
    early0.append(&mut l0);
    let l0 = early0;
    let src_ok = source.wait().unwrap().success();
    let mut src_err = String::new();
    std::io::Read::read_to_string(&mut source.stderr.take().unwrap(), &mut src_err).unwrap();
    assert!(st.success(), "run {run}: the broker failed ({st})\n{}", keeper.log.lock().unwrap());
    assert!(src_ok, "run {run}: the source failed:\n{src_err}");

    // The clients lost their control connection with the first broker and reattached to the
    // restarted one (pcb-client through ControlClient::reattach). One that finished its script
    // before the dead broker's sockets closed never saw the end; the pc.ram client has 300 pages
    // to read after the kill and always waits for some of them.
    for (name, lines) in [("pc.ram", &l0), ("huge", &l1)] {
        let reattached = lines.iter().filter(|l| l["reattached"].is_array()).count() as u64;
        assert!(
            reattached > 0 || kills == 0 || name == "huge",
            "run {run}: client {name} did not reattach: {lines:?}"
        );
        assert!(
            !lines.iter().any(|l| l["reattach_failed"].is_string()),
            "run {run}: client {name}: {lines:?}"
        );
        t.reattached += reattached;
        t.postcopy_end_heard += lines.iter().filter(|l| l["postcopy_end"].is_array()).count() as u64;
    }
    assert!(
        kills == 0 || l0.iter().any(|l| l["postcopy_end"].is_array()),
        "run {run}: the reattached pc.ram client did not hear postcopy_end: {l0:?}"
    );
    // The clients read the source's bytes (pages they wrote themselves excepted).
    // The removed pages read again: zeros. (Every other read, those of the removed range before
    // its removal included, is the source's.)
    let (again, before): (Vec<Value>, Vec<Value>) =
        l0.iter().cloned().partition(|l| l["step"] == reread.as_str());
    let zero = fnv(&[0u8; 4096]);
    let pages = again
        .first()
        .and_then(|l| l["pages"].as_array())
        .unwrap_or_else(|| panic!("run {run}: no {reread} in {l0:?}"));
    assert_eq!(pages.len(), 64, "run {run}: {pages:?}");
    for p in pages {
        assert_eq!(
            p["fnv"].as_str().unwrap(),
            zero,
            "run {run}: removed page {p} (range from {r0}, kills {kills}) did not read as zeros"
        );
    }
    t.client_reads_checked += 64;
    t.client_reads_checked += check_reads(&before, ram, 4096, &w0) + check_reads(&l1, hram, HPS, &w1);

    // The VMM: its I/O went through, POSTCOPY_END reached the backend, and it reattached after
    // the kills (once per restarted broker it reached: two kills close together may both fall
    // in one reconnect).
    check_driver(run, &drv, ram, &disk, &driver_err);
    let reattaches = drv["reattaches"].as_u64().unwrap();
    assert!(
        (kills == 0 || reattaches >= 1) && reattaches <= kills,
        "run {run}: {kills} kill(s), the guest driver reattached {reattaches} time(s):\n{driver_err}"
    );
    t.driver_reattaches += reattaches;
    t.driver_ops += drv["postcopy"]["writes"].as_array().unwrap().len() as u64
        + drv["postcopy"]["reads"].as_array().unwrap().len() as u64;

    // Every byte of the blocks equals the source plus the clients' writes.
    let mut want0 = ram.to_vec();
    want0[r0 as usize * 4096..(r0 as usize + 64) * 4096].fill(0);
    for &p in &w0 {
        want0[p as usize * 4096..p as usize * 4096 + 8].fill(v0);
    }
    let mut want1 = hram.to_vec();
    for &p in &w1 {
        want1[p as usize * HPS..p as usize * HPS + 8].fill(v1);
    }
    let lost = lost_pages(&map_bytes(&memfds[0].1, SMALL), &want0, 4096)
        + lost_pages(&map_bytes(&memfds[1].1, HUGE), &want1, HPS);
    assert_eq!(memfds[0].0, "pc.ram");
    if lost > 0 {
        let _ = std::fs::write("/tmp/pcb-broker-restart-failed.log", keeper.log.lock().unwrap().as_bytes());
    }
    assert_eq!(lost, 0, "run {run}: {lost} pages differ from the source (kills at {at:?}‰); log in /tmp/pcb-broker-restart-failed.log");

    // The counters: one restart per kill, the rebuilt pages plus those placed after the last
    // restart make up the guest, both clients came back each time, and the source resumed.
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    let none = Vec::new();
    let restarts = summary["restarts"].as_array().unwrap_or(&none);
    assert_eq!(restarts.len() as u64, kills, "run {run}: {summary}");
    let rebuilt = restarts.last().map_or(0, |r| r["pages_rebuilt"].as_u64().unwrap());
    let placed = summary["demand_pages"].as_u64().unwrap() + summary["background_pages"].as_u64().unwrap();
    assert_eq!(rebuilt + placed, TOTAL_PAGES, "run {run}: {summary}");
    let log = keeper.log.lock().unwrap().clone();
    for (i, r) in restarts.iter().enumerate() {
        // Both pcb-clients wait for the test's word before the first kill; by a later one a
        // client may have finished its script and exited. The guest driver and its backend
        // stay registered until every page has arrived: taken back at every restart.
        let adopted = r["clients_adopted"].as_u64().unwrap();
        assert!(adopted == 4 || (i > 0 && (2..=4).contains(&adopted)), "run {run}: restart {i}: {r}");
        assert_eq!(r["clients_lost"], 0, "run {run}: {r}");
        assert!(r["ranges_woken"].as_u64().unwrap() >= adopted, "run {run}: {r}");
        t.pages_rebuilt += r["pages_rebuilt"].as_u64().unwrap();
        t.clients_adopted += r["clients_adopted"].as_u64().unwrap();
        t.faults_rewoken += r["faults_rewoken"].as_u64().unwrap();
        t.heartbeat_downtimes_ms.push(r["downtime_ms"].as_u64().unwrap());
    }
    // The summary's counters are the last broker's: the source resumed into it.
    assert!(summary["resumes"].as_u64().unwrap() >= kills.min(1), "run {run}: {summary}");
    for name in ["'guest-driver'", "'vhost-user-blk'"] {
        let back: Vec<&str> =
            log.lines().filter(|l| l.contains(name) && l.contains("taken back after the restart")).collect();
        assert_eq!(
            back.len() as u64,
            kills,
            "run {run}: client {name} taken back {back:?} in {kills} restart(s)"
        );
        // "..., N thread(s) were blocked in a fault": the backend's threads the restart woke.
        if name == "'vhost-user-blk'" {
            t.backend_blocked_at_restart += back
                .iter()
                .filter_map(|l| l.rsplit(", ").next()?.split(' ').next()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    let be_stats = summary["clients"].as_array().unwrap().iter().find(|c| c["name"] == "vhost-user-blk");
    t.backend_faults_last_broker += be_stats.map_or(0, |c| c["faults"].as_u64().unwrap_or(0));
    // A page the rebuilt bitmap missed would be found populated when placed again.
    assert!(
        !log.contains("populated by someone other than the broker"),
        "run {run}: a present page was taken for missing:\n{log}"
    );
    t.runs += 1;
    t.kills += kills;
    t.pages_checked += TOTAL_PAGES;
    t.pages_lost += lost;
    println!(
        "run {run:2}: kills at {at:?}‰, down {downtimes:?} ms, rebuilt {:?} pages, re-woken {:?}, {} backend, driver: {} writes, {reattaches} reattach(es)",
        restarts.iter().map(|r| r["pages_rebuilt"].as_u64().unwrap()).collect::<Vec<_>>(),
        restarts.iter().map(|r| r["faults_rewoken"].as_u64().unwrap()).collect::<Vec<_>>(),
        if qsd { "qemu-storage-daemon" } else { "vhost_user_blk" },
        drv["postcopy"]["writes"].as_array().unwrap().len()
    );
    t.downtimes_ms.extend(downtimes);
}

/// Start a vhost-user-blk backend on `disk` (`size` bytes) listening on `NAME.sock` in `dir`:
/// qemu-storage-daemon or the `vhost_user_blk` example (which exits when its connection ends;
/// `extra` are more of its arguments); returns it once it listens, and its socket.
fn spawn_blk_backend(
    dir: &Dir,
    name: &str,
    disk: &Path,
    size: u64,
    qsd: bool,
    extra: &[&std::ffi::OsStr],
) -> (Child, std::path::PathBuf) {
    let vub = dir.path(&format!("{name}.sock"));
    let mut cmd = if qsd {
        let mut c = Command::new("qemu-storage-daemon");
        c.arg("--blockdev")
            .arg(format!("driver=file,node-name=disk,filename={}", disk.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on",
                vub.display()
            ));
        c
    } else {
        let mut c = Command::new(common::vhost::examples_dir().join("vhost_user_blk"));
        c.arg("--socket").arg(&vub).arg("--disk").arg(disk).args(["--size", &size.to_string(), "--once"]);
        c.args(extra);
        c
    };
    let child = cmd.env("RUST_LOG", "info").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while !vub.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "the backend never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, vub)
}

/// The guest driver example as the VMM of `serve --incoming`: registered with its backend over
/// the control socket `sock`, it waits for a line on stdin, then does I/O until every page has
/// arrived; its log goes to `driver-RUN.err`.
fn spawn_guest_driver(dir: &Dir, run: u64, sock: &Path, vub: &Path) -> Child {
    let range = format!("{DRIVER_RANGE_GPA}+{}", SMALL as u64 - DRIVER_RANGE_GPA);
    Command::new(common::vhost::examples_dir().join("guest_driver"))
        .arg("--socket")
        .arg(vub)
        .arg("--control")
        .arg(sock)
        .args(["--json", "--wait-registered", "--until-complete", "--postcopy-ops", "100000"])
        .args(["--mirror-gpa", &DRIVER_MIRROR_GPA.to_string()])
        .args(["--mirror-sectors", &DRIVER_MIRROR_SECTORS.to_string(), "--io-range", &range])
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path(&format!("driver-{run}.err"))).unwrap())
        .spawn()
        .unwrap()
}

/// The guest driver's summary: POSTCOPY_END reached the backend, the disk's mirror still holds
/// the source's RAM, every write it logged during postcopy holds the source's page it came from
/// (what the backend read from guest RAM), and the bounce region its checksum.
fn check_driver(run: u64, s: &Value, ram: &[u8], disk: &Path, log: &str) {
    assert_eq!(s["postcopy_end"], "ok", "run {run}: {s}\n{log}");
    let disk = std::fs::read(disk).unwrap();
    let m = (DRIVER_MIRROR_SECTORS * 512) as usize;
    let mirror = DRIVER_MIRROR_GPA as usize;
    assert!(disk[..m] == ram[mirror..mirror + m], "run {run}: the disk's mirror changed");
    let writes = s["postcopy"]["writes"].as_array().unwrap();
    assert!(!writes.is_empty(), "run {run}: no I/O during postcopy: {s}");
    for w in writes {
        let (gpa, sector) = (w[0].as_u64().unwrap() as usize, w[1].as_u64().unwrap() as usize);
        assert!(
            disk[sector * 512..sector * 512 + 4096] == ram[gpa..gpa + 4096],
            "run {run}: the write of guest page {gpa:#x} to sector {sector} is not the source's page"
        );
    }
    let (first, sectors) =
        (s["first_sector"].as_u64().unwrap() as usize, s["sectors"].as_u64().unwrap() as usize);
    let bounce = &disk[first * 512..(first + sectors) * 512];
    assert_eq!(s["checksum"], format!("{:#018x}", common::fnv1a64(bounce)), "run {run}: the bounce region");
}

/// Step 4 of issue #16: the broker tells whether a client still holds its own copy of its
/// userfaultfd (it must, to survive the broker's death without an fd store).
#[test]
fn status_says_whether_a_client_kept_its_own_uffd_copy() {
    use common::clients::{broker, client_args, content};
    use postcopy_broker::fault::{BrokerConfig, Registration, RegistrationMap};
    let data = content(16, 4096, 5);
    let (inc, h) = broker(16, &data, BrokerConfig::default());
    let b = inc.blocks().get(0).unwrap();
    // pcb-client keeps its uffd; the broker takes a duplicate with pidfd_getfd.
    let keeps = Peer::spawn(&client_args(b, 1, "touch:0", &[]));
    let kept = keeps.register(&h, "keeps");
    // Another client's registration, with a userfaultfd that process does not hold (it closed
    // its copy, as far as the broker can tell).
    let closed = Peer::spawn(&client_args(b, 1, "touch:0", &[]));
    let other = postcopy_broker::uffd::Uffd::open(postcopy_broker::uffd::feature::MISSING_SHMEM).unwrap();
    let gone = h
        .register(Registration {
            name: "closed".into(),
            uffd: other.as_fd().try_clone_to_owned().unwrap(),
            pid: Some(closed.pid()),
            map: RegistrationMap::Shared(closed.mappings()),
        })
        .unwrap();
    let st = h.status().unwrap();
    let held = |id: postcopy_broker::client::ClientId| {
        st.clients.iter().find(|c| c.id == id).unwrap().uffd_copy_held
    };
    assert_eq!(held(kept), Some(true));
    assert_eq!(held(gone), Some(false));
    let text = postcopy_broker::stats::render(&st);
    assert_eq!(text.matches("closed its own uffd copy").count(), 1, "{text}");
    drop((keeps, closed));
}

/// The totals and the downtimes' spread, as docs/recovery.md's table has them.
fn totals_line(t: &Totals) -> String {
    let spread = |v: &[u64]| {
        let mut d = v.to_vec();
        d.sort_unstable();
        format!(
            "min {} median {} max {}",
            d.first().unwrap_or(&0),
            d.get(d.len() / 2).unwrap_or(&0),
            d.last().unwrap_or(&0)
        )
    };
    format!(
        "TOTALS {t:?}\ndowntime ms, kill to READY: {}; last heartbeat to serving: {}",
        spread(&t.downtimes_ms),
        spread(&t.heartbeat_downtimes_ms)
    )
}

#[test]
fn sigkill_of_the_destination_broker_at_random_points_of_a_256_mib_postcopy_loses_no_page() {
    let dir = Dir::new("restart");
    let ram = contents(SMALL, 4096, 0x1234_5678, 3);
    let hram = contents(HUGE, HPS, 0x4321_8765, 4);
    let mut img = ram.clone();
    img.extend_from_slice(&hram);
    std::fs::write(dir.path("img"), &img).unwrap();
    drop(img);
    // Even runs over TLS (the source's certificate must match across the restart), odd ones
    // with the pre-shared key.
    let (tls, psk) = (Creds::tls(&dir.0), Creds::psk(&dir.path("key")));
    let mut rng = Rng(0x0dea_d0b0_c0de);
    let mut t = Totals::default();
    let runs: u64 = std::env::var("PCB_RESTART_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    for run in 0..runs {
        kill_run(run, &mut rng, &dir, if run % 2 == 0 { &tls } else { &psk }, &ram, &hram, &mut t);
    }
    println!("{}", totals_line(&t));
    assert_eq!(t.runs, runs);
    assert!(t.kills >= runs, "only {} kills in {runs} runs", t.kills);
    assert_eq!(t.pages_lost, 0);
    // The VMM's backend faulted while no broker ran (its threads were blocked in a fault when a
    // restarted broker woke them) and after the kills (the last brokers served its faults): in
    // one run either may miss (a kill between two I/O rounds, one late in the migration), in ten
    // not.
    if runs >= 10 {
        assert!(t.backend_blocked_at_restart > 0, "{t:?}");
        assert!(t.backend_faults_last_broker > 0, "{t:?}");
    }
}

/// Pages of the Firecracker-style private client (4 KiB each, the image's first 16 MiB).
const FC_PAGES: u64 = 4096;

/// The status of the private client, if the broker serves one.
fn private_events(st: &Value) -> u64 {
    st["clients"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["kind"] == "private"))
        .and_then(|c| c["stats"]["events"].as_u64())
        .unwrap_or(0)
}

/// Reads of a private client: pages of `removed` (once its `dontneed` step ran) read zeros,
/// every other page the image (`data`). Returns how many were checked.
fn check_private_reads(lines: &[Value], data: &[u8], removed: (u64, u64)) -> u64 {
    let zeros = fnv(&[0u8; 4096]);
    let (mut n, mut gone) = (0, false);
    for l in lines {
        gone |= l["step"].as_str().is_some_and(|s| s.starts_with("dontneed"));
        let Some(pages) = l["pages"].as_array() else { continue };
        for p in pages {
            let i = p["page"].as_u64().unwrap();
            let zero = gone && (removed.0..=removed.1).contains(&i);
            let i = i as usize;
            let want = if zero { zeros.clone() } else { fnv(&data[i * 4096..(i + 1) * 4096]) };
            assert_eq!(
                p["fnv"].as_str().unwrap(),
                want,
                "private page {i} (removed: {zero}) in {}",
                l["step"]
            );
            n += 1;
        }
    }
    n
}

/// What the prefaulting backend read (its `--prefault-report`: one `GPA FNV` line per 4 KiB of
/// the guest, `ram` at 0 and `hram` after it), checked against the image; a page a control
/// client wrote (`w0` pages of `ram` with `v0`, `w1` of `hram` with `v1`, 8 bytes at the
/// page's start) may read either way. Returns how many steps were checked: all of them.
fn check_prefault(report: &Path, ram: &[u8], hram: &[u8], w0: (&[u64], u8), w1: (&[u64], u8)) -> u64 {
    let mut img = ram.to_vec();
    img.extend_from_slice(hram);
    let mut written = std::collections::HashMap::new();
    for (gpa, v) in
        w0.0.iter()
            .map(|&p| (p as usize * 4096, w0.1))
            .chain(w1.0.iter().map(|&p| (SMALL + p as usize * HPS, w1.1)))
    {
        let mut page = img[gpa..gpa + 4096].to_vec();
        page[..8].fill(v);
        written.insert(gpa, fnv(&page));
    }
    let text = std::fs::read_to_string(report).unwrap_or_else(|e| panic!("{}: {e}", report.display()));
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        let (gpa, h) = line.split_once(' ').unwrap();
        let gpa = usize::from_str_radix(gpa, 16).unwrap();
        assert_eq!(gpa, i * 4096, "prefault report out of order at line {i}");
        let want = fnv(&img[gpa..gpa + 4096]);
        assert!(
            h == want || written.get(&gpa).is_some_and(|w| w == h),
            "the backend read {h} at {gpa:#x}, the image has {want}"
        );
        n += 1;
    }
    assert_eq!(n, (SMALL + HUGE) / 4096, "the prefault report is short");
    n as u64
}

/// One run of the lazy-restore variant: `serve --image` (the image holds `ram` then `hram`)
/// under pcb-keeper without a background fill, so that the clients' faults are the fill: two
/// "filler" pcb-clients read every page of each block, two more read and write random pages, a
/// Firecracker-style private client reads random pages and removes a range, and the broker is
/// the frontend of a prefaulting vhost-user-blk backend in daemon mode (and of
/// qemu-storage-daemon in odd runs). The test SIGKILLs the broker at random points; the
/// restarted one rebuilds from the parked fds.
fn restore_kill_run(run: u64, rng: &mut Rng, dir: &Dir, ram: &[u8], hram: &[u8], t: &mut Totals) {
    let (at, pids, _dog) = begin_run(rng);
    let sock = dir.path(&format!("rctl-{run}.sock"));
    let summary_path = dir.path(&format!("rsummary-{run}.json"));
    // Every run: the vhost_user_blk example, prefaulting (it reads all guest memory once its
    // memory table is in use, so it faults before, across and after the kills); odd runs add
    // qemu-storage-daemon (libvhost-user), which only takes part in the handshakes and the end.
    let prefault_report = dir.path(&format!("prefault-{run}.txt"));
    let prefault = [std::ffi::OsStr::new("--prefault-report"), prefault_report.as_os_str()];
    let disk = dir.path(&format!("disk-{run}"));
    let (mut backend, vub) = spawn_blk_backend(dir, &format!("vub-{run}"), &disk, 16 << 20, false, &prefault);
    pids.lock().unwrap().push(backend.id());
    let mut qsd = (run % 2 == 1).then(|| {
        let disk = dir.path(&format!("qsd-disk-{run}"));
        std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
        let (c, sock) = spawn_blk_backend(dir, &format!("qsd-{run}"), &disk, 16 << 20, true, &[]);
        pids.lock().unwrap().push(c.id());
        (c, sock)
    });
    let mut args: Vec<std::ffi::OsString> = vec!["serve".into(), "--image".into(), dir.path("img").into()];
    args.extend(["--block", "pc.ram:224M", "--block", "huge:32M:2m", "--no-background"].map(Into::into));
    args.extend([
        "--control".into(),
        sock.clone().into(),
        "--summary-json".into(),
        summary_path.clone().into(),
    ]);
    args.extend(["--vhost-user-backend".into(), vub.clone().into()]);
    if let Some((_, sock)) = &qsd {
        args.extend(["--vhost-user-backend".into(), sock.clone().into()]);
    }
    let notify = format!("@pcb-restore-test-{}-{run}", std::process::id());
    let (mut keeper, _) = Keeper::spawn(&notify, &args, &pids, false);
    keeper.wait(Duration::from_secs(30), "parked state", |e| {
        e["stored"].as_str().is_some_and(|n| n.starts_with("state."))
    });
    let mut ctl = ControlClient::connect(&sock).unwrap();
    let memfds: Vec<(String, OwnedFd)> =
        ctl.get_blocks(None).unwrap().into_iter().map(|(b, fd)| (b.name, fd.unwrap())).collect();
    let mut ctl = Some(ctl);

    let (sp, hp) = ((SMALL / 4096) as u64, (HUGE / HPS) as u64);
    let (a0, b0, w0, c0) = (pick(rng, 300, sp), pick(rng, 300, sp), pick(rng, 100, sp), pick(rng, 200, sp));
    let (a1, b1, w1, c1) = (pick(rng, 4, hp), pick(rng, 4, hp), pick(rng, 3, hp), pick(rng, 4, hp));
    let (v0, v1) = (1 + (run % 200) as u8, 201 + (run % 50) as u8);
    let script = |a: &[u64], b: &[u64], w: &[u64], c: &[u64], v: u8| {
        format!("touch:{};wait;touch:{};write:{}:{v};touch:{};wait", list(a), list(b), list(w), list(c))
    };
    let (fa, fb) = (pick(rng, 200, FC_PAGES), pick(rng, 200, FC_PAGES));
    let r0 = rng.below(FC_PAGES - 64);
    let removed = (r0, r0 + 63);
    let fc_script = format!(
        "touch:{};dontneed:{}-{};wait;touch:{};touch:{}-{};wait",
        list(&fa),
        removed.0,
        removed.1,
        list(&fb),
        removed.0,
        removed.1
    );
    let fc_size = (FC_PAGES * 4096).to_string();
    let fc_args = control_args(
        &sock,
        &fc_script,
        &["--firecracker", "--features", "remove", "--size", &fc_size, "--page-size", "4096"],
    );
    let mut cl0 = Peer::spawn(&control_args(&sock, &script(&a0, &b0, &w0, &c0, v0), &["--block", "pc.ram"]));
    let mut cl1 = Peer::spawn(&control_args(&sock, &script(&a1, &b1, &w1, &c1, v1), &["--block", "huge"]));
    let mut fc = Peer::spawn(&fc_args);
    let mut fill0 =
        Peer::spawn(&control_args(&sock, &format!("touch:0-{};wait", sp - 1), &["--block", "pc.ram"]));
    let mut fill1 =
        Peer::spawn(&control_args(&sock, &format!("touch:0-{};wait", hp - 1), &["--block", "huge"]));
    for p in [&cl0, &cl1, &fc, &fill0, &fill1] {
        pids.lock().unwrap().push(p.child.id());
    }
    for p in [&mut cl0, &mut cl1, &mut fc, &mut fill0, &mut fill1] {
        p.go();
    }
    // The private client's REMOVE must be in the parked record before the first kill.
    let t0 = Instant::now();
    while status(&sock, &mut ctl).is_none_or(|s| private_events(&s) == 0) {
        assert!(t0.elapsed() < Duration::from_secs(30), "the private client never removed its range");
        std::thread::sleep(Duration::from_millis(3));
    }
    let downtimes = kill_at_points(run, &at, &sock, &mut ctl, &keeper, TOTAL_PAGES, || {
        cl0.go();
        cl1.go();
        fc.go();
    });
    let kills = downtimes.len() as u64;
    let st = keeper.child.wait().unwrap();
    for p in [&mut cl0, &mut cl1, &mut fc, &mut fill0, &mut fill1] {
        p.go();
    }
    let lines: Vec<Vec<Value>> = [&mut cl0, &mut cl1, &mut fc, &mut fill0, &mut fill1]
        .into_iter()
        .map(|p| p.finish_within(60))
        .collect();
    let log = keeper.log.lock().unwrap().clone();
    if let Some(d) = std::env::var_os("PCB_RESTART_LOGS") {
        let _ = std::fs::write(Path::new(&d).join(format!("restore-run-{run}.log")), log.as_bytes());
    }
    assert!(st.success(), "run {run}: the broker failed ({st})\n{log}");
    // The backends heard POSTCOPY_END from the last broker (a failure would be logged) and
    // ours ended with its connection; qemu-storage-daemon serves on until it is stopped.
    if let Some((q, _)) = qsd.as_mut() {
        q.kill().unwrap();
        q.wait().unwrap();
    }
    let be = backend.wait().unwrap();
    let mut be_log = String::new();
    std::io::Read::read_to_string(&mut backend.stderr.take().unwrap(), &mut be_log).unwrap();
    assert!(be.success(), "run {run}: the backend failed ({be}):\n{be_log}");
    t.backend_reads_checked += check_prefault(&prefault_report, ram, hram, (&w0, v0), (&w1, v1));
    assert!(!log.contains("POSTCOPY_END"), "run {run}: POSTCOPY_END failed:\n{log}");
    assert!(
        log.contains("taken back after a restart") || kills == 0,
        "run {run}: the backend's connection was not taken back:\n{log}"
    );

    // The control clients lost their connection with the first broker and reattach to the
    // restarted one; one still blocked in faults when the restore completes may find no broker
    // left to reattach to (the last one ended), which is not a failure. The pc.ram client has
    // 300 pages to read after the kill and always reattaches.
    let steps =
        |l: &[Value]| -> Vec<Value> { l.iter().filter(|x| !x["pages"].is_array()).cloned().collect() };
    for l in [&lines[0], &lines[1], &lines[3], &lines[4]] {
        t.reattached += l.iter().filter(|x| x["reattached"].is_array()).count() as u64;
        t.postcopy_end_heard += l.iter().filter(|x| x["postcopy_end"].is_array()).count() as u64;
    }
    assert!(
        kills == 0 || lines[0].iter().any(|l| l["reattached"].is_array()),
        "run {run}: the pc.ram client did not reattach: {:?}",
        steps(&lines[0])
    );
    t.client_reads_checked += check_reads(&lines[0], ram, 4096, &w0)
        + check_reads(&lines[1], hram, HPS, &w1)
        + check_reads(&lines[3], ram, 4096, &w0)
        + check_reads(&lines[4], hram, HPS, &w1);
    let private = check_private_reads(&lines[2], ram, removed);
    assert_eq!(private, (fa.len() + fb.len() + 64) as u64, "run {run}: {:?}", steps(&lines[2]));
    t.private_reads_checked += private;

    let mut want0 = ram.to_vec();
    for &p in &w0 {
        want0[p as usize * 4096..p as usize * 4096 + 8].fill(v0);
    }
    let mut want1 = hram.to_vec();
    for &p in &w1 {
        want1[p as usize * HPS..p as usize * HPS + 8].fill(v1);
    }
    let lost = lost_pages(&map_bytes(&memfds[0].1, SMALL), &want0, 4096)
        + lost_pages(&map_bytes(&memfds[1].1, HUGE), &want1, HPS);
    if lost > 0 {
        let _ = std::fs::write("/tmp/pcb-restore-restart-failed.log", log.as_bytes());
    }
    assert_eq!(lost, 0, "run {run}: {lost} pages differ from the image (kills at {at:?}‰); log in /tmp/pcb-restore-restart-failed.log");

    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    assert_eq!(summary["complete"], true, "run {run}: {summary}");
    let restarts = summary["restarts"].as_array().unwrap();
    assert_eq!(restarts.len() as u64, kills, "run {run}: {summary}");
    for (i, r) in restarts.iter().enumerate() {
        // Every client waits for the test's word at its end and the backends stay connected:
        // all six (seven with qemu-storage-daemon) are parked at each kill.
        assert_eq!(r["clients_adopted"], 6 + u64::from(qsd.is_some()), "run {run}: restart {i}: {r}");
        assert_eq!(r["clients_lost"], 0, "run {run}: {r}");
        assert!(r["ranges_woken"].as_u64().unwrap() >= 6, "run {run}: {r}");
        t.pages_rebuilt += r["pages_rebuilt"].as_u64().unwrap();
        t.clients_adopted += r["clients_adopted"].as_u64().unwrap();
        t.faults_rewoken += r["faults_rewoken"].as_u64().unwrap();
        t.heartbeat_downtimes_ms.push(r["downtime_ms"].as_u64().unwrap());
    }
    // The last broker placed what was not rebuilt: the shared pages it placed (its demand
    // pages less the private client's) and the rebuilt ones make up the guest.
    let report = &summary["report"];
    let private_placed: u64 = report["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "private")
        .map(|c| c["stats"]["pages_requested"].as_u64().unwrap())
        .sum();
    // What the prefaulting backend asked the last broker for: its faults after the restart.
    let be_pid = u64::from(backend.id());
    let be_report = report["clients"].as_array().unwrap().iter().find(|c| c["pid"] == be_pid);
    let be_report =
        be_report.unwrap_or_else(|| panic!("run {run}: the backend is not in the report: {summary}"));
    if kills > 0 {
        t.backend_pages_after_restart += be_report["stats"]["pages_requested"].as_u64().unwrap();
    }
    let rebuilt = restarts.last().map_or(0, |r| r["pages_rebuilt"].as_u64().unwrap());
    let placed = report["broker"]["pages_demand"].as_u64().unwrap() - private_placed
        + report["broker"]["pages_background"].as_u64().unwrap();
    assert_eq!(rebuilt + placed, TOTAL_PAGES, "run {run}: {summary}");
    assert!(
        !log.contains("populated by someone other than the broker"),
        "run {run}: a present page was taken for missing:\n{log}"
    );
    t.runs += 1;
    t.kills += kills;
    t.pages_checked += TOTAL_PAGES;
    t.pages_lost += lost;
    println!(
        "restore run {run:2}: kills at {at:?}‰, down {downtimes:?} ms, rebuilt {:?} pages, re-woken {:?}",
        restarts.iter().map(|r| r["pages_rebuilt"].as_u64().unwrap()).collect::<Vec<_>>(),
        restarts.iter().map(|r| r["faults_rewoken"].as_u64().unwrap()).collect::<Vec<_>>()
    );
    t.downtimes_ms.extend(downtimes);
}

#[test]
fn sigkill_of_a_lazy_restore_broker_with_every_kind_of_client_loses_no_page() {
    let dir = Dir::new("restore-restart");
    let ram = contents(SMALL, 4096, 0x5eed_0001, 3);
    let hram = contents(HUGE, HPS, 0x5eed_0002, 4);
    let mut img = ram.clone();
    img.extend_from_slice(&hram);
    std::fs::write(dir.path("img"), &img).unwrap();
    drop(img);
    let mut rng = Rng(0x00c0_ffee_d00d);
    let mut t = Totals::default();
    let runs: u64 = std::env::var("PCB_RESTORE_RESTART_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    for run in 0..runs {
        restore_kill_run(run, &mut rng, &dir, &ram, &hram, &mut t);
    }
    println!("RESTORE {}", totals_line(&t));
    assert_eq!(t.runs, runs);
    assert!(t.kills >= runs, "only {} kills in {runs} runs", t.kills);
    // The backend faulted into restarted brokers, not only into the first one.
    assert!(t.backend_pages_after_restart > 0, "the backend never faulted after a restart");
    assert_eq!(t.pages_lost, 0);
}

/// A fresh lazy restore under an fd store serves its control socket only once its record is
/// parked: a client served before that would be unknown to the restarted broker (a fresh
/// restore: other memfds, other ids), its faults never served. The failpoint
/// `restore-slow-park` holds the first broker 500 ms between serving faults and parking; a
/// pcb-client connects at once, and the test SIGKILLs the broker the moment the client is
/// registered. The restarted broker must take the client back, and it must read the image.
#[test]
fn a_lazy_restore_serves_no_control_client_before_its_record_is_parked() {
    let dir = Dir::new("restore-hold");
    let size = 8 << 20;
    let pages = (size / 4096) as u64;
    let ram = contents(size, 4096, 0x5eed_0003, 3);
    std::fs::write(dir.path("img"), &ram).unwrap();
    let pids = Arc::new(Mutex::new(Vec::new()));
    let _dog = Watchdog::arm(Arc::clone(&pids), Duration::from_secs(60));
    let sock = dir.path("ctl.sock");
    let mut args: Vec<std::ffi::OsString> = vec!["serve".into(), "--image".into(), dir.path("img").into()];
    args.extend(["--block", "pc.ram:8M", "--no-background", "--control"].map(Into::into));
    args.push(sock.clone().into());
    let notify = format!("@pcb-restore-hold-{}", std::process::id());
    let failpoint = [(postcopy_broker::failpoint::VAR, "restore-slow-park")];
    let (mut keeper, _) = Keeper::spawn_with(&notify, &args, &pids, false, &failpoint);
    let started = keeper.wait(Duration::from_secs(10), "started", |e| e["started"].is_u64());
    let broker_pid = started["started"].as_u64().unwrap() as i32;
    // Listening, not only bound (the connection waits in the backlog until the socket is served).
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(30), "the control socket never listened");
        std::thread::sleep(Duration::from_millis(2));
    }
    let script = format!("touch:0-99;wait;touch:100-{};wait", pages - 1);
    let mut cl = Peer::spawn(&control_args(&sock, &script, &["--block", "pc.ram"]));
    pids.lock().unwrap().push(cl.child.id());
    cl.go();
    let mut ctl = None;
    let t0 = Instant::now();
    while status(&sock, &mut ctl).is_none_or(|s| s["clients"].as_array().is_none_or(|c| c.is_empty())) {
        assert!(t0.elapsed() < Duration::from_secs(30), "the client never registered");
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: kill(2) of the broker this test's keeper started.
    assert_eq!(unsafe { libc::kill(broker_pid, libc::SIGKILL) }, 0);
    keeper.wait(Duration::from_secs(20), "ready after the restart", |e| {
        e["notify"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x.as_str().is_some_and(|s| s.starts_with("STATUS=restarted"))))
    });
    cl.go();
    cl.go();
    let lines = cl.finish_within(30);
    let st = keeper.child.wait().unwrap();
    let log = keeper.log.lock().unwrap().clone();
    assert!(st.success(), "the broker failed ({st})\n{log}");
    assert!(
        lines.iter().any(|l| l["reattached"].is_array()),
        "the client was not taken back by the restarted broker: {lines:?}\n{log}"
    );
    assert_eq!(check_reads(&lines, &ram, 4096, &[]), pages, "{lines:?}");
}

/// A VMM whose broker dies without an fd store (`serve --image` killed, no keeper): the guest
/// driver's session finds nobody holding the control socket, says so ("no broker at ... took
/// back client(s)") and never ends postcopy: no POSTCOPY_END to its backend, whose pages that
/// never arrived must stay missing, and no summary.
#[test]
fn a_vmm_whose_broker_dies_without_an_fd_store_says_so_and_never_ends_postcopy() {
    use common::vhost::Setup;
    let mut s = Setup::new("vmm-no-store");
    let serve = s.serve(&["--no-background"]);
    let (vub, _) = s.backend("ours");
    let mut driver = s.driver(&vub, &["--until-complete", "--postcopy-ops", "1000000"]);
    let mut stdout = driver.stdout.take().unwrap();
    let driver = s.adopt(driver);
    let t0 = Instant::now();
    while client_faults(&s.status(), "vhost-user-blk") == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the backend never faulted:\n{}",
            s.log("driver.err")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    s.kids[serve].kill().unwrap();
    s.kids[serve].wait().unwrap();
    let t0 = Instant::now();
    while !s.log("driver.err").contains("no broker at") {
        assert!(t0.elapsed() < Duration::from_secs(60), "the driver never said so:\n{}", s.log("driver.err"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = s.log("driver.err");
    assert!(log.contains("took back client(s) 1, 2"), "{log}");
    // Blocked in I/O on a page that will never come, or exited with the error: never a success.
    std::thread::sleep(Duration::from_millis(500));
    if let Some(st) = s.kids[driver].try_wait().unwrap() {
        assert!(!st.success(), "the driver succeeded without its broker:\n{log}");
    }
    let _ = s.kids[driver].kill();
    s.kids[driver].wait().unwrap();
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut printed).unwrap();
    assert!(!printed.contains("postcopy_end"), "the driver ended postcopy: {printed}\n{log}");
}
