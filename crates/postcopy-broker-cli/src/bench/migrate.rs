//! Migration cases over loopback TCP: the raw TCP throughput of this machine (measured in the
//! same run), a whole postcopy migration of a block with half zero pages, and demand faults of
//! a client process while the background stream saturates the connection versus while it idles;
//! each over a chosen [`Protection`] (plaintext, TLS, pre-shared key), to measure what the
//! protection costs, and with a chosen number of background streams, to show how it scales.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bench::demand::DemandFigures;
use crate::bench::peer::Peer;
use crate::bench::sys;
use postcopy_broker::error::{Error, IoContext, Result};
use postcopy_broker::migration::destination::{Destination, DestinationOptions, Progress};
use postcopy_broker::migration::source::{SourceBlock, SourceOptions, SourceRam, SourceSession};
use postcopy_broker::migration::transport::throwaway::ThrowawayCa;
use postcopy_broker::migration::transport::tls::TlsSetup;
use postcopy_broker::migration::transport::Security;
use postcopy_broker::sched::StreamPriority;

const KEY: [u8; 32] = [0x5a; 32];

/// The protection of a benchmark migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// `--insecure-plaintext`.
    Plaintext,
    /// Mutual TLS 1.3 (a throw-away CA).
    Tls,
    /// The pre-shared-key mode (Noise).
    Psk,
}

/// The source's and the destination's [`Security`] for `p`.
fn securities(p: Protection) -> Result<(Security, Security)> {
    Ok(match p {
        Protection::Plaintext => {
            (Security::insecure_plaintext(KEY.to_vec()), Security::insecure_plaintext(KEY.to_vec()))
        }
        Protection::Psk => (Security::psk(&KEY)?, Security::psk(&KEY)?),
        Protection::Tls => {
            let dir = std::env::temp_dir().join(format!("pcb-bench-tls-{}", std::process::id()));
            ThrowawayCa::new("postcopy-broker bench CA")?.write_dir(&dir, &["127.0.0.1"])?;
            let r = TlsSetup::source(&dir, None)
                .and_then(|s| Ok((Security::tls(s), Security::tls(TlsSetup::destination(&dir, None)?))));
            let _ = std::fs::remove_dir_all(&dir);
            r?
        }
    })
}

/// Bytes per second of one loopback TCP connection: a thread writes `bytes` in 1 MiB writes, this
/// thread reads them; timed from the first write to the last byte read.
pub fn tcp_throughput(bytes: usize) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0").ctx(|| "bind a loopback listener".into())?;
    let addr = l.local_addr().ctx(|| "listener address".into())?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        let buf = vec![0x5au8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len());
            s.write_all(&buf[..n])?;
            left -= n;
        }
        Ok(())
    });
    let (mut s, _) = l.accept().ctx(|| "accept the loopback connection".into())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    let mut t0 = None;
    while got < bytes {
        let n = s.read(&mut buf).ctx(|| "read loopback".into())?;
        if n == 0 {
            break;
        }
        t0.get_or_insert_with(Instant::now);
        got += n;
    }
    let secs = t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
    writer
        .join()
        .map_err(|_| Error::Invalid("loopback writer panicked".into()))?
        .ctx(|| "write loopback".into())?;
    if got < bytes || secs <= 0.0 {
        return Err(Error::Invalid(format!("loopback transfer ended after {got} of {bytes} bytes")));
    }
    Ok(got as f64 / secs)
}

/// Guest RAM of `size` bytes whose pages alternate in runs of 64: data, zero, data, zero...
pub fn half_zero(size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, page) in v.chunks_mut(4096).enumerate() {
        if (i / 64) % 2 == 1 {
            continue;
        }
        for w in page.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
    }
    v
}

/// Figures of one migration.
#[derive(Debug, Clone, Copy, Default)]
pub struct MigrationFigures {
    /// Seconds from the source's connect until every page is received at the destination.
    pub secs: f64,
    /// Non-zero bytes of the guest RAM.
    pub nonzero: u64,
}

/// A running migration of one block of `data` over loopback: the source in a thread, the
/// destination listening, the fault loop serving.
pub(crate) struct Running {
    pub(crate) dest: Destination,
    /// The source's thread; it returns the source's RAM, freed after the destination's end
    /// was timed (in one process, freeing 1 GiB takes the mm's lock that the destination's
    /// own teardown needs: two hosts do not share it).
    source: std::thread::JoinHandle<Result<Arc<SourceRam>>>,
    t0: Instant,
}

fn start(data: &[u8], bandwidth: u64, busy_poll: bool, protection: Protection) -> Result<Running> {
    start_with(data, bandwidth, busy_poll, protection, None, StreamPriority::default())
}

/// [`start`], with a precopy pass first when `dirty_after_precopy` is given: the pass sends every
/// page, then `[0, len)` is marked dirty (the guest wrote it meanwhile), so postcopy discards and
/// sends it again. `priority` is both background streams'.
pub(crate) fn start_with(
    data: &[u8],
    bandwidth: u64,
    busy_poll: bool,
    protection: Protection,
    dirty_after_precopy: Option<u64>,
    priority: StreamPriority,
) -> Result<Running> {
    start_streams(data, bandwidth, busy_poll, protection, dirty_after_precopy, None, priority)
}

/// [`start_with`] over `streams` background connections (None: the source's default).
fn start_streams(
    data: &[u8],
    bandwidth: u64,
    busy_poll: bool,
    protection: Protection,
    dirty_after_precopy: Option<u64>,
    streams: Option<u16>,
    priority: StreamPriority,
) -> Result<Running> {
    let (src_sec, dst_sec) = securities(protection)?;
    let ram = SourceRam::new(vec![SourceBlock::from_bytes("ram", 4096, data)?])?;
    let l = TcpListener::bind("127.0.0.1:0").ctx(|| "bind a loopback listener".into())?;
    let addr = l.local_addr().ctx(|| "listener address".into())?.to_string();
    let t0 = Instant::now();
    let source = std::thread::Builder::new()
        .name("bench-source".into())
        .spawn(move || -> Result<Arc<SourceRam>> {
            let mut opts = SourceOptions { bandwidth, background_nice: priority, ..Default::default() };
            if let Some(n) = streams {
                opts.streams = n;
            }
            let mut session = SourceSession::connect(&addr, &src_sec, ram, opts)?;
            let ram = session.shared_ram();
            if let Some(len) = dirty_after_precopy {
                session.precopy()?;
                session.mark_dirty("ram", 0, len)?;
            }
            session.postcopy().map(|_| ram)
        })
        .ctx(|| "spawn the source thread".into())?;
    let mut opts =
        DestinationOptions { progress: Progress::Off, stream_nice: priority, ..Default::default() };
    opts.max_streams = opts.max_streams.max(streams.unwrap_or(1));
    opts.broker.busy_poll = busy_poll;
    let mut dest = Destination::accept(&l, &dst_sec, None, opts)?;
    dest.run_until_listening()?;
    Ok(Running { dest, source, t0 })
}

impl Running {
    /// Wait until every page has arrived (or the migration failed).
    pub(crate) fn wait_all_received(&self) -> Result<()> {
        let blocks = self.dest.incoming().blocks();
        while !blocks.all_received() {
            if let Some(why) = self.dest.net().failure() {
                return Err(Error::Invalid(format!("benchmark migration failed: {why}")));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// Wait for every page; returns seconds since the source started connecting, and the
    /// destination's summary.
    pub(crate) fn finish(self) -> Result<(f64, postcopy_broker::migration::destination::Summary)> {
        self.finish_timed().map(|(secs, summary, _)| (secs, summary))
    }

    /// [`Running::finish`], and when the destination was done: its session finished and its
    /// RAM mappings torn down (the source's own teardown not included).
    pub(crate) fn finish_timed(
        self,
    ) -> Result<(f64, postcopy_broker::migration::destination::Summary, Instant)> {
        self.wait_all_received()?;
        let secs = self.t0.elapsed().as_secs_f64();
        let (summary, incoming) = self.dest.finish()?;
        drop(incoming);
        let done = Instant::now();
        let source_ram =
            self.source.join().map_err(|_| Error::Invalid("the source thread panicked".into()))??;
        drop(source_ram);
        Ok((secs, summary, done))
    }
}

/// Migrate `data` (one 4 KiB-page block) over loopback with no client.
pub fn migrate(data: &[u8], protection: Protection) -> Result<MigrationFigures> {
    migrate_streams(data, protection, None)
}

/// [`migrate`] over `streams` background connections (None: the source's default); the
/// destination takes as many as asked.
pub fn migrate_streams(
    data: &[u8],
    protection: Protection,
    streams: Option<u16>,
) -> Result<MigrationFigures> {
    sys::warm_memory(2 * data.len())?;
    let nonzero = data.chunks(4096).filter(|p| !postcopy_broker::source::is_zero(p)).count() as u64 * 4096;
    let (secs, _) =
        start_streams(data, 0, false, protection, None, streams, StreamPriority::default())?.finish()?;
    Ok(MigrationFigures { secs, nonzero })
}

/// Pages to fault on: `n` pages spread over the last half of a block of `pages`, in descending
/// order (the background stream runs upwards from page 0, so they are still missing).
pub fn fault_pages(pages: usize, n: usize) -> String {
    let half = pages / 2;
    let step = (half / n.max(1)).max(1);
    (0..n.min(half)).map(|i| (pages - 1 - i * step).to_string()).collect::<Vec<_>>().join(",")
}

/// A client process faults on `faults` pages of a migration of `data` whose background stream is
/// limited to `bandwidth` bytes/s (0: unlimited, it saturates the connection). Also returns
/// whether the stream was still running when the client finished (its faults overlapped it).
pub fn demand_during(
    client: &Path,
    cpus: &[usize],
    data: &[u8],
    faults: usize,
    bandwidth: u64,
    protection: Protection,
) -> Result<(DemandFigures, bool)> {
    sys::warm_memory(2 * data.len())?;
    let run = start(data, bandwidth, false, protection)?;
    let h = run.dest.broker().ok_or_else(|| Error::Invalid("no fault loop".into()))?;
    let b = run.dest.incoming().blocks().get(0).ok_or_else(|| Error::Invalid("no block".into()))?;
    let list = fault_pages(data.len() / 4096, faults);
    let mut p = Peer::spawn(client, b, &format!("timed:{list}"), cpus)?;
    p.register(h, "bench-migration-client")?;
    p.go()?;
    let lines = p.finish()?;
    let received_before_end = b.received().count_ones();
    let (_, summary) = run.finish()?;
    for c in &summary.clients {
        log::info!(
            "bench client {}: broker fault-to-wake p50 <{} us p99 <{} us max {:.0} us, {} of {} faults waited",
            c.name, c.p50_us, c.p99_us, c.max_us, c.waited, c.faults
        );
    }
    let t = lines
        .iter()
        .find_map(|l| l.get("timed"))
        .ok_or_else(|| Error::Invalid("the client printed no timed figures".into()))?;
    let overlapped = received_before_end < data.len() / 4096;
    Ok((DemandFigures::from_json(t)?, overlapped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_of_the_pages_are_zero() {
        let v = half_zero(256 * 4096);
        let zero = v.chunks(4096).filter(|p| postcopy_broker::source::is_zero(p)).count();
        assert_eq!(zero, 128);
    }

    #[test]
    fn fault_pages_lie_in_the_last_half_descending() {
        assert_eq!(fault_pages(100, 5), "99,89,79,69,59");
        assert_eq!(fault_pages(10, 50), "9,8,7,6,5");
    }
}
