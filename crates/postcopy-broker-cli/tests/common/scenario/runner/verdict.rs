//! The verdict on a run that finished: exit statuses, every byte of RAM, the checksum files, the
//! broker's counters at the end, and every client's output, judged against the model.

use serde_json::Value;

use super::Run;
use crate::scenario::model::Fate;
use crate::scenario::plan::{ClientPlan, Mode};
use crate::scenario::{counters, dpdk, oracle, pcb, vhost};

impl Run<'_> {
    /// The oracle: exit statuses, every byte of RAM, the checksum files, the counters, every
    /// client's reads. Returns (pages checked, client reads checked).
    pub(super) fn oracle(&mut self) -> (u64, u64) {
        let mut errs = Vec::new();
        // A prefaulting client the broker refused (it said why) never ran its script.
        let refused: Vec<bool> = (0..self.clients.len())
            .map(|i| {
                let prefaults = matches!(&self.s.clients[i], ClientPlan::Pcb(p) if p.prefault.is_some());
                prefaults
                    && self.main_proc(i).is_some_and(|m| {
                        self.procs.list[m].status.is_some_and(|st| !st.success())
                            && self.procs.stderr(m).contains(pcb::REFUSED_PREFAULT)
                    })
            })
            .collect();
        let done: Vec<bool> = (0..self.clients.len())
            .map(|i| {
                !self.clients[i].killed
                    && self
                        .main_proc(i)
                        .and_then(|m| self.procs.list[m].status)
                        .is_some_and(|st| st.success())
            })
            .collect();
        for (i, &ok) in done.iter().enumerate() {
            let Some(m) = self.main_proc(i) else {
                errs.push(format!("client #{i} never started"));
                continue;
            };
            if refused[i] {
                if self.procs.list[m].lines.count() > 0 {
                    errs.push(format!("client #{i} was refused for prefaulting after it had registered"));
                }
                continue;
            }
            if !self.clients[i].killed && !ok {
                errs.push(format!(
                    "client #{i} ({}) exited with {:?}: {}",
                    self.s.clients[i],
                    self.procs.list[m].status,
                    self.procs.stderr_tail(m, 5)
                ));
            }
        }
        let fate = |c: usize| match (refused[c], done[c]) {
            (true, _) => Fate::Never,
            (false, true) => Fate::Done,
            (false, false) => Fate::Maybe,
        };
        let pages = oracle::check_ram(&self.held, self.model, fate, &mut errs);
        // The broker's checksum files show RAM when it ended: they must hold every client change
        // only when the clients that change pages had all exited by then.
        let broker_end = self.procs.list[self.broker()].exited_at;
        let before_end = |c: usize| {
            self.main_proc(c)
                .and_then(|m| self.procs.list[m].exited_at)
                .zip(broker_end)
                .is_some_and(|(a, b)| a <= b)
        };
        // A client that went on with its script after it handled the broker's postcopy_end
        // (and so unregistered) changes pages the broker may or may not have summed already:
        // the broker waits for its clients to unregister, not for them to exit. Its exit seen
        // before the broker's says nothing then (both are seen when this process reaps them).
        let went_on_after_end = |c: usize| {
            self.clients[c].procs.iter().any(|&m| {
                let mut ended = false;
                self.procs.list[m].lines.all().iter().any(|l| {
                    let v: Value = serde_json::from_str(l).unwrap_or(Value::Null);
                    ended |= v["postcopy_end"].is_array();
                    ended && v["step"].is_string()
                })
            })
        };
        let exact = oracle::exact_final(self.model, |c| match fate(c) {
            Fate::Done if !before_end(c) || went_on_after_end(c) => Fate::Maybe,
            f => f,
        });
        let source_ram: Vec<Vec<u8>> = self.model.blocks.iter().map(|b| b.last.clone()).collect();
        match &self.s.mode {
            Mode::Migration { .. } => {
                oracle::check_verify_file(
                    &self.dir.join("src-verify.json"),
                    "the source",
                    &source_ram,
                    &mut errs,
                );
                if let Some(want) = &exact {
                    oracle::check_verify_file(
                        &self.dir.join("dst-verify.json"),
                        "the destination",
                        want,
                        &mut errs,
                    );
                }
                let summary: Value = std::fs::read(self.dir.join("dst-summary.json"))
                    .ok()
                    .and_then(|t| serde_json::from_slice(&t).ok())
                    .unwrap_or(Value::Null);
                let log = self.procs.stderr(self.broker());
                let at_listen = log.lines().find_map(|l| {
                    let rest = l.split("listening: ").nth(1)?;
                    rest.split_whitespace().next()?.parse::<u64>().ok()
                });
                let registered = self.s.kill.is_none().then(|| {
                    let live = || (0..self.clients.len()).filter(|&i| !refused[i]);
                    let most: usize = live().map(|i| counters::registrations(&self.s.clients[i])).sum();
                    let forks: usize = live().map(|i| counters::forks(&self.s.clients[i])).sum();
                    (most - forks, most)
                });
                let end_cut = matches!(self.s.mode, Mode::Migration { end_cut: Some(_), .. });
                counters::check_migration_end(
                    self.s,
                    &summary,
                    at_listen,
                    self.cuts_done + u64::from(end_cut),
                    registered,
                    &mut errs,
                );
            }
            Mode::Restore { background } => {
                if let Some(want) = &exact {
                    oracle::check_fnv_file(&self.dir.join("sums.json"), self.model, want, &mut errs);
                }
                let r = counters::parse_rendered(&self.procs.stdout_file(self.broker()));
                counters::check_restore_end(self.s, &r, *background, &mut errs);
            }
        }
        let mut reads = 0;
        for (i, &ok) in done.iter().enumerate() {
            let Some(m) = self.main_proc(i).filter(|_| !refused[i]) else { continue };
            let lines = self.procs.list[m].lines.all();
            reads += match &self.s.clients[i] {
                ClientPlan::Pcb(p) => pcb::check_shared(i, self.s, p, &lines, self.model, ok, &mut errs),
                ClientPlan::Private(_) => pcb::check_private(i, &lines, self.model, ok, &mut errs),
                ClientPlan::Vhost(v) if ok => {
                    let disk = self.dir.join(format!("c{i}-disk"));
                    vhost::check(i, self.s, v, &lines, &disk, self.model, &mut errs)
                }
                ClientPlan::Vhost(_) => 0,
                ClientPlan::Dpdk(d) if ok => {
                    let testpmd =
                        self.clients[i].backend.map(|b| self.procs.stdout_file(b)).unwrap_or_default();
                    dpdk::check(i, d, &lines, &testpmd, &mut errs)
                }
                ClientPlan::Dpdk(_) => 0,
            };
        }
        self.errs.extend(errs);
        (pages, reads)
    }
}
