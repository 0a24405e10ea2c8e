//! One scenario end to end: start the broker side, take the block memfds, start the clients at
//! Listen, then watch — status snapshots (checked as they come), connection cuts, the client
//! kill, the release of the clients' after-completion steps, finishers — until every process is
//! done or the watchdog fires; then the oracle. Every failure is one text that starts with the
//! seed and the command that reruns it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::counters;
use super::launch::{self, BrokerSide, Held};
use super::model::Model;
use super::pcb;
use super::plan::{ClientPlan, Mode, Scenario, HUGE};
use super::procs::{userfault_threads, Procs};
use super::watch::{fetch_status, overdue, Watchdog};
use super::{dpdk, vhost};

mod dump;
mod verdict;

/// How a run is watched.
#[derive(Debug, Clone)]
pub struct Options {
    /// A fault may wait, and a client may make no progress, this long.
    pub stall: Duration,
    /// Keep the work directory.
    pub keep: bool,
}

/// What one scenario did.
#[derive(Debug)]
pub struct Outcome {
    pub failure: Option<String>,
    pub secs: f64,
    pub pages_checked: u64,
    pub reads_checked: u64,
    pub cuts: u64,
    /// Whether a client was killed, and how.
    pub killed: Option<String>,
}

/// The command that reruns one seed.
pub fn rerun(seed: u64) -> String {
    format!("SCENARIO_SEED={seed} cargo test --release --test scenario -- --nocapture")
}

/// Hard limit of one scenario, however busy.
const MAX_RUN: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
struct ClientRun {
    /// Its processes: the client itself first (pcb-client, guest or net driver), then a backend.
    procs: Vec<usize>,
    /// A vhost-user backend started before Listen.
    backend: Option<usize>,
    /// DPDK: testpmd was told to start forwarding, and to stop.
    traffic: (bool, bool),
    started: Option<Instant>,
    /// It was told to start its work (every client registers first, then all start together).
    go: bool,
    killed: bool,
}

struct Run<'a> {
    s: &'a Scenario,
    model: &'a Model,
    dir: PathBuf,
    ctl: PathBuf,
    procs: Procs,
    side: Option<BrokerSide>,
    held: Vec<Held>,
    clients: Vec<ClientRun>,
    listen_at: Option<Instant>,
    /// When the clients started at Listen had registered (or gave up): postcopy is released.
    registered_at: Option<Instant>,
    cuts_done: u64,
    /// How the kill went (mid-fault or not).
    kill_note: Option<String>,
    snap: Option<(Instant, Value)>,
    snap_tried: Instant,
    released: bool,
    errs: Vec<String>,
    dog: Watchdog,
}

/// Run scenario `s`.
pub fn run(s: &Scenario, opts: &Options) -> Outcome {
    let t = Instant::now();
    let model = Model::build(s);
    let huge: u64 = s.blocks.iter().filter(|b| b.page_size == HUGE).map(|b| b.pages()).sum();
    if huge > 0 {
        crate::common::ensure_free_huge_pages(2 * huge + 4);
    }
    let dir = std::env::temp_dir().join(format!("pcb-scenario-{}-{}", std::process::id(), s.seed));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut r = Run {
        s,
        model: &model,
        ctl: launch::control_path(&dir),
        procs: Procs::new(&dir),
        dir: dir.clone(),
        side: None,
        held: Vec::new(),
        clients: (0..s.clients.len()).map(|_| ClientRun::default()).collect(),
        listen_at: None,
        registered_at: None,
        cuts_done: 0,
        kill_note: None,
        snap: None,
        snap_tried: Instant::now(),
        released: false,
        errs: Vec::new(),
        dog: Watchdog::new(opts.stall),
    };
    let mut failure = None;
    let (mut pages, mut reads) = (0, 0);
    match r.drive() {
        Ok(()) => {
            (pages, reads) = r.oracle();
        }
        Err(what) => {
            let dump = r.dump();
            r.procs.kill_all();
            r.errs.insert(0, format!("{what}\n{dump}"));
        }
    }
    r.procs.kill_all();
    if let Some(h) = r.side.as_mut().and_then(|s| s.vmm.take()) {
        let _ = h.join();
    }
    if !r.errs.is_empty() {
        let mut text = format!("seed {} — reproduce: {}\n  scenario: {s}\n", s.seed, rerun(s.seed));
        for e in &r.errs {
            text.push_str(&format!("  - {}\n", e.replace('\n', "\n    ")));
        }
        if opts.keep {
            text.push_str(&format!("  work directory kept: {}\n", dir.display()));
        }
        failure = Some(text);
    }
    let killed =
        r.clients.iter().any(|c| c.killed).then(|| r.kill_note.clone().unwrap_or_else(|| "killed".into()));
    let cuts = r.cuts_done;
    drop(r);
    if !opts.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Outcome {
        failure,
        secs: t.elapsed().as_secs_f64(),
        pages_checked: pages,
        reads_checked: reads,
        cuts,
        killed,
    }
}

impl Run<'_> {
    fn broker(&self) -> usize {
        self.side.as_ref().map_or(0, |s| s.broker)
    }

    fn main_proc(&self, i: usize) -> Option<usize> {
        self.clients[i].procs.first().copied()
    }

    fn launch_client(&mut self, i: usize) -> Result<(), String> {
        let ctl = self.ctl.clone();
        let procs = match &self.s.clients[i] {
            ClientPlan::Pcb(p) => {
                let mut c = pcb::shared_command(self.s, p, &ctl);
                vec![self.procs.spawn(&format!("c{i}-pcb"), &mut c, true, true)]
            }
            ClientPlan::Private(p) => {
                let mut c = pcb::private_command(p, &ctl);
                vec![self.procs.spawn(&format!("c{i}-private"), &mut c, true, true)]
            }
            ClientPlan::Vhost(v) => {
                let sock = self.dir.join(format!("c{i}-backend.sock"));
                let drv = self.procs.spawn(
                    &format!("c{i}-driver"),
                    &mut vhost::driver_command(v, &sock, &ctl),
                    true,
                    true,
                );
                vec![drv, self.clients[i].backend.ok_or("no backend")?]
            }
            ClientPlan::Dpdk(d) => {
                let sock = self.dir.join(format!("c{i}-backend.sock"));
                let drv = self.procs.spawn(
                    &format!("c{i}-driver"),
                    &mut dpdk::driver_command(d, &sock, &ctl),
                    true,
                    true,
                );
                vec![drv, self.clients[i].backend.ok_or("no backend")?]
            }
        };
        self.clients[i].procs = procs;
        self.clients[i].started = Some(Instant::now());
        Ok(())
    }

    /// Start every vhost-user backend and wait for its socket (before Listen: they do not need
    /// the broker).
    fn start_backends(&mut self) -> Result<(), String> {
        for i in 0..self.s.clients.len() {
            let sock = self.dir.join(format!("c{i}-backend.sock"));
            let be = match &self.s.clients[i] {
                ClientPlan::Vhost(v) => {
                    let disk = self.dir.join(format!("c{i}-disk"));
                    vhost::write_disk(&disk, self.s, self.model, v);
                    let mut c = vhost::backend_command(v, &sock, &disk);
                    self.procs.spawn(&format!("c{i}-backend"), &mut c, false, false)
                }
                ClientPlan::Dpdk(_) => {
                    let mut c = dpdk::testpmd_command(&sock);
                    self.procs.spawn(&format!("c{i}-backend"), &mut c, false, true)
                }
                _ => continue,
            };
            let t = Instant::now();
            while !sock.exists() {
                self.procs.poll();
                if !self.procs.running(be) || t.elapsed() > Duration::from_secs(60) {
                    return Err(format!("client #{i}: the backend never opened {}", sock.display()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            self.clients[i].backend = Some(be);
        }
        Ok(())
    }

    /// DPDK's traffic: testpmd forwards (txonly) once the driver posted its receive buffers and
    /// stops once they were used, so it busy-polls a core only meanwhile.
    fn traffic(&mut self) {
        for i in 0..self.clients.len() {
            let (ClientPlan::Dpdk(_), Some(drv), Some(be)) =
                (&self.s.clients[i], self.main_proc(i), self.clients[i].backend)
            else {
                continue;
            };
            let (started, stopped) = self.clients[i].traffic;
            if stopped || !self.procs.running(be) {
                continue;
            }
            let lines = self.procs.list[drv].lines.all();
            if !started && dpdk::phase(&lines, "rx-posted") {
                self.procs.send(be, "start");
                self.clients[i].traffic.0 = true;
            } else if started && (dpdk::phase(&lines, "rx-done") || !self.procs.running(drv)) {
                self.procs.send(be, "stop");
                self.clients[i].traffic.1 = true;
            }
        }
    }

    /// Tell client `i` to start its work (a line on its stdin).
    fn go(&mut self, i: usize) {
        if let Some(m) = self.main_proc(i) {
            if !self.clients[i].go {
                self.clients[i].go = true;
                self.procs.send_line(m);
            }
        }
    }

    /// A client waiting for its go, or a shared client that has done its postcopy steps and
    /// waits for the release after completion.
    fn waiting(&self, i: usize) -> bool {
        if !self.clients[i].go {
            return true;
        }
        match (&self.s.clients[i], self.main_proc(i)) {
            (ClientPlan::Pcb(p), Some(m)) => {
                !p.after.is_empty()
                    && !self.released
                    && self.procs.list[m].lines.count() >= pcb::lines_before_wait(p)
            }
            _ => false,
        }
    }

    fn finisher(&self, i: usize) -> bool {
        matches!(&self.s.clients[i], ClientPlan::Pcb(p) if p.finisher)
    }

    fn exited(&self, i: usize) -> bool {
        self.main_proc(i).is_some_and(|m| !self.procs.running(m))
    }

    fn drive(&mut self) -> Result<(), String> {
        self.start_backends()?;
        let side = launch::start(self.s, self.model, &self.dir, &self.ctl, &mut self.procs)?;
        self.side = Some(side);
        let t0 = Instant::now();
        while !self.ctl.exists() {
            self.procs.poll();
            self.check_broker_side()?;
            if t0.elapsed() > Duration::from_secs(60) {
                return Err("the broker's control socket never appeared (no Listen)".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.listen_at = Some(Instant::now());
        self.held = launch::hold_blocks(&self.ctl)?;
        for i in 0..self.s.clients.len() {
            self.launch_client(i)?;
        }
        loop {
            std::thread::sleep(Duration::from_millis(20));
            self.procs.poll();
            self.check_broker_side()?;
            let broker_up = self.procs.running(self.broker());
            if !broker_up && !self.released {
                self.released = true;
                for i in 0..self.clients.len() {
                    if let (ClientPlan::Pcb(p), Some(m)) = (&self.s.clients[i], self.main_proc(i)) {
                        if !p.after.is_empty() {
                            self.procs.send_line(m);
                        }
                    }
                }
            }
            // Often until the clients registered and in the first second after they started
            // (a short run is over by then), every 200 ms after.
            let every = match self.registered_at {
                Some(t) if t.elapsed() > Duration::from_secs(1) => 200,
                Some(_) => 50,
                None => 10,
            };
            if broker_up && self.snap_tried.elapsed() >= Duration::from_millis(every) {
                self.snapshot()?;
            }
            self.release_when_registered(broker_up);
            self.cut();
            self.kill();
            self.traffic();
            // Finishers complete the restore: only once the private clients are done (serve ends
            // when its blocks are complete, and a private client left then would hang).
            let privates_done = (0..self.clients.len())
                .all(|i| !matches!(self.s.clients[i], ClientPlan::Private(_)) || self.exited(i));
            if self.registered_at.is_some() {
                for i in 0..self.clients.len() {
                    if !self.finisher(i) || privates_done {
                        self.go(i);
                    }
                }
            }
            self.check_clients()?;
            self.watch(broker_up)?;
            let clients_done = (0..self.clients.len()).all(|i| self.exited(i));
            let source_done =
                self.side.as_ref().and_then(|s| s.source).is_none_or(|i| !self.procs.running(i));
            if !broker_up && source_done && clients_done {
                break;
            }
        }
        if let Some(h) = self.side.as_mut().and_then(|s| s.vmm.take()) {
            match h.join() {
                Ok(Ok(_blocks)) => {}
                Ok(Err(e)) => self.errs.push(e),
                Err(_) => self.errs.push("the VMM thread panicked".into()),
            }
        }
        Ok(())
    }

    /// A client that failed (not killed, not a prefaulting client the broker refused) fails the
    /// run at once: the others may wait for it for ever (a finisher, a registration).
    fn check_clients(&self) -> Result<(), String> {
        for i in 0..self.clients.len() {
            let Some(m) = self.main_proc(i) else { continue };
            let Some(st) = self.procs.list[m].status else { continue };
            if st.success() || self.clients[i].killed {
                continue;
            }
            let err = self.procs.stderr(m);
            let prefaults = matches!(&self.s.clients[i], ClientPlan::Pcb(p) if p.prefault.is_some());
            if !(prefaults && err.contains(pcb::REFUSED_PREFAULT)) {
                return Err(format!(
                    "client #{i} ({}) exited with {st}: {}",
                    self.s.clients[i],
                    self.procs.stderr_tail(m, 3)
                ));
            }
        }
        Ok(())
    }

    /// The broker or the source failed: no client can finish then.
    fn check_broker_side(&self) -> Result<(), String> {
        let Some(side) = &self.side else { return Ok(()) };
        for (what, i) in [("broker", Some(side.broker)), ("source", side.source)] {
            let Some(i) = i else { continue };
            if let Some(st) = self.procs.list[i].status {
                if !st.success() {
                    return Err(format!("the {what} ({}) exited with {st}", self.procs.list[i].name));
                }
            }
        }
        Ok(())
    }

    fn snapshot(&mut self) -> Result<(), String> {
        self.snap_tried = Instant::now();
        let Some(st) = fetch_status(&self.ctl) else { return Ok(()) };
        counters::check_snapshot(self.s, &st, &mut self.errs);
        let removes = self.s.has_op(|o| matches!(o, super::plan::Op::Remove { .. }));
        if let Some((_, prev)) = &self.snap {
            counters::check_monotonic(prev, &st, &mut self.errs);
            if !removes && st["received_pages"].as_u64() < prev["received_pages"].as_u64() {
                self.errs.push(format!(
                    "status: received pages went down from {} to {}",
                    prev["received_pages"], st["received_pages"]
                ));
            }
        }
        let late = overdue(&st, self.dog.bound);
        self.snap = Some((Instant::now(), st));
        match late {
            Some(w) => Err(format!("watchdog: a fault waited too long: {w}")),
            None => Ok(()),
        }
    }

    /// Once every client started at Listen and still running has registered (all its processes
    /// appear in the broker's status), or 15 s passed, let postcopy go: the proxy lets the held
    /// stream through (a restore's fill waits by itself).
    fn release_when_registered(&mut self, broker_up: bool) {
        if self.registered_at.is_some() {
            return;
        }
        let empty = Value::Null;
        // A broker that ended before its first snapshot (a tiny restore) releases everybody.
        let st = self.snap.as_ref().map_or(&empty, |(_, st)| st);
        let pids: HashSet<u64> = st["clients"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(st["departed"].as_array().into_iter().flatten())
            .filter_map(|c| c["pid"].as_u64())
            .collect();
        let all_in = (0..self.clients.len()).all(|i| {
            self.clients[i].started.is_none()
                || self.exited(i)
                || self.clients[i].procs.iter().all(|&p| pids.contains(&u64::from(self.procs.list[p].pid)))
        });
        let late = self.listen_at.is_some_and(|t| t.elapsed() > Duration::from_secs(15));
        if all_in || late || !broker_up {
            self.registered_at = Some(Instant::now());
            if let Some(p) = self.side.as_ref().and_then(|s| s.proxy.as_ref()) {
                p.release();
            }
        }
    }

    fn cut(&mut self) {
        let (Some(at), Mode::Migration { cuts_ms, .. }) = (self.registered_at, &self.s.mode) else { return };
        let Some(&ms) = cuts_ms.get(self.cuts_done as usize) else { return };
        if at.elapsed() >= Duration::from_millis(ms) && self.procs.running(self.broker()) {
            if let Some(p) = self.side.as_ref().and_then(|s| s.proxy.as_ref()) {
                p.cut_now();
                self.cuts_done += 1;
            }
        }
    }

    fn kill(&mut self) {
        let Some(k) = self.s.kill else { return };
        let c = &self.clients[k.client];
        let (Some(m), Some(started), Some(reg)) = (c.procs.first().copied(), c.started, self.registered_at)
        else {
            return;
        };
        if c.killed || !self.procs.running(m) {
            return;
        }
        if reg.max(started).elapsed() < Duration::from_millis(k.after_ms) {
            return;
        }
        let broker = self.procs.list[self.broker()].pid as i32;
        if k.mid_fault {
            // Freeze the broker until one of the client's processes sleeps on a missing page.
            // SAFETY: kill(2) on the broker process this scenario started and has not reaped.
            unsafe { libc::kill(broker, libc::SIGSTOP) };
            let t = Instant::now();
            let pids: Vec<u32> =
                self.clients[k.client].procs.iter().map(|&p| self.procs.list[p].pid).collect();
            while t.elapsed() < Duration::from_millis(500)
                && pids.iter().all(|&p| userfault_threads(p).is_empty())
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            self.kill_note = Some(if pids.iter().any(|&p| !userfault_threads(p).is_empty()) {
                "killed while a fault was outstanding".into()
            } else {
                "killed (no fault outstanding within 500 ms)".into()
            });
        }
        for p in self.clients[k.client].procs.clone() {
            self.procs.kill(p);
        }
        if k.mid_fault {
            // SAFETY: as above.
            unsafe { libc::kill(broker, libc::SIGCONT) };
        }
        self.clients[k.client].killed = true;
    }

    fn watch(&mut self, broker_up: bool) -> Result<(), String> {
        let lines: usize = self.procs.list.iter().map(|p| p.lines.count()).sum();
        let exited = self.procs.list.iter().filter(|p| p.status.is_some()).count();
        let total = counters::total_pages(self.s);
        let received = if broker_up {
            self.snap.as_ref().and_then(|s| s.1["received_pages"].as_u64()).unwrap_or(0)
        } else {
            total
        };
        self.dog.observe(lines, exited, received);
        for i in 0..self.clients.len() {
            let (Some(m), Some(started)) = (self.main_proc(i), self.clients[i].started) else { continue };
            if !self.procs.running(m) || self.waiting(i) {
                continue;
            }
            let last = self.procs.list[m].lines.last_at().map_or(started, |l| l.max(started));
            if let Some(d) = self.dog.stuck(last) {
                return Err(format!(
                    "watchdog: client #{i} ({}) made no progress for {:.1}s{}",
                    self.s.clients[i],
                    d.as_secs_f64(),
                    if broker_up { "" } else { " after the broker had finished (every page placed)" }
                ));
            }
        }
        if let Some(d) = self.dog.idle() {
            return Err(format!("watchdog: nothing happened for {:.1}s", d.as_secs_f64()));
        }
        match self.listen_at {
            Some(t) if t.elapsed() > MAX_RUN => Err(format!("the scenario ran longer than {MAX_RUN:?}")),
            _ => Ok(()),
        }
    }
}
