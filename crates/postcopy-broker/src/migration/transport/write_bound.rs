//! Bounded writes on a migration connection (`--write-timeout`): the kernel's TCP_USER_TIMEOUT,
//! so that a peer that stops reading without closing (or a path that silently drops everything)
//! cannot block a writer until TCP gives up by itself, minutes to hours later. Once bytes given
//! to the connection stay unacknowledged, or unsent behind the peer's zero window, for longer
//! than the bound, the kernel drops the connection and every operation on it fails with
//! ETIMEDOUT: a blocking write inside a TLS or Noise record as well as a plaintext one, and the
//! reader of the same connection too. [`explain`] turns that into an error naming the bound.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};

/// Default of `--write-timeout`. Long against any pause of a working peer (a starved stream
/// thread placing a 2 MiB run, a huge-page allocation, a destination busy answering a resume:
/// seconds at worst on the machines measured), short against the recovery bound (the source
/// retries a resume for 60 s by default), so a stuck peer becomes an ordinary cut and the
/// resume still has most of its time.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Set the bound `t` on `sock` (zero: the kernel's default, no bound of ours).
pub(super) fn arm(sock: &TcpStream, t: Duration) -> io::Result<()> {
    let ms = u32::try_from(t.as_millis()).unwrap_or(u32::MAX);
    setsockopt(sock, sockopt::TcpUserTimeout, &ms).map_err(io::Error::from)
}

/// `e` with a message that says which bound passed, when it is the kernel's ETIMEDOUT of a
/// connection bounded by `t`; otherwise `e` unchanged.
pub(super) fn explain(e: io::Error, peer: SocketAddr, t: Duration) -> io::Error {
    if t.is_zero() || e.raw_os_error() != Some(libc::ETIMEDOUT) {
        return e;
    }
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "write timeout: the peer at {peer} took none of the bytes written to it for {t:?} (--write-timeout): it stopped reading or the path to it is cut; the connection was dropped"
        ),
    )
}
