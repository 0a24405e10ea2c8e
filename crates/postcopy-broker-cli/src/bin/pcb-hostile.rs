//! pcb-hostile: control-socket peers that try to harm the broker or other peers, for the
//! hostile-peer tests and the benchmark (docs/security.md lists what each one tries). Each
//! subcommand prints one JSON line saying what the broker answered.
//!
//! * `register`: one registration of any kind, block and range (a grant bypass attempt when the
//!   peer's uid was not given that range).
//! * `unregister`: unregister any client id (another uid's, for one).
//! * `firecracker`: Firecracker's UFFD handshake for any image range, then waits to see whether
//!   the broker closes the connection and whether it wrote anything back.
//! * `flood`: pipelines requests, keeping many in flight, until stdin closes.

#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use postcopy_broker::client_id::ClientId;
use postcopy_broker::control::frame::encode_message;
use postcopy_broker::control::{
    send_firecracker_handshake, ClientKind, ControlClient, ControlError, FcRegion, MappingSpec, Request,
};
use postcopy_broker::uffd::Uffd;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "hostile control-socket peers for postcopy-broker's tests")]
struct Args {
    /// The broker's control socket.
    #[arg(long)]
    control: String,
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Register one client with a fresh userfaultfd.
    Register {
        /// shared or private.
        #[arg(long, default_value = "shared")]
        kind: String,
        /// The block of the mapping (shared).
        #[arg(long, default_value = "ram")]
        block: String,
        /// Offset in the block (shared) or in the image file (private).
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Length in bytes.
        #[arg(long, default_value_t = 4096)]
        len: u64,
    },
    /// Unregister the client with this id.
    Unregister {
        /// The client id.
        #[arg(long)]
        client: u64,
    },
    /// Send Firecracker's handshake for one region at `offset` of the image.
    Firecracker {
        /// Offset in the image file.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Length in bytes.
        #[arg(long, default_value_t = 4096)]
        len: u64,
        /// How long to wait for the broker to close the connection, in ms.
        #[arg(long, default_value_t = 2000)]
        wait_ms: u64,
    },
    /// Pipeline `op` requests with `depth` in flight until stdin closes; print the counts.
    Flood {
        /// status or hello.
        #[arg(long, default_value = "status")]
        op: String,
        /// Requests in flight.
        #[arg(long, default_value_t = 64)]
        depth: usize,
    },
}

/// A userfaultfd this peer may create: with kernel-mode faults if allowed, else user-mode only
/// (all an unprivileged uid gets by default).
fn some_uffd() -> Result<Uffd, String> {
    Uffd::open(0)
        .or_else(|_| Uffd::open_raw(true).and_then(|(fd, _)| Uffd::from_fd_with_api(fd, 0)))
        .map_err(|e| format!("userfaultfd: {e}"))
}

/// An address range nobody maps, page aligned (the broker only records it).
const ADDR: u64 = 0x6000_0000_0000;

fn register(
    path: &str,
    kind: &str,
    block: String,
    offset: u64,
    len: u64,
) -> Result<serde_json::Value, String> {
    let kind = match kind {
        "shared" => ClientKind::Shared,
        "private" => ClientKind::Private,
        other => return Err(format!("unknown kind {other}")),
    };
    let mut c = ControlClient::connect(path).map_err(|e| e.to_string())?;
    let uffd = some_uffd()?;
    let m = MappingSpec { client_addr: ADDR, block, offset, len };
    Ok(match c.register("pcb-hostile", kind, None, &[m], uffd.as_fd()) {
        Ok(id) => json!({"registered": id}),
        Err(ControlError::Remote { code, message }) => json!({"code": code, "message": message}),
        Err(e) => return Err(e.to_string()),
    })
}

fn unregister(path: &str, client: u64) -> Result<serde_json::Value, String> {
    let mut c = ControlClient::connect(path).map_err(|e| e.to_string())?;
    Ok(match c.unregister(ClientId(client)) {
        Ok(()) => json!({"unregistered": client}),
        Err(ControlError::Remote { code, message }) => json!({"code": code, "message": message}),
        Err(e) => return Err(e.to_string()),
    })
}

fn firecracker(path: &str, offset: u64, len: u64, wait: Duration) -> Result<serde_json::Value, String> {
    let uffd = some_uffd()?;
    let region = FcRegion { base_host_virt_addr: ADDR, size: len, offset, page_size: 4096 };
    let mut s = send_firecracker_handshake(path, &[region], uffd.as_fd()).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let closed = match s.read_to_end(&mut got) {
        Ok(_) => true,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => false,
        Err(e) => return Err(e.to_string()),
    };
    Ok(json!({"closed": closed, "reply_bytes": got.len()}))
}

/// Pipeline `op` requests and drain the replies without parsing them beyond their frame header
/// and op (a flood costs the broker far more than the flooder: its CPU use is the broker's
/// problem, not the scheduler's).
fn flood(path: &str, op: &str, depth: usize) -> Result<serde_json::Value, String> {
    let (req, reply_op) = match op {
        "status" => (Request::Status, "status"),
        "hello" => (Request::Hello { version: 1, name: "pcb-hostile".into() }, "hello_ok"),
        other => return Err(format!("unknown op {other}")),
    };
    let frame = encode_message(&req).map_err(|e| e.to_string())?;
    let expect = format!(r#"{{"op":"{reply_op}""#);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        stop2.store(true, Ordering::SeqCst);
    });
    let mut r = UnixStream::connect(path).map_err(|e| e.to_string())?;
    let mut w = r.try_clone().map_err(|e| e.to_string())?;
    let burst: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * depth).collect();
    w.write_all(&burst).map_err(|e| e.to_string())?;
    let (mut sent, mut replies, mut wrong) = (depth as u64, 0u64, 0u64);
    let mut payload = Vec::new();
    let mut answered = |r: &mut UnixStream| -> Result<(), String> {
        let mut head = [0u8; 8];
        r.read_exact(&mut head).map_err(|e| format!("reading a reply: {e}"))?;
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        payload.resize(len, 0);
        r.read_exact(&mut payload).map_err(|e| format!("reading a reply: {e}"))?;
        if &head[..4] == b"PCB1" && payload.starts_with(expect.as_bytes()) {
            replies += 1;
        } else {
            wrong += 1;
        }
        Ok(())
    };
    let mut said = false;
    while !stop.load(Ordering::SeqCst) {
        answered(&mut r)?;
        if !said {
            println!("{}", json!({"flooding": true}));
            let _ = std::io::stdout().flush();
            said = true;
        }
        w.write_all(&frame).map_err(|e| e.to_string())?;
        sent += 1;
    }
    for _ in 0..depth {
        answered(&mut r)?;
    }
    Ok(json!({"sent": sent, "replies": replies, "wrong": wrong}))
}

fn main() -> ExitCode {
    let a = Args::parse();
    let r = match a.what {
        What::Register { kind, block, offset, len } => register(&a.control, &kind, block, offset, len),
        What::Unregister { client } => unregister(&a.control, client),
        What::Firecracker { offset, len, wait_ms } => {
            firecracker(&a.control, offset, len, Duration::from_millis(wait_ms))
        }
        What::Flood { op, depth } => flood(&a.control, &op, depth),
    };
    match r {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pcb-hostile: {e}");
            ExitCode::FAILURE
        }
    }
}
