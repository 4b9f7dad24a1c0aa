//! The agent's object set and what it derives from it: lookup tables for the data path, the
//! policy set, one listener per Import, one heartbeat task per Peer, and object status.
//! Changes go through [`Agent::apply`] and [`Agent::delete`], which check everything
//! (including that a new Import's port can be bound) before writing the store, so a rejected
//! change leaves both the store and the running agent as they were. Connections read an
//! immutable [`Snapshot`]; a change swaps it, and the next connection sees the new one.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{Ipv6Addr, SocketAddr},
    sync::{Arc, Weak},
};

use std::fmt;

use serde::{Deserialize, Serialize};
use tokio::{
    net::TcpListener,
    sync::{mpsc, Mutex},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::{
    api::{self, ApiError, Import, Object, ObjectKey, PeerSpec},
    connections,
    dataplane::{self, Context},
    kernel::Datapath,
    metrics::{Metrics, PeerLabels},
    peer::{health, PeerEvent, PeerHealth},
    state::Snapshot,
    store::{Batch, Store},
};

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Invalid(#[from] ApiError),
    /// The object is valid but a port it needs is held by another socket on the node right
    /// now (an Import's `targetPort`): applying it again later may succeed.
    #[error(transparent)]
    Busy(ApiError),
    #[error("{0} not found")]
    NotFound(ObjectKey),
    #[error("state directory: {0}")]
    Store(#[from] std::io::Error),
}

/// How often an Import whose port another socket held is tried again: by the agent for what
/// it loaded at start-up, by Kubernetes mode's watches for what they apply.
pub const BUSY_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `work` on a thread of its own at a lower CPU priority: file I/O, and whatever grows
/// with the number of objects (parsing, checking, deriving status, building a snapshot,
/// encoding), so that neither a slow disk nor a 5,000-object apply holds up the workers
/// that carry connections, nor takes their CPU on a node with few cores. Changes are rare
/// (operator applies, heartbeat transitions): a thread per call costs microseconds. A panic
/// in `work` is a panic here.
pub async fn off_workers<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = move || {
        lower_priority();
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)));
    };
    if let Err(e) = std::thread::Builder::new()
        .name("clink-control".to_owned())
        .spawn(job)
    {
        panic!("cannot start a control thread: {e}");
    }
    match rx.await {
        Ok(Ok(value)) => value,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => unreachable!("the control thread always answers or panics into the answer"),
    }
}

/// The nice value of control threads: the scheduler gives a worker about ten times their
/// share of a busy CPU.
const CONTROL_NICE: libc::c_int = 10;

/// Lowers the calling thread's priority (on Linux the nice value is per thread). Failing
/// to is harmless: the work only competes more with the connections.
fn lower_priority() {
    // SAFETY: setpriority takes plain integers and changes only the calling thread (who = 0
    // with PRIO_PROCESS names the caller's thread on Linux); no memory is involved.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, CONTROL_NICE) };
    if rc != 0 {
        debug!(error = %std::io::Error::last_os_error(), "cannot lower a control thread's priority");
    }
}

/// What happened to one applied object, as kubectl reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Created,
    Configured,
    Unchanged,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Change::Created => "created",
            Change::Configured => "configured",
            Change::Unchanged => "unchanged",
        })
    }
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
    /// Whether the agent chose the port (the Import had no `targetPort`).
    leased: bool,
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
    failed_imports: HashMap<ObjectKey, FailedImport>,
}

/// Why an Import loaded at start-up does not listen.
#[derive(Clone)]
struct FailedImport {
    message: String,
    /// Another socket holds the port: tried again every [`BUSY_RETRY`].
    busy: bool,
}

impl Runtime {
    fn any_busy(&self) -> bool {
        self.failed_imports.values().any(|f| f.busy)
    }
}

/// The agent's control side: it owns the objects (through the store), the listeners and
/// heartbeat tasks they need, and the [`Context`] connections read. Nothing in the data path
/// refers back to it.
pub struct Agent {
    ctx: Arc<Context>,
    gateway: SocketAddr,
    store: Arc<dyn Store>,
    /// The change lock: apply, delete and status updates take it in turn.
    runtime: Mutex<Runtime>,
    /// Heartbeat tasks report here; [`Agent::start`] spawns the task that applies the reports.
    events: mpsc::UnboundedSender<PeerEvent>,
    pending_events: std::sync::Mutex<Option<mpsc::UnboundedReceiver<PeerEvent>>>,
    /// Counts published snapshots; Kubernetes mode's status writer waits on it.
    published: tokio::sync::watch::Sender<u64>,
    /// Set when the objects come from elsewhere (the Kubernetes API): why the admin API's
    /// apply and delete are refused.
    external: std::sync::OnceLock<String>,
}

impl Agent {
    /// An agent serving `ctx` (whose snapshot it replaces on every change), announcing
    /// `gateway`, keeping its objects in `store`.
    pub fn new(ctx: Context, gateway: SocketAddr, store: Box<dyn Store>) -> Agent {
        let (events, pending) = mpsc::unbounded_channel();
        Agent {
            ctx: Arc::new(ctx),
            gateway,
            store: Arc::from(store),
            runtime: Mutex::new(Runtime::default()),
            events,
            pending_events: std::sync::Mutex::new(Some(pending)),
            published: tokio::sync::watch::Sender::new(0),
            external: std::sync::OnceLock::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.ctx.name
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.ctx.labels
    }

    pub fn gateway(&self) -> SocketAddr {
        self.gateway
    }

    pub fn datapath(&self) -> &Datapath {
        &self.ctx.datapath
    }

    pub fn metrics(&self) -> &Metrics {
        &self.ctx.metrics
    }

    pub fn metrics_arc(&self) -> Arc<Metrics> {
        self.ctx.metrics.clone()
    }

    /// What connections work from; the gateway listener gets it.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.ctx.snapshot()
    }

    /// Changes with every new snapshot (an apply, a delete, a heartbeat's news).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Says that objects come from `source` (e.g. the Kubernetes API): the admin API then
    /// refuses to change them, giving `source` as the reason.
    pub fn set_external_source(&self, source: &str) {
        let _ = self.external.set(source.to_owned());
    }

    /// Where objects come from when not from the admin API.
    pub fn external_source(&self) -> Option<&str> {
        self.external.get().map(String::as_str)
    }

    /// Derives the status of `objects` from what runs, makes them the state the next
    /// connection sees, and tells the kernel data path.
    async fn publish(&self, mut objects: BTreeMap<ObjectKey, Object>, runtime: &Runtime) {
        let serving = Serving::of(runtime);
        let snapshot = off_workers(move || {
            refresh_status(&mut objects, &serving);
            Arc::new(Snapshot::build(objects))
        })
        .await;
        let ports = runtime
            .listeners
            .iter()
            .map(|(k, l)| (k.clone(), l.port))
            .collect();
        self.ctx.datapath.objects_changed(&snapshot, &ports);
        self.ctx.snapshot.set(snapshot);
        self.published.send_modify(|n| *n += 1);
    }

    /// Applies what heartbeats report until the agent is gone.
    fn spawn_status_task(self: &Arc<Self>) {
        let pending = self
            .pending_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut events) = pending else { return };
        let agent: Weak<Agent> = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let Some(agent) = agent.upgrade() else { return };
                agent.set_peer_status(event).await;
            }
        });
    }

    /// Decides every open connection again after a change: those the new objects no longer
    /// allow are reset, or only logged with `--keep-established` (`connections`). Off the
    /// workers, like the rest of a change: it grows with the open connections.
    async fn recheck_connections(&self) {
        if self.ctx.connections.is_empty() {
            return;
        }
        let ctx = self.ctx.clone();
        let outcome =
            off_workers(move || ctx.connections.recheck(&ctx.snapshot(), ctx.own())).await;
        if outcome.ended + outcome.kept > 0 {
            info!(
                allowed = outcome.allowed,
                reset = outcome.ended,
                kept = outcome.kept,
                "open connections decided again after the change"
            );
        }
    }

    /// Ends connections idle for `--idle-timeout`, looking every quarter of it, until the
    /// agent is gone.
    fn spawn_idle_sweeper(&self) {
        let Some(limit) = self.ctx.connections.closing().idle_timeout else {
            return;
        };
        let ctx = Arc::downgrade(&self.ctx);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(limit / connections::IDLE_SWEEPS);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(ctx) = ctx.upgrade() else { return };
                ctx.connections.sweep_idle(limit);
            }
        });
    }

    /// Loads the store at start-up. State files that cannot be loaded are set aside, and
    /// objects that cannot run (an Import whose port is taken) are reported in their status;
    /// both are returned for the log, and the others serve.
    pub async fn start(self: &Arc<Self>) -> std::io::Result<Vec<String>> {
        self.spawn_status_task();
        self.spawn_idle_sweeper();
        let store = self.store.clone();
        let loaded = off_workers(move || store.load()).await?;
        self.ctx
            .metrics
            .state_files_rejected
            .inc_by(loaded.rejected.len() as u64);
        let mut problems: Vec<String> = loaded.rejected.iter().map(ToString::to_string).collect();
        let objects = loaded.objects;
        let mut runtime = self.runtime.lock().await;
        let set: BTreeMap<ObjectKey, Object> = objects.into_iter().map(|o| (o.key(), o)).collect();
        for (key, object) in &set {
            if let Object::Import(import) = object {
                match bind_import(key, import) {
                    Ok(l) => {
                        let port = import.spec.listen_port();
                        self.serve_import(&mut runtime, key, port, l, false);
                    }
                    Err(e) => {
                        problems.push(if e.busy {
                            format!(
                                "{} (tried again every {}s until it is free)",
                                e.error,
                                BUSY_RETRY.as_secs()
                            )
                        } else {
                            format!("{} (not served until re-applied)", e.error)
                        });
                        let failed = FailedImport {
                            message: e.error.message,
                            busy: e.busy,
                        };
                        runtime.failed_imports.insert(key.clone(), failed);
                    }
                }
            }
        }
        self.sync_heartbeats(&mut runtime, &set);
        info!(objects = set.len(), "loaded state");
        self.publish(set, &runtime).await;
        if runtime.any_busy() {
            self.spawn_busy_retry();
        }
        Ok(problems)
    }

    /// Tries the busy Imports of [`Runtime::failed_imports`] again every [`BUSY_RETRY`] until
    /// none is left: each listens once its port is free, or leaves the set when an apply or a
    /// delete took it over (under the change lock, so never against a newer version).
    fn spawn_busy_retry(self: &Arc<Self>) {
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(BUSY_RETRY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(agent) = agent.upgrade() else { return };
                if !agent.retry_busy_imports().await {
                    return;
                }
            }
        });
    }

    /// One try of every busy Import; returns whether any is still waiting.
    async fn retry_busy_imports(self: &Arc<Self>) -> bool {
        let mut runtime = self.runtime.lock().await;
        let objects = self.snapshot().objects.clone();
        let mut served = false;
        let busy: Vec<ObjectKey> = runtime
            .failed_imports
            .iter()
            .filter(|(_, f)| f.busy)
            .map(|(k, _)| k.clone())
            .collect();
        for key in busy {
            // Apply, delete and serving take an Import out of `failed_imports`, so a busy one
            // is still the stored object and not listening.
            let Some(Object::Import(import)) = objects.get(&key) else {
                runtime.failed_imports.remove(&key);
                continue;
            };
            match bind_import(&key, import) {
                Ok(listener) => {
                    info!(import = %key, "its port is free now");
                    let port = import.spec.listen_port();
                    self.serve_import(&mut runtime, &key, port, listener, false);
                    served = true;
                }
                Err(e) if e.busy => {}
                Err(e) => {
                    warn!(import = %key, error = %e.error, "not served until re-applied");
                    let failed = FailedImport {
                        message: e.error.message,
                        busy: false,
                    };
                    runtime.failed_imports.insert(key.clone(), failed);
                    served = true;
                }
            }
        }
        if served {
            self.publish(objects, &runtime).await;
        }
        runtime.any_busy()
    }

    fn serve_import(
        self: &Arc<Self>,
        runtime: &mut Runtime,
        key: &ObjectKey,
        port: u16,
        listener: TcpListener,
        leased: bool,
    ) {
        info!(import = %key, port, leased, "listening for import");
        let task = dataplane::serve_import(self.ctx.clone(), key.clone(), listener);
        runtime.failed_imports.remove(key);
        runtime.listeners.insert(
            key.clone(),
            ImportListener {
                port,
                leased,
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
        runtime.heartbeats.retain(|key, hb| {
            let keep = matches!(objects.get(key), Some(Object::Peer(p)) if p.spec == hb.spec);
            if !keep {
                self.ctx.peers.remove(&key.name);
                self.ctx.metrics.peer_reachable.remove(&PeerLabels {
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
            self.ctx.peers.insert(&key.name, h.clone());
            let task = health::spawn_heartbeat(
                Arc::downgrade(&self.ctx.dialer),
                key.clone(),
                peer.spec.clone(),
                h,
                self.events.clone(),
            );
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
        let current = self.snapshot();
        let store = self.store.clone();
        let (mut next, changes) = off_workers(move || plan(&current, objects, &*store)).await?;

        // Bind what is new before anything is written; leases are decided here.
        let mut bound = Vec::new();
        let mut taken: Vec<u16> = next
            .values()
            .filter_map(|o| match o {
                Object::Import(i) if i.spec.target_port != 0 => Some(i.spec.target_port),
                _ => None,
            })
            .collect();
        let applied: HashSet<&ObjectKey> = changes.iter().map(|(key, _)| key).collect();
        for (key, object) in next.iter_mut() {
            let Object::Import(import) = object else {
                continue;
            };
            let current = runtime.listeners.get(key).map(|l| l.port);
            if import.spec.target_port != 0 && current == Some(import.spec.target_port) {
                continue;
            }
            // An Import that did not bind at start-up is bound again when it is applied
            // again, not by an apply of other objects, which its port must not refuse.
            if current.is_none() && !applied.contains(key) {
                continue;
            }
            let leased = import.spec.target_port == 0;
            let listener = if leased {
                let (port, listener) = lease(key, import, &taken)?;
                import.spec.target_port = port;
                taken.push(port);
                listener
            } else {
                bind_import(key, import)?
            };
            bound.push((key.clone(), import.spec.target_port, listener, leased));
        }

        let batch = Batch {
            put: changes
                .iter()
                .filter(|(key, change)| {
                    *change != Change::Unchanged || bound.iter().any(|(k, ..)| k == key)
                })
                .map(|(key, _)| next[key].clone())
                .collect(),
            delete: Vec::new(),
        };
        self.commit(batch).await?;
        for (key, port, listener, leased) in bound {
            self.serve_import(&mut runtime, &key, port, listener, leased);
        }
        self.sync_heartbeats(&mut runtime, &next);
        self.publish(next, &runtime).await;
        log_applied(&changes);
        if changes.iter().any(|(_, c)| *c != Change::Unchanged) {
            self.recheck_connections().await;
        }
        Ok(changes)
    }

    pub async fn delete(self: &Arc<Self>, key: &ObjectKey) -> Result<(), ChangeError> {
        let mut runtime = self.runtime.lock().await;
        let mut next = self.snapshot().objects.clone();
        if next.remove(key).is_none() {
            return Err(ChangeError::NotFound(key.clone()));
        }
        self.commit(Batch {
            put: Vec::new(),
            delete: vec![key.clone()],
        })
        .await?;
        if runtime.listeners.remove(key).is_some() {
            info!(import = %key, "stopped listening for import");
        }
        runtime.failed_imports.remove(key);
        self.ctx.balancer.forget(key);
        self.sync_heartbeats(&mut runtime, &next);
        self.publish(next, &runtime).await;
        info!(object = %key, "deleted");
        self.recheck_connections().await;
        Ok(())
    }

    /// Writes one change to the store off the async workers, timed.
    async fn commit(&self, batch: Batch) -> std::io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let (put, delete) = (batch.put.len(), batch.delete.len());
        let store = self.store.clone();
        off_workers(move || store.commit(&batch)).await?;
        let took = started.elapsed();
        self.ctx.metrics.state_commit.observe(took.as_secs_f64());
        debug!(put, delete, ?took, "state written");
        Ok(())
    }

    /// Records what heartbeats learned about a Peer: its reachability and/or its labels.
    async fn set_peer_status(&self, event: PeerEvent) {
        let PeerEvent {
            key,
            reachable,
            labels,
        } = event;
        let runtime = self.runtime.lock().await;
        let mut next = self.snapshot().objects.clone();
        let Some(Object::Peer(peer)) = next.get_mut(&key) else {
            return;
        };
        if let Some((ok, message)) = &reachable {
            peer.status
                .set_condition(api::PEER_REACHABLE, *ok, api::REASON_HEARTBEAT, message);
            self.ctx
                .metrics
                .peer_reachable
                .get_or_create(&PeerLabels {
                    peer: key.name.clone(),
                })
                .set(i64::from(*ok));
        }
        if let Some(labels) = labels {
            peer.status.labels = labels;
        }
        self.publish(next, &runtime).await;
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

type Objects = BTreeMap<ObjectKey, Object>;

/// Merges `objects` into the current set: what each becomes, and what changes. Status is
/// the agent's, never the applier's: a new object starts with none, a changed one keeps what
/// the agent observed. Checks what involves other objects (ports) and what the store must
/// hold, so that a failure leaves nothing bound or written.
fn plan(
    current: &Snapshot,
    objects: Vec<Object>,
    store: &dyn Store,
) -> Result<(Objects, Vec<(ObjectKey, Change)>), ChangeError> {
    let mut next = current.objects.clone();
    let mut changes = Vec::new();
    for mut object in objects {
        let key = object.key();
        *object.status_mut() = next
            .get(&key)
            .map(|old| old.status().clone())
            .unwrap_or_default();
        let change = match next.get(&key) {
            None => Change::Created,
            Some(old) => {
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
    for (key, change) in &changes {
        if *change != Change::Unchanged {
            store.check(&next[key])?;
        }
    }
    Ok((next, changes))
}

/// Applies up to this many changed objects are logged one line each; larger ones in one
/// line of counts: thousands of lines would hold up the worker that writes them and bury
/// the rest of the log.
const LOGGED_ONE_BY_ONE: usize = 20;

fn log_applied(changes: &[(ObjectKey, Change)]) {
    let changed: Vec<_> = changes
        .iter()
        .filter(|(_, c)| *c != Change::Unchanged)
        .collect();
    if changed.len() <= LOGGED_ONE_BY_ONE {
        for (key, change) in changed {
            info!(object = %key, ?change, "applied");
        }
        return;
    }
    let count = |which| changed.iter().filter(|(_, c)| *c == which).count();
    info!(
        created = count(Change::Created),
        configured = count(Change::Configured),
        unchanged = changes.len() - changed.len(),
        first = %changed[0].0,
        "applied"
    );
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
/// What runs, as status derivation needs it: copied from [`Runtime`] to derive status off
/// the workers.
struct Serving {
    ports: HashMap<ObjectKey, u16>,
    /// Imports listening on a port the agent leased.
    leased: std::collections::HashSet<ObjectKey>,
    failed_imports: HashMap<ObjectKey, FailedImport>,
}

impl Serving {
    fn of(runtime: &Runtime) -> Serving {
        Serving {
            ports: runtime
                .listeners
                .iter()
                .map(|(k, l)| (k.clone(), l.port))
                .collect(),
            failed_imports: runtime.failed_imports.clone(),
            leased: runtime
                .listeners
                .iter()
                .filter(|(_, l)| l.leased)
                .map(|(k, _)| k.clone())
                .collect(),
        }
    }
}

fn refresh_status(objects: &mut BTreeMap<ObjectKey, Object>, runtime: &Serving) {
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
                    match (runtime.ports.get(key), runtime.failed_imports.get(key)) {
                        (Some(port), _) if runtime.leased.contains(key) => (
                            true,
                            api::REASON_LEASED,
                            format!("listening on port {port}"),
                        ),
                        (Some(port), _) => (true, "Listening", format!("listening on port {port}")),
                        (None, Some(f)) if f.busy => {
                            (false, api::REASON_PORT_IN_USE, f.message.clone())
                        }
                        (None, Some(f)) => (false, api::REASON_ERROR, f.message.clone()),
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

/// Why an Import's listener could not be bound.
struct BindError {
    error: ApiError,
    /// Another socket holds the port (`EADDRINUSE`): perhaps only for now, e.g. an outgoing
    /// connection given it from the kernel's ephemeral range.
    busy: bool,
}

impl From<BindError> for ChangeError {
    fn from(e: BindError) -> Self {
        if e.busy {
            ChangeError::Busy(e.error)
        } else {
            ChangeError::Invalid(e.error)
        }
    }
}

/// Binds an Import's listener on every address of the node: dual-stack where IPv6 exists.
fn bind_import(key: &ObjectKey, import: &Import) -> Result<TcpListener, BindError> {
    let port = import.spec.listen_port();
    bind_any(port).map_err(|e| BindError {
        busy: e.kind() == std::io::ErrorKind::AddrInUse,
        error: ApiError::new(
            &key.to_string(),
            import.spec.listen_field(),
            &format!("cannot listen on port {port}: {e}"),
        ),
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
    socket.listen(crate::limits::LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}
