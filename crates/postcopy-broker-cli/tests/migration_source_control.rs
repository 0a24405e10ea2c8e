//! `postcopy-broker source --control`: the VMM hands its RAM memfds to the source page server,
//! dirties pages after precopy and reports them, then starts postcopy; the destination ends with
//! the final contents.

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use postcopy_broker::control::protocol::BlockSpec;
use postcopy_broker::control::{ControlClient, Request, Response};
use postcopy_broker::migration::verify::VerifyReport;
use postcopy_broker::ram::RamBlock;

const BIN: &str = env!("CARGO_BIN_EXE_postcopy-broker");

#[test]
fn memfds_over_the_source_control_socket_with_dirty_ranges() {
    let dir = std::env::temp_dir().join(format!("pcb-srcctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key");
    std::fs::write(&key, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // The VMM's guest RAM: a memfd with a pattern.
    let ram = RamBlock::memfd("pc.ram", 16 << 20).unwrap();
    let fill = |off: u64, len: u64, v: u8| {
        // SAFETY: the range lies inside this test's own shared mapping of the memfd (not
        // registered with any userfaultfd).
        unsafe { std::ptr::write_bytes(ram.host_ptr().add(off as usize), v, len as usize) }
    };
    for i in 0..(16u64 << 20) / 4096 {
        if i % 3 != 0 {
            fill(i * 4096, 4096, (i % 251) as u8 + 1);
        }
    }
    let mut dest = Command::new(BIN)
        .args(["serve", "--incoming", "127.0.0.1:0", "--control"])
        .arg(dir.join("dst.sock"))
        .arg("--key")
        .arg(&key)
        .arg("--verify-file")
        .arg(dir.join("dst.json"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut dest_out = BufReader::new(dest.stdout.take().unwrap());
    dest_out.read_line(&mut line).unwrap();
    // Keep reading the destination's stdout so its summary never hits a closed pipe.
    let drain = std::thread::spawn(move || std::io::Read::read_to_end(&mut dest_out, &mut Vec::new()));
    let addr = line.trim().strip_prefix("listening ").unwrap().to_string();
    let ctl = dir.join("src.sock");
    let mut source = Command::new(BIN)
        .args(["source", "--connect", &addr, "--precopy", "--control"])
        .arg(&ctl)
        .arg("--key")
        .arg(&key)
        .arg("--verify-file")
        .arg(dir.join("src.json"))
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !ctl.exists() {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut c = ControlClient::connect(&ctl).unwrap();
    let blocks = vec![BlockSpec { name: "pc.ram".into(), size: 16 << 20, page_size: 4096 }];
    let fd = ram.fd().unwrap();
    let (r, _) = c.request(&Request::ProvideBlocks { blocks }, &[fd.as_fd()]).unwrap();
    assert_eq!(r, Response::Ok);
    // The guest writes after precopy: the VMM changes its RAM and reports the range.
    fill(0x10000, 0x3000, 0xEE);
    fill(0x200000, 4096, 0);
    for (off, len) in [(0x10000u64, 0x3000u64), (0x200000, 4096)] {
        let (r, _) = c.request(&Request::Dirty { block: "pc.ram".into(), offset: off, len }, &[]).unwrap();
        assert_eq!(r, Response::Ok);
    }
    let (r, _) = c.request(&Request::Dirty { block: "nope".into(), offset: 0, len: 4096 }, &[]).unwrap();
    assert!(matches!(r, Response::Error { .. }), "{r:?}");
    let (r, _) = c.request(&Request::StartPostcopy, &[]).unwrap();
    assert_eq!(r, Response::Ok);
    assert!(source.wait().unwrap().success());
    assert!(dest.wait().unwrap().success());
    drain.join().unwrap().unwrap();
    let read =
        |n: &str| -> VerifyReport { serde_json::from_slice(&std::fs::read(dir.join(n)).unwrap()).unwrap() };
    let (s, d) = (read("src.json"), read("dst.json"));
    assert_eq!(s.blocks.len(), 1);
    assert_eq!(s.blocks[0].checksum, d.blocks[0].checksum, "destination equals the source's final RAM");
    std::fs::remove_dir_all(&dir).unwrap();
}
