//! The guest memory regions of Firecracker's UFFD handshake: [`FcRegionWire`] as Firecracker
//! serializes it, [`FcRegion`] with the page size resolved, and the private client region the
//! broker serves it as.

use serde::{Deserialize, Serialize};

use crate::client::PrivateRegion;

/// One guest memory region of Firecracker's UFFD handshake, page size resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FcRegion {
    /// Start of the region in Firecracker's address space.
    pub base_host_virt_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the region in the snapshot memory file.
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: u64,
}

impl FcRegion {
    /// The region as a private client's region: the snapshot memory file is the broker's image.
    pub fn private(&self) -> PrivateRegion {
        PrivateRegion {
            client_addr: self.base_host_virt_addr,
            len: self.size,
            file_offset: self.offset,
            page_size: self.page_size,
        }
    }
}

/// Firecracker's region as it appears on the wire. `page_size_kib` is deprecated and, despite its
/// name, holds bytes; either field may be present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FcRegionWire {
    /// Start of the region in Firecracker's address space.
    pub base_host_virt_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub offset: u64,
    /// Page size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Deprecated: page size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<u64>,
}

impl FcRegionWire {
    /// Resolve the page size (`page_size` first, then `page_size_kib`); `None` if neither is given.
    pub fn resolve(&self) -> Option<FcRegion> {
        let page_size = self.page_size.or(self.page_size_kib)?;
        Some(FcRegion {
            base_host_virt_addr: self.base_host_virt_addr,
            size: self.size,
            offset: self.offset,
            page_size,
        })
    }
}

impl From<FcRegion> for FcRegionWire {
    /// Both page size fields, as Firecracker sends them.
    fn from(r: FcRegion) -> FcRegionWire {
        FcRegionWire {
            base_host_virt_addr: r.base_host_virt_addr,
            size: r.size,
            offset: r.offset,
            page_size: Some(r.page_size),
            page_size_kib: Some(r.page_size),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_regions_resolve_either_page_size_field() {
        let v: Vec<FcRegionWire> = serde_json::from_str(
            r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096},
                {"base_host_virt_addr":65536,"size":4096,"offset":8192,"page_size":2097152,"extra":1},
                {"base_host_virt_addr":0,"size":1,"offset":0}]"#,
        )
        .unwrap();
        assert_eq!(v[0].resolve().unwrap().page_size, 4096);
        assert_eq!(v[1].resolve().unwrap().page_size, 2 << 20);
        assert_eq!(v[2].resolve(), None);
        let r = v[1].resolve().unwrap();
        assert_eq!(FcRegionWire::from(r).resolve(), Some(r));
        let p = r.private();
        assert_eq!((p.client_addr, p.len, p.file_offset, p.page_size), (65536, 4096, 8192, 2 << 20));
    }
}
