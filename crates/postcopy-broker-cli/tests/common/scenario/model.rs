//! The model of guest RAM: what the source's pages hold after the last dirty update, and which
//! client mutates which page (each page at most by one client, see `generate`). It answers what
//! a client may read at a point of its script and what every page must hold at the end.

use std::collections::HashMap;

use super::content::{dirty_page, fnv, initial};
use super::plan::{ClientPlan, Op, RxBuf, Scenario};

/// A client's change to a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// The first 8 bytes set to this byte.
    Write(u8),
    /// MADV_REMOVE: the page reads as zero.
    Remove,
    /// A device (DPDK) writes packets into bytes `lo..hi` of the page (the receive buffers in
    /// it): the model does not know those bytes (the device's client checks them), every other
    /// byte stays the source's.
    Rx { lo: usize, hi: usize },
}

impl Mutation {
    /// `page` with this mutation applied.
    pub fn apply(self, page: &[u8]) -> Vec<u8> {
        let mut v = page.to_vec();
        match self {
            Mutation::Write(b) => v[..8].fill(b),
            Mutation::Remove => v.fill(0),
            Mutation::Rx { .. } => {}
        }
        v
    }

    /// `got` with the bytes nobody can predict (a device's packets) replaced by `base`'s: what
    /// the byte check compares.
    pub fn predictable(self, got: &[u8], base: &[u8]) -> Vec<u8> {
        let mut v = got.to_vec();
        if let Mutation::Rx { lo, hi } = self {
            v[lo..hi].copy_from_slice(&base[lo..hi]);
        }
        v
    }
}

/// What became of a client's changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It ran its script to the end.
    Done,
    /// It never ran it (refused at registration).
    Never,
    /// It was killed, or ended after the moment in question: some changes may be missing.
    Maybe,
}

/// One block: the source's bytes before and after the dirty updates.
#[derive(Debug)]
pub struct BlockModel {
    pub name: String,
    pub page_size: u64,
    pub initial: Vec<u8>,
    pub last: Vec<u8>,
}

impl BlockModel {
    /// Page `p` of the source's final RAM.
    pub fn page(&self, p: u64) -> &[u8] {
        let ps = self.page_size as usize;
        &self.last[p as usize * ps..(p as usize + 1) * ps]
    }
}

/// Guest RAM as the scenario defines it.
#[derive(Debug)]
pub struct Model {
    pub blocks: Vec<BlockModel>,
    /// (block, page) → (client, mutation).
    mutations: HashMap<(usize, u64), (usize, Mutation)>,
}

/// The mutations in a shared client's script, in order.
pub fn script_mutations(ops: &[Op]) -> Vec<(u64, Mutation)> {
    let mut v = Vec::new();
    for o in ops {
        match o {
            Op::Write { pages, byte } => v.extend(pages.iter().map(|&p| (p, Mutation::Write(*byte)))),
            Op::Remove { first, count } => v.extend((*first..first + count).map(|p| (p, Mutation::Remove))),
            Op::Touch { .. } | Op::Fork => {}
        }
    }
    v
}

/// The (block, page, first byte, end byte) pieces of receive buffers (guest addresses, blocks
/// back to back from 0).
fn rx_ranges(s: &Scenario, bufs: &[RxBuf]) -> Vec<(usize, u64, usize, usize)> {
    let mut v = Vec::new();
    for r in bufs {
        let mut base = 0;
        for (i, b) in s.blocks.iter().enumerate() {
            let (mut lo, hi) = (r.gpa.max(base), (r.gpa + r.len).min(base + b.size));
            while lo < hi {
                let page = (lo - base) / b.page_size;
                let start = base + page * b.page_size;
                let end = hi.min(start + b.page_size);
                v.push((i, page, (lo - start) as usize, (end - start) as usize));
                lo = end;
            }
            base += b.size;
        }
    }
    v
}

impl Model {
    pub fn build(s: &Scenario) -> Model {
        let mut blocks: Vec<BlockModel> = s
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let init = initial(s.seed, i, b);
                BlockModel { name: b.name.clone(), page_size: b.page_size, last: init.clone(), initial: init }
            })
            .collect();
        for d in s.dirty() {
            let b = &mut blocks[d.block];
            let ps = b.page_size as usize;
            for p in d.first..d.first + d.pages {
                dirty_page(s.seed, d.block, p, &mut b.last[p as usize * ps..(p as usize + 1) * ps], d.fill);
            }
        }
        let mut mutations = HashMap::new();
        for (i, c) in s.clients.iter().enumerate() {
            if let ClientPlan::Pcb(p) = c {
                for (page, m) in script_mutations(&p.postcopy) {
                    let prev = mutations.insert((p.block, page), (i, m));
                    assert!(prev.is_none(), "generator bug: page {page} of block {} mutated twice", p.block);
                }
            }
            if let ClientPlan::Dpdk(d) = c {
                for (b, page, lo, hi) in rx_ranges(s, &d.bufs) {
                    let m = match mutations.get(&(b, page)) {
                        None => Mutation::Rx { lo, hi },
                        Some(&(c, Mutation::Rx { lo: l, hi: h })) if c == i => {
                            Mutation::Rx { lo: lo.min(l), hi: hi.max(h) }
                        }
                        Some(_) => panic!("generator bug: page {page} of block {b} mutated twice"),
                    };
                    mutations.insert((b, page), (i, m));
                }
            }
        }
        Model { blocks, mutations }
    }

    /// The image of a lazy restore (and of private clients): the initial blocks back to back.
    pub fn image(&self) -> Vec<u8> {
        self.blocks.iter().flat_map(|b| b.initial.iter().copied()).collect()
    }

    /// Who mutates page `p` of block `b`, and how.
    pub fn mutation(&self, b: usize, p: u64) -> Option<(usize, Mutation)> {
        self.mutations.get(&(b, p)).copied()
    }

    /// Every mutated page, (block, page, client, mutation).
    pub fn mutations(&self) -> impl Iterator<Item = (usize, u64, usize, Mutation)> + '_ {
        self.mutations.iter().map(|(&(b, p), &(c, m))| (b, p, c, m))
    }

    /// FNVs a client may read at page `p` of block `b` (None: anything, it is not determined).
    /// `reader` is the reading client and `own_done` whether its own mutation of the page (if it
    /// has one) already happened. Another client's mutation may happen during the read: a write
    /// (8 bytes, read one by one) may be seen in part; a remove turns the rest of the page into
    /// zeros at any byte, and a device's packets are not the model's: such a page is not
    /// determined.
    pub fn readable(&self, b: usize, p: u64, reader: usize, own_done: bool) -> Option<Vec<String>> {
        let base = self.blocks[b].page(p);
        match self.mutation(b, p) {
            None => Some(vec![fnv(base)]),
            Some((c, m)) if c == reader => {
                Some(vec![fnv(&if own_done { m.apply(base) } else { base.to_vec() })])
            }
            Some((_, Mutation::Remove | Mutation::Rx { .. })) => None,
            Some((_, m)) => {
                let new = m.apply(base);
                Some(
                    (0..=8)
                        .map(|k| {
                            let mut v = base.to_vec();
                            v[k..8].copy_from_slice(&new[k..8]);
                            fnv(&v)
                        })
                        .collect(),
                )
            }
        }
    }

    /// What page `p` of block `b` may hold at the end, given what became of its client's
    /// changes (`fate(client)`).
    pub fn final_page(&self, b: usize, p: u64, fate: impl Fn(usize) -> Fate) -> Vec<Vec<u8>> {
        let base = self.blocks[b].page(p);
        match self.mutation(b, p).map(|(c, m)| (fate(c), m)) {
            None | Some((Fate::Never, _)) => vec![base.to_vec()],
            Some((Fate::Done, m)) => vec![m.apply(base)],
            Some((Fate::Maybe, m)) => vec![base.to_vec(), m.apply(base)],
        }
    }
}
