//! Fairness case: a client's demand faults while another peer floods the control socket with
//! pipelined `status` requests (pcb-hostile flood, 64 in flight, reading every reply), against
//! the same run without the flood. The fault loop gives the flooding connection a bounded turn
//! after each round's faults, so the client's latency must stay near the quiet figure.
//!
//! What is measured is the broker's fairness, not the CPU scheduler's: the client has a CPU of its
//! own, the broker's fault loop and the flooding peer share the other one (the flood costs the
//! broker about 12 us of CPU per request, the flooder only reads the replies' headers). So the
//! client's faults compete only with the broker's work for the flood, in both runs. Blocking mode
//! compares with a broker that sleeps in epoll_wait between faults (and wakes up for each one),
//! busy-poll mode with one that is always awake, as a flooded broker is.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use crate::bench::demand::DemandFigures;
use crate::bench::peer::Peer;
use crate::bench::report::{Row, Target};
use crate::bench::sys;
use postcopy_broker::error::{Error, Result};
use postcopy_broker::fault::{Broker, BrokerConfig};
use postcopy_broker::incoming::Incoming;
use postcopy_broker::ram::{RamBlock, RamBlocks};
use postcopy_broker::source::MemorySource;

/// Requests the flooding peer keeps in flight.
pub const DEPTH: usize = 64;

/// A running pcb-hostile flood.
struct Flood {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Flood {
    fn start(exe: &Path, sock: &Path, cpu: usize) -> Result<Flood> {
        let mut child = Command::new(exe)
            .arg("--control")
            .arg(sock)
            .args(["flood", "--op", "status", "--depth", &DEPTH.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| {
                Error::io(format!("start {} (build it: cargo build --release)", exe.display()), e)
            })?;
        let out = child.stdout.take().ok_or_else(|| Error::Invalid("pcb-hostile: no stdout".into()))?;
        let mut f = Flood { child, out: BufReader::new(out) };
        sys::pin_pid(f.child.id(), &[cpu])?;
        let line = f.line()?;
        if line.get("flooding").is_none() {
            return Err(Error::Invalid(format!("pcb-hostile did not start flooding: {line}")));
        }
        Ok(f)
    }

    fn line(&mut self) -> Result<serde_json::Value> {
        let mut s = String::new();
        self.out.read_line(&mut s).map_err(|e| Error::io("read from pcb-hostile", e))?;
        serde_json::from_str(&s).map_err(|e| Error::Invalid(format!("pcb-hostile printed {s:?}: {e}")))
    }

    /// Stop the flood (close its stdin) and return how many requests were answered.
    fn stop(mut self) -> Result<u64> {
        drop(self.child.stdin.take());
        let r = self.line()?;
        let st = self.child.wait().map_err(|e| Error::io("wait for pcb-hostile", e))?;
        if !st.success() || r["wrong"] != 0 || r["sent"] != r["replies"] {
            return Err(Error::Invalid(format!("the flooding peer was not answered in full: {r} ({st})")));
        }
        r["replies"].as_u64().ok_or_else(|| Error::Invalid(format!("pcb-hostile printed {r}")))
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CPUs of the case: the client on the first, the broker and the flooding peer on the last.
pub fn cpus() -> (usize, usize) {
    (0, sys::online_cpus().saturating_sub(1))
}

/// One run: `pages` demand faults of a pcb-client, with a control socket, and while `hostile`
/// floods it if given. The caller pins the broker to [`cpus`]`.1`. Returns the client's figures
/// and the requests the flood got answered meanwhile.
pub fn run(
    client: &Path,
    hostile: Option<&Path>,
    pages: usize,
    busy_poll: bool,
) -> Result<(DemandFigures, u64)> {
    let (client_cpu, broker_cpu) = cpus();
    let n = pages * 4096;
    sys::warm_memory(2 * n)?;
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("ram", n as u64)?)?;
    let mut inc = Incoming::new(blocks);
    inc.advise()?;
    inc.listen()?;
    let sock = std::env::temp_dir().join(format!("pcb-bench-flood-{}.sock", std::process::id()));
    let config = BrokerConfig { control: Some(sock.clone()), busy_poll, ..Default::default() };
    let h = Broker::spawn(&inc, Box::new(MemorySource::new(vec![(vec![7u8; n], 4096)])), config)?;
    let b = inc.blocks().get(0).ok_or_else(|| Error::Invalid("no block".into()))?;
    let mut p = Peer::spawn(client, b, &format!("timed:0-{}", pages - 1), &[client_cpu])?;
    p.register(&h, "bench-flood")?;
    let flood = hostile.map(|exe| Flood::start(exe, &sock, broker_cpu)).transpose()?;
    p.go()?;
    let lines = p.finish()?;
    let answered = flood.map(Flood::stop).transpose()?.unwrap_or(0);
    h.stop()?;
    let t = lines
        .iter()
        .find_map(|l| l.get("timed"))
        .ok_or_else(|| Error::Invalid("the client printed no timed figures".into()))?;
    if t["checksum"].as_u64() != Some(7 * pages as u64) {
        return Err(Error::Invalid(format!("the client read wrong bytes: {t}")));
    }
    Ok((DemandFigures::from_json(t)?, answered))
}

/// The rows of the case: per mode (blocking, busy-poll) the client's mean, p50, p99 and max
/// access latency beside the flood, against the quiet run; and the flood's answered requests.
#[derive(Debug)]
pub struct FloodRows {
    modes: Vec<(bool, [Row; 4])>,
    answered: Row,
}

impl Default for FloodRows {
    fn default() -> Self {
        Self::new()
    }
}

impl FloodRows {
    /// Empty rows.
    pub fn new() -> FloodRows {
        let (client_cpu, broker_cpu) = cpus();
        let placement = format!("client cpu {client_cpu}, broker+flood cpu {broker_cpu}");
        let row = |what: &str, mode: &str, target| {
            Row::new(
                &format!("control socket flooded by a peer: demand {what} (ref: quiet)"),
                &placement,
                mode,
                target,
                2,
            )
            .with_reference()
        };
        let modes = [(false, "blocking"), (true, "busy-poll")]
            .map(|(busy, mode)| {
                (
                    busy,
                    [
                        row("us/fault", mode, Target::RatioAtMost(1.5)),
                        row("p50 us", mode, Target::None),
                        row("p99 us", mode, Target::None),
                        row("max us", mode, Target::None),
                    ],
                )
            })
            .to_vec();
        let answered = Row::new(
            &format!("control socket flooded by a peer: status requests answered ({DEPTH} in flight)"),
            &placement,
            "blocking",
            Target::None,
            0,
        );
        FloodRows { modes, answered }
    }

    /// One run of each mode, quiet then flooded, the broker pinned to its CPU.
    pub fn measure(&mut self, client: &Path, hostile: &Path, pages: usize) -> Result<()> {
        if !hostile.is_file() {
            return Err(Error::Invalid(format!(
                "flooding peer {} not found; build it with `cargo build --release` (or pass --hostile)",
                hostile.display()
            )));
        }
        let old = sys::pin(&[cpus().1])?;
        let r = self.measure_pinned(client, hostile, pages);
        sys::set_affinity(&old)?;
        r
    }

    fn measure_pinned(&mut self, client: &Path, hostile: &Path, pages: usize) -> Result<()> {
        for (busy_poll, rows) in &mut self.modes {
            let (quiet, _) = run(client, None, pages, *busy_poll)?;
            let (flooded, answered) = run(client, Some(hostile), pages, *busy_poll)?;
            let pairs = [
                (flooded.us_per_fault, quiet.us_per_fault),
                (flooded.p50, quiet.p50),
                (flooded.p99, quiet.p99),
                (flooded.max, quiet.max),
            ];
            for (row, (ours, reference)) in rows.iter_mut().zip(pairs) {
                row.ours.push(ours);
                if let Some(r) = row.reference.as_mut() {
                    r.push(reference);
                }
            }
            if !*busy_poll {
                self.answered.ours.push(answered as f64);
            }
        }
        Ok(())
    }

    /// The rows, in print order.
    pub fn rows(self) -> Vec<Row> {
        let mut out: Vec<Row> = self.modes.into_iter().flat_map(|(_, r)| r).collect();
        out.push(self.answered);
        out
    }
}
