//! Scheduling priority of background threads, and their CPU time. The destination's stream thread and the
//! source's background sender may run at a higher nice value than the demand path (fault
//! loop, urgent thread, the guest's vCPUs and devices), so that a thread woken for a demand
//! fault preempts them at once instead of waiting for their timeslice to end.

/// Lowers the calling thread's priority to a nice value while it lives, and restores the
/// previous one when dropped (when the process may raise it again; otherwise it stays).
#[derive(Debug)]
pub struct NiceGuard {
    previous: Option<i32>,
}

fn tid() -> libc::id_t {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() as libc::id_t }
}

fn get() -> Option<i32> {
    // getpriority returns -1 both as a valid value and on error: clear errno first.
    // SAFETY: errno is thread-local; writing it and calling getpriority on our own tid is sound.
    unsafe {
        *libc::__errno_location() = 0;
        let v = libc::getpriority(libc::PRIO_PROCESS, tid());
        (*libc::__errno_location() == 0).then_some(v)
    }
}

fn set(nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority on our own thread id only changes this thread's nice value.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid(), nice) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl NiceGuard {
    /// Run the calling thread at nice value `nice` (clamped to -20..=19). 0 leaves it alone.
    /// Failing to change it only logs: priority is an optimisation, not a requirement.
    pub fn lower(nice: i32, what: &str) -> NiceGuard {
        if nice == 0 {
            return NiceGuard { previous: None };
        }
        let previous = get();
        match set(nice.clamp(-20, 19)) {
            Ok(()) => {
                log::debug!("{what} runs at nice {}", nice.clamp(-20, 19));
                NiceGuard { previous }
            }
            Err(e) => {
                log::warn!("could not set the nice value of the {what} to {nice}: {e}; it runs at its usual priority");
                NiceGuard { previous: None }
            }
        }
    }
}

impl Drop for NiceGuard {
    fn drop(&mut self) {
        if let Some(p) = self.previous {
            if let Err(e) = set(p) {
                log::debug!("could not restore nice {p}: {e}");
            }
        }
    }
}

/// CPU time (user + system) the calling thread has used so far, in seconds.
pub fn thread_cpu_secs() -> f64 {
    // SAFETY: rusage is plain data; getrusage with RUSAGE_THREAD fills it for the calling thread.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) } != 0 {
        return 0.0;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_lowers_this_thread_only_and_restores_it() {
        std::thread::spawn(|| {
            let before = get().unwrap();
            {
                let _g = NiceGuard::lower(7, "test thread");
                assert_eq!(get(), Some(7));
                let other = std::thread::spawn(get).join().unwrap();
                assert_eq!(other, Some(7), "a thread inherits the nice value of its creator");
            }
            // Restoring needs the right to raise priority, which root (the test setup) has.
            assert_eq!(get(), Some(before));
            let _z = NiceGuard::lower(0, "untouched");
            assert_eq!(get(), Some(before));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn thread_cpu_time_grows_with_work() {
        let before = thread_cpu_secs();
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert!(x != 1);
        assert!(thread_cpu_secs() > before, "busy work shows as CPU time");
    }
}
