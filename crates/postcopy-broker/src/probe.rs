//! Host probe (QEMU's postcopy_ram_supported_by_host): can this host run postcopy on shared
//! memory? It checks both ways of creating a userfaultfd, the API features, MISSING registration
//! on shmem and hugetlbfs, the WAKE/COPY/ZEROPAGE ioctls on a registered test area (exercised,
//! not just advertised), and the huge page sizes with their reservations.

use std::fmt::Write as _;
use std::fs;

use serde::Serialize;

use crate::ram::{RamBlock, HUGE_2M, SMALL_PAGE};
use crate::uffd::{self, ioctl_bit, Creation, Uffd};

/// How one way of creating a userfaultfd fared.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Access {
    /// It worked.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
}

/// One huge page size of the host.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HugePageSize {
    /// Bytes per page.
    pub size: u64,
    /// Pages reserved (nr_hugepages).
    pub total: u64,
    /// Pages free.
    pub free: u64,
}

/// The ioctls exercised on a registered shared-memory test area.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct IoctlCheck {
    /// UFFDIO_WAKE works.
    pub wake: bool,
    /// UFFDIO_COPY works and the page is visible through a second mapping.
    pub copy: bool,
    /// UFFDIO_ZEROPAGE works.
    pub zeropage: bool,
}

/// The probe's findings.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// Kernel release.
    pub kernel: String,
    /// Effective uid.
    pub uid: u32,
    /// The userfaultfd(2) system call (without UFFD_USER_MODE_ONLY).
    pub syscall: Access,
    /// /dev/userfaultfd.
    pub device: Access,
    /// Value of vm.unprivileged_userfaultfd, if readable.
    pub unprivileged_userfaultfd: Option<u32>,
    /// How the broker will create its userfaultfds.
    pub creation: Option<String>,
    /// API features the kernel offers.
    pub features: Vec<String>,
    /// The raw feature mask.
    pub features_raw: u64,
    /// MISSING registration on a memfd works.
    pub missing_shmem: bool,
    /// MISSING on hugetlbfs is offered by the kernel.
    pub missing_hugetlbfs: bool,
    /// Whether hugetlbfs registration was exercised (needs a free 2 MiB page).
    pub hugetlbfs_tested: bool,
    /// The range ioctls, exercised.
    pub ioctls: IoctlCheck,
    /// Huge page sizes and reservations.
    pub huge_page_sizes: Vec<HugePageSize>,
    /// Postcopy on shared memory works on this host.
    pub postcopy_shared_ok: bool,
    /// What is wrong, each with what to do.
    pub problems: Vec<String>,
}

fn read_u64(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Huge page sizes listed under /sys/kernel/mm/hugepages (the pools of [`crate::ram::huge_pools`]).
pub fn huge_page_sizes() -> Vec<HugePageSize> {
    crate::ram::huge_pools()
        .into_iter()
        .map(|p| HugePageSize { size: p.size, total: p.total, free: p.free })
        .collect()
}

/// Exercise COPY, ZEROPAGE and WAKE on a registered block and check the result through the
/// block's own (placement) mapping after placement.
fn exercise(u: &Uffd, b: &RamBlock, problems: &mut Vec<String>) -> IoctlCheck {
    let mut c = IoctlCheck::default();
    let ps = b.page_size();
    let ioctls = match u.register_missing(b.host_addr(), b.size()) {
        Ok(i) => i,
        Err(e) => {
            problems.push(format!("UFFDIO_REGISTER (MISSING) on a {}-byte-page memfd failed: {e}", ps));
            return c;
        }
    };
    let page = vec![0xA5u8; usize::try_from(ps).unwrap_or(4096)];
    if ioctls & ioctl_bit::COPY != 0 {
        // SAFETY: `page` holds `ps` readable bytes.
        let r = unsafe { u.copy(b.host_addr(), page.as_ptr(), ps, false) };
        // SAFETY: the first page was just placed, so reading it does not fault.
        c.copy = matches!(r, Ok(uffd::Fill::Done(n)) if n == ps) && unsafe { *b.host_ptr() } == 0xA5;
    }
    if ioctls & ioctl_bit::ZEROPAGE != 0 {
        c.zeropage = matches!(u.zeropage(b.host_addr() + ps, ps, false), Ok(uffd::Fill::Done(n)) if n == ps);
    }
    if ioctls & ioctl_bit::WAKE != 0 {
        c.wake = u.wake(b.host_addr(), ps).is_ok();
    }
    let _ = u.unregister(b.host_addr(), b.size());
    for (ok, name) in [(c.copy, "UFFDIO_COPY"), (c.zeropage, "UFFDIO_ZEROPAGE"), (c.wake, "UFFDIO_WAKE")] {
        if !(ok || name == "UFFDIO_ZEROPAGE" && ps > SMALL_PAGE) {
            problems.push(format!("{name} does not work on a registered {ps}-byte-page memfd"));
        }
    }
    c
}

/// Run every check.
pub fn probe() -> ProbeReport {
    let mut problems = Vec::new();
    let kernel =
        nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let uid = nix::unistd::geteuid().as_raw();
    let unpriv = read_u64("/proc/sys/vm/unprivileged_userfaultfd").and_then(|v| u32::try_from(v).ok());

    let syscall = match Uffd::open_syscall(libc::O_CLOEXEC | libc::O_NONBLOCK) {
        Ok(_) => Access { ok: true, error: None },
        Err(e) => Access { ok: false, error: Some(e.to_string()) },
    };
    let device = match fs::OpenOptions::new().read(true).write(true).open(uffd::DEVICE_PATH) {
        Ok(_) => Access { ok: true, error: None },
        Err(e) => Access { ok: false, error: Some(e.to_string()) },
    };
    if !syscall.ok && !device.ok {
        problems.push(format!(
            "no userfaultfd: the system call says '{}' and {} says '{}'; run as root, give the user read-write access to {} (chmod/ACL), or set sysctl vm.unprivileged_userfaultfd=1",
            syscall.error.as_deref().unwrap_or("?"),
            uffd::DEVICE_PATH,
            device.error.as_deref().unwrap_or("?"),
            uffd::DEVICE_PATH
        ));
    }

    let mut report = ProbeReport {
        kernel,
        uid,
        syscall,
        device,
        unprivileged_userfaultfd: unpriv,
        creation: None,
        features: Vec::new(),
        features_raw: 0,
        missing_shmem: false,
        missing_hugetlbfs: false,
        hugetlbfs_tested: false,
        ioctls: IoctlCheck::default(),
        huge_page_sizes: huge_page_sizes(),
        postcopy_shared_ok: false,
        problems: Vec::new(),
    };

    // Query the features on a throwaway fd (UFFDIO_API works once per fd).
    match Uffd::open_raw(false).and_then(|(fd, how)| Uffd::from_fd_with_api(fd, 0).map(|u| (u, how))) {
        Ok((u, how)) => {
            report.creation = Some(match how {
                Creation::Device => "/dev/userfaultfd".into(),
                Creation::Syscall => "userfaultfd(2)".into(),
            });
            report.features_raw = u.features();
            report.features = uffd::feature::NAMES
                .iter()
                .filter(|(bit, _)| u.features() & bit != 0)
                .map(|(_, n)| n.to_string())
                .collect();
            report.missing_hugetlbfs = u.features() & uffd::feature::MISSING_HUGETLBFS != 0;
            if u.features() & uffd::feature::MISSING_SHMEM == 0 {
                problems.push("the kernel lacks UFFD_FEATURE_MISSING_SHMEM (needs Linux 4.11+)".into());
            }
        }
        Err(e) if report.syscall.ok || report.device.ok => {
            problems.push(format!("a userfaultfd that also catches kernel-mode faults cannot be created: {e}; vhost-user backends need it (give CAP_SYS_PTRACE or access to /dev/userfaultfd)"))
        }
        Err(_) => {}
    }

    if report.features_raw & uffd::feature::MISSING_SHMEM != 0 {
        match (Uffd::open(uffd::feature::MISSING_SHMEM), RamBlock::memfd("probe", 2 * SMALL_PAGE)) {
            (Ok(u), Ok(b)) => {
                report.ioctls = exercise(&u, &b, &mut problems);
                report.missing_shmem = report.ioctls.copy;
            }
            (Err(e), _) => problems.push(format!("userfaultfd with MISSING_SHMEM: {e}")),
            (_, Err(e)) => problems.push(format!("memfd test area: {e}")),
        }
    }

    if report.missing_hugetlbfs {
        let free_2m = report.huge_page_sizes.iter().any(|h| h.size == HUGE_2M && h.free > 0);
        if free_2m {
            if let (Ok(u), Ok(b)) = (
                Uffd::open(uffd::feature::MISSING_HUGETLBFS),
                RamBlock::hugetlb("probe-huge", HUGE_2M, HUGE_2M),
            ) {
                let mut p = Vec::new();
                let c = exercise(&u, &b, &mut p);
                report.hugetlbfs_tested = true;
                if !c.copy {
                    report.missing_hugetlbfs = false;
                    problems.push(format!("MISSING on hugetlbfs advertised but fails: {}", p.join("; ")));
                }
            }
        }
    }

    report.postcopy_shared_ok =
        report.missing_shmem && report.ioctls.copy && report.ioctls.wake && report.ioctls.zeropage;
    report.problems = problems;
    report
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The report as text for a person.
pub fn render(r: &ProbeReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "postcopy-broker host probe (kernel {}, uid {})", r.kernel, r.uid);
    let acc = |a: &Access| {
        if a.ok {
            "ok".to_string()
        } else {
            format!("no ({})", a.error.as_deref().unwrap_or("?"))
        }
    };
    let _ = writeln!(s, "  userfaultfd(2) syscall      {}", acc(&r.syscall));
    let _ = writeln!(s, "  {:<27} {}", uffd::DEVICE_PATH, acc(&r.device));
    if let Some(v) = r.unprivileged_userfaultfd {
        let _ = writeln!(s, "  vm.unprivileged_userfaultfd {v}");
    }
    let _ = writeln!(s, "  created through             {}", r.creation.as_deref().unwrap_or("-"));
    let _ = writeln!(
        s,
        "  API features                {}",
        if r.features.is_empty() { "-".into() } else { r.features.join(" ") }
    );
    let _ = writeln!(s, "  MISSING on shmem (memfd)    {}", yes(r.missing_shmem));
    let huge = if r.hugetlbfs_tested { "" } else { " (not exercised: no free 2 MiB page)" };
    let _ = writeln!(
        s,
        "  MISSING on hugetlbfs        {}{}",
        yes(r.missing_hugetlbfs),
        if r.missing_hugetlbfs { huge } else { "" }
    );
    let _ = writeln!(
        s,
        "  ioctls on a test area       WAKE {} COPY {} ZEROPAGE {}",
        yes(r.ioctls.wake),
        yes(r.ioctls.copy),
        yes(r.ioctls.zeropage)
    );
    for h in &r.huge_page_sizes {
        let _ =
            writeln!(s, "  huge pages {:>8} KiB      {} reserved, {} free", h.size / 1024, h.total, h.free);
    }
    let _ = writeln!(
        s,
        "postcopy on shared memory: {}",
        if r.postcopy_shared_ok { "SUPPORTED" } else { "NOT SUPPORTED" }
    );
    for p in &r.problems {
        let _ = writeln!(s, "  problem: {p}");
    }
    s
}
