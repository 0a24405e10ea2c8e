//! pcb-keeper: the part of a service manager a broker needs to survive its own death, for hosts
//! without systemd (and the tests' stand-in for it). It runs COMMAND with `$NOTIFY_SOCKET` set to
//! a datagram socket of its own and keeps what the command parks there, as systemd's fd store
//! does (sd_notify(3)): `FDSTORE=1` with `FDNAME=` and the fds as SCM_RIGHTS (the same open
//! file passed again is kept once, compared with kcmp(2)), `FDSTOREREMOVE=1` with `FDNAME=`.
//! When the command dies of a signal (Restart=on-abnormal) it starts it again with every stored
//! fd at 3.., `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` (sd_listen_fds(3)). It exits with
//! the command's status once the command exits on its own (128+N after a signal past
//! `--max-restarts`).
//!
//! Events go to stderr as `pcb-keeper: {json}` lines: `started` (pid, fds passed), `exited`
//! (pid, code or signal), `stored` / `removed` (name, fds held), and `notify` (other lines such
//! as READY=1 or STATUS=).

#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitCode};
use std::time::Duration;

use clap::Parser;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    bind, recvmsg, socket, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use postcopy_broker_cli::fdstore::notify_addr;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "keep a command's fd store (sd_notify FDSTORE=1) and restart it when it dies of a signal")]
struct Args {
    /// The notify socket to create: a path or @abstract-name (default: @pcb-keeper-PID).
    #[arg(long, value_name = "ADDR")]
    notify_socket: Option<String>,
    /// Restarts after deaths by a signal, at most.
    #[arg(long, value_name = "N", default_value_t = 100)]
    max_restarts: u32,
    /// Milliseconds between a death and the restart (systemd's RestartSec= defaults to 100 ms).
    #[arg(long, value_name = "MS", default_value_t = 100)]
    restart_delay_ms: u64,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

/// One event line, in one write(2): the command writes to the same stderr, and a pipe keeps
/// writes of up to PIPE_BUF bytes whole.
fn event(v: serde_json::Value) {
    let line = format!("pcb-keeper: {v}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
}

/// Whether two fds of this process are the same open file (kcmp KCMP_FILE).
fn same_file(a: RawFd, b: RawFd) -> bool {
    let pid = std::process::id();
    // SAFETY: kcmp compares two fds of our own process; it reads nothing of ours.
    let r = unsafe {
        libc::syscall(libc::SYS_kcmp, pid, pid, 0 /* KCMP_FILE */, a, b)
    };
    r == 0
}

struct Store {
    fds: Vec<(String, OwnedFd)>,
}

impl Store {
    fn add(&mut self, name: &str, fd: OwnedFd) {
        if self.fds.iter().any(|(_, f)| same_file(f.as_raw_fd(), fd.as_raw_fd())) {
            return;
        }
        self.fds.push((name.to_string(), fd));
    }

    fn remove(&mut self, name: &str) {
        self.fds.retain(|(n, _)| n != name);
    }

    /// One notify datagram: its text and the fds that came with it.
    fn message(&mut self, text: &str, fds: Vec<OwnedFd>) {
        let mut store = false;
        let mut remove = false;
        let mut name = "stored".to_string();
        let mut other = Vec::new();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("FDSTORE", "1")) => store = true,
                Some(("FDSTOREREMOVE", "1")) => remove = true,
                Some(("FDNAME", n)) => name = n.to_string(),
                _ => other.push(line.to_string()),
            }
        }
        if store {
            for fd in fds {
                self.add(&name, fd);
            }
            event(json!({"stored": name, "held": self.fds.len()}));
        } else if remove {
            self.remove(&name);
            event(json!({"removed": name, "held": self.fds.len()}));
        }
        if !other.is_empty() {
            event(json!({"notify": other}));
        }
    }
}

fn spawn(cmd: &[String], store: &Store) -> Result<Child, String> {
    let n = store.fds.len();
    // High copies, so that placing them at 3.. in the child overwrites none of them.
    let min = i32::try_from(3 + n + 16).map_err(|_| "too many fds")?;
    let mut copies = Vec::with_capacity(n);
    for (_, fd) in &store.fds {
        // SAFETY: F_DUPFD_CLOEXEC duplicates a valid fd of ours to the lowest free number >= min.
        let c = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
        if c < 0 {
            return Err(format!("dup: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: the fd was just made and is ours alone.
        copies.push(unsafe { OwnedFd::from_raw_fd(c) });
    }
    let names: Vec<&str> = store.fds.iter().map(|(n, _)| n.as_str()).collect();
    // The child takes our environment as it is at exec (the Command changes none of it), so the
    // variables are set here and LISTEN_PID in the child itself.
    if n > 0 {
        std::env::set_var("LISTEN_FDS", n.to_string());
        std::env::set_var("LISTEN_FDNAMES", names.join(":"));
    } else {
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let raw: Vec<RawFd> = copies.iter().map(AsRawFd::as_raw_fd).collect();
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..]);
    // SAFETY: this process is single-threaded, so the child may allocate after fork; dup2 and
    // setenv touch only the child's own fds and environment.
    unsafe {
        c.pre_exec(move || {
            if !raw.is_empty() {
                for (i, &fd) in raw.iter().enumerate() {
                    let to = i32::try_from(3 + i).unwrap_or(i32::MAX);
                    if libc::dup2(fd, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                let pid = std::ffi::CString::new(libc::getpid().to_string()).unwrap_or_default();
                if libc::setenv(c"LISTEN_PID".as_ptr(), pid.as_ptr(), 1) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = c.spawn().map_err(|e| format!("{}: {e}", cmd[0]))?;
    event(json!({"started": child.id(), "fds": n, "names": names}));
    Ok(child)
}

fn run(a: &Args) -> Result<ExitCode, String> {
    let target = a.notify_socket.clone().unwrap_or_else(|| format!("@pcb-keeper-{}", std::process::id()));
    let addr = notify_addr(target.as_bytes()).map_err(|e| format!("--notify-socket {target}: {e}"))?;
    let sock = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket: {e}"))?;
    bind(sock.as_raw_fd(), &addr).map_err(|e| format!("bind {target}: {e}"))?;
    std::env::set_var("NOTIFY_SOCKET", &target);
    let mut store = Store { fds: Vec::new() };
    let mut restarts = 0;
    let mut child = spawn(&a.command, &store)?;
    let mut buf = vec![0u8; 4096];
    loop {
        // Poll the notify socket; look at the child between polls (no SIGCHLD handler needed).
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(20u8)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        // Drain every message before looking at the child, so nothing it sent before dying is lost.
        loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([RawFd; 253]);
            let msg = match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("recvmsg: {e}")),
            };
            let mut got = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(v) = c {
                        // SAFETY: fds that just arrived with the message are ours alone.
                        got.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
            }
            let n = msg.bytes;
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            store.message(&text, got);
        }
        let Some(status) = child.try_wait().map_err(|e| format!("wait: {e}"))? else { continue };
        event(json!({"exited": child.id(), "code": status.code(), "signal": status.signal()}));
        match status.signal() {
            Some(sig) if restarts < a.max_restarts => {
                restarts += 1;
                log_restart(sig, restarts, &store);
                std::thread::sleep(Duration::from_millis(a.restart_delay_ms));
                child = spawn(&a.command, &store)?;
            }
            Some(sig) => return Ok(ExitCode::from(u8::try_from(128 + sig).unwrap_or(255))),
            None => return Ok(ExitCode::from(u8::try_from(status.code().unwrap_or(1)).unwrap_or(1))),
        }
    }
}

fn log_restart(sig: i32, n: u32, store: &Store) {
    event(json!({"restarting": n, "after_signal": sig, "fds": store.fds.len()}));
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pcb-keeper: {e}");
            ExitCode::FAILURE
        }
    }
}
