//! What the broker parks in the fd store while it serves postcopy, so that a broker restarted
//! after its own death (SIGKILL, a crash, an OOM kill) rebuilds it instead of losing the guest
//! (docs/recovery.md, "The destination broker dies"), for both kinds of job ([`Job`]): a
//! migration (`serve --incoming`) and a lazy restore (`serve --image`,
//! `crate::cli::restore_restart`):
//!
//! | name | what |
//! |---|---|
//! | `listen` | incoming: the migration's listening TCP socket (the source reconnects to the same port) |
//! | `control` | the control socket (clients reconnect to it; new ones queue in its backlog) |
//! | `block.N` | each RAM block's memfd or hugetlbfs fd, wire (or `--block`) order |
//! | `digests` | incoming: the digest table's memfd |
//! | `vhost.N` | restore: the connection to each `--vhost-user-backend` the broker is the frontend of |
//! | `alive` | an 8-byte memfd where the broker writes the time every 100 ms (the downtime) |
//! | `uffd.ID`, `pidfd.ID` | each client's userfaultfd and pidfd (control, private/Firecracker and daemon-mode backend clients) |
//! | `state.GEN` | the record: the job, clients with their mapping tables (and a private client's removed ranges); a sealed memfd, replaced (next GEN first, then the old one removed) when clients come and go |

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use serde::{Deserialize, Serialize};

use crate::cli::restore_restart::RestoreRecord;
use crate::fdstore::{FdStore, Parked};
use postcopy_broker::client::ClientId;
use postcopy_broker::control::ControlListener;
use postcopy_broker::error::{Error, IoContext, Result};
use postcopy_broker::fault::park::{Adoption, ClientParking, ParkedClient, Restart};
use postcopy_broker::fault::BrokerHandle;
use postcopy_broker::migration::destination::SessionRecord;

/// Prefix of the record's fd names.
pub const STATE_PREFIX: &str = "state.";
/// Name of the migration's listening socket.
pub const LISTEN_FD_NAME: &str = "listen";
/// Name of the heartbeat memfd.
pub const ALIVE_FD_NAME: &str = "alive";
/// How often the heartbeat is written.
const HEARTBEAT: Duration = Duration::from_millis(100);

/// What the parked broker was doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Job {
    /// `serve --incoming`: a migration session the source resumes.
    Incoming {
        /// The session.
        session: SessionRecord,
    },
    /// `serve --image`: a lazy restore from a snapshot image.
    Restore {
        /// The restore.
        restore: RestoreRecord,
    },
}

impl Job {
    /// The restarts before this one.
    pub fn restarts(&self) -> &[Restart] {
        match self {
            Job::Incoming { session } => &session.restarts,
            Job::Restore { restore } => &restore.restarts,
        }
    }

    fn restarts_mut(&mut self) -> &mut Vec<Restart> {
        match self {
            Job::Incoming { session } => &mut session.restarts,
            Job::Restore { restore } => &mut restore.restarts,
        }
    }

    /// What `serve` mode parked it, for the error when the other one finds it.
    pub fn command(&self) -> &'static str {
        match self {
            Job::Incoming { .. } => "serve --incoming",
            Job::Restore { .. } => "serve --image",
        }
    }
}

/// The parked record: the job and the clients the fault loop served (with their mapping
/// tables), replaced whenever a client comes or goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The job.
    #[serde(flatten)]
    pub job: Job,
    /// The clients, by id.
    pub clients: Vec<ParkedClient>,
}

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
        Error::Invalid(format!("the parked state record is unreadable ({e}); empty the fd store and start over (a new migration or restore)"))
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
    /// None until the job serves postcopy ([`Parking::begin`]): clients parked before wait
    /// for it.
    job: Option<Job>,
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

/// Go on parking after a restart when the service manager handed back its store and the dead
/// broker's heartbeat ([`Parking::resume`]); without them, say that a further restart could not
/// resume, and park nothing.
pub fn parking_after_restart(
    store: Option<FdStore>,
    alive: Option<OwnedFd>,
    state: State,
    generation: u64,
    names: Vec<String>,
) -> Option<Arc<Parking>> {
    match (store, alive) {
        (Some(s), Some(alive)) => Some(Parking::resume(s, state, generation, names, alive)),
        _ => {
            log::warn!(
                "restarted without an fd store (or its heartbeat): a further restart could not resume"
            );
            None
        }
    }
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
        job: Option<Job>,
        clients: BTreeMap<u64, ParkedClient>,
        generation: u64,
        stored: BTreeSet<String>,
        alive: OwnedFd,
    ) -> Arc<Parking> {
        let inner = Inner { job, clients, generation, stored };
        Arc::new(Parking {
            store,
            inner: Mutex::new(inner),
            alive: Arc::new(alive),
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Postcopy starts (the session listens, the restore's fault loop runs): park `fds` (see
    /// the module doc), the heartbeat and the first record.
    pub fn begin(&self, job: Job, fds: &[(String, BorrowedFd<'_>)]) -> Result<()> {
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
            g.job = Some(job);
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
        let p = Self::with(store, Some(state.job), clients, generation, stored, alive);
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

    /// Record a restart in the job's record, then park it again.
    pub fn record_restart(&self, restart: Restart) {
        if let Ok(mut g) = self.inner.lock() {
            if let Some(j) = g.job.as_mut() {
                j.restarts_mut().push(restart);
            }
        }
        self.rewrite();
    }

    /// Park the record as `state.GEN+1`, then remove the older one.
    fn rewrite(&self) {
        let Ok(mut g) = self.inner.lock() else { return };
        let Some(job) = g.job.clone() else { return };
        let state = State { job, clients: g.clients.values().cloned().collect() };
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

    /// The job is over (every page here): empty the store, so that the next start is a
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
fn take_client_fds(parked: &Parked, id: u64) -> (Option<OwnedFd>, Option<OwnedFd>) {
    (parked.take(&uffd_name(id)), parked.take(&pidfd_name(id)))
}

/// The fd store to park in, if the broker runs under one.
pub fn fd_store() -> Option<FdStore> {
    match FdStore::from_env() {
        Ok(s) => s,
        Err(e) => {
            log::warn!("NOTIFY_SOCKET: {e}; nothing is parked, a restart could not resume");
            None
        }
    }
}

/// The control socket's fd to park: the one the service manager gave (`given`), else, under an
/// fd store, one bound here (returned too: keep it alive while the broker runs), else none (the
/// fault loop binds `path` itself).
pub fn control_fd(
    given: &Option<Arc<OwnedFd>>,
    store: bool,
    path: &std::path::Path,
    allowed_uids: &[u32],
) -> Result<(Option<Arc<OwnedFd>>, Option<ControlListener>)> {
    match (given, store) {
        (Some(fd), _) => Ok((Some(Arc::clone(fd)), None)),
        (None, true) => {
            let uids = if allowed_uids.is_empty() {
                ControlListener::default_allowed_uids()
            } else {
                allowed_uids.to_vec()
            };
            let l = ControlListener::bind(path, uids).map_err(|e| Error::Invalid(e.to_string()))?;
            // SAFETY: the listener's fd is open while `l` lives; it is duplicated at once.
            let dup = unsafe { BorrowedFd::borrow_raw(l.as_raw_fd()) }
                .try_clone_to_owned()
                .ctx(|| "duplicate the control socket".into())?;
            Ok((Some(Arc::new(dup)), Some(l)))
        }
        (None, false) => Ok((None, None)),
    }
}

/// Take the parked `clients` back into the restarted fault loop `h`, each from its parked fds;
/// one that cannot be taken back is forgotten by `parking` (and counted lost by the loop).
pub fn adopt_clients(
    h: &BrokerHandle,
    parked: &Parked,
    clients: Vec<ParkedClient>,
    parking: Option<&Parking>,
) {
    for c in clients {
        let id = c.id;
        match take_client_fds(parked, id) {
            (Some(uffd), pidfd) => {
                if let Err(e) = h.adopt(Adoption { client: c, uffd, pidfd }) {
                    log::warn!("client {id} cannot be taken back: {e}");
                    if let Some(p) = parking {
                        p.forget(id);
                    }
                }
            }
            (None, _) => log::error!(
                "client {id} '{}' is in the parked record but its userfaultfd is not: it is not served; if it kept its own copy it waits, else its missing pages read as zeros",
                c.name
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::restore_restart::RESTORE_RECORD_VERSION;

    #[test]
    fn a_restore_record_round_trips_and_says_its_kind() {
        let state = State {
            job: Job::Restore {
                restore: RestoreRecord {
                    version: RESTORE_RECORD_VERSION,
                    blocks: vec![("ram".into(), 8192, 4096)],
                    image: None,
                    backends: Vec::new(),
                    restarts: vec![Restart { downtime_ms: 7, ..Restart::default() }],
                },
            },
            clients: vec![ParkedClient {
                id: 3,
                name: "fc".into(),
                pid: Some(42),
                uid: None,
                shared: Vec::new(),
                private: Vec::new(),
                removed: vec![(0x1000, 0x3000)],
            }],
        };
        let text = serde_json::to_string(&state).unwrap();
        assert!(text.contains(r#""kind":"restore""#), "{text}");
        let back: State = serde_json::from_str(&text).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.job.restarts().len(), 1);
        assert_eq!(back.job.command(), "serve --image");
    }
}
