//! [`ClientId`]: who a fault, a registration or a metric belongs to; below the client registry
//! and the metrics, which both name it.

use serde::{Deserialize, Serialize};

/// A client's id; 0 is the broker's own placement mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClientId(pub u64);

impl ClientId {
    /// The broker's own mapping (faults on its own userfaultfd).
    pub const BROKER: ClientId = ClientId(0);
}
