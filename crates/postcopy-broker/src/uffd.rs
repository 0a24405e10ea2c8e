//! A thin, honest wrapper over one userfaultfd object.
//!
//! It owns the fd and exposes exactly the ioctls the broker needs (API, REGISTER, UNREGISTER,
//! COPY, ZEROPAGE, WAKE) plus batched message reads, and reads a peer's uffd features from
//! fdinfo. It stays the project's own, instead of the `userfaultfd` crate's `Uffd`, only where
//! that crate is wrong for a placer that must know exactly which bytes landed:
//!
//! - UFFDIO_COPY: on EAGAIN the crate returns `Error::PartiallyCopied(copy.copy as usize)`, but
//!   the kernel may leave `copy` at `-EAGAIN` (nothing copied), which that cast turns into a
//!   huge "partial" count; here `copy` is decoded as the signed field it is (a count, or a
//!   negative errno: nothing done, retry).
//! - UFFDIO_ZEROPAGE: on any error the crate returns `ZeropageFailed(errno)` and drops the
//!   `zeropage` field, so a zero run interrupted by EAGAIN loses how much was already zeroed;
//!   here the partial count is kept, so received bits are set only for those pages.
//! - Around those, it returns the features the kernel granted and reads raw `uffd_msg`s into a
//!   caller-owned buffer, so the fault path never allocates.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use userfaultfd_sys as sys;

pub use sys::uffd_msg as RawMsg;

/// `USERFAULTFD_IOC_NEW` = `_IO(0xAA, 0x00)`: creates a userfaultfd from /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
/// `UFFD_USER_MODE_ONLY` as an open flag.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// The path of the userfaultfd device node (Linux 6.1+).
pub const DEVICE_PATH: &str = "/dev/userfaultfd";

/// Feature bits of `UFFDIO_API`.
pub mod feature {
    use userfaultfd_sys as sys;
    /// Fork events (needs CAP_SYS_PTRACE).
    pub const EVENT_FORK: u64 = sys::UFFD_FEATURE_EVENT_FORK;
    /// mremap events.
    pub const EVENT_REMAP: u64 = sys::UFFD_FEATURE_EVENT_REMAP;
    /// madvise(DONTNEED/REMOVE) events.
    pub const EVENT_REMOVE: u64 = sys::UFFD_FEATURE_EVENT_REMOVE;
    /// munmap events.
    pub const EVENT_UNMAP: u64 = sys::UFFD_FEATURE_EVENT_UNMAP;
    /// MISSING mode on hugetlbfs.
    pub const MISSING_HUGETLBFS: u64 = sys::UFFD_FEATURE_MISSING_HUGETLBFS;
    /// MISSING mode on shmem (memfd, tmpfs, MAP_SHARED anonymous).
    pub const MISSING_SHMEM: u64 = sys::UFFD_FEATURE_MISSING_SHMEM;
    /// Faulting thread id in page-fault messages.
    pub const THREAD_ID: u64 = sys::UFFD_FEATURE_THREAD_ID;
    /// MINOR mode on shmem.
    pub const MINOR_SHMEM: u64 = sys::UFFD_FEATURE_MINOR_SHMEM;
    /// A missing fault raises SIGBUS (fails) instead of waiting for a reader.
    pub const SIGBUS: u64 = sys::UFFD_FEATURE_SIGBUS;
    /// Names of the bits, for reports.
    pub const NAMES: &[(u64, &str)] = &[
        (sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
        (EVENT_FORK, "EVENT_FORK"),
        (EVENT_REMAP, "EVENT_REMAP"),
        (EVENT_REMOVE, "EVENT_REMOVE"),
        (MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
        (MISSING_SHMEM, "MISSING_SHMEM"),
        (EVENT_UNMAP, "EVENT_UNMAP"),
        (sys::UFFD_FEATURE_SIGBUS, "SIGBUS"),
        (THREAD_ID, "THREAD_ID"),
        (sys::UFFD_FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
        (MINOR_SHMEM, "MINOR_SHMEM"),
        (sys::UFFD_FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS"),
        (sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
    ];
}

/// Bits of the `ioctls` masks returned by `UFFDIO_API` and `UFFDIO_REGISTER`.
pub mod ioctl_bit {
    use userfaultfd_sys as sys;
    /// UFFDIO_WAKE is allowed on the range.
    pub const WAKE: u64 = 1 << sys::_UFFDIO_WAKE;
    /// UFFDIO_COPY is allowed on the range.
    pub const COPY: u64 = 1 << sys::_UFFDIO_COPY;
    /// UFFDIO_ZEROPAGE is allowed on the range.
    pub const ZEROPAGE: u64 = 1 << sys::_UFFDIO_ZEROPAGE;
    /// UFFDIO_REGISTER is allowed.
    pub const REGISTER: u64 = 1 << sys::_UFFDIO_REGISTER;
    /// UFFDIO_UNREGISTER is allowed.
    pub const UNREGISTER: u64 = 1 << sys::_UFFDIO_UNREGISTER;
}

/// Page-fault event code.
pub const EVENT_PAGEFAULT: u8 = sys::UFFD_EVENT_PAGEFAULT;
/// Fork event code.
pub const EVENT_FORK: u8 = sys::UFFD_EVENT_FORK;
/// Remap event code.
pub const EVENT_REMAP: u8 = sys::UFFD_EVENT_REMAP;
/// Remove event code.
pub const EVENT_REMOVE: u8 = sys::UFFD_EVENT_REMOVE;
/// Unmap event code.
pub const EVENT_UNMAP: u8 = sys::UFFD_EVENT_UNMAP;

/// How a userfaultfd is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creation {
    /// Through `/dev/userfaultfd` and `USERFAULTFD_IOC_NEW`.
    Device,
    /// Through the `userfaultfd(2)` system call.
    Syscall,
}

/// Outcome of a COPY or ZEROPAGE ioctl, decoded from the signed result field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// This many bytes were filled (may be less than asked: continue after them).
    Done(u64),
    /// Nothing was done because the context is changing (pending non-cooperative events) or the
    /// copy was interrupted: drain events and retry.
    Again,
    /// The destination already holds a page (`EEXIST`).
    Exists,
}

/// A userfaultfd object.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
    ioctls: u64,
}

/// One decoded userfaultfd message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// A page fault at `addr` (exact or page-masked, depending on features).
    Pagefault {
        /// Faulting address in the faulting process.
        addr: u64,
        /// Write fault.
        write: bool,
        /// Faulting thread id, if THREAD_ID was enabled, else 0.
        tid: u32,
    },
    /// The process forked; `child_fd` is a new userfaultfd installed in the reader.
    Fork {
        /// The child's uffd, now owned by the reader.
        child_fd: RawFd,
    },
    /// mremap moved a range.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// madvise removed `[start, end)`; the range stays registered.
    Remove {
        /// Start.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// munmap removed `[start, end)`.
    Unmap {
        /// Start.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// An event this build does not know.
    Unknown(u8),
}

impl Message {
    /// Decode a raw message.
    pub fn decode(m: &RawMsg) -> Message {
        let event = m.event;
        // SAFETY: the kernel fills the union member that matches `event`; every member is plain
        // integers, so reading any of them is defined, and we read only the one `event` selects.
        unsafe {
            match event {
                EVENT_PAGEFAULT => {
                    let pf = m.arg.pagefault;
                    Message::Pagefault {
                        addr: pf.address,
                        write: pf.flags & sys::UFFD_PAGEFAULT_FLAG_WRITE != 0,
                        tid: pf.feat.ptid,
                    }
                }
                // A number past i32 is no fd: -1, which nothing takes for one.
                EVENT_FORK => Message::Fork { child_fd: RawFd::try_from(m.arg.fork.ufd).unwrap_or(-1) },
                EVENT_REMAP => {
                    let r = m.arg.remap;
                    Message::Remap { from: r.from, to: r.to, len: r.len }
                }
                EVENT_REMOVE => {
                    let r = m.arg.remove;
                    Message::Remove { start: r.start, end: r.end }
                }
                EVENT_UNMAP => {
                    let r = m.arg.remove;
                    Message::Unmap { start: r.start, end: r.end }
                }
                other => Message::Unknown(other),
            }
        }
    }
}

/// What `/proc/self/fd/N` links to for a userfaultfd.
const ANON_INODE_NAME: &str = "anon_inode:[userfaultfd]";

/// What an fd is, as /proc names it (`anon_inode:[userfaultfd]`, `pipe:[123]`, a path...).
pub fn fd_kind(fd: RawFd) -> io::Result<String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))?;
    Ok(link.to_string_lossy().into_owned())
}

/// Check that `fd` (handed in by a peer or named in a kernel event) is a userfaultfd: anything
/// else (a pipe, a socket, an eventfd) would let the peer write forged fault messages, or make
/// the broker adopt one of its own fds. Returns what the fd is instead, as the error.
pub fn check_userfaultfd(fd: RawFd) -> std::result::Result<(), String> {
    if fd < 0 {
        return Err(format!("fd {fd}"));
    }
    match fd_kind(fd) {
        Ok(k) if k == ANON_INODE_NAME => Ok(()),
        Ok(k) => Err(k),
        Err(e) => Err(format!("fd {fd} ({e})")),
    }
}

/// The features a userfaultfd was set up with (by whoever ran its UFFDIO_API), from
/// /proc/self/fdinfo: the kernel prints `API:\t<api>:<features>:<ioctls>` (hex) for one. A
/// second UFFDIO_API on the fd, the other way to ask, is refused by the kernel.
pub fn features_of(fd: RawFd) -> io::Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("API:"))
        .and_then(|v| v.trim().split(':').nth(1))
        .and_then(|f| u64::from_str_radix(f, 16).ok())
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("fd {fd} shows no userfaultfd API line"))
        })
}

/// A zeroed buffer of raw messages for [`Uffd::read_messages`].
pub fn message_buffer(n: usize) -> Vec<RawMsg> {
    // SAFETY: uffd_msg is plain old data; all-zero is a valid value.
    vec![unsafe { std::mem::zeroed::<RawMsg>() }; n]
}

fn ioctl<T>(fd: RawFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed struct of the type the request expects; the
    // kernel reads and writes only within it.
    let r = unsafe { libc::ioctl(fd, req, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Open a userfaultfd that also catches kernel-mode faults (no `UFFD_USER_MODE_ONLY`),
    /// non-blocking and close-on-exec, preferring /dev/userfaultfd, and run `UFFDIO_API` asking
    /// for `features`. Fails if a requested feature is missing.
    pub fn open(features: u64) -> io::Result<Uffd> {
        let (fd, _) = Self::open_raw(false)?;
        Self::from_fd_with_api(fd, features)
    }

    /// Open an fd without the API handshake; returns how it was created.
    pub fn open_raw(user_mode_only: bool) -> io::Result<(OwnedFd, Creation)> {
        let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        if user_mode_only {
            flags |= UFFD_USER_MODE_ONLY;
        }
        match OpenOptions::new().read(true).write(true).open(DEVICE_PATH) {
            Ok(dev) => {
                // SAFETY: USERFAULTFD_IOC_NEW takes the open flags as its integer argument and
                // returns a new fd or -1.
                let fd = unsafe {
                    libc::ioctl(
                        dev.as_raw_fd(),
                        USERFAULTFD_IOC_NEW,
                        libc::c_ulong::from(flags.unsigned_abs()),
                    )
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: the ioctl returned a fresh fd that nothing else owns.
                Ok((unsafe { OwnedFd::from_raw_fd(fd) }, Creation::Device))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::open_syscall(flags),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                // Fall back to the system call, which may still be allowed (CAP_SYS_PTRACE or
                // vm.unprivileged_userfaultfd=1).
                Self::open_syscall(flags).map_err(|_| e)
            }
            Err(e) => Err(e),
        }
    }

    /// Open through the system call only.
    pub fn open_syscall(flags: libc::c_int) -> io::Result<(OwnedFd, Creation)> {
        // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        Ok((unsafe { OwnedFd::from_raw_fd(fd) }, Creation::Syscall))
    }

    /// Run the API handshake on a fresh fd.
    pub fn from_fd_with_api(fd: OwnedFd, features: u64) -> io::Result<Uffd> {
        let mut api = sys::uffdio_api { api: sys::UFFD_API, features, ioctls: 0 };
        ioctl(fd.as_raw_fd(), sys::UFFDIO_API as libc::c_ulong, &mut api)?;
        if api.features & features != features {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("userfaultfd features {:#x} requested, kernel offers {:#x}", features, api.features),
            ));
        }
        Ok(Uffd { fd, features: api.features, ioctls: api.ioctls })
    }

    /// Adopt an fd whose API handshake another process already did (a client's uffd).
    pub fn adopt(fd: OwnedFd) -> Uffd {
        Uffd { fd, features: 0, ioctls: 0 }
    }

    /// Features the kernel reported at the API handshake (0 for adopted fds).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The ioctls the API handshake reported.
    pub fn api_ioctls(&self) -> u64 {
        self.ioctls
    }

    /// Register `[start, start+len)` in MISSING mode; returns the range ioctls allowed on it.
    pub fn register_missing(&self, start: u64, len: u64) -> io::Result<u64> {
        let mut reg = sys::uffdio_register {
            range: sys::uffdio_range { start, len },
            mode: sys::UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(self.fd.as_raw_fd(), sys::UFFDIO_REGISTER as libc::c_ulong, &mut reg)?;
        Ok(reg.ioctls)
    }

    /// Unregister a range.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = sys::uffdio_range { start, len };
        ioctl(self.fd.as_raw_fd(), sys::UFFDIO_UNREGISTER as libc::c_ulong, &mut range)
    }

    /// Wake the threads waiting on faults in the range.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = sys::uffdio_range { start, len };
        ioctl(self.fd.as_raw_fd(), sys::UFFDIO_WAKE as libc::c_ulong, &mut range)
    }

    /// UFFDIO_COPY `len` bytes from `src` to `dst` (an address registered with this uffd).
    ///
    /// # Safety
    /// `src` must point to `len` readable bytes for the duration of the call.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: u64, wake: bool) -> io::Result<Fill> {
        let mut c = sys::uffdio_copy {
            dst,
            src: src as u64,
            len,
            mode: if wake { 0 } else { sys::UFFDIO_COPY_MODE_DONTWAKE },
            copy: 0,
        };
        let r = ioctl(self.fd.as_raw_fd(), sys::UFFDIO_COPY as libc::c_ulong, &mut c);
        decode_fill(r, c.copy)
    }

    /// UFFDIO_ZEROPAGE over `[start, start+len)`.
    pub fn zeropage(&self, start: u64, len: u64, wake: bool) -> io::Result<Fill> {
        let mut z = sys::uffdio_zeropage {
            range: sys::uffdio_range { start, len },
            mode: if wake { 0 } else { sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE },
            zeropage: 0,
        };
        let r = ioctl(self.fd.as_raw_fd(), sys::UFFDIO_ZEROPAGE as libc::c_ulong, &mut z);
        decode_fill(r, z.zeropage)
    }

    /// Read as many messages as are queued, up to `buf.len()`. Returns 0 when none is queued.
    /// A read of 0 bytes means the fd is dead (`UnexpectedEof`).
    pub fn read_messages(&self, buf: &mut [RawMsg]) -> io::Result<usize> {
        let size = std::mem::size_of::<RawMsg>();
        // SAFETY: `buf` is a writable slice of `buf.len()` plain-old-data messages.
        let r =
            unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), std::mem::size_of_val(buf)) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        let n = usize::try_from(r).map_err(|_| io::Error::other("negative read"))?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "userfaultfd closed"));
        }
        if n % size != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("short userfaultfd read of {n} bytes"),
            ));
        }
        Ok(n / size)
    }
}

/// Decode a COPY/ZEROPAGE result: the field is signed even though the crate-level types are not.
fn decode_fill(r: io::Result<()>, field: i64) -> io::Result<Fill> {
    match r {
        Ok(()) if field > 0 => Ok(Fill::Done(field.unsigned_abs())),
        Ok(()) => Ok(Fill::Again),
        Err(e) => match e.raw_os_error() {
            Some(libc::EEXIST) => Ok(Fill::Exists),
            Some(libc::EAGAIN) if field > 0 => Ok(Fill::Done(field.unsigned_abs())),
            Some(libc::EAGAIN) => Ok(Fill::Again),
            _ => Err(e),
        },
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl IntoRawFd for Uffd {
    fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_decoding_treats_the_field_as_signed() {
        assert_eq!(decode_fill(Ok(()), 4096).ok(), Some(Fill::Done(4096)));
        assert_eq!(decode_fill(Ok(()), 0).ok(), Some(Fill::Again));
        let eagain = || Err(io::Error::from_raw_os_error(libc::EAGAIN));
        assert_eq!(decode_fill(eagain(), -i64::from(libc::EAGAIN)).ok(), Some(Fill::Again));
        assert_eq!(decode_fill(eagain(), 8192).ok(), Some(Fill::Done(8192)));
        let eexist = Err(io::Error::from_raw_os_error(libc::EEXIST));
        assert_eq!(decode_fill(eexist, -i64::from(libc::EEXIST)).ok(), Some(Fill::Exists));
        let einval = Err(io::Error::from_raw_os_error(libc::EINVAL));
        assert!(decode_fill(einval, -22).is_err());
    }
}
