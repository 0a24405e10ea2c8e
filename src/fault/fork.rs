//! Children of clients: the userfaultfd a FORK event hands over is adopted as a client of the
//! parent's peer, counted against that peer's registration limits and released with its parent
//! (the event carries no pid, so the child's own exit cannot be seen). A child past a limit is
//! not adopted: its userfaultfd is closed, which the kernel answers by unregistering the child's
//! ranges (it runs on unserved, as a child forked without `UFFD_FEATURE_EVENT_FORK` does: a page
//! of a shared block that has not arrived faults in as a zero page of the block, seen by every
//! process that maps it); the parent's `fork()` has returned already and it is served as before.

use std::os::fd::AsRawFd;

use crate::client::{AddressMap, Client, ClientId};
use crate::fault::event_loop::{set_nonblocking, token, Loop, K_UFFD};
use crate::fault::limits::Owner;

impl Loop {
    /// Adopt `child`, forked by `parent`, or release it when the parent's peer is at a limit.
    pub(crate) fn adopt_child(&mut self, parent: ClientId, child: Client) {
        let owner = self.owners.get(parent);
        let pid = self.core.clients.get(parent).and_then(|c| c.pid);
        let pid = pid.map_or_else(|| "unknown".to_string(), |p| p.to_string());
        if owner.is_none() && self.core.clients.get(parent).is_none() {
            log::info!(
                "client {} forked, and was released since: its child's userfaultfd goes with it",
                parent.0
            );
            return;
        }
        if let Some(o) = owner {
            if let Err(why) = self.owners.may_register(&self.config.limits, o.conn, o.uid) {
                let shared = matches!(child.map, AddressMap::Shared(_));
                let effect = if shared {
                    "its reads of pages that have not arrived yet now read zeros, which the kernel \
                     places in the shared block for every process that maps it"
                } else {
                    "its private pages that have not arrived read as zeros"
                };
                log::error!(
                    "client {} (pid {pid}, uid {}) forked, and its child's userfaultfd is released \
                     instead of adopted: {why}. The child runs on unserved (the kernel unregisters \
                     its ranges: {effect}); the parent is served as before",
                    parent.0,
                    o.uid
                );
                self.core.stats.forks_refused += 1;
                return; // dropping the child closes its userfaultfd
            }
        }
        let fd = child.uffd.as_raw_fd();
        if let Err(e) = set_nonblocking(fd).and_then(|()| self.add(fd, token(K_UFFD, child.id.0))) {
            log::error!(
                "client {} (pid {pid}) forked, and its child cannot be served ({e}): its userfaultfd is released",
                parent.0
            );
            return;
        }
        log::info!(
            "client {} (pid {pid}) forked: adopting the child's userfaultfd as client {}",
            parent.0,
            child.id.0
        );
        if let Some(o) = owner {
            self.owners.insert(child.id, Owner { exits_with_conn: false, parent: Some(parent), ..o });
        }
        self.core.stats.clients_registered += 1;
        self.core.clients.insert(child);
    }
}
