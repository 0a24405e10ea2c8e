//! The byte check of the oracle: once every process has exited, every page of every destination
//! block (read through the memfds the test held) equals the model: the source's page after the
//! last dirty update, with the clients' writes and removes applied (either value for a client
//! that was killed); the bytes of a device's receive buffers are its client's check. The checksum files the broker and the source wrote must agree with it too.

use std::os::fd::AsFd;

use postcopy_broker::migration::verify::{checksum, VerifyReport};
use postcopy_broker::ram::RamBlock;

use super::content::fnv;
use super::launch::Held;
use super::model::{Fate, Model, Mutation};

/// What a wrong page holds, in words.
fn what(got: &[u8], model: &Model, b: usize, p: u64, want: &[Vec<u8>]) -> String {
    let bm = &model.blocks[b];
    let ps = bm.page_size as usize;
    let init = &bm.initial[p as usize * ps..(p as usize + 1) * ps];
    let want_zero = want.iter().any(|w| w.iter().all(|&x| x == 0));
    if got.iter().all(|&x| x == 0) {
        "all zero, a silent zero page".into()
    } else if got == init && init != bm.page(p) {
        "the page as it was before the dirty update".into()
    } else if got == bm.page(p) {
        "the source's page without the client's change".into()
    } else if want_zero {
        "data where the page must be zero".into()
    } else {
        format!("other bytes (fnv {})", fnv(got))
    }
}

/// Compare every page; returns the number of pages checked.
pub fn check_ram(held: &[Held], model: &Model, fate: impl Fn(usize) -> Fate, errs: &mut Vec<String>) -> u64 {
    let mut checked = 0;
    for (b, h) in held.iter().enumerate() {
        let bm = &model.blocks[b];
        if h.name != bm.name || h.size != bm.last.len() as u64 || h.page_size != bm.page_size {
            errs.push(format!(
                "destination block #{b} is {} ({} bytes, page {}), not {}",
                h.name, h.size, h.page_size, bm.name
            ));
            continue;
        }
        let fd = h.fd.as_fd().try_clone_to_owned().unwrap();
        let blk = RamBlock::from_fd(&h.name, fd, h.size, h.page_size).unwrap();
        // SAFETY: every process that could fault on the block has exited; the mapping is this
        // test's own, alive while `blk` is, and only read here.
        let got = unsafe { std::slice::from_raw_parts(blk.host_ptr(), h.size as usize) };
        let ps = h.page_size as usize;
        let mut wrong = Vec::new();
        for (p, page) in got.chunks(ps).enumerate() {
            let want = model.final_page(b, p as u64, &fate);
            let page = match model.mutation(b, p as u64) {
                Some((_, m @ Mutation::Rx { .. })) => &m.predictable(page, bm.page(p as u64))[..],
                _ => page,
            };
            if !want.iter().any(|w| w[..] == *page) {
                wrong.push(format!(
                    "page {p} (offset {:#x}): {}",
                    p * ps,
                    what(page, model, b, p as u64, &want)
                ));
            }
            checked += 1;
        }
        if !wrong.is_empty() {
            let n = wrong.len();
            wrong.truncate(8);
            errs.push(format!(
                "block {}: {n} of {} pages differ from the model: {}",
                h.name,
                got.len() / ps,
                wrong.join("; ")
            ));
        }
    }
    checked
}

/// The final RAM the model expects, when no page is left to chance (no client that may have
/// stopped halfway changes pages).
pub fn exact_final(model: &Model, fate: impl Fn(usize) -> Fate) -> Option<Vec<Vec<u8>>> {
    let mut out: Vec<Vec<u8>> = model.blocks.iter().map(|b| b.last.clone()).collect();
    for (b, p, c, m) in model.mutations() {
        if matches!(m, Mutation::Rx { .. }) {
            // A device's packets: their bytes are the device's client's to check.
            return None;
        }
        match fate(c) {
            Fate::Done => {}
            Fate::Never => continue,
            Fate::Maybe => return None,
        }
        let ps = model.blocks[b].page_size as usize;
        let page = m.apply(model.blocks[b].page(p));
        out[b][p as usize * ps..(p as usize + 1) * ps].copy_from_slice(&page);
    }
    Some(out)
}

/// A verify file (`--verify-file`) against expected block contents.
pub fn check_verify_file(path: &std::path::Path, side: &str, want: &[Vec<u8>], errs: &mut Vec<String>) {
    let report = match VerifyReport::read(path) {
        Ok(r) => r,
        Err(e) => return errs.push(format!("{side}: {e}")),
    };
    let sums: Vec<String> = want.iter().map(|b| format!("{:016x}", checksum(b))).collect();
    for (i, b) in report.blocks.iter().enumerate() {
        if sums.get(i) != Some(&b.checksum) {
            errs.push(format!(
                "{side}'s verify file: block {} checksum {} but the model's is {:?}",
                b.name,
                b.checksum,
                sums.get(i)
            ));
        }
    }
}

/// `serve --checksums` (FNV-1a 64 per block) against expected block contents.
pub fn check_fnv_file(path: &std::path::Path, model: &Model, want: &[Vec<u8>], errs: &mut Vec<String>) {
    let v: serde_json::Value = match std::fs::read(path).map(|t| serde_json::from_slice(&t)) {
        Ok(Ok(v)) => v,
        _ => return errs.push(format!("serve wrote no checksums file at {}", path.display())),
    };
    for (b, data) in model.blocks.iter().zip(want) {
        if v[&b.name] != fnv(data).as_str() {
            errs.push(format!(
                "serve --checksums: block {} is {} but the model's is {}",
                b.name,
                v[&b.name],
                fnv(data)
            ));
        }
    }
}
