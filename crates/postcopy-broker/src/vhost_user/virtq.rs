//! A minimal split virtqueue driver (virtio 1.x, no indirect descriptors, no event index) whose
//! rings live in guest RAM and are written through the frontend's mapping.

use crate::conv::usize_of;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use log::debug;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, IoContext, Result};
use crate::vhost_user::frontend::VringSetup;
use crate::vhost_user::guest::GuestRam;

/// VIRTIO_F_VERSION_1: the virtio 1.x device interface (every device this module drives).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Descriptor continues in `next`.
const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Buffer is write-only for the device.
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Bytes per descriptor.
const DESC_LEN: u64 = 16;

/// One buffer of a request, in guest physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes this buffer (device-to-driver); otherwise it reads it.
    pub device_writes: bool,
}

/// Byte layout of a split virtqueue of `size` entries starting at a guest address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// First byte after the queue.
    pub end: u64,
}

impl Layout {
    /// Lay a queue of `size` entries out from `base` (16-byte aligned): descriptor table, then the
    /// available ring (2-byte aligned), then the used ring (4-byte aligned).
    pub fn new(base: u64, size: u16) -> Result<Layout> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(Error::Invalid(format!("queue size {size} is not a power of two in 1..=32768")));
        }
        if base % 16 != 0 {
            return Err(Error::Invalid(format!("virtqueue base {base:#x} is not 16-byte aligned")));
        }
        let n = u64::from(size);
        let desc = base;
        let avail = desc + DESC_LEN * n;
        let avail_end = avail + 4 + 2 * n + 2;
        let used = avail_end.next_multiple_of(4);
        let end = used + 4 + 8 * n + 2;
        Ok(Layout { desc, avail, used, end })
    }
}

/// The driver side of one split virtqueue.
#[derive(Debug)]
pub struct SplitQueue {
    index: usize,
    size: u16,
    layout: Layout,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl SplitQueue {
    /// A queue with `size` entries whose rings start at guest address `base`; zeroes the rings.
    /// Guest addresses 0.. are avoided by some devices (a zero ring address means "not set").
    pub fn new(ram: &GuestRam, index: usize, base: u64, size: u16) -> Result<SplitQueue> {
        let layout = Layout::new(base, size)?;
        if layout.avail == 0 {
            return Err(Error::Invalid("virtqueue rings may not start at guest address 0".into()));
        }
        ram.fill(layout.desc, layout.end - layout.desc, 0)?;
        let kick = EventFd::new(EFD_NONBLOCK).ctx(|| "eventfd for the vring kick".into())?;
        let call = EventFd::new(EFD_NONBLOCK).ctx(|| "eventfd for the vring call".into())?;
        Ok(SplitQueue {
            index,
            size,
            layout,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
            kick,
            call,
        })
    }

    /// The vring setup to send to the backend (addresses in the frontend's mapping).
    pub fn vring_setup<'a>(&'a self, ram: &GuestRam) -> Result<VringSetup<'a>> {
        Ok(VringSetup {
            index: self.index,
            size: self.size,
            desc_addr: ram.host_addr(self.layout.desc, DESC_LEN * u64::from(self.size))?,
            avail_addr: ram.host_addr(self.layout.avail, self.layout.used - self.layout.avail)?,
            used_addr: ram.host_addr(self.layout.used, self.layout.end - self.layout.used)?,
            kick: &self.kick,
            call: &self.call,
        })
    }

    /// The queue's layout in guest RAM.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Number of free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Number of chains made available and not yet used.
    pub fn in_flight(&self) -> usize {
        self.chains.len()
    }

    /// Write a descriptor chain for `bufs` and put its head in the available ring (not yet visible
    /// to the device: call [`SplitQueue::kick`]). Returns the head index.
    pub fn add(&mut self, ram: &GuestRam, bufs: &[Buf]) -> Result<u16> {
        if bufs.is_empty() {
            return Err(Error::Invalid("a virtqueue request needs at least one buffer".into()));
        }
        if bufs.len() > self.free.len() {
            return Err(Error::Invalid(format!(
                "{} descriptors needed, {} free: wait for completions first",
                bufs.len(),
                self.free.len()
            )));
        }
        let ids: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        for (i, (b, id)) in bufs.iter().zip(&ids).enumerate() {
            let mut flags = if b.device_writes { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = match ids.get(i + 1) {
                Some(n) => {
                    flags |= VIRTQ_DESC_F_NEXT;
                    *n
                }
                None => 0,
            };
            let mut d = [0u8; usize_of(DESC_LEN)];
            d[0..8].copy_from_slice(&b.gpa.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            ram.write(self.layout.desc + DESC_LEN * u64::from(*id), &d)?;
        }
        let head = ids[0];
        let slot = u64::from(self.avail_idx % self.size);
        ram.write(self.layout.avail + 4 + 2 * slot, &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.chains.insert(head, ids);
        Ok(head)
    }

    /// Publish the available ring index (release) and notify the device.
    pub fn kick(&mut self, ram: &GuestRam) -> Result<()> {
        ram.store_u16(self.layout.avail + 2, self.avail_idx)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.kick.write(1).ctx(|| "kick eventfd write".into())
    }

    /// Take every used element the device published: (head, bytes written by the device).
    /// Frees their descriptors.
    pub fn pop_used(&mut self, ram: &GuestRam) -> Result<Vec<(u16, u32)>> {
        let used_idx = ram.load_u16(self.layout.used + 2)?;
        let mut out = Vec::new();
        while self.last_used != used_idx {
            let slot = u64::from(self.last_used % self.size);
            let mut e = [0u8; 8];
            ram.read(self.layout.used + 4 + 8 * slot, &mut e)?;
            let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            let head = u16::try_from(id).ok().filter(|h| self.chains.contains_key(h)).ok_or_else(|| {
                Error::Device(format!("used ring names descriptor {id}, which is not in flight"))
            })?;
            if let Some(ids) = self.chains.remove(&head) {
                self.free.extend(ids);
            }
            out.push((head, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        Ok(out)
    }

    /// Wait until every chain in flight is used, or `timeout` passes without completion.
    /// Returns the used elements in the order the device used them.
    pub fn wait_all(&mut self, ram: &GuestRam, timeout: Duration) -> Result<Vec<(u16, u32)>> {
        let mut out = Vec::new();
        let mut deadline = Instant::now() + timeout;
        loop {
            let got = self.pop_used(ram)?;
            if !got.is_empty() {
                deadline = Instant::now() + timeout;
            }
            out.extend(got);
            if self.chains.is_empty() {
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Device(format!(
                    "{} request(s) on queue {} not completed within {timeout:?}; the backend is stuck or gone",
                    self.chains.len(),
                    self.index
                )));
            }
            // Wake on the call eventfd, and re-check the used ring at least every 100 ms in case a
            // notification is suppressed.
            let wait = (deadline - now).min(Duration::from_millis(100));
            let ms = u16::try_from(wait.as_millis()).unwrap_or(100);
            let mut fds = [PollFd::new(self.call.as_fd_borrowed(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(Error::io("poll on the vring call eventfd", e.into())),
            }
            if let Err(e) = self.call.read() {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    return Err(Error::io("read of the vring call eventfd", e));
                }
            } else {
                debug!("queue {}: call", self.index);
            }
        }
    }
}

trait BorrowFd {
    fn as_fd_borrowed(&self) -> std::os::fd::BorrowedFd<'_>;
}

impl BorrowFd for EventFd {
    fn as_fd_borrowed(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsRawFd;
        // SAFETY: the eventfd stays open while `self` is borrowed.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.as_raw_fd()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_the_spec_alignment() {
        let l = Layout::new(0x1_0000, 128).unwrap();
        assert_eq!(l.desc, 0x1_0000);
        assert_eq!(l.avail, 0x1_0000 + 16 * 128);
        assert_eq!(l.used % 4, 0);
        assert!(l.used >= l.avail + 4 + 2 * 128 + 2);
        assert_eq!(l.end, l.used + 4 + 8 * 128 + 2);
        assert!(Layout::new(0x1_0000, 100).is_err());
        assert!(Layout::new(0x1_0008, 128).is_err());
    }
}
