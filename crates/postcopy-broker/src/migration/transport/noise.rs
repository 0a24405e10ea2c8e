//! The pre-shared-key mode: the Noise protocol's `NNpsk0` pattern
//! (`Noise_NNpsk0_25519_AESGCM_SHA256`, implemented by the `snow` crate with ring's AES-GCM and
//! SHA-256) keyed by the key file.
//!
//! - Key: the Noise PSK is `HMAC-SHA256(key file bytes, PSK_CONTEXT)`, 32 bytes, so a key file of
//!   any length (at least 16 bytes) gives a full-strength PSK and the same file serves the
//!   plaintext mode's challenge-response without the two sharing a key.
//! - Handshake: the source is the initiator. Its first message (`psk, e`) and the destination's
//!   answer (`e, ee`) travel as `Handshake` frames of the wire protocol, so a destination that
//!   refuses (another key: the first message does not decrypt) can say so with an `Error` frame.
//!   The source proves it holds the key with its first message; the destination with its
//!   answer; both ends get fresh keys from the ephemeral Diffie-Hellman (forward secrecy). A
//!   replayed first message gets an answer nobody can read: the destination counts a
//!   connection as a source only once a transport message (its Hello) opened.
//! - Records: every transport message is a 2-byte big-endian length and a Noise message of at
//!   most 65535 bytes (payload + 16-byte tag), numbered by an implicit counter per direction, so
//!   a changed, dropped, reordered or replayed message fails to open and breaks the connection.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use snow::StatelessTransportState;

use super::deadline::Deadline;
use super::sealed::{Rx, Tx};
use super::TransportError;
use crate::migration::wire::{decode_payload, write_frame, Frame, Header, Limits, HEADER_LEN};

/// The Noise protocol name.
pub const PATTERN: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Domain separation of the derived PSK.
pub const PSK_CONTEXT: &[u8] = b"postcopy-broker migration psk v1";
/// Prologue both ends mix into the handshake (a peer of another protocol cannot complete it).
pub const PROLOGUE: &[u8] = b"postcopy-broker migration v1";
/// Largest Noise message.
const MAX_MESSAGE: usize = 65535;
/// Authentication tag of every message.
const TAG: usize = 16;
/// Largest payload of one transport message.
pub const MAX_PAYLOAD: usize = MAX_MESSAGE - TAG;

/// The 32-byte Noise PSK derived from a key file's bytes.
#[derive(Clone)]
pub struct Psk([u8; 32]);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(..)")
    }
}

impl Psk {
    /// `HMAC-SHA256(key, PSK_CONTEXT)`.
    pub fn derive(key: &[u8]) -> Result<Psk, TransportError> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|e| {
            TransportError::Options(format!("the pre-shared key cannot key HMAC-SHA256: {e}"))
        })?;
        m.update(PSK_CONTEXT);
        Ok(Psk(m.finalize().into_bytes().into()))
    }

    fn builder(&self) -> Result<snow::Builder<'_>, TransportError> {
        let params = PATTERN.parse().map_err(noise_setup)?;
        snow::Builder::new(params)
            .psk(0, &self.0)
            .map_err(noise_setup)?
            .prologue(PROLOGUE)
            .map_err(noise_setup)
    }

    /// The initiator's (source's) handshake.
    pub(super) fn connect(
        &self,
        io: &mut Deadline<'_, TcpStream>,
    ) -> Result<StatelessTransportState, TransportError> {
        let mut hs = self.builder()?.build_initiator().map_err(noise_setup)?;
        let mut msg = [0u8; 256];
        let n = hs.write_message(&[], &mut msg).map_err(noise_setup)?;
        send(io, &msg[..n])?;
        let answer = recv(io)?;
        let mut payload = [0u8; 256];
        hs.read_message(&answer, &mut payload).map_err(|e| {
            TransportError::Refused(format!(
                "the destination's handshake answer does not verify with our pre-shared key ({e}): the two hosts use different key files (use the same --key file on both)"
            ))
        })?;
        hs.into_stateless_transport_mode().map_err(noise_setup)
    }

    /// The responder's (destination's) handshake. A first message that does not verify is
    /// answered with an Error frame.
    pub(super) fn accept(
        &self,
        io: &mut Deadline<'_, TcpStream>,
    ) -> Result<StatelessTransportState, TransportError> {
        let mut hs = self.builder()?.build_responder().map_err(noise_setup)?;
        let first = recv(io)?;
        let mut payload = [0u8; 256];
        if let Err(e) = hs.read_message(&first, &mut payload) {
            let text = "authentication failed: the source's pre-shared key is not ours (the two hosts use different key files: use the same --key file on both)";
            let _ = write_frame(io, &Frame::Error { text });
            return Err(TransportError::Refused(format!("{text} ({e})")));
        }
        let mut msg = [0u8; 256];
        let n = hs.write_message(&[], &mut msg).map_err(noise_setup)?;
        send(io, &msg[..n])?;
        hs.into_stateless_transport_mode().map_err(noise_setup)
    }
}

fn noise_setup(e: snow::Error) -> TransportError {
    TransportError::Options(format!("the Noise handshake ({PATTERN}) cannot be set up: {e}"))
}

fn io_err(what: &str, e: io::Error) -> TransportError {
    TransportError::Io { context: format!("pre-shared-key handshake: {what}"), source: e }
}

fn send(io: &mut Deadline<'_, TcpStream>, bytes: &[u8]) -> Result<(), TransportError> {
    match write_frame(io, &Frame::Handshake { bytes }) {
        Ok(()) => io.flush().map_err(|e| io_err("send", e)),
        Err(crate::migration::wire::WireError::Io(e)) => Err(io_err("send", e)),
        Err(e) => Err(TransportError::Options(e.to_string())),
    }
}

/// Read exactly one Handshake frame (never more: transport messages follow it).
fn recv(io: &mut Deadline<'_, TcpStream>) -> Result<Vec<u8>, TransportError> {
    let mut h = [0u8; HEADER_LEN];
    io.read_exact(&mut h).map_err(|e| io_err("receive", e))?;
    let refused = |why: String| TransportError::Refused(format!("pre-shared-key handshake: {why}"));
    let header = Header::parse(&h).map_err(|e| refused(e.to_string()))?;
    let limits = Limits::auth();
    if header.payload_len > limits.max_payload {
        return Err(refused(format!("a {:?} frame of {} bytes", header.frame_type, header.payload_len)));
    }
    let mut payload = vec![0u8; header.payload_len as usize];
    io.read_exact(&mut payload).map_err(|e| io_err("receive", e))?;
    match decode_payload(&header, &payload, None, &limits).map_err(|e| refused(e.to_string()))? {
        Frame::Handshake { bytes } => Ok(bytes.to_vec()),
        Frame::Error { text } => Err(TransportError::Refused(format!("the peer refused the connection: {text}"))),
        f => Err(refused(format!(
            "expected a Handshake frame, got {:?} (does the peer use --key without --insecure-plaintext too?)",
            f.frame_type()
        ))),
    }
}

/// Read opened bytes into `out` (see the module doc for the record format).
pub(super) fn read(
    sock: &TcpStream,
    state: &StatelessTransportState,
    rx: &mut Rx,
    out: &mut [u8],
) -> io::Result<usize> {
    rx.check()?;
    if out.is_empty() {
        return Ok(0);
    }
    let mut filled = rx.take_plain(out);
    loop {
        while filled < out.len() {
            let sealed = rx.sealed();
            if sealed.len() < 2 {
                break;
            }
            let len = usize::from(u16::from_be_bytes([sealed[0], sealed[1]]));
            if len < TAG {
                return Err(rx.break_with(format!(
                    "a record of {len} bytes is shorter than its tag: the stream is corrupt"
                )));
            }
            if sealed.len() < 2 + len {
                break;
            }
            let nonce = rx.nonce;
            let room = out.len() - filled;
            // Opened in place where it lands: the output must hold the whole message (snow copies
            // it there, then decrypts in place; with less room it would allocate).
            let direct = room >= len;
            let opened = if direct {
                state.read_message(nonce, &sealed[2..2 + len], &mut out[filled..])
            } else {
                rx.plain.resize(len, 0);
                let r = state.read_message(nonce, &rx.buf[rx.start + 2..rx.start + 2 + len], &mut rx.plain);
                rx.plain_pos = 0;
                r
            };
            let n = opened.map_err(|e| {
                rx.break_with(format!(
                    "record {nonce} failed authentication ({e}): the stream was changed, cut or replayed on the way"
                ))
            })?;
            rx.nonce += 1;
            rx.start += 2 + len;
            if direct {
                filled += n;
            } else {
                rx.plain.truncate(n);
                filled += rx.take_plain(&mut out[filled..]);
            }
        }
        if filled > 0 {
            return Ok(filled);
        }
        if rx.eof {
            return match rx.sealed().len() {
                0 => Ok(0),
                n => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the peer closed the connection inside a record ({n} bytes of it arrived)"),
                )),
            };
        }
        rx.fill(sock)?;
    }
}

/// Seal one piece (at most [`SEAL_CHUNK`](super::sealed::SEAL_CHUNK) bytes in slices) into
/// records appended to `tx.pending`.
pub(super) fn seal(state: &StatelessTransportState, piece: &[&[u8]], tx: &mut Tx) -> io::Result<()> {
    let seal_one = |tx: &mut Tx, payload: Option<&[u8]>| -> io::Result<()> {
        let at = tx.pending.len();
        let len = payload.map_or(tx.stage.len(), <[u8]>::len);
        tx.pending.resize(at + 2 + len + TAG, 0);
        let nonce = tx.nonce;
        let (pending, stage) = (&mut tx.pending, &tx.stage);
        let n = state
            .write_message(nonce, payload.unwrap_or(stage), &mut pending[at + 2..])
            .map_err(|e| io::Error::other(format!("cannot seal a record: {e}")))?;
        let n16 = u16::try_from(n).map_err(|_| io::Error::other("a sealed record is over 65535 bytes"))?;
        pending[at..at + 2].copy_from_slice(&n16.to_be_bytes());
        pending.truncate(at + 2 + n);
        tx.nonce += 1;
        Ok(())
    };
    // Whole records inside one slice are sealed straight from it; records that span slices
    // (a page frame's header and the start of its data) are gathered first.
    tx.stage.clear();
    for s in piece {
        let mut rest: &[u8] = s;
        while !rest.is_empty() {
            if tx.stage.is_empty() && rest.len() >= MAX_PAYLOAD {
                let (rec, tail) = rest.split_at(MAX_PAYLOAD);
                seal_one(tx, Some(rec))?;
                rest = tail;
                continue;
            }
            let take = rest.len().min(MAX_PAYLOAD - tx.stage.len());
            tx.stage.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if tx.stage.len() == MAX_PAYLOAD {
                seal_one(tx, None)?;
                tx.stage.clear();
            }
        }
    }
    if !tx.stage.is_empty() {
        seal_one(tx, None)?;
        tx.stage.clear();
    }
    Ok(())
}
