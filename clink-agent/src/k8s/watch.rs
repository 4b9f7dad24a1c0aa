//! Every agent's side of Kubernetes mode: watches of the five kinds (and of this node's
//! pods) turned into the agent's own apply and delete, through the same validation and the
//! same policy decision point as standalone mode.
//!
//! Objects are watched untyped ([`DynamicObject`]) and converted one by one, so that one
//! object the types refuse cannot stop the others from loading: it is recorded as invalid
//! (the leader gives it a condition and an Event) and the rest serve. An invalid change to an
//! object that was valid leaves the last valid version in force. After a break (the API
//! server unreachable, a watch expired) the watcher relists with backoff; the agent serves the
//! objects it has meanwhile, then applies the relist whole and deletes what is gone.
//!
//! An Import whose `targetPort` another socket on the node holds (`EADDRINUSE`: often one
//! of the node's outgoing connections, given that port from the ephemeral range) is not
//! invalid, only early: its watch applies it again every [`BUSY_RETRY`] until it listens,
//! changes or goes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    pin::pin,
    sync::Arc,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::{
    api::{Api, ApiResource, DynamicObject},
    runtime::{
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Client, Resource as _, ResourceExt as _,
};
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use super::{crd, PodCache, Seen, Shared};
use crate::{
    agent::{Agent, ChangeError, BUSY_RETRY},
    api::{self, ApiError, Kind, Object, ObjectKey},
    kernel::sockmap::SERVICE_IP_ANNOTATION,
    metrics::ResourceLabels,
};

/// The API resource of a kind, as the CRDs under `charts/clusterlink/crds/` define it.
pub fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Peer => ApiResource::erase::<crd::Peer>(&()),
        Kind::Export => ApiResource::erase::<crd::Export>(&()),
        Kind::Import => ApiResource::erase::<crd::Import>(&()),
        Kind::AccessPolicy => ApiResource::erase::<crd::AccessPolicy>(&()),
        Kind::PrivilegedAccessPolicy => ApiResource::erase::<crd::PrivilegedAccessPolicy>(&()),
    }
}

/// `clusterlink.net/<plural>`, as metrics and logs name a resource.
pub fn resource_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Peer => "clusterlink.net/peers",
        Kind::Export => "clusterlink.net/exports",
        Kind::Import => "clusterlink.net/imports",
        Kind::AccessPolicy => "clusterlink.net/accesspolicies",
        Kind::PrivilegedAccessPolicy => "clusterlink.net/privilegedaccesspolicies",
    }
}

/// Annotations the agent reads; kubectl's own (last-applied-configuration, which repeats
/// the whole object) and every other tool's are left out of the agent's copy.
const KEPT_ANNOTATIONS: &str = "clusterlink.net/";

/// The agent's object for a custom resource: its spec under the standalone model's
/// validation, with the name, namespace, labels and ClusterLink annotations of its metadata.
/// An Export without `host` targets the Service of its name in its namespace.
pub fn to_object(kind: Kind, object: &DynamicObject) -> Result<Object, ApiError> {
    let name = object.name_any();
    let namespace = object.namespace();
    let mut spec = object.data.get("spec").cloned().unwrap_or(Value::Null);
    if kind == Kind::Export {
        if let (Some(spec), Some(ns)) = (spec.as_object_mut(), &namespace) {
            let empty = spec
                .get("host")
                .and_then(Value::as_str)
                .is_none_or(|h| h.trim().is_empty());
            if empty {
                spec.insert("host".to_owned(), Value::String(format!("{name}.{ns}")));
            }
        }
    }
    let annotations: BTreeMap<String, String> = object
        .annotations()
        .iter()
        .filter(|(k, _)| k.starts_with(KEPT_ANNOTATIONS))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut metadata = json!({ "name": name, "labels": object.labels() });
    if kind.namespaced() {
        metadata["namespace"] = json!(namespace.unwrap_or_default());
    }
    if !annotations.is_empty() {
        metadata["annotations"] = json!(annotations);
    }
    Object::from_value(json!({
        "apiVersion": api::API_VERSION,
        "kind": kind.as_str(),
        "metadata": metadata,
        "spec": spec,
    }))
}

/// The key of a watched object (valid or not).
fn key_of(kind: Kind, object: &DynamicObject) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: if kind.namespaced() {
            object.namespace().unwrap_or_default()
        } else {
            String::new()
        },
        name: object.name_any(),
    }
}

/// What the leader needs to know of an object as the API server has it.
fn seen(kind: Kind, object: &DynamicObject, invalid: Option<String>) -> Seen {
    let status = object
        .data
        .get("status")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .unwrap_or_default();
    let target_port = (kind == Kind::Import).then(|| {
        object
            .data
            .pointer("/spec/targetPort")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(0)
    });
    Seen {
        reference: object.object_ref(&api_resource(kind)),
        uid: object.uid().unwrap_or_default(),
        resource_version: object.resource_version().unwrap_or_default(),
        status,
        target_port,
        invalid,
        port_in_use: false,
    }
}

/// Keeps the agent's objects of `kind` equal to the API server's until the task is dropped.
pub async fn sync_kind(agent: Arc<Agent>, client: Client, kind: Kind, shared: Arc<Shared>) {
    let ar = api_resource(kind);
    let api: Api<DynamicObject> = match kind {
        // Peers are the agent's own configuration: only those of its namespace count.
        Kind::Peer => Api::namespaced_with(client, &shared.namespace, &ar),
        _ => Api::all_with(client, &ar),
    };
    let resource = resource_name(kind);
    let up = watch_up(&shared, resource);
    let mut events = pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
    let mut relist: Vec<DynamicObject> = Vec::new();
    let mut failing = false;
    // Objects whose port was in use, to apply again; the newest version of each, since an
    // event for it replaces or removes it.
    let mut busy: BTreeMap<ObjectKey, DynamicObject> = BTreeMap::new();
    let mut retry = tokio::time::interval(BUSY_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            event = events.next() => match event {
                Some(event) => event,
                None => break,
            },
            _ = retry.tick(), if !busy.is_empty() => {
                for (key, object) in std::mem::take(&mut busy) {
                    if let Some(object) = apply(&agent, kind, object, &shared, Attempt::Retry).await {
                        busy.insert(key, object);
                    }
                }
                continue;
            }
        };
        // A newer version or a delete replaces what was to be applied again.
        let was_busy = match &event {
            Ok(Event::Apply(object) | Event::Delete(object)) => {
                busy.remove(&key_of(kind, object)).is_some()
            }
            _ => false,
        };
        match event {
            Ok(Event::Init) => relist.clear(),
            Ok(Event::InitApply(object)) => relist.push(object),
            Ok(Event::InitDone) => {
                let objects = std::mem::take(&mut relist);
                let count = objects.len();
                busy = resync(&agent, kind, objects, &shared).await;
                retry.reset();
                up.set(1);
                if failing {
                    info!(
                        resource,
                        objects = count,
                        "back in sync with the API server"
                    );
                } else {
                    info!(resource, objects = count, "synced from the API server");
                }
                failing = false;
            }
            Ok(Event::Apply(object)) => {
                answered(&up, &mut failing, resource);
                let attempt = if was_busy {
                    Attempt::KnownBusy
                } else {
                    Attempt::New
                };
                if let Some(object) = apply(&agent, kind, object, &shared, attempt).await {
                    busy.insert(key_of(kind, &object), object);
                    if !was_busy {
                        retry.reset();
                    }
                }
            }
            Ok(Event::Delete(object)) => {
                answered(&up, &mut failing, resource);
                delete(&agent, kind, &object, &shared).await;
            }
            Err(e) => {
                up.set(0);
                if !failing {
                    warn!(
                        resource,
                        "{}; serving the objects last seen until it answers again",
                        explain(&e, resource)
                    );
                }
                failing = true;
            }
        }
    }
}

/// `clink_kubernetes_watch_up` of one resource.
fn watch_up(shared: &Shared, resource: &'static str) -> prometheus_client::metrics::gauge::Gauge {
    shared
        .metrics
        .kubernetes_watch_up
        .get_or_create(&ResourceLabels { resource })
        .clone()
}

/// An event after a failure: the watch resumed where it was (no relist needed).
fn answered(up: &prometheus_client::metrics::gauge::Gauge, failing: &mut bool, resource: &str) {
    if std::mem::take(failing) {
        up.set(1);
        info!(resource, "the API server answers again; watch resumed");
    }
}

/// A watch failure in words an operator acts on: a 403 names the verb and resource the
/// ServiceAccount lacks.
pub(super) fn explain(e: &watcher::Error, resource: &str) -> String {
    let (verb, source) = match e {
        watcher::Error::InitialListFailed(s) => ("list", s),
        watcher::Error::WatchStartFailed(s) | watcher::Error::WatchFailed(s) => ("watch", s),
        other => return format!("cannot watch {resource}: {other}"),
    };
    match source {
        kube::Error::Api(status) if status.code == 403 => format!(
            "missing RBAC: the agent's ServiceAccount may not {verb} {resource} ({}); the \
             chart's ClusterRole grants it",
            status.message
        ),
        other => format!("cannot {verb} {resource}: {other}"),
    }
}

/// [`to_object`], and for an Import without the service-address annotation its Service's
/// cluster IPs as that annotation.
fn to_agent_object(
    kind: Kind,
    object: &DynamicObject,
    shared: &Shared,
) -> Result<Object, ApiError> {
    let mut converted = to_object(kind, object)?;
    if let Object::Import(import) = &mut converted {
        let key = key_of(kind, object);
        let mut ips = shared.service_ips.lock().unwrap_or_else(|e| e.into_inner());
        if import
            .metadata
            .annotations
            .contains_key(SERVICE_IP_ANNOTATION)
        {
            ips.user_annotated.insert(key);
        } else {
            ips.user_annotated.remove(&key);
            if let Some(cluster_ips) = ips.by_import.get(&key) {
                import
                    .metadata
                    .annotations
                    .insert(SERVICE_IP_ANNOTATION.to_owned(), cluster_ips.clone());
            }
        }
    }
    Ok(converted)
}

/// The one warning about an object whose port is in use.
fn warn_busy(key: &ObjectKey, e: &ChangeError) {
    warn!(
        object = %key,
        error = %e,
        "port in use on this node; applying it again every {}s until it is free \
         (the last valid version, if any, stays in force)",
        BUSY_RETRY.as_secs()
    );
}

/// What is known of an object [`apply`] gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attempt {
    /// A version not applied before.
    New,
    /// A new version of an object whose port was in use (a status write, a change): what it
    /// is now is recorded, but a port still in use is not warned about again.
    KnownBusy,
    /// The same version again, on [`BUSY_RETRY`]: only a different outcome is recorded.
    Retry,
}

/// Applies one watched object. Returns it if its port is in use, to be applied again.
async fn apply(
    agent: &Arc<Agent>,
    kind: Kind,
    object: DynamicObject,
    shared: &Shared,
    attempt: Attempt,
) -> Option<DynamicObject> {
    let key = key_of(kind, &object);
    let result = match to_agent_object(kind, &object, shared) {
        Ok(o) => agent.apply(vec![o]).await.map(drop),
        Err(e) => Err(ChangeError::Invalid(e)),
    };
    let (invalid, busy) = match result {
        Ok(()) => {
            if attempt != Attempt::New {
                info!(object = %key, "applied: its port is free now");
            }
            (None, false)
        }
        Err(ChangeError::Busy(_)) if attempt == Attempt::Retry => return Some(object),
        Err(e @ ChangeError::Busy(_)) => {
            if attempt == Attempt::New {
                warn_busy(&key, &e);
            }
            (Some(e.to_string()), true)
        }
        Err(e) => {
            warn!(object = %key, error = %e, "invalid; the last valid version (if any) stays in force");
            (Some(e.to_string()), false)
        }
    };
    let seen = Seen {
        port_in_use: busy,
        ..seen(kind, &object, invalid)
    };
    shared.observe(key, seen);
    busy.then_some(object)
}

async fn delete(agent: &Arc<Agent>, kind: Kind, object: &DynamicObject, shared: &Shared) {
    let key = key_of(kind, object);
    shared.forget(&key);
    match agent.delete(&key).await {
        Ok(()) | Err(ChangeError::NotFound(_)) => {}
        Err(e) => warn!(object = %key, error = %e, "cannot delete"),
    }
}

/// Makes the agent's objects of `kind` the relisted ones: valid ones applied in one batch
/// (one by one if the batch is refused, so one bad object does not hold up the rest), and
/// what the API server no longer has deleted. Returns those whose port was in use.
async fn resync(
    agent: &Arc<Agent>,
    kind: Kind,
    objects: Vec<DynamicObject>,
    shared: &Shared,
) -> BTreeMap<ObjectKey, DynamicObject> {
    let mut valid = Vec::new();
    let mut seen_now = Vec::new();
    let mut watched = BTreeMap::new();
    for object in &objects {
        let key = key_of(kind, object);
        match to_agent_object(kind, object, shared) {
            Ok(o) => {
                valid.push(o);
                seen_now.push((key.clone(), seen(kind, object, None)));
                watched.insert(key, object);
            }
            Err(e) => {
                warn!(object = %key, error = %e, "invalid; not served");
                seen_now.push((key, seen(kind, object, Some(e.to_string()))));
            }
        }
    }
    let listed: BTreeSet<ObjectKey> = seen_now.iter().map(|(k, _)| k.clone()).collect();
    shared.replace_kind(kind, seen_now);
    let mut busy = BTreeMap::new();
    if let Err(e) = agent.apply(valid.clone()).await {
        debug!(error = %e, "the relist as one apply was refused; applying one by one");
        for object in valid {
            let key = object.key();
            match agent.apply(vec![object]).await {
                Ok(_) => {}
                Err(e @ ChangeError::Busy(_)) => {
                    warn_busy(&key, &e);
                    shared.mark_refused(&key, e.to_string(), true);
                    if let Some(object) = watched.get(&key) {
                        busy.insert(key, (*object).clone());
                    }
                }
                Err(e) => {
                    warn!(object = %key, error = %e, "invalid; not served");
                    shared.mark_refused(&key, e.to_string(), false);
                }
            }
        }
    }
    let gone: Vec<ObjectKey> = agent
        .snapshot()
        .objects
        .keys()
        .filter(|k| k.kind == kind && !listed.contains(k))
        .cloned()
        .collect();
    for key in gone {
        match agent.delete(&key).await {
            Ok(()) => info!(object = %key, "deleted while the watch was down"),
            Err(ChangeError::NotFound(_)) => {}
            Err(e) => warn!(object = %key, error = %e, "cannot delete"),
        }
    }
    busy
}

/// The Import a Service the agents keep belongs to, and its cluster IPs (comma-separated;
/// `None` for a headless Service or one without an address yet).
fn service_of_import(service: &Service) -> Option<(ObjectKey, Option<String>)> {
    let labels = service.metadata.labels.as_ref()?;
    let key = ObjectKey {
        kind: Kind::Import,
        namespace: labels.get(super::LABEL_IMPORT_NAMESPACE)?.clone(),
        name: labels.get(super::LABEL_IMPORT_NAME)?.clone(),
    };
    let spec = service.spec.as_ref();
    let mut ips: Vec<String> = spec
        .and_then(|s| s.cluster_ips.clone())
        .or_else(|| spec.and_then(|s| s.cluster_ip.clone()).map(|ip| vec![ip]))
        .unwrap_or_default();
    ips.retain(|ip| ip.parse::<std::net::IpAddr>().is_ok());
    Some((key, (!ips.is_empty()).then(|| ips.join(","))))
}

/// Keeps each Import's service addresses (what the connect hooks send to the agent on the
/// kernel data paths) equal to the cluster IPs of the Service the leader keeps for it, so a
/// pod's connection to the Service reaches its node's agent without kube-proxy; an Import
/// whose user wrote the annotation keeps theirs. Runs on every agent until dropped.
pub async fn sync_services(agent: Arc<Agent>, client: Client, shared: Arc<Shared>) {
    let api: Api<Service> = Api::all(client);
    let resource = "services";
    let config = watcher::Config::default().labels(&format!(
        "{}={}",
        super::LABEL_MANAGED_BY,
        super::MANAGED_BY
    ));
    let up = watch_up(&shared, resource);
    let mut events = pin!(watcher::watcher(api, config).default_backoff());
    let mut relist: HashMap<ObjectKey, String> = HashMap::new();
    let mut failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => relist.clear(),
            Ok(Event::InitApply(service)) => {
                if let Some((key, Some(ips))) = service_of_import(&service) {
                    relist.insert(key, ips);
                }
            }
            Ok(Event::InitDone) => {
                let now = std::mem::take(&mut relist);
                let changed: Vec<ObjectKey> = {
                    let mut ips = shared.service_ips.lock().unwrap_or_else(|e| e.into_inner());
                    let mut keys: BTreeSet<ObjectKey> = ips.by_import.keys().cloned().collect();
                    keys.extend(now.keys().cloned());
                    let changed = keys
                        .into_iter()
                        .filter(|k| ips.by_import.get(k) != now.get(k))
                        .collect();
                    ips.by_import = now;
                    changed
                };
                up.set(1);
                failing = false;
                for key in changed {
                    refresh_service_ips(&agent, &shared, &key).await;
                }
            }
            Ok(Event::Apply(service)) => {
                answered(&up, &mut failing, resource);
                if let Some((key, ips)) = service_of_import(&service) {
                    if set_service_ips(&shared, &key, ips) {
                        refresh_service_ips(&agent, &shared, &key).await;
                    }
                }
            }
            Ok(Event::Delete(service)) => {
                answered(&up, &mut failing, resource);
                if let Some((key, _)) = service_of_import(&service) {
                    if set_service_ips(&shared, &key, None) {
                        refresh_service_ips(&agent, &shared, &key).await;
                    }
                }
            }
            Err(e) => {
                up.set(0);
                if !failing {
                    warn!(
                        resource,
                        "{}; Imports keep the service addresses last seen",
                        explain(&e, resource)
                    );
                }
                failing = true;
            }
        }
    }
}

/// Records an Import's Service addresses; whether the Import's copy must follow (they
/// changed, and its user did not annotate it).
fn set_service_ips(shared: &Shared, key: &ObjectKey, ips: Option<String>) -> bool {
    let mut all = shared.service_ips.lock().unwrap_or_else(|e| e.into_inner());
    let changed = match ips {
        Some(ips) => all.by_import.insert(key.clone(), ips.clone()) != Some(ips),
        None => all.by_import.remove(key).is_some(),
    };
    changed && !all.user_annotated.contains(key)
}

/// Re-applies the agent's copy of Import `key` with its Service's addresses as its service
/// addresses (none when the Service is gone), unless its user annotated it.
async fn refresh_service_ips(agent: &Arc<Agent>, shared: &Shared, key: &ObjectKey) {
    let wanted = {
        let ips = shared.service_ips.lock().unwrap_or_else(|e| e.into_inner());
        if ips.user_annotated.contains(key) {
            return;
        }
        ips.by_import.get(key).cloned()
    };
    let Some(Object::Import(import)) = agent.snapshot().objects.get(key).cloned() else {
        return;
    };
    let mut import = import;
    let annotations = &mut import.metadata.annotations;
    if annotations.get(SERVICE_IP_ANNOTATION) == wanted.as_ref() {
        return;
    }
    match &wanted {
        Some(ips) => annotations.insert(SERVICE_IP_ANNOTATION.to_owned(), ips.clone()),
        None => annotations.remove(SERVICE_IP_ANNOTATION),
    };
    match agent.apply(vec![Object::Import(import)]).await {
        Ok(_) => info!(
            import = %key,
            service_ips = wanted.as_deref().unwrap_or("none"),
            "service addresses of the Import follow its Service"
        ),
        Err(e) => warn!(import = %key, error = %e, "cannot set the Import's service addresses"),
    }
}

/// Keeps `pods` equal to the API server's pods of this node until the task is dropped.
pub async fn sync_pods(client: Client, pods: Arc<PodCache>, shared: Arc<Shared>) {
    let api: Api<Pod> = Api::all(client);
    let resource = "pods";
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", pods.node()));
    let up = watch_up(&shared, resource);
    let mut events = pin!(watcher::watcher(api, config).default_backoff());
    let mut relist: Vec<Pod> = Vec::new();
    let mut failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => relist.clear(),
            Ok(Event::InitApply(pod)) => relist.push(pod),
            Ok(Event::InitDone) => {
                pods.replace(&std::mem::take(&mut relist));
                up.set(1);
                info!(
                    node = pods.node(),
                    addresses = pods.len(),
                    "pods of this node synced"
                );
                failing = false;
            }
            Ok(Event::Apply(pod)) => {
                answered(&up, &mut failing, resource);
                pods.apply(&pod);
            }
            Ok(Event::Delete(pod)) => {
                answered(&up, &mut failing, resource);
                pods.delete(&pod);
            }
            Err(e) => {
                up.set(0);
                if !failing {
                    warn!(
                        resource,
                        "{}; client attributes come from the pods last seen",
                        explain(&e, resource)
                    );
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(kind: Kind, value: Value) -> DynamicObject {
        let mut v = value;
        v["apiVersion"] = json!(api::API_VERSION);
        v["kind"] = json!(kind.as_str());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_custom_resource_becomes_the_agents_object() {
        let import = dynamic(
            Kind::Import,
            json!({
                "metadata": {
                    "name": "db", "namespace": "shop", "uid": "u-1", "resourceVersion": "7",
                    "labels": {"app": "db"},
                    "annotations": {
                        "kubectl.kubernetes.io/last-applied-configuration": "{...}",
                        "clusterlink.net/service-ip": "10.96.0.10",
                    },
                    "managedFields": [{"manager": "kubectl"}],
                },
                "spec": {"port": 5432, "sources": [
                    {"peer": "b", "exportName": "db", "exportNamespace": "shop"}]},
                "status": {"conditions": [{"type": "ImportServiceValid", "status": "True",
                    "reason": "Valid"}]},
            }),
        );
        let Object::Import(i) = to_object(Kind::Import, &import).unwrap() else {
            panic!("not an Import")
        };
        assert_eq!(i.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(i.metadata.labels["app"], "db");
        assert_eq!(
            i.metadata.annotations.keys().collect::<Vec<_>>(),
            ["clusterlink.net/service-ip"]
        );
        assert_eq!(i.spec.port, 5432);
        assert!(i.status.is_empty(), "status is observed, never taken");
        let s = seen(Kind::Import, &import, None);
        assert_eq!((s.uid.as_str(), s.resource_version.as_str()), ("u-1", "7"));
        assert_eq!(s.target_port, Some(0));
        assert_eq!(s.status.conditions[0].type_, "ImportServiceValid");
    }

    #[test]
    fn an_imports_service_gives_its_cluster_ips() {
        let service = |labels: Value, spec: Value| -> Service {
            serde_json::from_value(json!({
                "metadata": {"name": "db", "namespace": "shop", "labels": labels},
                "spec": spec,
            }))
            .unwrap()
        };
        let ours = json!({
            "app.kubernetes.io/managed-by": "clusterlink.net",
            "clusterlink.net/import-name": "db",
            "clusterlink.net/import-namespace": "shop",
        });
        let key = ObjectKey {
            kind: Kind::Import,
            namespace: "shop".into(),
            name: "db".into(),
        };
        let dual = service(
            ours.clone(),
            json!({"clusterIP": "10.96.0.7", "clusterIPs": ["10.96.0.7", "fd00::7"]}),
        );
        assert_eq!(
            service_of_import(&dual),
            Some((key.clone(), Some("10.96.0.7,fd00::7".into())))
        );
        let single = service(ours.clone(), json!({"clusterIP": "10.96.0.8"}));
        assert_eq!(
            service_of_import(&single),
            Some((key.clone(), Some("10.96.0.8".into())))
        );
        // Headless, or not yet given an address: no service address.
        let headless = service(ours, json!({"clusterIP": "None", "clusterIPs": ["None"]}));
        assert_eq!(service_of_import(&headless), Some((key, None)));
        // Not one of the agents' Services.
        let other = service(json!({"app": "db"}), json!({"clusterIP": "10.96.0.9"}));
        assert_eq!(service_of_import(&other), None);
    }

    #[test]
    fn a_forbidden_watch_names_the_verb_and_resource() {
        let forbidden = |code| {
            kube::Error::Api(Box::new(
                serde_json::from_value(json!({
                    "status": "Failure", "code": code, "reason": "Forbidden",
                    "message": "imports.clusterlink.net is forbidden: User \"system:serviceaccount:cl:agent\" cannot list resource",
                }))
                .unwrap(),
            ))
        };
        let list = explain(
            &watcher::Error::InitialListFailed(forbidden(403)),
            "clusterlink.net/imports",
        );
        assert!(
            list.starts_with(
                "missing RBAC: the agent's ServiceAccount may not list clusterlink.net/imports"
            ),
            "{list}"
        );
        assert!(list.contains("system:serviceaccount:cl:agent"), "{list}");
        let watch = explain(&watcher::Error::WatchStartFailed(forbidden(403)), "pods");
        assert!(watch.contains("may not watch pods"), "{watch}");
        let other = explain(&watcher::Error::InitialListFailed(forbidden(500)), "pods");
        assert!(other.starts_with("cannot list pods"), "{other}");
    }

    #[test]
    fn an_export_without_host_targets_its_service() {
        let export = dynamic(
            Kind::Export,
            json!({"metadata": {"name": "db", "namespace": "shop"}, "spec": {"port": 5432}}),
        );
        let Object::Export(e) = to_object(Kind::Export, &export).unwrap() else {
            panic!("not an Export")
        };
        assert_eq!(e.spec.host, "db.shop");
    }

    #[test]
    fn a_bad_resource_is_refused_with_the_field() {
        let bad = dynamic(
            Kind::Import,
            json!({"metadata": {"name": "db", "namespace": "shop"},
                   "spec": {"port": 0, "sources": []}}),
        );
        let e = to_object(Kind::Import, &bad).unwrap_err().to_string();
        assert!(e.contains("spec"), "{e}");
        let unknown = dynamic(
            Kind::Peer,
            json!({"metadata": {"name": "b", "namespace": "cl"},
                   "spec": {"gateways": [{"host": "x", "port": 443}], "colour": "red"}}),
        );
        assert!(to_object(Kind::Peer, &unknown).is_err());
        let policy = dynamic(
            Kind::PrivilegedAccessPolicy,
            json!({"metadata": {"name": "deny-all"},
                   "spec": {"action": "deny", "from": [{"workloadSelector": {}}],
                            "to": [{"workloadSelector": {}}]}}),
        );
        let o = to_object(Kind::PrivilegedAccessPolicy, &policy).unwrap();
        assert_eq!(o.key().namespace, "");
    }
}
