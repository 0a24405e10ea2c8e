//! Outstanding page requests and their waiters, keyed by (block, page) — never by a client's
//! virtual address — so that concurrent faults from any clients join one request (invariant 4)
//! and a landing page wakes exactly the clients that wait for it.
//!
//! The fault path allocates nothing here in steady state: waiters live in a slab of nodes reused
//! through a free list (each request holds a linked list of its waiters), and the request map
//! keeps its capacity when requests complete. Keys are hashed with a multiply-rotate hash, not
//! SipHash (the keys are page numbers, not attacker-chosen strings).

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::time::Instant;

use crate::client::ClientId;
use crate::hasher::PageHasher;
use crate::ram::BlockId;

/// A blocked fault: which client, at which of its (page-aligned) addresses, since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    /// The client.
    pub client: ClientId,
    /// Page-aligned address in the client.
    pub addr: u64,
    /// When the fault was read.
    pub since: Instant,
}

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    w: Waiter,
    next: u32,
}

/// First and last waiter node of one request (NIL when nobody waits any more).
#[derive(Debug, Clone, Copy)]
struct List {
    first: u32,
    last: u32,
}

/// The outstanding requests.
#[derive(Debug, Default)]
pub struct Pending {
    map: HashMap<(BlockId, u64), List, BuildHasherDefault<PageHasher>>,
    nodes: Vec<Node>,
    free: Vec<u32>,
}

impl Pending {
    fn alloc(&mut self, w: Waiter) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = Node { w, next: NIL };
                i
            }
            None => {
                self.nodes.push(Node { w, next: NIL });
                u32::try_from(self.nodes.len() - 1).unwrap_or(NIL)
            }
        }
    }

    /// Record `w` as waiting for page `page` of `block`. Returns true when this creates a new
    /// request (nobody asked for the page before), false when it joins an outstanding one.
    pub fn join(&mut self, block: BlockId, page: u64, w: Waiter) -> bool {
        if let Some(list) = self.map.get(&(block, page)).copied() {
            let mut i = list.first;
            while i != NIL {
                let n = &self.nodes[i as usize];
                if n.w.client == w.client && n.w.addr == w.addr {
                    return false;
                }
                i = n.next;
            }
            let node = self.alloc(w);
            let list = match list.last {
                NIL => List { first: node, last: node },
                last => {
                    self.nodes[last as usize].next = node;
                    List { first: list.first, last: node }
                }
            };
            self.map.insert((block, page), list);
            return false;
        }
        let node = self.alloc(w);
        self.map.insert((block, page), List { first: node, last: node });
        true
    }

    /// Whether a request for the page is outstanding.
    pub fn contains(&self, block: BlockId, page: u64) -> bool {
        self.map.contains_key(&(block, page))
    }

    /// The page landed: end its request and append its waiters to `out`. Returns whether a
    /// request was outstanding. Allocates nothing when `out` has room.
    pub fn take_into(&mut self, block: BlockId, page: u64, out: &mut Vec<Waiter>) -> bool {
        let Some(list) = self.map.remove(&(block, page)) else { return false };
        let mut i = list.first;
        while i != NIL {
            let n = self.nodes[i as usize];
            out.push(n.w);
            self.free.push(i);
            i = n.next;
        }
        true
    }

    /// The page landed: take its waiters.
    pub fn take(&mut self, block: BlockId, page: u64) -> Option<Vec<Waiter>> {
        let mut out = Vec::new();
        self.take_into(block, page, &mut out).then_some(out)
    }

    /// Unlink the waiters of every request for which `hit` says so, passing each to `taken`.
    fn unlink(&mut self, mut hit: impl FnMut(&Waiter) -> bool, mut taken: impl FnMut(Waiter)) {
        for list in self.map.values_mut() {
            let (mut prev, mut i) = (NIL, list.first);
            while i != NIL {
                let n = self.nodes[i as usize];
                if hit(&n.w) {
                    taken(n.w);
                    self.free.push(i);
                    if prev == NIL {
                        list.first = n.next;
                    } else {
                        self.nodes[prev as usize].next = n.next;
                    }
                    if list.last == i {
                        list.last = prev;
                    }
                } else {
                    prev = i;
                }
                i = n.next;
            }
        }
    }

    /// Forget a client's waiters (it exited); requests stay outstanding (the page still comes).
    pub fn drop_client(&mut self, client: ClientId) {
        self.unlink(|w| w.client == client, |_| {});
    }

    /// Take a client's waiters whose address lies in `[start, end)`.
    pub fn take_client_range(&mut self, client: ClientId, start: u64, end: u64) -> Vec<Waiter> {
        let mut out = Vec::new();
        self.unlink(|w| w.client == client && w.addr >= start && w.addr < end, |w| out.push(w));
        out
    }

    /// Number of outstanding requests.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is outstanding.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Up to `limit` outstanding requests, oldest waiter first: (block, page, its waiters), for
    /// the status report's list of what is waiting.
    pub fn snapshot(&self, limit: usize) -> Vec<(BlockId, u64, Vec<Waiter>)> {
        let mut out: Vec<(BlockId, u64, Vec<Waiter>)> = self
            .map
            .iter()
            .map(|(&(block, page), list)| {
                let mut ws = Vec::new();
                let mut i = list.first;
                while i != NIL {
                    let n = self.nodes[i as usize];
                    ws.push(n.w);
                    i = n.next;
                }
                (block, page, ws)
            })
            .collect();
        out.sort_by_key(|(b, p, ws)| (ws.iter().map(|w| w.since).min(), *b, *p));
        out.truncate(limit);
        out
    }

    /// Every outstanding (block, page), for re-issuing after a reconnect.
    pub fn keys(&self) -> Vec<(BlockId, u64)> {
        let mut k: Vec<_> = self.map.keys().copied().collect();
        k.sort_unstable();
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_faults_join_one_request() {
        let now = Instant::now();
        let w = |c, a| Waiter { client: ClientId(c), addr: a, since: now };
        let mut p = Pending::default();
        assert!(p.join(0, 5, w(1, 0x1000)));
        assert!(!p.join(0, 5, w(2, 0x9000)));
        assert!(!p.join(0, 5, w(1, 0x1000)), "the same fault twice is one waiter");
        assert!(p.join(0, 6, w(1, 0x2000)));
        assert_eq!(p.len(), 2);
        p.drop_client(ClientId(2));
        let ws = p.take(0, 5).unwrap();
        assert_eq!(ws, vec![w(1, 0x1000)]);
        assert!(!p.contains(0, 5) && p.contains(0, 6));
        assert_eq!(p.take_client_range(ClientId(1), 0x2000, 0x3000), vec![w(1, 0x2000)]);
        assert_eq!(p.keys(), vec![(0, 6)]);
        assert_eq!(p.snapshot(10), vec![(0, 6, vec![])], "a request nobody waits for any more is listed");
        let later =
            Waiter { client: ClientId(3), addr: 0x7000, since: now + std::time::Duration::from_millis(5) };
        assert!(p.join(1, 9, later));
        assert!(!p.join(0, 6, w(2, 0x4000)));
        assert_eq!(p.snapshot(10), vec![(0, 6, vec![w(2, 0x4000)]), (1, 9, vec![later])], "oldest first");
        assert_eq!(p.snapshot(1).len(), 1);
    }

    #[test]
    fn waiters_keep_order_and_nodes_are_reused() {
        let now = Instant::now();
        let w = |c, a| Waiter { client: ClientId(c), addr: a, since: now };
        let mut p = Pending::default();
        for round in 0..100u64 {
            assert!(p.join(1, round, w(1, 0x1000)));
            assert!(!p.join(1, round, w(2, 0x2000)));
            assert!(!p.join(1, round, w(3, 0x3000)));
            // Unlink the middle one, then the last: the list stays consistent.
            assert_eq!(p.take_client_range(ClientId(2), 0, u64::MAX), vec![w(2, 0x2000)]);
            assert!(!p.join(1, round, w(4, 0x4000)));
            p.drop_client(ClientId(4));
            assert!(!p.join(1, round, w(5, 0x5000)));
            let mut out = Vec::with_capacity(8);
            assert!(p.take_into(1, round, &mut out));
            assert_eq!(out, vec![w(1, 0x1000), w(3, 0x3000), w(5, 0x5000)]);
            assert!(!p.take_into(1, round, &mut out));
        }
        assert!(p.is_empty());
        assert!(p.nodes.len() <= 5, "nodes are reused: {}", p.nodes.len());
        // A request whose every waiter left stays outstanding, and can be joined again.
        assert!(p.join(2, 0, w(1, 0x1000)));
        p.drop_client(ClientId(1));
        assert!(p.contains(2, 0));
        assert!(!p.join(2, 0, w(6, 0x6000)));
        assert_eq!(p.take(2, 0).unwrap(), vec![w(6, 0x6000)]);
    }
}
