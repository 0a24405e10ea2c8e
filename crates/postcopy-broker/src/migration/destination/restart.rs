//! A destination broker that died during postcopy, rebuilt from what it parked: the session's
//! record ([`SessionRecord`]: session id, blocks, capabilities, the source's certificate), the
//! block fds, and the digest table's memfd. The caller (e.g. `serve --incoming` with systemd's
//! fd store) keeps these outside the process while the migration is in postcopy
//! ([`Destination::parkable`], [`Destination::record`]) and hands them back at the next start.
//!
//! [`Destination::rebuild`] maps the parked blocks again, takes their parked ledgers (the
//! received and removed bitmaps as the dead broker left them, `ram::ledger`: a page removed
//! before or after it arrived stays removed), adds what page-cache residency says
//! ([`crate::ram::residency`]: placement is atomic, so a present page is a complete one, and a
//! death between a placement and its received bit is covered), registers them with a new userfaultfd, and starts the fault loop with a
//! network source that is paused from the start. The session then waits at its gate for the
//! source, which saw a dropped connection and resumes the same session through the ordinary
//! recovery protocol (authenticated, bound to the session id, blocks and certificate as
//! before); the rebuilt bitmaps make it send exactly the missing pages. The caller takes the
//! parked clients back with [`BrokerHandle::adopt`](crate::fault::BrokerHandle::adopt), which
//! wakes their ranges.

use std::net::TcpListener;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::gate::{Gate, GateLimits};
use super::network::{NetState, NetworkSource};
use super::resume::Link;
use super::session::{Destination, DestinationOptions, DESTINATION_CAPS};
use crate::error::{Error, Result};
use crate::fault::park::Restart;
use crate::fault::Broker;
use crate::incoming::Incoming;
use crate::migration::transport::Security;
use crate::migration::wire::{BlockInfo, BlockTable, CAP_RESUME};
use crate::ram::{residency, RamBlock, RamBlocks};

/// Version of [`SessionRecord`]'s layout.
pub const RECORD_VERSION: u32 = 1;

/// What a restarted destination needs to resume the session besides the parked fds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The migration's session id (the source resumes it).
    pub session_id: u64,
    /// The announced blocks, in wire order: (name, size, page size).
    pub blocks: Vec<(String, u64, u64)>,
    /// Capabilities both sides accepted.
    pub caps: u64,
    /// The source's certificate (TLS), hex: every resumed connection must present it.
    pub identity: Option<String>,
    /// The source's address, for the logs.
    pub peer: String,
    /// Pages and bytes that came with precopy.
    pub precopy_pages: u64,
    /// Bytes of them.
    pub precopy_bytes: u64,
    /// Restarts before this one.
    #[serde(default)]
    pub restarts: Vec<Restart>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    let bad = || Error::Invalid("the parked session record holds a malformed certificate".into());
    if s.len() % 2 != 0 {
        return Err(bad());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect()
}

/// The name under which a block's fd is parked (wire index `i`).
pub fn block_fd_name(i: usize) -> String {
    format!("block.{i}")
}

/// The name under which a block's ledger (its received and removed bitmaps) is parked (wire
/// index `i`).
pub fn ledger_fd_name(i: usize) -> String {
    format!("ledger.{i}")
}

/// The fds a dead broker parked for one block.
#[derive(Debug)]
pub struct ParkedBlockFds {
    /// The block's memfd or hugetlbfs fd ([`block_fd_name`]).
    pub block: OwnedFd,
    /// Its ledger ([`ledger_fd_name`]; None from a broker that parked none: the bitmaps are
    /// rebuilt from residency alone, and removals before the death are forgotten).
    pub ledger: Option<OwnedFd>,
}

/// The name under which the digest table's memfd is parked.
pub const DIGESTS_FD_NAME: &str = "digests";

/// What [`Destination::rebuild`] found.
#[derive(Debug, Clone, Copy)]
pub struct Rebuilt {
    /// Pages present in the parked blocks.
    pub pages_rebuilt: u64,
    /// Pages of all blocks.
    pub total_pages: u64,
}

impl Destination {
    /// The record to park once the session listens (None before: a broker that dies before
    /// postcopy cannot be resumed, the source starts over).
    pub fn record(&self) -> Option<SessionRecord> {
        self.broker.as_ref()?;
        let blocks = self.link.table.iter().map(|b| (b.name.clone(), b.size, b.page_size)).collect();
        Some(SessionRecord {
            version: RECORD_VERSION,
            session_id: self.link.session_id,
            blocks,
            caps: self.caps,
            identity: self.link.identity.as_deref().map(hex),
            peer: self.peer.to_string(),
            precopy_pages: self.precopy_pages,
            precopy_bytes: self.precopy_bytes,
            restarts: Vec::new(),
        })
    }

    /// The fds to park with the record, by name: every block's fd and ledger in wire order
    /// ([`block_fd_name`], [`ledger_fd_name`]) and the digest table's memfd
    /// ([`DIGESTS_FD_NAME`]).
    pub fn parkable(&self) -> Vec<(String, BorrowedFd<'_>)> {
        let blocks = self.incoming.blocks();
        let mut out: Vec<(String, BorrowedFd<'_>)> = Vec::new();
        for (i, &id) in self.ids.iter().enumerate() {
            let Some(b) = blocks.get(id) else { continue };
            out.extend(b.fd().map(|fd| (block_fd_name(i), fd)));
            out.extend(b.ledger_fd().map(|fd| (ledger_fd_name(i), fd)));
        }
        if let Some(fd) = self.net.digests.shared_fd() {
            out.push((DIGESTS_FD_NAME.into(), fd));
        }
        out
    }

    /// Rebuild the session of a broker that died during postcopy (see the module doc) from its
    /// `record`, its parked `blocks` fds and ledgers (wire order) and `digests` memfd; start the fault loop
    /// (its config from `opts.broker`, with `restart` set) with the source paused. Call
    /// [`Destination::finish`] next: it waits for the source's resume. `last_alive` is when the
    /// dead broker was last seen alive (for the downtime in the status).
    pub fn rebuild(
        listener: &TcpListener,
        security: &Security,
        record: &SessionRecord,
        blocks: Vec<ParkedBlockFds>,
        digests: OwnedFd,
        last_alive: Option<std::time::SystemTime>,
        opts: DestinationOptions,
    ) -> Result<(Destination, Rebuilt)> {
        if record.version != RECORD_VERSION {
            return Err(Error::Invalid(format!(
                "the parked session record has version {}, this broker reads {RECORD_VERSION}",
                record.version
            )));
        }
        if record.caps & CAP_RESUME == 0 {
            return Err(Error::Invalid(
                "the parked session did not accept CAP_RESUME: the source cannot resume it; start a new migration".into(),
            ));
        }
        if blocks.len() != record.blocks.len() {
            return Err(Error::Invalid(format!(
                "{} block fds were parked for the {} blocks of the session",
                blocks.len(),
                record.blocks.len()
            )));
        }
        let table = BlockTable::new(
            record.blocks.iter().map(|(n, s, p)| BlockInfo::new(n.clone(), *s, *p)).collect(),
        )
        .map_err(|e| Error::Invalid(format!("the parked block table: {e}")))?;
        let mut ram = RamBlocks::new();
        let mut present = 0;
        for ((name, size, ps), fds) in record.blocks.iter().zip(blocks) {
            let b = RamBlock::from_parked(name, fds.block, fds.ledger, *size, *ps)?;
            residency::mark_present(&b)?;
            present += b.received().count_ones() as u64;
            ram.add(b)?;
        }
        let total = ram.total_pages();
        log::info!("rebuilt session {:016x}: {present} of {total} pages are here", record.session_id);
        let mut incoming = Incoming::new(ram);
        incoming.relisten()?;
        let limits = GateLimits {
            handshake_timeout: opts.handshake_timeout,
            write_timeout: opts.write_timeout,
            ..GateLimits::default()
        };
        let gate = Gate::open(listener, security.clone(), limits)?;
        let identity = record.identity.as_deref().map(unhex).transpose()?;
        let link = Link {
            gate,
            session_id: record.session_id,
            table: table.clone(),
            caps: DESTINATION_CAPS,
            identity,
            max_streams: opts.max_streams,
        };
        let net = Arc::new(NetState::default());
        net.digests.set_blocks_shared(&table, Some(digests))?;
        let ids: Vec<usize> = (0..table.iter().len()).collect();
        let uffd = incoming
            .uffd()
            .cloned()
            .ok_or_else(|| Error::Invalid("the rebuilt incoming has no userfaultfd".into()))?;
        let mut src = NetworkSource::paused(
            uffd,
            Arc::clone(incoming.blocks()),
            ids.clone(),
            Arc::clone(incoming.state()),
            Arc::clone(&net),
            opts.stream_nice,
        )?;
        let resumer = src.resumer();
        net.pause("the destination broker restarted".into());
        let mut config = opts.broker.clone();
        config.background = false;
        let downtime_ms = last_alive
            .and_then(|t| t.elapsed().ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        config.restart = Some(Restart { downtime_ms, pages_rebuilt: present, ..Restart::default() });
        let h = Broker::spawn(&incoming, Box::new(src), config)?;
        let peer = record.peer.parse().unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let d = Destination {
            incoming,
            main: None,
            main_dec: None,
            urgent: None,
            ids,
            net,
            broker: Some(h),
            opts,
            started: Instant::now(),
            listen_at: Some(Instant::now()),
            precopy_pages: record.precopy_pages,
            precopy_bytes: record.precopy_bytes,
            peer,
            link,
            resumer: Some(resumer),
            caps: record.caps,
            handled_pauses: 0,
        };
        Ok((d, Rebuilt { pages_rebuilt: present, total_pages: total }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_survive_hex() {
        let c = vec![0u8, 1, 0xfe, 0xff, 0x10];
        assert_eq!(unhex(&hex(&c)).unwrap(), c);
        assert!(unhex("abc").is_err());
        assert!(unhex("zz").is_err());
    }
}
