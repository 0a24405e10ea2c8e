//! The destination broker of a live migration.
//!
//! - [`session`]: [`Destination`], the network migration (accept, Hello, the postcopy states,
//!   finish);
//! - [`gate`]: the listening socket: concurrent handshakes under deadlines, strangers refused;
//! - [`network`]: [`NetworkSource`], the fault loop's page source over the two connections
//!   (pauses when they drop, resumes with new ones);
//! - `stream`: the stream thread that reads and places the background stream;
//! - `resume`: the destination's half of the resume handshake;
//! - [`restart`]: rebuilding the session of a broker that died during postcopy from what it
//!   parked (record, block fds, digest table), resumed by the source;
//! - [`end`]: delivering the final Complete, lingering for a source that missed it;
//! - [`summary`]: progress display and the end [`Summary`];

pub mod end;
pub mod gate;
mod kick;
pub mod network;
pub mod restart;
mod resume;
pub mod session;
mod stream;
pub mod summary;

pub use end::Ending;
pub use network::{Connections, NetState, NetworkSource, Resumer};
pub use restart::{block_fd_name, ledger_fd_name, ParkedBlockFds, Rebuilt, SessionRecord, DIGESTS_FD_NAME};
pub use session::{
    create_blocks, Destination, DestinationOptions, DEFAULT_END_LINGER, DEFAULT_MAX_STREAMS,
    DEFAULT_RESUME_TIMEOUT, DESTINATION_CAPS,
};
pub use summary::{ClientLatency, Progress, Summary};

use crate::conv::usize_of;
use crate::migration::verify::{BlockChecksum, VerifyReport};
use crate::ram::RamBlocks;

/// Checksums of every block's RAM as the destination holds it. Call only after the Incoming's
/// cleanup (unregistered: nothing can block; a received page that a client removed again is a
/// hole, which would fault while the block is registered).
pub fn verify_report(blocks: &RamBlocks) -> VerifyReport {
    let blocks = blocks
        .iter()
        .map(|(_, b)| {
            // SAFETY: the placement mapping is live for the block's size; after cleanup no read
            // of it blocks, and no Rust reference writes it.
            let data = unsafe { std::slice::from_raw_parts(b.host_ptr(), usize_of(b.size())) };
            BlockChecksum::of(b.name(), b.page_size(), data)
        })
        .collect();
    VerifyReport { side: "destination".into(), blocks }
}
