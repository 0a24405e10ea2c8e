//! A VMM process joining a running broker as a shared client: it takes the RAM blocks' memfds
//! from the control socket, maps them into its [`GuestRam`] from guest address 0 on, registers
//! them MISSING with its own userfaultfd and registers that with the broker; it registers its
//! backends; then a thread of the session follows the broker's progress until every page has
//! arrived. When the control connection ends before that (the broker died), the thread connects
//! again and reattaches every client id the session owns ([`ControlClient::reconnect`]): under a
//! service manager with an fd store the restarted broker serves them on, and the guest's I/O
//! never has to stop.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::client_id::ClientId;
use crate::control::{ClientKind, ControlClient, ControlError, MappingSpec, ReattachPolicy};
use crate::error::{Error, Result};
use crate::uffd::{feature, Uffd};
use crate::vhost_user::guest::GuestRam;
use crate::vhost_user::postcopy::BackendPostcopy;
use crate::vhost_user::register::{register_backend, BrokerLink};

/// Bytes of a small page.
const SMALL_PAGE: u64 = 4096;
/// How often the session's thread asks the broker for its progress.
const FOLLOW_EVERY: Duration = Duration::from_millis(20);

/// The control connection and the client ids it speaks for (this process's own and its
/// backends'), reattached together after a restart of the broker.
#[derive(Debug)]
struct Link {
    ctl: ControlClient,
    owned: Vec<ClientId>,
}

/// What the session's thread has learnt.
#[derive(Debug, Default)]
struct Follow {
    /// (received, total) pages at the last status.
    progress: Option<(u64, u64)>,
    /// Every page has arrived (or the broker said `postcopy_end`).
    complete: bool,
    /// Reattaches to a restarted broker.
    reattaches: u64,
    /// Why the thread stopped before the end; taken by the first caller that reports it.
    failed: Option<ControlError>,
    /// Failed and reported already.
    failure_reported: bool,
    /// The session was dropped.
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    policy: ReattachPolicy,
    link: Mutex<Link>,
    follow: Mutex<Follow>,
    changed: Condvar,
}

impl Shared {
    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn follow(&self) -> MutexGuard<'_, Follow> {
        self.follow.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut Follow)) {
        f(&mut self.follow());
        self.changed.notify_all();
    }
}

/// The session thread: the broker's progress every [`FOLLOW_EVERY`] until every page has
/// arrived; a reconnect and reattach whenever the connection ends before.
fn follow(shared: &Shared) {
    loop {
        if shared.follow().stop {
            return;
        }
        let mut link = shared.link();
        let status = link.ctl.status();
        if link.ctl.postcopy_ended().is_some() {
            shared.update(|f| f.complete = true);
            return;
        }
        match status {
            Ok(v) => {
                let progress = v["received_pages"].as_u64().zip(v["total_pages"].as_u64());
                let complete = progress.is_some_and(|(r, t)| r == t);
                shared.update(|f| {
                    f.progress = progress.or(f.progress);
                    f.complete = complete;
                });
                if complete {
                    return;
                }
            }
            Err(ControlError::PeerClosed | ControlError::Truncated { .. } | ControlError::Io { .. }) => {
                warn!(
                    "the broker's control connection ended before postcopy_end (the broker died?): reconnecting to {} to reattach client(s) {:?}",
                    shared.path.display(),
                    link.owned
                );
                let owned = link.owned.clone();
                match ControlClient::reconnect(&shared.path, &owned, &shared.policy) {
                    Ok(ctl) => {
                        link.ctl = ctl;
                        shared.update(|f| f.reattaches += 1);
                        info!("reattached client(s) {owned:?} to the restarted broker");
                    }
                    Err(e) => {
                        log::error!("{e}");
                        shared.update(|f| f.failed = Some(e));
                        return;
                    }
                }
            }
            Err(e) => {
                log::error!("following the broker's progress: {e}");
                shared.update(|f| f.failed = Some(e));
                return;
            }
        }
        drop(link);
        std::thread::sleep(FOLLOW_EVERY);
    }
}

/// The VMM's side of a broker: its control connection (reattached after a restart of the
/// broker), its own registered userfaultfd and the clients it registered.
#[derive(Debug)]
pub struct BrokerSession {
    shared: Arc<Shared>,
    /// Kept open while postcopy runs: closing it would let the kernel fill missing pages of the
    /// VMM's mapping with zeros.
    _uffd: Uffd,
    client: ClientId,
    blocks: Vec<String>,
}

impl Drop for BrokerSession {
    fn drop(&mut self) {
        self.shared.update(|f| f.stop = true);
    }
}

impl BrokerSession {
    /// Connect to the broker at `control`, map every RAM block into `ram` (back to back from
    /// guest address 0), register the mappings MISSING with a new userfaultfd and register it
    /// with the broker as shared client `name`; reattach after a restart of the broker as
    /// [`ReattachPolicy::default`] says.
    pub fn attach(control: &Path, name: &str, ram: &mut GuestRam) -> Result<BrokerSession> {
        BrokerSession::attach_with(control, name, ram, ReattachPolicy::default())
    }

    /// [`BrokerSession::attach`] with how long and how often to try reattaching.
    pub fn attach_with(
        control: &Path,
        name: &str,
        ram: &mut GuestRam,
        policy: ReattachPolicy,
    ) -> Result<BrokerSession> {
        let mut ctl = ControlClient::connect(control)?;
        ctl.hello(name)?;
        let blocks = ctl.get_blocks(None)?;
        let mut want = 0;
        for (b, _) in &blocks {
            want |=
                if b.page_size > SMALL_PAGE { feature::MISSING_HUGETLBFS } else { feature::MISSING_SHMEM };
        }
        let uffd =
            Uffd::open(want).map_err(|e| Error::io(format!("userfaultfd for {name}'s own mapping"), e))?;
        let mut gpa = 0;
        let mut specs = Vec::new();
        let mut names = Vec::new();
        for (info, fd) in blocks {
            let fd = fd.ok_or_else(|| {
                Error::Invalid(format!("the broker sent block '{}' without its fd", info.name))
            })?;
            let addr = ram.add_fd(gpa, &info.name, fd.as_fd(), info.size, info.page_size)?;
            uffd.register_missing(addr, info.size)
                .map_err(|e| Error::io(format!("register block '{}' with {name}'s uffd", info.name), e))?;
            specs.push(MappingSpec {
                client_addr: addr,
                block: info.name.clone(),
                offset: 0,
                len: info.size,
            });
            gpa += info.size;
            names.push(info.name);
        }
        let client =
            ctl.register(name, ClientKind::Shared, Some(std::process::id()), &specs, uffd.as_fd())?;
        info!("registered with the broker as client {client}: {} block(s), {gpa} bytes", names.len());
        let shared = Arc::new(Shared {
            path: control.to_path_buf(),
            policy,
            link: Mutex::new(Link { ctl, owned: vec![client] }),
            follow: Mutex::new(Follow::default()),
            changed: Condvar::new(),
        });
        let thread = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("{name}-broker"))
            .spawn(move || follow(&thread))
            .map_err(|e| Error::io("start the thread that follows the broker", e))?;
        Ok(BrokerSession { shared, _uffd: uffd, client, blocks: names })
    }

    /// Register a backend after its postcopy handshake's base correction (before
    /// [`crate::vhost_user::postcopy::Handshake::ack`]), as
    /// [`crate::vhost_user::register::register_backend`] does over this session's connection;
    /// the session owns it from then on (it is reattached with this process's own client).
    pub fn register_backend(
        &mut self,
        name: &str,
        pc: &BackendPostcopy,
        block_names: &[Option<String>],
    ) -> Result<ClientId> {
        let mut link = self.shared.link();
        let id = register_backend(&mut BrokerLink::Control(&mut link.ctl), name, pc, block_names)?;
        link.owned.push(id);
        Ok(id)
    }

    /// Postcopy is over (after POSTCOPY_END to the backends): unregister every client the
    /// session owns, backends first. A broker that has stopped meanwhile (its grace after
    /// `postcopy_end` ran out) counts as done.
    pub fn unregister_all(&mut self) -> Result<()> {
        let mut link = self.shared.link();
        let Link { ctl, owned } = &mut *link;
        let mut first = Ok(());
        for id in std::mem::take(owned).into_iter().rev() {
            match ctl.unregister(id) {
                Ok(()) | Err(ControlError::PeerClosed) => {}
                Err(e) => {
                    info!("unregister client {id}: {e}");
                    if first.is_ok() {
                        first = Err(e.into());
                    }
                }
            }
        }
        first
    }

    /// This process's client id.
    pub fn client(&self) -> ClientId {
        self.client
    }

    /// The RAM blocks' names, in guest address order.
    pub fn block_names(&self) -> &[String] {
        &self.blocks
    }

    /// (received, total) pages at the broker's last status, `None` before the first.
    pub fn progress(&self) -> Option<(u64, u64)> {
        self.shared.follow().progress
    }

    /// How many times the session reattached to a restarted broker.
    pub fn reattaches(&self) -> u64 {
        self.shared.follow().reattaches
    }

    /// Whether every page has arrived; an error when the session lost the broker for good (no
    /// broker took its clients back).
    pub fn complete(&self) -> Result<bool> {
        let mut f = self.shared.follow();
        check_failed(&mut f)?;
        Ok(f.complete)
    }

    /// Wait until every page has arrived; fails after `timeout`, or when the session lost the
    /// broker for good.
    pub fn wait_complete(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut f = self.shared.follow();
        loop {
            check_failed(&mut f)?;
            if f.complete {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Device(format!(
                    "the broker did not receive every page within {timeout:?}: progress {:?}",
                    f.progress
                )));
            }
            f = self.shared.changed.wait_timeout(f, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// The session thread's failure, once as its error, then as a reminder.
fn check_failed(f: &mut Follow) -> Result<()> {
    if let Some(e) = f.failed.take() {
        f.failure_reported = true;
        return Err(e.into());
    }
    if f.failure_reported {
        return Err(Error::Device("the broker session was lost (see the error before)".into()));
    }
    Ok(())
}
