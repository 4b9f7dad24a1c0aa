//! The Kubernetes API emulator (tests/k8s/apiserver.py, run by `clink_testbed::ApiServer`) that
//! stands in for a real API server in the Kubernetes-mode tests: these tests show that kubectl,
//! kube-rs (client, watcher) and kube-lease-manager work against it as they would against a
//! cluster, and they are the reference for what it does.
//!
//! # What it does
//! - Discovery (`/api`, `/apis`, `/apis/<group>`, `/api/v1`, `/apis/<group>/<version>`, `/version`)
//!   for core/v1 (Namespaces, Nodes, Pods, Services, Endpoints, Events, Secrets, ConfigMaps,
//!   ServiceAccounts), events.k8s.io/v1 Events, coordination.k8s.io/v1 Leases,
//!   apiextensions.k8s.io/v1 CRDs, and every custom resource whose CRD it stores: a CRD applied to
//!   it (or loaded with `--crds`, see `ApiServer::start_with_crds`) serves its kind, plural,
//!   scope and status subresource as a real server would.
//! - Lists with `kind: <Kind>List` and the list's `resourceVersion`; `limit`/`continue` paging.
//! - One increasing `resourceVersion` over all objects; `uid`, `creationTimestamp`, and
//!   `generation` that grows when anything but metadata and status changes.
//! - Watches (`?watch=true`, on a collection or a named object) streamed as JSON lines with
//!   content type application/json: from `resourceVersion=N` the events after N; without one (or
//!   0) the current objects as ADDED first; `sendInitialEvents=true` with the closing BOOKMARK;
//!   a BOOKMARK when `timeoutSeconds` ends the watch and bookmarks are allowed; `410 Gone`
//!   (an ERROR event, reason Expired) from a version older than the last `ApiServer::compact`.
//! - Label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!`) and field selectors (`=`,
//!   `==`, `!=` on any dotted path, such as `spec.nodeName` and `metadata.name`) on lists, watches
//!   and deletecollection; a watched object that moves into or out of the selection arrives
//!   as ADDED or DELETED, as from a real server.
//! - Create (also `generateName`), get, replace (PUT), delete (finalizers hold an object, with a
//!   `deletionTimestamp`, until an update removes the last one), deletecollection.
//! - Patches: JSON merge patch; strategic merge patch as a merge patch in which the lists the
//!   Kubernetes types merge by key (containers, env, volumes, Service and container ports,
//!   conditions, ownerReferences, ...) merge element by element; JSON patch.
//! - Server-side apply (`application/apply-patch+yaml`, `fieldManager` required): creates a
//!   missing object, merges into an existing one (maps key by key, lists replaced whole), drops
//!   the fields the manager applied before and no longer applies, and answers 409 Conflict when
//!   it would change a field another manager set, unless `force=true`.
//! - Optimistic concurrency: an update or patch that carries a `metadata.resourceVersion` other
//!   than the stored one fails with 409 Conflict.
//! - The status subresource (`/status`, GET/PUT/PATCH) for the resources that have one: writes
//!   to it change only `status`, writes to the object leave `status` alone, create drops it.
//! - Services get a cluster IP from 10.96.0.0/16 (`--service-cidr`), node ports from 30000,
//!   and `type`, port `protocol` and `targetPort` defaults.
//! - A request log (method, path, query, content type, body) for assertions
//!   (`ApiServer::requests`); plain HTTP only (kube-rs accepts `http://` cluster URLs).
//!
//! # What it does not do (no test here relies on these)
//! - No authentication, authorization or RBAC: the chart's RBAC is not checked by it.
//! - No admission, no validation against CRD schemas (`kubectl apply` sends `fieldValidation`,
//!   which it ignores), no defaulting from CRD schemas, no immutable-field checks, and it does
//!   not check that an object's namespace exists.
//! - No `managedFields` in objects: ownership for apply conflicts is kept aside, per leaf field
//!   with one owner each; associative lists (`listType: map`) are not merged by key on apply.
//! - No protobuf bodies: kubectl's generators (`kubectl create namespace|configmap|secret ...`)
//!   send protobuf and get 415 Unsupported Media Type; `kubectl create -f`/`apply -f` work.
//! - No Table output (`kubectl get` prints names and ages, not additionalPrinterColumns), no
//!   no OpenAPI (`/openapi/v2` is an empty document, `/openapi/v3` is missing), no
//!   aggregated discovery, no `dryRun`.
//! - No garbage collection (ownerReferences are stored, dependents are not deleted), no
//!   controllers (Pods do not run, Endpoints are not filled, Namespaces do not terminate), no
//!   TTL for Events, and deleting a CRD drops its objects without DELETED events.
//! - Lists always return the current state (`resourceVersion`/`resourceVersionMatch` on a
//!   list are ignored); watches do not send periodic bookmarks.
//! - core/v1 and events.k8s.io/v1 Events are separate collections, not two views of one.
//!
//! kubectl and the emulator's Python come from `cargo xtask setup`; without them these tests
//! are skipped with a message, and fail under CI=true.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clink_agent::k8s::crd::Import;
use clink_testbed::{
    chart_crds_dir, kmock_path, kubectl_path, require_k8s_tool, require_root, wait_for, ApiServer,
    ChildGuard, Netns,
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Config, Resource, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use serde::Deserialize;
use serde_json::{json, Value};

/// How long a test waits for an event that should come at once.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn tools(what: &str) -> bool {
    require_k8s_tool(&kubectl_path(), what) && require_k8s_tool(&kmock_path(), what)
}

/// An emulator without custom resources, or None if the tools are missing.
fn emulator(what: &str) -> Option<ApiServer> {
    tools(what).then(|| ApiServer::start(None, loopback()).expect("start the API emulator"))
}

/// An emulator that serves the chart's CRDs from the start.
fn emulator_with_crds(what: &str) -> Option<ApiServer> {
    tools(what)
        .then(|| ApiServer::start_with_crds(None, loopback()).expect("start the API emulator"))
}

/// A kube-rs client built the way the agent builds one from a kubeconfig file.
async fn client(api: &ApiServer) -> Client {
    let kubeconfig = Kubeconfig::read_from(api.kubeconfig()).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    clink_agent::tls::install_process_provider();
    Client::try_from(config).unwrap()
}

fn examples_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples"))
}

/// Every YAML document of every `*.yaml` file in `dir`.
fn yaml_docs(dir: &Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in yaml_serde::Deserializer::from_str(&text) {
            docs.push(serde_json::to_value(yaml_serde::Value::deserialize(doc).unwrap()).unwrap());
        }
    }
    docs
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

fn resource_version(object: &Value) -> u64 {
    text(object, "/metadata/resourceVersion").parse().unwrap()
}

fn get(api: &ApiServer, args: &[&str]) -> Value {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&api.kubectl(&all).unwrap()).unwrap()
}

/// Waits for the next item of `stream`, failing after EVENT_TIMEOUT.
async fn next<S: futures::Stream + Unpin>(stream: &mut S, what: &str) -> S::Item {
    tokio::time::timeout(EVENT_TIMEOUT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("the stream ended before {what}"))
}

#[test]
fn kubectl_applies_the_chart_crds_and_every_example() {
    let Some(api) = emulator("kubectl applying the chart's CRDs and the examples") else {
        return;
    };
    let crds = chart_crds_dir();
    api.kubectl(&["apply", "-f", crds.to_str().unwrap()])
        .unwrap();

    // Discovery serves exactly what the CRDs declare.
    let discovery = api.get_json("/apis/clusterlink.net/v1alpha1").unwrap();
    assert_eq!(discovery["groupVersion"], "clusterlink.net/v1alpha1");
    let served: Vec<&Value> = discovery["resources"].as_array().unwrap().iter().collect();
    let crd_docs = yaml_docs(&crds);
    assert_eq!(crd_docs.len(), 5);
    for crd in &crd_docs {
        let plural = text(crd, "/spec/names/plural");
        let entry = served
            .iter()
            .find(|r| r["name"] == plural)
            .unwrap_or_else(|| panic!("{plural} not served: {discovery}"));
        assert_eq!(entry["kind"], crd["spec"]["names"]["kind"]);
        assert_eq!(entry["namespaced"], crd["spec"]["scope"] == "Namespaced");
        let has_status = crd["spec"]["versions"][0]["subresources"]["status"].is_object();
        let status = format!("{plural}/status");
        assert_eq!(
            served.iter().any(|r| r["name"] == status.as_str()),
            has_status,
            "{status}"
        );
    }
    assert_eq!(
        served.len(),
        crd_docs.len() + 3,
        "five kinds, three status subresources"
    );
    let groups = api.get_json("/apis").unwrap();
    assert!(groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["name"] == "clusterlink.net"));

    let examples = examples_dir();
    let out = api
        .kubectl(&["apply", "-f", examples.to_str().unwrap()])
        .unwrap();
    assert_eq!(out.matches(" created").count(), 5, "{out}");

    let docs = yaml_docs(&examples);
    let kinds: BTreeSet<&str> = docs.iter().map(|d| text(d, "/kind")).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "AccessPolicy",
            "Export",
            "Import",
            "Peer",
            "PrivilegedAccessPolicy"
        ])
    );
    for doc in &docs {
        let kind = text(doc, "/kind");
        let name = text(doc, "/metadata/name");
        let resource = format!("{}.clusterlink.net/{name}", kind.to_lowercase());
        let mut args = vec![resource.as_str()];
        if let Some(namespace) = doc.pointer("/metadata/namespace").and_then(Value::as_str) {
            args.extend(["-n", namespace]);
        }
        let got = get(&api, &args);
        assert_eq!(got["spec"], doc["spec"], "{kind} {name}");
        assert_eq!(got["apiVersion"], "clusterlink.net/v1alpha1");
        assert_eq!(got["metadata"]["namespace"], doc["metadata"]["namespace"]);
        assert!(resource_version(&got) > 0);
        assert!(got["metadata"]["uid"].is_string());
    }

    // The creating request, as the agent's tests will look for requests.
    let requests = api.requests().unwrap();
    let create = requests
        .iter()
        .find(|r| {
            r.method == "POST"
                && r.path == "/apis/clusterlink.net/v1alpha1/namespaces/default/imports"
        })
        .expect("kubectl created the Import with a POST");
    assert_eq!(create.json().unwrap()["spec"]["port"], 5000);

    // A typed list: its kind, and a resource version no older than its items.
    let list = api
        .get_json("/apis/clusterlink.net/v1alpha1/imports")
        .unwrap();
    assert_eq!(list["kind"], "ImportList");
    assert!(
        list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= resource_version(&list["items"][0])
    );

    // Applied again unchanged: kubectl patches nothing.
    let out = api
        .kubectl(&["apply", "-f", examples.to_str().unwrap()])
        .unwrap();
    assert_eq!(out.matches(" unchanged").count(), 5, "{out}");

    api.kubectl(&["delete", "-f", examples.to_str().unwrap()])
        .unwrap();
    let left = api
        .kubectl(&["get", "imports", "-A", "-o", "name"])
        .unwrap();
    assert_eq!(left.trim(), "");

    // SIGTERM ends it cleanly.
    assert!(api.stop().unwrap().success());
}

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: iperf3-server
  namespace: default
  labels:
    app.kubernetes.io/managed-by: clusterlink.net
    clusterlink.net/import-name: iperf3-server
    clusterlink.net/import-namespace: default
  ownerReferences:
  - apiVersion: clusterlink.net/v1alpha1
    kind: Import
    name: iperf3-server
    uid: 0b8a8d5e-56c3-4c9e-9d7a-1b2f0e6f6a11
    controller: true
spec:
  ports:
  - name: iperf3
    port: 5000
    targetPort: 15000
"#;

#[test]
fn server_side_apply_creates_merges_and_reports_conflicts() {
    let Some(api) = emulator("server-side apply of a Service") else {
        return;
    };
    api.kubectl_input(&["apply", "--server-side", "-f", "-"], SERVICE)
        .unwrap();
    let svc = get(&api, &["service", "iperf3-server"]);
    let labels = &svc["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/managed-by"], "clusterlink.net");
    assert_eq!(labels["clusterlink.net/import-name"], "iperf3-server");
    assert_eq!(
        svc["metadata"]["ownerReferences"][0]["uid"],
        "0b8a8d5e-56c3-4c9e-9d7a-1b2f0e6f6a11"
    );
    assert_eq!(svc["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 15000);
    let cluster_ip: std::net::Ipv4Addr = text(&svc, "/spec/clusterIP").parse().unwrap();
    assert_eq!(cluster_ip.octets()[..2], [10, 96], "{cluster_ip}");

    let apply = api
        .requests()
        .unwrap()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .expect("kubectl applied with a PATCH");
    assert_eq!(
        apply.path,
        "/api/v1/namespaces/default/services/iperf3-server"
    );
    assert_eq!(
        apply.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(apply.param("fieldManager"), Some("kubectl"));

    // Applied again without one label and with another port: the label the manager no longer
    // applies goes, the cluster IP stays.
    let changed = SERVICE
        .replace("    clusterlink.net/import-namespace: default\n", "")
        .replace("targetPort: 15000", "targetPort: 15001");
    api.kubectl_input(&["apply", "--server-side", "-f", "-"], &changed)
        .unwrap();
    let svc2 = get(&api, &["service", "iperf3-server"]);
    assert!(svc2["metadata"]["labels"]
        .get("clusterlink.net/import-namespace")
        .is_none());
    assert_eq!(svc2["spec"]["ports"][0]["targetPort"], 15001);
    assert_eq!(svc2["spec"]["clusterIP"], svc["spec"]["clusterIP"]);
    assert!(resource_version(&svc2) > resource_version(&svc));

    // Another manager may add a field, but not change one kubectl set, unless it forces.
    let other = "apiVersion: v1\nkind: Service\nmetadata:\n  name: iperf3-server\n  labels:\n    team: net\n";
    api.kubectl_input(
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "other",
            "-f",
            "-",
        ],
        other,
    )
    .unwrap();
    let svc3 = get(&api, &["service", "iperf3-server"]);
    assert_eq!(svc3["metadata"]["labels"]["team"], "net");
    assert_eq!(
        svc3["metadata"]["labels"]["clusterlink.net/import-name"],
        "iperf3-server"
    );
    let steal = "apiVersion: v1\nkind: Service\nmetadata:\n  name: iperf3-server\n  labels:\n    clusterlink.net/import-name: stolen\n";
    let err = api
        .kubectl_input(
            &[
                "apply",
                "--server-side",
                "--field-manager",
                "other",
                "-f",
                "-",
            ],
            steal,
        )
        .unwrap_err();
    assert!(format!("{err:#}").contains("conflict"), "{err:#}");
    api.kubectl_input(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            "other",
            "-f",
            "-",
        ],
        steal,
    )
    .unwrap();
    let svc4 = get(&api, &["service", "iperf3-server"]);
    assert_eq!(
        svc4["metadata"]["labels"]["clusterlink.net/import-name"],
        "stolen"
    );
}

#[test]
fn strategic_merge_patches_merge_keyed_lists() {
    let Some(api) = emulator("strategic merge patches") else {
        return;
    };
    // Client-side apply of a built-in kind sends a strategic merge patch with
    // $setElementOrder and $patch directives when a list element changes or goes.
    let service = |ports: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: s\nspec:\n  ports:\n{ports}")
    };
    api.kubectl_input(
        &["apply", "-f", "-"],
        &service("  - {name: a, port: 80, targetPort: 8080}\n  - {name: b, port: 81}\n"),
    )
    .unwrap();
    api.kubectl_input(
        &["apply", "-f", "-"],
        &service("  - {name: a, port: 80, targetPort: 9090}\n"),
    )
    .unwrap();
    let patch = api
        .requests()
        .unwrap()
        .into_iter()
        .rfind(|r| r.method == "PATCH")
        .unwrap();
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/strategic-merge-patch+json")
    );
    let svc = get(&api, &["service", "s"]);
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "a", "port": 80, "targetPort": 9090, "protocol": "TCP"}])
    );

    // A patch that names one container changes that one and keeps the rest.
    api.kubectl_input(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  \
         - {name: one, image: busybox, args: [sleep, '1']}\n  - {name: two, image: busybox}\n",
    )
    .unwrap();
    api.kubectl(&[
        "patch",
        "pod",
        "p",
        "--type=strategic",
        "-p",
        r#"{"spec":{"containers":[{"name":"two","image":"alpine"}]}}"#,
    ])
    .unwrap();
    let pod = get(&api, &["pod", "p"]);
    assert_eq!(
        pod["spec"]["containers"],
        json!([
            {"name": "one", "image": "busybox", "args": ["sleep", "1"]},
            {"name": "two", "image": "alpine"},
        ])
    );
}

#[test]
fn status_subresource_changes_only_status() {
    let Some(api) = emulator_with_crds("the status subresource") else {
        return;
    };
    let import = examples_dir().join("import.yaml");
    api.kubectl(&["apply", "-f", import.to_str().unwrap()])
        .unwrap();
    let before = get(&api, &["import", "iperf3-server"]);
    assert_eq!(before["metadata"]["generation"], 1);

    // Through /status: the spec in the patch is ignored.
    api.kubectl(&[
        "patch",
        "import",
        "iperf3-server",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"spec":{"port":1},"status":{"conditions":[{"type":"ImportServiceValid","status":"True","reason":"Created"}]}}"#,
    ])
    .unwrap();
    let patched = get(&api, &["import", "iperf3-server"]);
    assert_eq!(patched["spec"], before["spec"]);
    assert_eq!(
        patched["status"]["conditions"][0]["type"],
        "ImportServiceValid"
    );
    assert_eq!(patched["metadata"]["generation"], 1);
    assert!(resource_version(&patched) > resource_version(&before));
    let status = api
        .get_json("/apis/clusterlink.net/v1alpha1/namespaces/default/imports/iperf3-server/status")
        .unwrap();
    assert_eq!(status["status"], patched["status"]);

    // Through the object: the status in the patch is ignored, the spec's generation grows.
    api.kubectl(&[
        "patch",
        "import",
        "iperf3-server",
        "--type=merge",
        "-p",
        r#"{"spec":{"port":5001},"status":{"conditions":[]}}"#,
    ])
    .unwrap();
    let respec = get(&api, &["import", "iperf3-server"]);
    assert_eq!(respec["spec"]["port"], 5001);
    assert_eq!(respec["status"], patched["status"]);
    assert_eq!(respec["metadata"]["generation"], 2);

    // PUT to /status (kubectl replace --subresource status): again only the status.
    let mut replaced = respec.clone();
    replaced["spec"]["port"] = json!(7);
    replaced["status"]["conditions"][0]["status"] = json!("False");
    api.kubectl_input(
        &["replace", "--subresource=status", "-f", "-"],
        &replaced.to_string(),
    )
    .unwrap();
    let after = get(&api, &["import", "iperf3-server"]);
    assert_eq!(after["spec"]["port"], 5001);
    assert_eq!(after["status"]["conditions"][0]["status"], "False");

    // A PUT from a stale resource version is refused.
    let err = api
        .kubectl_input(&["replace", "-f", "-"], &replaced.to_string())
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("the object has been modified"),
        "{err:#}"
    );

    let puts: Vec<_> = api
        .requests()
        .unwrap()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .map(|r| r.path)
        .collect();
    assert_eq!(
        puts.first().map(String::as_str),
        Some("/apis/clusterlink.net/v1alpha1/namespaces/default/imports/iperf3-server/status")
    );
}

#[test]
fn kubectl_get_watch_prints_each_change() {
    let Some(api) = emulator_with_crds("kubectl get -w") else {
        return;
    };
    let mut cmd = api.kubectl_command(&[
        "get",
        "imports",
        "-w",
        "--output-watch-events",
        "-o",
        "json",
    ]);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut watch = ChildGuard::spawn(&mut cmd).unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // kubectl prints each event as one line of JSON.
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let event: Value = serde_json::from_str(&line.unwrap()).unwrap();
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    let next_event = || {
        let event = rx
            .recv_timeout(EVENT_TIMEOUT)
            .expect("kubectl printed an event");
        (
            text(&event, "/type").to_owned(),
            event["object"]["spec"]["port"].as_u64(),
        )
    };
    // kubectl lists first: wait until its watch is open, so no change falls before it.
    wait_for("kubectl's watch", EVENT_TIMEOUT, || {
        api.requests().unwrap().iter().any(|r| r.is_watch())
    })
    .unwrap();

    let import = examples_dir().join("import.yaml");
    api.kubectl(&["apply", "-f", import.to_str().unwrap()])
        .unwrap();
    assert_eq!(next_event(), ("ADDED".to_owned(), Some(5000)));
    api.kubectl(&[
        "patch",
        "import",
        "iperf3-server",
        "--type=merge",
        "-p",
        r#"{"spec":{"port":5002}}"#,
    ])
    .unwrap();
    assert_eq!(next_event(), ("MODIFIED".to_owned(), Some(5002)));
    api.kubectl(&["delete", "import", "iperf3-server"]).unwrap();
    assert_eq!(next_event(), ("DELETED".to_owned(), Some(5002)));
}

/// The example Import as the agent's own type.
fn example_import() -> Import {
    let text = std::fs::read_to_string(examples_dir().join("import.yaml")).unwrap();
    yaml_serde::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_watcher_sees_an_import_added_modified_and_deleted() {
    let Some(api) = emulator_with_crds("a kube-rs watcher of Imports") else {
        return;
    };
    let imports: Api<Import> = Api::namespaced(client(&api).await, "default");
    let mut events = watcher(imports.clone(), watcher::Config::default()).boxed();
    loop {
        if let watcher::Event::InitDone = next(&mut events, "the initial list").await.unwrap() {
            break;
        }
    }

    imports
        .create(&PostParams::default(), &example_import())
        .await
        .unwrap();
    let watcher::Event::Apply(added) = next(&mut events, "ADDED").await.unwrap() else {
        panic!("expected the created Import");
    };
    assert_eq!(added.spec.0.port, 5000);

    imports
        .patch(
            "iperf3-server",
            // Forced, as controllers apply: the create above made kube-rs's user agent the
            // owner of the spec, and a real server would report a conflict too.
            &PatchParams::apply("clink-agent").force(),
            &Patch::Apply(json!({
                "apiVersion": "clusterlink.net/v1alpha1",
                "kind": "Import",
                "spec": {"port": 5000, "targetPort": 16000, "sources": []},
            })),
        )
        .await
        .unwrap();
    let watcher::Event::Apply(modified) = next(&mut events, "MODIFIED").await.unwrap() else {
        panic!("expected the modified Import");
    };
    assert_eq!(modified.spec.0.target_port, 16000);
    assert!(modified.spec.0.sources.is_empty(), "apply replaces lists");

    imports
        .patch_status(
            "iperf3-server",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [
                {"type": "ImportTargetPortValid", "status": "True", "reason": "Leased"}
            ]}})),
        )
        .await
        .unwrap();
    let watcher::Event::Apply(with_status) = next(&mut events, "the status").await.unwrap() else {
        panic!("expected the Import with its status");
    };
    let status = with_status.status.expect("status");
    assert_eq!(status.conditions[0].reason, "Leased");

    imports
        .delete("iperf3-server", &DeleteParams::default())
        .await
        .unwrap();
    let watcher::Event::Delete(deleted) = next(&mut events, "DELETED").await.unwrap() else {
        panic!("expected the deleted Import");
    };
    assert_eq!(deleted.name_any(), "iperf3-server");

    // The watcher listed, then watched from the list's resource version.
    let requests = api.requests().unwrap();
    let path = "/apis/clusterlink.net/v1alpha1/namespaces/default/imports";
    let list = requests
        .iter()
        .find(|r| r.path == path && !r.is_watch())
        .unwrap();
    assert_eq!(list.param("limit"), Some("500"));
    let watch = requests
        .iter()
        .find(|r| r.path == path && r.is_watch())
        .unwrap();
    assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
    let watched_from: u64 = watch.param("resourceVersion").unwrap().parse().unwrap();
    assert!(watched_from > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_discovery_resolves_the_crds_and_the_built_in_kinds() {
    let Some(api) = emulator_with_crds("kube-rs discovery") else {
        return;
    };
    // The other way to point kube-rs at it: the URL alone (namespace "default").
    clink_agent::tls::install_process_provider();
    let client = Client::try_from(Config::new(api.url().parse().unwrap())).unwrap();
    let discovery = kube::Discovery::new(client).run().await.unwrap();
    let resolve = |group: &str, version: &str, kind: &str| {
        discovery
            .resolve_gvk(&kube::api::GroupVersionKind::gvk(group, version, kind))
            .unwrap_or_else(|| panic!("{group}/{version} {kind} not discovered"))
    };
    let (import, caps) = resolve("clusterlink.net", "v1alpha1", "Import");
    assert_eq!(import.plural, "imports");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    assert!(caps.supports_operation(kube::discovery::verbs::WATCH));
    assert!(caps.subresources.iter().any(|(r, _)| r.plural == "status"));
    let (_, caps) = resolve("clusterlink.net", "v1alpha1", "PrivilegedAccessPolicy");
    assert_eq!(caps.scope, kube::discovery::Scope::Cluster);
    assert!(caps.subresources.is_empty());
    for (group, kind) in [
        ("", "Pod"),
        ("", "Service"),
        ("", "Secret"),
        ("", "Event"),
        ("events.k8s.io", "Event"),
        ("coordination.k8s.io", "Lease"),
    ] {
        resolve(group, "v1", kind);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_from_a_resource_version_and_expires_after_compaction() {
    let Some(api) = emulator("watches from a resource version") else {
        return;
    };
    let maps: Api<ConfigMap> = Api::namespaced(client(&api).await, "default");
    let map = |name: &str| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name}, "data": {"k": "1"}})).unwrap()
    };
    let first = maps
        .create(&PostParams::default(), &map("first"))
        .await
        .unwrap();
    let since = first.resource_version().unwrap();
    maps.create(&PostParams::default(), &map("second"))
        .await
        .unwrap();
    maps.patch(
        "first",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "2"}})),
    )
    .await
    .unwrap();
    maps.delete("second", &DeleteParams::default())
        .await
        .unwrap();

    // Everything after `since`, in order, then the stream ends with timeoutSeconds.
    let events: Vec<_> = maps
        .watch(&WatchParams::default().timeout(1), &since)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let seen: Vec<(String, String)> = events
        .iter()
        .filter(|e| !matches!(e, WatchEvent::Bookmark(_)))
        .map(|e| match e {
            WatchEvent::Added(m) => ("ADDED".into(), m.name_any()),
            WatchEvent::Modified(m) => ("MODIFIED".into(), m.name_any()),
            WatchEvent::Deleted(m) => ("DELETED".into(), m.name_any()),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let expected = [
        ("ADDED", "second"),
        ("MODIFIED", "first"),
        ("DELETED", "second"),
    ]
    .map(|(t, n)| (t.to_owned(), n.to_owned()));
    assert_eq!(seen, expected);

    // From "0": the current objects.
    let events: Vec<_> = maps
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(
        matches!(events.as_slice(), [WatchEvent::Added(m), WatchEvent::Bookmark(_)] if m.name_any() == "first"),
        "{events:?}"
    );

    // After compaction the old version is gone: 410, as etcd's compaction gives.
    api.compact().unwrap();
    let mut stream = maps
        .watch(&WatchParams::default().timeout(1), &since)
        .await
        .unwrap()
        .boxed();
    match next(&mut stream, "the 410").await.unwrap() {
        WatchEvent::Error(e) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}

fn pod(name: &str, namespace: &str, node: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
         labels: {{app: {app}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    \
         image: busybox\n---\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_and_label_selectors_pick_a_nodes_pods_in_lists_and_watches() {
    let Some(api) = emulator("field-selected Pod lists and watches") else {
        return;
    };
    api.kubectl_input(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: other\n",
    )
    .unwrap();
    let pods = [
        pod("a1", "default", "node-a", "web"),
        pod("a2", "other", "node-a", "db"),
        pod("b1", "default", "node-b", "web"),
    ]
    .concat();
    api.kubectl_input(&["apply", "-f", "-"], &pods).unwrap();

    let all: Api<Pod> = Api::all(client(&api).await);
    let names = |list: kube::api::ObjectList<Pod>| -> Vec<String> {
        list.items.iter().map(ResourceExt::name_any).collect()
    };
    let on_a = all
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .unwrap();
    assert_eq!(names(on_a), ["a1", "a2"]);
    let web_not_a = all
        .list(
            &ListParams::default()
                .labels("app in (web,api)")
                .fields("spec.nodeName!=node-a"),
        )
        .await
        .unwrap();
    assert_eq!(names(web_not_a), ["b1"]);
    let by_name = all
        .list(&ListParams::default().fields("metadata.name=a2,metadata.namespace=other"))
        .await
        .unwrap();
    assert_eq!(names(by_name), ["a2"]);

    // A watcher of node-a's Pods, as the agent's Pod cache runs it.
    let config = watcher::Config::default().fields("spec.nodeName=node-a");
    let mut events = watcher(all.clone(), config).boxed();
    let mut initial = Vec::new();
    loop {
        match next(&mut events, "the initial list").await.unwrap() {
            watcher::Event::InitApply(p) => initial.push(p.name_any()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    initial.sort();
    assert_eq!(initial, ["a1", "a2"]);

    // A Pod on another node is not seen; the next one on node-a is.
    api.kubectl_input(
        &["apply", "-f", "-"],
        &pod("b2", "default", "node-b", "web"),
    )
    .unwrap();
    api.kubectl_input(
        &["apply", "-f", "-"],
        &pod("a3", "default", "node-a", "web"),
    )
    .unwrap();
    let watcher::Event::Apply(added) = next(&mut events, "a3").await.unwrap() else {
        panic!("expected a3");
    };
    assert_eq!(added.name_any(), "a3");
    api.kubectl(&["delete", "pod", "a1"]).unwrap();
    let watcher::Event::Delete(deleted) = next(&mut events, "a1 deleted").await.unwrap() else {
        panic!("expected a1 deleted");
    };
    assert_eq!(deleted.name_any(), "a1");

    let watch = api
        .requests()
        .unwrap()
        .into_iter()
        .find(|r| r.path == "/api/v1/pods" && r.is_watch())
        .unwrap();
    assert_eq!(watch.param("fieldSelector"), Some("spec.nodeName=node-a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_events_about_an_import_are_stored_and_counted() {
    let Some(api) = emulator_with_crds("Events from kube-rs's Recorder") else {
        return;
    };
    let client = client(&api).await;
    let imports: Api<Import> = Api::namespaced(client.clone(), "default");
    let import = imports
        .create(&PostParams::default(), &example_import())
        .await
        .unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "clink-agent".into(),
            instance: Some("node-a".into()),
        },
    );
    let event = Event {
        type_: EventType::Normal,
        reason: "PortLeased".into(),
        note: Some("target port 15000".into()),
        action: "Lease".into(),
        secondary: None,
    };
    let reference = import.object_ref(&());
    // The second, identical event becomes a series: kube-rs patches the stored one.
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();

    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    let stored = events.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(stored.len(), 1, "{stored:?}");
    let stored = &stored[0];
    assert_eq!(stored.reason.as_deref(), Some("PortLeased"));
    assert_eq!(stored.reporting_controller.as_deref(), Some("clink-agent"));
    let regarding = stored.regarding.as_ref().unwrap();
    assert_eq!(
        (regarding.kind.as_deref(), regarding.name.as_deref()),
        (Some("Import"), Some("iperf3-server"))
    );
    assert_eq!(stored.series.as_ref().map(|s| s.count), Some(2));

    let methods: Vec<_> = api
        .requests()
        .unwrap()
        .into_iter()
        .filter(|r| {
            r.path
                .starts_with("/apis/events.k8s.io/v1/namespaces/default/events")
        })
        .filter(|r| r.method != "GET")
        .map(|r| (r.method, r.content_type))
        .collect();
    assert_eq!(
        methods,
        [
            ("POST".to_owned(), Some("application/json".to_owned())),
            (
                "PATCH".to_owned(),
                Some("application/merge-patch+json".to_owned())
            ),
        ]
    );
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get("clink-leader")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.holder_identity)
}

async fn wait_leader(rx: &mut tokio::sync::watch::Receiver<bool>, who: &str) {
    tokio::time::timeout(EVENT_TIMEOUT, rx.wait_for(|leader| *leader))
        .await
        .unwrap_or_else(|_| panic!("{who} did not become leader"))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_passes_to_the_other_identity_after_release_and_after_expiry() {
    let Some(api) = emulator("a Lease held with kube-lease-manager") else {
        return;
    };
    let client = client(&api).await;
    let manager = |identity: &'static str| {
        LeaseManagerBuilder::new(client.clone(), "clink-leader")
            .with_namespace("default")
            .with_identity(identity)
            .with_duration(3)
            .with_grace(1)
            .build()
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");

    let (mut a_rx, a_task) = manager("agent-a").await.unwrap().watch().await;
    wait_leader(&mut a_rx, "agent-a").await;
    let (mut b_rx, b_task) = manager("agent-b").await.unwrap().watch().await;
    // Longer than the lease's duration: agent-a renews it, agent-b waits.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!*b_rx.borrow());
    assert_eq!(holder(&leases).await.as_deref(), Some("agent-a"));

    // agent-a lets go: its watch loop releases the Lease when nobody listens any more.
    drop(a_rx);
    a_task.await.unwrap().unwrap();
    wait_leader(&mut b_rx, "agent-b after the release").await;
    assert_eq!(holder(&leases).await.as_deref(), Some("agent-b"));

    // agent-b dies without releasing: agent-c takes over once the Lease expires.
    b_task.abort();
    let _ = b_task.await;
    let (mut c_rx, _c_task) = manager("agent-c").await.unwrap().watch().await;
    wait_leader(&mut c_rx, "agent-c after the expiry").await;
    let lease = leases.get("clink-leader").await.unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("agent-c"));
    assert!(spec.lease_transitions.unwrap() >= 2);

    // kube-lease-manager took the free Lease with server-side apply, each manager as a field
    // manager of its own, and renewed and released it with strategic merge patches.
    let requests = api.requests().unwrap();
    let patches: Vec<_> = requests
        .iter()
        .filter(|r| {
            r.method == "PATCH"
                && r.path == "/apis/coordination.k8s.io/v1/namespaces/default/leases/clink-leader"
        })
        .collect();
    let applies: Vec<_> = patches
        .iter()
        .filter(|r| r.content_type.as_deref() == Some("application/apply-patch+yaml"))
        .collect();
    let holders: Vec<String> = applies
        .iter()
        .map(|r| text(&r.json().unwrap(), "/spec/holderIdentity").to_owned())
        .collect();
    assert_eq!(holders, ["agent-a", "agent-b", "agent-c"]);
    let managers: BTreeSet<_> = applies.iter().map(|r| r.param("fieldManager")).collect();
    assert_eq!(managers.len(), 3, "{managers:?}");
    assert!(patches.iter().any(|r| {
        r.content_type.as_deref() == Some("application/strategic-merge-patch+json")
            && r.json().unwrap()["spec"]["holderIdentity"].is_null()
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_without_force_cannot_take_a_field_another_manager_holds() {
    let Some(api) = emulator("server-side apply conflicts through kube-rs") else {
        return;
    };
    let leases: Api<Lease> = Api::namespaced(client(&api).await, "default");
    let lease = |holder: &str| {
        Patch::Apply(json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15},
        }))
    };
    leases
        .patch("l", &PatchParams::apply("agent-a"), &lease("agent-a"))
        .await
        .unwrap();
    let err = leases
        .patch("l", &PatchParams::apply("agent-b"), &lease("agent-b"))
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => {
            assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"))
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // The same value is no conflict; force takes the field.
    leases
        .patch("l", &PatchParams::apply("agent-b"), &lease("agent-a"))
        .await
        .unwrap();
    let taken = leases
        .patch(
            "l",
            &PatchParams::apply("agent-b").force(),
            &lease("agent-b"),
        )
        .await
        .unwrap();
    assert_eq!(
        taken.spec.unwrap().holder_identity.as_deref(),
        Some("agent-b")
    );
}

#[test]
fn an_emulator_whose_test_process_dies_exits() {
    if !tools("an orphaned emulator") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The shell starts the emulator in the background, names itself as the emulator's parent
    // (as ApiServer does) and exits at once, as a test process killed with SIGKILL would.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#""$0" "$1" --listen 127.0.0.1:0 --ready-file "$2/ready" --request-log "$2/log" --parent-pid $$ >/dev/null 2>&1 & echo $!"#)
        .arg(clink_testbed::k8s_python_path())
        .arg(clink_testbed::apiserver_script())
        .arg(dir.path())
        .output()
        .unwrap();
    let pid = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    wait_for("the orphan to start", EVENT_TIMEOUT, || {
        dir.path().join("ready").exists()
    })
    .unwrap();
    wait_for("the orphan to exit", EVENT_TIMEOUT, || {
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    })
    .unwrap();
}

#[test]
fn emulators_run_side_by_side_and_inside_a_network_namespace() {
    if !tools("emulators in a network namespace")
        || !require_root("emulators in a network namespace")
    {
        return;
    }
    let netns = Netns::new("kapi").unwrap();
    let inside = ApiServer::start(Some(&netns), "127.0.0.1:6443".parse().unwrap()).unwrap();
    let outside = ApiServer::start(None, loopback()).unwrap();
    assert_eq!(inside.addr().port(), 6443);

    inside
        .kubectl_input(
            &["create", "-f", "-"],
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: only-inside\ndata:\n  k: v\n",
        )
        .unwrap();
    // What kubectl's generators send, protobuf, is refused with a hint.
    let err = inside
        .kubectl(&["create", "configmap", "generated", "--from-literal=k=v"])
        .unwrap_err();
    assert!(format!("{err:#}").contains("not protobuf"), "{err:#}");
    assert_eq!(
        get(&inside, &["configmap", "only-inside"])["data"]["k"],
        "v"
    );
    let err = outside
        .kubectl(&["get", "configmap", "only-inside"])
        .unwrap_err();
    assert!(format!("{err:#}").contains("not found"), "{err:#}");
    assert!(outside
        .requests()
        .unwrap()
        .iter()
        .all(|r| r.path != "/api/v1/namespaces/default/configmaps" || r.method != "POST"));

    assert!(inside.stop().unwrap().success());
    drop(netns);
}
