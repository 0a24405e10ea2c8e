//! A destination's [`NetworkSource`] over loopback TCP whose far ends the test holds: the test
//! writes frames on the main connection as a source would and reads requests on the urgent one.
//! The set-up of the stream-thread tests (tests/stream_thread.rs, tests/stream_priority.rs, tests/remove_race.rs).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postcopy_broker::incoming::Incoming;
use postcopy_broker::migration::destination::{Connections, NetState, NetworkSource};
use postcopy_broker::migration::transport::Transport;
use postcopy_broker::migration::wire::{encode, BlockInfo, BlockTable, Decoder, Frame, Limits};
use postcopy_broker::sched::StreamPriority;

/// The source's ends of the connections, and the destination's shared network state.
pub struct Wired {
    /// The main connection (background pages), source side.
    pub main: TcpStream,
    /// The urgent connection (requests and their answers), source side.
    pub urgent: TcpStream,
    /// The destination's network state (pauses, failure).
    pub net: Arc<NetState>,
    /// The one block's table, for decoders of the test's own.
    pub table: BlockTable,
}

fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let src = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (dst, _) = l.accept().unwrap();
    (src, dst)
}

/// A network source for `inc`'s block `name` (`pages` pages of `ps` bytes), its stream thread at
/// `priority`.
pub fn network_source(
    inc: &Incoming,
    name: &str,
    pages: u64,
    ps: u64,
    priority: StreamPriority,
) -> (NetworkSource, Wired) {
    let (id, _) = inc.blocks().named(name).unwrap();
    let table = BlockTable::new(vec![BlockInfo::new(name, pages * ps, ps)]).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (main, main_dst) = pair(&l);
    let (urgent, urgent_dst) = pair(&l);
    let conns = Connections {
        main: Transport::unprotected(main_dst).unwrap(),
        main_dec: Decoder::with_blocks(Limits::default(), table.clone()),
        urgent: Transport::unprotected(urgent_dst).unwrap(),
        urgent_dec: Decoder::with_blocks(Limits::default(), table.clone()),
        streams: Vec::new(),
    };
    let net = Arc::new(NetState::default());
    let src = NetworkSource::new(
        conns,
        Arc::clone(inc.uffd().unwrap()),
        Arc::clone(inc.blocks()),
        vec![id],
        Arc::clone(inc.state()),
        Arc::clone(&net),
        priority,
    )
    .unwrap();
    (src, Wired { main, urgent, net, table })
}

/// Write one frame.
pub fn send(s: &mut TcpStream, f: &Frame<'_>) {
    let mut buf = Vec::new();
    encode(f, &mut buf).unwrap();
    s.write_all(&buf).unwrap();
}

/// Poll `f` until it holds (60 s at most: a bound against hangs, not a timing assertion).
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}
