//! vhost-user backends under postcopy with a broker process (`postcopy-broker serve --image`, lazy
//! restore): the guest driver example plays the VMM (its own uffd registered with the broker, the
//! backend's uffd registered over the control socket before the ack), the backend (ours and
//! qemu-storage-daemon) serves writes from missing pages and reads into missing pages through its
//! own faults; disk and RAM end right. Also: a backend without PAGEFAULT is refused before
//! anything is touched (by the driver and by `serve --vhost-user-backend`), the daemon as a
//! backend's frontend, and a backend killed during postcopy is dropped alone.

mod common;

use std::fs;
use std::io::{BufReader, Write};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::vhost::{client, client_faults, fnv, line_with, Setup, PAGE};

const RAM: u64 = 16 << 20;

/// No background transfer: every page the backend touches is missing until the backend faults
/// on it. After the I/O, the driver reads every page (its own faults finish the restore).
fn backend_serves_missing_pages(kind: &str) {
    let mut s = Setup::new(kind);
    let serve = s.serve(&["--no-background"]);
    let (sock, _) = s.backend(kind);
    let mut drv =
        s.driver(&sock, &["--postcopy-ops", "24", "--requests", "16", "--pause-after-io", "--touch-all"]);
    let mut out = BufReader::new(drv.stdout.take().unwrap());
    line_with(&mut out, "phase");
    let st = s.status();
    let be = &client(&st, "vhost-user-blk")["stats"];
    // 24 writes from distinct missing pages and 24 reads into distinct missing pages.
    assert_eq!(be["pages_requested"], 48, "{st}");
    assert!(be["faults"].as_u64().unwrap() >= 48);
    assert_eq!(be["unmapped_faults"], 0);
    assert_eq!(st["broker"]["pages_background"], 0);
    assert!(st["received_pages"].as_u64().unwrap() < RAM / PAGE);
    writeln!(drv.stdin.as_mut().unwrap(), "go").unwrap();
    let summary = line_with(&mut out, "postcopy");
    assert!(drv.wait().unwrap().success(), "{}", s.log("driver.err"));
    s.wait_serve(serve);
    assert_eq!(summary["postcopy_end"], "ok");
    assert_eq!(summary["postcopy"]["reads"].as_array().unwrap().len(), 24);
    assert_eq!(summary["writes"], 16);
    s.check_results(&summary);
}

#[test]
fn example_backend_serves_missing_pages() {
    backend_serves_missing_pages("ours");
}

#[test]
fn qemu_storage_daemon_serves_missing_pages() {
    backend_serves_missing_pages("qsd");
}

/// With the background fill running the driver keeps doing I/O until every page arrived.
#[test]
fn io_until_complete_with_background_fill() {
    let mut s = Setup::new("bg");
    // The fill waits for a third client, registered only once the driver's I/O has faulted on
    // missing pages: the I/O and the fill overlap however fast the fill is (16 MiB takes a few
    // milliseconds, which the driver's first request could miss).
    let serve = s.serve(&["--wait-clients", "3"]);
    let (sock, _) = s.backend("ours");
    let drv = s.driver(&sock, &["--postcopy-ops", "100000", "--until-complete", "--touch-all"]);
    let t = Instant::now();
    while client_faults(&s.status(), "vhost-user-blk") < 8 {
        assert!(t.elapsed() < Duration::from_secs(60), "the backend never faulted");
        thread::sleep(Duration::from_millis(10));
    }
    s.run_client("touch:0");
    let out = drv.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", s.log("driver.err"));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    s.wait_serve(serve);
    s.check_results(&summary);
    assert!(s.log("serve.out").contains("vhost-user-blk"));
}

#[test]
fn driver_refuses_a_backend_without_pagefault_before_touching_anything() {
    let mut s = Setup::new("nopf");
    let serve = s.serve(&["--no-background"]);
    let (sock, _) = s.backend("nopf");
    let out = s.driver(&sock, &[]).wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = s.log("driver.err");
    assert!(err.contains("PAGEFAULT") && err.contains(&sock.display().to_string()), "{err}");
    let st = s.status();
    assert_eq!(st["broker"]["clients_registered"], 0);
    assert_eq!(st["received_pages"], 0);
    let _ = s.kids[serve].kill();
}

#[test]
fn serve_refuses_a_backend_without_pagefault_before_touching_anything() {
    let mut s = Setup::new("serve-nopf");
    let (sock, _) = s.backend("nopf");
    let serve = s.serve(&["--vhost-user-backend", sock.to_str().unwrap()]);
    let st = s.kids[serve].wait().unwrap();
    assert!(!st.success());
    let err = s.log("serve.err");
    assert!(err.contains("PAGEFAULT") && err.contains(&sock.display().to_string()), "{err}");
    assert!(!s.path("ctl.sock").exists(), "the control socket was opened before the veto");
}

/// The daemon is the backend's frontend: handshake with its own memfds, registration, END.
#[test]
fn serve_drives_a_backend_itself() {
    for kind in ["ours", "qsd"] {
        let mut s = Setup::new(&format!("serve-{kind}"));
        let (sock, _) = s.backend(kind);
        let serve = s.serve(&["--vhost-user-backend", sock.to_str().unwrap(), "--wait-clients", "1"]);
        s.wait_serve(serve);
        let out = s.log("serve.out");
        assert!(out.contains(&format!("vhost-user:{}", sock.display())), "{out}");
        let sums: serde_json::Value =
            serde_json::from_slice(&fs::read(s.path("sums.json")).unwrap()).unwrap();
        assert_eq!(sums["ram"], fnv(&s.image).as_str());
        assert!(!s.log("serve.err").contains("POSTCOPY_END"), "{}", s.log("serve.err"));
    }
}

/// Kill the backend during postcopy: the broker drops it alone, the driver's own faults still
/// complete the restore, and RAM ends equal to the image.
#[test]
fn a_killed_backend_is_dropped_alone() {
    let mut s = Setup::new("kill");
    let serve = s.serve(&["--no-background"]);
    let (sock, be) = s.backend("ours");
    let mut drv =
        s.driver(&sock, &["--postcopy-ops", "8", "--requests", "4", "--pause-after-io", "--touch-all"]);
    let mut out = BufReader::new(drv.stdout.take().unwrap());
    line_with(&mut out, "phase");
    s.kids[be].kill().unwrap();
    s.kids[be].wait().unwrap();
    let t = Instant::now();
    loop {
        let st = s.status();
        let gone = st["departed"].as_array().unwrap().iter().any(|c| c["name"] == "vhost-user-blk");
        if gone {
            assert!(st["clients"].as_array().unwrap().iter().any(|c| c["name"] == "guest-driver"));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the broker never dropped the dead backend: {st}");
        thread::sleep(Duration::from_millis(20));
    }
    writeln!(drv.stdin.as_mut().unwrap(), "go").unwrap();
    let summary = line_with(&mut out, "postcopy");
    assert!(drv.wait().unwrap().success(), "{}", s.log("driver.err"));
    s.wait_serve(serve);
    assert_ne!(summary["postcopy_end"], "ok", "END to a dead backend cannot succeed");
    let text = s.log("serve.out");
    assert!(text.contains("guest-driver"), "{text}");
    s.check_results(&summary);
    // The driver's own faults did the rest.
    let line = text.lines().find(|l| l.contains("guest-driver")).unwrap();
    assert!(!line.contains("faults        0 "), "{line}");
}

/// The demo itself, small: a live migration with both backends, verified end to end.
#[test]
fn demo_migrates_and_verifies_with_both_backends() {
    for backend in ["ours", "qsd"] {
        let out = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
            .args(["demo", "--size", "64M", "--backend", backend, "--timeout", "300"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "demo --backend {backend} failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("result: PASS"), "{text}");
        assert!(text.contains("vhost-user-blk"), "{text}");
        assert!(text.contains("RAM block ram: source"), "{text}");
    }
}

/// Whether a thread of `pid` sleeps in a userfault (a backend blocked mid-request).
fn in_userfault(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks
        .flatten()
        .any(|t| fs::read_to_string(t.path().join("wchan")).is_ok_and(|w| w.trim() == "handle_userfault"))
}

/// Kill the backend while it is blocked on a missing page in the middle of a virtio request:
/// the broker drops it alone, and another client's faults still complete the restore.
#[test]
fn a_backend_killed_mid_request_is_dropped_alone() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let mut s = Setup::new("midreq");
    let serve = s.serve(&["--no-background"]);
    let (sock, be) = s.backend("ours");
    // Postcopy operations until the restore completes (not the default 256), so the backend
    // keeps faulting on new pages however fast the first ones are served.
    let drv = s.driver(&sock, &["--until-complete", "--requests", "4", "--postcopy-ops", "1000000"]);
    // The driver's device dies under it; Setup's drop ends the driver with the others.
    s.kids.push(drv);
    let broker = Pid::from_raw(s.kids[serve].id() as i32);
    let backend = s.kids[be].id();
    // Wait until the backend serves I/O that faults, then freeze the broker until a backend
    // thread is caught waiting for a page (retrying if the freeze fell between requests).
    let t = Instant::now();
    while client_faults(&s.status(), "vhost-user-blk") < 8 {
        assert!(t.elapsed() < Duration::from_secs(60), "the backend never faulted");
        thread::sleep(Duration::from_millis(10));
    }
    let mut caught = false;
    for _ in 0..40 {
        kill(broker, Signal::SIGSTOP).unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(500) && !in_userfault(backend) {
            thread::sleep(Duration::from_millis(5));
        }
        if in_userfault(backend) {
            caught = true;
            break;
        }
        kill(broker, Signal::SIGCONT).unwrap();
        thread::sleep(Duration::from_millis(20));
    }
    assert!(caught, "the backend was never caught waiting for a page");
    s.kids[be].kill().unwrap();
    s.kids[be].wait().unwrap();
    kill(broker, Signal::SIGCONT).unwrap();
    let t = Instant::now();
    loop {
        let st = s.status();
        if st["departed"].as_array().unwrap().iter().any(|c| c["name"] == "vhost-user-blk") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the broker never dropped the dead backend: {st}");
        thread::sleep(Duration::from_millis(20));
    }
    // Another client reads every page: its faults are served and the restore completes.
    s.run_client("touch:0-4095");
    s.wait_serve(serve);
    let sums: serde_json::Value = serde_json::from_slice(&fs::read(s.path("sums.json")).unwrap()).unwrap();
    assert_eq!(sums["ram"], fnv(&s.image).as_str(), "destination RAM differs from the image");
}
