//! The kernel programs in the kernel: loaded, attached to test cgroups, and checked by what
//! they do to real loopback sockets. Need root (a failure under CI=true, else skipped).

use std::{
    collections::HashSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use aya::maps::{MapData, SockHash};
use clink_testbed::{require_root, ChildGuard, PinDir};

use super::*;
use crate::kernel::pins::DEFAULT_PIN_DIR;

/// Loads into a pin directory of its own; the programs are unpinned before the directory
/// (and its parent, when nobody else uses it) is removed, also when the test fails.
struct Loaded {
    loaded: LoadedEbpf,
    _dir: PinDir,
}

impl Loaded {
    fn new(test: &str) -> Option<Self> {
        if !require_root(test) {
            return None;
        }
        let dir = PinDir::within(Path::new(DEFAULT_PIN_DIR), "unit");
        let loaded = load(dir.path(), None, true).expect("load eBPF programs");
        Some(Self { loaded, _dir: dir })
    }

    fn get(&mut self) -> &mut LoadedEbpf {
        &mut self.loaded
    }
}

/// A TCP connection over loopback: the listener binds `listen`, the client connects to
/// `connect` on the listener's port.
fn connected_pair(listen: &str, connect: &str) -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind(listen).unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = TcpStream::connect((connect, port)).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Sends `data` from `from` and reads it back on `to`, concurrently, since a redirected
/// send waits for room in the peer's receive queue.
fn transfer(from: &TcpStream, to: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    let mut from = from.try_clone().unwrap();
    let data_to_send = data.to_vec();
    let writer = thread::spawn(move || from.write_all(&data_to_send).unwrap());
    let mut received = vec![0; data.len()];
    to.read_exact(&mut received).unwrap();
    writer.join().unwrap();
    received
}

/// Puts both ends of a connection into CLINK_SOCKS, as `clink_sockops` would once attached,
/// and checks that sends in both directions are redirected and arrive intact.
fn assert_redirected(listen: &str, connect: &str) {
    let Some(mut loaded) = Loaded::new(&format!("skmsg redirects {listen} <- {connect}")) else {
        return;
    };
    let loaded = loaded.get();
    let (mut client, mut server) = connected_pair(listen, connect);
    for sock in [&client, &server] {
        let key = SockKey::from_addrs(sock.local_addr().unwrap(), sock.peer_addr().unwrap());
        // What `clink_sockops` records first: the flow state (no window: not an agent
        // socket) and how a sender finds it.
        let cookie = sockopt::socket_cookie(sock).unwrap();
        let mut flows: aya::maps::HashMap<&mut MapData, u64, clink_common::Flow> =
            loaded.ebpf.map_mut(map::FLOWS).unwrap().try_into().unwrap();
        flows
            .insert(cookie, clink_common::Flow::default(), 0)
            .unwrap();
        let mut cookies: aya::maps::HashMap<&mut MapData, SockKey, u64> = loaded
            .ebpf
            .map_mut(map::COOKIES)
            .unwrap()
            .try_into()
            .unwrap();
        cookies.insert(key, cookie, 0).unwrap();
        let mut socks: SockHash<&mut MapData, SockKey> =
            loaded.ebpf.map_mut(map::SOCKS).unwrap().try_into().unwrap();
        socks.insert(key, sock.as_raw_fd(), 0).unwrap();
    }

    let up = payload(300_000, 1);
    let down = payload(200_000, 7);
    assert!(
        transfer(&client, &mut server, &up) == up,
        "client -> server bytes differ"
    );
    assert!(
        transfer(&server, &mut client, &down) == down,
        "server -> client bytes differ"
    );

    let counters = loaded.skmsg_counters().unwrap();
    assert_eq!(counters.bytes, (up.len() + down.len()) as u64);
    assert!(counters.messages >= 2, "{counters:?}");
}

#[test]
fn skmsg_redirects_ipv4() {
    assert_redirected("127.0.0.1:0", "127.0.0.1");
}

#[test]
fn skmsg_redirects_ipv6() {
    assert_redirected("[::1]:0", "::1");
}

/// A dual-stack listener's accepted socket is AF_INET6 (`::ffff:127.0.0.1`) while its IPv4
/// client is AF_INET: the key normalisation must make them find each other.
#[test]
fn skmsg_redirects_ipv4_client_of_dual_stack_listener() {
    assert_redirected("[::]:0", "127.0.0.1");
}

#[test]
fn skmsg_passes_sends_without_a_peer() {
    let Some(mut loaded) = Loaded::new("skmsg_passes_sends_without_a_peer") else {
        return;
    };
    let loaded = loaded.get();
    let (client, mut server) = connected_pair("127.0.0.1:0", "127.0.0.1");
    let mut socks: SockHash<&mut MapData, SockKey> =
        loaded.ebpf.map_mut(map::SOCKS).unwrap().try_into().unwrap();
    let key = SockKey::from_addrs(client.local_addr().unwrap(), client.peer_addr().unwrap());
    socks.insert(key, client.as_raw_fd(), 0).unwrap();

    let data = payload(100_000, 3);
    assert!(
        transfer(&client, &mut server, &data) == data,
        "bytes differ"
    );
    assert_eq!(loaded.skmsg_counters().unwrap(), SkMsgCounters::default());
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

const HELPER_ENV: &str = "CLINK_SOCKOPS_HELPER_PORTS";

/// Attaches the programs to a new cgroup, runs a helper process in it that opens one
/// connection to an agent listener port, one to a port that is not in CLINK_PORTS and
/// one to an export target port (as a process that is not the agent), and checks that
/// only the first connection's two sockets are in CLINK_SOCKS, and that its data was
/// spliced.
#[test]
fn sockops_adds_only_sockets_on_owned_ports() {
    let Some(mut loaded) = Loaded::new("sockops_adds_only_sockets_on_owned_ports") else {
        return;
    };
    let loaded = loaded.get();
    let cgroup = clink_testbed::Cgroup::new("sockops").expect("a test cgroup");
    let (owned, other, target) = (free_port(), free_port(), free_port());
    loaded.add_port(owned, PortFlags::LISTENER).unwrap();
    loaded.add_port(target, PortFlags::TARGET).unwrap();
    loaded.attach_cgroup(cgroup.path()).unwrap();
    assert_eq!(loaded.cgroup(), Some(cgroup.path()));

    let mut helper = ChildGuard(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "kernel::loader::tests::sockops_helper",
                "--ignored",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(HELPER_ENV, format!("{owned} {other} {target}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    fs::write(
        cgroup.path().join("cgroup.procs"),
        helper.0.id().to_string(),
    )
    .unwrap();
    let mut to_helper = helper.0.stdin.take().unwrap();
    writeln!(to_helper, "go").unwrap();
    let helper_out = BufReader::new(helper.0.stdout.take().unwrap());
    let (port_tx, port_rx) = mpsc::channel();
    thread::spawn(move || {
        // Reads to the end, or the helper's own test harness fails on a closed stdout.
        // libtest prints "test <name> ... " before the test runs, on the same line.
        for line in helper_out.lines().map_while(Result::ok) {
            if let Some((_, port)) = line.split_once(READY) {
                let _ = port_tx.send(port.trim().parse::<u32>().ok());
            }
        }
    });
    let client_port = port_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("helper exited or timed out (60 s) before reporting its client port")
        .expect("helper reported a bad client port");

    let socks: SockHash<&MapData, SockKey> = map_ref(&loaded.ebpf, map::SOCKS).unwrap();
    let keys: HashSet<SockKey> = socks.keys().map(Result::unwrap).collect();
    let lo = u32::from_ne_bytes([127, 0, 0, 1]);
    let client = SockKey::from_ctx(
        clink_common::AF_INET,
        lo,
        lo,
        [0; 4],
        [0; 4],
        client_port,
        u32::from(owned).to_be(),
    );
    assert_eq!(keys, HashSet::from([client, client.reversed()]));
    assert_eq!(loaded.skmsg_counters().unwrap().bytes, HELPER_BYTES as u64);

    writeln!(to_helper, "done").unwrap();
    assert!(helper.0.wait().unwrap().success(), "helper failed");
    // Detaching is explicit too, and leaves the cgroup as it was.
    loaded.detach_cgroup();
    assert_eq!(loaded.cgroup(), None);
}

#[test]
fn attaching_to_a_directory_that_is_no_cgroup_fails() {
    let Some(mut loaded) = Loaded::new("attaching_to_a_directory_that_is_no_cgroup_fails") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let err = loaded.get().attach_cgroup(dir.path()).unwrap_err();
    assert!(matches!(err, EbpfError::NotCgroup2 { .. }), "{err}");
    assert_eq!(loaded.get().cgroup(), None);
}

const HELPER_BYTES: usize = 100_000;
const READY: &str = "clink-sockops-helper-ready:";

/// Runs in the test cgroup, started by `sockops_adds_only_sockets_on_owned_ports`.
#[test]
#[ignore = "helper process of sockops_adds_only_sockets_on_owned_ports"]
fn sockops_helper() {
    let Ok(ports) = std::env::var(HELPER_ENV) else {
        return;
    };
    let ports: Vec<&str> = ports.split(' ').collect();
    let mut line = String::new();
    // Sockets are charged to the cgroup of their creator: wait to be moved first.
    std::io::stdin().read_line(&mut line).unwrap();
    let (client, mut server) = connected_pair(&format!("127.0.0.1:{}", ports[0]), "127.0.0.1");
    let _unowned = connected_pair(&format!("127.0.0.1:{}", ports[1]), "127.0.0.1");
    let _not_the_agent = connected_pair(&format!("127.0.0.1:{}", ports[2]), "127.0.0.1");
    let data = payload(HELPER_BYTES, 9);
    assert!(
        transfer(&client, &mut server, &data) == data,
        "bytes differ"
    );
    println!("{READY}{}", client.local_addr().unwrap().port());
    std::io::stdin().read_line(&mut line).unwrap();
}
