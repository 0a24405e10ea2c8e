//! Sending and receiving bytes with file descriptors attached (SCM_RIGHTS) on a Unix stream
//! socket. Received fds become [`OwnedFd`]s at once, also when the kernel had to truncate them, so
//! nothing a peer sends can leak.
//!
//! Sending goes through nix's `sendmsg` with `ControlMessage::ScmRights`. Receiving is written
//! here on purpose: nix 0.29's `RecvMsg::cmsgs` refuses to walk the control data when the kernel
//! set `MSG_CTRUNC` (it returns `ENOBUFS`), so the fds that did arrive would stay open in this
//! process with nobody owning them, and a peer that attaches too many fds to every message would
//! leak fds into the broker; vmm-sys-util's `ScmSocket::recv_with_fds` closes them, but receives
//! without `MSG_CMSG_CLOEXEC` (an fd can leak into a child exec'd in between) and loses the
//! message's bytes with the error.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use super::frame::MAX_FDS;

/// Control buffer in u64 units (8-byte aligned as `cmsghdr` needs): room for [`MAX_FDS`] fds.
const CMSG_BUF_WORDS: usize = 8;

/// The result of one receive.
#[derive(Debug)]
pub struct Received {
    /// Bytes read into the buffer; 0 means end of file.
    pub bytes: usize,
    /// Fds that came with them (close-on-exec).
    pub fds: Vec<OwnedFd>,
    /// The peer sent more fds than fit ([`MAX_FDS`]); the kernel closed the rest.
    pub fds_truncated: bool,
}

/// One `recvmsg` on `sock` into `buf`, collecting SCM_RIGHTS fds. With `nonblocking`, an empty
/// socket gives `ErrorKind::WouldBlock`. EINTR is retried.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], nonblocking: bool) -> io::Result<Received> {
    let mut cmsg_buf = [0u64; CMSG_BUF_WORDS];
    #[allow(clippy::cast_possible_truncation)] // MAX_FDS ints: 32 bytes
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * mem::size_of::<RawFd>()) as libc::c_uint) } as usize;
    debug_assert!(space <= mem::size_of_val(&cmsg_buf));
    let mut flags = libc::MSG_CMSG_CLOEXEC;
    if nonblocking {
        flags |= libc::MSG_DONTWAIT;
    }
    loop {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = space.min(mem::size_of_val(&cmsg_buf)) as _;
        // SAFETY: msg points at a live iovec over `buf` and at `cmsg_buf`, both valid for the
        // lengths given and for the duration of the call.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) };
        // Negative: failed (the count of a success always fits a usize).
        let Ok(n) = usize::try_from(r) else {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        };
        let mut fds = Vec::new();
        // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR walk only inside msg_control
        // as bounded by msg_controllen, which the kernel set to what it wrote.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: cmsg is non-null and points inside cmsg_buf (see above).
            let hdr = unsafe { ptr::read_unaligned(cmsg) };
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN only computes a size.
                let header = unsafe { libc::CMSG_LEN(0) } as usize;
                let count = (hdr.cmsg_len as usize).saturating_sub(header) / mem::size_of::<RawFd>();
                // SAFETY: CMSG_DATA points at the payload of this header inside cmsg_buf.
                let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
                for i in 0..count {
                    // SAFETY: the kernel wrote `count` ints after the header (cmsg_len covers
                    // them); each is a new fd installed in this process that nobody else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(ptr::read_unaligned(data.add(i))) };
                    fds.push(fd);
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR; NXTHDR returns null past the end.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        return Ok(Received { bytes: n, fds, fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0 });
    }
}

/// One `sendmsg` of `data` with `fds` attached (MSG_NOSIGNAL; MSG_DONTWAIT if `nonblocking`).
/// Returns the bytes sent, which may be fewer than `data.len()`. EINTR is retried.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    nonblocking: bool,
) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_FDS} fds fit in one frame, asked to send {}", fds.len()),
        ));
    }
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let mut flags = MsgFlags::MSG_NOSIGNAL;
    if nonblocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    let iov = [io::IoSlice::new(data)];
    loop {
        // The fds are borrowed and stay open for the call.
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, flags, None) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Send all of `data`, the fds with its first byte. A partial write continues without fds. With
/// `nonblocking`, a full socket buffer gives `ErrorKind::WouldBlock` (the stream is then
/// unusable: drop the connection).
pub fn send_all(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    nonblocking: bool,
) -> io::Result<()> {
    let mut sent = send_with_fds(sock, data, fds, nonblocking)?;
    while sent < data.len() {
        let n = send_with_fds(sock, &data[sent..], &[], nonblocking)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "the socket accepted no bytes"));
        }
        sent += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fds_travel_and_excess_is_truncated() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<std::fs::File> =
            (0..MAX_FDS).map(|_| std::fs::File::open("/dev/null").unwrap()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        send_all(a.as_fd(), b"hello", &borrowed, false).unwrap();
        let mut buf = [0u8; 64];
        let r = recv_with_fds(b.as_fd(), &mut buf, true).unwrap();
        assert_eq!(&buf[..r.bytes], b"hello");
        assert_eq!(r.fds.len(), MAX_FDS);
        assert!(!r.fds_truncated);
        assert!(send_with_fds(a.as_fd(), b"x", &[borrowed[0]; MAX_FDS + 1], false).is_err());
        let e = recv_with_fds(b.as_fd(), &mut buf, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // A peer that sends more than MAX_FDS: the extra ones are cut off by the kernel.
        let many: Vec<RawFd> = (0..MAX_FDS + 2).map(|i| borrowed[i % MAX_FDS].as_raw_fd()).collect();
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&many)];
        let iov = [std::io::IoSlice::new(b"y")];
        nix::sys::socket::sendmsg::<()>(
            a.as_raw_fd(),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .unwrap();
        let r = recv_with_fds(b.as_fd(), &mut buf, true).unwrap();
        assert_eq!(r.bytes, 1);
        assert_eq!(r.fds.len(), MAX_FDS);
        assert!(r.fds_truncated);
        drop(a);
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf, true).unwrap().bytes, 0);
    }
}
