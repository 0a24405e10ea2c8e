//! CPU time of this process's threads by name, sampled from `/proc/self/task/*/schedstat` (the
//! scheduler's nanoseconds on a CPU) while a case runs: the migration cases run both ends in
//! this process, each end's threads named after it, and some of them end before the case does,
//! so a thread's last sample stands for it (at most one sampling interval short).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const EVERY: Duration = Duration::from_millis(2);

/// The last sample of each thread: tid → (name, CPU seconds).
type Samples = HashMap<u32, (String, f64)>;

/// A sampler running on a thread of its own until [`ThreadCpu::stop`].
#[derive(Debug)]
pub struct ThreadCpu {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Samples>>,
    thread: Option<JoinHandle<()>>,
    /// CPU seconds each thread had when the sampler started (threads that were already there).
    before: Samples,
}

impl ThreadCpu {
    /// Start sampling.
    pub fn start() -> ThreadCpu {
        let before = sample();
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Samples::new()));
        let (s, m) = (Arc::clone(&stop), Arc::clone(&samples));
        let thread = std::thread::Builder::new()
            .name("bench-cpu-sampler".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    let now = sample();
                    if let Ok(mut g) = m.lock() {
                        g.extend(now);
                    }
                    std::thread::sleep(EVERY);
                }
            })
            .ok();
        ThreadCpu { stop, samples, thread, before }
    }

    /// Stop, and return the CPU seconds used since the start by the threads whose name starts
    /// with each of `prefixes` (one sum per group of prefixes).
    pub fn stop(mut self, groups: &[&[&str]]) -> Vec<f64> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut all = self.samples.lock().map(|g| g.clone()).unwrap_or_default();
        all.extend(sample());
        groups
            .iter()
            .map(|prefixes| {
                all.iter()
                    .filter(|(_, (name, _))| prefixes.iter().any(|p| name.starts_with(p)))
                    .map(|(tid, (_, secs))| secs - self.before.get(tid).map_or(0.0, |b| b.1))
                    .sum()
            })
            .collect()
    }
}

/// Every thread of this process now: tid → (name, CPU seconds).
fn sample() -> Samples {
    let mut out = Samples::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return out };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else { continue };
        let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim().to_string();
        let ns = std::fs::read_to_string(e.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()));
        if let Some(ns) = ns {
            out.insert(tid, (name, ns as f64 / 1e9));
        }
    }
    out
}
