//! What a connection reads: an immutable [`Snapshot`] of the objects and the lookup tables
//! derived from them, swapped whole by the agent on every change ([`SnapshotCell`]), so the
//! data path never sees half an apply and never waits for one.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use crate::{
    api::{Export, Import, Object, ObjectKey, Peer},
    policy::PolicySet,
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
    pub fn build(objects: BTreeMap<ObjectKey, Object>) -> Snapshot {
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

/// The current [`Snapshot`]: connections take it (one `Arc` clone), the agent replaces it.
#[derive(Default)]
pub struct SnapshotCell(RwLock<Arc<Snapshot>>);

impl SnapshotCell {
    pub fn get(&self) -> Arc<Snapshot> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, snapshot: Arc<Snapshot>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = snapshot;
    }
}
