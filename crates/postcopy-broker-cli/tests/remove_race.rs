//! A client's removal (MADV_REMOVE: a REMOVE event, a discard) that races with the stream
//! thread's copy of the same pages: the placer checked the removal marks, then the client
//! removed, the fault loop marked and punched, and only then the copy landed. The placer's
//! check after the copy must punch the source's data out again, so that the client reads zeros.
//! The failpoint `place-after-removed-check` holds the stream thread between its check and its
//! copy (an in-process hook: this test binary has one test, and sets the variable before the
//! first placement), which makes the interleaving exact instead of a matter of luck.

mod common;

use common::clients::{client_args, fnv, Peer};
use common::wired::{network_source, send, wait_until};
use common::*;
use postcopy_broker::failpoint;
use postcopy_broker::fault::{Broker, BrokerConfig};
use postcopy_broker::migration::wire::Frame;

/// The stream thread at the process's priority.
const FULL: postcopy_broker::sched::StreamPriority = postcopy_broker::sched::StreamPriority::Fixed(0);
const PS: u64 = 4096;
const PAGES: u64 = 64;
const HOLD: &str = "place-after-removed-check";

#[test]
fn a_removal_between_the_placers_check_and_its_copy_still_reads_zeros() {
    std::env::set_var(failpoint::VAR, HOLD);
    let inc = listening_memfd("ram", PAGES);
    let (_, b) = inc.blocks().named("ram").unwrap();
    let (src, w) = network_source(&inc, "ram", PAGES, PS, FULL);
    let mut main_src = w.main;
    let h = Broker::spawn(&inc, Box::new(src), BrokerConfig::default()).unwrap();
    let mut client =
        Peer::spawn(&client_args(b, 1, "remove:10-11;wait;touch:8-13", &["--features", "remove"]));
    client.register(&h, "remover");

    // The stream brings the whole block; its placer checks the marks (none) and is held.
    let data = pattern(0x77, (PAGES * PS) as usize);
    send(&mut main_src, &Frame::Page { block: 0, offset: 0, demand: false, data: &data });
    wait_until("the placer held after its check", || failpoint::is_held(HOLD));
    assert_eq!(b.received().count_ones(), 0);

    // Now the client removes pages 10-11; the fault loop marks them and punches the range.
    client.go();
    let removed = client.line();
    assert_eq!(removed["step"], "remove:10-11", "{removed}");
    wait_until("the removal marks", || b.removed().count_ones() == 2);
    // A status round trip: the loop has finished handling the REMOVE event (mark, fence, punch).
    h.status().unwrap();

    // The copy lands over the punched pages; the check after it must punch them again.
    failpoint::release(HOLD);
    wait_until("every page", || b.received().count_ones() as u64 == PAGES);
    assert_eq!(b.removed().count_ones(), 2, "received pages that were removed keep their mark");

    client.go();
    let lines = client.finish_within(30);
    let pages = lines.iter().find_map(|l| l["pages"].as_array()).unwrap();
    assert_eq!(pages.len(), 6);
    for p in pages {
        let i = p["page"].as_u64().unwrap() as usize;
        let want = if i == 10 || i == 11 {
            fnv(&[0u8; PS as usize])
        } else {
            fnv(&data[i * PS as usize..(i + 1) * PS as usize])
        };
        assert_eq!(p["fnv"].as_str().unwrap(), want, "page {i} (removed: {})", i == 10 || i == 11);
    }
    h.stop().unwrap();
}
