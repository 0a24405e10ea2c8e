//! The fault loop against the real kernel: separate client processes fault on shared memfd
//! pages, the broker places each page once and wakes exactly the waiting clients.

mod common;

use std::time::Duration;

use common::clients::*;
use postcopy_broker::fault::{BrokerConfig, Registration, RegistrationMap};

#[test]
fn concurrent_clients_on_overlapping_pages_read_the_source() {
    let pages = 1024;
    let data = content(pages, 4096, 7);
    let (inc, h) = broker(pages, &data, BrokerConfig::default());
    let b = inc.blocks().get(0).unwrap();
    let mut peers = vec![
        Peer::spawn(&client_args(b, 1, "touch:0-299", &[])),
        Peer::spawn(&client_args(b, 2, "touchall:200-499", &[])),
        Peer::spawn(&client_args(b, 1, "touch:0-499", &[])),
    ];
    for (i, p) in peers.iter().enumerate() {
        p.register(&h, &format!("client-{i}"));
    }
    for p in &mut peers {
        p.go();
    }
    let mut checked = 0;
    for p in &mut peers {
        checked += check_pages(&p.finish(), &data, 4096);
    }
    assert_eq!(checked, 300 + 600 + 500);
    let st = h.status().unwrap();
    // 500 distinct pages were wanted; each was placed once.
    assert_eq!(st.broker.pages_demand, 500, "{st:?}");
    assert_eq!(st.received_pages, 500);
    let requested: u64 = st.all_clients().map(|c| c.stats.pages_requested).sum();
    assert_eq!(requested, 500, "one request per page, later faults join it: {st:#?}");
    // Every wake went to a fault that waited or found its page already there.
    let faults: u64 = st.all_clients().map(|c| c.stats.faults).sum();
    assert!(st.broker.wakes <= faults, "{st:?}");
    h.stop().unwrap();
}

#[test]
fn idle_clients_get_no_wakes_while_background_places_pages() {
    let pages = 10_000;
    let data = content(pages, 4096, 3);
    let config = BrokerConfig { background: true, ..Default::default() };
    let mut blocks = postcopy_broker::RamBlocks::new();
    blocks.add(postcopy_broker::RamBlock::memfd("ram", (pages * 4096) as u64).unwrap()).unwrap();
    let mut inc = postcopy_broker::Incoming::new(blocks);
    inc.advise().unwrap();
    inc.listen().unwrap();
    // Register the idle clients before any page moves: start the loop without background first.
    let b = inc.blocks().get(0).unwrap();
    let mut peers: Vec<Peer> = (0..4).map(|_| Peer::spawn(&client_args(b, 1, "wait", &[]))).collect();
    let src = Box::new(postcopy_broker::source::MemorySource::new(vec![(data.clone(), 4096)]));
    let h = postcopy_broker::fault::Broker::spawn(&inc, src, config).unwrap();
    for (i, p) in peers.iter().enumerate() {
        p.register(&h, &format!("idle-{i}"));
    }
    assert!(h.wait_all_received(Duration::from_secs(120)));
    let st = h.status().unwrap();
    assert_eq!(st.broker.pages_background, pages as u64);
    assert_eq!(st.broker.wakes, 0, "no broadcast of placed pages to idle clients");
    for p in &mut peers {
        p.go();
        p.go();
        p.finish();
    }
    h.stop().unwrap();
}

#[test]
fn a_fault_read_after_its_page_landed_is_woken() {
    let pages = 64;
    let data = content(pages, 4096, 11);
    let (inc, h) = broker(pages, &data, BrokerConfig::default());
    let b = inc.blocks().get(0).unwrap();
    // The client faults on page 5 before the broker has its uffd: the message waits in its queue.
    let mut p = Peer::spawn(&client_args(b, 1, "touch:5", &["--no-wait"]));
    let uffd = p.take_uffd();
    wait_readable(&uffd);
    // Meanwhile page 5 lands because the broker itself touches it through its own mapping.
    let host = b.host_addr() + 5 * 4096;
    let got = std::thread::spawn(move || {
        // SAFETY: reading a page of the broker's live placement mapping; it blocks until placed.
        unsafe { std::ptr::read_volatile(host as *const u64) }
    })
    .join()
    .unwrap();
    assert_eq!(got.to_le_bytes(), data[5 * 4096..5 * 4096 + 8]);
    assert!(b.is_received(5 * 4096));
    let id = p.register_fd(&h, "late", uffd);
    check_pages(&p.finish(), &data, 4096);
    let st = h.status().unwrap();
    let c = st.all_clients().find(|c| c.id == id).unwrap();
    assert_eq!(c.stats.already_there, 1, "{c:?}");
    assert_eq!(c.stats.pages_requested, 0);
    h.stop().unwrap();
}

#[test]
fn a_registration_outside_the_blocks_is_refused() {
    let data = content(16, 4096, 1);
    let (inc, h) = broker(16, &data, BrokerConfig::default());
    let b = inc.blocks().get(0).unwrap();
    let p = Peer::spawn(&client_args(b, 1, "", &[]));
    let mut m = p.mappings();
    m[0].len = 32 * 4096;
    let err = h
        .register(Registration {
            name: "bad".into(),
            uffd: p.take_uffd(),
            pid: Some(p.pid()),
            map: RegistrationMap::Shared(m),
        })
        .unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    let mut m = p.mappings();
    m[0].block = 9;
    assert!(h
        .register(Registration {
            name: "bad".into(),
            uffd: p.take_uffd(),
            pid: None,
            map: RegistrationMap::Shared(m)
        })
        .is_err());
    assert_eq!(h.status().unwrap().clients.len(), 0);
    drop(p);
    h.stop().unwrap();
}
