//! What one scenario is: every parameter the generator drew from the seed, and a one-line
//! description of it for failure messages.

use std::fmt;

/// 4 KiB pages.
pub const SMALL: u64 = 4096;
/// 2 MiB (hugetlbfs) pages.
pub const HUGE: u64 = 2 << 20;

/// How many zero pages a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zeros {
    /// No page is zero.
    None,
    /// About one page in sixteen, scattered.
    Sparse,
    /// About every other page.
    Dense,
    /// Long runs of zero pages (whole ZeroRun frames, zero huge pages).
    Runs,
}

/// One RAM block.
#[derive(Debug, Clone)]
pub struct BlockPlan {
    pub name: String,
    pub size: u64,
    pub page_size: u64,
    pub zeros: Zeros,
}

impl BlockPlan {
    pub fn pages(&self) -> u64 {
        self.size / self.page_size
    }
}

/// Where the source page server takes guest RAM from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// `source --image`: the image file; dirty ranges are `--dirty` (bytes inverted).
    Image,
    /// `source --control`: memfds this test hands over with `provide_blocks` as the VMM would;
    /// it writes the dirty ranges into them and reports them with `dirty`.
    Memfd,
}

/// What a dirty range's pages hold after the guest wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyFill {
    /// Every byte inverted (what `source --dirty` does).
    Invert,
    /// New pseudo-random bytes.
    Random,
    /// Zeros (the guest freed and cleared the pages).
    Zero,
}

/// Pages `first..first+pages` of block `block` changed after precopy.
#[derive(Debug, Clone, Copy)]
pub struct DirtyPlan {
    pub block: usize,
    pub first: u64,
    pub pages: u64,
    pub fill: DirtyFill,
}

/// Live migration or lazy restore.
#[derive(Debug, Clone)]
pub enum Mode {
    /// `postcopy-broker source` → (proxy) → `serve --incoming`.
    Migration {
        precopy: bool,
        source: SourceKind,
        dirty: Vec<DirtyPlan>,
        /// Background bandwidth limit in MiB/s (None: unlimited).
        bandwidth_mib: Option<u64>,
        /// Background streams (`source --streams`).
        streams: u16,
        /// Connection cuts, in ms after postcopy got going (the clients registered); only those
        /// that fall before the end happen.
        cuts_ms: Vec<u64>,
        /// A cut at the very end, at a moment only a failpoint can hit (the failpoint's name,
        /// `POSTCOPY_BROKER_FAILPOINT` of the process that has it: docs/wire-protocol.md, "The end").
        end_cut: Option<EndCut>,
    },
    /// `serve --image --block ...`.
    Restore {
        /// The fault loop's background fill (without it a finisher client touches every page).
        background: bool,
    },
}

/// A connection cut at the end of a migration, by a failpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCut {
    /// The source cuts right before its Complete.
    BeforeComplete,
    /// The source never reads the destination's Complete.
    SourceMissesComplete,
    /// The destination's Complete cannot be written.
    CompleteUnwritable,
}

impl EndCut {
    /// The failpoint, and whether the source (else the destination) has it.
    pub fn failpoint(self) -> (&'static str, bool) {
        match self {
            EndCut::BeforeComplete => ("source-cut-before-complete", true),
            EndCut::SourceMissesComplete => ("source-miss-complete", true),
            EndCut::CompleteUnwritable => ("destination-complete-unwritable", false),
        }
    }
}

/// One step of a pcb-client script (pages in the block's page size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read these pages through mapping 0 (through every mapping when `all`).
    Touch { pages: Vec<u64>, all: bool },
    /// Set the first 8 bytes of these pages (the client's own) to `byte`.
    Write { pages: Vec<u64>, byte: u8 },
    /// MADV_REMOVE these pages (the client's own, contiguous): they read as zero afterwards.
    Remove { first: u64, count: u64 },
    /// fork(): the child runs the rest of the script (a new client: the broker adopts its uffd).
    Fork,
}

/// How a client populates its mapping before it registers (pcb-client `--prefault`), as a
/// backend that locks or prefaults guest RAM does. The broker must refuse it when that put pages
/// it never placed into shared RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefault {
    Mlock,
    Populate,
    Touch,
}

impl Prefault {
    pub fn arg(self) -> &'static str {
        match self {
            Prefault::Mlock => "mlock",
            Prefault::Populate => "populate",
            Prefault::Touch => "touch",
        }
    }
}

/// A pcb-client registered over the control socket, mapping one shared block.
#[derive(Debug, Clone)]
pub struct PcbPlan {
    pub block: usize,
    pub maps: usize,
    pub prefault: Option<Prefault>,
    /// Steps during postcopy, from registration on.
    pub postcopy: Vec<Op>,
    /// Steps after the migration completed (the broker has exited); reads only.
    pub after: Vec<Op>,
    /// Touches every page of its block once the other clients are done: the lazy restore's
    /// finisher when there is no background fill.
    pub finisher: bool,
}

/// A Firecracker-style private client (lazy restore only): private anonymous memory of `size`
/// bytes, served from the image at offset 0.
#[derive(Debug, Clone)]
pub struct PrivatePlan {
    pub size: u64,
    pub postcopy: Vec<Op>,
}

/// Which vhost-user-blk backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// examples/vhost_user_blk.rs (rust-vmm vhost-user-backend).
    Ours,
    /// qemu-storage-daemon (libvhost-user).
    Qsd,
}

/// examples/guest_driver.rs playing the VMM with a vhost-user-blk backend.
#[derive(Debug, Clone)]
pub struct VhostPlan {
    pub backend: Backend,
    /// Guest address (blocks back to back from 0) of the RAM the disk mirrors, and its sectors.
    pub mirror_gpa: u64,
    pub mirror_sectors: u64,
    /// Guest range its postcopy writes take their data pages from.
    pub io_gpa: u64,
    pub io_len: u64,
    /// Postcopy operations at most (it stops earlier when every page arrived).
    pub ops: u64,
}

/// A receive buffer of the net driver: guest address and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxBuf {
    pub gpa: u64,
    pub len: u64,
}

/// dpdk-testpmd (its vhost-user PMD, `postcopy-support=1`, `--no-mlockall`, txonly forwarding)
/// with examples/net_driver.rs playing the VMM: the driver posts receive buffers in guest pages
/// and testpmd writes packets into them during postcopy.
#[derive(Debug, Clone)]
pub struct DpdkPlan {
    /// net_driver's `--seed`: it decides where the buffers lie (see `dpdk::buffers`).
    pub seed: u64,
    /// The buffers the driver posts with that seed, taken from the generator's pool.
    pub bufs: Vec<RxBuf>,
}

/// One client of the scenario.
///
/// Adding a client kind (like `Dpdk`: a vhost-user-net backend plus a driver playing the VMM,
/// or `Vhost`): a variant here with its plan; a module
/// beside `pcb.rs` and `vhost.rs` with its commands and the check of its output; then the
/// compiler lists every match that must learn it: `generate::draw` (its weight, and
/// `Pages::take_gpa` for guest pages it writes or must keep stable), `counters::registrations_of`
/// (registrations it makes), `Display` here, `runner::Run::launch_client` (start it),
/// `runner::Run::oracle` (check it). A kind that writes guest RAM must confine its writes to
/// pages it takes from `Pages` and record them in `model::Model::build`, or the byte check
/// cannot be exact.
#[derive(Debug, Clone)]
pub enum ClientPlan {
    Pcb(PcbPlan),
    Private(PrivatePlan),
    Vhost(VhostPlan),
    Dpdk(DpdkPlan),
}

/// SIGKILL client `client` this long after the clients registered; `mid_fault`: first freeze
/// the broker (SIGSTOP) until a thread of the client sleeps in a userfault, so it dies with a
/// fault outstanding.
#[derive(Debug, Clone, Copy)]
pub struct KillPlan {
    pub client: usize,
    pub after_ms: u64,
    pub mid_fault: bool,
}

/// One scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub mode: Mode,
    pub blocks: Vec<BlockPlan>,
    pub clients: Vec<ClientPlan>,
    pub kill: Option<KillPlan>,
}

impl Scenario {
    pub fn is_migration(&self) -> bool {
        matches!(self.mode, Mode::Migration { .. })
    }

    pub fn precopy(&self) -> bool {
        matches!(self.mode, Mode::Migration { precopy: true, .. })
    }

    pub fn dirty(&self) -> &[DirtyPlan] {
        match &self.mode {
            Mode::Migration { dirty, .. } => dirty,
            Mode::Restore { .. } => &[],
        }
    }

    pub fn total_size(&self) -> u64 {
        self.blocks.iter().map(|b| b.size).sum()
    }

    /// Whether any client's steps include one `f` matches.
    pub fn has_op(&self, f: impl Fn(&Op) -> bool) -> bool {
        self.clients.iter().any(|c| match c {
            ClientPlan::Pcb(p) => p.postcopy.iter().chain(&p.after).any(&f),
            ClientPlan::Private(p) => p.postcopy.iter().any(&f),
            ClientPlan::Vhost(_) | ClientPlan::Dpdk(_) => false,
        })
    }

    pub fn prefaults(&self) -> bool {
        self.clients.iter().any(|c| matches!(c, ClientPlan::Pcb(p) if p.prefault.is_some()))
    }
}

fn mib(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{}M", b >> 20)
    } else {
        format!("{}K", b >> 10)
    }
}

fn ops(v: &[Op]) -> String {
    v.iter()
        .map(|o| match o {
            Op::Touch { pages, all: false } => format!("touch{}", pages.len()),
            Op::Touch { pages, all: true } => format!("touchall{}", pages.len()),
            Op::Write { pages, .. } => format!("write{}", pages.len()),
            Op::Remove { count, .. } => format!("remove{count}"),
            Op::Fork => "fork".into(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Display for ClientPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientPlan::Pcb(p) => {
                write!(f, "pcb(b{}", p.block)?;
                if p.maps > 1 {
                    write!(f, " maps={}", p.maps)?;
                }
                if let Some(m) = p.prefault {
                    write!(f, " prefault={}", m.arg())?;
                }
                if p.finisher {
                    write!(f, " finisher")?;
                }
                write!(f, " [{}]", ops(&p.postcopy))?;
                if !p.after.is_empty() {
                    write!(f, " after[{}]", ops(&p.after))?;
                }
                write!(f, ")")
            }
            ClientPlan::Private(p) => write!(f, "firecracker({} [{}])", mib(p.size), ops(&p.postcopy)),
            ClientPlan::Vhost(v) => write!(
                f,
                "vhost-{}(mirror {:#x}+{} sectors, io {:#x}+{}, ops {})",
                match v.backend {
                    Backend::Ours => "ours",
                    Backend::Qsd => "qsd",
                },
                v.mirror_gpa,
                v.mirror_sectors,
                v.io_gpa,
                mib(v.io_len),
                v.ops
            ),
            ClientPlan::Dpdk(d) => {
                let bufs: Vec<String> = d.bufs.iter().map(|b| format!("{:#x}", b.gpa)).collect();
                write!(
                    f,
                    "dpdk(net_driver seed {}, {} rx buffers at [{}])",
                    d.seed,
                    d.bufs.len(),
                    bufs.join(" ")
                )
            }
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.mode {
            Mode::Migration { precopy, source, dirty, bandwidth_mib, streams, cuts_ms, end_cut } => {
                write!(f, "migration precopy={} source={source:?}", if *precopy { "on" } else { "off" })?;
                if !dirty.is_empty() {
                    let d: Vec<String> = dirty
                        .iter()
                        .map(|d| format!("b{}:{}+{}:{:?}", d.block, d.first, d.pages, d.fill))
                        .collect();
                    write!(f, " dirty=[{}]", d.join(" "))?;
                }
                match bandwidth_mib {
                    Some(b) => write!(f, " bandwidth={b}M")?,
                    None => write!(f, " bandwidth=unlimited")?,
                }
                write!(f, " streams={streams}")?;
                if !cuts_ms.is_empty() {
                    write!(f, " cuts_ms={cuts_ms:?}")?;
                }
                if let Some(e) = end_cut {
                    write!(f, " end_cut={e:?}")?;
                }
            }
            Mode::Restore { background } => {
                write!(f, "restore background={}", if *background { "on" } else { "off" })?
            }
        }
        let b: Vec<String> = self
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| format!("b{i}={}:{}:{}:zeros={:?}", b.name, mib(b.size), mib(b.page_size), b.zeros))
            .collect();
        write!(f, " blocks=[{}]", b.join(" "))?;
        let c: Vec<String> = self.clients.iter().enumerate().map(|(i, c)| format!("#{i} {c}")).collect();
        write!(f, " clients=[{}]", c.join("; "))?;
        if let Some(k) = self.kill {
            write!(f, " kill=#{}@{}ms{}", k.client, k.after_ms, if k.mid_fault { "/mid-fault" } else { "" })?;
        }
        Ok(())
    }
}
