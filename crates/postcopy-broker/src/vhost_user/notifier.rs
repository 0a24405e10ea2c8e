//! vhost-user backends on the broker's notifier list: a Probe notifier that vetoes postcopy when a
//! backend lacks PAGEFAULT or REPLY_ACK (before anything is touched), and an InboundEnd notifier
//! that sends POSTCOPY_END.

use std::sync::{Arc, Mutex};

use crate::notify::{NotifierId, Notifiers, NotifyReason};
use crate::vhost_user::frontend::BackendConn;
use crate::vhost_user::postcopy;

/// Add a Probe notifier for `conn`: postcopy is refused, naming the backend's socket, unless it
/// negotiated PAGEFAULT and REPLY_ACK. It keeps a snapshot of the negotiated features, not the
/// connection.
pub fn add_probe_notifier(notifiers: &mut Notifiers, conn: &BackendConn) -> NotifierId {
    let socket = conn.socket().display().to_string();
    let acked = conn.acked_protocol();
    let name = format!("vhost-user {socket}");
    notifiers.add(
        name,
        Box::new(move |reason| match reason {
            NotifyReason::Probe => postcopy::check_features(&socket, acked).map_err(|e| e.to_string()),
            _ => Ok(()),
        }),
    )
}

/// Add an InboundEnd notifier that sends POSTCOPY_END to the backend. A backend that cannot be
/// told (it died, its socket broke) is logged and does not stop the other notifiers: postcopy is
/// over for everyone else either way.
pub fn add_end_notifier(notifiers: &mut Notifiers, conn: Arc<Mutex<BackendConn>>) -> NotifierId {
    let name = match conn.lock() {
        Ok(c) => format!("vhost-user {} end", c.socket().display()),
        Err(_) => "vhost-user end".to_string(),
    };
    notifiers.add(
        name,
        Box::new(move |reason| {
            if reason != NotifyReason::InboundEnd {
                return Ok(());
            }
            match conn.lock() {
                Ok(mut c) => {
                    if let Err(e) = postcopy::end(&mut c) {
                        log::warn!("{e}");
                    }
                }
                Err(_) => {
                    log::warn!("a vhost-user backend connection's lock is poisoned; no POSTCOPY_END sent")
                }
            }
            Ok(())
        }),
    )
}
