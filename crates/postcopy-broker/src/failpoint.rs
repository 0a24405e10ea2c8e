//! Test hooks that make a process fail at one chosen moment, each at most once:
//! `POSTCOPY_BROKER_FAILPOINT` holds a comma-separated list of names, and the code at that
//! moment asks [`once`] whether to fail there. Tests use it for failures that no proxy can time
//! exactly (a cut right before or right after the last frame of a migration). Unset, it costs one
//! environment lookup per call, at moments that happen once per connection.

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
