//! The broker's Unix control socket: a versioned, framed JSON protocol with fds passed by
//! SCM_RIGHTS, plus Firecracker's UFFD handshake on the same socket. Documented for implementers
//! in other languages in docs/control-protocol.md.
//!
//! Layers, bottom up: [`fdpass`] (sendmsg/recvmsg with fds) → [`frame`] (`PCB1` frames and
//! Firecracker's bare JSON array) → [`message`] (typed [`Incoming`] messages, fd counts) →
//! [`server`] ([`ControlListener`], [`ControlConn`] for the fault loop's epoll) and [`client`]
//! ([`ControlClient`], blocking). Message types live in [`protocol`]. The `fuzz_*` functions are
//! the decoders' fuzzing entry points (fuzz/, docs/fuzzing.md).

pub mod client;
pub mod error;
pub mod fdpass;
pub mod frame;
mod fuzz;
pub mod message;
pub mod protocol;
pub mod server;

pub use client::{send_firecracker_handshake, BrokerHello, ControlClient};
pub use error::ControlError;
pub use fuzz::{
    fuzz_control_stream, fuzz_firecracker, fuzz_request, fuzz_response, stream_input, FUZZ_IMAGE_LEN,
};
pub use message::Incoming;
pub use protocol::{
    BlockInfo, ClientKind, FcRegion, MappingSpec, Request, Response, BROKER_VERSION, PROTOCOL_VERSION,
};
pub use server::{peer_pidfd, pidfd_open, ControlConn, ControlListener, PeerCreds};
