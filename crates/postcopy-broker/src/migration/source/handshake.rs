//! Opening one connection to the destination (connect, the transport handshake, Hello,
//! HelloAck) and the extra background connections of `CAP_STREAMS` (the `Streams` frame on
//! main, then one `Stream` Hello each), and the source's half of a postcopy resume: reopen every
//! connection with the resume flag and the same session id, rebuild the destination's received bitmaps from its Resume frames, make the sent
//! bitmaps equal to them (so exactly the missing pages go again), and answer ResumeAck.

use crate::conv::usize_of;
use std::net::{TcpStream, ToSocketAddrs};
use std::thread;
use std::time::{Duration, Instant};

use super::ram::SourceRam;
use crate::error::{Error, IoContext, Result};
use crate::migration::bitmap::{bit_runs, ReceivedMap};
use crate::migration::transport::{Security, Transport, TransportError};
use crate::migration::wire::{
    check_ack, write_frame, Channel, Decoder, Frame, Hello, Limits, CAP_RESUME, CAP_STREAMS,
    CAP_URGENT_CHANNEL, PROTOCOL_VERSION,
};

/// How long to wait for HelloAck, and for the destination's bitmaps on a resume.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Marker of the destination's refusal of a resume it cannot do (no such paused session): no
/// retry can succeed.
pub const NO_SESSION: &str = "no paused session";

/// Whether `e` (a failed connect or resume, or the destination's last word) can only fail
/// again: the destination has no such session, found the pages it received wrong, or one end
/// refused the other's certificate, key or protection.
pub fn is_fatal(e: &Error) -> bool {
    match e {
        Error::Transport(t) => t.downcast_ref::<TransportError>().is_some_and(TransportError::is_refusal),
        e => {
            let text = e.to_string();
            text.contains(NO_SESSION) || text.contains(crate::migration::digest::UNTRUSTED)
        }
    }
}

/// Where and how to connect: the same for the first connections and for every resume.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Destination address.
    pub addr: String,
    /// The connections' protection.
    pub security: Security,
    /// Session id (random, kept on resume).
    pub session_id: u64,
    /// Capabilities offered.
    pub caps: u64,
    /// Deadline of each connection's handshake.
    pub handshake_timeout: Duration,
    /// Background connections wanted, main included (at least 1; more only with `CAP_STREAMS`).
    pub streams: u16,
    /// Bound of every write on every connection (`Transport::bound_writes`; zero: none).
    pub write_timeout: Duration,
}

/// One opened connection.
#[derive(Debug)]
pub struct Opened {
    /// The connection, authenticated, Hello answered.
    pub transport: Transport,
    /// Its decoder (block table set).
    pub dec: Decoder,
    /// The capabilities the destination accepted.
    pub caps: u64,
    /// Background connections the destination takes (HelloAck; 0 without `CAP_STREAMS`).
    pub streams: u16,
}

/// Every connection of a session (or of a resume).
#[derive(Debug)]
pub struct Links {
    /// Main: control frames, discards, the first background stream.
    pub main: Transport,
    /// Main's decoder.
    pub main_dec: Decoder,
    /// Urgent: demand requests and their answers.
    pub urgent: Transport,
    /// The extra background streams.
    pub streams: Vec<Transport>,
    /// Capabilities accepted on main.
    pub caps: u64,
}

/// Connect to `addr`, retrying a refused connect until `timeout` passes (zero: one attempt).
pub fn connect(addr: &str, timeout: Duration) -> Result<TcpStream> {
    let end = Instant::now() + timeout;
    let addrs: Vec<_> =
        addr.to_socket_addrs().ctx(|| format!("resolve destination address {addr}"))?.collect();
    loop {
        let mut last = None;
        for a in &addrs {
            match TcpStream::connect(a) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        let e = last.unwrap_or_else(|| std::io::Error::other("the address resolved to nothing"));
        if Instant::now() >= end || e.kind() != std::io::ErrorKind::ConnectionRefused {
            return Err(Error::io(
                format!("connect to the destination at {addr} (is `postcopy-broker serve --incoming` running there?)"),
                e,
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Turn a peer's Error frame or any other unexpected frame into an error.
pub fn unexpected(what: &str, f: &Frame<'_>) -> Error {
    match f {
        Frame::Error { text } => Error::Invalid(format!("the destination refused the migration: {text}")),
        f => {
            Error::Invalid(format!("expected {what} from the destination, got a {:?} frame", f.frame_type()))
        }
    }
}

impl Peer {
    /// Open one connection: connect, the transport handshake, Hello (`resume` flag), HelloAck.
    /// Returns the connection, its decoder (block table set) and the accepted capabilities.
    pub fn open(
        &self,
        ram: &SourceRam,
        channel: Channel,
        resume: bool,
        connect_timeout: Duration,
    ) -> Result<Opened> {
        let s = connect(&self.addr, connect_timeout)?;
        let mut s = self.security.connect(s, &self.addr, self.handshake_timeout)?;
        s.bound_writes(self.write_timeout).ctx(|| "set the write timeout (TCP_USER_TIMEOUT)".into())?;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            capabilities: self.caps,
            channel,
            session_id: self.session_id,
            resume,
            blocks: ram.table().clone(),
        };
        write_frame(&mut s, &Frame::Hello(hello))?;
        let mut dec = Decoder::with_blocks(Limits::default(), ram.table().clone());
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).ctx(|| "set a read timeout".into())?;
        let (caps, streams) = match dec.read_frame(&mut s)? {
            Frame::HelloAck { version, capabilities, streams } => {
                check_ack(PROTOCOL_VERSION, self.caps, version, capabilities, streams)?;
                (capabilities, streams)
            }
            f => return Err(unexpected("HelloAck", &f)),
        };
        s.set_read_timeout(None).ctx(|| "clear the read timeout".into())?;
        Ok(Opened { transport: s, dec, caps, streams })
    }

    /// Open main, then urgent, then (with `CAP_STREAMS`) announce and open the extra background
    /// connections: as many as wanted, at most as many as the destination takes.
    pub fn open_all(&self, ram: &SourceRam, resume: bool, connect_timeout: Duration) -> Result<Links> {
        let Opened { transport: mut main, dec: main_dec, caps, streams: takes } =
            self.open(ram, Channel::Main, resume, connect_timeout)?;
        if caps & CAP_URGENT_CHANNEL == 0 {
            return Err(Error::Invalid(
                "the destination did not accept the urgent channel; this source needs it".into(),
            ));
        }
        if resume && caps & CAP_RESUME == 0 {
            return Err(Error::Invalid("the destination did not accept CAP_RESUME on reconnect".into()));
        }
        if resume && crate::failpoint::once("source-resume-abandoned") {
            let _ = main.shutdown(std::net::Shutdown::Both);
            return Err(Error::Invalid("failpoint: this resume attempt is cut after its HelloAck".into()));
        }
        let urgent = self.open(ram, Channel::Urgent, resume, connect_timeout)?.transport;
        let mut streams = Vec::new();
        if caps & CAP_STREAMS != 0 {
            let count = self.streams.min(takes).saturating_sub(1);
            write_frame(&mut main, &Frame::Streams { count })?;
            for _ in 0..count {
                streams.push(self.open(ram, Channel::Stream, resume, connect_timeout)?.transport);
            }
        }
        Ok(Links { main, main_dec, urgent, streams, caps })
    }

    /// One resume attempt (no sender thread may run): every connection with the resume flag,
    /// the destination's received bitmaps, the sent bitmaps set to them, ResumeAck. Returns the
    /// connections and the pages to send again.
    pub fn resume(&self, ram: &SourceRam) -> Result<(Links, u64)> {
        let mut links = self.open_all(ram, true, Duration::ZERO)?;
        let (main, dec) = (&mut links.main, &mut links.main_dec);
        let mut maps: Vec<ReceivedMap> =
            ram.blocks().iter().map(|b| ReceivedMap::new(b.info().pages())).collect();
        main.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).ctx(|| "set a read timeout".into())?;
        loop {
            match dec.read_frame(main)? {
                Frame::Resume { block, first_page, page_count, bitmap } => {
                    let m = maps
                        .get_mut(block as usize)
                        .ok_or_else(|| Error::UnknownBlock(format!("wire #{block}")))?;
                    m.apply(first_page, page_count, bitmap)?;
                }
                Frame::ResumeEnd => break,
                f => return Err(unexpected("Resume", &f)),
            }
        }
        main.set_read_timeout(None).ctx(|| "clear the read timeout".into())?;
        let mut missing = 0;
        for (b, m) in ram.blocks().iter().zip(&maps) {
            if !m.is_complete() {
                return Err(Error::Invalid(format!(
                    "the destination's bitmap of block '{}' does not cover the whole block",
                    b.info().name
                )));
            }
            let sent = b.sent();
            sent.clear_range(0, sent.len());
            for (first, n) in bit_runs(m.words(), b.info().pages(), true) {
                sent.set_range(usize_of(first), usize_of(n));
            }
            missing += b.info().pages() - sent.count_ones() as u64;
        }
        write_frame(main, &Frame::ResumeAck)?;
        Ok((links, missing))
    }
}
