//! `postcopy-broker serve --incoming`: receive a migration, then print the summary and optionally
//! write checksums and a JSON summary. (The rest of `serve` is in `crate::cli::serve`.)
//!
//! Under a service manager with an fd store (`$NOTIFY_SOCKET`; systemd with
//! `FileDescriptorStoreMax=`, or `pcb-keeper`), everything a restart needs is parked there once
//! postcopy starts (`crate::cli::park`); a start that finds a parked record rebuilds the
//! migration from it and resumes the source instead of waiting for a new one.

use std::io::Write;
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;

use crate::cli::park::{self, Job, Parking, State, ALIVE_FD_NAME, LISTEN_FD_NAME};
use crate::fdstore::{FdStore, Parked};

use crate::cli::source::warn_if_plaintext;
use postcopy_broker::error::{Error, IoContext, Result};
use postcopy_broker::fault::{BrokerConfig, ControlLimits};
use postcopy_broker::incoming::Incoming;
use postcopy_broker::migration::destination::{
    block_fd_name, ledger_fd_name, verify_report, Destination, DestinationOptions, ParkedBlockFds, Summary,
    DIGESTS_FD_NAME,
};
use postcopy_broker::migration::transport::TransportOptions;
use postcopy_broker::migration::wire::Side;

/// What `postcopy-broker serve --incoming` needs.
#[derive(Debug, Clone)]
pub struct IncomingOptions {
    /// Address to listen on for the source (port 0: any free port).
    pub addr: String,
    /// The protection of the migration connections (`--tls-dir` or `--key`).
    pub transport: TransportOptions,
    /// Control socket for client processes.
    pub control: PathBuf,
    /// The control socket inherited by socket activation (then `control` only names it).
    pub control_fd: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// The other fds passed at start: what a broker that died parked (see `crate::cli::park`).
    pub parked: Arc<Parked>,
    /// Peer uids allowed on the control socket (empty: root and our own uid).
    pub allowed_uids: Vec<u32>,
    /// Blocks each non-root allowed uid may map.
    pub grants: Vec<(u32, Vec<String>)>,
    /// Busy-poll the fault loop.
    pub busy_poll: bool,
    /// Write RAM checksums here at the end.
    pub verify_file: Option<PathBuf>,
    /// Write the summary as JSON here.
    pub summary_json: Option<PathBuf>,
    /// How long to wait for the source to reconnect after a drop during postcopy.
    pub resume_timeout: std::time::Duration,
    /// Bound of the destination's own writes on every connection (`--write-timeout`).
    pub write_timeout: std::time::Duration,
    /// Priority of the stream threads (`--stream-nice`: fixed; default: follows demand).
    pub stream_nice: postcopy_broker::sched::StreamPriority,
    /// Background connections taken from the source, main included.
    pub max_streams: u16,
    /// What one control-socket peer may make the broker hold (as `serve`'s).
    pub limits: ControlLimits,
}

fn finish_outputs(a: &IncomingOptions, summary: &Summary, incoming: &Incoming) -> Result<()> {
    print!("{}", summary.render());
    let _ = std::io::stdout().flush();
    if let Some(p) = &a.verify_file {
        verify_report(incoming.blocks()).write(p)?;
    }
    if let Some(p) = &a.summary_json {
        let text = serde_json::to_string_pretty(summary)
            .map_err(|e| Error::Invalid(format!("cannot encode the summary: {e}")))?;
        std::fs::write(p, text).ctx(|| format!("write {}", p.display()))?;
    }
    Ok(())
}

/// Run `postcopy-broker serve --incoming`: print `listening ADDR`, accept the source (refusing
/// and logging connections that fail their handshake), migrate, print the summary. A start that
/// finds a parked session rebuilds it instead (see the module doc).
pub fn run(a: &IncomingOptions) -> Result<()> {
    let security = a.transport.security(Side::Destination)?;
    warn_if_plaintext(security.mode());
    let resumed = match park::take_state(&a.parked)? {
        Some((g, State { job: Job::Incoming { session }, clients })) => Some((g, session, clients)),
        Some((_, State { job, .. })) => {
            return Err(Error::Invalid(format!(
                "the fd store holds a parked `{}`, not a migration: start that command again to resume it (or empty the store)",
                job.command()
            )))
        }
        None => None,
    };
    let listener = match a.parked.take(LISTEN_FD_NAME) {
        Some(fd) => TcpListener::from(fd),
        None => TcpListener::bind(&a.addr).ctx(|| format!("listen on {}", a.addr))?,
    };
    let local = listener.local_addr().ctx(|| "local address".into())?;
    println!("listening {local}");
    let _ = std::io::stdout().flush();
    let store = park::fd_store();
    // Parking needs the control socket's fd: bind it here unless the service manager gave it.
    let (control_fd, _bound) = park::control_fd(&a.control_fd, store.is_some(), &a.control, &a.allowed_uids)?;
    // A fresh session parks from Listen on; a rebuilt one goes on with the parked state.
    let (parking, store) = match (store, resumed.is_some()) {
        (Some(s), false) => (Some(Parking::new(s)?), None),
        (s, _) => (None, s),
    };
    let broker = BrokerConfig {
        control: Some(a.control.clone()),
        control_fd: control_fd.clone(),
        allowed_uids: a.allowed_uids.clone(),
        grants: a.grants.iter().cloned().collect(),
        busy_poll: a.busy_poll,
        limits: a.limits,
        parking: parking.clone().map(|p| p as Arc<dyn postcopy_broker::fault::park::ClientParking>),
        ..BrokerConfig::default()
    };
    let opts = DestinationOptions {
        broker,
        resume_timeout: a.resume_timeout,
        write_timeout: a.write_timeout,
        stream_nice: a.stream_nice,
        max_streams: a.max_streams,
        ..DestinationOptions::default()
    };
    log::info!("migration connections: {}", security.mode());
    if let Some((generation, session, clients)) = resumed {
        return rebuild(a, &listener, &security, store, generation, (session, clients), opts);
    }
    a.parked.close_rest("no parked session uses it");
    // Ready for the source; the control socket opens once its Hello says what RAM comes.
    crate::systemd::tell(&format!("READY=1\nSTATUS=waiting for the migration source on {local}"));
    let mut d = Destination::accept(&listener, &security, None, opts)?;
    crate::systemd::tell("STATUS=receiving the migration (postcopy)");
    d.run_until_listening()?;
    if let (Some(p), Some(record)) = (&parking, d.record()) {
        let mut fds: Vec<(String, BorrowedFd<'_>)> = d.parkable();
        fds.push((LISTEN_FD_NAME.into(), listener.as_fd()));
        if let Some(c) = &control_fd {
            fds.push((crate::systemd::CONTROL_FD_NAME.into(), c.as_fd()));
        }
        match p.begin(Job::Incoming { session: record }, &fds) {
            Ok(()) => log::info!("postcopy: {} fds parked in the fd store for a restart", fds.len() + 1),
            Err(e) => log::error!("{e}; a restart of this broker could not resume the migration"),
        }
    }
    let (summary, incoming) = d.finish()?;
    if let Some(p) = &parking {
        p.finish();
    }
    crate::systemd::tell("STOPPING=1\nSTATUS=migration done");
    finish_outputs(a, &summary, &incoming)
}

/// A start that found a parked session: rebuild it, take the parked clients back, wait for the
/// source's resume and finish the migration.
fn rebuild(
    a: &IncomingOptions,
    listener: &TcpListener,
    security: &postcopy_broker::migration::transport::Security,
    store: Option<FdStore>,
    generation: u64,
    (session, clients): (
        postcopy_broker::migration::destination::SessionRecord,
        Vec<postcopy_broker::fault::park::ParkedClient>,
    ),
    mut opts: DestinationOptions,
) -> Result<()> {
    let names = a.parked.names();
    let blocks = (0..session.blocks.len())
        .map(|i| {
            let block = a.parked.take(&block_fd_name(i)).ok_or_else(|| {
                Error::Invalid(format!(
                    "the parked session lacks the fd of block #{i}; start a new migration"
                ))
            })?;
            Ok(ParkedBlockFds { block, ledger: a.parked.take(&ledger_fd_name(i)) })
        })
        .collect::<Result<Vec<_>>>()?;
    let digests = a.parked.take(DIGESTS_FD_NAME).ok_or_else(|| {
        Error::Invalid("the parked session lacks its digest table; start a new migration".into())
    })?;
    let alive = a.parked.take(ALIVE_FD_NAME);
    let last = alive.as_ref().and_then(park::last_alive);
    let mut all_names = names.clone();
    all_names.extend([LISTEN_FD_NAME.to_string(), crate::systemd::CONTROL_FD_NAME.to_string()]);
    let state = State { job: Job::Incoming { session: session.clone() }, clients: clients.clone() };
    let parking = park::parking_after_restart(store, alive, state, generation, all_names);
    opts.broker.parking = parking.clone().map(|p| p as Arc<dyn postcopy_broker::fault::park::ClientParking>);
    let before = session.restarts.clone();
    log::warn!(
        "restarting the migration of session {:016x} from {} after this broker's death ({} restart(s) before)",
        session.session_id,
        session.peer,
        before.len()
    );
    let (d, rebuilt) = Destination::rebuild(listener, security, &session, blocks, digests, last, opts)?;
    let h = d.broker().ok_or_else(|| Error::Invalid("the rebuilt session has no fault loop".into()))?;
    park::adopt_clients(h, &a.parked, clients, parking.as_deref());
    a.parked.close_rest("not part of the parked session");
    h.open_control()?;
    let restart = h.status()?.restart.unwrap_or_default();
    log::warn!(
        "rebuilt after {} ms down: {} of {} pages here, {} client(s) taken back ({} lost), {} range(s) woken, {} fault(s) re-woken; waiting for the source to resume",
        restart.downtime_ms,
        rebuilt.pages_rebuilt,
        rebuilt.total_pages,
        restart.clients_adopted,
        restart.clients_lost,
        restart.ranges_woken,
        restart.faults_rewoken
    );
    if let Some(p) = &parking {
        p.record_restart(restart.clone());
    }
    crate::systemd::tell(&format!(
        "READY=1\nSTATUS=restarted: {} of {} pages here; waiting for the source to resume",
        rebuilt.pages_rebuilt, rebuilt.total_pages
    ));
    let (mut summary, incoming) = d.finish()?;
    if let Some(p) = &parking {
        p.finish();
    }
    let mut restarts = before;
    restarts.append(&mut summary.restarts);
    summary.restarts = restarts;
    crate::systemd::tell("STOPPING=1\nSTATUS=migration done");
    finish_outputs(a, &summary, &incoming)
}
