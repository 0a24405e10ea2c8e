//! Ordered, removable notifiers for the steps of postcopy (QEMU's postcopy notifiers): Probe,
//! InboundAdvise, InboundListen, InboundEnd. The first notifier that fails stops the step and its
//! error comes back to the caller.

use std::fmt;

use serde::Serialize;

/// A notifier that refused a step; it becomes [`crate::Error::Notifier`] with `?`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("notifier '{name}' refused {reason}: {message}")]
pub struct NotifierRefused {
    /// Notifier name.
    pub name: String,
    /// The reason being notified.
    pub reason: NotifyReason,
    /// The notifier's own error text.
    pub message: String,
}

/// Why notifiers are being called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum NotifyReason {
    /// Checking whether postcopy can work (a notifier may veto, e.g. a backend without PAGEFAULT).
    Probe,
    /// The source advised postcopy.
    InboundAdvise,
    /// The destination starts listening for faults.
    InboundListen,
    /// Postcopy ended.
    InboundEnd,
}

impl fmt::Display for NotifyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A notifier callback: returns an error text to veto.
pub type NotifyFn = Box<dyn FnMut(NotifyReason) -> std::result::Result<(), String> + Send>;

/// Handle to remove a notifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifierId(u64);

struct Entry {
    id: NotifierId,
    name: String,
    priority: i32,
    f: NotifyFn,
}

/// The notifier list, called in priority order (lower first), then in order of addition.
#[derive(Default)]
pub struct Notifiers {
    entries: Vec<Entry>,
    next_id: u64,
}

impl fmt::Debug for Notifiers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
        f.debug_struct("Notifiers").field("names", &names).finish()
    }
}

impl Notifiers {
    /// An empty list.
    pub fn new() -> Notifiers {
        Notifiers::default()
    }

    /// Add a notifier with priority 0.
    pub fn add(&mut self, name: impl Into<String>, f: NotifyFn) -> NotifierId {
        self.add_with_priority(name, 0, f)
    }

    /// Add a notifier; lower priorities run first, equal ones in order of addition.
    pub fn add_with_priority(&mut self, name: impl Into<String>, priority: i32, f: NotifyFn) -> NotifierId {
        let id = NotifierId(self.next_id);
        self.next_id += 1;
        let pos = self.entries.partition_point(|e| e.priority <= priority);
        self.entries.insert(pos, Entry { id, name: name.into(), priority, f });
        id
    }

    /// Remove a notifier; returns whether it was there.
    pub fn remove(&mut self, id: NotifierId) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.id != id);
        self.entries.len() != before
    }

    /// Number of notifiers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Call every notifier in order; the first failure stops the walk and is returned.
    pub fn notify(&mut self, reason: NotifyReason) -> Result<(), NotifierRefused> {
        for e in &mut self.entries {
            if let Err(message) = (e.f)(reason) {
                log::warn!("notifier '{}' refused {reason}: {message}", e.name);
                return Err(NotifierRefused { name: e.name.clone(), reason, message });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn recorder(log: &Arc<Mutex<Vec<String>>>, name: &'static str, fail: bool) -> NotifyFn {
        let log = Arc::clone(log);
        Box::new(move |reason| {
            if let Ok(mut l) = log.lock() {
                l.push(format!("{name}:{reason}"));
            }
            if fail {
                Err(format!("{name} says no"))
            } else {
                Ok(())
            }
        })
    }

    #[test]
    fn notifiers_run_in_order_and_the_first_failure_stops_the_step() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut n = Notifiers::new();
        n.add("b", recorder(&log, "b", false));
        n.add_with_priority("a", -1, recorder(&log, "a", false));
        let veto = n.add("veto", recorder(&log, "veto", true));
        n.add("never", recorder(&log, "never", false));
        let err = n.notify(NotifyReason::Probe).err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("notifier 'veto' refused Probe: veto says no"));
        assert_eq!(*log.lock().unwrap(), vec!["a:Probe", "b:Probe", "veto:Probe"]);
        assert!(n.remove(veto));
        assert!(!n.remove(veto));
        log.lock().unwrap().clear();
        assert!(n.notify(NotifyReason::InboundEnd).is_ok());
        assert_eq!(*log.lock().unwrap(), vec!["a:InboundEnd", "b:InboundEnd", "never:InboundEnd"]);
    }
}
