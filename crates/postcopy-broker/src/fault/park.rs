//! Clients across a restart of the broker. The fault loop tells a [`ClientParking`] about every
//! client it serves (its record and its fds, to be kept outside the process, e.g. in a service
//! manager's fd store) and about every client whose fds it released; a broker restarted during
//! postcopy takes the parked clients back ([`Adoption`], [`BrokerHandle::adopt`]) and wakes
//! every range they registered, so threads blocked in faults that the dead broker had read fault
//! again into the new one ([`crate::migration::destination`] rebuilds the rest).
//!
//! [`BrokerHandle::adopt`]: crate::fault::BrokerHandle::adopt

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::client::{AddressMap, Client, ClientId, MappingEntry, MappingTable, PrivateRegion, PrivateTable};
use crate::error::{Error, Result};
use crate::fault::event_loop::{pidfd_open, set_nonblocking, token, Loop, K_PIDFD, K_UFFD};
use crate::fault::limits::Owner;
use crate::uffd::Uffd;

/// What a restarted broker needs to know of a client besides its fds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedClient {
    /// Its id (kept across the restart).
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Its pid, when the broker could see it.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The uid of the control peer that registered it (None: registered in-process).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Its shared mappings (block ids are wire order).
    #[serde(default)]
    pub shared: Vec<MappingEntry>,
    /// Its private regions.
    #[serde(default)]
    pub private: Vec<PrivateRegion>,
    /// The `[start, end)` ranges a private client removed (REMOVE events): they fault in as
    /// zero, not as image data, after a restart too.
    #[serde(default)]
    pub removed: Vec<(u64, u64)>,
}

impl ParkedClient {
    /// Every range of the client's address space the broker serves.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let shared = self.shared.iter().map(|e| (e.client_addr, e.len));
        shared.chain(self.private.iter().map(|r| (r.client_addr, r.len))).collect()
    }
}

/// Keeps clients' fds outside the broker (see the module doc). Called on the fault loop thread:
/// implementations must be quick and must not call back into the loop.
pub trait ClientParking: Send + Sync + std::fmt::Debug {
    /// The loop serves `client` now, through `uffd`, watching its exit through `pidfd`.
    fn park(&self, client: &ParkedClient, uffd: BorrowedFd<'_>, pidfd: Option<BorrowedFd<'_>>);
    /// The loop released the client's fds (it exited or unregistered itself).
    fn release(&self, id: ClientId);
}

/// A parked client to serve again.
#[derive(Debug)]
pub struct Adoption {
    /// Its record.
    pub client: ParkedClient,
    /// Its userfaultfd.
    pub uffd: OwnedFd,
    /// Its pidfd, if one was parked (else one is opened from the pid, if any).
    pub pidfd: Option<OwnedFd>,
}

pub use crate::stats::Restart;

/// Threads of `pid` blocked in a userfault right now (their wchan is `handle_userfault`).
fn blocked_in_userfault(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    let blocked = tasks
        .filter_map(|t| t.ok())
        .filter(|t| {
            std::fs::read_to_string(t.path().join("wchan")).is_ok_and(|w| w.trim() == "handle_userfault")
        })
        .count();
    u64::try_from(blocked).unwrap_or(u64::MAX)
}

/// Whether process `pid` still holds its own copy of the userfaultfd the broker holds as `fd`
/// (an fd of the same open file: kcmp(2) `KCMP_FILE` over `/proc/PID/fd`). None when that cannot
/// be told (the process is gone, or kcmp is not allowed). A client must keep it while registered
/// (docs/control-protocol.md, "When the broker dies").
pub fn holds_copy(pid: u32, fd: std::os::fd::RawFd) -> Option<bool> {
    let ours = i64::from(std::process::id());
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let mut told = false;
    for e in entries.filter_map(|e| e.ok()) {
        let Some(theirs) = e.file_name().to_str().and_then(|n| n.parse::<i64>().ok()) else { continue };
        // SAFETY: kcmp only compares the two processes' file table entries; it writes nothing.
        let r = unsafe {
            libc::syscall(libc::SYS_kcmp, ours, i64::from(pid), 0 /* KCMP_FILE */, i64::from(fd), theirs)
        };
        if r == 0 {
            return Some(true);
        }
        told |= r > 0;
    }
    told.then_some(false)
}

impl Loop {
    /// The record of a client the loop serves.
    fn parked_record(&self, id: ClientId) -> Option<ParkedClient> {
        let c = self.core.clients.get(id)?;
        let (shared, private, removed) = match &c.map {
            AddressMap::Shared(t) => (t.entries().to_vec(), Vec::new(), Vec::new()),
            AddressMap::Private(t) => (Vec::new(), t.regions().to_vec(), t.removed().iter().collect()),
        };
        Some(ParkedClient {
            id: id.0,
            name: c.name.clone(),
            pid: c.pid,
            uid: self.owners.get(id).map(|o| o.uid),
            shared,
            private,
            removed,
        })
    }

    /// Tell the parking about a client the loop now serves (and warn if the client did not
    /// keep its own copy of its userfaultfd).
    pub(crate) fn park(&self, id: ClientId) {
        if let Some(c) = self.core.clients.get(id) {
            if c.pid.and_then(|p| holds_copy(p, c.uffd.as_raw_fd())) == Some(false) {
                log::warn!(
                    "client {} '{}' (pid {:?}) closed its own copy of its userfaultfd: if this broker dies {},                      the kernel unregisters its ranges and it reads zeros where pages have not arrived;                      keep the copy open while registered (docs/control-protocol.md)",
                    id.0,
                    c.name,
                    c.pid,
                    if self.config.parking.is_some() { "and its fd store is lost too" } else { "(it runs without an fd store)" }
                );
            }
        }
        let (Some(p), Some(record)) = (&self.config.parking, self.parked_record(id)) else { return };
        if let Some(c) = self.core.clients.get(id) {
            p.park(&record, c.uffd.as_fd(), c.pidfd.as_ref().map(AsFd::as_fd));
        }
    }

    /// Tell the parking that a client's fds are released.
    pub(crate) fn unpark(&self, id: ClientId) {
        if let Some(p) = &self.config.parking {
            p.release(id);
        }
    }

    /// Serve a parked client again (same id), then wake every range it registered. Returns the
    /// threads that were blocked in a userfault when woken.
    pub(crate) fn adopt(&mut self, a: Adoption) -> Result<u64> {
        let Adoption { client: rec, uffd, pidfd } = a;
        let id = ClientId(rec.id);
        if self.core.clients.get(id).is_some() {
            return Err(Error::Invalid(format!("client {} is served already", rec.id)));
        }
        crate::uffd::check_userfaultfd(uffd.as_raw_fd())
            .map_err(|what| Error::NotAUserfaultfd { client: rec.name.clone(), what })?;
        let map = if rec.private.is_empty() {
            AddressMap::Shared(MappingTable::new(&self.core.blocks, rec.shared.clone())?)
        } else {
            let len = self.core.image.as_ref().map_or(0, |i| i.len());
            let mut t = PrivateTable::new(rec.private.clone(), len)?;
            for &(start, end) in &rec.removed {
                t.remove(start, end);
            }
            AddressMap::Private(t)
        };
        let pidfd = match (pidfd, rec.pid) {
            (Some(fd), _) => Some(fd),
            (None, Some(pid)) => {
                Some(pidfd_open(pid).map_err(|e| Error::io(format!("pidfd_open of pid {pid}"), e))?)
            }
            (None, None) => None,
        };
        set_nonblocking(uffd.as_raw_fd())?;
        self.add(uffd.as_raw_fd(), token(K_UFFD, id.0))?;
        if let Some(p) = &pidfd {
            if let Err(e) = self.add(p.as_raw_fd(), token(K_PIDFD, id.0)) {
                self.del(uffd.as_raw_fd());
                return Err(e);
            }
        }
        self.core.clients.reserve_id(id);
        let ranges = rec.ranges();
        let client = Client {
            id,
            name: rec.name.clone(),
            uffd: Uffd::adopt(uffd),
            pid: rec.pid,
            pidfd,
            map,
            stats: Default::default(),
            repeat: Default::default(),
        };
        // Counted before the wake: a woken thread leaves handle_userfault at once.
        let blocked = rec.pid.map_or(0, blocked_in_userfault);
        for &(start, len) in &ranges {
            if let Err(e) = client.uffd.wake(start, len) {
                log::warn!("client {} '{}': waking {start:#x}+{len:#x}: {e}", id.0, rec.name);
            }
        }
        self.core.clients.insert(client);
        if let Some(uid) = rec.uid {
            // Connection 0 is none: the peer's connection died with the old broker.
            self.owners.insert(id, Owner { uid, conn: 0, exits_with_conn: false, parent: None });
        }
        self.core.stats.clients_registered += 1;
        if let Some(r) = self.restart.as_mut() {
            r.clients_adopted += 1;
            r.ranges_woken += ranges.len() as u64;
            r.faults_rewoken += blocked;
        }
        log::info!(
            "client {} '{}' (pid {:?}) taken back after the restart: {} range(s) woken, {blocked} thread(s) were blocked in a fault",
            id.0,
            rec.name,
            rec.pid,
            ranges.len()
        );
        self.park(id);
        Ok(blocked)
    }

    /// `reattach` over control connection `conn` by a peer of `uid`: it owns these orphaned
    /// clients now (their connection died with the old broker). All or nothing.
    pub(crate) fn reattach(&mut self, conn: u64, uid: u32, clients: &[u64]) -> Result<()> {
        for &c in clients {
            let id = ClientId(c);
            match self.owners.get(id) {
                Some(o) if (uid == 0 || o.uid == uid) && !self.conns.contains_key(&o.conn) => {}
                Some(o) if self.conns.contains_key(&o.conn) => {
                    return Err(Error::Invalid(format!("client {c} is attached to a live connection already")))
                }
                Some(_) => return Err(Error::Invalid(format!("client {c} belongs to another user"))),
                None => {
                    return Err(Error::Invalid(format!(
                        "no client {c} here (this broker did not take it back after a restart: without an fd store it never had it; register again)"
                    )))
                }
            }
        }
        for &c in clients {
            let id = ClientId(c);
            if let Some(o) = self.owners.get(id) {
                self.owners.insert(id, Owner { conn, ..o });
                log::info!("client {c} reattached to control connection #{conn}");
            }
        }
        Ok(())
    }

    /// A parked client that could not be taken back.
    pub(crate) fn lost_in_restart(&mut self) {
        if let Some(r) = self.restart.as_mut() {
            r.clients_lost += 1;
        }
    }
}
