//! A VMM that embeds the broker: postcopy of its guest RAM, served in this process, with a
//! vhost-user-blk backend doing I/O on pages that have not arrived yet.
//!
//! ```text
//! in_process --socket /tmp/vub.sock [--pages 4096]
//! ```
//!
//! 1. The "source host" RAM is a [`MemorySource`]: page `i` of block `pc.ram` is filled with
//!    bytes `(i * 7 + j) % 251` (`j` the byte's index in the page, plus 1); block `driver`
//!    (the virtqueue and request headers of this example's virtio-blk driver) is zeros.
//! 2. [`BrokerBuilder`] starts postcopy with the backend listening on `--socket` (the project's
//!    `vhost_user_blk` example, or any vhost-user-blk backend with PAGEFAULT); every page is
//!    missing and the background fill is off.
//! 3. The driver writes missing pages to disk (the backend faults on them in its own process)
//!    and reads disk sectors into other missing pages (the backend faults, then overwrites them),
//!    all through the VMM's guest memory (vm-memory, no `unsafe`).
//! 4. Only demand pages have arrived: the background fill is started, every page arrives, the
//!    broker finishes (POSTCOPY_END to the backend).
//! 5. Guest RAM is checked page by page: the source's content, except the pages read into,
//!    which hold what was written to disk.
//!
//! It prints one JSON line with the counts and the checks; it exits non-zero on any failure.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use postcopy_broker::embed::BrokerBuilder;
use postcopy_broker::ram::RamBlock;
use postcopy_broker::source::MemorySource;
use postcopy_broker::vhost_user::blk::{DRIVER_FEATURES, SECTOR_SIZE};
use postcopy_broker::vhost_user::{BackendConn, BlkDriver, BlkRequest, BlkRequestKind, Negotiation};

const PAGE: u64 = 4096;
/// Entries of the virtqueue.
const QUEUE: u16 = 64;
/// Size of the driver block: the virtqueue, then the request headers.
const DRIVER_SIZE: u64 = 64 << 10;
/// Pages written to disk, then read back into other pages.
const IO_PAGES: u64 = 16;

/// Byte `j` of source page `i` of `pc.ram` (never zero, so a page that arrived as zeros shows).
fn source_byte(page: u64, j: u64) -> u8 {
    ((page * 7 + j) % 251) as u8 + 1
}

fn source_page(page: u64) -> Vec<u8> {
    (0..PAGE).map(|j| source_byte(page, j)).collect()
}

struct Args {
    socket: PathBuf,
    pages: u64,
}

fn args() -> Result<Args, String> {
    let mut socket = None;
    let mut pages = 4096;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--socket" => socket = it.next().map(PathBuf::from),
            "--pages" => {
                pages =
                    it.next().and_then(|v| v.parse().ok()).ok_or("--pages takes a number of 4 KiB pages")?
            }
            other => {
                return Err(format!("unknown argument {other}; usage: in_process --socket PATH [--pages N]"))
            }
        }
    }
    let socket = socket.ok_or("give the vhost-user-blk backend's socket with --socket PATH")?;
    if pages < 4 * IO_PAGES {
        return Err(format!("--pages must be at least {}", 4 * IO_PAGES));
    }
    Ok(Args { socket, pages })
}

fn run(a: &Args) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let ram_size = a.pages * PAGE;
    let image: Vec<u8> = (0..a.pages).flat_map(source_page).collect();
    // The VMM negotiates the device itself; the broker needs nothing but the connection.
    let mut conn = BackendConn::connect(&a.socket, &Negotiation::default())?;
    conn.set_features(DRIVER_FEATURES)?;
    let mut broker = BrokerBuilder::new()
        .block(RamBlock::memfd("pc.ram", ram_size)?)
        .block(RamBlock::memfd("driver", DRIVER_SIZE)?)
        .source(MemorySource::new(vec![(image.clone(), PAGE), (vec![0; DRIVER_SIZE as usize], PAGE)]))
        .vhost_user_frontend(conn)
        .start()?;
    let backend = broker.backend_clients()[0];
    let ram = broker.guest_ram().clone();
    let (ring, meta) = (ram_size, ram_size + (32 << 10));
    let mut drv = BlkDriver::start(broker.backend_mut(backend)?, &ram, ring, meta, QUEUE)?;

    // Writes from missing pages 0, 2, 4...: the backend reads them (and faults) in its process.
    let writes: Vec<(u64, u64)> = (0..IO_PAGES).map(|k| (k * 2, k * (PAGE / SECTOR_SIZE))).collect();
    for &(page, sector) in &writes {
        let req = BlkRequest { kind: BlkRequestKind::Out, sector, data: vec![(page * PAGE, PAGE as u32)] };
        drv.submit_ok(&ram, &[req])?;
    }
    // Reads of those sectors into missing pages at the end of pc.ram: the backend faults, the
    // source's page arrives first, then the disk data overwrites it.
    let reads: Vec<(u64, u64)> = writes.iter().map(|&(page, sector)| (a.pages - 1 - page, sector)).collect();
    for &(page, sector) in &reads {
        let req = BlkRequest { kind: BlkRequestKind::In, sector, data: vec![(page * PAGE, PAGE as u32)] };
        drv.submit_ok(&ram, &[req])?;
    }
    let during = broker.status()?;
    let (received_during_io, total) = broker.progress();

    broker.set_background(true)?;
    broker.wait_complete(Duration::from_secs(120))?;
    let done = broker.finish()?;

    // Guest RAM, page by page, through the VMM's memory (now plain memory).
    let mut bad = Vec::new();
    let mut buf = vec![0u8; PAGE as usize];
    for page in 0..a.pages {
        ram.read(page * PAGE, &mut buf)?;
        let want = match reads.iter().find(|r| r.0 == page) {
            Some(&(_, sector)) => source_page(writes.iter().find(|w| w.1 == sector).map_or(0, |w| w.0)),
            None => source_page(page),
        };
        if buf != want {
            bad.push(page);
        }
    }
    let backend_status = done.report.all_clients().find(|c| c.id == backend).map(|c| c.stats.clone());
    Ok(serde_json::json!({
        "pages": total,
        "received_during_io": received_during_io,
        "background_during_io": during.broker.pages_background,
        "demand_pages": done.report.broker.pages_demand,
        "background_pages": done.report.broker.pages_background,
        "backend_client": backend,
        "backend_faults": backend_status.as_ref().map_or(0, |s| s.faults),
        "backend_pages_requested": backend_status.as_ref().map_or(0, |s| s.pages_requested),
        "writes": writes,
        "reads": reads,
        "ram_mismatches": bad,
        "complete": done.complete,
        "postcopy_end": "ok",
    }))
}

fn main() -> ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&a) {
        Ok(summary) => {
            let ok = summary["ram_mismatches"].as_array().is_some_and(Vec::is_empty);
            println!("{summary}");
            if ok {
                ExitCode::SUCCESS
            } else {
                eprintln!("error: guest RAM differs from the source at the pages listed in ram_mismatches");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
