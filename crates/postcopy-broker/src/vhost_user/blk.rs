//! virtio-blk on top of [`SplitQueue`]: request encoding (header, data, status), the config space,
//! and a driver that submits batches of requests and collects their status.

use std::collections::HashMap;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::vhost_user::frontend::BackendConn;
use crate::vhost_user::guest::GuestRam;
use crate::vhost_user::virtq::{Buf, SplitQueue, VIRTIO_F_VERSION_1};

/// Bytes per virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of a GET_ID answer.
pub const ID_BYTES: u32 = 20;
/// VIRTIO_BLK_F_SEG_MAX: `seg_max` in config is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_BLK_SIZE: `blk_size` in config is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// VIRTIO_BLK_F_FLUSH: FLUSH requests are supported.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Device features this driver understands.
pub const DRIVER_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
/// Status byte: success.
pub const STATUS_OK: u8 = 0;
/// Status byte: I/O error.
pub const STATUS_IOERR: u8 = 1;
/// Status byte: unsupported request.
pub const STATUS_UNSUPP: u8 = 2;

/// Bytes of config space read: capacity, size_max, seg_max, geometry, blk_size.
const CONFIG_READ_LEN: u32 = 24;
/// Bytes of per-request metadata in guest RAM: 16-byte header, status byte, padding.
const META_SLOT: u64 = 32;

/// A virtio-blk request type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkRequestKind {
    /// Read sectors into the data buffers (VIRTIO_BLK_T_IN).
    In,
    /// Write the data buffers to sectors (VIRTIO_BLK_T_OUT).
    Out,
    /// Flush the write cache (VIRTIO_BLK_T_FLUSH).
    Flush,
    /// Read the 20-byte device id into the data buffer (VIRTIO_BLK_T_GET_ID).
    GetId,
}

impl BlkRequestKind {
    /// The wire code.
    pub fn code(self) -> u32 {
        match self {
            BlkRequestKind::In => 0,
            BlkRequestKind::Out => 1,
            BlkRequestKind::Flush => 4,
            BlkRequestKind::GetId => 8,
        }
    }

    /// Whether the device writes the data buffers.
    pub fn device_writes(self) -> bool {
        matches!(self, BlkRequestKind::In | BlkRequestKind::GetId)
    }
}

/// Encode a request header: type, reserved, sector (little endian).
pub fn encode_header(kind: BlkRequestKind, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.code().to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One request: kind, first sector, data buffers (guest address, length) in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkRequest {
    /// Request type.
    pub kind: BlkRequestKind,
    /// First sector (ignored by FLUSH and GET_ID).
    pub sector: u64,
    /// Data buffers: (guest physical address, length).
    pub data: Vec<(u64, u32)>,
}

/// The completion of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkCompletion {
    /// Status byte written by the device.
    pub status: u8,
    /// Bytes the device reported as written into the request's buffers (incl. the status byte).
    pub used_len: u32,
}

/// The part of `struct virtio_blk_config` the driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Maximum data segments per request, when the device says.
    pub seg_max: Option<u32>,
    /// Logical block size, when the device says.
    pub blk_size: Option<u32>,
}

impl BlkConfig {
    /// Parse the first 24 bytes of config space, honouring the acked feature bits.
    pub fn parse(bytes: &[u8], acked_features: u64) -> Result<BlkConfig> {
        let u32_at = |o: usize| -> Option<u32> {
            bytes.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let cap = bytes
            .get(0..8)
            .map(|b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                u64::from_le_bytes(a)
            })
            .ok_or_else(|| Error::Device(format!("config space of {} bytes has no capacity", bytes.len())))?;
        Ok(BlkConfig {
            capacity_sectors: cap,
            seg_max: u32_at(12).filter(|_| acked_features & VIRTIO_BLK_F_SEG_MAX != 0),
            blk_size: u32_at(20).filter(|_| acked_features & VIRTIO_BLK_F_BLK_SIZE != 0),
        })
    }

    /// Read the config from the backend (needs CONFIG; call after SET_FEATURES).
    pub fn read(conn: &mut BackendConn) -> Result<BlkConfig> {
        let bytes = conn.get_config(0, CONFIG_READ_LEN)?;
        BlkConfig::parse(&bytes, conn.acked_features())
    }
}

/// A virtio-blk driver on queue 0 of a backend.
#[derive(Debug)]
pub struct BlkDriver {
    queue: SplitQueue,
    meta_gpa: u64,
    free_slots: Vec<u64>,
    timeout: Duration,
}

impl BlkDriver {
    /// Guest RAM bytes needed at `meta_gpa` for a queue of `queue_size`.
    pub fn meta_len(queue_size: u16) -> u64 {
        u64::from(queue_size) * META_SLOT
    }

    /// Lay queue 0 out at `ring_gpa` (and request headers/status at `meta_gpa`, see
    /// [`BlkDriver::meta_len`]) and set the vring up on the backend. Send the memory table first.
    pub fn start(
        conn: &mut BackendConn,
        ram: &GuestRam,
        ring_gpa: u64,
        meta_gpa: u64,
        queue_size: u16,
    ) -> Result<BlkDriver> {
        let queue = SplitQueue::new(ram, 0, ring_gpa, queue_size)?;
        ram.fill(meta_gpa, Self::meta_len(queue_size), 0)?;
        let ring = queue.layout();
        let meta_end = meta_gpa + Self::meta_len(queue_size);
        if meta_gpa < ring.end && ring.desc < meta_end {
            return Err(Error::Invalid(format!(
                "request metadata at {meta_gpa:#x} overlaps the virtqueue at {:#x}..{:#x}",
                ring.desc, ring.end
            )));
        }
        conn.setup_vring(&queue.vring_setup(ram)?)?;
        Ok(BlkDriver {
            queue,
            meta_gpa,
            free_slots: (0..u64::from(queue_size)).rev().collect(),
            timeout: Duration::from_secs(30),
        })
    }

    /// How long [`BlkDriver::submit`] waits without any completion before giving up.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The virtqueue.
    pub fn queue(&self) -> &SplitQueue {
        &self.queue
    }

    /// Resend SET_VRING_ADDR (after a postcopy memory table, libvhost-user needs it).
    pub fn resend_vring_addr(&self, conn: &mut BackendConn, ram: &GuestRam) -> Result<()> {
        conn.set_vring_addr(&self.queue.vring_setup(ram)?)
    }

    /// Submit `reqs` (as many at a time as the queue holds), wait for all, and return their
    /// completions in the order of `reqs`. A non-OK status is returned, not an error.
    pub fn submit(&mut self, ram: &GuestRam, reqs: &[BlkRequest]) -> Result<Vec<BlkCompletion>> {
        let mut out = Vec::with_capacity(reqs.len());
        let mut rest = reqs;
        while !rest.is_empty() {
            let mut heads: HashMap<u16, (usize, u64)> = HashMap::new();
            let mut taken = 0;
            for (i, r) in rest.iter().enumerate() {
                let need = r.data.len() + 2;
                if self.queue.free_descriptors() < need || self.free_slots.is_empty() {
                    if i == 0 {
                        return Err(Error::Invalid(format!(
                            "a request with {} data buffers does not fit a queue of {} descriptors",
                            r.data.len(),
                            self.queue.free_descriptors()
                        )));
                    }
                    break;
                }
                let Some(slot) = self.free_slots.pop() else { break };
                let meta = self.meta_gpa + slot * META_SLOT;
                ram.write(meta, &encode_header(r.kind, r.sector))?;
                ram.write(meta + 16, &[0xff])?;
                let mut bufs = Vec::with_capacity(need);
                bufs.push(Buf { gpa: meta, len: 16, device_writes: false });
                bufs.extend(r.data.iter().map(|&(gpa, len)| Buf {
                    gpa,
                    len,
                    device_writes: r.kind.device_writes(),
                }));
                bufs.push(Buf { gpa: meta + 16, len: 1, device_writes: true });
                let head = self.queue.add(ram, &bufs)?;
                heads.insert(head, (i, slot));
                taken = i + 1;
            }
            self.queue.kick(ram)?;
            let used = self.queue.wait_all(ram, self.timeout)?;
            let mut batch = vec![BlkCompletion { status: STATUS_IOERR, used_len: 0 }; taken];
            for (head, len) in used {
                let (i, slot) = heads
                    .remove(&head)
                    .ok_or_else(|| Error::Device(format!("completion for unknown head {head}")))?;
                let mut st = [0u8; 1];
                ram.read(self.meta_gpa + slot * META_SLOT + 16, &mut st)?;
                self.free_slots.push(slot);
                batch[i] = BlkCompletion { status: st[0], used_len: len };
            }
            out.extend(batch);
            rest = &rest[taken..];
        }
        Ok(out)
    }

    /// Submit `reqs` and fail unless every one completes with status OK.
    pub fn submit_ok(&mut self, ram: &GuestRam, reqs: &[BlkRequest]) -> Result<Vec<BlkCompletion>> {
        let done = self.submit(ram, reqs)?;
        for (r, c) in reqs.iter().zip(&done) {
            if c.status != STATUS_OK {
                return Err(Error::Device(format!(
                    "{:?} at sector {} completed with status {} ({})",
                    r.kind,
                    r.sector,
                    c.status,
                    match c.status {
                        STATUS_IOERR => "I/O error",
                        STATUS_UNSUPP => "unsupported",
                        _ => "unknown",
                    }
                )));
            }
        }
        Ok(done)
    }
}

/// 64-bit FNV-1a: the checksum the guest driver prints for disk regions.
pub fn fnv1a64(seed: u64, data: &[u8]) -> u64 {
    data.iter().fold(seed, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// FNV-1a offset basis, the starting value for [`fnv1a64`].
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_encoding() {
        let h = encode_header(BlkRequestKind::Out, 0x0102_0304_0506_0708);
        assert_eq!(&h[0..4], &[1, 0, 0, 0]);
        assert_eq!(&h[4..8], &[0, 0, 0, 0]);
        assert_eq!(&h[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(encode_header(BlkRequestKind::GetId, 0)[0], 8);
    }

    #[test]
    fn config_parsing_honours_features() {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&131072u64.to_le_bytes());
        c[12..16].copy_from_slice(&126u32.to_le_bytes());
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        let all = BlkConfig::parse(&c, DRIVER_FEATURES).unwrap();
        assert_eq!(all, BlkConfig { capacity_sectors: 131072, seg_max: Some(126), blk_size: Some(512) });
        let none = BlkConfig::parse(&c, VIRTIO_F_VERSION_1).unwrap();
        assert_eq!(none.seg_max, None);
        assert_eq!(none.blk_size, None);
        assert!(BlkConfig::parse(&c[..4], 0).is_err());
    }

    #[test]
    fn fnv_known_value() {
        assert_eq!(fnv1a64(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
