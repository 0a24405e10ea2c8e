//! [`Kick`]: the eventfd by which the stream threads, the resumer and the source itself wake the
//! fault loop's network source, with a flag that spares the loop a `read` of the eventfd on the
//! rounds nobody kicked (most rounds of a demand fault: the urgent connection is what woke it).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{IoContext, Result};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A non-blocking eventfd plus "raised since the last take".
///
/// A kicker writes the eventfd, then raises the flag; the loop lowers the flag, then reads the
/// eventfd. So a count left in the eventfd always has its flag raised after it (by the kicker
/// that wrote it, after any lowering that came before), and the next take reads it: nothing
/// stays readable for ever. Between a kicker's write and its raise the loop may see the fd
/// readable with the flag down and come back once more.
#[derive(Debug)]
pub(crate) struct Kick {
    fd: EventFd,
    raised: AtomicBool,
}

impl Kick {
    /// A new kick, not raised.
    pub(crate) fn new() -> Result<Kick> {
        let fd = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).ctx(|| "eventfd".into())?;
        Ok(Kick { fd, raised: AtomicBool::new(false) })
    }

    /// Wake the loop.
    pub(crate) fn kick(&self) {
        let _ = self.fd.write(1);
        self.raised.store(true, Ordering::Release);
    }

    /// Consume the kicks so far; reads the eventfd only when one was raised since the last take.
    /// Returns whether one was.
    pub(crate) fn take(&self) -> bool {
        let raised = self.raised.swap(false, Ordering::AcqRel);
        if raised {
            let _ = self.fd.read();
        }
        raised
    }
}

impl AsRawFd for Kick {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(k: &Kick) -> bool {
        let mut p = libc::pollfd { fd: k.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 1 && p.revents & libc::POLLIN != 0
    }

    #[test]
    fn a_take_without_a_kick_reads_nothing_and_a_kick_is_consumed_once() {
        let k = Kick::new().unwrap();
        assert!(!k.take());
        assert!(!readable(&k));
        k.kick();
        k.kick();
        assert!(readable(&k));
        assert!(k.take());
        assert!(!readable(&k), "one read consumes every kick so far");
        assert!(!k.take());
    }

    #[test]
    fn kicks_from_other_threads_never_leave_the_fd_readable_after_the_last_take() {
        let k = std::sync::Arc::new(Kick::new().unwrap());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let k = std::sync::Arc::clone(&k);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        k.kick();
                    }
                })
            })
            .collect();
        while !threads.iter().all(|t| t.is_finished()) {
            k.take();
        }
        for t in threads {
            t.join().unwrap();
        }
        // Every kicker is done: the flag is raised for whatever count is left.
        k.take();
        assert!(!readable(&k));
    }
}
