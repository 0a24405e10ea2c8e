//! The TLS mode: mutual TLS 1.3 with rustls (aws-lc-rs provider), certificates from a directory laid
//! out like QEMU's tls-creds-x509 `dir=`:
//!
//! | file | read by |
//! |---|---|
//! | `ca-cert.pem` | both: the CA (or CAs) the peer's certificate must chain to |
//! | `server-cert.pem`, `server-key.pem` | the destination (it listens) |
//! | `client-cert.pem`, `client-key.pem` | the source (it connects) |
//!
//! Each side reads only its own files, so one directory with all five works on both hosts.
//! Private keys must not be readable by group or others. The source checks that the
//! destination's certificate is valid for the host it connects to (or `--tls-peer-name`); the
//! destination accepts any source certificate from the CA, or only one valid for
//! `--tls-peer-name` when given. No session tickets, no early data, TLS 1.3 only.
//!
//! After the handshake the destination sends one application record, [`READY`] (or, refusing a
//! source whose certificate does not carry `--tls-peer-name`, an Error frame), so the source
//! learns inside its handshake whether its certificate was accepted (a TLS 1.3 client otherwise
//! finds out only at its first read). Then both ends take the traffic keys and sequence numbers
//! out of rustls (`dangerous_extract_secrets`, the step that hands a connection to kernel TLS;
//! this kernel has no kernel TLS) and protect the records with the negotiated suite's own rustls
//! record ciphers (`Records`): standard TLS 1.3 application records of at most 16 KiB, opened
//! in place in the receive buffer and sealed straight into the send buffer, one direction
//! independent of the other (the sender and receiver of a connection never wait for each
//! other). Keys are not updated: a connection that reaches the suite's confidentiality limit
//! (2^24 records for AES-GCM, 256 GiB of records) fails, and postcopy recovery resumes on a new
//! connection with new keys.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, Connection, ConnectionTrafficSecrets, ContentType,
    ProtocolVersion, RootCertStore, ServerConfig, SupportedCipherSuite,
};

use super::deadline::Deadline;
use super::sealed::{pieces_of, Rx, Tx};
use super::{lock, TransportError};

/// First byte of a TLS handshake record (a ClientHello starts with it).
pub const RECORD_HANDSHAKE: u8 = 0x16;
/// The CA file, read by both sides.
pub const CA_CERT: &str = "ca-cert.pem";
/// The destination's certificate chain.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The destination's private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The source's certificate chain.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The source's private key.
pub const CLIENT_KEY: &str = "client-key.pem";
/// The destination's first application record: the source's certificate is accepted.
pub const READY: &[u8] = b"postcopy-broker migration tls ready v1";
/// Largest plaintext of one record (TLS 1.3).
const MAX_FRAGMENT: usize = 1 << 14;
/// Largest ciphertext of one record: fragment, content type byte, padding and tag (RFC 8446).
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
/// Record header: type, legacy version, length.
const RECORD_HEADER: usize = 5;
/// Outer type of every protected TLS 1.3 record.
const APPLICATION_DATA: u8 = 23;

enum Role {
    Source { config: Arc<ClientConfig>, name: Option<String> },
    Destination { config: Arc<ServerConfig>, pin: Option<ServerName<'static>> },
}

/// One side's TLS configuration, loaded from its directory.
pub struct TlsSetup {
    dir: PathBuf,
    role: Role,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn setup_err(path: &Path, why: impl Into<String>) -> TransportError {
    TransportError::Setup { path: path.display().to_string(), why: why.into() }
}

/// The aws-lc-rs provider (rustls' default; its AES-GCM is 1.8x ring's on this machine, see
/// BENCHMARKS.md) with AES-128-GCM first: half again as fast as AES-256-GCM here (AES-NI), and
/// a TLS 1.3 suite every implementation has; both ends prefer it, so it is the one negotiated.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let list = CertificateDer::pem_file_iter(path)
        .map_err(|e| setup_err(path, format!("cannot read PEM certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setup_err(path, format!("not a PEM certificate file: {e}")))?;
    if list.is_empty() {
        return Err(setup_err(path, "holds no certificate (expected -----BEGIN CERTIFICATE-----)"));
    }
    Ok(list)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    let meta = std::fs::metadata(path).map_err(|e| setup_err(path, e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(setup_err(
            path,
            format!(
                "mode {mode:04o} lets group or others access the private key; run `chmod 600 {}`",
                path.display()
            ),
        ));
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| setup_err(path, format!("not a PEM private key: {e}")))
}

fn roots(dir: &Path) -> Result<RootCertStore, TransportError> {
    let path = dir.join(CA_CERT);
    let mut store = RootCertStore::empty();
    for c in certs(&path)? {
        store.add(c).map_err(|e| setup_err(&path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(store)
}

fn config_err(dir: &Path, e: rustls::Error) -> TransportError {
    setup_err(dir, format!("the certificates and keys do not form a TLS configuration: {e}"))
}

impl TlsSetup {
    /// The source's setup: `ca-cert.pem`, `client-cert.pem`, `client-key.pem` of `dir`. The
    /// destination's certificate must be valid for `peer_name`, or else for the host of the
    /// address the source connects to.
    pub fn source(dir: &Path, peer_name: Option<&str>) -> Result<TlsSetup, TransportError> {
        let roots = roots(dir)?;
        let chain = certs(&dir.join(CLIENT_CERT))?;
        let key = key(&dir.join(CLIENT_KEY))?;
        if let Some(n) = peer_name {
            server_name(n)?;
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err(dir, e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| config_err(dir, e))?;
        let mut config = config;
        config.enable_secret_extraction = true;
        Ok(TlsSetup {
            dir: dir.to_path_buf(),
            role: Role::Source { config: Arc::new(config), name: peer_name.map(str::to_string) },
        })
    }

    /// The destination's setup: `ca-cert.pem`, `server-cert.pem`, `server-key.pem` of `dir`.
    /// Sources must present a certificate from the CA, valid for `peer_name` if given.
    pub fn destination(dir: &Path, peer_name: Option<&str>) -> Result<TlsSetup, TransportError> {
        let provider = provider();
        let roots = Arc::new(roots(dir)?);
        let chain = certs(&dir.join(SERVER_CERT))?;
        let key = key(&dir.join(SERVER_KEY))?;
        let pin = peer_name.map(server_name).transpose()?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider)).build().map_err(
                |e| setup_err(&dir.join(CA_CERT), format!("cannot verify client certificates with it: {e}")),
            )?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err(dir, e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| config_err(dir, e))?;
        config.send_tls13_tickets = 0;
        config.enable_secret_extraction = true;
        Ok(TlsSetup { dir: dir.to_path_buf(), role: Role::Destination { config: Arc::new(config), pin } })
    }

    /// The source's handshake with the destination at `addr` (HOST:PORT).
    pub(super) fn connect(
        &self,
        io: &mut Deadline<'_, TcpStream>,
        addr: &str,
    ) -> Result<(Records, Option<Vec<u8>>), TransportError> {
        let Role::Source { config, name } = &self.role else {
            return Err(TransportError::Options(
                "a destination's TLS setup (server-cert.pem) cannot connect; load the source's".into(),
            ));
        };
        let name = name.clone().unwrap_or_else(|| host_of(addr).to_string());
        let sn = server_name(&name)?;
        let conn = rustls::ClientConnection::new(Arc::clone(config), sn)
            .map_err(|e| TransportError::Options(format!("TLS client: {e}")))?;
        let mut conn = Connection::Client(conn);
        drive(&mut conn, io).map_err(|e| self.describe(e, Some(&name)))?;
        await_ready(&mut conn, io).map_err(|e| match e {
            Ready::Io(e) => self.describe(e, Some(&name)),
            Ready::Refused(why) => TransportError::Refused(why),
        })?;
        let identity = conn.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
        Ok((Records::take(conn)?, identity))
    }

    /// The destination's handshake with a source.
    pub(super) fn accept(
        &self,
        io: &mut Deadline<'_, TcpStream>,
    ) -> Result<(Records, Option<Vec<u8>>), TransportError> {
        let Role::Destination { config, pin } = &self.role else {
            return Err(TransportError::Options(
                "a source's TLS setup (client-cert.pem) cannot accept; load the destination's".into(),
            ));
        };
        let conn = rustls::ServerConnection::new(Arc::clone(config))
            .map_err(|e| TransportError::Options(format!("TLS server: {e}")))?;
        let mut conn = Connection::Server(conn);
        drive(&mut conn, io).map_err(|e| self.describe(e, None))?;
        let Some(cert) = conn.peer_certificates().and_then(|c| c.first()).cloned() else {
            return Err(TransportError::Refused("the source presented no certificate".into()));
        };
        if let Some(pin) = pin {
            let ee = webpki::EndEntityCert::try_from(&cert).map_err(|e| {
                TransportError::Refused(format!("the source's certificate cannot be parsed: {e}"))
            })?;
            if let Err(e) = ee.verify_is_valid_for_subject_name(pin) {
                let text = format!(
                    "the source's certificate is not valid for the name --tls-peer-name {} requires ({e}); it is signed by our CA but belongs to another host",
                    pin.to_str()
                );
                let _ = refuse_inside(&mut conn, io, &text);
                return Err(TransportError::Refused(text));
            }
        }
        send_inside(&mut conn, io, READY, false).map_err(|e| self.describe(e, None))?;
        Ok((Records::take(conn)?, Some(cert.to_vec())))
    }

    /// A handshake error, for the user: who refused what, and what to check.
    fn describe(&self, e: io::Error, name: Option<&str>) -> TransportError {
        let ca = self.dir.join(CA_CERT);
        let ours = self.dir.join(if name.is_some() { CLIENT_CERT } else { SERVER_CERT });
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            // A connection that just ends is not a refusal (a refusal comes as an alert or an
            // Error frame): it may be the network, so a resume tries again.
            let context = match e.kind() {
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                    "TLS handshake: the peer closed the connection (if this repeats, check its log: does it use --tls-dir too?)"
                }
                _ => "TLS handshake",
            };
            return TransportError::Io { context: context.into(), source: e };
        };
        let why = match tls {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
                "the peer's certificate is not signed by the CA of {} (it comes from another CA)",
                ca.display()
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => format!(
                "the destination's certificate is not valid for the name '{}' ({tls}); give --tls-peer-name with a name its certificate holds",
                name.unwrap_or("?")
            ),
            rustls::Error::InvalidCertificate(c) => format!("the peer's certificate is refused: {c:?}"),
            rustls::Error::NoCertificatesPresented => "the source presented no certificate".into(),
            rustls::Error::AlertReceived(a) => alert_text(*a, &ours, &ca),
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => format!(
                "the peer does not speak TLS ({tls}); it may use --key: give both ends --tls-dir"
            ),
            other => format!("TLS handshake failed: {other}"),
        };
        TransportError::Refused(why)
    }
}

/// What an alert the peer sent about us means.
fn alert_text(a: AlertDescription, ours: &Path, ca: &Path) -> String {
    match a {
        AlertDescription::UnknownCA
        | AlertDescription::BadCertificate
        | AlertDescription::CertificateUnknown
        | AlertDescription::CertificateRequired
        | AlertDescription::AccessDenied
        | AlertDescription::CertificateExpired
        | AlertDescription::UnsupportedCertificate => format!(
            "the peer refused our certificate (TLS alert {a:?}): is {} signed by the CA the peer trusts (its {}), valid now, and for the name it expects?",
            ours.display(),
            ca.file_name().and_then(|n| n.to_str()).unwrap_or(CA_CERT)
        ),
        _ => format!("the peer ended the TLS handshake with alert {a:?}"),
    }
}

fn server_name(n: &str) -> Result<ServerName<'static>, TransportError> {
    ServerName::try_from(n.to_string())
        .map_err(|_| TransportError::Options(format!("'{n}' is neither a DNS name nor an IP address")))
}

/// The host of HOST:PORT (brackets of an IPv6 address removed).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// Run the handshake to its end (and send what it leaves to send).
fn drive(conn: &mut Connection, io: &mut Deadline<'_, TcpStream>) -> io::Result<()> {
    while conn.is_handshaking() {
        let (r, w) = conn.complete_io(io)?;
        if r == 0 && w == 0 && conn.is_handshaking() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the connection"));
        }
    }
    while conn.wants_write() {
        conn.write_tls(io)?;
    }
    io.flush()
}

/// Send `data` as application data through the handshake's connection (and close_notify after
/// it when `close`).
fn send_inside(
    conn: &mut Connection,
    io: &mut Deadline<'_, TcpStream>,
    data: &[u8],
    close: bool,
) -> io::Result<()> {
    conn.writer().write_all(data)?;
    if close {
        conn.send_close_notify();
    }
    while conn.wants_write() {
        conn.write_tls(io)?;
    }
    io.flush()
}

/// Tell an authenticated peer why it is refused: an Error frame inside the TLS connection.
fn refuse_inside(conn: &mut Connection, io: &mut Deadline<'_, TcpStream>, text: &str) -> io::Result<()> {
    let mut frame = Vec::new();
    crate::migration::wire::encode(&crate::migration::wire::Frame::Error { text }, &mut frame)
        .map_err(|e| io::Error::other(e.to_string()))?;
    send_inside(conn, io, &frame, true)
}

enum Ready {
    Io(io::Error),
    Refused(String),
}

/// The source's wait for the destination's verdict: [`READY`], or an Error frame, or an alert.
fn await_ready(conn: &mut Connection, io: &mut Deadline<'_, TcpStream>) -> Result<(), Ready> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while got.len() < READY.len() {
        match conn.reader().read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(Ready::Io(e)),
        }
        if got.len() > 4096 {
            break;
        }
        match conn.read_tls(io) {
            Ok(0) => {
                conn.process_new_packets()
                    .map_err(|e| Ready::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
                match conn.reader().read(&mut buf) {
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => break,
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => return Err(Ready::Io(e)),
        }
        conn.process_new_packets().map_err(|e| Ready::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    }
    if got == READY {
        return Ok(());
    }
    let mut dec = crate::migration::wire::Decoder::default();
    dec.feed(&got);
    Err(Ready::Refused(match dec.next_frame() {
        Ok(Some(crate::migration::wire::Frame::Error { text })) => {
            format!("the destination refused this source: {text}")
        }
        _ if got.is_empty() => {
            "the destination closed the TLS connection right after the handshake (see its log)".into()
        }
        _ => {
            "the destination answered the TLS handshake with something else than a migration destination does"
                .into()
        }
    }))
}

/// The record protection of one connection after its handshake: the negotiated suite's rustls
/// record ciphers, one per direction (see the module doc).
pub(super) struct Records {
    enc: Mutex<Box<dyn MessageEncrypter>>,
    dec: Mutex<Box<dyn MessageDecrypter>>,
    /// Records per direction before the keys would wear out.
    limit: u64,
    /// Sequence numbers of the next record to receive and to send.
    pub(super) seqs: (u64, u64),
}

impl Records {
    /// Take the keys out of the finished handshake.
    fn take(conn: Connection) -> Result<Records, TransportError> {
        let unusable = |why: String| {
            TransportError::Options(format!("TLS: cannot take over the connection's keys: {why}"))
        };
        let Some(SupportedCipherSuite::Tls13(suite)) = conn.negotiated_cipher_suite() else {
            return Err(unusable("no TLS 1.3 cipher suite was negotiated".into()));
        };
        let secrets = conn.dangerous_extract_secrets().map_err(|e| unusable(e.to_string()))?;
        let keys = |s: ConnectionTrafficSecrets| match s {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
            _ => Err(unusable("an unknown AEAD".into())),
        };
        let (rx_seq, rx) = secrets.rx;
        let (tx_seq, tx) = secrets.tx;
        let ((rk, riv), (tk, tiv)) = (keys(rx)?, keys(tx)?);
        let mut enc = suite.aead_alg.encrypter(tk, tiv);
        if tx_seq > 0 {
            // aws-lc's TLS 1.3 AES-GCM sealing key learns its nonce mask from the first record
            // it seals, which it takes to be record 0, and then refuses any nonce that does not
            // grow. Record 0 went out inside rustls, so seal an empty record 0 once, into
            // nothing: its ciphertext never leaves this function, so no nonce is seen twice.
            let warm = OutboundPlainMessage {
                typ: ContentType::ApplicationData,
                version: ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::new(&[]),
            };
            drop(enc.encrypt(warm, 0).map_err(|e| unusable(e.to_string()))?);
        }
        Ok(Records {
            enc: Mutex::new(enc),
            dec: Mutex::new(suite.aead_alg.decrypter(rk, riv)),
            limit: suite.common.confidentiality_limit,
            seqs: (rx_seq, tx_seq),
        })
    }
}

/// Read opened bytes into `out`: what `rx` holds, then records from the socket.
pub(super) fn read(sock: &TcpStream, rec: &Records, rx: &mut Rx, out: &mut [u8]) -> io::Result<usize> {
    rx.check()?;
    if out.is_empty() {
        return Ok(0);
    }
    let mut filled = rx.take_plain(out);
    loop {
        while filled < out.len() {
            let sealed = rx.sealed();
            if sealed.len() < RECORD_HEADER {
                break;
            }
            let len = usize::from(u16::from_be_bytes([sealed[3], sealed[4]]));
            if sealed[0] != APPLICATION_DATA || sealed[1..3] != [3, 3] || len > MAX_CIPHERTEXT {
                return Err(rx.break_with(format!(
                    "a record header {:02x?} that no TLS 1.3 peer sends: the stream is corrupt",
                    &sealed[..RECORD_HEADER]
                )));
            }
            if sealed.len() < RECORD_HEADER + len {
                break;
            }
            let seq = rx.nonce;
            if seq >= rec.limit {
                return Err(rx.break_with("the TLS keys of this connection are worn out (confidentiality limit); a new connection gets new ones".into()));
            }
            let (start, end) = (rx.start + RECORD_HEADER, rx.start + RECORD_HEADER + len);
            let base = rx.buf.as_ptr() as usize;
            let opened = {
                let msg = InboundOpaqueMessage::new(
                    ContentType::ApplicationData,
                    ProtocolVersion::TLSv1_2,
                    &mut rx.buf[start..end],
                );
                lock(&rec.dec)
                    .decrypt(msg, seq)
                    .map(|m| (m.typ, m.payload.as_ptr() as usize - base, m.payload.len()))
            };
            let (typ, at, n) = opened.map_err(|e| {
                rx.break_with(format!(
                    "TLS record {seq} failed authentication ({e}): the stream was changed, cut or replayed on the way"
                ))
            })?;
            rx.nonce += 1;
            rx.start = end;
            match typ {
                ContentType::ApplicationData => {
                    let room = out.len() - filled;
                    let k = n.min(room);
                    out[filled..filled + k].copy_from_slice(&rx.buf[at..at + k]);
                    filled += k;
                    if k < n {
                        rx.plain.clear();
                        rx.plain.extend_from_slice(&rx.buf[at + k..at + n]);
                        rx.plain_pos = 0;
                    }
                }
                ContentType::Alert if n == 2 && rx.buf[at + 1] == u8::from(AlertDescription::CloseNotify) => {
                    rx.eof = true;
                    rx.start = rx.end;
                    return Ok(filled);
                }
                other => {
                    let what = if other == ContentType::Alert {
                        format!(
                            "TLS alert {:?}",
                            AlertDescription::from(rx.buf.get(at + 1).copied().unwrap_or(0))
                        )
                    } else {
                        format!("a {other:?} record after the handshake")
                    };
                    return Err(rx.break_with(format!("the peer sent {what}")));
                }
            }
        }
        if filled > 0 {
            return Ok(filled);
        }
        if rx.eof {
            // A socket end without close_notify is an end of file like the plaintext one: the
            // wire protocol's own end frames say whether it came too early.
            return Ok(0);
        }
        rx.fill(sock)?;
    }
}

/// Seal one piece of plaintext into TLS records queued on `tx`.
pub(super) fn seal(rec: &Records, piece: &[&[u8]], tx: &mut Tx) -> io::Result<()> {
    let mut enc = lock(&rec.enc);
    for record in pieces_of(piece, MAX_FRAGMENT) {
        let seq = tx.nonce;
        if seq >= rec.limit {
            return Err(io::Error::other(
                "the TLS keys of this connection are worn out (confidentiality limit); a new connection gets new ones",
            ));
        }
        let msg = OutboundPlainMessage {
            typ: ContentType::ApplicationData,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::new(&record),
        };
        let sealed =
            enc.encrypt(msg, seq).map_err(|e| io::Error::other(format!("cannot seal a TLS record: {e}")))?;
        tx.push_record(sealed.encode());
        tx.nonce += 1;
    }
    Ok(())
}
