//! Turning decoded frames into typed messages: JSON parsing, unknown-op detection, and the check
//! that each message came with exactly the fds it may carry (extra fds are closed by dropping).
//! [`RequestDecoder`] is the server side of a connection: frames in, requests out.

use std::os::fd::{BorrowedFd, OwnedFd};

use super::error::ControlError;
use super::frame::{Frame, FrameDecoder};
use super::protocol::{Request, Response, REQUEST_OPS};

/// A message received by the server on a control connection.
#[derive(Debug)]
pub enum Incoming {
    /// A request and exactly the fds it needs ([`Request::expected_fds`]).
    Request(Request, Vec<OwnedFd>),
    /// Firecracker's UFFD handshake: its regions and its userfaultfd. Nothing else follows on that
    /// connection; its end of file is normal and does not end the client.
    #[cfg(feature = "firecracker")]
    Firecracker(Vec<super::firecracker::FcRegion>, OwnedFd),
}

/// The decoder of a server connection: our requests, and with the `firecracker` feature also
/// Firecracker's handshake in their place.
#[cfg(feature = "firecracker")]
pub type ServerDecoder = super::firecracker::ServerDecoder;
/// The decoder of a server connection: our requests.
#[cfg(not(feature = "firecracker"))]
pub type ServerDecoder = RequestDecoder;

/// Parse a request payload and check its fds.
pub fn decode_request(payload: &[u8], fds: Vec<OwnedFd>) -> Result<Incoming, ControlError> {
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| ControlError::BadJson(e.to_string()))?;
    let op = match value.get("op") {
        Some(serde_json::Value::String(op)) => op.clone(),
        Some(_) => return Err(ControlError::BadJson("field 'op' must be a string".into())),
        None if value.is_object() => return Err(ControlError::BadJson("missing field 'op'".into())),
        None => return Err(ControlError::BadJson("a message must be a JSON object with an 'op'".into())),
    };
    if !REQUEST_OPS.contains(&op.as_str()) {
        return Err(ControlError::UnknownOp(op));
    }
    let req: Request =
        serde_json::from_value(value).map_err(|e| ControlError::BadJson(format!("'{op}': {e}")))?;
    check_fds(req.op(), req.expected_fds(), fds.len())?;
    Ok(Incoming::Request(req, fds))
}

/// A server connection's stream of frames, decoded into requests.
#[derive(Debug, Default)]
pub struct RequestDecoder {
    frames: FrameDecoder,
}

impl RequestDecoder {
    /// A decoder of a fresh connection.
    pub fn new() -> RequestDecoder {
        RequestDecoder::default()
    }

    /// Feed the bytes of one read and the fds that arrived with them.
    pub fn push(&mut self, bytes: &[u8], fds: Vec<OwnedFd>) {
        self.frames.push(bytes, fds);
    }

    /// The next complete request, `Ok(None)` if more bytes are needed. After an error all
    /// further input is ignored ([`FrameDecoder::next_frame`]).
    pub fn next_incoming(&mut self) -> Result<Option<Incoming>, ControlError> {
        self.frames.next_frame()?.map(|Frame { payload, fds }| decode_request(&payload, fds)).transpose()
    }

    /// Call at end of stream ([`FrameDecoder::finish`]).
    pub fn finish(&mut self) -> Result<(), ControlError> {
        self.frames.finish()
    }

    /// Whether the peer reads the broker's replies: a peer of our protocol always does.
    pub fn reads_replies(&self, _sock: BorrowedFd<'_>) -> bool {
        true
    }
}

/// Parse a response payload (client side). Responses may carry any number of fds up to the frame
/// limit; the caller matches them to the response.
pub fn decode_response(payload: &[u8]) -> Result<Response, ControlError> {
    serde_json::from_slice(payload).map_err(|e| ControlError::BadJson(format!("reply: {e}")))
}

pub(crate) fn check_fds(op: &str, expected: usize, got: usize) -> Result<(), ControlError> {
    if got < expected {
        Err(ControlError::MissingFd { op: op.into(), expected, got })
    } else if got > expected {
        Err(ControlError::TooManyFds { op: op.into(), max: expected, got })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    const REGISTER: &str = r#"{"op":"register","name":"vm","kind":"private","mappings":[]}"#;

    #[test]
    fn good_requests() {
        match decode_request(br#"{"op":"status"}"#, Vec::new()).unwrap() {
            Incoming::Request(Request::Status, fds) => assert!(fds.is_empty()),
            other => panic!("{other:?}"),
        }
        match decode_request(REGISTER.as_bytes(), vec![fd()]).unwrap() {
            Incoming::Request(Request::Register { pid: None, .. }, fds) => assert_eq!(fds.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_json() {
        for bad in [&b"{"[..], b"", b"[1]", b"{\"op\":3}", b"{\"name\":\"x\"}", b"{\"op\":\"unregister\"}"] {
            assert!(matches!(decode_request(bad, Vec::new()), Err(ControlError::BadJson(_))), "{bad:?}");
        }
    }

    #[test]
    fn unknown_op() {
        match decode_request(br#"{"op":"format_disk"}"#, Vec::new()) {
            Err(ControlError::UnknownOp(op)) => assert_eq!(op, "format_disk"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fd_counts() {
        assert!(matches!(
            decode_request(REGISTER.as_bytes(), Vec::new()),
            Err(ControlError::MissingFd { expected: 1, got: 0, .. })
        ));
        assert!(matches!(
            decode_request(REGISTER.as_bytes(), vec![fd(), fd()]),
            Err(ControlError::TooManyFds { max: 1, got: 2, .. })
        ));
        assert!(matches!(
            decode_request(br#"{"op":"status"}"#, vec![fd()]),
            Err(ControlError::TooManyFds { max: 0, got: 1, .. })
        ));
    }
}
