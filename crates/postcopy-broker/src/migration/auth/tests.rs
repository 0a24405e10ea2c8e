//! Authentication over real TCP on 127.0.0.1: right key, wrong key, same side, garbage, early
//! close, silence; and key-file loading.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::thread;
use std::time::Duration;

use super::*;
use crate::migration::wire::{encode, BlockInfo, BlockTable, Channel, Decoder, Hello, PROTOCOL_VERSION};

const KEY: &[u8] = b"0123456789abcdef-shared-secret!!";
const T: Option<Duration> = Some(Duration::from_secs(5));

/// Run `server` on an accepted loopback connection in a thread and `client` on the connecting
/// side; return both results.
fn pair<A, B>(
    server: impl FnOnce(TcpStream) -> A + Send + 'static,
    client: impl FnOnce(TcpStream) -> B,
) -> (A, B)
where
    A: Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || server(l.accept().unwrap().0));
    let b = client(TcpStream::connect(addr).unwrap());
    (h.join().unwrap(), b)
}

#[test]
fn right_key_passes_and_leaves_the_hello_in_the_socket() {
    let (dst, src) = pair(
        |mut s| {
            authenticate_tcp(&mut s, KEY, Side::Destination, T)?;
            // The Hello the source sent right after authenticating is read by a fresh decoder.
            let mut dec = Decoder::default();
            s.set_read_timeout(T).unwrap();
            match dec.read_frame(&mut s) {
                Ok(Frame::Hello(h)) => Ok(h.session_id),
                other => panic!("{other:?}"),
            }
        },
        |mut s| {
            authenticate_tcp(&mut s, KEY, Side::Source, T).unwrap();
            let hello = Hello {
                version: PROTOCOL_VERSION,
                capabilities: 0,
                channel: Channel::Main,
                session_id: 42,
                resume: false,
                blocks: BlockTable::new(vec![BlockInfo::new("ram", 4096, 4096)]).unwrap(),
            };
            let mut b = Vec::new();
            encode(&Frame::Hello(hello), &mut b).unwrap();
            s.write_all(&b).unwrap();
        },
    );
    assert_eq!(dst.map_err(|e: AuthError| e.to_string()), Ok(42));
    let _: () = src;
}

#[test]
fn wrong_key_is_refused_on_both_ends() {
    let (dst, src) = pair(
        |mut s| authenticate_tcp(&mut s, KEY, Side::Destination, T),
        |mut s| authenticate_tcp(&mut s, b"another key, also 32 bytes long!", Side::Source, T),
    );
    for r in [dst, src] {
        let e = r.unwrap_err();
        assert!(matches!(e, AuthError::WrongKey), "{e:?}");
        assert!(e.to_string().contains("different pre-shared keys"));
    }
}

#[test]
fn same_side_is_refused() {
    let (a, b) = pair(
        |mut s| authenticate_tcp(&mut s, KEY, Side::Source, T),
        |mut s| authenticate_tcp(&mut s, KEY, Side::Source, T),
    );
    assert!(matches!(a, Err(AuthError::SameSide(Side::Source))));
    assert!(matches!(b, Err(AuthError::SameSide(Side::Source))));
}

#[test]
fn a_mirror_cannot_authenticate() {
    // A peer that echoes every byte back would replay our own nonce and proof.
    let (_, r) = pair(
        |mut s| {
            let mut buf = [0u8; 256];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        },
        |mut s| authenticate_tcp(&mut s, KEY, Side::Destination, T),
    );
    assert!(matches!(r, Err(AuthError::SameSide(_))), "{r:?}");
}

#[test]
fn garbage_is_an_error_not_a_hang() {
    let (r, _) = pair(
        |mut s| authenticate_tcp(&mut s, KEY, Side::Destination, T),
        |mut s| {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        },
    );
    let e = r.unwrap_err();
    assert!(matches!(e, AuthError::Wire(WireError::BadMagic { .. })), "{e:?}");
}

#[test]
fn oversized_auth_payload_is_refused() {
    let (r, _) = pair(
        |mut s| authenticate_tcp(&mut s, KEY, Side::Destination, T),
        |mut s| {
            let h = Header { frame_type: FrameType::AuthNonce, flags: 0, payload_len: 1 << 30 };
            s.write_all(&h.to_bytes()).unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        },
    );
    assert!(matches!(r, Err(AuthError::Wire(WireError::PayloadTooLarge { .. }))), "{r:?}");
}

#[test]
fn early_close_is_reported() {
    let (r, _) = pair(|mut s| authenticate_tcp(&mut s, KEY, Side::Destination, T), drop);
    assert!(matches!(r, Err(AuthError::Closed)), "{r:?}");
    // Closing after the nonce exchange, before the proof.
    let (r, _) = pair(
        |mut s| authenticate_tcp(&mut s, KEY, Side::Destination, T),
        |mut s| {
            write_frame(&mut s, &Frame::AuthNonce { side: Side::Source, nonce: [1; AUTH_LEN] }).unwrap();
            let mut h = [0u8; HEADER_LEN + 33];
            s.read_exact(&mut h).unwrap();
        },
    );
    assert!(matches!(r, Err(AuthError::Closed)), "{r:?}");
}

#[test]
fn a_silent_peer_times_out() {
    let (r, _) = pair(
        |mut s| authenticate_tcp(&mut s, KEY, Side::Destination, Some(Duration::from_millis(200))),
        |s| {
            // Stay connected and say nothing until the server gave up (it closes the socket).
            let mut s = s;
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        },
    );
    assert!(matches!(r, Err(AuthError::Timeout(_))), "{r:?}");
}

#[test]
fn peer_error_text_is_reported() {
    let (r, _) = pair(
        |mut s| authenticate_tcp(&mut s, KEY, Side::Destination, T),
        |mut s| {
            write_frame(&mut s, &Frame::Error { text: "source shutting down" }).unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        },
    );
    match r {
        Err(AuthError::PeerError(t)) => assert_eq!(t, "source shutting down"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn short_key_is_refused() {
    let mut buf = Vec::new();
    let mut rw = std::io::Cursor::new(&mut buf);
    assert!(matches!(authenticate(&mut rw, b"short", Side::Source), Err(AuthError::ShortKey(5))));
}

fn key_file(name: &str, contents: &[u8], mode: u32) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pcb-auth-test-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    fs::write(&p, contents).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[test]
fn key_files() {
    let hex = key_file("hex", b"00112233445566778899aabbccddeeff0011\n", 0o600);
    assert_eq!(
        load_key(&hex).unwrap(),
        vec![
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
            0x00, 0x11
        ]
    );
    let raw = key_file("raw", &[0xff; 20], 0o400);
    assert_eq!(load_key(&raw).unwrap(), vec![0xff; 20]);
    let open = key_file("open", &[0xff; 20], 0o644);
    let e = load_key(&open).unwrap_err().to_string();
    assert!(e.contains("chmod 600"), "{e}");
    let grp = key_file("grp", &[0xff; 20], 0o640);
    assert!(load_key(&grp).unwrap_err().to_string().contains("chmod 600"));
    let short = key_file("short", b"abcd\n", 0o600);
    assert!(matches!(load_key(&short), Err(AuthError::ShortKey(_))));
    let short_hex = key_file("shorthex", b"00112233445566778899aabbccddee\n", 0o600);
    assert!(matches!(load_key(&short_hex), Err(AuthError::ShortKey(15))));
    assert!(load_key(Path::new("/nonexistent/pcb-key"))
        .unwrap_err()
        .to_string()
        .contains("/nonexistent/pcb-key"));
    let _ = fs::remove_dir_all(hex.parent().unwrap());
}
