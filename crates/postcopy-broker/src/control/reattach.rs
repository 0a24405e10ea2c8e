//! Reconnecting to a restarted broker: connect again to the same control socket and `reattach`
//! the client ids a peer owns ([`ControlClient::reconnect`]), with bounded retries and a backoff
//! ([`ReattachPolicy`]). A connection that the parked control socket queued while no broker ran
//! and that ends before the reply (the restarted broker died too) is tried again; a socket that
//! nobody holds (no broker, no service manager's fd store) and a broker that refuses the ids end
//! it at once. docs/control-protocol.md, "When the broker dies".

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use super::client::{ControlClient, DEFAULT_TIMEOUT};
use super::error::ControlError;
use crate::client_id::ClientId;

/// How long and how often [`ControlClient::reconnect`] tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReattachPolicy {
    /// Give up once this long has passed since the first attempt.
    pub timeout: Duration,
    /// Wait this long after the first failed attempt, doubling after each one...
    pub first_delay: Duration,
    /// ...up to this.
    pub max_delay: Duration,
    /// How long one attempt waits for the restarted broker's reply (it answers once it has
    /// rebuilt its state and taken its clients back).
    pub reply_timeout: Duration,
}

impl Default for ReattachPolicy {
    /// 60 s in all (the source's default `--resume-timeout`), 20 ms doubling up to 1 s between
    /// attempts (the source's reconnect backoff), 20 s for a reply.
    fn default() -> ReattachPolicy {
        ReattachPolicy {
            timeout: Duration::from_secs(60),
            first_delay: Duration::from_millis(20),
            max_delay: Duration::from_secs(1),
            reply_timeout: Duration::from_secs(20),
        }
    }
}

/// Whether a failed attempt may succeed when tried again: the connection ended or timed out
/// (a restarted broker died too, or is slow to rebuild). A refused or missing socket is not: the
/// parked control socket of a broker under an fd store always accepts (its connections wait in
/// the backlog), so nobody holds this one.
fn worth_retrying(e: &ControlError) -> bool {
    match e {
        ControlError::PeerClosed | ControlError::Truncated { .. } => true,
        ControlError::Io { source, .. } => {
            !matches!(source.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound)
        }
        _ => false,
    }
}

fn attempt(
    path: &Path,
    clients: &[ClientId],
    reply_timeout: Duration,
) -> Result<ControlClient, ControlError> {
    let mut c = ControlClient::connect(path)?;
    c.set_timeout(Some(reply_timeout))?;
    c.reattach(clients)?;
    c.set_timeout(Some(DEFAULT_TIMEOUT))?;
    Ok(c)
}

impl ControlClient {
    /// After the connection that registered `clients` ended without a `postcopy_end` (the
    /// broker died): connect to `path` again and reattach them, retrying as `policy` says.
    /// Returns the new connection (replies time out after [`DEFAULT_TIMEOUT`]); it now speaks
    /// for `clients`, and `postcopy_end` comes over it. Fails with
    /// [`ControlError::ReattachFailed`] when no broker takes them back.
    pub fn reconnect(
        path: impl AsRef<Path>,
        clients: &[ClientId],
        policy: &ReattachPolicy,
    ) -> Result<ControlClient, ControlError> {
        let path = path.as_ref();
        let start = Instant::now();
        let mut delay = policy.first_delay;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let last = match attempt(path, clients, policy.reply_timeout) {
                Ok(c) => {
                    log::info!(
                        "reattached client(s) {} to the broker at {} ({attempts} attempt(s), {} ms)",
                        list(clients),
                        path.display(),
                        start.elapsed().as_millis()
                    );
                    return Ok(c);
                }
                Err(e) => e,
            };
            let waited = start.elapsed();
            if !worth_retrying(&last) || waited + delay > policy.timeout {
                return Err(ControlError::ReattachFailed {
                    path: path.display().to_string(),
                    clients: list(clients),
                    attempts,
                    waited,
                    last: Box::new(last),
                });
            }
            log::info!("reattaching to the broker at {}: {last}; trying again in {delay:?}", path.display());
            std::thread::sleep(delay);
            delay = (delay * 2).min(policy.max_delay);
        }
    }
}

fn list(clients: &[ClientId]) -> String {
    clients.iter().map(|c| c.0.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket nobody listens on ends the attempts at once, with the path and the ids in the
    /// message.
    #[test]
    fn a_socket_nobody_holds_fails_at_once() {
        let dir = std::env::temp_dir().join(format!("pcb-reattach-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gone.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let policy = ReattachPolicy { timeout: Duration::from_secs(30), ..ReattachPolicy::default() };
        let e = ControlClient::reconnect(&path, &[ClientId(3), ClientId(4)], &policy).unwrap_err();
        match &e {
            ControlError::ReattachFailed { attempts, clients, .. } => {
                assert_eq!(*attempts, 1);
                assert_eq!(clients, "3, 4");
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("gone.sock"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A listener that accepts and closes (a broker that dies again before it answers) is tried
    /// again; once nobody listens any more the attempts end.
    #[test]
    fn a_connection_that_ends_before_the_reply_is_tried_again() {
        let dir = std::env::temp_dir().join(format!("pcb-reattach-again-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flaky.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let closer = std::thread::spawn(move || {
            let mut n = 0;
            for c in listener.incoming() {
                drop(c);
                n += 1;
                if n == 3 {
                    break;
                }
            }
            n
        });
        let policy = ReattachPolicy {
            timeout: Duration::from_secs(5),
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
            reply_timeout: Duration::from_secs(5),
        };
        let e = ControlClient::reconnect(&path, &[ClientId(7)], &policy).unwrap_err();
        match &e {
            ControlError::ReattachFailed { attempts, last, .. } => {
                assert!(*attempts >= 3, "{e}");
                assert!(matches!(**last, ControlError::PeerClosed | ControlError::Io { .. }), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(closer.join().unwrap(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
