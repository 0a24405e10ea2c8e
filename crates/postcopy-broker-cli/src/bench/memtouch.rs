//! The memtouch case (issue #15): the workload QEMU's postcopy was measured on here. A 1 GiB
//! guest migrates over loopback while its vCPU stand-in, a `pcb-client` process, touches random
//! pages over the first 768 MiB (read one word, count the access, time it) until every page has
//! arrived; once with postcopy at once, once after a precopy pass that sent everything and then
//! found the touched range dirty (so postcopy sends it again). Figures: the client's mean
//! blocked time per demand request (an access of 10 us or more), its total blocked time and its
//! share of the postcopy phase, its worst access, the migration's total time and the CPU seconds
//! of each end's threads, and how long the destination takes from the last page to the end of
//! its teardown (summary, joins, unmapping). QEMU's own figures for the same workload, measured
//! on this machine (issue #15), are the reference column where one exists.
//!
//! With `--hog N` the case runs postcopy at once under N CPU hogs instead ([`crate::bench::hog`]),
//! once per background priority: fixed nice 10, fixed nice 0 and adaptive, side by side.

use std::path::Path;
use std::time::Instant;

use crate::bench::hog::Hogs;
use crate::bench::migrate::{start_with, Protection};
use crate::bench::peer::Peer;
use crate::bench::per_page::{PerPage, PerPageRows, GROUPS};
use crate::bench::report::{Row, Target};
use crate::bench::sys;
use crate::bench::threads::ThreadCpu;
use postcopy_broker::error::{Error, Result};
use postcopy_broker::sched::{StreamPriority, DEFAULT_LOW_NICE};

/// QEMU 7.2 with postcopy-preempt on the same workload (issue #15): total seconds of the
/// migration, and the share of the postcopy phase its vCPU was blocked.
const QEMU_PREEMPT_TOTAL_S: f64 = 2.78;
const QEMU_PREEMPT_BLOCKED_SHARE: f64 = 0.68;
/// QEMU's blocked time per demand request: 10.7 ms without preempt, 1.29 ms with it.
const QEMU_PREEMPT_PER_REQUEST_US: f64 = 1290.0;

/// One run's figures.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    /// Mean blocked time per blocked access, µs.
    pub per_request_us: f64,
    /// Total blocked time of the client, s.
    pub blocked_s: f64,
    /// Blocked share of the client's postcopy time.
    pub blocked_share: f64,
    /// Slowest access, ms.
    pub worst_ms: f64,
    /// Migration time (connect to the last page), s.
    pub total_s: f64,
    /// CPU seconds of the destination's and the source's threads.
    pub cpu: (f64, f64),
    /// Accesses that blocked.
    pub blocked: u64,
    /// From the last page to the destination's end (summary, joins, teardown; the guest RAM
    /// still held elsewhere, as by a VMM), ms.
    pub exit_ms: f64,
    /// CPU per demand and per background page, by thread (see `per_page`).
    pub per_page: PerPage,
}

/// Guest RAM of `mib` MiB, every page data (a guest whose memory is in use).
pub fn guest_ram(mib: usize) -> Vec<u8> {
    let mut v = vec![0u8; mib << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for w in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    v
}

/// How one run goes: after a precopy pass with the touched range dirtied or not, the
/// background streams' priority, and how many CPU hogs spin meanwhile.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// A precopy pass first, then the touched range dirtied.
    pub precopy: bool,
    /// Both background streams' priority.
    pub priority: StreamPriority,
    /// Spinning processes during the run.
    pub hogs: usize,
}

/// One run over `data`, the client touching its first `touched` bytes.
pub fn run(client: &Path, data: &[u8], touched: u64, setup: Setup, seed: u64) -> Result<Figures> {
    sys::warm_memory(2 * data.len())?;
    let hogs = Hogs::start(setup.hogs)?;
    let cpu = ThreadCpu::start();
    let run =
        start_with(data, 0, false, Protection::Plaintext, setup.precopy.then_some(touched), setup.priority)?;
    let h = run.dest.broker().ok_or_else(|| Error::Invalid("no fault loop".into()))?;
    let b = run.dest.incoming().blocks().get(0).ok_or_else(|| Error::Invalid("no block".into()))?;
    let last = touched / 4096 - 1;
    let mut p = Peer::spawn(client, b, &format!("memtouch:0-{last}:{seed}"), &[])?;
    // Guest RAM outlives the migration, held by the VMM: hold it here too, or the exit row
    // would time freeing 1 GiB whenever the client happens to exit first.
    let guest_ram = b
        .fd()
        .ok_or_else(|| Error::Invalid("the block has no fd".into()))?
        .try_clone_to_owned()
        .map_err(|e| Error::io("duplicate the guest RAM's fd", e))?;
    let net = std::sync::Arc::clone(run.dest.net());
    p.register(h, "bench-memtouch")?;
    p.go()?;
    run.wait_all_received()?;
    let last_page = Instant::now();
    p.go()?;
    let (total_s, _, dest_done) = run.finish_timed()?;
    let exit_ms = dest_done.duration_since(last_page).as_secs_f64() * 1e3;
    drop(guest_ram);
    drop(hogs);
    let lines = p.finish()?;
    let mut groups: Vec<&[&str]> = vec![&["postcopy-", "migration-"], &["source-", "bench-source"]];
    groups.extend(GROUPS);
    let sides = cpu.stop(&groups);
    let per_page = PerPage::of(
        sides.get(2..).unwrap_or_default(),
        net.urgent_pages.load(std::sync::atomic::Ordering::Relaxed),
        net.main_pages.load(std::sync::atomic::Ordering::Relaxed),
    );
    let m = lines
        .iter()
        .find_map(|l| l.get("memtouch"))
        .ok_or_else(|| Error::Invalid("the client printed no memtouch figures".into()))?;
    let f = |k: &str| m[k].as_f64().ok_or_else(|| Error::Invalid(format!("no {k} in {m}")));
    let elapsed_us = f("elapsed_us")?;
    Ok(Figures {
        per_request_us: f("mean_blocked_us")?,
        blocked_s: f("blocked_us")? / 1e6,
        blocked_share: if elapsed_us > 0.0 { f("blocked_us")? / elapsed_us } else { 0.0 },
        worst_ms: f("worst_us")? / 1e3,
        total_s,
        cpu: (sides.first().copied().unwrap_or(0.0), sides.get(1).copied().unwrap_or(0.0)),
        blocked: m["blocked"].as_u64().unwrap_or(0),
        exit_ms,
        per_page,
    })
}

/// The rows of one variant.
#[derive(Debug)]
struct Variant {
    per_request: Row,
    blocked: Row,
    share: Row,
    worst: Row,
    total: Row,
    cpu_dest: Row,
    cpu_source: Row,
    requests: Row,
    exit: Row,
    per_page: PerPageRows,
    setup: Setup,
}

impl Variant {
    fn new(what: &str, targets: bool, setup: Setup) -> Variant {
        let t = |x: f64| if targets { Target::AtMost(x) } else { Target::None };
        let r = |case: &str, target, prec| {
            Row::new(&format!("memtouch {what}: {case}"), "unpinned", "blocking", target, prec)
        };
        Variant {
            per_request: r("blocked us per demand request (ref: QEMU + preempt)", t(100.0), 1)
                .with_reference(),
            blocked: r("client's total blocked time, s (ref: QEMU + preempt)", t(0.95), 3).with_reference(),
            share: r("blocked share of postcopy, % (ref: QEMU + preempt)", Target::None, 1).with_reference(),
            worst: r("worst access, ms", t(5.0), 2),
            total: r("total time, s (ref: QEMU + preempt)", t(1.2), 3).with_reference(),
            cpu_dest: r("destination CPU, s", Target::None, 3),
            cpu_source: r("source CPU, s", Target::None, 3),
            requests: r("accesses that blocked (demand requests)", Target::None, 0),
            exit: r("destination's exit after the last page, ms", t(50.0), 1),
            per_page: PerPageRows::new(what, targets),
            setup,
        }
    }

    fn push(&mut self, f: &Figures) {
        self.per_page.push(&f.per_page);
        let qemu_blocked = QEMU_PREEMPT_TOTAL_S * QEMU_PREEMPT_BLOCKED_SHARE;
        for (row, ours, reference) in [
            (&mut self.per_request, f.per_request_us, Some(QEMU_PREEMPT_PER_REQUEST_US)),
            (&mut self.blocked, f.blocked_s, Some(qemu_blocked)),
            (&mut self.share, 100.0 * f.blocked_share, Some(100.0 * QEMU_PREEMPT_BLOCKED_SHARE)),
            (&mut self.worst, f.worst_ms, None),
            (&mut self.total, f.total_s, Some(QEMU_PREEMPT_TOTAL_S)),
            (&mut self.cpu_dest, f.cpu.0, None),
            (&mut self.cpu_source, f.cpu.1, None),
            (&mut self.requests, f.blocked as f64, None),
            (&mut self.exit, f.exit_ms, None),
        ] {
            row.ours.push(ours);
            if let (Some(r), Some(v)) = (row.reference.as_mut(), reference) {
                r.push(v);
            }
        }
    }

    fn rows(self) -> Vec<Row> {
        let mut rows = vec![
            self.per_request,
            self.blocked,
            self.share,
            self.worst,
            self.total,
            self.cpu_dest,
            self.cpu_source,
            self.requests,
            self.exit,
        ];
        rows.extend(self.per_page.rows());
        rows
    }
}

/// The case's rows over the runs: postcopy at once (with the targets) and after a
/// precopy pass with the touched range dirtied; or, under hogs, postcopy at once with each
/// background priority.
#[derive(Debug)]
pub struct MemtouchRows {
    variants: Vec<Variant>,
}

impl MemtouchRows {
    /// Empty rows for a guest of `mib` MiB (the targets hold for 1024) and `hogs` CPU
    /// hogs.
    pub fn new(mib: usize, hogs: usize) -> MemtouchRows {
        let what = format!("{mib} MiB, {} MiB touched", mib * 3 / 4);
        let targets = mib == 1024;
        let adaptive = StreamPriority::default();
        let variants = if hogs == 0 {
            vec![
                Variant::new(
                    &format!("{what}, postcopy at once"),
                    targets,
                    Setup { precopy: false, priority: adaptive, hogs },
                ),
                Variant::new(
                    &format!("{what}, dirtied after precopy"),
                    false,
                    Setup { precopy: true, priority: adaptive, hogs },
                ),
            ]
        } else {
            [
                ("stream at fixed nice 10", StreamPriority::Fixed(DEFAULT_LOW_NICE)),
                ("stream at fixed nice 0", StreamPriority::Fixed(0)),
                ("stream adaptive", adaptive),
            ]
            .into_iter()
            .map(|(how, priority)| {
                Variant::new(
                    &format!("{what}, postcopy at once, {hogs} CPU hog(s), {how}"),
                    targets,
                    Setup { precopy: false, priority, hogs },
                )
            })
            .collect()
        };
        MemtouchRows { variants }
    }

    /// One run of every variant over `data`, the client touching `touched` bytes.
    pub fn measure(&mut self, client: &Path, data: &[u8], touched: u64, seed: u64) -> Result<()> {
        for v in &mut self.variants {
            let f = run(client, data, touched, v.setup, seed)?;
            v.push(&f);
        }
        Ok(())
    }

    /// Every row.
    pub fn rows(self) -> Vec<Row> {
        self.variants.into_iter().flat_map(Variant::rows).collect()
    }
}
