//! The source side of one migration: connect both TCP connections to the destination, run
//! their transport handshakes (TLS or the pre-shared-key mode), Hello; then Advise, an optional precopy pass, dirty ranges as batched Discards,
//! Listen, Run, and the postcopy phase: the background stream on the main connection (and on
//! the extra `Stream` connections of `CAP_STREAMS`, one sender thread each, see
//! [`streams`](super::streams)) and demand requests answered on the urgent connection by their
//! own thread, then Complete on every extra stream, the digests of every page sent and Complete
//! on main, until the destination says Complete (confirmed with CompleteAck).
//!
//! If a connection fails during postcopy (and the destination accepted `CAP_RESUME`), the source
//! stops both threads and reconnects by itself, retrying with a bounded exponential backoff for
//! at most `resume_timeout` (but not when the destination refused it: another key or
//! certificate cannot start working); after the resume handshake it sends exactly the pages the
//! destination does not have (see [`handshake`](super::handshake)).

use crate::conv::usize_of;
use crate::migration::wire::wire_index;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::handshake::{is_fatal, unexpected, Links, Peer};
use super::ram::SourceRam;
use super::sender::{send_run, Kind, RateLimit, SourceCounts, SourceStats};
use super::streams::{start_of, Push};
use super::urgent::{serve_urgent, Hint};
use crate::error::{Error, IoContext, Result};
use crate::migration::discard::DiscardBatcher;
use crate::migration::transport::{Security, Transport, DEFAULT_HANDSHAKE_TIMEOUT};
use crate::migration::wire::{
    write_frame, Decoder, Frame, WireError, CAP_COMPLETE_ACK, CAP_DIGEST, CAP_DISCARD, CAP_RESUME,
    CAP_STREAMS, CAP_URGENT_CHANNEL, CAP_ZERO_RUN, DEFAULT_MAX_DISCARD_RANGES, DEFAULT_MAX_RUN,
};
use std::sync::atomic::AtomicBool;

/// First delay between reconnect attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// Longest delay between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Default of [`SourceOptions::resume_timeout`].
pub const DEFAULT_SOURCE_RESUME_TIMEOUT: Duration = Duration::from_secs(60);

/// Default of [`SourceOptions::streams`]: one background connection. More (`--streams N`)
/// measured 25-35% faster on a loaded 2-core machine; the default changes once a quiet
/// machine's benchmark (BENCHMARKS.md) confirms it.
pub fn default_streams() -> u16 {
    1
}

/// Settings of a source session.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Pages to send after each demanded page (on the urgent connection), if not sent yet.
    pub prefetch_pages: u64,
    /// Background bandwidth limit in bytes per second (0: unlimited).
    pub bandwidth: u64,
    /// Deadline of each connection's transport handshake.
    pub handshake_timeout: Duration,
    /// How long to keep retrying a refused TCP connect.
    pub connect_timeout: Duration,
    /// Ranges per Discard frame (at most the destination's limit, 256 by default).
    pub max_discard_ranges: usize,
    /// Offer zero runs (otherwise zero pages travel as data).
    pub zero_runs: bool,
    /// Offer postcopy recovery (`CAP_RESUME`).
    pub resume: bool,
    /// How long to keep trying to reconnect after a connection fails during postcopy.
    pub resume_timeout: Duration,
    /// Priority of the background stream: by default low while no demand request comes and
    /// full while they do, so the urgent thread preempts it while nobody waits and it ends the
    /// migration sooner while somebody does (see [`crate::sched`]).
    pub background_nice: crate::sched::StreamPriority,
    /// Background connections (and sender threads), main included: at least 1, at most what the
    /// destination takes (`CAP_STREAMS`; a destination without it gets 1).
    pub streams: u16,
    /// Bound of every write on every connection (`--write-timeout`, zero: none): a destination
    /// or middlebox that stops reading without closing cuts the connection after it, and the
    /// source resumes as after any cut (during postcopy) or fails saying so.
    pub write_timeout: Duration,
}

impl Default for SourceOptions {
    fn default() -> SourceOptions {
        SourceOptions {
            prefetch_pages: 0,
            bandwidth: 0,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: Duration::from_secs(10),
            max_discard_ranges: DEFAULT_MAX_DISCARD_RANGES,
            zero_runs: true,
            resume: true,
            resume_timeout: DEFAULT_SOURCE_RESUME_TIMEOUT,
            background_nice: crate::sched::StreamPriority::default(),
            streams: default_streams(),
            write_timeout: crate::migration::transport::DEFAULT_WRITE_TIMEOUT,
        }
    }
}

/// What a finished source session reports.
#[derive(Debug, Clone, Serialize)]
pub struct SourceSummary {
    /// Seconds from connect to the destination's Complete.
    pub total_secs: f64,
    /// Seconds from Listen to the destination's Complete.
    pub postcopy_secs: f64,
    /// Counters.
    pub counts: SourceCounts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Connected,
    Advised,
}

/// A connected, authenticated source session (see the module doc for the order of calls).
#[derive(Debug)]
pub struct SourceSession {
    ram: Arc<SourceRam>,
    main: Transport,
    urgent: Transport,
    /// The extra background connections (`CAP_STREAMS`).
    streams: Vec<Transport>,
    main_dec: Decoder,
    caps: u64,
    opts: SourceOptions,
    stats: Arc<SourceStats>,
    discards: Vec<DiscardBatcher>,
    phase: Phase,
    started: Instant,
    peer: Peer,
}

impl SourceSession {
    /// Connect to the destination at `addr`, protect both connections with `security`, and
    /// announce `ram`'s blocks (main connection, then urgent connection).
    pub fn connect(
        addr: &str,
        security: &Security,
        ram: SourceRam,
        opts: SourceOptions,
    ) -> Result<SourceSession> {
        let mut sid = [0u8; 8];
        getrandom::fill(&mut sid).map_err(|e| Error::Invalid(format!("no random session id: {e}")))?;
        let session_id = u64::from_le_bytes(sid);
        let mut caps = CAP_URGENT_CHANNEL | CAP_DISCARD | CAP_DIGEST | CAP_COMPLETE_ACK;
        if opts.zero_runs {
            caps |= CAP_ZERO_RUN;
        }
        if opts.resume {
            caps |= CAP_RESUME;
        }
        if opts.streams > 1 {
            caps |= CAP_STREAMS;
        }
        let peer = Peer {
            addr: addr.to_string(),
            security: security.clone(),
            session_id,
            caps,
            handshake_timeout: opts.handshake_timeout,
            streams: opts.streams.max(1),
            write_timeout: opts.write_timeout,
        };
        let Links { main, main_dec, urgent, streams, caps: accepted } =
            peer.open_all(&ram, false, opts.connect_timeout)?;
        log::info!(
            "connected to {addr} ({}): {} blocks, {} bytes, session {session_id:016x}, capabilities {accepted:#x}, {} background streams",
            main.mode(),
            ram.table().len(),
            ram.total_size(),
            streams.len() + 1
        );
        let discards = (0..wire_index(ram.table().len()))
            .map(|i| DiscardBatcher::for_block(ram.table(), i, opts.max_discard_ranges))
            .collect::<std::result::Result<Vec<_>, WireError>>()?;
        Ok(SourceSession {
            ram: Arc::new(ram),
            main,
            urgent,
            streams,
            main_dec,
            caps: accepted,
            opts,
            stats: Arc::new(SourceStats::default()),
            discards,
            phase: Phase::Connected,
            started: Instant::now(),
            peer,
        })
    }

    /// The RAM being served.
    pub fn ram(&self) -> &SourceRam {
        &self.ram
    }

    /// A handle on the RAM being served that outlives the session, for a caller that decides
    /// when it is freed (the benchmark, whose source and destination share one process: it
    /// frees the source's RAM only after timing the destination's end, as two hosts would).
    pub fn shared_ram(&self) -> Arc<SourceRam> {
        Arc::clone(&self.ram)
    }

    /// The counters so far.
    pub fn counts(&self) -> SourceCounts {
        self.stats.counts()
    }

    /// Postcopy advise: the destination discards its RAM and waits for pages.
    pub fn advise(&mut self) -> Result<()> {
        if self.phase < Phase::Advised {
            write_frame(&mut self.main, &Frame::Advise)?;
            self.phase = Phase::Advised;
        }
        Ok(())
    }

    /// Precopy pass: send every page once on the main connection (advises first if needed).
    pub fn precopy(&mut self) -> Result<()> {
        self.advise()?;
        let zero = self.caps & CAP_ZERO_RUN != 0;
        let mut limit = RateLimit::new(self.opts.bandwidth);
        for (i, b) in self.ram.blocks().iter().enumerate() {
            let size = b.info().size;
            let mut o = 0;
            while o < size {
                let n = u64::from(DEFAULT_MAX_RUN).max(b.info().page_size).min(size - o);
                let w = send_run(&mut self.main, wire_index(i), b, o, n, Kind::Precopy, zero, &self.stats)?;
                limit.pace(w);
                o += n;
            }
            b.sent().set_range(0, b.sent().len());
        }
        log::info!("precopy pass sent {} pages", self.stats.counts().precopy_pages);
        Ok(())
    }

    /// Report `[offset, offset + len)` of block `name` as changed since it was sent: it is
    /// discarded on the destination (batched per block) and sent again during postcopy. Only
    /// before [`postcopy`](SourceSession::postcopy).
    pub fn mark_dirty(&mut self, name: &str, offset: u64, len: u64) -> Result<()> {
        let i = self.ram.table().index_of(name).ok_or_else(|| Error::UnknownBlock(name.to_string()))?;
        self.mark_dirty_index(i, offset, len)
    }

    /// [`mark_dirty`](SourceSession::mark_dirty) by block index.
    pub fn mark_dirty_index(&mut self, block: u32, offset: u64, len: u64) -> Result<()> {
        let (Some(batcher), Some(b)) = (self.discards.get_mut(block as usize), self.ram.block(block)) else {
            return Err(Error::UnknownBlock(format!("#{block}")));
        };
        batcher.add(offset, len)?;
        if len > 0 {
            let ps = b.info().page_size;
            let first = offset / ps;
            let last = (offset + len).div_ceil(ps);
            b.sent().clear_range(usize_of(first), usize_of(last - first));
        }
        Ok(())
    }

    /// Send the Discards, Listen and Run, then serve postcopy until the destination has every
    /// page and says Complete.
    pub fn postcopy(mut self) -> Result<SourceSummary> {
        self.advise()?;
        let mut discarded = 0;
        for b in &mut self.discards {
            for f in b.finish() {
                if let Frame::Discard { block, ranges } = &f {
                    let ps = self.ram.block(*block).map_or(4096, |b| b.info().page_size);
                    discarded += ranges.iter().map(|r| r.len / ps).sum::<u64>();
                }
                write_frame(&mut self.main, &f)?;
            }
        }
        self.stats.discarded_pages.fetch_add(discarded, std::sync::atomic::Ordering::Relaxed);
        if discarded > 0 {
            log::info!("discarded {discarded} dirty pages on the destination");
        }
        write_frame(&mut self.main, &Frame::Listen)?;
        write_frame(&mut self.main, &Frame::Run)?;
        let postcopy_start = Instant::now();
        log::info!("postcopy: listen and run sent");

        loop {
            match self.serve() {
                Ok(()) => break,
                Err(e) if self.caps & CAP_RESUME != 0 && !is_fatal(&e) => self.reconnect(e)?,
                Err(e) => return Err(e),
            }
        }
        let s = SourceSummary {
            total_secs: self.started.elapsed().as_secs_f64(),
            postcopy_secs: postcopy_start.elapsed().as_secs_f64(),
            counts: self.stats.counts(),
        };
        log::info!(
            "migration complete in {:.2}s (postcopy {:.2}s): background {} demand {} prefetch {} zero {} pages, {} requests, {} bytes",
            s.total_secs, s.postcopy_secs, s.counts.background_pages, s.counts.demand_pages,
            s.counts.prefetch_pages, s.counts.zero_pages, s.counts.requests, s.counts.bytes
        );
        Ok(s)
    }

    /// One postcopy run over the current connections: the urgent thread and the background
    /// stream, until the destination's Complete or an error on either connection.
    fn serve(&mut self) -> Result<()> {
        let hint: Arc<Mutex<Option<Hint>>> = Arc::new(Mutex::new(None));
        let priority = crate::sched::DemandPriority::new(self.opts.background_nice, "background stream");
        let urgent = {
            let priority = Arc::clone(&priority);
            let (ram, stats, hint) = (Arc::clone(&self.ram), Arc::clone(&self.stats), Arc::clone(&hint));
            let stream = self.urgent.try_clone().ctx(|| "clone the urgent connection".into())?;
            let main = self.main.try_clone().ctx(|| "clone the main connection".into())?;
            let zero = self.caps & CAP_ZERO_RUN != 0;
            let prefetch = self.opts.prefetch_pages;
            thread::Builder::new()
                .name("source-urgent".into())
                .spawn(move || {
                    let r = serve_urgent(stream, &ram, &stats, &hint, &priority, zero, prefetch);
                    if r.is_err() {
                        // The background stream must notice too (a resume restarts both).
                        let _ = main.shutdown(std::net::Shutdown::Both);
                    }
                    r
                })
                .ctx(|| "spawn the urgent thread".into())?
        };
        let r = self.background(&hint, &priority);
        // Whatever happened, the urgent thread must end: shut its connection down.
        let _ = self.urgent.shutdown(std::net::Shutdown::Both);
        let u = urgent.join().map_err(|_| Error::Invalid("the urgent thread panicked".into()))?;
        match (r, u) {
            (Ok(()), Err(e)) => {
                log::debug!("urgent connection ended: {e}");
                Ok(())
            }
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), Ok(())) => Err(e),
            (Err(e), Err(u)) => Err(Error::Invalid(format!("{e} (urgent connection: {u})"))),
        }
    }

    /// A connection failed during postcopy: reconnect and resume, retrying with a bounded
    /// backoff for at most `resume_timeout`.
    fn reconnect(&mut self, why: Error) -> Result<()> {
        let _ = self.main.shutdown(std::net::Shutdown::Both);
        for s in &self.streams {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        log::warn!("connection to the destination lost during postcopy: {why}; reconnecting");
        let start = Instant::now();
        let mut delay = FIRST_BACKOFF;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.peer.resume(&self.ram) {
                Ok((links, missing)) => {
                    self.main = links.main;
                    self.main_dec = links.main_dec;
                    self.urgent = links.urgent;
                    self.streams = links.streams;
                    self.stats.resumes.fetch_add(1, Ordering::Relaxed);
                    log::info!(
                        "resumed after {attempts} attempt(s) with {} background streams: {missing} pages to send again",
                        self.streams.len() + 1
                    );
                    return Ok(());
                }
                Err(e) => {
                    let fatal = is_fatal(&e);
                    if fatal || start.elapsed() + delay > self.opts.resume_timeout {
                        return Err(Error::Invalid(format!(
                            "the connection to the destination at {} failed during postcopy ({why}) and resuming failed after {attempts} attempt(s) in {:.1}s: {e}",
                            self.peer.addr,
                            start.elapsed().as_secs_f64()
                        )));
                    }
                    log::info!("resume attempt {attempts} failed: {e}; retrying in {delay:?}");
                    thread::sleep(delay);
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// The background stream: every page not sent yet, in runs of up to 2 MiB, on main (near
    /// the last demanded address) and on every extra stream, each by a thread of its own; then
    /// Complete on the extra streams, the digests and Complete on main, then wait for the
    /// destination's Complete.
    fn background(
        &mut self,
        hint: &Mutex<Option<Hint>>,
        priority: &Arc<crate::sched::DemandPriority>,
    ) -> Result<()> {
        // Threads of their own, so their lower priority never sticks to the caller's thread (or
        // to an urgent thread spawned from it after a resume).
        let mut extras = std::mem::take(&mut self.streams);
        let n = extras.len() + 1;
        let abort = AtomicBool::new(false);
        let push = Push {
            ram: &self.ram,
            stats: &self.stats,
            zero: self.caps & CAP_ZERO_RUN != 0,
            bandwidth: if self.opts.bandwidth == 0 { 0 } else { (self.opts.bandwidth / n as u64).max(1) },
            abort: &abort,
            priority,
        };
        let handles: Vec<Transport> = extras
            .iter()
            .map(|s| s.try_clone().ctx(|| "clone a stream connection".into()))
            .collect::<Result<_>>()?;
        let main_handle = self.main.try_clone().ctx(|| "clone the main connection".into())?;
        let main = &mut self.main;
        let r = std::thread::scope(|s| -> Result<()> {
            let mut threads = Vec::with_capacity(extras.len());
            for (j, conn) in extras.iter_mut().enumerate() {
                let (push, abort, main_handle) = (&push, &abort, &main_handle);
                let t = thread::Builder::new()
                    .name(format!("source-stream-{}", j + 1))
                    .spawn_scoped(s, move || {
                        let _priority = priority.enter();
                        let t0 = Instant::now();
                        let r = push.run(conn, start_of(push.ram, j + 1, n), None).and_then(|()| {
                            write_frame(conn, &Frame::Complete)?;
                            conn.flush().ctx(|| "flush a stream connection".into())
                        });
                        log::info!(
                            "background stream {}: {:.3} s, {:.3} s of CPU",
                            j + 1,
                            t0.elapsed().as_secs_f64(),
                            crate::sched::thread_cpu_secs()
                        );
                        if r.is_err() {
                            // The others stop early, main's read of Complete fails: a resume.
                            abort.store(true, Ordering::Relaxed);
                            let _ = main_handle.shutdown(std::net::Shutdown::Both);
                        }
                        r
                    })
                    .ctx(|| "spawn a background stream thread".into())?;
                threads.push(t);
            }
            let t = thread::Builder::new()
                .name("source-background".into())
                .spawn_scoped(s, || {
                    let _priority = priority.enter();
                    let t0 = Instant::now();
                    let r = push.run(main, start_of(push.ram, 0, n), Some(hint));
                    log::info!(
                        "background stream: {:.3} s, {:.3} s of CPU",
                        t0.elapsed().as_secs_f64(),
                        crate::sched::thread_cpu_secs()
                    );
                    if r.is_err() {
                        abort.store(true, Ordering::Relaxed);
                        for h in &handles {
                            let _ = h.shutdown(std::net::Shutdown::Both);
                        }
                    }
                    r
                })
                .ctx(|| "spawn the background stream thread".into())?;
            let mut r =
                t.join().map_err(|_| Error::Invalid("the background stream thread panicked".into()))?;
            for t in threads {
                let e = t.join().map_err(|_| Error::Invalid("a background stream thread panicked".into()))?;
                r = r.and(e);
            }
            r
        });
        self.streams = extras;
        r?;
        self.finish_stream()
    }

    /// Tell the destination that its Complete arrived, so it need not wait for a resume of
    /// the session (`CAP_COMPLETE_ACK`). Best effort: the migration is complete on both sides
    /// whether or not the confirmation gets through (a destination without it lingers, then
    /// ends successfully too).
    fn confirm_complete(&mut self) {
        if self.caps & CAP_COMPLETE_ACK == 0 {
            return;
        }
        let r = write_frame(&mut self.main, &Frame::CompleteAck)
            .map_err(Error::from)
            .and_then(|()| self.main.flush().ctx(|| "flush the main connection".into()));
        if let Err(e) = r {
            log::warn!("the destination's Complete arrived but confirming it failed ({e}); the destination ends on its own after its linger period");
        }
    }

    /// After the last page of every background connection: the digests and Complete on main,
    /// and the destination's Complete.
    fn finish_stream(&mut self) -> Result<()> {
        if crate::failpoint::once("source-cut-before-complete") {
            let _ = self.main.shutdown(std::net::Shutdown::Both);
            return Err(Error::Invalid("failpoint: the connection is cut before Complete".into()));
        }
        if self.caps & CAP_DIGEST != 0 {
            write_frame(&mut self.main, &Frame::Digests { digests: self.ram.digests() })?;
        }
        write_frame(&mut self.main, &Frame::Complete)?;
        self.main.flush().ctx(|| "flush the main connection".into())?;
        log::info!("every page sent; waiting for the destination to place them");
        match self.main_dec.read_frame(&mut self.main) {
            Ok(Frame::Complete) if crate::failpoint::once("source-miss-complete") => {
                let _ = self.main.shutdown(std::net::Shutdown::Both);
                Err(Error::Invalid("failpoint: the destination's Complete is lost".into()))
            }
            Ok(Frame::Complete) => {
                self.confirm_complete();
                Ok(())
            }
            Ok(f) => Err(unexpected("Complete", &f)),
            Err(WireError::Closed) => Err(Error::Invalid(
                "the destination closed the connection before it confirmed every page (see its log)".into(),
            )),
            Err(e) => Err(e.into()),
        }
    }
}
