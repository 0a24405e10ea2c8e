//! What the destination shows: a progress line on a terminal (periodic log lines otherwise) while
//! pages arrive, and the end-of-migration [`Summary`] (time, pages by demand / background / zero,
//! bytes, throughput, fault latency percentiles per client).

use crate::conv::share;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::end::Ending;
use super::network::NetState;
use crate::stats::StatusReport;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A progress line when stderr is a terminal, log lines otherwise.
    Auto,
    /// Log lines every few seconds.
    Log,
    /// Nothing.
    Off,
}

impl Progress {
    /// Start showing progress of `total_pages` pages (`total_bytes` bytes).
    pub fn start(self, total_pages: u64, total_bytes: u64) -> ProgressShow {
        let tty = self == Progress::Auto && std::io::stderr().is_terminal();
        ProgressShow {
            mode: if tty {
                Mode::Line
            } else if self == Progress::Off {
                Mode::Off
            } else {
                Mode::Log
            },
            total_pages,
            total_bytes,
            start: Instant::now(),
            last: None,
            drawn: false,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Mode {
    Line,
    Log,
    Off,
}

/// A running progress display.
#[derive(Debug)]
pub struct ProgressShow {
    mode: Mode,
    total_pages: u64,
    total_bytes: u64,
    start: Instant,
    last: Option<Instant>,
    drawn: bool,
}

impl ProgressShow {
    /// Show `received` pages and `bytes` moved so far (rate limited).
    pub fn update(&mut self, received: u64, bytes: u64) {
        let every = match self.mode {
            Mode::Line => Duration::from_millis(200),
            Mode::Log => Duration::from_secs(5),
            Mode::Off => return,
        };
        let now = Instant::now();
        if self.last.is_some_and(|l| now - l < every) || (self.last.is_none() && self.mode == Mode::Log) {
            if self.last.is_none() {
                self.last = Some(now);
            }
            return;
        }
        self.last = Some(now);
        let pct =
            if self.total_pages == 0 { 100.0 } else { received as f64 * 100.0 / self.total_pages as f64 };
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let mib = bytes as f64 / (1 << 20) as f64;
        let text = format!(
            "received {received}/{} pages ({pct:.1}%) of {} MiB, {mib:.0} MiB moved, {:.0} MiB/s",
            self.total_pages,
            self.total_bytes >> 20,
            mib / secs
        );
        match self.mode {
            Mode::Line => {
                let width = 40;
                let fill = share(received, self.total_pages, width);
                let bar: String = "#".repeat(fill.min(width)) + &" ".repeat(width - fill.min(width));
                let mut e = std::io::stderr().lock();
                let _ = write!(e, "\r[{bar}] {text}\x1b[K");
                let _ = e.flush();
                self.drawn = true;
            }
            Mode::Log => log::info!("{text}"),
            Mode::Off => {}
        }
    }

    /// End the progress line.
    pub fn clear(&mut self) {
        if self.drawn {
            let _ = writeln!(std::io::stderr());
            self.drawn = false;
        }
    }
}

/// Fault latency of one client.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClientLatency {
    /// Client name.
    pub name: String,
    /// Faults it took.
    pub faults: u64,
    /// Faults that waited for a page from the source.
    pub waited: u64,
    /// Median fault-to-wake latency, upper bound of its log2 bucket, in µs.
    pub p50_us: u64,
    /// 90th percentile (bucket upper bound), µs.
    pub p90_us: u64,
    /// 99th percentile (bucket upper bound), µs.
    pub p99_us: u64,
    /// Largest, µs.
    pub max_us: f64,
    /// Mean, µs.
    pub mean_us: f64,
}

/// The end-of-migration summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Seconds from the source's connection to the end.
    pub total_secs: f64,
    /// Seconds from Listen to the end.
    pub postcopy_secs: f64,
    /// Pages that came with the precopy pass (before Listen).
    pub precopy_pages: u64,
    /// Pages placed because a client waited for them.
    pub demand_pages: u64,
    /// Pages placed from the background stream.
    pub background_pages: u64,
    /// Pages placed as zero during postcopy.
    pub zero_pages: u64,
    /// Pages that arrived on the urgent connection.
    pub urgent_pages: u64,
    /// Pages that arrived flagged DEMAND.
    pub demand_flagged_pages: u64,
    /// Pages that arrived twice (ignored).
    pub duplicate_pages: u64,
    /// Requests sent to the source.
    pub requests: u64,
    /// Faults read from every userfaultfd.
    pub faults: u64,
    /// Page data bytes received (precopy and postcopy).
    pub bytes: u64,
    /// Bytes per second over the whole migration, in MiB/s.
    pub throughput_mib_s: f64,
    /// Per client (the broker's own mapping included as "broker" when it faulted).
    pub clients: Vec<ClientLatency>,
    /// Connection losses during postcopy.
    pub pauses: u64,
    /// Resumes after them.
    pub resumes: u64,
    /// Requests sent again on a new urgent connection after resumes.
    pub reissued_requests: u64,
    /// How the source learnt of the end (a network migration only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<Ending>,
    /// Restarts of the destination broker during this migration (docs/recovery.md), oldest
    /// first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restarts: Vec<crate::fault::park::Restart>,
}

impl Summary {
    /// Build the summary from the session's numbers and the fault loop's final status.
    pub fn new(
        total: Duration,
        postcopy: Duration,
        precopy_pages: u64,
        precopy_bytes: u64,
        net: &NetState,
        status: StatusReport,
    ) -> Summary {
        let bytes = precopy_bytes + net.bytes.load(Ordering::Relaxed);
        let secs = total.as_secs_f64();
        let mut s = Summary::from_status(secs, postcopy.as_secs_f64(), bytes, &status);
        s.precopy_pages = precopy_pages;
        s.urgent_pages = net.urgent_pages.load(Ordering::Relaxed);
        s.demand_flagged_pages = net.demand_flagged_pages.load(Ordering::Relaxed);
        s.duplicate_pages = net.duplicate_pages.load(Ordering::Relaxed);
        s.requests = net.requests.load(Ordering::Relaxed);
        s.pauses = net.pauses.load(Ordering::Relaxed);
        s.resumes = net.resumes.load(Ordering::Relaxed);
        s.reissued_requests = net.reissued.load(Ordering::Relaxed);
        s
    }

    /// A summary from a fault loop's status alone (lazy restore: no network).
    pub fn from_status(total_secs: f64, postcopy_secs: f64, bytes: u64, status: &StatusReport) -> Summary {
        let g = &status.broker;
        Summary {
            total_secs,
            postcopy_secs,
            precopy_pages: 0,
            demand_pages: g.pages_demand,
            background_pages: g.pages_background,
            zero_pages: g.pages_zero,
            urgent_pages: 0,
            pauses: 0,
            resumes: 0,
            reissued_requests: 0,
            end: None,
            restarts: status.restart.clone().into_iter().collect(),
            demand_flagged_pages: 0,
            duplicate_pages: 0,
            requests: g.requests,
            faults: g.faults,
            bytes,
            throughput_mib_s: if total_secs > 0.0 {
                bytes as f64 / (1 << 20) as f64 / total_secs
            } else {
                0.0
            },
            clients: status
                .all_clients()
                .map(|c| {
                    let l = &c.stats.latency;
                    ClientLatency {
                        name: c.name.clone(),
                        faults: c.stats.faults,
                        waited: c.stats.pages_requested + c.stats.joined,
                        p50_us: l.quantile_us(0.5),
                        p90_us: l.quantile_us(0.9),
                        p99_us: l.quantile_us(0.99),
                        max_us: l.max_ns as f64 / 1000.0,
                        mean_us: l.mean_us(),
                    }
                })
                .collect(),
        }
    }

    /// The summary as text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "migration complete in {:.2}s (postcopy {:.2}s): {:.1} MiB at {:.0} MiB/s",
            self.total_secs,
            self.postcopy_secs,
            self.bytes as f64 / (1 << 20) as f64,
            self.throughput_mib_s
        );
        let _ = writeln!(
            s,
            "pages: precopy {} demand {} background {} zero {}  (urgent {} duplicate {})  requests {} faults {}",
            self.precopy_pages,
            self.demand_pages,
            self.background_pages,
            self.zero_pages,
            self.urgent_pages,
            self.duplicate_pages,
            self.requests,
            self.faults
        );
        if self.pauses > 0 {
            let _ = writeln!(
                s,
                "connection lost {} times during postcopy, resumed {} times ({} requests sent again)",
                self.pauses, self.resumes, self.reissued_requests
            );
        }
        for (i, r) in self.restarts.iter().enumerate() {
            let _ = writeln!(
                s,
                "restart {}: broker down {} ms; {} pages rebuilt from the page cache; {} clients taken back ({} lost), {} ranges woken, {} faults re-woken",
                i + 1,
                r.downtime_ms,
                r.pages_rebuilt,
                r.clients_adopted,
                r.clients_lost,
                r.ranges_woken,
                r.faults_rewoken
            );
        }
        match self.end {
            Some(Ending::ConfirmedAfterResume) => {
                let _ = writeln!(s, "the source missed the first Complete; it resumed the completed session and confirmed the end");
            }
            Some(Ending::Unconfirmed) => {
                let _ = writeln!(s, "the final Complete was not confirmed by the source (the connection was lost at the end); every page is here and the digests match");
            }
            _ => {}
        }
        for c in &self.clients {
            let _ = writeln!(
                s,
                "  client {:<20} faults {:>7} waited {:>7}  latency p50<{}us p90<{}us p99<{}us max {:.0}us mean {:.0}us",
                c.name, c.faults, c.waited, c.p50_us, c.p90_us, c.p99_us, c.max_us, c.mean_us
            );
        }
        s
    }
}
