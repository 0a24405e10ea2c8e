//! pcb-client as a scenario client: a shared client of one block over the control socket, or a
//! Firecracker-style private client. Its command line and script, and the check of what it
//! printed: every page it read must be one the model allows at that point of its script.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::content::fnv;
use super::model::Model;
use super::plan::{Op, PcbPlan, PrivatePlan, Scenario, SMALL};

/// `0,5,7-20` for pcb-client.
fn list(pages: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < pages.len() {
        let mut j = i;
        while j + 1 < pages.len() && pages[j + 1] == pages[j] + 1 {
            j += 1;
        }
        out.push(if j > i { format!("{}-{}", pages[i], pages[j]) } else { pages[i].to_string() });
        i = j + 1;
    }
    out.join(",")
}

/// A step of a shared client (`private`: of a private one, whose memory MADV_REMOVE does not
/// apply to: it frees pages with MADV_DONTNEED, as a balloon in the guest of Firecracker does).
fn step(o: &Op, private: bool) -> String {
    match o {
        Op::Remove { first, count } if private => format!("dontneed:{first}-{}", first + count - 1),
        Op::Touch { pages, all: false } => format!("touch:{}", list(pages)),
        Op::Touch { pages, all: true } => format!("touchall:{}", list(pages)),
        Op::Write { pages, byte } => format!("write:{}:{byte}", list(pages)),
        Op::Remove { first, count } => format!("remove:{first}-{}", first + count - 1),
        Op::Fork => "fork".into(),
    }
}

/// The script: the postcopy steps (started by a line on stdin once every client registered),
/// then `wait` (released once the migration is complete) and the steps after it.
fn script(postcopy: &[Op], after: &[Op], private: bool) -> String {
    let mut v: Vec<String> = postcopy.iter().map(|o| step(o, private)).collect();
    if !after.is_empty() {
        v.push("wait".into());
        v.extend(after.iter().map(|o| step(o, private)));
    }
    v.join(";")
}

fn features(ops: &[Op]) -> String {
    let mut f = Vec::new();
    if ops.iter().any(|o| matches!(o, Op::Remove { .. })) {
        f.push("remove");
    }
    if ops.contains(&Op::Fork) {
        f.push("fork");
    }
    f.join(",")
}

/// The pcb-client command of a shared client.
pub fn shared_command(s: &Scenario, p: &PcbPlan, ctl: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pcb-client"));
    c.arg("--control").arg(ctl).args(["--block", &s.blocks[p.block].name, "--maps", &p.maps.to_string()]);
    c.args(["--features", &features(&p.postcopy), "--script", &script(&p.postcopy, &p.after, false)]);
    if let Some(m) = p.prefault {
        c.args(["--prefault", m.arg()]);
    }
    c
}

/// The pcb-client command of a private (Firecracker-style) client.
pub fn private_command(p: &PrivatePlan, ctl: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pcb-client"));
    c.arg("--control").arg(ctl).args(["--firecracker", "--size", &p.size.to_string()]);
    c.args(["--features", &features(&p.postcopy), "--script", &script(&p.postcopy, &[], true)]);
    c
}

/// What the broker says when it refuses a client that prefaulted shared RAM.
pub const REFUSED_PREFAULT: &str = "were populated before its userfaultfd could catch them";

/// Lines a shared client prints before it waits for the release: ready, then one per step.
pub fn lines_before_wait(p: &PcbPlan) -> usize {
    1 + p.postcopy.len()
}

/// Pages a step's LIST names (as pcb-client parses it).
fn pages_of(arg: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for part in arg.split(',').filter(|s| !s.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => out.extend(a.parse::<u64>().unwrap()..=b.parse::<u64>().unwrap()),
            None => out.push(part.parse().unwrap()),
        }
    }
    out
}

/// What a client's output says: parsed lines, whether its parent finished.
struct Output {
    lines: Vec<Value>,
    done: bool,
}

fn parse(raw: &[String], who: &str, errs: &mut Vec<String>) -> Output {
    let mut lines = Vec::new();
    let mut done = false;
    for l in raw {
        match serde_json::from_str::<Value>(l) {
            Ok(v) => {
                done |= v["who"] == "parent" && v["done"] == true;
                lines.push(v);
            }
            Err(e) => errs.push(format!("{who}: not JSON ({e}): {l}")),
        }
    }
    Output { lines, done }
}

/// Pages whose own mutation a step line records as done.
fn mutated_by(step: &str) -> Vec<u64> {
    let (op, arg) = step.split_once(':').unwrap_or((step, ""));
    match op {
        "write" => pages_of(arg.rsplit_once(':').map_or("", |x| x.0)),
        "remove" => pages_of(arg),
        _ => Vec::new(),
    }
}

/// Check a shared client's reads; returns the number of pages checked. `complete` says whether
/// it ran to its end (it was not killed).
pub fn check_shared(
    i: usize,
    s: &Scenario,
    p: &PcbPlan,
    raw: &[String],
    model: &Model,
    complete: bool,
    errs: &mut Vec<String>,
) -> u64 {
    let who = format!("client #{i} (pcb-client on {})", s.blocks[p.block].name);
    let out = parse(raw, &who, errs);
    if complete && !out.done {
        errs.push(format!("{who} did not print its done line"));
    }
    let mut done: HashSet<u64> = HashSet::new();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for v in &out.lines {
        let Some(step) = v["step"].as_str() else { continue };
        done.extend(mutated_by(step));
        let Some(pages) = v["pages"].as_array() else { continue };
        for pg in pages {
            let n = pg["page"].as_u64().unwrap();
            let got = pg["fnv"].as_str().unwrap_or("");
            let Some(ok) = model.readable(p.block, n, i, done.contains(&n)) else { continue };
            if !ok.iter().any(|f| f == got) {
                wrong.push(format!(
                    "{who} read page {n} (offset {:#x}) in step '{}' ({}, map {}): fnv {got}, the model allows {ok:?}{}",
                    n * s.blocks[p.block].page_size,
                    short(step),
                    v["who"].as_str().unwrap_or("?"),
                    pg["map"],
                    describe_zero(model, p.block, n, got)
                ));
            }
            checked += 1;
        }
    }
    report(wrong, errs);
    checked
}

/// At most a few wrong reads of one client, then how many more.
fn report(mut wrong: Vec<String>, errs: &mut Vec<String>) {
    let n = wrong.len();
    if n > 6 {
        wrong.truncate(6);
        wrong.push(format!("... and {} more wrong reads of this client", n - 6));
    }
    errs.extend(wrong);
}

/// Check a private client's reads against the image and its own changes.
pub fn check_private(i: usize, raw: &[String], model: &Model, complete: bool, errs: &mut Vec<String>) -> u64 {
    let who = format!("client #{i} (private pcb-client)");
    let out = parse(raw, &who, errs);
    if complete && !out.done {
        errs.push(format!("{who} did not print its done line"));
    }
    let image = model.image();
    let ps = SMALL as usize;
    let mut mine: std::collections::HashMap<u64, Vec<u8>> = std::collections::HashMap::new();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for v in &out.lines {
        let Some(step) = v["step"].as_str() else { continue };
        let (op, arg) = step.split_once(':').unwrap_or((step, ""));
        let page = |n: u64| image[n as usize * ps..(n as usize + 1) * ps].to_vec();
        match op {
            "write" => {
                let (l, b) = arg.rsplit_once(':').unwrap();
                let b: u8 = b.parse().unwrap();
                for n in pages_of(l) {
                    let mut pg = mine.remove(&n).unwrap_or_else(|| page(n));
                    pg[..8].fill(b);
                    mine.insert(n, pg);
                }
            }
            "dontneed" => {
                for n in pages_of(arg) {
                    mine.insert(n, vec![0; ps]);
                }
            }
            _ => {}
        }
        let Some(pages) = v["pages"].as_array() else { continue };
        for pg in pages {
            let n = pg["page"].as_u64().unwrap();
            let want = fnv(mine.get(&n).map_or(&page(n)[..], |v| &v[..]));
            let got = pg["fnv"].as_str().unwrap_or("");
            if got != want {
                wrong.push(format!(
                    "{who} read page {n} in step '{}': fnv {got}, expected {want}",
                    short(step)
                ));
            }
            checked += 1;
        }
    }
    report(wrong, errs);
    checked
}

fn short(step: &str) -> String {
    if step.len() > 60 {
        format!("{}...", &step[..60])
    } else {
        step.to_string()
    }
}

/// " (that is an all-zero page; the source's page is not zero)" and the like.
fn describe_zero(model: &Model, b: usize, p: u64, got: &str) -> String {
    let bm = &model.blocks[b];
    let ps = bm.page_size as usize;
    if got == fnv(&vec![0u8; ps]) {
        return " — it read an all-zero page (a silent zero page)".into();
    }
    if got == fnv(&bm.initial[p as usize * ps..(p as usize + 1) * ps]) {
        return " — it read the page as it was before the dirty update".into();
    }
    String::new()
}
