//! The reference floor programs: the project's own bench/uffd_floor.c (the default, so that a lone
//! clone benchmarks), and the shared ../shared/bench/uffd_limit.c as a second comparison when it
//! is there. Each is compiled with `cc -O2` at bench time and run under `taskset -c`, its
//! `key=value` lines (the same format) parsed into figures.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::bench::sys::{self, Placement};
use postcopy_broker::error::{Error, Result};

/// Environment variable that names the reference source file.
pub const REFERENCE_ENV: &str = "POSTCOPY_BENCH_REFERENCE";

/// The reference source's default: the project's own floor, bench/uffd_floor.c of this package.
pub fn default_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/uffd_floor.c")
}

/// The shared reference, ../shared/bench/uffd_limit.c beside the project root, if it is there.
pub fn shared_source() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bench/uffd_limit.c");
    p.is_file().then_some(p)
}

/// One run's figures: `demand mode=poll` → {"us_per_fault": .., "p50": .., ..}, and so on.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Line key ("demand poll", "demand spin", "place") → field → value.
    pub lines: HashMap<String, HashMap<String, f64>>,
}

impl Figures {
    /// A figure, if the reference printed it.
    pub fn get(&self, line: &str, field: &str) -> Option<f64> {
        self.lines.get(line)?.get(field).copied()
    }
}

/// Parse the reference's output.
pub fn parse(out: &str) -> Figures {
    let mut f = Figures::default();
    for l in out.lines() {
        let mut words = l.split_whitespace();
        let Some(kind) = words.next() else { continue };
        let mut fields = HashMap::new();
        let mut key = kind.to_string();
        for w in words {
            let Some((k, v)) = w.split_once('=') else { continue };
            match v.parse::<f64>() {
                Ok(x) => {
                    fields.insert(k.to_string(), x);
                }
                Err(_) if k == "mode" => key = format!("{kind} {v}"),
                Err(_) => {}
            }
        }
        f.lines.insert(key, fields);
    }
    f
}

/// The compiled reference.
#[derive(Debug)]
pub struct Reference {
    exe: PathBuf,
}

impl Reference {
    /// Compile `source` with `cc -O2` into `out_dir`.
    pub fn build(source: &Path, out_dir: &Path) -> Result<Reference> {
        if !source.is_file() {
            return Err(Error::Invalid(format!(
                "reference program {} not found; pass --reference PATH or set {REFERENCE_ENV} to \
                 a floor program (crates/postcopy-broker-cli/bench/uffd_floor.c)",
                source.display()
            )));
        }
        let name = source.file_stem().and_then(|s| s.to_str()).unwrap_or("reference");
        Self::build_as(source, out_dir, name)
    }

    /// Compile `source` with `cc -O2` into `out_dir/name`.
    pub fn build_as(source: &Path, out_dir: &Path, name: &str) -> Result<Reference> {
        if !source.is_file() {
            return Err(Error::Invalid(format!("reference program {} not found", source.display())));
        }
        std::fs::create_dir_all(out_dir)
            .map_err(|e| Error::io(format!("create {}", out_dir.display()), e))?;
        let exe = out_dir.join(name);
        let out = Command::new("cc")
            .arg("-O2")
            .arg("-o")
            .arg(&exe)
            .arg(source)
            .output()
            .map_err(|e| Error::io("run cc (install a C compiler: apt-get install gcc)", e))?;
        if !out.status.success() {
            return Err(Error::Invalid(format!(
                "cc -O2 {} failed: {}",
                source.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(Reference { exe })
    }

    /// Run `taskset -c BROKER uffd_limit pages mib` and parse its figures. When the client's CPUs
    /// differ, every client process the reference forks is moved to them as soon as it appears
    /// (it then spends a few hundred microseconds setting up before it starts timing).
    pub fn run(&self, placement: &Placement, pages: usize, mib: usize) -> Result<Figures> {
        self.run_args(placement, &[pages.to_string(), mib.to_string()])
    }

    /// Run `taskset -c BROKER program args...`, its client moved as in [`Reference::run`].
    pub fn run_args(&self, placement: &Placement, args: &[String]) -> Result<Figures> {
        let mut child = Command::new("taskset")
            .arg("-c")
            .arg(Placement::cpu_list(&placement.broker))
            .arg(&self.exe)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io("run taskset (install util-linux)", e))?;
        let mut stdout = child.stdout.take().ok_or_else(|| Error::Invalid("no stdout".into()))?;
        let mut stderr = child.stderr.take().ok_or_else(|| Error::Invalid("no stderr".into()))?;
        let reader = std::thread::spawn(move || {
            let (mut o, mut e) = (String::new(), String::new());
            let _ = stdout.read_to_string(&mut o);
            let _ = stderr.read_to_string(&mut e);
            (o, e)
        });
        let moved = if placement.client != placement.broker {
            follow_children(&mut child, &placement.client)
        } else {
            Ok(())
        };
        let status = child.wait().map_err(|e| Error::io("wait for the reference", e))?;
        let (out, err) = reader.join().map_err(|_| Error::Invalid("reference reader panicked".into()))?;
        moved?;
        if !status.success() {
            return Err(Error::Invalid(format!("reference {} failed ({status}): {err}", self.exe.display())));
        }
        Ok(parse(&out))
    }
}

/// Move every child that `parent` forks to `cpus` until `parent` exits. Between children it
/// polls every 50 µs; while a child lives it sleeps on the child's pidfd.
fn follow_children(parent: &mut Child, cpus: &[usize]) -> Result<()> {
    let children = format!("/proc/{0}/task/{0}/children", parent.id());
    loop {
        if parent.try_wait().map_err(|e| Error::io("wait for the reference", e))?.is_some() {
            return Ok(());
        }
        let list = std::fs::read_to_string(&children).unwrap_or_default();
        let Some(pid) = list.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()) else {
            std::thread::sleep(Duration::from_micros(50));
            continue;
        };
        // The child may already be gone; then there is nothing to move.
        if sys::pin_pid(pid, cpus).is_err() {
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        if let Ok(fd) = postcopy_broker::fault::pidfd_open(pid) {
            let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd; waits until the child exits.
            unsafe { libc::poll(&mut p, 1, -1) };
        }
        // Wait until the parent reaped it, so it is not found again.
        while std::fs::read_to_string(&children)
            .unwrap_or_default()
            .split_whitespace()
            .any(|p| p == pid.to_string())
        {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reference_lines() {
        let f = parse(
            "demand mode=poll pages=20000 us_per_fault=7.90 p50=7.99 p99=11.17 max=131.88 checksum=140000\n\
             demand mode=spin pages=20000 us_per_fault=8.67 p50=5.76 p99=8.78\n\
             place mib=256 copy_4k_gibs=2.71 copy_2m_gibs=2.77\n",
        );
        assert_eq!(f.get("demand poll", "us_per_fault"), Some(7.90));
        assert_eq!(f.get("demand spin", "p99"), Some(8.78));
        assert_eq!(f.get("place", "copy_2m_gibs"), Some(2.77));
        assert_eq!(f.get("place", "nothing"), None);
    }
}
