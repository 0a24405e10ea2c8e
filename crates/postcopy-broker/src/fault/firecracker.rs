//! The fault loop's side of Firecracker's UFFD handshake (feature `firecracker`): the peer's
//! regions become a private client served from the image, checked against the peer's grants
//! and limits like a private `register`. Firecracker reads nothing back, so a refusal is logged
//! and the connection closed.

use std::os::fd::OwnedFd;

use crate::control::{FcRegion, PeerCreds};
use crate::fault::control::Ask;
use crate::fault::event_loop::{Loop, RegistrationMap};

impl Loop {
    /// Serve the Firecracker process behind connection `id` as a private client.
    pub(super) fn take_firecracker(
        &mut self,
        id: u64,
        creds: PeerCreds,
        regions: &[FcRegion],
        uffd: OwnedFd,
    ) {
        let ask = Ask {
            name: format!("firecracker-{}", creds.pid),
            pid: None,
            map: RegistrationMap::Private(regions.iter().map(FcRegion::private).collect()),
            uffd,
        };
        match self.register_peer(id, creds, ask) {
            Ok(cid) => log::info!(
                "Firecracker pid {} uid {} served as private client {}",
                creds.pid,
                creds.uid,
                cid.0
            ),
            Err(e) => {
                log::error!(
                    "Firecracker handshake from pid {} uid {} refused: {e}; its connection is \
                     closed without a reply (Firecracker reads none)",
                    creds.pid,
                    creds.uid
                );
                self.core.stats.control_errors += 1;
                self.drop_conn(id);
            }
        }
    }
}
