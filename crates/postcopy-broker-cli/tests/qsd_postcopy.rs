//! qemu-storage-daemon (libvhost-user's vhost-user-blk export) as a real third-party backend in
//! the harder postcopy set-ups, with the guest driver example playing the VMM and doing virtio-blk
//! I/O from and into guest pages that have not arrived:
//! - a real migration (`source --precopy --dirty`, `serve --incoming`): precopy sends every page
//!   (a quarter of them zero), the dirty ranges are discarded and sent again in postcopy while
//!   the I/O runs; RAM and disk end equal to the source's final RAM;
//! - a hugetlbfs block (2 MiB pages) in a lazy restore;
//! - two RAM blocks, so that the memory table has two migrated regions (and the driver block).

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::vhost::{check_ram_and_disk, client, fnv, split_blocks, BlockSpec, JsonLines, Setup, PAGE};
use postcopy_broker::migration::verify::{checksum, VerifyReport};

const MIB: u64 = 1 << 20;

/// The dirty ranges of the migration (outside the disk's mirror at 8..10 MiB), as
/// `source --dirty` takes them and as byte ranges.
const DIRTY: &str = "ram:0+4M,ram:0xC00000+4M";
const DIRTY_RANGES: [(u64, u64); 2] = [(0, 4 * MIB), (12 * MIB, 4 * MIB)];

fn spawn_logged(s: &mut Setup, name: &str, cmd: &mut Command) -> usize {
    let child = cmd
        .stdout(fs::File::create(s.path(&format!("{name}.out"))).unwrap())
        .stderr(fs::File::create(s.path(&format!("{name}.err"))).unwrap())
        .spawn()
        .unwrap();
    s.kids.push(child);
    s.kids.len() - 1
}

/// The address `serve --incoming` listens on (the first line of its stdout).
fn listening_addr(s: &Setup, out: &Path) -> String {
    let t = Instant::now();
    loop {
        let text = fs::read_to_string(out).unwrap_or_default();
        if let Some(a) = text.lines().find_map(|l| l.strip_prefix("listening ")) {
            return a.trim().to_string();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "serve --incoming never listened: {}",
            s.log("serve.err")
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A live migration of 16 MiB: precopy sends every page (every fourth one zero), then 8 MiB are
/// dirtied (inverted at the source: zero pages become 0xff pages and 0xff pages zero pages),
/// discarded at the destination and sent again in postcopy at 2 MiB/s while the guest driver and
/// qemu-storage-daemon do I/O from and into guest pages until every page has arrived. Precopy's
/// zero pages stay holes at the destination; the I/O and the driver's final read of every page
/// fault on them too.
#[test]
fn qsd_io_during_postcopy_after_precopy_with_dirty_ranges_and_zero_pages() {
    let mut s = Setup::new("qsd-mig");
    // Every eighth page of the dirty ranges is all 0xff, so it becomes a zero page at the source
    // when dirtied: zero pages travel in postcopy too.
    for (off, len) in DIRTY_RANGES {
        for p in (off..off + len).step_by(8 * PAGE as usize) {
            s.image[p as usize..(p + PAGE) as usize].fill(0xff);
        }
    }
    fs::write(s.path("image"), &s.image).unwrap();
    let mut fin = s.image.clone();
    for (off, len) in DIRTY_RANGES {
        for b in &mut fin[off as usize..(off + len) as usize] {
            *b = !*b;
        }
    }
    s.write_disk(&fin);
    let key = s.path("key");
    common::mig::write_key(&key);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"));
    cmd.args(["serve", "--incoming", "127.0.0.1:0", "--key"])
        .arg(&key)
        .arg("--control")
        .arg(s.path("ctl.sock"))
        .arg("--verify-file")
        .arg(s.path("dst.json"))
        .arg("--summary-json")
        .arg(s.path("dst-summary.json"));
    let serve = spawn_logged(&mut s, "serve", &mut cmd);
    let addr = listening_addr(&s, &s.path("serve.out"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"));
    cmd.args(["source", "--connect", &addr, "--key"])
        .arg(&key)
        .arg("--image")
        .arg(s.path("image"))
        .args(s.block_args())
        .args(["--precopy", "--dirty", DIRTY, "--bandwidth", "2M", "--verify-file"])
        .arg(s.path("src.json"));
    let source = spawn_logged(&mut s, "source", &mut cmd);
    let (sock, _) = s.backend("qsd");
    let mut drv = s.driver(&sock, &["--until-complete", "--postcopy-ops", "1000000", "--touch-all"]);
    let out = JsonLines::new(&mut drv);
    let drv = s.adopt(drv);
    let st = s.wait_kid(drv, 300, "the guest driver");
    assert!(st.success(), "guest driver: {}\nserve: {}", s.log("driver.err"), s.log("serve.err"));
    let summary = out.next_with("postcopy", 10);
    for (i, what) in [(source, "source"), (serve, "serve")] {
        let st = s.wait_kid(i, 120, what);
        assert!(st.success(), "{what}: {}", s.log(&format!("{what}.err")));
    }

    // Every byte: the source's final RAM, the destination's, the driver's view, the disk.
    let src = VerifyReport::read(&s.path("src.json")).unwrap();
    let dst = VerifyReport::read(&s.path("dst.json")).unwrap();
    assert_eq!(src.blocks.len(), 1);
    assert_eq!(src.blocks[0].checksum, format!("{:016x}", checksum(&fin)), "the source's final RAM");
    assert_eq!(dst.blocks[0].checksum, src.blocks[0].checksum, "the destination's RAM");
    assert_eq!(summary["ram_checksums"]["ram"]["checksum"], src.blocks[0].checksum.as_str());
    check_ram_and_disk(&s.blocks, &fin, &s.path("disk"), &summary);
    assert_eq!(summary["postcopy_end"], "ok");
    // The I/O ran during postcopy: qemu-storage-daemon faulted, pages were demanded.
    let d: serde_json::Value =
        serde_json::from_slice(&fs::read(s.path("dst-summary.json")).unwrap()).unwrap();
    assert_eq!(d["precopy_pages"], 4096, "{d}");
    assert!(d["demand_pages"].as_u64().unwrap() > 0, "{d}");
    assert_eq!(
        d["demand_pages"].as_u64().unwrap() + d["background_pages"].as_u64().unwrap(),
        2048,
        "exactly the dirty pages came again: {d}"
    );
    let be = d["clients"].as_array().unwrap().iter().find(|c| c["name"] == "vhost-user-blk");
    let faults = be.map_or(0, |c| c["faults"].as_u64().unwrap_or(0));
    assert!(faults > 0, "qemu-storage-daemon never faulted during postcopy: {d}");
}

/// Lazy restore of a hugetlbfs block (2 MiB pages): qemu-storage-daemon faults on whole huge
/// pages the driver's I/O touches; each is fetched once; RAM and disk end right.
#[test]
fn qsd_serves_missing_pages_of_a_hugetlbfs_block() {
    common::ensure_free_huge_pages(8);
    let block = BlockSpec { name: "ram", size: 16 * MIB, page_size: 2 * MIB };
    let mut s = Setup::with_blocks("qsd-huge", &[block]);
    let serve = s.serve(&["--no-background"]);
    let (sock, _) = s.backend("qsd");
    let mut drv =
        s.driver(&sock, &["--postcopy-ops", "8", "--requests", "16", "--pause-after-io", "--touch-all"]);
    let out = JsonLines::new(&mut drv);
    let drv = s.adopt(drv);
    out.next_with("phase", 120);
    let st = s.status();
    let be = &client(&st, "vhost-user-blk")["stats"];
    let requested = be["pages_requested"].as_u64().unwrap();
    assert!((1..=8).contains(&requested), "huge pages asked for: {st}");
    assert!(be["faults"].as_u64().unwrap() >= requested, "{st}");
    assert_eq!(be["unmapped_faults"], 0, "{st}");
    assert!(st["received_pages"].as_u64().unwrap() <= 8, "{st}");
    s.say(drv, "go");
    let summary = out.next_with("postcopy", 300);
    assert!(s.wait_kid(drv, 60, "the guest driver").success(), "{}", s.log("driver.err"));
    s.wait_serve(serve);
    assert_eq!(summary["postcopy_end"], "ok");
    assert_eq!(summary["postcopy"]["writes"].as_array().unwrap().len(), 8);
    // libvhost-user echoes the frontend's addresses: both regions were corrected.
    assert_eq!(summary["handshake"]["corrected"], 2, "{}", summary["handshake"]);
    s.check_results(&summary);
}

/// Two RAM blocks, so that the memory table holds two migrated regions: the driver's writes come
/// from pages of both, its reads go into the second (the disk mirror is at 8 MiB); every page
/// qemu-storage-daemon touches is fetched once; both blocks end equal to the image.
#[test]
fn qsd_serves_missing_pages_of_two_blocks() {
    let blocks = [BlockSpec::small("ram", 8 * MIB), BlockSpec::small("ram2", 8 * MIB)];
    let mut s = Setup::with_blocks("qsd-two", &blocks);
    let serve = s.serve(&["--no-background"]);
    let (sock, _) = s.backend("qsd");
    let mut drv =
        s.driver(&sock, &["--postcopy-ops", "24", "--requests", "16", "--pause-after-io", "--touch-all"]);
    let out = JsonLines::new(&mut drv);
    let drv = s.adopt(drv);
    out.next_with("phase", 120);
    let st = s.status();
    let be = &client(&st, "vhost-user-blk")["stats"];
    // 24 writes from distinct missing pages and 24 reads into distinct missing pages.
    assert_eq!(be["pages_requested"], 48, "{st}");
    assert_eq!(be["unmapped_faults"], 0, "{st}");
    s.say(drv, "go");
    let summary = out.next_with("postcopy", 300);
    assert!(s.wait_kid(drv, 60, "the guest driver").success(), "{}", s.log("driver.err"));
    s.wait_serve(serve);
    assert_eq!(summary["postcopy_end"], "ok");
    assert_eq!(summary["blocks"], serde_json::json!(["ram", "ram2"]));
    let hs = &summary["handshake"];
    assert_eq!(hs["client_addrs"].as_array().unwrap().len(), 3, "two blocks and the driver block: {hs}");
    assert_eq!(hs["corrected"], 3, "{hs}");
    let gpas = |k: &str| -> Vec<u64> {
        summary["postcopy"][k].as_array().unwrap().iter().map(|o| o[0].as_u64().unwrap()).collect()
    };
    let (writes, reads) = (gpas("writes"), gpas("reads"));
    assert!(writes.iter().any(|g| *g < 8 * MIB) && writes.iter().any(|g| *g >= 8 * MIB), "{writes:?}");
    assert!(reads.iter().all(|g| *g >= 8 * MIB), "{reads:?}");
    s.check_results(&summary);
    for (name, bytes) in split_blocks(&s.blocks, &s.image) {
        assert_eq!(summary["ram_checksums"][name]["fnv"], fnv(bytes).as_str());
        assert_eq!(bytes.len() as u64 % PAGE, 0);
    }
}
