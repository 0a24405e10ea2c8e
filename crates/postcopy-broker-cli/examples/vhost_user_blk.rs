//! Example vhost-user-blk backend built on `vhost-user-backend` with its `postcopy` feature.
//!
//! It serves a file-backed disk over one split virtqueue (virtio-blk IN, OUT, FLUSH, GET_ID).
//! Writes go straight from the guest buffers to the disk file (`pwrite` from the shared guest
//! mapping: during postcopy that is a kernel-mode fault on a missing page) and reads go straight
//! from the disk file into the guest buffers (`pread` into the mapping).
//!
//! It advertises the PAGEFAULT protocol feature unless started with `--no-pagefault`.
//!
//! With `--prefault-report FILE` it also behaves like a backend that populates (or mlocks) its
//! guest mappings: once its first memory table is in use (during postcopy: after the frontend's
//! ack, when faulting is allowed), a walker thread reads every 4 KiB of guest memory in a
//! scattered order, each read a fault on a missing page during postcopy, and writes one line per
//! 4 KiB to FILE, in guest address order: `GPA FNV-1a-64` in hex. The example joins the walker
//! before it exits, so FILE is complete once the process has exited.
//!
//! ```text
//! vhost_user_blk --socket /tmp/vub.sock --disk /tmp/disk.img --size 64M
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use clap::Parser;
use log::{debug, error, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Listener, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueOwnedT;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

/// Sector size of the virtio-blk protocol.
const SECTOR: u64 = 512;
/// Size of a virtio-blk request header (type, reserved, sector).
const HEADER_LEN: usize = 16;
/// Most data segments per request we announce (VIRTIO_BLK_F_SEG_MAX).
const SEG_MAX: u32 = 126;
/// Size of the virtio-blk config space we expose (`struct virtio_blk_config`, up to `num_queues`).
const CONFIG_LEN: usize = 36;

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "vhost-user-blk backend with postcopy (PAGEFAULT) support")]
struct Args {
    /// Unix socket to listen on (created; an existing file is replaced).
    #[arg(long)]
    socket: PathBuf,
    /// Disk image file (created if missing, resized to --size).
    #[arg(long)]
    disk: PathBuf,
    /// Disk size in bytes; suffixes K, M, G allowed; a multiple of 512.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    size: u64,
    /// Withhold the PAGEFAULT protocol feature (a backend that cannot do postcopy).
    #[arg(long)]
    no_pagefault: bool,
    /// Largest queue size the backend accepts.
    #[arg(long, default_value_t = 256)]
    queue_size: usize,
    /// Serial number returned by GET_ID (at most 20 bytes).
    #[arg(long, default_value = "pcb-vublk")]
    serial: String,
    /// Serve one connection, then exit (default: serve connections one after another forever).
    #[arg(long)]
    once: bool,
    /// Read all guest memory once the memory table is in use (as a backend that prefaults or
    /// mlocks does) and write what was read, one `GPA FNV` line per 4 KiB, to this file.
    #[arg(long, value_name = "FILE")]
    prefault_report: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let size = postcopy_broker_cli::cli::parse_size(s)?;
    if size == 0 || size % SECTOR != 0 {
        return Err(format!("size '{s}' must be a positive multiple of 512"));
    }
    Ok(size)
}

/// The device: a disk file and the guest memory the frontend gave us.
struct BlkBackend {
    disk: Arc<File>,
    capacity_sectors: u64,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    pagefault: bool,
    queue_size: usize,
    event_idx: bool,
    mem: Option<Mem>,
    requests: u64,
    /// Where the prefault walker reports, until it is started.
    prefault: Option<PathBuf>,
    /// The prefault walker, once started.
    walker: Option<std::thread::JoinHandle<Result<u64, String>>>,
}

/// Outcome of one request: status byte and bytes written into the guest.
struct Done {
    status: u8,
    written: u32,
}

impl BlkBackend {
    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes()); // capacity
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        c
    }

    fn process_queue(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self
            .mem
            .as_ref()
            .ok_or_else(|| io::Error::other("queue kicked before any memory table"))?
            .memory();
        loop {
            if self.event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let chains: Vec<_> =
                vring.get_mut().get_queue_mut().iter(mem.clone()).map_err(io::Error::other)?.collect();
            let any = !chains.is_empty();
            for chain in chains {
                let head = chain.head_index();
                let descs: Vec<Descriptor> = chain.collect();
                let done = self.process_request(&mem, &descs);
                debug!("request at head {head}: status {}, {} bytes to the guest", done.status, done.written);
                self.requests += 1;
                vring.add_used(head, done.written).map_err(io::Error::other)?;
            }
            if any && vring.needs_notification().map_err(io::Error::other)? {
                vring.signal_used_queue()?;
            }
            if !self.event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    /// Serve one request; writes its status byte. Malformed chains get no status (len 0).
    fn process_request(&self, mem: &GuestMemoryMmap<()>, descs: &[Descriptor]) -> Done {
        let (Some(hdr), Some(status)) = (descs.first(), descs.last()) else {
            return Done { status: VIRTIO_BLK_S_IOERR as u8, written: 0 };
        };
        if descs.len() < 2 || hdr.is_write_only() || (hdr.len() as usize) < HEADER_LEN {
            warn!("malformed request chain ({} descriptors)", descs.len());
            return Done { status: VIRTIO_BLK_S_IOERR as u8, written: 0 };
        }
        if !status.is_write_only() || status.len() < 1 {
            warn!("request without a writable status byte");
            return Done { status: VIRTIO_BLK_S_IOERR as u8, written: 0 };
        }
        let mut h = [0u8; HEADER_LEN];
        if let Err(e) = mem.read_slice(&mut h, hdr.addr()) {
            warn!("cannot read request header: {e}");
            return Done { status: VIRTIO_BLK_S_IOERR as u8, written: 0 };
        }
        let req_type = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&h[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let data = &descs[1..descs.len() - 1];
        let (st, written) = match req_type {
            VIRTIO_BLK_T_IN => self.rw(mem, data, sector, true),
            VIRTIO_BLK_T_OUT => self.rw(mem, data, sector, false),
            VIRTIO_BLK_T_FLUSH => match self.disk.sync_data() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    error!("flush: {e}");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, data),
            other => {
                debug!("unsupported request type {other}");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        };
        if let Err(e) = mem.write_obj(st as u8, status.addr()) {
            warn!("cannot write status byte: {e}");
            return Done { status: VIRTIO_BLK_S_IOERR as u8, written };
        }
        Done { status: st as u8, written: written + 1 }
    }

    fn get_id(&self, mem: &GuestMemoryMmap<()>, data: &[Descriptor]) -> (u32, u32) {
        let Some(d) = data.first() else { return (VIRTIO_BLK_S_IOERR, 0) };
        if !d.is_write_only() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let n = (d.len() as usize).min(self.serial.len());
        match mem.write_slice(&self.serial[..n], d.addr()) {
            Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
            Err(e) => {
                warn!("GET_ID: {e}");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
    }

    /// Read (`into_guest`) or write the data descriptors at `sector`, directly between the
    /// disk file and the guest mapping.
    fn rw(
        &self,
        mem: &GuestMemoryMmap<()>,
        data: &[Descriptor],
        sector: u64,
        into_guest: bool,
    ) -> (u32, u32) {
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let Some(start) = sector.checked_mul(SECTOR) else { return (VIRTIO_BLK_S_IOERR, 0) };
        if start.checked_add(total).is_none_or(|end| end > self.capacity_sectors * SECTOR) {
            warn!("request beyond the disk end: sector {sector} + {total} bytes");
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let mut off = start;
        let mut written = 0u32;
        for d in data {
            if d.is_write_only() != into_guest {
                warn!("data descriptor has the wrong direction");
                return (VIRTIO_BLK_S_IOERR, written);
            }
            if let Err(e) = self.rw_one(mem, d.addr(), d.len() as usize, off, into_guest) {
                error!(
                    "{} of {} bytes at disk offset {off}: {e}",
                    if into_guest { "read" } else { "write" },
                    d.len()
                );
                return (VIRTIO_BLK_S_IOERR, written);
            }
            off += u64::from(d.len());
            if into_guest {
                written += d.len();
            }
        }
        (VIRTIO_BLK_S_OK, written)
    }

    fn rw_one(
        &self,
        mem: &GuestMemoryMmap<()>,
        addr: GuestAddress,
        len: usize,
        off: u64,
        into_guest: bool,
    ) -> io::Result<()> {
        let slice = mem.get_slice(addr, len).map_err(io::Error::other)?;
        let guard = slice.ptr_guard_mut();
        let base = guard.as_ptr();
        let mut done = 0usize;
        while done < len {
            let file_off = libc::off_t::try_from(off + done as u64).map_err(io::Error::other)?;
            // SAFETY: `base..base+len` is inside a live guest mapping (get_slice checked the range and
            // the guard keeps it mapped); the kernel reads or writes at most `len - done` bytes there.
            let n = unsafe {
                let p = base.add(done).cast::<libc::c_void>();
                if into_guest {
                    libc::pread(self.disk.as_raw_fd(), p, len - done, file_off)
                } else {
                    libc::pwrite(self.disk.as_raw_fd(), p, len - done, file_off)
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "disk file is shorter than its size",
                ));
            }
            done += n as usize;
        }
        Ok(())
    }
}

impl VhostUserBackendMut for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let mut f = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        if self.pagefault {
            f |= VhostUserProtocolFeatures::PAGEFAULT;
        }
        f
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config();
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        c[start..end].to_vec()
    }

    fn update_memory(&mut self, mem: Mem) -> io::Result<()> {
        if let Some(report) = self.prefault.take() {
            let snapshot = mem.memory().into_inner();
            self.walker = Some(
                std::thread::Builder::new()
                    .name("prefault".into())
                    .spawn(move || prefault(&snapshot, &report))?,
            );
        }
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Lets the worker thread stop when a connection ends (the daemon joins it on drop).
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                error!("cannot create the worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("event for unknown queue {device_event}")))?;
        self.process_queue(vring)
    }
}

/// Step of the prefault walk and of its report.
const PREFAULT_STEP: u64 = 4096;

/// Reads every [`PREFAULT_STEP`] of `mem` in a scattered order (a stride coprime with the step
/// count visits each once), then writes `GPA FNV` lines in guest address order to `report`.
/// Returns how many steps it read.
fn prefault(mem: &GuestMemoryMmap<()>, report: &std::path::Path) -> Result<u64, String> {
    use std::io::Write;
    let mut steps: Vec<u64> = Vec::new();
    for region in mem.iter() {
        let base = region.start_addr().0;
        steps.extend((0..region.len() / PREFAULT_STEP).map(|i| base + i * PREFAULT_STEP));
    }
    let n = steps.len() as u64;
    let gcd = |mut a: u64, mut b: u64| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let mut stride = (n / 3) | 1;
    while n > 1 && gcd(stride, n) != 1 {
        stride += 2;
    }
    info!("prefault: reading {n} steps of {PREFAULT_STEP} bytes");
    let mut sums = vec![0u64; steps.len()];
    let mut buf = vec![0u8; PREFAULT_STEP as usize];
    for i in 0..n {
        let k = ((u128::from(i) * u128::from(stride)) % u128::from(n.max(1))) as usize;
        mem.read_slice(&mut buf, GuestAddress(steps[k]))
            .map_err(|e| format!("prefault read at {:#x}: {e}", steps[k]))?;
        sums[k] =
            postcopy_broker::vhost_user::blk::fnv1a64(postcopy_broker::vhost_user::blk::FNV_OFFSET, &buf);
    }
    let file = File::create(report).map_err(|e| format!("prefault report {}: {e}", report.display()))?;
    let mut out = io::BufWriter::new(file);
    for (gpa, h) in steps.iter().zip(&sums) {
        writeln!(out, "{gpa:x} {h:016x}").map_err(|e| format!("prefault report: {e}"))?;
    }
    out.flush().map_err(|e| format!("prefault report: {e}"))?;
    info!("prefault: read {n} steps, report in {}", report.display());
    Ok(n)
}

fn open_disk(args: &Args) -> io::Result<File> {
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&args.disk)?;
    if f.metadata()?.len() != args.size {
        f.set_len(args.size)?;
    }
    Ok(f)
}

fn run(args: Args) -> Result<(), String> {
    let disk = Arc::new(open_disk(&args).map_err(|e| format!("disk {}: {e}", args.disk.display()))?);
    let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let s = args.serial.as_bytes();
    if s.len() > serial.len() {
        return Err(format!("serial '{}' is longer than 20 bytes", args.serial));
    }
    serial[..s.len()].copy_from_slice(s);
    info!(
        "vhost-user-blk: disk {} ({} bytes), socket {}, PAGEFAULT {}",
        args.disk.display(),
        args.size,
        args.socket.display(),
        if args.no_pagefault { "withheld" } else { "offered" }
    );
    let mut listener = Listener::new(&args.socket, true)
        .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
    loop {
        let backend = Arc::new(RwLock::new(BlkBackend {
            disk: disk.clone(),
            capacity_sectors: args.size / SECTOR,
            serial,
            pagefault: !args.no_pagefault,
            queue_size: args.queue_size,
            event_idx: false,
            mem: None,
            requests: 0,
            prefault: args.prefault_report.clone(),
            walker: None,
        }));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        // A fresh daemon per connection: vhost-user ownership and vring state start clean.
        let mut daemon = VhostUserDaemon::new("vhost-user-blk".to_string(), backend.clone(), mem)
            .map_err(|e| format!("cannot create the vhost-user daemon: {e}"))?;
        daemon.start(&mut listener).map_err(|e| format!("cannot accept a connection: {e}"))?;
        let res = daemon.wait();
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        let requests = backend.read().map(|b| b.requests).unwrap_or(0);
        let walker = backend.write().ok().and_then(|mut b| b.walker.take());
        if let Some(w) = walker {
            match w.join() {
                Ok(Ok(n)) => info!("prefault walker read {n} steps"),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("the prefault walker panicked".into()),
            }
        }
        match res {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected)) => {
                info!("connection closed after {requests} requests")
            }
            Err(e) => warn!("connection ended after {requests} requests: {e}"),
        }
        if args.once {
            return Ok(());
        }
    }
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("vhost_user_blk: {e}");
        std::process::exit(1);
    }
}
