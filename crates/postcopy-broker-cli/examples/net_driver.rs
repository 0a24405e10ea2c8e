//! A virtio-net guest driver that plays the VMM against a vhost-user-net backend (DPDK's vhost
//! PMD under dpdk-testpmd) during postcopy: it maps the broker's RAM blocks (its own userfaultfd
//! registered with the broker), checks the backend offers PAGEFAULT before anything else, runs
//! the postcopy handshake and registers the backend's userfaultfd and corrected mapping with the
//! broker before the ack, sets up the receive and transmit queues (in a small driver block that
//! is not migrated) and posts receive buffers in guest pages that have not arrived. The backend
//! writes packets into them: it faults, the broker fetches the pages and wakes it.
//!
//! ```text
//! net_driver --socket /tmp/dpdk.sock --control /tmp/broker.sock --buffers 32 --touch-all
//! ```
//!
//! stdout carries JSON lines: `{"phase":"registered",...}` (the backend is registered, the ack
//! not yet sent), `{"phase":"rx-posted"}` (start the backend's traffic now), `{"phase":"rx-done"}`
//! and finally the summary (`"summary": true`): every used buffer with the bytes the device wrote,
//! and the guest addresses of the pages the buffers lie in (their bytes are written to `--dump`).
//! With `--pause-before-ack` / `--pause-after-rx` the driver waits for a line on stdin after the
//! phase line.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use log::{info, warn};
use postcopy_broker::ram::RamBlock;
use postcopy_broker::vhost_user::net::{NetHdr, DRIVER_FEATURES, NET_HDR_LEN};
use postcopy_broker::vhost_user::virtq::VIRTIO_F_VERSION_1;
use postcopy_broker::vhost_user::{postcopy, BackendConn, BrokerSession, GuestRam, Handshake};
use postcopy_broker::vhost_user::{Negotiation, NetDriver, RxBuf, RxUsed};
use postcopy_broker::{Error, Result};
use vhost::vhost_user::message::VhostUserProtocolFeatures;

/// Guest address of the driver block (virtqueues).
const DRIVER_GPA: u64 = 1 << 40;
/// Size of the driver block.
const DRIVER_SIZE: u64 = 1 << 20;
/// Guest address of the receive queue.
const RX_RING_GPA: u64 = DRIVER_GPA + 0x1_0000;
/// Guest address of the transmit queue.
const TX_RING_GPA: u64 = DRIVER_GPA + 0x4_0000;
/// Bytes of a small page: receive buffers are placed one per page of this size.
const PAGE: u64 = 4096;
/// The last buffer starts this many bytes before a page boundary, so that the packet the device
/// writes spans two missing pages.
const SPAN_TAIL: u64 = 40;
/// How long the driver waits for the broker to receive every page at the end.
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(300);

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "virtio-net guest driver (plays the VMM) for postcopy with a broker")]
struct Args {
    /// vhost-user-net backend socket.
    #[arg(long)]
    socket: PathBuf,
    /// The broker's control socket.
    #[arg(long)]
    control: PathBuf,
    /// The backend's client name in the broker's statistics.
    #[arg(long, default_value = "vhost-user-net")]
    name: String,
    /// Receive buffers to post, each in guest pages that have not arrived (the last one spans
    /// two pages); 0 runs the handshake and sets the queues up only.
    #[arg(long, default_value_t = 32)]
    buffers: u64,
    /// Bytes per receive buffer (at most; a buffer never leaves its page, except the last).
    #[arg(long, default_value_t = 2048)]
    buffer_len: u32,
    /// Virtqueue size (both queues).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Seed of the page choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds to wait for the device to use the buffers without any progress.
    #[arg(long, default_value_t = 60)]
    rx_timeout: u64,
    /// After registering the backend with the broker, print the "registered" phase and wait for
    /// a line on stdin before the ack.
    #[arg(long)]
    pause_before_ack: bool,
    /// After the buffers were used, print the "rx-done" phase and wait for a line on stdin.
    #[arg(long)]
    pause_after_rx: bool,
    /// After the traffic, read every migrated page through the driver's own mapping (its own
    /// faults) and report per-block checksums.
    #[arg(long)]
    touch_all: bool,
    /// Write the bytes of every page that holds a receive buffer here, in the summary's `pages`
    /// order.
    #[arg(long)]
    dump: Option<PathBuf>,
}

/// xorshift64: small, seedable, enough to spread buffers over RAM.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn phase(name: &str, extra: serde_json::Value, pause: bool) -> Result<()> {
    let mut line = serde_json::json!({ "phase": name });
    if let (Some(l), serde_json::Value::Object(e)) = (line.as_object_mut(), extra) {
        l.extend(e);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).map_err(|e| Error::io("stdout", e))?;
    if pause {
        let mut l = String::new();
        std::io::stdin().lock().read_line(&mut l).map_err(|e| Error::io("stdin", e))?;
    }
    Ok(())
}

/// Receive buffers in distinct pages of the migrated RAM (`ram_size` bytes from guest address
/// 0), at a pseudo-random offset inside each page; the last starts [`SPAN_TAIL`] bytes before the
/// end of its page, so its packet continues into the next page. Returns the buffers and the pages
/// they lie in.
fn choose_buffers(args: &Args, ram_size: u64) -> Result<(Vec<RxBuf>, Vec<u64>)> {
    let pages = ram_size / PAGE;
    if args.buffers + 1 > pages / 2 {
        return Err(Error::Invalid(format!(
            "--buffers {} does not fit {pages} pages of guest RAM (at most {})",
            args.buffers,
            (pages / 2).saturating_sub(1)
        )));
    }
    if (args.buffer_len as usize) < 2 * NET_HDR_LEN + 64 {
        return Err(Error::Invalid(format!("--buffer-len {} cannot hold a packet", args.buffer_len)));
    }
    let mut rng = Rng(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut used = std::collections::HashSet::new();
    let (mut bufs, mut touched) = (Vec::new(), Vec::new());
    while (bufs.len() as u64) < args.buffers {
        let last = bufs.len() as u64 + 1 == args.buffers;
        let p = rng.below(pages - 1);
        if used.contains(&p) || (last && used.contains(&(p + 1))) {
            continue;
        }
        used.insert(p);
        touched.push(p * PAGE);
        let (gpa, len) = if last {
            used.insert(p + 1);
            touched.push((p + 1) * PAGE);
            ((p + 1) * PAGE - SPAN_TAIL, args.buffer_len)
        } else {
            let off = 8 * rng.below(PAGE / 16);
            (p * PAGE + off, args.buffer_len.min((PAGE - off) as u32))
        };
        bufs.push(RxBuf { gpa, len });
    }
    Ok((bufs, touched))
}

fn used_json(ram: &GuestRam, used: &[RxUsed]) -> Result<serde_json::Value> {
    let mut out = Vec::new();
    for u in used {
        let mut bytes = vec![0u8; u.written as usize];
        ram.read(u.buf.gpa, &mut bytes)?;
        let hdr = NetHdr::parse(&bytes)?;
        out.push(serde_json::json!({
            "gpa": u.buf.gpa, "len": u.buf.len, "written": u.written, "bytes": hex(&bytes),
            "num_buffers": hdr.num_buffers, "gso_type": hdr.gso_type, "hdr_flags": hdr.flags,
        }));
    }
    Ok(serde_json::Value::Array(out))
}

fn run(args: &Args) -> Result<serde_json::Value> {
    // The backend first: a backend that cannot do postcopy is refused before anything else.
    let mut conn = BackendConn::connect(&args.socket, &Negotiation::default())?;
    postcopy::check_capable(&conn)?;
    let acked = conn.set_features(DRIVER_FEATURES)?;
    if acked & VIRTIO_F_VERSION_1 == 0 {
        return Err(Error::BackendFeature {
            socket: args.socket.display().to_string(),
            feature: "VIRTIO_F_VERSION_1",
            why: "this driver's 12-byte virtio_net_hdr needs",
        });
    }

    let mut ram = GuestRam::new();
    let mut broker = BrokerSession::attach(&args.control, "net-driver", &mut ram)?;
    let ram_size: u64 = ram.blocks().map(|b| b.size).sum();
    ram.add(DRIVER_GPA, Arc::new(RamBlock::memfd("net-driver", DRIVER_SIZE)?))?;
    // The driver block is never migrated: make every page present before the backend listens.
    ram.fill(DRIVER_GPA, DRIVER_SIZE, 0)?;
    let regions = ram.mem_regions();
    let names: Vec<Option<String>> =
        ram.blocks().map(|b| (b.gpa < DRIVER_GPA).then(|| b.name.to_string())).collect();

    let hs = Handshake::begin(&mut conn, &regions)?;
    let backend_client = broker.register_backend(&args.name, hs.postcopy(), &names)?;
    let pc = hs.postcopy();
    let handshake = serde_json::json!({
        "reported_bases": pc.reported_bases,
        "client_addrs": pc.mappings.iter().map(|m| m.client_addr).collect::<Vec<_>>(),
        "frontend_addrs": regions.iter().map(|r| r.user_addr).collect::<Vec<_>>(),
        "corrected": pc.corrected,
        "backend_pid": pc.pid,
        "backend_client": backend_client,
        "driver_client": broker.client(),
    });
    phase("registered", serde_json::json!({ "handshake": handshake }), args.pause_before_ack)?;
    hs.ack()?;
    drop(regions);

    let mut drv = NetDriver::start(&mut conn, &ram, RX_RING_GPA, TX_RING_GPA, args.queue_size)?;
    drv.set_timeout(Duration::from_secs(args.rx_timeout));
    let (bufs, pages) = choose_buffers(args, ram_size)?;
    let mut rx = serde_json::json!([]);
    if !bufs.is_empty() {
        drv.post_rx(&ram, &bufs)?;
        phase("rx-posted", serde_json::json!({ "buffers": bufs.len() }), false)?;
        let used = drv.wait_rx(&ram)?;
        info!("the backend used {} receive buffers", used.len());
        rx = used_json(&ram, &used)?;
        if let Some(path) = &args.dump {
            let mut bytes = vec![0u8; pages.len() * PAGE as usize];
            for (i, gpa) in pages.iter().enumerate() {
                ram.read(*gpa, &mut bytes[i * PAGE as usize..(i + 1) * PAGE as usize])?;
            }
            std::fs::write(path, &bytes).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
        }
        phase("rx-done", serde_json::json!({ "used": used.len() }), args.pause_after_rx)?;
    }

    let sums = if args.touch_all {
        let s = ram.read_all_sums(DRIVER_GPA)?.into_iter().map(|s| {
            let v =
                serde_json::json!({"fnv": format!("{:016x}", s.fnv), "checksum": format!("{:016x}", s.checksum)});
            (s.name, v)
        });
        Some(serde_json::Value::Object(s.collect()))
    } else {
        None
    };
    // POSTCOPY_END only once every page has arrived: the backend then closes its uffd.
    broker.wait_complete(COMPLETE_TIMEOUT)?;
    let end = match postcopy::end(&mut conn) {
        Ok(()) => serde_json::json!("ok"),
        Err(e) => {
            warn!("{e}");
            serde_json::json!(e.to_string())
        }
    };
    Ok(serde_json::json!({
        "summary": true,
        "acked_features": format!("{acked:#x}"),
        "protocol_features": format!("{:#x}", conn.acked_protocol().bits()),
        "pagefault": conn.offered_protocol().contains(VhostUserProtocolFeatures::PAGEFAULT),
        "blocks": broker.block_names(),
        "ram_size": ram_size,
        "handshake": handshake,
        "rx": rx,
        "pages": pages,
        "ram_checksums": sums,
        "postcopy_end": end,
    }))
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(summary) => println!("{summary}"),
        Err(e) => {
            eprintln!("net_driver: {e}");
            std::process::exit(1);
        }
    }
}
