//! The object model: ClusterLink's `clusterlink.net/v1alpha1` kinds, parsed from the same YAML
//! users give `kubectl apply`, and validated before anything is stored or acted upon.
//!
//! The spec and status types also derive `JsonSchema`: Kubernetes mode's CRDs
//! (`k8s::crd`) are generated from these same types, so the API server's schema and this
//! parser cannot drift apart. Doc comments on them become the CRDs' field descriptions.

use std::{collections::BTreeMap, fmt};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "clusterlink.net/v1alpha1";
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Peer,
    Export,
    Import,
    AccessPolicy,
    PrivilegedAccessPolicy,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Peer,
        Kind::Export,
        Kind::Import,
        Kind::AccessPolicy,
        Kind::PrivilegedAccessPolicy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Peer => "Peer",
            Kind::Export => "Export",
            Kind::Import => "Import",
            Kind::AccessPolicy => "AccessPolicy",
            Kind::PrivilegedAccessPolicy => "PrivilegedAccessPolicy",
        }
    }

    /// Accepts the names kubectl accepts: the kind, its plural, lower or mixed case.
    pub fn parse(s: &str) -> Option<Kind> {
        let lower = s.to_ascii_lowercase();
        let singular = lower
            .strip_suffix("ies")
            .map(|stem| format!("{stem}y"))
            .or_else(|| lower.strip_suffix('s').map(str::to_owned))
            .unwrap_or(lower);
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(&singular))
    }

    pub fn namespaced(self) -> bool {
        self != Kind::PrivilegedAccessPolicy
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of a stored object; `namespace` is empty for cluster-scoped kinds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One aspect of an object's state, as Kubernetes' `metav1.Condition` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The aspect: PeerReachable, ExportValid, ImportTargetPortValid or ImportServiceValid.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    #[schemars(extend("enum" = ["True", "False", "Unknown"]))]
    pub status: String,
    /// Why the status is what it is, in CamelCase (e.g. Heartbeat, Leased, Error).
    #[serde(default)]
    pub reason: String,
    /// A human-readable explanation of the status.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
}

/// What the agents observed about an object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The object's conditions, one per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Peer only: the remote peer's labels, learned from its heartbeat answers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

pub const PEER_REACHABLE: &str = "PeerReachable";
pub const EXPORT_VALID: &str = "ExportValid";
pub const IMPORT_TARGET_PORT_VALID: &str = "ImportTargetPortValid";
pub const IMPORT_SERVICE_VALID: &str = "ImportServiceValid";
/// The reason of a true `PeerReachable`: the peer answered its heartbeats.
pub const REASON_HEARTBEAT: &str = "Heartbeat";
/// The reason of every failed condition, as ClusterLink reports it.
pub const REASON_ERROR: &str = "Error";
/// `ImportTargetPortValid` when the agents chose the port (upstream's reason).
pub const REASON_LEASED: &str = "Leased";
/// Condition reason: an Import's port is held by another socket on the node; the agent tries
/// it again every [`crate::agent::BUSY_RETRY`] until it listens.
pub const REASON_PORT_IN_USE: &str = "PortInUse";

impl Status {
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty() && self.labels.is_empty()
    }

    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Sets a condition; `lastTransitionTime` moves only when its status changes.
    pub fn set_condition(&mut self, type_: &str, ok: bool, reason: &str, message: &str) {
        let status = if ok { "True" } else { "False" };
        let now = || {
            time::OffsetDateTime::now_utc()
                .replace_nanosecond(0)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default()
        };
        match self.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                if c.status != status {
                    c.last_transition_time = now();
                    c.status = status.to_owned();
                }
                c.reason = reason.to_owned();
                c.message = message.to_owned();
            }
            None => self.conditions.push(Condition {
                type_: type_.to_owned(),
                status: status.to_owned(),
                reason: reason.to_owned(),
                message: message.to_owned(),
                last_transition_time: now(),
            }),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: S,
    #[serde(default, skip_serializing_if = "Status::is_empty")]
    pub status: Status,
}

impl<S> Resource<S> {
    /// An object as a user writes it: this API version, no status.
    pub fn new(kind: Kind, metadata: ObjectMeta, spec: S) -> Resource<S> {
        Resource {
            api_version: API_VERSION.to_owned(),
            kind: kind.as_str().to_owned(),
            metadata,
            spec,
            status: Status::default(),
        }
    }
}

/// A network address: a host name or IP address and a port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    #[schemars(schema_with = "port_schema")]
    pub port: u16,
}

/// A remote peer: where its gateways are. The object's name is the peer's name, the DNS name
/// in its certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    /// The peer's gateway endpoints (its agents' one TLS port, usually 443).
    pub gateways: Vec<Endpoint>,
}

/// A local service made available to other peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    /// Address of the exported service. Empty means the Service `<name>.<namespace>` in
    /// Kubernetes mode; required standalone.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// Port of the exported service.
    #[schemars(schema_with = "port_schema")]
    pub port: u16,
}

/// One exported service of a remote peer that an Import reaches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImportSource {
    /// Name of the Peer that exports the service.
    pub peer: String,
    /// Name of the Export on that peer.
    pub export_name: String,
    /// Namespace of the Export on that peer.
    pub export_namespace: String,
}

/// How an Import with several sources picks one for each connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LbScheme {
    #[default]
    #[serde(rename = "round-robin")]
    RoundRobin,
    #[serde(rename = "random")]
    Random,
    #[serde(rename = "static")]
    Static,
}

/// A remote service made available to local clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImportSpec {
    /// The port clients connect to.
    #[schemars(schema_with = "port_schema")]
    pub port: u16,
    /// The port the agents listen on for this import; 0 (or absent) lets the agents lease a
    /// free port and write it back.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(schema_with = "port_or_zero_schema")]
    pub target_port: u16,
    /// The exported services this import reaches.
    pub sources: Vec<ImportSource>,
    /// round-robin (the default), random, or static (the first reachable source in order).
    #[serde(default)]
    pub lb_scheme: LbScheme,
}

impl ImportSpec {
    /// The port the agent listens on for this import.
    pub fn listen_port(&self) -> u16 {
        if self.target_port != 0 {
            self.target_port
        } else {
            self.port
        }
    }
}

impl ImportSpec {
    /// The field [`ImportSpec::listen_port`] comes from, for error messages.
    pub fn listen_field(&self) -> &'static str {
        if self.target_port != 0 {
            "spec.targetPort"
        } else {
            "spec.port"
        }
    }
}

fn is_zero(v: &u16) -> bool {
    *v == 0
}

/// The CRD schema of a port that must be set, so that the API server rejects what
/// [`Object::validate`] rejects. schemars' own schema for `u16` says `format: uint16`, which
/// the API server does not know and warns about.
fn port_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "integer", "minimum": 1, "maximum": 65535})
}

/// As [`port_schema`], where 0 means "not set".
fn port_or_zero_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "integer", "minimum": 0, "maximum": 65535})
}

/// Whether a policy allows or denies the connections it matches.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// A label selector requirement's relation between a key and its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    /// The label key the requirement applies to.
    pub key: String,
    /// In, NotIn, Exists or DoesNotExist.
    pub operator: Operator,
    /// The values for In and NotIn (at least one); empty for Exists and DoesNotExist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A Kubernetes `metav1.LabelSelector`; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-map-type" = "atomic"))]
pub struct LabelSelector {
    /// Labels that must all be present with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

/// A set of workloads, chosen by their attributes (labels).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSetOrSelector {
    /// Predefined sets of workloads; not supported (an object that sets them is rejected).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workload_sets: Vec<String>,
    /// A label selector over the workload's attributes; empty selects every workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<LabelSelector>,
}

/// Which connections to allow or deny, by the attributes of their client and service.
/// Privileged policies come before the others; in each tier deny comes before allow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessPolicySpec {
    /// allow or deny the connections that match both `from` and `to`.
    pub action: Action,
    /// The clients the policy applies to (any item matching is enough).
    pub from: Vec<WorkloadSetOrSelector>,
    /// The services the policy applies to (any item matching is enough).
    pub to: Vec<WorkloadSetOrSelector>,
}

pub type Peer = Resource<PeerSpec>;
pub type Export = Resource<ExportSpec>;
pub type Import = Resource<ImportSpec>;
pub type AccessPolicy = Resource<AccessPolicySpec>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Peer(Peer),
    Export(Export),
    Import(Import),
    AccessPolicy(AccessPolicy),
    PrivilegedAccessPolicy(AccessPolicy),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Peer(_) => Kind::Peer,
            Object::Export(_) => Kind::Export,
            Object::Import(_) => Kind::Import,
            Object::AccessPolicy(_) => Kind::AccessPolicy,
            Object::PrivilegedAccessPolicy(_) => Kind::PrivilegedAccessPolicy,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Peer(o) => &o.metadata,
            Object::Export(o) => &o.metadata,
            Object::Import(o) => &o.metadata,
            Object::AccessPolicy(o) | Object::PrivilegedAccessPolicy(o) => &o.metadata,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let meta = self.metadata();
        ObjectKey {
            kind: self.kind(),
            namespace: if self.kind().namespaced() {
                meta.namespace.clone().unwrap_or_default()
            } else {
                String::new()
            },
            name: meta.name.clone(),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("API objects are plain data and always serialize")
    }

    pub fn to_yaml(&self) -> String {
        yaml_serde::to_string(&self.to_json()).expect("JSON values always serialize to YAML")
    }

    /// Parses one object from a JSON value (the admin API's and the store's wire form) and
    /// validates it; objects without a namespace land in `default`.
    pub fn from_value(value: serde_json::Value) -> Result<Object, ApiError> {
        let kind_name = value
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| ApiError::new("object", "kind", "missing"))?
            .to_owned();
        let display_name = value
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .unwrap_or("<unnamed>")
            .to_owned();
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind_name)
            .ok_or_else(|| {
                ApiError::new(
                    &format!("{kind_name} {display_name}"),
                    "kind",
                    &format!(
                        "unknown kind {kind_name:?} (expected one of Peer, Export, Import, \
                         AccessPolicy, PrivilegedAccessPolicy)"
                    ),
                )
            })?;
        let what = format!("{kind} {display_name}");
        match value.get("apiVersion").and_then(|v| v.as_str()) {
            Some(API_VERSION) => {}
            Some(other) => {
                return Err(ApiError::new(
                    &what,
                    "apiVersion",
                    &format!("{other:?} is not supported (expected {API_VERSION})"),
                ))
            }
            None => return Err(ApiError::new(&what, "apiVersion", "missing")),
        }
        let mut object = match kind {
            Kind::Peer => Object::Peer(typed(value, &what)?),
            Kind::Export => Object::Export(typed(value, &what)?),
            Kind::Import => Object::Import(typed(value, &what)?),
            Kind::AccessPolicy => Object::AccessPolicy(typed(value, &what)?),
            Kind::PrivilegedAccessPolicy => Object::PrivilegedAccessPolicy(typed(value, &what)?),
        };
        let meta = object.metadata_mut();
        if kind.namespaced() {
            meta.namespace
                .get_or_insert_with(|| DEFAULT_NAMESPACE.to_owned());
        } else {
            meta.namespace = None;
        }
        object.validate()?;
        Ok(object)
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Peer(o) => &mut o.metadata,
            Object::Export(o) => &mut o.metadata,
            Object::Import(o) => &mut o.metadata,
            Object::AccessPolicy(o) | Object::PrivilegedAccessPolicy(o) => &mut o.metadata,
        }
    }

    pub fn status(&self) -> &Status {
        match self {
            Object::Peer(o) => &o.status,
            Object::Export(o) => &o.status,
            Object::Import(o) => &o.status,
            Object::AccessPolicy(o) | Object::PrivilegedAccessPolicy(o) => &o.status,
        }
    }

    pub fn status_mut(&mut self) -> &mut Status {
        match self {
            Object::Peer(o) => &mut o.status,
            Object::Export(o) => &mut o.status,
            Object::Import(o) => &mut o.status,
            Object::AccessPolicy(o) | Object::PrivilegedAccessPolicy(o) => &mut o.status,
        }
    }

    /// Checks what serde cannot: names, ranges, references that must be non-empty.
    pub fn validate(&self) -> Result<(), ApiError> {
        let key = self.key();
        let what = key.to_string();
        let err = |field: &str, msg: &str| Err(ApiError::new(&what, field, msg));
        let meta = self.metadata();
        if let Err(msg) = check_dns_subdomain(&meta.name) {
            return err("metadata.name", &msg);
        }
        if let Some(ns) = &meta.namespace {
            if let Err(msg) = check_dns_label(ns) {
                return err("metadata.namespace", &msg);
            }
        }
        for (k, v) in &meta.labels {
            if let Err(msg) = check_label(k, v) {
                return err(&format!("metadata.labels[{k}]"), &msg);
            }
        }
        match self {
            Object::Peer(p) => {
                if p.spec.gateways.is_empty() {
                    return err("spec.gateways", "at least one gateway is required");
                }
                for (i, gw) in p.spec.gateways.iter().enumerate() {
                    if gw.host.trim().is_empty() {
                        return err(&format!("spec.gateways[{i}].host"), "must not be empty");
                    }
                    if gw.port == 0 {
                        return err(&format!("spec.gateways[{i}].port"), "must be 1-65535");
                    }
                }
            }
            Object::Export(e) => {
                if e.spec.port == 0 {
                    return err("spec.port", "must be 1-65535");
                }
                if e.spec.host.trim().is_empty() {
                    return err(
                        "spec.host",
                        "required in standalone mode (the address of the exported service)",
                    );
                }
            }
            Object::Import(i) => {
                if i.spec.port == 0 {
                    return err("spec.port", "must be 1-65535");
                }
                if i.spec.sources.is_empty() {
                    return err("spec.sources", "at least one source is required");
                }
                for (n, s) in i.spec.sources.iter().enumerate() {
                    for (field, value) in [
                        ("peer", &s.peer),
                        ("exportName", &s.export_name),
                        ("exportNamespace", &s.export_namespace),
                    ] {
                        if value.is_empty() {
                            return err(&format!("spec.sources[{n}].{field}"), "must not be empty");
                        }
                    }
                }
            }
            Object::AccessPolicy(p) | Object::PrivilegedAccessPolicy(p) => {
                for (side, list) in [("from", &p.spec.from), ("to", &p.spec.to)] {
                    if list.is_empty() {
                        return err(
                            &format!("spec.{side}"),
                            "must list at least one workloadSelector ({} matches everything)",
                        );
                    }
                    for (n, item) in list.iter().enumerate() {
                        let field = format!("spec.{side}[{n}]");
                        if !item.workload_sets.is_empty() {
                            return err(
                                &format!("{field}.workloadSets"),
                                "workload sets are not supported; use workloadSelector",
                            );
                        }
                        let Some(sel) = &item.workload_selector else {
                            return err(&format!("{field}.workloadSelector"), "missing");
                        };
                        if let Err((sub, msg)) = check_selector(sel) {
                            return err(&format!("{field}.workloadSelector.{sub}"), &msg);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Serialize for Object {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Object::Peer(o) => o.serialize(serializer),
            Object::Export(o) => o.serialize(serializer),
            Object::Import(o) => o.serialize(serializer),
            Object::AccessPolicy(o) | Object::PrivilegedAccessPolicy(o) => o.serialize(serializer),
        }
    }
}

/// The kind comes from the object's `kind` field, and the object is validated as
/// [`Object::from_value`] does: whatever deserializes is a valid object.
impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Object, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Object::from_value(value).map_err(serde::de::Error::custom)
    }
}

fn typed<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    what: &str,
) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "object" } else { &path };
        ApiError::new(what, field, &e.into_inner().to_string())
    })
}

/// A rejected object: names the object and the field, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct ApiError {
    pub object: String,
    pub field: String,
    pub message: String,
}

impl ApiError {
    pub fn new(object: &str, field: &str, message: &str) -> Self {
        ApiError {
            object: object.to_owned(),
            field: field.to_owned(),
            message: message.to_owned(),
        }
    }
}

/// Parses a YAML stream of one or more documents (as `kubectl apply -f` takes); `source`
/// names the file in errors. Empty documents are skipped.
pub fn parse_yaml(source: &str, text: &str) -> Result<Vec<Object>, ApiError> {
    let mut objects = Vec::new();
    for (n, doc) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let value = yaml_serde::Value::deserialize(doc)
            .map_err(|e| ApiError::new(source, &format!("document {}", n + 1), &e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value)
            .map_err(|e| ApiError::new(source, &format!("document {}", n + 1), &e.to_string()))?;
        if !json.is_object() {
            return Err(ApiError::new(
                source,
                &format!("document {}", n + 1),
                "expected a mapping with apiVersion, kind, metadata and spec",
            ));
        }
        objects.push(Object::from_value(json)?);
    }
    Ok(objects)
}

pub fn check_dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid name (lower-case letters, digits and '-', at most 63, \
             starting and ending with a letter or digit)"
        ))
    }
}

fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("required".to_owned());
    }
    if s.len() > 253 || s.split('.').any(|part| check_dns_label(part).is_err()) {
        return Err(format!(
            "{s:?} is not a valid name (DNS subdomain: lower-case letters, digits, '-' and '.')"
        ));
    }
    Ok(())
}

fn check_label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// Kubernetes label key rules: an optional DNS-subdomain prefix and `/`, then a name.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| check_dns_subdomain(p).is_ok());
    if prefix_ok && check_label_name(name) {
        Ok(())
    } else {
        Err(format!("{key:?} is not a valid label key"))
    }
}

pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    check_label_key(key)?;
    if value.is_empty() || check_label_name(value) {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a valid label value (at most 63 of letters, digits, '-', '_', '.')"
        ))
    }
}

fn check_selector(sel: &LabelSelector) -> Result<(), (String, String)> {
    for (k, v) in &sel.match_labels {
        check_label(k, v).map_err(|m| (format!("matchLabels[{k}]"), m))?;
    }
    for (n, req) in sel.match_expressions.iter().enumerate() {
        let field = format!("matchExpressions[{n}]");
        check_label_key(&req.key).map_err(|m| (format!("{field}.key"), m))?;
        match req.operator {
            Operator::In | Operator::NotIn if req.values.is_empty() => {
                return Err((
                    format!("{field}.values"),
                    format!("operator {:?} needs at least one value", req.operator),
                ))
            }
            Operator::Exists | Operator::DoesNotExist if !req.values.is_empty() => {
                return Err((
                    format!("{field}.values"),
                    format!("operator {:?} takes no values", req.operator),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_clusterlink_manifests() {
        let text = r#"
apiVersion: clusterlink.net/v1alpha1
kind: Peer
metadata:
  name: peer-b
  namespace: clusterlink-system
spec:
  gateways:
    - host: 10.0.0.2
      port: 443
---
apiVersion: clusterlink.net/v1alpha1
kind: Import
metadata:
  name: iperf3
spec:
  port: 5201
  sources:
    - exportName: iperf3
      exportNamespace: default
      peer: peer-b
  lbScheme: static
---
apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata:
  name: allow-all
spec:
  action: allow
  from:
    - workloadSelector: {}
  to:
    - workloadSelector:
        matchExpressions:
          - key: export.clusterlink.net/name
            operator: In
            values: [iperf3]
"#;
        let objects = parse_yaml("test.yaml", text).unwrap();
        assert_eq!(objects.len(), 3);
        assert_eq!(
            objects[0].key().to_string(),
            "Peer clusterlink-system/peer-b"
        );
        let Object::Import(import) = &objects[1] else {
            panic!("not an import")
        };
        assert_eq!(import.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(import.spec.lb_scheme, LbScheme::Static);
        assert_eq!(import.spec.listen_port(), 5201);
        let Object::AccessPolicy(policy) = &objects[2] else {
            panic!("not a policy")
        };
        assert_eq!(policy.spec.action, Action::Allow);
    }

    #[test]
    fn round_trips_through_yaml() {
        let text = "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata:\n  name: db\n  \
                    namespace: prod\nspec:\n  host: 127.0.0.1\n  port: 5432\n";
        let objects = parse_yaml("x", text).unwrap();
        let again = parse_yaml("y", &objects[0].to_yaml()).unwrap();
        assert_eq!(objects, again);
    }

    #[test]
    fn objects_round_trip_through_serde_and_are_validated() {
        let text = "apiVersion: clusterlink.net/v1alpha1\nkind: PrivilegedAccessPolicy\nmetadata: \
                    {name: deny-all}\nspec: {action: deny, from: [{workloadSelector: {}}], to: \
                    [{workloadSelector: {}}]}\n";
        let objects = parse_yaml("x", text).unwrap();
        let json = serde_json::to_string(&objects).unwrap();
        let again: Vec<Object> = serde_json::from_str(&json).unwrap();
        assert_eq!(objects, again);
        assert_eq!(again[0].kind(), Kind::PrivilegedAccessPolicy);
        let invalid = json.replace("deny-all", "Deny_All");
        let err = serde_json::from_str::<Vec<Object>>(&invalid).unwrap_err();
        assert!(err.to_string().contains("metadata.name"), "{err}");
    }

    fn error_of(text: &str) -> String {
        parse_yaml("f.yaml", text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_object_and_field() {
        assert_eq!(
            error_of("apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: a}\nspec: {port: 80, sources: []}\n"),
            "Import default/a: spec.sources: at least one source is required"
        );
        assert!(error_of(
            "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: a}\nspec: {port: 99999, sources: []}\n"
        )
        .starts_with("Import a: spec.port: "));
        assert!(error_of(
            "apiVersion: clusterlink.net/v1alpha1\nkind: Gadget\nmetadata: {name: a}\nspec: {}\n"
        )
        .contains("unknown kind \"Gadget\""));
        assert!(
            error_of("apiVersion: v1\nkind: Peer\nmetadata: {name: a}\nspec: {}\n")
                .starts_with("Peer a: apiVersion: ")
        );
        assert!(error_of("kind: Peer\nspec: [\n").starts_with("f.yaml: document 1: "));
        assert_eq!(
            error_of("apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata: {name: a}\nspec: {gateways: [{host: x, port: 1, extra: 2}]}\n")
                .split(": ").take(2).collect::<Vec<_>>(),
            ["Peer a", "spec.gateways[0].extra"]
        );
        assert_eq!(
            error_of("apiVersion: clusterlink.net/v1alpha1\nkind: AccessPolicy\nmetadata: {name: p}\nspec:\n  action: allow\n  from: [{workloadSelector: {matchExpressions: [{key: a, operator: In}]}}]\n  to: [{workloadSelector: {}}]\n"),
            "AccessPolicy default/p: spec.from[0].workloadSelector.matchExpressions[0].values: operator In needs at least one value"
        );
        assert!(error_of("apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata: {name: A_B}\nspec: {gateways: [{host: x, port: 1}]}\n")
            .contains("metadata.name"));
    }

    #[test]
    fn kind_aliases() {
        assert_eq!(Kind::parse("peers"), Some(Kind::Peer));
        assert_eq!(Kind::parse("accesspolicies"), Some(Kind::AccessPolicy));
        assert_eq!(
            Kind::parse("PrivilegedAccessPolicy"),
            Some(Kind::PrivilegedAccessPolicy)
        );
        assert_eq!(Kind::parse("pods"), None);
    }

    #[test]
    fn label_rules() {
        assert!(check_label("app.kubernetes.io/name", "web-1").is_ok());
        assert!(check_label("env", "").is_ok());
        assert!(check_label("-bad", "x").is_err());
        assert!(check_label("ok", "not valid!").is_err());
    }
}
