//! postcopy-broker: postcopy live migration of guest RAM that is shared between a VMM and
//! vhost-user device processes.
//!
//! The fault path, by module: [`ram`] (blocks, received bitmaps) → [`uffd`] (the kernel interface)
//! → [`place`] (atomic placement). [`incoming`] drives the destination's lifecycle through
//! [`state`] and [`notify`]; [`probe`] says whether the host can do it at all.

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
