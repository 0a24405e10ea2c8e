//! The private (Firecracker-style) fault path: a private client's memory is its own, so a fault
//! is served by reading the page from the image file and placing it through the client's own
//! userfaultfd (UFFDIO_COPY, or UFFDIO_ZEROPAGE for zero pages and ranges the client removed),
//! which also wakes it. EAGAIN (the client's non-cooperative events are pending) defers the fault
//! until its events are drained.

use std::time::Instant;

use crate::client::{AddressMap, ClientId};
use crate::fault::core::Core;
use crate::source::is_zero;
use crate::uffd::Fill;

impl Core {
    /// Serve a private (Firecracker-style) client: read the page from the image and place it
    /// through the client's own uffd, which also wakes it.
    pub(crate) fn private_fault(&mut self, id: ClientId, addr: u64, since: Instant) {
        let Some(c) = self.clients.get_mut(id) else { return };
        c.stats.faults += 1;
        let AddressMap::Private(t) = &c.map else { return };
        let Some((region, page, file_off)) = t.translate(addr) else {
            log::error!("private client {}: fault at {addr:#x} outside its regions", id.0);
            c.stats.unmapped_faults += 1;
            return;
        };
        let ps = region.page_size;
        let zero = t.is_removed(page);
        let Some(image) = self.image.as_ref() else { return };
        let buf = &mut self.staging.as_mut_slice()[..ps as usize];
        let fill = if zero {
            buf.fill(0);
            true
        } else if let Err(e) = image.read_at(file_off, buf) {
            log::error!("private client {}: {e}", id.0);
            return;
        } else {
            is_zero(buf)
        };
        let r = if fill && ps == 4096 {
            c.uffd.zeropage(page, ps, true)
        } else {
            // SAFETY: `buf` holds `ps` readable bytes for the duration of the call.
            unsafe { c.uffd.copy(page, buf.as_ptr(), ps, true) }
        };
        match r {
            Ok(Fill::Done(_)) => {
                c.stats.pages_requested += 1;
                c.stats.latency.record(since.elapsed().as_nanos() as u64);
                self.stats.pages_demand += 1;
                if fill {
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
            Ok(Fill::Again) => self.deferred.push((id, addr, since)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH) | Some(libc::ENOSPC)) => {
                log::info!("private client {} exited", id.0);
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
        for (c, addr, since) in mine {
            self.private_fault(c, addr, since);
        }
    }
}
