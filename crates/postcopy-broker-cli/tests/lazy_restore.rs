//! `postcopy-broker serve --image`: lazy restore from a snapshot image, with a client process
//! faulting while the background fill runs, ends with memory identical to the image.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::clients::*;

#[test]
fn lazy_restore_from_an_image_gives_identical_memory() {
    common::ensure_free_huge_pages(4);
    let dir = std::env::temp_dir().join(format!("pcb-lazy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("snap.img");
    let sock = dir.join("broker.sock");
    let sums = dir.join("sums.json");
    let small = content(2048, 4096, 41); // 8 MiB of 4 KiB pages
    let huge = content(4, 2 << 20, 43); // 8 MiB of 2 MiB pages
    let mut img = small.clone();
    img.extend_from_slice(&huge);
    std::fs::write(&image, &img).unwrap();
    let mut broker = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["serve", "--block", "ram:8M", "--block", "huge:8M:2M", "--image"])
        .arg(&image)
        .arg("--control")
        .arg(&sock)
        .arg("--checksums")
        .arg(&sums)
        .args(["--wait-clients", "1"])
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "the broker never opened its socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A client reads pages while the background fill runs; whatever it reads equals the image.
    let mut p = Peer::spawn(&control_args(&sock, "touch:2000-2047;touch:0-63", &[]));
    p.go();
    let lines = p.finish();
    assert_eq!(check_pages(&lines, &small, 4096), 112);
    let st = broker.wait().unwrap();
    assert!(st.success(), "serve exited with {st}");
    let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&sums).unwrap()).unwrap();
    assert_eq!(got["ram"], fnv(&small).as_str());
    assert_eq!(got["huge"], fnv(&huge).as_str());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn serve_refuses_blocks_without_an_image() {
    let out = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["serve", "--block", "ram:8M", "--control", "/tmp/pcb-noimage.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--image"));
    let out = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["serve", "--block", "ram:12345", "--image", "/dev/null", "--control", "/tmp/pcb-bad.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of"));
}
