//! The control protocol's messages: requests, responses and error codes. Plain serde types with
//! no broker internals, so other tools can reuse them (Firecracker's handshake regions are in
//! `control::firecracker`).
//!
//! Every message is a JSON object tagged by `"op"` (snake_case). See docs/control-protocol.md.

use serde::{Deserialize, Serialize};

/// The protocol version carried in the frame magic (`PCB1`) and in `hello`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The broker's software version, reported in `hello_ok`.
pub const BROKER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Error codes sent in [`Response::Error`]. Clients must treat unknown codes as generic failures.
pub mod code {
    /// The byte stream is not made of our frames (wrong magic, truncated frame, data after a
    /// Firecracker handshake).
    pub const BAD_FRAME: &str = "bad-frame";
    /// A frame or a Firecracker handshake longer than 64 KiB.
    pub const TOO_LARGE: &str = "too-large";
    /// The payload is not valid JSON or does not match the message's fields.
    pub const BAD_JSON: &str = "bad-json";
    /// The `op` is not known to this protocol version.
    pub const UNKNOWN_OP: &str = "unknown-op";
    /// The message needs file descriptors that did not come with it.
    pub const MISSING_FD: &str = "missing-fd";
    /// More file descriptors came with the message than it may carry.
    pub const TOO_MANY_FDS: &str = "too-many-fds";
    /// The peer speaks a protocol version the broker does not.
    pub const VERSION: &str = "version";
    /// The request was well formed but the broker refused it (the message says why).
    pub const REFUSED: &str = "refused";
    /// The peer's uid is not in the broker's allowed list.
    pub const NOT_ALLOWED: &str = "not-allowed";
    /// The broker failed internally while serving a valid request.
    pub const INTERNAL: &str = "internal";
}

/// How the broker serves a client's faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientKind {
    /// The client maps the broker's shared block memory: the broker places pages once through its
    /// own mapping and wakes the client's faulting threads.
    Shared,
    /// The client's memory is its own (private): the broker places pages through the client's
    /// userfaultfd.
    Private,
}

/// One range of a client's address space that shows part of a RAM block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingSpec {
    /// Start address in the client's address space.
    pub client_addr: u64,
    /// Name of the RAM block.
    pub block: String,
    /// Offset in the block.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A RAM block as described to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    /// Block name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Index of the block's fd among the fds that came with the reply; `None` when no fd was sent
    /// (ask again for that block by name).
    #[serde(default)]
    pub fd_index: Option<u32>,
}

/// A request from a client to the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Introduce the peer and check the protocol version. Optional but recommended first message.
    Hello {
        /// The peer's protocol version.
        version: u32,
        /// A free-form peer name for logs and status.
        name: String,
    },
    /// Register a userfaultfd (exactly one fd with the message) and its mapping table.
    Register {
        /// The client's name (idstr) for logs and status.
        name: String,
        /// Shared or private memory.
        kind: ClientKind,
        /// The process that owns the uffd, if not the peer itself (default: the peer's pid).
        #[serde(default)]
        pid: Option<u32>,
        /// The client's mapping table.
        mappings: Vec<MappingSpec>,
        /// Thread ids (in the client's pid namespace) of its vCPU threads, for the postcopy
        /// blocktime metrics; the uffd must then have UFFD_FEATURE_THREAD_ID.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        vcpu_tids: Vec<u32>,
    },
    /// Forget a client registered earlier.
    Unregister {
        /// The id returned by `registered`.
        client: u64,
    },
    /// After the broker restarted: make this connection the owner of clients registered over a
    /// connection of the broker that died (taken back from the fd store), so that they hear
    /// `postcopy_end` here.
    Reattach {
        /// The ids returned by `registered`.
        clients: Vec<u64>,
    },
    /// Ask for RAM blocks and their memfds.
    GetBlocks {
        /// Only these blocks; all blocks if `None`.
        #[serde(default)]
        names: Option<Vec<String>>,
    },
    /// Ask for the broker's status report.
    Status,
    /// Source page server only: hand over the guest RAM, one memfd per block (in order, at
    /// most 8 per message) before the migration starts.
    ProvideBlocks {
        /// The blocks, in wire order; block i is the i-th fd.
        blocks: Vec<BlockSpec>,
    },
    /// Source page server only: these bytes changed after they were sent; discard them on the
    /// destination and send them again.
    Dirty {
        /// Block name.
        block: String,
        /// Offset in the block.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Source page server only: start postcopy now (the guest moves to the destination).
    StartPostcopy,
}

/// A block handed to the source page server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSpec {
    /// Unique name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Page size in bytes.
    pub page_size: u64,
}

/// The `op` values of [`Request`], for telling an unknown op from a malformed message.
pub const REQUEST_OPS: &[&str] = &[
    "hello",
    "register",
    "unregister",
    "reattach",
    "get_blocks",
    "status",
    "provide_blocks",
    "dirty",
    "start_postcopy",
];

impl Request {
    /// The request's `op` string.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Register { .. } => "register",
            Request::Unregister { .. } => "unregister",
            Request::Reattach { .. } => "reattach",
            Request::GetBlocks { .. } => "get_blocks",
            Request::Status => "status",
            Request::ProvideBlocks { .. } => "provide_blocks",
            Request::Dirty { .. } => "dirty",
            Request::StartPostcopy => "start_postcopy",
        }
    }

    /// How many file descriptors must come with this request.
    pub fn expected_fds(&self) -> usize {
        match self {
            Request::Register { .. } => 1,
            Request::ProvideBlocks { blocks } => blocks.len(),
            _ => 0,
        }
    }
}

/// A message from the broker. Every request gets exactly one response, in order; the one
/// notification, [`Response::PostcopyEnd`], comes unasked, between responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Response {
    /// Reply to `hello`.
    HelloOk {
        /// The broker's protocol version.
        version: u32,
        /// The broker's software version.
        broker_version: String,
    },
    /// Reply to `register`.
    Registered {
        /// The new client's id.
        client: u64,
    },
    /// Success without data (reply to `unregister`).
    Ok,
    /// Reply to `get_blocks`; the blocks' fds come with the frame.
    Blocks {
        /// The blocks asked for.
        blocks: Vec<BlockInfo>,
    },
    /// Reply to `status`.
    Status {
        /// The broker's report (content defined by the broker).
        report: serde_json::Value,
    },
    /// Notification, not a response: the migration is complete (every page is present); the
    /// peer must unregister these clients' ranges from their userfaultfds (UFFDIO_UNREGISTER),
    /// close them and send `unregister` (docs/control-protocol.md).
    PostcopyEnd {
        /// The peer's clients that the broker stops serving.
        clients: Vec<u64>,
    },
    /// Any request can fail with an error.
    Error {
        /// One of [`code`].
        code: String,
        /// What went wrong and what to do about it.
        message: String,
    },
}

impl Response {
    /// An error response.
    pub fn error(code: &str, message: impl Into<String>) -> Response {
        Response::Error { code: code.to_string(), message: message.into() }
    }

    /// The broker's reply to `hello` from a peer speaking `peer_version`: `hello_ok`, or an error
    /// with code `version` when the versions differ.
    pub fn hello_reply(peer_version: u32) -> Response {
        if peer_version == PROTOCOL_VERSION {
            Response::HelloOk { version: PROTOCOL_VERSION, broker_version: BROKER_VERSION.to_string() }
        } else {
            Response::error(
                code::VERSION,
                format!(
                    "this broker speaks control protocol version {PROTOCOL_VERSION}, the peer speaks \
                     {peer_version}; use a client built for version {PROTOCOL_VERSION}"
                ),
            )
        }
    }
}

/// The `status` response around a report the sender borrows: the same JSON as
/// [`Response::Status`], serialized in one pass (a busy broker answers many of these).
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename = "status")]
pub struct StatusReply<'a, T: Serialize> {
    /// The report.
    pub report: &'a T,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_by_op() {
        let r = Request::Register {
            name: "vm".into(),
            kind: ClientKind::Shared,
            pid: None,
            mappings: vec![MappingSpec { client_addr: 0x1000, block: "ram0".into(), offset: 0, len: 4096 }],
            vcpu_tids: vec![41, 42],
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["op"], "register");
        assert_eq!(v["kind"], "shared");
        assert_eq!(serde_json::from_value::<Request>(v).unwrap(), r);
        let s: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(s, Request::Status);
        let g: Request = serde_json::from_str(r#"{"op":"get_blocks"}"#).unwrap();
        assert_eq!(g, Request::GetBlocks { names: None });
        for op in REQUEST_OPS {
            assert!([
                Request::Hello { version: 1, name: String::new() },
                r.clone(),
                Request::Unregister { client: 1 },
                Request::Reattach { clients: vec![] },
                g.clone(),
                s.clone(),
                Request::ProvideBlocks { blocks: vec![] },
                Request::Dirty { block: String::new(), offset: 0, len: 0 },
                Request::StartPostcopy,
            ]
            .iter()
            .any(|q| q.op() == *op));
        }
    }

    #[test]
    fn responses_round_trip() {
        let all = [
            Response::hello_reply(PROTOCOL_VERSION),
            Response::Registered { client: 7 },
            Response::Ok,
            Response::Blocks {
                blocks: vec![BlockInfo { name: "a".into(), size: 8192, page_size: 4096, fd_index: Some(0) }],
            },
            Response::Status { report: serde_json::json!({"x": 1}) },
            Response::error(code::REFUSED, "no"),
        ];
        for r in all {
            let s = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), r);
        }
        assert!(matches!(Response::hello_reply(2), Response::Error { code, .. } if code == code::VERSION));
    }

    #[test]
    fn a_borrowed_status_reply_is_a_status_response() {
        let report = serde_json::json!({"state": "serving", "n": [1, 2]});
        let s = serde_json::to_string(&StatusReply { report: &report }).unwrap();
        assert_eq!(s, serde_json::to_string(&Response::Status { report: report.clone() }).unwrap());
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), Response::Status { report });
    }
}
