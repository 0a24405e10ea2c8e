//! [`BrokerBuilder`]: what an embedded broker is made of (RAM blocks or the VMM's own guest
//! memory, a page source, the fault loop's configuration, vhost-user backends) and
//! [`BrokerBuilder::start`], the whole start of postcopy in the order it must happen.

use std::path::PathBuf;

use crate::embed::broker::EmbeddedBroker;
use crate::embed::error::{at_start, EmbedError, EmbedResult};
use crate::error::Error;
use crate::fault::{Broker, BrokerConfig};
use crate::incoming::Incoming;
use crate::ram::{RamBlock, RamBlocks};
use crate::source::{FileSource, PageSource};
#[cfg(feature = "vhost-user")]
use crate::vhost_user::BackendConn;

/// The name of the VMM's own mapping among the broker's clients (status, metrics).
#[cfg(feature = "vhost-user")]
const VMM_CLIENT: &str = "vmm";

/// A vhost-user backend to join at start.
#[cfg(feature = "vhost-user")]
#[derive(Debug)]
pub(crate) enum BackendSpec {
    /// Connect to this socket (and acknowledge VIRTIO_F_VERSION_1 only).
    Socket(PathBuf),
    /// A connection the VMM negotiated itself.
    Conn(BackendConn),
}

/// Where missing pages come from.
#[derive(Debug)]
enum Source {
    /// A page source of the embedder's.
    Given(Box<dyn PageSource>),
    /// A snapshot image of the blocks back to back, in block order.
    Image(PathBuf),
}

/// Builds an [`EmbeddedBroker`]: give it the guest RAM, a page source and, if wanted, settings;
/// [`BrokerBuilder::start`] does the rest.
#[derive(Debug, Default)]
pub struct BrokerBuilder {
    blocks: Vec<RamBlock>,
    source: Option<Source>,
    config: BrokerConfig,
    #[cfg(feature = "vhost-user")]
    client_name: Option<String>,
    #[cfg(feature = "vhost-user")]
    guest: Option<(vm_memory::GuestMemoryMmap, Vec<String>)>,
    #[cfg(feature = "vhost-user")]
    backends: Vec<BackendSpec>,
}

impl BrokerBuilder {
    /// Nothing yet; the background fill is off unless [`BrokerBuilder::background`] turns it on.
    pub fn new() -> BrokerBuilder {
        BrokerBuilder::default()
    }

    /// Add a RAM block (block ids follow the order of the calls; a [`MemorySource`] gives the
    /// contents in the same order). Names must be unique.
    ///
    /// [`MemorySource`]: crate::source::MemorySource
    pub fn block(mut self, block: RamBlock) -> BrokerBuilder {
        self.blocks.push(block);
        self
    }

    /// Where missing pages come from.
    pub fn source(mut self, source: impl PageSource + 'static) -> BrokerBuilder {
        self.source = Some(Source::Given(Box::new(source)));
        self
    }

    /// Where missing pages come from, boxed.
    pub fn boxed_source(mut self, source: Box<dyn PageSource>) -> BrokerBuilder {
        self.source = Some(Source::Given(source));
        self
    }

    /// Take missing pages from a snapshot image: the blocks back to back in block order (a
    /// [`FileSource`] over them; lazy restore).
    pub fn image(mut self, path: impl Into<PathBuf>) -> BrokerBuilder {
        self.source = Some(Source::Image(path.into()));
        self
    }

    /// The fault loop's whole configuration (control socket, grants, limits, background fill);
    /// it replaces what [`BrokerBuilder::background`] and [`BrokerBuilder::control_socket`] set
    /// before it. With `vhost-user`, the VMM's guest memory mapping is a registered client and
    /// counts towards `background_after_clients`.
    pub fn config(mut self, config: BrokerConfig) -> BrokerBuilder {
        self.config = config;
        self
    }

    /// Fill missing pages in the background from the start (off by default: then only the pages
    /// somebody faults on are fetched until [`EmbeddedBroker::set_background`] starts it).
    pub fn background(mut self, on: bool) -> BrokerBuilder {
        self.config.background = on;
        self
    }

    /// Also serve the control socket at `path`, for clients in other processes (pcb-client,
    /// other VMM processes, backends registered by their own frontends).
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> BrokerBuilder {
        self.config.control = Some(path.into());
        self
    }

    /// The name of the VMM's own mapping among the broker's clients (default `vmm`).
    #[cfg(feature = "vhost-user")]
    pub fn client_name(mut self, name: &str) -> BrokerBuilder {
        self.client_name = Some(name.to_string());
        self
    }

    /// Serve the VMM's own guest memory: one RAM block per region, named by `names` in address
    /// order. Each region must be a shared mapping of a whole file of its own (a memfd,
    /// hugetlbfs or tmpfs file, mapped from offset 0): the broker maps the same file to place
    /// pages, and registers the VMM's mapping as its client. Instead of [`BrokerBuilder::block`].
    /// The VMM must not touch the memory from [`BrokerBuilder::start`] until it returns.
    #[cfg(feature = "vhost-user")]
    pub fn guest_memory(mut self, memory: vm_memory::GuestMemoryMmap, names: Vec<String>) -> BrokerBuilder {
        self.guest = Some((memory, names));
        self
    }

    /// Join the vhost-user backend listening on `socket` at start: connected before the probe
    /// (a backend without PAGEFAULT vetoes postcopy before any page is touched), then taken
    /// through the postcopy handshake and registered with the broker's blocks.
    #[cfg(feature = "vhost-user")]
    pub fn vhost_user_backend(mut self, socket: impl Into<PathBuf>) -> BrokerBuilder {
        self.backends.push(BackendSpec::Socket(socket.into()));
        self
    }

    /// Like [`BrokerBuilder::vhost_user_backend`] for a connection the VMM negotiated itself
    /// (device features acknowledged); get it back with [`EmbeddedBroker::backend_mut`] to set its
    /// vrings up, and from [`EmbeddedBroker::finish`].
    #[cfg(feature = "vhost-user")]
    pub fn vhost_user_frontend(mut self, conn: BackendConn) -> BrokerBuilder {
        self.backends.push(BackendSpec::Conn(conn));
        self
    }

    /// Start postcopy: probe the host (and let backends veto), discard every page (advise),
    /// register the blocks with the broker's userfaultfd (listen), spawn the fault loop, map and
    /// register the VMM's guest memory, join the backends, and let the guest run. On an error
    /// everything done so far is undone.
    pub fn start(self) -> EmbedResult<EmbeddedBroker> {
        let source = self.source.ok_or(EmbedError::NoSource)?;
        let mut blocks = RamBlocks::new();
        #[cfg(feature = "vhost-user")]
        let mut vmm_ram = None;
        #[cfg(feature = "vhost-user")]
        if let Some((memory, names)) = self.guest {
            if !self.blocks.is_empty() {
                return Err(EmbedError::Config(
                    "give the guest RAM either as blocks (BrokerBuilder::block) or as the VMM's memory \
                     (BrokerBuilder::guest_memory), not both"
                        .into(),
                ));
            }
            let (b, ram) = super::guest::blocks_of_memory(memory, names)?;
            blocks = b;
            vmm_ram = Some(ram);
        }
        for b in self.blocks {
            blocks.add(b).map_err(|e| EmbedError::Config(e.to_string()))?;
        }
        if blocks.is_empty() {
            return Err(EmbedError::NoBlocks);
        }
        let source = match source {
            Source::Given(s) => s,
            Source::Image(path) => {
                Box::new(FileSource::open(&path, &blocks).map_err(at_start("open the image"))?)
            }
        };
        let mut incoming = Incoming::new(blocks);
        #[cfg(feature = "vhost-user")]
        let backends = super::backends::connect(self.backends, incoming.notifiers_mut())?;
        incoming.probe().map_err(|e| match e {
            e @ Error::Notifier { .. } => {
                EmbedError::Start { step: "probe (a notifier vetoed postcopy)", source: e }
            }
            e => EmbedError::Host(e),
        })?;
        incoming.advise().map_err(at_start("advise (discard every page)"))?;
        incoming.listen().map_err(at_start("listen (register the blocks with the broker's userfaultfd)"))?;
        let handle = match Broker::spawn(&incoming, source, self.config) {
            Ok(h) => h,
            Err(source) => {
                cleanup_quietly(&mut incoming);
                return Err(EmbedError::Start { step: "spawn the fault loop", source });
            }
        };
        #[cfg(feature = "vhost-user")]
        let vmm = {
            let name = self.client_name.as_deref().unwrap_or(VMM_CLIENT);
            match super::guest::register_vmm(&handle, incoming.blocks(), vmm_ram, name) {
                Ok(v) => v,
                Err(source) => {
                    abort(incoming, handle);
                    return Err(EmbedError::Start {
                        step: "map and register the VMM's guest memory",
                        source,
                    });
                }
            }
        };
        // From here on the broker's drop undoes the start.
        let mut broker = EmbeddedBroker::new(
            incoming,
            handle,
            #[cfg(feature = "vhost-user")]
            vmm,
        );
        #[cfg(feature = "vhost-user")]
        for conn in backends {
            broker.register_vhost_user(conn)?;
        }
        broker.running()?;
        Ok(broker)
    }
}

/// Undo a start that failed before the broker owned the loop.
#[cfg(feature = "vhost-user")]
fn abort(mut incoming: Incoming, handle: crate::fault::BrokerHandle) {
    if let Err(e) = handle.stop() {
        log::warn!("stopping the fault loop after a failed start: {e}");
    }
    cleanup_quietly(&mut incoming);
}

fn cleanup_quietly(incoming: &mut Incoming) {
    if let Err(e) = incoming.cleanup() {
        log::warn!("cleanup after a failed start: {e}");
    }
}
