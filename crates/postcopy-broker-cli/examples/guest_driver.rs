//! A guest driver that plays the VMM: it maps guest RAM, connects to any vhost-user-blk backend,
//! shares the RAM with it, drives a split virtqueue and runs a workload, then prints a summary
//! (requests, bytes, checksum of the disk region; one JSON line with `--json`).
//!
//! ```text
//! guest_driver --socket /tmp/vub.sock --requests 64 --seed 7 --json
//! guest_driver --socket /tmp/vub.sock --control /tmp/broker.sock --until-complete --json
//! ```
//!
//! Guest RAM is the *migrated* RAM (at guest physical address 0) plus a small *driver* block at
//! [`DRIVER_GPA`] that holds the virtqueue, the request headers and the workload's bounce
//! buffers, so that the migrated RAM only ever holds the source's bytes and its checksums can be
//! compared with the source's at the end.
//!
//! Modes:
//! - default: the migrated RAM is a local memfd, plain memory table;
//! - `--postcopy-handshake`: the same memfd, all present, with the postcopy handshake (no broker);
//! - `--control SOCKET`: postcopy with a broker: the RAM blocks come from the broker (GetBlocks),
//!   are mapped and registered MISSING with the driver's own userfaultfd, which is registered with
//!   the broker; the backend is checked for PAGEFAULT before anything else, then goes through the
//!   postcopy handshake and is registered with the broker before the ack. During postcopy the
//!   driver writes to disk from migrated pages it never touched (the backend faults on them) and
//!   reads from disk into migrated pages it never touched (the backend faults writing them). The
//!   disk's first `--mirror-sectors` sectors must hold the source's RAM at `--mirror-gpa` (the
//!   reads then leave RAM equal to the source); writes go to a log after them, one page each.
//!   At the end (every page arrived) it sends POSTCOPY_END and unregisters the backend.
//!   When the broker dies meanwhile (`serve --incoming` under a service manager with an fd
//!   store), the I/O goes on (blocked while no broker runs, woken by the restarted one) and the
//!   session ([`BrokerSession`]) reconnects and reattaches the driver's and the backend's
//!   client ids, within `--reattach-timeout`; the summary counts the reattaches.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use log::{info, warn};
use postcopy_broker::control::ReattachPolicy;
use postcopy_broker::ram::RamBlock;
use postcopy_broker::vhost_user::blk::{fnv1a64, DRIVER_FEATURES, FNV_OFFSET, ID_BYTES, SECTOR_SIZE};
use postcopy_broker::vhost_user::{postcopy, BackendConn, BlkConfig, BlkDriver, BlkRequest, BlkRequestKind};
use postcopy_broker::vhost_user::{BrokerSession, GuestRam, Handshake, Negotiation};
use postcopy_broker::{Error, Result};
use vhost::vhost_user::message::VhostUserProtocolFeatures;

/// Guest address of the driver block (virtqueue, headers, bounce buffers).
const DRIVER_GPA: u64 = 1 << 40;
/// Size of the driver block.
const DRIVER_SIZE: u64 = 16 << 20;
/// Guest address of the virtqueue.
const RING_GPA: u64 = DRIVER_GPA + 0x1_0000;
/// Guest address of the request headers and status bytes.
const META_GPA: u64 = DRIVER_GPA + 0x2_0000;
/// Guest address of the first bounce buffer.
const DATA_GPA: u64 = DRIVER_GPA + 0x10_0000;
/// How long the driver waits for the broker to receive every page after its I/O: a safety bound
/// only (a slow migration, e.g. the demo with a low --bandwidth, may take many minutes).
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Bytes of a migrated page as the workload sees it.
const PAGE: u64 = 4096;
const SECTORS_PER_PAGE: u64 = PAGE / SECTOR_SIZE;

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "vhost-user-blk guest driver (plays the VMM)")]
struct Args {
    /// vhost-user-blk backend socket.
    #[arg(long)]
    socket: PathBuf,
    /// Size of the local migrated RAM without --control (K, M, G suffixes allowed).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    ram_size: u64,
    /// Number of write requests of the bounce-buffer workload.
    #[arg(long, default_value_t = 64)]
    requests: u64,
    /// Seed of the pseudo-random workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// First sector of the disk region the bounce-buffer workload uses (with --control: default
    /// after the mirror and the log).
    #[arg(long)]
    first_sector: Option<u64>,
    /// Sectors in the disk region (0: up to 2048, bounded by the disk capacity).
    #[arg(long, default_value_t = 0)]
    sectors: u64,
    /// Largest request in sectors.
    #[arg(long, default_value_t = 16)]
    max_request_sectors: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Virtqueue size.
    #[arg(long, default_value_t = 128)]
    queue_size: u16,
    /// Without --control: run the vhost-user postcopy handshake (all RAM present; no broker),
    /// POSTCOPY_END at the end.
    #[arg(long)]
    postcopy_handshake: bool,
    /// Postcopy with the broker at this control socket.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Guest address of the RAM the disk's mirror sectors hold (default: the middle of RAM).
    #[arg(long)]
    mirror_gpa: Option<u64>,
    /// Sectors at the start of the disk that mirror guest RAM at --mirror-gpa.
    #[arg(long, default_value_t = 4096)]
    mirror_sectors: u64,
    /// Guest range GPA+LEN (page aligned, inside migrated RAM) that the postcopy writes take
    /// their data pages from (default: all of it), so that another client may write pages
    /// elsewhere without racing the driver's read-back check.
    #[arg(long, value_parser = parse_range)]
    io_range: Option<(u64, u64)>,
    /// Postcopy operations at most (each: one write from a missing page, one read into one).
    #[arg(long, default_value_t = 256)]
    postcopy_ops: u64,
    /// Operations submitted together.
    #[arg(long, default_value_t = 4)]
    ops_batch: u64,
    /// Keep doing postcopy operations until every page has arrived (at most --postcopy-ops).
    #[arg(long)]
    until_complete: bool,
    /// After the I/O, read every migrated page through the driver's own mapping (its own faults)
    /// and report per-block checksums.
    #[arg(long)]
    touch_all: bool,
    /// After the I/O print {"phase":"io-done"} and wait for a line on stdin.
    #[arg(long)]
    pause_after_io: bool,
    /// With --control: once the driver and its backend are registered with the broker (before
    /// any guest I/O), print {"phase":"registered"} and wait for a line on stdin, so that a test
    /// can start every client's work together.
    #[arg(long)]
    wait_registered: bool,
    /// With --control: when the control connection ends before every page has arrived (the
    /// broker died), keep trying to reconnect and reattach for this many seconds, then fail.
    #[arg(long, default_value_t = 60)]
    reattach_timeout: u64,
    /// Print the summary as one JSON line.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    postcopy_broker_cli::cli::parse_size(s)
}

fn parse_range(s: &str) -> std::result::Result<(u64, u64), String> {
    let (gpa, len) = s.split_once('+').ok_or_else(|| format!("range '{s}' must be GPA+LEN, e.g. 0+8M"))?;
    let (gpa, len) = (parse_size(gpa)?, parse_size(len)?);
    if gpa % PAGE != 0 || len % PAGE != 0 || len == 0 {
        return Err(format!("range '{s}' must be page aligned and not empty"));
    }
    Ok((gpa, len))
}

/// splitmix64: small, seedable, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    writes: u64,
    reads: u64,
    bytes_written: u64,
    bytes_read: u64,
}

/// The bounce-buffer workload's state: driver, RAM, and the expected contents of its region.
struct Workload<'a> {
    drv: &'a mut BlkDriver,
    ram: &'a GuestRam,
    first: u64,
    model: Vec<u8>,
    max_bytes: u64,
    read_gpa: u64,
    c: Counters,
}

impl Workload<'_> {
    /// Read `sectors` at `first + rel` (in chunks of the largest request) and return the bytes.
    fn read_region(&mut self, rel: u64, sectors: u64) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity((sectors * SECTOR_SIZE) as usize);
        let per = self.max_bytes / SECTOR_SIZE;
        let mut s = 0;
        while s < sectors {
            let mut reqs = Vec::new();
            let mut lens = Vec::new();
            while s < sectors && reqs.len() < 8 {
                let n = per.min(sectors - s);
                let gpa = self.read_gpa + reqs.len() as u64 * self.max_bytes;
                self.ram.fill(gpa, n * SECTOR_SIZE, 0xa5)?;
                reqs.push(BlkRequest {
                    kind: BlkRequestKind::In,
                    sector: self.first + rel + s,
                    data: vec![(gpa, (n * SECTOR_SIZE) as u32)],
                });
                lens.push(n * SECTOR_SIZE);
                s += n;
            }
            self.drv.submit_ok(self.ram, &reqs)?;
            for (i, len) in lens.iter().enumerate() {
                let mut buf = vec![0u8; *len as usize];
                self.ram.read(self.read_gpa + i as u64 * self.max_bytes, &mut buf)?;
                out.extend_from_slice(&buf);
                self.c.reads += 1;
                self.c.bytes_read += len;
            }
        }
        Ok(out)
    }

    fn verify(&self, rel: u64, got: &[u8]) -> Result<()> {
        let start = (rel * SECTOR_SIZE) as usize;
        let want = &self.model[start..start + got.len()];
        if let Some(pos) = want.iter().zip(got).position(|(a, b)| a != b) {
            let byte = start as u64 + pos as u64;
            return Err(Error::Device(format!(
                "data mismatch at sector {} byte {}: wrote {:#04x}, read {:#04x}",
                self.first + byte / SECTOR_SIZE,
                byte % SECTOR_SIZE,
                want[pos],
                got[pos]
            )));
        }
        Ok(())
    }
}

/// Pseudo-random writes from bounce buffers, each read back and verified; then the whole region
/// is read and its checksum reported.
fn bounce_workload(
    args: &Args,
    drv: &mut BlkDriver,
    ram: &GuestRam,
    first: u64,
    capacity: u64,
    acked: u64,
) -> Result<serde_json::Value> {
    let sectors = if args.sectors == 0 { 2048u64.min(capacity.saturating_sub(first)) } else { args.sectors };
    if sectors == 0 || first + sectors > capacity {
        return Err(Error::Invalid(format!(
            "disk region {first}+{sectors} sectors does not fit the disk of {capacity} sectors"
        )));
    }
    let max_sectors = args.max_request_sectors.clamp(1, sectors);
    let max_bytes = max_sectors * SECTOR_SIZE;
    let batch = args.batch.max(1);
    let write_gpa = DATA_GPA + 0x1000;
    let read_gpa = write_gpa + batch as u64 * max_bytes;
    ram.host_addr(read_gpa, max_bytes * (batch as u64).max(8)).map_err(|_| {
        Error::Invalid(
            "the driver block is too small for the buffers; lower --batch or --max-request-sectors".into(),
        )
    })?;
    let mut w = Workload { drv, ram, first, model: Vec::new(), max_bytes, read_gpa, c: Counters::default() };
    // The region's current contents are the starting model.
    w.model = w.read_region(0, sectors)?;
    let mut rng = Rng(args.seed);
    let mut left = args.requests;
    while left > 0 {
        let n = (batch as u64).min(left) as usize;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut tries = 0;
        while ranges.len() < n && tries < 1000 {
            tries += 1;
            let len = 1 + rng.below(max_sectors);
            let start = rng.below(sectors - len + 1);
            if ranges.iter().all(|&(s, l)| start + len <= s || s + l <= start) {
                ranges.push((start, len));
            }
        }
        let mut reqs = Vec::new();
        for (i, &(start, len)) in ranges.iter().enumerate() {
            let mut data = vec![0u8; (len * SECTOR_SIZE) as usize];
            rng.fill(&mut data);
            let gpa = write_gpa + i as u64 * max_bytes;
            w.ram.write(gpa, &data)?;
            let at = (start * SECTOR_SIZE) as usize;
            w.model[at..at + data.len()].copy_from_slice(&data);
            reqs.push(BlkRequest {
                kind: BlkRequestKind::Out,
                sector: first + start,
                data: vec![(gpa, data.len() as u32)],
            });
            w.c.writes += 1;
            w.c.bytes_written += data.len() as u64;
        }
        w.drv.submit_ok(w.ram, &reqs)?;
        for &(start, len) in &ranges {
            let got = w.read_region(start, len)?;
            w.verify(start, &got)?;
        }
        left -= ranges.len() as u64;
    }
    let flushed = if acked & postcopy_broker::vhost_user::blk::VIRTIO_BLK_F_FLUSH != 0 {
        w.drv.submit_ok(w.ram, &[BlkRequest { kind: BlkRequestKind::Flush, sector: 0, data: vec![] }])?;
        true
    } else {
        false
    };
    let all = w.read_region(0, sectors)?;
    w.verify(0, &all)?;
    let checksum = fnv1a64(FNV_OFFSET, &all);
    Ok(serde_json::json!({
        "writes": w.c.writes,
        "reads": w.c.reads,
        "bytes_written": w.c.bytes_written,
        "bytes_read": w.c.bytes_read,
        "flushed": flushed,
        "first_sector": first,
        "sectors": sectors,
        "checksum": format!("{checksum:#018x}"),
    }))
}

/// One postcopy operation done: the guest range, the disk sectors.
#[derive(Debug, Clone, Copy)]
struct Op {
    gpa: u64,
    sector: u64,
    sectors: u64,
}

/// Writes from migrated pages never touched and reads into mirrored pages never touched, verified
/// against a second read of the same sectors into the driver block.
#[allow(clippy::too_many_arguments)]
fn postcopy_io(
    args: &Args,
    max_ops: u64,
    drv: &mut BlkDriver,
    ram: &GuestRam,
    broker: &BrokerSession,
    ram_size: u64,
    mirror_gpa: u64,
    log_sector: u64,
    rng: &mut Rng,
) -> Result<(Vec<Op>, Vec<Op>, u64)> {
    let mirror_pages = args.mirror_sectors / SECTORS_PER_PAGE;
    let mirror = mirror_gpa..mirror_gpa + mirror_pages * PAGE;
    let (io_first, io_pages) = args.io_range.map_or((0, ram_size / PAGE), |(g, l)| (g / PAGE, l / PAGE));
    let mut used: HashSet<u64> = HashSet::new();
    let mut mirror_used: HashSet<u64> = HashSet::new();
    let (mut writes, mut reads) = (Vec::new(), Vec::new());
    let mut rounds = 0;
    let check_gpa = DATA_GPA + (8 << 20);
    while (writes.len() as u64) < max_ops {
        if args.until_complete && broker.complete()? {
            break;
        }
        rounds += 1;
        let n = args.ops_batch.clamp(1, 16).min(max_ops - writes.len() as u64);
        let mut reqs = Vec::new();
        let mut batch = Vec::new();
        for _ in 0..n {
            // A write whose data page the driver never touched.
            let mut tries = 0;
            let page = loop {
                let p = io_first + rng.below(io_pages);
                tries += 1;
                if (!mirror.contains(&(p * PAGE)) && used.insert(p)) || tries > 10_000 {
                    break p;
                }
            };
            let w = Op {
                gpa: page * PAGE,
                sector: log_sector + writes.len() as u64 * SECTORS_PER_PAGE,
                sectors: SECTORS_PER_PAGE,
            };
            writes.push(w);
            batch.push((BlkRequestKind::Out, w));
            // A read into part of a mirrored page the driver never touched.
            if mirror_used.len() as u64 >= mirror_pages {
                continue;
            }
            let mp = loop {
                let p = rng.below(mirror_pages);
                if mirror_used.insert(p) {
                    break p;
                }
            };
            let first = rng.below(SECTORS_PER_PAGE);
            let count = 1 + rng.below(SECTORS_PER_PAGE - first);
            let sector = mp * SECTORS_PER_PAGE + first;
            let r = Op { gpa: mirror_gpa + sector * SECTOR_SIZE, sector, sectors: count };
            reads.push(r);
            batch.push((BlkRequestKind::In, r));
        }
        for (kind, op) in &batch {
            reqs.push(BlkRequest {
                kind: *kind,
                sector: op.sector,
                data: vec![(op.gpa, (op.sectors * SECTOR_SIZE) as u32)],
            });
        }
        drv.submit_ok(ram, &reqs)?;
        // Verify: read the same sectors into the driver block and compare with guest RAM.
        let checks: Vec<BlkRequest> = batch
            .iter()
            .enumerate()
            .map(|(i, (_, op))| BlkRequest {
                kind: BlkRequestKind::In,
                sector: op.sector,
                data: vec![(check_gpa + i as u64 * PAGE, (op.sectors * SECTOR_SIZE) as u32)],
            })
            .collect();
        drv.submit_ok(ram, &checks)?;
        for (i, (kind, op)) in batch.iter().enumerate() {
            let len = (op.sectors * SECTOR_SIZE) as usize;
            let (mut disk, mut mem) = (vec![0u8; len], vec![0u8; len]);
            ram.read(check_gpa + i as u64 * PAGE, &mut disk)?;
            ram.read(op.gpa, &mut mem)?;
            if disk != mem {
                return Err(Error::Device(format!(
                    "{kind:?} of guest {:#x} at sector {}: disk and guest RAM differ afterwards",
                    op.gpa, op.sector
                )));
            }
        }
    }
    Ok((writes, reads, rounds))
}

/// Read every migrated page through the driver's own mapping; per block its FNV-1a 64 (as
/// `serve --checksums` writes it) and the migration's checksum (as `--verify-file` writes it).
fn touch_all(ram: &GuestRam) -> Result<serde_json::Value> {
    let sums = ram.read_all_sums(DRIVER_GPA)?.into_iter().map(|s| {
        let v =
            serde_json::json!({"fnv": format!("{:016x}", s.fnv), "checksum": format!("{:016x}", s.checksum)});
        (s.name, v)
    });
    Ok(serde_json::Value::Object(sums.collect()))
}

/// Print {"phase": PHASE} and wait for a line on stdin.
fn pause(phase: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::json!({ "phase": phase })).map_err(|e| Error::io("stdout", e))?;
    out.flush().map_err(|e| Error::io("stdout", e))?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| Error::io("stdin", e))?;
    Ok(())
}

fn ops_json(ops: &[Op]) -> serde_json::Value {
    ops.iter().map(|o| serde_json::json!([o.gpa, o.sector, o.sectors])).collect()
}

fn run(args: &Args) -> Result<serde_json::Value> {
    // The backend first: a backend that cannot do postcopy is refused before anything else.
    let mut conn = BackendConn::connect(&args.socket, &Negotiation::default())?;
    if args.control.is_some() {
        postcopy::check_capable(&conn)?;
    }
    let acked = conn.set_features(DRIVER_FEATURES)?;
    let config = BlkConfig::read(&mut conn)?;
    info!("disk: {} sectors, features {acked:#x}", config.capacity_sectors);

    let mut ram = GuestRam::new();
    let (mut broker, block_names) = match &args.control {
        Some(path) => {
            let policy =
                ReattachPolicy { timeout: Duration::from_secs(args.reattach_timeout), ..Default::default() };
            let b = BrokerSession::attach_with(path, "guest-driver", &mut ram, policy)?;
            let names = b.block_names().to_vec();
            (Some(b), names)
        }
        None => {
            ram.add(0, Arc::new(RamBlock::memfd("guest-ram", args.ram_size)?))?;
            (None, vec!["guest-ram".to_string()])
        }
    };
    let ram_size: u64 = ram.blocks().map(|b| b.size).sum();
    let driver_block = Arc::new(RamBlock::memfd("driver", DRIVER_SIZE)?);
    ram.add(DRIVER_GPA, driver_block)?;
    // The driver block is never migrated: make every page present before a backend listens.
    ram.fill(DRIVER_GPA, DRIVER_SIZE, 0)?;
    let regions = ram.mem_regions();
    let names: Vec<Option<String>> =
        ram.blocks().map(|b| (b.gpa < DRIVER_GPA).then(|| b.name.to_string())).collect();

    let mut pc_summary = serde_json::Value::Null;
    let mut backend_client = None;
    let pc = if let Some(b) = &mut broker {
        let hs = Handshake::begin(&mut conn, &regions)?;
        backend_client = Some(b.register_backend("vhost-user-blk", hs.postcopy(), &names)?);
        Some(hs.ack()?)
    } else if args.postcopy_handshake {
        // No broker serves faults: make every page of guest RAM present first.
        ram.fill(0, ram_size, 0)?;
        Some(postcopy::handshake(&mut conn, &regions)?)
    } else {
        conn.set_mem_table(&regions)?;
        None
    };
    if let Some(pc) = &pc {
        pc_summary = serde_json::json!({
            "reported_bases": pc.reported_bases,
            "client_addrs": pc.mappings.iter().map(|m| m.client_addr).collect::<Vec<_>>(),
            "frontend_addrs": regions.iter().map(|r| r.user_addr).collect::<Vec<_>>(),
            "corrected": pc.corrected,
            "backend_pid": pc.pid,
            "backend_client": backend_client,
            "driver_client": broker.as_ref().map(|b| b.client()),
        });
    }
    drop(regions);
    let mut drv = BlkDriver::start(&mut conn, &ram, RING_GPA, META_GPA, args.queue_size)?;
    if args.wait_registered && broker.is_some() {
        pause("registered")?;
    }

    // GET_ID.
    let id_gpa = DATA_GPA;
    ram.fill(id_gpa, u64::from(ID_BYTES), 0)?;
    let id_req = BlkRequest { kind: BlkRequestKind::GetId, sector: 0, data: vec![(id_gpa, ID_BYTES)] };
    let serial = match drv.submit(&ram, &[id_req])?.first() {
        Some(c) if c.status == 0 => {
            let mut id = [0u8; ID_BYTES as usize];
            ram.read(id_gpa, &mut id)?;
            let end = id.iter().position(|b| *b == 0).unwrap_or(id.len());
            Some(String::from_utf8_lossy(&id[..end]).into_owned())
        }
        _ => None,
    };

    let started = Instant::now();
    let mut rng = Rng(args.seed ^ 0x5eed);
    let mut postcopy_json = serde_json::Value::Null;
    let mut first = args.first_sector.unwrap_or(0);
    if let Some(b) = &mut broker {
        let mirror_gpa = args.mirror_gpa.unwrap_or((ram_size / 2) & !(PAGE - 1));
        let mirror_len = args.mirror_sectors / SECTORS_PER_PAGE * PAGE;
        let log_sector = args.mirror_sectors.div_ceil(SECTORS_PER_PAGE) * SECTORS_PER_PAGE;
        // The log takes what the disk has left after the bounce workload's region, at most
        // one entry per migrated page outside the mirror.
        let bounce_sectors = if args.sectors == 0 { 2048 } else { args.sectors };
        let room = config.capacity_sectors.saturating_sub(log_sector + bounce_sectors) / SECTORS_PER_PAGE;
        let (io_gpa, io_len) = args.io_range.unwrap_or((0, ram_size));
        if io_gpa.checked_add(io_len).is_none_or(|e| e > ram_size) {
            return Err(Error::Invalid(format!(
                "--io-range {io_gpa:#x}+{io_len:#x} is outside the {ram_size:#x} bytes of migrated RAM"
            )));
        }
        let mirror_end = mirror_gpa + mirror_len;
        let overlap = mirror_end.min(io_gpa + io_len).saturating_sub(mirror_gpa.max(io_gpa));
        let ops = args.postcopy_ops.min(room).min((io_len - overlap) / PAGE);
        let log_end = log_sector + ops * SECTORS_PER_PAGE;
        if mirror_gpa % PAGE != 0 || mirror_gpa + mirror_len > ram_size || ops == 0 {
            return Err(Error::Invalid(format!(
                "mirror {mirror_gpa:#x}+{mirror_len:#x} must be page aligned inside {ram_size:#x} bytes of RAM, with room for a write log after sector {log_sector} on the disk of {} sectors",
                config.capacity_sectors
            )));
        }
        first = args.first_sector.unwrap_or(log_end);
        let (writes, reads, rounds) =
            postcopy_io(args, ops, &mut drv, &ram, b, ram_size, mirror_gpa, log_sector, &mut rng)?;
        let complete = b.complete()?;
        let progress = if complete { None } else { b.progress() };
        info!(
            "postcopy I/O: {} writes, {} reads in {rounds} rounds; broker progress {progress:?}",
            writes.len(),
            reads.len()
        );
        postcopy_json = serde_json::json!({
            "writes": ops_json(&writes),
            "reads": ops_json(&reads),
            "rounds": rounds,
            "mirror_gpa": mirror_gpa,
            "mirror_sectors": args.mirror_sectors,
            "log_sector": log_sector,
            "progress_after_io": progress.map(|(r, t)| serde_json::json!({"received": r, "total": t})),
            "complete_during_io": complete,
            "io_seconds": started.elapsed().as_secs_f64(),
        });
    }
    let bounce = bounce_workload(args, &mut drv, &ram, first, config.capacity_sectors, acked)?;

    if args.pause_after_io {
        pause("io-done")?;
    }
    // Read all of guest RAM while still registered: every page received is not every page
    // present (a client may have removed some since), and a missing one needs the broker.
    let ram_sums = if args.touch_all { Some(touch_all(&ram)?) } else { None };
    let mut end = serde_json::json!("not in postcopy");
    if let Some(b) = &mut broker {
        // POSTCOPY_END only once every page has arrived: the backend then closes its uffd.
        b.wait_complete(COMPLETE_TIMEOUT)?;
        end = match postcopy::end(&mut conn) {
            Ok(()) => serde_json::json!("ok"),
            Err(e) => {
                warn!("{e}");
                serde_json::json!(e.to_string())
            }
        };
        // Let the broker go: at the end it serves its clients until they unregister (at most 3 s,
        // docs/control-protocol.md), so a driver that kept quiet would hold it that long.
        if let Err(e) = b.unregister_all() {
            info!("{e}");
        }
    } else if pc.is_some() {
        postcopy::end(&mut conn)?;
        end = serde_json::json!("ok");
    }
    let mut summary = bounce;
    let extra = serde_json::json!({
        "serial": serial,
        "capacity_sectors": config.capacity_sectors,
        "acked_features": format!("{acked:#x}"),
        "protocol_features": format!("{:#x}", conn.acked_protocol().bits()),
        "pagefault": conn.offered_protocol().contains(VhostUserProtocolFeatures::PAGEFAULT),
        "blocks": block_names,
        "ram_size": ram_size,
        "handshake": pc_summary,
        "postcopy": postcopy_json,
        "ram_checksums": ram_sums,
        "postcopy_end": end,
        "reattaches": broker.as_ref().map(BrokerSession::reattaches),
        "seconds": started.elapsed().as_secs_f64(),
    });
    if let (Some(s), serde_json::Value::Object(e)) = (summary.as_object_mut(), extra) {
        s.extend(e);
    }
    Ok(summary)
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(summary) => {
            if args.json {
                println!("{summary}");
            } else {
                println!(
                    "guest driver: {} writes ({} bytes), {} reads ({} bytes), verified; region {}+{} sectors checksum {}; serial {}",
                    summary["writes"],
                    summary["bytes_written"],
                    summary["reads"],
                    summary["bytes_read"],
                    summary["first_sector"],
                    summary["sectors"],
                    summary["checksum"],
                    summary["serial"]
                );
            }
        }
        Err(e) => {
            eprintln!("guest_driver: {e}");
            std::process::exit(1);
        }
    }
}
