//! Migration test helpers: a scratch directory, the credentials of a migration (a throw-away
//! TLS directory or a key file), a seeded PRNG and RAM contents.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use postcopy_broker::migration::transport::throwaway::ThrowawayCa;
use postcopy_broker::migration::transport::tls::TlsSetup;
use postcopy_broker::migration::transport::Security;

/// A scratch directory removed at the end.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("pcb-recovery-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What both ends of a test migration authenticate with.
#[derive(Debug, Clone)]
pub enum Creds {
    /// `--tls-dir DIR`: one directory with all five files (a throw-away CA).
    Tls(PathBuf),
    /// `--key FILE`.
    Psk(PathBuf),
}

impl Creds {
    /// A throw-away CA and certificates for localhost / 127.0.0.1 in `dir`/tls.
    pub fn tls(dir: &Path) -> Creds {
        let d = dir.join("tls");
        ThrowawayCa::new("test CA").unwrap().write_dir(&d, &["localhost", "127.0.0.1"]).unwrap();
        Creds::Tls(d)
    }

    /// A key file at `path`.
    pub fn psk(path: &Path) -> Creds {
        write_key(path);
        Creds::Psk(path.to_path_buf())
    }

    /// The command line options.
    pub fn args(&self) -> Vec<OsString> {
        match self {
            Creds::Tls(d) => vec!["--tls-dir".into(), d.into()],
            Creds::Psk(k) => vec!["--key".into(), k.into()],
        }
    }

    /// The source's security.
    pub fn source(&self) -> Security {
        match self {
            Creds::Tls(d) => Security::tls(TlsSetup::source(d, None).unwrap()),
            Creds::Psk(k) => Security::psk(&postcopy_broker::migration::load_key(k).unwrap()).unwrap(),
        }
    }

    /// The destination's security.
    pub fn destination(&self) -> Security {
        match self {
            Creds::Tls(d) => Security::tls(TlsSetup::destination(d, None).unwrap()),
            Creds::Psk(k) => Security::psk(&postcopy_broker::migration::load_key(k).unwrap()).unwrap(),
        }
    }
}

pub fn write_key(path: &Path) -> Vec<u8> {
    let key: String = (0..32u8).map(|i| format!("{:02x}", i.wrapping_mul(53) ^ 0x5a)).collect();
    std::fs::write(path, key).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    postcopy_broker::migration::load_key(path).unwrap()
}

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Pseudo-random pages, every `zero_every`-th page zero (none when `zero_every` is 0).
pub fn contents(size: usize, ps: usize, seed: u64, zero_every: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut r = Rng(seed | 1);
    for (i, page) in v.chunks_mut(ps).enumerate() {
        if zero_every > 0 && i % zero_every == zero_every - 1 {
            continue;
        }
        for w in page.chunks_mut(8) {
            w.copy_from_slice(&r.next().to_le_bytes()[..w.len()]);
        }
    }
    v
}

/// A `postcopy-broker serve --incoming LISTEN` process with its control socket at `control`,
/// the address it listens on (its first stdout line), and the rest of its stdout.
pub fn spawn_serve(
    control: &Path,
    creds: &Creds,
    listen: &str,
    extra: &[&str],
) -> (std::process::Child, String, std::io::BufReader<std::process::ChildStdout>) {
    spawn_serve_env(control, creds, listen, extra, &[])
}

/// [`spawn_serve`] with more environment variables (a failpoint, say).
pub fn spawn_serve_env(
    control: &Path,
    creds: &Creds,
    listen: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Child, String, std::io::BufReader<std::process::ChildStdout>) {
    use std::io::BufRead;
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["serve", "--incoming", listen, "--control"])
        .arg(control)
        .args(creds.args())
        .args(extra)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr =
        line.trim().strip_prefix("listening ").unwrap_or_else(|| panic!("serve said {line:?}")).to_string();
    (c, addr, out)
}
