//! The kTLS data path end to end: two agents with `--datapath ktls` in two network-namespace
//! clusters, the tunnel's TLS records made by the kernel and its payload spliced.
//!
//! These tests need a kernel with kernel TLS (CONFIG_TLS). Where it has none they say so
//! and pass, except with `CLINK_REQUIRE_KTLS=1` (the VM harness sets it), where they fail.
//! `ktls_missing_is_named_and_auto_says_why` is the other half: it runs where the kernel has
//! no kernel TLS.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use clink_agent::{connections::BytePath, kernel::Ktls};
use clink_tests::{
    exchange, half_close_exchange, pattern_digest, read_hash, refused, require_root, sample,
    scrape, send_pattern, transfer_both_ways, wait_metric, Datapath, Fabric, METRICS_PORT,
};

const IMPORT_PORT: u16 = 7000;
const MIB: usize = 1024 * 1024;

fn import_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], IMPORT_PORT))
}

/// Whether the kernel has kernel TLS; without it the test is skipped with a line saying so,
/// or fails under `CLINK_REQUIRE_KTLS=1`.
fn kernel_tls(test: &str) -> bool {
    require_root(test) && clink_testbed::require_ktls(test)
}

fn allowed_service() -> (Fabric, TcpListener) {
    Fabric::with_service(Datapath::Ktls, IMPORT_PORT).expect("fabric with a service")
}

/// Both agents handed `n` tunnels to the kernel and none stayed in userspace.
fn assert_handed_off(fabric: &Fabric, n: f64) {
    for (ns, direction) in [(fabric.ns_a(), "egress"), (fabric.ns_b(), "ingress")] {
        let series =
            format!("clink_ktls_handoffs_total{{direction=\"{direction}\",result=\"kernel\"}}");
        wait_metric(ns, METRICS_PORT, &series, n).unwrap();
        let metrics = scrape(ns).unwrap();
        assert!(
            !metrics.contains("result=\"fallback") && !metrics.contains("result=\"failed"),
            "{metrics}"
        );
        assert_eq!(
            sample(&metrics, "clink_datapath{datapath=\"ktls\"}"),
            1.0,
            "{metrics}"
        );
    }
}

/// User-space CPU time (clock ticks) of process `pid` so far, from `/proc/<pid>/stat`.
fn user_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse().unwrap() // utime, field 14 of the whole line
}

/// User-space CPU ticks both agents of `fabric` spent while `len` bytes went each way through
/// one tunneled connection (checked by SHA-256).
fn agents_user_ticks_for(fabric: &Fabric, service: TcpListener, len: usize) -> u64 {
    let ticks = || -> u64 {
        fabric
            .agents
            .iter()
            .map(|a| user_ticks(a.pid().expect("agent running")))
            .sum()
    };
    let client = fabric.connect(0, import_addr()).unwrap();
    let before = ticks();
    transfer_both_ways(service, client, len);
    ticks() - before
}

/// The agents leave the byte path. 256 MiB each way through a kTLS tunnel, content checked,
/// and (1) the bytes the agents moved through their own memory (their counters: data before
/// the hand-off and after control records) stay below 1% of the payload, (2) the agents'
/// user-space CPU time per byte is well below what two userspace agents spend in the same
/// test (from /proc, not from the agent): with kTLS the kernel encrypts and moves the bytes
/// in the agents' splice calls (system time), the agents' own code only watches.
#[test]
fn transfers_256_mib_each_way_intact_ktls() {
    if !kernel_tls("transfers_256_mib_each_way_intact_ktls") {
        return;
    }
    let (fabric, service) = allowed_service();
    let len = 256 * MIB;
    let ktls_ticks = agents_user_ticks_for(&fabric, service, len);
    assert_handed_off(&fabric, 1.0);
    let closed = "clink_connections_closed_total{direction=\"egress\"";
    wait_metric(fabric.ns_a(), METRICS_PORT, closed, 1.0).unwrap();
    let status = fabric.a().status().unwrap();
    assert_eq!(status.datapath, "ktls");
    assert_eq!(status.connections.bytes_out, len as u64);
    assert_eq!(status.connections.bytes_in, len as u64);
    for (ns, direction) in [(fabric.ns_a(), "egress"), (fabric.ns_b(), "ingress")] {
        let closed = format!("clink_connections_closed_total{{direction=\"{direction}\"");
        wait_metric(ns, METRICS_PORT, &closed, 1.0).unwrap();
        let metrics = scrape(ns).unwrap();
        let spliced = sample(
            &metrics,
            "clink_ktls_payload_bytes_total{moved=\"spliced\"}",
        );
        let copied = sample(&metrics, "clink_ktls_payload_bytes_total{moved=\"copied\"}");
        assert_eq!(spliced + copied, 2.0 * len as f64, "{metrics}");
        assert!(
            copied < 0.01 * 2.0 * len as f64,
            "copied {copied} of {}",
            2 * len
        );
    }
    drop(fabric);

    // The same through two userspace agents, an eighth of the bytes.
    let (fabric, service) =
        Fabric::with_service(Datapath::Userspace, IMPORT_PORT).expect("userspace fabric");
    let user_len = len / 8;
    let userspace_ticks = agents_user_ticks_for(&fabric, service, user_len);
    let per_mib = |ticks: u64, len: usize| ticks as f64 / (len / MIB) as f64;
    let (ktls, userspace) = (per_mib(ktls_ticks, len), per_mib(userspace_ticks, user_len));
    eprintln!(
        "agents' user CPU: ktls {ktls_ticks} ticks for 2x{} MiB ({ktls:.3}/MiB), userspace \
         {userspace_ticks} ticks for 2x{} MiB ({userspace:.3}/MiB)",
        len / MIB,
        user_len / MIB
    );
    assert!(userspace_ticks > 0, "the userspace agents used no CPU?");
    // A debug build: the agents' own code (the splice loop's readiness handling) runs
    // unoptimised, while the userspace path's AES-GCM is rustls's assembly either way, so
    // this ratio is far above a release build's (`cargo xtask bench --vm` measures that:
    // under 0.02x, docs/performance.md). Measured here: 0.40x, then 0.56x once the userspace
    // relay itself got cheaper (no buffer held while idle, small boxed futures: 9.5 -> 5.8
    // ticks per MiB) while the kTLS agents stayed at 3.3-3.8. Seven tenths is what this test
    // can hold on to; the 1% bound on copied bytes above is the proof that matters.
    assert!(
        ktls <= 0.7 * userspace,
        "kTLS agents spent {ktls:.3} user ticks per MiB, more than 0.7x userspace's \
         {userspace:.3}"
    );
}

/// A kTLS agent and a userspace (rustls) agent carry the same bytes, whichever side hands
/// its socket to the kernel: the records are plain TLS 1.3 either way.
#[test]
fn ktls_and_userspace_agents_interoperate_both_ways() {
    if !kernel_tls("ktls_and_userspace_agents_interoperate_both_ways") {
        return;
    }
    for (a, b) in [
        (Datapath::Ktls, Datapath::Userspace),
        (Datapath::Userspace, Datapath::Ktls),
    ] {
        let fabric = Fabric::two_clusters_each(a, b).expect("fabric");
        let service = fabric.listen(1).expect("service listener");
        fabric.allow_all().expect("policies");
        fabric
            .export_import("svc", service.local_addr().unwrap(), IMPORT_PORT)
            .expect("export and import");
        let len = 64 * MIB + 3;
        eprintln!("{a:?} importer, {b:?} exporter");
        let client = fabric.connect(0, import_addr()).unwrap();
        transfer_both_ways(service, client, len);
        // The kTLS side handed its tunnel to the kernel; the other side never tried.
        let (ktls_ns, direction, other_ns) = if a == Datapath::Ktls {
            (fabric.ns_a(), "egress", fabric.ns_b())
        } else {
            (fabric.ns_b(), "ingress", fabric.ns_a())
        };
        let series =
            format!("clink_ktls_handoffs_total{{direction=\"{direction}\",result=\"kernel\"}}");
        wait_metric(ktls_ns, METRICS_PORT, &series, 1.0).unwrap();
        let other = scrape(other_ns).unwrap();
        assert_eq!(
            sample(&other, "clink_datapath{datapath=\"userspace\"}"),
            1.0,
            "{other}"
        );
        assert!(!other.contains("clink_ktls_handoffs_total{"), "{other}");
    }
}

/// The service reads the whole request, and only after the client's end of stream (a
/// close_notify and FIN through both kernels) answers; the client still reads it all.
#[test]
fn half_close_and_odd_writes_pass_through_ktls() {
    if !kernel_tls("half_close_and_odd_writes_pass_through_ktls") {
        return;
    }
    let (fabric, service) = allowed_service();
    let client = fabric.connect(0, import_addr()).unwrap();
    // The tunnel opens on accept: let both agents hand it to the kernel before the client
    // half-closes. A FIN that reaches b first leaves b's socket past ESTABLISHED, where the
    // kernel refuses the TLS ULP, and b carries on in userspace (intact, but not the path
    // this test is about; seen once under emulation in CI).
    assert_handed_off(&fabric, 1.0);
    half_close_exchange(service, client, Duration::from_millis(2));
    assert_handed_off(&fabric, 1.0);
}

/// Where the kernel has no kernel TLS: `--datapath ktls` refuses to start and names it;
/// `auto` starts on userspace and logs why it did not take ktls.
#[test]
fn ktls_missing_is_named_and_auto_says_why() {
    if !require_root("ktls_missing_is_named_and_auto_says_why") {
        return;
    }
    if Ktls::probe().is_ok() {
        eprintln!("skipping ktls_missing_is_named_and_auto_says_why: this kernel has kTLS");
        return;
    }
    let out = std::process::Command::new(clink_testbed::bin_path("clink-agent").unwrap())
        .args([
            "--name",
            "x",
            "--certs",
            "/nonexistent",
            "--state",
            "/nonexistent",
        ])
        .args(["--datapath", "ktls"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--datapath ktls: missing kernel TLS")
            && stderr.contains("TCP_ULP")
            && stderr.contains("CONFIG_TLS"),
        "{stderr}"
    );

    let mut fabric = Fabric::two_clusters().expect("fabric");
    let agent = &mut fabric.agents[0];
    agent.stop().unwrap();
    agent.args.extend(["--datapath".into(), "auto".into()]);
    agent.start().unwrap();
    agent
        .wait_log("the kTLS data path is not available")
        .unwrap();
    assert!(agent.log().contains("CONFIG_TLS"), "{}", agent.log());
    assert_eq!(agent.status().unwrap().datapath, "userspace");
}

/// The Import `svc` of cluster a with the service address `VIP:SERVICE_PORT`.
const VIP: &str = "10.96.0.10";
const SERVICE_PORT: u16 = 80;

fn import_with_service_address() -> String {
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata:\n  name: svc\n  \
         annotations: {{clusterlink.net/service-ip: \"{VIP}\"}}\nspec:\n  port: {SERVICE_PORT}\n  \
         targetPort: {IMPORT_PORT}\n  \
         sources: [{{peer: peer-b, exportName: svc, exportNamespace: default}}]\n"
    )
}

/// A pod's client, as in a DaemonSet install: its own network namespace joined to the node's
/// (cluster a's) by a veth pair, inside the cgroup the agent attaches to, connecting to the
/// Import's service address. The connect hook sends it to the Import listener at the node
/// address; the tunnel is handed to kernel TLS, nothing is spliced by sk_msg, and
/// `clink connections`, `clink bpf`, `clink status` and `/metrics` all say `ktls`.
#[test]
fn a_pod_client_reaches_the_service_address_over_ktls() {
    if !kernel_tls("a_pod_client_reaches_the_service_address_over_ktls") {
        return;
    }
    let (fabric, service) = allowed_service();
    let applied = fabric.a().apply(&import_with_service_address()).unwrap();
    assert!(applied.status.success(), "{applied:?}");
    let vip: SocketAddr = format!("{VIP}:{SERVICE_PORT}").parse().unwrap();
    let pod_client = fabric.pod_client(0, vip, IMPORT_PORT).expect("pod client");
    let (pod, client) = (&pod_client.pod, pod_client.stream.try_clone().unwrap());
    assert_eq!(client.local_addr().unwrap().ip(), pod.ip());

    // The tunnel is set up and handed to the kernel before any byte moves: while the
    // connection is open, it is listed with its path, and the agent's map knows which
    // address the pod asked for.
    let mut seen = None;
    clink_testbed::wait_for(
        "the pod's connection on the ktls path",
        Duration::from_secs(60),
        || {
            seen = fabric
                .a()
                .connections()
                .unwrap()
                .into_iter()
                .find(|c| c.local.ip().to_canonical() == pod.ip());
            seen.as_ref().is_some_and(|c| c.path == BytePath::Ktls)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {seen:?}"));
    let bpf = fabric.a().bpf().unwrap();
    assert!(
        bpf.sockets.is_empty(),
        "nothing is spliced by sk_msg on the kTLS path: {bpf:#?}"
    );
    assert!(
        bpf.connections
            .iter()
            .any(|c| c.local.ip().to_canonical() == pod.ip() && c.path == BytePath::Ktls),
        "{bpf:#?}"
    );
    let redirect = bpf
        .redirects
        .iter()
        .find(|r| r.client.ip() == std::net::IpAddr::V4(pod.ip()))
        .unwrap_or_else(|| panic!("no redirect record for the pod: {bpf:#?}"));
    assert_eq!(redirect.service, vip);
    assert_eq!(fabric.a().status().unwrap().paths[&BytePath::Ktls], 1);

    transfer_both_ways(service, client, 64 * MIB + 11);
    assert_handed_off(&fabric, 1.0);
    let series = "clink_connection_paths_total{direction=\"egress\",path=\"ktls\"}";
    wait_metric(fabric.ns_a(), METRICS_PORT, series, 1.0).unwrap();
    // The agent logged the address the pod asked for.
    assert!(
        fabric.a().log().contains(&format!("service_addr={vip}")),
        "{}",
        fabric.a().log()
    );
}

/// SIGKILL of the importing agent in the middle of a kTLS transfer: the client's connection
/// ends with an error, not a clean (truncated) end of stream; the agent's programs are no
/// longer attached to the cgroup (their links die with the process; only the pins stay); and
/// the restarted agent replaces the pins and carries a new connection intact.
#[test]
fn a_killed_ktls_agent_resets_its_clients_and_a_restart_works() {
    if !kernel_tls("a_killed_ktls_agent_resets_its_clients_and_a_restart_works") {
        return;
    }
    let (mut fabric, service) = allowed_service();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = service.accept().unwrap();
        let _ = read_hash(&mut stream);
        service
    });
    let mut client = fabric.connect(0, import_addr()).unwrap();
    let mut writer = client.try_clone().unwrap();
    let sender = std::thread::spawn(move || send_pattern(&mut writer, 5, 1 << 40, 64 * 1024));
    clink_testbed::wait_for(
        "the tunnel on the ktls path",
        Duration::from_secs(60),
        || {
            fabric
                .a()
                .connections()
                .is_ok_and(|c| c.iter().any(|c| c.path == BytePath::Ktls))
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    fabric.agents[0].kill().unwrap();

    // The kernel resets the agent's end (it held unread bytes): the client's next send fails
    // with the reset (or, after it, a broken pipe), and a read then finds nothing more.
    let sent = sender.join().unwrap();
    let err = sent.expect_err("the client kept sending into a dead agent");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{err}"
    );
    let mut rest = Vec::new();
    let read = std::io::Read::read_to_end(&mut client, &mut rest);
    assert!(
        rest.is_empty(),
        "{read:?}: {} bytes after the reset",
        rest.len()
    );
    let service = server.join().unwrap();
    let bpf = fabric.a().bpf().unwrap();
    for program in &bpf.programs {
        assert!(
            program.attached.is_empty(),
            "{} still attached after SIGKILL: {:?}",
            program.name,
            program.attached
        );
    }

    // Started means answering `clink status`, with the state (and the Import's listener)
    // loaded.
    fabric.agents[0].start().unwrap();
    let client = fabric.connect(0, import_addr()).unwrap();
    transfer_both_ways(service, client, 4 * MIB + 1);
}

/// The end-to-end cases the other paths have, on agents that chose kTLS themselves
/// (`--datapath auto` where the kernel has kernel TLS): 24 concurrent connections each way
/// intact, a reset by the service passed on to the client, and a deleted policy that stops
/// new connections.
#[test]
fn auto_takes_ktls_for_concurrent_connections_resets_and_policy_changes() {
    if !kernel_tls("auto_takes_ktls_for_concurrent_connections_resets_and_policy_changes") {
        return;
    }
    let (mut fabric, service) = allowed_service();
    for agent in &mut fabric.agents {
        agent.stop().unwrap();
        for arg in agent.args.iter_mut().filter(|a| *a == "ktls") {
            *arg = "auto".into();
        }
        agent.start().unwrap();
        assert_eq!(
            agent.status().unwrap().datapath,
            "ktls",
            "auto took another path"
        );
    }

    // 24 at once, 2 MiB + i each way, every one checked at both ends.
    const N: usize = 24;
    let len = |i: usize| 2 * MIB + i;
    let server = std::thread::spawn(move || {
        let workers: Vec<_> = (0..N)
            .map(|_| {
                let (stream, _) = service.accept().unwrap();
                // A failure shows at the client too, with the agents' logs.
                std::thread::spawn(move || exchange(stream, 2, 2 * MIB, 100_000).ok())
            })
            .collect();
        let received: Vec<_> = workers
            .into_iter()
            .filter_map(|w| w.join().unwrap())
            .map(|t| (t.received_len, t.received))
            .collect();
        (service, received)
    });
    let clients: Vec<_> = (0..N)
        .map(|i| {
            let client = fabric.connect(0, import_addr()).unwrap();
            std::thread::spawn(move || exchange(client, i as u64 + 10, len(i), 65_537))
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if !failed.is_empty() {
        let notable = |log: String| {
            log.lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("reset"))
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "{} of {N} connections failed, first: {}\nagent a:\n{}\nagent b:\n{}",
            failed.len(),
            failed[0],
            notable(fabric.a().log()),
            notable(fabric.b().log())
        );
    }
    let mut expected = Vec::new();
    for (i, got) in results.into_iter().map(Result::unwrap).enumerate() {
        assert_eq!(got.received_len, 2 * MIB);
        assert_eq!(got.received, pattern_digest(2, 2 * MIB));
        // What this client sent, hashed as it went (its writes are not multiples of 8, so
        // the pattern's stream differs from `pattern_digest`'s).
        expected.push((len(i), got.sent));
    }
    let (service, mut received) = server.join().unwrap();
    received.sort();
    expected.sort();
    assert_eq!(received, expected, "what the service received");
    assert_handed_off(&fabric, N as f64);

    // The service resets its end: the client sees a reset, not an end of stream.
    let mut client = fabric.connect(0, import_addr()).unwrap();
    client.write_all(b"ping").unwrap();
    let (mut accepted, _) = service.accept().unwrap();
    let mut ping = [0u8; 4];
    std::io::Read::read_exact(&mut accepted, &mut ping).unwrap();
    socket2::SockRef::from(&accepted)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(accepted);
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut rest = Vec::new();
    let read = std::io::Read::read_to_end(&mut client, &mut rest);
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client saw {read:?}, not the service's reset"
    );

    // No policy, no new connection (default deny), also on this path.
    fabric
        .a()
        .clink_ok(&["delete", "accesspolicy", "allow-all"])
        .unwrap();
    // The agent may reset so fast that `connect` itself reports it.
    let denied = match fabric.connect(0, import_addr()) {
        Ok(mut stream) => refused(&mut stream),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(denied, "a connection got through without a policy");
    let metrics = scrape(fabric.ns_a()).unwrap();
    assert_eq!(
        sample(
            &metrics,
            "clink_connection_paths_total{direction=\"egress\",path=\"ktls\"}"
        ),
        N as f64 + 1.0,
        "{metrics}"
    );
}
