//! Firecracker's UFFD handshake on the control socket (cargo feature `firecracker`, on by
//! default): on snapshot restore Firecracker connects, sends one JSON array describing its guest
//! memory regions with its userfaultfd attached, and reads nothing back. The broker then serves
//! that process as a private client.
//!
//! What the feature holds is what only Firecracker speaks: the wire format of its regions
//! ([`regions`]), the decoding of its bare JSON array in place of our frames ([`handshake`],
//! [`dialect`]), a peer that sends it ([`peer`]), and its fuzzing entry point ([`fuzz`]); the
//! fault loop's side is `fault/firecracker.rs`. What stays core is private memory served from an
//! image: `register` with `kind: "private"` on our own protocol reaches the same private fault
//! path, the image mapping, the grants on image ranges and the limits, so a VMM that is not
//! Firecracker (or Firecracker behind a shim speaking our protocol) gets all of it without the
//! feature.

pub mod dialect;
pub mod fuzz;
pub mod handshake;
pub mod peer;
pub mod regions;

pub use dialect::ServerDecoder;
pub use fuzz::fuzz_firecracker;
pub use handshake::HandshakeDecoder;
pub use peer::send_firecracker_handshake;
pub use regions::{FcRegion, FcRegionWire};
