//! The scenario's processes: each in its own process group (a pcb-client's forked child goes with
//! it) and killed with the test thread (PR_SET_PDEATHSIG), stderr in a file of the work
//! directory, stdout collected line by line with the time each line came. Dropping `Procs`
//! kills every process still running, so no failing run leaves one behind.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Lines a process printed on stdout, with their arrival times.
#[derive(Debug, Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<(Instant, String)>>>);

impl Lines {
    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn last_at(&self) -> Option<Instant> {
        self.0.lock().unwrap().last().map(|l| l.0)
    }

    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().map(|l| l.1.clone()).collect()
    }
}

/// One process.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub pid: u32,
    child: Child,
    pub stderr: PathBuf,
    pub lines: Lines,
    reader: Option<JoinHandle<()>>,
    stdin: Option<ChildStdin>,
    pub status: Option<ExitStatus>,
    /// When `poll` (or `kill`) saw it exit.
    pub exited_at: Option<Instant>,
}

/// Every process of one scenario.
#[derive(Debug)]
pub struct Procs {
    dir: PathBuf,
    pub list: Vec<Proc>,
}

impl Procs {
    pub fn new(dir: &Path) -> Procs {
        Procs { dir: dir.to_path_buf(), list: Vec::new() }
    }

    /// Start `cmd` as `name`; stdout is collected by lines when `lines`, else written to
    /// `NAME.out`; stdin is a pipe when `stdin`.
    pub fn spawn(&mut self, name: &str, cmd: &mut Command, lines: bool, stdin: bool) -> usize {
        let stderr = self.dir.join(format!("{name}.err"));
        cmd.stderr(std::fs::File::create(&stderr).unwrap());
        if lines {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(std::fs::File::create(self.dir.join(format!("{name}.out"))).unwrap());
        }
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() });
        cmd.process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let mut child =
            cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name} ({:?}): {e}", cmd.get_program()));
        let out = Lines::default();
        let reader = child.stdout.take().map(|s| {
            let l = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(s).lines() {
                    let Ok(line) = line else { break };
                    l.0.lock().unwrap().push((Instant::now(), line));
                }
            })
        });
        let stdin = child.stdin.take();
        self.list.push(Proc {
            name: name.to_string(),
            pid: child.id(),
            child,
            stderr,
            lines: out,
            reader,
            stdin,
            status: None,
            exited_at: None,
        });
        self.list.len() - 1
    }

    /// Reap processes that exited; returns whether any did.
    pub fn poll(&mut self) -> bool {
        let mut any = false;
        for p in &mut self.list {
            if p.status.is_none() {
                if let Ok(Some(st)) = p.child.try_wait() {
                    p.status = Some(st);
                    p.exited_at = Some(Instant::now());
                    any = true;
                    if let Some(t) = p.reader.take() {
                        let _ = t.join();
                    }
                }
            }
        }
        any
    }

    pub fn running(&self, i: usize) -> bool {
        self.list[i].status.is_none()
    }

    /// Send a line to a process's stdin (ignored if it is gone).
    pub fn send_line(&mut self, i: usize) {
        if let Some(s) = &mut self.list[i].stdin {
            let _ = writeln!(s);
            let _ = s.flush();
        }
    }

    /// Send `line` to a process's stdin (ignored if it is gone).
    pub fn send(&mut self, i: usize, line: &str) {
        if let Some(s) = &mut self.list[i].stdin {
            let _ = writeln!(s, "{line}");
            let _ = s.flush();
        }
    }

    /// SIGKILL process `i` and its process group, and reap it.
    pub fn kill(&mut self, i: usize) {
        let p = &mut self.list[i];
        if p.status.is_none() {
            // SAFETY: kill(2) on the process group this scenario created for a child it has not
            // reaped yet (so the group id cannot have been reused).
            unsafe { libc::kill(-(p.pid as i32), libc::SIGKILL) };
            p.status = p.child.wait().ok();
            p.exited_at = Some(Instant::now());
            if let Some(t) = p.reader.take() {
                let _ = t.join();
            }
        }
    }

    pub fn kill_all(&mut self) {
        for i in 0..self.list.len() {
            self.kill(i);
        }
    }

    /// The last `n` lines of a process's stderr.
    pub fn stderr_tail(&self, i: usize, n: usize) -> String {
        let text = std::fs::read_to_string(&self.list[i].stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The whole stderr of a process.
    pub fn stderr(&self, i: usize) -> String {
        std::fs::read_to_string(&self.list[i].stderr).unwrap_or_default()
    }

    /// The stdout file of a process started without `lines`.
    pub fn stdout_file(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.out", self.list[i].name))).unwrap_or_default()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Threads of `pid` asleep in the userfaultfd code (blocked on a missing page, or on an event
/// nobody reads), with where they sleep.
pub fn userfault_threads(pid: u32) -> Vec<(u32, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| {
            let w = std::fs::read_to_string(t.path().join("wchan")).ok()?;
            let tid = t.file_name().to_str()?.parse().ok()?;
            w.contains("userfault").then(|| (tid, w.trim().to_string()))
        })
        .collect()
}
