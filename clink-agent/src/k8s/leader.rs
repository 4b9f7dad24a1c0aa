//! What one agent per cluster writes: it holds a coordination.k8s.io Lease (through
//! kube-lease-manager) and, while it does, makes the API server show what the agents do.
//!
//! - **Status**: each object's conditions (and a Peer's labels) as this agent derives them,
//!   patched on the status subresource only when they differ from what the server has; a
//!   condition keeps its `lastTransitionTime` while its status stays.
//! - **Leased ports**: an Import applied without `targetPort` gets the port this agent
//!   leased, written back to its spec; every agent then listens on it.
//! - **Services**: one per Import, named after it in its namespace, by server-side apply
//!   with [`FIELD_MANAGER`], owned by the Import (so the garbage collector removes it with
//!   the Import, and the leader deletes it too), selecting the agents' pods on `targetPort`
//!   with `internalTrafficPolicy: Local` so a pod reaches its own node's agent. A Service of
//!   that name the agents did not make is never touched: `ImportServiceValid` says so.
//! - **Events** for objects that fail validation and for Service conflicts.
//!
//! A change wakes the writer (a watch event, a new snapshot of the agent's); it also goes
//! over everything every [`RESYNC`], and from scratch after each election.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Service;
use kube::{
    api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
    Client,
};
use kube_lease_manager::LeaseManagerBuilder;
use serde_json::{json, Value};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{
    watch::api_resource, Options, Seen, Shared, FIELD_MANAGER, LABEL_IMPORT_NAME,
    LABEL_IMPORT_NAMESPACE, LABEL_MANAGED_BY, MANAGED_BY,
};
use crate::{
    agent::Agent,
    api::{self, Import, Kind, Object, ObjectKey},
    metrics::{Metrics, WriteLabels},
    state::Snapshot,
};

/// How often the leader goes over everything even when nothing woke it.
pub const RESYNC: Duration = Duration::from_secs(60);

/// The reason of a False `ImportServiceValid` when a Service of the Import's name exists
/// that the agents did not create.
pub const REASON_SERVICE_CONFLICT: &str = "ServiceExists";
/// The reason of a condition that reports a failed validation.
pub const REASON_INVALID: &str = "InvalidSpec";

/// The reason of the condition and Event of an object the agent refused.
fn refusal_reason(seen: &Seen) -> &'static str {
    if seen.port_in_use {
        api::REASON_PORT_IN_USE
    } else {
        REASON_INVALID
    }
}

/// The election's task, its verdict, and the way to leave it.
pub struct Leading {
    pub task: JoinHandle<()>,
    pub leader: watch::Receiver<bool>,
    /// `true` ends the election: the verdict turns false (the writer stops) and the Lease is
    /// released if this agent holds it, then the task ends.
    pub stop: watch::Sender<bool>,
}

/// Takes part in the election for the Lease `options.lease_name` in the agents' namespace.
/// Losing the API server neither makes nor unmakes a leader by itself: the Lease expires
/// after its duration and another agent takes it. Leaving through [`Leading::stop`] (the
/// agent shutting down) releases it instead, so that an agent looking for a leader (the pod
/// that replaces this one in a rolling update, or another one once its wait ends) takes it
/// without waiting for it to expire.
pub fn elect(client: Client, options: &Options, metrics: Arc<Metrics>) -> Leading {
    let (tx, rx) = watch::channel(false);
    let (stop, mut stopping) = watch::channel(false);
    let duration = options.lease_duration.as_secs().max(2);
    // Renew well before expiry; kube-lease-manager needs grace < duration.
    let grace = (duration / 3).max(1);
    let (name, namespace, identity) = (
        options.lease_name.clone(),
        options.namespace.clone(),
        options.identity.clone(),
    );
    let task = tokio::spawn(async move {
        let mut delay = Duration::from_secs(1);
        loop {
            let built = tokio::select! {
                built = LeaseManagerBuilder::new(client.clone(), &name)
                    .with_namespace(&namespace)
                    .with_identity(&identity)
                    .with_duration(duration)
                    .with_grace(grace)
                    .with_field_manager(FIELD_MANAGER)
                    .build() => built,
                _ = stopping.wait_for(|s| *s) => return,
            };
            match built {
                Ok(manager) => {
                    delay = Duration::from_secs(1);
                    let (mut verdict, handle) = manager.watch().await;
                    let stopped = loop {
                        let leading = *verdict.borrow_and_update();
                        if *tx.borrow() != leading {
                            metrics.kubernetes_leader.set(i64::from(leading));
                            if leading {
                                info!(lease = %name, %identity, "elected: this agent writes status and Services");
                            } else {
                                info!(lease = %name, "not the leader (another agent writes status and Services)");
                            }
                            tx.send_replace(leading);
                        }
                        tokio::select! {
                            changed = verdict.changed() => if changed.is_err() {
                                break false;
                            },
                            _ = stopping.wait_for(|s| *s) => break true,
                        }
                    };
                    let was_leading = tx.send_replace(false);
                    metrics.kubernetes_leader.set(0);
                    // With nobody listening, the manager's task releases the Lease if it
                    // holds it, and ends.
                    drop(verdict);
                    match handle.await {
                        Ok(Err(e)) => warn!(lease = %name, error = %e, "leader election stopped"),
                        Err(e) => warn!(lease = %name, error = %e, "leader election stopped"),
                        Ok(Ok(_)) if stopped && was_leading => info!(
                            lease = %name,
                            "released the Lease: another agent can take it without waiting \
                             for it to expire"
                        ),
                        Ok(Ok(_)) => {}
                    }
                    if stopped {
                        return;
                    }
                }
                Err(e) => warn!(
                    lease = %name,
                    %namespace,
                    error = %e,
                    "cannot take part in the leader election (the Role for coordination.k8s.io \
                     leases in the agents' namespace is in the chart); retrying"
                ),
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    });
    Leading {
        task,
        leader: rx,
        stop,
    }
}

/// Writes while this agent leads, until the task is dropped.
pub async fn run(
    agent: Arc<Agent>,
    client: Client,
    options: Arc<Options>,
    shared: Arc<Shared>,
    mut leader: watch::Receiver<bool>,
) {
    let mut published = agent.subscribe();
    loop {
        while !*leader.borrow_and_update() {
            if leader.changed().await.is_err() {
                return;
            }
        }
        let mut writer = Writer::new(client.clone(), options.clone(), agent.metrics_arc());
        writer.remove_orphans(&shared).await;
        loop {
            writer.reconcile(&agent.snapshot(), &shared).await;
            tokio::select! {
                changed = leader.changed() => {
                    if changed.is_err() || !*leader.borrow_and_update() {
                        break;
                    }
                }
                _ = shared.changed.notified() => {}
                _ = published.changed() => {}
                _ = tokio::time::sleep(RESYNC) => writer.forget_applied(),
            }
            // Let a burst of changes (a relist, a kubectl apply of many objects) settle.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The leader's writes and what it remembers of them.
pub struct Writer {
    client: Client,
    options: Arc<Options>,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    /// The Service last applied for each Import (its JSON).
    applied: HashMap<ObjectKey, Value>,
    /// Imports whose Service name is taken by a Service the agents did not make.
    conflicts: HashMap<ObjectKey, String>,
    /// Events already sent, by object and resourceVersion.
    evented: HashSet<(ObjectKey, String)>,
}

impl Writer {
    pub fn new(client: Client, options: Arc<Options>, metrics: Arc<Metrics>) -> Writer {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: Some(options.identity.clone()),
        };
        Writer {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            options,
            metrics,
            applied: HashMap::new(),
            conflicts: HashMap::new(),
            evented: HashSet::new(),
        }
    }

    /// Forgets what was applied, so the next pass checks every Service again.
    pub fn forget_applied(&mut self) {
        self.applied.clear();
    }

    fn count(&self, what: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.metrics
            .kubernetes_writes
            .get_or_create(&WriteLabels { what, result })
            .inc();
    }

    /// One pass over everything: leased ports, Services, status, Events.
    pub async fn reconcile(&mut self, snapshot: &Snapshot, shared: &Shared) {
        let seen = shared.seen();
        self.write_leased_ports(snapshot, &seen).await;
        self.write_services(snapshot, &seen).await;
        let mut keys: Vec<&ObjectKey> = seen.keys().collect();
        keys.sort();
        for key in keys {
            let object = &seen[key];
            if let Some(why) = &object.invalid {
                self.event(key, object, refusal_reason(object), why).await;
            }
            if !matches!(key.kind, Kind::Peer | Kind::Export | Kind::Import) {
                continue;
            }
            let desired = self.desired_status(key, object, snapshot);
            if desired != object.status {
                self.patch_status(key, &desired).await;
            }
        }
    }

    /// The status an object should have: the agent's, plus what only the leader knows
    /// (validation failures, Service conflicts), with unchanged conditions keeping their
    /// transition time.
    pub fn desired_status(&self, key: &ObjectKey, seen: &Seen, snapshot: &Snapshot) -> api::Status {
        let mut status = snapshot
            .objects
            .get(key)
            .map(|o| o.status().clone())
            .unwrap_or_else(|| seen.status.clone());
        if let Some(why) = &seen.invalid {
            let type_ = match key.kind {
                Kind::Peer => api::PEER_REACHABLE,
                Kind::Export => api::EXPORT_VALID,
                _ if seen.port_in_use || why.contains("spec.targetPort") => {
                    api::IMPORT_TARGET_PORT_VALID
                }
                _ => api::IMPORT_SERVICE_VALID,
            };
            status.set_condition(type_, false, refusal_reason(seen), why);
        }
        if let Some(why) = self.conflicts.get(key) {
            status.set_condition(
                api::IMPORT_SERVICE_VALID,
                false,
                REASON_SERVICE_CONFLICT,
                why,
            );
        }
        for c in &mut status.conditions {
            if let Some(old) = seen.status.condition(&c.type_) {
                if old.status == c.status {
                    c.last_transition_time = old.last_transition_time.clone();
                }
            }
        }
        status
    }

    async fn patch_status(&self, key: &ObjectKey, status: &api::Status) {
        let ar = api_resource(key.kind);
        let api: Api<DynamicObject> = if key.kind.namespaced() {
            Api::namespaced_with(self.client.clone(), &key.namespace, &ar)
        } else {
            Api::all_with(self.client.clone(), &ar)
        };
        let mut body = json!({ "conditions": status.conditions });
        if key.kind == Kind::Peer {
            // A merge patch removes what is null: labels the peer no longer announces.
            body["labels"] = if status.labels.is_empty() {
                Value::Null
            } else {
                json!(status.labels)
            };
        }
        let patch = Patch::Merge(json!({ "status": body }));
        match api
            .patch_status(&key.name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => {
                debug!(object = %key, "status written");
                self.count("status", true);
            }
            Err(e) => {
                self.count("status", false);
                warn!(object = %key, error = %e, "cannot write status");
            }
        }
    }

    /// Writes back the port this agent leased for each Import applied without one.
    async fn write_leased_ports(&self, snapshot: &Snapshot, seen: &HashMap<ObjectKey, Seen>) {
        for (key, object) in seen {
            if object.target_port != Some(0) || object.invalid.is_some() {
                continue;
            }
            let Some(Object::Import(import)) = snapshot.objects.get(key) else {
                continue;
            };
            let port = import.spec.target_port;
            if port == 0 {
                continue;
            }
            let api: Api<DynamicObject> = Api::namespaced_with(
                self.client.clone(),
                &key.namespace,
                &api_resource(Kind::Import),
            );
            let patch = Patch::Merge(json!({ "spec": { "targetPort": port } }));
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PatchParams::default()
            };
            match api.patch(&key.name, &params, &patch).await {
                Ok(_) => {
                    info!(import = %key, port, "leased target port written back");
                    self.count("target-port", true);
                }
                Err(e) => {
                    self.count("target-port", false);
                    warn!(import = %key, port, error = %e, "cannot write back the leased target port");
                }
            }
        }
    }

    async fn write_services(&mut self, snapshot: &Snapshot, seen: &HashMap<ObjectKey, Seen>) {
        for (key, object) in seen {
            if key.kind != Kind::Import {
                continue;
            }
            let Some(Object::Import(import)) = snapshot.objects.get(key) else {
                continue;
            };
            // Until the leased port is in the spec, other agents may listen elsewhere.
            let Some(port @ 1..) = object.target_port else {
                continue;
            };
            if import.spec.target_port != port {
                continue;
            }
            let desired = service_for(key, import, &object.uid, &self.options.agent_selector);
            if self.applied.get(key) == Some(&desired) {
                continue;
            }
            self.apply_service(key, object, desired).await;
        }
        let gone: Vec<ObjectKey> = self
            .applied
            .keys()
            .filter(|k| !seen.contains_key(k))
            .cloned()
            .collect();
        for key in gone {
            self.applied.remove(&key);
            self.conflicts.remove(&key);
            self.delete_service(&key).await;
        }
    }

    async fn apply_service(&mut self, key: &ObjectKey, seen: &Seen, desired: Value) {
        let api: Api<Service> = Api::namespaced(self.client.clone(), &key.namespace);
        match api.get_opt(&key.name).await {
            Ok(Some(existing)) if !managed(&existing) => {
                let why = format!(
                    "a Service named {} exists in {} that ClusterLink did not create; it is \
                     left alone (delete it or rename the Import)",
                    key.name, key.namespace
                );
                if self.conflicts.insert(key.clone(), why.clone()).is_none() {
                    warn!(import = %key, "{why}");
                    self.event(key, seen, REASON_SERVICE_CONFLICT, &why).await;
                }
                return;
            }
            Ok(_) => {}
            Err(e) => {
                warn!(import = %key, error = %e, "cannot read the Import's Service");
                return;
            }
        }
        self.conflicts.remove(key);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch(&key.name, &params, &Patch::Apply(desired.clone()))
            .await
        {
            Ok(_) => {
                info!(import = %key, "Service applied");
                self.count("service", true);
                self.applied.insert(key.clone(), desired);
            }
            Err(e) => {
                self.count("service", false);
                warn!(import = %key, error = %e, "cannot apply the Import's Service");
            }
        }
    }

    /// Deletes the Service of a deleted Import, if it is the agents'.
    async fn delete_service(&self, key: &ObjectKey) {
        let api: Api<Service> = Api::namespaced(self.client.clone(), &key.namespace);
        match api.get_opt(&key.name).await {
            Ok(Some(existing)) if managed(&existing) => {}
            Ok(_) => return,
            Err(e) => {
                warn!(import = %key, error = %e, "cannot read the Service of a deleted Import");
                return;
            }
        }
        match api.delete(&key.name, &DeleteParams::default()).await {
            Ok(_) => {
                info!(import = %key, "Service of the deleted Import removed");
                self.count("service-delete", true);
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                self.count("service-delete", false);
                warn!(import = %key, error = %e, "cannot delete the Service of a deleted Import");
            }
        }
    }

    /// Deletes Services the agents made for Imports that no longer exist (deleted while no
    /// agent led). The API server's garbage collector does the same through the owner
    /// reference; this covers clusters (and emulators) where it did not run yet.
    pub async fn remove_orphans(&mut self, shared: &Shared) {
        let api: Api<Service> = Api::all(self.client.clone());
        let list = match api
            .list(&ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}")))
            .await
        {
            Ok(list) => list,
            Err(e) => {
                warn!(error = %e, "cannot list the Import Services");
                return;
            }
        };
        let seen = shared.seen();
        for service in list.items.iter().filter(|s| managed(s)) {
            let labels = service.metadata.labels.clone().unwrap_or_default();
            let (Some(name), Some(ns)) = (
                labels.get(LABEL_IMPORT_NAME),
                labels.get(LABEL_IMPORT_NAMESPACE),
            ) else {
                continue;
            };
            let key = ObjectKey {
                kind: Kind::Import,
                namespace: ns.clone(),
                name: name.clone(),
            };
            if !seen.contains_key(&key) {
                self.delete_service(&key).await;
            }
        }
    }

    /// One Event per object version and reason.
    async fn event(&mut self, key: &ObjectKey, seen: &Seen, reason: &str, note: &str) {
        let id = (key.clone(), format!("{}/{reason}", seen.resource_version));
        if self.evented.contains(&id) {
            return;
        }
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        match self.recorder.publish(&event, &seen.reference).await {
            Ok(()) => {
                self.count("event", true);
                self.evented.insert(id);
            }
            Err(e) => {
                self.count("event", false);
                debug!(object = %key, error = %e, "cannot record an event");
            }
        }
    }
}

/// Whether the agents made `service` (upstream's label says so).
fn managed(service: &Service) -> bool {
    service
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_MANAGED_BY))
        .is_some_and(|v| v == MANAGED_BY)
}

/// The Service of an Import: its name and namespace, `spec.port` to the agents'
/// `targetPort`, owned by the Import.
pub fn service_for(
    key: &ObjectKey,
    import: &Import,
    uid: &str,
    selector: &BTreeMap<String, String>,
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": key.name,
            "namespace": key.namespace,
            "labels": {
                LABEL_MANAGED_BY: MANAGED_BY,
                LABEL_IMPORT_NAME: key.name,
                LABEL_IMPORT_NAMESPACE: key.namespace,
            },
            "ownerReferences": [{
                "apiVersion": api::API_VERSION,
                "kind": "Import",
                "name": key.name,
                "uid": uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{
                "name": "tcp",
                "protocol": "TCP",
                "port": import.spec.port,
                "targetPort": import.spec.target_port,
            }],
            // A pod's connection goes to its own node's agent: no second hop, and the
            // agent sees the pod's own address for its attributes.
            "internalTrafficPolicy": "Local",
        },
    })
}

/// The writer's exact requests, against kube's mock service (no API server): paths, verbs,
/// patch types, field manager and bodies. What the API server then does with them (merge,
/// ownership, garbage collection) is the end-to-end tests' (tests/tests/kubernetes.rs).
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hyper::{Method, Request, Response};
    use k8s_openapi::api::core::v1::ObjectReference;
    use kube::client::Body;
    use tower_test::mock::{self, Handle};

    use super::*;
    use crate::k8s::Shared;

    /// One request the writer must make, and the answer it gets.
    struct Expect {
        method: Method,
        path: &'static str,
        query: &'static str,
        content_type: Option<&'static str>,
        status: u16,
        reply: Value,
    }

    fn expect(method: Method, path: &'static str, status: u16, reply: Value) -> Expect {
        Expect {
            method,
            path,
            query: "",
            content_type: None,
            status,
            reply,
        }
    }

    /// Answers the expected requests in order; returns their bodies.
    async fn serve(
        mut handle: Handle<Request<Body>, Response<Body>>,
        script: Vec<Expect>,
    ) -> Vec<Value> {
        let mut bodies = Vec::new();
        for e in script {
            let (req, send) = handle
                .next_request()
                .await
                .expect("the writer stopped early");
            assert_eq!(
                (req.method(), req.uri().path()),
                (&e.method, e.path),
                "request {}",
                req.uri()
            );
            let query = req.uri().query().unwrap_or_default().to_owned();
            assert_eq!(query, e.query, "query of {} {}", e.method, e.path);
            if let Some(ct) = e.content_type {
                assert_eq!(req.headers()["content-type"], ct, "{} {}", e.method, e.path);
            }
            let body = req.into_body().collect_bytes().await.unwrap();
            bodies.push(serde_json::from_slice(&body).unwrap_or(Value::Null));
            let reply = serde_json::to_vec(&e.reply).unwrap();
            send.send_response(
                Response::builder()
                    .status(e.status)
                    .header("content-type", "application/json")
                    .body(Body::from(reply))
                    .unwrap(),
            );
        }
        bodies
    }

    /// The status write of `kind` db at `path`: a merge patch on the status subresource.
    fn status_patch(path: &'static str, kind: &str) -> Expect {
        Expect {
            content_type: Some("application/merge-patch+json"),
            ..expect(
                Method::PATCH,
                path,
                200,
                json!({"apiVersion": api::API_VERSION, "kind": kind, "metadata": {"name": "db"}}),
            )
        }
    }

    fn options() -> Arc<Options> {
        Arc::new(Options {
            namespace: "clusterlink-system".into(),
            node: "node-1".into(),
            identity: "agent-abc".into(),
            agent_selector: BTreeMap::from([(
                "app.kubernetes.io/name".to_owned(),
                "clusterlink".to_owned(),
            )]),
            lease_name: "clusterlink-agent".into(),
            lease_duration: Duration::from_secs(15),
        })
    }

    fn import_key() -> ObjectKey {
        ObjectKey {
            kind: Kind::Import,
            namespace: "shop".into(),
            name: "db".into(),
        }
    }

    /// The agent's Import shop/db (listening on `target_port`), as the API server has it
    /// (`api_target_port`, no status yet).
    fn world(target_port: u16, api_target_port: u16) -> (Snapshot, Shared) {
        let object = Object::from_value(json!({
            "apiVersion": api::API_VERSION, "kind": "Import",
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"port": 5432, "targetPort": target_port, "sources": [
                {"peer": "b", "exportName": "db", "exportNamespace": "shop"}]},
        }))
        .unwrap();
        let mut object = object;
        object.status_mut().set_condition(
            api::IMPORT_TARGET_PORT_VALID,
            true,
            "Listening",
            "listening on port 40000",
        );
        let snapshot = Snapshot::build(BTreeMap::from([(import_key(), object)]));
        let shared = Shared::new("clusterlink-system", Arc::new(Metrics::default()));
        shared.observe(
            import_key(),
            Seen {
                reference: reference("Import", "db", "uid-1"),
                uid: "uid-1".into(),
                resource_version: "12".into(),
                status: api::Status::default(),
                target_port: Some(api_target_port),
                invalid: None,
                port_in_use: false,
            },
        );
        (snapshot, shared)
    }

    fn reference(kind: &str, name: &str, uid: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some(api::API_VERSION.into()),
            kind: Some(kind.into()),
            namespace: Some("shop".into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            ..Default::default()
        }
    }

    fn not_found() -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": "NotFound", "code": 404, "message": "not found"})
    }

    #[tokio::test]
    async fn an_import_gets_its_service_by_server_side_apply_and_its_status() {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let (snapshot, shared) = world(40000, 40000);
        let script = vec![
            expect(
                Method::GET,
                "/api/v1/namespaces/shop/services/db",
                404,
                not_found(),
            ),
            Expect {
                query: "&force=true&fieldManager=clusterlink-agent",
                content_type: Some("application/apply-patch+yaml"),
                ..expect(
                    Method::PATCH,
                    "/api/v1/namespaces/shop/services/db",
                    200,
                    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"}}),
                )
            },
            status_patch(
                "/apis/clusterlink.net/v1alpha1/namespaces/shop/imports/db/status",
                "Import",
            ),
        ];
        let server = tokio::spawn(serve(handle, script));
        let mut writer = Writer::new(client, options(), Arc::new(Metrics::default()));
        writer.reconcile(&snapshot, &shared).await;
        let bodies = server.await.unwrap();
        let service = &bodies[1];
        assert_eq!(service["metadata"]["labels"][LABEL_MANAGED_BY], MANAGED_BY);
        assert_eq!(service["metadata"]["labels"][LABEL_IMPORT_NAME], "db");
        assert_eq!(
            service["metadata"]["labels"][LABEL_IMPORT_NAMESPACE],
            "shop"
        );
        assert_eq!(
            service["metadata"]["ownerReferences"][0],
            json!({"apiVersion": "clusterlink.net/v1alpha1", "kind": "Import", "name": "db",
                   "uid": "uid-1", "controller": true, "blockOwnerDeletion": true})
        );
        assert_eq!(
            service["spec"]["ports"],
            json!([{"name": "tcp", "protocol": "TCP", "port": 5432, "targetPort": 40000}])
        );
        assert_eq!(
            service["spec"]["selector"],
            json!({"app.kubernetes.io/name": "clusterlink"})
        );
        assert_eq!(service["spec"]["internalTrafficPolicy"], "Local");
        let status = &bodies[2]["status"];
        assert_eq!(
            status["conditions"][0]["type"],
            api::IMPORT_TARGET_PORT_VALID
        );
        assert_eq!(status["conditions"][0]["status"], "True");
        assert!(
            status.get("labels").is_none(),
            "labels are a Peer's: {status}"
        );

        // With the status written, a second pass writes nothing: the mock's server is gone,
        // so a request would fail and be counted.
        let mut seen = shared.seen().remove(&import_key()).unwrap();
        seen.status = writer.desired_status(&import_key(), &seen, &snapshot);
        shared.observe(import_key(), seen);
        let before = writer.metrics.encode();
        writer.reconcile(&snapshot, &shared).await;
        assert_eq!(
            before,
            writer.metrics.encode(),
            "no write on an unchanged world"
        );
    }

    /// An Import refused because another socket holds its port gets reason `PortInUse` on
    /// `ImportTargetPortValid`; refused for its spec, the same message gets `InvalidSpec`.
    #[tokio::test]
    async fn a_port_in_use_is_a_reason_of_its_own() {
        let (svc, _handle) = mock::pair::<Request<Body>, Response<Body>>();
        let writer = Writer::new(
            Client::new(svc, "default"),
            options(),
            Arc::new(Metrics::default()),
        );
        let (_, shared) = world(40000, 40000);
        let message = "Import shop/db: cannot listen on port 40000: Address already in use";
        for (port_in_use, type_, reason) in [
            (true, api::IMPORT_TARGET_PORT_VALID, "PortInUse"),
            (false, api::IMPORT_SERVICE_VALID, "InvalidSpec"),
        ] {
            shared.mark_refused(&import_key(), message.into(), port_in_use);
            let seen = shared.seen().remove(&import_key()).unwrap();
            let status = writer.desired_status(&import_key(), &seen, &Snapshot::default());
            let condition = status.condition(type_).expect(type_);
            assert_eq!(
                (condition.status.as_str(), condition.reason.as_str()),
                ("False", reason)
            );
            assert_eq!(condition.message, message);
        }
    }

    #[tokio::test]
    async fn a_service_the_agents_did_not_make_is_left_alone_and_reported() {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let (snapshot, shared) = world(40000, 40000);
        let theirs = json!({"apiVersion": "v1", "kind": "Service",
                            "metadata": {"name": "db", "namespace": "shop",
                                         "labels": {"app": "db"}},
                            "spec": {"ports": [{"port": 5432}]}});
        let script = vec![
            expect(
                Method::GET,
                "/api/v1/namespaces/shop/services/db",
                200,
                theirs,
            ),
            expect(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/shop/events",
                201,
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
                       "metadata": {"name": "e"}, "eventTime": null}),
            ),
            status_patch(
                "/apis/clusterlink.net/v1alpha1/namespaces/shop/imports/db/status",
                "Import",
            ),
        ];
        let server = tokio::spawn(serve(handle, script));
        let mut writer = Writer::new(client, options(), Arc::new(Metrics::default()));
        writer.reconcile(&snapshot, &shared).await;
        let bodies = server.await.unwrap();
        assert_eq!(bodies[1]["reason"], REASON_SERVICE_CONFLICT);
        assert_eq!(bodies[1]["type"], "Warning");
        let conditions = bodies[2]["status"]["conditions"].as_array().unwrap();
        let service_valid = conditions
            .iter()
            .find(|c| c["type"] == api::IMPORT_SERVICE_VALID)
            .unwrap();
        assert_eq!(service_valid["status"], "False");
        assert_eq!(service_valid["reason"], REASON_SERVICE_CONFLICT);
        assert!(service_valid["message"]
            .as_str()
            .unwrap()
            .contains("did not create"));
    }

    #[tokio::test]
    async fn a_leased_port_is_written_back_before_any_service() {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        // The agent leased 40000; the API server's spec has no targetPort yet.
        let (snapshot, shared) = world(40000, 0);
        let script = vec![
            Expect {
                query: "&fieldManager=clusterlink-agent",
                content_type: Some("application/merge-patch+json"),
                ..expect(
                    Method::PATCH,
                    "/apis/clusterlink.net/v1alpha1/namespaces/shop/imports/db",
                    200,
                    json!({"apiVersion": "clusterlink.net/v1alpha1", "kind": "Import",
                           "metadata": {"name": "db"}}),
                )
            },
            status_patch(
                "/apis/clusterlink.net/v1alpha1/namespaces/shop/imports/db/status",
                "Import",
            ),
        ];
        let server = tokio::spawn(serve(handle, script));
        let mut writer = Writer::new(client, options(), Arc::new(Metrics::default()));
        writer.reconcile(&snapshot, &shared).await;
        let bodies = server.await.unwrap();
        assert_eq!(bodies[0], json!({"spec": {"targetPort": 40000}}));
    }

    #[tokio::test]
    async fn an_invalid_object_gets_a_condition_and_one_event() {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let snapshot = Snapshot::default();
        let shared = Shared::new("clusterlink-system", Arc::new(Metrics::default()));
        let key = ObjectKey {
            kind: Kind::Export,
            namespace: "shop".into(),
            name: "db".into(),
        };
        shared.observe(
            key.clone(),
            Seen {
                reference: reference("Export", "db", "uid-2"),
                uid: "uid-2".into(),
                resource_version: "3".into(),
                status: api::Status::default(),
                target_port: None,
                invalid: Some("Export shop/db: spec.port: must be 1-65535".into()),
                port_in_use: false,
            },
        );
        assert_eq!(
            shared
                .metrics
                .encode()
                .lines()
                .find(|l| l.starts_with("clink_kubernetes_invalid_objects ")),
            Some("clink_kubernetes_invalid_objects 1")
        );
        let script = vec![
            expect(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/shop/events",
                201,
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
                       "metadata": {"name": "e"}, "eventTime": null}),
            ),
            status_patch(
                "/apis/clusterlink.net/v1alpha1/namespaces/shop/exports/db/status",
                "Export",
            ),
        ];
        let server = tokio::spawn(serve(handle, script));
        let mut writer = Writer::new(client, options(), Arc::new(Metrics::default()));
        writer.reconcile(&snapshot, &shared).await;
        let bodies = server.await.unwrap();
        assert_eq!(bodies[0]["reason"], REASON_INVALID);
        assert!(bodies[0]["note"].as_str().unwrap().contains("spec.port"));
        let c = &bodies[1]["status"]["conditions"][0];
        assert_eq!(
            (&c["type"], &c["status"], &c["reason"]),
            (
                &json!(api::EXPORT_VALID),
                &json!("False"),
                &json!(REASON_INVALID)
            )
        );
    }
}
