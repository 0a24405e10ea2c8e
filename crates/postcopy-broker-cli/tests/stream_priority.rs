//! The destination's stream thread follows demand (issue #15, item 3): at its low nice value
//! while no fault waits, at the broker's priority while one does, and back (after the hold,
//! `sched::DEMAND_HOLD`) once the page arrived, whether it came as a demand answer or in the
//! background stream. Real
//! sockets (this test plays the source), a real fault loop and userfaultfd; the states are read
//! from /proc/self/task/TID/stat, the scheduler's own view.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::wired::{network_source, send};
use common::*;
use postcopy_broker::fault::{Broker, BrokerConfig};
use postcopy_broker::migration::wire::{Decoder, Frame, Limits};
use postcopy_broker::sched::StreamPriority;

const PS: u64 = 4096;
const PAGES: u64 = 64;
const LOW: i32 = 13;

/// Nice values of this process's threads named `comm` (field 19 of their stat).
fn nice_of(comm: &str) -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|n| n.trim() == comm))
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            stat.rsplit_once(") ")?.1.split_whitespace().nth(16)?.parse().ok()
        })
        .collect()
}

/// Wait (a minute at most, as a safety net) until the stream thread runs at `nice`; `nudge`
/// runs between looks (to keep the stream busy).
fn wait_stream_nice(nice: i32, why: &str, mut nudge: impl FnMut()) {
    let t = Instant::now();
    loop {
        let seen = nice_of("postcopy-stream");
        if seen == [nice] {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{why}: the stream thread runs at {seen:?}, not {nice}"
        );
        nudge();
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Pages nobody waits for, one per call, from `next` (the stream thread lowers itself between
/// the frames it reads, once the hold after the last waiting fault is over).
fn stream_pages<'a>(main: &'a mut TcpStream, next: &'a mut u64, end: u64) -> impl FnMut() + 'a {
    move || {
        if *next < end {
            let data = pattern(0x60, PS as usize);
            send(main, &Frame::Page { block: 0, offset: *next * PS, demand: false, data: &data });
            *next += 1;
        }
    }
}

#[test]
fn the_stream_thread_runs_at_full_priority_exactly_while_a_fault_waits() {
    let base = postcopy_broker::sched::thread_nice().unwrap();
    let inc = listening_memfd("ram", PAGES);
    let (id, _) = inc.blocks().named("ram").unwrap();
    let (src, w) = network_source(&inc, "ram", PAGES, PS, StreamPriority::Adaptive { low: LOW });
    let (mut main_src, mut urgent_src, net, table) = (w.main, w.urgent, w.net, w.table);
    let h = Broker::spawn(&inc, Box::new(src), BrokerConfig::default()).unwrap();
    wait_stream_nice(LOW, "nothing waits yet", || {});

    // A fault on page 5: requested, and unanswered while we look.
    let reader = spawn_reader(inc.blocks(), id, 5 * PS, PS);
    let mut urgent_dec = Decoder::with_blocks(Limits::default(), table.clone());
    match urgent_dec.read_frame(&mut urgent_src).unwrap() {
        Frame::Request { block: 0, offset, len } => assert_eq!((offset, len), (5 * PS, PS)),
        f => panic!("expected a Request for page 5, got {f:?}"),
    }
    wait_stream_nice(base, "a fault waits", || {});
    assert_still_blocked(&reader);
    assert_eq!(nice_of("postcopy-fault"), [base], "the fault loop is never touched");

    // The demand answer frees the fault: the stream goes back down.
    let page5 = pattern(0x21, PS as usize);
    send(&mut urgent_src, &Frame::Page { block: 0, offset: 5 * PS, demand: true, data: &page5 });
    assert_eq!(finish(reader), page5);
    let mut next = 16;
    wait_stream_nice(LOW, "the fault was served", stream_pages(&mut main_src, &mut next, 40));

    // Again, with the waited page arriving in the background stream instead.
    let reader = spawn_reader(inc.blocks(), id, 9 * PS, PS);
    match urgent_dec.read_frame(&mut urgent_src).unwrap() {
        Frame::Request { block: 0, offset, len } => assert_eq!((offset, len), (9 * PS, PS)),
        f => panic!("expected a Request for page 9, got {f:?}"),
    }
    wait_stream_nice(base, "a second fault waits", || {});
    let rest = pattern(0x43, (8 * PS) as usize);
    send(&mut main_src, &Frame::Page { block: 0, offset: 8 * PS, demand: false, data: &rest });
    assert_eq!(finish(reader), rest[PS as usize..(2 * PS) as usize]);
    let mut next = 40;
    wait_stream_nice(
        LOW,
        "the stream brought the waited page",
        stream_pages(&mut main_src, &mut next, PAGES),
    );

    let st = h.status().unwrap();
    assert_eq!(st.broker.requests, 2, "{:?}", st.broker);
    assert_eq!(st.broker.wakes, 2, "{:?}", st.broker);
    h.stop().unwrap();
    assert!(net.failure().is_none(), "{:?}", net.failure());
}
