//! The destination's half of a postcopy resume, and what binds connections to the session:
//! [`Link`] checks that a connection's Hello belongs to the paused session (the resume flag, the
//! same session id and blocks, the same peer certificate in the TLS mode) on every connection
//! (main, urgent, and the extra background streams the source announces with a `Streams` frame,
//! at most `max_streams` in all), then sends the received bitmap of every block as Resume frames and ResumeEnd, and waits for
//! ResumeAck. The caller hands the resulting connections to the paused network source.

use crate::migration::wire::wire_index;
use std::time::{Duration, Instant};

use super::gate::{Arrival, Gate};
use super::network::Connections;
use super::session::refuse;
use crate::conv::usize_of;
use crate::error::{Error, IoContext, Result};
use crate::migration::bitmap::resume_chunks;
use crate::migration::digest::Received;
use crate::migration::transport::Transport;
use crate::migration::wire::{
    negotiate, write_frame, BlockTable, Channel, Decoder, Frame, Limits, CAP_RESUME, CAP_STREAMS,
    CAP_URGENT_CHANNEL,
};
use crate::ram::{BlockId, RamBlocks};

/// How long the source has to answer the received bitmaps with ResumeAck.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The session's binding: where its connections come from and what they must match.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) gate: Gate,
    pub(super) session_id: u64,
    pub(super) table: BlockTable,
    pub(super) caps: u64,
    /// The main connection's peer certificate (TLS): every later connection must present it.
    pub(super) identity: Option<Vec<u8>>,
    /// Background connections taken, main included (`CAP_STREAMS`).
    pub(super) max_streams: u16,
}

/// Answer a Hello with `version` and `caps`, and the number of background connections taken
/// (`max_streams`, when `CAP_STREAMS` is among `caps`).
pub(super) fn write_ack(t: &Transport, version: u16, caps: u64, max_streams: u16) -> Result<()> {
    let streams = if caps & CAP_STREAMS != 0 { max_streams.max(1) } else { 0 };
    write_frame(&mut &*t, &Frame::HelloAck { version, capabilities: caps, streams })?;
    Ok(())
}

/// The extra background streams of a session, or a newer resume attempt that replaces the one
/// they were awaited for.
pub(super) enum Streams {
    /// Every announced stream, Hello answered, block table set.
    Attached(Vec<(Transport, Decoder)>),
    /// A new main connection of a resume of this session arrived instead.
    Replaced(Box<Arrival>),
}

impl Link {
    /// Whether `a` is this session's `channel` connection (`resume`: of a resume). The error
    /// says why not, for the log and the peer.
    pub(super) fn check(
        &self,
        a: &Arrival,
        channel: Channel,
        resume: bool,
    ) -> std::result::Result<(), String> {
        let h = &a.hello;
        if h.session_id != self.session_id {
            return Err(if h.resume {
                format!(
                    "no paused session {:016x} here (this destination serves session {:016x})",
                    h.session_id, self.session_id
                )
            } else {
                format!(
                    "a migration (session {:016x}) is in progress here; this destination takes no other",
                    self.session_id
                )
            });
        }
        if h.resume != resume {
            return Err(if resume {
                format!(
                    "session {:016x} is paused in postcopy; only a resume of it is accepted here (the source must reconnect with the resume flag)",
                    self.session_id
                )
            } else {
                "a resume Hello while the session is not paused".into()
            });
        }
        if h.channel != channel {
            return Err(format!(
                "expected the {channel:?} connection of the session, got the {:?} one",
                h.channel
            ));
        }
        if h.blocks != self.table {
            return Err("the connection announces other RAM blocks than the session's".into());
        }
        if a.transport.peer_identity() != self.identity.as_deref() {
            return Err(
                "the connection presents another certificate than the session's main connection".into()
            );
        }
        Ok(())
    }

    /// Answer the Hello of an accepted resume connection.
    fn ack(&self, a: &Arrival) -> Result<()> {
        let (version, caps) = negotiate(&a.hello, self.caps).map_err(|e| refuse(&a.transport, e.into()))?;
        if caps & (CAP_RESUME | CAP_URGENT_CHANNEL) != CAP_RESUME | CAP_URGENT_CHANNEL {
            return Err(refuse(
                &a.transport,
                Error::Invalid("a resume needs CAP_RESUME and the urgent channel".into()),
            ));
        }
        write_ack(&a.transport, version, caps, self.max_streams)
    }

    /// With `CAP_STREAMS` in `caps`: read the source's `Streams` frame on `main` and take that
    /// many `Stream` connections of the session from the gate (within `accept_timeout`), each
    /// checked like the urgent one and answered. Connections that do not belong are refused.
    pub(super) fn attach_streams(
        &self,
        main: &Transport,
        main_dec: &mut Decoder,
        caps: u64,
        resume: bool,
        accept_timeout: Duration,
    ) -> Result<Streams> {
        if caps & CAP_STREAMS == 0 {
            return Ok(Streams::Attached(Vec::new()));
        }
        main.set_read_timeout(Some(accept_timeout)).ctx(|| "set a read timeout".into())?;
        let count = match main_dec.read_frame(&mut &*main) {
            Ok(Frame::Streams { count }) => count,
            Ok(Frame::Error { text }) => return Err(Error::Invalid(format!("the source reported: {text}"))),
            Ok(f) => {
                return Err(refuse(
                    main,
                    Error::Invalid(format!(
                        "expected Streams after the urgent Hello, got a {:?} frame",
                        f.frame_type()
                    )),
                ))
            }
            Err(e) => return Err(Error::Invalid(format!("no Streams frame from the source: {e}"))),
        };
        main.set_read_timeout(None).ctx(|| "clear the read timeout".into())?;
        if u32::from(count) + 1 > u32::from(self.max_streams.max(1)) {
            return Err(refuse(
                main,
                Error::Invalid(format!(
                    "the source announces {} background connections; this destination takes at most {} (serve --max-streams)",
                    u32::from(count) + 1,
                    self.max_streams.max(1)
                )),
            ));
        }
        let deadline = Instant::now() + accept_timeout;
        let mut out = Vec::with_capacity(usize::from(count));
        while out.len() < usize::from(count) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(a) = self.gate.next(Some(left)).filter(|_| !left.is_zero()) else {
                return Err(refuse(
                    main,
                    Error::Invalid(format!(
                        "{} of the {count} announced background streams arrived within {accept_timeout:?}",
                        out.len()
                    )),
                ));
            };
            match self.check(&a, Channel::Stream, resume) {
                Ok(()) => {
                    let (version, caps) =
                        negotiate(&a.hello, self.caps).map_err(|e| refuse(&a.transport, e.into()))?;
                    write_ack(&a.transport, version, caps, self.max_streams)?;
                    let Arrival { transport, mut dec, .. } = a;
                    dec.set_blocks(self.table.clone());
                    out.push((transport, dec));
                }
                Err(_) if resume && self.check(&a, Channel::Main, true).is_ok() => {
                    return Ok(Streams::Replaced(Box::new(a)));
                }
                Err(why) => a.refuse(&why),
            }
        }
        log::info!("{} background streams attached", out.len() + 1);
        Ok(Streams::Attached(out))
    }

    /// The whole handshake on a resume's main connection: its urgent connection (from the gate,
    /// within `accept_timeout`), then the bitmaps of `blocks` (wire block `i` is `ids[i]`;
    /// without the pages `digests` holds no copy of, see [`Received::mask_unrecorded`]), then
    /// ResumeAck.
    pub(super) fn handshake(
        &self,
        main: Arrival,
        blocks: &RamBlocks,
        ids: &[BlockId],
        digests: Option<&Received>,
        accept_timeout: Duration,
    ) -> Result<Connections> {
        let mut main = main;
        let (urgent, streams) = 'attempt: loop {
            if let Err(why) = self.check(&main, Channel::Main, true) {
                let e = Error::Invalid(why.clone());
                main.refuse(&why);
                return Err(e);
            }
            self.ack(&main)?;
            let deadline = Instant::now() + accept_timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let Some(a) = self.gate.next(Some(left)).filter(|_| !left.is_zero()) else {
                    return Err(Error::Invalid(format!(
                        "the resume's urgent connection did not arrive within {accept_timeout:?}"
                    )));
                };
                match self.check(&a, Channel::Urgent, true) {
                    Ok(()) => {
                        self.ack(&a)?;
                        let caps = negotiate(&main.hello, self.caps).map_or(0, |(_, c)| c);
                        let (t, dec) = (&main.transport, &mut main.dec);
                        dec.set_blocks(self.table.clone());
                        match self.attach_streams(t, dec, caps, true, accept_timeout)? {
                            Streams::Attached(s) => break 'attempt (a, s),
                            Streams::Replaced(newer) => {
                                log::info!(
                                    "a new resume attempt from {} replaces the one waiting for its streams",
                                    newer.peer()
                                );
                                main = *newer;
                                continue 'attempt;
                            }
                        }
                    }
                    // The source gave up this attempt (its connection was cut after our HelloAck)
                    // and started another: the newer main connection replaces this one.
                    Err(_) if self.check(&a, Channel::Main, true).is_ok() => {
                        log::info!(
                            "a new resume attempt from {} replaces the one waiting for its urgent connection",
                            a.peer()
                        );
                        main = a;
                        continue 'attempt;
                    }
                    Err(why) => a.refuse(&why),
                }
            }
        };
        let Arrival { transport: main, dec: mut main_dec, .. } = main;
        let Arrival { transport: urgent, dec: mut urgent_dec, .. } = urgent;
        main_dec.set_blocks(self.table.clone());
        urgent_dec.set_blocks(self.table.clone());
        let max_bitmap = (Limits::default().max_payload as usize).saturating_sub(20).max(1);
        let mut have = 0;
        for (wire, &id) in ids.iter().enumerate() {
            let b = blocks.get(id).ok_or_else(|| Error::UnknownBlock(format!("#{id}")))?;
            let mut words = b.received().to_words();
            have += b.received().count_ones();
            if let Some(d) = digests {
                let again = d.mask_unrecorded(wire, &mut words);
                if again > 0 {
                    log::info!(
                        "block '{}': {again} page(s) placed here as zeros (removed by a client) before the source's copy arrived: asking for them again, for their digests",
                        b.name()
                    );
                    have -= usize_of(again);
                }
            }
            for c in resume_chunks(wire_index(wire), &words, b.pages(), max_bitmap) {
                write_frame(&mut &main, &c.frame())?;
            }
        }
        write_frame(&mut &main, &Frame::ResumeEnd)?;
        log::info!("sent the received bitmaps ({have} pages here); waiting for ResumeAck");
        main.set_read_timeout(Some(ACK_TIMEOUT)).ctx(|| "set a read timeout".into())?;
        match main_dec.read_frame(&mut &main)? {
            Frame::ResumeAck => {}
            Frame::Error { text } => return Err(Error::Invalid(format!("the source reported: {text}"))),
            f => return Err(Error::Invalid(format!("expected ResumeAck, got a {:?} frame", f.frame_type()))),
        }
        main.set_read_timeout(None).ctx(|| "clear the read timeout".into())?;
        Ok(Connections { main, main_dec, urgent, urgent_dec, streams })
    }
}
