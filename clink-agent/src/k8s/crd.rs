//! The custom resources of group `clusterlink.net/v1alpha1`, as upstream ClusterLink defines
//! them: Peer, Export and Import (namespaced, with a status subresource), AccessPolicy
//! (namespaced) and PrivilegedAccessPolicy (cluster scoped).
//!
//! Each spec is the standalone object model's spec ([`api::PeerSpec`], ...) in a transparent
//! newtype: the derive needs one spec type per kind (AccessPolicy and PrivilegedAccessPolicy
//! share [`api::AccessPolicySpec`]), and the newtypes keep kube's attributes out of `api`. The
//! YAML under `charts/clusterlink/crds/` is rendered from here by [`manifests`]
//! (`cargo xtask crds`); a test fails when the two differ.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::api;

/// Where the rendered CRDs live, relative to the workspace root.
pub const CHART_CRDS_DIR: &str = "charts/clusterlink/crds";

/// A remote peer and how to reach its gateways.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "clusterlink.net",
    version = "v1alpha1",
    kind = "Peer",
    namespaced,
    status = "api::Status",
    doc = "A remote peer of the fabric. Its name is the DNS name in the peer's certificate.",
    printcolumn = r#"{"name":"Reachable","type":"string","jsonPath":".status.conditions[?(@.type==\"PeerReachable\")].status"}"#
)]
#[serde(transparent)]
pub struct PeerSpec(pub api::PeerSpec);

/// The status of an Export or an Import: conditions only (status labels are the Peer's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ConditionsStatus {
    /// The object's conditions, one per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<api::Condition>,
}

/// A local service offered to other peers.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "clusterlink.net",
    version = "v1alpha1",
    kind = "Export",
    namespaced,
    status = "ConditionsStatus",
    doc = "A local service that remote peers may import.",
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"ExportValid\")].status"}"#
)]
#[serde(transparent)]
pub struct ExportSpec(pub api::ExportSpec);

/// A remote service made reachable to local clients.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "clusterlink.net",
    version = "v1alpha1",
    kind = "Import",
    namespaced,
    status = "ConditionsStatus",
    doc = "A service of remote peers, imported into this cluster as a Service of the same name.",
    // The Import's Service takes its name, and Service names are DNS labels.
    validation = kube::core::Rule::new("size(self.metadata.name) <= 63")
        .message("import name cannot exceed 63 chars"),
    printcolumn = r#"{"name":"Port","type":"integer","jsonPath":".spec.port"}"#,
    printcolumn = r#"{"name":"TargetPort","type":"integer","jsonPath":".spec.targetPort"}"#
)]
#[serde(transparent)]
pub struct ImportSpec(pub api::ImportSpec);

/// A policy of the namespace it is in.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "clusterlink.net",
    version = "v1alpha1",
    kind = "AccessPolicy",
    plural = "accesspolicies",
    namespaced,
    doc = "Allows or denies connections between workloads, by their attributes. \
           Privileged policies take precedence; within a tier deny takes precedence over allow.",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#
)]
#[serde(transparent)]
pub struct AccessPolicySpec(pub api::AccessPolicySpec);

/// A cluster-wide policy set by the cluster's administrator.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "clusterlink.net",
    version = "v1alpha1",
    kind = "PrivilegedAccessPolicy",
    plural = "privilegedaccesspolicies",
    doc = "A cluster-wide access policy that takes precedence over every AccessPolicy.",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#
)]
#[serde(transparent)]
pub struct PrivilegedAccessPolicySpec(pub api::AccessPolicySpec);

/// Every CRD of the group, in the order of [`api::Kind::ALL`].
pub fn definitions() -> Vec<CustomResourceDefinition> {
    vec![
        Peer::crd(),
        Export::crd(),
        Import::crd(),
        AccessPolicy::crd(),
        PrivilegedAccessPolicy::crd(),
    ]
}

/// The CRD files of the chart: (file name, YAML), one per CRD, named as upstream names them
/// (`clusterlink.net_<plural>.yaml`).
pub fn manifests() -> Vec<(String, String)> {
    definitions()
        .into_iter()
        .map(|crd| {
            let file = format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural);
            let yaml = yaml_serde::to_string(&crd).expect("a CRD always serializes to YAML");
            (
                file,
                format!(
                    "# Generated from clink-agent/src/k8s/crd.rs by `cargo xtask crds`; \
                     do not edit.\n{yaml}"
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests;
