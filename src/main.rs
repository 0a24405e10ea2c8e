//! The `postcopy-broker` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Postcopy live migration of shared guest RAM.
#[derive(Debug, Parser)]
#[command(name = "postcopy-broker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check whether this host can run postcopy on shared memory (exit 0 only if it can).
    Probe {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark the fault path against the machine's limits (uffd_limit.c, run alternately).
    Bench(BenchArgs),
}

/// Options of `postcopy-broker bench`.
#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Alternating runs (reference, broker, reference, broker, ...).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Pages of the demand case.
    #[arg(long, default_value_t = 20_000)]
    pages: usize,
    /// MiB of the background placement case.
    #[arg(long, default_value_t = 512)]
    place_mib: usize,
    /// KiB per background pull.
    #[arg(long, default_value_t = 2048)]
    chunk_kib: u64,
    /// Clients of the scale case.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// GiB of sparse RAM of the scale case.
    #[arg(long, default_value_t = 16)]
    scale_gib: u64,
    /// Tiny sizes and one run: shows that every case produces numbers.
    #[arg(long)]
    quick: bool,
    /// Cases, comma separated: demand, background, scale.
    #[arg(long, value_delimiter = ',', default_value = "demand,background,scale")]
    cases: Vec<String>,
    /// Placements, comma separated: same (both sides on cpu 0), cross (both on cpus 0,1).
    #[arg(long, value_delimiter = ',', default_value = "same,cross")]
    placement: Vec<String>,
    /// The reference program uffd_limit.c (default: $POSTCOPY_BENCH_REFERENCE, else
    /// ../shared/bench/uffd_limit.c from the project root).
    #[arg(long)]
    reference: Option<std::path::PathBuf>,
    /// The pcb-client executable (default: next to this program).
    #[arg(long)]
    client: Option<std::path::PathBuf>,
}

fn bench(a: BenchArgs) -> ExitCode {
    use postcopy_broker::bench::{self, reference, sys::Placement, BenchConfig};
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
    cfg.scale_gib = a.scale_gib.max(1);
    cfg.cases = a.cases;
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(a) => bench(a),
        Command::Probe { json } => {
            let report = postcopy_broker::probe::probe();
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: cannot encode the report: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                print!("{}", postcopy_broker::probe::render(&report));
            }
            if report.postcopy_shared_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
