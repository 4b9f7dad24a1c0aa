//! The pods of this node by IP, for client attributes: a connection to an Import's listener
//! from a pod's address is the pod's, and policies see its namespace, service account and
//! labels under the names upstream ClusterLink uses (`client.clusterlink.net/namespace`,
//! `.../service-account`, `.../labels.<key>`). Host-network pods share the node's address and
//! get nothing: their connections cannot be told apart from the node's own.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::RwLock,
};

use k8s_openapi::api::core::v1::Pod;
use tracing::debug;

use crate::policy::{attr, insert_labels, Attributes};

/// One pod's key and what its clients are.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    pod: String,
    attributes: Attributes,
}

#[derive(Default)]
struct Inner {
    by_ip: HashMap<IpAddr, Entry>,
    /// The addresses each pod (`namespace/name`) holds, to drop them when it goes.
    by_pod: HashMap<String, Vec<IpAddr>>,
}

/// This node's pods, kept by the pod watcher ([`super::watch`]).
pub struct PodCache {
    node: String,
    inner: RwLock<Inner>,
}

impl PodCache {
    /// An empty cache for the pods of `node`.
    pub fn new(node: &str) -> PodCache {
        PodCache {
            node: node.to_owned(),
            inner: RwLock::default(),
        }
    }

    /// The node whose pods this cache holds.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The attributes of the pod at `ip`; empty when no pod of this node has it.
    pub fn attributes(&self, ip: IpAddr) -> Attributes {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .by_ip
            .get(&ip)
            .map(|e| e.attributes.clone())
            .unwrap_or_default()
    }

    /// The number of pod addresses known.
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_ip
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds, changes or removes `pod` as it now is.
    pub fn apply(&self, pod: &Pod) {
        let Some(key) = pod_key(pod) else { return };
        let entries = self.entries(pod, &key);
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        remove(&mut inner, &key);
        insert(&mut inner, key, entries);
    }

    /// Forgets `pod`.
    pub fn delete(&self, pod: &Pod) {
        let Some(key) = pod_key(pod) else { return };
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        remove(&mut inner, &key);
    }

    /// Replaces everything with `pods` (a watcher's complete relist).
    pub fn replace(&self, pods: &[Pod]) {
        let mut next = Inner::default();
        for pod in pods {
            let Some(key) = pod_key(pod) else { continue };
            let entries = self.entries(pod, &key);
            insert(&mut next, key, entries);
        }
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = next;
    }

    /// The addresses `pod` answers for and its attributes; none for pods of other nodes
    /// (the watch's field selector should exclude them; this holds even if it did not),
    /// host-network pods and pods that have finished (their addresses are reused).
    fn entries(&self, pod: &Pod, key: &str) -> Vec<(IpAddr, Entry)> {
        let Some(spec) = &pod.spec else {
            return Vec::new();
        };
        if spec.node_name.as_deref() != Some(self.node.as_str()) {
            debug!(pod = key, node = ?spec.node_name, "pod of another node ignored");
            return Vec::new();
        }
        if spec.host_network == Some(true) {
            return Vec::new();
        }
        let Some(status) = &pod.status else {
            return Vec::new();
        };
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return Vec::new();
        }
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if let Some(ip) = status.pod_ip.as_ref().and_then(|ip| ip.parse().ok()) {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        let attributes = attributes(pod);
        ips.into_iter()
            .map(|ip| {
                (
                    ip,
                    Entry {
                        pod: key.to_owned(),
                        attributes: attributes.clone(),
                    },
                )
            })
            .collect()
    }
}

fn pod_key(pod: &Pod) -> Option<String> {
    let name = pod.metadata.name.as_deref()?;
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    Some(format!("{namespace}/{name}"))
}

/// What policies see of a client in `pod`.
fn attributes(pod: &Pod) -> Attributes {
    let mut attrs = Attributes::new();
    if let Some(ns) = &pod.metadata.namespace {
        attrs.insert(attr::CLIENT_NAMESPACE.to_owned(), ns.clone());
    }
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    attrs.insert(attr::CLIENT_SERVICE_ACCOUNT.to_owned(), service_account);
    let labels: BTreeMap<String, String> = pod.metadata.labels.clone().unwrap_or_default();
    insert_labels(&mut attrs, attr::CLIENT_LABELS, &labels);
    attrs
}

fn remove(inner: &mut Inner, key: &str) {
    for ip in inner.by_pod.remove(key).unwrap_or_default() {
        // An address another pod took since (a missed delete) stays with that pod.
        if inner.by_ip.get(&ip).is_some_and(|e| e.pod == key) {
            inner.by_ip.remove(&ip);
        }
    }
}

fn insert(inner: &mut Inner, key: String, entries: Vec<(IpAddr, Entry)>) {
    if entries.is_empty() {
        return;
    }
    let ips = entries.iter().map(|(ip, _)| *ip).collect();
    for (ip, entry) in entries {
        if let Some(old) = inner.by_ip.insert(ip, entry) {
            if old.pod != key {
                // The address moved to this pod: the other one no longer holds it.
                if let Some(held) = inner.by_pod.get_mut(&old.pod) {
                    held.retain(|i| *i != ip);
                }
            }
        }
    }
    inner.by_pod.insert(key, ips);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, node: &str, ips: &[&str], labels: &[(&str, &str)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            },
            "spec": {
                "nodeName": node,
                "serviceAccountName": "web",
                "containers": [{"name": "c"}],
            },
            "status": {
                "phase": "Running",
                "podIP": ips.first(),
                "podIPs": ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>(),
            },
        }))
        .unwrap()
    }

    #[test]
    fn a_pod_of_this_node_gives_its_clients_attributes() {
        let cache = PodCache::new("node-1");
        cache.apply(&pod(
            "shop",
            "front-1",
            "node-1",
            &["10.1.0.5", "fd00::5"],
            &[("app", "front")],
        ));
        for ip in ["10.1.0.5", "fd00::5"] {
            let a = cache.attributes(ip.parse().unwrap());
            assert_eq!(a["client.clusterlink.net/namespace"], "shop");
            assert_eq!(a["client.clusterlink.net/service-account"], "web");
            assert_eq!(a["client.clusterlink.net/labels.app"], "front");
        }
        assert!(cache.attributes("10.1.0.6".parse().unwrap()).is_empty());
    }

    #[test]
    fn other_nodes_host_network_and_finished_pods_give_nothing() {
        let cache = PodCache::new("node-1");
        cache.apply(&pod("a", "elsewhere", "node-2", &["10.1.0.7"], &[]));
        let mut host = pod("a", "host", "node-1", &["192.168.1.10"], &[]);
        host.spec.as_mut().unwrap().host_network = Some(true);
        cache.apply(&host);
        let mut done = pod("a", "done", "node-1", &["10.1.0.8"], &[]);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        cache.apply(&done);
        assert!(cache.is_empty());
    }

    #[test]
    fn updates_deletes_relists_and_reused_addresses() {
        let cache = PodCache::new("n");
        let ip = "10.1.0.9".parse().unwrap();
        cache.apply(&pod("a", "one", "n", &["10.1.0.9"], &[("v", "1")]));
        cache.apply(&pod("a", "one", "n", &["10.1.0.9"], &[("v", "2")]));
        assert_eq!(cache.attributes(ip)["client.clusterlink.net/labels.v"], "2");
        // The address is reused by a new pod before the old one's delete arrives.
        cache.apply(&pod("b", "two", "n", &["10.1.0.9"], &[]));
        cache.delete(&pod("a", "one", "n", &["10.1.0.9"], &[]));
        assert_eq!(
            cache.attributes(ip)["client.clusterlink.net/namespace"],
            "b"
        );
        cache.delete(&pod("b", "two", "n", &["10.1.0.9"], &[]));
        assert!(cache.attributes(ip).is_empty());
        cache.apply(&pod("a", "stale", "n", &["10.1.0.10"], &[]));
        cache.replace(&[pod("c", "three", "n", &["10.1.0.11"], &[])]);
        assert_eq!(cache.len(), 1);
        assert!(cache.attributes("10.1.0.10".parse().unwrap()).is_empty());
    }
}
