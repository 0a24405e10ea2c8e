//! The incoming (destination) side of postcopy for one guest's RAM: the lifecycle of QEMU's
//! postcopy_ram_incoming_init / prepare_discard / incoming_setup / incoming_cleanup, driven through
//! the state machine and the notifiers.

use crate::conv::usize_of;
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::notify::{Notifiers, NotifyReason};
use crate::place::Placer;
use crate::ram::{BlockId, RamBlocks};
use crate::state::{PostcopyState, StateCell};
use crate::uffd::{self, ioctl_bit, Uffd};

/// The destination's RAM under postcopy.
#[derive(Debug)]
pub struct Incoming {
    blocks: Arc<RamBlocks>,
    state: Arc<StateCell>,
    notifiers: Notifiers,
    uffd: Option<Arc<Uffd>>,
    placer: Option<Placer>,
}

impl Incoming {
    /// Take charge of `blocks` (state None).
    pub fn new(blocks: RamBlocks) -> Incoming {
        Incoming {
            blocks: Arc::new(blocks),
            state: Arc::new(StateCell::new()),
            notifiers: Notifiers::new(),
            uffd: None,
            placer: None,
        }
    }

    /// The blocks.
    pub fn blocks(&self) -> &Arc<RamBlocks> {
        &self.blocks
    }
    /// The state cell (shared with whoever wants to read it).
    pub fn state(&self) -> &Arc<StateCell> {
        &self.state
    }
    /// The notifier list.
    pub fn notifiers_mut(&mut self) -> &mut Notifiers {
        &mut self.notifiers
    }
    /// The broker's own userfaultfd (after [`Incoming::listen`]).
    pub fn uffd(&self) -> Option<&Arc<Uffd>> {
        self.uffd.as_ref()
    }
    /// The placer (after [`Incoming::listen`]).
    pub fn placer(&self) -> Option<&Placer> {
        self.placer.as_ref()
    }

    /// Check the host and run the Probe notifiers (a notifier may veto postcopy).
    pub fn probe(&mut self) -> Result<()> {
        let report = crate::probe::probe();
        if !report.postcopy_shared_ok {
            return Err(Error::UffdUnavailable(report.problems.join("; ")));
        }
        for (_, b) in self.blocks.iter() {
            if b.is_hugetlb() && !report.missing_hugetlbfs {
                return Err(Error::UnsupportedPageSize {
                    page_size: b.page_size(),
                    why: "userfaultfd MISSING on hugetlbfs is not available on this host".into(),
                });
            }
        }
        Ok(self.notifiers.notify(NotifyReason::Probe)?)
    }

    /// Postcopy advised (None → Advise): InboundAdvise notifiers, then discard all RAM so that
    /// every page faults until it is received (postcopy_ram_incoming_init).
    pub fn advise(&mut self) -> Result<()> {
        let cur = self.state.get();
        if !cur.can_go_to(PostcopyState::Advise) {
            return Err(Error::IllegalTransition { from: cur, to: PostcopyState::Advise });
        }
        self.notifiers.notify(NotifyReason::InboundAdvise)?;
        for (_, b) in self.blocks.iter() {
            b.discard(0, b.size())?;
        }
        self.state.transition(PostcopyState::Advise)?;
        Ok(())
    }

    /// Before the first discard (Advise → Discard): switch THP off on every placement mapping so
    /// discards really remove pages. Idempotent while in Discard.
    pub fn prepare_discard(&mut self) -> Result<()> {
        if self.state.get() == PostcopyState::Discard {
            return Ok(());
        }
        let cur = self.state.get();
        if !cur.can_go_to(PostcopyState::Discard) {
            return Err(Error::IllegalTransition { from: cur, to: PostcopyState::Discard });
        }
        for (_, b) in self.blocks.iter() {
            b.set_thp(false)?;
        }
        self.state.transition(PostcopyState::Discard)?;
        Ok(())
    }

    /// Discard a range of a block (dirty again on the source): it will fault and be fetched again.
    pub fn discard(&mut self, id: BlockId, offset: u64, len: u64) -> Result<()> {
        self.prepare_discard()?;
        let b = self.blocks.get(id).ok_or_else(|| Error::UnknownBlock(format!("#{id}")))?;
        b.discard(offset, len)
    }

    /// A page (or run) that arrived before Listen (precopy): written through the placement
    /// mapping, which no userfaultfd watches yet, then marked received. Received means present
    /// here as on every other path.
    pub fn precopy_page(&mut self, id: BlockId, offset: u64, data: &[u8]) -> Result<()> {
        let b = self.precopy_block(id)?;
        b.check_range(offset, data.len() as u64)?;
        let (ps, first) = (b.page_size(), b.page_index(offset));
        let at = usize::try_from(offset).map_err(|_| Error::Invalid(format!("offset {offset} too large")))?;
        // SAFETY: [offset, offset + len) lies inside the block (checked), whose placement mapping
        // is live; no userfaultfd is registered on it before Listen, so the copy cannot block,
        // and no Rust reference points into it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), b.host_ptr().add(at), data.len()) };
        b.received().set_range(first, data.len() / usize_of(ps));
        Ok(())
    }

    /// Zero pages that arrived before Listen (precopy): made present zero pages (a page that
    /// came with data earlier is dropped first), then marked received. A received page that was
    /// left a hole would make every registered process fault on it forever after Listen.
    pub fn precopy_zero(&mut self, id: BlockId, offset: u64, len: u64) -> Result<()> {
        let b = self.precopy_block(id)?;
        b.check_range(offset, len)?;
        let (first, n) = (b.page_index(offset), b.page_index(len));
        if b.received().count_range(first, n) > 0 {
            b.discard(offset, len)?;
        }
        b.populate_zero(offset, len)?;
        b.received().set_range(first, n);
        Ok(())
    }

    fn precopy_block(&self, id: BlockId) -> Result<&crate::ram::RamBlock> {
        let cur = self.state.get();
        if !matches!(cur, PostcopyState::Advise | PostcopyState::Discard) {
            return Err(Error::Invalid(format!(
                "precopy pages are written directly only between Advise and Listen, not in state {cur}"
            )));
        }
        self.blocks.get(id).ok_or_else(|| Error::UnknownBlock(format!("#{id}")))
    }

    /// Start listening (Advise|Discard → Listening): own userfaultfd, every block registered in
    /// MISSING mode with its ZEROPAGE capability recorded, a placer, then InboundListen notifiers.
    pub fn listen(&mut self) -> Result<()> {
        let cur = self.state.get();
        if !cur.can_go_to(PostcopyState::Listening) {
            return Err(Error::IllegalTransition { from: cur, to: PostcopyState::Listening });
        }
        if cur == PostcopyState::Advise {
            self.prepare_discard()?;
        }
        let mut wanted = 0;
        for (_, b) in self.blocks.iter() {
            wanted |=
                if b.is_hugetlb() { uffd::feature::MISSING_HUGETLBFS } else { uffd::feature::MISSING_SHMEM };
        }
        let u = Uffd::open(wanted)
            .map_err(|e| Error::UffdUnavailable(format!("{e}; run `postcopy-broker probe`")))?;
        for (_, b) in self.blocks.iter() {
            let ioctls = u
                .register_missing(b.host_addr(), b.size())
                .ctx(|| format!("register block '{}' with userfaultfd", b.name()))?;
            if ioctls & ioctl_bit::COPY == 0 {
                return Err(Error::UffdUnavailable(format!(
                    "UFFDIO_COPY not allowed on block '{}'",
                    b.name()
                )));
            }
            b.set_zeropage_supported(ioctls & ioctl_bit::ZEROPAGE != 0);
        }
        let u = Arc::new(u);
        self.placer = Some(Placer::new(Arc::clone(&u), self.blocks.largest_page_size())?);
        self.uffd = Some(u);
        self.state.transition(PostcopyState::Listening)?;
        if let Err(e) = self.notifiers.notify(NotifyReason::InboundListen) {
            self.cleanup_quietly();
            return Err(e.into());
        }
        Ok(())
    }

    /// A broker restarted during postcopy: the blocks hold what the dead one placed (their
    /// received bitmaps rebuilt from the page cache), so nothing is discarded: None → Advise →
    /// Listening (own userfaultfd, every block registered, InboundListen) → Running.
    pub fn relisten(&mut self) -> Result<()> {
        self.state.transition(PostcopyState::Advise)?;
        self.listen()?;
        self.run()
    }

    /// The guest runs (Listening → Running).
    pub fn run(&mut self) -> Result<()> {
        self.state.transition(PostcopyState::Running)?;
        Ok(())
    }

    /// End postcopy (→ End): InboundEnd notifiers, unregister every block, restore THP, close the
    /// userfaultfd. The first error is returned after every step has been tried.
    pub fn cleanup(&mut self) -> Result<()> {
        let cur = self.state.get();
        if !cur.can_go_to(PostcopyState::End) {
            return Err(Error::IllegalTransition { from: cur, to: PostcopyState::End });
        }
        let mut first = self.notifiers.notify(NotifyReason::InboundEnd).err().map(Error::from);
        if let Err(e) = self.release() {
            first.get_or_insert(e);
        }
        self.state.transition(PostcopyState::End)?;
        first.map_or(Ok(()), Err)
    }

    fn release(&mut self) -> Result<()> {
        let mut first = None;
        if let Some(u) = self.uffd.take() {
            for (_, b) in self.blocks.iter() {
                if let Err(e) = u.unregister(b.host_addr(), b.size()) {
                    first.get_or_insert(Error::io(format!("unregister block '{}'", b.name()), e));
                }
            }
        }
        self.placer = None;
        for (_, b) in self.blocks.iter() {
            if let Err(e) = b.set_thp(true) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn cleanup_quietly(&mut self) {
        if let Err(e) = self.release() {
            log::warn!("cleanup after a failed listen: {e}");
        }
        let _ = self.state.transition(PostcopyState::End);
    }
}
