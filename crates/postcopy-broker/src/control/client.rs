//! The blocking client of the control socket, for test peers, the guest-side driver and the CLI.
//! It keeps the broker's `postcopy_end` notification aside when it comes between responses
//! ([`ControlClient::postcopy_ended`], [`ControlClient::wait_postcopy_end`]).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::error::ControlError;
use super::fdpass::{recv_with_fds, send_all};
use super::frame::{encode, encode_message, Frame, FrameDecoder, MAX_FDS};
use super::message::decode_response;
use super::protocol::{BlockInfo, ClientKind, MappingSpec, Request, Response, PROTOCOL_VERSION};
use crate::client_id::ClientId;

/// How long the client waits for a reply by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the broker said in `hello_ok`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerHello {
    /// The broker's protocol version.
    pub version: u32,
    /// The broker's software version.
    pub broker_version: String,
}

/// A blocking connection to the broker's control socket.
#[derive(Debug)]
pub struct ControlClient {
    stream: UnixStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    /// The clients of a `postcopy_end` notification, once one came.
    ended: Option<Vec<ClientId>>,
}

impl AsFd for ControlClient {
    /// The connection, to poll for the broker's notification.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl ControlClient {
    /// Connect to the control socket at `path` (replies time out after [`DEFAULT_TIMEOUT`]).
    pub fn connect(path: impl AsRef<Path>) -> Result<ControlClient, ControlError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|e| {
            ControlError::io(
                format!(
                    "connecting to the broker's control socket {} (is the broker running?)",
                    path.display()
                ),
                e,
            )
        })?;
        let mut c = ControlClient::from_stream(stream);
        c.set_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(c)
    }

    /// Wrap an already connected stream.
    pub fn from_stream(stream: UnixStream) -> ControlClient {
        ControlClient { stream, decoder: FrameDecoder::new(), buf: vec![0u8; 64 * 1024], ended: None }
    }

    /// Set how long to wait for a reply (`None`: forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ControlError> {
        self.stream.set_read_timeout(timeout).map_err(|e| ControlError::io("setting the reply timeout", e))
    }

    /// Send one request with `fds` and wait for its response (an `error` response is returned as
    /// is, not as `Err`).
    pub fn request(
        &mut self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Response, Vec<OwnedFd>), ControlError> {
        if fds.len() > MAX_FDS {
            return Err(ControlError::Invalid(format!(
                "at most {MAX_FDS} fds per message, got {}",
                fds.len()
            )));
        }
        let frame = encode_message(req)?;
        self.send_raw(&frame, fds)?;
        self.recv_response()
    }

    /// Send raw bytes (one frame or anything else) with `fds`. If the broker already closed the
    /// connection, this still succeeds when its last reply can be read: call
    /// [`Self::recv_response`] next.
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ControlError> {
        match send_all(self.stream.as_fd(), bytes, fds, false) {
            Ok(()) => Ok(()),
            // The broker replied with an error and closed before reading everything: the reply
            // is still waiting in our receive queue.
            Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {
                Ok(())
            }
            Err(e) => Err(ControlError::io("sending to the broker", e)),
        }
    }

    /// Encode `payload` as one frame and send it (for peers that build their own JSON).
    pub fn send_payload(&mut self, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ControlError> {
        let frame = encode(payload)?;
        self.send_raw(&frame, fds)
    }

    /// Wait for the next response and the fds that came with it (a `postcopy_end` notification
    /// on the way is kept: [`Self::postcopy_ended`]).
    pub fn recv_response(&mut self) -> Result<(Response, Vec<OwnedFd>), ControlError> {
        loop {
            match self.recv_message()? {
                (Response::PostcopyEnd { clients }, _) => self.ended = Some(ids(clients)),
                other => return Ok(other),
            }
        }
    }

    /// The clients of the broker's `postcopy_end` notification, if one came with a response.
    pub fn postcopy_ended(&self) -> Option<&[ClientId]> {
        self.ended.as_deref()
    }

    /// Wait (within the reply timeout) for the broker's `postcopy_end` notification, with no
    /// request outstanding; returns the clients it names. Then the peer must unregister those
    /// clients' ranges from their userfaultfds, close them, and send `unregister` for each.
    pub fn wait_postcopy_end(&mut self) -> Result<Vec<ClientId>, ControlError> {
        if let Some(c) = &self.ended {
            return Ok(c.clone());
        }
        match self.recv_message()? {
            (Response::PostcopyEnd { clients }, _) => {
                let clients = ids(clients);
                self.ended = Some(clients.clone());
                Ok(clients)
            }
            (other, _) => Err(unexpected("postcopy_end", &other)),
        }
    }

    /// The next message of the broker, a response or the notification.
    fn recv_message(&mut self) -> Result<(Response, Vec<OwnedFd>), ControlError> {
        loop {
            if let Some(Frame { payload, fds }) = self.decoder.next_frame()? {
                return Ok((decode_response(&payload)?, fds));
            }
            let r = match recv_with_fds(self.stream.as_fd(), &mut self.buf, false) {
                Ok(r) => r,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(ControlError::io(
                        "waiting for the broker's reply",
                        io::Error::new(io::ErrorKind::TimedOut, "no reply in time; is the broker stuck?"),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(ControlError::PeerClosed),
                Err(e) => return Err(ControlError::io("reading the broker's reply", e)),
            };
            if r.bytes == 0 {
                self.decoder.finish()?;
                return Err(ControlError::PeerClosed);
            }
            if r.fds_truncated {
                return Err(ControlError::TooManyFds {
                    op: "reply".into(),
                    max: MAX_FDS,
                    got: r.fds.len() + 1,
                });
            }
            self.decoder.push(&self.buf[..r.bytes], r.fds);
        }
    }

    /// Send a request and turn an `error` response into `Err(ControlError::Remote)`.
    fn call(
        &mut self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Response, Vec<OwnedFd>), ControlError> {
        match self.request(req, fds)? {
            (Response::Error { code, message }, _) => Err(ControlError::Remote { code, message }),
            other => Ok(other),
        }
    }

    /// Say hello and check the protocol version.
    pub fn hello(&mut self, name: &str) -> Result<BrokerHello, ControlError> {
        let req = Request::Hello { version: PROTOCOL_VERSION, name: name.to_string() };
        match self.call(&req, &[])?.0 {
            Response::HelloOk { version, broker_version } => Ok(BrokerHello { version, broker_version }),
            other => Err(unexpected("hello_ok", &other)),
        }
    }

    /// Register `uffd` with its mapping table; returns the client id.
    pub fn register(
        &mut self,
        name: &str,
        kind: ClientKind,
        pid: Option<u32>,
        mappings: &[MappingSpec],
        uffd: BorrowedFd<'_>,
    ) -> Result<ClientId, ControlError> {
        self.register_with_vcpus(name, kind, pid, mappings, &[], uffd)
    }

    /// Like [`ControlClient::register`], declaring the thread ids of the client's vCPU threads
    /// for the blocktime metrics (`uffd` must have UFFD_FEATURE_THREAD_ID).
    pub fn register_with_vcpus(
        &mut self,
        name: &str,
        kind: ClientKind,
        pid: Option<u32>,
        mappings: &[MappingSpec],
        vcpu_tids: &[u32],
        uffd: BorrowedFd<'_>,
    ) -> Result<ClientId, ControlError> {
        let req = Request::Register {
            name: name.to_string(),
            kind,
            pid,
            mappings: mappings.to_vec(),
            vcpu_tids: vcpu_tids.to_vec(),
        };
        match self.call(&req, &[uffd])?.0 {
            Response::Registered { client } => Ok(ClientId(client)),
            other => Err(unexpected("registered", &other)),
        }
    }

    /// Unregister a client.
    pub fn unregister(&mut self, client: ClientId) -> Result<(), ControlError> {
        match self.call(&Request::Unregister { client: client.0 }, &[])?.0 {
            Response::Ok => Ok(()),
            other => Err(unexpected("ok", &other)),
        }
    }

    /// The RAM blocks (all, or those named) and their fds. A reply carries at most 8 fds; blocks
    /// that came without one are asked for again by name, 8 at a time. A block that still has no
    /// fd is returned with `None`.
    pub fn get_blocks(
        &mut self,
        names: Option<Vec<String>>,
    ) -> Result<Vec<(BlockInfo, Option<OwnedFd>)>, ControlError> {
        let mut out = self.get_blocks_once(names)?;
        let missing: Vec<usize> =
            out.iter().enumerate().filter(|(_, (_, f))| f.is_none()).map(|(i, _)| i).collect();
        for chunk in missing.chunks(MAX_FDS) {
            let names: Vec<String> = chunk.iter().map(|&i| out[i].0.name.clone()).collect();
            for (info, fd) in self.get_blocks_once(Some(names))? {
                if let Some(slot) = chunk.iter().find(|&&i| out[i].0.name == info.name) {
                    out[*slot] = (info, fd);
                }
            }
        }
        Ok(out)
    }

    fn get_blocks_once(
        &mut self,
        names: Option<Vec<String>>,
    ) -> Result<Vec<(BlockInfo, Option<OwnedFd>)>, ControlError> {
        let (resp, fds) = self.call(&Request::GetBlocks { names }, &[])?;
        let blocks = match resp {
            Response::Blocks { blocks } => blocks,
            other => return Err(unexpected("blocks", &other)),
        };
        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut out = Vec::with_capacity(blocks.len());
        for b in blocks {
            let fd = match b.fd_index {
                None => None,
                Some(i) => match fds.get_mut(i as usize).and_then(Option::take) {
                    Some(fd) => Some(fd),
                    None => {
                        return Err(ControlError::UnexpectedReply {
                            expected: "a valid fd_index",
                            got: format!("block '{}' fd_index {i} with {} fds", b.name, fds.len()),
                        })
                    }
                },
            };
            out.push((b, fd));
        }
        Ok(out)
    }

    /// After the broker restarted (this connection's predecessor got EOF): tell the new broker
    /// that this connection now speaks for `clients` (the ids `register` returned), so that
    /// `postcopy_end` comes here. Refused when the broker did not take them back (it ran without
    /// an fd store): then they are not served (docs/control-protocol.md).
    pub fn reattach(&mut self, clients: &[ClientId]) -> Result<(), ControlError> {
        let clients = clients.iter().map(|c| c.0).collect();
        match self.call(&Request::Reattach { clients }, &[])?.0 {
            Response::Ok => Ok(()),
            other => Err(unexpected("ok", &other)),
        }
    }

    /// The broker's status report.
    pub fn status(&mut self) -> Result<serde_json::Value, ControlError> {
        match self.call(&Request::Status, &[])?.0 {
            Response::Status { report } => Ok(report),
            other => Err(unexpected("status", &other)),
        }
    }
}

fn unexpected(expected: &'static str, got: &Response) -> ControlError {
    let got = serde_json::to_value(got)
        .ok()
        .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_string))
        .unwrap_or_else(|| "an unreadable reply".into());
    ControlError::UnexpectedReply { expected, got }
}
/// Client ids as the wire carries them (plain numbers), typed.
fn ids(wire: Vec<u64>) -> Vec<ClientId> {
    wire.into_iter().map(ClientId).collect()
}
