//! `postcopy-broker probe`: can this host run postcopy on shared memory?

use std::process::ExitCode;

/// Run the probe; exit 0 only when postcopy on shared memory works.
pub fn run(json: bool) -> ExitCode {
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
