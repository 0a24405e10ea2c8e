//! A guest driver that plays the VMM: it maps guest RAM (a memfd), connects to any vhost-user-blk
//! backend, shares the RAM with it, drives a split virtqueue in guest RAM and runs a workload:
//! pseudo-random writes from guest buffers, read-back into other guest buffers, verification,
//! and a summary (requests, bytes, checksum of the disk region).
//!
//! ```text
//! guest_driver --socket /tmp/vub.sock --requests 64 --seed 7 --json
//! ```
//!
//! With `--postcopy-handshake` it runs the vhost-user postcopy handshake (ADVISE, LISTEN,
//! SET_MEM_TABLE with reply, base correction, ack) instead of a plain memory table, with all of
//! guest RAM present beforehand (no broker serves faults yet), then POSTCOPY_END after the
//! workload.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use log::info;
use postcopy_broker::ram::RamBlock;
use postcopy_broker::vhost_user::blk::{fnv1a64, DRIVER_FEATURES, FNV_OFFSET, ID_BYTES, SECTOR_SIZE};
use postcopy_broker::vhost_user::{postcopy, BackendConn, BlkConfig, BlkDriver, BlkRequest, BlkRequestKind};
use postcopy_broker::vhost_user::{GuestRam, Negotiation};
use postcopy_broker::{Error, Result};
use vhost::vhost_user::message::VhostUserProtocolFeatures;

/// Guest address of the virtqueue.
const RING_GPA: u64 = 0x1_0000;
/// Guest address of the request headers and status bytes.
const META_GPA: u64 = 0x2_0000;
/// Guest address of the first data buffer.
const DATA_GPA: u64 = 0x10_0000;

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "vhost-user-blk guest driver (plays the VMM)")]
struct Args {
    /// vhost-user-blk backend socket.
    #[arg(long)]
    socket: PathBuf,
    /// Guest RAM size in bytes (K, M, G suffixes allowed).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    ram_size: u64,
    /// Number of write requests.
    #[arg(long, default_value_t = 64)]
    requests: u64,
    /// Seed of the pseudo-random workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// First sector of the disk region the workload uses.
    #[arg(long, default_value_t = 0)]
    first_sector: u64,
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
    /// Run the vhost-user postcopy handshake (all RAM present; no broker yet), END at the end.
    #[arg(long)]
    postcopy_handshake: bool,
    /// Print the summary as one JSON line.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1u64 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1u64 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|e| format!("size '{s}': {e}"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size '{s}' overflows"))
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

/// The workload's state: driver, RAM, and the expected contents of the disk region.
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

fn run(args: &Args) -> Result<serde_json::Value> {
    let block = Arc::new(RamBlock::memfd("guest-ram", args.ram_size)?);
    let mut ram = GuestRam::new();
    ram.add(0, block)?;

    let mut conn = BackendConn::connect(&args.socket, &Negotiation::default())?;
    let acked = conn.set_features(DRIVER_FEATURES)?;
    let config = BlkConfig::read(&mut conn)?;
    info!("disk: {} sectors, features {acked:#x}", config.capacity_sectors);

    let mut pc_summary = serde_json::Value::Null;
    let pc = if args.postcopy_handshake {
        // No broker serves faults yet: make every page of guest RAM present first.
        ram.fill(0, args.ram_size, 0)?;
        let regions = ram.mem_regions();
        let pc = postcopy::handshake(&mut conn, &regions)?;
        pc_summary = serde_json::json!({
            "reported_bases": pc.reported_bases,
            "client_addrs": pc.mappings.iter().map(|m| m.client_addr).collect::<Vec<_>>(),
            "frontend_addrs": regions.iter().map(|r| r.user_addr).collect::<Vec<_>>(),
            "corrected": pc.corrected,
            "backend_pid": pc.pid,
        });
        Some(pc)
    } else {
        conn.set_mem_table(&ram.mem_regions())?;
        None
    };
    let mut drv = BlkDriver::start(&mut conn, &ram, RING_GPA, META_GPA, args.queue_size)?;

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

    let sectors = if args.sectors == 0 {
        2048u64.min(config.capacity_sectors.saturating_sub(args.first_sector))
    } else {
        args.sectors
    };
    if sectors == 0 || args.first_sector + sectors > config.capacity_sectors {
        return Err(Error::Invalid(format!(
            "disk region {}+{sectors} sectors does not fit the disk of {} sectors",
            args.first_sector, config.capacity_sectors
        )));
    }
    let max_sectors = args.max_request_sectors.clamp(1, sectors);
    let max_bytes = max_sectors * SECTOR_SIZE;
    let batch = args.batch.max(1);
    let write_gpa = DATA_GPA + 0x1000;
    let read_gpa = write_gpa + batch as u64 * max_bytes;
    ram.host_addr(read_gpa, max_bytes * (batch as u64).max(8))
        .map_err(|_| Error::Invalid("guest RAM is too small for the buffers; raise --ram-size".into()))?;

    let mut w = Workload {
        drv: &mut drv,
        ram: &ram,
        first: args.first_sector,
        model: Vec::new(),
        max_bytes,
        read_gpa,
        c: Counters::default(),
    };
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
                sector: args.first_sector + start,
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
    let c = std::mem::take(&mut w.c);

    if pc.is_some() {
        postcopy::end(&mut conn)?;
    }
    Ok(serde_json::json!({
        "writes": c.writes,
        "reads": c.reads,
        "bytes_written": c.bytes_written,
        "bytes_read": c.bytes_read,
        "flushed": flushed,
        "first_sector": args.first_sector,
        "sectors": sectors,
        "checksum": format!("{checksum:#018x}"),
        "serial": serial,
        "capacity_sectors": config.capacity_sectors,
        "acked_features": format!("{acked:#x}"),
        "protocol_features": format!("{:#x}", conn.acked_protocol().bits()),
        "pagefault": conn.offered_protocol().contains(VhostUserProtocolFeatures::PAGEFAULT),
        "postcopy": pc_summary,
    }))
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
