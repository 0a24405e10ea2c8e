//! A throw-away certificate authority (rcgen, ECDSA P-256) that writes TLS directories in the
//! layout of [`tls`](super::tls), for the demo and the tests. Real deployments use their own CA
//! (see docs/security.md for an openssl recipe).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::tls::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};
use super::TransportError;

/// Which end a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    /// The destination: `server-cert.pem`, `server-key.pem`.
    Server,
    /// The source: `client-cert.pem`, `client-key.pem`.
    Client,
}

/// A CA made up on the spot; its key lives only in this value.
pub struct ThrowawayCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for ThrowawayCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrowawayCa").finish_non_exhaustive()
    }
}

fn gen_err(e: rcgen::Error) -> TransportError {
    TransportError::Options(format!("cannot make a throw-away certificate: {e}"))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), TransportError> {
    let err =
        |e: std::io::Error| TransportError::Setup { path: path.display().to_string(), why: e.to_string() };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

impl ThrowawayCa {
    /// A new CA whose certificate has the common name `name`.
    pub fn new(name: &str) -> Result<ThrowawayCa, TransportError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(ThrowawayCa { issuer: Issuer::new(params, key), cert_pem: cert.pem() })
    }

    /// Write `ca-cert.pem` into `dir`.
    pub fn write_ca(&self, dir: &Path) -> Result<(), TransportError> {
        write(&dir.join(CA_CERT), &self.cert_pem, 0o644)
    }

    /// Issue a certificate for `leaf` valid for `names` (DNS names or IP addresses) and write it
    /// with its key (mode 0600) into `dir`.
    pub fn issue(&self, dir: &Path, leaf: Leaf, names: &[&str]) -> Result<(), TransportError> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .map_err(gen_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("postcopy-broker"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match leaf {
            Leaf::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Leaf::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        let (c, k) = match leaf {
            Leaf::Server => (SERVER_CERT, SERVER_KEY),
            Leaf::Client => (CLIENT_CERT, CLIENT_KEY),
        };
        write(&dir.join(c), &cert.pem(), 0o644)?;
        write(&dir.join(k), &key.serialize_pem(), 0o600)
    }

    /// Write a whole directory for both ends: the CA, and a server and a client certificate
    /// valid for `names`.
    pub fn write_dir(&self, dir: &Path, names: &[&str]) -> Result<(), TransportError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| TransportError::Setup { path: dir.display().to_string(), why: e.to_string() })?;
        self.write_ca(dir)?;
        self.issue(dir, Leaf::Server, names)?;
        self.issue(dir, Leaf::Client, names)
    }
}
