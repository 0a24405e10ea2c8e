//! The service manager's file descriptor store (sd_notify(3) `FDSTORE=1`): fds the broker parks
//! outside itself so that a broker restarted after its own death finds them again, handed back
//! at the next start through `LISTEN_FDS` / `LISTEN_FDNAMES` (sd_listen_fds_with_names(3)).
//!
//! [`FdStore`] sends `FDSTORE=1` + `FDNAME=` with one fd as SCM_RIGHTS (one fd per name keeps
//! removal exact), and `FDSTOREREMOVE=1` + `FDNAME=`, to `$NOTIFY_SOCKET`. systemd keeps them
//! with `FileDescriptorStoreMax=` set in the unit (contrib/systemd); without systemd,
//! `pcb-keeper` speaks the same protocol. [`Parked`] holds the fds passed at start, by name.

use std::collections::BTreeMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use nix::sys::socket::{
    sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// Where to send fd store messages (`$NOTIFY_SOCKET`).
#[derive(Debug)]
pub struct FdStore {
    sock: OwnedFd,
    addr: UnixAddr,
}

/// The address `$NOTIFY_SOCKET` names: a path or an `@abstract` socket.
pub fn notify_addr(target: &[u8]) -> io::Result<UnixAddr> {
    match target.first() {
        Some(b'@') => UnixAddr::new_abstract(&target[1..]).map_err(io::Error::from),
        Some(b'/') => {
            UnixAddr::new(std::ffi::OsStr::new(std::str::from_utf8(target).map_err(io::Error::other)?))
                .map_err(io::Error::from)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "NOTIFY_SOCKET: only Unix sockets (a path or @name) are supported",
        )),
    }
}

impl FdStore {
    /// The store of the service manager that runs us (None without `$NOTIFY_SOCKET`).
    pub fn from_env() -> io::Result<Option<FdStore>> {
        let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(None) };
        let addr = notify_addr(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()))?;
        let sock = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
        Ok(Some(FdStore { sock, addr }))
    }

    fn send(&self, text: &str, fds: &[i32]) -> io::Result<()> {
        let iov = [IoSlice::new(text.as_bytes())];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
        sendmsg(self.sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), Some(&self.addr))?;
        Ok(())
    }

    /// Park `fd` under `name` (`FDSTORE=1`, `FDNAME=name`).
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.send(&format!("FDSTORE=1\nFDNAME={name}"), &[fd.as_raw_fd()])
    }

    /// Drop what is parked under `name` (`FDSTOREREMOVE=1`).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
    }
}

/// Fds handed back at start, by name (several may share one).
#[derive(Debug, Default)]
pub struct Parked {
    fds: Mutex<BTreeMap<String, Vec<OwnedFd>>>,
}

impl Parked {
    /// Hold `fds`.
    pub fn new(fds: Vec<(String, OwnedFd)>) -> Parked {
        let mut m: BTreeMap<String, Vec<OwnedFd>> = BTreeMap::new();
        for (name, fd) in fds {
            m.entry(name).or_default().push(fd);
        }
        Parked { fds: Mutex::new(m) }
    }

    /// Take the (last) fd parked under `name`.
    pub fn take(&self, name: &str) -> Option<OwnedFd> {
        let mut g = self.fds.lock().ok()?;
        let v = g.get_mut(name)?;
        let fd = v.pop();
        if v.is_empty() {
            g.remove(name);
        }
        fd
    }

    /// The names held, in order.
    pub fn names(&self) -> Vec<String> {
        self.fds.lock().map(|g| g.keys().cloned().collect()).unwrap_or_default()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.fds.lock().map(|g| g.is_empty()).unwrap_or(true)
    }

    /// Close what nobody took, with a warning naming it.
    pub fn close_rest(&self, why: &str) {
        let rest = self.fds.lock().map(|mut g| std::mem::take(&mut *g)).unwrap_or_default();
        for (name, fds) in rest {
            log::warn!("closing {} passed fd(s) named '{name}': {why}", fds.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn parked_fds_are_taken_by_name() {
        let f = |_: u8| OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let p = Parked::new(vec![("a".into(), f(0)), ("b".into(), f(1)), ("a".into(), f(2))]);
        assert_eq!(p.names(), vec!["a", "b"]);
        assert!(p.take("a").is_some() && p.take("a").is_some() && p.take("a").is_none());
        assert!(p.take("b").is_some());
        assert!(p.is_empty());
    }

    #[test]
    fn a_store_message_carries_its_fd() {
        use nix::sys::socket::{bind, recvmsg, ControlMessageOwned};
        let name = format!("pcb-fdstore-test-{}", std::process::id());
        let rx = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).unwrap();
        bind(rx.as_raw_fd(), &UnixAddr::new_abstract(name.as_bytes()).unwrap()).unwrap();
        let store = FdStore {
            sock: socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).unwrap(),
            addr: notify_addr(format!("@{name}").as_bytes()).unwrap(),
        };
        let file = std::fs::File::open("/dev/null").unwrap();
        store.store("x.1", file.as_fd()).unwrap();
        let mut buf = [0u8; 256];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([i32; 4]);
        let m = recvmsg::<()>(rx.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty()).unwrap();
        let fds: Vec<i32> = m
            .cmsgs()
            .unwrap()
            .filter_map(|c| if let ControlMessageOwned::ScmRights(f) = c { Some(f) } else { None })
            .flatten()
            .collect();
        let n = m.bytes;
        assert_eq!(&buf[..n], b"FDSTORE=1\nFDNAME=x.1");
        assert_eq!(fds.len(), 1);
        // SAFETY: the fd just arrived with the message and is ours alone.
        drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) });
    }
}
