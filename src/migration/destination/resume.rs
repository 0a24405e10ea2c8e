//! The destination's half of a postcopy resume: check a reconnecting source (authentication,
//! Hello with the resume flag, the same session id and blocks) on both connections, send the
//! received bitmap of every block as Resume frames and ResumeEnd, and wait for ResumeAck. The
//! caller hands the resulting connections to the paused network source.

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use super::network::Connections;
use super::session::{accept_one, read_hello, refuse};
use crate::error::{Error, IoContext, Result};
use crate::migration::auth::authenticate_tcp;
use crate::migration::bitmap::resume_chunks;
use crate::migration::wire::{
    negotiate, write_frame, BlockTable, Channel, Decoder, Frame, Hello, Limits, Side, CAP_RESUME,
    CAP_URGENT_CHANNEL,
};
use crate::ram::{BlockId, RamBlocks};

/// How long the source has to answer the received bitmaps with ResumeAck.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// What a resume must match and repeat: the listening socket, the key, and the session as the
/// first Hello announced it.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) listener: TcpListener,
    pub(super) key: Vec<u8>,
    pub(super) session_id: u64,
    pub(super) table: BlockTable,
    pub(super) caps: u64,
}

impl Link {
    /// Refuse a Hello that does not resume this session.
    fn check(&self, h: &Hello) -> Result<()> {
        if !h.resume {
            return Err(Error::Invalid(format!(
                "session {:016x} is paused in postcopy; only a resume of it is accepted here (the source must reconnect with the resume flag)",
                self.session_id
            )));
        }
        if h.session_id != self.session_id {
            return Err(Error::Invalid(format!(
                "no paused session {:016x} here (the paused one is {:016x})",
                h.session_id, self.session_id
            )));
        }
        if h.blocks != self.table {
            return Err(Error::Invalid("the resuming source announces different RAM blocks".into()));
        }
        Ok(())
    }

    /// Authenticate one connection and answer its Hello; returns its decoder.
    fn open(&self, s: &mut TcpStream, channel: Channel, auth: Option<Duration>) -> Result<Decoder> {
        authenticate_tcp(s, &self.key, Side::Destination, auth)?;
        let mut dec = Decoder::new(Limits::default());
        let h = read_hello(s, &mut dec, channel).map_err(|e| refuse(s, e))?;
        self.check(&h).map_err(|e| refuse(s, e))?;
        let (version, caps) = negotiate(&h, self.caps).map_err(|e| refuse(s, e.into()))?;
        if caps & (CAP_RESUME | CAP_URGENT_CHANNEL) != CAP_RESUME | CAP_URGENT_CHANNEL {
            return Err(refuse(s, Error::Invalid("a resume needs CAP_RESUME and the urgent channel".into())));
        }
        dec.set_blocks(self.table.clone());
        write_frame(s, &Frame::HelloAck { version, capabilities: caps })?;
        Ok(dec)
    }

    /// The whole handshake on a newly accepted main connection: the urgent connection, then the
    /// bitmaps of `blocks` (wire block `i` is `ids[i]`), then ResumeAck.
    pub(super) fn handshake(
        &self,
        mut main: TcpStream,
        blocks: &RamBlocks,
        ids: &[BlockId],
        auth: Option<Duration>,
        accept_timeout: Duration,
    ) -> Result<Connections> {
        let main_dec = self.open(&mut main, Channel::Main, auth)?;
        let (mut urgent, _) = accept_one(&self.listener, accept_timeout)?;
        let urgent_dec = self.open(&mut urgent, Channel::Urgent, auth)?;
        let max_bitmap = (Limits::default().max_payload as usize).saturating_sub(20).max(1);
        let mut have = 0;
        for (wire, &id) in ids.iter().enumerate() {
            let b = blocks.get(id).ok_or_else(|| Error::UnknownBlock(format!("#{id}")))?;
            let words = b.received().to_words();
            have += b.received().count_ones();
            for c in resume_chunks(wire as u32, &words, b.pages(), max_bitmap) {
                write_frame(&mut main, &c.frame())?;
            }
        }
        write_frame(&mut main, &Frame::ResumeEnd)?;
        log::info!("sent the received bitmaps ({have} pages here); waiting for ResumeAck");
        main.set_read_timeout(Some(ACK_TIMEOUT)).ctx(|| "set a read timeout".into())?;
        let mut main_dec = main_dec;
        match main_dec.read_frame(&mut main)? {
            Frame::ResumeAck => {}
            Frame::Error { text } => return Err(Error::Invalid(format!("the source reported: {text}"))),
            f => return Err(Error::Invalid(format!("expected ResumeAck, got a {:?} frame", f.frame_type()))),
        }
        main.set_read_timeout(None).ctx(|| "clear the read timeout".into())?;
        Ok(Connections { main, main_dec, urgent, urgent_dec })
    }
}
