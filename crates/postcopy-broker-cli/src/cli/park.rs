//! What `serve --incoming` parks in the fd store during postcopy, so that a broker restarted
//! after its own death (SIGKILL, a crash, an OOM kill) rebuilds the migration instead of losing
//! the guest (docs/recovery.md, "The destination broker dies"):
//!
//! | name | what |
//! |---|---|
//! | `listen` | the migration's listening TCP socket (the source reconnects to the same port) |
//! | `control` | the control socket (clients reconnect to it; new ones queue in its backlog) |
//! | `block.N` | each RAM block's memfd or hugetlbfs fd, wire order |
//! | `digests` | the digest table's memfd |
//! | `alive` | an 8-byte memfd where the broker writes the time every 100 ms (the downtime) |
//! | `uffd.ID`, `pidfd.ID` | each client's userfaultfd and pidfd |
//! | `state.GEN` | the record: session, clients with their mapping tables; a sealed memfd, replaced (next GEN first, then the old one removed) when clients come and go |

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use crate::fdstore::{FdStore, Parked};
use postcopy_broker::client::ClientId;
use postcopy_broker::error::{Error, Result};
use postcopy_broker::fault::park::{ClientParking, ParkedClient};
use postcopy_broker::migration::destination::{ParkedSession, SessionRecord};

/// Prefix of the record's fd names.
pub const STATE_PREFIX: &str = "state.";
/// Name of the migration's listening socket.
pub const LISTEN_FD_NAME: &str = "listen";
/// Name of the heartbeat memfd.
pub const ALIVE_FD_NAME: &str = "alive";
/// How often the heartbeat is written.
const HEARTBEAT: Duration = Duration::from_millis(100);

/// The parked record.
pub type State = ParkedSession;

fn uffd_name(id: u64) -> String {
    format!("uffd.{id}")
}

fn pidfd_name(id: u64) -> String {
    format!("pidfd.{id}")
}

/// A sealed memfd holding `bytes`.
fn sealed(bytes: &[u8]) -> io::Result<OwnedFd> {
    let fd = memfd_create(c"pcb-state", MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)?;
    let mut f = std::fs::File::from(fd);
    io::Write::write_all(&mut f, bytes)?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS takes an int and changes only the file's seals.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f.into())
}

/// The record parked under the highest `state.GEN` (None: nothing to rebuild); older ones are
/// closed.
pub fn take_state(parked: &Parked) -> Result<Option<(u64, State)>> {
    let mut gens: Vec<u64> =
        parked.names().iter().filter_map(|n| n.strip_prefix(STATE_PREFIX)?.parse().ok()).collect();
    gens.sort_unstable();
    let Some(&last) = gens.last() else { return Ok(None) };
    for g in &gens[..gens.len() - 1] {
        drop(parked.take(&format!("{STATE_PREFIX}{g}")));
    }
    let fd = parked
        .take(&format!("{STATE_PREFIX}{last}"))
        .ok_or_else(|| Error::Invalid("state fd vanished".into()))?;
    let mut f = std::fs::File::from(fd);
    let mut text = String::new();
    io::Seek::seek(&mut f, io::SeekFrom::Start(0)).map_err(|e| Error::io("rewind the parked state", e))?;
    f.read_to_string(&mut text).map_err(|e| Error::io("read the parked state", e))?;
    let state: State = serde_json::from_str(&text).map_err(|e| {
        Error::Invalid(format!("the parked state record is unreadable ({e}); start a new migration"))
    })?;
    Ok(Some((last, state)))
}

/// When the dead broker last wrote its heartbeat.
pub fn last_alive(fd: &OwnedFd) -> Option<SystemTime> {
    let mut b = [0u8; 8];
    nix::sys::uio::pread(fd, &mut b, 0).ok().filter(|&n| n == 8)?;
    Some(UNIX_EPOCH + Duration::from_millis(u64::from_le_bytes(b)))
}

#[derive(Debug)]
struct Inner {
    /// None until the session listens ([`Parking::begin`]): clients parked before wait for it.
    session: Option<SessionRecord>,
    clients: BTreeMap<u64, ParkedClient>,
    generation: u64,
    /// Names stored now.
    stored: BTreeSet<String>,
}

/// Parks the session and its clients in the fd store (see the module doc).
#[derive(Debug)]
pub struct Parking {
    store: FdStore,
    inner: Mutex<Inner>,
    alive: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
}

impl Parking {
    /// A parking that holds nothing yet (give it to the fault loop before it starts).
    pub fn new(store: FdStore) -> Result<Arc<Parking>> {
        let fd = memfd_create(c"pcb-alive", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| Error::io("fd store: heartbeat memfd", e.into()))?;
        nix::unistd::ftruncate(&fd, 8).map_err(|e| Error::io("fd store: heartbeat memfd", e.into()))?;
        Ok(Self::with(store, None, BTreeMap::new(), 0, BTreeSet::new(), fd))
    }

    fn with(
        store: FdStore,
        session: Option<SessionRecord>,
        clients: BTreeMap<u64, ParkedClient>,
        generation: u64,
        stored: BTreeSet<String>,
        alive: OwnedFd,
    ) -> Arc<Parking> {
        let inner = Inner { session, clients, generation, stored };
        Arc::new(Parking {
            store,
            inner: Mutex::new(inner),
            alive: Arc::new(alive),
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The session listens (postcopy starts): park `fds` (blocks, digests, listen, control),
    /// the heartbeat and the first record.
    pub fn begin(&self, session: SessionRecord, fds: &[(String, BorrowedFd<'_>)]) -> Result<()> {
        let alive = Arc::clone(&self.alive);
        let mut all: Vec<(String, BorrowedFd<'_>)> = fds.to_vec();
        all.push((ALIVE_FD_NAME.into(), alive.as_fd()));
        for (name, fd) in &all {
            self.store.store(name, *fd).map_err(|e| Error::io(format!("fd store: park '{name}'"), e))?;
            if let Ok(mut g) = self.inner.lock() {
                g.stored.insert(name.clone());
            }
        }
        if let Ok(mut g) = self.inner.lock() {
            g.session = Some(session);
        }
        self.heartbeat();
        self.rewrite();
        Ok(())
    }

    /// Go on parking after a restart: `names` are in the store already (passed at start),
    /// `generation` is the record's, `alive` the heartbeat memfd.
    pub fn resume(
        store: FdStore,
        state: State,
        generation: u64,
        names: Vec<String>,
        alive: OwnedFd,
    ) -> Arc<Parking> {
        let clients = state.clients.iter().map(|c| (c.id, c.clone())).collect();
        let mut stored: BTreeSet<String> = names.into_iter().collect();
        stored.insert(format!("{STATE_PREFIX}{generation}"));
        let p = Self::with(store, Some(state.session), clients, generation, stored, alive);
        p.heartbeat();
        p
    }

    fn heartbeat(&self) {
        let (fd, stop) = (Arc::clone(&self.alive), Arc::clone(&self.stop));
        let spawned = std::thread::Builder::new().name("pcb-heartbeat".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
                let now = u64::try_from(now).unwrap_or(u64::MAX);
                let _ = nix::sys::uio::pwrite(&*fd, &now.to_le_bytes(), 0);
                std::thread::sleep(HEARTBEAT);
            }
        });
        if let Err(e) = spawned {
            log::warn!("fd store: no heartbeat thread ({e}); a restart cannot tell its downtime");
        }
    }

    /// Record restarts and anything else in the session record, then park it again.
    pub fn update_session(&self, f: impl FnOnce(&mut SessionRecord)) {
        if let Ok(mut g) = self.inner.lock() {
            if let Some(s) = g.session.as_mut() {
                f(s);
            }
        }
        self.rewrite();
    }

    /// Park the record as `state.GEN+1`, then remove the older one.
    fn rewrite(&self) {
        let Ok(mut g) = self.inner.lock() else { return };
        let Some(session) = g.session.clone() else { return };
        let state = State { session, clients: g.clients.values().cloned().collect() };
        let bytes = match serde_json::to_vec(&state) {
            Ok(b) => b,
            Err(e) => return log::error!("fd store: cannot encode the state record: {e}"),
        };
        let name = format!("{STATE_PREFIX}{}", g.generation + 1);
        match sealed(&bytes).and_then(|fd| self.store.store(&name, fd.as_fd())) {
            Ok(()) => {
                let old = format!("{STATE_PREFIX}{}", g.generation);
                g.generation += 1;
                g.stored.insert(name);
                if g.stored.remove(&old) {
                    self.remove(&old);
                }
            }
            Err(e) => log::error!(
                "fd store: parking the state record failed: {e}; a restart would not know the latest clients"
            ),
        }
    }

    fn remove(&self, name: &str) {
        if let Err(e) = self.store.remove(name) {
            log::warn!("fd store: removing '{name}': {e}");
        }
    }

    /// The migration is over (every page here): empty the store, so that the next start is a
    /// fresh one, and stop the heartbeat.
    pub fn finish(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let names = self.inner.lock().map(|mut g| std::mem::take(&mut g.stored)).unwrap_or_default();
        for n in names {
            self.remove(&n);
        }
    }

    /// Forget a parked client that could not be taken back, and its fds.
    pub fn forget(&self, id: u64) {
        self.release(ClientId(id));
    }
}

impl ClientParking for Parking {
    fn park(&self, client: &ParkedClient, uffd: BorrowedFd<'_>, pidfd: Option<BorrowedFd<'_>>) {
        let Ok(mut g) = self.inner.lock() else { return };
        for (name, fd) in [(uffd_name(client.id), Some(uffd)), (pidfd_name(client.id), pidfd)] {
            let Some(fd) = fd else { continue };
            if g.stored.contains(&name) {
                continue; // parked before the restart, still in the store
            }
            match self.store.store(&name, fd) {
                Ok(()) => {
                    g.stored.insert(name);
                }
                Err(e) => log::error!("fd store: parking '{name}' of client {} failed: {e}", client.id),
            }
        }
        g.clients.insert(client.id, client.clone());
        drop(g);
        self.rewrite();
    }

    fn release(&self, id: ClientId) {
        let Ok(mut g) = self.inner.lock() else { return };
        if g.clients.remove(&id.0).is_none() {
            return;
        }
        let names: Vec<String> =
            [uffd_name(id.0), pidfd_name(id.0)].into_iter().filter(|n| g.stored.remove(n)).collect();
        drop(g);
        self.rewrite();
        for n in names {
            self.remove(&n);
        }
    }
}

/// The parked fds of a client, by its id.
pub fn take_client_fds(parked: &Parked, id: u64) -> (Option<OwnedFd>, Option<OwnedFd>) {
    (parked.take(&uffd_name(id)), parked.take(&pidfd_name(id)))
}
