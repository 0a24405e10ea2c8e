//! The last step of a destination session, once every page is placed and the digests match:
//! deliver Complete so that both sides agree the migration succeeded. The destination writes
//! Complete and waits for the source's CompleteAck (`CAP_COMPLETE_ACK`). When the connection is
//! gone, the write fails or no confirmation comes, it lingers: the gate stays open for
//! [`DestinationOptions::end_linger`](super::DestinationOptions::end_linger) and a resume of the
//! same session (authenticated and bound like every resume, `resume::Link`) is answered with the
//! received bitmaps, all set: the source has nothing to send, sends its digests and Complete
//! again, the destination checks the digests, answers Complete and reads the confirmation. A
//! destination that gets no confirmation at all still has the whole RAM: it ends successfully
//! and says so ([`Ending::Unconfirmed`]).

use std::io::Write;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::gate::Arrival;
use super::resume::Link;
use super::session::refuse;
use crate::error::{Error, IoContext, Result};
use crate::migration::digest::Received;
use crate::migration::transport::Transport;
use crate::migration::wire::{write_frame, BlockTable, Channel, Decoder, Frame, Limits, CAP_COMPLETE_ACK};
use crate::ram::{BlockId, RamBlocks};

/// How the source learnt that the migration is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// It confirmed the destination's Complete.
    Confirmed,
    /// It missed the first Complete, resumed the completed session and confirmed the second.
    ConfirmedAfterResume,
    /// No confirmation within the linger period (the source may have seen Complete and lost
    /// the connection before it confirmed, or died). The RAM here is complete all the same.
    Unconfirmed,
    /// The source does not confirm (it did not offer `CAP_COMPLETE_ACK`): Complete was written.
    NotAsked,
}

/// What the end needs from the session.
pub(super) struct End<'a> {
    pub(super) link: &'a Link,
    pub(super) blocks: &'a RamBlocks,
    pub(super) ids: &'a [BlockId],
    pub(super) digests: &'a Received,
    pub(super) caps: u64,
    pub(super) linger: Duration,
    pub(super) accept_timeout: Duration,
}

impl End<'_> {
    /// Deliver Complete on `main` (lingering for resumes if needed). Fails only when a resumed
    /// session's digests do not match (the source is told: both sides fail).
    pub(super) fn deliver(&self, main: &Transport) -> Result<Ending> {
        if self.caps & CAP_COMPLETE_ACK == 0 {
            main.set_nonblocking(false).ctx(|| "set the main connection blocking".into())?;
            write_frame(&mut &*main, &Frame::Complete)?;
            let _ = (&*main).flush();
            let _ = main.shutdown(Shutdown::Write);
            return Ok(Ending::NotAsked);
        }
        let deadline = Instant::now() + self.linger;
        if crate::failpoint::once("destination-complete-unwritable") {
            let _ = main.shutdown(Shutdown::Both);
        }
        let why = match confirm(main, &self.link.table, deadline) {
            Ok(()) => return Ok(Ending::Confirmed),
            Err(e) => e,
        };
        log::warn!(
            "every page is here and the digests match, but the source did not confirm the end ({why}); \
             keeping the listener open for up to {:?} so that a source that missed Complete can resume and learn it",
            self.linger
        );
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(a) = (if left.is_zero() { None } else { self.link.gate.next(Some(left)) }) else {
                log::warn!(
                    "the source never confirmed the end of the migration; the migration is complete here \
                     (every page placed, digests equal): check the source's exit status"
                );
                return Ok(Ending::Unconfirmed);
            };
            let peer = a.peer();
            match self.answer(a, deadline) {
                Ok(true) => {
                    log::info!("the source at {peer} resumed the completed session and confirmed its end");
                    return Ok(Ending::ConfirmedAfterResume);
                }
                Ok(false) => {}
                Err(e) if e.to_string().contains(crate::migration::digest::UNTRUSTED) => return Err(e),
                Err(e) => log::warn!("the reconnect from {peer} to the completed session failed: {e}"),
            }
        }
    }

    /// One connection while lingering: a resume of this session gets full bitmaps, then the
    /// source's digests and Complete are checked and answered. True when the source confirmed.
    fn answer(&self, a: Arrival, deadline: Instant) -> Result<bool> {
        let h = &a.hello;
        if h.session_id != self.link.session_id || !h.resume || h.channel != Channel::Main {
            a.refuse(&format!(
                "this destination completed session {:016x} and answers only a resume of it now",
                self.link.session_id
            ));
            return Ok(false);
        }
        let conns = self.link.handshake(a, self.blocks, self.ids, None, self.accept_timeout)?;
        let (main, mut dec) = (conns.main, conns.main_dec);
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            main.set_read_timeout(Some(left)).ctx(|| "set a read timeout".into())?;
            match dec.read_frame(&mut &main)? {
                f @ Frame::Digests { .. } => {
                    self.digests.observe(&f);
                }
                Frame::Complete => break,
                Frame::Error { text } => return Err(Error::Invalid(format!("the source reported: {text}"))),
                f => {
                    return Err(refuse(
                        &main,
                        Error::Invalid(format!(
                            "a {:?} frame in a resume of a completed session (only Digests and Complete)",
                            f.frame_type()
                        )),
                    ))
                }
            }
        }
        if let Err(e) = self.digests.verify() {
            return Err(refuse(&main, e.into()));
        }
        let r = confirm(&main, &self.link.table, deadline);
        drop(conns.urgent);
        r.map(|()| true)
    }
}

/// Write Complete on `main` and read the source's CompleteAck (until `deadline`).
fn confirm(main: &Transport, table: &BlockTable, deadline: Instant) -> Result<()> {
    main.set_nonblocking(false).ctx(|| "set the main connection blocking".into())?;
    write_frame(&mut &*main, &Frame::Complete)?;
    (&*main).flush().ctx(|| "flush the main connection".into())?;
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    main.set_read_timeout(Some(left)).ctx(|| "set a read timeout".into())?;
    let mut dec = Decoder::with_blocks(Limits::default(), table.clone());
    let r = match dec.read_frame(&mut &*main) {
        Ok(Frame::CompleteAck) => Ok(()),
        Ok(Frame::Error { text }) => Err(Error::Invalid(format!("the source reported: {text}"))),
        Ok(f) => Err(Error::Invalid(format!("expected CompleteAck, got a {:?} frame", f.frame_type()))),
        Err(e) => Err(e.into()),
    };
    let _ = main.shutdown(Shutdown::Both);
    r
}
