//! A `postcopy-broker serve` child process for tests that look at the broker from outside: its
//! open fds, its CPU time, its log, its limits. Optionally started in a pid namespace of its own
//! (`unshare --pid --fork`), where it cannot see the pids of peers outside.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postcopy_broker::control::ControlClient;

/// A running broker daemon.
pub struct Serve {
    child: Child,
    /// Its control socket.
    pub sock: PathBuf,
    /// Its stderr (the log), written to a file.
    pub log: PathBuf,
    /// Its image file.
    pub image: PathBuf,
    /// The broker's pid in this process's pid namespace.
    pub pid: u32,
}

/// A unique temp path for this test process.
pub fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("pcb-serve-{}-{name}", std::process::id()))
}

impl Serve {
    /// Start `serve --control SOCK --image IMAGE --no-background ARGS` with `image_bytes` in the
    /// image, logging at info, and wait until it answers on its socket.
    pub fn start(name: &str, image_bytes: &[u8], args: &[&str]) -> Serve {
        Self::start_in(name, image_bytes, args, false)
    }

    /// Like [`Serve::start`], in a new pid namespace (`unshare --pid --fork --mount-proc`).
    pub fn start_in_pid_namespace(name: &str, image_bytes: &[u8], args: &[&str]) -> Serve {
        Self::start_in(name, image_bytes, args, true)
    }

    fn start_in(name: &str, image_bytes: &[u8], args: &[&str], own_pid_ns: bool) -> Serve {
        let sock = temp(&format!("{name}.sock"));
        let log = temp(&format!("{name}.log"));
        let image = temp(&format!("{name}.img"));
        std::fs::write(&image, image_bytes).unwrap();
        let exe = env!("CARGO_BIN_EXE_postcopy-broker");
        let mut cmd = if own_pid_ns {
            let mut c = Command::new("unshare");
            c.args(["--pid", "--fork", "--kill-child", "--mount-proc", exe]);
            c
        } else {
            Command::new(exe)
        };
        cmd.arg("serve").arg("--control").arg(&sock).arg("--image").arg(&image).arg("--no-background");
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().unwrap();
        let mut s = Serve { pid: child.id(), child, sock, log, image };
        s.wait_ready();
        if own_pid_ns {
            s.pid = s.descendant_running(exe);
        }
        s
    }

    /// Wait for the log line that follows binding the socket (connecting to find out would leave
    /// a connection the broker may not have closed yet when a test counts its fds).
    fn wait_ready(&mut self) {
        let end = Instant::now() + Duration::from_secs(30);
        while !self.log_text().contains("serving on") {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("serve exited with {st}: {}", self.log_text());
            }
            assert!(Instant::now() < end, "serve did not listen: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid of the process under our child that runs `exe` (unshare forks it).
    fn descendant_running(&self, exe: &str) -> u32 {
        let mut todo = vec![self.child.id()];
        while let Some(p) = todo.pop() {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            if cmd.starts_with(exe.as_bytes()) {
                return p;
            }
            for t in std::fs::read_dir(format!("/proc/{p}/task")).unwrap() {
                let children =
                    std::fs::read_to_string(t.unwrap().path().join("children")).unwrap_or_default();
                todo.extend(children.split_whitespace().map(|c| c.parse::<u32>().unwrap()));
            }
        }
        panic!("no {exe} under pid {}", self.child.id());
    }

    /// A client of its control socket.
    pub fn client(&self) -> ControlClient {
        ControlClient::connect(&self.sock).unwrap()
    }

    /// Its status report.
    pub fn status(&self) -> postcopy_broker::stats::StatusReport {
        serde_json::from_value(self.client().status().unwrap()).unwrap()
    }

    /// How many fds the broker has open.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid)).unwrap().count()
    }

    /// Its CPU time so far (user + system), in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Wait (up to a safety bound) until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let t = self.log_text();
            if t.contains(needle) {
                return t;
            }
            assert!(Instant::now() < end, "the broker never logged {needle:?}:\n{t}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Set its limit of open files (soft and hard).
    pub fn limit_fds(&self, n: u64) {
        let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
        // SAFETY: prlimit reads one rlimit from `lim` and writes nothing (old limit pointer null).
        let r = unsafe {
            libc::prlimit(self.pid as libc::pid_t, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut())
        };
        assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    /// Wait until `f` holds, polling (a bound catches a hang).
    pub fn wait_until(&self, what: &str, mut f: impl FnMut(&Serve) -> bool) {
        let end = Instant::now() + Duration::from_secs(30);
        while !f(self) {
            assert!(Instant::now() < end, "{what} never happened:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait (up to a safety bound) for the broker to exit by itself; its exit status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < end, "the broker did not exit:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The image path as a string.
    pub fn image_path(&self) -> &Path {
        &self.image
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: kill sends a signal to the broker we started (unshare exits after it).
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("PCB_KEEP_LOGS").is_some() {
            return;
        }
        for p in [&self.sock, &self.log, &self.image] {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::io::stderr().flush();
    }
}
