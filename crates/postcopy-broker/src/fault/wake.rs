//! The wake queue: wakes owed to clients, coalesced so that adjacent pages of one client cost
//! one UFFDIO_WAKE.

use crate::client::ClientId;

/// Pending wakes.
#[derive(Debug, Default)]
pub struct WakeQueue {
    items: Vec<(ClientId, u64, u64)>,
}

impl WakeQueue {
    /// Owe `client` a wake of `[addr, addr+len)`.
    pub fn push(&mut self, client: ClientId, addr: u64, len: u64) {
        self.items.push((client, addr, len));
    }

    /// Whether nothing is owed.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Take the coalesced ranges: sorted by client and address, adjacent or overlapping ranges
    /// of one client merged.
    pub fn drain_coalesced(&mut self, out: &mut Vec<(ClientId, u64, u64)>) {
        out.clear();
        self.items.sort_unstable();
        for &(c, a, l) in &self.items {
            match out.last_mut() {
                Some((lc, la, ll)) if *lc == c && a <= *la + *ll => {
                    *ll = (*ll).max(a + l - *la);
                }
                _ => out.push((c, a, l)),
            }
        }
        self.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_wakes_of_one_client_merge() {
        let mut q = WakeQueue::default();
        q.push(ClientId(2), 0x3000, 0x1000);
        q.push(ClientId(1), 0x2000, 0x1000);
        q.push(ClientId(1), 0x1000, 0x1000);
        q.push(ClientId(1), 0x5000, 0x1000);
        q.push(ClientId(1), 0x1000, 0x1000);
        let mut out = Vec::new();
        q.drain_coalesced(&mut out);
        assert_eq!(
            out,
            vec![(ClientId(1), 0x1000, 0x2000), (ClientId(1), 0x5000, 0x1000), (ClientId(2), 0x3000, 0x1000)]
        );
        assert!(q.is_empty());
    }
}
