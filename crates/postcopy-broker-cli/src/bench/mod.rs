//! The benchmark against the machine's limits (`postcopy-broker bench`): it compiles and runs the
//! floor program (bench/uffd_floor.c, or --reference) and the broker's own cases alternately,
//! pinned the same way, and reports medians with min-max, the ratio broker / reference, and the
//! targets; with ../shared/bench/uffd_limit.c beside the project it compares the floor with it.
//!
//! Cases: demand faults of a client process served from memory (blocking and busy-polling),
//! background placement throughput with idle clients registered (and the wakes they get),
//! registration / teardown of many clients over a large sparse block with the broker's memory,
//! migrations, demand faults while another peer floods the control socket (against the same run
//! quiet), and private (Firecracker-style) faults served from an image against a C handler of
//! the project's own (bench/private_fault.c).

pub mod background;
pub mod demand;
pub mod flood;
pub mod hog;
pub mod memtouch;
pub mod migrate;
pub mod peer;
pub mod per_page;
pub mod private;
pub mod reference;
pub mod report;
pub mod scale;
pub mod series;
pub mod sys;
pub mod threads;

use std::path::PathBuf;

use migrate::Protection;
use postcopy_broker::error::{Error, Result};
use report::{Row, Target};
use sys::Placement;

/// Background stream counts of the migration case's scaling rows.
const STREAM_COUNTS: [u16; 3] = [1, 2, 4];

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Alternating runs (reference, broker, reference, broker, ...).
    pub runs: usize,
    /// Pages of the demand case.
    pub pages: usize,
    /// MiB of the background placement case.
    pub place_mib: usize,
    /// Bytes per background pull.
    pub chunk: u64,
    /// Idle clients registered during background placement.
    pub idle_clients: usize,
    /// Clients of the scale case.
    pub clients: usize,
    /// GiB of sparse blocks of the scale case.
    pub scale_gib: u64,
    /// MiB of guest RAM migrated (half zero pages), and of the saturating stream.
    pub migrate_mib: usize,
    /// MiB of the idle-stream migration (limited to `idle_bandwidth`).
    pub idle_mib: usize,
    /// Background bandwidth of the idle-stream migration, bytes/s.
    pub idle_bandwidth: u64,
    /// Demand faults of the client during a migration.
    pub migrate_faults: usize,
    /// 4 KiB pages of the private case.
    pub private_pages: usize,
    /// 2 MiB (hugetlb) pages of the private case.
    pub private_huge_pages: usize,
    /// Cases to run: any of demand, background, scale, migration, control, private, memtouch.
    pub cases: Vec<String>,
    /// Placements to use; empty: every placement the machine offers.
    pub placements: Vec<Placement>,
    /// The floor program: bench/uffd_floor.c, or uffd_limit.c.
    pub reference: PathBuf,
    /// A second floor program the first is compared with (../shared/bench/uffd_limit.c when it is
    /// there): extra rows, the first's figures against its own.
    pub second_reference: Option<PathBuf>,
    /// private_fault.c, the C handler of the private case.
    pub private_reference: PathBuf,
    /// Where the reference is compiled to.
    pub out_dir: PathBuf,
    /// The pcb-client executable.
    pub client: PathBuf,
    /// The pcb-hostile executable (the flooding peer of the control case).
    pub hostile: PathBuf,
    /// CPU hogs of the memtouch case (0: none; see [`memtouch`]).
    pub hogs: usize,
}

impl BenchConfig {
    /// The full-size benchmark.
    pub fn full(reference: PathBuf, out_dir: PathBuf, client: PathBuf) -> BenchConfig {
        BenchConfig {
            runs: 5,
            pages: 20_000,
            place_mib: 512,
            chunk: 2 << 20,
            idle_clients: 4,
            clients: 64,
            scale_gib: 16,
            migrate_mib: 1024,
            idle_mib: 64,
            idle_bandwidth: 16 << 20,
            migrate_faults: 1000,
            private_pages: 20_000,
            private_huge_pages: 64,
            cases: ["demand", "background", "scale", "migration", "control", "private", "memtouch"]
                .map(String::from)
                .to_vec(),
            placements: Vec::new(),
            reference,
            second_reference: reference::shared_source(),
            private_reference: private::default_source(),
            out_dir,
            hostile: client.with_file_name("pcb-hostile"),
            client,
            hogs: 0,
        }
    }

    /// A tiny run that only shows that every case produces numbers.
    pub fn quick(mut self) -> BenchConfig {
        self.runs = 1;
        self.pages = 500;
        self.place_mib = 16;
        self.clients = 4;
        self.scale_gib = 1;
        self.migrate_mib = 32;
        self.idle_mib = 8;
        self.idle_bandwidth = 8 << 20;
        self.migrate_faults = 50;
        self.private_pages = 500;
        self.private_huge_pages = 4;
        self
    }

    fn wants(&self, case: &str) -> bool {
        self.cases.iter().any(|c| c == case)
    }
}

/// Every figure of a benchmark run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The machine.
    pub machine: String,
    /// The rows, in print order.
    pub rows: Vec<Row>,
}

impl Report {
    /// The rendered table with a header.
    pub fn render(&self) -> String {
        format!("machine: {}\n\n{}", self.machine, report::render(&self.rows))
    }
}

struct PlacementRows {
    p: Placement,
    poll: Row,
    poll_p50: Row,
    poll_p99: Row,
    spin: Row,
    spin_p50: Row,
    spin_p99: Row,
    hot_poll: Row,
    hot_spin: Row,
    place: Row,
    cold: Row,
    wakes: Row,
    /// The floor against the second reference (empty without one).
    floor_poll: Row,
    floor_spin: Row,
    floor_place: Row,
}

impl PlacementRows {
    fn new(p: Placement, cfg: &BenchConfig) -> PlacementRows {
        let n = &p.describe();
        let chunk = format!("background pull {} KiB", cfg.chunk >> 10);
        PlacementRows {
            poll: Row::new("demand us/fault", n, "blocking", Target::RatioAtMost(1.25), 2).with_reference(),
            poll_p50: Row::new("demand p50 us", n, "blocking", Target::RatioAtMost(1.25), 2).with_reference(),
            poll_p99: Row::new("demand p99 us", n, "blocking", Target::None, 2).with_reference(),
            spin: Row::new("demand us/fault", n, "busy-poll", Target::RatioAtMost(1.25), 2).with_reference(),
            spin_p50: Row::new("demand p50 us", n, "busy-poll", Target::RatioAtMost(1.25), 2)
                .with_reference(),
            spin_p99: Row::new("demand p99 us", n, "busy-poll", Target::None, 2).with_reference(),
            hot_poll: Row::new(
                "demand us/fault, source = one hot page (as the floor)",
                n,
                "blocking",
                Target::None,
                2,
            )
            .with_reference(),
            hot_spin: Row::new(
                "demand us/fault, source = one hot page (as the floor)",
                n,
                "busy-poll",
                Target::None,
                2,
            )
            .with_reference(),
            place: Row::new(
                "background placement GiB/s (ref: copy_2m)",
                n,
                &chunk,
                Target::RatioAtLeast(0.8),
                2,
            )
            .with_reference(),
            cold: Row::new(
                "UFFDIO_COPY 2 MiB from a cold source GiB/s: a memory source's ceiling (ref: copy_2m)",
                n,
                "raw ioctl loop",
                Target::None,
                2,
            )
            .with_reference(),
            wakes: Row::new(
                &format!("wakes per placed page, {} idle clients", cfg.idle_clients),
                n,
                &chunk,
                Target::Equal(0.0),
                3,
            ),
            floor_poll: Row::new(
                "floor demand us/fault (ref: second reference)",
                n,
                "blocking",
                Target::None,
                2,
            )
            .with_reference(),
            floor_spin: Row::new(
                "floor demand us/fault (ref: second reference)",
                n,
                "busy-poll",
                Target::None,
                2,
            )
            .with_reference(),
            floor_place: Row::new(
                "floor UFFDIO_COPY 2 MiB GiB/s (ref: second reference)",
                n,
                "-",
                Target::None,
                2,
            )
            .with_reference(),
            p,
        }
    }

    /// Push the floor's figures `f` and the second reference's `s` of the cases that ran.
    fn push_floor(
        &mut self,
        f: &reference::Figures,
        s: &reference::Figures,
        demand: bool,
        background: bool,
    ) -> Result<()> {
        let mut rows = Vec::new();
        if demand {
            rows.push((&mut self.floor_poll, "demand poll", "us_per_fault"));
            rows.push((&mut self.floor_spin, "demand spin", "us_per_fault"));
        }
        if background {
            rows.push((&mut self.floor_place, "place", "copy_2m_gibs"));
        }
        for (row, line, field) in rows {
            let ours = f
                .get(line, field)
                .ok_or_else(|| Error::Invalid(format!("the floor program printed no `{line}` {field}")))?;
            row.ours.push(ours);
            push_ref(row, s, line, field)?;
        }
        Ok(())
    }

    fn rows(self) -> Vec<Row> {
        vec![
            self.poll,
            self.poll_p50,
            self.poll_p99,
            self.spin,
            self.spin_p50,
            self.spin_p99,
            self.hot_poll,
            self.hot_spin,
            self.place,
            self.cold,
            self.wakes,
            self.floor_poll,
            self.floor_spin,
            self.floor_place,
        ]
    }
}

fn push_ref(row: &mut Row, f: &reference::Figures, line: &str, field: &str) -> Result<()> {
    let v = f
        .get(line, field)
        .ok_or_else(|| Error::Invalid(format!("the reference printed no `{line}` {field}")))?;
    if let Some(r) = row.reference.as_mut() {
        r.push(v);
    }
    Ok(())
}

/// Run the benchmark; `progress` gets a line per step.
pub fn run(cfg: &BenchConfig, mut progress: impl FnMut(&str)) -> Result<Report> {
    if !cfg.client.is_file() {
        return Err(Error::Invalid(format!(
            "client program {} not found; build it with `cargo build --release` (or pass --client)",
            cfg.client.display()
        )));
    }
    let refp = reference::Reference::build(&cfg.reference, &cfg.out_dir)?;
    let second = match &cfg.second_reference {
        Some(s) if s != &cfg.reference => Some(reference::Reference::build(s, &cfg.out_dir)?),
        _ => None,
    };
    let placements = if cfg.placements.is_empty() { Placement::available() } else { cfg.placements.clone() };
    let private_ref = match cfg.wants("private") {
        true => Some(reference::Reference::build_as(&cfg.private_reference, &cfg.out_dir, "private_fault")?),
        false => None,
    };
    let private_image = match cfg.wants("private") {
        true => {
            let bytes = (cfg.private_pages as u64 * 4096).max(cfg.private_huge_pages as u64 * (2 << 20));
            Some(private::Image::create(&cfg.out_dir.join("private-image.img"), bytes)?)
        }
        false => None,
    };
    let mut private_rows: Vec<private::PrivateRows> = Vec::new();
    if private_image.is_some() {
        for p in &placements {
            for (page_size, pages) in [(4096, cfg.private_pages), (2 << 20, cfg.private_huge_pages)] {
                for busy_poll in [false, true] {
                    let case = private::PrivateCase { page_size, pages: pages.max(1), busy_poll };
                    private_rows.push(private::PrivateRows::new(case, p.clone()));
                }
            }
        }
    }
    let mut per: Vec<PlacementRows> = placements.into_iter().map(|p| PlacementRows::new(p, cfg)).collect();
    let mut reg = Row::new(
        &format!("register {} clients, ms", cfg.clients),
        "unpinned",
        "blocking",
        Target::AtMost(1000.0),
        3,
    );
    let mut down = Row::new(
        &format!("unregister {} clients + stop, ms", cfg.clients),
        "unpinned",
        "blocking",
        Target::AtMost(1000.0),
        3,
    );
    let mut mem = Row::new(
        &format!("broker private memory, % of {} GiB guest RAM", cfg.scale_gib),
        "unpinned",
        "blocking",
        Target::AtMost(1.0),
        3,
    );
    let mut mem_mib =
        Row::new("broker private memory, MiB (delta by the broker)", "unpinned", "blocking", Target::None, 2);
    let mig = format!("migration {} MiB, half zero, s (ref: non-zero bytes / raw TCP)", cfg.migrate_mib);
    let mut m_secs = Row::new(&mig, "unpinned", "blocking", Target::RatioAtMost(1.2), 3).with_reference();
    let mut m_tcp = Row::new("loopback TCP GiB/s, one connection", "unpinned", "-", Target::None, 2);
    let floor = format!(
        "migration {} MiB, half zero, s (ref: non-zero bytes / floor copy_2m, placing them on one thread)",
        cfg.migrate_mib
    );
    let mut m_floor = Row::new(&floor, "unpinned", "blocking", Target::None, 3).with_reference();
    // The same migration over 1, 2 and 4 background streams, each against the placement floor.
    let mut m_streams: Vec<(u16, Row)> = STREAM_COUNTS
        .iter()
        .map(|&n| {
            let case = format!(
                "migration {} MiB, half zero, {n} background stream{}, s (ref: non-zero bytes / floor copy_2m on one thread)",
                cfg.migrate_mib,
                if n == 1 { "" } else { "s" }
            );
            (n, Row::new(&case, "unpinned", "blocking", Target::RatioAtMost(1.3), 3).with_reference())
        })
        .collect();
    let sat = "demand {} during migration, faults that waited (>= 10 us) (ref: idle stream)";
    let mut m_p50 =
        Row::new(&sat.replace("{}", "p50 us"), "unpinned", "blocking", Target::RatioAtMost(2.0), 1)
            .with_reference();
    let mut m_p99 =
        Row::new(&sat.replace("{}", "p99 us"), "unpinned", "blocking", Target::RatioAtMost(3.0), 1)
            .with_reference();
    let mut m_blocked = Row::new(
        &format!(
            "demand faults that waited (>= 10 us), of {}, during migration (ref: idle stream)",
            cfg.migrate_faults
        ),
        "unpinned",
        "blocking",
        Target::None,
        0,
    )
    .with_reference();
    let mut m_mean = Row::new(
        "demand us/access during migration, all accesses (ref: idle stream)",
        "unpinned",
        "blocking",
        Target::None,
        1,
    )
    .with_reference();
    let mut m_overlap =
        Row::new("runs whose faults overlapped the saturating stream, %", "unpinned", "-", Target::None, 0);
    let tls =
        format!("migration {} MiB over TLS 1.3, s (ref: the same migration in plaintext)", cfg.migrate_mib);
    let mut m_tls = Row::new(&tls, "unpinned", "blocking", Target::RatioAtMost(1.25), 3).with_reference();
    let psk = format!("migration {} MiB with a pre-shared key (Noise), s (ref: plaintext)", cfg.migrate_mib);
    let mut m_psk = Row::new(&psk, "unpinned", "blocking", Target::None, 3).with_reference();
    let tls_sat =
        "demand {} during migration over TLS, faults that waited, stream saturating (ref: plaintext)";
    let mut m_tls_p50 =
        Row::new(&tls_sat.replace("{}", "p50 us"), "unpinned", "blocking", Target::RatioAtMost(1.2), 1)
            .with_reference();
    let mut m_tls_p99 =
        Row::new(&tls_sat.replace("{}", "p99 us"), "unpinned", "blocking", Target::None, 1).with_reference();
    let mut flooded = flood::FloodRows::new();
    let mut memtouched = memtouch::MemtouchRows::new(cfg.migrate_mib, cfg.hogs);
    let demand = cfg.wants("demand");
    let background = cfg.wants("background");
    for run in 0..cfg.runs {
        for pr in &mut per {
            let p = pr.p.clone();
            if demand || background {
                progress(&format!("run {}/{}: reference, {}", run + 1, cfg.runs, p.name));
                let mib = if background { cfg.place_mib } else { 2 };
                let f = refp.run(&p, cfg.pages, mib)?;
                if demand {
                    push_ref(&mut pr.poll, &f, "demand poll", "us_per_fault")?;
                    push_ref(&mut pr.poll_p50, &f, "demand poll", "p50")?;
                    push_ref(&mut pr.poll_p99, &f, "demand poll", "p99")?;
                    push_ref(&mut pr.spin, &f, "demand spin", "us_per_fault")?;
                    push_ref(&mut pr.spin_p50, &f, "demand spin", "p50")?;
                    push_ref(&mut pr.spin_p99, &f, "demand spin", "p99")?;
                    push_ref(&mut pr.hot_poll, &f, "demand poll", "us_per_fault")?;
                    push_ref(&mut pr.hot_spin, &f, "demand spin", "us_per_fault")?;
                }
                if background {
                    push_ref(&mut pr.place, &f, "place", "copy_2m_gibs")?;
                    push_ref(&mut pr.cold, &f, "place", "copy_2m_gibs")?;
                }
                if let Some(second) = &second {
                    progress(&format!("run {}/{}: second reference, {}", run + 1, cfg.runs, p.name));
                    let s = second.run(&p, cfg.pages, mib)?;
                    pr.push_floor(&f, &s, demand, background)?;
                }
            }
            progress(&format!("run {}/{}: broker, {}", run + 1, cfg.runs, p.name));
            let old = sys::pin(&p.broker)?;
            let r = (|| -> Result<()> {
                if demand {
                    let d = demand::run(&cfg.client, &p.client, cfg.pages, false)?;
                    pr.poll.ours.push(d.us_per_fault);
                    pr.poll_p50.ours.push(d.p50);
                    pr.poll_p99.ours.push(d.p99);
                    let d = demand::run(&cfg.client, &p.client, cfg.pages, true)?;
                    pr.spin.ours.push(d.us_per_fault);
                    pr.spin_p50.ours.push(d.p50);
                    pr.spin_p99.ours.push(d.p99);
                    let hot = |_: usize| -> Box<dyn postcopy_broker::source::PageSource> {
                        Box::new(demand::HotPageSource::new())
                    };
                    let d = demand::run_with(&cfg.client, &p.client, cfg.pages, false, hot)?;
                    pr.hot_poll.ours.push(d.us_per_fault);
                    let d = demand::run_with(&cfg.client, &p.client, cfg.pages, true, hot)?;
                    pr.hot_spin.ours.push(d.us_per_fault);
                }
                if background {
                    let b =
                        background::run(&cfg.client, &p.client, cfg.place_mib, cfg.chunk, cfg.idle_clients)?;
                    pr.place.ours.push(b.gibs);
                    pr.wakes.ours.push(b.wakes_per_page);
                    pr.cold.ours.push(background::cold_copy(cfg.place_mib)?);
                }
                Ok(())
            })();
            sys::set_affinity(&old)?;
            r?;
        }
        if let (Some(refp), Some(image)) = (&private_ref, &private_image) {
            for pr in &mut private_rows {
                progress(&format!("run {}/{}: private faults, {}", run + 1, cfg.runs, pr.describe()));
                pr.run_once(refp, &cfg.client, image)?;
            }
        }
        if cfg.wants("scale") {
            progress(&format!(
                "run {}/{}: scale, {} clients over {} GiB",
                run + 1,
                cfg.runs,
                cfg.clients,
                cfg.scale_gib
            ));
            let s = scale::run(&cfg.client, cfg.clients, cfg.scale_gib)?;
            reg.ours.push(s.register_s * 1e3);
            down.ours.push(s.teardown_s * 1e3);
            mem.ours.push(s.private as f64 * 100.0 / s.guest as f64);
            mem_mib.ours.push(s.private_delta as f64 / f64::from(1 << 20));
        }
        if cfg.wants("migration") {
            progress(&format!(
                "run {}/{}: loopback TCP and migration of {} MiB",
                run + 1,
                cfg.runs,
                cfg.migrate_mib
            ));
            // Made per run and dropped after it: the scale case measures this process's memory.
            let mig_data = migrate::half_zero(cfg.migrate_mib << 20);
            let raw = migrate::tcp_throughput(cfg.migrate_mib << 20)?;
            // What placing the non-zero half costs at the machine's UFFDIO_COPY speed.
            let all = (0..sys::online_cpus()).collect::<Vec<_>>();
            let unpinned = Placement { name: "unpinned".into(), client: all.clone(), broker: all };
            let copy = refp.run(&unpinned, 100, (cfg.migrate_mib / 2).max(2))?;
            let copy_2m = copy
                .get("place", "copy_2m_gibs")
                .ok_or_else(|| Error::Invalid("the reference printed no `place` copy_2m_gibs".into()))?;
            // The three protections in a rotating order: each run starts with another one, so
            // none always follows a migration whose memory the kernel is still freeing.
            let mut by = [None, None, None];
            for i in 0..3 {
                let p = (i + run) % 3;
                let prot = [Protection::Plaintext, Protection::Tls, Protection::Psk][p];
                by[p] = Some(migrate::migrate(&mig_data, prot)?);
            }
            let [Some(m), Some(t), Some(k)] = by else {
                return Err(Error::Invalid("a protection was not measured".into()));
            };
            for (row, secs) in [(&mut m_tls, t.secs), (&mut m_psk, k.secs)] {
                row.ours.push(secs);
                if let Some(r) = row.reference.as_mut() {
                    r.push(m.secs);
                }
            }
            m_tcp.ours.push(raw / f64::from(1 << 30));
            m_secs.ours.push(m.secs);
            m_floor.ours.push(m.secs);
            if let Some(r) = m_secs.reference.as_mut() {
                r.push(m.nonzero as f64 / raw);
            }
            if let Some(r) = m_floor.reference.as_mut() {
                r.push(m.nonzero as f64 / (copy_2m * f64::from(1 << 30)));
            }
            // Rotated as the protections are.
            for i in 0..m_streams.len() {
                let (n, row) = &mut m_streams[(i + run) % STREAM_COUNTS.len()];
                progress(&format!("run {}/{}: migration over {n} background streams", run + 1, cfg.runs));
                let s = migrate::migrate_streams(&mig_data, Protection::Plaintext, Some(*n))?;
                row.ours.push(s.secs);
                if let Some(r) = row.reference.as_mut() {
                    r.push(s.nonzero as f64 / (copy_2m * f64::from(1 << 30)));
                }
            }
            progress(&format!(
                "run {}/{}: demand faults during a migration, idle then saturating",
                run + 1,
                cfg.runs
            ));
            let idle = migrate::half_zero(cfg.idle_mib << 20);
            let (i, _) = migrate::demand_during(
                &cfg.client,
                &[],
                &idle,
                cfg.migrate_faults,
                cfg.idle_bandwidth,
                Protection::Plaintext,
            )?;
            drop(idle);
            let sat = |p| migrate::demand_during(&cfg.client, &[], &mig_data, cfg.migrate_faults, 0, p);
            let ((d, overlapped), (dt, _)) = if run % 2 == 0 {
                let d = sat(Protection::Plaintext)?;
                (d, sat(Protection::Tls)?)
            } else {
                let dt = sat(Protection::Tls)?;
                (sat(Protection::Plaintext)?, dt)
            };
            for (row, ours, plain) in [
                (&mut m_tls_p50, dt.blocked_p50, d.blocked_p50),
                (&mut m_tls_p99, dt.blocked_p99, d.blocked_p99),
            ] {
                row.ours.push(ours);
                if let Some(r) = row.reference.as_mut() {
                    r.push(plain);
                }
            }
            for (row, ours, idle) in [
                (&mut m_p50, d.blocked_p50, i.blocked_p50),
                (&mut m_p99, d.blocked_p99, i.blocked_p99),
                (&mut m_blocked, d.blocked as f64, i.blocked as f64),
                (&mut m_mean, d.us_per_fault, i.us_per_fault),
            ] {
                row.ours.push(ours);
                if let Some(r) = row.reference.as_mut() {
                    r.push(idle);
                }
            }
            m_overlap.ours.push(if overlapped { 100.0 } else { 0.0 });
        }
        if cfg.wants("control") {
            progress(&format!(
                "run {}/{}: demand faults, quiet then beside a flooding peer",
                run + 1,
                cfg.runs
            ));
            flooded.measure(&cfg.client, &cfg.hostile, cfg.pages)?;
        }
        if cfg.wants("memtouch") {
            progress(&format!(
                "run {}/{}: memtouch, {} MiB guest touching {} MiB, postcopy at once then after precopy",
                run + 1,
                cfg.runs,
                cfg.migrate_mib,
                cfg.migrate_mib * 3 / 4
            ));
            // Made per run and dropped after it, as the migration case's RAM.
            let ram = memtouch::guest_ram(cfg.migrate_mib);
            memtouched.measure(&cfg.client, &ram, (cfg.migrate_mib as u64 * 3 / 4) << 20, run as u64 + 1)?;
        }
    }
    let mut rows = Vec::new();
    for pr in per {
        rows.extend(pr.rows().into_iter().filter(|r| !r.ours.is_empty()));
    }
    for pr in private_rows {
        rows.extend(pr.rows());
    }
    rows.extend(
        [
            reg, down, mem, mem_mib, m_tcp, m_secs, m_floor, m_p50, m_p99, m_blocked, m_mean, m_overlap,
            m_tls, m_psk, m_tls_p50, m_tls_p99,
        ]
        .into_iter()
        .chain(m_streams.into_iter().map(|(_, r)| r))
        .chain(flooded.rows())
        .chain(memtouched.rows())
        .filter(|r| !r.ours.is_empty()),
    );
    Ok(Report { machine: sys::machine(), rows })
}
