//! Postcopy blocktime and remote fault latency, with QEMU 10.1's meanings (`query-migrate`'s
//! `postcopy-*` members, qapi/migration.json): how long each thread waited in a fault on a page
//! that had not arrived, per vCPU thread a control client declared, and the time during which
//! every declared vCPU waited at once.
//!
//! A fault is *remote* when it joined a page request (the page had not arrived); faults on pages
//! already there are not counted, as in QEMU. A fault is a vCPU's when its thread id (the
//! uffd message's `ptid`, which the kernel fills only with UFFD_FEATURE_THREAD_ID) is one its
//! client declared at registration; every other remote fault (thread id 0 from a userfaultfd
//! without THREAD_ID, device or vhost-user threads, the broker's own mapping) is a non-vCPU
//! fault, counted in the latency but in no blocktime.
//!
//! A vCPU is blocked from its first outstanding fault until its last outstanding one is resolved
//! (a thread can have more than one: a fault read again before the first was answered). The
//! system blocktime (QEMU's `postcopy-blocktime`) grows while every live declared vCPU is blocked:
//! from the moment the last of them blocked until one of them is released. Faults whose thread
//! was woken without its page (its mapping moved, its client left) release their vCPU but give
//! no latency sample. Only finished waits are counted: a wait still going on shows up when it ends.

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::client_id::ClientId;
use crate::conv::nanos;

/// Buckets of the latency distribution: bucket N holds waits of [2^N, 2^(N+1)) µs (bucket 0 also
/// those under 1 µs); the last one, [2^23 µs, ∞), everything longer (QEMU: 24 buckets).
pub const LATENCY_BUCKETS: usize = 24;

/// Most vCPU threads one registration may declare (what a peer can make the broker hold).
pub const MAX_VCPUS: usize = 1024;

/// Check a registration's declared vCPU threads: at most [`MAX_VCPUS`], and only with a
/// userfaultfd whose messages carry thread ids (UFFD_FEATURE_THREAD_ID), else no fault could
/// ever be attributed to them.
pub fn check_vcpus(tids: &[u32], uffd: std::os::fd::RawFd) -> crate::Result<()> {
    if tids.is_empty() {
        return Ok(());
    }
    if tids.len() > MAX_VCPUS {
        return Err(crate::Error::Invalid(format!(
            "'vcpu_tids' lists {} threads; at most {MAX_VCPUS} per registration",
            tids.len()
        )));
    }
    let features = crate::uffd::features_of(uffd)
        .map_err(|e| crate::Error::Invalid(format!("cannot read the userfaultfd's features: {e}")))?;
    if features & crate::uffd::feature::THREAD_ID == 0 {
        return Err(crate::Error::Invalid(
            "'vcpu_tids' needs a userfaultfd opened with UFFD_FEATURE_THREAD_ID (ask for it in \
             UFFDIO_API): without it faults carry no thread id"
                .into(),
        ));
    }
    Ok(())
}

/// One vCPU thread a client declared.
#[derive(Debug, Clone)]
struct Vcpu {
    client: ClientId,
    tid: u32,
    /// Its client is registered (a departed client's vCPUs keep their sums but block nothing).
    live: bool,
    /// Its faults not yet resolved.
    current: u32,
    /// When `current` went from 0 to 1.
    since: Option<Instant>,
    faults: u64,
    latency_ns: u64,
    blocked_ns: u64,
}

/// One outstanding remote fault.
#[derive(Debug, Clone, Copy)]
struct Wait {
    vcpu: Option<usize>,
    since: Instant,
}

/// The blocktime bookkeeping of the fault loop (owned by its thread).
#[derive(Debug, Default)]
pub struct Blocktime {
    vcpus: Vec<Vcpu>,
    by_tid: HashMap<(ClientId, u32), usize>,
    /// Outstanding remote faults by (client, page address in the client).
    waits: HashMap<(ClientId, u64), Vec<Wait>>,
    /// Live declared vCPUs, and how many of them are blocked now.
    live: usize,
    down: usize,
    /// When the last live vCPU blocked, while all are.
    all_since: Option<Instant>,
    all_blocked_ns: u64,
    buckets: [u64; LATENCY_BUCKETS],
    non_vcpu_faults: u64,
    non_vcpu_latency_ns: u64,
}

impl Blocktime {
    /// `client`'s threads `tids` are vCPUs (in this order; repeated ids count once).
    pub fn declare(&mut self, client: ClientId, tids: &[u32]) {
        for &tid in tids {
            if tid == 0 || self.by_tid.contains_key(&(client, tid)) {
                continue;
            }
            self.by_tid.insert((client, tid), self.vcpus.len());
            self.vcpus.push(Vcpu {
                client,
                tid,
                live: true,
                current: 0,
                since: None,
                faults: 0,
                latency_ns: 0,
                blocked_ns: 0,
            });
            self.live += 1;
        }
        self.check_all_blocked(Instant::now());
    }

    /// Thread `tid` of `client` waits for the page at `addr` (page aligned) since `now`.
    pub fn begin(&mut self, client: ClientId, tid: u32, addr: u64, now: Instant) {
        let vcpu = if tid == 0 { None } else { self.by_tid.get(&(client, tid)).copied() };
        if let Some(v) = vcpu.and_then(|i| self.vcpus.get_mut(i)) {
            v.current += 1;
            if v.current == 1 {
                v.since = Some(now);
                if v.live {
                    self.down += 1;
                    self.check_all_blocked(now);
                }
            }
        }
        self.waits.entry((client, addr)).or_default().push(Wait { vcpu, since: now });
    }

    /// The page at `addr` of `client` arrived at `now`: every thread waiting there is released.
    pub fn resolve(&mut self, client: ClientId, addr: u64, now: Instant) {
        if let Some(ws) = self.waits.remove(&(client, addr)) {
            for w in ws {
                self.finish(w, now, true);
            }
        }
    }

    /// The threads of `client` waiting in `[start, end)` were woken without their page (the
    /// range moved or went away): they are released, with no latency sample.
    pub fn abandon_range(&mut self, client: ClientId, start: u64, end: u64, now: Instant) {
        self.abandon(|c, a| c == client && (start..end).contains(&a), now);
    }

    /// `client` is gone: its waits end without a sample and its vCPUs no longer count.
    pub fn drop_client(&mut self, client: ClientId, now: Instant) {
        self.abandon(|c, _| c == client, now);
        let mut gone = 0;
        for v in self.vcpus.iter_mut().filter(|v| v.client == client && v.live) {
            v.live = false;
            gone += 1;
        }
        self.live -= gone;
        self.check_all_blocked(now);
    }

    fn abandon(&mut self, which: impl Fn(ClientId, u64) -> bool, now: Instant) {
        if self.waits.is_empty() {
            return;
        }
        let keys: Vec<(ClientId, u64)> = self.waits.keys().copied().filter(|&(c, a)| which(c, a)).collect();
        for k in keys {
            for w in self.waits.remove(&k).unwrap_or_default() {
                self.finish(w, now, false);
            }
        }
    }

    fn finish(&mut self, w: Wait, now: Instant, sample: bool) {
        let ns = nanos(now.saturating_duration_since(w.since));
        if sample {
            let us = ns / 1000;
            let i = if us == 0 { 0 } else { us.ilog2() as usize };
            if let Some(b) = self.buckets.get_mut(i.min(LATENCY_BUCKETS - 1)) {
                *b += 1;
            }
        }
        let Some(i) = w.vcpu else {
            if sample {
                self.non_vcpu_faults += 1;
                self.non_vcpu_latency_ns = self.non_vcpu_latency_ns.saturating_add(ns);
            }
            return;
        };
        let (all_blocked, live) = (self.live > 0 && self.down == self.live, self.live);
        let Some(v) = self.vcpus.get_mut(i) else { return };
        if sample {
            v.faults += 1;
            v.latency_ns = v.latency_ns.saturating_add(ns);
        }
        v.current = v.current.saturating_sub(1);
        if v.current > 0 {
            return;
        }
        if let Some(s) = v.since.take() {
            v.blocked_ns = v.blocked_ns.saturating_add(nanos(now.saturating_duration_since(s)));
        }
        if v.live && live > 0 {
            if all_blocked {
                if let Some(s) = self.all_since.take() {
                    self.all_blocked_ns =
                        self.all_blocked_ns.saturating_add(nanos(now.saturating_duration_since(s)));
                }
            }
            self.down = self.down.saturating_sub(1);
        }
    }

    /// Start the system blocktime if every live vCPU is blocked now.
    fn check_all_blocked(&mut self, now: Instant) {
        if self.live > 0 && self.down == self.live && self.all_since.is_none() {
            self.all_since = Some(now);
        } else if self.down < self.live {
            self.all_since = None;
        }
    }

    /// The finished waits so far, as the status report carries them.
    pub fn report(&self) -> BlocktimeReport {
        let vcpus: Vec<VcpuBlocktime> = self
            .vcpus
            .iter()
            .map(|v| VcpuBlocktime {
                client: v.client,
                tid: v.tid,
                faults: v.faults,
                latency_ns: v.latency_ns,
                blocked_ns: v.blocked_ns,
            })
            .collect();
        BlocktimeReport {
            vcpus,
            all_vcpus_blocked_ns: self.all_blocked_ns,
            non_vcpu_faults: self.non_vcpu_faults,
            non_vcpu_latency_ns: self.non_vcpu_latency_ns,
            latency_dist: self.buckets.to_vec(),
        }
    }
}

/// One declared vCPU in the status report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VcpuBlocktime {
    /// The client that declared it.
    pub client: ClientId,
    /// Its thread id (in the client's pid namespace).
    pub tid: u32,
    /// Its remote faults that were resolved.
    pub faults: u64,
    /// Sum of their latencies, in ns.
    pub latency_ns: u64,
    /// Time it was blocked in remote faults, in ns (overlapping faults of the thread count once).
    pub blocked_ns: u64,
}

/// The exact sums behind the QEMU-named metrics ([`PostcopyMetrics`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlocktimeReport {
    /// Declared vCPUs, in declaration order (clients by registration); index = vCPU number.
    pub vcpus: Vec<VcpuBlocktime>,
    /// Time during which every live declared vCPU was blocked at once, in ns.
    pub all_vcpus_blocked_ns: u64,
    /// Resolved remote faults of other threads.
    pub non_vcpu_faults: u64,
    /// Sum of their latencies, in ns.
    pub non_vcpu_latency_ns: u64,
    /// Resolved remote faults per latency bucket (see [`LATENCY_BUCKETS`]), vCPU or not.
    pub latency_dist: Vec<u64>,
}

impl BlocktimeReport {
    /// Resolved remote faults, vCPU or not.
    pub fn faults(&self) -> u64 {
        self.non_vcpu_faults + self.vcpus.iter().map(|v| v.faults).sum::<u64>()
    }

    /// Sum of their latencies, in ns.
    pub fn latency_ns(&self) -> u64 {
        self.vcpus.iter().fold(self.non_vcpu_latency_ns, |s, v| s.saturating_add(v.latency_ns))
    }

    /// QEMU's names, units and meanings.
    pub fn qemu(&self) -> PostcopyMetrics {
        let mean = |sum: u64, n: u64| sum.checked_div(n).unwrap_or(0);
        PostcopyMetrics {
            blocktime_ms: self.all_vcpus_blocked_ns / 1_000_000,
            vcpu_blocktime_ms: self.vcpus.iter().map(|v| v.blocked_ns / 1_000_000).collect(),
            latency_ns: mean(self.latency_ns(), self.faults()),
            latency_dist: self.latency_dist.clone(),
            vcpu_latency_ns: self.vcpus.iter().map(|v| mean(v.latency_ns, v.faults)).collect(),
            non_vcpu_latency_ns: mean(self.non_vcpu_latency_ns, self.non_vcpu_faults),
        }
    }
}

/// QEMU 10.1's postcopy members of `query-migrate`, with its names and units.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PostcopyMetrics {
    /// Time during which all vCPUs were blocked at once, in ms.
    #[serde(rename = "postcopy-blocktime", default)]
    pub blocktime_ms: u64,
    /// Per vCPU: time it was blocked in remote faults, in ms.
    #[serde(rename = "postcopy-vcpu-blocktime", default)]
    pub vcpu_blocktime_ms: Vec<u64>,
    /// Mean latency of the remote faults of every thread, in ns.
    #[serde(rename = "postcopy-latency", default)]
    pub latency_ns: u64,
    /// Remote faults per bucket N of [2^N, 2^(N+1)) µs.
    #[serde(rename = "postcopy-latency-dist", default)]
    pub latency_dist: Vec<u64>,
    /// Per vCPU: mean latency of its remote faults, in ns.
    #[serde(rename = "postcopy-vcpu-latency", default)]
    pub vcpu_latency_ns: Vec<u64>,
    /// Mean latency of the remote faults of non-vCPU threads, in ns.
    #[serde(rename = "postcopy-non-vcpu-latency", default)]
    pub non_vcpu_latency_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const C: ClientId = ClientId(1);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// QEMU's picture: two vCPUs; the overlap of their waits is the system blocktime.
    #[test]
    fn overlap_of_all_vcpus_is_the_system_blocktime() {
        let t0 = Instant::now();
        let mut b = Blocktime::default();
        b.declare(C, &[10, 11]);
        b.begin(C, 10, 0x1000, at(t0, 0));
        b.begin(C, 11, 0x2000, at(t0, 5));
        b.begin(C, 99, 0x3000, at(t0, 6)); // not a vCPU
        b.resolve(C, 0x1000, at(t0, 8)); // vCPU 10: 8 ms; all blocked 5..8
        b.resolve(C, 0x3000, at(t0, 9));
        b.resolve(C, 0x2000, at(t0, 20)); // vCPU 11: 15 ms
        let r = b.report();
        assert_eq!(r.all_vcpus_blocked_ns, 3_000_000);
        assert_eq!(r.vcpus[0].blocked_ns, 8_000_000);
        assert_eq!(r.vcpus[1].blocked_ns, 15_000_000);
        assert_eq!((r.non_vcpu_faults, r.non_vcpu_latency_ns), (1, 3_000_000));
        assert_eq!(r.faults(), 3);
        let q = r.qemu();
        assert_eq!(q.blocktime_ms, 3);
        assert_eq!(q.vcpu_blocktime_ms, vec![8, 15]);
        assert_eq!(q.latency_ns, 26_000_000 / 3);
        assert_eq!(q.latency_dist.len(), LATENCY_BUCKETS);
        // 3 ms = 3000 us is in [2048, 4096): bucket 11; 8 ms in bucket 12 (8000 us < 8192); 15 ms
        // in bucket 13.
        assert_eq!((q.latency_dist[11], q.latency_dist[12], q.latency_dist[13]), (1, 1, 1));
        assert_eq!(q.latency_dist.iter().sum::<u64>(), 3);
    }

    #[test]
    fn a_thread_blocked_twice_counts_its_time_once() {
        let t0 = Instant::now();
        let mut b = Blocktime::default();
        b.declare(C, &[10]);
        b.begin(C, 10, 0x1000, at(t0, 0));
        b.begin(C, 10, 0x2000, at(t0, 2));
        b.resolve(C, 0x1000, at(t0, 4));
        b.resolve(C, 0x2000, at(t0, 10));
        let r = b.report();
        assert_eq!(r.vcpus[0].blocked_ns, 10_000_000, "one interval 0..10");
        assert_eq!(r.vcpus[0].faults, 2);
        assert_eq!(r.all_vcpus_blocked_ns, 10_000_000, "the only vCPU");
    }

    #[test]
    fn abandoned_waits_release_without_a_sample_and_departed_vcpus_stop_counting() {
        let t0 = Instant::now();
        let mut b = Blocktime::default();
        b.declare(C, &[10]);
        b.declare(ClientId(2), &[10, 0]);
        b.begin(C, 10, 0x1000, at(t0, 0));
        b.begin(ClientId(2), 10, 0x1000, at(t0, 1));
        b.abandon_range(C, 0x1000, 0x2000, at(t0, 3));
        b.drop_client(ClientId(2), at(t0, 4));
        let r = b.report();
        assert_eq!(r.faults(), 0);
        assert_eq!(r.latency_dist.iter().sum::<u64>(), 0);
        assert_eq!(r.vcpus.len(), 2);
        assert_eq!(r.vcpus[0].blocked_ns, 3_000_000);
        assert_eq!(r.all_vcpus_blocked_ns, 2_000_000, "both blocked 1..3");
        // Only client 1's vCPU is live now: it alone decides the system blocktime.
        b.begin(C, 10, 0x5000, at(t0, 10));
        b.resolve(C, 0x5000, at(t0, 11));
        assert_eq!(b.report().all_vcpus_blocked_ns, 3_000_000);
    }

    #[test]
    fn thread_id_zero_is_never_a_vcpu() {
        let t0 = Instant::now();
        let mut b = Blocktime::default();
        b.declare(C, &[0]);
        assert!(b.report().vcpus.is_empty());
        b.begin(C, 0, 0x1000, t0);
        b.resolve(C, 0x1000, at(t0, 1));
        assert_eq!(b.report().non_vcpu_faults, 1);
        assert_eq!(b.report().qemu().latency_dist[LATENCY_BUCKETS - 1], 0);
    }
}
