//! What one control-socket peer may make the broker hold: connections per uid, and
//! registrations (each a client's userfaultfd and pidfd) per connection and per uid. A peer past
//! a limit is refused with a message that names the limit; everyone else is unaffected.
//!
//! [`Owners`] remembers which uid and connection registered each client, for as long as the
//! broker holds that client's fds: while it is served, and after it was retired for misbehaving
//! while its process may still live (those fds are still held on the peer's behalf, so they
//! count).

use std::collections::HashMap;

use crate::client::ClientId;

/// Limits per peer (configurable with `serve --max-...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlLimits {
    /// Registrations one connection may hold.
    pub registrations_per_connection: usize,
    /// Registrations all connections of one uid may hold.
    pub registrations_per_uid: usize,
    /// Open control connections of one uid (a Firecracker connection stays open for the life of
    /// its VM).
    pub connections_per_uid: usize,
}

impl ControlLimits {
    /// Registrations per connection by default.
    pub const REGISTRATIONS_PER_CONNECTION: usize = 64;
    /// Registrations per uid by default.
    pub const REGISTRATIONS_PER_UID: usize = 1024;
    /// Connections per uid by default.
    pub const CONNECTIONS_PER_UID: usize = 1024;
}

impl Default for ControlLimits {
    fn default() -> Self {
        ControlLimits {
            registrations_per_connection: Self::REGISTRATIONS_PER_CONNECTION,
            registrations_per_uid: Self::REGISTRATIONS_PER_UID,
            connections_per_uid: Self::CONNECTIONS_PER_UID,
        }
    }
}

/// Who registered a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    /// The peer's uid.
    pub uid: u32,
    /// The control connection it came on.
    pub conn: u64,
    /// Its process can only be watched through that connection: its end is the peer's exit.
    pub exits_with_conn: bool,
    /// The client it is a forked child of: it is released with it.
    pub parent: Option<ClientId>,
}

/// The owners of the clients the broker holds fds for.
#[derive(Debug, Default)]
pub(crate) struct Owners {
    by_client: HashMap<ClientId, Owner>,
}

impl Owners {
    /// Record the owner of a new client.
    pub fn insert(&mut self, id: ClientId, owner: Owner) {
        self.by_client.insert(id, owner);
    }

    /// The owner of a client.
    pub fn get(&self, id: ClientId) -> Option<Owner> {
        self.by_client.get(&id).copied()
    }

    /// Forget a client whose fds were released.
    pub fn remove(&mut self, id: ClientId) {
        self.by_client.remove(&id);
    }

    /// The forked children of `parent`.
    pub fn children_of(&self, parent: ClientId) -> Vec<ClientId> {
        self.by_client.iter().filter(|(_, o)| o.parent == Some(parent)).map(|(id, _)| *id).collect()
    }

    /// Every client with the control connection it registered on.
    pub fn all(&self) -> impl Iterator<Item = (ClientId, u64)> + '_ {
        self.by_client.iter().map(|(id, o)| (*id, o.conn))
    }

    /// Clients registered on `conn` that end with it.
    pub fn exiting_with(&self, conn: u64) -> Vec<ClientId> {
        self.by_client
            .iter()
            .filter(|(_, o)| o.conn == conn && o.exits_with_conn)
            .map(|(id, _)| *id)
            .collect()
    }

    /// `Err` with the reason when a peer of `uid` on `conn` may not register one more client.
    pub fn may_register(&self, limits: &ControlLimits, conn: u64, uid: u32) -> Result<(), String> {
        let on_conn = self.by_client.values().filter(|o| o.conn == conn).count();
        if on_conn >= limits.registrations_per_connection {
            return Err(format!(
                "this connection already holds {on_conn} registrations, the limit per connection \
                 (serve --max-registrations-per-connection); unregister clients first"
            ));
        }
        let of_uid = self.by_client.values().filter(|o| o.uid == uid).count();
        if of_uid >= limits.registrations_per_uid {
            return Err(format!(
                "uid {uid} already holds {of_uid} registrations, the limit per uid \
                 (serve --max-registrations-per-uid); unregister clients or let their processes exit"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_are_counted_per_connection_and_per_uid() {
        let limits = ControlLimits {
            registrations_per_connection: 2,
            registrations_per_uid: 3,
            connections_per_uid: 9,
        };
        let mut o = Owners::default();
        let own = |uid, conn| Owner { uid, conn, exits_with_conn: false, parent: None };
        assert!(o.may_register(&limits, 1, 1000).is_ok());
        o.insert(ClientId(1), own(1000, 1));
        o.insert(ClientId(2), own(1000, 1));
        let e = o.may_register(&limits, 1, 1000).unwrap_err();
        assert!(e.contains("limit per connection"), "{e}");
        assert!(o.may_register(&limits, 2, 1000).is_ok(), "another connection of the uid");
        o.insert(ClientId(3), own(1000, 2));
        let e = o.may_register(&limits, 2, 1000).unwrap_err();
        assert!(e.contains("uid 1000 already holds 3"), "{e}");
        assert!(o.may_register(&limits, 2, 1001).is_ok(), "other uids are not affected");
        o.remove(ClientId(1));
        assert!(o.may_register(&limits, 1, 1000).is_ok());
        assert_eq!(o.get(ClientId(3)).map(|x| x.conn), Some(2));
    }

    #[test]
    fn clients_that_end_with_their_connection() {
        let mut o = Owners::default();
        o.insert(ClientId(1), Owner { uid: 0, conn: 7, exits_with_conn: true, parent: None });
        o.insert(ClientId(2), Owner { uid: 0, conn: 7, exits_with_conn: false, parent: None });
        o.insert(ClientId(3), Owner { uid: 0, conn: 8, exits_with_conn: true, parent: None });
        o.insert(ClientId(4), Owner { uid: 0, conn: 7, exits_with_conn: false, parent: Some(ClientId(1)) });
        assert_eq!(o.exiting_with(7), vec![ClientId(1)]);
        assert_eq!(o.children_of(ClientId(1)), vec![ClientId(4)]);
        assert!(o.children_of(ClientId(4)).is_empty());
    }
}
