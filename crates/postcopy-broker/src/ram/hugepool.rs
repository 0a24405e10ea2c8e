//! The host's huge page pool as hugetlbfs blocks need it: how many pages of a size exist, are
//! free and are already promised to other mappings (/sys/kernel/mm/hugepages), and the message
//! that tells an operator how many to reserve when a block cannot get its pages.
//!
//! A hugetlbfs block reserves its pages when it is mapped (the broker's placement mapping is not
//! MAP_NORESERVE), so a pool that is too small is refused when the block is created, never later
//! at placement, where the only way out would be to lose the guest.

use std::fs;

/// One huge page size of the host and its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HugePool {
    /// Bytes per page.
    pub size: u64,
    /// Pages in the pool (nr_hugepages).
    pub total: u64,
    /// Pages not allocated (free_hugepages), of which `reserved` are promised to mappings.
    pub free: u64,
    /// Free pages promised to existing mappings (resv_hugepages).
    pub reserved: u64,
}

impl HugePool {
    /// Pages a new mapping can still reserve.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
}

fn read_u64(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Every huge page size of the host, smallest first.
pub fn pools() -> Vec<HugePool> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/sys/kernel/mm/hugepages") else { return out };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(kb) = name.strip_prefix("hugepages-").and_then(|s| s.strip_suffix("kB")) else { continue };
        let Ok(kb) = kb.parse::<u64>() else { continue };
        let base = format!("/sys/kernel/mm/hugepages/{name}");
        out.push(HugePool {
            size: kb.saturating_mul(1024),
            total: read_u64(&format!("{base}/nr_hugepages")).unwrap_or(0),
            free: read_u64(&format!("{base}/free_hugepages")).unwrap_or(0),
            reserved: read_u64(&format!("{base}/resv_hugepages")).unwrap_or(0),
        });
    }
    out.sort_by_key(|h| h.size);
    out
}

/// The pool of `page_size` pages, if the host has that size.
pub fn pool(page_size: u64) -> Option<HugePool> {
    pools().into_iter().find(|p| p.size == page_size)
}

/// What to tell an operator when `needed` pages of `page_size` could not be reserved.
pub fn shortfall(page_size: u64, needed: u64) -> String {
    let kb = page_size / 1024;
    match pool(page_size) {
        Some(p) => {
            let missing = needed.saturating_sub(p.available()).max(1);
            format!(
                "it needs {needed} huge pages of {kb} KiB but only {} of the pool's {} are free and unpromised; reserve at least {missing} more: echo {} > /sys/kernel/mm/hugepages/hugepages-{kb}kB/nr_hugepages",
                p.available(),
                p.total,
                p.total.saturating_add(missing)
            )
        }
        None => format!("this host has no {kb} KiB huge pages (see `postcopy-broker probe`)"),
    }
}
