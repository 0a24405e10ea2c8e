//! The Firecracker handshake's fuzzing entry point ([`fuzz_firecracker`], the `firecracker`
//! cargo-fuzz target) and the check the control stream target applies to a handshake it
//! accepted: its regions, validated into a [`PrivateTable`], keep the table's promises.

use super::dialect::ServerDecoder;
use super::regions::FcRegion;
use crate::client::{PrivateRegion, PrivateTable};
use crate::control::fuzz::{check_error_reply, fake_fds};
use crate::control::message::Incoming;

/// Image file length the Firecracker target validates regions against (1 GiB).
pub const FUZZ_IMAGE_LEN: u64 = 1 << 30;

/// Fuzz a Firecracker UFFD handshake: `data` is the whole byte stream a Firecracker-like peer
/// sends, with one uffd attached to its first read. It is decoded in one read and again split in
/// two reads: both must accept the same regions or both refuse (the reason may differ: a number
/// at the end of a read is taken as complete, so a split can turn "truncated" into "bad JSON").
/// Accepted regions are validated into a [`PrivateTable`] against an image of [`FUZZ_IMAGE_LEN`]
/// bytes, whose invariants are then checked.
pub fn fuzz_firecracker(data: &[u8]) {
    let whole = firecracker_outcome(&[data]);
    let (a, b) = data.split_at(data.len() / 2);
    let split = firecracker_outcome(&[a, b]);
    if whole != split {
        panic!("the handshake decodes differently in one read and in two: {whole:?} vs {split:?}");
    }
    if let Some(Ok(regions)) = whole {
        check_private(&regions);
    }
}

/// The regions of the first Firecracker handshake on a stream made of `reads` (the first carries
/// one fd), `None` if there was none, `Some(Err)` if the stream failed first.
fn firecracker_outcome(reads: &[&[u8]]) -> Option<Result<Vec<FcRegion>, ()>> {
    let mut dec = ServerDecoder::new();
    for (i, bytes) in reads.iter().enumerate() {
        dec.push(bytes, fake_fds(usize::from(i == 0)));
        loop {
            match dec.next_incoming() {
                Ok(Some(Incoming::Firecracker(regions, _uffd))) => return Some(Ok(regions)),
                Ok(Some(Incoming::Request(..))) => {}
                Ok(None) => break,
                Err(e) => {
                    check_error_reply(&e);
                    return Some(Err(()));
                }
            }
        }
    }
    dec.finish().err().map(|e| {
        check_error_reply(&e);
        Err(())
    })
}

/// Validate Firecracker regions as a private client's table and check what the table promises:
/// sorted disjoint regions inside the image, every page of them translating inside its region and
/// the image, and nothing translating outside them.
pub(crate) fn check_private(regions: &[FcRegion]) {
    let wanted: Vec<PrivateRegion> = regions.iter().map(FcRegion::private).collect();
    let Ok(table) = PrivateTable::new(wanted.clone(), FUZZ_IMAGE_LEN) else { return };
    let got = table.regions();
    if got.len() != wanted.len() {
        panic!("the table holds {} regions, {} were given", got.len(), wanted.len());
    }
    let mut prev_end = 0u64;
    for (i, r) in got.iter().enumerate() {
        if !wanted.contains(r) {
            panic!("region {r:?} was not given");
        }
        let Some(end) = r.client_addr.checked_add(r.len) else { panic!("region {r:?} wraps around") };
        if i > 0 && r.client_addr < prev_end {
            panic!("regions overlap or are unsorted: {got:?}");
        }
        prev_end = end;
        if r.file_offset.checked_add(r.len).is_none_or(|e| e > FUZZ_IMAGE_LEN) {
            panic!("region {r:?} lies outside the image");
        }
        for addr in [r.client_addr, r.client_addr + r.len / 2, end - 1] {
            match table.translate(addr) {
                Some((tr, page, off)) if tr == *r => {
                    if page > addr || addr - page >= r.page_size || (page - r.client_addr) % r.page_size != 0
                    {
                        panic!("address {addr:#x} of {r:?} translated to page {page:#x}");
                    }
                    if off.checked_add(r.page_size).is_none_or(|e| e > r.file_offset + r.len) {
                        panic!("page {page:#x} of {r:?} translated to file offset {off:#x}");
                    }
                }
                other => panic!("address {addr:#x} of {r:?} translated to {other:?}"),
            }
        }
        // The byte before a region is not in it.
        if let Some(before) = r.client_addr.checked_sub(1) {
            if table.translate(before).is_some_and(|(tr, ..)| tr == *r) {
                panic!("address {before:#x} before {r:?} translated into it");
            }
        }
    }
    // Past the last region nothing translates.
    if let Some(last) = got.last() {
        let end = last.client_addr + last.len;
        if table.translate(end).is_some() || table.translate(u64::MAX).is_some() {
            panic!("an address past the last region {last:?} translated");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_point_accepts_valid_and_garbage_input() {
        fuzz_firecracker(
            br#"[{"base_host_virt_addr":1073741824,"size":8192,"offset":4096,"page_size":4096,"page_size_kib":4096}]"#,
        );
        fuzz_firecracker(b"[{\"size\":");
        // Found by the fuzzer: "[1" refuses the number as a region at once, "[11e" waits for more.
        fuzz_firecracker(b"[11e");
        assert_eq!(
            firecracker_outcome(&[
                br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]"#
            ]),
            Some(Ok(vec![FcRegion { base_host_virt_addr: 4096, size: 4096, offset: 0, page_size: 4096 }]))
        );
    }
}
