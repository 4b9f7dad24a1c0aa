//! The peer certificate while agents run: a new one is served without a restart (files
//! swapped the kubelet's way and polled, or replaced and announced with SIGHUP) while an open
//! tunnel keeps streaming; a broken one is refused and the old one serves on; a broken one at
//! start stops the agent naming the file; and the gateway answers heartbeats of configured
//! Peers only.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use clink_agent::tls::{CertInfo, Identity};
use clink_testbed::{bin_path, kubelet_layout, kubelet_update, reissue_certificate, replace_files};
use clink_tests::{
    connect_in, read_hash, require_root, sample, scrape, transfer_both_ways, wait_metric, Datapath,
    Fabric, Pattern, FABRIC, GATEWAY_PORT, METRICS_PORT,
};
use sha2::{Digest as _, Sha256};

const IMPORT_PORT: u16 = 7000;
const RELOADED: &str = "clink_certificate_reloads_total{result=\"ok\"}";
const RELOAD_FAILED: &str = "clink_certificate_reloads_total{result=\"error\"}";

fn import_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], IMPORT_PORT))
}

/// Two clusters with one tunneled service, the agents (re)started with `args` too.
fn fabric_with(args: &[&str]) -> (Fabric, TcpListener) {
    let (mut fabric, service) =
        Fabric::with_service(Datapath::Userspace, IMPORT_PORT).expect("fabric with a service");
    for agent in &mut fabric.agents {
        agent.stop().unwrap();
        agent.args.extend(args.iter().map(|a| a.to_string()));
        agent.start().unwrap();
    }
    (fabric, service)
}

/// A new certificate for each agent (same fabric CA), in `<fabric dir>/<tag>/<peer>/`.
fn reissue_all(fabric: &Fabric, tag: &str) -> Vec<PathBuf> {
    let certs = fabric.dir.path().join("certs");
    let clink = bin_path("clink").unwrap();
    let into = fabric.dir.path().join(tag);
    fabric
        .agents
        .iter()
        .map(|a| reissue_certificate(&clink, &certs, FABRIC, &a.name, &into).unwrap())
        .collect()
}

fn serial_in(dir: &Path) -> String {
    let pem = std::fs::read(dir.join("cert.pem")).unwrap();
    CertInfo::from_pem(&pem).unwrap().serial
}

/// A tunneled connection streaming pattern bytes both ways, paced, until [`Stream::finish`].
struct Stream {
    stop: Arc<AtomicBool>,
    /// Bytes the service has received so far.
    at_service: Arc<AtomicUsize>,
    writers: Vec<thread::JoinHandle<(usize, [u8; 32])>>,
    readers: Vec<thread::JoinHandle<(usize, [u8; 32])>>,
}

impl Stream {
    /// Opens a connection through the Import and starts streaming; returns once bytes have
    /// come through.
    fn open(fabric: &Fabric, service: &TcpListener) -> Stream {
        let client = connect_in(fabric.ns_a(), import_addr()).unwrap();
        let (server, _) = service.accept().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let at_service = Arc::new(AtomicUsize::new(0));
        let writer = |stream: &TcpStream, seed: u64| {
            let (mut stream, stop) = (stream.try_clone().unwrap(), stop.clone());
            thread::spawn(move || {
                let mut pattern = Pattern::new(seed);
                let (mut hash, mut sent) = (Sha256::new(), 0);
                let mut buf = vec![0u8; 32 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    pattern.fill(&mut buf);
                    stream.write_all(&buf).unwrap();
                    hash.update(&buf);
                    sent += buf.len();
                    thread::sleep(Duration::from_millis(5));
                }
                stream.shutdown(Shutdown::Write).unwrap();
                (sent, hash.finalize().into())
            })
        };
        let writers = vec![writer(&client, 1), writer(&server, 2)];
        let mut to_service = Counting(server, at_service.clone());
        let mut to_client = client;
        let readers = vec![
            thread::spawn(move || read_hash(&mut to_client).unwrap()),
            thread::spawn(move || read_hash(&mut to_service).unwrap()),
        ];
        let stream = Stream {
            stop,
            at_service,
            writers,
            readers,
        };
        stream.wait_for_more_than(0);
        stream
    }

    fn received(&self) -> usize {
        self.at_service.load(Ordering::Relaxed)
    }

    fn wait_for_more_than(&self, bytes: usize) {
        clink_testbed::wait_for(
            "bytes through the open tunnel",
            Duration::from_secs(10),
            || self.received() > bytes,
        )
        .unwrap();
    }

    /// Stops both writers and checks every byte arrived intact both ways.
    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let sent: Vec<_> = self
            .writers
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let received: Vec<_> = self
            .readers
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert_eq!(received[1], sent[0], "client -> service: (bytes, SHA-256)");
        assert_eq!(received[0], sent[1], "service -> client: (bytes, SHA-256)");
    }
}

/// A reader that counts what it read.
struct Counting(TcpStream, Arc<AtomicUsize>);

impl std::io::Read for Counting {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }
}

/// One request to the gateway of the agent at `gateway` from cluster a, as the peer whose
/// certificate is in `certs` (a fabric member that need not be an agent): the answer, and the
/// certificate the gateway presented.
fn ask_gateway(
    fabric: &Fabric,
    gateway: SocketAddr,
    certs: &Path,
    me: &str,
    server: &str,
    request: &str,
) -> (String, CertInfo) {
    let identity = Identity::load(certs, me).unwrap();
    let tcp = connect_in(fabric.ns_a(), gateway).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let conn = rustls::ClientConnection::new(
        identity.client.clone(),
        server.to_owned().try_into().unwrap(),
    )
    .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request.as_bytes()).unwrap();
    tls.flush().unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    let served = tls.conn.peer_certificates().unwrap()[0].clone();
    (
        String::from_utf8_lossy(&answer).into_owned(),
        CertInfo::from_der(&served).unwrap(),
    )
}

fn gateway_b(fabric: &Fabric) -> SocketAddr {
    SocketAddr::from((fabric.topo.b().ip(), GATEWAY_PORT))
}

/// The serial of the client certificate that carried the last tunnel agent b opened: its
/// ingress log has the certificate and then `tunnel open` under the same peer address.
fn serial_of_last_tunnel(log: &str) -> Option<String> {
    let peer_addr = |line: &str| {
        let start = line.find("peer_addr=")?;
        line[start..].split_whitespace().next().map(str::to_owned)
    };
    let tunnel = log.lines().rev().find(|l| l.contains("tunnel open"))?;
    let addr = peer_addr(tunnel)?;
    let cert = log
        .lines()
        .find(|l| l.contains("client certificate") && peer_addr(l).as_ref() == Some(&addr))?;
    let start = cert.find("serial=")? + "serial=".len();
    cert[start..].split_whitespace().next().map(str::to_owned)
}

/// Rotates both agents' certificates with `swap` (given each agent's `--certs` directory and
/// its new certificate's directory) while a tunnel streams: the tunnel's bytes arrive intact,
/// each agent counts one reload and reports the new serial, and a new tunnel carries the new
/// certificates both ways (not a connection the pool made before the reload).
fn rotate_under_traffic(fabric: &Fabric, service: &TcpListener, swap: impl Fn(&Path, &Path)) {
    let old: Vec<String> = fabric
        .agents
        .iter()
        .map(|a| serial_in(&a.certs_dir()))
        .collect();
    let stream = Stream::open(fabric, service);
    // A first tunnel filled agent a's pool with connections made with the old certificate.
    let new = reissue_all(fabric, "rotated");
    for (agent, new) in fabric.agents.iter().zip(&new) {
        swap(&agent.certs_dir(), new);
    }
    for ns in [fabric.ns_a(), fabric.ns_b()] {
        wait_metric(ns, METRICS_PORT, RELOADED, 1.0).unwrap();
    }
    let at_reload = stream.received();
    stream.wait_for_more_than(at_reload + 256 * 1024);
    stream.finish();

    for ((agent, new), old) in fabric.agents.iter().zip(&new).zip(&old) {
        let serial = serial_in(new);
        assert_ne!(&serial, old);
        let status = agent.status().unwrap();
        assert_eq!(status.certificate.serial, serial, "{}", agent.name);
        assert!(
            agent.log().contains("peer certificate reloaded"),
            "{}",
            agent.log()
        );
        let metrics = scrape(agent_ns(fabric, &agent.name)).unwrap();
        assert_eq!(sample(&metrics, RELOADED), 1.0, "{metrics}");
        assert_eq!(sample(&metrics, RELOAD_FAILED), 0.0, "{metrics}");
    }

    // A new tunnel: agent a dials with its new certificate, agent b serves its new one.
    let client = connect_in(fabric.ns_a(), import_addr()).unwrap();
    transfer_both_ways(service.try_clone().unwrap(), client, 1024 * 1024);
    let log = fabric.b().log();
    assert_eq!(
        serial_of_last_tunnel(&log).as_deref(),
        Some(serial_in(&new[0]).as_str()),
        "the new tunnel's client certificate; log of peer-b:\n{log}"
    );
    let (answer, served) = ask_gateway(
        fabric,
        gateway_b(fabric),
        &new[0],
        "peer-a",
        "peer-b",
        "GET /healthz HTTP/1.1\r\nHost: peer-b\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(served.serial, serial_in(&new[1]));
}

fn agent_ns<'a>(fabric: &'a Fabric, name: &str) -> &'a clink_testbed::Netns {
    match name {
        "peer-a" => fabric.ns_a(),
        _ => fabric.ns_b(),
    }
}

#[test]
fn a_kubelet_style_swap_is_served_without_dropping_the_open_tunnel() {
    if !require_root("a_kubelet_style_swap_is_served_without_dropping_the_open_tunnel") {
        return;
    }
    let (fabric, service) = fabric_with(&["--cert-reload-interval", "1"]);
    // The Secret volume's layout, same content: no reload (checked by the count of one below).
    for agent in &fabric.agents {
        kubelet_layout(&agent.certs_dir()).unwrap();
    }
    rotate_under_traffic(&fabric, &service, |dir, new| {
        kubelet_update(dir, new).unwrap()
    });
}

#[test]
fn sighup_reloads_replaced_files_without_dropping_the_open_tunnel() {
    if !require_root("sighup_reloads_replaced_files_without_dropping_the_open_tunnel") {
        return;
    }
    // No polling: only SIGHUP reloads.
    let (fabric, service) = fabric_with(&["--cert-reload-interval", "0"]);
    let pids: Vec<u32> = fabric.agents.iter().map(|a| a.pid().unwrap()).collect();
    rotate_under_traffic(&fabric, &service, |dir, new| {
        replace_files(dir, new).unwrap();
        thread::sleep(Duration::from_millis(1500));
        let metrics = scrape(if dir.ends_with("peer-a") {
            fabric.ns_a()
        } else {
            fabric.ns_b()
        })
        .unwrap();
        assert_eq!(sample(&metrics, RELOADED), 0.0, "reloaded without SIGHUP");
        let pid = pids[usize::from(!dir.ends_with("peer-a"))];
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    });
    fabric.a().wait_log("SIGHUP: reloading").unwrap();
}

#[test]
fn a_broken_key_is_refused_and_the_old_certificate_serves_on() {
    if !require_root("a_broken_key_is_refused_and_the_old_certificate_serves_on") {
        return;
    }
    let (fabric, service) = fabric_with(&["--cert-reload-interval", "1"]);
    let b = fabric.b();
    let certs = b.certs_dir();
    let serial = serial_in(&certs);
    let metrics = scrape(fabric.ns_b()).unwrap();
    let left = sample(&metrics, "clink_certificate_expiry_seconds");
    // `clink peer-cert create` makes certificates valid for two years.
    assert!(
        left > 700.0 * 86_400.0 && left < 731.0 * 86_400.0,
        "{metrics}"
    );

    // Written whole (a temporary file renamed), so the poll never sees it half-written.
    let tmp = certs.join(".key.pem.tmp");
    std::fs::write(&tmp, "-----BEGIN PRIVATE KEY-----\ngarbage").unwrap();
    std::fs::rename(&tmp, certs.join("key.pem")).unwrap();
    wait_metric(fabric.ns_b(), METRICS_PORT, RELOAD_FAILED, 1.0).unwrap();
    b.wait_log("peer certificate not reloaded; still serving the previous one")
        .unwrap();
    let key = certs.join("key.pem").display().to_string();
    let line = b
        .log()
        .lines()
        .find(|l| l.contains("peer certificate not reloaded"))
        .unwrap()
        .to_owned();
    assert!(line.contains(&format!("file={key}")), "{line}");
    // Logged and counted once, not at every poll.
    thread::sleep(Duration::from_millis(2500));
    let metrics = scrape(fabric.ns_b()).unwrap();
    assert_eq!(sample(&metrics, RELOAD_FAILED), 1.0, "{metrics}");
    assert_eq!(sample(&metrics, RELOADED), 0.0, "{metrics}");

    // Still serving, with the old certificate.
    assert_eq!(b.status().unwrap().certificate.serial, serial);
    let client = connect_in(fabric.ns_a(), import_addr()).unwrap();
    transfer_both_ways(service.try_clone().unwrap(), client, 256 * 1024);
    let a_certs = fabric.a().certs_dir();
    let (_, served) = ask_gateway(
        &fabric,
        gateway_b(&fabric),
        &a_certs,
        "peer-a",
        "peer-b",
        "GET /healthz HTTP/1.1\r\nHost: peer-b\r\n\r\n",
    );
    assert_eq!(served.serial, serial);

    // Good files again: reloaded.
    let new = reissue_all(&fabric, "fixed");
    replace_files(&certs, &new[1]).unwrap();
    wait_metric(fabric.ns_b(), METRICS_PORT, RELOADED, 1.0).unwrap();
    assert_eq!(b.status().unwrap().certificate.serial, serial_in(&new[1]));
}

/// Another member of the fabric (a valid certificate, but no Peer of that name at agent b)
/// gets 403 on `/healthz`, as on CONNECT; a configured Peer gets 200 and b's labels.
#[test]
fn healthz_answers_configured_peers_only() {
    if !require_root("healthz_answers_configured_peers_only") {
        return;
    }
    let fabric = Fabric::two_clusters().expect("two clusters");
    let certs = fabric.dir.path().join("certs");
    let outsider = reissue_certificate(
        &bin_path("clink").unwrap(),
        &certs,
        FABRIC,
        "peer-x",
        &certs,
    )
    .unwrap();
    let healthz = "GET /healthz HTTP/1.1\r\nHost: peer-b\r\n\r\n";
    let (answer, _) = ask_gateway(
        &fabric,
        gateway_b(&fabric),
        &outsider,
        "peer-x",
        "peer-b",
        healthz,
    );
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert!(!answer.contains("cluster=b"), "labels leaked: {answer}");
    let (answer, _) = ask_gateway(
        &fabric,
        gateway_b(&fabric),
        &fabric.a().certs_dir(),
        "peer-a",
        "peer-b",
        healthz,
    );
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("cluster=b"), "{answer}");
}

/// A missing or broken certificate file stops the agent at start, naming the file and the
/// fault. No namespace needed: the certificates are loaded before anything is bound.
#[test]
fn a_broken_certificate_directory_stops_the_agent_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let clink = bin_path("clink").unwrap();
    clink_testbed::make_certificates(&clink, dir.path(), "f", &["peer-a"]).unwrap();
    let certs = dir.path().join("peer-a");
    let start = |name: &str| {
        let out = Command::new(bin_path("clink-agent").unwrap())
            .args(["--name", name, "--datapath", "userspace", "--certs"])
            .arg(&certs)
            .arg("--state")
            .arg(dir.path().join("state"))
            .arg("--admin")
            .arg(dir.path().join("admin.sock"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = start("peer-z");
    let cert = certs.join("cert.pem").display().to_string();
    assert!(
        err.contains(&format!("{cert}: certificate is for")),
        "{err}"
    );

    std::fs::write(certs.join("key.pem"), "").unwrap();
    let err = start("peer-a");
    let key = certs.join("key.pem").display().to_string();
    assert!(
        err.contains(&format!("{key}: holds no PEM private key")),
        "{err}"
    );

    std::fs::remove_file(certs.join("ca.pem")).unwrap();
    let err = start("peer-a");
    let ca = certs.join("ca.pem").display().to_string();
    assert!(err.contains(&format!("{ca}: missing")), "{err}");
}

#[test]
fn serial_of_last_tunnel_reads_the_ingress_log() {
    let log = "\
x ingress{peer_addr=10.0.0.1:4000 peer=peer-a}: client certificate serial=AA not_after=x
x ingress{peer_addr=10.0.0.1:4001 peer=peer-a}: client certificate serial=BB not_after=x
x ingress{peer_addr=10.0.0.1:4001 peer=peer-a export=default/svc}: tunnel open
x ingress{peer_addr=10.0.0.1:4000 peer=peer-a}: heartbeat
";
    assert_eq!(serial_of_last_tunnel(log).as_deref(), Some("BB"));
    assert_eq!(serial_of_last_tunnel("nothing"), None);
}
