use std::{fs, path::PathBuf};

use serde_json::Value;

use super::*;
use crate::api::{Kind, Object};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("clink-agent is inside the workspace")
        .to_owned()
}

#[test]
fn committed_crds_match_the_types() {
    let dir = workspace().join(CHART_CRDS_DIR);
    let manifests = manifests();
    let mut stale = Vec::new();
    for (file, yaml) in &manifests {
        if fs::read_to_string(dir.join(file)).ok().as_deref() != Some(yaml.as_str()) {
            stale.push(file.clone());
        }
    }
    for entry in fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !manifests.iter().any(|(file, _)| *file == name) {
            stale.push(format!("{name} (no type renders it)"));
        }
    }
    assert!(
        stale.is_empty(),
        "{CHART_CRDS_DIR}/ differs from the types in clink-agent/src/k8s/crd.rs: {}; \
         run `cargo xtask crds` and commit the result",
        stale.join(", ")
    );
}

#[test]
fn kinds_scopes_and_subresources_are_upstream_s() {
    let crds = definitions();
    let kinds: Vec<&str> = crds.iter().map(|c| c.spec.names.kind.as_str()).collect();
    assert_eq!(kinds, Kind::ALL.map(Kind::as_str));
    for (crd, kind) in crds.iter().zip(Kind::ALL) {
        assert_eq!(crd.spec.group, "clusterlink.net");
        assert_eq!(
            format!("{}/{}", crd.spec.group, crd.spec.versions[0].name),
            api::API_VERSION
        );
        let scope = if kind.namespaced() {
            "Namespaced"
        } else {
            "Cluster"
        };
        assert_eq!(crd.spec.scope, scope, "{kind}");
        let status = crd.spec.versions[0]
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some();
        let upstream_status = matches!(kind, Kind::Peer | Kind::Export | Kind::Import);
        assert_eq!(status, upstream_status, "{kind} status subresource");
    }
    let names: Vec<&str> = crds.iter().map(|c| c.spec.names.plural.as_str()).collect();
    assert_eq!(
        names,
        [
            "peers",
            "exports",
            "imports",
            "accesspolicies",
            "privilegedaccesspolicies"
        ]
    );
}

/// The version's openAPIV3Schema as JSON.
fn schema(crd: &CustomResourceDefinition) -> Value {
    let version = &crd.spec.versions[0];
    serde_json::to_value(&version.schema.as_ref().unwrap().open_api_v3_schema).unwrap()
}

/// Walks every subschema, with its JSON path.
fn walk(path: &str, schema: &Value, visit: &mut dyn FnMut(&str, &serde_json::Map<String, Value>)) {
    let Some(map) = schema.as_object() else {
        return;
    };
    visit(path, map);
    if let Some(props) = map.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            walk(&format!("{path}.{name}"), sub, visit);
        }
    }
    if let Some(items) = map.get("items") {
        walk(&format!("{path}[]"), items, visit);
    }
    if let Some(extra) = map.get("additionalProperties") {
        walk(&format!("{path}{{}}"), extra, visit);
    }
}

/// The API server rejects a CRD whose schema is not structural, and warns about formats it
/// does not know: no `$ref`, no `additionalProperties` beside `properties`, every node typed.
#[test]
fn schemas_are_structural() {
    const KNOWN_FORMATS: [&str; 3] = ["date-time", "int32", "int64"];
    for crd in definitions() {
        let kind = crd.spec.names.kind.clone();
        walk("", &schema(&crd), &mut |path, node| {
            for banned in ["$ref", "definitions", "$defs", "anyOf", "oneOf", "allOf"] {
                assert!(!node.contains_key(banned), "{kind}{path}: {banned}");
            }
            assert!(
                !(node.contains_key("properties") && node.contains_key("additionalProperties")),
                "{kind}{path}: properties and additionalProperties"
            );
            assert!(
                node.contains_key("type") || node.contains_key("x-kubernetes-int-or-string"),
                "{kind}{path}: no type"
            );
            if let Some(format) = node.get("format").and_then(Value::as_str) {
                assert!(
                    KNOWN_FORMATS.contains(&format),
                    "{kind}{path}: format {format}"
                );
            }
        });
    }
}

#[test]
fn conditions_carry_upstream_types_and_reasons() {
    let peer = serde_json::json!({
        "apiVersion": "clusterlink.net/v1alpha1", "kind": "Peer",
        "metadata": {"name": "server", "namespace": "clusterlink-system"},
        "spec": {"gateways": [{"host": "gw.example.com", "port": 443}]},
        "status": {
            "conditions": [{
                "type": api::PEER_REACHABLE, "status": "True", "reason": api::REASON_HEARTBEAT,
                "message": "", "lastTransitionTime": "2026-12-02T05:00:00Z"
            }],
            "labels": {"env": "prod"}
        }
    });
    let typed: Peer = serde_json::from_value(peer.clone()).unwrap();
    let status = typed.status.as_ref().unwrap();
    assert_eq!(
        status.condition(api::PEER_REACHABLE).unwrap().reason,
        "Heartbeat"
    );
    assert_eq!(status.labels["env"], "prod");
    assert!(errors(&definitions()[0], &peer).is_empty());
    let mut wrong = peer;
    wrong["status"]["conditions"][0]["status"] = "Yes".into();
    assert!(!errors(&definitions()[0], &wrong).is_empty());
}

/// Validation errors of `object` against the CRD's schema, where every object schema with
/// properties also forbids other properties: a field the API server would silently prune
/// counts as an error here.
fn errors(crd: &CustomResourceDefinition, object: &Value) -> Vec<String> {
    let mut schema = schema(crd);
    forbid_unknown_fields(&mut schema, true);
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .build(&schema)
        .unwrap();
    validator
        .iter_errors(object)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// The root keeps apiVersion, kind and metadata, which the CRD's schema leaves to the server.
fn forbid_unknown_fields(schema: &mut Value, root: bool) {
    let Some(map) = schema.as_object_mut() else {
        return;
    };
    if let Some(props) = map.get_mut("properties").and_then(Value::as_object_mut) {
        for sub in props.values_mut() {
            forbid_unknown_fields(sub, false);
        }
        if !root {
            map.insert("additionalProperties".into(), false.into());
        }
    }
    if let Some(items) = map.get_mut("items") {
        forbid_unknown_fields(items, false);
    }
}

/// docs/examples/ holds ClusterLink-style manifests of every kind: each must be accepted by
/// its CRD's schema (nothing pruned) and by the standalone parser, and deserialize into the
/// Kubernetes type.
#[test]
fn examples_of_every_kind_fit_the_crds_and_the_standalone_parser() {
    let dir = workspace().join("docs/examples");
    let crds = definitions();
    let mut seen = Vec::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        let name = path.display().to_string();
        let objects = api::parse_yaml(&name, &text).unwrap_or_else(|e| panic!("{e}"));
        let docs: Vec<Value> = yaml_serde::Deserializer::from_str(&text)
            .map(|doc| serde_json::to_value(yaml_serde::Value::deserialize(doc).unwrap()).unwrap())
            .filter(|v| !v.is_null())
            .collect();
        assert_eq!(docs.len(), objects.len(), "{name}");
        for (doc, object) in docs.iter().zip(&objects) {
            let kind = object.kind();
            let crd = &crds[Kind::ALL.iter().position(|k| *k == kind).unwrap()];
            let problems = errors(crd, doc);
            assert!(problems.is_empty(), "{name}: {kind}: {problems:?}");
            let typed = match kind {
                Kind::Peer => serde_json::from_value::<Peer>(doc.clone()).map(|_| ()),
                Kind::Export => serde_json::from_value::<Export>(doc.clone()).map(|_| ()),
                Kind::Import => serde_json::from_value::<Import>(doc.clone()).map(|_| ()),
                Kind::AccessPolicy => {
                    serde_json::from_value::<AccessPolicy>(doc.clone()).map(|_| ())
                }
                Kind::PrivilegedAccessPolicy => {
                    serde_json::from_value::<PrivilegedAccessPolicy>(doc.clone()).map(|_| ())
                }
            };
            typed.unwrap_or_else(|e| panic!("{name}: {kind}: {e}"));
            seen.push(kind);
        }
    }
    for kind in Kind::ALL {
        assert!(
            seen.contains(&kind),
            "no example of {kind} in docs/examples/"
        );
    }
}

/// What the standalone parser rejects, the API server rejects too (for what a schema can say).
#[test]
fn schemas_reject_what_the_parser_rejects() {
    let crds = definitions();
    let import = serde_json::json!({
        "apiVersion": "clusterlink.net/v1alpha1", "kind": "Import",
        "metadata": {"name": "db", "namespace": "default"},
        "spec": {"port": 5432, "sources": [{"peer": "p", "exportName": "db", "exportNamespace": "x"}]}
    });
    assert!(errors(&crds[2], &import).is_empty());
    for (pointer, bad) in [
        ("/spec/port", Some(Value::from(0))),
        ("/spec/port", Some(Value::from(65536))),
        ("/spec/targetPort", Some(Value::from(-1))),
        ("/spec/lbScheme", Some(Value::from("least-loaded"))),
        ("/spec/sources/0/peer", None),
    ] {
        let mut wrong = import.clone();
        set(&mut wrong, pointer, bad.clone());
        assert!(
            !errors(&crds[2], &wrong).is_empty(),
            "{pointer} = {bad:?} accepted"
        );
        assert!(
            Object::from_value(wrong).is_err(),
            "{pointer} = {bad:?} parsed standalone"
        );
    }
    let policy = serde_json::json!({
        "apiVersion": "clusterlink.net/v1alpha1", "kind": "PrivilegedAccessPolicy",
        "metadata": {"name": "p"},
        "spec": {"action": "permit", "from": [{"workloadSelector": {}}], "to": [{"workloadSelector": {}}]}
    });
    assert!(!errors(&crds[4], &policy).is_empty());
    assert!(Object::from_value(policy).is_err());
}

/// Sets the field at `pointer` to `value`, or removes it.
fn set(object: &mut Value, pointer: &str, value: Option<Value>) {
    let (parent, field) = pointer.rsplit_once('/').unwrap();
    let map = object.pointer_mut(parent).unwrap().as_object_mut().unwrap();
    match value {
        Some(v) => map.insert(field.to_owned(), v),
        None => map.remove(field),
    };
}
