//! A broker whose fault loop dies exits at once, non-zero, with the cause, instead of staying up
//! and serving nobody (every client of every VM would hang without a word). The loop is made to
//! die with the POSTCOPY_BROKER_FAILPOINT test hook, both ways a thread can end: a panic and an
//! error.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Wait for `child` to exit (at most `secs`, then kill it and fail); its status and stderr.
fn exit_within(mut child: Child, secs: u64) -> (std::process::ExitStatus, String) {
    let end = Instant::now() + Duration::from_secs(secs);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("the broker stayed up with a dead fault loop");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (st, err)
}

fn restore(dir: &common::mig::Dir, failpoint: &str) -> Child {
    let img = dir.path("img");
    std::fs::write(&img, vec![7u8; 4 << 20]).unwrap();
    Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["serve", "--image"])
        .arg(&img)
        .args(["--block", "ram:4M", "--no-background", "--control"])
        .arg(dir.path("control.sock"))
        .env("POSTCOPY_BROKER_FAILPOINT", failpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_panicking_fault_loop_ends_the_broker_with_the_cause() {
    let dir = common::mig::Dir::new("panic-loop");
    let (st, err) = exit_within(restore(&dir, "fault-loop-panic"), 30);
    assert_eq!(st.code(), Some(101), "{st}: {err}");
    assert!(err.contains("thread 'postcopy-fault' panicked") && err.contains("failpoint"), "{err}");
    // The socket file stays (no destructor runs after a panic): the next broker replaces it.
    let (st, err) = exit_within(restore(&dir, "fault-loop-error"), 30);
    assert!(err.contains("removing stale control socket"), "{st}: {err}");
}

#[test]
fn a_fault_loop_that_fails_ends_the_broker_with_the_cause() {
    let dir = common::mig::Dir::new("error-loop");
    let (st, err) = exit_within(restore(&dir, "fault-loop-error"), 30);
    assert_eq!(st.code(), Some(1), "{st}: {err}");
    assert!(err.contains("the fault loop died: failpoint fault-loop-error"), "{err}");
}

#[test]
fn a_destination_whose_fault_loop_dies_fails_the_migration() {
    let dir = common::mig::Dir::new("panic-incoming");
    let key = dir.path("key");
    common::mig::write_key(&key);
    let img = dir.path("img");
    std::fs::write(&img, common::mig::contents(4 << 20, 4096, 5, 4)).unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["serve", "--incoming", "127.0.0.1:0", "--control"])
        .arg(dir.path("control.sock"))
        .arg("--key")
        .arg(&key)
        .env("POSTCOPY_BROKER_FAILPOINT", "fault-loop-error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(serve.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let addr = line.trim().strip_prefix("listening ").unwrap().to_string();
    let source = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["source", "--connect", &addr, "--key"])
        .arg(&key)
        .arg("--image")
        .arg(&img)
        .args(["--block", "ram:4M", "--bandwidth", "1M", "--resume-timeout", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (st, err) = exit_within(serve, 60);
    assert!(!st.success(), "{err}");
    assert!(err.contains("the fault loop died"), "{err}");
    let (sst, serr) = exit_within(source, 120);
    assert!(!sst.success(), "the source of a failed destination exited 0: {serr}");
}
