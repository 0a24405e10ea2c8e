//! A VMM process joining a running broker as a shared client: it takes the RAM blocks' memfds
//! from the control socket, maps them into its [`GuestRam`] from guest address 0 on, registers
//! them MISSING with its own userfaultfd and registers that with the broker; then it follows the
//! broker's progress until every page has arrived.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use log::info;

use crate::client_id::ClientId;
use crate::control::{ClientKind, ControlClient, MappingSpec};
use crate::error::{Error, Result};
use crate::uffd::{feature, Uffd};
use crate::vhost_user::guest::GuestRam;

/// Bytes of a small page.
const SMALL_PAGE: u64 = 4096;

/// The VMM's side of a broker: its control connection and its own registered userfaultfd.
#[derive(Debug)]
pub struct BrokerSession {
    ctl: ControlClient,
    /// Kept open while postcopy runs: closing it would let the kernel fill missing pages of the
    /// VMM's mapping with zeros.
    _uffd: Uffd,
    client: ClientId,
    blocks: Vec<String>,
    done: bool,
}

impl BrokerSession {
    /// Connect to the broker at `control`, map every RAM block into `ram` (back to back from
    /// guest address 0), register the mappings MISSING with a new userfaultfd and register it
    /// with the broker as shared client `name`.
    pub fn attach(control: &Path, name: &str, ram: &mut GuestRam) -> Result<BrokerSession> {
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
        Ok(BrokerSession { ctl, _uffd: uffd, client, blocks: names, done: false })
    }

    /// The control connection (to register backends, read status).
    pub fn control(&mut self) -> &mut ControlClient {
        &mut self.ctl
    }

    /// This process's client id.
    pub fn client(&self) -> ClientId {
        self.client
    }

    /// The RAM blocks' names, in guest address order.
    pub fn block_names(&self) -> &[String] {
        &self.blocks
    }

    /// (received, total) pages, or `None` once the broker is gone (it exits when complete).
    pub fn progress(&mut self) -> Option<(u64, u64)> {
        match self.ctl.status() {
            Ok(v) => Some((v["received_pages"].as_u64()?, v["total_pages"].as_u64()?)),
            Err(e) => {
                info!("broker status: {e}; taking it as finished");
                None
            }
        }
    }

    /// Whether every page has arrived (asked once more only while it had not).
    pub fn complete(&mut self) -> bool {
        if !self.done {
            self.done = self.progress().is_none_or(|(r, t)| r == t);
        }
        self.done
    }

    /// Whether [`BrokerSession::complete`] has seen the end (the broker may be gone since).
    pub fn seen_complete(&self) -> bool {
        self.done
    }

    /// Wait until every page has arrived; fails after `timeout`.
    pub fn wait_complete(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.complete() {
            if Instant::now() > deadline {
                return Err(Error::Device(format!(
                    "the broker did not receive every page within {timeout:?}: progress {:?}",
                    self.progress()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}
