//! `postcopy-broker serve --incoming`: receive a migration, then print the summary and optionally
//! write checksums and a JSON summary. (The rest of `serve` is in `crate::cli::serve`.)

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;

use crate::cli::source::warn_if_plaintext;
use postcopy_broker::error::{Error, IoContext, Result};
use postcopy_broker::fault::{BrokerConfig, ControlLimits};
use postcopy_broker::incoming::Incoming;
use postcopy_broker::migration::destination::{verify_report, Destination, DestinationOptions, Summary};
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
    /// Nice value of the stream thread (0: unchanged).
    pub stream_nice: i32,
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
/// and logging connections that fail their handshake), migrate, print the summary.
pub fn run(a: &IncomingOptions) -> Result<()> {
    let security = a.transport.security(Side::Destination)?;
    warn_if_plaintext(security.mode());
    let listener = TcpListener::bind(&a.addr).ctx(|| format!("listen on {}", a.addr))?;
    let local = listener.local_addr().ctx(|| "local address".into())?;
    println!("listening {local}");
    let _ = std::io::stdout().flush();
    // Ready for the source; the control socket opens once its Hello says what RAM comes.
    crate::systemd::tell(&format!("READY=1\nSTATUS=waiting for the migration source on {local}"));
    let broker = BrokerConfig {
        control: Some(a.control.clone()),
        control_fd: a.control_fd.clone(),
        allowed_uids: a.allowed_uids.clone(),
        grants: a.grants.iter().cloned().collect(),
        busy_poll: a.busy_poll,
        limits: a.limits,
        ..BrokerConfig::default()
    };
    let opts = DestinationOptions {
        broker,
        resume_timeout: a.resume_timeout,
        stream_nice: a.stream_nice,
        ..DestinationOptions::default()
    };
    log::info!("migration connections: {}", security.mode());
    let d = Destination::accept(&listener, &security, None, opts)?;
    crate::systemd::tell("STATUS=receiving the migration (postcopy)");
    let (summary, incoming) = d.run()?;
    crate::systemd::tell("STOPPING=1\nSTATUS=migration done");
    finish_outputs(a, &summary, &incoming)
}
