//! Embedding the broker in a VMM process: [`BrokerBuilder`] takes the guest RAM (RAM blocks, or
//! with `vhost-user` the VMM's own vm-memory `GuestMemoryMmap`), a page source and settings, and
//! starts postcopy (probe, advise, listen, the fault loop); the [`EmbeddedBroker`] it returns owns
//! the rest of the lifecycle: the VMM's guest memory as a client, vhost-user backends joined with
//! nothing but their socket, the background fill started and stopped at will, waiting for the
//! last page, and the end ([`EmbeddedBroker::finish`], [`EmbeddedBroker::stop`], or on drop).
//! Errors are [`EmbedError`]s, each saying what to do.

#[cfg(feature = "vhost-user")]
mod backends;
mod broker;
mod builder;
mod error;
#[cfg(feature = "vhost-user")]
mod guest;

pub use broker::{EmbeddedBroker, Finished};
pub use builder::BrokerBuilder;
pub use error::{EmbedError, EmbedResult};
