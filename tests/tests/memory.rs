//! What an idle tunneled connection costs each agent in memory, and that the memory comes
//! back after the connections close (issue 12, item 9).
//!
//! 10,000 clients in cluster a each make one small round trip through a tunnel to an echo
//! service in cluster b and then stay open and quiet. Each agent's resident set (VmRSS) is
//! read at rest, with the 10,000 tunnels open, and after they close: the cost per
//! connection per side is the growth divided by the count. The echo service runs on a
//! small tokio runtime in this process (the testbed's `EchoService` takes a thread per
//! connection, too many for 10,000).
//!
//! `cargo test -p clink-tests --test memory -- --nocapture` prints the figures.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use clink_agent::limits;
use clink_testbed::Netns;
use clink_tests::{listen_in, require_root, sample, scrape, Agent, Fabric};
use futures::{stream, StreamExt as _, TryStreamExt as _};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    runtime::Runtime,
    time::timeout,
};

const IMPORT_PORT: u16 = 7400;
/// Idle tunneled connections held open at once: the target, unless the limit on open
/// files is lower (see [`open_file_budget`]).
const CONNECTIONS: usize = 10_000;
/// Descriptors an agent (or this process) needs besides two per connection: listeners, the
/// pool, the admin and metrics sockets, log, epoll, the test's scrapes.
const SPARE_FILES: u64 = 256;
/// What an idle tunneled connection may cost each agent: the target. Measured at
/// 10.9 KiB (importer) and 11.0 KiB (exporter) with 9,296 connections in debug builds
/// (ARCHITECTURE.md, "Buffers", has the parts).
const MAX_PER_CONNECTION: u64 = 12 * 1024;
/// Clients connecting at once: enough to keep both agents busy without queueing past the
/// Import listener's backlog.
const CONCURRENCY: usize = 64;
/// How long the agents may take to give the memory back after the last close.
const RETURN_WITHIN: Duration = Duration::from_secs(60);
/// How long the resident set may take to settle before it is read.
const SETTLE_LIMIT: Duration = Duration::from_secs(16);
/// How long one client may take to connect and get its echo.
const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(30);

#[test]
fn idle_tunnels_cost_at_most_12_kib_per_side_and_memory_returns_after_close() {
    if !require_root("idle_tunnels_cost_at_most_12_kib_per_side_and_memory_returns_after_close") {
        return;
    }
    let connections = open_file_budget();
    let fabric = Fabric::two_clusters().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let echo = start_echo(&runtime, fabric.ns_b());
    fabric.allow_all().unwrap();
    fabric.export_import("echo", echo, IMPORT_PORT).unwrap();
    let import = SocketAddr::from(([127, 0, 0, 1], IMPORT_PORT));
    let pids = [agent_pid(fabric.a()), agent_pid(fabric.b())];

    // At rest: the agents have served a few tunnels (their worker threads, TLS session caches,
    // metric series and connection pool exist), and hold none.
    let warm = open_idle(&runtime, fabric.ns_a(), import, CONCURRENCY, 0).unwrap();
    drop(warm);
    wait_active(&fabric, 0);
    let idle = settled_rss(pids);

    let started = Instant::now();
    let clients = open_idle(&runtime, fabric.ns_a(), import, connections, 1).unwrap_or_else(|e| {
        panic!(
            "{e}\nagent a:\n{}\nagent b:\n{}",
            tail(fabric.a()),
            tail(fabric.b())
        )
    });
    let opened = started.elapsed();
    wait_active(&fabric, connections);
    let loaded = settled_rss(pids);
    let per_connection = [0, 1].map(|i| loaded[i].saturating_sub(idle[i]) / connections as u64);

    let closed_at = Instant::now();
    drop(clients);
    wait_active(&fabric, 0);
    let mut after = pids.map(rss);
    while (0..2).any(|i| after[i] > 2 * idle[i]) && closed_at.elapsed() < RETURN_WITHIN {
        std::thread::sleep(Duration::from_millis(500));
        after = pids.map(rss);
    }
    let returned_in = closed_at.elapsed();

    for (i, side) in ["a (importer)", "b (exporter)"].iter().enumerate() {
        eprintln!(
            "agent {side}: at rest {} KiB; with {connections} idle tunnels {} KiB = {} B per \
             connection; {returned_in:.1?} after they closed {} KiB",
            idle[i] / 1024,
            loaded[i] / 1024,
            per_connection[i],
            after[i] / 1024,
        );
    }
    eprintln!("{connections} tunnels opened in {opened:.1?}");
    for (i, side) in ["a", "b"].iter().enumerate() {
        assert!(
            per_connection[i] <= MAX_PER_CONNECTION,
            "agent {side}: an idle tunneled connection costs {} B, more than {MAX_PER_CONNECTION}",
            per_connection[i]
        );
        assert!(
            after[i] <= 2 * idle[i],
            "agent {side}: {} KiB {RETURN_WITHIN:?} after the connections closed, more than twice \
             the {} KiB at rest",
            after[i] / 1024,
            idle[i] / 1024
        );
    }
    drop(runtime);
}

/// How many idle connections the limit on open files allows, up to [`CONNECTIONS`]. This
/// process holds both ends the agents do not (the clients and the echo service's sockets),
/// and each agent holds two per connection (it raises its soft limit to the hard one it
/// inherits from here). The hard limit is raised where the test may (`CAP_SYS_RESOURCE`);
/// a container without it keeps the one it has, which may allow a few less; the agents'
/// connection cap derived from it allows fewer still.
fn open_file_budget() -> usize {
    let needed = 2 * CONNECTIONS as u64 + SPARE_FILES;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    eprintln!("RLIMIT_NOFILE: soft {soft}, hard {hard}; {CONNECTIONS} connections need {needed}");
    let raised = hard.max(needed);
    let hard = match setrlimit(Resource::RLIMIT_NOFILE, raised, raised) {
        Ok(()) => raised,
        Err(e) => {
            eprintln!("cannot raise the hard limit to {raised} ({e}); keeping {hard}");
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
            hard
        }
    };
    // The agents refuse connections past their cap, which by default leaves the descriptors
    // they keep for themselves and for handshakes (`clink_agent::limits`).
    let (caps, _) = limits::Caps::derive(
        limits::Requested::default(),
        hard,
        limits::FDS_PER_CONNECTION,
    )
    .unwrap();
    let connections = CONNECTIONS
        .min((hard.saturating_sub(SPARE_FILES) / 2) as usize)
        .min(caps.connections);
    eprintln!("RLIMIT_NOFILE now {hard} here and in the agents: {connections} connections");
    assert!(
        connections >= CONNECTIONS * 9 / 10,
        "RLIMIT_NOFILE {hard} allows only {connections} connections; raise `ulimit -Hn` to \
         {needed}"
    );
    connections
}

/// An echo service on `runtime`, listening in `ns`: one task per connection, a 64-byte buffer
/// each. It stops with the runtime.
fn start_echo(runtime: &Runtime, ns: &Netns) -> SocketAddr {
    let listener = listen_in(ns).unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let _entered = runtime.enter();
    let listener = TcpListener::from_std(listener).unwrap();
    runtime.spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// `count` clients from inside `ns`, each connected to `import`, with one echoed round trip
/// of its own 8 bytes (so both relays are running), then left quiet.
fn open_idle(
    runtime: &Runtime,
    ns: &Netns,
    import: SocketAddr,
    count: usize,
    seed: u64,
) -> Result<Vec<TcpStream>, String> {
    // Sockets belong to the namespace they were made in, whichever thread connects them.
    let sockets = ns
        .enter(|| {
            (0..count)
                .map(|_| {
                    let socket = socket2::Socket::new(
                        socket2::Domain::IPV4,
                        socket2::Type::STREAM,
                        Some(socket2::Protocol::TCP),
                    )?;
                    socket.set_nonblocking(true)?;
                    Ok(std::net::TcpStream::from(socket))
                })
                .collect::<std::io::Result<Vec<_>>>()
        })
        .map_err(|e| format!("socket: {e}"))?;
    runtime.block_on(
        stream::iter(sockets.into_iter().enumerate())
            .map(|(i, socket)| async move {
                let message = (seed << 32 | i as u64).to_le_bytes();
                let trip = async {
                    let mut stream = TcpSocket::from_std_stream(socket).connect(import).await?;
                    stream.set_nodelay(true)?;
                    stream.write_all(&message).await?;
                    let mut back = [0u8; 8];
                    stream.read_exact(&mut back).await?;
                    if back != message {
                        return Err(std::io::Error::other("the echo differs from what was sent"));
                    }
                    Ok(stream)
                };
                match timeout(ROUND_TRIP_LIMIT, trip).await {
                    Ok(Ok(stream)) => Ok(stream),
                    Ok(Err(e)) => Err(format!("client {i}: {e}")),
                    Err(_) => Err(format!("client {i}: no echo within {ROUND_TRIP_LIMIT:?}")),
                }
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect(),
    )
}

/// Waits until both agents count `n` open tunneled connections (a as importer, b as
/// exporter).
fn wait_active(fabric: &Fabric, n: usize) {
    let started = Instant::now();
    let series = [
        (
            fabric.ns_a(),
            "clink_active_connections{direction=\"egress\"}",
        ),
        (
            fabric.ns_b(),
            "clink_active_connections{direction=\"ingress\"}",
        ),
    ];
    let mut counts = [f64::NAN; 2];
    while started.elapsed() < Duration::from_secs(30) {
        for (i, (ns, series)) in series.iter().enumerate() {
            counts[i] = sample(&scrape(ns).unwrap_or_default(), series);
        }
        if counts.iter().all(|&c| c == n as f64) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("active connections at a and b: {counts:?}, expected {n}");
}

/// The agent's pid, checked to be the agent (not a wrapper such as `ip netns exec`).
fn agent_pid(agent: &Agent) -> u32 {
    let pid = agent.pid().expect("the agent runs");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "clink-agent", "pid {pid} is not the agent");
    pid
}

/// The resident sets of `pids` once the allocator has given back what was freed before (the
/// handshakes' and set-up's memory, which is no cost of an idle connection): read until
/// neither fell by more than 1% in 2 s, at most [`SETTLE_LIMIT`].
fn settled_rss(pids: [u32; 2]) -> [u64; 2] {
    let started = Instant::now();
    let mut last = pids.map(rss);
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let now = pids.map(rss);
        let stable = (0..2).all(|i| now[i] + now[i] / 100 >= last[i]);
        last = now;
        if stable || started.elapsed() >= SETTLE_LIMIT {
            return last;
        }
    }
}

/// The resident set of process `pid`, in bytes (`VmRSS` of /proc/<pid>/status).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kib * 1024
}

/// The end of an agent's log, for a failure message.
fn tail(agent: &Agent) -> String {
    let log = agent.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
