//! `postcopy-broker source`: serve an image file's blocks to a destination.

use std::path::PathBuf;

use postcopy_broker::error::{Error, Result};
use postcopy_broker::migration::spec::{parse_block, parse_dirty, parse_size};
use postcopy_broker::migration::transport::{Mode, TransportOptions};
use postcopy_broker::migration::verify::{BlockChecksum, VerifyReport};
use postcopy_broker::migration::wire::Side;

use postcopy_broker::migration::source::control::SourceControl;
use postcopy_broker::migration::source::{SourceOptions, SourceRam, SourceSession};

/// Arguments of `postcopy-broker source`.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// Destination to connect to (its `serve --incoming` address).
    #[arg(long, value_name = "HOST:PORT")]
    pub connect: String,
    /// Mutual TLS 1.3 with the certificates of DIR: ca-cert.pem, client-cert.pem and
    /// client-key.pem (QEMU's tls-creds-x509 layout; the destination uses the same CA). See
    /// docs/security.md.
    #[arg(long, value_name = "DIR", conflicts_with = "key", required_unless_present = "key")]
    pub tls_dir: Option<PathBuf>,
    /// With --tls-dir: the name (DNS name or IP address) the destination's certificate must be
    /// valid for. Default: the host of --connect.
    #[arg(long, value_name = "NAME", requires = "tls_dir")]
    pub tls_peer_name: Option<String>,
    /// Pre-shared key file (hex or raw bytes, at least 16 bytes, mode 0600), the same as the
    /// destination's: both connections are authenticated and encrypted with it (Noise NNpsk0).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// With --key: authenticate with the key but send guest RAM unencrypted and without
    /// integrity protection, for a link you trust (the destination must say it too).
    #[arg(long, requires = "key")]
    pub insecure_plaintext: bool,
    /// Image file holding the blocks back to back, in --block order.
    #[arg(long, value_name = "FILE", required_unless_present = "control", requires = "blocks")]
    pub image: Option<PathBuf>,
    /// A RAM block: NAME:SIZE[:4k|2m|1g] (repeat, in image order), e.g. pc.ram:192M huge:64M:2m.
    #[arg(long = "block", value_name = "SPEC")]
    pub blocks: Vec<String>,
    /// Control socket (mode 0600) where the VMM hands over its RAM memfds (provide_blocks, when
    /// there is no --image), reports pages it dirtied after precopy (dirty), and says when the
    /// guest moves (start_postcopy). See docs/control-protocol.md.
    #[arg(long, value_name = "SOCKET")]
    pub control: Option<PathBuf>,
    /// Peer uid allowed on --control (repeatable; default: root and our own uid).
    #[arg(long = "allow-uid")]
    pub allow_uid: Vec<u32>,
    /// Send every page once before postcopy starts.
    #[arg(long)]
    pub precopy: bool,
    /// Pages dirtied after precopy (simulated: their bytes are inverted, then they are discarded
    /// on the destination and sent again): NAME:OFFSET+LEN[,NAME:OFFSET+LEN...].
    #[arg(long, value_name = "SPEC")]
    pub dirty: Option<String>,
    /// Pages to prefetch after each demanded page.
    #[arg(long, default_value_t = 0, value_name = "PAGES")]
    pub prefetch: u64,
    /// Background bandwidth limit per second, e.g. 200M (default: unlimited).
    #[arg(long, value_name = "BYTES")]
    pub bandwidth: Option<String>,
    /// If a connection fails during postcopy, keep reconnecting (with a backoff of 20 ms doubling
    /// up to 1 s) for this many seconds, then resume where the destination is.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub resume_timeout: f64,
    /// Drop a connection to the destination once nothing written to it has been taken for this
    /// many seconds (the destination or a middlebox stopped reading without closing, or the path
    /// is cut; TCP_USER_TIMEOUT): during postcopy the source then resumes as after any cut,
    /// before it the migration fails saying so. 0: no bound (TCP gives up by itself, minutes to
    /// hours later).
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub write_timeout: f64,
    /// Do not offer postcopy recovery: a connection failure during postcopy ends the migration.
    #[arg(long)]
    pub no_resume: bool,
    /// A fixed nice value (0-19) for the background stream, for the whole migration; 0 runs it
    /// at the process's priority. Without it the stream follows demand: nice 10 while no demand
    /// request comes (the urgent thread preempts it), the process's priority from a request
    /// until none came for 2 ms. Following needs CAP_SYS_NICE or RLIMIT_NICE; without either
    /// the stream runs at the process's priority, with a warning.
    #[arg(long, value_name = "NICE", value_parser = clap::value_parser!(i32).range(0..=19))]
    pub background_nice: Option<i32>,
    /// Background connections to the destination, main included, each with a sender thread of
    /// its own (the destination places each with a thread of its own); at most the
    /// destination's `--max-streams`. Default: 1.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=8))]
    pub streams: Option<u16>,
    /// Write the checksums of the final source RAM (after --dirty) to this JSON file.
    #[arg(long, value_name = "FILE")]
    pub verify_file: Option<PathBuf>,
    /// Write the session summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
}

impl SourceArgs {
    /// The protection options.
    pub fn transport(&self) -> TransportOptions {
        TransportOptions {
            tls_dir: self.tls_dir.clone(),
            tls_peer_name: self.tls_peer_name.clone(),
            key: self.key.clone(),
            insecure_plaintext: self.insecure_plaintext,
        }
    }
}

/// Log a loud warning when the migration runs without protection.
pub fn warn_if_plaintext(mode: Mode) {
    if mode == Mode::Plaintext {
        log::warn!(
            "--insecure-plaintext: guest RAM (and every secret in it) travels unencrypted and without integrity protection; anyone on the path can read and change it. Use --tls-dir or --key alone unless this link is trusted."
        );
    }
}

/// Run `postcopy-broker source`.
pub fn run(a: &SourceArgs) -> Result<()> {
    let transport = a.transport();
    let security = transport.security(Side::Source)?;
    warn_if_plaintext(security.mode());
    let mut control = match &a.control {
        Some(path) => Some(SourceControl::bind(path, a.allow_uid.clone())?),
        None => None,
    };
    let ram = match (&a.image, &mut control) {
        (Some(image), _) => {
            let infos = a.blocks.iter().map(|s| parse_block(s)).collect::<Result<Vec<_>>>()?;
            SourceRam::from_image(image, infos)?
        }
        (None, Some(c)) => {
            log::info!("waiting for the RAM blocks on {}", c.path().display());
            c.wait_blocks()?
        }
        (None, None) => return Err(Error::Invalid("give --image with --block specs, or --control".into())),
    };
    let dirty = a.dirty.as_deref().map(parse_dirty).transpose()?.unwrap_or_default();
    for d in &dirty {
        let b = ram.table().index_of(&d.block).and_then(|i| ram.table().get(i));
        let b = b.ok_or_else(|| Error::UnknownBlock(d.block.clone()))?;
        if d.offset.checked_add(d.len).is_none_or(|e| e > b.size) {
            return Err(Error::Invalid(format!(
                "dirty range {}:{:#x}+{:#x} is outside the block ({} bytes)",
                d.block, d.offset, d.len, b.size
            )));
        }
    }
    let opts = SourceOptions {
        prefetch_pages: a.prefetch,
        bandwidth: a.bandwidth.as_deref().map(parse_size).transpose()?.unwrap_or(0),
        resume: !a.no_resume,
        background_nice: postcopy_broker::sched::StreamPriority::from_nice(a.background_nice),
        streams: a.streams.unwrap_or_else(postcopy_broker::migration::source::default_streams),
        resume_timeout: std::time::Duration::try_from_secs_f64(a.resume_timeout).map_err(|_| {
            Error::Invalid(format!("--resume-timeout {} is not a duration in seconds", a.resume_timeout))
        })?,
        write_timeout: std::time::Duration::try_from_secs_f64(a.write_timeout).map_err(|_| {
            Error::Invalid(format!("--write-timeout {} is not a duration in seconds", a.write_timeout))
        })?,
        ..SourceOptions::default()
    };
    let mut s = SourceSession::connect(&a.connect, &security, ram, opts).map_err(|e| match e {
        Error::Auth(_) | Error::Transport(_) => Error::Invalid(format!(
            "the connection to the destination at {} failed ({} with {}): {e}",
            a.connect,
            security.mode(),
            match (&a.tls_dir, &a.key) {
                (Some(d), _) => format!("--tls-dir {}", d.display()),
                (None, Some(k)) => format!("key file {}", k.display()),
                (None, None) => "no credentials".into(),
            }
        )),
        e => e,
    })?;
    s.advise()?;
    if a.precopy {
        s.precopy()?;
    }
    for d in &dirty {
        let i = s.ram().table().index_of(&d.block).ok_or_else(|| Error::UnknownBlock(d.block.clone()))?;
        if let Some(b) = s.ram().block(i) {
            b.invert(d.offset, d.len);
        }
        s.mark_dirty(&d.block, d.offset, d.len)?;
    }
    if let Some(c) = &mut control {
        log::info!("precopy done; waiting for dirty ranges and start_postcopy on {}", c.path().display());
        c.until_postcopy(&mut s)?;
    }
    if let Some(path) = &a.verify_file {
        let blocks = s
            .ram()
            .blocks()
            .iter()
            .map(|b| BlockChecksum::of(&b.info().name, b.info().page_size, b.bytes(0, b.info().size)))
            .collect();
        VerifyReport { side: "source".into(), blocks }.write(path)?;
    }
    let summary = s.postcopy()?;
    if let Some(path) = &a.summary_json {
        let text = serde_json::to_string_pretty(&summary)
            .map_err(|e| Error::Invalid(format!("cannot encode the summary: {e}")))?;
        std::fs::write(path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    }
    Ok(())
}
