//! The remote side of the fabric as the data path sees it: one [`PeerHealth`] per Peer (kept
//! by its heartbeat task), a [`Dialer`] for mTLS connections to peers, and per peer a
//! [`pool::Pool`] of handshaked connections.
//!
//! | module | concern |
//! |---|---|
//! | [`health`] | heartbeats (`GET /healthz`), reachability, the preferred gateway |
//! | [`pool`] | pre-handshaked idle connections per peer |
//! | [`dial`] | TCP + TLS 1.3 to a peer's gateways, in order of health |
//! | [`io`] | the buffered socket under every peer TLS connection |
//! | [`timeouts`] | TCP keepalive and user timeout on every peer socket: dead peers noticed |

pub mod dial;
pub mod health;
pub mod io;
pub mod pool;
pub mod timeouts;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

pub use dial::{DialError, Dialer};
pub use health::{PeerEvent, PeerHealth};
pub use timeouts::{Keepalive, PeerTimeouts};

/// The health of every Peer, by name; the agent adds and removes entries as Peers come and
/// go, connections read them.
#[derive(Default)]
pub struct Peers(Mutex<HashMap<String, Arc<PeerHealth>>>);

impl Peers {
    /// The heartbeat state of the peer named `name`, if it is one of our Peers.
    pub fn get(&self, name: &str) -> Option<Arc<PeerHealth>> {
        self.lock().get(name).cloned()
    }

    /// Whether heartbeats found the peer named `name` reachable.
    pub fn reachable(&self, name: &str) -> bool {
        self.get(name).is_some_and(|h| h.reachable())
    }

    pub fn insert(&self, name: &str, health: Arc<PeerHealth>) {
        self.lock().insert(name.to_owned(), health);
    }

    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PeerHealth>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
