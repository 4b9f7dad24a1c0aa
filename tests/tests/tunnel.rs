//! End to end through two agents in two network-namespace clusters: content, half-close,
//! concurrency, policy, identity and protocol errors, restarts.
//!
//! The data tests run on both data paths: `<name>` on the userspace one, `<name>_sockmap` on
//! the sockmap one, where each cluster's agent, clients and services live in a cgroup of
//! their own with the eBPF programs attached there.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener},
    sync::Arc,
    thread,
    time::Duration,
};

use clink_testbed::Netns;
use clink_tests::{
    connect_in, exchange, half_close_exchange, listen_in, refused_at, require_root, sample, scrape,
    transfer_both_ways, tree, wait_metric, Agent, Datapath, Fabric, Patient, GATEWAY_PORT,
    METRICS_PORT,
};

const IMPORT_PORT: u16 = 7000;
const MIB: usize = 1024 * 1024;

fn import_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], IMPORT_PORT))
}

/// A fabric with an allow-all policy on both sides and one tunneled service; the listener is
/// the service inside cluster b.
fn allowed_service() -> (Fabric, TcpListener) {
    allowed_service_on(Datapath::Userspace)
}

/// [`allowed_service`] on `datapath`; clients connect with `fabric.connect(0, ...)`.
fn allowed_service_on(datapath: Datapath) -> (Fabric, TcpListener) {
    Fabric::with_service(datapath, IMPORT_PORT).expect("fabric with a service")
}

/// Bytes that went through `clink_skmsg` at agents a and b so far, redirected or (flow
/// control) passed to the TCP stack (sockmap data path only).
fn spliced(fabric: &Fabric) -> Option<(u64, u64)> {
    let through = |agent: &clink_tests::Agent| agent.skmsg_seen().unwrap();
    (fabric.datapath == Datapath::Sockmap).then(|| (through(fabric.a()), through(fabric.b())))
}

/// On the sockmap data path, both agents' `clink_skmsg` saw exactly `bytes` since `before`;
/// or, where a sender outran its agent and the connection was demoted to plain TCP (which
/// the agent counts), the bytes before that.
fn assert_spliced(fabric: &Fabric, before: Option<(u64, u64)>, bytes: usize) {
    if let (Some((a0, b0)), Some((a1, b1))) = (before, spliced(fabric)) {
        let seen = (a1 - a0, b1 - b0);
        let all = (bytes as u64, bytes as u64);
        if seen != all {
            let demoted = [fabric.ns_a(), fabric.ns_b()].iter().any(|ns| {
                let metrics = scrape(ns).unwrap();
                ["bulk", "sender-outran"].iter().any(|reason| {
                    let series = format!("clink_sockmap_demotions_total{{reason=\"{reason}\"}}");
                    sample(&metrics, &series) > 0.0
                })
            });
            assert!(
                demoted && seen.0 > 0 && seen.1 > 0 && seen.0 <= all.0 && seen.1 <= all.1,
                "spliced at a, b: {seen:?} of {all:?} without a demotion"
            );
        }
    }
}

/// Tunneled connections the importer closed after they carried data.
const EGRESS_CLOSED: &str = "clink_connections_closed_total{direction=\"egress\"";

/// One series of `clink_connections_failed_total`.
fn failed_series(direction: &str, service: &str, peer: &str, reason: &str) -> String {
    format!(
        "clink_connections_failed_total{{direction=\"{direction}\",service=\"{service}\",\
         peer=\"{peer}\",reason=\"{reason}\"}}"
    )
}

/// Waits until the agent in `ns` has counted a connection it could not tunnel, for `reason`.
fn wait_failed(ns: &Netns, direction: &str, service: &str, peer: &str, reason: &str) {
    let series = failed_series(direction, service, peer, reason);
    wait_metric(ns, METRICS_PORT, &series, 1.0).unwrap();
}

/// One series of `clink_policy_decisions_total`.
fn decisions(direction: &str, action: &str, tier: &str) -> String {
    format!(
        "clink_policy_decisions_total{{direction=\"{direction}\",action=\"{action}\",\
         tier=\"{tier}\"}}"
    )
}

#[test]
fn transfers_256_mib_each_way_intact() {
    transfers_256_mib_each_way(Datapath::Userspace);
}

#[test]
fn transfers_256_mib_each_way_intact_sockmap() {
    transfers_256_mib_each_way(Datapath::Sockmap);
}

fn transfers_256_mib_each_way(datapath: Datapath) {
    if !require_root(&format!(
        "transfers_256_mib_each_way_intact on {datapath:?}"
    )) {
        return;
    }
    let (fabric, service) = allowed_service_on(datapath);
    let before = spliced(&fabric);
    let len = 256 * MIB;
    let client = fabric.connect(0, import_addr()).unwrap();
    transfer_both_ways(service, client, len);

    let status = fabric.a().status().unwrap();
    wait_metric(fabric.ns_a(), METRICS_PORT, EGRESS_CLOSED, 1.0)
        .expect("the connection's close is counted");
    let status_after = fabric.a().status().unwrap();
    assert_eq!(status.datapath, datapath.name());
    assert_eq!(status_after.connections.bytes_out, len as u64);
    assert_eq!(status_after.connections.bytes_in, len as u64);
    assert_spliced(&fabric, before, 2 * len);
}

#[test]
fn half_close_and_odd_writes_pass_through() {
    half_close_and_odd_writes(Datapath::Userspace);
}

#[test]
fn half_close_and_odd_writes_pass_through_sockmap() {
    half_close_and_odd_writes(Datapath::Sockmap);
}

fn half_close_and_odd_writes(datapath: Datapath) {
    if !require_root(&format!(
        "half_close_and_odd_writes_pass_through on {datapath:?}"
    )) {
        return;
    }
    let (fabric, service) = allowed_service_on(datapath);
    let before = spliced(&fabric);
    // The service reads the whole request, and only after the client's FIN answers with a
    // reply that depends on all of it; the client must still be able to read it.
    let client = fabric.connect(0, import_addr()).unwrap();
    let (sent, received) = half_close_exchange(service, client, Duration::ZERO);
    assert_spliced(&fabric, before, received + sent);
}

#[test]
fn many_concurrent_connections() {
    many_concurrent(Datapath::Userspace);
}

#[test]
fn many_concurrent_connections_sockmap() {
    many_concurrent(Datapath::Sockmap);
}

fn many_concurrent(datapath: Datapath) {
    if !require_root(&format!("many_concurrent_connections on {datapath:?}")) {
        return;
    }
    let (fabric, service) = allowed_service_on(datapath);
    let before = spliced(&fabric);
    const CONNS: usize = 100;
    const LEN: usize = 512 * 1024;
    let server = thread::spawn(move || {
        let mut handlers = Vec::new();
        for _ in 0..CONNS {
            let (mut stream, _) = service.accept().unwrap();
            // Echo: what comes back must be exactly what was sent.
            handlers.push(thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = Patient(&mut stream).read(&mut buf).unwrap();
                    if n == 0 {
                        stream.shutdown(Shutdown::Write).unwrap();
                        return;
                    }
                    stream.write_all(&buf[..n]).unwrap();
                }
            }));
        }
        for h in handlers {
            h.join().unwrap();
        }
    });
    let clients: Vec<_> = (0..CONNS)
        .map(|i| {
            let stream = fabric.connect(0, import_addr()).unwrap();
            thread::spawn(move || exchange(stream, 1000 + i as u64, LEN, 16 * 1024).unwrap())
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let t = c.join().unwrap();
        assert_eq!(t.received_len, LEN, "connection {i}");
        assert_eq!(t.received, t.sent, "connection {i} got back other bytes");
    }
    server.join().unwrap();
    assert_spliced(&fabric, before, 2 * LEN * CONNS);
}

#[test]
fn default_deny_on_both_sides() {
    if !require_root("default_deny_on_both_sides") {
        return;
    }
    let fabric = Fabric::two_clusters().unwrap();
    let service = listen_in(fabric.ns_b()).unwrap();
    fabric
        .export_import("svc", service.local_addr().unwrap(), IMPORT_PORT)
        .unwrap();

    // No policy anywhere: the importer refuses locally.
    assert!(refused_at(fabric.ns_a(), import_addr()));
    wait_failed(fabric.ns_a(), "egress", "default/svc", "peer-b", "denied");
    let metrics = scrape(fabric.ns_a()).unwrap();
    assert!(
        sample(&metrics, &decisions("egress", "deny", "default")) >= 1.0,
        "{metrics}"
    );

    // Egress allowed, ingress still default-deny: the exporter answers 403.
    fabric
        .a()
        .clink_ok(&["create", "policy", "allow-all", "--action", "allow"])
        .unwrap();
    assert!(refused_at(fabric.ns_a(), import_addr()));
    wait_failed(fabric.ns_b(), "ingress", "default/svc", "peer-a", "denied");
    wait_failed(
        fabric.ns_a(),
        "egress",
        "default/svc",
        "peer-b",
        "refused-403",
    );
    let metrics = scrape(fabric.ns_b()).unwrap();
    assert!(
        sample(&metrics, &decisions("ingress", "deny", "default")) >= 1.0,
        "{metrics}"
    );

    // A deny policy beats an allow policy in the same namespace.
    fabric
        .b()
        .clink_ok(&["create", "policy", "allow-all", "--action", "allow"])
        .unwrap();
    fabric
        .b()
        .clink_ok(&[
            "create",
            "policy",
            "deny-svc",
            "--action",
            "deny",
            "--to",
            "export.clusterlink.net/name=svc",
        ])
        .unwrap();
    assert!(refused_at(fabric.ns_a(), import_addr()));
    fabric
        .a()
        .wait_log("ingress deny by namespaced policy default/deny-svc")
        .unwrap();

    // Removing the deny lets the next connection through.
    fabric
        .b()
        .clink_ok(&["delete", "accesspolicy", "deny-svc"])
        .unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = service.accept().unwrap();
        s.write_all(b"welcome").unwrap();
    });
    let mut client = connect_in(fabric.ns_a(), import_addr()).unwrap();
    let mut got = String::new();
    client.read_to_string(&mut got).unwrap();
    assert_eq!(got, "welcome");
    server.join().unwrap();
}

#[test]
fn peer_with_certificate_of_another_fabric_is_rejected() {
    if !require_root("peer_with_certificate_of_another_fabric_is_rejected") {
        return;
    }
    let (fabric, _service) = allowed_service();
    // An impostor named peer-a, with a certificate from its own CA, in cluster a.
    let evil = fabric.dir.path().join("evil");
    let clink = clink_testbed::bin_path("clink").unwrap();
    clink_testbed::make_certificates(&clink, &evil, "evil-fabric", &["peer-a"]).unwrap();
    let mut impostor = Agent::new(
        "peer-a",
        fabric.ns_a(),
        &fabric.dir.path().join("impostor"),
        &evil,
        GATEWAY_PORT + 1,
    )
    .unwrap();
    // Beside the real agent of cluster a: its own metrics port too.
    impostor.args = vec!["--metrics".into(), "127.0.0.1:9091".into()];
    impostor.start().unwrap();
    let b_ip = fabric.topo.b().ip().to_string();
    impostor
        .clink_ok(&["create", "peer", "peer-b", "--host", &b_ip])
        .unwrap();
    impostor
        .clink_ok(&["create", "policy", "allow-all", "--action", "allow"])
        .unwrap();
    impostor
        .clink_ok(&[
            "create", "import", "svc", "--port", "7001", "--peer", "peer-b",
        ])
        .unwrap();

    assert!(refused_at(fabric.ns_a(), ([127, 0, 0, 1], 7001).into()));
    fabric.b().wait_log("TLS handshake failed").unwrap();
    // It failed for the certificate, on both ends.
    let failed = failed_series("egress", "default/svc", "peer-b", "tls");
    wait_metric(fabric.ns_a(), 9091, &failed, 1.0).unwrap();
    assert!(
        impostor.log().contains("UnknownIssuer")
            || impostor.log().contains("invalid peer certificate"),
        "{}",
        impostor.log()
    );
    impostor.stop().unwrap();
}

#[test]
fn unknown_export_is_404_and_unreachable_target_is_502() {
    if !require_root("unknown_export_is_404_and_unreachable_target_is_502") {
        return;
    }
    let fabric = Fabric::two_clusters().unwrap();
    fabric.allow_all().unwrap();
    fabric
        .a()
        .clink_ok(&[
            "create", "import", "ghost", "--port", "7002", "--peer", "peer-b",
        ])
        .unwrap();
    assert!(refused_at(fabric.ns_a(), ([127, 0, 0, 1], 7002).into()));
    wait_failed(
        fabric.ns_a(),
        "egress",
        "default/ghost",
        "peer-b",
        "refused-404",
    );
    // A name the peer asked for is no label value unless it is an Export.
    wait_failed(fabric.ns_b(), "ingress", "unknown", "peer-a", "no-export");

    // An export whose target nobody listens on.
    let closed = listen_in(fabric.ns_b()).unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    fabric.export_import("gone", closed_addr, 7003).unwrap();
    assert!(refused_at(fabric.ns_a(), ([127, 0, 0, 1], 7003).into()));
    wait_failed(
        fabric.ns_a(),
        "egress",
        "default/gone",
        "peer-b",
        "refused-502",
    );
    wait_failed(
        fabric.ns_b(),
        "ingress",
        "default/gone",
        "peer-a",
        "unreachable",
    );
}

/// A fabric member speaking TLS correctly but sending garbage, or an endless head, instead
/// of a CONNECT gets 400 and the gateway keeps serving.
#[test]
fn garbage_instead_of_connect() {
    if !require_root("garbage_instead_of_connect") {
        return;
    }
    let (fabric, service) = allowed_service();
    let identity = clink_agent::tls::Identity::load(&fabric.a().certs_dir(), "peer-a").unwrap();
    let gateway = SocketAddr::from((fabric.topo.b().ip(), GATEWAY_PORT));
    let talk = |payload: Vec<u8>| -> String {
        let tcp = connect_in(fabric.ns_a(), gateway).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let conn = rustls::ClientConnection::new(
            Arc::clone(&identity.client),
            "peer-b".try_into().unwrap(),
        )
        .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        // The server may answer and close before taking all of an oversized head.
        let _ = tls.write_all(&payload);
        let _ = tls.flush();
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };
    let answer = talk(b"\x00\x01GARBAGE NOT HTTP\r\n\r\n".to_vec());
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    assert!(answer.contains("malformed HTTP head"), "{answer:?}");
    let mut huge = b"CONNECT svc.default:443 HTTP/1.1\r\nx-pad: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
    let answer = talk(huge);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    assert!(answer.contains("longer than"), "{answer:?}");
    let answer = talk(b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n".to_vec());
    assert!(answer.starts_with("HTTP/1.1 405 "), "{answer:?}");

    // Plain TCP garbage never gets past the handshake.
    let mut raw = connect_in(fabric.ns_a(), gateway).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    raw.write_all(b"hello, is this TLS?\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP"),
        "answered in plain text: {answer:?}"
    );
    fabric.b().wait_log("TLS handshake failed").unwrap();

    // Still serving.
    let server = thread::spawn(move || {
        let (mut s, _) = service.accept().unwrap();
        s.write_all(b"still here").unwrap();
    });
    let mut client = connect_in(fabric.ns_a(), import_addr()).unwrap();
    let mut got = String::new();
    client.read_to_string(&mut got).unwrap();
    assert_eq!(got, "still here");
    server.join().unwrap();
}

#[test]
fn agent_restart_keeps_objects() {
    if !require_root("agent_restart_keeps_objects") {
        return;
    }
    let (mut fabric, service) = allowed_service();
    // What was applied comes back; status is observed afresh after a restart.
    let spec = |agent: &Agent, kind: &str| -> serde_json::Value {
        let out = agent.clink_ok(&["get", kind, "svc", "-o", "json"]).unwrap();
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["spec"].clone()
    };
    let before_a = spec(fabric.a(), "import");
    let before_b = spec(fabric.b(), "export");
    for agent in &mut fabric.agents {
        agent.stop().unwrap();
    }
    assert!(
        connect_in(fabric.ns_a(), import_addr()).is_err(),
        "import listener is gone"
    );
    for agent in &mut fabric.agents {
        agent.start().unwrap();
    }
    assert_eq!(spec(fabric.a(), "import"), before_a);
    assert_eq!(spec(fabric.b(), "export"), before_b);
    let state = fabric.a().state_dir().join("imports/default/svc.yaml");
    let stored = std::fs::read_to_string(&state).unwrap();
    assert!(stored.contains("targetPort: 7000"), "{stored}");
    assert!(!stored.contains("status"), "status is not stored: {stored}");
    assert!(fabric
        .a()
        .clink_ok(&["get", "peers"])
        .unwrap()
        .contains("peer-b"));
    let server = thread::spawn(move || {
        let (mut s, _) = service.accept().unwrap();
        s.write_all(b"back again").unwrap();
    });
    let mut client = connect_in(fabric.ns_a(), import_addr()).unwrap();
    let mut got = String::new();
    client.read_to_string(&mut got).unwrap();
    assert_eq!(got, "back again");
    server.join().unwrap();
}

#[test]
fn bad_input_is_rejected_without_side_effects() {
    if !require_root("bad_input_is_rejected_without_side_effects") {
        return;
    }
    let (fabric, service) = allowed_service();
    let a = fabric.a();
    let state_before = tree(&a.state_dir());
    let cases: [(&str, &str); 6] = [
        ("kind: Peer\nspec: [\n", "<stdin>: document 1: "),
        (
            "apiVersion: clusterlink.net/v1alpha1\nkind: Gateway\nmetadata: {name: x}\nspec: {}\n",
            "unknown kind \"Gateway\"",
        ),
        (
            "apiVersion: clusterlink.net/v1alpha1\nkind: AccessPolicy\nmetadata: {name: p}\nspec:\n  action: allow\n  from: [{workloadSelector: {matchExpressions: [{key: a, operator: Maybe}]}}]\n  to: [{workloadSelector: {}}]\n",
            "AccessPolicy p: spec.from[0].workloadSelector.matchExpressions[0].operator: ",
        ),
        (
            "apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata: {name: nogw}\nspec: {gateways: []}\n",
            "Peer default/nogw: spec.gateways: at least one gateway is required",
        ),
        // Occupied by the running import.
        (
            "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: clash}\nspec:\n  port: 80\n  targetPort: 7000\n  sources: [{peer: peer-b, exportName: x, exportNamespace: default}]\n",
            "Import default/clash: spec.targetPort: port 7000 is already used by Import default/svc",
        ),
        // Occupied by the gateway itself; the valid object before it must not land either.
        (
            "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata: {name: fine}\nspec: {host: 127.0.0.1, port: 9}\n---\napiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: on-gateway}\nspec:\n  port: 80\n  targetPort: 443\n  sources: [{peer: peer-b, exportName: x, exportNamespace: default}]\n",
            "Import default/on-gateway: spec.targetPort: cannot listen on port 443: ",
        ),
    ];
    for (yaml, expected) in cases {
        let out = a.apply(yaml).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {yaml}");
        assert!(stderr.contains(expected), "{stderr:?} lacks {expected:?}");
        assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr:?}");
    }
    let out = a.clink(&["delete", "import", "never-was"]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Import default/never-was not found"));
    assert_eq!(
        tree(&a.state_dir()),
        state_before,
        "the state directory changed"
    );
    assert!(!a.clink_ok(&["get", "exports"]).unwrap().contains("fine"));

    // The agent kept serving its other objects.
    let server = thread::spawn(move || {
        let (mut s, _) = service.accept().unwrap();
        s.write_all(b"unharmed").unwrap();
    });
    let mut client = connect_in(fabric.ns_a(), import_addr()).unwrap();
    let mut got = String::new();
    client.read_to_string(&mut got).unwrap();
    assert_eq!(got, "unharmed");
    server.join().unwrap();
}
