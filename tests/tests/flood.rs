//! A fabric member flooding the gateway: tens of thousands of CONNECTs to names that do not
//! exist (some of them 16 KiB long), from a Peer and from a member that is not one, and TCP
//! that is not TLS. The exporter must count every refusal, yet keep `/metrics`, its memory and
//! its log within fixed bounds, and go on serving tunnels.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use clink_agent::tls::Identity;
use clink_testbed::{bin_path, read_from, reissue_certificate, Netns};
use clink_tests::{
    require_root, sample, scrape, total, transfer_both_ways, Datapath, Fabric, FABRIC, GATEWAY_PORT,
};

const IMPORT_PORT: u16 = 7000;
/// CONNECTs from Peer `peer-a` to distinct export names that do not exist.
const DISTINCT: usize = 20_000;
/// CONNECTs with names of 16,000 bytes (the head fits in the 16 KiB limit: `404`) and of
/// 16 KiB (it does not: `400`).
const LONG: usize = 100;
/// CONNECTs from `peer-x`, a member of the fabric that is not one of b's Peers.
const FROM_STRANGER: usize = 500;
/// Plain TCP connections that send something other than TLS.
const NOT_TLS: usize = 500;
/// TLS connections at once: one request each (the gateway serves one head per connection).
const WORKERS: usize = 8;

/// The bounds the flood must stay in at the exporter.
const METRICS_GROWTH: usize = 64 * 1024;
const RSS_GROWTH_KIB: u64 = 8 * 1024;
const LOG_GROWTH: u64 = 200 * 1024;

const FAILED: &str = "clink_connections_failed_total{direction=\"ingress\"";

#[test]
fn a_flood_of_unknown_names_leaves_metrics_memory_and_log_bounded() {
    if !require_root("a_flood_of_unknown_names_leaves_metrics_memory_and_log_bounded") {
        return;
    }
    let (mut fabric, service) = Fabric::with_service(Datapath::Userspace, IMPORT_PORT).unwrap();
    // A short window of the log limiter, so that the flood spans several of them however fast
    // this machine sends it: each new window logs the count suppressed in the last ones. With
    // the default 10 s a flood done in under 10 s left only the warm-up's lines.
    {
        let b = &mut fabric.agents[1];
        b.stop().unwrap();
        b.args
            .extend(["--log-repeat-interval".to_owned(), "1".to_owned()]);
        b.start().unwrap();
    }
    let b = fabric.b();
    let pid = b.pid().expect("agent b runs");
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim(),
        "clink-agent"
    );
    let gateway = SocketAddr::from((fabric.topo.b().ip(), GATEWAY_PORT));
    let peer_a = Arc::new(Identity::load(&fabric.a().certs_dir(), "peer-a").unwrap());
    let certs = fabric.dir.path().join("certs");
    let stranger_dir = reissue_certificate(
        &bin_path("clink").unwrap(),
        &certs,
        FABRIC,
        "peer-x",
        &fabric.dir.path().join("member"),
    )
    .unwrap();
    let stranger = Arc::new(Identity::load(&stranger_dir, "peer-x").unwrap());

    // Warm up, so that what the first connections allocate for good (worker threads, their
    // allocator arenas, TLS session caches) is in the baseline. The first refusals of a kind
    // are logged: a long name among them shows how it is cut.
    let mut warm = long_names(2);
    warm.extend(names("warm", 2_000));
    let warm = flood(fabric.ns_a(), gateway, &peer_a, warm);
    assert_eq!(warm.answers(404), 2_001, "{warm:?}");
    let before = Measure::take(&fabric, pid);

    let started = Instant::now();
    let mut sent = 0;
    let distinct = flood(fabric.ns_a(), gateway, &peer_a, names("ghost", DISTINCT));
    assert_eq!(distinct.answers(404), DISTINCT, "{distinct:?}");
    sent += DISTINCT;
    let long = flood(fabric.ns_a(), gateway, &peer_a, long_names(LONG));
    assert_eq!(long.answers(404), LONG / 2, "{long:?}");
    assert_eq!(long.answers(400), LONG / 2, "{long:?}");
    sent += LONG;
    let strange = flood(
        fabric.ns_a(),
        gateway,
        &stranger,
        names("svc", FROM_STRANGER),
    );
    assert_eq!(strange.answers(403), FROM_STRANGER, "{strange:?}");
    sent += FROM_STRANGER;
    not_tls(fabric.ns_a(), gateway, NOT_TLS);
    let took = started.elapsed();

    // The agent answered every request before the client saw it close, and counted it
    // before answering; the handshake failures are counted as the agent notices the close.
    let after = Measure::wait(&fabric, pid, |m| {
        sample(&m.metrics, HANDSHAKE_ERRORS) >= sample(&before.metrics, HANDSHAKE_ERRORS) + 500.0
    });
    eprintln!(
        "{} requests and {NOT_TLS} non-TLS connections in {took:?}; /metrics {} -> {} bytes, \
         VmRSS {} -> {} KiB, log {} -> {} bytes",
        sent,
        before.metrics.len(),
        after.metrics.len(),
        before.rss_kib,
        after.rss_kib,
        before.log_len,
        after.log_len
    );

    // Every refusal counted, under labels of objects that exist.
    assert_eq!(
        total(&after.metrics, FAILED) - total(&before.metrics, FAILED),
        sent as f64,
        "{}",
        after.metrics
    );
    let series = |service: &str, peer: &str, reason: &str| {
        format!("{FAILED},service=\"{service}\",peer=\"{peer}\",reason=\"{reason}\"}}")
    };
    let grew = |series: &str| sample(&after.metrics, series) - sample(&before.metrics, series);
    assert_eq!(
        grew(&series("unknown", "peer-a", "no-export")),
        (DISTINCT + LONG / 2) as f64
    );
    assert_eq!(grew(&series("", "peer-a", "protocol")), (LONG / 2) as f64);
    assert_eq!(
        grew(&series("", "unknown", "unknown-peer")),
        FROM_STRANGER as f64
    );
    assert_eq!(grew(HANDSHAKE_ERRORS), NOT_TLS as f64);
    assert!(
        !after.metrics.contains("ghost") && !after.metrics.contains("peer-x"),
        "a requested name became a label:\n{}",
        &after.metrics[..after.metrics.len().min(4096)]
    );
    assert!(
        sample(
            &after.metrics,
            "clink_log_lines_suppressed_total{reason=\"no-export\"}"
        ) > 0.0,
        "{}",
        after.metrics
    );

    // Within bounds.
    assert!(
        after.metrics.len() < before.metrics.len() + METRICS_GROWTH,
        "/metrics grew from {} to {} bytes",
        before.metrics.len(),
        after.metrics.len()
    );
    assert!(
        after.rss_kib < before.rss_kib + RSS_GROWTH_KIB,
        "VmRSS grew from {} to {} KiB",
        before.rss_kib,
        after.rss_kib
    );
    assert!(
        after.log_len < before.log_len + LOG_GROWTH,
        "the log grew from {} to {} bytes",
        before.log_len,
        after.log_len
    );
    let log = b.log();
    let flood_log = &read_from(&b.log_path(), before.log_len);
    assert!(
        flood_log.contains("refused: no such export") && flood_log.contains("suppressed="),
        "{}",
        tail(flood_log)
    );
    assert!(
        flood_log.contains("TLS handshake failed"),
        "{}",
        tail(flood_log)
    );
    // Names were cut: no line carries a whole 16 KiB name.
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1024, "a line of {longest} bytes");
    let cut = format!(
        "export=\"default/00000000{}\"…(16008 bytes)",
        "f".repeat(112)
    );
    assert!(log.contains(&cut), "{}", tail(&log));

    // And the gateway still carries tunnels, both ways intact.
    let client = fabric.connect(0, import_addr()).unwrap();
    transfer_both_ways(service, client, 4 * 1024 * 1024);
}

const HANDSHAKE_ERRORS: &str = "clink_gateway_handshake_failures_total{reason=\"error\"}";

fn import_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], IMPORT_PORT))
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// `n` names, alternately of 16,000 bytes (the CONNECT head fits in the gateway's 16 KiB
/// limit: `404`) and of 16 KiB (it does not: `400`).
fn long_names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let len = if i % 2 == 0 { 16_000 } else { 16 * 1024 };
            format!("{i:0>8}{}", "f".repeat(len - 8))
        })
        .collect()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// What the exporter shows from outside: its metrics, memory and log size.
struct Measure {
    metrics: String,
    rss_kib: u64,
    log_len: u64,
}

impl Measure {
    fn take(fabric: &Fabric, pid: u32) -> Measure {
        Measure {
            metrics: scrape(fabric.ns_b()).unwrap(),
            rss_kib: rss_kib(pid),
            log_len: std::fs::metadata(fabric.b().log_path()).unwrap().len(),
        }
    }

    /// Measures once `ready` holds (at most 10 s).
    fn wait(fabric: &Fabric, pid: u32, ready: impl Fn(&Measure) -> bool) -> Measure {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = Measure::take(fabric, pid);
            if ready(&m) || Instant::now() > deadline {
                return m;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The resident set of process `pid` (`VmRSS` in `/proc/<pid>/status`), in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

/// The status codes of the answers a flood got, and how often each came.
#[derive(Debug, Default)]
struct Answers(std::collections::BTreeMap<String, usize>);

impl Answers {
    fn answers(&self, status: u16) -> usize {
        self.0
            .get(&format!("HTTP/1.1 {status}"))
            .copied()
            .unwrap_or(0)
    }
}

/// Sends `CONNECT <name>.default:443` for every name, one TLS connection each, from
/// [`WORKERS`] connections at once in `ns`, with `identity`'s certificate.
fn flood(ns: &Netns, gateway: SocketAddr, identity: &Identity, names: Vec<String>) -> Answers {
    let names = std::sync::Mutex::new(names.into_iter());
    let answers = std::sync::Mutex::new(Answers::default());
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| {
                ns.enter(|| loop {
                    let Some(name) = names.lock().unwrap().next() else {
                        return;
                    };
                    let status = connect(gateway, identity, &name);
                    *answers.lock().unwrap().0.entry(status).or_default() += 1;
                })
            });
        }
    });
    answers.into_inner().unwrap()
}

/// One CONNECT on a TLS connection of its own; the answer's status line, up to the code.
fn connect(gateway: SocketAddr, identity: &Identity, name: &str) -> String {
    let tcp = match std::net::TcpStream::connect_timeout(&gateway, Duration::from_secs(10)) {
        Ok(tcp) => tcp,
        Err(e) => return format!("connect: {e}"),
    };
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let conn =
        rustls::ClientConnection::new(Arc::clone(&identity.client), "peer-b".try_into().unwrap())
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let head = format!("CONNECT {name}.default:443 HTTP/1.1\r\nHost: peer-b\r\n\r\n");
    // The gateway may answer an oversized head and close before taking all of it.
    let _ = tls.write_all(head.as_bytes());
    let _ = tls.flush();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    answer.get(..12).unwrap_or(&answer).to_owned()
}

/// `n` plain TCP connections to the gateway that send a line of text instead of a TLS
/// handshake.
fn not_tls(ns: &Netns, gateway: SocketAddr, n: usize) {
    ns.enter(|| {
        for _ in 0..n {
            let mut tcp =
                std::net::TcpStream::connect_timeout(&gateway, Duration::from_secs(10)).unwrap();
            let _ = tcp.write_all(b"GET / HTTP/1.1\r\n\r\n");
            let _ = tcp.read(&mut [0u8; 64]);
        }
    });
}
