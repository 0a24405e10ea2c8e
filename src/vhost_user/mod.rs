//! The VMM (frontend) side of vhost-user: connecting to a backend, sharing guest RAM with it,
//! driving a split virtqueue of virtio-blk requests, and the postcopy handshake hooks.
//!
//! [`frontend`] owns the connection and the negotiation; [`guest`] is the driver's view of guest
//! RAM; [`virtq`] a split virtqueue driver over it; [`blk`] virtio-blk requests; [`procmaps`] finds
//! where a local peer maps a memfd; [`postcopy`] the postcopy handshake steps in their order.

pub mod blk;
pub mod frontend;
pub mod guest;
pub mod postcopy;
pub mod procmaps;
pub mod virtq;

pub use blk::{BlkConfig, BlkDriver, BlkRequest, BlkRequestKind};
pub use frontend::{BackendConn, MemRegion, Negotiation, VringSetup};
pub use guest::GuestRam;
pub use postcopy::{BackendPostcopy, ClientMapping};
pub use virtq::{Buf, SplitQueue};
