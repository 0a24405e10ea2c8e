//! Machine helpers of the benchmark: CPU affinity, pre-touching memory, reading the process's
//! private memory and the machine's RAM size.

use std::time::Duration;

use postcopy_broker::error::{Error, Result};

/// Where the two sides of a measurement run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Short name ("same core", "cross core").
    pub name: String,
    /// CPUs of the client (uffd_limit's forked client, or pcb-client).
    pub client: Vec<usize>,
    /// CPUs of the handler (uffd_limit's parent, or the broker's fault loop).
    pub broker: Vec<usize>,
}

impl Placement {
    /// A `taskset -c` list, like "0" or "0,1".
    pub fn cpu_list(cpus: &[usize]) -> String {
        cpus.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",")
    }

    /// "client 0, broker 1".
    pub fn describe(&self) -> String {
        format!(
            "{} (client cpu {}, broker cpu {})",
            self.name,
            Self::cpu_list(&self.client),
            Self::cpu_list(&self.broker)
        )
    }

    /// The placements this machine offers: both sides on one core; and (with two or more CPUs)
    /// the client on cpu 0 and the broker on cpu 1.
    pub fn available() -> Vec<Placement> {
        let mut v = vec![Placement { name: "same core".into(), client: vec![0], broker: vec![0] }];
        if online_cpus() > 1 {
            v.push(Placement { name: "cross core".into(), client: vec![0], broker: vec![1] });
        }
        v
    }
}

/// Number of online CPUs.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The calling thread's CPU affinity.
pub fn affinity() -> Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; all zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the set is writable and its size is passed.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(Error::io("sched_getaffinity", std::io::Error::last_os_error()));
    }
    Ok(set)
}

/// Set the calling thread's CPU affinity (threads and processes it starts inherit it).
pub fn set_affinity(set: &libc::cpu_set_t) -> Result<()> {
    // SAFETY: pid 0 is the calling thread; the set is readable and its size is passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if r != 0 {
        return Err(Error::io("sched_setaffinity", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A CPU set of `cpus`.
pub fn cpu_set(cpus: &[usize]) -> Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; all zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= online_cpus() {
            return Err(Error::Invalid(format!("cpu {c} is not online; use fewer cpus")));
        }
        // SAFETY: c < online cpus, far below the set's capacity (CPU_SETSIZE).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    Ok(set)
}

/// Pin the calling thread to `cpus`; returns the previous affinity to restore.
pub fn pin(cpus: &[usize]) -> Result<libc::cpu_set_t> {
    let old = affinity()?;
    set_affinity(&cpu_set(cpus)?)?;
    Ok(old)
}

/// Move the calling thread off the CPUs it is pinned to, onto the other online ones (if there
/// are any), for as long as it only waits: a thread that polls on the measured side's CPU would
/// preempt it. Returns the affinity to restore.
pub fn step_aside() -> Result<libc::cpu_set_t> {
    let old = affinity()?;
    // SAFETY: CPU_ISSET only reads the set.
    let others: Vec<usize> = (0..online_cpus()).filter(|&c| !unsafe { libc::CPU_ISSET(c, &old) }).collect();
    if !others.is_empty() {
        set_affinity(&cpu_set(&others)?)?;
    }
    Ok(old)
}

/// Pin process (or thread) `pid` to `cpus`.
pub fn pin_pid(pid: u32, cpus: &[usize]) -> Result<()> {
    let set = cpu_set(cpus)?;
    let pid = libc::pid_t::try_from(pid).map_err(|_| Error::Invalid(format!("pid {pid} out of range")))?;
    // SAFETY: the set is readable and its size is passed.
    let r = unsafe { libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(Error::io(format!("sched_setaffinity of pid {pid}"), std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Touch and free `bytes` of anonymous memory, as uffd_limit.c's warm_memory does: on a VM whose
/// host backs guest memory lazily, memory never touched costs a host fault per page.
pub fn warm_memory(bytes: usize) -> Result<()> {
    let m = postcopy_broker::ram::Mapping::private(bytes.max(4096))?;
    // SAFETY: the mapping is private to this function, writable for its whole length.
    unsafe { std::ptr::write_bytes(m.as_ptr(), 1, m.len()) };
    Ok(())
}

/// Private memory of this process in bytes (Private_Clean + Private_Dirty of smaps_rollup),
/// and its proportional set size (Pss).
pub fn private_memory() -> Result<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup")
        .map_err(|e| Error::io("read /proc/self/smaps_rollup", e))?;
    let mut private = 0;
    let mut pss = 0;
    for line in s.lines() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else { continue };
        let kb: u64 = v.parse().unwrap_or(0);
        match k {
            "Private_Clean:" | "Private_Dirty:" => private += kb * 1024,
            "Pss:" => pss = kb * 1024,
            _ => {}
        }
    }
    Ok((private, pss))
}

/// MemTotal of the machine in bytes.
pub fn mem_total() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").map_err(|e| Error::io("read /proc/meminfo", e))?;
    s.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| Error::Invalid("no MemTotal in /proc/meminfo".into()))
}

/// Sleep briefly (between polls of a condition).
pub fn nap() {
    std::thread::sleep(Duration::from_micros(500));
}

/// A one-line description of the machine: CPU model, CPUs, RAM, kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let ram = mem_total().map_or(0.0, |b| b as f64 / (1u64 << 30) as f64);
    format!("{cpu}, {} cpus, {ram:.1} GiB RAM, Linux {}", online_cpus(), kernel.trim())
}
