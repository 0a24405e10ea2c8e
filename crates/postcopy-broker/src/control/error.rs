//! [`ControlError`]: everything that can go wrong on a control connection, each with the protocol
//! error code the broker replies with before closing that one connection.

use std::io;

use super::protocol::{code, Response};

/// An error on a control connection (server or client side).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The peer closed the connection at a message boundary (a normal end, not a failure).
    #[error("the peer closed the control connection")]
    PeerClosed,
    /// The stream does not start with our magic `PCB1` (nor, on the server with the `firecracker`
    /// feature, `[` for a Firecracker handshake).
    #[error("bad frame: expected magic \"PCB1\", got {got}; the peer does not speak the control protocol")]
    Garbage {
        /// The first bytes seen, escaped.
        got: String,
    },
    /// The peer closed the connection in the middle of a frame or handshake.
    #[error("bad frame: the connection ended after {have} bytes of a {what} that needs {need}; the peer sent a truncated message")]
    Truncated {
        /// "frame" or "Firecracker handshake".
        what: &'static str,
        /// Bytes received of it.
        have: usize,
        /// Bytes it needs (for a handshake: at least one more than received).
        need: usize,
    },
    /// A frame declared a payload longer than allowed, or a handshake grew past the cap.
    #[error(
        "{what} of {len} bytes exceeds the limit of {max} bytes; split the request or ask for fewer items"
    )]
    TooLarge {
        /// "frame payload" or "Firecracker handshake".
        what: &'static str,
        /// The declared or received length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Anything else wrong with the byte stream (data after a Firecracker handshake).
    #[error("bad frame: {0}")]
    BadFrame(String),
    /// The payload is not JSON or does not match the message.
    #[error("bad JSON in control message: {0}")]
    BadJson(String),
    /// A well-formed message with an op this version does not know.
    #[error("unknown op '{0}'; this broker speaks control protocol version 1 (ops: hello, register, unregister, get_blocks, status)")]
    UnknownOp(String),
    /// A message came with fewer fds than it needs.
    #[error("'{op}' needs {expected} file descriptor(s) sent with SCM_RIGHTS in the same sendmsg as its frame, got {got}")]
    MissingFd {
        /// The message's op.
        op: String,
        /// Fds needed.
        expected: usize,
        /// Fds received.
        got: usize,
    },
    /// A message came with more fds than it may carry (the extra ones were closed).
    #[error("'{op}' may carry at most {max} file descriptor(s), got {got}; the extra ones were closed")]
    TooManyFds {
        /// The message's op (or "frame").
        op: String,
        /// Fds allowed.
        max: usize,
        /// Fds received (a lower bound when the kernel truncated them).
        got: usize,
    },
    /// The peer's uid is not allowed to use the broker.
    #[error("uid {uid} (pid {pid}) is not allowed on this control socket; run as an allowed user or add the uid to the broker's allowed list")]
    NotAllowed {
        /// The peer's uid.
        uid: u32,
        /// The peer's pid.
        pid: i32,
    },
    /// The peer does not read its replies: its socket buffer is full.
    #[error("the peer does not read its replies (socket buffer full); connection dropped")]
    PeerNotReading,
    /// Client side: the broker answered with an error.
    #[error("broker replied {code}: {message}")]
    Remote {
        /// The error code.
        code: String,
        /// The broker's message.
        message: String,
    },
    /// Client side: the broker answered with an unexpected message.
    #[error("unexpected reply from the broker: expected {expected}, got {got}; client and broker versions differ?")]
    UnexpectedReply {
        /// What was expected.
        expected: &'static str,
        /// What came (op or description).
        got: String,
    },
    /// A local argument that cannot be sent (e.g. too many fds for one frame).
    #[error("invalid control message: {0}")]
    Invalid(String),
    /// Client side: no broker took back the client ids after the connection that registered
    /// them ended ([`crate::control::ControlClient::reconnect`]).
    #[error("no broker at {path} took back client(s) {clients} ({attempts} attempt(s) in {waited:?}; last: {last}): the broker died without an fd store or for good, so the pages that never arrived stay missing (never zero-filled); stop this guest here")]
    ReattachFailed {
        /// The control socket.
        path: String,
        /// The client ids, comma separated.
        clients: String,
        /// Connections tried.
        attempts: u32,
        /// Time from the first attempt to the giving up.
        waited: std::time::Duration,
        /// Why the last attempt failed.
        #[source]
        last: Box<ControlError>,
    },
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl ControlError {
    /// Wrap an I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> ControlError {
        ControlError::Io { context: context.into(), source }
    }

    /// The protocol error code to reply with, or `None` when no reply makes sense (the peer left,
    /// does not read, or the error is local).
    pub fn code(&self) -> Option<&'static str> {
        match self {
            ControlError::Garbage { .. } | ControlError::Truncated { .. } | ControlError::BadFrame(_) => {
                Some(code::BAD_FRAME)
            }
            ControlError::TooLarge { .. } => Some(code::TOO_LARGE),
            ControlError::BadJson(_) => Some(code::BAD_JSON),
            ControlError::UnknownOp(_) => Some(code::UNKNOWN_OP),
            ControlError::MissingFd { .. } => Some(code::MISSING_FD),
            ControlError::TooManyFds { .. } => Some(code::TOO_MANY_FDS),
            ControlError::NotAllowed { .. } => Some(code::NOT_ALLOWED),
            ControlError::PeerClosed
            | ControlError::PeerNotReading
            | ControlError::Remote { .. }
            | ControlError::UnexpectedReply { .. }
            | ControlError::Invalid(_)
            | ControlError::ReattachFailed { .. }
            | ControlError::Io { .. } => None,
        }
    }

    /// The `error` response for this error, if one should be sent. Its message is cut to
    /// [`MAX_REPLY_MESSAGE`] bytes: it may quote the peer's input (an unknown op, a bad field
    /// value), and the reply must still fit in one frame.
    pub fn to_response(&self) -> Option<Response> {
        self.code().map(|c| {
            let mut message = self.to_string();
            if message.len() > MAX_REPLY_MESSAGE {
                let mut end = MAX_REPLY_MESSAGE;
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                message.truncate(end);
                message.push_str("...");
            }
            Response::error(c, message)
        })
    }
}

/// Longest error message sent in a reply, in bytes (longer ones are cut).
pub const MAX_REPLY_MESSAGE: usize = 1024;

/// Escape the first bytes of a stream for an error message.
pub(crate) fn escape_prefix(bytes: &[u8]) -> String {
    let n = bytes.len().min(16);
    let mut s: String =
        bytes[..n].iter().flat_map(|b| std::ascii::escape_default(*b)).map(char::from).collect();
    if bytes.len() > n {
        s.push_str("...");
    }
    format!("\"{s}\"")
}

/// A control socket failure as the broker's [`crate::Error::Control`] (error.rs is below this module).
impl From<ControlError> for crate::error::Error {
    fn from(e: ControlError) -> crate::error::Error {
        crate::error::Error::Control(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::frame::encode_message;
    use crate::control::message::decode_request;

    /// Found by fuzzing: an unknown op of 65400 bytes made an error reply larger than a frame, so
    /// the peer got no reply at all.
    #[test]
    fn replies_quoting_huge_input_still_fit_a_frame() {
        // "a" first: the cut at 1024 bytes falls inside a two-byte character.
        let op = format!("a{}", "\u{e9}".repeat(32700));
        let payload = format!(r#"{{"op":"{op}"}}"#);
        let err = decode_request(payload.as_bytes(), Vec::new()).unwrap_err();
        assert!(matches!(&err, ControlError::UnknownOp(o) if *o == op));
        let reply = err.to_response().unwrap();
        encode_message(&reply).unwrap();
        match reply {
            Response::Error { code, message } => {
                assert_eq!(code, code::UNKNOWN_OP);
                assert!(message.len() <= MAX_REPLY_MESSAGE + 3 && message.ends_with("..."), "{message}");
                assert!(message.starts_with("unknown op 'a\u{e9}"));
            }
            other => panic!("{other:?}"),
        }
        let short = ControlError::UnknownOp("x".into()).to_response().unwrap();
        assert!(matches!(short, Response::Error { message, .. } if !message.ends_with("...")));
    }
}
