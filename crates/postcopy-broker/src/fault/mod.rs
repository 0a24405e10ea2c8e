//! The fault loop: one epoll over the broker's own userfaultfd, a wake-up eventfd, every client
//! userfaultfd and pidfd, the control socket, and an asynchronous page source. It turns client
//! faults into page requests, places arriving pages and wakes exactly the waiting clients.
//!
//! [`Broker::spawn`] runs the loop on its own thread and returns a [`BrokerHandle`] through which
//! an in-process VMM registers clients, reads status and stops the loop.

mod backoff;
mod control;
mod core;
mod ending;
mod event_loop;
#[cfg(feature = "firecracker")]
mod firecracker;
mod fork;
mod grants;
mod limits;
pub mod park;
mod pending;
mod private;
mod unplaced;
mod wake;

pub use self::core::MAX_RUN;
pub use crate::hasher::PageHasher;
pub use event_loop::{pidfd_open, Broker, BrokerConfig, BrokerHandle, Registration, RegistrationMap};
pub use grants::IMAGE_GRANT;
pub use limits::ControlLimits;
pub use pending::{Pending, Waiter};
pub use wake::WakeQueue;
