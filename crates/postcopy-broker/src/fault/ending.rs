//! The end of a complete migration for the clients of the control socket: every control
//! connection that registered live clients gets a `postcopy_end` notification, and the fault
//! loop goes on reading their faults and non-cooperative events (fork, remove, unmap) until each
//! has unregistered (or gone) or [`END_GRACE`] has passed. A client that stayed registered past
//! the end would otherwise block for good in its next fork() or MADV_REMOVE: those events wait
//! for a reader, and its own copy of the uffd keeps the registration alive.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::event_loop::Loop;
use crate::client::ClientId;
use crate::control::protocol::Response;

/// How long the loop serves clients after `postcopy_end` while they have not unregistered.
pub(crate) const END_GRACE: Duration = Duration::from_secs(3);

/// The clients told of the end that are still registered, and until when to wait for them.
#[derive(Debug)]
pub(crate) struct Ending {
    deadline: Instant,
    waiting: Vec<ClientId>,
}

impl Loop {
    /// Notify every control connection with live clients; stop at once when there is none.
    pub(crate) fn begin_end(&mut self) {
        let mut by_conn: BTreeMap<u64, Vec<ClientId>> = BTreeMap::new();
        for (id, conn) in self.owners.all() {
            if self.core.clients.get(id).is_some() && self.conns.contains_key(&conn) {
                by_conn.entry(conn).or_default().push(id);
            }
        }
        let mut waiting = Vec::new();
        for (conn, mut ids) in by_conn {
            // Ascending ids: a forked child (adopted after its parent) comes after it, so a
            // client that unregisters in reverse order lets go of the children first (the broker
            // releases a parent's children with it).
            ids.sort_unstable();
            let clients = ids.iter().map(|c| c.0).collect();
            self.reply(conn, &Response::PostcopyEnd { clients }, &[]);
            waiting.extend(ids);
        }
        if waiting.is_empty() {
            self.stop = true;
            return;
        }
        log::info!(
            "migration complete: told {} control client(s) (postcopy_end); serving them until they unregister, at most {END_GRACE:?}",
            waiting.len()
        );
        self.ending = Some(Ending { deadline: Instant::now() + END_GRACE, waiting });
    }

    /// While ending: stop once every notified client is gone or the grace has passed. Returns
    /// the longest epoll wait (ms) that keeps the deadline, None when not ending.
    pub(crate) fn end_step(&mut self) -> Option<i32> {
        let e = self.ending.as_mut()?;
        let clients = &self.core.clients;
        e.waiting.retain(|id| clients.get(*id).is_some());
        let now = Instant::now();
        if e.waiting.is_empty() {
            log::info!("every control client unregistered after postcopy_end");
            self.stop = true;
        } else if now >= e.deadline {
            let ids: Vec<String> = e.waiting.iter().map(|c| c.0.to_string()).collect();
            log::warn!(
                "client(s) {} did not unregister within {END_GRACE:?} of postcopy_end; their fork(), MADV_REMOVE and munmap now block until they close their userfaultfd (docs/control-protocol.md)",
                ids.join(", ")
            );
            self.stop = true;
        }
        let left = e.deadline.saturating_duration_since(now).as_millis().min(50);
        Some(i32::try_from(left).unwrap_or(50))
    }
}
