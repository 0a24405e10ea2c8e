//! Test hooks that make a process fail at one chosen moment, each at most once:
//! `POSTCOPY_BROKER_FAILPOINT` holds a comma-separated list of names, and the code at that
//! moment asks [`once`] whether to fail there. Tests use it for failures that no proxy can time
//! exactly (a cut right before or right after the last frame of a migration). Unset, it costs one
//! environment lookup per call, at moments that happen once per connection. [`hold`] stops a
//! thread at a point until the test releases it, for in-process tests of races.

use std::collections::HashSet;
use std::sync::Mutex;

/// The environment variable that names the failpoints.
pub const VAR: &str = "POSTCOPY_BROKER_FAILPOINT";

static FIRED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Whether the failpoint `name` is set and has not fired yet in this process (it fires now).
pub fn once(name: &str) -> bool {
    let Ok(set) = std::env::var(VAR) else { return false };
    if !set.split(',').any(|n| n.trim() == name) {
        return false;
    }
    let Ok(mut fired) = FIRED.lock() else { return false };
    let first = fired.get_or_insert_with(HashSet::new).insert(name.to_string());
    if first {
        log::warn!("failpoint {name} fires");
    }
    first
}

/// Failpoints that hold a thread (see [`hold`]) and are holding it now.
static HELD: Mutex<Option<HashSet<String>>> = Mutex::new(None);
static RELEASED: std::sync::Condvar = std::sync::Condvar::new();
/// The variable as the process started, read once: [`hold`] sits on hot paths.
static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// How long [`hold`] waits for [`release`] at most (a test that forgot it must not hang).
const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// If the failpoint `name` is set (in the variable as first read by this process) and has not
/// fired yet, hold the calling thread until [`release`]`(name)` (at most 10 s). For in-process
/// tests of races that need one thread stopped at an exact point while another acts: the test
/// sets the variable before the first call, waits for [`is_held`], acts, then releases. Unset,
/// it costs one load of a cached value.
pub fn hold(name: &str) {
    let armed = ARMED.get_or_init(|| std::env::var(VAR).ok());
    let Some(set) = armed else { return };
    if !set.split(',').any(|n| n.trim() == name) || !once(name) {
        return;
    }
    let Ok(mut held) = HELD.lock() else { return };
    held.get_or_insert_with(HashSet::new).insert(name.to_string());
    let _ = RELEASED.wait_timeout_while(held, HOLD_LIMIT, |h| h.as_ref().is_some_and(|s| s.contains(name)));
}

/// Whether a thread is held at the failpoint `name` now.
pub fn is_held(name: &str) -> bool {
    HELD.lock().is_ok_and(|h| h.as_ref().is_some_and(|s| s.contains(name)))
}

/// Let the thread held at the failpoint `name` go on.
pub fn release(name: &str) {
    if let Ok(mut h) = HELD.lock() {
        if let Some(s) = h.as_mut() {
            s.remove(name);
        }
    }
    RELEASED.notify_all();
}
