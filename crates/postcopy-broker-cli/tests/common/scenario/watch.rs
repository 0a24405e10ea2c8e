//! The watchdog: a run fails when a fault has waited longer than the bound (the broker's pending
//! list says so), when a running client made no progress (no output line) for the bound while
//! no page arrived either, or when nothing at all happened for the bound. It also keeps the
//! broker's latest status for the failure dump.

use std::path::Path;
use std::time::{Duration, Instant};

use postcopy_broker::control::ControlClient;
use serde_json::Value;

/// The broker's status over its control socket (None when it is gone or does not answer).
pub fn fetch_status(ctl: &Path) -> Option<Value> {
    let mut c = ControlClient::connect(ctl).ok()?;
    c.set_timeout(Some(Duration::from_secs(2))).ok()?;
    c.status().ok()
}

/// The status without latency histograms, on one line (for failure messages).
pub fn compact(status: &Value) -> String {
    let mut v = status.clone();
    for list in ["clients", "departed"] {
        if let Some(cs) = v[list].as_array_mut() {
            for c in cs {
                if let Some(st) = c["stats"].as_object_mut() {
                    st.remove("latency");
                }
            }
        }
    }
    if let Some(p) = v["pending"].as_array_mut() {
        let n = p.len();
        p.truncate(20);
        if n > 20 {
            p.push(Value::String(format!("... {} more", n - 20)));
        }
    }
    v.to_string()
}

/// The oldest waiting fault in a status, if it waited longer than `bound`.
pub fn overdue(status: &Value, bound: Duration) -> Option<String> {
    for p in status["pending"].as_array()? {
        for w in p["waiters"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let ms = w["waiting_ms"].as_u64().unwrap_or(0);
            if ms > bound.as_millis() as u64 {
                return Some(format!(
                    "client {} has waited {ms} ms for block {} offset {:#x} (address {:#x})",
                    w["client"],
                    p["block"].as_str().unwrap_or("?"),
                    p["offset"].as_u64().unwrap_or(0),
                    w["addr"].as_u64().unwrap_or(0)
                ));
            }
        }
    }
    None
}

/// Progress tracking of one run.
#[derive(Debug)]
pub struct Watchdog {
    pub bound: Duration,
    key: (usize, usize, u64),
    changed: Instant,
    received_changed: Instant,
}

impl Watchdog {
    pub fn new(bound: Duration) -> Watchdog {
        let now = Instant::now();
        Watchdog { bound, key: (0, 0, 0), changed: now, received_changed: now }
    }

    /// What is happening: output lines so far, processes exited, pages received.
    pub fn observe(&mut self, lines: usize, exited: usize, received: u64) {
        let now = Instant::now();
        if received != self.key.2 {
            self.received_changed = now;
        }
        if (lines, exited, received) != self.key {
            self.key = (lines, exited, received);
            self.changed = now;
        }
    }

    /// Nothing happened for longer than the bound.
    pub fn idle(&self) -> Option<Duration> {
        let d = self.changed.elapsed();
        (d > self.bound).then_some(d)
    }

    /// A running client whose last sign of life was at `last` is stuck: silent for the bound
    /// while no page arrived for the bound either.
    pub fn stuck(&self, last: Instant) -> Option<Duration> {
        let d = last.max(self.received_changed).elapsed();
        (d > self.bound).then_some(d)
    }
}
