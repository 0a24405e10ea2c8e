//! The repeat guard: a client that keeps faulting on pages that are present is not served by
//! waking it (its mapping is not the shared RAM block, or it is broken), and waking it again and
//! again only spins the fault loop. The guard remembers the addresses a client was woken at
//! because their pages were already there, and counts the faults in a row that hit one of them
//! again, whichever thread and address: two threads alternating between two such pages are
//! caught as surely as one thread on one page. A fault at a new address, or one that needed a
//! page, ends the run.

/// How many recently woken addresses are remembered per client.
const RECENT: usize = 32;

/// No page-aligned fault address is this.
const NONE: u64 = u64::MAX;

/// Per-client record of faults on present pages.
#[derive(Debug, Clone)]
pub struct RepeatGuard {
    recent: [u64; RECENT],
    next: usize,
    run: u32,
}

impl Default for RepeatGuard {
    fn default() -> RepeatGuard {
        RepeatGuard { recent: [NONE; RECENT], next: 0, run: 0 }
    }
}

impl RepeatGuard {
    /// A fault at the page-aligned `addr` found its page present (the client is woken at once).
    /// Returns how many such faults in a row were repeats of recently woken addresses.
    pub fn present(&mut self, addr: u64) -> u32 {
        if self.recent.contains(&addr) {
            self.run = self.run.saturating_add(1);
        } else {
            self.recent[self.next] = addr;
            self.next = (self.next + 1) % RECENT;
            self.run = 0;
        }
        self.run
    }

    /// A fault that needed a page (a request, a join, a placement): the client makes progress.
    pub fn progress(&mut self) {
        self.run = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternating_threads_are_counted_across_addresses() {
        let mut g = RepeatGuard::default();
        assert_eq!(g.present(0x1000), 0);
        assert_eq!(g.present(0x2000), 0);
        for i in 1..=100u32 {
            let addr = if i % 2 == 1 { 0x1000 } else { 0x2000 };
            assert_eq!(g.present(addr), i);
        }
        g.progress();
        assert_eq!(g.present(0x1000), 1, "progress ends the run, the address stays known");
    }

    #[test]
    fn faults_at_new_addresses_are_no_repeats() {
        let mut g = RepeatGuard::default();
        for i in 0..10_000u64 {
            assert_eq!(g.present(i * 4096), 0);
        }
    }
}
