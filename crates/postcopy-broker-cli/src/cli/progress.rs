//! Progress of long work: a line redrawn in place on a terminal, periodic log lines otherwise.

use postcopy_broker::conv::share;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Reports `done / total` units.
#[derive(Debug)]
pub struct Progress {
    what: String,
    total: u64,
    tty: bool,
    start: Instant,
    last: Instant,
    every: Duration,
}

impl Progress {
    /// A progress reporter for `total` units of `what`.
    pub fn new(what: &str, total: u64) -> Progress {
        let now = Instant::now();
        Progress {
            what: what.into(),
            total,
            tty: std::io::stderr().is_terminal(),
            start: now,
            last: now,
            every: Duration::from_secs(2),
        }
    }

    /// Report `done` units (rate limited); `extra` is appended.
    pub fn update(&mut self, done: u64, extra: &str) {
        let now = Instant::now();
        let pct = if self.total == 0 { 100.0 } else { done as f64 * 100.0 / self.total as f64 };
        let secs = now.duration_since(self.start).as_secs_f64();
        if self.tty {
            if now.duration_since(self.last) < Duration::from_millis(100) && done < self.total {
                return;
            }
            let width = 30usize;
            let fill = share(done, self.total, width);
            let bar: String = (0..width).map(|i| if i < fill { '#' } else { '-' }).collect();
            let mut e = std::io::stderr().lock();
            let _ =
                write!(e, "\r{} [{bar}] {pct:5.1}% {done}/{} {secs:.1}s {extra}  ", self.what, self.total);
            let _ = e.flush();
        } else if now.duration_since(self.last) >= self.every || done >= self.total {
            log::info!("{}: {done}/{} ({pct:.1}%) after {secs:.1}s {extra}", self.what, self.total);
        } else {
            return;
        }
        self.last = now;
    }

    /// End the progress line.
    pub fn finish(&mut self) {
        if self.tty {
            eprintln!();
        }
    }
}
