//! postcopy-broker: postcopy live migration of guest RAM that is shared between a VMM and
//! vhost-user device processes.
//!
//! # Embedding it in a VMM
//!
//! [`embed::BrokerBuilder`] takes the guest RAM (RAM blocks, or the VMM's own vm-memory
//! `GuestMemoryMmap` with [`embed::BrokerBuilder::guest_memory`]), a page source and settings,
//! and starts postcopy: it probes the host, discards every page, registers the blocks with the
//! broker's userfaultfd, spawns the fault loop and registers the VMM's guest memory as its
//! client. The [`embed::EmbeddedBroker`] it returns owns the rest: vhost-user backends join
//! with nothing but their socket or connection, the background fill starts and stops at will,
//! and [`embed::EmbeddedBroker::finish`] ends a complete migration (POSTCOPY_END to the
//! backends, cleanup); dropping it gives up. A whole migration of one small block from a
//! [`source::MemorySource`], with the VMM's own reads as the client:
//!
//! ```
//! # #[cfg(feature = "vhost-user")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use postcopy_broker::embed::BrokerBuilder;
//! use postcopy_broker::ram::RamBlock;
//! use postcopy_broker::source::MemorySource;
//!
//! // The source host's RAM: 64 pages, page i full of byte i + 1 (a FileSource would read a
//! // snapshot image; a migration destination gets its pages from the network).
//! let image: Vec<u8> = (0..64u8).flat_map(|i| [i + 1; 4096]).collect();
//! let mut broker = BrokerBuilder::new()
//!     .block(RamBlock::memfd("pc.ram", 64 * 4096)?)
//!     .source(MemorySource::new(vec![(image, 4096)]))
//!     .start()?;
//! // The guest runs. Touching a missing page through the VMM's guest memory faults; the broker
//! // fetches the page, places it and wakes the VMM's thread.
//! let ram = broker.guest_ram().clone();
//! let mut page = [0u8; 4096];
//! ram.read(5 * 4096, &mut page)?;
//! assert_eq!(page, [6u8; 4096]);
//! assert_eq!(broker.progress(), (1, 64));
//! // vhost-user backends would join here: broker.connect_vhost_user(socket)?
//! // The rest in the background, then the end.
//! broker.set_background(true)?;
//! broker.wait_complete(Duration::from_secs(60))?;
//! let done = broker.finish()?;
//! assert_eq!((done.report.broker.pages_demand, done.report.broker.pages_background), (1, 63));
//! ram.read(63 * 4096, &mut page)?;
//! assert_eq!(page, [64u8; 4096]);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "vhost-user"))]
//! # fn main() {}
//! ```
//!
//! `examples/in_process.rs` adds a vhost-user-blk backend process doing I/O on missing pages.
//!
//! # The parts
//!
//! The fault path, by module: [`ram`] (blocks, received bitmaps) → [`uffd`] (the kernel interface)
//! → [`place`] (atomic placement). [`incoming`] drives the destination's lifecycle through
//! [`state`] and [`notify`]; [`probe`] says whether the host can do it at all; [`fault`] is the
//! fault loop and its handle; [`embed`] puts them together for a VMM.

// Every integer cast that could truncate, wrap or lose a sign is a checked conversion or is
// allowed where it is made, with the reason it cannot (issue #12, as Firecracker's workspace).
// Unit tests (their own fixed values) are left out.
#![cfg_attr(
    not(test),
    deny(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)
)]

pub mod blocktime;
pub mod checksum;
pub mod client;
pub mod client_id;
pub mod control;
pub mod conv;
pub mod embed;
pub mod error;
pub mod failpoint;
pub mod fault;
pub mod hasher;
pub mod incoming;
#[cfg(feature = "migration")]
pub mod migration;
pub mod notify;
pub mod openmetrics;
pub mod place;
pub mod probe;
pub mod ram;
pub mod sched;
pub mod source;
pub mod state;
pub mod stats;
pub mod uffd;
#[cfg(feature = "vhost-user")]
pub mod vhost_user;
pub mod zero;

pub use error::{Error, Result};
pub use incoming::Incoming;
pub use notify::{Notifiers, NotifyReason};
pub use place::{Placed, Placer};
pub use ram::{BlockId, RamBlock, RamBlocks};
pub use state::{PostcopyState, StateCell};
