//! Scheduling priority of background threads, and their CPU time. The destination's stream
//! thread and the source's background sender run below the demand path (fault loop, urgent
//! thread, the guest's vCPUs and devices) while nothing waits for them, and at full priority
//! while faults wait: a client blocked in a fault is not using its CPU, and the stream is what
//! ends the migration and so frees it. [`DemandPriority`] holds the threads of one stream and
//! switches them on the transitions only (see [`StreamPriority`] for the modes): up at once when
//! a fault starts waiting (the fault loop's pending set turns non-empty, or a demand request
//! reaches the source), down only once none has waited for [`DEMAND_HOLD`], which the
//! background threads check between their units of work ([`DemandPriority::relax`]). The hold
//! keeps a guest that faults every few microseconds from flipping the threads twice per fault
//! (measured: that cost more stream time than it gave the guest).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Nice value of background threads while nothing waits for them (adaptive mode), and the
/// default of `--stream-nice` / `--background-nice` as a fixed value: demand answers and faults
/// (nice 0) preempt them, and they still get most of an otherwise idle CPU.
pub const DEFAULT_LOW_NICE: i32 = 10;

/// How long background threads stay at full priority after the last fault stopped waiting (on
/// the source: after the last demand request, as it cannot see the destination's faults).
pub const DEMAND_HOLD: Duration = Duration::from_millis(2);

/// How the background threads of a migration are prioritised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamPriority {
    /// One nice value for the whole migration (clamped to 0..=19; 0 leaves the threads at the
    /// priority they start with).
    Fixed(i32),
    /// Nice `low` while no fault waits, back to the priority the threads started with while
    /// faults wait. Going back up needs `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows it; a
    /// process without either runs the threads at their starting priority throughout, and
    /// says so.
    Adaptive {
        /// Nice value while no fault waits.
        low: i32,
    },
}

impl Default for StreamPriority {
    fn default() -> StreamPriority {
        StreamPriority::Adaptive { low: DEFAULT_LOW_NICE }
    }
}

impl StreamPriority {
    /// `Fixed(n)` when a nice value was given, the adaptive default otherwise.
    pub fn from_nice(nice: Option<i32>) -> StreamPriority {
        nice.map_or_else(StreamPriority::default, StreamPriority::Fixed)
    }
}

/// The levels in force after the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Levels {
    /// A nice value set once per thread (`None`: leave the thread alone).
    Fixed(Option<i32>),
    /// Nice `low` without demand, `high` with it.
    Adaptive { low: i32, high: i32 },
}

impl Levels {
    /// The nice value a thread must have given `demand`, `None` for "leave it".
    fn nice(self, demand: bool) -> Option<i32> {
        match self {
            Levels::Fixed(n) => n,
            Levels::Adaptive { low, high } => Some(if demand { high } else { low }),
        }
    }
}

/// The background threads of one migration side and the demand state they follow.
#[derive(Debug)]
pub struct DemandPriority {
    levels: Levels,
    /// Thread ids of the threads that entered and have not left.
    threads: Mutex<Vec<libc::id_t>>,
    /// Whether the threads run at the demand level (changed under `threads`' lock).
    demand: AtomicBool,
    /// Whether a fault waits right now (the fault loop's view).
    waiting: AtomicBool,
    /// Nanoseconds since `epoch` when the last fault stopped waiting (or the last demand
    /// request arrived).
    last_demand: AtomicU64,
    epoch: Instant,
    /// Transitions applied (either way).
    switches: AtomicU64,
    what: &'static str,
}

impl DemandPriority {
    /// The priority of `what`'s threads (e.g. "stream thread"), relative to the calling
    /// thread's nice value, which is the adaptive mode's full priority. The adaptive mode is
    /// probed on a scratch thread first: when this process cannot raise a lowered thread back,
    /// it falls back to the calling thread's priority throughout, with a warning that says why
    /// and what to change.
    pub fn new(mode: StreamPriority, what: &'static str) -> Arc<DemandPriority> {
        let base = thread_nice().unwrap_or(0);
        let levels = match mode {
            StreamPriority::Fixed(n) => Levels::Fixed((n.clamp(0, 19) != 0).then_some(n.clamp(0, 19))),
            StreamPriority::Adaptive { low } => {
                let low = low.clamp(0, 19);
                if low <= base {
                    Levels::Fixed(None)
                } else {
                    match can_raise(low, base) {
                        Ok(()) => Levels::Adaptive { low, high: base },
                        Err(e) => {
                            log::warn!(
                                "the {what} cannot be raised back to nice {base} once lowered to {low} ({e}): \
                                 adaptive priority needs CAP_SYS_NICE or RLIMIT_NICE >= {} (`ulimit -e`, \
                                 systemd LimitNICE=); it runs at nice {base} throughout instead (a fixed \
                                 lower priority: --stream-nice / --background-nice)",
                                20 - base
                            );
                            Levels::Fixed(None)
                        }
                    }
                }
            }
        };
        log::debug!("{what}: priority {levels:?}");
        Arc::new(DemandPriority {
            levels,
            threads: Mutex::new(Vec::new()),
            demand: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            last_demand: AtomicU64::new(0),
            epoch: Instant::now(),
            switches: AtomicU64::new(0),
            what,
        })
    }

    /// Whether the threads follow demand (false: fixed, or the fallback).
    pub fn is_adaptive(&self) -> bool {
        matches!(self.levels, Levels::Adaptive { .. })
    }

    /// Transitions applied so far.
    pub fn switches(&self) -> u64 {
        self.switches.load(Ordering::Relaxed)
    }

    /// Called once by each background thread at its start: the thread runs at the current
    /// level and follows the transitions until the returned guard drops (at its end).
    pub fn enter(self: &Arc<Self>) -> Entered {
        let tid = tid();
        let mut g = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = self.levels.nice(self.demand.load(Ordering::Relaxed)) {
            set_nice(tid, n, self.what);
        }
        g.push(tid);
        Entered { owner: Arc::clone(self), tid }
    }

    /// Faults wait (`true`: the threads go to full priority at once) or none does any more
    /// (`false`: they go back down at their next [`DemandPriority::relax`] after the hold).
    /// Called on the transitions of the fault loop's pending set; cheap when nothing changes.
    pub fn set_demand(&self, waiting: bool) {
        if !self.is_adaptive() {
            return;
        }
        if waiting {
            self.waiting.store(true, Ordering::Relaxed);
            self.switch(true);
        } else {
            self.last_demand.store(nanos_since(self.epoch), Ordering::Relaxed);
            self.waiting.store(false, Ordering::Relaxed);
        }
    }

    /// A demand request arrived (the source's urgent thread): full priority until
    /// [`DemandPriority::relax`] finds none for the hold.
    pub fn note_demand(&self) {
        if self.is_adaptive() {
            self.last_demand.store(nanos_since(self.epoch), Ordering::Relaxed);
            self.switch(true);
        }
    }

    /// Back to the low level when no fault waits and none did for `hold` (called by the
    /// background threads between their units of work: one atomic load while low).
    pub fn relax(&self, hold: Duration) {
        if !self.demand.load(Ordering::Relaxed) || self.waiting.load(Ordering::Relaxed) {
            return;
        }
        let idle = nanos_since(self.epoch).saturating_sub(self.last_demand.load(Ordering::Relaxed));
        if held_out(idle, hold) {
            self.switch(false);
        }
    }

    /// Move every thread that entered to the level of `demand`, if it is not there yet.
    fn switch(&self, demand: bool) {
        if self.demand.load(Ordering::Relaxed) == demand {
            return;
        }
        let g = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if self.demand.swap(demand, Ordering::Relaxed) == demand {
            return;
        }
        self.switches.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = self.levels.nice(demand) {
            for &t in g.iter() {
                set_nice(t, n, self.what);
            }
        }
    }
}

impl Drop for DemandPriority {
    fn drop(&mut self) {
        if self.is_adaptive() {
            log::info!("{}: {} priority switches", self.what, self.switches());
        }
    }
}

/// Whether demand idle for `idle_ns` has outlasted `hold`.
fn held_out(idle_ns: u64, hold: Duration) -> bool {
    u128::from(idle_ns) >= hold.as_nanos()
}

fn nanos_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A thread's membership in a [`DemandPriority`]: leaving on drop, so that a thread id reused
/// after the thread ended is never touched.
#[derive(Debug)]
pub struct Entered {
    owner: Arc<DemandPriority>,
    tid: libc::id_t,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let mut g = self.owner.threads.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|&t| t != self.tid);
    }
}

/// Edges of "some fault waits" as the fault loop sees its pending set after each round.
#[derive(Debug, Default, Clone, Copy)]
pub struct DemandEdge {
    waiting: bool,
}

impl DemandEdge {
    /// The new state when `waiting` differs from the last one seen, `None` otherwise.
    pub fn update(&mut self, waiting: bool) -> Option<bool> {
        (waiting != self.waiting).then(|| {
            self.waiting = waiting;
            waiting
        })
    }
}

/// Lower a scratch thread to `low` and raise it back to `high`: what adaptive mode needs.
fn can_raise(low: i32, high: i32) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("priority-probe".into())
        .spawn(move || {
            let t = tid();
            setpriority(t, low)?;
            setpriority(t, high)
        })?
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the probe thread panicked")))
}

fn setpriority(tid: libc::id_t, nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority on a thread id of this process only changes that thread's nice value.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Set `tid`'s nice value; failing only logs: priority is an optimisation, not a requirement.
fn set_nice(tid: libc::id_t, nice: i32, what: &str) {
    match setpriority(tid, nice) {
        Ok(()) => log::trace!("{what} (tid {tid}) runs at nice {nice}"),
        Err(e) => log::warn!("could not set the nice value of the {what} to {nice}: {e}"),
    }
}

fn tid() -> libc::id_t {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    // Thread ids are positive; 0 would name the calling thread anyway.
    libc::id_t::try_from(tid).unwrap_or(0)
}

/// The calling thread's nice value.
pub fn thread_nice() -> Option<i32> {
    nice_of(tid())
}

/// The nice value of thread `tid` of this process.
pub fn nice_of(tid: libc::id_t) -> Option<i32> {
    // getpriority returns -1 both as a valid value and on error: clear errno first.
    // SAFETY: errno is thread-local; writing it and calling getpriority on a tid is sound.
    unsafe {
        *libc::__errno_location() = 0;
        let v = libc::getpriority(libc::PRIO_PROCESS, tid);
        (*libc::__errno_location() == 0).then_some(v)
    }
}

/// CPU time (user + system) the calling thread has used so far, in seconds.
pub fn thread_cpu_secs() -> f64 {
    // SAFETY: rusage is plain data; getrusage with RUSAGE_THREAD fills it for the calling thread.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) } != 0 {
        return 0.0;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_are_reported_once_per_change() {
        let mut e = DemandEdge::default();
        let seen: Vec<Option<bool>> =
            [false, true, true, true, false, false, true, false].iter().map(|&w| e.update(w)).collect();
        assert_eq!(
            seen,
            [None, Some(true), None, None, Some(false), None, Some(true), Some(false)],
            "a transition each time the pending set turns non-empty or empty, nothing in between"
        );
    }

    #[test]
    fn demand_is_held_until_the_requests_stop_for_the_hold_time() {
        let hold = Duration::from_millis(2);
        assert!(!held_out(0, hold));
        assert!(!held_out(1_999_999, hold));
        assert!(held_out(2_000_000, hold));
    }

    #[test]
    fn fixed_mode_lowers_this_thread_and_its_children_only() {
        let before = thread_nice().unwrap();
        let (mine, child) = std::thread::spawn(|| {
            let p = DemandPriority::new(StreamPriority::Fixed(7), "test thread");
            let _in = p.enter();
            p.set_demand(true);
            let child = std::thread::spawn(thread_nice).join().unwrap();
            (thread_nice(), child)
        })
        .join()
        .unwrap();
        assert_eq!(mine, Some(7), "fixed mode ignores demand");
        assert_eq!(child, Some(7), "a thread inherits the nice value of its creator");
        assert_eq!(thread_nice(), Some(before), "other threads keep theirs");
        std::thread::spawn(move || {
            let _in = DemandPriority::new(StreamPriority::Fixed(0), "untouched").enter();
            assert_eq!(thread_nice(), Some(before));
            let _in = DemandPriority::new(StreamPriority::Fixed(40), "clamped").enter();
            assert_eq!(thread_nice(), Some(19));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn adaptive_mode_switches_entered_threads_on_transitions_only() {
        // The test runs as root (CI, scripts/setup.sh), so raising back is allowed.
        let base = thread_nice().unwrap();
        let p = DemandPriority::new(StreamPriority::Adaptive { low: 12 }, "test stream");
        assert!(p.is_adaptive());
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let q = Arc::clone(&p);
        let t = std::thread::spawn(move || {
            let _in = q.enter();
            tx.send(tid()).unwrap();
            let _ = stop_rx.recv();
        });
        let worker = rx.recv().unwrap();
        assert_eq!(nice_of(worker), Some(12), "low while no fault waits");
        p.set_demand(true);
        assert_eq!(nice_of(worker), Some(base), "full priority while faults wait");
        p.set_demand(true);
        assert_eq!(p.switches(), 1, "no switch without a transition");
        p.relax(Duration::ZERO);
        assert_eq!(nice_of(worker), Some(base), "never down while a fault waits");
        p.set_demand(false);
        assert_eq!(nice_of(worker), Some(base), "down only after the hold");
        p.relax(Duration::from_secs(3600));
        assert_eq!(nice_of(worker), Some(base), "the hold is not over");
        p.relax(Duration::ZERO);
        assert_eq!(nice_of(worker), Some(12), "down once it is");
        p.note_demand();
        assert_eq!(nice_of(worker), Some(base), "a demand request raises at once");
        p.relax(Duration::from_secs(3600));
        assert_eq!(nice_of(worker), Some(base), "held while requests are recent");
        p.relax(Duration::ZERO);
        assert_eq!(nice_of(worker), Some(12), "relaxed once the hold is over");
        assert_eq!(p.switches(), 4);
        stop_tx.send(()).unwrap();
        t.join().unwrap();
        assert!(p.threads.lock().unwrap().is_empty(), "a thread that ended is forgotten");
        assert_eq!(thread_nice(), Some(base), "the caller is never touched");
    }

    /// CAP_SYS_NICE dropped from one thread's effective set (capabilities are per thread).
    fn drop_sys_nice() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const V3: u32 = 0x2008_0522;
        let mut h = Header { version: V3, pid: 0 };
        let mut d = [Data::default(); 2];
        // SAFETY: capget fills two Data words for a version 3 header; both are live and writable.
        assert_eq!(unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) }, 0);
        const CAP_SYS_NICE: u32 = 23;
        d[0].effective &= !(1 << CAP_SYS_NICE);
        // SAFETY: capset reads the same layout; it only changes this thread's capabilities.
        assert_eq!(unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) }, 0);
    }

    #[test]
    fn without_the_privilege_to_raise_adaptive_mode_falls_back_to_the_callers_priority() {
        std::thread::spawn(|| {
            drop_sys_nice();
            let base = thread_nice().unwrap();
            // SAFETY: rlimit is plain data, filled by getrlimit.
            let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
            // SAFETY: the pointer is to a live, writable rlimit.
            assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut r) }, 0);
            let p = DemandPriority::new(StreamPriority::Adaptive { low: 10 }, "test stream");
            let allowed = r.rlim_cur >= (20 - base) as libc::rlim_t;
            assert_eq!(p.is_adaptive(), allowed, "adaptive exactly when RLIMIT_NICE allows going back");
            let _in = p.enter();
            p.set_demand(true);
            p.set_demand(false);
            p.relax(Duration::ZERO);
            let want = if allowed { 10 } else { base };
            assert_eq!(thread_nice(), Some(want), "without the privilege nothing is ever lowered");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn adaptive_mode_without_room_below_is_fixed_at_the_callers_priority() {
        std::thread::spawn(|| {
            setpriority(tid(), 15).unwrap();
            let p = DemandPriority::new(StreamPriority::Adaptive { low: 10 }, "test stream");
            assert!(!p.is_adaptive(), "nice 10 is not below a caller at nice 15");
            let _in = p.enter();
            p.set_demand(true);
            assert_eq!(thread_nice(), Some(15));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn thread_cpu_time_grows_with_work() {
        let before = thread_cpu_secs();
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert!(x != 1);
        assert!(thread_cpu_secs() > before, "busy work shows as CPU time");
    }
}
