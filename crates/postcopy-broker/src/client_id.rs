//! [`ClientId`]: who a fault, a registration or a metric belongs to; below the client registry
//! and the metrics, which both name it.

use serde::{Deserialize, Serialize};

/// A client's id; 0 is the broker's own placement mapping. The one client id type of the public
/// API; on the wire (the control protocol's JSON, the status report) it is the plain number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientId(pub u64);

impl ClientId {
    /// The broker's own mapping (faults on its own userfaultfd).
    pub const BROKER: ClientId = ClientId(0);
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl From<u64> for ClientId {
    fn from(id: u64) -> ClientId {
        ClientId(id)
    }
}

impl From<ClientId> for u64 {
    fn from(id: ClientId) -> u64 {
        id.0
    }
}
