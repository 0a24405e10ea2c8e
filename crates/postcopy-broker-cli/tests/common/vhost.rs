//! vhost-user tests with a broker process: a work directory with an image (one or more RAM
//! blocks back to back) and a disk whose first sectors mirror the image at [`MIRROR_GPA`], the
//! broker (`serve --image`, lazy restore), backends (the example, qemu-storage-daemon), the guest
//! driver example, pcb-client scripts, the broker's status, and the checks of RAM and disk at the
//! end. Every process started here is killed when the [`Setup`] is dropped.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub const DISK: u64 = 64 << 20;
pub const PAGE: u64 = 4096;
pub const MIRROR_GPA: u64 = 8 << 20;
pub const MIRROR_SECTORS: u64 = 4096;

pub fn examples_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("examples")
}

pub fn fnv(data: &[u8]) -> String {
    format!("{:016x}", super::fnv1a64(data))
}

/// A RAM block of the image: name, size, page size.
#[derive(Debug, Clone, Copy)]
pub struct BlockSpec {
    pub name: &'static str,
    pub size: u64,
    pub page_size: u64,
}

impl BlockSpec {
    pub const fn small(name: &'static str, size: u64) -> BlockSpec {
        BlockSpec { name, size, page_size: PAGE }
    }

    /// `NAME:SIZE[:2M]` as `serve --block` and `source --block` take it.
    pub fn arg(&self) -> String {
        let huge = if self.page_size > PAGE { ":2M" } else { "" };
        format!("{}:{}{huge}", self.name, self.size)
    }
}

/// Pseudo-random bytes, every fourth small page zero.
pub fn image_bytes(len: u64, seed: u64) -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def0u64 ^ seed;
    let mut image = vec![0u8; len as usize];
    for (i, c) in image.chunks_mut(8).enumerate() {
        if (i * 8 / PAGE as usize) % 4 == 3 {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    image
}

/// A work directory with an image and a disk; removed on drop, with every process in it killed.
pub struct Setup {
    pub dir: PathBuf,
    pub blocks: Vec<BlockSpec>,
    /// The blocks' bytes back to back (guest address 0 on, as the guest driver maps them).
    pub image: Vec<u8>,
    pub kids: Vec<Child>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for k in &mut self.kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Setup {
    /// One 16 MiB block "ram" of small pages.
    pub fn new(name: &str) -> Setup {
        Setup::with_blocks(name, &[BlockSpec::small("ram", 16 << 20)])
    }

    pub fn with_blocks(name: &str, blocks: &[BlockSpec]) -> Setup {
        let dir = std::env::temp_dir().join(format!("pcb-vpc-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let total = blocks.iter().map(|b| b.size).sum();
        let image = image_bytes(total, name.len() as u64);
        fs::write(dir.join("image"), &image).unwrap();
        let s = Setup { dir, blocks: blocks.to_vec(), image, kids: Vec::new() };
        s.write_disk(&s.image);
        s
    }

    /// A disk whose first [`MIRROR_SECTORS`] sectors hold `ram` at [`MIRROR_GPA`].
    pub fn write_disk(&self, ram: &[u8]) {
        let mut disk = vec![0u8; DISK as usize];
        let m = (MIRROR_SECTORS * 512) as usize;
        disk[..m].copy_from_slice(&ram[MIRROR_GPA as usize..MIRROR_GPA as usize + m]);
        fs::write(self.path("disk"), &disk).unwrap();
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn wait_for(&self, p: &Path, what: &str) {
        let t = Instant::now();
        while !p.exists() {
            assert!(t.elapsed() < Duration::from_secs(30), "{what} never appeared at {}", p.display());
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// `--block` arguments for every block.
    pub fn block_args(&self) -> Vec<String> {
        self.blocks.iter().flat_map(|b| ["--block".to_string(), b.arg()]).collect()
    }

    /// `postcopy-broker serve` lazily restoring the image; returns its index in `kids`.
    pub fn serve(&mut self, extra: &[&str]) -> usize {
        let child = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
            .arg("serve")
            .args(self.block_args())
            .arg("--image")
            .arg(self.path("image"))
            .arg("--control")
            .arg(self.path("ctl.sock"))
            .arg("--checksums")
            .arg(self.path("sums.json"))
            .args(extra)
            .stdout(fs::File::create(self.path("serve.out")).unwrap())
            .stderr(fs::File::create(self.path("serve.err")).unwrap())
            .spawn()
            .unwrap();
        self.kids.push(child);
        self.kids.len() - 1
    }

    /// A backend ("ours", "nopf" = ours without PAGEFAULT, or "qsd") on the disk; its socket.
    pub fn backend(&mut self, kind: &str) -> (PathBuf, usize) {
        let sock = self.path(&format!("{kind}.sock"));
        let log = fs::File::create(self.path(&format!("{kind}.log"))).unwrap();
        let mut cmd = if kind == "qsd" {
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev")
                .arg(format!("driver=file,node-name=disk,filename={}", self.path("disk").display()))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on",
                    sock.display()
                ));
            c
        } else {
            let mut c = Command::new(examples_dir().join("vhost_user_blk"));
            c.arg("--socket")
                .arg(&sock)
                .arg("--disk")
                .arg(self.path("disk"))
                .arg("--size")
                .arg(DISK.to_string());
            if kind == "nopf" {
                c.arg("--no-pagefault");
            }
            c
        };
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.kids.push(child);
        self.wait_for(&sock, "the backend socket");
        (sock, self.kids.len() - 1)
    }

    /// The guest driver example against `backend`, with the broker at `ctl.sock`.
    pub fn driver(&self, backend: &Path, extra: &[&str]) -> Child {
        self.wait_for(&self.path("ctl.sock"), "the broker's control socket");
        Command::new(examples_dir().join("guest_driver"))
            .arg("--socket")
            .arg(backend)
            .arg("--control")
            .arg(self.path("ctl.sock"))
            .args([
                "--json",
                "--mirror-gpa",
                &MIRROR_GPA.to_string(),
                "--mirror-sectors",
                &MIRROR_SECTORS.to_string(),
            ])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(self.path("driver.err")).unwrap())
            .spawn()
            .unwrap()
    }

    /// A pcb-client registered with the broker runs `script` over `block` to its end (within a
    /// minute).
    pub fn run_client_on(&self, block: &str, script: &str) {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pcb-client"))
            .arg("--control")
            .arg(self.path("ctl.sock"))
            .args(["--block", block, "--no-wait", "--script", script])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        assert!(wait_exit(&mut c, 60, "pcb-client").success(), "pcb-client --script {script} failed");
    }

    /// [`Setup::run_client_on`] the first block.
    pub fn run_client(&self, script: &str) {
        self.run_client_on(self.blocks[0].name, script);
    }

    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
            .args(["status", "--json", "--control"])
            .arg(self.path("ctl.sock"))
            .output()
            .unwrap();
        assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Keep `child` with the others (killed on drop); its index in `kids`.
    pub fn adopt(&mut self, child: Child) -> usize {
        self.kids.push(child);
        self.kids.len() - 1
    }

    /// Write a line to child `i`'s stdin.
    pub fn say(&mut self, i: usize, line: &str) {
        let stdin = self.kids[i].stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// Wait (at most `secs`) for child `i` to exit; kill it and fail, with the logs, if it does
    /// not.
    pub fn wait_kid(&mut self, i: usize, secs: u64, what: &str) -> std::process::ExitStatus {
        let (serve, driver) = (self.path("serve.err"), self.path("driver.err"));
        let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
        let context = || format!("serve:\n{}\ndriver:\n{}", read(&serve), read(&driver));
        wait_exit_or(&mut self.kids[i], secs, what, context)
    }

    pub fn wait_serve(&mut self, i: usize) {
        let st = self.wait_kid(i, 300, "serve");
        assert!(st.success(), "serve failed: {}\n{}", self.log("serve.err"), self.log("driver.err"));
    }

    /// The broker's checksums (`serve --checksums`) equal the image's, block by block.
    pub fn check_broker_sums(&self) {
        let sums: serde_json::Value =
            serde_json::from_slice(&fs::read(self.path("sums.json")).unwrap()).unwrap();
        for (name, bytes) in split_blocks(&self.blocks, &self.image) {
            assert_eq!(
                sums[name],
                fnv(bytes).as_str(),
                "destination RAM block {name} differs from the image"
            );
        }
    }

    /// The broker's checksums and the driver's equal the image's; the disk holds the mirror
    /// unchanged and each logged write equals the image page it came from.
    pub fn check_results(&self, s: &serde_json::Value) {
        self.check_broker_sums();
        check_ram_and_disk(&self.blocks, &self.image, &self.path("disk"), s);
    }
}

/// The blocks of `specs` as slices of `ram` (their bytes back to back).
pub fn split_blocks<'a>(specs: &[BlockSpec], ram: &'a [u8]) -> Vec<(&'static str, &'a [u8])> {
    let mut off = 0usize;
    specs
        .iter()
        .map(|b| {
            let s = &ram[off..off + b.size as usize];
            off += b.size as usize;
            (b.name, s)
        })
        .collect()
}

/// The guest driver's summary `s` against the final RAM `ram` (the blocks `specs` back to
/// back): the driver read every block as `ram`, the disk's mirror sectors still equal `ram` at
/// [`MIRROR_GPA`], every write logged during postcopy holds the page of `ram` it came from, and
/// the bounce-buffer region holds what the driver read back.
pub fn check_ram_and_disk(specs: &[BlockSpec], ram: &[u8], disk: &Path, s: &serde_json::Value) {
    for (name, bytes) in split_blocks(specs, ram) {
        assert_eq!(
            s["ram_checksums"][name]["fnv"],
            fnv(bytes).as_str(),
            "the driver saw other RAM in {name}"
        );
    }
    let disk = fs::read(disk).unwrap();
    let m = (MIRROR_SECTORS * 512) as usize;
    assert!(disk[..m] == ram[MIRROR_GPA as usize..MIRROR_GPA as usize + m], "mirror changed");
    let writes = s["postcopy"]["writes"].as_array().unwrap();
    assert!(!writes.is_empty());
    for w in writes {
        let (gpa, sector) = (w[0].as_u64().unwrap() as usize, w[1].as_u64().unwrap() as usize);
        assert_eq!(
            &disk[sector * 512..sector * 512 + PAGE as usize],
            &ram[gpa..gpa + PAGE as usize],
            "write of guest page {gpa:#x} to sector {sector}"
        );
    }
    let (first, sectors) =
        (s["first_sector"].as_u64().unwrap() as usize, s["sectors"].as_u64().unwrap() as usize);
    let bounce = &disk[first * 512..(first + sectors) * 512];
    assert_eq!(s["checksum"], format!("{:#018x}", super::fnv1a64(bounce)), "the bounce region");
}

/// Wait (at most `secs`) for `child` to exit; kill it and fail if it does not.
pub fn wait_exit(child: &mut Child, secs: u64, what: &str) -> std::process::ExitStatus {
    wait_exit_or(child, secs, what, String::new)
}

fn wait_exit_or(
    child: &mut Child,
    secs: u64,
    what: &str,
    context: impl FnOnce() -> String,
) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {secs} s\n{}", context());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A child's stdout read on a thread as JSON lines (so a long summary never blocks the child on
/// a full pipe), handed out with bounded waits.
pub struct JsonLines {
    rx: mpsc::Receiver<serde_json::Value>,
}

impl JsonLines {
    pub fn new(child: &mut Child) -> JsonLines {
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        JsonLines { rx }
    }

    /// The next line that has `key` (earlier ones are skipped); fails after `secs` or when the
    /// child's stdout ends first.
    pub fn next_with(&self, key: &str, secs: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) if v.get(key).is_some() => return v,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("no line with {key} within {secs} s"),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("the output ended before a line with {key}")
                }
            }
        }
    }
}

/// Read JSON lines until one has `key`.
pub fn line_with(out: &mut BufReader<ChildStdout>, key: &str) -> serde_json::Value {
    loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "the driver ended before printing {key}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v.get(key).is_some() {
            return v;
        }
    }
}

/// The client named `name` in a status, registered or departed.
pub fn client<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["clients"]
        .as_array()
        .unwrap()
        .iter()
        .chain(st["departed"].as_array().unwrap())
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no client {name} in {st}"))
}

/// Faults the broker's status counts for the client named `name` (0 if it is not there).
pub fn client_faults(st: &serde_json::Value, name: &str) -> u64 {
    st["clients"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .map_or(0, |c| c["stats"]["faults"].as_u64().unwrap_or(0))
}
