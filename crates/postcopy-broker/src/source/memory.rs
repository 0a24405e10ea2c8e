//! A page source that holds every block's contents in memory (tests, benchmarks, and a source
//! process that serves from memfds it maps).

use crate::error::{Error, Result};
use crate::source::{deliver_runs, PageRequest, PageSink, PageSource};

/// Block contents in memory, in block order.
#[derive(Debug)]
pub struct MemorySource {
    blocks: Vec<(Vec<u8>, u64)>,
}

impl MemorySource {
    /// Contents and page size of each block, in block-id order.
    pub fn new(blocks: Vec<(Vec<u8>, u64)>) -> MemorySource {
        MemorySource { blocks }
    }
}

impl PageSource for MemorySource {
    fn request(&mut self, req: PageRequest, sink: &mut dyn PageSink) -> Result<()> {
        let (data, ps) =
            self.blocks.get(req.block).ok_or_else(|| Error::UnknownBlock(format!("#{}", req.block)))?;
        let s = usize::try_from(req.offset).unwrap_or(usize::MAX);
        let e = s.saturating_add(usize::try_from(req.len).unwrap_or(usize::MAX));
        let bytes = data.get(s..e).ok_or_else(|| {
            Error::Invalid(format!(
                "request {:#x}+{:#x} outside source block #{}",
                req.offset, req.len, req.block
            ))
        })?;
        deliver_runs(sink, req.block, req.offset, bytes, *ps, req.urgency)
    }
}
