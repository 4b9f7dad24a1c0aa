//! The open tunneled connections: the path each one's payload takes (what `clink connections`
//! and `clink bpf` list, and what `clink status` counts per path), and what may end one from
//! the agent's side (ARCHITECTURE.md, "Dead peers, idle connections and revoked access").
//!
//! A connection is entered when its tunnel is set up (both peers agreed) and leaves when it
//! ends; its path is known once the bytes start to move (`setup` until then). Each entry keeps
//! what the connection was admitted with ([`Admission`]) and its [`Lifetime`], so that
//!
//! * after a change of the objects, [`ConnTable::recheck`] decides every open connection again
//!   against the new snapshot and ends those it no longer allows (unless `--keep-established`);
//! * every quarter of `--idle-timeout`, [`ConnTable::sweep_idle`] ends those whose byte count
//!   four sweeps in a row found unchanged.
//!
//! The table is written twice per connection and read by the admin API, a change and the idle
//! sweep, so one lock is enough; policy decisions are made outside it.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::{
    api::{ImportSource, ObjectKey},
    lifetime::{Ending, Lifetime},
    policy::{self, Attributes, Own},
    state::Snapshot,
};

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

/// Sweeps per idle timeout (see [`ConnTable::sweep_idle`]).
pub const IDLE_SWEEPS: u32 = 4;

/// When the agent ends open connections itself (`--idle-timeout`, `--keep-established`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Closing {
    /// End a connection that moved no byte either way for this long; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Keep connections a change no longer allows open (only new ones are refused).
    pub keep_established: bool,
}

/// What one connection was admitted with: enough to decide it again after a change. Only
/// what the objects cannot give again is kept (an idle connection's memory is mostly what it
/// holds, ARCHITECTURE.md "Buffers"): the objects it stands on, and the client's own
/// attributes as they were when it connected. Peer, Export and agent attributes are taken
/// as they are at each decision, so a label change decides open connections again too.
#[derive(Clone, Debug)]
pub struct Admission {
    pub side: Admitted,
    /// The client's attributes: from its pod or address range (egress), or as its peer sent
    /// them (ingress).
    pub client: Attributes,
}

/// The objects a connection stands on.
#[derive(Clone, Debug)]
pub enum Admitted {
    /// A local client of Import `import`, carried by its source `source`.
    Egress {
        import: ObjectKey,
        source: ImportSource,
    },
    /// A client of Peer `peer` for Export `name` in `namespace`.
    Ingress {
        namespace: String,
        name: String,
        peer: String,
    },
}

impl Admission {
    /// Decides the connection again against `snapshot`, as agent `own`: `Err` says why it is
    /// no longer allowed.
    pub fn recheck(&self, snapshot: &Snapshot, own: Own<'_>) -> Result<(), Ending> {
        let (namespace, (src, dst), direction) = match &self.side {
            Admitted::Egress { import, source } => {
                let Some(object) = snapshot.imports.get(import) else {
                    return Err(Ending::Removed(format!("{import} was deleted")));
                };
                if !object.spec.sources.contains(source) {
                    return Err(Ending::Removed(format!(
                        "{import} no longer has the source {}/{}@{}",
                        source.export_namespace, source.export_name, source.peer
                    )));
                }
                let Some(peer) = snapshot.peers.get(&source.peer) else {
                    return Err(Ending::Removed(format!("Peer {} was deleted", source.peer)));
                };
                let attributes =
                    policy::egress_attributes(own, &self.client, source, &peer.status.labels);
                (import.namespace.as_str(), attributes, "egress")
            }
            Admitted::Ingress {
                namespace,
                name,
                peer,
            } => {
                let Some(peer_object) = snapshot.peers.get(peer) else {
                    return Err(Ending::Removed(format!("Peer {peer} was deleted")));
                };
                let Some(export) = snapshot.exports.get(&(namespace.clone(), name.clone())) else {
                    return Err(Ending::Removed(format!(
                        "Export {namespace}/{name} was deleted"
                    )));
                };
                let remote = policy::Remote {
                    peer,
                    peer_labels: &peer_object.status.labels,
                    client: &self.client,
                };
                let attributes = policy::ingress_attributes(
                    own,
                    remote,
                    (namespace, name),
                    &export.metadata.labels,
                );
                (namespace.as_str(), attributes, "ingress")
            }
        };
        let decision = snapshot.policies.decide(namespace, &src, &dst);
        if decision.is_allowed() {
            Ok(())
        } else {
            Err(Ending::Denied(format!("{direction} {decision}")))
        }
    }
}

/// One open connection as its task holds it: how the agent ends it, and what it was admitted
/// with.
pub struct Conn {
    pub id: u64,
    pub lifetime: Lifetime,
    admission: Admission,
}

struct Entry {
    info: ConnectionInfo,
    conn: Arc<Conn>,
    /// The idle sweep's last look: the byte count then, and how many sweeps in a row found
    /// it unchanged.
    seen: u64,
    quiet_sweeps: u32,
}

/// What a recheck after a change came to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recheck {
    /// Connections still allowed.
    pub allowed: usize,
    /// Connections no longer allowed and ended.
    pub ended: usize,
    /// Connections no longer allowed and kept (`--keep-established`).
    pub kept: usize,
}

/// The open connections.
#[derive(Default)]
pub struct ConnTable {
    next: AtomicU64,
    /// Boxed: the map's buckets then take 16 bytes each, not an entry's size, and a map
    /// has up to twice as many buckets as entries.
    open: Mutex<HashMap<u64, Box<Entry>>>,
    closing: Closing,
}

impl ConnTable {
    pub fn new(closing: Closing) -> ConnTable {
        ConnTable {
            closing,
            ..ConnTable::default()
        }
    }

    pub fn closing(&self) -> Closing {
        self.closing
    }

    /// Enters a connection (path [`BytePath::Setup`]) admitted with `admission`.
    pub fn insert(
        &self,
        direction: &str,
        service: &str,
        peer: &str,
        local: SocketAddr,
        admission: Admission,
    ) -> Arc<Conn> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let opened_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let conn = Arc::new(Conn {
            id,
            lifetime: Lifetime::default(),
            admission,
        });
        self.lock().insert(
            id,
            Box::new(Entry {
                info: ConnectionInfo {
                    id,
                    direction: direction.to_owned(),
                    service: service.to_owned(),
                    peer: peer.to_owned(),
                    local,
                    path: BytePath::Setup,
                    opened_at,
                },
                conn: conn.clone(),
                seen: 0,
                quiet_sweeps: 0,
            }),
        );
        conn
    }

    /// Decides a connection just entered again against `current` when it was admitted by an
    /// older snapshot: a connection set up during a change is then not missed by the change's
    /// [`ConnTable::recheck`], which walks the table after the new snapshot is published.
    pub fn admitted(
        &self,
        conn: &Conn,
        decided_with: &Arc<Snapshot>,
        current: &Arc<Snapshot>,
        own: Own<'_>,
    ) {
        if Arc::ptr_eq(decided_with, current) {
            return;
        }
        let info = self.lock().get(&conn.id).map(|e| e.info.clone());
        if let Some(info) = info {
            self.decide_again(conn, &info, current, own, &mut Recheck::default());
        }
    }

    pub fn set_path(&self, id: u64, path: BytePath) {
        if let Some(entry) = self.lock().get_mut(&id) {
            entry.info.path = path;
        }
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The open connections, oldest first.
    pub fn list(&self) -> Vec<ConnectionInfo> {
        let mut all: Vec<ConnectionInfo> = self.lock().values().map(|e| e.info.clone()).collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// Open connections per path, every path listed.
    pub fn per_path(&self) -> BTreeMap<BytePath, u64> {
        let mut counts: BTreeMap<BytePath, u64> = BytePath::ALL.iter().map(|p| (*p, 0)).collect();
        for entry in self.lock().values() {
            *counts.entry(entry.info.path).or_default() += 1;
        }
        counts
    }

    /// Decides every open connection again against `snapshot` (after a change) and ends
    /// those it no longer allows, or only logs them with `--keep-established`. Each is
    /// logged with the reason.
    pub fn recheck(&self, snapshot: &Snapshot, own: Own<'_>) -> Recheck {
        // Decided outside the lock: connections open and close meanwhile.
        let open: Vec<(Arc<Conn>, ConnectionInfo)> = self
            .lock()
            .values()
            .map(|e| (e.conn.clone(), e.info.clone()))
            .collect();
        let mut outcome = Recheck::default();
        for (conn, info) in &open {
            self.decide_again(conn, info, snapshot, own, &mut outcome);
        }
        outcome
    }

    fn decide_again(
        &self,
        conn: &Conn,
        info: &ConnectionInfo,
        snapshot: &Snapshot,
        own: Own<'_>,
        outcome: &mut Recheck,
    ) {
        let Err(why) = conn.admission.recheck(snapshot, own) else {
            outcome.allowed += 1;
            return;
        };
        let what = if self.closing.keep_established {
            outcome.kept += 1;
            "open connection no longer allowed; kept (--keep-established)"
        } else if conn.lifetime.end(why.clone()) {
            outcome.ended += 1;
            "open connection no longer allowed; resetting it"
        } else {
            return;
        };
        info!(
            id = conn.id,
            direction = info.direction,
            service = info.service,
            peer = info.peer,
            reason = %why,
            "{what}"
        );
    }

    /// Ends every open connection (both sockets are reset); how many.
    pub fn end_all(&self, why: &Ending) -> usize {
        self.lock()
            .values()
            .filter(|entry| entry.conn.lifetime.end(why.clone()))
            .count()
    }

    /// One look of the idle sweep, which runs every [`IDLE_SWEEPS`]th of `limit`: ends every
    /// connection whose byte count the last [`IDLE_SWEEPS`] sweeps found unchanged, so one
    /// is ended after between 1 and 1.25 times `limit` without a byte (counting sweeps, not
    /// comparing clocks, keeps a late sweep from adding another period). Returns how many it
    /// ended.
    pub fn sweep_idle(&self, limit: Duration) -> usize {
        let mut ended = 0;
        for entry in self.lock().values_mut() {
            let moved = entry.conn.lifetime.moved();
            if moved != entry.seen {
                entry.seen = moved;
                entry.quiet_sweeps = 0;
                continue;
            }
            entry.quiet_sweeps += 1;
            if entry.quiet_sweeps >= IDLE_SWEEPS && entry.conn.lifetime.end(Ending::Idle(limit)) {
                ended += 1;
                let info = &entry.info;
                info!(
                    id = info.id,
                    direction = info.direction,
                    service = info.service,
                    peer = info.peer,
                    moved,
                    idle_s = limit.as_secs_f64(),
                    "idle connection; resetting it"
                );
            }
        }
        ended
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Box<Entry>>> {
        // A panic while holding the lock leaves plain data behind: still usable.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{api::parse_yaml, policy::attr};

    const PEER_AND_IMPORT: &str = "\
apiVersion: clusterlink.net/v1alpha1
kind: Peer
metadata: {name: peer-b, namespace: default}
spec:
  gateways: [{host: 10.0.0.2, port: 443}]
---
apiVersion: clusterlink.net/v1alpha1
kind: Import
metadata: {name: db, namespace: shop}
spec:
  port: 5432
  sources: [{peer: peer-b, exportName: db, exportNamespace: shop}]
---
apiVersion: clusterlink.net/v1alpha1
kind: Export
metadata: {name: db, namespace: shop}
spec: {host: 127.0.0.1, port: 5432}
";

    const ALLOW_SHOP: &str = "\
---
apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata: {name: allow-db, namespace: shop}
spec:
  action: allow
  from: [{workloadSelector: {}}]
  to: [{workloadSelector: {matchLabels: {export.clusterlink.net/name: db}}}]
";

    fn snapshot(yaml: &str) -> Arc<Snapshot> {
        let objects = parse_yaml("test", yaml)
            .unwrap()
            .into_iter()
            .map(|o| (o.key(), o))
            .collect();
        Arc::new(Snapshot::build(objects))
    }

    fn egress() -> Admission {
        Admission {
            side: Admitted::Egress {
                import: ObjectKey {
                    kind: crate::api::Kind::Import,
                    namespace: "shop".into(),
                    name: "db".into(),
                },
                source: ImportSource {
                    peer: "peer-b".into(),
                    export_name: "db".into(),
                    export_namespace: "shop".into(),
                },
            },
            client: Attributes::new(),
        }
    }

    fn own() -> Own<'static> {
        static LABELS: BTreeMap<String, String> = BTreeMap::new();
        Own {
            name: "peer-a",
            labels: &LABELS,
        }
    }

    fn ingress() -> Admission {
        Admission {
            side: Admitted::Ingress {
                namespace: "shop".into(),
                name: "db".into(),
                peer: "peer-b".into(),
            },
            ..egress()
        }
    }

    fn local() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    #[test]
    fn entries_follow_their_connection() {
        let table = ConnTable::default();
        let a = table
            .insert("egress", "default/a", "peer-b", local(), egress())
            .id;
        let b = table
            .insert("ingress", "default/b", "peer-c", local(), ingress())
            .id;
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

    #[test]
    fn a_change_ends_what_it_no_longer_allows_and_says_why() {
        let allowed = snapshot(&format!("{PEER_AND_IMPORT}{ALLOW_SHOP}"));
        assert_eq!(egress().recheck(&allowed, own()), Ok(()));
        assert_eq!(ingress().recheck(&allowed, own()), Ok(()));
        let denied = snapshot(PEER_AND_IMPORT);
        assert_eq!(
            egress().recheck(&denied, own()),
            Err(Ending::Denied(
                "egress deny by default (no policy matched)".into()
            ))
        );
        let without_peer = snapshot(&PEER_AND_IMPORT.replace("peer-b", "peer-c"));
        assert_eq!(
            ingress().recheck(&without_peer, own()),
            Err(Ending::Removed("Peer peer-b was deleted".into()))
        );
        assert_eq!(
            egress().recheck(&without_peer, own()),
            Err(Ending::Removed(
                "Import shop/db no longer has the source shop/db@peer-b".into()
            ))
        );
        let nothing = snapshot("");
        assert_eq!(
            egress().recheck(&nothing, own()),
            Err(Ending::Removed("Import shop/db was deleted".into()))
        );

        let table = ConnTable::default();
        let first = table.insert("egress", "shop/db", "peer-b", local(), egress());
        let second = table.insert("ingress", "shop/db", "peer-b", local(), ingress());
        assert_eq!(
            table.recheck(&allowed, own()),
            Recheck {
                allowed: 2,
                ..Recheck::default()
            }
        );
        assert_eq!(
            table.recheck(&denied, own()),
            Recheck {
                ended: 2,
                ..Recheck::default()
            }
        );
        assert_eq!(first.lifetime.ending().map(Ending::label), Some("denied"));
        assert_eq!(second.lifetime.ending().map(Ending::label), Some("denied"));
        // Ended once: a later change does not count them again.
        assert_eq!(table.recheck(&nothing, own()).ended, 0);

        // One set up while a change was published is decided against the new snapshot.
        let late = table.insert("egress", "shop/db", "peer-b", local(), egress());
        table.admitted(&late, &allowed, &allowed, own());
        assert_eq!(late.lifetime.ending(), None);
        table.admitted(&late, &allowed, &denied, own());
        assert_eq!(late.lifetime.ending().map(Ending::label), Some("denied"));
    }

    #[test]
    fn a_decision_again_takes_the_objects_as_they_are_and_the_client_as_it_was() {
        const EXPORT_TIER_DB: &str = "\
---
apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata: {name: tier-db, namespace: shop}
spec:
  action: allow
  from: [{workloadSelector: {matchLabels: {client.clusterlink.net/namespace: web}}}]
  to: [{workloadSelector: {matchLabels: {export.clusterlink.net/labels.tier: db}}}]
";
        let objects = format!("{PEER_AND_IMPORT}{EXPORT_TIER_DB}");
        let labelled = snapshot(&objects.replace(
            "metadata: {name: db, namespace: shop}\nspec: {host",
            "metadata: {name: db, namespace: shop, labels: {tier: db}}\nspec: {host",
        ));
        let unlabelled = snapshot(&objects);
        let from_web = Admission {
            client: [(attr::CLIENT_NAMESPACE.to_owned(), "web".to_owned())].into(),
            ..ingress()
        };
        assert_eq!(from_web.recheck(&labelled, own()), Ok(()));
        // The Export lost the label the policy selects on: denied now.
        assert!(matches!(
            from_web.recheck(&unlabelled, own()),
            Err(Ending::Denied(_))
        ));
        // The client's attributes are the ones it was admitted with.
        assert!(matches!(
            ingress().recheck(&labelled, own()),
            Err(Ending::Denied(_))
        ));
    }

    #[test]
    fn keep_established_keeps_them() {
        let table = ConnTable::new(Closing {
            idle_timeout: None,
            keep_established: true,
        });
        let conn = table.insert("egress", "shop/db", "peer-b", local(), egress());
        assert_eq!(
            table.recheck(&snapshot(PEER_AND_IMPORT), own()),
            Recheck {
                kept: 1,
                ..Recheck::default()
            }
        );
        assert_eq!(conn.lifetime.ending(), None);
    }

    #[test]
    fn the_idle_sweep_ends_only_connections_whose_count_stood_still() {
        let table = ConnTable::default();
        let limit = Duration::from_secs(2);
        let quiet = table.insert("egress", "shop/db", "peer-b", local(), egress());
        let busy = table.insert("egress", "shop/db", "peer-b", local(), egress());
        let late = table.insert("egress", "shop/db", "peer-b", local(), egress());
        for sweep in 1..=IDLE_SWEEPS + 2 {
            busy.lifetime.add_moved(1);
            if sweep == 2 {
                late.lifetime.add_moved(10);
            }
            let ended = table.sweep_idle(limit);
            // The quiet one at the fourth sweep; the late one four sweeps after its bytes.
            let expected = usize::from(sweep == IDLE_SWEEPS || sweep == IDLE_SWEEPS + 2);
            assert_eq!(ended, expected, "sweep {sweep}");
        }
        assert_eq!(quiet.lifetime.ending(), Some(&Ending::Idle(limit)));
        assert_eq!(late.lifetime.ending(), Some(&Ending::Idle(limit)));
        assert_eq!(busy.lifetime.ending(), None);
        assert_eq!(
            table.sweep_idle(limit),
            0,
            "an ended one is not ended again"
        );
    }
}
