//! The Firecracker side of the handshake, for test peers and tools: connect and send what
//! Firecracker sends on snapshot restore.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::regions::{FcRegion, FcRegionWire};
use crate::control::error::ControlError;
use crate::control::fdpass::send_all;

/// Do what Firecracker does on snapshot restore: connect to `path` and send, in one sendmsg, the
/// JSON array of `regions` with `uffd` attached. Returns the connected stream (Firecracker keeps
/// nothing else to say; drop it or keep it open).
pub fn send_firecracker_handshake(
    path: impl AsRef<Path>,
    regions: &[FcRegion],
    uffd: BorrowedFd<'_>,
) -> Result<UnixStream, ControlError> {
    let path = path.as_ref();
    let stream = UnixStream::connect(path)
        .map_err(|e| ControlError::io(format!("connecting to {}", path.display()), e))?;
    let wire: Vec<FcRegionWire> = regions.iter().copied().map(FcRegionWire::from).collect();
    let json = serde_json::to_vec(&wire).map_err(|e| ControlError::Invalid(format!("cannot encode: {e}")))?;
    send_all(stream.as_fd(), &json, &[uffd], false)
        .map_err(|e| ControlError::io("sending the Firecracker handshake", e))?;
    Ok(stream)
}
