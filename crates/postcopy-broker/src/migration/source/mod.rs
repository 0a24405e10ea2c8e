//! The source page server: it has the guest RAM and sends it to a destination broker.
//!
//! - [`ram`]: the blocks served (from bytes, memfds or an image file) and the shared sent bitmap;
//! - [`session`]: connect, authenticate, Hello, Advise, precopy, dirty ranges → Discards, Listen,
//!   Run, background stream, Complete;
//! - [`urgent`]: the thread that answers demand Requests on the urgent connection;
//! - [`sender`]: pages to frames (zero runs, writev), counters, bandwidth limit;
//! - `streams`: the background sender threads, one per background connection;
//! - [`control`]: the source's control socket (memfds from the VMM, dirty ranges, start);
//! - [`handshake`]: opening a connection, and the source's half of a postcopy resume;

pub mod control;
pub mod handshake;
pub mod ram;
pub mod sender;
pub mod session;
mod streams;
pub mod urgent;

pub use ram::{SourceBlock, SourceRam};
pub use sender::{SourceCounts, SourceStats};
pub use session::{
    default_streams, SourceOptions, SourceSession, SourceSummary, DEFAULT_SOURCE_RESUME_TIMEOUT,
};
