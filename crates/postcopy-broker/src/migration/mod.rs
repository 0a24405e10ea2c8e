//! Live migration of guest RAM between a source page server and the destination broker: the
//! pieces both ends share.
//!
//! - [`wire`]: the framed binary protocol (docs/wire-protocol.md), encoder and checked
//!   incremental decoder.
//! - [`transport`]: the protection of each connection (mutual TLS 1.3, Noise with a pre-shared
//!   key, or, when asked for, authenticated plaintext) and its handshake;
//! - [`auth`]: the pre-shared-key challenge-response of the plaintext mode;
//! - [`digest`]: per-page digests of what travelled, checked at the end in every mode.
//! - [`discard`]: source-side batching of dirty ranges into Discard frames per block.
//! - [`zero`] (the crate's, below this module): zero-page detection, so zero pages travel as
//!   ZeroRun frames.
//! - [`bitmap`]: dirty / received bitmaps to ranges, and received bitmaps to Resume frames.
//! - [`source`]: the source page server (`postcopy-broker source`).
//! - [`destination`]: the destination session, the network page source, lazy restore
//!   (`postcopy-broker serve`).
//! - [`verify`]: RAM checksums both ends can write; [`spec`]: CLI size/block/range specs.
//! - [`fuzz_decode`]: the decoder's fuzzing entry point.

pub mod auth;
pub mod bitmap;
pub mod destination;
pub mod digest;
pub mod discard;
#[cfg(test)]
mod flow_tests;
mod fuzz;
pub mod source;
pub mod spec;
pub mod transport;
pub mod verify;
pub mod wire;
pub use crate::zero;

pub use auth::{authenticate, authenticate_tcp, load_key, AuthError};
pub use discard::DiscardBatcher;
pub use fuzz::{fuzz_block_table, fuzz_decode};
pub use zero::{is_zero, split_zero_runs};
