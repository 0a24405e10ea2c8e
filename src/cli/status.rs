//! `postcopy-broker status`: ask a running broker over its control socket.

use std::path::Path;
use std::process::ExitCode;

use crate::control::ControlClient;
use crate::stats::StatusReport;

/// Print the broker's status (human or JSON).
pub fn run(control: &Path, json: bool) -> ExitCode {
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
    if json {
        println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    match serde_json::from_value::<StatusReport>(value) {
        Ok(r) => {
            print!("{}", crate::stats::render(&r));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: the broker's status has an unexpected shape ({e}); try --json");
            ExitCode::FAILURE
        }
    }
}
