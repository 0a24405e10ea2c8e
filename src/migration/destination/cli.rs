//! `postcopy-broker serve`: receive a migration (`--incoming`) or restore lazily from an image
//! (`--image`), then print the summary and optionally write checksums and a JSON summary.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;

use super::{verify_report, Destination, DestinationOptions, Progress, Restore, Summary};
use crate::error::{Error, IoContext, Result};
use crate::fault::BrokerConfig;
use crate::incoming::Incoming;
use crate::migration::auth::load_key;
use crate::migration::spec::parse_block;

/// Arguments of `postcopy-broker serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Receive a migration: listen on this address (port 0 picks a free port; the bound address
    /// is printed as the first stdout line, `listening ADDR`).
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "image", required_unless_present = "image")]
    pub incoming: Option<String>,
    /// Pre-shared key file for --incoming (hex or raw, at least 16 bytes, mode 0600).
    #[arg(long, value_name = "FILE", requires = "incoming")]
    pub key: Option<PathBuf>,
    /// Lazy restore from this image file (blocks back to back in --block order).
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// With --image: a RAM block NAME:SIZE[:4k|2m|1g] (repeat, in image order).
    #[arg(long = "block", value_name = "SPEC", requires = "image")]
    pub blocks: Vec<String>,
    /// Write the checksums of the RAM at the end to this JSON file.
    #[arg(long, value_name = "FILE")]
    pub verify_file: Option<PathBuf>,
    /// Write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
    /// Progress display: auto (a line on a terminal, log lines otherwise), log, off.
    #[arg(long, default_value = "auto", value_parser = ["auto", "log", "off"])]
    pub progress: String,
}

fn finish_outputs(a: &ServeArgs, summary: &Summary, incoming: &Incoming) -> Result<()> {
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

/// Run `postcopy-broker serve`.
pub fn run(a: &ServeArgs) -> Result<()> {
    let progress = match a.progress.as_str() {
        "log" => Progress::Log,
        "off" => Progress::Off,
        _ => Progress::Auto,
    };
    if let Some(image) = &a.image {
        if a.blocks.is_empty() {
            return Err(Error::Invalid("--image needs the block list: --block NAME:SIZE[:2m] ...".into()));
        }
        let infos = a.blocks.iter().map(|s| parse_block(s)).collect::<Result<Vec<_>>>()?;
        let r = Restore::start(image, infos, BrokerConfig::default(), progress)?;
        println!("restoring {}", image.display());
        let (summary, incoming) = r.finish()?;
        return finish_outputs(a, &summary, &incoming);
    }
    let addr = a
        .incoming
        .as_deref()
        .ok_or_else(|| Error::Invalid("give --incoming ADDR:PORT or --image FILE".into()))?;
    let key_path = a.key.as_ref().ok_or_else(|| Error::Invalid("--incoming needs --key FILE".into()))?;
    let key = load_key(key_path)?;
    let listener = TcpListener::bind(addr).ctx(|| format!("listen on {addr}"))?;
    let local = listener.local_addr().ctx(|| "local address".into())?;
    println!("listening {local}");
    let _ = std::io::stdout().flush();
    let opts = DestinationOptions { progress, ..DestinationOptions::default() };
    let d = Destination::accept(&listener, &key, None, opts).map_err(|e| match e {
        Error::Auth(e) => Error::Invalid(format!(
            "authentication of the source failed using key file {}: {e}",
            key_path.display()
        )),
        e => e,
    })?;
    let (summary, incoming) = d.run()?;
    finish_outputs(a, &summary, &incoming)
}
