//! Kubernetes mode: the agent runs as a DaemonSet pod and takes its objects from the API
//! server instead of a state directory.
//!
//! - Every agent watches Peers (its own namespace), Exports, Imports and AccessPolicies
//!   (cluster-wide) and PrivilegedAccessPolicies (cluster scoped), and applies them to itself
//!   through the same validation and policy code as standalone mode ([`watch`]); and it
//!   watches the pods of its node for client attributes ([`PodCache`]). Each keeps its own
//!   heartbeats, so its load balancing is right whether it leads or not.
//! - One agent per cluster, elected with a coordination.k8s.io Lease, writes what the cluster
//!   shares ([`leader`]): object status (conditions, Peer labels), the leased `targetPort` of
//!   Imports, one Service per Import whose endpoints are the agents, and Events for objects
//!   that fail validation.
//!
//! The CRDs are upstream ClusterLink's, generated from the object model ([`crd`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    agent::Agent,
    api::{self, Kind, ObjectKey},
    metrics::Metrics,
};

pub mod crd;
pub mod leader;
mod pods;
pub mod watch;

pub use pods::PodCache;

/// The field manager of every write the agents make (server-side apply, patches).
pub const FIELD_MANAGER: &str = "clusterlink-agent";
/// The labels of an Import's Service, as upstream sets them.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "clusterlink.net";
pub const LABEL_IMPORT_NAME: &str = "clusterlink.net/import-name";
pub const LABEL_IMPORT_NAMESPACE: &str = "clusterlink.net/import-namespace";

/// Where a pod's service-account token is mounted; its presence selects Kubernetes mode.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Whether this process runs in a pod with a service-account token.
pub fn in_cluster() -> bool {
    std::path::Path::new(SERVICE_ACCOUNT_DIR)
        .join("token")
        .is_file()
}

/// The namespace of this pod's service account, if it has one.
pub fn own_namespace() -> Option<String> {
    std::fs::read_to_string(std::path::Path::new(SERVICE_ACCOUNT_DIR).join("namespace"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// How this agent takes part in the cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// The agents' namespace: Peers and the Lease live here.
    pub namespace: String,
    /// This node (the pod cache holds its pods only).
    pub node: String,
    /// This agent's identity in the Lease and in Events (its pod name).
    pub identity: String,
    /// The labels of the agents' pods: the selector of every Import's Service.
    pub agent_selector: BTreeMap<String, String>,
    /// The Lease's name and how long a holder keeps it without renewing.
    pub lease_name: String,
    pub lease_duration: Duration,
}

/// One object as the API server has it, for the leader's writes.
#[derive(Clone, Debug)]
pub struct Seen {
    pub reference: ObjectReference,
    pub uid: String,
    pub resource_version: String,
    /// The status the API server has (what the leader wrote last, or nothing).
    pub status: api::Status,
    /// Imports: `spec.targetPort` as the API server has it (0 until leased).
    pub target_port: Option<u16>,
    /// Why the agent refused the object, if it did.
    pub invalid: Option<String>,
    /// The refusal is an Import's port held by another socket on this node: not the spec's
    /// fault, and applied again until it listens (condition reason `PortInUse`).
    pub port_in_use: bool,
}

/// What the watches learn and the leader reads.
pub struct Shared {
    pub namespace: String,
    pub metrics: Arc<Metrics>,
    seen: Mutex<HashMap<ObjectKey, Seen>>,
    /// Wakes the leader when an object was seen or forgotten.
    pub changed: Notify,
    /// The cluster IPs of each Import's Service, and the Imports whose users wrote the
    /// service-address annotation themselves (see `watch::sync_services`).
    pub service_ips: Mutex<ServiceIps>,
}

/// What `watch::sync_services` keeps: Import → its Service's cluster IPs (comma-separated),
/// and the Imports annotated by their users, whose annotation wins.
#[derive(Debug, Default)]
pub struct ServiceIps {
    pub by_import: HashMap<ObjectKey, String>,
    pub user_annotated: std::collections::HashSet<ObjectKey>,
}

impl Shared {
    pub fn new(namespace: &str, metrics: Arc<Metrics>) -> Shared {
        Shared {
            namespace: namespace.to_owned(),
            metrics,
            seen: Mutex::default(),
            changed: Notify::new(),
            service_ips: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, Seen>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything seen now.
    pub fn seen(&self) -> HashMap<ObjectKey, Seen> {
        self.lock().clone()
    }

    pub fn observe(&self, key: ObjectKey, seen: Seen) {
        self.lock().insert(key, seen);
        self.update_invalid();
        self.changed.notify_one();
    }

    pub fn forget(&self, key: &ObjectKey) {
        self.lock().remove(key);
        self.update_invalid();
        self.changed.notify_one();
    }

    /// Records that the agent refused `key`: for a port in use on this node if `port_in_use`,
    /// else for its spec.
    pub fn mark_refused(&self, key: &ObjectKey, why: String, port_in_use: bool) {
        if let Some(seen) = self.lock().get_mut(key) {
            seen.invalid = Some(why);
            seen.port_in_use = port_in_use;
        }
        self.update_invalid();
        self.changed.notify_one();
    }

    /// Replaces what was seen of `kind` with a relist.
    pub fn replace_kind(&self, kind: Kind, seen: Vec<(ObjectKey, Seen)>) {
        {
            let mut all = self.lock();
            all.retain(|k, _| k.kind != kind);
            all.extend(seen);
        }
        self.update_invalid();
        self.changed.notify_one();
    }

    fn update_invalid(&self) {
        let n = self.lock().values().filter(|s| s.invalid.is_some()).count();
        self.metrics
            .kubernetes_invalid_objects
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// The tasks of Kubernetes mode; dropping it stops them.
pub struct Running {
    tasks: Vec<JoinHandle<()>>,
    election: Option<JoinHandle<()>>,
    stop_election: tokio::sync::watch::Sender<bool>,
}

impl Running {
    /// Leaves the leader election: this agent stops writing and, if it holds the Lease,
    /// releases it, waiting at most `timeout` for the API server. The watches go on (a
    /// draining agent still needs the objects). Called once the agent is told to stop.
    pub async fn leave_election(&mut self, timeout: Duration) {
        self.stop_election.send_replace(true);
        let Some(mut election) = self.election.take() else {
            return;
        };
        if tokio::time::timeout(timeout, &mut election).await.is_err() {
            election.abort();
            warn!(
                timeout_s = timeout.as_secs(),
                "the API server did not answer in time: the Lease, if this agent held it, \
                 is left to expire"
            );
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in self.tasks.iter().chain(&self.election) {
            t.abort();
        }
    }
}

/// Starts Kubernetes mode for `agent`: the watches, the pod cache and the leader's writer.
pub fn start(agent: Arc<Agent>, client: Client, options: Options, pods: Arc<PodCache>) -> Running {
    agent.set_external_source("the Kubernetes API");
    let shared = Arc::new(Shared::new(&options.namespace, agent.metrics_arc()));
    let mut tasks = Vec::new();
    for kind in Kind::ALL {
        tasks.push(tokio::spawn(watch::sync_kind(
            agent.clone(),
            client.clone(),
            kind,
            shared.clone(),
        )));
    }
    tasks.push(tokio::spawn(watch::sync_services(
        agent.clone(),
        client.clone(),
        shared.clone(),
    )));
    tasks.push(tokio::spawn(watch::sync_pods(
        client.clone(),
        pods,
        shared.clone(),
    )));
    let leading = leader::elect(client.clone(), &options, agent.metrics_arc());
    tasks.push(tokio::spawn(leader::run(
        agent,
        client,
        Arc::new(options.clone()),
        shared,
        leading.leader,
    )));
    info!(
        namespace = %options.namespace,
        node = %options.node,
        identity = %options.identity,
        lease = %options.lease_name,
        "Kubernetes mode: objects come from the API server"
    );
    Running {
        tasks,
        election: Some(leading.task),
        stop_election: leading.stop,
    }
}
