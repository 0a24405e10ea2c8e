//! Statistics: per-client fault counts and fault-to-wake latency histograms, broker-wide page
//! and wake counters, and the status report that `postcopy-broker status` shows.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Number of latency buckets: bucket i holds [2^i, 2^(i+1)) microseconds; the last is open.
pub const BUCKETS: usize = 26;

/// A log2 histogram of latencies in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Histogram {
    /// Counts per bucket.
    pub buckets: Vec<u64>,
    /// Number of samples.
    pub count: u64,
    /// Sum of samples in nanoseconds.
    pub sum_ns: u64,
    /// Largest sample in nanoseconds.
    pub max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { buckets: vec![0; BUCKETS], count: 0, sum_ns: 0, max_ns: 0 }
    }
}

impl Histogram {
    /// Record one latency.
    pub fn record(&mut self, ns: u64) {
        let us = ns / 1000;
        let i = if us == 0 { 0 } else { (63 - us.leading_zeros() as usize).min(BUCKETS - 1) };
        if let Some(b) = self.buckets.get_mut(i) {
            *b += 1;
        }
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Add another histogram into this one.
    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.count += o.count;
        self.sum_ns = self.sum_ns.saturating_add(o.sum_ns);
        self.max_ns = self.max_ns.max(o.max_ns);
    }

    /// The upper bound (µs) of the bucket holding quantile `q` (0..=1); 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        // A float's `as` saturates (NaN is 0): the target is 1..=count for q in 0..=1, and
        // anything past count just picks the last bucket.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= target {
                return 1u64 << (i + 1);
            }
        }
        1u64 << BUCKETS
    }

    /// Mean in microseconds.
    pub fn mean_us(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.count as f64 / 1000.0
        }
    }
}

/// Counters of one client.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientStats {
    /// Page-fault messages read.
    pub faults: u64,
    /// Faults that created a new page request.
    pub pages_requested: u64,
    /// Faults that joined a request already outstanding.
    pub joined: u64,
    /// Faults on pages already received (woken at once).
    pub already_there: u64,
    /// Faults outside the client's mapping table.
    pub unmapped_faults: u64,
    /// Faults on received pages whose backing had become a hole (filled with zeros, woken).
    #[serde(default)]
    pub holes_refilled: u64,
    /// Wake ioctls issued to this client.
    pub wakes: u64,
    /// Non-cooperative events read (fork, remap, remove, unmap).
    pub events: u64,
    /// Fault-to-wake latency.
    pub latency: Histogram,
    /// Sum of the time its faults were blocked while the broker knew of them, in ns.
    pub blocked_ns: u64,
}

/// One client in the status report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientStatus {
    /// Client id.
    pub id: crate::client_id::ClientId,
    /// Name (idstr).
    pub name: String,
    /// "shared" or "private".
    pub kind: String,
    /// Peer pid, if known.
    pub pid: Option<u32>,
    /// Mapped bytes.
    pub mapped_bytes: u64,
    /// Counters.
    pub stats: ClientStats,
    /// How a departed client left ("exited", "unregistered itself", "retired", "released with
    /// its parent"); none while it is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub departure: Option<String>,
    /// Whether the client's process still holds its own copy of its userfaultfd (it must, to
    /// survive the broker's death without an fd store; docs/control-protocol.md); none when
    /// that cannot be told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uffd_copy_held: Option<bool>,
}

/// Broker-wide counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BrokerStats {
    /// Pages placed because someone faulted on them.
    pub pages_demand: u64,
    /// Pages placed by background transfer.
    pub pages_background: u64,
    /// Of those, pages placed as zero.
    pub pages_zero: u64,
    /// UFFDIO_WAKE ioctls issued (after coalescing).
    pub wakes: u64,
    /// Page requests sent to the source.
    pub requests: u64,
    /// Faults read from all uffds.
    pub faults: u64,
    /// Clients registered so far.
    pub clients_registered: u64,
    /// Clients gone (exited, unregistered, failed).
    pub clients_gone: u64,
    /// Pages populated behind the broker's back (found on placement, or at a registration in
    /// pages the registering client does not map itself).
    pub foreign_pages: u64,
    /// Pages found populated in a registering client's ranges before its userfaultfd could
    /// catch them (mlock, MAP_POPULATE), dropped again; the client was refused.
    #[serde(default)]
    pub prefaulted_pages: u64,
    /// Faults on received pages whose backing had become a hole, filled with zeros.
    #[serde(default)]
    pub holes_refilled: u64,
    /// Control connections closed for protocol errors.
    pub control_errors: u64,
    /// Children of clients (FORK events) not adopted because the parent's peer was at a
    /// registration limit: their userfaultfds were closed.
    #[serde(default)]
    pub forks_refused: u64,
}

/// What `postcopy-broker status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// Postcopy state.
    pub state: String,
    /// Pages received / total.
    pub received_pages: u64,
    /// Total pages.
    pub total_pages: u64,
    /// Blocks: (name, size, page size, received pages).
    pub blocks: Vec<BlockStatus>,
    /// Outstanding page requests.
    pub outstanding: u64,
    /// Broker counters.
    pub broker: BrokerStats,
    /// Live clients.
    pub clients: Vec<ClientStatus>,
    /// Clients that are gone (exited, unregistered, failed), most recent last, at most 256.
    pub departed: Vec<ClientStatus>,
    /// Live clients left out of `clients` so that the report fits one control reply.
    #[serde(default)]
    pub clients_omitted: u64,
    /// Departed clients left out of `departed` (the oldest) so that the report fits.
    #[serde(default)]
    pub departed_omitted: u64,
    /// Outstanding requests with their waiters, oldest first, at most [`PENDING_LISTED`] (what a
    /// hung client waits for).
    #[serde(default)]
    pub pending: Vec<PendingRequest>,
    /// QEMU 10.1's postcopy metrics (`postcopy-blocktime`, ...), at the top level as in
    /// `query-migrate`.
    #[serde(flatten)]
    pub postcopy: crate::blocktime::PostcopyMetrics,
    /// The exact sums behind `postcopy`, per declared vCPU.
    #[serde(default)]
    pub blocktime: crate::blocktime::BlocktimeReport,
    /// Set in a broker restarted during postcopy: what it rebuilt (docs/recovery.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<Restart>,
}

/// What a restart rebuilt, for the status and the summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Restart {
    /// Milliseconds from the dead broker's last sign of life to the new one serving its clients.
    pub downtime_ms: u64,
    /// Pages found present in the parked blocks (the rebuilt received bitmap).
    pub pages_rebuilt: u64,
    /// Clients taken back from the parked fds.
    pub clients_adopted: u64,
    /// Parked clients that could not be taken back (their process is gone, or a bad record).
    pub clients_lost: u64,
    /// Client ranges woken after the adoption.
    pub ranges_woken: u64,
    /// Client threads that were blocked in a userfault when they were woken (faults the dead
    /// broker had read, or that queued while no broker ran).
    pub faults_rewoken: u64,
}

/// Most outstanding requests listed in [`StatusReport::pending`].
pub const PENDING_LISTED: usize = 256;

/// One outstanding page request in the status report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingRequest {
    /// Block name.
    pub block: String,
    /// Byte offset of the page in the block.
    pub offset: u64,
    /// The faults waiting for it (none when every waiter left; the page still comes).
    pub waiters: Vec<PendingWaiter>,
}

/// A fault waiting for an outstanding request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingWaiter {
    /// Client id.
    pub client: crate::client_id::ClientId,
    /// Page address in the client.
    pub addr: u64,
    /// How long it has waited, in milliseconds.
    pub waiting_ms: u64,
}

impl StatusReport {
    /// Live and departed clients together.
    pub fn all_clients(&self) -> impl Iterator<Item = &ClientStatus> {
        self.clients.iter().chain(self.departed.iter())
    }

    /// Shorten the report until its JSON takes at most `max` bytes, so that it always fits one
    /// control reply however many clients came and went: live clients are kept first (in order),
    /// then the most recently departed; the rest are counted in `clients_omitted` and
    /// `departed_omitted` (the broker-wide counters still cover them).
    pub fn fit(&mut self, max: usize) {
        if json_len(self) <= max {
            return;
        }
        let clients = std::mem::take(&mut self.clients);
        let departed = std::mem::take(&mut self.departed);
        // Count everything as omitted while measuring the rest, so the final counts (smaller
        // numbers) can only take fewer bytes.
        self.clients_omitted += clients.len() as u64;
        self.departed_omitted += departed.len() as u64;
        let mut room = max.saturating_sub(json_len(self));
        for c in clients {
            let n = json_len(&c) + 1;
            if n > room {
                break;
            }
            room -= n;
            self.clients.push(c);
            self.clients_omitted -= 1;
        }
        for d in departed.into_iter().rev() {
            let n = json_len(&d) + 1;
            if n > room {
                break;
            }
            room -= n;
            self.departed.push(d);
            self.departed_omitted -= 1;
        }
        self.departed.reverse();
    }
}

fn json_len<T: Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |b| b.len())
}

/// One block in the status report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockStatus {
    /// Name.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Page size.
    pub page_size: u64,
    /// Pages received.
    pub received: u64,
}

/// The status report as text.
pub fn render(r: &StatusReport) -> String {
    let mut s = String::new();
    let pct = if r.total_pages == 0 { 100.0 } else { r.received_pages as f64 * 100.0 / r.total_pages as f64 };
    let _ = writeln!(
        s,
        "state {}  received {}/{} pages ({pct:.1}%)  outstanding requests {}",
        r.state, r.received_pages, r.total_pages, r.outstanding
    );
    for b in &r.blocks {
        let _ = writeln!(
            s,
            "  block {:<16} {:>12} bytes  page {:>8}  received {}",
            b.name, b.size, b.page_size, b.received
        );
    }
    if let Some(x) = &r.restart {
        let _ = writeln!(
            s,
            "restarted after its own death: down {} ms, {} pages rebuilt from the page cache, {} clients taken back ({} lost), {} ranges woken, {} faults re-woken",
            x.downtime_ms, x.pages_rebuilt, x.clients_adopted, x.clients_lost, x.ranges_woken, x.faults_rewoken
        );
    }
    let g = &r.broker;
    let _ = writeln!(
        s,
        "pages: demand {} background {} zero {}  faults {}  requests {}  wakes {}  foreign {}",
        g.pages_demand, g.pages_background, g.pages_zero, g.faults, g.requests, g.wakes, g.foreign_pages
    );
    for p in r.pending.iter().take(8) {
        let ws: Vec<String> = p
            .waiters
            .iter()
            .map(|w| format!("#{} at {:#x} for {} ms", w.client, w.addr, w.waiting_ms))
            .collect();
        let _ = writeln!(s, "  waiting: block {} offset {:#x}: {}", p.block, p.offset, ws.join(", "));
    }
    let q = &r.postcopy;
    let _ = writeln!(
        s,
        "postcopy: {} remote faults, latency mean {:.1}us (non-vCPU {:.1}us), blocktime {} ms, per vCPU {:?} ms",
        r.blocktime.faults(),
        q.latency_ns as f64 / 1000.0,
        q.non_vcpu_latency_ns as f64 / 1000.0,
        q.blocktime_ms,
        q.vcpu_blocktime_ms
    );
    let _ = writeln!(
        s,
        "clients: {} registered, {} gone, {} forked children refused",
        g.clients_registered, g.clients_gone, g.forks_refused
    );
    for c in r.all_clients() {
        let l = &c.stats.latency;
        let _ = writeln!(
            s,
            "  #{}{} {:<20} {:<7} pid {:<8} faults {:>8} requested {:>8} wakes {:>8}  latency mean {:.1}us p50<{}us p99<{}us max {:.1}us",
            c.id,
            match (&c.departure, c.uffd_copy_held) {
                (Some(how), _) => format!(" ({how})"),
                (None, _) if r.departed.iter().any(|d| d.id == c.id) => " (gone)".into(),
                (None, Some(false)) => " (closed its own uffd copy!)".into(),
                (None, _) => String::new(),
            },
            c.name,
            c.kind,
            c.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            c.stats.faults,
            c.stats.pages_requested,
            c.stats.wakes,
            l.mean_us(),
            l.quantile_us(0.5),
            l.quantile_us(0.99),
            l.max_ns as f64 / 1000.0
        );
    }
    if r.clients_omitted + r.departed_omitted > 0 {
        let _ = writeln!(
            s,
            "  ({} live and {} departed clients not listed: the report must fit one reply)",
            r.clients_omitted, r.departed_omitted
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let mut h = Histogram::default();
        for ns in [500, 1_500, 3_000, 3_900, 1_000_000] {
            h.record(ns);
        }
        assert_eq!(h.count, 5);
        assert_eq!(h.buckets[0], 2, "0.5us and 1.5us");
        assert_eq!(h.buckets[1], 2, "3us and 3.9us");
        assert_eq!(h.buckets[9], 1, "1000us is in [512, 1024)");
        assert_eq!(h.quantile_us(0.5), 4);
        assert_eq!(h.quantile_us(1.0), 1024);
        assert_eq!(h.max_ns, 1_000_000);
        let mut m = Histogram::default();
        m.merge(&h);
        m.merge(&h);
        assert_eq!(m.count, 10);
        h.record(u64::MAX);
        assert_eq!(h.buckets[BUCKETS - 1], 1);
    }

    fn client(id: u64) -> ClientStatus {
        let mut stats = ClientStats::default();
        stats.latency.record(id * 1000);
        ClientStatus {
            id: crate::client_id::ClientId(id),
            name: format!("c{id}"),
            kind: "shared".into(),
            pid: Some(1),
            mapped_bytes: 1,
            stats,
            departure: None,
            uffd_copy_held: None,
        }
    }

    /// The status reply used to outgrow one frame after about 195 clients came and went, and then
    /// failed for good.
    #[test]
    fn a_report_fits_keeping_live_clients_then_the_newest_departed() {
        let mut r = StatusReport {
            clients: (1..=50).map(client).collect(),
            departed: (100..356).map(client).collect(),
            ..Default::default()
        };
        let full = r.clone();
        r.fit(usize::MAX);
        assert_eq!(r, full, "a report that fits is left alone");
        let one = json_len(&client(1));
        r.fit(60 * one);
        assert!(json_len(&r) <= 60 * one);
        assert_eq!(r.clients.len(), 50, "live clients first");
        assert_eq!(r.clients_omitted, 0);
        assert!(!r.departed.is_empty() && r.departed.len() < 20, "{}", r.departed.len());
        assert_eq!(r.departed.len() as u64 + r.departed_omitted, 256);
        assert_eq!(r.departed.last().unwrap().id.0, 355, "the newest departed are kept, in order");
        assert!(r.departed.windows(2).all(|w| w[0].id < w[1].id));
        let mut tiny = full.clone();
        tiny.fit(20 * one);
        assert!(json_len(&tiny) <= 20 * one);
        assert!(tiny.clients.len() < 20 && tiny.departed.is_empty());
        assert_eq!(tiny.clients_omitted, 50 - tiny.clients.len() as u64);
        assert_eq!(tiny.clients.first().unwrap().id.0, 1);
        assert!(render(&tiny).contains("not listed"));
    }
}
