//! `postcopy-broker serve`: the broker daemon. It owns the RAM blocks (or none, when it only
//! serves Firecracker's private memory), listens on its control socket, serves faults from its
//! page source, and ends postcopy when every page has arrived.
//!
//! Under a service manager with an fd store (`$NOTIFY_SOCKET`; systemd with
//! `FileDescriptorStoreMax=`, or `pcb-keeper`), a lazy restore parks everything a restart needs
//! once its fault loop runs (`crate::cli::park`, `crate::cli::restore_restart`); a start that
//! finds a parked restore rebuilds it and takes its clients and backends back.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::park::{self, Job, Parking, State, ALIVE_FD_NAME};
use crate::cli::progress::Progress;
use crate::cli::restore_restart::{
    backend_fd_name, parkable_blocks, rebuild_blocks, take_backends, ImageIdentity, RestoreRecord,
    RESTORE_RECORD_VERSION,
};
use crate::fdstore::FdStore;
use postcopy_broker::error::{Error, Result};
use postcopy_broker::fault::park::{ClientParking, Restart};
use postcopy_broker::fault::{Broker, BrokerConfig, BrokerHandle, ControlLimits, IMAGE_GRANT};
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
    /// The other fds passed at start: what a broker that died parked (see `crate::cli::park`).
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
    /// Write the summary (JSON: the final report, the restarts) here at the end.
    pub summary_json: Option<PathBuf>,
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
    install_stop_handler();
    raise_fd_limit();
    check_grants(&o.grants, &o.blocks)?;
    let resumed = match park::take_state(&o.parked)? {
        Some((g, State { job: Job::Restore { restore }, clients })) => Some((g, restore, clients)),
        Some((_, State { job, .. })) => {
            return Err(Error::Invalid(format!(
                "the fd store holds a parked `{}`, not a lazy restore: start that command again to resume it (or empty the store)",
                job.command()
            )))
        }
        None => None,
    };
    let store = park::fd_store();
    // Parking needs the control socket's fd: bind it here unless the service manager gave it.
    let (control_fd, _bound) = park::control_fd(&o.control_fd, store.is_some(), &o.control, &o.allowed_uids)?;
    let config = BrokerConfig {
        background: o.background,
        background_chunk: 0,
        background_after_clients: o.wait_clients,
        image: o.image.clone(),
        busy_poll: o.busy_poll,
        control: Some(o.control.clone()),
        control_fd,
        allowed_uids: o.allowed_uids.clone(),
        grants: o.grants.iter().cloned().collect(),
        limits: o.limits,
        ..BrokerConfig::default()
    };
    let run = match resumed {
        Some((generation, restore, clients)) => rebuild(&o, store, config, generation, restore, clients)?,
        None => {
            o.parked.close_rest("no parked restore uses it");
            start_fresh(&o, store, config)?
        }
    };
    run_to_end(&o, run)
}

/// A restore serving postcopy, started fresh or rebuilt.
struct Running {
    inc: Incoming,
    h: BrokerHandle,
    /// Their connections live in the end notifiers; kept for as long as the restore runs.
    _backends: DaemonBackends,
    parking: Option<Arc<Parking>>,
    /// The restarts before this broker's (a rebuilt restore's record).
    restarts: Vec<Restart>,
    /// Whether this broker was rebuilt (it said READY=1 already).
    rebuilt: bool,
}

fn page_source(o: &ServeOptions, blocks: &RamBlocks) -> Result<Box<dyn PageSource>> {
    match (&o.image, blocks.is_empty()) {
        (Some(img), false) => Ok(Box::new(FileSource::open(img, blocks)?)),
        (None, false) => Err(Error::Invalid(
            "blocks need a page source: give --image FILE (a snapshot of the blocks back to back)".into(),
        )),
        (Some(_), true) => Ok(Box::new(MemorySource::new(Vec::new()))),
        (None, true) => Err(Error::Invalid(
            "nothing to serve: give --block specs with --image, or --image alone for Firecracker clients"
                .into(),
        )),
    }
}

fn start_fresh(o: &ServeOptions, store: Option<FdStore>, mut config: BrokerConfig) -> Result<Running> {
    let blocks = build_blocks(&o.blocks)?;
    let source = page_source(o, &blocks)?;
    let mut inc = Incoming::new(blocks);
    // Backends first: their Probe notifiers veto postcopy before anything is touched.
    let mut backends = DaemonBackends::connect(&o.vhost_user_backends, inc.notifiers_mut())?;
    inc.probe()?;
    inc.advise()?;
    inc.listen()?;
    let parking = store.map(Parking::new).transpose()?;
    config.parking = parking.clone().map(|p| p as Arc<dyn ClientParking>);
    // Under an fd store no client registers before the record is parked: a client served by
    // a broker that died before its record existed would find a fresh restore that does not
    // know it (other blocks, other ids).
    config.hold_control = parking.is_some();
    let control_fd = config.control_fd.clone();
    let h = Broker::spawn(&inc, source, config)?;
    backends.register_all(&h, inc.blocks())?;
    inc.run()?;
    if let Some(p) = &parking {
        if postcopy_broker::failpoint::once("restore-slow-park") {
            // Widens the window between serving faults and parking the record, for the test
            // that no control client is served in it.
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        park_restore(p, o, &inc, &backends, control_fd.as_deref());
        h.open_control()?;
    }
    Ok(Running { inc, h, _backends: backends, parking, restarts: Vec::new(), rebuilt: false })
}

/// The restore serves postcopy now: park its record and fds (see `crate::cli::park`).
fn park_restore(
    p: &Parking,
    o: &ServeOptions,
    inc: &Incoming,
    backends: &DaemonBackends,
    control: Option<&std::os::fd::OwnedFd>,
) {
    let parked = || -> Result<usize> {
        let image = o.image.as_deref().map(ImageIdentity::of).transpose()?;
        let conns = backends.parkable()?;
        let record = RestoreRecord {
            version: RESTORE_RECORD_VERSION,
            blocks: o.blocks.clone(),
            image,
            backends: conns.iter().map(|(b, _)| b.clone()).collect(),
            restarts: Vec::new(),
        };
        let mut fds = parkable_blocks(inc.blocks());
        fds.extend(conns.iter().enumerate().map(|(i, (_, fd))| (backend_fd_name(i), fd.as_fd())));
        if let Some(c) = control {
            fds.push((crate::systemd::CONTROL_FD_NAME.into(), c.as_fd()));
        }
        p.begin(Job::Restore { restore: record }, &fds)?;
        Ok(fds.len() + 1)
    };
    match parked() {
        Ok(n) => log::info!("restore: {n} fds parked in the fd store for a restart"),
        Err(e) => log::error!("{e}; a restart of this broker could not resume the restore"),
    }
}

/// A start that found a parked restore: rebuild the blocks from their fds, take the backends'
/// connections and the clients back, wake them, and go on.
fn rebuild(
    o: &ServeOptions,
    store: Option<FdStore>,
    mut config: BrokerConfig,
    generation: u64,
    restore: RestoreRecord,
    clients: Vec<postcopy_broker::fault::park::ParkedClient>,
) -> Result<Running> {
    restore.check_options(&o.blocks, o.image.as_deref())?;
    let alive = o.parked.take(ALIVE_FD_NAME);
    let last = alive.as_ref().and_then(park::last_alive);
    let mut names = o.parked.names();
    names.push(crate::systemd::CONTROL_FD_NAME.to_string());
    log::warn!(
        "restarting the lazy restore after this broker's death ({} restart(s) before, {} client(s) parked)",
        restore.restarts.len(),
        clients.len()
    );
    let (blocks, present) = rebuild_blocks(&restore, &o.parked)?;
    let total = blocks.total_pages();
    let source = page_source(o, &blocks)?;
    let mut inc = Incoming::new(blocks);
    let backends = DaemonBackends::reattach(take_backends(&restore, &o.parked), inc.notifiers_mut())?;
    inc.relisten()?;
    let state = State { job: Job::Restore { restore: restore.clone() }, clients: clients.clone() };
    let parking = park::parking_after_restart(store, alive, state, generation, names);
    config.parking = parking.clone().map(|p| p as Arc<dyn ClientParking>);
    // The clients the fill waited for came to the dead broker.
    config.background_after_clients = 0;
    let downtime_ms =
        last.and_then(|t| t.elapsed().ok()).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    config.restart = Some(Restart { downtime_ms, pages_rebuilt: present, ..Restart::default() });
    let h = Broker::spawn(&inc, source, config)?;
    park::adopt_clients(&h, &o.parked, clients, parking.as_deref());
    o.parked.close_rest("not part of the parked restore");
    h.open_control()?;
    let restart = h.status()?.restart.unwrap_or_default();
    log::warn!(
        "rebuilt after {} ms down: {present} of {total} pages here, {} client(s) taken back ({} lost), {} range(s) woken, {} fault(s) re-woken",
        restart.downtime_ms,
        restart.clients_adopted,
        restart.clients_lost,
        restart.ranges_woken,
        restart.faults_rewoken
    );
    if let Some(p) = &parking {
        p.record_restart(restart.clone());
    }
    crate::systemd::tell(&format!("READY=1\nSTATUS=restarted: {present} of {total} pages here"));
    Ok(Running { inc, h, _backends: backends, parking, restarts: restore.restarts, rebuilt: true })
}

fn run_to_end(o: &ServeOptions, run: Running) -> Result<()> {
    let Running { mut inc, mut h, _backends, parking, mut restarts, rebuilt } = run;
    let lazy = !inc.blocks().is_empty();
    log::info!("serving on {}", o.control.display());
    let start = Instant::now();
    let total = inc.blocks().total_pages();
    if !rebuilt {
        crate::systemd::tell(&format!("READY=1\nSTATUS={}", service_status(lazy, 0, total)));
    }
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
    if let Some(p) = &parking {
        p.finish();
    }
    restarts.extend(report.restart.clone());
    if let (true, Some(path)) = (done, &o.checksums) {
        let sums = block_checksums(inc.blocks())?;
        std::fs::write(path, serde_json::to_vec_pretty(&sums).unwrap_or_default())
            .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    }
    if let Some(path) = &o.summary_json {
        let summary =
            serde_json::json!({ "complete": done, "pages": total, "restarts": restarts, "report": report });
        std::fs::write(path, serde_json::to_vec_pretty(&summary).unwrap_or_default())
            .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    }
    println!("{}", postcopy_broker::stats::render(&report).trim_end());
    for (i, r) in restarts.iter().enumerate() {
        println!(
            "restart {}: down {} ms, {} pages rebuilt, {} clients taken back ({} lost), {} faults re-woken",
            i + 1,
            r.downtime_ms,
            r.pages_rebuilt,
            r.clients_adopted,
            r.clients_lost,
            r.faults_rewoken
        );
    }
    if lazy {
        println!("restore: {} pages in {:.2}s, complete: {done}", total, start.elapsed().as_secs_f64());
    }
    Ok(())
}
