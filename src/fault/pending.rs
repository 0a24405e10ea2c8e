//! Outstanding page requests and their waiters, keyed by (block, page) — never by a client's
//! virtual address — so that concurrent faults from any clients join one request (invariant 4)
//! and a landing page wakes exactly the clients that wait for it.

use std::collections::HashMap;
use std::time::Instant;

use crate::client::ClientId;
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

/// The outstanding requests.
#[derive(Debug, Default)]
pub struct Pending {
    map: HashMap<(BlockId, u64), Vec<Waiter>>,
}

impl Pending {
    /// Record `w` as waiting for page `page` of `block`. Returns true when this creates a new
    /// request (nobody asked for the page before), false when it joins an outstanding one.
    pub fn join(&mut self, block: BlockId, page: u64, w: Waiter) -> bool {
        match self.map.get_mut(&(block, page)) {
            Some(ws) => {
                if !ws.iter().any(|x| x.client == w.client && x.addr == w.addr) {
                    ws.push(w);
                }
                false
            }
            None => {
                self.map.insert((block, page), vec![w]);
                true
            }
        }
    }

    /// Whether a request for the page is outstanding.
    pub fn contains(&self, block: BlockId, page: u64) -> bool {
        self.map.contains_key(&(block, page))
    }

    /// The page landed: take its waiters.
    pub fn take(&mut self, block: BlockId, page: u64) -> Option<Vec<Waiter>> {
        self.map.remove(&(block, page))
    }

    /// Forget a client's waiters (it exited); requests stay outstanding (the page still comes).
    pub fn drop_client(&mut self, client: ClientId) {
        for ws in self.map.values_mut() {
            ws.retain(|w| w.client != client);
        }
    }

    /// Take a client's waiters whose address lies in `[start, end)`.
    pub fn take_client_range(&mut self, client: ClientId, start: u64, end: u64) -> Vec<Waiter> {
        let mut out = Vec::new();
        for ws in self.map.values_mut() {
            ws.retain(|w| {
                let hit = w.client == client && w.addr >= start && w.addr < end;
                if hit {
                    out.push(*w);
                }
                !hit
            });
        }
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
    }
}
