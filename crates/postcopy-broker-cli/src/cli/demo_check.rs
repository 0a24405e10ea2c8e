//! The demo's data: the source image it generates (pseudo-random pages, every fourth page zero),
//! the disk it prepares (its first sectors mirror a window of guest RAM), and the checks that the
//! destination's RAM and the disk hold what the source implies.

use postcopy_broker::conv::usize_of;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use postcopy_broker::error::{Error, IoContext, Result};

/// Bytes per page of the demo's RAM.
pub const PAGE: u64 = 4096;
/// Disk sectors that mirror guest RAM (2 MiB).
pub const MIRROR_SECTORS: u64 = 4096;

/// The content of page `index` of the image: zero for every fourth page, else pseudo-random.
pub fn page_content(seed: u64, index: u64, out: &mut [u8]) {
    if index % 4 == 3 {
        out.fill(0);
        return;
    }
    let mut x = seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for chunk in out.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let v = (z ^ (z >> 31)).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Write the `size`-byte image to `path`.
pub fn write_image(path: &Path, size: u64, seed: u64) -> Result<()> {
    let f = File::create(path).ctx(|| format!("create {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut page = vec![0u8; usize_of(PAGE)];
    for i in 0..size / PAGE {
        page_content(seed, i, &mut page);
        w.write_all(&page).ctx(|| format!("write {}", path.display()))?;
    }
    w.flush().ctx(|| format!("write {}", path.display()))
}

/// Create the `size`-byte disk (sparse) whose first [`MIRROR_SECTORS`] sectors hold the image
/// at `mirror_gpa`.
pub fn write_disk(path: &Path, size: u64, seed: u64, mirror_gpa: u64) -> Result<()> {
    let mut f = File::create(path).ctx(|| format!("create {}", path.display()))?;
    let mut page = vec![0u8; usize_of(PAGE)];
    for i in 0..MIRROR_SECTORS * 512 / PAGE {
        page_content(seed, mirror_gpa / PAGE + i, &mut page);
        f.write_all(&page).ctx(|| format!("write {}", path.display()))?;
    }
    f.set_len(size).ctx(|| format!("size {}", path.display()))
}

/// FNV-1a 64 continued from `h`.
pub fn fnv1a64(h: u64, data: &[u8]) -> u64 {
    data.iter().fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The FNV-1a 64 offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// What the disk check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskCheck {
    /// The mirror sectors still equal the image (reads into RAM must not change the disk).
    pub mirror_ok: bool,
    /// Logged writes whose sectors equal the image page they were written from.
    pub writes_ok: u64,
    /// Logged writes that differ (with the first few described).
    pub writes_bad: Vec<String>,
    /// The bounce-buffer region's checksum equals what the driver read back.
    pub bounce_ok: bool,
}

impl DiskCheck {
    /// Whether everything matched.
    pub fn ok(&self) -> bool {
        self.mirror_ok && self.writes_bad.is_empty() && self.bounce_ok
    }
}

fn read_at(f: &mut File, offset: u64, buf: &mut [u8]) -> Result<()> {
    f.seek(SeekFrom::Start(offset)).ctx(|| "seek the disk".into())?;
    f.read_exact(buf).ctx(|| format!("read the disk at {offset}"))
}

/// Check the disk against the image (by `seed`) and the driver's JSON summary.
pub fn check_disk(disk: &Path, seed: u64, driver: &serde_json::Value) -> Result<DiskCheck> {
    let mut f = File::open(disk).ctx(|| format!("open {}", disk.display()))?;
    let pc = &driver["postcopy"];
    let num = |v: &serde_json::Value, what: &str| {
        v.as_u64().ok_or_else(|| Error::Invalid(format!("the driver's summary has no number {what}")))
    };
    let mirror_gpa = num(&pc["mirror_gpa"], "postcopy.mirror_gpa")?;
    let mut out = DiskCheck { mirror_ok: true, ..DiskCheck::default() };
    let (mut got, mut want) = (vec![0u8; usize_of(PAGE)], vec![0u8; usize_of(PAGE)]);
    for i in 0..MIRROR_SECTORS * 512 / PAGE {
        read_at(&mut f, i * PAGE, &mut got)?;
        page_content(seed, mirror_gpa / PAGE + i, &mut want);
        if got != want {
            out.mirror_ok = false;
        }
    }
    for w in pc["writes"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let (gpa, sector) = (num(&w[0], "write gpa")?, num(&w[1], "write sector")?);
        read_at(&mut f, sector * 512, &mut got)?;
        page_content(seed, gpa / PAGE, &mut want);
        if got == want {
            out.writes_ok += 1;
        } else if out.writes_bad.len() < 5 {
            out.writes_bad.push(format!("sector {sector} (from guest page {gpa:#x})"));
        }
    }
    let first = num(&driver["first_sector"], "first_sector")?;
    let sectors = num(&driver["sectors"], "sectors")?;
    let mut region = vec![0u8; usize_of(sectors * 512)];
    read_at(&mut f, first * 512, &mut region)?;
    let sum = format!("{:#018x}", fnv1a64(FNV_OFFSET, &region));
    out.bounce_ok = driver["checksum"].as_str() == Some(sum.as_str());
    Ok(out)
}

/// Per-block checksums from a `--verify-file` JSON ({"blocks": [{"name", "checksum"}]}).
pub fn block_checksums(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read(path).ctx(|| format!("read {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::Invalid(format!("{} is not JSON: {e}", path.display())))?;
    let blocks =
        v["blocks"].as_array().ok_or_else(|| Error::Invalid(format!("{} has no blocks", path.display())))?;
    Ok(blocks
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or_default().to_string(),
                b["checksum"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_differ_and_every_fourth_is_zero() {
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        page_content(1, 0, &mut a);
        page_content(1, 1, &mut b);
        assert_ne!(a, b);
        assert!(a.iter().any(|&x| x != 0));
        page_content(1, 3, &mut b);
        assert!(b.iter().all(|&x| x == 0));
        page_content(2, 0, &mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn disk_check_finds_a_bad_write() {
        let dir = std::env::temp_dir().join(format!("pcb-demo-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk");
        write_disk(&disk, 8 << 20, 7, 0x10_0000).unwrap();
        // A logged write of guest page 5 at sector 5000, and the bounce region at 6000+8.
        let mut page = vec![0u8; 4096];
        page_content(7, 5, &mut page);
        let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.seek(SeekFrom::Start(5000 * 512)).unwrap();
        f.write_all(&page).unwrap();
        let bounce = format!("{:#018x}", fnv1a64(FNV_OFFSET, &[0u8; 4096]));
        let mut drv = serde_json::json!({
            "postcopy": {"mirror_gpa": 0x10_0000, "writes": [[5 * 4096, 5000, 8]]},
            "first_sector": 6000, "sectors": 8, "checksum": bounce,
        });
        let c = check_disk(&disk, 7, &drv).unwrap();
        assert!(c.ok(), "{c:?}");
        assert_eq!(c.writes_ok, 1);
        drv["postcopy"]["writes"] = serde_json::json!([[6 * 4096, 5000, 8]]);
        let c = check_disk(&disk, 7, &drv).unwrap();
        assert!(!c.ok());
        assert_eq!(c.writes_bad.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
