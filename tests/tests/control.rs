//! The control plane across three clusters: heartbeats and peer status, multi-source imports
//! with each load-balancing scheme and failover, policy steering, peer labels, client
//! attributes, metrics.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use clink_tests::{ask, require_root, sample, scrape, Fabric, NamedService};

const PORT: u16 = 7100;
/// 5 failed heartbeats about a second apart, each failing fast (connection refused).
const UNREACHABLE_WITHIN: Duration = Duration::from_secs(12);
/// Up to 10 s until the next heartbeat, then 3 answered about a second apart.
const REACHABLE_AGAIN_WITHIN: Duration = Duration::from_secs(20);

fn import_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], PORT))
}

/// Three clusters with allow-all policies; b and c both export `svc` (a service answering
/// with its cluster's letter); a imports it from both with `scheme`.
fn two_exporters(scheme: &str) -> (Fabric, NamedService, NamedService) {
    let fabric = Fabric::three_clusters().expect("fabric");
    fabric.allow_all().unwrap();
    let sb = NamedService::start(fabric.ns_b(), "b").unwrap();
    let sc = NamedService::start(fabric.ns_c(), "c").unwrap();
    for (agent, svc) in [(fabric.b(), &sb), (fabric.c(), &sc)] {
        agent
            .clink_ok(&[
                "create",
                "export",
                "svc",
                "--host",
                "127.0.0.1",
                "--port",
                &svc.addr.port().to_string(),
            ])
            .unwrap();
    }
    let yaml = format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {{name: svc}}\nspec:\n  \
         port: {PORT}\n  lbScheme: {scheme}\n  sources:\n  - {{peer: peer-b, exportName: svc, \
         exportNamespace: default}}\n  - {{peer: peer-c, exportName: svc, exportNamespace: \
         default}}\n"
    );
    let out = fabric.a().apply(&yaml).unwrap();
    assert!(out.status.success(), "{out:?}");
    for peer in ["peer-b", "peer-c"] {
        fabric
            .a()
            .wait_reachable(peer, true, Duration::from_secs(10))
            .unwrap();
    }
    (fabric, sb, sc)
}

fn tally(fabric: &Fabric, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        *counts.entry(ask(fabric.ns_a(), import_addr())).or_default() += 1;
    }
    counts
}

fn count(counts: &BTreeMap<String, usize>, who: &str) -> usize {
    counts.get(who).copied().unwrap_or(0)
}

#[test]
fn round_robin_spreads_evenly_and_metrics_count_it() {
    if !require_root("round_robin_spreads_evenly_and_metrics_count_it") {
        return;
    }
    let (fabric, _sb, _sc) = two_exporters("round-robin");
    let counts = tally(&fabric, 100);
    assert_eq!(count(&counts, "b"), 50, "{counts:?}");
    assert_eq!(count(&counts, "c"), 50, "{counts:?}");

    let m = scrape(fabric.ns_a()).unwrap();
    for peer in ["peer-b", "peer-c"] {
        let series = format!(
            "clink_connections_opened_total{{direction=\"egress\",service=\"default/svc\",peer=\"{peer}\"}}"
        );
        assert_eq!(sample(&m, &series), 50.0, "{series} in\n{m}");
        // Each connection received one letter; its close is counted once the agent has
        // seen both ends finish, which can trail the client by a moment.
        let bytes = format!(
            "clink_bytes_total{{direction=\"egress\",service=\"default/svc\",peer=\"{peer}\",flow=\"received\"}}"
        );
        clink_testbed::wait_for(&bytes, Duration::from_secs(10), || {
            sample(&scrape(fabric.ns_a()).unwrap(), &bytes) == 50.0
        })
        .unwrap();
        assert_eq!(
            sample(&m, &format!("clink_peer_reachable{{peer=\"{peer}\"}}")),
            1.0
        );
    }
    assert_eq!(
        sample(
            &m,
            "clink_policy_decisions_total{direction=\"egress\",action=\"allow\",tier=\"namespaced\"}"
        ),
        100.0
    );
    assert_eq!(
        sample(
            &m,
            "clink_connection_setup_seconds_count{direction=\"egress\"}"
        ),
        100.0
    );
    assert_eq!(sample(&m, "clink_datapath{datapath=\"userspace\"}"), 1.0);
    let mb = scrape(fabric.ns_b()).unwrap();
    assert_eq!(
        sample(
            &mb,
            "clink_connections_opened_total{direction=\"ingress\",service=\"default/svc\",peer=\"peer-a\"}"
        ),
        50.0
    );
    let status = fabric.a().clink_ok(&["status"]).unwrap();
    assert!(status.contains("100 opened"), "{status}");
}

#[test]
fn static_prefers_first_fails_over_and_returns() {
    if !require_root("static_prefers_first_fails_over_and_returns") {
        return;
    }
    let (mut fabric, _sb, _sc) = two_exporters("static");
    assert_eq!(count(&tally(&fabric, 10), "b"), 10);

    fabric.agents[1].stop().unwrap();
    // Before b is even marked unreachable, a failing b is skipped within the connection.
    assert_eq!(count(&tally(&fabric, 5), "c"), 5);
    fabric
        .a()
        .wait_reachable("peer-b", false, UNREACHABLE_WITHIN)
        .unwrap();
    assert_eq!(count(&tally(&fabric, 5), "c"), 5);
    let m = scrape(fabric.ns_a()).unwrap();
    assert!(
        sample(
            &m,
            "clink_connections_failed_total{direction=\"egress\",service=\"default/svc\",peer=\"peer-b\",reason=\"unreachable\"}"
        ) >= 5.0,
        "{m}"
    );

    fabric.agents[1].start().unwrap();
    fabric
        .a()
        .wait_reachable("peer-b", true, REACHABLE_AGAIN_WITHIN)
        .unwrap();
    assert_eq!(count(&tally(&fabric, 10), "b"), 10);
}

#[test]
fn random_uses_both() {
    if !require_root("random_uses_both") {
        return;
    }
    let (fabric, _sb, _sc) = two_exporters("random");
    let counts = tally(&fabric, 60);
    assert_eq!(count(&counts, "b") + count(&counts, "c"), 60, "{counts:?}");
    assert!(count(&counts, "b") >= 10, "{counts:?}");
    assert!(count(&counts, "c") >= 10, "{counts:?}");
}

#[test]
fn deny_on_one_exporter_steers_to_the_other() {
    if !require_root("deny_on_one_exporter_steers_to_the_other") {
        return;
    }
    let (fabric, _sb, _sc) = two_exporters("round-robin");
    fabric
        .b()
        .clink_ok(&[
            "create",
            "policy",
            "no-a",
            "--action",
            "deny",
            "--from",
            "peer.clusterlink.net/name=peer-a",
        ])
        .unwrap();
    let counts = tally(&fabric, 20);
    assert_eq!(count(&counts, "c"), 20, "{counts:?}");
    let m = scrape(fabric.ns_a()).unwrap();
    assert!(
        sample(
            &m,
            "clink_connections_failed_total{direction=\"egress\",service=\"default/svc\",peer=\"peer-b\",reason=\"refused-403\"}"
        ) >= 10.0,
        "{m}"
    );
    // A local egress deny steers the same way, before any packet leaves.
    fabric
        .b()
        .clink_ok(&["delete", "accesspolicy", "no-a"])
        .unwrap();
    fabric
        .a()
        .clink_ok(&[
            "create",
            "policy",
            "not-to-c",
            "--action",
            "deny",
            "--to",
            "peer.clusterlink.net/name=peer-c",
        ])
        .unwrap();
    let counts = tally(&fabric, 10);
    assert_eq!(count(&counts, "b"), 10, "{counts:?}");
}

#[test]
fn peer_status_follows_the_remote_agent() {
    if !require_root("peer_status_follows_the_remote_agent") {
        return;
    }
    let (mut fabric, _sb, _sc) = two_exporters("round-robin");
    let peer = fabric
        .a()
        .clink_ok(&["get", "peer", "peer-c", "-o", "json"])
        .unwrap();
    let peer: serde_json::Value = serde_json::from_str(&peer).unwrap();
    let condition = &peer["status"]["conditions"][0];
    assert_eq!(condition["type"], "PeerReachable");
    assert_eq!(condition["reason"], "Heartbeat");
    assert!(condition["lastTransitionTime"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    // Labels learned from heartbeats.
    assert_eq!(peer["status"]["labels"]["cluster"], "c");

    let stopped = std::time::Instant::now();
    fabric.agents[2].stop().unwrap();
    fabric
        .a()
        .wait_reachable("peer-c", false, UNREACHABLE_WITHIN)
        .unwrap();
    let took = stopped.elapsed();
    assert!(took >= Duration::from_secs(3), "flipped too soon: {took:?}");
    // Meanwhile everything goes to b, the reachable one.
    assert_eq!(count(&tally(&fabric, 6), "b"), 6);

    fabric.agents[2].start().unwrap();
    fabric
        .a()
        .wait_reachable("peer-c", true, REACHABLE_AGAIN_WITHIN)
        .unwrap();
    let counts = tally(&fabric, 10);
    assert_eq!(count(&counts, "c"), 5, "{counts:?}");
}

#[test]
fn peer_labels_and_client_attributes_drive_policy() {
    if !require_root("peer_labels_and_client_attributes_drive_policy") {
        return;
    }
    let (mut fabric, _sb, _sc) = two_exporters("round-robin");
    // Egress: deny towards peers labelled cluster=b (a label learned from b's heartbeats).
    fabric
        .a()
        .clink_ok(&[
            "create",
            "policy",
            "not-to-b",
            "--action",
            "deny",
            "--to",
            "peer.clusterlink.net/labels.cluster=b",
        ])
        .unwrap();
    let counts = tally(&fabric, 6);
    assert_eq!(count(&counts, "c"), 6, "{counts:?}");
    fabric
        .a()
        .clink_ok(&["delete", "accesspolicy", "not-to-b"])
        .unwrap();

    // Ingress on client attributes, which a's agent maps from the client's address and
    // sends along: b refuses clients of namespace "shop", c serves only them.
    fabric
        .b()
        .clink_ok(&[
            "create",
            "policy",
            "no-shop",
            "--action",
            "deny",
            "--from",
            "client.clusterlink.net/namespace=shop",
        ])
        .unwrap();
    fabric
        .c()
        .clink_ok(&["delete", "accesspolicy", "allow-all"])
        .unwrap();
    fabric
        .c()
        .clink_ok(&[
            "create",
            "policy",
            "shop-only",
            "--action",
            "allow",
            "--from",
            "client.clusterlink.net/labels.app=web",
        ])
        .unwrap();
    // a's clients have no attributes yet: only b serves them.
    assert_eq!(count(&tally(&fabric, 6), "b"), 6);

    let map = fabric.dir.path().join("clients.yaml");
    std::fs::write(
        &map,
        "- cidr: 127.0.0.0/8\n  namespace: shop\n  labels: {app: web}\n- cidr: 0.0.0.0/0\n  namespace: other\n",
    )
    .unwrap();
    let a = &mut fabric.agents[0];
    a.stop().unwrap();
    a.args
        .extend(["--client-attributes".to_owned(), map.display().to_string()]);
    a.start().unwrap();
    for peer in ["peer-b", "peer-c"] {
        fabric
            .a()
            .wait_reachable(peer, true, Duration::from_secs(10))
            .unwrap();
    }
    assert_eq!(count(&tally(&fabric, 6), "c"), 6);
    fabric
        .b()
        .wait_log("decision=deny by namespaced policy default/no-shop")
        .unwrap();
}

#[test]
fn import_status_reports_leases_and_unknown_peers() {
    if !require_root("import_status_reports_leases_and_unknown_peers") {
        return;
    }
    let fabric = Fabric::two_clusters().unwrap();
    let a = fabric.a();
    // Port 443 is the gateway's: the import is leased another port, written back.
    a.clink_ok(&[
        "create", "import", "busy", "--port", "443", "--peer", "peer-b",
    ])
    .unwrap();
    let busy: serde_json::Value = serde_json::from_str(
        &a.clink_ok(&["get", "import", "busy", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    let leased = busy["spec"]["targetPort"].as_u64().unwrap();
    assert_ne!(leased, 443);
    let condition = |o: &serde_json::Value, t: &str| {
        o["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .cloned()
            .unwrap()
    };
    let port_ok = condition(&busy, "ImportTargetPortValid");
    assert_eq!(port_ok["status"], "True");
    assert_eq!(port_ok["message"], format!("listening on port {leased}"));
    assert_eq!(port_ok["reason"], "Leased");
    assert_eq!(condition(&busy, "ImportServiceValid")["status"], "True");
    // Re-applying the same import keeps its lease.
    let out = a
        .clink_ok(&[
            "create", "import", "busy", "--port", "443", "--peer", "peer-b",
        ])
        .unwrap();
    assert!(out.contains("unchanged"), "{out}");
    assert!(a
        .clink_ok(&["status"])
        .unwrap()
        .contains(&format!("port {leased}")));

    // An unknown peer is reported in status with reason Error; the import still listens.
    a.clink_ok(&[
        "create", "import", "lost", "--port", "7200", "--peer", "peer-x",
    ])
    .unwrap();
    let lost: serde_json::Value = serde_json::from_str(
        &a.clink_ok(&["get", "import", "lost", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    let service = condition(&lost, "ImportServiceValid");
    assert_eq!(service["status"], "False");
    assert_eq!(service["reason"], "Error");
    assert_eq!(
        service["message"],
        "spec.sources[0].peer: no Peer named \"peer-x\""
    );
    // Exports are validated too.
    fabric
        .b()
        .clink_ok(&[
            "create",
            "export",
            "db",
            "--host",
            "127.0.0.1",
            "--port",
            "5432",
        ])
        .unwrap();
    let db: serde_json::Value = serde_json::from_str(
        &fabric
            .b()
            .clink_ok(&["get", "export", "db", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(condition(&db, "ExportValid")["status"], "True");

    // Invalid labels are rejected at apply time.
    let out = a
        .apply("apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata:\n  name: p\n  labels: {\"bad key\": x}\nspec: {gateways: [{host: h, port: 1}]}\n")
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("metadata.labels[bad key]"));
}
