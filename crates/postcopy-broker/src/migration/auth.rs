//! Mutual pre-shared-key challenge-response of the plaintext transport mode
//! (`--key FILE --insecure-plaintext`), run right after TCP connect/accept and before Hello. It
//! proves that both ends hold the key, and nothing more: the frames after it travel unencrypted
//! and without integrity protection, so anyone on the path can read guest RAM and change it. The
//! TLS and pre-shared-key modes of [`transport`](super::transport) protect every frame.
//!
//! Exchange (each step sent by both sides, then read from the peer):
//! 1. `AuthNonce {side, nonce}`: the sender's side and 32 fresh random bytes.
//! 2. `AuthProof {mac}`: `HMAC-SHA256(key, CONTEXT || own side || peer nonce || own nonce)`.
//! 3. `AuthResult {accepted}`: whether the peer's proof verified (constant-time comparison).
//!
//! Each proof is bound to both nonces (no replay) and to the sender's side (a proof cannot be
//! reflected back). Frames are read with exact-size reads, so bytes the peer sends after
//! authentication (its Hello) stay in the socket for the session's decoder.

use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::wire::{
    decode_payload, write_frame, Frame, FrameType, Header, Limits, Side, WireError, AUTH_LEN, HEADER_LEN,
    MAX_ERROR_TEXT,
};

/// Domain-separation prefix of every proof.
pub const AUTH_CONTEXT: &[u8] = b"postcopy-broker migration auth v1\0";
/// Shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// Read/write timeout [`authenticate_tcp`] uses when given none.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(10);

type HmacSha256 = Hmac<Sha256>;

/// Why authentication failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The peer's proof does not verify with our key.
    #[error("authentication failed: the peer's proof does not match our key; the two hosts use different pre-shared keys (use the same key file on both)")]
    WrongKey,
    /// The peer rejected our proof (its key differs).
    #[error("authentication failed: the peer refused our proof; the two hosts use different pre-shared keys (use the same key file on both)")]
    RefusedByPeer,
    /// Both ends claim the same side.
    #[error("authentication failed: the peer also claims to be the {0:?}; one end must be the source and the other the destination")]
    SameSide(Side),
    /// The peer sent our own nonce back.
    #[error("authentication failed: the peer sent back our own nonce (a reflected or looped-back connection); refused")]
    Reflected,
    /// A frame other than the expected one.
    #[error("authentication failed: expected an {expected} frame, the peer sent {got:?}; is the peer a postcopy-broker of the same version?")]
    Unexpected {
        /// The frame expected.
        expected: &'static str,
        /// The frame received.
        got: FrameType,
    },
    /// The peer reported an error instead of authenticating.
    #[error("authentication failed: the peer reported: {0}")]
    PeerError(String),
    /// The peer closed the connection.
    #[error("authentication failed: the peer closed the connection during the handshake")]
    Closed,
    /// The peer did not answer in time.
    #[error("authentication failed: the peer did not answer within the timeout ({0}); check that it is a postcopy-broker and reachable")]
    Timeout(io::Error),
    /// Malformed frames or socket errors.
    #[error("authentication failed: {0}")]
    Wire(#[from] WireError),
    /// The key file cannot be used.
    #[error("key file {path}: {why}")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong and how to fix it.
        why: String,
    },
    /// The key itself cannot be used.
    #[error("pre-shared key is {0} bytes, at least 16 are needed; generate one with `head -c 32 /dev/urandom > KEY && chmod 600 KEY`")]
    ShortKey(usize),
    /// No randomness from the OS.
    #[error("cannot get random bytes for the nonce from the OS: {0}")]
    Random(String),
}

fn io_to_auth(e: io::Error) -> AuthError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
            AuthError::Closed
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AuthError::Timeout(e),
        _ => AuthError::Wire(WireError::Io(e)),
    }
}

fn send<S: Write + ?Sized>(s: &mut S, f: &Frame<'_>) -> Result<(), AuthError> {
    match write_frame(s, f) {
        Ok(()) => s.flush().map_err(io_to_auth),
        Err(WireError::Io(e)) => Err(io_to_auth(e)),
        Err(e) => Err(e.into()),
    }
}

/// Read exactly one small frame (header, then exactly its payload: never more).
fn recv<S: Read + ?Sized>(
    s: &mut S,
    payload: &mut [u8; MAX_ERROR_TEXT],
) -> Result<Frame<'static>, AuthError> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).map_err(io_to_auth)?;
    let header = Header::parse(&h)?;
    let limits = Limits::auth();
    let len = header.payload_len as usize;
    if header.payload_len > limits.max_payload {
        return Err(WireError::PayloadTooLarge {
            frame: header.frame_type,
            len: len as u64,
            max: limits.max_payload.into(),
        }
        .into());
    }
    s.read_exact(&mut payload[..len]).map_err(io_to_auth)?;
    let frame = decode_payload(&header, &payload[..len], None, &limits)?;
    // Copy the few fields out so the frame does not borrow the scratch buffer.
    Ok(match frame {
        Frame::AuthNonce { side, nonce } => Frame::AuthNonce { side, nonce },
        Frame::AuthProof { mac } => Frame::AuthProof { mac },
        Frame::AuthResult { accepted } => Frame::AuthResult { accepted },
        Frame::Error { text } => return Err(AuthError::PeerError(text.to_string())),
        other => return Err(AuthError::Unexpected { expected: "authentication", got: other.frame_type() }),
    })
}

fn mac(
    key: &[u8],
    side: Side,
    first: &[u8; AUTH_LEN],
    second: &[u8; AUTH_LEN],
) -> Result<HmacSha256, AuthError> {
    // HMAC accepts keys of any length; the error branch cannot happen but is not unwrapped.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).map_err(|_| AuthError::ShortKey(key.len()))?;
    m.update(AUTH_CONTEXT);
    m.update(&[side as u8]);
    m.update(first);
    m.update(second);
    Ok(m)
}

/// Authenticate the connection `stream` with the pre-shared `key`, as `side`. Blocking; set read
/// timeouts on the stream first (or use [`authenticate_tcp`]) so a silent peer gives
/// [`AuthError::Timeout`] rather than a hang. Both ends must call it; both succeed only if both
/// hold the same key and are on different sides.
pub fn authenticate<S: Read + Write + ?Sized>(
    stream: &mut S,
    key: &[u8],
    side: Side,
) -> Result<(), AuthError> {
    if key.len() < MIN_KEY_LEN {
        return Err(AuthError::ShortKey(key.len()));
    }
    let mut own_nonce = [0u8; AUTH_LEN];
    getrandom::fill(&mut own_nonce).map_err(|e| AuthError::Random(e.to_string()))?;
    let mut scratch = [0u8; MAX_ERROR_TEXT];

    send(stream, &Frame::AuthNonce { side, nonce: own_nonce })?;
    let (peer_side, peer_nonce) = match recv(stream, &mut scratch)? {
        Frame::AuthNonce { side, nonce } => (side, nonce),
        other => return Err(AuthError::Unexpected { expected: "AuthNonce", got: other.frame_type() }),
    };
    if peer_side == side {
        return Err(AuthError::SameSide(side));
    }
    if peer_nonce == own_nonce {
        return Err(AuthError::Reflected);
    }

    let proof = mac(key, side, &peer_nonce, &own_nonce)?.finalize().into_bytes();
    let mut own_mac = [0u8; AUTH_LEN];
    own_mac.copy_from_slice(&proof);
    send(stream, &Frame::AuthProof { mac: own_mac })?;
    let peer_mac = match recv(stream, &mut scratch)? {
        Frame::AuthProof { mac } => mac,
        other => return Err(AuthError::Unexpected { expected: "AuthProof", got: other.frame_type() }),
    };
    // verify_slice compares in constant time.
    let accepted = mac(key, peer_side, &own_nonce, &peer_nonce)?.verify_slice(&peer_mac).is_ok();

    send(stream, &Frame::AuthResult { accepted })?;
    let peer_accepted = match recv(stream, &mut scratch)? {
        Frame::AuthResult { accepted } => accepted,
        other => return Err(AuthError::Unexpected { expected: "AuthResult", got: other.frame_type() }),
    };
    if !accepted {
        log::warn!("migration peer failed authentication: wrong pre-shared key");
        return Err(AuthError::WrongKey);
    }
    if !peer_accepted {
        return Err(AuthError::RefusedByPeer);
    }
    log::debug!("migration peer authenticated as {peer_side:?}");
    Ok(())
}

/// [`authenticate`] on a TCP stream with read and write timeouts of `timeout` (None:
/// [`DEFAULT_AUTH_TIMEOUT`]) for the handshake; the stream's previous timeouts are restored after.
pub fn authenticate_tcp(
    stream: &mut TcpStream,
    key: &[u8],
    side: Side,
    timeout: Option<Duration>,
) -> Result<(), AuthError> {
    let t = timeout.unwrap_or(DEFAULT_AUTH_TIMEOUT);
    let (old_r, old_w) =
        (stream.read_timeout().map_err(io_to_auth)?, stream.write_timeout().map_err(io_to_auth)?);
    stream.set_read_timeout(Some(t)).map_err(io_to_auth)?;
    stream.set_write_timeout(Some(t)).map_err(io_to_auth)?;
    let r = authenticate(stream, key, side);
    stream.set_read_timeout(old_r).map_err(io_to_auth)?;
    stream.set_write_timeout(old_w).map_err(io_to_auth)?;
    r
}

/// Load a pre-shared key from `path`: hex text (an even number of hex digits, surrounding
/// whitespace ignored) or else raw bytes, at least [`MIN_KEY_LEN`] bytes after decoding. The file
/// must not be accessible to group or others (mode 0600 or stricter).
pub fn load_key(path: &Path) -> Result<Vec<u8>, AuthError> {
    let p = path.display().to_string();
    let meta = fs::metadata(path).map_err(|e| AuthError::KeyFile { path: p.clone(), why: e.to_string() })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuthError::KeyFile {
            path: p.clone(),
            why: format!("mode {mode:04o} lets group or others access the key; run `chmod 600 {p}`"),
        });
    }
    if !meta.is_file() {
        return Err(AuthError::KeyFile { path: p, why: "not a regular file".into() });
    }
    let raw = fs::read(path).map_err(|e| AuthError::KeyFile { path: p.clone(), why: e.to_string() })?;
    let text = raw.trim_ascii();
    let key = if !text.is_empty() && text.len() % 2 == 0 && text.iter().all(u8::is_ascii_hexdigit) {
        text.chunks_exact(2).map(|c| (hex_val(c[0]) << 4) | hex_val(c[1])).collect()
    } else {
        raw
    };
    if key.len() < MIN_KEY_LEN {
        return Err(AuthError::ShortKey(key.len()));
    }
    Ok(key)
}

fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    }
}

/// An authentication failure as the broker's [`crate::Error::Auth`] (error.rs is below migration).
impl From<AuthError> for crate::error::Error {
    fn from(e: AuthError) -> crate::error::Error {
        crate::error::Error::Auth(Box::new(e))
    }
}

#[cfg(test)]
mod tests;
