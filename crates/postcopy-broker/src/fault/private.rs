//! The private (Firecracker-style) fault path: a private client's memory is its own, so a fault
//! is served by placing the page through the client's own userfaultfd, which also wakes it.
//!
//! Image pages are copied once: UFFDIO_COPY reads them straight from the image's read-only
//! mapping (the broker itself never reads that mapping, so an image truncated under it fails
//! the faulting client with EFAULT instead of killing the broker with SIGBUS). A 2 MiB page's
//! source is populated first (MADV_POPULATE_READ), which halves the copy here. There is no zero
//! detection of image pages: it would mean reading the mapping in user space (the SIGBUS hazard,
//! or a second copy through pread), hugetlbfs has no zero page to place anyway, and the
//! measured gain for 4 KiB pages is only memory (see BENCHMARKS.md). Ranges the client
//! removed fault in as zero: UFFDIO_ZEROPAGE for 4 KiB pages, a copy from the zero staging page
//! for 2 MiB ones (hugetlbfs has no zero page). EAGAIN (the client's non-cooperative events are
//! pending) defers the fault until its events are drained.

use std::time::Instant;

use crate::client::{AddressMap, ClientId};
use crate::conv::{nanos, usize_of};
use crate::fault::core::Core;
use crate::uffd::Fill;

/// What a private fault is served with.
#[derive(Debug, Clone, Copy)]
enum Content {
    /// Zeros: a removed page.
    Zero,
    /// The image's bytes at this address of its mapping.
    Image(*const u8),
}

impl Core {
    /// Serve a private (Firecracker-style) client: place the page from the image (or zeros for
    /// a removed page) through the client's own uffd, which also wakes it.
    pub(crate) fn private_fault(&mut self, id: ClientId, addr: u64, tid: u32, since: Instant) {
        let Some(c) = self.clients.get_mut(id) else { return };
        c.stats.faults += 1;
        let AddressMap::Private(t) = &c.map else { return };
        let Some((region, page, file_off)) = t.translate(addr) else {
            log::error!("private client {}: fault at {addr:#x} outside its regions", id.0);
            c.stats.unmapped_faults += 1;
            return;
        };
        let ps = region.page_size;
        let Some(image) = self.image.as_ref().and_then(|i| i.image_map()) else { return };
        let fill = if t.is_removed(page) {
            Content::Zero
        } else {
            match image.copy_source(file_off, ps) {
                Some(src) => {
                    if ps > 4096 {
                        if let Err(e) = image.populate(file_off, ps) {
                            // The copy below faults the source in itself (and reports EFAULT).
                            log::debug!("populating image offset {file_off:#x}: {e}");
                        }
                    }
                    Content::Image(src)
                }
                None => {
                    // Regions were checked against the image's length at registration.
                    log::error!(
                        "private client {}: page at {page:#x} (image offset {file_off:#x}) lies outside the image; serving it no more",
                        id.0
                    );
                    self.failed.push(id);
                    return;
                }
            }
        };
        let r = match fill {
            Content::Zero if ps == 4096 => c.uffd.zeropage(page, ps, true),
            Content::Zero => {
                let zeros = self.staging.as_slice();
                if zeros.len() < usize_of(ps) {
                    log::error!("private client {}: no zero page of {ps} bytes; serving it no more", id.0);
                    self.failed.push(id);
                    return;
                }
                // SAFETY: the staging page holds at least `ps` readable bytes (checked above) for
                // the duration of the call; the private path never writes it, so they are zero.
                unsafe { c.uffd.copy(page, zeros.as_ptr(), ps, true) }
            }
            // SAFETY: `src` addresses `ps` bytes inside the image's read-only mapping, which lives
            // as long as `self.image`; only the kernel reads them (EFAULT if the file shrank).
            Content::Image(src) => unsafe { c.uffd.copy(page, src, ps, true) },
        };
        let zero = matches!(fill, Content::Zero);
        match r {
            Ok(Fill::Done(_)) => {
                c.stats.pages_requested += 1;
                c.stats.latency.record(nanos(since.elapsed()));
                self.stats.pages_demand += 1;
                // Served at once, through the client's own uffd: one wait from `since` to now.
                self.blocktime.begin(id, tid, page, since);
                self.blocktime.resolve(id, page, Instant::now());
                if zero {
                    self.stats.pages_zero += 1;
                }
            }
            Ok(Fill::Exists) => {
                c.stats.already_there += 1;
                if c.uffd.wake(page, ps).is_ok() {
                    c.stats.wakes += 1;
                    self.stats.wakes += 1;
                }
            }
            Ok(Fill::Again) => self.deferred.push((id, addr, tid, since)),
            // The client's address space is gone (it exited, or exec'd): nothing of it can be
            // served again, so it is released at once, whatever its pidfd says.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH) | Some(libc::ENOSPC)) => {
                log::info!("private client {}: its process is gone ({e})", id.0);
                self.gone.push(id);
            }
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) && !zero => {
                log::error!(
                    "private client {}: the image cannot be read at offset {file_off:#x} (it shrank since the broker opened it, or the disk failed); the client stays blocked at {page:#x} and is served no more",
                    id.0
                );
                self.failed.push(id);
            }
            Err(e) => {
                log::error!("private client {}: placement at {page:#x} failed: {e}", id.0);
                self.failed.push(id);
            }
        }
    }

    /// Retry deferred private faults of `id` (its events have been drained).
    pub(crate) fn retry_deferred(&mut self, id: ClientId) {
        let mine: Vec<_> = {
            let (m, rest) = self.deferred.drain(..).partition(|d| d.0 == id);
            self.deferred = rest;
            m
        };
        for (c, addr, tid, since) in mine {
            self.private_fault(c, addr, tid, since);
        }
    }
}
