//! The broker's Unix control socket: a versioned, framed JSON protocol with fds passed by
//! SCM_RIGHTS, plus (feature `firecracker`) Firecracker's UFFD handshake on the same socket.
//! Documented for implementers in other languages in docs/control-protocol.md.
//!
//! Layers, bottom up: [`fdpass`] (sendmsg/recvmsg with fds) → [`frame`] (`PCB1` frames) →
//! [`message`] (typed [`Incoming`] messages, fd counts, the server's decoder) → [`server`]
//! ([`ControlListener`], [`ControlConn`] for the fault loop's epoll) and [`client`]
//! ([`ControlClient`], blocking; [`reattach`]: back to a restarted broker). Message types live
//! in [`protocol`]; Firecracker's handshake (its regions, its bare JSON array in place of our
//! frames) in `firecracker`. The `fuzz_*`
//! functions are the decoders' fuzzing entry points (fuzz/, docs/fuzzing.md).

pub mod client;
pub mod error;
pub mod fdpass;
#[cfg(feature = "firecracker")]
pub mod firecracker;
pub mod frame;
mod fuzz;
pub mod message;
pub mod protocol;
pub mod reattach;
pub mod server;

pub use client::{BrokerHello, ControlClient};
pub use error::ControlError;
#[cfg(feature = "firecracker")]
pub use firecracker::{fuzz::FUZZ_IMAGE_LEN, fuzz_firecracker, send_firecracker_handshake, FcRegion};
pub use fuzz::{fuzz_control_stream, fuzz_request, fuzz_response, stream_input};
pub use message::Incoming;
pub use protocol::{BlockInfo, ClientKind, MappingSpec, Request, Response, BROKER_VERSION, PROTOCOL_VERSION};
pub use reattach::ReattachPolicy;
pub use server::{peer_pidfd, pidfd_open, ControlConn, ControlListener, PeerCreds};
