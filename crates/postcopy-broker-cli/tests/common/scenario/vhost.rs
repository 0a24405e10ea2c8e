//! A vhost-user-blk device as a scenario client: a backend (the example or qemu-storage-daemon)
//! on a disk whose first sectors mirror the source's final RAM at the plan's guest address, and
//! examples/guest_driver.rs playing the VMM over the broker's control socket. It checks the
//! driver's summary: POSTCOPY_END went through, the mirror is unchanged, every logged write holds
//! the guest page it came from, and the RAM the driver read through its own mapping.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::content::fnv;
use super::model::Model;
use super::plan::{Backend, Scenario, VhostPlan};

/// Disk size of every device.
pub const DISK: u64 = 64 << 20;

fn examples_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("examples")
}

/// `len` bytes of the source's final RAM at guest address `gpa` (blocks back to back).
pub fn guest_bytes(s: &Scenario, model: &Model, gpa: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut base = 0;
    for (i, b) in s.blocks.iter().enumerate() {
        let (lo, hi) = (gpa.max(base), (gpa + len).min(base + b.size));
        if lo < hi {
            out.extend_from_slice(&model.blocks[i].last[(lo - base) as usize..(hi - base) as usize]);
        }
        base += b.size;
    }
    out
}

/// Write the device's disk: the mirror, zeros after it.
pub fn write_disk(path: &Path, s: &Scenario, model: &Model, v: &VhostPlan) {
    let mut disk = vec![0u8; DISK as usize];
    let m = guest_bytes(s, model, v.mirror_gpa, v.mirror_sectors * 512);
    disk[..m.len()].copy_from_slice(&m);
    std::fs::write(path, disk).unwrap();
}

/// The backend's command, serving `disk` on `sock`.
pub fn backend_command(v: &VhostPlan, sock: &Path, disk: &Path) -> Command {
    match v.backend {
        Backend::Qsd => {
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev").arg(format!("driver=file,node-name=disk,filename={}", disk.display()));
            c.arg("--export").arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ));
            c
        }
        Backend::Ours => {
            let mut c = Command::new(examples_dir().join("vhost_user_blk"));
            c.arg("--socket").arg(sock).arg("--disk").arg(disk).args(["--size", &DISK.to_string()]);
            c
        }
    }
}

/// The guest driver's command.
pub fn driver_command(v: &VhostPlan, sock: &Path, ctl: &Path) -> Command {
    let mut c = Command::new(examples_dir().join("guest_driver"));
    c.arg("--socket").arg(sock).arg("--control").arg(ctl);
    c.args(["--json", "--until-complete", "--touch-all", "--requests", "8", "--wait-registered"]);
    c.args(["--mirror-gpa", &v.mirror_gpa.to_string(), "--mirror-sectors", &v.mirror_sectors.to_string()]);
    c.args(["--io-range", &format!("{}+{}", v.io_gpa, v.io_len), "--postcopy-ops", &v.ops.to_string()]);
    c
}

/// Check the driver's summary line and the disk; returns the number of guest pages checked.
/// RAM as the driver read it must equal the source when no client changes any page.
pub fn check(
    i: usize,
    s: &Scenario,
    v: &VhostPlan,
    lines: &[String],
    disk: &Path,
    model: &Model,
    errs: &mut Vec<String>,
) -> u64 {
    let who = format!("client #{i} (guest driver + {:?} backend)", v.backend);
    let Some(summary) = lines.iter().rev().find_map(|l| serde_json::from_str::<Value>(l).ok()) else {
        errs.push(format!("{who} printed no summary"));
        return 0;
    };
    if summary["postcopy_end"] != "ok" {
        errs.push(format!("{who}: POSTCOPY_END to the backend: {}", summary["postcopy_end"]));
    }
    let disk = std::fs::read(disk).unwrap();
    let m = (v.mirror_sectors * 512) as usize;
    if disk[..m] != guest_bytes(s, model, v.mirror_gpa, m as u64)[..] {
        errs.push(format!("{who}: the disk's mirror of guest RAM changed"));
    }
    let mut checked = 0;
    for w in summary["postcopy"]["writes"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let (gpa, sector) = (w[0].as_u64().unwrap(), w[1].as_u64().unwrap() as usize);
        let want = guest_bytes(s, model, gpa, 4096);
        if disk[sector * 512..sector * 512 + 4096] != want[..] {
            let got = &disk[sector * 512..sector * 512 + 4096];
            let zero = if got.iter().all(|&b| b == 0) { " (all zero: a silent zero page)" } else { "" };
            errs.push(format!(
                "{who}: the write of guest page {gpa:#x} logged at sector {sector} holds other bytes than the source's page{zero}"
            ));
        }
        checked += 1;
    }
    checked += summary["postcopy"]["reads"].as_array().map_or(0, |r| r.len() as u64);
    if model.mutations().next().is_none() {
        for (b, bm) in model.blocks.iter().enumerate() {
            let got = summary["ram_checksums"][&bm.name]["fnv"].as_str().unwrap_or("none");
            if got != fnv(&bm.last) {
                errs.push(format!(
                    "{who}: block {} as the driver read it (touch-all) differs from the source (fnv {got})",
                    s.blocks[b].name
                ));
            }
            checked += s.blocks[b].pages();
        }
    }
    checked
}
