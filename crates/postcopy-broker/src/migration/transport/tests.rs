//! Transports over real TCP on 127.0.0.1: TLS and PSK round trips (large vectored writes,
//! reads and writes on two threads at once, non-blocking reads), refusals (another CA, another
//! key, another name, another mode), a changed byte on the wire, a peer that drips, and one
//! that stops reading (bounded writes).

use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use super::throwaway::{Leaf, ThrowawayCa};
use super::tls::TlsSetup;
use super::*;

const T: Duration = Duration::from_secs(5);
const KEY: &[u8] = b"transport test key, 32 bytes ok!";

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("pcb-transport-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tls_pair(tag: &str) -> (Dir, Security, Security) {
    let d = Dir::new(tag);
    ThrowawayCa::new("test CA").unwrap().write_dir(&d.0, &["localhost", "127.0.0.1"]).unwrap();
    let src = Security::tls(TlsSetup::source(&d.0, None).unwrap());
    let dst = Security::tls(TlsSetup::destination(&d.0, None).unwrap());
    (d, src, dst)
}

/// Handshake `src` (connecting) against `dst` (accepting) over loopback.
fn pair(
    src: &Security,
    dst: &Security,
) -> (Result<Transport, TransportError>, Result<Transport, TransportError>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let dst = dst.clone();
    let h = thread::spawn(move || dst.accept(l.accept().unwrap().0, T));
    let s = src.connect(TcpStream::connect(&addr).unwrap(), &addr, T);
    (s, h.join().unwrap())
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 12) as u8).collect()
}

fn read_n(mut t: &Transport, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    t.read_exact(&mut v).unwrap();
    v
}

/// 12 MiB each way at once (each side writes on one thread and reads on another), the source's
/// in vectored writes of a small header plus a large body, as page frames go out.
fn round_trip(src: Transport, dst: Transport) {
    let a = pattern(12 << 20, 1);
    let b = pattern(12 << 20, 2);
    let (a2, b2) = (a.clone(), b.clone());
    let s2 = src.clone();
    let writer = thread::spawn(move || {
        let mut w = &s2;
        for chunk in a2.chunks((2 << 20) + 24) {
            let (h, body) = chunk.split_at(24.min(chunk.len()));
            crate::migration::wire::write_all_vectored(&mut w, &mut [IoSlice::new(h), IoSlice::new(body)])
                .unwrap();
        }
    });
    let d2 = dst.clone();
    let back = thread::spawn(move || (&d2).write_all(&b2).unwrap());
    assert_eq!(read_n(&dst, a.len()), a);
    assert_eq!(read_n(&src, b.len()), b);
    writer.join().unwrap();
    back.join().unwrap();
    // End of file after an orderly shutdown.
    src.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&dst).read_to_end(&mut rest).ok();
    assert!(rest.is_empty());
}

#[test]
fn tls_carries_every_byte_both_ways() {
    let (_d, src, dst) = tls_pair("tls-rt");
    let (s, d) = pair(&src, &dst);
    let (s, d) = (s.unwrap(), d.unwrap());
    assert_eq!((s.mode(), d.mode()), (Mode::Tls, Mode::Tls));
    assert!(d.peer_identity().is_some(), "the destination knows the source's certificate");
    round_trip(s, d);
}

#[test]
fn psk_carries_every_byte_both_ways() {
    let k = Security::psk(KEY).unwrap();
    let (s, d) = pair(&k, &k);
    let (s, d) = (s.unwrap(), d.unwrap());
    assert_eq!(s.mode(), Mode::Psk);
    round_trip(s, d);
}

/// The same with the records of both ends opened ahead on threads of their own.
#[test]
fn records_opened_ahead_carry_every_byte_both_ways() {
    let (_d, src, dst) = tls_pair("tls-ahead");
    let k = Security::psk(KEY).unwrap();
    for (s, d) in [pair(&src, &dst), pair(&k, &k)] {
        let (s, d) = (s.unwrap(), d.unwrap());
        s.read_ahead().unwrap();
        d.read_ahead().unwrap();
        round_trip(s, d);
    }
}

/// Chunks taken whole from a read-ahead (as the stream thread takes them) carry every byte in
/// order, each with the headroom in front of it, mixed with ordinary reads; a connection
/// without read-ahead has none to take.
#[test]
fn records_opened_ahead_can_be_taken_whole() {
    let (_d, src, dst) = tls_pair("tls-take");
    let k = Security::psk(KEY).unwrap();
    for (s, d) in [pair(&src, &dst), pair(&k, &k)] {
        let (s, d) = (s.unwrap(), d.unwrap());
        assert!(d.take_opened().is_none(), "no read-ahead yet");
        let a = pattern(12 << 20, 5);
        let a2 = a.clone();
        let writer = thread::spawn(move || {
            (&s).write_all(&a2).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut got = read_n(&d, 1000);
        d.read_ahead().unwrap();
        got.extend(read_n(&d, 3));
        while let Some(o) = d.take_opened().unwrap().unwrap() {
            assert!(o.start <= o.end && o.end <= o.buf.len());
            got.extend_from_slice(&o.buf[o.start..o.end]);
            d.recycle(o.buf);
        }
        writer.join().unwrap();
        assert_eq!(got.len(), a.len());
        assert!(got == a, "every byte in order");
    }
}

/// A read timeout set on a connection whose records are opened ahead still ends a read that
/// waits too long, and the bytes that come later are all there.
#[test]
fn records_opened_ahead_keep_the_read_timeout() {
    let (_d, src, dst) = tls_pair("tls-ahead-timeout");
    let (s, d) = pair(&src, &dst);
    let (s, d) = (s.unwrap(), d.unwrap());
    d.read_ahead().unwrap();
    d.set_read_timeout(Some(std::time::Duration::from_millis(50))).unwrap();
    let mut b = [0u8; 4];
    let e = (&d).read(&mut b).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    (&s).write_all(&pattern(100_000, 9)).unwrap();
    d.set_read_timeout(None).unwrap();
    assert_eq!(read_n(&d, 100_000), pattern(100_000, 9));
}

#[test]
fn non_blocking_reads_and_writes_deliver_everything() {
    for (tag, sec) in [("tls", None), ("psk", Some(Security::psk(KEY).unwrap()))] {
        let (_d, src, dst) = match sec {
            Some(k) => (Dir::new("nb"), k.clone(), k),
            None => tls_pair("nb-tls"),
        };
        let (s, d) = pair(&src, &dst);
        let (s, d) = (s.unwrap(), d.unwrap());
        d.set_nonblocking(true).unwrap();
        // Small writes from the non-blocking side (like Requests), read by the blocking one.
        let mut w = &d;
        let frame = [7u8; 32];
        for _ in 0..1000 {
            loop {
                match w.write(&frame) {
                    Ok(n) => {
                        assert_eq!(n, 32);
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => panic!("{tag}: {e}"),
                }
            }
        }
        while d.wants_write() {
            let _ = w.flush();
        }
        assert_eq!(read_n(&s, 32_000), vec![7u8; 32_000], "{tag}");
        // Data sent by the blocking side arrives through non-blocking reads.
        let data = pattern(3 << 20, 9);
        let s2 = s.clone();
        let d2 = data.clone();
        let h = thread::spawn(move || (&s2).write_all(&d2).unwrap());
        let mut got = Vec::new();
        let mut buf = vec![0u8; 100_000];
        let end = Instant::now() + Duration::from_secs(30);
        while got.len() < data.len() {
            assert!(Instant::now() < end, "{tag}: stalled at {}", got.len());
            match (&d).read(&mut buf) {
                Ok(0) => panic!("{tag}: eof"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_micros(200))
                }
                Err(e) => panic!("{tag}: {e}"),
            }
        }
        h.join().unwrap();
        assert_eq!(got, data, "{tag}");
    }
}

#[test]
fn a_certificate_from_another_ca_is_refused_on_both_ends() {
    let (d, src, dst) = tls_pair("other-ca");
    // A source directory whose client certificate comes from another CA (its ca-cert.pem is the
    // destination's, so the source itself would accept the destination).
    let other = Dir::new("other-ca-src");
    std::fs::copy(d.0.join("ca-cert.pem"), other.0.join("ca-cert.pem")).unwrap();
    ThrowawayCa::new("a stranger's CA").unwrap().issue(&other.0, Leaf::Client, &["127.0.0.1"]).unwrap();
    let stranger = Security::tls(TlsSetup::source(&other.0, None).unwrap());
    let (s, dres) = pair(&stranger, &dst);
    let e = dres.unwrap_err();
    assert!(matches!(e, TransportError::Refused(_)) && e.to_string().contains("another CA"), "{e}");
    // The source learns of the refusal inside its handshake (the destination's alert).
    let e = s.unwrap_err();
    assert!(e.is_refusal() && e.to_string().contains("refused our certificate"), "{e}");
    // And a source that trusts another CA refuses the destination.
    let mine = Dir::new("other-ca-own");
    let ca = ThrowawayCa::new("the source's own CA").unwrap();
    ca.write_ca(&mine.0).unwrap();
    ca.issue(&mine.0, Leaf::Client, &["127.0.0.1"]).unwrap();
    let (s, _) = pair(&Security::tls(TlsSetup::source(&mine.0, None).unwrap()), &dst);
    let e = s.unwrap_err();
    assert!(e.is_refusal() && e.to_string().contains("another CA"), "{e}");
    drop(src);
}

#[test]
fn names_are_checked() {
    let d = Dir::new("names");
    let ca = ThrowawayCa::new("test CA").unwrap();
    ca.write_ca(&d.0).unwrap();
    ca.issue(&d.0, Leaf::Server, &["dest.example"]).unwrap();
    ca.issue(&d.0, Leaf::Client, &["src.example"]).unwrap();
    let dst = Security::tls(TlsSetup::destination(&d.0, None).unwrap());
    // The destination's certificate does not name 127.0.0.1.
    let (s, _) = pair(&Security::tls(TlsSetup::source(&d.0, None).unwrap()), &dst);
    let e = s.unwrap_err();
    assert!(e.is_refusal() && e.to_string().contains("--tls-peer-name"), "{e}");
    // With the right name pinned it works.
    let (s, dres) = pair(&Security::tls(TlsSetup::source(&d.0, Some("dest.example")).unwrap()), &dst);
    assert!(s.is_ok() && dres.is_ok());
    // A destination that pins another source name refuses this one, and tells it why.
    let pinned = Security::tls(TlsSetup::destination(&d.0, Some("other.example")).unwrap());
    let (s, dres) = pair(&Security::tls(TlsSetup::source(&d.0, Some("dest.example")).unwrap()), &pinned);
    assert!(dres.unwrap_err().to_string().contains("not valid for the name"));
    let e = s.unwrap_err();
    assert!(e.is_refusal() && e.to_string().contains("not valid for the name"), "{e}");
}

#[test]
fn another_key_or_another_mode_is_refused_with_a_clear_error() {
    let k1 = Security::psk(KEY).unwrap();
    let k2 = Security::psk(b"another key of thirty-two bytes!").unwrap();
    let (s, d) = pair(&k2, &k1);
    let (se, de) = (s.unwrap_err(), d.unwrap_err());
    assert!(se.is_refusal() && se.to_string().contains("different key files"), "{se}");
    assert!(de.is_refusal() && de.to_string().contains("different key files"), "{de}");
    // PSK source, TLS destination.
    let (_d, _, tls_dst) = tls_pair("mode");
    let (s, d) = pair(&k1, &tls_dst);
    assert!(matches!(d, Err(TransportError::Mismatch(_))), "{d:?}");
    let se = s.unwrap_err();
    assert!(se.is_refusal() && se.to_string().contains("--tls-dir"), "{se}");
    // Plaintext source, PSK destination.
    let plain = Security::insecure_plaintext(KEY.to_vec());
    let (s, d) = pair(&plain, &k1);
    assert!(matches!(d, Err(TransportError::Mismatch(_))), "{d:?}");
    assert!(s.unwrap_err().is_refusal());
    // Plaintext both ends: authenticated, not protected.
    let (s, d) = pair(&plain, &plain);
    assert_eq!(s.unwrap().mode(), Mode::Plaintext);
    assert_eq!(d.unwrap().mode(), Mode::Plaintext);
}

/// A man in the middle flips one bit of the 100th KiB source → destination.
#[test]
fn a_changed_byte_fails_the_connection() {
    let (_d, tls_src, tls_dst) = tls_pair("flip");
    let k = Security::psk(KEY).unwrap();
    for (src, dst) in [(tls_src, tls_dst), (k.clone(), k)] {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = l.local_addr().unwrap();
        let p = TcpListener::bind("127.0.0.1:0").unwrap();
        let paddr = p.local_addr().unwrap().to_string();
        thread::spawn(move || {
            let (c, _) = p.accept().unwrap();
            let s = TcpStream::connect(target).unwrap();
            let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            thread::spawn(move || std::io::copy(&mut s2, &mut c2));
            let (mut c, mut s) = (c, s);
            let mut buf = [0u8; 4096];
            let mut seen = 0usize;
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if seen < 100 << 10 && seen + n >= 100 << 10 {
                    buf[(100 << 10) - seen] ^= 0x10;
                }
                seen += n;
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let dst2 = dst.clone();
        let h = thread::spawn(move || dst2.accept(l.accept().unwrap().0, T));
        let s = src.connect(TcpStream::connect(&paddr).unwrap(), &paddr, T).unwrap();
        let d = h.join().unwrap().unwrap();
        let data = pattern(1 << 20, 3);
        let s2 = s.clone();
        thread::spawn(move || {
            let _ = (&s2).write_all(&data);
        });
        let mut got = vec![0u8; 1 << 20];
        let e = (&d).read_exact(&mut got).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        // The connection stays broken.
        assert!((&d).read(&mut got).is_err());
    }
}

#[test]
fn a_peer_that_drips_bytes_runs_out_of_time() {
    let k = Security::psk(KEY).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dripper = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        // A valid-looking frame header, one byte every 100 ms: each read gets a byte in time.
        for b in b"PCB1\x23\x00\x00\x00\x30\x00\x00\x00".iter().chain([0u8; 48].iter()) {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    // Every single read gets its byte in time: only a deadline over the whole handshake ends it.
    let e = k.accept(l.accept().unwrap().0, Duration::from_millis(700)).unwrap_err();
    assert!(matches!(e, TransportError::Timeout { .. }), "{e}");
    dripper.join().unwrap();
}

/// A peer that stops reading without closing: with `bound_writes`, the writer's blocking write
/// fails with the write timeout's error (inside a TLS or Noise record as in the clear) instead
/// of blocking until TCP gives up, and the connection is gone. The writer runs on a thread of
/// its own: the test fails instead of hanging if the bound never fires.
#[test]
fn a_peer_that_stops_reading_fails_a_bounded_write_with_the_write_timeout() {
    let (_d, tls_src, tls_dst) = tls_pair("stall");
    let psk = Security::psk(KEY).unwrap();
    let plain = Security::insecure_plaintext(KEY.to_vec());
    for (src, dst) in [(&tls_src, &tls_dst), (&psk, &psk), (&plain, &plain)] {
        let (s, d) = pair(src, dst);
        let (s, d) = (s.unwrap(), d.unwrap());
        s.bound_writes(Duration::from_secs(1)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let w = s.clone();
        thread::spawn(move || {
            let chunk = vec![7u8; 1 << 20];
            let mut sent = 0u64;
            let e = loop {
                match (&w).write_all(&chunk) {
                    Ok(()) => sent += chunk.len() as u64,
                    Err(e) => break e,
                }
            };
            let _ = tx.send((e, sent));
        });
        let (e, sent) = rx.recv_timeout(Duration::from_secs(60)).expect("the bounded write never returned");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{:?}: {e}", src.mode());
        let text = e.to_string();
        assert!(text.starts_with("write timeout: the peer at 127.0.0.1:"), "{text}");
        assert!(text.contains("for 1s (--write-timeout)"), "{text}");
        assert!(sent > 0, "{:?}: the buffers took something before the peer's window closed", src.mode());
        // The connection is gone: a read returns at once, with no data.
        let mut buf = [0u8; 16];
        let r = (&s).read(&mut buf);
        assert!(!matches!(r, Ok(n) if n > 0), "{:?}: read after the drop: {r:?}", src.mode());
        drop(d);
    }
}
