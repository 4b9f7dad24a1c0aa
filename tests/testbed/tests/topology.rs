//! The test bed against the real kernel: needs root (it makes network namespaces).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use clink_testbed::{
    remove_stale_namespaces, require_root, three_clusters, two_clusters, wait_for, ChildGuard,
    Netns,
};

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// A listener in `server`'s namespace; `client` connects to it from its own namespace and the
/// two exchange a line each way.
fn assert_tcp_across(client: &Netns, server: &Netns, addr: SocketAddr) {
    let listener = server.enter(|| TcpListener::bind(addr)).unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut buf = [0; 5];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping\n");
        conn.write_all(b"pong\n").unwrap();
        peer
    });
    let mut conn = client
        .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .unwrap();
    conn.write_all(b"ping\n").unwrap();
    let mut buf = [0; 5];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong\n");
    assert_eq!(acceptor.join().unwrap(), conn.local_addr().unwrap());
}

#[test]
fn two_clusters_connect_over_tcp_and_vanish_on_drop() {
    if !require_root("two_clusters_connect_over_tcp_and_vanish_on_drop") {
        return;
    }
    let topo = two_clusters().unwrap();
    let (a, b) = (topo.a(), topo.b());
    assert_ne!(a.netns().name(), b.netns().name());
    assert_ne!(a.ip(), b.ip());
    assert_tcp_across(a.netns(), b.netns(), SocketAddr::new(b.ip().into(), 0));
    assert_tcp_across(b.netns(), a.netns(), SocketAddr::new(a.ip().into(), 0));

    let names = [a.netns().name().to_owned(), b.netns().name().to_owned()];
    assert!(names.iter().all(|n| netns_exists(n)));
    drop(topo);
    assert!(
        !names.iter().any(|n| netns_exists(n)),
        "left behind: {names:?}"
    );
}

#[test]
fn clusters_hold_only_their_own_interfaces() {
    if !require_root("clusters_hold_only_their_own_interfaces") {
        return;
    }
    let topo = two_clusters().unwrap();
    let out = topo
        .a()
        .netns()
        .command("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&out.stdout);
    assert_eq!(links.lines().count(), 2, "only lo and the veth: {links}");
    assert!(links.contains(topo.a().ifname()), "{links}");
    let host = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    assert!(
        !host.contains(topo.a().ifname()),
        "veth leaked into the host: {host}"
    );
}

#[test]
fn three_clusters_reach_each_other_through_the_wan_bridge() {
    if !require_root("three_clusters_reach_each_other_through_the_wan_bridge") {
        return;
    }
    let topo = three_clusters().unwrap();
    let wan = topo.wan().unwrap().name().to_owned();
    for client in topo.clusters() {
        for server in topo.clusters() {
            if client.ip() != server.ip() {
                let addr = SocketAddr::new(server.ip().into(), 0);
                assert_tcp_across(client.netns(), server.netns(), addr);
            }
        }
    }
    drop(topo);
    assert!(!netns_exists(&wan));
}

#[test]
fn dropping_a_netns_kills_its_processes() {
    if !require_root("dropping_a_netns_kills_its_processes") {
        return;
    }
    let netns = Netns::new("procs").unwrap();
    // Not under a ChildGuard: the namespace itself must take care of it.
    let mut child = netns
        .command("sleep")
        .arg("60")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "sleep to enter the namespace",
        Duration::from_secs(5),
        || {
            std::fs::read_link(format!("/proc/{}/ns/net", child.id()))
                .ok()
                .zip(std::fs::read_link("/proc/self/ns/net").ok())
                .is_some_and(|(theirs, ours)| theirs != ours)
        },
    )
    .unwrap();
    let name = netns.name().to_owned();
    drop(netns);
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(!netns_exists(&name));
}

#[test]
fn namespaces_are_removed_when_a_test_panics() {
    if !require_root("namespaces_are_removed_when_a_test_panics") {
        return;
    }
    let mut names = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = two_clusters().unwrap();
        names.push(topo.a().netns().name().to_owned());
        names.push(topo.b().netns().name().to_owned());
        panic!("test failure while the topology is alive");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 2);
    assert!(
        !names.iter().any(|n| netns_exists(n)),
        "left behind: {names:?}"
    );
}

#[test]
fn child_guard_in_a_namespace_stops_the_program() {
    if !require_root("child_guard_in_a_namespace_stops_the_program") {
        return;
    }
    let topo = two_clusters().unwrap();
    let guard = ChildGuard::spawn(
        topo.b()
            .netns()
            .command("sleep")
            .arg("60")
            .stdin(Stdio::null()),
    )
    .unwrap();
    let pid = guard.id();
    // `ip netns exec` replaces itself with the program, so the guard's pid is the program.
    wait_for("sleep to start", Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    })
    .unwrap();
    drop(guard);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn stale_namespaces_of_dead_processes_are_removed() {
    if !require_root("stale_namespaces_of_dead_processes_are_removed") {
        return;
    }
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    dead.wait().unwrap();
    let stale = format!("clk-{}-0-stale", dead.id());
    let ours = Netns::new("alive").unwrap();
    let status = std::process::Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap();
    assert!(status.success());

    let removed = remove_stale_namespaces().unwrap();
    assert!(removed.contains(&stale), "{removed:?}");
    assert!(!netns_exists(&stale));
    assert!(
        netns_exists(ours.name()),
        "a live process's namespace must stay"
    );
}
