//! The destination's stream thread against real sockets and a real fault loop: a page somebody
//! waits for that arrives in the background stream (not as an answer on the urgent connection)
//! wakes its waiter, with the right contents, and is counted once; pages nobody waits for are
//! placed without waking anyone; a foreign page met by the stream is repaired and reported.

mod common;

use common::wired::{network_source, send, wait_until};
use common::*;
use postcopy_broker::fault::{Broker, BrokerConfig};
use postcopy_broker::migration::wire::{Decoder, Frame, Limits};

/// The stream thread at the process's priority.
const FULL: postcopy_broker::sched::StreamPriority = postcopy_broker::sched::StreamPriority::Fixed(0);
const PS: u64 = 4096;
const PAGES: u64 = 64;

#[test]
fn a_waited_page_that_arrives_in_the_stream_wakes_its_waiter() {
    let inc = listening_memfd("ram", PAGES);
    let (id, b) = inc.blocks().named("ram").unwrap();
    let (src, w) = network_source(&inc, "ram", PAGES, PS, FULL);
    let (mut main_src, mut urgent_src, net, table) = (w.main, w.urgent, w.net, w.table);
    let h = Broker::spawn(&inc, Box::new(src), BrokerConfig::default()).unwrap();

    // A thread of this process touches page 5: the fault loop requests it on the urgent
    // connection. The "source" reads the Request and never answers it there.
    let reader = spawn_reader(inc.blocks(), id, 5 * PS, PS);
    let mut urgent_dec = Decoder::with_blocks(Limits::default(), table.clone());
    match urgent_dec.read_frame(&mut urgent_src).unwrap() {
        Frame::Request { block: 0, offset, len } => assert_eq!((offset, len), (5 * PS, PS)),
        f => panic!("expected a Request for page 5, got {f:?}"),
    }
    assert_still_blocked(&reader);

    // The background stream brings pages 0-7 (data), nobody waits for 0-4 and 6-7.
    let data = pattern(0x33, (8 * PS) as usize);
    send(&mut main_src, &Frame::Page { block: 0, offset: 0, demand: false, data: &data });
    let got = finish(reader);
    assert_eq!(got, data[(5 * PS) as usize..(6 * PS) as usize], "the waiter sees the stream's page");

    // A zero page waited for, arriving inside a zero run of the stream.
    let reader = spawn_reader(inc.blocks(), id, 9 * PS, PS);
    match urgent_dec.read_frame(&mut urgent_src).unwrap() {
        Frame::Request { block: 0, offset, len } => assert_eq!((offset, len), (9 * PS, PS)),
        f => panic!("expected a Request for page 9, got {f:?}"),
    }
    send(&mut main_src, &Frame::ZeroRun { block: 0, offset: 8 * PS, len: 8 * PS, demand: false });
    assert_eq!(finish(reader), vec![0u8; PS as usize]);

    // Someone writes page 20 behind the broker's back: the stream's placer finds it (EEXIST on
    // a page never received) and repairs it.
    write_mapping(&second_mapping(b), 20 * PS, &[0xEEu8; 16]);
    // The rest of the block, nobody waiting.
    let rest = pattern(0x44, ((PAGES - 16) * PS) as usize);
    send(&mut main_src, &Frame::Page { block: 0, offset: 16 * PS, demand: false, data: &rest });
    wait_until("every page", || b.received().count_ones() as u64 == PAGES);

    let st = h.status().unwrap();
    let g = &st.broker;
    assert_eq!(g.pages_demand + g.pages_background, PAGES, "each page counted once: {g:?}");
    assert_eq!(g.pages_demand, 2, "the two waited pages count as demand: {g:?}");
    assert_eq!(g.pages_zero, 8, "{g:?}");
    assert_eq!(g.wakes, 2, "exactly the two waiters were woken: {g:?}");
    assert_eq!(g.requests, 2, "{g:?}");
    assert_eq!(g.foreign_pages, 1, "the stream thread's repair is in the status: {g:?}");
    h.stop().unwrap();

    let mut want = data.clone();
    want.extend(vec![0u8; (8 * PS) as usize]);
    want.extend(&rest);
    assert_eq!(read_block(b, 0, PAGES * PS), want);
    assert_peer_sees(b, 0, &want);
    assert!(net.failure().is_none(), "{:?}", net.failure());
}

#[test]
fn a_local_placement_failure_fails_the_migration_instead_of_pausing_it() {
    // Recovery is on (a resumer exists), yet a placement that fails on this host must not be
    // taken for a lost connection: a reconnect would meet the same failure, again and again.
    let inc = listening_memfd("ram", PAGES);
    let (_, b) = inc.blocks().named("ram").unwrap();
    let (mut src, w) = network_source(&inc, "ram", PAGES, PS, FULL);
    let (mut main_src, net) = (w.main, w.net);
    let _resumer = src.resumer();
    let h = Broker::spawn(&inc, Box::new(src), BrokerConfig::default()).unwrap();
    // Pages 8-15 of the placement mapping are no longer registered: UFFDIO_COPY there fails
    // with a real error of this host (ENOENT), not of the connection.
    inc.uffd().unwrap().unregister(b.host_addr() + 8 * PS, 8 * PS).unwrap();
    let data = pattern(0x55, (8 * PS) as usize);
    send(&mut main_src, &Frame::Page { block: 0, offset: 8 * PS, demand: false, data: &data });
    wait_until("the failure", || net.failure().is_some() || net.paused().is_some());
    let why = net.failure().expect("a local placement failure paused the migration");
    assert!(why.contains("placing pages failed on this host"), "{why}");
    assert!(net.paused().is_none());
    assert_eq!(net.pauses.load(std::sync::atomic::Ordering::Acquire), 0);
    assert_eq!(b.received().count_ones(), 0);
    h.stop().unwrap();
}

#[test]
fn pages_a_client_removed_before_they_arrived_are_zeros_when_the_stream_brings_them() {
    // The removal marks live in the block, so the stream thread (not only the fault loop)
    // places zeros there instead of the source's data.
    let inc = listening_memfd("ram", PAGES);
    let (_, b) = inc.blocks().named("ram").unwrap();
    let (src, w) = network_source(&inc, "ram", PAGES, PS, FULL);
    let mut main_src = w.main;
    let h = Broker::spawn(&inc, Box::new(src), BrokerConfig::default()).unwrap();
    let mut client = common::clients::Peer::spawn(&common::clients::client_args(
        b,
        1,
        "remove:10-11;wait;touch:8-13",
        &["--features", "remove"],
    ));
    client.register(&h, "remover");
    client.go();
    let removed = client.line();
    assert_eq!(removed["step"], "remove:10-11", "{removed}");
    wait_until("the removal marks", || b.removed().count_ones() == 2);
    let data = pattern(0x66, (PAGES * PS) as usize);
    send(&mut main_src, &Frame::Page { block: 0, offset: 0, demand: false, data: &data });
    wait_until("every page", || b.received().count_ones() as u64 == PAGES);
    client.go();
    let lines = client.finish_within(30);
    let pages = lines.iter().find_map(|l| l["pages"].as_array()).unwrap();
    for p in pages {
        let i = p["page"].as_u64().unwrap() as usize;
        let want = if i == 10 || i == 11 {
            common::clients::fnv(&[0u8; PS as usize])
        } else {
            common::clients::fnv(&data[i * PS as usize..(i + 1) * PS as usize])
        };
        assert_eq!(p["fnv"].as_str().unwrap(), want, "page {i}");
    }
    assert_eq!(b.removed().count_ones(), 0, "the marks are done with");
    h.stop().unwrap();
}
