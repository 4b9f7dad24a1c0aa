//! Kubernetes mode end to end: the real `clink-agent` binaries in network-namespace clusters,
//! each cluster with its own API server emulator (tests/k8s/apiserver.py, run inside the
//! cluster's namespace), objects applied with the real kubectl, traffic between pods and
//! services checked by SHA-256.
//!
//! What the emulator does not do, and these tests therefore do not rely on (the chart's
//! manifests are checked against the real schemas in tests/tests/chart.rs, the exact requests
//! in clink-agent's k8s::leader unit tests, the emulator itself in tests/tests/k8s_api.rs):
//! - no kube-proxy: the emulator gives Services a ClusterIP but nothing routes it, so pods
//!   here reach the Import at their node's address and `targetPort`, where kube-proxy would
//!   deliver a ClusterIP connection (`internalTrafficPolicy: Local`);
//! - no admission and no CRD schema validation: the invalid objects below are ones the schema
//!   accepts and the agent refuses;
//! - no garbage collection through owner references: the Service of a deleted Import
//!   disappears because the leading agent deletes it;
//! - no kubelet: Pods are objects the test writes (node, IP, labels) for pod network
//!   namespaces it made itself;
//! - no RBAC: what the agent may do is the chart's ClusterRole and Role (chart.rs).

use std::{net::SocketAddr, thread::sleep, time::Duration};

use anyhow::{Context as _, Result};
use clink_testbed::{
    bin_path, make_certificates, pod, require_root, two_clusters, wait_for, ApiServer, Netns, Pod,
    Topology,
};
use clink_tests::{
    connect_in, listen_in, refused_at, sample, scrape_at, transfer_both_ways, Agent, Sockets,
    SockmapSandbox, SockmapSetup, FABRIC, GATEWAY_PORT,
};
use serde_json::Value;

/// The agents' namespace (Peers, the Lease).
const SYSTEM: &str = "clusterlink-system";
/// Where the application's objects live.
const APP: &str = "shop";
/// The emulator listens on every address of its cluster's namespace; kubectl reaches it at
/// 127.0.0.1, the agents at [`AGENT_API`], so a test can cut the agents off alone.
const API: &str = "0.0.0.0:6443";
const AGENT_API: &str = "127.0.0.2:6443";
/// Short, so that a failover test does not wait long.
const LEASE_SECONDS: u64 = 4;

fn k8s_ready(what: &str) -> bool {
    require_root(what)
        && clink_testbed::require_k8s_tool(&clink_testbed::kubectl_path(), what)
        && clink_testbed::require_k8s_tool(&clink_testbed::k8s_python_path(), what)
}

/// One cluster: its API emulator (CRDs applied with kubectl, as `helm install` does).
fn api_server(ns: &Netns) -> Result<ApiServer> {
    let api = ApiServer::start(Some(ns), API.parse()?)?;
    let crds = clink_testbed::chart_crds_dir();
    api.kubectl(&["apply", "-f", &crds.display().to_string()])?;
    api.kubectl_input(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {SYSTEM}}}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {{name: {APP}}}\n"
        ),
    )?;
    Ok(api)
}

/// An agent in Kubernetes mode in `ns`, for `node`, as the chart's DaemonSet pod `pod_name`.
fn k8s_agent(
    name: &str,
    ns: &Netns,
    dir: &std::path::Path,
    certs: &std::path::Path,
    api: &ApiServer,
    (node, pod_name, gateway, metrics): (&str, &str, u16, u16),
    hooks: Option<(&SockmapSetup, std::net::Ipv4Addr)>,
) -> Result<Agent> {
    let mut agent = Agent::new(name, ns, &dir.join(pod_name), certs, gateway)?;
    agent.args = [
        "--mode",
        "kubernetes",
        "--namespace",
        SYSTEM,
        "--node-name",
        node,
        "--pod-name",
        pod_name,
        "--agent-selector",
        "app.kubernetes.io/name=clusterlink",
        "--lease-duration",
        &LEASE_SECONDS.to_string(),
        "--metrics",
        &format!("127.0.0.1:{metrics}"),
    ]
    .map(str::to_owned)
    .to_vec();
    // The connect hooks (sockmap path) in the cluster's own cgroup, pods reaching the agent at
    // the node's address: as the chart runs it.
    if let Some((setup, node_address)) = hooks {
        agent.sockmap = Some(setup.clone());
        agent
            .args
            .extend(["--node-address".to_owned(), node_address.to_string()]);
    }
    // The harness's kubeconfig, pointed at the agents' address of the emulator.
    let kubeconfig = dir.join(format!("{pod_name}.kubeconfig"));
    let text = std::fs::read_to_string(api.kubeconfig())?;
    let server = api.url();
    anyhow::ensure!(text.contains(&server), "no {server} in the kubeconfig");
    std::fs::write(
        &kubeconfig,
        text.replace(&server, &format!("http://{AGENT_API}")),
    )?;
    agent.env = vec![("KUBECONFIG".to_owned(), kubeconfig.display().to_string())];
    agent.start()?;
    Ok(agent)
}

/// `kubectl get <what> -o json`, parsed; `None` when it does not exist.
fn get(api: &ApiServer, args: &[&str]) -> Option<Value> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    api.kubectl(&all)
        .ok()
        .and_then(|out| serde_json::from_str(&out).ok())
}

/// The condition `type_` of an object's status: (status, reason, message).
fn condition(object: &Value, type_: &str) -> Option<(String, String, String)> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (s("status"), s("reason"), s("message"))
        })
}

/// [`wait_condition`] on an Import's `ImportTargetPortValid`, for up to 30 s.
fn wait_import_port(api: &ApiServer, name: &str, status: &str) -> Result<(String, String, String)> {
    wait_condition(
        api,
        &["import", name, "-n", APP],
        "ImportTargetPortValid",
        status,
        Duration::from_secs(30),
    )
}

/// Waits until `object` (kubectl get args) has condition `type_` with `status`; returns it.
fn wait_condition(
    api: &ApiServer,
    args: &[&str],
    type_: &str,
    status: &str,
    within: Duration,
) -> Result<(String, String, String)> {
    let mut last = None;
    wait_for(&format!("{args:?} {type_}={status}"), within, || {
        last = get(api, args).and_then(|o| condition(&o, type_));
        last.as_ref().is_some_and(|(s, _, _)| s == status)
    })
    .with_context(|| format!("last seen: {last:?}"))?;
    Ok(last.expect("set when the wait succeeded"))
}

/// Writes a Pod object for a pod network namespace the test made, as the kubelet would report
/// it: scheduled on `node`, running at the pod's address, with `labels`.
fn register_pod(api: &ApiServer, name: &str, node: &str, pod: &Pod, app: &str) -> Result<()> {
    api.kubectl_input(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {APP}\n  \
             labels: {{app: {app}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {app}\n  \
             containers: [{{name: c, image: none}}]\n"
        ),
    )?;
    let status = format!(
        r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#,
        ip = pod.ip()
    );
    api.kubectl(&[
        "patch",
        "pod",
        name,
        "-n",
        APP,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status,
    ])?;
    Ok(())
}

/// Two clusters in Kubernetes mode: `peer-a` imports from `peer-b`.
struct Clusters {
    // Agents first: they stop before the emulators they talk to and the namespaces go.
    a: Agent,
    b: Agent,
    /// Cluster a's cgroup and pin directory when its agent runs the connect hooks.
    sandbox: Option<SockmapSandbox>,
    api_a: ApiServer,
    api_b: ApiServer,
    topo: Topology,
    _dir: tempfile::TempDir,
}

impl Clusters {
    fn start() -> Result<Clusters> {
        Self::start_with(false)
    }

    /// `hooks`: cluster a's agent runs the sockmap path's connect hooks in a cgroup of its
    /// own, with the node address for pods.
    fn start_with(hooks: bool) -> Result<Clusters> {
        let topo = two_clusters()?;
        let sandbox = hooks.then(|| SockmapSandbox::new("k8s-a")).transpose()?;
        let dir = tempfile::Builder::new().prefix("clink-k8s-").tempdir()?;
        let certs = dir.path().join("certs");
        make_certificates(&bin_path("clink")?, &certs, FABRIC, &["peer-a", "peer-b"])?;
        let api_a = api_server(topo.a().netns())?;
        let api_b = api_server(topo.b().netns())?;
        let a = k8s_agent(
            "peer-a",
            topo.a().netns(),
            dir.path(),
            &certs,
            &api_a,
            ("node-a", "clusterlink-a1", GATEWAY_PORT, 9090),
            sandbox.as_ref().map(|s| (&s.setup, topo.a().ip())),
        )?;
        let b = k8s_agent(
            "peer-b",
            topo.b().netns(),
            dir.path(),
            &certs,
            &api_b,
            ("node-b", "clusterlink-b1", GATEWAY_PORT, 9090),
            None,
        )?;
        Ok(Clusters {
            a,
            b,
            sandbox,
            api_a,
            api_b,
            topo,
            _dir: dir,
        })
    }
}

impl Clusters {
    /// Cluster b: a service listening in its namespace, exported as `svc` to peer-a, whose
    /// clients every policy of b allows.
    fn export_from_b(&self) -> Result<std::net::TcpListener> {
        let service = listen_in(self.topo.b().netns())?;
        let target = service.local_addr()?;
        apply(
            &self.api_b,
            &(peer_yaml("peer-a", self.topo.a().ip())
                + &export_yaml("svc", target.ip(), target.port())
                + &allow_yaml("allow-all", "{}")),
        )?;
        Ok(service)
    }
}

/// `kubectl apply -f -` of `yaml`.
fn apply(api: &ApiServer, yaml: &str) -> Result<()> {
    api.kubectl_input(&["apply", "-f", "-"], yaml).map(drop)
}

/// ClusterLink objects as users write them (docs/examples), in [`APP`] unless a Peer.
fn peer_yaml(name: &str, ip: std::net::Ipv4Addr) -> String {
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata:\n  name: {name}\n  \
         namespace: {SYSTEM}\nspec:\n  gateways:\n  - host: {ip}\n    port: {GATEWAY_PORT}\n---\n"
    )
}

fn export_yaml(name: &str, host: impl std::fmt::Display, port: u16) -> String {
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata:\n  name: {name}\n  \
         namespace: {APP}\nspec:\n  host: {host}\n  port: {port}\n---\n"
    )
}

/// An Import of peer-b's `export`; `target_port` 0 leaves it to the agents to lease. Fixed
/// ports in these tests lie below the kernel's ephemeral range (32768-60999, also in a new
/// network namespace): inside it, one of the agent's own outgoing connections can hold the
/// port when its listener binds ("Address already in use", seen in CI).
fn import_yaml(name: &str, port: u16, target_port: u16, export: &str) -> String {
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata:\n  name: {name}\n  \
         namespace: {APP}\nspec:\n  port: {port}\n  targetPort: {target_port}\n  sources:\n  \
         - peer: peer-b\n    exportName: {export}\n    exportNamespace: {APP}\n---\n"
    )
}

/// An AccessPolicy allowing clients that match `from` (a YAML flow map of attributes).
fn allow_yaml(name: &str, from: &str) -> String {
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: AccessPolicy\nmetadata:\n  name: {name}\n  \
         namespace: {APP}\nspec:\n  action: allow\n  from: [{{workloadSelector: {{matchLabels: {from}}}}}]\n  \
         to: [{{workloadSelector: {{}}}}]\n---\n"
    )
}

/// The import's Service: named after it, `spec.port` to the leased `targetPort` on the agents,
/// owned by the Import; pods' labels decide a label-based policy; status conditions appear;
/// deleting the Import removes its Service.
#[test]
fn an_import_becomes_a_service_and_pods_labels_decide_access() -> Result<()> {
    if !k8s_ready("Kubernetes mode end to end") {
        return Ok(());
    }
    let c = Clusters::start()?;
    let service = c.export_from_b()?;
    // Cluster a: the Import without targetPort (leased and written back), and a policy that
    // lets only clients labelled app=front out.
    apply(
        &c.api_a,
        &(peer_yaml("peer-b", c.topo.b().ip())
            + &import_yaml("svc", 8080, 0, "svc")
            + &allow_yaml("front-only", "{client.clusterlink.net/labels.app: front}")),
    )?;

    // The leased port is written back, and the Service follows it.
    let mut leased = 0;
    wait_for(
        "the leased targetPort in the Import's spec",
        Duration::from_secs(30),
        || {
            leased = get(&c.api_a, &["import", "svc", "-n", APP])
                .and_then(|i| i["spec"]["targetPort"].as_u64())
                .unwrap_or(0);
            leased != 0
        },
    )?;
    let mut svc = Value::Null;
    wait_for("the Import's Service", Duration::from_secs(30), || {
        svc = get(&c.api_a, &["service", "svc", "-n", APP]).unwrap_or(Value::Null);
        !svc.is_null()
    })?;
    let import = get(&c.api_a, &["import", "svc", "-n", APP]).context("the Import")?;
    let labels = &svc["metadata"]["labels"];
    assert_eq!(
        labels["app.kubernetes.io/managed-by"], "clusterlink.net",
        "{svc}"
    );
    assert_eq!(labels["clusterlink.net/import-name"], "svc");
    assert_eq!(labels["clusterlink.net/import-namespace"], APP);
    let owner = &svc["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "Import");
    assert_eq!(owner["uid"], import["metadata"]["uid"], "{svc}");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], leased);
    assert_eq!(
        svc["spec"]["selector"]["app.kubernetes.io/name"],
        "clusterlink"
    );
    assert_eq!(svc["spec"]["internalTrafficPolicy"], "Local");
    let ssa = c
        .api_a
        .requests()?
        .into_iter()
        .find(|r| r.method == "PATCH" && r.path == format!("/api/v1/namespaces/{APP}/services/svc"))
        .context("no PATCH of the Service")?;
    assert_eq!(
        ssa.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(ssa.param("fieldManager"), Some("clusterlink-agent"));

    // Status, written by the leader of each cluster.
    wait_condition(
        &c.api_a,
        &["peer", "peer-b", "-n", SYSTEM],
        "PeerReachable",
        "True",
        Duration::from_secs(30),
    )?;
    let (_, reason, message) = wait_import_port(&c.api_a, "svc", "True")?;
    assert!(message.contains(&leased.to_string()), "{reason}: {message}");
    assert_eq!(reason, "Leased", "{message}");
    wait_condition(
        &c.api_b,
        &["export", "svc", "-n", APP],
        "ExportValid",
        "True",
        Duration::from_secs(30),
    )?;

    // Pods of node a: the front pod's connection flows, intact both ways; the back pod's is
    // refused by the label-based policy.
    let front = pod(c.topo.a())?;
    let back = pod(c.topo.a())?;
    register_pod(&c.api_a, "front-1", "node-a", &front, "front")?;
    register_pod(&c.api_a, "back-1", "node-a", &back, "back")?;
    let import_addr = SocketAddr::from((c.topo.a().ip(), u16::try_from(leased)?));
    // The pod watch delivers the pods shortly after they are written.
    sleep(Duration::from_secs(1));
    let client = connect_in(front.netns(), import_addr)?;
    transfer_both_ways(service, client, 4 << 20);
    assert!(
        refused_at(back.netns(), import_addr),
        "a pod without app=front got through"
    );
    let metrics = scrape_at(c.topo.a().netns(), 9090)?;
    assert!(
        sample(
            &metrics,
            "clink_policy_decisions_total{direction=\"egress\",action=\"deny\",tier=\"default\"}"
        ) >= 1.0,
        "{metrics}"
    );

    // Deleting the Import removes its Service and its listener.
    c.api_a.kubectl(&["delete", "import", "svc", "-n", APP])?;
    wait_for(
        "the Service to go with its Import",
        Duration::from_secs(30),
        || get(&c.api_a, &["service", "svc", "-n", APP]).is_none(),
    )?;
    wait_for("the listener to close", Duration::from_secs(10), || {
        !listening(front.netns(), import_addr)
    })?;
    drop(c.b);
    Ok(())
}

/// Objects the agent refuses get a False condition with the reason and an Event, and nothing
/// else is affected; a Service of the Import's name that the agents did not make is left
/// alone and reported.
/// On the kernel path, a pod's connection to the Import's Service address (its ClusterIP)
/// reaches the node's agent through the connect hook: every agent follows the Services the
/// leader keeps and makes their cluster IPs the Imports' service addresses. There is no
/// kube-proxy here (see the top of the file), so nothing else could deliver that connection.
#[test]
fn a_pod_reaches_the_imports_cluster_ip_through_the_connect_hook() -> Result<()> {
    if !k8s_ready("Kubernetes mode: ClusterIP through the connect hook") {
        return Ok(());
    }
    let c = Clusters::start_with(true)?;
    let service = c.export_from_b()?;
    apply(
        &c.api_a,
        &(peer_yaml("peer-b", c.topo.b().ip())
            + &import_yaml("svc", 8080, 0, "svc")
            + &allow_yaml("allow-all", "{}")),
    )?;
    let (mut cluster_ip, mut leased) = (String::new(), 0);
    wait_for(
        "the Service's clusterIP and the leased port",
        Duration::from_secs(30),
        || {
            cluster_ip = get(&c.api_a, &["service", "svc", "-n", APP])
                .and_then(|s| s["spec"]["clusterIP"].as_str().map(str::to_owned))
                .unwrap_or_default();
            leased = get(&c.api_a, &["import", "svc", "-n", APP])
                .and_then(|i| i["spec"]["targetPort"].as_u64())
                .unwrap_or(0);
            !cluster_ip.is_empty() && leased != 0
        },
    )?;
    let service_addr = SocketAddr::new(cluster_ip.parse()?, 8080);
    let leased = u16::try_from(leased)?;
    wait_for(
        "the ClusterIP in the agent's service table",
        Duration::from_secs(30),
        || {
            c.a.bpf().is_ok_and(|b| {
                b.services
                    .iter()
                    .any(|s| s.service == service_addr && s.listener_port == leased)
            })
        },
    )?;
    assert!(c
        .a
        .log()
        .contains("service addresses of the Import follow its Service"));

    let sandbox = c.sandbox.as_ref().context("cluster a's cgroup")?;
    let pod = pod(c.topo.a())?;
    let sockets = Sockets::start(pod.netns(), &sandbox.setup.cgroup)?;
    let client = sockets.connect(service_addr)?;
    assert_eq!(
        client.peer_addr()?,
        SocketAddr::from((c.topo.a().ip(), leased)),
        "the connect to {service_addr} went to the agent's listener at the node address"
    );
    transfer_both_ways(service, client, 4 << 20);

    // The Import's deletion takes its Service and the address with it.
    c.api_a.kubectl(&["delete", "import", "svc", "-n", APP])?;
    wait_for(
        "the ClusterIP gone from the service table",
        Duration::from_secs(30),
        || {
            c.a.bpf()
                .is_ok_and(|b| !b.services.iter().any(|s| s.service == service_addr))
        },
    )?;
    Ok(())
}

#[test]
fn bad_objects_and_foreign_services_are_reported_not_served() -> Result<()> {
    if !k8s_ready("Kubernetes mode: bad input") {
        return Ok(());
    }
    let c = Clusters::start()?;
    apply(
        &c.api_a,
        &(peer_yaml("peer-b", c.topo.b().ip()) + &import_yaml("good", 8080, 31000, "svc")),
    )?;
    wait_import_port(&c.api_a, "good", "True")?;
    // Valid under the CRD's schema, refused by the agent: the port is the other Import's.
    apply(&c.api_a, &import_yaml("clash", 9000, 31000, "svc"))?;
    let (_, reason, message) = wait_import_port(&c.api_a, "clash", "False")?;
    assert_eq!(reason, "InvalidSpec");
    assert!(
        message.contains("31000") && message.contains("good"),
        "{message}"
    );
    let mut events = Value::Null;
    wait_for(
        "a Warning Event on the refused Import",
        Duration::from_secs(30),
        || {
            events = c
                .api_a
                .get_json(&format!("/apis/events.k8s.io/v1/namespaces/{APP}/events"))
                .unwrap_or(Value::Null);
            events["items"].as_array().is_some_and(|items| {
                items.iter().any(|e| {
                    e["regarding"]["name"] == "clash"
                        && e["reason"] == "InvalidSpec"
                        && e["type"] == "Warning"
                })
            })
        },
    )
    .with_context(|| format!("events: {events}"))?;
    // The good Import still serves and its Service is there.
    assert!(get(&c.api_a, &["service", "good", "-n", APP]).is_some());
    assert!(listening(
        c.topo.a().netns(),
        SocketAddr::from(([127, 0, 0, 1], 31000))
    ));

    // A Service the user made, then an Import of the same name.
    c.api_a.kubectl_input(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: taken\n  namespace: {APP}\n  \
             labels: {{owner: someone-else}}\nspec:\n  ports: [{{port: 5432}}]\n  \
             selector: {{app: db}}\n"
        ),
    )?;
    apply(&c.api_a, &import_yaml("taken", 7000, 0, "svc"))?;
    let (_, reason, message) = wait_condition(
        &c.api_a,
        &["import", "taken", "-n", APP],
        "ImportServiceValid",
        "False",
        Duration::from_secs(30),
    )?;
    assert_eq!(reason, "ServiceExists", "{message}");
    let theirs = get(&c.api_a, &["service", "taken", "-n", APP]).context("their Service")?;
    assert_eq!(theirs["metadata"]["labels"]["owner"], "someone-else");
    assert!(theirs["metadata"]["labels"]["app.kubernetes.io/managed-by"].is_null());
    assert_eq!(theirs["spec"]["ports"][0]["port"], 5432);
    assert!(theirs["metadata"]["ownerReferences"].is_null(), "{theirs}");
    let metrics = scrape_at(c.topo.a().netns(), 9090)?;
    assert_eq!(sample(&metrics, "clink_kubernetes_invalid_objects"), 1.0);
    Ok(())
}

/// The API server going away does not take the agent's objects with it: traffic keeps
/// flowing, the agent says so in its log and a metric, and catches up when it answers again
/// (a deletion made meanwhile takes effect).
/// An Import whose `targetPort` another socket on the node holds is reported, then served
/// once the port is free, without being applied again: the kernel can hand a port in the
/// ephemeral range to one of the node's outgoing connections at any time.
#[test]
fn an_import_whose_port_is_taken_listens_once_it_is_free() -> Result<()> {
    if !k8s_ready("Kubernetes mode: a busy targetPort") {
        return Ok(());
    }
    let c = Clusters::start()?;
    let ns = c.topo.a().netns();
    let holder = ns.enter(|| std::net::TcpListener::bind(("0.0.0.0", 31003)))?;
    apply(
        &c.api_a,
        &(peer_yaml("peer-b", c.topo.b().ip()) + &import_yaml("late", 8080, 31003, "svc")),
    )?;
    let (_, reason, message) = wait_import_port(&c.api_a, "late", "False")?;
    assert_eq!(reason, "PortInUse");
    assert!(
        message.contains("31003") && message.contains("in use"),
        "{message}"
    );
    assert!(c
        .a
        .log()
        .contains("port in use on this node; applying it again"));

    drop(holder);
    wait_import_port(&c.api_a, "late", "True").with_context(|| c.a.log())?;
    assert!(listening(ns, SocketAddr::from(([127, 0, 0, 1], 31003))));
    let log = c.a.log();
    assert!(log.contains("applied: its port is free now"), "{log}");
    // One warning, not one per retry.
    assert_eq!(log.matches("port in use on this node").count(), 1, "{log}");
    Ok(())
}

#[test]
fn an_unreachable_api_server_leaves_the_last_objects_serving() -> Result<()> {
    if !k8s_ready("Kubernetes mode: API server outage") {
        return Ok(());
    }
    let c = Clusters::start()?;
    let service = c.export_from_b()?;
    // "old" imports an export b does not have: probes of its listener never reach the
    // service, whose accept queue the transfers below read.
    apply(
        &c.api_a,
        &(peer_yaml("peer-b", c.topo.b().ip())
            + &import_yaml("svc", 31001, 31001, "svc")
            + &import_yaml("old", 31002, 31002, "none")
            + &allow_yaml("allow-all", "{}")),
    )?;
    wait_condition(
        &c.api_a,
        &["peer", "peer-b", "-n", SYSTEM],
        "PeerReachable",
        "True",
        Duration::from_secs(30),
    )?;
    let addr = SocketAddr::from(([127, 0, 0, 1], 31001));
    for name in ["svc", "old"] {
        wait_import_port(&c.api_a, name, "True")?;
    }

    // Cluster a's agent loses its API server: new connections are refused, open ones
    // (its watches) are cut.
    let ns = c.topo.a().netns();
    let block = [
        "INPUT",
        "-d",
        "127.0.0.2",
        "-p",
        "tcp",
        "--dport",
        "6443",
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ];
    run(ns.command("iptables").arg("-A").args(block))?;
    run(ns
        .command("ss")
        .args(["-K", "dst", "127.0.0.2", "dport", "=", "6443"]))?;
    wait_for(
        "the watch to be marked down",
        Duration::from_secs(30),
        || {
            scrape_at(ns, 9090).is_ok_and(|m| {
                sample(
                    &m,
                    "clink_kubernetes_watch_up{resource=\"clusterlink.net/imports\"}",
                ) == 0.0
            })
        },
    )?;
    c.a.wait_log("serving the objects last seen")?;
    transfer_both_ways(service.try_clone()?, connect_in(ns, addr)?, 1 << 20);
    // Meanwhile an operator deletes an Import.
    c.api_a.kubectl(&["delete", "import", "old", "-n", APP])?;
    assert!(listening(ns, SocketAddr::from(([127, 0, 0, 1], 31002))));

    // The API server answers again: the agent catches up and drops the Import.
    run(ns.command("iptables").arg("-D").args(block))?;
    wait_for("the agent to catch up", Duration::from_secs(60), || {
        !listening(ns, SocketAddr::from(([127, 0, 0, 1], 31002)))
    })
    .with_context(|| c.a.log())?;
    wait_for("the watch to be marked up", Duration::from_secs(30), || {
        scrape_at(ns, 9090).is_ok_and(|m| {
            sample(
                &m,
                "clink_kubernetes_watch_up{resource=\"clusterlink.net/imports\"}",
            ) == 1.0
        })
    })?;
    transfer_both_ways(service, connect_in(ns, addr)?, 1 << 20);
    Ok(())
}

/// Whether something listens at `addr` in `ns`: a connection the agent resets at once (a
/// refused tunnel) still shows a listener; only a refused connect does not.
fn listening(ns: &Netns, addr: SocketAddr) -> bool {
    match connect_in(ns, addr) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::ConnectionRefused,
    }
}

/// Runs a command to completion; fails with its stderr.
fn run(cmd: &mut std::process::Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Cluster a with its API server and two agents, on node-1 and node-2 (`agent-1`, `agent-2`,
/// metrics on 9091 and 9092), once one of them holds the Lease and `clink status` of both
/// agrees; the last item is the leader's index in the agents.
fn leader_cluster() -> Result<(Topology, tempfile::TempDir, ApiServer, Vec<Agent>, usize)> {
    let topo = two_clusters()?;
    let ns = topo.a().netns();
    let dir = tempfile::Builder::new().prefix("clink-k8s-").tempdir()?;
    let certs = dir.path().join("certs");
    make_certificates(&bin_path("clink")?, &certs, FABRIC, &["peer-a"])?;
    let api = api_server(ns)?;
    let agents = vec![
        k8s_agent(
            "peer-a",
            ns,
            dir.path(),
            &certs,
            &api,
            ("node-1", "agent-1", 8441, 9091),
            None,
        )?,
        k8s_agent(
            "peer-a",
            ns,
            dir.path(),
            &certs,
            &api,
            ("node-2", "agent-2", 8442, 9092),
            None,
        )?,
    ];
    let mut leader = None;
    wait_for("a leader", Duration::from_secs(30), || {
        leader = lease_holder(&api);
        leader.is_some()
    })?;
    let leader = usize::from(leader.as_deref() != Some("agent-1"));
    let statuses: Vec<Option<bool>> = agents
        .iter()
        .map(|a| a.status().map(|s| s.leader).unwrap_or_default())
        .collect();
    wait_for(
        "clink status to agree with the Lease",
        Duration::from_secs(10),
        || {
            agents[leader]
                .status()
                .is_ok_and(|s| s.leader == Some(true))
                && agents[1 - leader]
                    .status()
                    .is_ok_and(|s| s.leader == Some(false))
        },
    )
    .with_context(|| format!("{statuses:?}"))?;
    Ok((topo, dir, api, agents, leader))
}

/// Who holds the agents' Lease, if anyone.
fn lease_holder(api: &ApiServer) -> Option<String> {
    get(api, &["lease", "clusterlink-agent", "-n", SYSTEM])
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
}

/// Two agents of one cluster: one holds the Lease and writes status; when it dies (SIGKILL,
/// no release), the other takes the Lease within its duration and writes status from then on.
#[test]
fn another_agent_takes_over_when_the_leader_dies() -> Result<()> {
    if !k8s_ready("Kubernetes mode: leader failover") {
        return Ok(());
    }
    let (topo, _dir, api, mut agents, dead) = leader_cluster()?;
    let ns = topo.a().netns();
    let survivor = 1 - dead;
    let export = |name: &str| export_yaml(name, "10.9.9.9", 80);
    apply(&api, &export("before"))?;
    wait_condition(
        &api,
        &["export", "before", "-n", APP],
        "ExportValid",
        "True",
        Duration::from_secs(30),
    )?;

    agents[dead].kill()?;
    let killed = std::time::Instant::now();
    let survivor_name = if survivor == 0 { "agent-1" } else { "agent-2" };
    wait_for(
        "the survivor to take the Lease",
        Duration::from_secs(LEASE_SECONDS * 3 + 10),
        || lease_holder(&api).as_deref() == Some(survivor_name),
    )?;
    let took = killed.elapsed();
    eprintln!(
        "the survivor took the Lease {took:?} after the leader was killed ({LEASE_SECONDS}s lease)"
    );
    assert!(
        // The Lease expires at most one duration after the last renewal; the survivor's next
        // try comes within a grace period. Twice the duration leaves room for a busy machine.
        took <= Duration::from_secs(LEASE_SECONDS * 2),
        "takeover took {took:?} with a {LEASE_SECONDS}s lease"
    );
    apply(&api, &export("after"))?;
    wait_condition(
        &api,
        &["export", "after", "-n", APP],
        "ExportValid",
        "True",
        Duration::from_secs(30),
    )?;
    assert_eq!(agents[survivor].status()?.leader, Some(true));
    let metrics = scrape_at(ns, if survivor == 0 { 9091 } else { 9092 })?;
    assert_eq!(sample(&metrics, "clink_kubernetes_leader"), 1.0);
    drop(agents);
    Ok(())
}

/// A leader told to stop (SIGTERM, as a rolling update does) releases the Lease on its way
/// out: the object has no holder once the process has exited, where a killed leader's name
/// stays until the Lease expires, and the other agent takes it over.
/// Not covered (the emulator has no clock-driven behaviour of its own): how soon the other
/// agent looks again, which is kube-lease-manager's schedule (at the Lease's expiry time).
#[test]
fn a_terminated_leader_releases_the_lease() -> Result<()> {
    if !k8s_ready("Kubernetes mode: Lease release on SIGTERM") {
        return Ok(());
    }
    let (_topo, _dir, api, mut agents, leader) = leader_cluster()?;
    let (leader_name, other_name) = if leader == 0 {
        ("agent-1", "agent-2")
    } else {
        ("agent-2", "agent-1")
    };

    agents[leader].terminate()?;
    let status = agents[leader].wait_exit(Duration::from_secs(20))?;
    assert!(status.success(), "the leader exited with {status}");
    let log = agents[leader].log();
    assert!(
        log.contains("released the Lease"),
        "the leader's log says nothing of the release:\n{log}"
    );
    let holder = lease_holder(&api);
    assert!(
        holder.is_none() || holder.as_deref() == Some(other_name),
        "{leader_name} exited and the Lease names {holder:?}"
    );
    wait_for(
        "the other agent to take the released Lease",
        Duration::from_secs(LEASE_SECONDS * 3 + 10),
        || lease_holder(&api).as_deref() == Some(other_name),
    )?;
    wait_for(
        "the other agent to report itself the leader",
        Duration::from_secs(10),
        || {
            agents[1 - leader]
                .status()
                .is_ok_and(|s| s.leader == Some(true))
        },
    )?;
    drop(agents);
    Ok(())
}
