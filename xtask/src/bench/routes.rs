//! The ways from cluster A to the servers in cluster B that the bench compares: direct over
//! the veth link, a ClusterLink-rs agent pair per data path, an haproxy mTLS pair and a
//! stunnel mTLS pair. Every tunnel uses the same fabric certificates (ECDSA P-256, made by
//! `clink`), TLS 1.3 only with the agents' suites ([`TUNNEL_SUITES`]), client certificates
//! verified against the fabric CA, the server's name checked, one process per side.
//!
//! Each route has its own servers in B (iperf3, the bench's echo and reply servers, nginx:
//! those the run's scenarios use) and its own ports, so routes never share a socket; a route whose data path attaches eBPF programs
//! also has its own cgroup, which holds its agents, clients and servers.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clink_testbed::{
    last_lines, read_from, AgentFiles, Cgroup, ChildGuard, Netns, PinDir, Topology,
};

use super::place::Place;
use crate::clink::{listening, Agent};
use crate::run::wait_until;

pub const FABRIC: &str = "bench-fabric";
const PEERS: [&str; 2] = ["peer-a", "peer-b"];

/// What the bench compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum RouteKind {
    /// No tunnel: the physical limit here.
    Direct,
    /// ClusterLink-rs, userspace data path.
    Userspace,
    /// ClusterLink-rs, sockmap data path (when the agent offers it).
    Sockmap,
    /// ClusterLink-rs, kTLS data path (when the agent offers it and the kernel has kernel
    /// TLS: in the VM of `--vm`).
    Ktls,
    /// An haproxy mTLS pair.
    Haproxy,
    /// A stunnel mTLS pair.
    Stunnel,
    /// ClusterLink-rs, userspace data path, with the agent of another build
    /// (`--compare-agent DIR`): a change's before and after, or two cargo features, side by
    /// side in one interleaved run.
    Compare,
}

impl RouteKind {
    pub const ALL: [RouteKind; 7] = [
        RouteKind::Direct,
        RouteKind::Userspace,
        RouteKind::Compare,
        RouteKind::Sockmap,
        RouteKind::Ktls,
        RouteKind::Haproxy,
        RouteKind::Stunnel,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RouteKind::Direct => "direct",
            RouteKind::Userspace => "clink userspace",
            RouteKind::Sockmap => "clink sockmap",
            RouteKind::Ktls => "clink ktls",
            RouteKind::Haproxy => "haproxy",
            RouteKind::Stunnel => "stunnel",
            RouteKind::Compare => "clink userspace, --compare-agent",
        }
    }

    /// A short name for files, cgroups and the `--path` flag; for the proxies, also their
    /// program's name.
    pub fn slug(self) -> &'static str {
        match self {
            RouteKind::Direct => "direct",
            RouteKind::Userspace => "userspace",
            RouteKind::Sockmap => "sockmap",
            RouteKind::Ktls => "ktls",
            RouteKind::Haproxy => "haproxy",
            RouteKind::Stunnel => "stunnel",
            RouteKind::Compare => "compare",
        }
    }

    /// The agent's `--datapath` value, for ClusterLink-rs routes.
    pub fn datapath(self) -> Option<&'static str> {
        match self {
            RouteKind::Userspace | RouteKind::Compare => Some("userspace"),
            RouteKind::Sockmap => Some("sockmap"),
            RouteKind::Ktls => Some("ktls"),
            _ => None,
        }
    }

    /// Whether the route's agents attach programs to a cgroup that its processes must join.
    /// The kTLS route's clients connect to the Import listeners themselves, so its agents
    /// get no `--cgroup` and attach nothing: the connect hooks would only rewrite addresses,
    /// not change how bytes move.
    fn needs_cgroup(self) -> bool {
        matches!(self, RouteKind::Sockmap)
    }

    /// Fixed per route rather than by position in [`Self::ALL`], so that adding a route
    /// moves no other route's ports.
    fn ports(self) -> Ports {
        let index = match self {
            RouteKind::Direct => 0,
            RouteKind::Userspace => 1,
            RouteKind::Sockmap => 2,
            RouteKind::Haproxy => 3,
            RouteKind::Stunnel => 4,
            RouteKind::Ktls => 5,
            RouteKind::Compare => 6,
        };
        Ports(10_000 + 100 * index)
    }
}

/// The servers in B that every route leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Iperf,
    /// The bench's echo server: latency, connection setup, held connections.
    Echo,
    /// The bench's reply server: pipelined requests, each answered with the response size
    /// it asks for.
    Reply,
    /// nginx, answering every request with [`HTTP_BODY`].
    Http,
}

impl Service {
    pub const ALL: [Service; 4] = [Service::Iperf, Service::Echo, Service::Reply, Service::Http];

    fn name(self) -> &'static str {
        match self {
            Service::Iperf => "iperf3",
            Service::Echo => "echo",
            Service::Reply => "reply",
            Service::Http => "http",
        }
    }

    fn offset(self) -> u16 {
        self as u16 + 1
    }
}

/// The clusters' ephemeral port range: wide, for thousands of new connections a second,
/// and above every route's ports, so that no client socket takes one.
pub const EPHEMERAL_PORTS: (u16, u16) = (11_000, 65_535);

/// A route's ports, below [`EPHEMERAL_PORTS`].
#[derive(Clone, Copy, Debug)]
struct Ports(u16);

impl Ports {
    /// The server in B.
    fn server(self, service: Service) -> u16 {
        self.0 + service.offset()
    }

    /// Where clients in A connect (imports, proxy frontends).
    fn entry(self, service: Service) -> u16 {
        self.0 + 10 + service.offset()
    }

    /// The TLS port in B of a proxy pair, one per service.
    fn tls(self, service: Service) -> u16 {
        self.0 + 50 + service.offset()
    }

    /// An agent's gateway port (both sides).
    fn gateway(self) -> u16 {
        self.0 + 50
    }

    /// An agent's metrics port (on loopback, both sides).
    fn metrics(self) -> u16 {
        self.0 + 60
    }
}

/// What starting a route needs.
pub struct Env<'a> {
    pub topo: &'a Topology,
    /// The working directory: certificates (`<peer>/`), configuration, state, logs.
    pub dir: &'a Path,
    /// Holds `clink-agent` and `clink`.
    pub bins: &'a Path,
    /// Holds the `clink-agent` of the compare route (`--compare-agent`).
    pub compare_bins: Option<&'a Path>,
    /// The xtask binary that runs `bench-tool`.
    pub helper: &'a Path,
    /// Whether the agent has `--datapath` at all.
    pub agent_has_datapath_flag: bool,
    /// Whether the agent has `--bpf-pin-dir`.
    pub agent_has_pin_dir_flag: bool,
    /// The servers the run's scenarios use: only these are started, exported and imported,
    /// so that a run that needs no nginx does not need it installed.
    pub services: &'a [Service],
}

/// Why a route could not be set up, and the end of its logs.
pub struct SetupError {
    pub error: anyhow::Error,
    pub logs: String,
}

/// A running route. Field order is drop order: tunnel processes (and what agents pinned),
/// then servers, then the cgroup that may hold them.
pub struct Route {
    pub kind: RouteKind,
    ports: Ports,
    entry_ip: IpAddr,
    client: Place,
    /// The tunnel's process in A and in B, whose memory is measured.
    processes: Option<[Process; 2]>,
    /// Where every process of the route writes its output.
    logs: Vec<PathBuf>,
    agents: Vec<Agent>,
    pins: Vec<PinDir>,
    proxies: Vec<ChildGuard>,
    servers: Vec<(Service, ChildGuard)>,
    cgroup: Option<Cgroup>,
}

/// A tunnel process: its pid and where its output goes.
#[derive(Clone, Debug)]
pub struct Process {
    pub pid: u32,
    pub log: PathBuf,
}

impl Route {
    /// Starts the route's servers and tunnel and waits until they listen. On failure, the
    /// error comes with the last lines of every log of the route.
    pub fn start(kind: RouteKind, env: &Env) -> Result<Self, SetupError> {
        let cgroup = kind
            .needs_cgroup()
            .then(|| Cgroup::new(kind.slug()))
            .transpose()
            .map_err(|error| SetupError {
                error,
                logs: String::new(),
            })?;
        let (a, b) = (env.topo.a(), env.topo.b());
        let mut route = Self {
            kind,
            ports: kind.ports(),
            entry_ip: match kind {
                RouteKind::Direct => b.ip().into(),
                _ => Ipv4Addr::LOCALHOST.into(),
            },
            client: Place::new(a.netns().name(), cgroup.as_ref()),
            processes: None,
            logs: Vec::new(),
            agents: Vec::new(),
            pins: Vec::new(),
            proxies: Vec::new(),
            servers: Vec::new(),
            cgroup,
        };
        match route.start_processes(env) {
            Ok(()) => Ok(route),
            Err(error) => Err(SetupError {
                error,
                logs: route.log_tails(),
            }),
        }
    }

    fn start_processes(&mut self, env: &Env) -> Result<()> {
        self.start_servers(env)?;
        match self.kind {
            RouteKind::Direct => return Ok(()),
            RouteKind::Userspace | RouteKind::Compare | RouteKind::Sockmap | RouteKind::Ktls => {
                self.start_agents(env)?
            }
            RouteKind::Haproxy | RouteKind::Stunnel => self.start_proxies(env)?,
        }
        let netns = env.topo.a().netns();
        for &service in env.services {
            let port = self.entry(service).port();
            wait_until(
                &format!("{} to listen on {port} in A", self.kind.label()),
                Duration::from_secs(15),
                || listening(netns, port),
            )?;
        }
        Ok(())
    }

    fn log_tails(&self) -> String {
        let mut tails = String::new();
        for log in &self.logs {
            let lines = last_lines(&read_from(log, 0), 5);
            if !lines.is_empty() {
                let _ = write!(tails, "\n--- {} ---\n{}", log.display(), lines.join("\n"));
            }
        }
        tails
    }

    /// Where a client in A connects to reach `service` through this route.
    pub fn entry(&self, service: Service) -> SocketAddr {
        let port = match self.kind {
            RouteKind::Direct => self.ports.server(service),
            _ => self.ports.entry(service),
        };
        SocketAddr::new(self.entry_ip, port)
    }

    /// Where this route's clients run.
    pub fn client(&self) -> &Place {
        &self.client
    }

    /// The pid of the server in B behind `service`.
    pub fn server_pid(&self, service: Service) -> Option<u32> {
        self.servers
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, server)| server.id())
    }

    pub fn processes(&self) -> Option<&[Process; 2]> {
        self.processes.as_ref()
    }

    /// Fails if a process of this route has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for agent in &mut self.agents {
            if let Some(status) = agent.try_wait()? {
                bail!("{}'s agent exited ({status})", agent.label);
            }
        }
        let servers = self.servers.iter_mut().map(|(_, server)| server);
        for child in self.proxies.iter_mut().chain(servers) {
            if let Some(status) = child.try_wait()? {
                bail!("process {} exited ({status})", child.id());
            }
        }
        Ok(())
    }

    fn place(&self, netns: &Netns) -> Place {
        Place::new(netns.name(), self.cgroup.as_ref())
    }

    fn log_file(&mut self, env: &Env, name: &str) -> Result<(PathBuf, File)> {
        let path = env.dir.join(format!("{}-{name}.log", self.kind.slug()));
        let file = File::create(&path).with_context(|| format!("create {}", path.display()))?;
        self.logs.push(path.clone());
        Ok((path, file))
    }

    fn spawn(&self, cmd: &mut Command, log: File) -> Result<ChildGuard> {
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Ctrl-C reaches only xtask, which then stops everything in order.
            .process_group(0);
        ChildGuard::spawn(cmd)
    }

    /// The servers in B, on every address (the direct route reaches them on B's link
    /// address, the tunnels on loopback).
    fn start_servers(&mut self, env: &Env) -> Result<()> {
        let netns = env.topo.b().netns();
        let place = self.place(netns);
        for &service in env.services {
            let port = self.ports.server(service);
            let bench_tool = |tool: &str| {
                let mut cmd = place.command(env.helper);
                cmd.args(["bench-tool", tool, "--listen"])
                    .arg(format!("0.0.0.0:{port}"));
                cmd
            };
            let mut cmd = match service {
                Service::Iperf => {
                    let mut cmd = place.command("iperf3");
                    cmd.args(["-s", "-p", &port.to_string()]);
                    cmd
                }
                Service::Echo => bench_tool("echo-server"),
                Service::Reply => bench_tool("reply-server"),
                Service::Http => {
                    let dir = env.dir.join(format!("{}-nginx", self.kind.slug()));
                    fs::create_dir_all(&dir)
                        .with_context(|| format!("create {}", dir.display()))?;
                    let config = dir.join("nginx.conf");
                    fs::write(&config, nginx_config(&dir, port))
                        .with_context(|| format!("write {}", config.display()))?;
                    let mut cmd = place.command("nginx");
                    // -e: its error log before it has read the configuration, which would
                    // otherwise be /var/log/nginx/error.log.
                    cmd.args(["-e", "stderr", "-c"]).arg(&config);
                    cmd
                }
            };
            let (_, log) = self.log_file(env, &format!("{}-server", service.name()))?;
            let server = self.spawn(&mut cmd, log)?;
            self.servers.push((service, server));
        }
        for &service in env.services {
            let port = self.ports.server(service);
            wait_until(
                &format!("{} server to listen on {port} in B", service.name()),
                Duration::from_secs(10),
                || listening(netns, port),
            )?;
        }
        Ok(())
    }

    fn start_agents(&mut self, env: &Env) -> Result<()> {
        let clink = env.bins.join("clink");
        let dir = env.dir.join(self.kind.slug());
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut processes = Vec::new();
        for (cluster, (label, peer)) in env
            .topo
            .clusters()
            .iter()
            .zip([("A", PEERS[0]), ("B", PEERS[1])])
        {
            let files = AgentFiles::new(peer, &env.dir.join(peer), &dir.join(peer))?;
            let bins = match self.kind {
                RouteKind::Compare => env.compare_bins.context("no --compare-agent")?,
                _ => env.bins,
            };
            let mut cmd = self
                .place(cluster.netns())
                .command(bins.join("clink-agent"));
            files.configure(&mut cmd)?;
            cmd.arg("--listen")
                .arg(format!("0.0.0.0:{}", self.ports.gateway()))
                .arg("--metrics")
                .arg(format!("127.0.0.1:{}", self.ports.metrics()));
            if env.agent_has_datapath_flag {
                let datapath = self.kind.datapath().context("not a ClusterLink-rs route")?;
                cmd.args(["--datapath", datapath]);
            }
            if let Some(cgroup) = &self.cgroup {
                cmd.arg("--cgroup").arg(cgroup.path());
                if env.agent_has_pin_dir_flag {
                    let pins = PinDir::new(&format!("{}-{peer}", self.kind.slug()));
                    cmd.arg("--bpf-pin-dir").arg(pins.path());
                    self.pins.push(pins);
                }
            }
            let log = files.log().to_owned();
            self.logs.push(log.clone());
            let agent = Agent::start(
                &format!("{} {label}", self.kind.label()),
                &mut cmd,
                &files,
                &clink,
            )?;
            processes.push(Process {
                pid: agent.pid(),
                log,
            });
            self.agents.push(agent);
        }
        self.processes = processes.try_into().ok();

        let (a, b) = (&self.agents[0], &self.agents[1]);
        let gateway = self.ports.gateway().to_string();
        let a_ip = env.topo.a().ip().to_string();
        let b_ip = env.topo.b().ip().to_string();
        b.clink(&[
            "create", "peer", PEERS[0], "--host", &a_ip, "--port", &gateway,
        ])?;
        a.clink(&[
            "create", "peer", PEERS[1], "--host", &b_ip, "--port", &gateway,
        ])?;
        for &service in env.services {
            let (name, server) = (service.name(), self.ports.server(service).to_string());
            b.clink(&[
                "create",
                "export",
                name,
                "--host",
                "127.0.0.1",
                "--port",
                &server,
            ])?;
            let entry = self.ports.entry(service).to_string();
            a.clink(&[
                "create", "import", name, "--port", &entry, "--peer", PEERS[1],
            ])?;
        }
        for agent in [a, b] {
            agent.clink(&["create", "policy", "allow-all", "--action", "allow"])?;
        }
        // Connections work before heartbeats have decided; waiting keeps the first
        // measurement free of start-up work.
        a.wait_reachable(PEERS[1], Duration::from_secs(15))
    }

    fn start_proxies(&mut self, env: &Env) -> Result<()> {
        let (a_ip, b_ip) = (Ipv4Addr::LOCALHOST.into(), env.topo.b().ip().into());
        let ports = self.ports;
        let sides = [
            ProxySide {
                certs: Certs(env.dir.join(PEERS[0])),
                role: Role::Client {
                    server_name: PEERS[1],
                },
                links: links(env.services, |service| Link {
                    service,
                    listen: SocketAddr::new(a_ip, ports.entry(service)),
                    connect: SocketAddr::new(b_ip, ports.tls(service)),
                }),
            },
            ProxySide {
                certs: Certs(env.dir.join(PEERS[1])),
                role: Role::Server,
                links: links(env.services, |service| Link {
                    service,
                    listen: SocketAddr::new(b_ip, ports.tls(service)),
                    connect: SocketAddr::new(a_ip, ports.server(service)),
                }),
            },
        ];
        let mut processes = Vec::new();
        for (cluster, side) in env.topo.clusters().iter().zip(sides) {
            let peer = side.certs.peer();
            let config = env.dir.join(format!("{}-{peer}.conf", self.kind.slug()));
            let mut cmd = self.place(cluster.netns()).command(self.kind.slug());
            match self.kind {
                RouteKind::Haproxy => {
                    fs::write(&config, haproxy_config(&side, env.dir)?)?;
                    cmd.arg("-db").arg("-f").arg(&config);
                }
                RouteKind::Stunnel => {
                    fs::write(&config, stunnel_config(&side))?;
                    cmd.arg(&config);
                }
                _ => bail!("{} is not a proxy", self.kind.label()),
            }
            let (log, file) = self.log_file(env, &peer)?;
            let child = self.spawn(&mut cmd, file)?;
            processes.push(Process {
                pid: child.id(),
                log,
            });
            self.proxies.push(child);
        }
        self.processes = processes.try_into().ok();
        let netns = env.topo.b().netns();
        for &service in env.services {
            let port = ports.tls(service);
            wait_until(
                &format!("{} to listen on {port} in B", self.kind.label()),
                Duration::from_secs(10),
                || listening(netns, port),
            )?;
        }
        Ok(())
    }
}

/// A peer's certificate directory, as `clink peer-cert create` made it.
struct Certs(PathBuf);

impl Certs {
    fn cert(&self) -> PathBuf {
        self.0.join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.0.join("key.pem")
    }

    fn ca(&self) -> PathBuf {
        self.0.join("ca.pem")
    }

    fn peer(&self) -> String {
        self.0
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// One side of a proxy pair: the client side (in A) takes plain TCP from local clients and
/// opens mutual TLS to B; the server side (in B) terminates it and connects to the server.
struct ProxySide {
    certs: Certs,
    role: Role,
    links: Vec<Link>,
}

fn links(services: &[Service], link: impl Fn(Service) -> Link) -> Vec<Link> {
    services.iter().copied().map(link).collect()
}

enum Role {
    /// Checks that the server's certificate names `server_name` (and sends it as SNI).
    Client { server_name: &'static str },
    /// Requires a client certificate.
    Server,
}

struct Link {
    service: Service,
    listen: SocketAddr,
    connect: SocketAddr,
}

/// What nginx answers every request of the http scenario with: 64 bytes, a small response
/// of a real application.
pub const HTTP_BODY: &str = "clink bench: a small fixed HTTP response body, 64 bytes long....";

/// nginx in one process (no master: nothing is left behind when the bench stops it),
/// answering every request on `port` with [`HTTP_BODY`], keep-alive connections that last
/// the whole run, no access log, every file it writes in `dir`.
fn nginx_config(dir: &Path, port: u16) -> String {
    let dir = dir.display();
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
         error_log stderr warn;\n\
         events {{\n    worker_connections 4096;\n}}\n\
         http {{\n    access_log off;\n    default_type text/plain;\n    \
         keepalive_requests 1000000000;\n    keepalive_timeout 300s;\n    \
         client_body_temp_path {dir}/body;\n    proxy_temp_path {dir}/proxy;\n    \
         fastcgi_temp_path {dir}/fastcgi;\n    uwsgi_temp_path {dir}/uwsgi;\n    \
         scgi_temp_path {dir}/scgi;\n    \
         server {{\n        listen 0.0.0.0:{port};\n        \
         location / {{\n            return 200 \"{HTTP_BODY}\";\n        }}\n    }}\n}}\n"
    )
}

/// The TLS 1.3 suites the agent offers, in its order (`tls::provider` in clink-agent), in
/// OpenSSL's spelling. The proxies are given the same list: OpenSSL's own default puts
/// AES-256-GCM first, which costs more per byte than the AES-128-GCM the agents negotiate,
/// and a comparison of tunnels should not be one of ciphers.
const TUNNEL_SUITES: &str =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

/// haproxy, one process, TLS 1.3 only, the agent's suites ([`TUNNEL_SUITES`]). haproxy
/// wants the certificate and its key in one file: it is written to `dir`.
fn haproxy_config(side: &ProxySide, dir: &Path) -> Result<String> {
    let combined = dir.join(format!("{}-combined.pem", side.certs.peer()));
    let pem = fs::read_to_string(side.certs.cert())? + &fs::read_to_string(side.certs.key())?;
    fs::write(&combined, pem).with_context(|| format!("write {}", combined.display()))?;
    let tls = format!(
        "ssl crt {} ca-file {} verify required",
        combined.display(),
        side.certs.ca().display()
    );
    let mut cfg = format!(
        "global\n    ssl-default-bind-options ssl-min-ver TLSv1.3\n    \
         ssl-default-server-options ssl-min-ver TLSv1.3\n    \
         ssl-default-bind-ciphersuites {TUNNEL_SUITES}\n    \
         ssl-default-server-ciphersuites {TUNNEL_SUITES}\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    \
         timeout client 1h\n    timeout server 1h\n",
    );
    for Link {
        service,
        listen,
        connect,
    } in &side.links
    {
        let name = service.name();
        let (bind, server) = match side.role {
            Role::Client { server_name } => (
                String::new(),
                format!(" {tls} verifyhost {server_name} sni str({server_name})"),
            ),
            Role::Server => (format!(" {tls}"), String::new()),
        };
        writeln!(
            cfg,
            "frontend {name}\n    bind {listen}{bind}\n    default_backend {name}\n\
             backend {name}\n    server {name} {connect}{server}"
        )?;
    }
    Ok(cfg)
}

/// stunnel, one process in the foreground, TLS 1.3 only with the agent's suites, Nagle off
/// on both legs as the agents and haproxy do. Its log goes to stderr only, like the agents':
/// where no syslog daemon listens, stunnel falls back to writing every line to /dev/console under a global
/// lock, which would cap it at about 130 connections a second.
fn stunnel_config(side: &ProxySide) -> String {
    let mut cfg = String::from("foreground = yes\nsyslog = no\npid =\n");
    let role = match side.role {
        Role::Client { server_name } => {
            format!("client = yes\nsni = {server_name}\ncheckHost = {server_name}\n")
        }
        Role::Server => "requireCert = yes\n".to_owned(),
    };
    for Link {
        service,
        listen,
        connect,
    } in &side.links
    {
        let _ = write!(
            cfg,
            "[{}]\naccept = {listen}\nconnect = {connect}\n{role}cert = {}\nkey = {}\n\
             CAfile = {}\nverifyChain = yes\nsslVersion = TLSv1.3\n\
             ciphersuites = {TUNNEL_SUITES}\n\
             socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
            service.name(),
            side.certs.cert().display(),
            side.certs.key().display(),
            side.certs.ca().display(),
        );
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sides(dir: &Path) -> [ProxySide; 2] {
        let (a_ip, b_ip): (IpAddr, IpAddr) = (
            Ipv4Addr::LOCALHOST.into(),
            Ipv4Addr::new(10, 0, 0, 2).into(),
        );
        let ports = RouteKind::Haproxy.ports();
        [
            ProxySide {
                certs: Certs(dir.join("peer-a")),
                role: Role::Client {
                    server_name: "peer-b",
                },
                links: links(&Service::ALL, |service| Link {
                    service,
                    listen: SocketAddr::new(a_ip, ports.entry(service)),
                    connect: SocketAddr::new(b_ip, ports.tls(service)),
                }),
            },
            ProxySide {
                certs: Certs(dir.join("peer-b")),
                role: Role::Server,
                links: links(&Service::ALL, |service| Link {
                    service,
                    listen: SocketAddr::new(b_ip, ports.tls(service)),
                    connect: SocketAddr::new(a_ip, ports.server(service)),
                }),
            },
        ]
    }

    fn fake_certs(dir: &Path) {
        for peer in PEERS {
            fs::create_dir_all(dir.join(peer)).unwrap();
            for file in ["cert.pem", "key.pem", "ca.pem"] {
                fs::write(dir.join(peer).join(file), format!("{peer} {file}\n")).unwrap();
            }
        }
    }

    #[test]
    fn routes_have_disjoint_ports_below_the_ephemeral_range() {
        let mut seen = std::collections::BTreeSet::new();
        for kind in RouteKind::ALL {
            let p = kind.ports();
            let services = Service::ALL.iter();
            let ports = services.flat_map(|&s| [p.server(s), p.entry(s), p.tls(s)]);
            for port in ports.chain([p.gateway(), p.metrics()]) {
                assert!(seen.insert(port), "{kind:?} reuses {port}");
                assert!(port < EPHEMERAL_PORTS.0, "{port} is in the ephemeral range");
            }
        }
    }

    #[test]
    fn haproxy_pair_is_mutual_tls_1_3_with_the_fabric_ca() {
        let dir = tempfile::tempdir().unwrap();
        fake_certs(dir.path());
        let [client, server] = sides(dir.path());
        let a = haproxy_config(&client, dir.path()).unwrap();
        assert!(
            a.contains("ssl-default-server-options ssl-min-ver TLSv1.3"),
            "{a}"
        );
        assert_eq!(
            a.matches("verify required verifyhost peer-b sni str(peer-b)")
                .count(),
            Service::ALL.len()
        );
        for side in ["bind", "server"] {
            let line = format!("ssl-default-{side}-ciphersuites TLS_AES_128_GCM_SHA256:");
            assert!(a.contains(&line), "{a}");
        }
        assert!(a.contains("bind 127.0.0.1:10311"), "{a}");
        assert!(a.contains("server iperf3 10.0.0.2:10351 ssl crt"), "{a}");
        let b = haproxy_config(&server, dir.path()).unwrap();
        assert!(
            b.contains("ssl-default-bind-options ssl-min-ver TLSv1.3"),
            "{b}"
        );
        assert!(b.contains("bind 10.0.0.2:10351 ssl crt"), "{b}");
        assert_eq!(
            b.matches("verify required\n").count(),
            Service::ALL.len(),
            "{b}"
        );
        assert!(b.contains("peer-b/ca.pem"));
        assert!(b.contains("server iperf3 127.0.0.1:10301\n"), "{b}");
        let combined = fs::read_to_string(dir.path().join("peer-b-combined.pem")).unwrap();
        assert_eq!(combined, "peer-b cert.pem\npeer-b key.pem\n");
    }

    #[test]
    fn stunnel_pair_is_mutual_tls_1_3_with_the_fabric_ca() {
        let dir = tempfile::tempdir().unwrap();
        let [client, server] = sides(dir.path());
        let a = stunnel_config(&client);
        assert!(a.starts_with("foreground = yes\nsyslog = no\n"), "{a}");
        assert_eq!(
            a.matches("client = yes\nsni = peer-b\ncheckHost = peer-b\n")
                .count(),
            Service::ALL.len()
        );
        assert_eq!(
            a.matches("verifyChain = yes\nsslVersion = TLSv1.3\n")
                .count(),
            Service::ALL.len()
        );
        assert_eq!(
            a.matches(&format!("ciphersuites = {TUNNEL_SUITES}\n"))
                .count(),
            Service::ALL.len()
        );
        assert!(
            a.contains("[iperf3]\naccept = 127.0.0.1:10311\nconnect = 10.0.0.2:10351\n"),
            "{a}"
        );
        let b = stunnel_config(&server);
        assert_eq!(
            b.matches("requireCert = yes\n").count(),
            Service::ALL.len(),
            "{b}"
        );
        assert!(
            b.contains("[echo]\naccept = 10.0.0.2:10352\nconnect = 127.0.0.1:10302\n"),
            "{b}"
        );
        assert!(b.contains("peer-b/key.pem"));
    }

    #[test]
    fn nginx_answers_one_fixed_small_body_and_writes_only_in_its_directory() {
        assert_eq!(HTTP_BODY.len(), 64);
        let cfg = nginx_config(Path::new("/tmp/clink-bench-x/haproxy-nginx"), 10_304);
        assert!(cfg.starts_with("daemon off;\nmaster_process off;\nworker_processes 1;\n"));
        assert!(cfg.contains("listen 0.0.0.0:10304;"), "{cfg}");
        assert!(
            cfg.contains(&format!("return 200 \"{HTTP_BODY}\";")),
            "{cfg}"
        );
        assert!(cfg.contains("access_log off;"), "{cfg}");
        assert!(cfg.contains("keepalive_requests 1000000000;"), "{cfg}");
        // Every path nginx writes to, in the bench's working directory.
        let files: Vec<_> = cfg
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("pid ") || l.contains("_temp_path "))
            .collect();
        assert_eq!(files.len(), 6, "{cfg}");
        for line in files {
            assert!(
                line.contains(" /tmp/clink-bench-x/haproxy-nginx/"),
                "{line}"
            );
        }
        assert_eq!(cfg.matches('{').count(), cfg.matches('}').count(), "{cfg}");
    }
}
