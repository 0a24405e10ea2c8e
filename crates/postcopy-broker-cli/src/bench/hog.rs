//! CPU hogs for the benchmark (`bench --hog N`): N processes that spin at the benchmark's own
//! priority, on any CPU, while a case runs, as a guest's vCPUs or another tenant would. They
//! are ended (by pid, SIGKILL) and reaped when the [`Hogs`] drop.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use postcopy_broker::error::{Error, IoContext, Result};

/// Running hog processes.
#[derive(Debug)]
pub struct Hogs(Vec<Child>);

impl Hogs {
    /// Start `n` spinning processes (none for 0).
    pub fn start(n: usize) -> Result<Hogs> {
        let all = crate::bench::sys::cpu_set(&(0..crate::bench::sys::online_cpus()).collect::<Vec<_>>())?;
        let mut hogs = Hogs(Vec::with_capacity(n));
        for _ in 0..n {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "while :; do :; done"]).stdin(Stdio::null()).stdout(Stdio::null());
            // SAFETY: the closure only makes one async-signal-safe syscall (sched_setaffinity of
            // the child itself, with a set copied into the closure) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &all) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().ctx(|| "start a CPU hog (sh)".into())?;
            hogs.0.push(child);
        }
        if hogs.0.len() != n {
            return Err(Error::Invalid(format!("started {} of {n} CPU hogs", hogs.0.len())));
        }
        Ok(hogs)
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
