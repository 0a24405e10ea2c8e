//! `postcopy-broker serve`: the broker daemon. It owns the RAM blocks (or none, when it only
//! serves Firecracker's private memory), listens on its control socket, serves faults from its
//! page source, and ends postcopy when every page has arrived.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cli::progress::Progress;
use postcopy_broker::error::{Error, Result};
use postcopy_broker::fault::{Broker, BrokerConfig, ControlLimits, IMAGE_GRANT};
use postcopy_broker::ram::{RamBlock, RamBlocks, HUGE_2M};
use postcopy_broker::source::{FileSource, MemorySource, PageSource};
use postcopy_broker::vhost_user::daemon::DaemonBackends;
use postcopy_broker::Incoming;

/// Options of `serve` for a local source.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Control socket path.
    pub control: PathBuf,
    /// The control socket inherited by socket activation (then `control` only names it).
    pub control_fd: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// Other fds passed at start: a lazy restore does not restart from parked fds, so they are
    /// closed.
    pub parked: std::sync::Arc<crate::fdstore::Parked>,
    /// Allowed peer uids (empty: root and our own uid).
    pub allowed_uids: Vec<u32>,
    /// Blocks each non-root allowed uid may map.
    pub grants: Vec<(u32, Vec<String>)>,
    /// Image file: lazy-restore source of the blocks and/or private clients' memory.
    pub image: Option<PathBuf>,
    /// Blocks: (name, size, page size).
    pub blocks: Vec<(String, u64, u64)>,
    /// Pull background pages.
    pub background: bool,
    /// Busy-poll.
    pub busy_poll: bool,
    /// Hold the background fill until this many clients registered.
    pub wait_clients: u64,
    /// Write per-block checksums (JSON) here when done.
    pub checksums: Option<PathBuf>,
    /// vhost-user backend sockets the daemon drives itself (postcopy handshake, registration,
    /// POSTCOPY_END).
    pub vhost_user_backends: Vec<PathBuf>,
    /// What one control-socket peer may make the broker hold.
    pub limits: ControlLimits,
}

/// Parse `NAME:SIZE[:4k|2m]` (for clap).
pub fn parse_block(s: &str) -> std::result::Result<(String, u64, u64), String> {
    postcopy_broker::migration::spec::parse_block(s)
        .map(|b| (b.name, b.size, b.page_size))
        .map_err(|e| e.to_string())
}

/// Parse `UID=BLOCK[,BLOCK...]` (for clap).
pub fn parse_grant(s: &str) -> std::result::Result<(u32, Vec<String>), String> {
    let bad = || format!("grant '{s}': want UID=BLOCK[,BLOCK...], e.g. 1000=pc.ram");
    let (uid, blocks) = s.split_once('=').ok_or_else(bad)?;
    let uid: u32 = uid.trim().parse().map_err(|_| bad())?;
    let blocks: Vec<String> = blocks.split(',').filter(|b| !b.is_empty()).map(str::to_string).collect();
    if blocks.is_empty() {
        return Err(bad());
    }
    Ok((uid, blocks))
}

/// Check that every grant names something the broker serves: a block, or without blocks the
/// image ([`IMAGE_GRANT`]). A misspelt grant would otherwise only show up as a peer's refusal.
pub fn check_grants(grants: &[(u32, Vec<String>)], blocks: &[(String, u64, u64)]) -> Result<()> {
    for (uid, names) in grants {
        for n in names {
            let known = if blocks.is_empty() { n == IMAGE_GRANT } else { blocks.iter().any(|b| &b.0 == n) };
            if !known {
                let what = if blocks.is_empty() {
                    format!("without --block the only grant is '{IMAGE_GRANT}' (the whole image)")
                } else {
                    let names: Vec<&str> = blocks.iter().map(|b| b.0.as_str()).collect();
                    format!("the blocks are {}", names.join(", "))
                };
                return Err(Error::Invalid(format!("--grant {uid}={n}: no such block; {what}")));
            }
        }
    }
    Ok(())
}

/// Raise the soft limit of open files to the hard limit: every client costs the broker a few
/// fds (its uffd, pidfd, connection), and the per-peer limits are sized for that.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    // SAFETY: setrlimit reads one rlimit from `want`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
        log::warn!(
            "cannot raise the open files limit to {}: {}",
            lim.rlim_max,
            std::io::Error::last_os_error()
        );
    } else {
        log::debug!("open files limit raised from {} to {}", lim.rlim_cur, lim.rlim_max);
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Make SIGINT and SIGTERM request a clean stop.
pub fn install_stop_handler() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for s in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { sigaction(s, &act) } {
            log::warn!("cannot install a {s} handler: {e}");
        }
    }
}

/// Whether a stop was requested by a signal.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// FNV-1a 64 of a byte slice.
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Per-block checksums of received RAM (every page must have arrived). Call only after the
/// Incoming's cleanup: a received page can be a hole again (a client removed it), and reading it
/// while the block is registered would fault on the broker's own userfaultfd with no loop left
/// to serve it.
pub fn block_checksums(blocks: &RamBlocks) -> Result<serde_json::Value> {
    let mut m = serde_json::Map::new();
    for (_, b) in blocks.iter() {
        if !b.received().all_set() {
            return Err(Error::Invalid(format!("block '{}' is not complete; refusing to read it", b.name())));
        }
        // SAFETY: the block is no longer registered with a userfaultfd (see the doc: after
        // cleanup), so reading its placement mapping cannot block; holes read as zeros; no Rust
        // object aliases it.
        let data =
            unsafe { std::slice::from_raw_parts(b.host_ptr(), postcopy_broker::conv::usize_of(b.size())) };
        m.insert(b.name().into(), serde_json::json!(format!("{:016x}", fnv1a64(data))));
    }
    Ok(serde_json::Value::Object(m))
}

fn build_blocks(specs: &[(String, u64, u64)]) -> Result<RamBlocks> {
    let mut blocks = RamBlocks::new();
    for (name, size, ps) in specs {
        let b = match *ps {
            4096 => RamBlock::memfd(name, *size)?,
            HUGE_2M => RamBlock::hugetlb(name, *size, HUGE_2M)?,
            other => {
                return Err(Error::UnsupportedPageSize {
                    page_size: other,
                    why: "serve creates 4k or 2m blocks".into(),
                })
            }
        };
        blocks.add(b)?;
    }
    Ok(blocks)
}

/// Serve from a local image (lazy restore) and/or for private clients.
pub fn run(o: ServeOptions) -> ExitCode {
    match serve(o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            crate::systemd::tell(&format!("ERRNO={}\nSTATUS=failed: {e}", crate::systemd::errno_of(&e)));
            ExitCode::FAILURE
        }
    }
}

/// How often the service manager hears the progress (STATUS=) while pages arrive.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// The STATUS= line for the service manager.
fn service_status(lazy: bool, got: u64, total: u64) -> String {
    if !lazy {
        return "serving private (Firecracker) clients from the image".into();
    }
    let pct = if total == 0 { 100.0 } else { got as f64 * 100.0 / total as f64 };
    format!("postcopy: {got}/{total} pages received ({pct:.1}%)")
}

fn serve(o: ServeOptions) -> Result<()> {
    o.parked.close_rest("only `serve --incoming` rebuilds from parked fds");
    install_stop_handler();
    raise_fd_limit();
    check_grants(&o.grants, &o.blocks)?;
    let blocks = build_blocks(&o.blocks)?;
    let lazy = !blocks.is_empty();
    let source: Box<dyn PageSource> = match (&o.image, lazy) {
        (Some(img), true) => Box::new(FileSource::open(img, &blocks)?),
        (None, true) => {
            return Err(Error::Invalid(
                "blocks need a page source: give --image FILE (a snapshot of the blocks back to back)".into(),
            ))
        }
        (_, false) => Box::new(MemorySource::new(Vec::new())),
    };
    if !lazy && o.image.is_none() {
        return Err(Error::Invalid(
            "nothing to serve: give --block specs with --image, or --image alone for Firecracker clients"
                .into(),
        ));
    }
    let mut inc = Incoming::new(blocks);
    // Backends first: their Probe notifiers veto postcopy before anything is touched.
    let mut backends = DaemonBackends::connect(&o.vhost_user_backends, inc.notifiers_mut())?;
    inc.probe()?;
    inc.advise()?;
    inc.listen()?;
    let config = BrokerConfig {
        background: o.background,
        background_chunk: 0,
        background_after_clients: o.wait_clients,
        image: o.image.clone(),
        busy_poll: o.busy_poll,
        control: Some(o.control.clone()),
        control_fd: o.control_fd.clone(),
        allowed_uids: o.allowed_uids.clone(),
        grants: o.grants.iter().cloned().collect(),
        limits: o.limits,
        ..BrokerConfig::default()
    };
    let mut h = Broker::spawn(&inc, source, config)?;
    backends.register_all(&h, inc.blocks())?;
    inc.run()?;
    log::info!("serving on {}", o.control.display());
    let start = Instant::now();
    let total = inc.blocks().total_pages();
    crate::systemd::tell(&format!("READY=1\nSTATUS={}", service_status(lazy, 0, total)));
    let mut progress = Progress::new("restore", total);
    let mut told = (Instant::now(), 0);
    loop {
        h.check_alive()?;
        if stop_requested() {
            log::warn!("stop requested before every page arrived");
            break;
        }
        if lazy {
            let got = inc.blocks().received_pages();
            progress.update(got, "");
            if got != told.1 && (told.0.elapsed() >= STATUS_EVERY || got == total) {
                crate::systemd::tell(&format!("STATUS={}", service_status(lazy, got, total)));
                told = (Instant::now(), got);
            }
            if got == total {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    crate::systemd::tell("STOPPING=1");
    progress.finish();
    let done = lazy && inc.blocks().all_received();
    let report = if done { h.finish_complete()? } else { h.stop()? };
    inc.cleanup()?;
    if let (true, Some(path)) = (done, &o.checksums) {
        let sums = block_checksums(inc.blocks())?;
        std::fs::write(path, serde_json::to_vec_pretty(&sums).unwrap_or_default())
            .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    }
    println!("{}", postcopy_broker::stats::render(&report).trim_end());
    if lazy {
        println!("restore: {} pages in {:.2}s, complete: {done}", total, start.elapsed().as_secs_f64());
    }
    Ok(())
}
