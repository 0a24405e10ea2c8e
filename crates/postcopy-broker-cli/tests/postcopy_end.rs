//! The end of the broker does not hang its clients: a pcb-client still registered over the
//! control socket when a restore completes gets `postcopy_end`, unregisters its ranges, closes
//! its userfaultfd and unregisters; the broker exits, and the client's fork() and MADV_REMOVE
//! afterwards (events nobody would read) complete, and its reads show the image and the holes
//! it punched.

mod common;

use common::clients::{content, control_args, fnv, Peer};
use common::serve::Serve;

const PAGES: usize = 256;
const PS: usize = 4096;

#[test]
fn a_client_registered_past_the_end_forks_and_removes_and_finishes() {
    let data = content(PAGES, PS, 0xe1d5);
    let mut srv = Serve::start("postcopy-end", &data, &["--block", &format!("ram:{}", PAGES * PS)]);
    // Touch every page (the restore completes), wait past the end, then fork, remove two pages
    // and read again, the child and then the parent.
    let script = format!("touch:0-{};wait;fork;remove:10-11;touch:0-20", PAGES - 1);
    let mut c =
        Peer::spawn(&control_args(&srv.sock, &script, &["--block", "ram", "--features", "remove,fork"]));
    c.go();
    let first = c.line();
    assert_eq!(first["pages"].as_array().map(Vec::len), Some(PAGES), "{first}");
    let ended = c.line();
    assert!(ended["postcopy_end"].is_array(), "the client was told of the end: {ended}");
    let st = srv.wait_exit();
    assert!(st.success(), "the broker exits 0: {}", srv.log_text());
    let log = srv.log_text();
    assert!(log.contains("every control client unregistered after postcopy_end"), "{log}");
    c.go();
    let lines = c.finish_within(30);
    let mut checked = 0;
    for l in lines.iter().chain([&first]) {
        let Some(pages) = l["pages"].as_array() else { continue };
        let removed = l["step"] == "touch:0-20";
        for p in pages {
            let i = p["page"].as_u64().unwrap() as usize;
            let want = if removed && (10..=11).contains(&i) {
                fnv(&[0u8; PS])
            } else {
                fnv(&data[i * PS..(i + 1) * PS])
            };
            assert_eq!(p["fnv"].as_str().unwrap(), want, "page {i} in {l}");
            checked += 1;
        }
    }
    assert_eq!(checked, PAGES + 2 * 21, "the first reads, then the child's and the parent's");
    assert!(lines.iter().any(|l| l["who"] == "child" && l["done"] == true), "the forked child finished");
}
