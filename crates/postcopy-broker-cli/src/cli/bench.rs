//! `postcopy-broker bench`: the benchmark against the machine's limits (see crate::bench).

use std::process::ExitCode;

use crate::bench::{self, reference, sys::Placement, BenchConfig};

/// Options of `postcopy-broker bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Alternating runs (reference, broker, reference, broker, ...).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Pages of the demand case.
    #[arg(long, default_value_t = 20_000)]
    pub pages: usize,
    /// MiB of the background placement case.
    #[arg(long, default_value_t = 512)]
    pub place_mib: usize,
    /// KiB per background pull.
    #[arg(long, default_value_t = 2048)]
    pub chunk_kib: u64,
    /// Clients of the scale case.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// GiB of sparse RAM of the scale case.
    #[arg(long, default_value_t = 16)]
    pub scale_gib: u64,
    /// Tiny sizes and one run: shows that every case produces numbers.
    #[arg(long)]
    pub quick: bool,
    /// MiB of guest RAM of the migration cases.
    #[arg(long, default_value_t = 1024)]
    pub migrate_mib: usize,
    /// 4 KiB pages of the private (Firecracker-style) fault case.
    #[arg(long, default_value_t = 20_000)]
    pub private_pages: usize,
    /// 2 MiB pages of the private fault case (hugetlb: the pool needs this many free pages).
    #[arg(long, default_value_t = 64)]
    pub private_huge_pages: usize,
    /// Cases, comma separated: demand, background, scale, migration, control (demand faults
    /// while another peer floods the control socket), private (Firecracker-style faults),
    /// memtouch (a guest touching random pages of 3/4 of its RAM during postcopy, issue #15).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "demand,background,scale,migration,control,private,memtouch"
    )]
    pub cases: Vec<String>,
    /// Placements, comma separated: same (client and broker on cpu 0), cross (client on cpu 0,
    /// broker on cpu 1).
    #[arg(long, value_delimiter = ',', default_value = "same,cross")]
    pub placement: Vec<String>,
    /// The floor program the broker is compared with (default: $POSTCOPY_BENCH_REFERENCE, else
    /// the project's own bench/uffd_floor.c). When ../shared/bench/uffd_limit.c is beside the
    /// project root, the floor is also compared with it (the "second reference" rows).
    #[arg(long)]
    pub reference: Option<std::path::PathBuf>,
    /// The pcb-client executable (default: next to this program).
    #[arg(long)]
    pub client: Option<std::path::PathBuf>,
    /// The pcb-hostile executable, the flooding peer (default: next to the client).
    #[arg(long)]
    pub hostile: Option<std::path::PathBuf>,
    /// CPU hogs for the memtouch case: N processes spinning at the benchmark's priority while
    /// each migration runs; the case then runs postcopy at once with the background streams at
    /// fixed nice 10, fixed nice 0 and adaptive priority, side by side (0: the usual two
    /// variants, no hog).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub hog: usize,
}

/// Run the benchmark and print its table.
pub fn run(a: BenchArgs) -> ExitCode {
    let exe_dir =
        std::env::current_exe().ok().and_then(|e| e.parent().map(|p| p.to_path_buf())).unwrap_or_default();
    let src = a
        .reference
        .or_else(|| std::env::var_os(reference::REFERENCE_ENV).map(Into::into))
        .unwrap_or_else(reference::default_source);
    let client = a.client.unwrap_or_else(|| exe_dir.join("pcb-client"));
    let mut cfg = BenchConfig::full(src, exe_dir.join("bench"), client);
    cfg.runs = a.runs.max(1);
    cfg.pages = a.pages.max(1);
    cfg.place_mib = a.place_mib.max(2); // the reference zero-fills in 2 MiB steps
    cfg.chunk = a.chunk_kib.max(4) << 10;
    cfg.clients = a.clients;
    cfg.migrate_mib = a.migrate_mib.max(4);
    cfg.scale_gib = a.scale_gib.max(1);
    cfg.private_pages = a.private_pages.max(1);
    cfg.private_huge_pages = a.private_huge_pages.max(1);
    cfg.cases = a.cases;
    cfg.hogs = a.hog;
    if let Some(h) = a.hostile {
        cfg.hostile = h;
    }
    let all = Placement::available();
    cfg.placements =
        all.into_iter().filter(|p| a.placement.iter().any(|w| p.name.starts_with(w.as_str()))).collect();
    if cfg.placements.is_empty() {
        eprintln!("error: no usable placement among {:?} (this machine offers: same, cross)", a.placement);
        return ExitCode::from(2);
    }
    if a.quick {
        cfg = cfg.quick();
    }
    match bench::run(&cfg, |s| eprintln!("bench: {s}")) {
        Ok(r) => {
            print!("{}", r.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
