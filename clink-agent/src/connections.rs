//! The open tunneled connections and the path each one's payload takes: what
//! `clink connections` and `clink bpf` list, and what `clink status` counts per path.
//!
//! A connection is entered when its tunnel is set up (both peers agreed) and leaves when it
//! ends; its path is known once the bytes start to move (`setup` until then). The table is
//! written twice per connection and read only by the admin API, so one lock is enough.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// The path a connection's payload takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BytePath {
    /// The tunnel is being set up; no payload has moved yet.
    Setup,
    /// tokio and rustls move every byte, over plain local sockets.
    Userspace,
    /// rustls on the tunnel; the local hop spliced by the sk_msg program.
    Sockmap,
    /// Kernel TLS on the tunnel, splice(2) between it and the local socket: the agent does
    /// not touch the payload.
    Ktls,
}

impl BytePath {
    pub const ALL: [BytePath; 4] = [
        BytePath::Setup,
        BytePath::Userspace,
        BytePath::Sockmap,
        BytePath::Ktls,
    ];

    /// Its name in logs, metrics and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            BytePath::Setup => "setup",
            BytePath::Userspace => "userspace",
            BytePath::Sockmap => "sockmap",
            BytePath::Ktls => "ktls",
        }
    }
}

impl std::fmt::Display for BytePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One open connection, as `GET /v1/connections` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    /// Unique for the agent's lifetime, in the order connections were opened.
    pub id: u64,
    /// `egress` (a local client of an Import) or `ingress` (a peer's client of an Export).
    pub direction: String,
    /// The Import or Export, as `namespace/name`.
    pub service: String,
    /// The remote peer.
    pub peer: String,
    /// The local end: the client (egress) or the export target (ingress).
    pub local: SocketAddr,
    pub path: BytePath,
    /// When the tunnel was set up, in seconds since the Unix epoch.
    pub opened_at: u64,
}

/// The open connections.
#[derive(Default)]
pub struct ConnTable {
    next: AtomicU64,
    open: Mutex<HashMap<u64, ConnectionInfo>>,
}

impl ConnTable {
    /// Enters a connection (path [`BytePath::Setup`]) and returns its id.
    pub fn insert(&self, direction: &str, service: &str, peer: &str, local: SocketAddr) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let opened_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.lock().insert(
            id,
            ConnectionInfo {
                id,
                direction: direction.to_owned(),
                service: service.to_owned(),
                peer: peer.to_owned(),
                local,
                path: BytePath::Setup,
                opened_at,
            },
        );
        id
    }

    pub fn set_path(&self, id: u64, path: BytePath) {
        if let Some(info) = self.lock().get_mut(&id) {
            info.path = path;
        }
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// The open connections, oldest first.
    pub fn list(&self) -> Vec<ConnectionInfo> {
        let mut all: Vec<ConnectionInfo> = self.lock().values().cloned().collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// Open connections per path, every path listed.
    pub fn per_path(&self) -> BTreeMap<BytePath, u64> {
        let mut counts: BTreeMap<BytePath, u64> = BytePath::ALL.iter().map(|p| (*p, 0)).collect();
        for info in self.lock().values() {
            *counts.entry(info.path).or_default() += 1;
        }
        counts
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, ConnectionInfo>> {
        // A panic while holding the lock leaves plain data behind: still usable.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_follow_their_connection() {
        let table = ConnTable::default();
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let a = table.insert("egress", "default/a", "peer-b", local);
        let b = table.insert("ingress", "default/b", "peer-c", local);
        assert!(b > a);
        table.set_path(a, BytePath::Ktls);
        let list = table.list();
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].id, list[0].path), (a, BytePath::Ktls));
        assert_eq!((list[1].id, list[1].path), (b, BytePath::Setup));
        let counts = table.per_path();
        assert_eq!(counts[&BytePath::Ktls], 1);
        assert_eq!(counts[&BytePath::Setup], 1);
        assert_eq!(counts[&BytePath::Sockmap], 0);
        table.remove(a);
        table.set_path(a, BytePath::Userspace); // gone: no effect
        assert_eq!(table.list().iter().map(|c| c.id).collect::<Vec<_>>(), [b]);
        // The JSON names are the ones clink and the tests read.
        let json = serde_json::to_value(&table.list()[0]).unwrap();
        assert_eq!(json["path"], "setup");
        assert!(json["openedAt"].as_u64().unwrap() > 0);
    }
}
