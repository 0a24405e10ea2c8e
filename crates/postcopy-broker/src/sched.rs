//! Scheduling priority of background threads, and their CPU time. The destination's stream
//! thread and the source's background sender may run at a higher nice value than the demand
//! path (fault loop, urgent thread, the guest's vCPUs and devices), so that a thread woken for a
//! demand fault preempts them at once instead of waiting for their timeslice to end.

fn tid() -> libc::id_t {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    // Thread ids are positive; 0 would name the calling thread anyway.
    libc::id_t::try_from(tid).unwrap_or(0)
}

/// The calling thread's nice value.
pub fn thread_nice() -> Option<i32> {
    // getpriority returns -1 both as a valid value and on error: clear errno first.
    // SAFETY: errno is thread-local; writing it and calling getpriority on our own tid is sound.
    unsafe {
        *libc::__errno_location() = 0;
        let v = libc::getpriority(libc::PRIO_PROCESS, tid());
        (*libc::__errno_location() == 0).then_some(v)
    }
}

/// Run the calling thread, which must do only background work (nothing is restored: going
/// back needs a privilege an unprivileged process lacks), at nice value `nice` (clamped to
/// 0..=19; 0 leaves it alone). Threads it creates afterwards inherit it. Failing only logs:
/// priority is an optimisation, not a requirement.
pub fn lower_thread_priority(nice: i32, what: &str) {
    let nice = nice.clamp(0, 19);
    if nice == 0 {
        return;
    }
    // SAFETY: setpriority on our own thread id only changes this thread's nice value.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid(), nice) } == 0 {
        log::debug!("{what} runs at nice {nice}");
    } else {
        let e = std::io::Error::last_os_error();
        log::warn!(
            "could not set the nice value of the {what} to {nice}: {e}; it runs at its usual priority"
        );
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
    fn lowering_affects_this_thread_and_its_children_only() {
        let before = thread_nice().unwrap();
        let (mine, child) = std::thread::spawn(|| {
            lower_thread_priority(7, "test thread");
            let child = std::thread::spawn(thread_nice).join().unwrap();
            (thread_nice(), child)
        })
        .join()
        .unwrap();
        assert_eq!(mine, Some(7));
        assert_eq!(child, Some(7), "a thread inherits the nice value of its creator");
        assert_eq!(thread_nice(), Some(before), "other threads keep theirs");
        std::thread::spawn(move || {
            lower_thread_priority(0, "untouched");
            assert_eq!(thread_nice(), Some(before));
            lower_thread_priority(40, "clamped");
            assert_eq!(thread_nice(), Some(19));
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
