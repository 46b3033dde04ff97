//! Where a client keeps the TLS 1.3 session tickets servers send it, so that the next connection
//! resumes (a PSK with fresh X25519MLKEM768 shares: no certificates, no signatures) instead of
//! a full handshake. rustls' own in-memory store keeps at most 8 tickets per server name; a
//! sidecar that opens more connections than that to one endpoint at once (ten opaque TCP
//! connections at a time in `bench/run-compare`) ran out and made one handshake in six a full
//! one. [`Tickets`] keeps [`PER_SERVER`] per name. Each ticket is handed out at most once, the
//! newest first; the oldest are dropped when the store is full.
//!
//! A ticket only resumes with the server process that issued it, so the sidecar keeps one store
//! per endpoint (see [`crate::TlsState::client_for`]): with one store per service, a ticket from
//! one replica would be spent on another and fail there.

use std::collections::VecDeque;
use std::sync::Mutex;

use rustls::NamedGroup;
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls_pki_types::ServerName;

/// Tickets kept per server name (a sidecar asks one name per app port of an endpoint).
pub const PER_SERVER: usize = 64;
/// Server names kept; the one seen first is forgotten when a new one comes.
const SERVERS: usize = 16;

/// A client's session tickets (see the module documentation).
#[derive(Debug, Default)]
pub struct Tickets {
    servers: Mutex<VecDeque<Server>>,
}

struct Server {
    name: ServerName<'static>,
    kx_hint: Option<NamedGroup>,
    tickets: VecDeque<Tls13ClientSessionValue>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .field("tickets", &self.tickets.len())
            .finish()
    }
}

impl Tickets {
    fn edit<T>(&self, name: &ServerName<'_>, f: impl FnOnce(&mut Server) -> T) -> T {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        let at = match servers.iter().position(|s| s.name == *name) {
            Some(at) => at,
            None => {
                if servers.len() == SERVERS {
                    servers.pop_front();
                }
                servers.push_back(Server {
                    name: name.to_owned(),
                    kx_hint: None,
                    tickets: VecDeque::new(),
                });
                servers.len() - 1
            }
        };
        f(&mut servers[at])
    }

    fn read<T>(
        &self,
        name: &ServerName<'_>,
        f: impl FnOnce(&mut Server) -> Option<T>,
    ) -> Option<T> {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        servers.iter_mut().find(|s| s.name == *name).and_then(f)
    }

    /// How many tickets are kept for `name`.
    pub fn count(&self, name: &ServerName<'_>) -> usize {
        self.read(name, |s| Some(s.tickets.len())).unwrap_or(0)
    }
}

impl ClientSessionStore for Tickets {
    fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
        self.edit(&name, |s| s.kx_hint = Some(group));
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
        self.read(name, |s| s.kx_hint)
    }

    // The mesh speaks TLS 1.3 only: there are no TLS 1.2 sessions to keep.
    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.edit(&name, |s| {
            if s.tickets.len() == PER_SERVER {
                s.tickets.pop_front();
            }
            s.tickets.push_back(value);
        });
    }

    fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.read(name, |s| s.tickets.pop_back())
    }
}
