//! CPU per page of the memtouch case (issue #15 item 2), by the threads that do the work: a
//! demand page is the fault loop's work at the destination (`postcopy-fault`: read the fault,
//! send the Request, read the answer, UFFDIO_COPY, UFFDIO_WAKE) and the urgent thread's at the
//! source (`source-urgent`: read the Request, send the page); a background page is the stream
//! threads' (`postcopy-stream*`; `source-background`, `source-stream-*`). Each side's CPU is
//! divided by the pages that arrived on those connections during postcopy (demand answers on the
//! urgent connection, background pages on the others). Per-thread attribution rather than a
//! least-squares fit of the end's total: the total also holds the benchmark's own main thread
//! (it builds the source's RAM, polls for the last page, tears down), whose CPU grows with the
//! run's length and so with the demand count, which a fit then charges to the demand pages.

use crate::bench::report::{Row, Target};

/// Thread-name prefixes of each group, in the order of [`PerPage::of`]'s `cpu`.
pub const GROUPS: [&[&str]; 5] = [
    &["postcopy-fault"],
    &["source-urgent"],
    &["postcopy-stream"],
    // /proc's comm holds 15 bytes: "source-background" reads "source-backgrou".
    &["source-backgrou", "source-stream-"],
    // The benchmark process's main thread (its name is the binary's).
    &["postcopy-broker"],
];

/// One run's CPU per page, µs, and the benchmark main thread's CPU, s.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerPage {
    /// Per demand page: (destination, source).
    pub demand_us: (f64, f64),
    /// Per background page: (destination, source).
    pub background_us: (f64, f64),
    /// The benchmark process's main thread, counted in the destination's total CPU row (it
    /// builds the source's RAM, runs the destination session up to listening, precopy
    /// included, polls for the last page and tears down).
    pub bench_main_s: f64,
}

impl PerPage {
    /// From the CPU seconds of [`GROUPS`] and the pages that arrived on the urgent connection
    /// (`demand`) and on the background connections (`background`).
    pub fn of(cpu: &[f64], demand: u64, background: u64) -> PerPage {
        let g = |i: usize| cpu.get(i).copied().unwrap_or(0.0);
        let per = |secs: f64, pages: u64| if pages == 0 { 0.0 } else { secs * 1e6 / pages as f64 };
        PerPage {
            demand_us: (per(g(0), demand), per(g(1), demand)),
            background_us: (per(g(2), background), per(g(3), background)),
            bench_main_s: g(4),
        }
    }
}

/// The rows of one variant over the runs.
#[derive(Debug)]
pub struct PerPageRows {
    demand_dest: Row,
    demand_source: Row,
    background_dest: Row,
    background_source: Row,
    bench_main: Row,
}

impl PerPageRows {
    /// Rows named after `what`; `targets`: the issue's ≤ 12 µs per demand page and side.
    pub fn new(what: &str, targets: bool) -> PerPageRows {
        let t = if targets { Target::AtMost(12.0) } else { Target::None };
        let r = |case: &str, target| {
            Row::new(&format!("memtouch {what}: {case}"), "unpinned", "blocking", target, 1)
        };
        PerPageRows {
            demand_dest: r("CPU per demand page, destination (fault loop), us", t),
            demand_source: r("CPU per demand page, source (urgent thread), us", t),
            background_dest: r("CPU per background page, destination (stream threads), us", Target::None),
            background_source: r("CPU per background page, source (senders), us", Target::None),
            bench_main: r(
                "destination CPU row's share from the process's main thread (source RAM, precopy, polling, teardown), s",
                Target::None,
            ),
        }
    }

    /// One run's figures.
    pub fn push(&mut self, p: &PerPage) {
        self.demand_dest.ours.push(p.demand_us.0);
        self.demand_source.ours.push(p.demand_us.1);
        self.background_dest.ours.push(p.background_us.0);
        self.background_source.ours.push(p.background_us.1);
        self.bench_main.ours.push(p.bench_main_s);
    }

    /// Every row.
    pub fn rows(self) -> Vec<Row> {
        vec![
            self.demand_dest,
            self.demand_source,
            self.background_dest,
            self.background_source,
            self.bench_main,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_divided_by_the_pages_of_each_path() {
        let p = PerPage::of(&[0.1, 0.05, 0.8, 0.2, 0.3], 10_000, 200_000);
        assert!((p.demand_us.0 - 10.0).abs() < 1e-9);
        assert!((p.demand_us.1 - 5.0).abs() < 1e-9);
        assert!((p.background_us.0 - 4.0).abs() < 1e-9);
        assert!((p.background_us.1 - 1.0).abs() < 1e-9);
        assert!((p.bench_main_s - 0.3).abs() < 1e-9);
    }

    #[test]
    fn no_pages_give_zero_not_infinity() {
        let p = PerPage::of(&[0.1, 0.1, 0.1, 0.1], 0, 0);
        assert_eq!(p.demand_us, (0.0, 0.0));
        assert_eq!(p.background_us, (0.0, 0.0));
        assert_eq!(p.bench_main_s, 0.0);
    }
}
