//! The client registry (QEMU's PostCopyFD list): every process that maps guest RAM and handed
//! the broker its userfaultfd. A client has an id, a name, its uffd, its mapping table, its kind,
//! its pid (with a pidfd to notice its exit) and statistics.

mod mapping;
mod pagemap;
mod private;
mod removed;
mod repeat;

pub use mapping::{MappingEntry, MappingTable};
pub use pagemap::Pagemap;
pub use private::{PrivateRegion, PrivateTable};
pub use removed::RemovedRanges;
pub use repeat::RepeatGuard;

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

pub use crate::client_id::ClientId;
use crate::stats::{ClientStats, ClientStatus};
use crate::uffd::Uffd;

/// How pages reach a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKind {
    /// The client maps the shared RAM blocks: the broker places once through its own mapping
    /// and wakes the client.
    Shared,
    /// The client's memory is private (Firecracker): the broker places through the client's own
    /// userfaultfd, from the configured image file.
    Private,
}

/// Where a client's addresses lead.
#[derive(Debug, Clone)]
pub enum AddressMap {
    /// Shared RAM blocks.
    Shared(MappingTable),
    /// Private memory backed by an image file.
    Private(PrivateTable),
}

/// One registered client.
#[derive(Debug)]
pub struct Client {
    /// Id.
    pub id: ClientId,
    /// Name (idstr).
    pub name: String,
    /// Its userfaultfd.
    pub uffd: Uffd,
    /// Peer pid, when known.
    pub pid: Option<u32>,
    /// A pidfd of the peer, to notice its exit.
    pub pidfd: Option<OwnedFd>,
    /// Its addresses.
    pub map: AddressMap,
    /// Counters.
    pub stats: ClientStats,
    /// Its faults on pages that were already present.
    pub repeat: RepeatGuard,
}

impl Client {
    /// Shared or private.
    pub fn kind(&self) -> ClientKind {
        match self.map {
            AddressMap::Shared(_) => ClientKind::Shared,
            AddressMap::Private(_) => ClientKind::Private,
        }
    }

    /// Bytes the client maps.
    pub fn mapped_bytes(&self) -> u64 {
        match &self.map {
            AddressMap::Shared(t) => t.entries().iter().map(|e| e.len).sum(),
            AddressMap::Private(t) => t.regions().iter().map(|r| r.len).sum(),
        }
    }

    /// The status line of this client.
    pub fn status(&self) -> ClientStatus {
        ClientStatus {
            id: self.id,
            name: self.name.clone(),
            kind: match self.kind() {
                ClientKind::Shared => "shared".into(),
                ClientKind::Private => "private".into(),
            },
            pid: self.pid,
            mapped_bytes: self.mapped_bytes(),
            stats: self.stats.clone(),
            departure: None,
            uffd_copy_held: None,
        }
    }
}

/// The registered clients.
#[derive(Debug, Default)]
pub struct Registry {
    /// Looked up several times per fault: hashed with a cheap multiply-rotate hash.
    clients: HashMap<ClientId, Client, std::hash::BuildHasherDefault<crate::hasher::PageHasher>>,
    next: u64,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry { clients: HashMap::default(), next: 1 }
    }

    /// A fresh id.
    pub fn next_id(&mut self) -> ClientId {
        let id = ClientId(self.next);
        self.next += 1;
        id
    }

    /// Keep `id` (a client taken back after a restart) from being handed out again.
    pub fn reserve_id(&mut self, id: ClientId) {
        self.next = self.next.max(id.0 + 1);
    }

    /// Add a client (its id from [`Registry::next_id`]).
    pub fn insert(&mut self, c: Client) {
        self.clients.insert(c.id, c);
    }

    /// Remove a client.
    pub fn remove(&mut self, id: ClientId) -> Option<Client> {
        self.clients.remove(&id)
    }

    /// A client.
    pub fn get(&self, id: ClientId) -> Option<&Client> {
        self.clients.get(&id)
    }

    /// A client, mutable.
    pub fn get_mut(&mut self, id: ClientId) -> Option<&mut Client> {
        self.clients.get_mut(&id)
    }

    /// All clients.
    pub fn iter(&self) -> impl Iterator<Item = &Client> {
        self.clients.values()
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Ids of all clients.
    pub fn ids(&self) -> Vec<ClientId> {
        self.clients.keys().copied().collect()
    }
}
