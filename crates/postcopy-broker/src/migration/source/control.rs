//! The source page server's control socket: the VMM hands over its RAM memfds
//! (`provide_blocks`), reports pages it dirtied after they were sent (`dirty`), and says when the
//! guest moves to the destination (`start_postcopy`). Same framing and access control as the
//! broker's socket (docs/control-protocol.md); a misbehaving peer is answered and dropped alone.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::{SourceBlock, SourceRam, SourceSession};
use crate::control::protocol::{code, BlockSpec};
use crate::control::{ControlConn, ControlError, ControlListener, Incoming, Request, Response};
use crate::error::{Error, Result};

/// What a request asks of the caller's phase.
enum Step {
    Blocks(SourceRam),
    Start,
    None,
}

/// The source's control socket.
#[derive(Debug)]
pub struct SourceControl {
    listener: ControlListener,
    conns: HashMap<u64, ControlConn>,
    next: u64,
}

impl SourceControl {
    /// Bind the socket (mode 0600); `allowed_uids` empty means root and our own uid.
    pub fn bind(path: &Path, allowed_uids: Vec<u32>) -> Result<SourceControl> {
        let uids =
            if allowed_uids.is_empty() { ControlListener::default_allowed_uids() } else { allowed_uids };
        Ok(SourceControl { listener: ControlListener::bind(path, uids)?, conns: HashMap::new(), next: 1 })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.listener.path()
    }

    /// Serve peers until one hands over the RAM blocks.
    pub fn wait_blocks(&mut self) -> Result<SourceRam> {
        loop {
            if let Step::Blocks(ram) = self.serve_once(None)? {
                return Ok(ram);
            }
        }
    }

    /// Serve peers (dirty ranges go to `session`) until one says start_postcopy.
    pub fn until_postcopy(&mut self, session: &mut SourceSession) -> Result<()> {
        loop {
            if let Step::Start = self.serve_once(Some(session))? {
                return Ok(());
            }
        }
    }

    fn serve_once(&mut self, mut session: Option<&mut SourceSession>) -> Result<Step> {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        let ready = {
            let mut fds = vec![PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
            for id in &ids {
                if let Some(c) = self.conns.get(id) {
                    fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
                }
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => return Ok(Step::None),
                Err(e) => return Err(Error::io("poll the source control socket", e.into())),
            }
            fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect::<Vec<bool>>()
        };
        if ready[0] {
            loop {
                match self.listener.accept() {
                    Ok(Some(c)) => {
                        self.conns.insert(self.next, c);
                        self.next += 1;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log::warn!("source control: {e}");
                        break;
                    }
                }
            }
        }
        let mut step = Step::None;
        for (i, id) in ids.iter().enumerate() {
            if !ready[i + 1] {
                continue;
            }
            let msgs = match self.conns.get_mut(id).map(|c| c.read_ready()) {
                Some(Ok(m)) => m,
                Some(Err(ControlError::PeerClosed)) | None => {
                    self.conns.remove(id);
                    continue;
                }
                Some(Err(e)) => {
                    log::warn!("source control peer #{id}: {e}; closing it");
                    if let Some(c) = self.conns.get_mut(id) {
                        let _ = c.send_error(&e);
                    }
                    self.conns.remove(id);
                    continue;
                }
            };
            for m in msgs {
                let (reply, s) = self.handle(m, session.as_deref_mut());
                if let Some(c) = self.conns.get_mut(id) {
                    if let Err(e) = c.send(&reply, &[]) {
                        log::warn!("source control peer #{id}: {e}");
                    }
                }
                if !matches!(s, Step::None) {
                    step = s;
                }
            }
        }
        Ok(step)
    }

    fn handle(&mut self, m: Incoming, session: Option<&mut SourceSession>) -> (Response, Step) {
        let refuse = |e: Error| (Response::error(code::REFUSED, e.to_string()), Step::None);
        match m {
            Incoming::Request(Request::Hello { version, .. }, _) => {
                (Response::hello_reply(version), Step::None)
            }
            Incoming::Request(Request::ProvideBlocks { blocks }, fds) => {
                if session.is_some() {
                    return refuse(Error::Invalid("the blocks were handed over already".into()));
                }
                match ram_from(&blocks, fds) {
                    Ok(ram) => (Response::Ok, Step::Blocks(ram)),
                    Err(e) => refuse(e),
                }
            }
            Incoming::Request(Request::Dirty { block, offset, len }, _) => match session {
                Some(s) => match s.mark_dirty(&block, offset, len) {
                    Ok(()) => (Response::Ok, Step::None),
                    Err(e) => refuse(e),
                },
                None => refuse(Error::Invalid("dirty before the blocks were handed over".into())),
            },
            Incoming::Request(Request::StartPostcopy, _) => match session {
                Some(_) => (Response::Ok, Step::Start),
                None => refuse(Error::Invalid("start_postcopy before the blocks were handed over".into())),
            },
            Incoming::Request(Request::Status, _) => {
                let report = serde_json::json!({"role": "source", "migrating": session.is_some()});
                (Response::Status { report }, Step::None)
            }
            Incoming::Request(other, _) => refuse(Error::Invalid(format!(
                "'{}' is a broker request; this is a source page server",
                other.op()
            ))),
            #[cfg(feature = "firecracker")]
            Incoming::Firecracker(..) => {
                refuse(Error::Invalid("Firecracker handshakes go to the broker".into()))
            }
        }
    }
}

fn ram_from(blocks: &[BlockSpec], fds: Vec<OwnedFd>) -> Result<SourceRam> {
    if blocks.is_empty() {
        return Err(Error::Invalid("provide_blocks needs at least one block".into()));
    }
    let mut out = Vec::with_capacity(blocks.len());
    for (b, fd) in blocks.iter().zip(fds.iter()) {
        log::info!(
            "source block '{}': {} bytes, page {} (fd {})",
            b.name,
            b.size,
            b.page_size,
            fd.as_raw_fd()
        );
        out.push(SourceBlock::from_fd(&b.name, b.page_size, fd, b.size)?);
    }
    SourceRam::new(out)
}
