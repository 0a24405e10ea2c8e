//! Backing off from a control socket that cannot accept (EMFILE, ENFILE, ENOBUFS...): the
//! listener stays readable while peers wait in its backlog, so a level-triggered loop that
//! retried at once would spin a core and flood the log. Instead accepting pauses, first for
//! [`AcceptBackoff::FIRST`], doubling to [`AcceptBackoff::MAX`] while nothing can be accepted,
//! and resumes when the pause ends. An episode lasts until the backlog is drained (accepts may
//! succeed and fail in turn while fds trickle back): one warning starts it and one line ends it.

use std::time::{Duration, Instant};

/// The pause state of the listener.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    /// Accepting resumes at this instant.
    until: Option<Instant>,
    /// The next pause.
    delay: Duration,
    /// Failed accepts in this episode, and when it began.
    failures: u64,
    since: Option<Instant>,
}

impl AcceptBackoff {
    /// The first pause.
    pub const FIRST: Duration = Duration::from_millis(10);
    /// The longest pause.
    pub const MAX: Duration = Duration::from_secs(1);

    /// An accept failed at `now`: pause. Returns the pause and whether this failure starts an
    /// episode (log it loudly then, quietly after).
    pub fn failed(&mut self, now: Instant) -> (Duration, bool) {
        let first = self.since.is_none();
        if first {
            self.since = Some(now);
            self.delay = Self::FIRST;
        }
        let pause = self.delay;
        self.failures += 1;
        self.until = Some(now + pause);
        self.delay = (self.delay * 2).min(Self::MAX);
        (pause, first)
    }

    /// Whether accepting is paused.
    pub fn paused(&self) -> bool {
        self.until.is_some()
    }

    /// The pause is over at `now`: accepting may be tried again.
    pub fn due(&mut self, now: Instant) -> bool {
        match self.until {
            Some(t) if now >= t => {
                self.until = None;
                true
            }
            _ => false,
        }
    }

    /// Milliseconds until the pause ends (rounded up), for epoll_wait; `None` when not paused.
    pub fn timeout_ms(&self, now: Instant) -> Option<i32> {
        self.until.map(|t| {
            let d = t.saturating_duration_since(now);
            i32::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        })
    }

    /// An accept succeeded: the next pause, if any, starts small again.
    pub fn accepted(&mut self) {
        self.delay = Self::FIRST;
    }

    /// Nothing is left to accept: if an episode was running, end it and return its failures and
    /// length.
    pub fn drained(&mut self, now: Instant) -> Option<(u64, Duration)> {
        let since = self.since.take()?;
        let failures = std::mem::take(&mut self.failures);
        self.until = None;
        Some((failures, now.saturating_duration_since(since)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_reset_on_success() {
        let t0 = Instant::now();
        let mut b = AcceptBackoff::default();
        assert!(!b.paused() && b.timeout_ms(t0).is_none());
        assert_eq!(b.failed(t0), (AcceptBackoff::FIRST, true));
        assert!(b.paused());
        assert_eq!(b.timeout_ms(t0), Some(10));
        assert!(!b.due(t0 + Duration::from_millis(9)));
        assert!(b.due(t0 + Duration::from_millis(10)));
        assert!(!b.paused());
        let mut pauses = Vec::new();
        for _ in 0..10 {
            let (p, first) = b.failed(t0);
            assert!(!first);
            pauses.push(p.as_millis());
        }
        assert_eq!(pauses, [20, 40, 80, 160, 320, 640, 1000, 1000, 1000, 1000]);
        // Fds trickle back: an accept succeeds, the next fails; still the same episode.
        b.accepted();
        assert_eq!(b.failed(t0), (AcceptBackoff::FIRST, false));
        assert_eq!(b.drained(t0 + Duration::from_secs(3)), Some((12, Duration::from_secs(3))));
        assert_eq!(b.drained(t0), None);
        assert_eq!(b.failed(t0), (AcceptBackoff::FIRST, true), "a new episode");
    }
}
