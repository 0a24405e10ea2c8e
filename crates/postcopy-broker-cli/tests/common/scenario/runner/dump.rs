//! What a failed or hung run shows: the broker's last status and a fresh one, and for every
//! process its state, its threads asleep in userfaultfd code, the broker's counters for it, and
//! the tails of its output.

use serde_json::Value;

use super::Run;
use crate::scenario::procs::userfault_threads;
use crate::scenario::watch::{compact, fetch_status};

/// What the broker's status says about the client process `pid`, with a hint when its faults
/// were all woken at once as already received (it faults again and again on a page the broker
/// marks received but that is not in the memfd).
fn broker_view(st: &Value, pid: u32) -> Option<String> {
    let mut all =
        st["clients"].as_array().into_iter().flatten().chain(st["departed"].as_array().into_iter().flatten());
    let c = all.rfind(|c| c["pid"].as_u64() == Some(u64::from(pid)))?;
    let x = &c["stats"];
    let n = |k: &str| x[k].as_u64().unwrap_or(0);
    let mut line = format!(
        "broker's view: client {} '{}': faults {}, woken at once as already received {}, requested {}, joined {}",
        c["id"],
        c["name"].as_str().unwrap_or("?"),
        n("faults"),
        n("already_there"),
        n("pages_requested"),
        n("joined")
    );
    if n("already_there") > 1000 && n("already_there") * 2 > n("faults") {
        line.push_str(" — it keeps faulting on a page marked received that is not in the memfd (a hole)");
    }
    Some(line)
}

impl Run<'_> {
    /// Everything the failure message shows about a run that hung or failed.
    pub(super) fn dump(&self) -> String {
        let mut out = String::new();
        match &self.snap {
            Some((at, st)) => out.push_str(&format!(
                "last broker status ({:.1}s old): {}\n",
                at.elapsed().as_secs_f64(),
                compact(st)
            )),
            None => out.push_str("no broker status was taken\n"),
        }
        if self.side.is_some() && self.procs.running(self.broker()) {
            if let Some(st) = fetch_status(&self.ctl) {
                out.push_str(&format!("broker status now: {}\n", compact(&st)));
            }
        }
        if let Some(line) = self.final_counts() {
            out.push_str(&format!("{line}\n"));
        }
        for p in &self.procs.list {
            let state = match p.status {
                None => "running".to_string(),
                Some(st) => format!("exited: {st}"),
            };
            let uf = if p.status.is_none() { userfault_threads(p.pid) } else { Vec::new() };
            out.push_str(&format!("process {} pid {} {state}", p.name, p.pid));
            if !uf.is_empty() {
                let t: Vec<String> = uf.iter().map(|(tid, w)| format!("{tid} in {w}")).collect();
                out.push_str(&format!(", threads asleep in userfaultfd: {}", t.join(", ")));
            }
            out.push('\n');
            if let Some(line) = self.snap.as_ref().and_then(|(_, st)| broker_view(st, p.pid)) {
                out.push_str(&format!("  {line}\n"));
            }
            let lines = p.lines.all();
            for l in &lines[lines.len().saturating_sub(3)..] {
                let l = if l.len() > 300 { format!("{}...", &l[..300]) } else { l.clone() };
                out.push_str(&format!("  stdout| {l}\n"));
            }
            let i = self.procs.list.iter().position(|q| q.pid == p.pid).unwrap();
            for l in self.procs.stderr_tail(i, 12).lines() {
                out.push_str(&format!("  stderr| {l}\n"));
            }
        }
        out
    }

    /// The per-client faults the broker reported when it ended (after the last status snapshot,
    /// which a short run may not have caught): the migration's summary JSON, or the table `serve`
    /// prints.
    fn final_counts(&self) -> Option<String> {
        if self.procs.running(self.broker()) {
            return None;
        }
        if let Ok(text) = std::fs::read(self.dir.join("dst-summary.json")) {
            let v: Value = serde_json::from_slice(&text).ok()?;
            let cs: Vec<String> = v["clients"]
                .as_array()?
                .iter()
                .map(|c| format!("{} faults {} (waited for a page {})", c["name"], c["faults"], c["waited"]))
                .collect();
            return Some(format!("the destination's summary at its end: {}", cs.join("; ")));
        }
        let out = self.procs.stdout_file(self.broker());
        let lines: Vec<&str> =
            out.lines().filter(|l| l.starts_with("pages:") || l.trim_start().starts_with('#')).collect();
        (!lines.is_empty()).then(|| format!("serve's table at its end: {}", lines.join(" | ")))
    }
}
