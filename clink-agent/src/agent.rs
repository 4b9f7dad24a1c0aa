//! The agent's object set and what it derives from it: lookup tables for the data path, the
//! policy set, one listener per Import, one heartbeat task per Peer, and object status.
//! Changes go through [`Agent::apply`] and [`Agent::delete`], which check everything
//! (including that a new Import's port can be bound) before writing the store, so a rejected
//! change leaves both the store and the running agent as they were. Connections read an
//! immutable [`Snapshot`]; a change swaps it, and the next connection sees the new one.

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
    api::{
        self, ApiError, Export, Import, ImportSource, LbScheme, Object, ObjectKey, Peer, PeerSpec,
    },
    clients::ClientMap,
    dataplane,
    metrics::{Metrics, PeerLabels},
    peer::{self, PeerHealth},
    policy::PolicySet,
    store::Store,
    tls::Identity,
};

/// Keeps a kernel data path in step with the objects: told about every new [`Snapshot`] and
/// the port each Import listens on, under the change lock, before connections see it.
pub trait DatapathHook: Send + Sync {
    fn objects_changed(&self, snapshot: &Snapshot, import_ports: &BTreeMap<ObjectKey, u16>);
}

/// The data path in use: its name (`userspace`, `sockmap`, ...) for logs, metrics and
/// `clink status`, and the hook of a kernel path.
#[derive(Clone)]
pub struct Datapath {
    pub name: &'static str,
    pub hook: Option<Arc<dyn DatapathHook>>,
    /// Set on the sockmap path: the agent's half of the flow control of spliced sockets.
    pub flow: Option<Arc<crate::flow::FlowControl>>,
}

impl Datapath {
    pub fn userspace() -> Datapath {
        Datapath {
            name: dataplane::USERSPACE,
            hook: None,
            flow: None,
        }
    }
}

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

/// Connection counters for `clink status`; the Prometheus metrics carry the details.
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

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
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

/// A task that ends when its owner drops it.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct ImportListener {
    port: u16,
    _task: Task,
}

struct Heartbeat {
    spec: PeerSpec,
    _task: Task,
}

/// What exists besides the objects; changed only under the change lock.
#[derive(Default)]
struct Runtime {
    listeners: HashMap<ObjectKey, ImportListener>,
    heartbeats: HashMap<ObjectKey, Heartbeat>,
    /// Imports whose stored port could not be bound at start-up.
    failed_imports: HashMap<ObjectKey, String>,
}

pub struct Agent {
    pub identity: Identity,
    pub labels: BTreeMap<String, String>,
    pub gateway: SocketAddr,
    /// The data path connections use (see `dataplane`).
    pub datapath: Datapath,
    pub stats: Stats,
    pub metrics: Arc<Metrics>,
    pub clients: ClientMap,
    store: Box<dyn Store>,
    snapshot: RwLock<Arc<Snapshot>>,
    /// The change lock: apply, delete and status updates take it in turn.
    runtime: Mutex<Runtime>,
    health: std::sync::Mutex<HashMap<String, Arc<PeerHealth>>>,
    round_robin: std::sync::Mutex<HashMap<ObjectKey, usize>>,
}

impl Agent {
    pub fn new(
        identity: Identity,
        labels: BTreeMap<String, String>,
        gateway: SocketAddr,
        store: Box<dyn Store>,
        clients: ClientMap,
        metrics: Arc<Metrics>,
        datapath: Datapath,
    ) -> Agent {
        Agent {
            identity,
            labels,
            gateway,
            datapath,
            stats: Stats::default(),
            metrics,
            clients,
            store,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            runtime: Mutex::new(Runtime::default()),
            health: std::sync::Mutex::new(HashMap::new()),
            round_robin: std::sync::Mutex::new(HashMap::new()),
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

    /// The heartbeat state of the peer named `name`, if it is one of our Peers.
    pub fn peer_health(&self, name: &str) -> Option<Arc<PeerHealth>> {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The Import's sources in the order to try them: by `lbScheme`, then every reachable
    /// peer before any unreachable one.
    pub fn source_order<'a>(&self, key: &ObjectKey, import: &'a Import) -> Vec<&'a ImportSource> {
        let mut sources: Vec<&ImportSource> = import.spec.sources.iter().collect();
        match import.spec.lb_scheme {
            LbScheme::Static => {}
            LbScheme::RoundRobin => {
                let mut rr = self.round_robin.lock().unwrap_or_else(|e| e.into_inner());
                // Look up before inserting: the key is cloned once per Import, not per
                // connection.
                let turn = match rr.get_mut(key) {
                    Some(next) => {
                        *next = next.wrapping_add(1);
                        *next - 1
                    }
                    None => {
                        rr.insert(key.clone(), 1);
                        0
                    }
                };
                let start = turn % sources.len().max(1);
                sources.rotate_left(start);
            }
            LbScheme::Random => fastrand::shuffle(&mut sources),
        }
        let reachable =
            |s: &&ImportSource| self.peer_health(&s.peer).is_some_and(|h| h.reachable());
        let (mut first, rest): (Vec<_>, Vec<_>) = sources.into_iter().partition(reachable);
        first.extend(rest);
        first
    }

    /// Makes `objects` the state the next connection sees, and tells the kernel data path.
    fn publish(&self, objects: BTreeMap<ObjectKey, Object>, runtime: &Runtime) {
        let snapshot = Arc::new(Snapshot::build(objects));
        if let Some(hook) = &self.datapath.hook {
            let ports = runtime
                .listeners
                .iter()
                .map(|(k, l)| (k.clone(), l.port))
                .collect();
            hook.objects_changed(&snapshot, &ports);
        }
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = snapshot;
    }

    /// Loads the store at start-up. Objects that cannot run (an Import whose port is taken)
    /// are reported, in the log and in their status, and the others serve.
    pub async fn start(self: &Arc<Self>) -> std::io::Result<Vec<String>> {
        let (objects, mut problems) = self.store.load_all()?;
        let mut runtime = self.runtime.lock().await;
        let mut set: BTreeMap<ObjectKey, Object> =
            objects.into_iter().map(|o| (o.key(), o)).collect();
        for (key, object) in &set {
            if let Object::Import(import) = object {
                match bind_import(key, import) {
                    Ok(l) => {
                        let port = import.spec.listen_port();
                        self.serve_import(&mut runtime, key, port, l);
                    }
                    Err(e) => {
                        problems.push(format!("{e} (not served until re-applied)"));
                        runtime.failed_imports.insert(key.clone(), e.message);
                    }
                }
            }
        }
        self.sync_heartbeats(&mut runtime, &set);
        refresh_status(&mut set, &runtime);
        info!(objects = set.len(), "loaded state");
        self.publish(set, &runtime);
        Ok(problems)
    }

    fn serve_import(
        self: &Arc<Self>,
        runtime: &mut Runtime,
        key: &ObjectKey,
        port: u16,
        listener: TcpListener,
    ) {
        info!(import = %key, port, "listening for import");
        let task = dataplane::serve_import(Arc::downgrade(self), key.clone(), listener);
        runtime.failed_imports.remove(key);
        runtime.listeners.insert(
            key.clone(),
            ImportListener {
                port,
                _task: Task(task),
            },
        );
    }

    /// Starts, restarts or stops heartbeat tasks so there is one per Peer with its spec.
    fn sync_heartbeats(
        self: &Arc<Self>,
        runtime: &mut Runtime,
        objects: &BTreeMap<ObjectKey, Object>,
    ) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        runtime.heartbeats.retain(|key, hb| {
            let keep = matches!(objects.get(key), Some(Object::Peer(p)) if p.spec == hb.spec);
            if !keep {
                health.remove(&key.name);
                self.metrics.peer_reachable.remove(&PeerLabels {
                    peer: key.name.clone(),
                });
            }
            keep
        });
        for (key, object) in objects {
            let Object::Peer(peer) = object else { continue };
            if runtime.heartbeats.contains_key(key) {
                continue;
            }
            let h = Arc::new(PeerHealth::default());
            health.insert(key.name.clone(), h.clone());
            let task =
                peer::spawn_heartbeat(Arc::downgrade(self), key.clone(), peer.spec.clone(), h);
            runtime.heartbeats.insert(
                key.clone(),
                Heartbeat {
                    spec: peer.spec.clone(),
                    _task: Task(task),
                },
            );
        }
    }

    /// Applies objects all or nothing.
    pub async fn apply(
        self: &Arc<Self>,
        objects: Vec<Object>,
    ) -> Result<Vec<(ObjectKey, Change)>, ChangeError> {
        let mut runtime = self.runtime.lock().await;
        let mut next = self.snapshot().objects.clone();
        let mut changes = Vec::new();
        for mut object in objects {
            let key = object.key();
            let change = match next.get(&key) {
                None => Change::Created,
                Some(old) => {
                    // Status belongs to the agent, not to whoever applies the object.
                    *object.status_mut() = old.status().clone();
                    keep_leased_port(&mut object, old);
                    if *old == object {
                        Change::Unchanged
                    } else {
                        Change::Configured
                    }
                }
            };
            changes.push((key.clone(), change));
            next.insert(key, object);
        }
        check_ports(&next, &changes)?;

        // Bind what is new before anything is written; leases are decided here.
        let mut bound = Vec::new();
        let mut taken: Vec<u16> = next
            .values()
            .filter_map(|o| match o {
                Object::Import(i) if i.spec.target_port != 0 => Some(i.spec.target_port),
                _ => None,
            })
            .collect();
        for (key, object) in next.iter_mut() {
            let Object::Import(import) = object else {
                continue;
            };
            let current = runtime.listeners.get(key).map(|l| l.port);
            if import.spec.target_port != 0 && current == Some(import.spec.target_port) {
                continue;
            }
            let listener = if import.spec.target_port != 0 {
                bind_import(key, import)?
            } else {
                let (port, listener) = lease(key, import, &taken)?;
                import.spec.target_port = port;
                taken.push(port);
                listener
            };
            bound.push((key.clone(), import.spec.target_port, listener));
        }

        for (key, change) in &changes {
            if *change != Change::Unchanged || bound.iter().any(|(k, _, _)| k == key) {
                self.store.put(&next[key])?;
            }
        }
        for (key, port, listener) in bound {
            self.serve_import(&mut runtime, &key, port, listener);
        }
        self.sync_heartbeats(&mut runtime, &next);
        refresh_status(&mut next, &runtime);
        self.publish(next, &runtime);
        for (key, change) in &changes {
            if *change != Change::Unchanged {
                info!(object = %key, ?change, "applied");
            }
        }
        Ok(changes)
    }

    pub async fn delete(self: &Arc<Self>, key: &ObjectKey) -> Result<(), ChangeError> {
        let mut runtime = self.runtime.lock().await;
        let mut next = self.snapshot().objects.clone();
        if next.remove(key).is_none() {
            return Err(ChangeError::NotFound(key.clone()));
        }
        self.store.delete(key)?;
        if runtime.listeners.remove(key).is_some() {
            info!(import = %key, "stopped listening for import");
        }
        runtime.failed_imports.remove(key);
        self.round_robin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        self.sync_heartbeats(&mut runtime, &next);
        refresh_status(&mut next, &runtime);
        self.publish(next, &runtime);
        info!(object = %key, "deleted");
        Ok(())
    }

    /// Records what heartbeats learned about a Peer: its reachability and/or its labels.
    pub async fn set_peer_status(
        &self,
        key: &ObjectKey,
        reachable: Option<(bool, String)>,
        labels: Option<BTreeMap<String, String>>,
    ) {
        let runtime = self.runtime.lock().await;
        let mut next = self.snapshot().objects.clone();
        let Some(Object::Peer(peer)) = next.get_mut(key) else {
            return;
        };
        if let Some((ok, message)) = &reachable {
            peer.status
                .set_condition(api::PEER_REACHABLE, *ok, "Heartbeat", message);
            self.metrics
                .peer_reachable
                .get_or_create(&PeerLabels {
                    peer: key.name.clone(),
                })
                .set(i64::from(*ok));
        }
        if let Some(labels) = labels {
            peer.status.labels = labels;
        }
        self.publish(next, &runtime);
    }

    /// The port each Import is being served on.
    pub async fn import_ports(&self) -> BTreeMap<ObjectKey, u16> {
        self.runtime
            .lock()
            .await
            .listeners
            .iter()
            .map(|(k, l)| (k.clone(), l.port))
            .collect()
    }
}

/// An Import applied without `targetPort` keeps the port it was leased before.
fn keep_leased_port(object: &mut Object, old: &Object) {
    if let (Object::Import(new), Object::Import(old)) = (object, old) {
        if new.spec.target_port == 0 && new.spec.port == old.spec.port {
            new.spec.target_port = old.spec.target_port;
        }
    }
}

/// Sets the conditions the agent derives from the objects and what it runs.
fn refresh_status(objects: &mut BTreeMap<ObjectKey, Object>, runtime: &Runtime) {
    let peers: Vec<String> = objects
        .keys()
        .filter(|k| k.kind == api::Kind::Peer)
        .map(|k| k.name.clone())
        .collect();
    for (key, object) in objects.iter_mut() {
        match object {
            Object::Export(e) => e.status.set_condition(
                api::EXPORT_VALID,
                true,
                "Valid",
                &format!("forwarding to {}:{}", e.spec.host, e.spec.port),
            ),
            Object::Import(i) => {
                let (ok, reason, message) =
                    match (runtime.listeners.get(key), runtime.failed_imports.get(key)) {
                        (Some(l), _) => {
                            (true, "Listening", format!("listening on port {}", l.port))
                        }
                        (None, Some(e)) => (false, api::REASON_ERROR, e.clone()),
                        (None, None) => (false, api::REASON_ERROR, "not listening".to_owned()),
                    };
                i.status
                    .set_condition(api::IMPORT_TARGET_PORT_VALID, ok, reason, &message);
                let unknown: Vec<String> = i
                    .spec
                    .sources
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| !peers.contains(&s.peer))
                    .map(|(n, s)| format!("spec.sources[{n}].peer: no Peer named {:?}", s.peer))
                    .collect();
                if unknown.is_empty() {
                    i.status.set_condition(
                        api::IMPORT_SERVICE_VALID,
                        true,
                        "Valid",
                        &format!("{} source(s)", i.spec.sources.len()),
                    );
                } else {
                    i.status.set_condition(
                        api::IMPORT_SERVICE_VALID,
                        false,
                        api::REASON_ERROR,
                        &unknown.join("; "),
                    );
                }
            }
            _ => {}
        }
    }
}

/// Two Imports cannot listen on one port; the error names the one being applied.
fn check_ports(
    objects: &BTreeMap<ObjectKey, Object>,
    applied: &[(ObjectKey, Change)],
) -> Result<(), ApiError> {
    let mut seen: HashMap<u16, &ObjectKey> = HashMap::new();
    for (key, object) in objects {
        let Object::Import(import) = object else {
            continue;
        };
        let port = import.spec.target_port;
        if port == 0 {
            continue;
        }
        if let Some(other) = seen.insert(port, key) {
            let (culprit, holder) = if applied.iter().any(|(k, _)| k == other) {
                (other, key)
            } else {
                (key, other)
            };
            return Err(ApiError::new(
                &culprit.to_string(),
                "spec.targetPort",
                &format!("port {port} is already used by {holder}"),
            ));
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

/// Leases a port for an Import without `targetPort`: its own `spec.port` when that is free
/// (so clients can connect to the port they know), else one the kernel picks.
fn lease(key: &ObjectKey, import: &Import, taken: &[u16]) -> Result<(u16, TcpListener), ApiError> {
    let preferred = import.spec.port;
    if !taken.contains(&preferred) {
        match bind_any(preferred) {
            Ok(l) => return Ok((preferred, l)),
            Err(e) => {
                warn!(import = %key, port = preferred, error = %e, "spec.port is not free; leasing another port")
            }
        }
    }
    let listener = bind_any(0).map_err(|e| {
        ApiError::new(
            &key.to_string(),
            "spec.targetPort",
            &format!("cannot lease a port: {e}"),
        )
    })?;
    let port = listener.local_addr().map(|a| a.port()).map_err(|e| {
        ApiError::new(
            &key.to_string(),
            "spec.targetPort",
            &format!("cannot lease a port: {e}"),
        )
    })?;
    Ok((port, listener))
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
