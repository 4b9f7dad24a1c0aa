//! Caps and shutdown, end to end: floods past a cap are refused at once while the connections
//! already open, heartbeats and `clink status` keep working; SIGTERM drains.
//!
//! Each test runs two agents in two network-namespace clusters with an echo service in
//! cluster b exported and imported into cluster a.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use clink_tests::{
    connect_in, require_root, round_trip, sample, scrape, EchoService, Fabric, METRICS_PORT,
};

/// Import ports in cluster a.
const ECHO: u16 = 7100;
const OTHER: u16 = 7101;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Two clusters, allow-all, the echo service exported from b as `echo` and `other` and
/// imported into a on [`ECHO`] and [`OTHER`]; `a_args` and `b_args` are more agent flags.
fn fabric_with_echo(a_args: &[&str], b_args: &[&str]) -> (Fabric, EchoService) {
    fabric_with(a_args, b_args, None)
}

/// [`fabric_with_echo`], agent a started with the open-file limit `a_open_files`.
fn fabric_with(
    a_args: &[&str],
    b_args: &[&str],
    a_open_files: Option<u64>,
) -> (Fabric, EchoService) {
    let mut fabric = Fabric::two_clusters().expect("two clusters");
    for (i, args) in [a_args, b_args].into_iter().enumerate() {
        let open_files = if i == 0 { a_open_files } else { None };
        if !args.is_empty() || open_files.is_some() {
            let agent = &mut fabric.agents[i];
            agent.stop().unwrap();
            agent.args.extend(args.iter().map(|a| a.to_string()));
            agent.open_files = open_files;
            agent.start().unwrap();
        }
    }
    let echo = EchoService::start(fabric.ns_b()).unwrap();
    fabric.allow_all().unwrap();
    fabric.export_import("echo", echo.addr, ECHO).unwrap();
    fabric.export_import("other", echo.addr, OTHER).unwrap();
    fabric
        .a()
        .wait_reachable("peer-b", true, Duration::from_secs(20))
        .unwrap();
    (fabric, echo)
}

/// A connection through the tunnel that carried one echo, or why not.
fn tunneled(fabric: &Fabric, port: u16, tag: usize) -> io::Result<TcpStream> {
    let mut s = connect_in(fabric.ns_a(), local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    round_trip(&mut s, format!("hello {tag}\n").as_bytes())?;
    Ok(s)
}

/// Opens `n` connections to `port` at once and sorts them: those that carried an echo (kept
/// open), and how many were refused (reset or closed without an answer).
fn flood(fabric: &Fabric, port: u16, n: usize) -> (Vec<TcpStream>, usize) {
    let mut opened = Vec::new();
    let mut refused = 0;
    for i in 0..n {
        let mut s = match connect_in(fabric.ns_a(), local(port)) {
            Ok(s) => s,
            // The agent's reset can come before the connect call has looked at its socket.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                refused += 1;
                continue;
            }
            Err(e) => panic!("connect {i}: {e}"),
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Sent at once, answered (or refused) later: the connections are open together.
        let _ = s.write_all(format!("flood {i}\n").as_bytes());
        opened.push((i, s));
    }
    let mut carried = Vec::new();
    for (i, mut s) in opened {
        let want = format!("flood {i}\n");
        let mut back = vec![0u8; want.len()];
        match s.read_exact(&mut back) {
            Ok(()) => {
                assert_eq!(back, want.as_bytes(), "echo of connection {i}");
                carried.push(s);
            }
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
                    ),
                    "connection {i} neither carried nor refused: {e}"
                );
                refused += 1;
            }
        }
    }
    (carried, refused)
}

/// Waits until a new connection to `port` is tunneled again (a place under the caps freed).
fn wait_for_a_place(fabric: &Fabric, port: u16) {
    clink_testbed::wait_for("a place under the caps", Duration::from_secs(10), || {
        tunneled(fabric, port, 99).is_ok()
    })
    .unwrap();
}

fn b_reachable(status: &clink_agent::admin::types::StatusResponse) -> bool {
    status
        .peers
        .iter()
        .any(|p| p.name == "peer-b" && p.reachable == "True")
}

fn refusals(scrape: &str, listener: &str, limit: &str) -> f64 {
    sample(
        scrape,
        &format!("clink_connection_refusals_total{{listener=\"{listener}\",limit=\"{limit}\"}}"),
    )
}

/// An Import flooded past its cap: the clients over the cap are reset at once and counted,
/// the ones in the cap work, another Import and `clink status` keep working, the peer stays
/// reachable; then the total cap; and after the flood new clients get through again.
#[test]
fn a_flood_past_the_caps_is_refused_and_leaves_the_rest_working() {
    if !require_root("a_flood_past_the_caps_is_refused_and_leaves_the_rest_working") {
        return;
    }
    let (fabric, _echo) = fabric_with_echo(
        &["--max-connections", "40", "--max-import-connections", "30"],
        &[],
    );
    let mut before: Vec<TcpStream> = (0..5)
        .map(|i| tunneled(&fabric, OTHER, i).unwrap())
        .collect();

    let (mut flooders, refused) = flood(&fabric, ECHO, 100);
    assert_eq!(flooders.len(), 30, "the Import's cap");
    assert_eq!(refused, 70);
    let metrics = scrape(fabric.ns_a()).unwrap();
    assert_eq!(refusals(&metrics, "import", "import-connections"), 70.0);
    assert_eq!(
        sample(
            &metrics,
            "clink_connection_limit_in_use{limit=\"connections\"}"
        ),
        35.0
    );

    // The other Import, the connections open before, the admin API and heartbeats.
    for (i, s) in before.iter_mut().enumerate() {
        round_trip(s, format!("still {i}\n").as_bytes()).unwrap();
    }
    let status = fabric.a().status().unwrap();
    assert!(b_reachable(&status), "{status:?}");
    // The total cap: 35 in use of 40.
    let (more, refused) = flood(&fabric, OTHER, 10);
    assert_eq!(more.len(), 5, "the total cap");
    assert_eq!(refused, 5);
    let metrics = scrape(fabric.ns_a()).unwrap();
    assert_eq!(refusals(&metrics, "import", "connections"), 5.0);
    assert!(fabric
        .a()
        .log()
        .contains("at capacity: refusing connections"));

    // Open ones still carry; closing frees the caps.
    round_trip(&mut flooders[0], b"in the cap\n").unwrap();
    drop(flooders);
    drop(more);
    clink_testbed::wait_for("the caps freed", Duration::from_secs(10), || {
        let m = scrape(fabric.ns_a()).unwrap_or_default();
        sample(&m, "clink_connection_limit_in_use{limit=\"connections\"}") == 5.0
    })
    .unwrap();
    tunneled(&fabric, ECHO, 1000).unwrap();
    before.clear();
}

/// The exporter at its cap answers a CONNECT with 503; the importer counts the failure and
/// resets its client; heartbeats still pass; a freed place is taken again.
#[test]
fn the_gateway_answers_503_at_its_cap() {
    if !require_root("the_gateway_answers_503_at_its_cap") {
        return;
    }
    let (fabric, _echo) = fabric_with_echo(&[], &["--max-connections", "3"]);
    let mut open: Vec<TcpStream> = (0..3)
        .map(|i| tunneled(&fabric, ECHO, i).unwrap())
        .collect();
    let err = tunneled(&fabric, ECHO, 3).expect_err("a fourth tunnel past b's cap");
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
        ),
        "{err}"
    );
    let b = scrape(fabric.ns_b()).unwrap();
    assert_eq!(refusals(&b, "gateway", "connections"), 1.0);
    fabric
        .b()
        .wait_log("at capacity: CONNECT refused (503)")
        .unwrap();
    let a = scrape(fabric.ns_a()).unwrap();
    assert!(
        a.lines()
            .any(|l| l.starts_with("clink_connections_failed_total")
                && l.contains("reason=\"refused-503\"")),
        "the importer counts the 503"
    );
    // Heartbeats are not tunnels: peer-b stays reachable.
    let status = fabric.a().status().unwrap();
    assert!(b_reachable(&status), "{status:?}");
    for (i, s) in open.iter_mut().enumerate() {
        round_trip(s, format!("open {i}\n").as_bytes()).unwrap();
    }
    open.pop();
    wait_for_a_place(&fabric, ECHO);
}

/// An agent with a low open-file limit and no explicit caps: a flood of clients is refused
/// before the agent runs out of descriptors, and heartbeats, the admin API and a new
/// connection after the flood work.
#[test]
fn default_caps_keep_the_agent_within_its_open_file_limit() {
    if !require_root("default_caps_keep_the_agent_within_its_open_file_limit") {
        return;
    }
    let (fabric, _echo) = fabric_with(&[], &[], Some(600));
    // 600 - 256 reserved - 2 x 64 HTTP = 216; 27 for handshakes; (216 - 27) / 2 = 94.
    let metrics = scrape(fabric.ns_a()).unwrap();
    assert_eq!(
        sample(&metrics, "clink_connection_limit{limit=\"connections\"}"),
        94.0
    );
    let (carried, refused) = flood(&fabric, ECHO, 300);
    assert_eq!(carried.len(), 94);
    assert_eq!(refused, 206);
    let fds = fabric.a().open_fds();
    assert!(fds < 600 - 200, "{fds} descriptors open at the cap");
    let log = fabric.a().log();
    assert!(!log.contains("out of file descriptors"), "EMFILE reached");
    assert!(log.contains("max_connections=94"), "the caps are logged");
    let status = fabric.a().status().unwrap();
    assert!(b_reachable(&status), "{status:?}");
    drop(carried);
    wait_for_a_place(&fabric, ECHO);
}

/// Local users holding partial HTTP heads on the metrics endpoint: past its cap connections
/// are closed at once, the held ones are closed after the header timeout, and meanwhile the
/// admin API and tunnels work.
#[test]
fn partial_heads_cannot_hold_the_metrics_endpoint() {
    if !require_root("partial_heads_cannot_hold_the_metrics_endpoint") {
        return;
    }
    let (fabric, _echo) = fabric_with_echo(&[], &[]);
    let fds_before = fabric.a().open_fds();
    let mut held = Vec::new();
    for _ in 0..100 {
        let mut s = connect_in(fabric.ns_a(), local(METRICS_PORT)).unwrap();
        s.write_all(b"GET /metr").unwrap();
        held.push(s);
    }
    let started = Instant::now();
    // The ones past the cap are closed at once; the first 64 wait for their head.
    let mut closed = 0;
    for s in &mut held[64..] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => closed += 1,
            other => panic!("a connection past the cap was served: {other:?}"),
        }
    }
    assert_eq!(closed, 36);
    let fds = fabric.a().open_fds();
    assert!(
        fds <= fds_before + 64 + 8,
        "{fds} descriptors, {fds_before} before"
    );
    fabric.a().status().unwrap();
    tunneled(&fabric, ECHO, 0).unwrap();

    // The header timeout (10 s) closes the held ones.
    for s in &mut held[..64] {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(
            n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(8) && waited < Duration::from_secs(20),
        "closed after {waited:?}"
    );
    let metrics = scrape(fabric.ns_a()).unwrap();
    assert_eq!(refusals(&metrics, "metrics", "http-connections"), 36.0);
}

/// SIGTERM: the listeners close at once, an open connection keeps carrying until its client
/// ends it, then the agent exits without waiting for the drain timeout.
#[test]
fn sigterm_stops_accepting_and_lets_open_connections_finish() {
    if !require_root("sigterm_stops_accepting_and_lets_open_connections_finish") {
        return;
    }
    let (mut fabric, _echo) = fabric_with_echo(&["--drain-timeout", "30"], &[]);
    let mut open = tunneled(&fabric, ECHO, 0).unwrap();
    fabric.a().terminate().unwrap();
    fabric.a().wait_log("draining").unwrap();
    // New clients are refused: the listener is gone.
    clink_testbed::wait_for("the import listener closed", Duration::from_secs(5), || {
        connect_in(fabric.ns_a(), local(ECHO)).is_err()
    })
    .unwrap();
    for i in 0..5 {
        round_trip(&mut open, format!("during the drain {i}\n").as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    let closed = Instant::now();
    drop(open);
    let status = fabric.agents[0].wait_exit(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}");
    assert!(
        closed.elapsed() < Duration::from_secs(5),
        "{:?}",
        closed.elapsed()
    );
    assert!(fabric
        .a()
        .log()
        .contains("drained: every connection has ended"));
}

/// SIGTERM with a connection that does not end: the agent exits after the drain timeout.
#[test]
fn sigterm_exits_after_the_drain_timeout() {
    if !require_root("sigterm_exits_after_the_drain_timeout") {
        return;
    }
    let (mut fabric, _echo) = fabric_with_echo(&["--drain-timeout", "3"], &[]);
    let mut open = tunneled(&fabric, ECHO, 0).unwrap();
    let signalled = Instant::now();
    fabric.a().terminate().unwrap();
    let status = fabric.agents[0].wait_exit(Duration::from_secs(15)).unwrap();
    let took = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "exited after {took:?}"
    );
    assert!(fabric.a().log().contains("drain timeout"));
    // The client learns that its connection was cut, not that it ended.
    let mut buf = [0u8; 16];
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let err = open
        .read(&mut buf)
        .expect_err("a reset, not an end of stream");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    let log = fabric.a().log();
    assert!(
        log.contains("shutting down, and the drain timeout passed"),
        "the reason is logged"
    );
}
