//! `postcopy-broker status`: ask a running broker over its control socket.

use std::path::Path;
use std::process::ExitCode;

use postcopy_broker::control::ControlClient;
use postcopy_broker::stats::StatusReport;

/// How `status` prints the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A summary for people.
    Text,
    /// The report as the broker sent it (pretty-printed JSON).
    Json,
    /// The OpenMetrics text exposition (the library's `openmetrics` module).
    Openmetrics,
}

/// Print the broker's status.
pub fn run(control: &Path, format: Format) -> ExitCode {
    let report = ControlClient::connect(control).and_then(|mut c| c.status());
    let value = match report {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "error: cannot read the status from {}: {e}; is `postcopy-broker serve` running there?",
                control.display()
            );
            return ExitCode::FAILURE;
        }
    };
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    match serde_json::from_value::<StatusReport>(value) {
        Ok(r) if format == Format::Openmetrics => {
            print!("{}", postcopy_broker::openmetrics::render(&r));
            ExitCode::SUCCESS
        }
        Ok(r) => {
            print!("{}", postcopy_broker::stats::render(&r));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: the broker's status has an unexpected shape ({e}); try --format json");
            ExitCode::FAILURE
        }
    }
}
