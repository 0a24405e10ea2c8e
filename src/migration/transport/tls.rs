//! The TLS mode: mutual TLS 1.3 with rustls (ring provider), certificates from a directory laid
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
//! After the handshake the rustls connection lives behind a mutex that is held only while
//! records are opened or sealed, never while the socket blocks, so a reader and a writer on
//! different threads never wait for each other's I/O.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, CertificateError, ClientConfig, Connection, RootCertStore, ServerConfig};

use super::deadline::Deadline;
use super::sealed::{Rx, Tx};
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

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
        Ok(TlsSetup { dir: dir.to_path_buf(), role: Role::Destination { config: Arc::new(config), pin } })
    }

    /// The source's handshake with the destination at `addr` (HOST:PORT).
    pub(super) fn connect(
        &self,
        io: &mut Deadline<'_, TcpStream>,
        addr: &str,
    ) -> Result<(Connection, Option<Vec<u8>>), TransportError> {
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
        let identity = conn.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
        conn.set_buffer_limit(None);
        Ok((conn, identity))
    }

    /// The destination's handshake with a source.
    pub(super) fn accept(
        &self,
        io: &mut Deadline<'_, TcpStream>,
    ) -> Result<(Connection, Option<Vec<u8>>), TransportError> {
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
        conn.set_buffer_limit(None);
        Ok((conn, Some(cert.to_vec())))
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

/// If `e` carries an alert the peer sent about our certificate (a TLS 1.3 client learns that
/// the server refused its certificate only on its first read after the handshake), what it means.
pub(super) fn refusal(e: &io::Error) -> Option<String> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) if *a != AlertDescription::CloseNotify => Some(format!(
            "the destination refused this source (TLS alert {a:?}): is client-cert.pem signed by the CA of the destination's ca-cert.pem, valid now, and for the name it requires (--tls-peer-name)?"
        )),
        _ => None,
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

/// Tell an authenticated peer why it is refused: an Error frame inside the TLS connection.
fn refuse_inside(conn: &mut Connection, io: &mut Deadline<'_, TcpStream>, text: &str) -> io::Result<()> {
    let mut frame = Vec::new();
    crate::migration::wire::encode(&crate::migration::wire::Frame::Error { text }, &mut frame)
        .map_err(|e| io::Error::other(e.to_string()))?;
    conn.writer().write_all(&frame)?;
    conn.send_close_notify();
    while conn.wants_write() {
        conn.write_tls(io)?;
    }
    io.flush()
}

fn tls_err(rx: &mut Rx, e: rustls::Error) -> io::Error {
    rx.broken = Some(format!("TLS: {e}"));
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Read opened bytes into `out`: what rustls holds, then what `rx` holds, then the socket.
pub(super) fn read(
    sock: &TcpStream,
    conn: &Mutex<Connection>,
    rx: &mut Rx,
    out: &mut [u8],
) -> io::Result<usize> {
    rx.check()?;
    if out.is_empty() {
        return Ok(0);
    }
    loop {
        let mut filled = 0;
        {
            let mut c = lock(conn);
            loop {
                match c.reader().read(&mut out[filled..]) {
                    // close_notify: end of file after what this call already has.
                    Ok(0) if filled == 0 => return Ok(0),
                    Ok(0) => break,
                    Ok(n) => {
                        filled += n;
                        if filled == out.len() {
                            break;
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The socket ended without close_notify: an end of file like the plaintext
                    // one (the wire protocol's own end frames say whether it came too early).
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && filled == 0 => return Ok(0),
                    Err(e) if filled == 0 => return Err(e),
                    Err(_) => break,
                }
                if !rx.sealed().is_empty() {
                    let n = c.read_tls(&mut rx.sealed())?;
                    rx.start += n;
                    c.process_new_packets().map_err(|e| tls_err(rx, e))?;
                    continue;
                }
                if rx.eof && !rx.eof_told {
                    rx.eof_told = true;
                    c.read_tls(&mut io::empty())?;
                    c.process_new_packets().map_err(|e| tls_err(rx, e))?;
                    continue;
                }
                if rx.eof && filled == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection",
                    ));
                }
                break;
            }
        }
        if filled > 0 {
            return Ok(filled);
        }
        rx.fill(sock)?;
    }
}

/// Seal one piece of plaintext into TLS records appended to `tx.pending`.
pub(super) fn seal(conn: &Mutex<Connection>, piece: &[&[u8]], tx: &mut Tx) -> io::Result<()> {
    let mut c = lock(conn);
    let slices: Vec<IoSlice<'_>> = piece.iter().map(|s| IoSlice::new(s)).collect();
    let total: usize = piece.iter().map(|s| s.len()).sum();
    let mut done = 0;
    while done < total {
        // Without a buffer limit rustls takes everything at once; keep going if it ever does not.
        let mut rest = Vec::new();
        let mut skip = done;
        for s in piece {
            if skip >= s.len() {
                skip -= s.len();
                continue;
            }
            rest.push(IoSlice::new(&s[skip..]));
            skip = 0;
        }
        let n = c.writer().write_vectored(if done == 0 { &slices } else { &rest })?;
        if n == 0 {
            return Err(io::Error::other("TLS did not accept the bytes to send"));
        }
        done += n;
        while c.wants_write() {
            c.write_tls(&mut tx.pending)?;
        }
    }
    Ok(())
}
