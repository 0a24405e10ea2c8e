//! The broker's one error type. Every variant says what went wrong and what to do about it.

use std::io;

use crate::notify::{NotifierRefused, NotifyReason};
use crate::state::{IllegalTransition, PostcopyState};

/// The error of an upper layer (migration, control socket, vhost-user) carried by a variant of
/// [`Error`]: this module is below them and does not name their types. Each of them converts
/// its own error with a `From` impl beside it; `downcast_ref` gets the typed error back.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias for the broker.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the broker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A RAM block size that is zero or not a multiple of its page size.
    #[error("RAM block '{block}': size {size} is not a positive multiple of its page size {page_size}; round the size up to a whole number of pages")]
    InvalidSize {
        /// Block name.
        block: String,
        /// Requested size in bytes.
        size: u64,
        /// Page size of the block.
        page_size: u64,
    },
    /// A page size the host or the broker cannot use.
    #[error("page size {page_size} is not supported here ({why}); use 4096 (memfd/file) or a huge page size listed by `postcopy-broker probe`")]
    UnsupportedPageSize {
        /// The page size asked for.
        page_size: u64,
        /// Why it cannot be used.
        why: String,
    },
    /// A block name that is not registered.
    #[error("no RAM block named '{0}'; `postcopy-broker status` lists the blocks")]
    UnknownBlock(String),
    /// A block name used twice.
    #[error("a RAM block named '{0}' exists already; block names must be unique")]
    DuplicateBlock(String),
    /// A byte range outside a block, or not page aligned.
    #[error("RAM block '{block}': range offset {offset} length {len} is {why} (block size {size}, page size {page_size})")]
    BadRange {
        /// Block name.
        block: String,
        /// Offset in the block.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Block size.
        size: u64,
        /// Block page size.
        page_size: u64,
        /// "out of range" or "not page aligned".
        why: &'static str,
    },
    /// An address that lies in no RAM block.
    #[error("address {0:#x} is in no RAM block")]
    UnknownAddress(u64),
    /// userfaultfd cannot be used on this host.
    #[error("userfaultfd is not available: {0}")]
    UffdUnavailable(String),
    /// A state change that the postcopy state machine does not allow.
    #[error("illegal postcopy state transition from {from} to {to}")]
    IllegalTransition {
        /// Current state.
        from: PostcopyState,
        /// Requested state.
        to: PostcopyState,
    },
    /// A notifier vetoed a step.
    #[error("notifier '{name}' refused {reason}: {message}")]
    Notifier {
        /// Notifier name.
        name: String,
        /// The reason being notified.
        reason: NotifyReason,
        /// The notifier's own error text.
        message: String,
    },
    /// A page that someone filled behind the broker's back (EEXIST on a never-placed page).
    #[error("RAM block '{block}' offset {offset:#x}: page was populated by someone other than the broker (EEXIST before placement); shared RAM was touched through an unregistered mapping")]
    ForeignPage {
        /// Block name.
        block: String,
        /// Page offset.
        offset: u64,
    },
    /// The huge page pool cannot promise a hugetlbfs block its pages.
    #[error("RAM block '{block}' cannot reserve its huge pages: {why}")]
    HugePagePool {
        /// Block name.
        block: String,
        /// How many pages are missing and how to reserve them.
        why: String,
    },
    /// A client whose mapped range of a block holds pages the broker never placed: it (or
    /// someone) populated shared RAM before its userfaultfd was registered, so those pages would
    /// never fault and every process would read zeros there instead of the source's data.
    #[error("client '{client}' refused: {pages} page(s) of RAM block '{block}' it maps were populated before its userfaultfd could catch them (mlock/mlockall, MAP_POPULATE or a prefault of guest RAM fills shared pages with zeros that never fault, and the source's data there would be lost); they were dropped again. Start the process without locking or prefaulting guest memory (dpdk-testpmd: --no-mlockall; QEMU-style VMMs: munlockall() before postcopy; no MAP_POPULATE on guest RAM) and register it again")]
    Prefaulted {
        /// The client's name.
        client: String,
        /// Block name.
        block: String,
        /// Pages found (a lower bound on hugetlbfs blocks, whose holes cannot be listed).
        pages: u64,
    },
    /// An fd handed in as a client's userfaultfd that is something else.
    #[error("client '{client}': the fd handed in as its userfaultfd is not one (it is {what}); pass the fd that userfaultfd(2) or /dev/userfaultfd returned, after UFFDIO_API and UFFDIO_REGISTER")]
    NotAUserfaultfd {
        /// The client's name.
        client: String,
        /// What the fd is.
        what: String,
    },
    /// The fault loop's thread ended on its own: nobody is served any more.
    #[error("the fault loop died: {0}; no client is served any more (the broker's log says why)")]
    LoopDied(String),
    /// A placement failed for a local reason (the kernel refused the ioctl, memory ran out):
    /// reconnecting to the source cannot mend it.
    #[error("placing pages failed on this host: {0}")]
    Placement(Box<Error>),
    /// Data of the wrong length handed to placement.
    #[error("placement of {got} bytes at block '{block}' needs a whole number of {page_size}-byte pages")]
    BadPageData {
        /// Block name.
        block: String,
        /// Bytes given.
        got: usize,
        /// Block page size.
        page_size: u64,
    },
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What the broker was doing.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A vhost-user request to a backend failed.
    #[error("vhost-user {op} with the backend at {socket} failed: {source}; check that the backend is running and speaks vhost-user (its log says why it refused)")]
    VhostUser {
        /// The request or step that failed.
        op: String,
        /// The backend's socket path (or a description of the peer).
        socket: String,
        /// The vhost crate's error (`vhost::Error`; the vhost_user module builds this variant).
        #[source]
        source: BoxError,
    },
    /// A vhost-user backend lacks a feature an operation needs.
    #[error("the vhost-user backend at {socket} does not offer {feature}, which {why}")]
    BackendFeature {
        /// The backend's socket path.
        socket: String,
        /// The missing feature.
        feature: &'static str,
        /// What needs it and what to do.
        why: &'static str,
    },
    /// A virtqueue request the device completed with an error, or a device that misbehaved.
    #[error("virtio device: {0}")]
    Device(String),
    /// Invalid input that fits no other variant.
    #[error("{0}")]
    Invalid(String),
    /// A migration wire frame that could not be encoded, decoded or transported.
    #[error("migration stream: {0}")]
    Wire(#[source] BoxError),
    /// Migration peer authentication failed (or its key file cannot be used).
    #[error(transparent)]
    Auth(BoxError),
    /// The protection of a migration connection (TLS, pre-shared key) failed or cannot be set up.
    #[error(transparent)]
    Transport(BoxError),
    /// The pages that arrived are not the pages the source sent.
    #[error("migration failed: {0}")]
    Digest(#[source] BoxError),
    /// A control socket failure (a `control::ControlError`).
    #[error("control socket: {0}")]
    Control(#[source] BoxError),
}

impl From<IllegalTransition> for Error {
    fn from(e: IllegalTransition) -> Error {
        Error::IllegalTransition { from: e.from, to: e.to }
    }
}

impl From<NotifierRefused> for Error {
    fn from(e: NotifierRefused) -> Error {
        Error::Notifier { name: e.name, reason: e.reason, message: e.message }
    }
}

impl Error {
    /// Wrap an I/O error with what the broker was doing.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }
}

/// Attach context to an `io::Result`.
pub trait IoContext<T> {
    /// Map the error to [`Error::Io`] with `context`.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), io::Error::from(e)))
    }
}
