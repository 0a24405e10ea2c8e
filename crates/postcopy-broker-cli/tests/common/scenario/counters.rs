//! The broker's counters add up. On every status snapshot: each shared client's faults are
//! exactly those woken at once, those that asked for a page and those that joined a request
//! (and none fell outside its mapping); blocks' received pages sum to the total; the pending list
//! names live clients only; no foreign and no prefaulted page unless a client prefaulted (a
//! prefaulter that is still populating when another client registers leaves pages that the
//! other client's check drops as foreign: it does not map them itself).
//! At the end: the pages the destination filled are exactly the pages it lacked at Listen
//! (precopy sent every page once, dirty ranges were discarded), faults sum over clients, every
//! pause was resumed.

use std::collections::HashSet;

use serde_json::Value;

use super::plan::{ClientPlan, Op, Scenario};

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Pages of the scenario's dirty ranges (their union).
pub fn dirty_pages(s: &Scenario) -> u64 {
    let set: HashSet<(usize, u64)> =
        s.dirty().iter().flat_map(|d| (d.first..d.first + d.pages).map(move |p| (d.block, p))).collect();
    set.len() as u64
}

pub fn total_pages(s: &Scenario) -> u64 {
    s.blocks.iter().map(|b| b.pages()).sum()
}

/// Identities that hold in every status report.
pub fn check_snapshot(s: &Scenario, st: &Value, errs: &mut Vec<String>) {
    let mut bad = |e: String| {
        if !errs.contains(&e) {
            errs.push(e);
        }
    };
    let blocks = st["blocks"].as_array().map(Vec::as_slice).unwrap_or_default();
    let sum: u64 = blocks.iter().map(|b| n(&b["received"])).sum();
    if sum != n(&st["received_pages"]) {
        bad(format!(
            "status: blocks' received pages sum to {sum}, received_pages is {}",
            st["received_pages"]
        ));
    }
    if n(&st["total_pages"]) != total_pages(s) {
        bad(format!("status: total_pages {} but the blocks have {}", st["total_pages"], total_pages(s)));
    }
    let live: HashSet<u64> = st["clients"].as_array().into_iter().flatten().map(|c| n(&c["id"])).collect();
    for c in
        st["clients"].as_array().into_iter().flatten().chain(st["departed"].as_array().into_iter().flatten())
    {
        let x = &c["stats"];
        let name = c["name"].as_str().unwrap_or("?");
        if n(&x["unmapped_faults"]) > 0 {
            bad(format!(
                "status: client {} '{name}' had {} faults outside its mapping table",
                c["id"], x["unmapped_faults"]
            ));
        }
        let parts = n(&x["already_there"])
            + n(&x["pages_requested"])
            + n(&x["joined"])
            + n(&x["unmapped_faults"])
            + n(&x["holes_refilled"]);
        if c["kind"] == "shared" && n(&x["faults"]) != parts {
            bad(format!(
                "status: client {} '{name}': faults {} != already_there {} + pages_requested {} + joined {} + unmapped {} + holes_refilled {}",
                c["id"], x["faults"], x["already_there"], x["pages_requested"], x["joined"], x["unmapped_faults"], x["holes_refilled"]
            ));
        }
    }
    let pending = st["pending"].as_array().map(Vec::as_slice).unwrap_or_default();
    if pending.len() < 256 && pending.len() as u64 != n(&st["outstanding"]) {
        bad(format!("status: {} pending requests listed, outstanding {}", pending.len(), st["outstanding"]));
    }
    for p in pending {
        for w in p["waiters"].as_array().into_iter().flatten() {
            if !live.contains(&n(&w["client"])) && n(&w["client"]) != 0 {
                bad(format!("status: a pending request waits for client {}, which is not live", w["client"]));
            }
        }
    }
    if !s.prefaults() && n(&st["broker"]["foreign_pages"]) > 0 {
        bad(format!(
            "status: {} foreign pages (populated behind the broker's back, not by a registering client)",
            st["broker"]["foreign_pages"]
        ));
    }
    if !s.prefaults() && n(&st["broker"]["prefaulted_pages"]) > 0 {
        bad(format!(
            "status: {} prefaulted pages although no client prefaulted",
            st["broker"]["prefaulted_pages"]
        ));
    }
}

/// Counters that only grow must not shrink between two snapshots.
pub fn check_monotonic(prev: &Value, st: &Value, errs: &mut Vec<String>) {
    for k in ["pages_demand", "pages_background", "faults", "requests", "clients_registered", "foreign_pages"]
    {
        if n(&st["broker"][k]) < n(&prev["broker"][k]) {
            errs.push(format!(
                "status: broker.{k} went down from {} to {}",
                prev["broker"][k], st["broker"][k]
            ));
        }
    }
}

fn registrations_of(c: &ClientPlan) -> usize {
    match c {
        ClientPlan::Pcb(_) | ClientPlan::Private(_) => 1,
        ClientPlan::Vhost(_) | ClientPlan::Dpdk(_) => 2,
    }
}

/// Registrations of the clients that start at Listen, forked children and prefaulting clients
/// (which may be refused) not counted: what `serve --wait-clients` waits for.
pub fn initial_registrations(s: &Scenario) -> usize {
    s.clients
        .iter()
        .filter(|c| !matches!(c, ClientPlan::Pcb(p) if p.prefault.is_some()))
        .map(registrations_of)
        .sum()
}

/// How many registrations client `c` makes (itself, a forked child; a driver and its backend).
pub fn registrations(c: &ClientPlan) -> usize {
    registrations_of(c) + forks(c)
}

/// Whether a pcb-client forks: its child registers with the broker (a FORK event), unless the
/// broker's `postcopy_end` came first and the client had unregistered its ranges.
pub fn forks(c: &ClientPlan) -> usize {
    usize::from(matches!(c, ClientPlan::Pcb(p) if p.postcopy.contains(&Op::Fork)))
}

/// The destination's summary JSON and its "listening: X of Y pages" log line.
pub fn check_migration_end(
    s: &Scenario,
    summary: &Value,
    at_listen: Option<u64>,
    cuts_done: u64,
    registered: Option<(usize, usize)>,
    errs: &mut Vec<String>,
) {
    let total = total_pages(s);
    let want_listen = if s.precopy() { total - dirty_pages(s) } else { 0 };
    match at_listen {
        Some(x) if x != want_listen => errs.push(format!(
            "at Listen the destination had {x} pages, the model says {want_listen} (precopy {}, {} dirty pages)",
            s.precopy(),
            dirty_pages(s)
        )),
        None => errs.push("the destination never logged 'listening: X of Y pages already here'".into()),
        _ => {}
    }
    let precopy = n(&summary["precopy_pages"]);
    if precopy != if s.precopy() { total } else { 0 } {
        errs.push(format!(
            "summary: precopy_pages {precopy}, but precopy sends every one of {total} pages once"
        ));
    }
    let filled = n(&summary["demand_pages"]) + n(&summary["background_pages"]);
    let lacking = total - at_listen.unwrap_or(want_listen);
    let removes = s.has_op(|o| matches!(o, Op::Remove { .. }));
    if (!removes && filled != lacking) || filled < lacking {
        errs.push(format!(
            "summary: demand {} + background {} = {filled} pages filled during postcopy, but {lacking} were missing at Listen",
            summary["demand_pages"], summary["background_pages"]
        ));
    }
    if n(&summary["zero_pages"]) > filled {
        errs.push(format!("summary: zero_pages {} > pages filled {filled}", summary["zero_pages"]));
    }
    let clients = summary["clients"].as_array().map(Vec::as_slice).unwrap_or_default();
    let faults: u64 = clients.iter().map(|c| n(&c["faults"])).sum();
    if faults != n(&summary["faults"]) {
        errs.push(format!("summary: clients' faults sum to {faults}, the broker read {}", summary["faults"]));
    }
    if let Some((least, most)) = registered.filter(|&(l, m)| !(l..=m).contains(&clients.len())) {
        errs.push(format!(
            "summary: {} clients, the scenario registered {least} to {most} (forks after postcopy_end register no child)",
            clients.len()
        ));
    }
    let (pauses, resumes) = (n(&summary["pauses"]), n(&summary["resumes"]));
    // A loss at the very end that the source never came back from (it had read Complete) is the
    // one pause left unresumed; the destination says so (docs/wire-protocol.md, "The end").
    let unresumed_end = u64::from(summary["end"] == "unconfirmed" && pauses == resumes + 1);
    if pauses != resumes + unresumed_end || pauses > cuts_done {
        errs.push(format!(
            "summary: {pauses} pauses and {resumes} resumes after {cuts_done} connection cuts"
        ));
    }
}

/// Broker counters from the status table `serve` prints at its end.
#[derive(Debug, Default)]
pub struct Rendered {
    pub demand: u64,
    pub background: u64,
    pub faults: u64,
    pub foreign: u64,
    /// (kind, faults, requested) per client.
    pub clients: Vec<(String, u64, u64)>,
    pub complete: bool,
}

fn after<'a>(tokens: &[&'a str], key: &str) -> Option<&'a str> {
    tokens.iter().position(|t| *t == key).and_then(|i| tokens.get(i + 1)).copied()
}

/// Parse what `serve` printed when it ended.
pub fn parse_rendered(out: &str) -> Rendered {
    let mut r = Rendered::default();
    for line in out.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        let num = |k: &str| after(&t, k).and_then(|v| v.parse().ok()).unwrap_or(0);
        if line.starts_with("pages: demand") {
            r.demand = num("demand");
            r.background = num("background");
            r.faults = num("faults");
            r.foreign = num("foreign");
        } else if t.first().is_some_and(|x| x.starts_with('#')) && t.contains(&"pid") {
            let kind = t.iter().position(|x| *x == "pid").and_then(|i| i.checked_sub(1)).map(|i| t[i]);
            r.clients.push((kind.unwrap_or("?").to_string(), num("faults"), num("requested")));
        } else if line.starts_with("restore:") {
            r.complete = line.trim_end().ends_with("complete: true");
        }
    }
    r
}

/// The lazy restore's final table.
pub fn check_restore_end(s: &Scenario, r: &Rendered, background: bool, errs: &mut Vec<String>) {
    let total = total_pages(s);
    if !r.complete {
        errs.push("serve did not report the restore complete".into());
    }
    let private: u64 = r.clients.iter().filter(|c| c.0 == "private").map(|c| c.2).sum();
    let removes = s.has_op(|o| matches!(o, Op::Remove { .. }));
    let filled = r.demand + r.background;
    if (!removes && filled != total + private) || filled < total + private {
        errs.push(format!(
            "serve: demand {} + background {} = {filled}, but {total} shared pages and {private} private pages were filled",
            r.demand, r.background
        ));
    }
    if !background && r.background > 0 {
        errs.push(format!("serve --no-background placed {} background pages", r.background));
    }
    let faults: u64 = r.clients.iter().map(|c| c.1).sum();
    let has_private = r.clients.iter().any(|c| c.0 == "private");
    if (!has_private && faults != r.faults) || faults < r.faults {
        errs.push(format!("serve: clients' faults sum to {faults}, the broker read {}", r.faults));
    }
    if !s.prefaults() && r.foreign > 0 {
        errs.push(format!("serve: {} foreign pages (populated behind the broker's back)", r.foreign));
    }
}
