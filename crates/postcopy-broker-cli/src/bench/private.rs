//! Private-fault case (`--cases private`): a pcb-client process with private anonymous memory (4
//! KiB pages, or hugetlb 2 MiB pages) registered as a private (Firecracker-style) client reads one
//! byte of each page in order, timing every access, while the broker serves every fault from its
//! image file; against bench/private_fault.c, a C handler that serves the same client the same way
//! (one UFFDIO_COPY per fault from its read-only mapping of the same image). Both run in the same
//! invocation, alternating, pinned the same way, in both modes (blocking, busy-polling). For 2
//! MiB pages the C handler also runs with `populate` (MADV_POPULATE_READ of the source first, as
//! the broker does): the floor of the broker's own method.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::bench::demand::DemandFigures;
use crate::bench::peer::Peer;
use crate::bench::reference::{Figures, Reference};
use crate::bench::report::{Row, Target};
use crate::bench::sys::{self, Placement};
use postcopy_broker::error::{Error, Result};
use postcopy_broker::fault::{Broker, BrokerConfig};
use postcopy_broker::incoming::Incoming;
use postcopy_broker::ram::{RamBlock, RamBlocks};
use postcopy_broker::source::MemorySource;

/// The C reference's default place: bench/private_fault.c in the project.
pub fn default_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/private_fault.c")
}

/// What one measurement is: page size, number of pages, blocking or busy-polling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrivateCase {
    /// Page size of the client's memory (4096 or 2 MiB).
    pub page_size: u64,
    /// Pages the client touches.
    pub pages: usize,
    /// Broker busy-polls (reference: mode=spin).
    pub busy_poll: bool,
}

impl PrivateCase {
    fn bytes(&self) -> u64 {
        self.page_size * self.pages as u64
    }

    fn size_name(&self) -> &'static str {
        if self.page_size == 4096 {
            "4 KiB"
        } else {
            "2 MiB"
        }
    }

    fn mode(&self) -> &'static str {
        if self.busy_poll {
            "busy-poll"
        } else {
            "blocking"
        }
    }
}

/// A snapshot image for the case: pseudo-random bytes, the first byte of every 4 KiB page non-zero
/// (so no page is a zero page and every fault is a copy).
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    /// The first byte of every 4 KiB page.
    firsts: Vec<u8>,
}

impl Image {
    /// Write `bytes` (a multiple of 4 KiB) of image to `path`.
    pub fn create(path: &Path, bytes: u64) -> Result<Image> {
        let pages = usize::try_from(bytes / 4096).map_err(|_| Error::Invalid("image too large".into()))?;
        let mut f =
            std::fs::File::create(path).map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut page = vec![0u8; 4096];
        let mut firsts = Vec::with_capacity(pages);
        for _ in 0..pages {
            for c in page.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            page[0] = page[0].max(1);
            firsts.push(page[0]);
            f.write_all(&page).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
        }
        Ok(Image { path: path.to_path_buf(), firsts })
    }

    /// The sum of the first byte of each page of `case` (what its client's checksum must be).
    pub fn checksum(&self, case: &PrivateCase) -> u64 {
        let step = (case.page_size / 4096) as usize;
        self.firsts.iter().step_by(step).take(case.pages).map(|&b| u64::from(b)).sum()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Pre-touch as much memory as the client will get: anonymous memory for 4 KiB pages, huge pages
/// (mapped, written and returned to the pool) for 2 MiB ones, as private_fault.c does.
fn warm(case: &PrivateCase) -> Result<()> {
    let n = usize::try_from(case.bytes()).map_err(|_| Error::Invalid("case too large".into()))?;
    if case.page_size == 4096 {
        return sys::warm_memory(n);
    }
    let len = std::num::NonZeroUsize::new(n).ok_or_else(|| Error::Invalid("no pages".into()))?;
    use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};
    let flags = MapFlags::MAP_PRIVATE | MapFlags::MAP_HUGETLB | MapFlags::MAP_HUGE_2MB;
    // SAFETY: a fresh anonymous mapping aliases no Rust object; it is written and unmapped here.
    let p = unsafe { mmap_anonymous(None, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, flags) }
        .map_err(|e| {
            Error::io(
                format!("map {} huge pages (see HugePages_Free in /proc/meminfo)", case.pages),
                e.into(),
            )
        })?;
    // SAFETY: the mapping is `n` writable bytes; touching it faults in huge pages, or SIGBUS if
    // the pool empties meanwhile (mmap of MAP_HUGETLB|MAP_PRIVATE reserved them).
    unsafe { std::ptr::write_bytes(p.as_ptr().cast::<u8>(), 1, n) };
    // SAFETY: the mapping made above, unmapped once.
    unsafe { munmap(p, n) }.map_err(|e| Error::io("munmap", e.into()))
}

/// One broker run: the fault loop serves a pcb-client private client from `image`; the client is
/// pinned to `client_cpus` (the broker's thread inherits the caller's affinity).
pub fn run_broker(
    exe: &Path,
    client_cpus: &[usize],
    image: &Image,
    case: &PrivateCase,
) -> Result<DemandFigures> {
    warm(case)?;
    let mut blocks = RamBlocks::new();
    blocks.add(RamBlock::memfd("unused", 4096)?)?;
    let mut inc = Incoming::new(blocks);
    inc.advise()?;
    inc.listen()?;
    let config =
        BrokerConfig { busy_poll: case.busy_poll, image: Some(image.path.clone()), ..Default::default() };
    let h = Broker::spawn(&inc, Box::new(MemorySource::new(vec![(vec![0; 4096], 4096)])), config)?;
    let script = format!("timed:0-{}", case.pages - 1);
    let mut p = Peer::spawn_private(exe, case.bytes(), case.page_size, &script, client_cpus)?;
    p.register_private(&h, "bench-private", case.page_size)?;
    p.go()?;
    let lines = p.finish()?;
    let st = h.stop()?;
    let t = lines
        .iter()
        .find_map(|l| l.get("timed"))
        .ok_or_else(|| Error::Invalid("the client printed no timed figures".into()))?;
    let (sum, want) = (t["checksum"].as_u64().unwrap_or(0), image.checksum(case));
    if sum != want {
        return Err(Error::Invalid(format!(
            "the private client read wrong bytes: checksum {sum}, want {want}"
        )));
    }
    if st.broker.pages_demand != case.pages as u64 {
        return Err(Error::Invalid(format!(
            "the broker placed {} pages for {} faults",
            st.broker.pages_demand, case.pages
        )));
    }
    DemandFigures::from_json(t)
}

/// One reference run of private_fault.c over the same image and case (with `populate`: the
/// handler populates each source range first). Returns us per fault and p50.
pub fn run_reference(
    refp: &Reference,
    p: &Placement,
    image: &Image,
    case: &PrivateCase,
    populate: bool,
) -> Result<(f64, f64)> {
    let mode = if case.busy_poll { "spin" } else { "poll" };
    let mut args = vec![
        image.path.display().to_string(),
        case.page_size.to_string(),
        case.pages.to_string(),
        mode.into(),
    ];
    if populate {
        args.push("populate".into());
    }
    let f: Figures = refp.run_args(p, &args)?;
    let get = |k: &str| {
        f.get(&format!("private {mode}"), k)
            .ok_or_else(|| Error::Invalid(format!("private_fault.c printed no {k}")))
    };
    // A sum of bytes, far below 2^53, so exact in the f64 it was parsed into; a float's `as`
    // saturates, and a wrong value fails the comparison below.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let sum = get("checksum")? as u64;
    if sum != image.checksum(case) {
        return Err(Error::Invalid(format!("private_fault.c read wrong bytes: checksum {sum}")));
    }
    Ok((get("us_per_fault")?, get("p50")?))
}

/// The rows of one placement and case: us per fault and p50, broker beside the C handler.
#[derive(Debug)]
pub struct PrivateRows {
    case: PrivateCase,
    placement: Placement,
    per_fault: Row,
    p50: Row,
    /// 2 MiB pages: against the C handler that populates its source first.
    populated: Option<Row>,
}

impl PrivateRows {
    /// Empty rows of `case` at `placement`.
    pub fn new(case: PrivateCase, placement: Placement) -> PrivateRows {
        let (n, m) = (placement.describe(), case.mode());
        let what = format!("private fault, {} pages", case.size_name());
        PrivateRows {
            per_fault: Row::new(
                &format!("{what}, us/fault (ref: private_fault.c)"),
                &n,
                m,
                Target::RatioAtMost(1.25),
                2,
            )
            .with_reference(),
            p50: Row::new(
                &format!("{what}, p50 us (ref: private_fault.c)"),
                &n,
                m,
                Target::RatioAtMost(1.25),
                2,
            )
            .with_reference(),
            populated: (case.page_size > 4096).then(|| {
                let case = format!("{what}, us/fault (ref: private_fault.c populate, the broker's method)");
                Row::new(&case, &n, m, Target::None, 2).with_reference()
            }),
            case,
            placement,
        }
    }

    /// "4 KiB pages, blocking, same core (client cpu 0, broker cpu 0)".
    pub fn describe(&self) -> String {
        format!("{} pages, {}, {}", self.case.size_name(), self.case.mode(), self.placement.describe())
    }

    /// One alternation: the C handler, then the broker.
    pub fn run_once(&mut self, refp: &Reference, client: &Path, image: &Image) -> Result<()> {
        let (us, p50) = run_reference(refp, &self.placement, image, &self.case, false)?;
        if let (Some(a), Some(b)) = (self.per_fault.reference.as_mut(), self.p50.reference.as_mut()) {
            a.push(us);
            b.push(p50);
        }
        if let Some(r) = self.populated.as_mut().and_then(|r| r.reference.as_mut()) {
            r.push(run_reference(refp, &self.placement, image, &self.case, true)?.0);
        }
        let old = sys::pin(&self.placement.broker)?;
        let d = run_broker(client, &self.placement.client, image, &self.case);
        sys::set_affinity(&old)?;
        let d = d?;
        self.per_fault.ours.push(d.us_per_fault);
        self.p50.ours.push(d.p50);
        if let Some(r) = self.populated.as_mut() {
            r.ours.push(d.us_per_fault);
        }
        Ok(())
    }

    /// The rows.
    pub fn rows(self) -> Vec<Row> {
        let mut v = vec![self.per_fault, self.p50];
        v.extend(self.populated);
        v
    }
}
