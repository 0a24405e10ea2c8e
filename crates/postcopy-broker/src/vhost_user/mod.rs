//! The VMM (frontend) side of vhost-user: connecting to a backend, sharing guest RAM with it,
//! driving split virtqueues of virtio-blk requests or virtio-net receive buffers, and the
//! postcopy handshake with its broker registration.
//!
//! [`frontend`] owns the connection and the negotiation; [`guest`] is the driver's view of guest
//! RAM; [`attach`] joins a running broker as a shared client and maps its blocks as guest RAM;
//! [`virtq`] a split virtqueue driver over it; [`blk`] virtio-blk requests; [`net`] virtio-net
//! receive and transmit queues; [`procmaps`] finds
//! where a local peer maps a memfd; [`postcopy`] the postcopy handshake steps in their order;
//! [`register`] makes a backend a client of the broker (in process or over the control socket);
//! [`notifier`] puts backends on the broker's notifier list (Probe veto, POSTCOPY_END);
//! [`daemon`] lets the broker daemon itself be a backend's frontend.

pub mod attach;
pub mod blk;
pub mod daemon;
pub mod frontend;
pub mod guest;
pub mod net;
pub mod notifier;
pub mod postcopy;
pub mod procmaps;
pub mod register;
pub mod virtq;

pub use attach::BrokerSession;
pub use blk::{BlkConfig, BlkDriver, BlkRequest, BlkRequestKind};
pub use frontend::{BackendConn, MemRegion, Negotiation, VringSetup};
pub use guest::{BlockSums, GuestBlock, GuestRam};
pub use net::{NetDriver, RxBuf, RxUsed};
pub use postcopy::{BackendPostcopy, ClientMapping, Handshake};
pub use register::{BrokerLink, RegisteredBackend};
pub use virtq::{Buf, SplitQueue};
