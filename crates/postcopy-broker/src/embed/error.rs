//! [`EmbedError`]: what can go wrong while an embedded broker starts, serves and ends, each
//! saying what the embedder does about it. The underlying [`crate::Error`] is its source.

use std::time::Duration;

use crate::client_id::ClientId;
use crate::error::Error;

/// An error of the embedding API.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The builder was given no RAM block.
    #[error(
        "no RAM blocks: give the guest RAM with BrokerBuilder::block (or BrokerBuilder::guest_memory for \
         the VMM's own memory)"
    )]
    NoBlocks,
    /// The builder was given no page source.
    #[error(
        "no page source: give one with BrokerBuilder::source (a MemorySource, or your own PageSource) \
         or BrokerBuilder::image (a snapshot image of the blocks)"
    )]
    NoSource,
    /// The builder was given contradicting settings.
    #[error("{0}")]
    Config(String),
    /// The host (kernel, permissions, huge pages) cannot serve postcopy.
    #[error("this host cannot serve postcopy: {0}; `postcopy-broker probe` prints what is missing")]
    Host(#[source] Error),
    /// A step of starting postcopy failed (the blocks are given back to the kernel's care:
    /// nothing is registered any more).
    #[error("postcopy could not start: {step} failed: {source}")]
    Start {
        /// The step: advise, listen, spawn the fault loop, map guest memory...
        step: &'static str,
        /// Why.
        #[source]
        source: Error,
    },
    /// A vhost-user backend could not join (it was not registered; the others are unaffected).
    #[error("vhost-user backend {socket}: {source}")]
    Backend {
        /// The backend's socket.
        socket: String,
        /// Why.
        #[source]
        source: Error,
    },
    /// No vhost-user backend with this client id was registered through this broker.
    #[error("no vhost-user backend is client {0} of this broker (use the id register_vhost_user returned)")]
    UnknownBackend(ClientId),
    /// [`crate::embed::EmbeddedBroker::finish`] or [`crate::embed::EmbeddedBroker::stop`] was
    /// called already: the broker serves nothing any more.
    #[error("the broker has ended (finish or stop was called); start a new one to serve again")]
    Ended,
    /// The fault loop is gone: nothing serves faults any more.
    #[error("the fault loop is gone: {0}; the migration cannot finish: stop() the broker and fail it")]
    LoopDied(#[source] Error),
    /// Not every page arrived in time.
    #[error(
        "{received} of {total} pages arrived within {waited:?}: the page source is slow or gone; wait \
         again (the fill can be started with set_background), or stop() to give up"
    )]
    Timeout {
        /// Pages received.
        received: u64,
        /// Pages in all blocks.
        total: u64,
        /// How long was waited.
        waited: Duration,
    },
    /// [`crate::embed::EmbeddedBroker::finish`] before every page arrived.
    #[error(
        "only {received} of {total} pages have arrived: finish() only a complete migration (wait_complete \
         first), or stop() to give up on it"
    )]
    Incomplete {
        /// Pages received.
        received: u64,
        /// Pages in all blocks.
        total: u64,
    },
    /// Ending postcopy failed (the fault loop stopped; the first failure is reported).
    #[error("ending postcopy: {step} failed: {source}")]
    End {
        /// The step: stop the fault loop, POSTCOPY_END, cleanup.
        step: &'static str,
        /// Why.
        #[source]
        source: Error,
    },
}

/// Result of the embedding API.
pub type EmbedResult<T> = std::result::Result<T, EmbedError>;

/// Tag a failed start step.
pub(crate) fn at_start(step: &'static str) -> impl FnOnce(Error) -> EmbedError {
    move |source| EmbedError::Start { step, source }
}

/// Tag a failed end step.
pub(crate) fn at_end(step: &'static str) -> impl FnOnce(Error) -> EmbedError {
    move |source| EmbedError::End { step, source }
}
