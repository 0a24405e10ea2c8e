//! `postcopy-broker demo`: a whole local postcopy migration with every party a separate process:
//! the source (`postcopy-broker source`), the destination broker (`serve --incoming`), a
//! vhost-user-blk backend (the example, or qemu-storage-daemon) and the guest driver example that
//! plays the VMM and keeps doing virtio-blk I/O through the backend on pages that have not
//! arrived yet. It shows progress, then a summary: time, pages by kind, fault latency per client,
//! and whether the destination's RAM and the disk hold what the source implies.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::cli::demo_check::{block_checksums, check_disk, write_disk, write_image, MIRROR_SECTORS, PAGE};
use postcopy_broker::control::ControlClient;
use postcopy_broker::error::{Error, IoContext, Result};
use postcopy_broker::migration::transport::throwaway::ThrowawayCa;

/// Which vhost-user-blk backend the demo runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoBackend {
    /// The example backend (examples/vhost_user_blk.rs, rust-vmm vhost-user-backend).
    Ours,
    /// qemu-storage-daemon's vhost-user-blk export (libvhost-user).
    Qsd,
}

/// Options of `postcopy-broker demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Guest RAM to migrate (K, M, G suffixes).
    #[arg(long, default_value = "1G", value_parser = crate::cli::parse_size)]
    pub size: u64,
    /// The vhost-user-blk backend.
    #[arg(long, value_enum, default_value = "ours")]
    pub backend: DemoBackend,
    /// Background bandwidth of the source per second (demand pages are not limited), so that
    /// postcopy lasts long enough to watch.
    #[arg(long, default_value = "256M")]
    pub bandwidth: String,
    /// Keep the work directory (image, disk, logs, JSON summaries) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
    /// Work directory (default: a new directory under the temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Where the example binaries are (default: `examples/` next to this binary).
    #[arg(long)]
    pub examples_dir: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// Run the demo; exit 0 only when the migration completed and everything verified.
pub fn run(a: &DemoArgs) -> ExitCode {
    match demo(a) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The demo's processes, killed on drop (only those still running).
struct Procs {
    list: Vec<(&'static str, Child)>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.list {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Procs {
    fn spawn(&mut self, name: &'static str, cmd: &mut Command, dir: &Path) -> Result<()> {
        let out =
            std::fs::File::create(dir.join(format!("{name}.out"))).ctx(|| "create a log file".into())?;
        let err =
            std::fs::File::create(dir.join(format!("{name}.log"))).ctx(|| "create a log file".into())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .ctx(|| format!("start the {name} ({:?})", cmd.get_program()))?;
        self.list.push((name, child));
        Ok(())
    }

    fn pid(&self, name: &str) -> Option<u32> {
        self.list.iter().find(|(n, _)| *n == name).map(|(_, c)| c.id())
    }

    /// Exit status of `name` if it has exited.
    fn exited(&mut self, name: &str) -> Result<Option<std::process::ExitStatus>> {
        match self.list.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => c.try_wait().ctx(|| format!("wait for the {name}")),
            None => Ok(None),
        }
    }
}

fn wait_for(path: &Path, what: &str, procs: &mut Procs, deadline: Instant, dir: &Path) -> Result<()> {
    while !path.exists() {
        for (name, c) in &mut procs.list {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(Error::Invalid(format!(
                    "the {name} exited ({st}) while waiting for {what}; see {}",
                    dir.join(format!("{name}.log")).display()
                )));
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Invalid(format!("{what} did not appear at {}", path.display())));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read(path).ctx(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| Error::Invalid(format!("{} is not JSON: {e}", path.display())))
}

/// Live progress from the destination's control socket.
struct Watch {
    ctl: Option<ControlClient>,
    tty: bool,
    last_line: Instant,
    shown: bool,
}

impl Watch {
    fn show(&mut self, path: &Path, started: Instant) {
        if self.ctl.is_none() && path.exists() {
            self.ctl = ControlClient::connect(path).ok();
        }
        let Some(c) = &mut self.ctl else { return };
        let Ok(st) = c.status() else {
            self.ctl = None;
            return;
        };
        let (r, t) = (st["received_pages"].as_u64().unwrap_or(0), st["total_pages"].as_u64().unwrap_or(1));
        let g = &st["broker"];
        let mut faults = String::new();
        for cl in st["clients"].as_array().map(Vec::as_slice).unwrap_or_default() {
            faults.push_str(&format!("  {} {}", cl["name"].as_str().unwrap_or("?"), cl["stats"]["faults"]));
        }
        let line = format!(
            "[{:5.1}s] received {:5.1}% ({r}/{t} pages)  demand {}  background {}  faults:{faults}",
            started.elapsed().as_secs_f64(),
            r as f64 * 100.0 / t.max(1) as f64,
            g["pages_demand"],
            g["pages_background"],
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
            self.shown = true;
        } else if self.last_line.elapsed() >= Duration::from_secs(1) {
            eprintln!("{line}");
            self.last_line = Instant::now();
        }
    }

    fn done(&mut self) {
        if self.shown {
            eprintln!();
        }
    }
}

fn demo(a: &DemoArgs) -> Result<bool> {
    if a.size < 16 << 20 || a.size % PAGE != 0 {
        return Err(Error::Invalid(format!(
            "--size must be a multiple of 4 KiB of at least 16M, not {}",
            a.size
        )));
    }
    let exe = std::env::current_exe().ctx(|| "find this binary".into())?;
    let examples = match &a.examples_dir {
        Some(d) => d.clone(),
        None => exe.parent().map(|p| p.join("examples")).unwrap_or_default(),
    };
    for name in ["guest_driver", "vhost_user_blk"] {
        if !examples.join(name).exists() {
            return Err(Error::Invalid(format!(
                "{} is missing: build the examples first (cargo build --release --bins --examples), or pass --examples-dir",
                examples.join(name).display()
            )));
        }
    }
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("pcb-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
    let result = demo_in(a, &exe, &examples, &dir);
    if a.keep {
        println!("work directory kept: {}", dir.display());
    } else if let Err(e) = std::fs::remove_dir_all(&dir) {
        log::warn!("cannot remove {}: {e}", dir.display());
    }
    result
}

fn demo_in(a: &DemoArgs, exe: &Path, examples: &Path, dir: &Path) -> Result<bool> {
    let seed = u64::from(std::process::id()) << 20 | 0x5eed;
    let mirror_gpa = (a.size / 2) & !(PAGE - 1);
    let disk_size = (a.size / 2).max(64 << 20);
    let (image, disk, tls) = (dir.join("image"), dir.join("disk.img"), dir.join("tls"));
    let ctl = dir.join("broker.sock");
    let be_sock = dir.join("backend.sock");
    let backend_name = match a.backend {
        DemoBackend::Ours => "example vhost-user-blk (rust-vmm vhost-user-backend)",
        DemoBackend::Qsd => "qemu-storage-daemon vhost-user-blk export (libvhost-user)",
    };
    println!("postcopy-broker demo: {} of guest RAM, backend: {backend_name}", gib(a.size));
    println!("work directory {} (logs: *.log)", dir.display());
    let t = Instant::now();
    write_image(&image, a.size, seed)?;
    write_disk(&disk, disk_size, seed, mirror_gpa)?;
    // Mutual TLS with a CA made up for this run: both ends read their files from one directory.
    ThrowawayCa::new("postcopy-broker demo CA")?.write_dir(&tls, &["localhost", "127.0.0.1"])?;
    println!(
        "prepared the source image, a {} disk and a throw-away TLS CA ({}) in {:.1}s",
        gib(disk_size),
        tls.display(),
        t.elapsed().as_secs_f64()
    );

    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut procs = Procs { list: Vec::new() };
    // The backend.
    let mut be = match a.backend {
        DemoBackend::Ours => {
            let mut c = Command::new(examples.join("vhost_user_blk"));
            c.arg("--socket").arg(&be_sock).arg("--disk").arg(&disk).arg("--size").arg(disk_size.to_string());
            c
        }
        DemoBackend::Qsd => {
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev")
                .arg(format!("driver=file,node-name=disk,filename={}", disk.display()))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on",
                    be_sock.display()
                ));
            c
        }
    };
    procs.spawn("backend", &mut be, dir)?;
    wait_for(&be_sock, "the backend's socket", &mut procs, deadline, dir)?;
    // The destination broker.
    let mut dst = Command::new(exe);
    dst.args(["serve", "--incoming", "127.0.0.1:0", "--tls-dir"])
        .arg(&tls)
        .arg("--control")
        .arg(&ctl)
        .arg("--verify-file")
        .arg(dir.join("destination-ram.json"))
        .arg("--summary-json")
        .arg(dir.join("destination-summary.json"));
    procs.spawn("destination", &mut dst, dir)?;
    let addr = loop {
        let out = std::fs::read_to_string(dir.join("destination.out")).unwrap_or_default();
        if let Some(a) = out.lines().find_map(|l| l.strip_prefix("listening ")) {
            break a.trim().to_string();
        }
        if let Some(st) = procs.exited("destination")? {
            return Err(Error::Invalid(format!(
                "the destination exited ({st}); see {}",
                dir.join("destination.log").display()
            )));
        }
        if Instant::now() > deadline {
            return Err(Error::Invalid("the destination never said where it listens".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // The source.
    let mut src = Command::new(exe);
    src.args(["source", "--connect", &addr, "--tls-dir"])
        .arg(&tls)
        .arg("--image")
        .arg(&image)
        .args(["--block", &format!("ram:{}", a.size), "--bandwidth", &a.bandwidth])
        .arg("--verify-file")
        .arg(dir.join("source-ram.json"))
        .arg("--summary-json")
        .arg(dir.join("source-summary.json"));
    let started = Instant::now();
    procs.spawn("source", &mut src, dir)?;
    wait_for(&ctl, "the destination's control socket", &mut procs, deadline, dir)?;
    // The guest driver (the VMM).
    let mut drv = Command::new(examples.join("guest_driver"));
    drv.arg("--socket")
        .arg(&be_sock)
        .arg("--control")
        .arg(&ctl)
        .args(["--until-complete", "--postcopy-ops", "1000000", "--touch-all", "--json"])
        .args(["--mirror-gpa", &mirror_gpa.to_string(), "--mirror-sectors", &MIRROR_SECTORS.to_string()]);
    procs.spawn("guest-driver", &mut drv, dir)?;
    println!(
        "running: source pid {:?} -> destination pid {:?} <- guest driver pid {:?} -> backend pid {:?}",
        procs.pid("source").unwrap_or(0),
        procs.pid("destination").unwrap_or(0),
        procs.pid("guest-driver").unwrap_or(0),
        procs.pid("backend").unwrap_or(0)
    );

    let mut watch =
        Watch { ctl: None, tty: std::io::stderr().is_terminal(), last_line: Instant::now(), shown: false };
    let mut done: Vec<&str> = Vec::new();
    while done.len() < 3 {
        watch.show(&ctl, started);
        for name in ["source", "destination", "guest-driver"] {
            if done.contains(&name) {
                continue;
            }
            if let Some(st) = procs.exited(name)? {
                if !st.success() {
                    watch.done();
                    return Err(Error::Invalid(format!(
                        "the {name} failed ({st}); see {}",
                        dir.join(format!("{name}.log")).display()
                    )));
                }
                done.push(name);
            }
        }
        if Instant::now() > deadline {
            watch.done();
            return Err(Error::Invalid(format!("the migration did not finish in {} s", a.timeout)));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    watch.done();
    let wall = started.elapsed().as_secs_f64();
    drop(procs); // the backend
    report(dir, seed, wall)
}

fn report(dir: &Path, seed: u64, wall: f64) -> Result<bool> {
    let summary = read_json(&dir.join("destination-summary.json"))?;
    let drv = read_json(&dir.join("guest-driver.out"))?;
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    println!();
    println!(
        "migration: {:.2}s (postcopy {:.2}s, {:.2}s wall from the source's start), {:.0} MiB/s",
        f(&summary["total_secs"]),
        f(&summary["postcopy_secs"]),
        wall,
        f(&summary["throughput_mib_s"])
    );
    println!(
        "pages: demand {} (a client waited), background {}, of which zero {}; precopy {}; requests {}",
        n(&summary["demand_pages"]),
        n(&summary["background_pages"]),
        n(&summary["zero_pages"]),
        n(&summary["precopy_pages"]),
        n(&summary["requests"])
    );
    println!("fault latency (fault read -> waiter woken), per client:");
    for c in summary["clients"].as_array().map(Vec::as_slice).unwrap_or_default() {
        println!(
            "  {:<16} faults {:>7}  waited {:>7}  p50 <{}us  p90 <{}us  p99 <{}us  max {:.0}us  mean {:.1}us",
            c["name"].as_str().unwrap_or("?"),
            n(&c["faults"]),
            n(&c["waited"]),
            n(&c["p50_us"]),
            n(&c["p90_us"]),
            n(&c["p99_us"]),
            f(&c["max_us"]),
            f(&c["mean_us"])
        );
    }
    let pc = &drv["postcopy"];
    let writes = pc["writes"].as_array().map_or(0, Vec::len);
    let reads = pc["reads"].as_array().map_or(0, Vec::len);
    println!(
        "guest I/O during postcopy through the backend: {writes} writes from guest pages not touched before, \
         {reads} reads into guest pages not touched before ({} rounds in {:.2}s), each checked by read-back; \
         then {} bounce-buffer writes verified",
        n(&pc["rounds"]),
        f(&pc["io_seconds"]),
        n(&drv["writes"])
    );
    if let Some(p) = pc["progress_after_io"].as_object() {
        println!("  (the broker had {} of {} pages when the I/O loop ended)", p["received"], p["total"]);
    } else if pc["complete_during_io"] == true {
        println!("  (the I/O loop ran until every page had arrived)");
    }
    println!("verification:");
    let src = block_checksums(&dir.join("source-ram.json"))?;
    let dst = block_checksums(&dir.join("destination-ram.json"))?;
    let ram_ok = !src.is_empty() && src == dst;
    for (name, sum) in &src {
        let got = dst.iter().find(|(n, _)| n == name).map_or("missing", |(_, s)| s.as_str());
        println!(
            "  RAM block {name}: source {sum}  destination {got}  {}",
            if got == sum { "OK" } else { "DIFFER" }
        );
    }
    let driver_ok =
        src.iter().all(|(name, sum)| drv["ram_checksums"][name]["checksum"].as_str() == Some(sum.as_str()));
    println!(
        "  RAM as the guest driver reads it through its own mapping: {}",
        if driver_ok { "equal to the source" } else { "DIFFERS from the source" }
    );
    let disk = check_disk(&dir.join("disk.img"), seed, &drv)?;
    println!(
        "  disk: mirror of guest RAM unchanged {}; {} of {writes} logged writes equal the source page they came from{}; \
         bounce region checksum {}",
        if disk.mirror_ok { "OK" } else { "DIFFERS" },
        disk.writes_ok,
        if disk.writes_bad.is_empty() { String::new() } else { format!(" (bad: {})", disk.writes_bad.join(", ")) },
        if disk.bounce_ok { "OK" } else { "DIFFERS" }
    );
    let end_ok = drv["postcopy_end"] == "ok";
    println!("  POSTCOPY_END to the backend: {}", drv["postcopy_end"]);
    let ok = ram_ok && driver_ok && disk.ok() && end_ok && writes > 0;
    println!("result: {}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}
