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
    /// Serve guest RAM to a destination: connect, authenticate, precopy (optional), postcopy.
    Source(postcopy_broker::migration::source::SourceArgs),
    /// Receive a migration (--incoming) or restore lazily from an image (--image).
    Serve(postcopy_broker::migration::destination::ServeArgs),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Source(a) => report(postcopy_broker::migration::source::cli::run(&a)),
        Command::Serve(a) => report(postcopy_broker::migration::destination::cli::run(&a)),
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

fn report(r: postcopy_broker::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
