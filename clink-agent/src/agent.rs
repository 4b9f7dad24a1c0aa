//! The agent's object set and what it derives from it: lookup tables for the data path, the
//! policy set, and one listener per Import. Changes go through [`Agent::apply`] and
//! [`Agent::delete`], which check everything (including that a new Import's port can be bound)
//! before writing the store, so a rejected change leaves both the store and the running agent
//! as they were. Connections read an immutable [`Snapshot`]; a change swaps it, and the next
//! connection sees the new one.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
};

use serde::Serialize;
use tokio::{net::TcpListener, sync::Mutex, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    api::{ApiError, Export, Import, Object, ObjectKey, Peer},
    policy::PolicySet,
    store::Store,
    tls::Identity,
};

/// Everything a connection needs to know, immutable once built.
#[derive(Default)]
pub struct Snapshot {
    pub objects: BTreeMap<ObjectKey, Object>,
    /// Peers by name (the name is the remote certificate's DNS name).
    pub peers: HashMap<String, Peer>,
    /// Exports by (namespace, name).
    pub exports: HashMap<(String, String), Export>,
    pub imports: HashMap<ObjectKey, Import>,
    pub policies: PolicySet,
}

impl Snapshot {
    fn build(objects: BTreeMap<ObjectKey, Object>) -> Snapshot {
        let mut peers = HashMap::new();
        let mut exports = HashMap::new();
        let mut imports = HashMap::new();
        let mut privileged = Vec::new();
        let mut namespaced = Vec::new();
        for (key, object) in &objects {
            match object {
                Object::Peer(p) => {
                    peers.entry(key.name.clone()).or_insert_with(|| p.clone());
                }
                Object::Export(e) => {
                    exports.insert((key.namespace.clone(), key.name.clone()), e.clone());
                }
                Object::Import(i) => {
                    imports.insert(key.clone(), i.clone());
                }
                Object::AccessPolicy(p) => namespaced.push(p.clone()),
                Object::PrivilegedAccessPolicy(p) => privileged.push(p.clone()),
            }
        }
        Snapshot {
            policies: PolicySet::new(privileged, namespaced),
            objects,
            peers,
            exports,
            imports,
        }
    }
}

/// Connection counters for `clink status` (Prometheus metrics are a later addition).
#[derive(Default)]
pub struct Stats {
    pub active: AtomicU64,
    pub opened: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
}

#[derive(Debug, Serialize)]
pub struct StatsView {
    pub active: u64,
    pub opened: u64,
    pub failed: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
}

impl Stats {
    pub fn view(&self) -> StatsView {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsView {
            active: get(&self.active),
            opened: get(&self.opened),
            failed: get(&self.failed),
            bytes_out: get(&self.bytes_out),
            bytes_in: get(&self.bytes_in),
        }
    }
}

/// Counts a connection as active for as long as it lives.
pub struct ActiveGuard<'a>(&'a Stats);

impl<'a> ActiveGuard<'a> {
    pub fn new(stats: &'a Stats) -> Self {
        stats.opened.fetch_add(1, Ordering::Relaxed);
        stats.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(stats)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Invalid(#[from] ApiError),
    #[error("{0} not found")]
    NotFound(ObjectKey),
    #[error("state directory: {0}")]
    Store(#[from] std::io::Error),
}

/// What happened to one applied object, as kubectl reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Created,
    Configured,
    Unchanged,
}

struct ImportListener {
    port: u16,
    task: JoinHandle<()>,
}

impl Drop for ImportListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections for one Import; the agent decides what each one is for.
pub type AcceptFn = Arc<dyn Fn(ObjectKey, TcpListener) -> JoinHandle<()> + Send + Sync>;

pub struct Agent {
    pub identity: Identity,
    pub labels: BTreeMap<String, String>,
    pub gateway: SocketAddr,
    pub stats: Stats,
    store: Box<dyn Store>,
    snapshot: RwLock<Arc<Snapshot>>,
    listeners: Mutex<HashMap<ObjectKey, ImportListener>>,
}

impl Agent {
    pub fn new(
        identity: Identity,
        labels: BTreeMap<String, String>,
        gateway: SocketAddr,
        store: Box<dyn Store>,
    ) -> Agent {
        Agent {
            identity,
            labels,
            gateway,
            stats: Stats::default(),
            store,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            listeners: Mutex::new(HashMap::new()),
        }
    }

    pub fn name(&self) -> &str {
        &self.identity.name
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn publish(&self, objects: BTreeMap<ObjectKey, Object>) {
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Snapshot::build(objects));
    }

    /// Loads the store at start-up. Objects that cannot run (an Import whose port is taken)
    /// are reported and left out; the others serve.
    pub async fn start(&self, accept: &AcceptFn) -> std::io::Result<Vec<String>> {
        let (objects, mut problems) = self.store.load_all()?;
        let mut listeners = self.listeners.lock().await;
        let mut set = BTreeMap::new();
        for object in objects {
            let key = object.key();
            if let Object::Import(import) = &object {
                match bind_import(&key, import) {
                    Ok(l) => {
                        let port = import.spec.listen_port();
                        listeners.insert(
                            key.clone(),
                            ImportListener {
                                port,
                                task: accept(key.clone(), l),
                            },
                        );
                    }
                    Err(e) => {
                        problems.push(format!("{e} (import not served until re-applied)"));
                        continue;
                    }
                }
            }
            set.insert(key, object);
        }
        info!(objects = set.len(), "loaded state");
        self.publish(set);
        Ok(problems)
    }

    /// Applies objects all or nothing.
    pub async fn apply(
        &self,
        objects: Vec<Object>,
        accept: &AcceptFn,
    ) -> Result<Vec<(ObjectKey, Change)>, ChangeError> {
        let mut listeners = self.listeners.lock().await;
        let mut next = self.snapshot().objects.clone();
        let mut changes = Vec::new();
        let mut changed = Vec::new();
        for mut object in objects {
            let key = object.key();
            let change = match next.get(&key) {
                None => Change::Created,
                Some(old) => {
                    // Status belongs to the agent, not to whoever applies the object.
                    *object.status_mut() = old.clone().status_mut().clone();
                    if *old == object {
                        Change::Unchanged
                    } else {
                        Change::Configured
                    }
                }
            };
            if change != Change::Unchanged {
                changed.push(object.clone());
            }
            changes.push((key.clone(), change));
            next.insert(key, object);
        }
        check_ports(&next, &changes)?;

        let mut bound = Vec::new();
        for (key, object) in &next {
            if let Object::Import(import) = object {
                let port = import.spec.listen_port();
                if listeners.get(key).map(|l| l.port) != Some(port) {
                    bound.push((key.clone(), port, bind_import(key, import)?));
                }
            }
        }
        for object in &changed {
            self.store.put(object)?;
        }
        self.publish(next);
        for (key, port, listener) in bound {
            info!(import = %key, port, "listening for import");
            let task = accept(key.clone(), listener);
            listeners.insert(key, ImportListener { port, task });
        }
        for (key, change) in &changes {
            if *change != Change::Unchanged {
                info!(object = %key, ?change, "applied");
            }
        }
        Ok(changes)
    }

    pub async fn delete(&self, key: &ObjectKey) -> Result<(), ChangeError> {
        let mut listeners = self.listeners.lock().await;
        let mut next = self.snapshot().objects.clone();
        if next.remove(key).is_none() {
            return Err(ChangeError::NotFound(key.clone()));
        }
        self.store.delete(key)?;
        self.publish(next);
        if listeners.remove(key).is_some() {
            info!(import = %key, "stopped listening for import");
        }
        info!(object = %key, "deleted");
        Ok(())
    }

    /// The port each Import is being served on.
    pub async fn import_ports(&self) -> BTreeMap<ObjectKey, u16> {
        self.listeners
            .lock()
            .await
            .iter()
            .map(|(k, l)| (k.clone(), l.port))
            .collect()
    }
}

/// Two Imports cannot listen on one port; the error names the one being applied.
fn check_ports(
    objects: &BTreeMap<ObjectKey, Object>,
    applied: &[(ObjectKey, Change)],
) -> Result<(), ApiError> {
    let mut seen: HashMap<u16, &ObjectKey> = HashMap::new();
    for (key, object) in objects {
        if let Object::Import(import) = object {
            let port = import.spec.listen_port();
            if let Some(other) = seen.insert(port, key) {
                let (culprit, holder) = if applied.iter().any(|(k, _)| k == other) {
                    (other, key)
                } else {
                    (key, other)
                };
                let Some(Object::Import(culprit_import)) = objects.get(culprit) else {
                    unreachable!("both keys are Imports of this map");
                };
                return Err(ApiError::new(
                    &culprit.to_string(),
                    culprit_import.spec.listen_field(),
                    &format!("port {port} is already used by {holder}"),
                ));
            }
        }
    }
    Ok(())
}

/// Binds an Import's listener on every address of the node: dual-stack where IPv6 exists.
fn bind_import(key: &ObjectKey, import: &Import) -> Result<TcpListener, ApiError> {
    let port = import.spec.listen_port();
    bind_any(port).map_err(|e| {
        ApiError::new(
            &key.to_string(),
            import.spec.listen_field(),
            &format!("cannot listen on port {port}: {e}"),
        )
    })
}

pub fn bind_any(port: u16) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let v6 = Socket::new(Domain::IPV6, Type::STREAM, None).and_then(|s| {
        s.set_only_v6(false)?;
        Ok(s)
    });
    let (socket, addr) = match v6 {
        Ok(s) => (s, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))),
        Err(e) => {
            warn!("no IPv6 ({e}); import listeners are IPv4 only");
            (
                Socket::new(Domain::IPV4, Type::STREAM, None)?,
                SocketAddr::from(([0, 0, 0, 0], port)),
            )
        }
    };
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
