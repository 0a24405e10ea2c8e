//! Draw one scenario from a seed: the cross product of migration or restore, precopy, dirty
//! ranges, zero-page density, page sizes, one or two blocks, client kinds and their steps,
//! connection cuts and a client kill. Pages that clients write or remove are handed out so that
//! no two clients mutate the same page and no client mutates the pages a guest driver's I/O
//! uses or DPDK writes packets into, which keeps the model exact.

use std::collections::HashSet;

use super::dpdk;
use super::plan::*;
use super::rng::Rng;

/// Pages (block, page) nobody may mutate, and those already handed to a client.
struct Pages {
    taken: HashSet<(usize, u64)>,
}

impl Pages {
    fn free(&self, b: usize, p: u64) -> bool {
        !self.taken.contains(&(b, p))
    }

    fn take(&mut self, b: usize, p: u64) {
        self.taken.insert((b, p));
    }

    /// The pages (block, page) of `blocks` overlapping guest range `[gpa, gpa+len)`.
    fn of_gpa(blocks: &[BlockPlan], gpa: u64, len: u64) -> Vec<(usize, u64)> {
        let mut v = Vec::new();
        let mut base = 0;
        for (i, b) in blocks.iter().enumerate() {
            let (s, e) = (gpa.max(base), (gpa + len).min(base + b.size));
            if s < e {
                v.extend(((s - base) / b.page_size..=(e - 1 - base) / b.page_size).map(|p| (i, p)));
            }
            base += b.size;
        }
        v
    }

    /// Mark every page of `blocks` overlapping guest range `[gpa, gpa+len)` as taken.
    fn take_gpa(&mut self, blocks: &[BlockPlan], gpa: u64, len: u64) {
        for (b, p) in Pages::of_gpa(blocks, gpa, len) {
            self.take(b, p);
        }
    }

    /// Whether no page overlapping guest range `[gpa, gpa+len)` is taken.
    fn free_gpa(&self, blocks: &[BlockPlan], gpa: u64, len: u64) -> bool {
        Pages::of_gpa(blocks, gpa, len).into_iter().all(|(b, p)| self.free(b, p))
    }
}

fn draw_blocks(r: &mut Rng) -> Vec<BlockPlan> {
    let n = if r.chance(55) { 1 } else { 2 };
    let mut out: Vec<BlockPlan> = Vec::new();
    for i in 0..n {
        let huge = r.chance(30);
        let (page_size, size) =
            if huge { (HUGE, r.pick(&[4u64, 8, 16]) << 20) } else { (SMALL, r.pick(&[8u64, 16, 32]) << 20) };
        let zeros = [Zeros::None, Zeros::Sparse, Zeros::Dense, Zeros::Runs][r.weighted(&[15, 30, 25, 30])];
        out.push(BlockPlan { name: format!("ram{i}"), size, page_size, zeros });
    }
    out
}

fn draw_dirty(r: &mut Rng, blocks: &[BlockPlan], source: SourceKind) -> Vec<DirtyPlan> {
    let n = [0, 1, 2, 4][r.weighted(&[35, 25, 20, 20])];
    (0..n)
        .map(|_| {
            let block = r.below(blocks.len() as u64) as usize;
            let b = &blocks[block];
            let pages = if b.page_size == HUGE {
                r.range(1, 2)
            } else if r.chance(15) {
                512
            } else {
                r.range(1, 64)
            };
            let pages = pages.min(b.pages());
            let first = r.below(b.pages() - pages + 1);
            let fill = match source {
                SourceKind::Image => DirtyFill::Invert,
                SourceKind::Memfd => r.pick(&[DirtyFill::Invert, DirtyFill::Random, DirtyFill::Zero]),
            };
            DirtyPlan { block, first, pages, fill }
        })
        .collect()
}

fn draw_mode(r: &mut Rng, blocks: &[BlockPlan]) -> Mode {
    if r.chance(25) {
        return Mode::Restore { background: r.chance(60) };
    }
    let source = if r.chance(50) { SourceKind::Image } else { SourceKind::Memfd };
    let ncuts = [0, 1, 2][r.weighted(&[70, 20, 10])];
    // Cuts land while postcopy runs: early, and with the background slowed down.
    let mut cuts_ms: Vec<u64> = (0..ncuts).map(|_| r.below(100)).collect();
    cuts_ms.sort_unstable();
    let mut bandwidth_mib = if r.chance(40) { None } else { Some(r.pick(&[64, 128, 256])) };
    if ncuts > 0 {
        bandwidth_mib = Some(bandwidth_mib.unwrap_or(64).min(64));
    }
    let precopy = r.chance(60);
    let dirty = draw_dirty(r, blocks, source);
    // Drawn last, so the other dimensions of every seed stay what they were.
    let streams = [1, 2, 3][r.weighted(&[40, 40, 20])];
    Mode::Migration { precopy, source, dirty, bandwidth_mib, streams, cuts_ms, end_cut: None }
}

/// The page numbers a client reads: zero pages, dirtied pages, random pages and a run.
fn touch_list(r: &mut Rng, s: &Scenario, block: usize, zero: &[u64], max: u64) -> Vec<u64> {
    let b = &s.blocks[block];
    let dirty: Vec<u64> =
        s.dirty().iter().filter(|d| d.block == block).flat_map(|d| d.first..d.first + d.pages).collect();
    let n = r.range(1, max.min(b.pages()));
    let mut v = Vec::new();
    while (v.len() as u64) < n {
        match r.weighted(&[3, 2, 3, 2]) {
            0 if !zero.is_empty() => v.push(zero[r.below(zero.len() as u64) as usize]),
            1 if !dirty.is_empty() => v.push(dirty[r.below(dirty.len() as u64) as usize]),
            3 => {
                let len = r.range(1, 16).min(n - v.len() as u64).min(b.pages());
                let start = r.below(b.pages() - len + 1);
                v.extend(start..start + len);
            }
            _ => v.push(r.below(b.pages())),
        }
    }
    let mut seen = HashSet::new();
    v.retain(|p| seen.insert(*p));
    v
}

/// Up to `n` free pages of `block` for one client, taken.
fn own_pages(r: &mut Rng, pages: &mut Pages, block: usize, total: u64, n: u64) -> Vec<u64> {
    let mut v = Vec::new();
    for _ in 0..n * 8 {
        if v.len() as u64 == n {
            break;
        }
        let p = r.below(total);
        if pages.free(block, p) {
            pages.take(block, p);
            v.push(p);
        }
    }
    v
}

/// A free contiguous run of up to `n` pages, taken.
fn own_run(r: &mut Rng, pages: &mut Pages, block: usize, total: u64, n: u64) -> Option<(u64, u64)> {
    for _ in 0..32 {
        let n = n.min(total);
        let first = r.below(total - n + 1);
        if (first..first + n).all(|p| pages.free(block, p)) {
            for p in first..first + n {
                pages.take(block, p);
            }
            return Some((first, n));
        }
    }
    None
}

fn draw_vhost(r: &mut Rng, blocks: &[BlockPlan], pages: &mut Pages) -> VhostPlan {
    let backend = if r.chance(55) { Backend::Ours } else { Backend::Qsd };
    let gpa_of = |i: usize| blocks[..i].iter().map(|b| b.size).sum::<u64>();
    let mb = r.below(blocks.len() as u64) as usize;
    let mirror_sectors = r.pick(&[1024u64, 2048, 4096]);
    let mirror_len = mirror_sectors * 512;
    let mirror_gpa = gpa_of(mb) + r.below((blocks[mb].size - mirror_len) / SMALL + 1) * SMALL;
    let ib = r.below(blocks.len() as u64) as usize;
    let io_len = (r.range(1, 4) << 20).min(blocks[ib].size);
    let mut io_gpa = gpa_of(ib);
    for _ in 0..16 {
        io_gpa = gpa_of(ib) + r.below((blocks[ib].size - io_len) / SMALL + 1) * SMALL;
        if io_gpa + io_len <= mirror_gpa || mirror_gpa + mirror_len <= io_gpa {
            break;
        }
    }
    pages.take_gpa(blocks, mirror_gpa, mirror_len);
    pages.take_gpa(blocks, io_gpa, io_len);
    VhostPlan { backend, mirror_gpa, mirror_sectors, io_gpa, io_len, ops: r.pick(&[16, 64, 256]) }
}

/// testpmd writing into net_driver's receive buffers: the first driver seed whose buffers lie in
/// free pages (the devices' pages are taken before), or none.
fn draw_dpdk(r: &mut Rng, blocks: &[BlockPlan], pages: &mut Pages) -> Option<DpdkPlan> {
    let n = r.pick(&[4u64, 8, 16]);
    let ram: u64 = blocks.iter().map(|b| b.size).sum();
    let first = r.range(1, 1 << 20);
    let seed = (first..first + 256)
        .find(|&seed| dpdk::buffers(seed, n, ram).iter().all(|b| pages.free_gpa(blocks, b.gpa, b.len)))?;
    let bufs = dpdk::buffers(seed, n, ram);
    for b in &bufs {
        pages.take_gpa(blocks, b.gpa, b.len);
    }
    Some(DpdkPlan { seed, bufs })
}

fn draw_pcb(r: &mut Rng, s: &Scenario, pages: &mut Pages, zero: &[Vec<u64>]) -> PcbPlan {
    let block = r.below(s.blocks.len() as u64) as usize;
    let b = &s.blocks[block];
    let maps = if r.chance(20) { 2 } else { 1 };
    let max_touch = if b.page_size == HUGE { 4 } else { 48 };
    let mut postcopy = Vec::new();
    let mut forked = false;
    for _ in 0..r.range(1, 5) {
        match r.weighted(&[50, 25, 10, 5]) {
            1 => {
                let n = if b.page_size == HUGE { r.range(1, 2) } else { r.range(1, 16) };
                let own = own_pages(r, pages, block, b.pages(), n);
                if !own.is_empty() {
                    postcopy.push(Op::Write { pages: own, byte: r.range(1, 255) as u8 });
                }
            }
            2 => {
                let n = r.range(1, 4);
                if let Some((first, count)) = own_run(r, pages, block, b.pages(), n) {
                    postcopy.push(Op::Remove { first, count });
                }
            }
            3 if !forked => {
                forked = true;
                postcopy.push(Op::Fork);
            }
            _ => postcopy.push(Op::Touch {
                pages: touch_list(r, s, block, &zero[block], max_touch),
                all: maps > 1 && r.chance(50),
            }),
        }
    }
    let prefault = r.chance(8).then(|| r.pick(&[Prefault::Mlock, Prefault::Populate, Prefault::Touch]));
    if prefault == Some(Prefault::Mlock) {
        // MADV_REMOVE refuses locked pages (EINVAL); such a client frees nothing. Its pages
        // stay taken.
        postcopy.retain(|o| !matches!(o, Op::Remove { .. }));
    }
    PcbPlan { block, maps, prefault, postcopy, after: Vec::new(), finisher: false }
}

fn draw_private(r: &mut Rng, s: &Scenario) -> PrivatePlan {
    let size = (r.pick(&[4u64, 8]) << 20).min(s.total_size());
    let pages = size / SMALL;
    let mut mine: HashSet<u64> = HashSet::new();
    let mut postcopy = Vec::new();
    for _ in 0..r.range(1, 5) {
        match r.weighted(&[55, 30, 15]) {
            1 => {
                let own: Vec<u64> =
                    (0..r.range(1, 16)).map(|_| r.below(pages)).filter(|p| mine.insert(*p)).collect();
                if !own.is_empty() {
                    postcopy.push(Op::Write { pages: own, byte: r.range(1, 255) as u8 });
                }
            }
            2 => {
                let count = r.range(1, 4);
                let first = r.below(pages - count + 1);
                if (first..first + count).all(|p| mine.insert(p)) {
                    postcopy.push(Op::Remove { first, count });
                }
            }
            _ => {
                let n = r.range(1, 48);
                let mut v: Vec<u64> = (0..n).map(|_| r.below(pages)).collect();
                let mut seen = HashSet::new();
                v.retain(|p| seen.insert(*p));
                postcopy.push(Op::Touch { pages: v, all: false });
            }
        }
    }
    PrivatePlan { size, postcopy }
}

/// Which pages of each block hold zeros in the source's initial RAM (see `content`).
pub type ZeroPages = Vec<Vec<u64>>;

/// Draw the scenario of `seed`. `zero_pages` gives the zero pages of the drawn blocks (the
/// content module decides them), so reads can aim at them.
pub fn draw(seed: u64, zero_pages: impl Fn(u64, &[BlockPlan]) -> ZeroPages) -> Scenario {
    let mut r = Rng::new(seed);
    let blocks = draw_blocks(&mut r.fork());
    let mode = draw_mode(&mut r.fork(), &blocks);
    let mut s = Scenario { seed, mode, blocks, clients: Vec::new(), kill: None };
    let zero = zero_pages(seed, &s.blocks);
    let mut pages = Pages { taken: HashSet::new() };
    let mut cr = r.fork();
    let n = [1, 2, 3][cr.weighted(&[40, 40, 20])];
    let restore = !s.is_migration();
    // Kinds: 0 pcb-client, 1 vhost-user-blk device, 2 private client, 3 DPDK.
    let mut kinds: Vec<usize> =
        (0..n).map(|_| cr.weighted(&[55, 30, if restore { 15 } else { 0 }, 7])).collect();
    // At most two vhost-user-blk devices and one DPDK (testpmd busy-polls a core); the devices'
    // guest pages are taken first, so no client mutates them, then DPDK's.
    let (mut devices, mut dpdks) = (0, 0);
    for k in &mut kinds {
        if *k == 1 {
            devices += 1;
            if devices > 2 {
                *k = 0;
            }
        }
        if *k == 3 {
            dpdks += 1;
            if dpdks > 1 {
                *k = 0;
            }
        }
    }
    let mut plans: Vec<Option<ClientPlan>> = kinds
        .iter()
        .map(|&k| (k == 1).then(|| ClientPlan::Vhost(draw_vhost(&mut cr, &s.blocks, &mut pages))))
        .collect();
    for (k, plan) in kinds.iter().zip(&mut plans) {
        if *k == 3 {
            *plan = draw_dpdk(&mut cr, &s.blocks, &mut pages).map(ClientPlan::Dpdk);
        }
    }
    for (k, plan) in kinds.iter().zip(&mut plans) {
        match k {
            1 => {}
            3 if plan.is_some() => {}
            2 => *plan = Some(ClientPlan::Private(draw_private(&mut cr, &s))),
            _ => *plan = Some(ClientPlan::Pcb(draw_pcb(&mut cr, &s, &mut pages, &zero))),
        }
    }
    s.clients = plans.into_iter().flatten().collect();
    // Private clients are served only while the broker runs, and `serve` ends when its shared
    // blocks are complete: without the background fill a finisher completes them, after the
    // private clients are done.
    let private = s.clients.iter().any(|c| matches!(c, ClientPlan::Private(_)));
    if let Mode::Restore { background } = &mut s.mode {
        if private {
            *background = false;
        }
    }
    // Reads after the migration completed: not of pages a client removed (those are holes again,
    // and a registered client faulting there has nobody left to answer).
    let removed: HashSet<(usize, u64)> = s
        .clients
        .iter()
        .filter_map(|c| match c {
            ClientPlan::Pcb(p) => Some(p),
            _ => None,
        })
        .flat_map(|p| {
            p.postcopy.iter().filter_map(move |o| match o {
                Op::Remove { first, count } => Some((p.block, *first, *count)),
                _ => None,
            })
        })
        .flat_map(|(b, f, c)| (f..f + c).map(move |p| (b, p)))
        .collect();
    let mut ar = r.fork();
    for i in 0..s.clients.len() {
        let ClientPlan::Pcb(p) = &s.clients[i] else { continue };
        // A forked child reads the release line too (and buffers what it does not use), so a
        // forking client has no steps after the migration.
        if p.postcopy.contains(&Op::Fork) || !ar.chance(40) {
            continue;
        }
        let block = p.block;
        let max = if s.blocks[block].page_size == HUGE { 4 } else { 32 };
        let mut v = touch_list(&mut ar, &s, block, &zero[block], max);
        v.retain(|pg| !removed.contains(&(block, *pg)));
        if !v.is_empty() {
            if let ClientPlan::Pcb(p) = &mut s.clients[i] {
                p.after.push(Op::Touch { pages: v, all: false });
            }
        }
    }
    if matches!(s.mode, Mode::Restore { background: false }) {
        for (i, b) in s.blocks.iter().enumerate() {
            s.clients.push(ClientPlan::Pcb(PcbPlan {
                block: i,
                maps: 1,
                prefault: None,
                postcopy: vec![Op::Touch { pages: (0..b.pages()).collect(), all: false }],
                after: Vec::new(),
                finisher: true,
            }));
        }
    }
    let mut kr = r.fork();
    // Drawn from a fork of its own after every other dimension, so the seeds keep drawing what
    // they drew before this dimension existed.
    let mut er = r.fork();
    if let Mode::Migration { end_cut, .. } = &mut s.mode {
        *end_cut = [
            None,
            Some(EndCut::BeforeComplete),
            Some(EndCut::SourceMissesComplete),
            Some(EndCut::CompleteUnwritable),
        ][er.weighted(&[82, 6, 6, 6])];
        // The proxy's hold after Listen does not cover the source's reconnect after an end cut,
        // which on a small migration comes before net_driver (it handshakes with testpmd first)
        // registers: the migration would end without it.
        if s.clients.iter().any(|c| matches!(c, ClientPlan::Dpdk(_))) {
            *end_cut = None;
        }
    }
    let killable: Vec<usize> = (0..s.clients.len())
        .filter(|&i| !matches!(&s.clients[i], ClientPlan::Pcb(p) if p.finisher))
        .collect();
    if kr.chance(25) && !killable.is_empty() {
        s.kill =
            Some(KillPlan { client: kr.pick(&killable), after_ms: kr.below(60), mid_fault: kr.chance(50) });
    }
    s
}
