//! The daemon's side of systemd: the control socket handed over by socket activation (and the
//! fds a dead broker parked in the fd store, passed the same way), and readiness and status
//! notifications.
//!
//! Socket activation (sd_listen_fds(3)) goes through the `sd-notify` crate, which checks
//! LISTEN_PID against our pid, sets CLOEXEC on fds 3.. and unsets LISTEN_PID, LISTEN_FDS and
//! LISTEN_FDNAMES. Notifications (sd_notify(3): READY=1, STATUS=, STOPPING=1, ERRNO=) are sent
//! here instead of by that crate, because it connects to `$NOTIFY_SOCKET` as a file path, and
//! an `@name` there is an abstract socket (what systemd uses for services in containers and
//! what `systemd-run` and tests use).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use crate::fdstore::Parked;
use postcopy_broker::error::{Error, Result};

/// The name (`FileDescriptorName=` in the .socket unit) of the control socket among the
/// activation fds; with a single fd its name does not matter.
pub const CONTROL_FD_NAME: &str = "control";

/// Take the fds the service manager passed (sd_listen_fds_with_names(3)): the control socket
/// (None when not socket-activated), and every other fd by name ([`Parked`]: what a broker
/// that died parked in the fd store, see [`crate::fdstore`]). A single fd is the control socket
/// whatever its name.
///
/// # Safety
///
/// Unsets environment variables: call it before the process starts any thread.
pub unsafe fn take_listen_fds() -> Result<(Option<OwnedFd>, Parked)> {
    let bad = |e: io::Error| Error::Invalid(format!("socket activation: {e} (check the .socket unit)"));
    // SAFETY: the caller guarantees that no other thread runs (see above).
    let fds: Vec<(i32, String)> =
        unsafe { sd_notify::listen_fds_with_names_and_unset_env() }.map_err(bad)?.collect();
    let single = fds.len() == 1;
    let mut control = None;
    let mut rest = Vec::new();
    for (fd, name) in fds {
        // SAFETY: sd_listen_fds passes fds 3.. to this process for it to own; each is taken once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        if (single || name == CONTROL_FD_NAME) && control.is_none() {
            control = Some(owned);
        } else {
            rest.push((name, owned));
        }
    }
    if control.is_none() && !rest.is_empty() {
        return Err(Error::Invalid(format!(
            "socket activation: none of the passed sockets is named '{CONTROL_FD_NAME}' (FileDescriptorName=)"
        )));
    }
    Ok((control, Parked::new(rest)))
}

/// Send one sd_notify(3) message (lines such as `READY=1`) to `$NOTIFY_SOCKET`, a path or an
/// `@abstract` Unix datagram socket. Ok(false): not run under a service manager.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(false) };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
    let addr = match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
        Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(&target))?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "NOTIFY_SOCKET={}: only Unix sockets (a path or @name) are supported",
                    target.to_string_lossy()
                ),
            ))
        }
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// [`notify`], logging a failure instead of returning it (the service manager then only misses
/// one status line, or times the start out, which says enough).
pub fn tell(state: &str) {
    if let Err(e) = notify(state) {
        log::warn!("sd_notify {:?}: {e}", state.lines().next().unwrap_or(""));
    }
}

/// The ERRNO= value for a failure: the OS error if there is one, else EIO.
pub fn errno_of(e: &Error) -> i32 {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(code) = s.downcast_ref::<io::Error>().and_then(io::Error::raw_os_error) {
            return code;
        }
        src = s.source();
    }
    libc::EIO
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_of_an_io_error_and_of_others() {
        let e = Error::io("x", io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(errno_of(&e), libc::ENOENT);
        assert_eq!(errno_of(&Error::Invalid("y".into())), libc::EIO);
    }
}
