//! virtio-net on top of [`SplitQueue`]: the feature bits this driver asks for, the 12-byte
//! `virtio_net_hdr` of a virtio 1.x device, and a driver that sets up the receive queue (0) and
//! the transmit queue (1), posts device-writable receive buffers in guest RAM and collects what
//! the device wrote into them.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::vhost_user::frontend::BackendConn;
use crate::vhost_user::guest::GuestRam;
use crate::vhost_user::virtq::{Buf, SplitQueue, VIRTIO_F_VERSION_1};

/// VIRTIO_NET_F_MRG_RXBUF: the device sets `num_buffers` in every header (DPDK writes it only
/// then; without it the field keeps whatever guest RAM held).
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// Device features this driver understands: no offloads, so every packet arrives whole with a
/// zero header.
pub const DRIVER_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF;
/// Bytes of `struct virtio_net_hdr` with VERSION_1 (or MRG_RXBUF): ten bytes of offload fields
/// and `num_buffers`.
pub const NET_HDR_LEN: usize = 12;
/// The receive queue: the device writes packets for the guest into its buffers.
pub const RX_QUEUE: usize = 0;
/// The transmit queue: the guest's packets for the device.
pub const TX_QUEUE: usize = 1;

/// `struct virtio_net_hdr` (little endian on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetHdr {
    /// VIRTIO_NET_HDR_F_* (checksum needed / valid).
    pub flags: u8,
    /// VIRTIO_NET_HDR_GSO_* (0: none).
    pub gso_type: u8,
    /// Length of the headers to copy per segment.
    pub hdr_len: u16,
    /// Segment size for GSO.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Buffers this packet spans (MRG_RXBUF / VERSION_1).
    pub num_buffers: u16,
}

impl NetHdr {
    /// Parse the first [`NET_HDR_LEN`] bytes of a receive buffer.
    pub fn parse(bytes: &[u8]) -> Result<NetHdr> {
        let b = bytes.get(..NET_HDR_LEN).ok_or_else(|| {
            Error::Device(format!(
                "a virtio_net_hdr needs {NET_HDR_LEN} bytes, the buffer holds {}",
                bytes.len()
            ))
        })?;
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Ok(NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        })
    }
}

/// One receive buffer in guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxBuf {
    /// Guest physical address of its first byte.
    pub gpa: u64,
    /// Length in bytes (at least [`NET_HDR_LEN`]).
    pub len: u32,
}

/// A receive buffer the device used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxUsed {
    /// The buffer.
    pub buf: RxBuf,
    /// Bytes the device wrote from its start: the header and the packet.
    pub written: u32,
}

/// A virtio-net driver: both queues set up on the backend, receive buffers posted on demand.
#[derive(Debug)]
pub struct NetDriver {
    rx: SplitQueue,
    /// Set up (the device starts only with both queues), never given buffers.
    _tx: SplitQueue,
    posted: Vec<(u16, RxBuf)>,
    timeout: Duration,
}

impl NetDriver {
    /// Lay the receive queue out at `rx_ring_gpa` and the transmit queue at `tx_ring_gpa`, and set
    /// both vrings up on the backend (devices such as DPDK start only when both are ready). Send
    /// the memory table first.
    pub fn start(
        conn: &mut BackendConn,
        ram: &GuestRam,
        rx_ring_gpa: u64,
        tx_ring_gpa: u64,
        queue_size: u16,
    ) -> Result<NetDriver> {
        let rx = SplitQueue::new(ram, RX_QUEUE, rx_ring_gpa, queue_size)?;
        let tx = SplitQueue::new(ram, TX_QUEUE, tx_ring_gpa, queue_size)?;
        let (a, b) = (rx.layout(), tx.layout());
        if a.desc < b.end && b.desc < a.end {
            return Err(Error::Invalid(format!(
                "the receive queue at {:#x}..{:#x} overlaps the transmit queue at {:#x}..{:#x}",
                a.desc, a.end, b.desc, b.end
            )));
        }
        conn.setup_vring(&rx.vring_setup(ram)?)?;
        conn.setup_vring(&tx.vring_setup(ram)?)?;
        Ok(NetDriver { rx, _tx: tx, posted: Vec::new(), timeout: Duration::from_secs(30) })
    }

    /// How long [`NetDriver::wait_rx`] waits without any buffer used before giving up.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Make `bufs` available to the device on the receive queue, one descriptor each, and kick.
    /// The driver does not touch the buffers' bytes: only the device writes them.
    pub fn post_rx(&mut self, ram: &GuestRam, bufs: &[RxBuf]) -> Result<()> {
        for b in bufs {
            if (b.len as usize) < NET_HDR_LEN {
                return Err(Error::Invalid(format!(
                    "receive buffer at {:#x} of {} bytes cannot hold the {NET_HDR_LEN}-byte header",
                    b.gpa, b.len
                )));
            }
            ram.host_addr(b.gpa, u64::from(b.len))?;
            let head = self.rx.add(ram, &[Buf { gpa: b.gpa, len: b.len, device_writes: true }])?;
            self.posted.push((head, *b));
        }
        self.rx.kick(ram)
    }

    /// Wait until the device used every posted receive buffer (fails after the timeout passes
    /// without progress). Returns them in the order the device used them.
    pub fn wait_rx(&mut self, ram: &GuestRam) -> Result<Vec<RxUsed>> {
        let used = self.rx.wait_all(ram, self.timeout)?;
        let mut out = Vec::with_capacity(used.len());
        for (head, written) in used {
            let i =
                self.posted.iter().position(|(h, _)| *h == head).ok_or_else(|| {
                    Error::Device(format!("receive queue: used head {head} was never posted"))
                })?;
            let (_, buf) = self.posted.swap_remove(i);
            if written > buf.len {
                return Err(Error::Device(format!(
                    "the device reports {written} bytes written into the {}-byte buffer at {:#x}",
                    buf.len, buf.gpa
                )));
            }
            out.push(RxUsed { buf, written });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parsing() {
        let mut h = [0u8; NET_HDR_LEN];
        h[0] = 1;
        h[2..4].copy_from_slice(&54u16.to_le_bytes());
        h[10..12].copy_from_slice(&1u16.to_le_bytes());
        let p = NetHdr::parse(&h).unwrap();
        assert_eq!((p.flags, p.hdr_len, p.num_buffers, p.gso_type), (1, 54, 1, 0));
        assert!(NetHdr::parse(&h[..10]).is_err());
    }
}
