//! The Helm chart (charts/clusterlink), offline: `helm lint --strict`, `helm template` of
//! several value sets, every rendered manifest (the CRDs too) validated against Kubernetes
//! 1.33's schemas by kubernetes-validate, and what the manifests must say checked here.
//!
//! helm and kubernetes-validate come from `cargo xtask setup`; without them these tests are
//! skipped with a message, and fail under CI=true.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use clink_testbed::{bin_path, helm_path, kubernetes_validate_path, require_k8s_tool};
use serde::Deserialize;
use serde_json::Value;

const NAMESPACE: &str = "clusterlink-system";
const RELEASE: &str = "cl";
const KUBERNETES: &str = "1.33.0";

fn chart() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/clusterlink"
    ))
}

fn tools(what: &str) -> bool {
    require_k8s_tool(&helm_path(), what) && require_k8s_tool(&kubernetes_validate_path(), what)
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `--set` arguments for helm.
fn sets(values: &[&str]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| ["--set".to_owned(), (*v).to_owned()])
        .collect()
}

/// The chart rendered with `values`: every manifest, parsed.
struct Rendered {
    docs: Vec<Value>,
}

impl Rendered {
    /// Renders with `helm template --include-crds`, lints with the same values, and validates
    /// every rendered file with `kubernetes-validate --strict`. Only the ServiceMonitor (a
    /// Prometheus-operator CRD it has no schema for) may be left unvalidated.
    fn new(values: &[&str]) -> Rendered {
        let (ok, lint) = run(Command::new(helm_path())
            .args(["lint", "--strict", "--namespace", NAMESPACE])
            .arg(chart())
            .args(sets(values)));
        assert!(ok, "helm lint --strict {values:?}:\n{lint}");
        let out = tempfile::tempdir().unwrap();
        let (ok, text) = run(Command::new(helm_path())
            .args([
                "template",
                RELEASE,
                "--include-crds",
                "--namespace",
                NAMESPACE,
            ])
            .arg(chart())
            .args(sets(values))
            .arg("--output-dir")
            .arg(out.path()));
        assert!(ok, "helm template {values:?}:\n{text}");
        let files = yaml_files(out.path());
        assert!(!files.is_empty());
        let (ok, report) = run(Command::new(kubernetes_validate_path())
            .args(["--strict", "-k", KUBERNETES])
            .args(&files));
        assert!(ok, "kubernetes-validate {values:?}:\n{report}");
        for line in report.lines() {
            let known_gap = line.contains("Couldn't find schema for kind ServiceMonitor");
            assert!(
                line.starts_with("INFO ") || known_gap,
                "kubernetes-validate {values:?}: {line}"
            );
        }
        let docs = files
            .iter()
            .flat_map(|f| {
                let text = fs::read_to_string(f).unwrap();
                yaml_serde::Deserializer::from_str(&text)
                    .map(|d| serde_json::to_value(yaml_serde::Value::deserialize(d).unwrap()))
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap()
            })
            .filter(|d| !d.is_null())
            .collect();
        Rendered { docs }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.all(kind);
        assert_eq!(all.len(), 1, "one {kind}");
        all[0]
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.all(kind)
            .into_iter()
            .find(|d| d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    fn pod(&self) -> &Value {
        &self.one("DaemonSet")["spec"]["template"]["spec"]
    }

    fn agent(&self) -> &Value {
        &self.pod()["containers"][0]
    }

    fn args(&self) -> Vec<String> {
        strings(&self.agent()["args"])
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// The volume mounted at `mount_path`, and the mount.
fn mount<'a>(r: &'a Rendered, mount_path: &str) -> (&'a Value, &'a Value) {
    let mounts = r.agent()["volumeMounts"].as_array().unwrap();
    let m = mounts
        .iter()
        .find(|m| m["mountPath"] == mount_path)
        .unwrap_or_else(|| panic!("nothing mounted at {mount_path}"));
    let volume = r.pod()["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == m["name"])
        .unwrap();
    (volume, m)
}

#[test]
fn defaults_install_a_host_network_node_agent() {
    if !tools("the chart's default rendering") {
        return;
    }
    let r = Rendered::new(&[]);
    let pod = r.pod();
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    assert_eq!(pod["serviceAccountName"], "cl-clusterlink");
    let ds = r.one("DaemonSet");
    assert_eq!(ds["metadata"]["namespace"], NAMESPACE);
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(r.agent()["securityContext"]["privileged"], true);

    let (bpffs, m) = mount(&r, "/sys/fs/bpf");
    assert_eq!(bpffs["hostPath"]["path"], "/sys/fs/bpf");
    assert_eq!(m["mountPropagation"], "Bidirectional");
    let (cgroup, _) = mount(&r, "/run/clusterlink/cgroupv2");
    assert_eq!(cgroup["hostPath"]["path"], "/sys/fs/cgroup");
    let (cert, m) = mount(&r, "/etc/clusterlink/certs");
    assert_eq!(cert["secret"]["secretName"], "cl-peer");
    assert_eq!(m["readOnly"], true);

    let args = r.args();
    for expected in [
        "--name=peer-a",
        "--certs=/etc/clusterlink/certs",
        "--listen=0.0.0.0:8443",
        "--metrics=0.0.0.0:9090",
        "--datapath=auto",
        "--cgroup=/run/clusterlink/cgroupv2",
        "--bpf-pin-dir=/sys/fs/bpf/clusterlink",
        "--log-level=info",
    ] {
        assert!(
            args.iter().any(|a| a == expected),
            "{expected} not in {args:?}"
        );
    }
    // Kubernetes mode by default: no state directory, the Services select the agents' pods,
    // pods reach service addresses at their node's address (kubelet expands $(HOST_IP)).
    for expected in [
        "--mode=kubernetes",
        "--agent-selector=app.kubernetes.io/name=clusterlink",
        "--agent-selector=app.kubernetes.io/instance=cl",
        "--node-address=$(HOST_IP)",
    ] {
        assert!(
            args.iter().any(|a| a == expected),
            "{expected} not in {args:?}"
        );
    }
    assert!(!args.iter().any(|a| a.starts_with("--state")), "{args:?}");
    let env: Vec<&str> = r.agent()["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for name in ["NODE_NAME", "POD_NAMESPACE", "POD_NAME", "HOST_IP"] {
        assert!(env.contains(&name), "{name} not in {env:?}");
    }

    let agent = r.agent();
    for probe in ["startupProbe", "livenessProbe"] {
        assert_eq!(agent[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(agent[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    assert_eq!(agent["readinessProbe"]["tcpSocket"]["port"], "gateway");

    let gateway = r.named("Service", "cl-clusterlink-gateway");
    assert_eq!(gateway["spec"]["type"], "LoadBalancer");
    assert_eq!(gateway["spec"]["ports"][0]["port"], 443);
    assert_eq!(gateway["spec"]["ports"][0]["targetPort"], "gateway");
    assert!(r.all("ServiceMonitor").is_empty());
    assert_eq!(r.all("Service").len(), 1, "no metrics Service by default");

    let crds: Vec<&Value> = r.all("CustomResourceDefinition");
    let mut names: Vec<&str> = crds
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "accesspolicies.clusterlink.net",
            "exports.clusterlink.net",
            "imports.clusterlink.net",
            "peers.clusterlink.net",
            "privilegedaccesspolicies.clusterlink.net"
        ]
    );
}

/// Rules as (apiGroup, resource, verb) triples.
fn rules(role: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    out.push((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    out
}

#[test]
fn rbac_is_least_privilege() {
    if !tools("the chart's RBAC") {
        return;
    }
    let r = Rendered::new(&[]);
    let cluster = rules(r.one("ClusterRole"));
    let ns = rules(r.one("Role"));
    let has = |rules: &[(String, String, String)], g: &str, res: &str, v: &str| {
        rules
            .iter()
            .any(|(rg, rr, rv)| rg == g && rr == res && rv == v)
    };
    for res in [
        "exports",
        "imports",
        "accesspolicies",
        "privilegedaccesspolicies",
    ] {
        assert!(has(&cluster, "clusterlink.net", res, "watch"), "{res}");
    }
    assert!(has(&cluster, "clusterlink.net", "imports/status", "patch"));
    assert!(has(&cluster, "", "pods", "list"));
    assert!(has(&cluster, "", "services", "create"));
    // Peers and the Lease only in the agents' namespace.
    assert!(!cluster
        .iter()
        .any(|(_, r, _)| r.starts_with("peers") || r == "leases"));
    assert!(has(&ns, "clusterlink.net", "peers", "watch"));
    assert!(has(&ns, "clusterlink.net", "peers/status", "patch"));
    assert!(has(&ns, "coordination.k8s.io", "leases", "update"));
    // Nothing the agent never needs.
    for (g, res, v) in cluster.iter().chain(&ns) {
        assert!(
            g != "*" && res != "*" && v != "*",
            "wildcard in {g}/{res}/{v}"
        );
        assert!(
            res != "secrets",
            "the peer certificate is a mounted volume, not read by API"
        );
    }
    for binding in ["ClusterRoleBinding", "RoleBinding"] {
        let subject = &r.one(binding)["subjects"][0];
        assert_eq!(subject["name"], "cl-clusterlink", "{binding}");
        assert_eq!(subject["namespace"], NAMESPACE, "{binding}");
    }
}

#[test]
fn capability_list_instead_of_privileged() {
    if !tools("the chart's capability-list mode") {
        return;
    }
    let r = Rendered::new(&["securityContext.privileged=false"]);
    let sc = &r.agent()["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(
        strings(&sc["capabilities"]["add"]),
        ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"]
    );
    // Bidirectional propagation is for privileged containers only.
    assert_eq!(
        mount(&r, "/sys/fs/bpf").1["mountPropagation"],
        "HostToContainer"
    );

    let low_port = Rendered::new(&["securityContext.privileged=false", "gateway.port=443"]);
    let add = strings(&low_port.agent()["securityContext"]["capabilities"]["add"]);
    assert!(add.contains(&"NET_BIND_SERVICE".to_owned()), "{add:?}");
}

#[test]
fn node_port_gateway() {
    if !tools("the chart's NodePort gateway") {
        return;
    }
    let r = Rendered::new(&[
        "gateway.service.type=NodePort",
        "gateway.service.nodePort=30443",
        "gateway.port=9443",
    ]);
    let spec = &r.named("Service", "cl-clusterlink-gateway")["spec"];
    assert_eq!(spec["type"], "NodePort");
    assert_eq!(spec["ports"][0]["nodePort"], 30443);
    assert_eq!(spec["ports"][0]["port"], 443);
    assert_eq!(r.agent()["ports"][0]["containerPort"], 9443);
    assert!(r.args().contains(&"--listen=0.0.0.0:9443".to_owned()));
}

#[test]
fn service_monitor_scrapes_the_metrics_service() {
    if !tools("the chart's ServiceMonitor") {
        return;
    }
    let r = Rendered::new(&[
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.labels.release=prometheus",
    ]);
    let monitor = r.one("ServiceMonitor");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let service = r.named("Service", "cl-clusterlink-metrics");
    assert_eq!(service["spec"]["clusterIP"], "None");
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    for (k, v) in selector {
        assert_eq!(&service["metadata"]["labels"][k], v, "label {k}");
    }
    let gateway = r.named("Service", "cl-clusterlink-gateway");
    assert!(
        selector
            .iter()
            .any(|(k, v)| &gateway["metadata"]["labels"][k] != v),
        "the ServiceMonitor must not select the gateway Service"
    );
    let port = &monitor["spec"]["endpoints"][0]["port"];
    assert_eq!(&service["spec"]["ports"][0]["name"], port);
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
}

#[test]
fn values_choose_the_agents_arguments() {
    if !tools("the chart's agent arguments") {
        return;
    }
    let r = Rendered::new(&[
        "agent.datapath=sockmap",
        "agent.logLevel=clink_agent=debug",
        "agent.labels.env=prod",
        "agent.threads=2",
        "agent.extraArgs={--label=tier=edge}",
        "peerName=peer-b.example.com",
    ]);
    let args = r.args();
    for expected in [
        "--datapath=sockmap",
        "--log-level=clink_agent=debug",
        "--label=env=prod",
        "--threads=2",
        "--label=tier=edge",
        "--name=peer-b.example.com",
    ] {
        assert!(
            args.iter().any(|a| a == expected),
            "{expected} not in {args:?}"
        );
    }
    let (ok, text) = run(Command::new(helm_path())
        .args(["template", RELEASE])
        .arg(chart())
        .args(sets(&["agent.datapath=fast"])));
    assert!(
        !ok && text.contains("datapath"),
        "values.schema.json: {text}"
    );
}

#[test]
fn pod_placement_and_extras_render_valid_manifests() {
    if !tools("the chart's placement and extra values") {
        return;
    }
    let r = Rendered::new(&[
        "agent.extraEnv[0].name=RUST_BACKTRACE",
        "agent.extraEnv[0].value=full",
        "imagePullSecrets[0].name=registry",
        "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution\
         .nodeSelectorTerms[0].matchExpressions[0].key=clusterlink",
        "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution\
         .nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
        "gateway.service.loadBalancerSourceRanges={203.0.113.0/24}",
        "podAnnotations.example\\.com/team=net",
        "image.tag=dev",
        "resources.limits.memory=256Mi",
    ]);
    let pod = r.pod();
    assert_eq!(pod["imagePullSecrets"][0]["name"], "registry");
    let term = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"][0];
    assert_eq!(term["matchExpressions"][0]["key"], "clusterlink");
    let env = r.agent()["env"].as_array().unwrap();
    assert!(env
        .iter()
        .any(|e| e["name"] == "RUST_BACKTRACE" && e["value"] == "full"));
    assert_eq!(r.agent()["image"], "clusterlink-rs/clink-agent:dev");
    assert_eq!(r.agent()["resources"]["limits"]["memory"], "256Mi");
    let template = &r.one("DaemonSet")["spec"]["template"]["metadata"];
    assert_eq!(template["annotations"]["example.com/team"], "net");
    let gateway = r.named("Service", "cl-clusterlink-gateway");
    assert_eq!(
        gateway["spec"]["loadBalancerSourceRanges"][0],
        "203.0.113.0/24"
    );
}

/// The rendered arguments are ones the agent really accepts, in both modes: it gets past
/// argument parsing and stops at loading the (absent) certificates. The downward-API
/// variables are set and `$(VAR)` expanded as the kubelet does.
#[test]
fn the_agent_accepts_the_rendered_arguments() {
    if !tools("the chart's arguments against the agent") {
        return;
    }
    let Ok(agent) = bin_path("clink-agent") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "clink-agent is not built"
        );
        eprintln!("skipping: clink-agent is not built");
        return;
    };
    let nowhere = tempfile::tempdir().unwrap();
    let certs = nowhere.path().join("no-certs");
    let downward = [
        ("NODE_NAME", "node-1"),
        ("POD_NAMESPACE", "clusterlink-system"),
        ("POD_NAME", "cl-clusterlink-x7k2p"),
        ("HOST_IP", "192.0.2.10"),
    ];
    let with_test_certs = |args: Vec<String>| -> Vec<String> {
        args.into_iter()
            .map(|a| {
                if a.starts_with("--certs=") {
                    return format!("--certs={}", certs.display());
                }
                downward
                    .iter()
                    .fold(a, |a, (k, v)| a.replace(&format!("$({k})"), v))
            })
            .collect()
    };
    for values in [
        &[][..],
        &["agent.mode=standalone"][..],
        &[
            "securityContext.privileged=false",
            "agent.datapath=userspace",
        ][..],
        &[
            "agent.labels.env=prod",
            "agent.threads=2",
            "agent.logFormat=json",
        ][..],
    ] {
        let args = with_test_certs(Rendered::new(values).args());
        let out = Command::new(&agent)
            .args(&args)
            .envs(downward)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(
            out.status.code(),
            Some(2),
            "{values:?}: usage error: {stderr}"
        );
        assert!(
            stderr.contains("loading certificates") || stderr.contains("data path"),
            "{values:?}: {args:?}: {stderr}"
        );
    }
}
