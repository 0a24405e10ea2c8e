//! Children of clients: the userfaultfd a FORK event hands over is adopted as a client of the
//! parent's peer, counted against that peer's registration limits and released with its parent
//! (the event carries no pid, so the child's own exit cannot be seen). A child past a limit is
//! not adopted but *held*: the broker keeps its userfaultfd open without reading it, so the
//! child waits at a page that has not arrived and only the child is harmed (closing it instead
//! would make the kernel unregister the child's ranges, and a page of a shared block the child
//! then reads would fault in as a zero page of the block, seen by every process that maps it).
//! Held children are bounded ([`HELD_PER_PARENT`]) and released with their parent; past the
//! bound a child's userfaultfd is closed, with an error that says what that means.

use std::os::fd::AsRawFd;

use crate::client::{AddressMap, Client, ClientId};
use crate::fault::event_loop::{set_nonblocking, token, Loop, K_UFFD};
use crate::fault::limits::Owner;

/// Children past a limit whose userfaultfds one parent may have held (see the module doc).
pub(crate) const HELD_PER_PARENT: usize = 8;

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
                self.core.stats.forks_refused += 1;
                let held = self.held_children.entry(parent).or_default();
                if held.len() < HELD_PER_PARENT {
                    log::error!(
                        "client {} (pid {pid}, uid {}) forked, and its child's userfaultfd is held \
                         unserved instead of adopted: {why}. The child waits at the first page that \
                         has not arrived (only it does; it is released with its parent); the parent \
                         is served as before",
                        parent.0,
                        o.uid
                    );
                    held.push(child);
                    return;
                }
                let shared = matches!(child.map, AddressMap::Shared(_));
                let effect = if shared {
                    "its reads of pages that have not arrived yet now read zeros, which the kernel \
                     places in the shared block for every process that maps it"
                } else {
                    "its private pages that have not arrived read as zeros"
                };
                log::error!(
                    "client {} (pid {pid}, uid {}) forked, and its child's userfaultfd is released \
                     instead of adopted: {why}, and {HELD_PER_PARENT} children past the limit are held \
                     already. The child runs on unserved (the kernel unregisters its ranges: \
                     {effect}); the parent is served as before",
                    parent.0,
                    o.uid
                );
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
        let id = child.id;
        self.core.clients.insert(child);
        self.park(id);
    }
}
