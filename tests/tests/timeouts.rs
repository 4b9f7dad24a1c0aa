//! Dead peers, idle connections and revoked access, end to end (ARCHITECTURE.md, "Dead peers,
//! idle connections and revoked access"): a peer that vanishes without a FIN is noticed by
//! TCP keepalive and the user timeout, an idle tunnel is reset after `--idle-timeout`, and a
//! change that no longer allows an open tunnel resets it, unless `--keep-established`.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use clink_testbed::Netns;
use clink_tests::{
    refused_at, require_root, sample, scrape, wait_metric, Datapath, Fabric, Patient, Pattern,
    METRICS_PORT,
};
use sha2::{Digest as _, Sha256};

const IMPORT_PORT: u16 = 7000;

fn import_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], IMPORT_PORT))
}

/// One series of `clink_connections_terminated_total`.
fn terminated(direction: &str, reason: &str) -> String {
    format!("clink_connections_terminated_total{{direction=\"{direction}\",reason=\"{reason}\"}}")
}

/// Echoes every connection `service` accepts, one thread each, for the rest of the test.
fn echo(service: TcpListener) {
    thread::spawn(move || {
        for stream in service.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n @ 1..) = Patient(&mut stream).read(&mut buf) {
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// Sends `msg` and reads its echo back; `Err` when the connection fails.
fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    Patient(&mut *stream).read_exact(&mut back)?;
    Ok(back)
}

/// How a client waiting for data sees its connection end: the error of its read (`Ok(0)` is
/// a clean end, which is wrong here) and when, after `since`; `WouldBlock` after 30 s.
fn wait_for_end(stream: &mut TcpStream, since: Instant) -> (io::Result<usize>, Duration) {
    const PATIENCE: Duration = Duration::from_secs(30);
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut byte = [0u8; 1];
    loop {
        let result = stream.read(&mut byte);
        // A spliced socket answers a blocking read with EAGAIN now and then (see `Patient`).
        if matches!(&result, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            && since.elapsed() < PATIENCE
        {
            thread::sleep(Duration::from_millis(1));
            continue;
        }
        return (result, since.elapsed());
    }
}

fn run(command: &mut Command) {
    let out = command.output().unwrap();
    assert!(out.status.success(), "{command:?}: {out:?}");
}

/// Drops every packet between the two clusters, both ways: a peer that vanished without a
/// FIN or a reset. The rules go with the namespaces.
fn blackhole(from: &Netns, peer_ip: &str) {
    run(from
        .command("iptables")
        .args(["-A", "INPUT", "-s", peer_ip, "-j", "DROP"]));
}

/// A peer that stops answering (all packets dropped, no FIN, no reset) is noticed by TCP
/// keepalive (a quiet tunnel) and by the user timeout (a tunnel with data in flight): both
/// clients are reset within the configured bound, not left hanging, and both agents count
/// why.
#[test]
fn a_blackholed_peer_resets_quiet_and_busy_tunnels_within_the_bound() {
    if !require_root("a_blackholed_peer_resets_quiet_and_busy_tunnels_within_the_bound") {
        return;
    }
    // Probes after 2 s quiet, 1 s apart; the user timeout (4 s) decides, quiet or busy.
    const BOUND: Duration = Duration::from_secs(4);
    let args = [
        "--peer-keepalive",
        "2",
        "--peer-keepalive-interval",
        "1",
        "--peer-keepalive-count",
        "2",
        "--peer-user-timeout",
        "4",
    ];
    let (fabric, service) =
        Fabric::with_service_args(Datapath::Userspace, IMPORT_PORT, [&args, &args]).unwrap();
    echo(service);
    let mut quiet = fabric.connect(0, import_addr()).unwrap();
    let mut busy = fabric.connect(0, import_addr()).unwrap();
    assert_eq!(round_trip(&mut quiet, b"quiet").unwrap(), b"quiet");
    assert_eq!(round_trip(&mut busy, b"busy").unwrap(), b"busy");
    assert_eq!(fabric.a().connections().unwrap().len(), 2);

    // The busy client writes without pause and reads the echo, so data is in flight both
    // ways when the cut comes, until its connection fails.
    let mut reader = busy.try_clone().unwrap();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(1..) = reader.read(&mut buf) {}
    });
    let mut writer = busy.try_clone().unwrap();
    // A bound for a broken agent: the assertions below fail instead of the test hanging.
    writer
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<Instant>();
    let busy_client = thread::spawn(move || {
        let chunk = vec![7u8; 16 * 1024];
        let mut started = None;
        loop {
            if started.is_none() {
                started = started_rx.try_recv().ok();
            }
            if let Err(e) = writer.write_all(&chunk) {
                let since = started.or_else(|| started_rx.recv().ok()).unwrap();
                return (e, since.elapsed());
            }
        }
    });
    thread::sleep(Duration::from_millis(300));

    let (ip_a, ip_b) = (fabric.topo.a().ip(), fabric.topo.b().ip());
    blackhole(fabric.ns_a(), &ip_b.to_string());
    blackhole(fabric.ns_b(), &ip_a.to_string());
    let cut = Instant::now();
    started_tx.send(cut).unwrap();

    let (result, elapsed) = wait_for_end(&mut quiet, cut);
    let error = result.expect_err("the quiet client must see a reset, not data or a clean end");
    eprintln!("quiet client: {error} {elapsed:?} after the cut");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed <= BOUND + Duration::from_secs(2),
        "the quiet client was reset {elapsed:?} after the cut (bound {BOUND:?})"
    );
    let (error, elapsed) = busy_client.join().unwrap();
    eprintln!("busy client: {error} {elapsed:?} after the cut");
    assert!(
        matches!(
            error.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ),
        "{error}"
    );
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed <= BOUND + Duration::from_secs(2),
        "the busy client was reset {elapsed:?} after the cut (bound {BOUND:?})"
    );
    // The exporter noticed too: its side of both tunnels (and the service's) was reset.
    let series = terminated("egress", "peer-timeout");
    wait_metric(fabric.ns_a(), METRICS_PORT, &series, 2.0).unwrap();
    let series = terminated("ingress", "peer-timeout");
    wait_metric(fabric.ns_b(), METRICS_PORT, &series, 2.0).unwrap();
    assert!(fabric.a().connections().unwrap().is_empty());
    assert!(fabric.b().connections().unwrap().is_empty());
}

/// `--idle-timeout 2`: a tunnel that moves no byte for 2 s is reset (within 2.5 s, the sweep
/// looks every 0.5 s), while one that moves a few bytes every 400 ms lives on.
fn idle_tunnel_reset(datapath: Datapath) {
    // Only the importer has the timeout, so the reset is its doing.
    let (fabric, service) =
        Fabric::with_service_args(datapath, IMPORT_PORT, [&["--idle-timeout", "2"], &[]]).unwrap();
    echo(service);

    let busy = fabric.connect(0, import_addr()).unwrap();
    let busy_client = thread::spawn(move || {
        let mut busy = busy;
        let started = Instant::now();
        let mut trips = 0;
        while started.elapsed() < Duration::from_secs(5) {
            assert_eq!(round_trip(&mut busy, b"tick").unwrap(), b"tick");
            trips += 1;
            thread::sleep(Duration::from_millis(400));
        }
        trips
    });
    let mut quiet = fabric.connect(0, import_addr()).unwrap();
    assert_eq!(round_trip(&mut quiet, b"hello").unwrap(), b"hello");
    let last_byte = Instant::now();
    let (result, elapsed) = wait_for_end(&mut quiet, last_byte);
    let error = result.expect_err("the idle client must see a reset, not a clean end");
    eprintln!("idle client: {error} {elapsed:?} after its last byte");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed <= Duration::from_millis(3000),
        "reset {elapsed:?} after the last byte (timeout 2 s, sweep every 0.5 s)"
    );
    let trips = busy_client.join().unwrap();
    assert!(trips >= 10, "{trips} round trips");

    let series = terminated("egress", "idle");
    wait_metric(fabric.ns_a(), METRICS_PORT, &series, 1.0).unwrap();
    let metrics = scrape(fabric.ns_a()).unwrap();
    assert_eq!(sample(&metrics, &series), 1.0, "only the quiet one");
    fabric
        .a()
        .wait_log("idle connection; resetting it")
        .unwrap();
    let open = fabric.a().connections().unwrap();
    assert!(open.is_empty(), "{open:?}");
}

#[test]
fn an_idle_tunnel_is_reset_and_a_busy_one_is_not() {
    if !require_root("an_idle_tunnel_is_reset_and_a_busy_one_is_not") {
        return;
    }
    idle_tunnel_reset(Datapath::Userspace);
}

#[test]
fn an_idle_tunnel_is_reset_and_a_busy_one_is_not_sockmap() {
    if !require_root("an_idle_tunnel_is_reset_and_a_busy_one_is_not_sockmap") {
        return;
    }
    idle_tunnel_reset(Datapath::Sockmap);
}

/// Waits for the client's reset after a change that no longer allows its tunnel: within a
/// second of the change's answer.
fn assert_reset_promptly(client: &mut TcpStream, changed: Instant) {
    let (result, elapsed) = wait_for_end(client, changed);
    let error = result.expect_err("the client must see a reset, not data or a clean end");
    eprintln!("client: {error} {elapsed:?} after the change");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
    assert!(elapsed < Duration::from_secs(1), "reset after {elapsed:?}");
}

/// Deleting the policy that allowed an open tunnel resets it: on the importer (its egress
/// decision), on the exporter (its ingress decision); and so does deleting its Import.
#[test]
fn a_change_that_no_longer_allows_an_open_tunnel_resets_it() {
    if !require_root("a_change_that_no_longer_allows_an_open_tunnel_resets_it") {
        return;
    }
    let (fabric, service) =
        Fabric::with_service_args(Datapath::Userspace, IMPORT_PORT, [&[], &[]]).unwrap();
    echo(service);
    let (a, b) = (fabric.a(), fabric.b());

    // The importer's egress policy goes.
    let mut client = fabric.connect(0, import_addr()).unwrap();
    assert_eq!(round_trip(&mut client, b"one").unwrap(), b"one");
    a.clink_ok(&["delete", "accesspolicy", "allow-all"])
        .unwrap();
    assert_reset_promptly(&mut client, Instant::now());
    let series = terminated("egress", "denied");
    wait_metric(fabric.ns_a(), METRICS_PORT, &series, 1.0).unwrap();
    a.wait_log("open connection no longer allowed; resetting it")
        .unwrap();
    a.wait_log("after a policy change, egress deny by default (no policy matched)")
        .unwrap();
    assert!(refused_at(fabric.ns_a(), import_addr()));

    // The exporter's ingress policy goes.
    a.clink_ok(&["create", "policy", "allow-all", "--action", "allow"])
        .unwrap();
    let mut client = fabric.connect(0, import_addr()).unwrap();
    assert_eq!(round_trip(&mut client, b"two").unwrap(), b"two");
    b.clink_ok(&["delete", "accesspolicy", "allow-all"])
        .unwrap();
    assert_reset_promptly(&mut client, Instant::now());
    let series = terminated("ingress", "denied");
    wait_metric(fabric.ns_b(), METRICS_PORT, &series, 1.0).unwrap();
    b.wait_log("after a policy change, ingress deny by default (no policy matched)")
        .unwrap();

    // The Import goes.
    b.clink_ok(&["create", "policy", "allow-all", "--action", "allow"])
        .unwrap();
    let mut client = fabric.connect(0, import_addr()).unwrap();
    assert_eq!(round_trip(&mut client, b"three").unwrap(), b"three");
    a.clink_ok(&["delete", "import", "svc"]).unwrap();
    assert_reset_promptly(&mut client, Instant::now());
    let series = terminated("egress", "removed");
    wait_metric(fabric.ns_a(), METRICS_PORT, &series, 1.0).unwrap();
    a.wait_log("closed by the agent: Import default/svc was deleted")
        .unwrap();
    assert!(a.connections().unwrap().is_empty());
}

/// Round trips of pattern bytes (64 KiB each) whose echo must come back intact; returns the
/// SHA-256 of what was sent and of what came back.
fn hashed_round_trips(client: &mut TcpStream, seed: u64, trips: usize) -> ([u8; 32], [u8; 32]) {
    let mut pattern = Pattern::new(seed);
    let (mut sent, mut received) = (Sha256::new(), Sha256::new());
    let mut msg = vec![0u8; 64 * 1024];
    for _ in 0..trips {
        pattern.fill(&mut msg);
        sent.update(&msg);
        received.update(round_trip(client, &msg).unwrap());
    }
    (sent.finalize().into(), received.finalize().into())
}

/// With `--keep-established`, deleting the allowing policies on both sides leaves the open
/// tunnel carrying bytes (checked by SHA-256); only new connections are refused.
#[test]
fn keep_established_keeps_an_open_tunnel_carrying_bytes() {
    if !require_root("keep_established_keeps_an_open_tunnel_carrying_bytes") {
        return;
    }
    let (fabric, service) = Fabric::with_service_args(
        Datapath::Userspace,
        IMPORT_PORT,
        [&["--keep-established"]; 2],
    )
    .unwrap();
    echo(service);
    let mut client = fabric.connect(0, import_addr()).unwrap();
    let (sent, received) = hashed_round_trips(&mut client, 1, 16);
    assert_eq!(sent, received);

    for agent in [fabric.a(), fabric.b()] {
        agent
            .clink_ok(&["delete", "accesspolicy", "allow-all"])
            .unwrap();
        agent
            .wait_log("open connection no longer allowed; kept (--keep-established)")
            .unwrap();
    }
    let (sent, received) = hashed_round_trips(&mut client, 2, 16);
    assert_eq!(sent, received, "the kept tunnel carries intact bytes");
    assert!(refused_at(fabric.ns_a(), import_addr()));
    for ns in [fabric.ns_a(), fabric.ns_b()] {
        let metrics = scrape(ns).unwrap();
        assert!(
            !metrics.contains("clink_connections_terminated_total{"),
            "nothing terminated:\n{metrics}"
        );
    }
    assert_eq!(fabric.a().connections().unwrap().len(), 1);
}
