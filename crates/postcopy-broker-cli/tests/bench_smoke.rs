//! Smoke run of `postcopy-broker bench --quick`: every case produces numbers. Speed is not
//! asserted here (it lives in the benchmark and BENCHMARKS.md), only that the harness works.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .arg("bench")
        .args(["--client", env!("CARGO_BIN_EXE_pcb-client")])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn quick_bench_prints_a_number_for_every_case() {
    let out = bench(&["--quick"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| case")).collect();
    for case in [
        "demand us/fault",
        "background placement",
        "wakes per placed page",
        "UFFDIO_COPY 2 MiB from a cold source",
        "register 4 clients",
        "broker private memory",
        "migration 32 MiB, half zero, s (ref: non-zero bytes / raw TCP)",
        "migration 32 MiB, half zero, s (ref: non-zero bytes / floor copy_2m",
        "demand p50 us during migration",
        "control socket flooded by a peer: demand us/fault",
        "control socket flooded by a peer: status requests answered",
        "private fault, 4 KiB pages, us/fault (ref: private_fault.c)",
        "private fault, 2 MiB pages, us/fault (ref: private_fault.c)",
        "private fault, 2 MiB pages, us/fault (ref: private_fault.c populate",
        "memtouch 32 MiB, 24 MiB touched, postcopy at once: blocked us per demand request",
        "memtouch 32 MiB, 24 MiB touched, postcopy at once: client's total blocked time",
        "memtouch 32 MiB, 24 MiB touched, dirtied after precopy: total time",
        "memtouch 32 MiB, 24 MiB touched, dirtied after precopy: destination CPU",
    ] {
        let row =
            rows.iter().find(|r| r.contains(case)).unwrap_or_else(|| panic!("no {case} row in\n{text}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let median: f64 = cells[4].split_whitespace().next().unwrap().parse().unwrap();
        assert!(median.is_finite(), "{row}");
    }
    // The demand and private rows carry a reference figure and a ratio, for both placements when
    // there are two CPUs.
    let demand: Vec<_> = rows.iter().filter(|r| r.contains("| demand us/fault ")).collect();
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(demand.len(), if cpus > 1 { 4 } else { 2 }, "{text}");
    let private: Vec<_> = rows.iter().filter(|r| r.contains("| private fault, ")).collect();
    assert_eq!(private.len(), if cpus > 1 { 20 } else { 10 }, "{text}");
    for r in demand.into_iter().chain(private) {
        let cells: Vec<&str> = r.split('|').map(str::trim).collect();
        assert!(cells[5].split_whitespace().next().unwrap().parse::<f64>().is_ok(), "{r}");
        assert!(cells[6].parse::<f64>().is_ok(), "ratio in {r}");
    }
}

/// With the shared reference beside the project (as on this machine and in CI), the floor is
/// compared with it in the same run.
#[test]
fn the_floor_is_compared_with_the_shared_reference() {
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bench/uffd_limit.c");
    assert!(
        shared.is_file(),
        "{} is not there: the suite runs with ../shared beside the clone",
        shared.display()
    );
    let out = bench(&["--quick", "--cases", "demand,background", "--placement", "same"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let floor: Vec<&str> = text.lines().filter(|l| l.contains("(ref: second reference)")).collect();
    assert_eq!(floor.len(), 3, "{text}");
    for row in floor {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        for cell in &cells[4..6] {
            let median: f64 = cell.split_whitespace().next().unwrap().parse().unwrap();
            assert!(median > 0.0, "{row}");
        }
    }
}

#[test]
fn a_missing_reference_program_is_a_clear_error() {
    let out = bench(&["--quick", "--reference", "/nonexistent/uffd_limit.c"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/uffd_limit.c") && err.contains("POSTCOPY_BENCH_REFERENCE"), "{err}");
}
