//! `clink-agent`: the gateway agent of one peer, standalone or as a Kubernetes DaemonSet pod.

use std::{collections::BTreeMap, io::IsTerminal as _, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use clap::{Parser, ValueEnum};
use clink_agent::{
    admin,
    agent::Agent,
    api,
    clients::{ClientMap, Clients},
    connections::{Closing, ConnTable},
    dataplane::{self, Context},
    k8s, kernel, limits,
    logging::{self, LogLimiter},
    metrics,
    peer::{Dialer, Keepalive, PeerTimeouts},
    store::{ApiServerObjects, FileStore, Store},
    tls::reload::{self, Reloader},
};
use tokio::signal::unix::SignalKind;
use tracing::{info, warn};

/// jemalloc: size classes that keep the many small per-connection allocations from
/// fragmenting the heap, and (with its background threads, started in `main`) freed memory
/// given back to the system within seconds even while the agent is idle. glibc's malloc kept
/// ~330 MB resident after 10,000 idle tunnels had closed (ARCHITECTURE.md, "Buffers").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(name = "clink-agent", version, about = "ClusterLink-rs gateway agent")]
struct Args {
    /// This peer's name: the DNS name in its certificate.
    #[arg(long)]
    name: String,
    /// Directory with cert.pem, key.pem and ca.pem (made by `clink peer-cert create`).
    #[arg(long)]
    certs: PathBuf,
    /// Seconds between looks at the --certs files: changed files are reloaded without a
    /// restart (also at once on SIGHUP); 0: only on SIGHUP.
    #[arg(long, value_name = "SECONDS", default_value_t = reload::DEFAULT_INTERVAL.as_secs())]
    cert_reload_interval: u64,
    /// Where objects come from: standalone (the state directory and `clink apply`),
    /// kubernetes (the API server's custom resources), or auto: kubernetes when running in
    /// a pod with a service-account token, else standalone.
    #[arg(long, value_enum, default_value = "auto")]
    mode: Mode,
    /// State directory where objects are kept (standalone mode; required there).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Gateway address peers connect to (mTLS).
    #[arg(long, default_value = "0.0.0.0:443")]
    listen: SocketAddr,
    /// Admin socket for the clink CLI.
    #[arg(long, env = "CLINK_ADMIN", default_value = admin::DEFAULT_SOCKET)]
    admin: PathBuf,
    /// This peer's labels, KEY=VALUE (repeatable); peers can match them in policies.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Prometheus metrics address (serves /metrics).
    #[arg(long, default_value = metrics::DEFAULT_ADDR)]
    metrics: SocketAddr,
    /// YAML list of client address ranges and the namespace, service account and labels
    /// policies see for clients in them (standalone mode).
    #[arg(long, value_name = "FILE")]
    client_attributes: Option<PathBuf>,
    /// Data path: userspace; sockmap (local hops spliced in the kernel); ktls (tunnel TLS
    /// records made by the kernel, payload spliced, never copied to the agent); both fail at
    /// start naming what is missing. auto: ktls where the kernel has kernel TLS, else
    /// userspace, logging why (sockmap is opt-in: the kernel fails blocking reads of spliced
    /// sockets with EAGAIN, ARCHITECTURE.md "Blocking readers").
    #[arg(long, value_enum, default_value = "auto")]
    datapath: kernel::Choice,
    /// cgroup v2 directory whose processes' connections the kernel data paths intercept: the
    /// sockmap path splices their local hops [default: the cgroup v2 root, found in
    /// /proc/self/mountinfo]; the kTLS path attaches its connect hooks (service addresses)
    /// only when this is given.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// The node's IPv4 address, on which pods of this node reach the agent (Kubernetes: the
    /// pod's status.hostIP). With --cgroup, a connect from another network namespace in the
    /// cgroup to a service address goes to the Import's listener at this address; without
    /// it, only clients in the agent's own namespace are redirected.
    #[arg(long, value_name = "IPV4")]
    node_address: Option<std::net::Ipv4Addr>,
    /// Where the sockmap data path pins its eBPF programs and maps (on bpffs, mounted if
    /// needed).
    #[arg(long, value_name = "DIR", default_value = kernel::pins::DEFAULT_PIN_DIR)]
    bpf_pin_dir: PathBuf,
    /// Worker threads for connections [default: half the CPUs, at least 1: the agent shares
    /// the node with the workloads it serves, and one connection's relay stays on one
    /// thread instead of waking another].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    // Dead peers, idle connections and revoked access (ARCHITECTURE.md, "Dead peers, idle
    // connections and revoked access").
    /// Seconds a peer (tunnel) connection may be quiet before TCP keepalive probes start; 0:
    /// no keepalive. With --peer-user-timeout a quiet dead peer is noticed at the first probe
    /// at least that long after its last packet, else after --peer-keepalive-count probes.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=32767))]
    peer_keepalive: u64,
    /// Seconds between keepalive probes.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=32767))]
    peer_keepalive_interval: u64,
    /// Unanswered keepalive probes that reset a peer connection (when --peer-user-timeout
    /// is 0; otherwise the user timeout decides).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=127))]
    peer_keepalive_count: u32,
    /// Seconds data sent to a peer may stay unacknowledged before the connection is reset
    /// (TCP_USER_TIMEOUT), both sides of the tunnel then reset; 0: the kernel's default
    /// (about 15 minutes of retransmissions).
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=2_000_000))]
    peer_user_timeout: u64,
    /// Seconds a tunneled connection may move no byte either way before the agent resets
    /// it (checked every quarter of it); 0: never.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    idle_timeout: u64,
    /// Keep open connections that a change (a policy, or their Import, Export or Peer
    /// deleted) no longer allows; only new connections are refused. Default: reset them, as
    /// Istio's ztunnel does.
    #[arg(long)]
    keep_established: bool,
    /// Log filter (tracing EnvFilter syntax), e.g. info or clink_agent=debug.
    #[command(flatten)]
    limits: LimitArgs,

    #[arg(long, env = "CLINK_LOG", default_value = "info")]
    log_level: String,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log lines about one kind of repeated failure (failed handshakes, refused requests,
    /// unreachable targets, skipped sources) from one source (peer, address or Import) per
    /// --log-repeat-interval. Past it, lines are left out and counted in
    /// clink_log_lines_suppressed_total; the next line let through says suppressed=<n>.
    /// 0: no limit.
    #[arg(long, value_name = "N", default_value_t = logging::DEFAULT_LINES)]
    log_repeat_lines: u32,
    /// Seconds of the --log-repeat-lines window.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = logging::DEFAULT_INTERVAL.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..=86400)
    )]
    log_repeat_interval: u64,
    #[command(flatten)]
    kubernetes: KubernetesArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Auto,
    Standalone,
    Kubernetes,
}

/// Kubernetes mode (the chart sets these from the downward API).
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Kubernetes mode")]
struct KubernetesArgs {
    /// The agents' namespace: Peers, the peer Secret and the Lease live here [default: the
    /// service account's namespace].
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// This node's name: the pod cache holds the pods scheduled here.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// This agent's identity in the leader election and in Events [default: the host name].
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// A label of the agents' pods, KEY=VALUE (repeatable): every Import's Service selects
    /// the pods that have them all.
    #[arg(
        long = "agent-selector",
        value_name = "KEY=VALUE",
        default_value = "app.kubernetes.io/name=clusterlink"
    )]
    agent_selector: Vec<String>,
    /// The Lease that elects the agent writing status and Services.
    #[arg(long, default_value = "clusterlink-agent")]
    lease_name: String,
    /// Seconds a leader keeps the Lease without renewing it: how long status and Services
    /// wait for a new leader after one disappears.
    #[arg(long, value_name = "SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=3600))]
    lease_duration: u64,
}

/// Caps and shutdown: what the agent takes on at once, and how it stops.
#[derive(clap::Args, Debug)]
struct LimitArgs {
    /// Tunneled connections at once, both directions together. Past it the gateway answers a
    /// CONNECT with 503 and Import listeners reset new clients. Default: what the open-file
    /// limit holds after the descriptors the agent keeps for itself (logged at start).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,
    /// Clients of one Import at once, so one Import cannot take all of --max-connections.
    /// Default: only --max-connections applies.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_import_connections: Option<u32>,
    /// Gateway connections in their TLS handshake or waiting for their request, at once; past
    /// it new ones are reset. Default: 1,024 (less when the open-file limit is low).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_handshakes: Option<u32>,
    /// Seconds open connections may take to finish after SIGTERM or Ctrl-C, while no new ones
    /// are accepted; then those still open are reset and the agent exits. A second signal
    /// ends the wait. Keep it below Kubernetes' terminationGracePeriodSeconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 25)]
    drain_timeout: u64,
}

impl LimitArgs {
    fn requested(&self) -> limits::Requested {
        let size = |n: Option<u32>| n.map(|n| n as usize);
        limits::Requested {
            connections: size(self.max_connections),
            import_connections: size(self.max_import_connections),
            handshakes: size(self.max_handshakes),
        }
    }
}

impl KubernetesArgs {
    fn options(&self, peer: &str) -> Result<k8s::Options> {
        let namespace = self
            .namespace
            .clone()
            .or_else(k8s::own_namespace)
            .context("--namespace (or POD_NAMESPACE) is required outside a pod")?;
        let node = self.node_name.clone().context(
            "--node-name (or NODE_NAME, from spec.nodeName) is required in Kubernetes mode",
        )?;
        let identity = match &self.pod_name {
            Some(name) => name.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("{peer}-{node}")),
        };
        let agent_selector = parse_pairs("--agent-selector", &self.agent_selector)?;
        Ok(k8s::Options {
            namespace,
            node,
            identity,
            agent_selector,
            lease_name: self.lease_name.clone(),
            lease_duration: std::time::Duration::from_secs(self.lease_duration),
        })
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The dead-peer settings of peer sockets, from the flags.
fn peer_timeouts(args: &Args) -> PeerTimeouts {
    let secs = std::time::Duration::from_secs;
    PeerTimeouts {
        keepalive: (args.peer_keepalive > 0).then(|| Keepalive {
            idle: secs(args.peer_keepalive),
            interval: secs(args.peer_keepalive_interval),
            count: args.peer_keepalive_count,
        }),
        user_timeout: (args.peer_user_timeout > 0).then(|| secs(args.peer_user_timeout)),
    }
}

fn parse_pairs(flag: &str, pairs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("{flag} {pair:?}: expected KEY=VALUE"))?;
        api::check_label(k, v).map_err(|e| anyhow::anyhow!("{flag} {pair:?}: {e}"))?;
        labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(labels)
}

fn init_logging(args: &Args) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("--log-level {:?}", args.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// Every tunneled connection holds two descriptors: raise the soft limit to the hard one,
/// as haproxy does, so a default soft limit of 1,024 does not cap the agent at ~500.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Starts jemalloc's background threads, which purge freed pages after its decay time
/// (`dirty_decay_ms`, 10 s by default; `_RJEM_MALLOC_CONF` changes it). Without them
/// jemalloc purges only when the agent allocates, so an agent that went quiet after a load
/// would keep its peak resident set.
fn release_freed_memory() {
    match tikv_jemalloc_ctl::background_thread::write(true) {
        // Debug: an agent that refuses to start says so in one line.
        Ok(()) => {
            tracing::debug!("allocator: jemalloc, freed memory returned by background threads")
        }
        Err(e) => warn!(
            error = %e,
            "allocator: jemalloc background threads did not start; freed memory is returned \
             only while the agent allocates"
        ),
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(e) = init_logging(&args) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    raise_open_file_limit();
    release_freed_memory();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.map_or_else(default_threads, usize::from))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let labels = parse_pairs("--label", &args.labels)?;
    let kubernetes = match args.mode {
        Mode::Kubernetes => true,
        Mode::Standalone => false,
        Mode::Auto => k8s::in_cluster(),
    };
    let kube_options = if kubernetes {
        Some(args.kubernetes.options(&args.name)?)
    } else {
        None
    };
    // First, so that a forced data path that cannot run fails before anything is bound. Its
    // programs are detached and unpinned on every way out (`shutdown` below, or drop).
    let datapath = kernel::select(&kernel::Options {
        choice: args.datapath,
        cgroup: args.cgroup.clone(),
        pin_dir: args.bpf_pin_dir.clone(),
        node_address: args.node_address,
    })?;
    let certs = Reloader::load(&args.certs, &args.name, datapath.ktls().is_some())
        .context("loading certificates")?;
    let store: Box<dyn Store> = match (&kube_options, &args.state) {
        (Some(_), _) => Box::new(ApiServerObjects),
        (None, Some(state)) => Box::new(
            FileStore::open(state)
                .with_context(|| format!("opening state directory {}", state.display()))?,
        ),
        (None, None) => anyhow::bail!(
            "--state is required in standalone mode (the directory where objects are kept)"
        ),
    };
    if kube_options.is_some() {
        clink_agent::tls::install_process_provider();
    }
    let kube_client = match &kube_options {
        Some(_) => Some(
            kube::Client::try_default()
                .await
                .context("Kubernetes mode: no API server configuration (in-cluster service account or KUBECONFIG)")?,
        ),
        None => None,
    };
    let gateway = limits::bind_tcp(args.listen)
        .with_context(|| format!("cannot listen on gateway address {}", args.listen))?;
    let admin_listener = admin::bind(&args.admin)?;
    let metrics_listener = metrics::bind(args.metrics)
        .with_context(|| format!("cannot listen on metrics address {}", args.metrics))?;
    let pods = kube_options
        .as_ref()
        .map(|o| Arc::new(k8s::PodCache::new(&o.node)));
    let clients = match (&pods, &args.client_attributes) {
        (Some(_), Some(_)) => anyhow::bail!(
            "--client-attributes is for standalone mode; in Kubernetes mode client attributes come from the pods"
        ),
        (Some(pods), None) => Clients::Pods(pods.clone()),
        (None, Some(path)) => Clients::Ranges(
            ClientMap::load(path).map_err(|e| anyhow::anyhow!("--client-attributes {e}"))?,
        ),
        (None, None) => Clients::default(),
    };

    let metrics = Arc::new(metrics::Metrics::default());
    metrics
        .datapath
        .get_or_create(&metrics::DatapathLabels {
            datapath: datapath.name().to_owned(),
        })
        .set(1);
    let client_ranges = match &clients {
        Clients::Ranges(map) => map.len(),
        Clients::Pods(_) => 0,
    };
    let per_connection = if datapath.ktls().is_some() {
        limits::FDS_PER_KTLS_CONNECTION
    } else {
        limits::FDS_PER_CONNECTION
    };
    let open_files = limits::open_file_limit();
    let (caps, warning) = limits::Caps::derive(args.limits.requested(), open_files, per_connection)
        .map_err(anyhow::Error::msg)?;
    if let Some(warning) = warning {
        warn!("{warning}");
    }
    info!(
        open_files,
        max_connections = caps.connections,
        max_import_connections = caps.import_connections,
        max_handshakes = caps.handshakes,
        "connection caps"
    );
    let limits = limits::Limits::new(
        caps,
        metrics.refusals.clone(),
        metrics.limits.clone(),
        metrics.limits_in_use.clone(),
    );
    let ctx = Context {
        name: args.name.clone(),
        labels,
        credentials: certs.credentials(),
        dialer: Arc::new(Dialer::new(certs.credentials(), peer_timeouts(&args))),
        snapshot: Default::default(),
        peers: Default::default(),
        balancer: Default::default(),
        clients,
        metrics: metrics.clone(),
        datapath: datapath.clone(),
        connections: ConnTable::new(Closing {
            idle_timeout: (args.idle_timeout > 0)
                .then(|| std::time::Duration::from_secs(args.idle_timeout)),
            keep_established: args.keep_established,
        }),
        limits,
        draining: tokio::sync::watch::Sender::new(false),
        logs: LogLimiter::new(
            logging::Limits {
                lines: args.log_repeat_lines,
                interval: std::time::Duration::from_secs(args.log_repeat_interval),
                ..Default::default()
            },
            metrics.log_suppressed.clone(),
        ),
    };
    info!(
        peer_keepalive = args.peer_keepalive,
        peer_keepalive_interval = args.peer_keepalive_interval,
        peer_keepalive_count = args.peer_keepalive_count,
        peer_user_timeout = args.peer_user_timeout,
        idle_timeout = args.idle_timeout,
        keep_established = args.keep_established,
        "connection timeouts (seconds; 0: off)"
    );
    let agent = Arc::new(Agent::new(ctx, args.listen, store));
    for problem in agent.start().await.context("loading state")? {
        warn!("{problem}");
    }
    let reload_every = std::time::Duration::from_secs(args.cert_reload_interval);
    let _certs = certs
        .spawn(
            metrics.clone(),
            (!reload_every.is_zero()).then_some(reload_every),
        )
        .context("watching the certificate files")?;
    let mut k8s_mode = match (kube_client, kube_options, pods) {
        (Some(client), Some(options), Some(pods)) => {
            Some(k8s::start(agent.clone(), client, options, pods))
        }
        _ => None,
    };
    let gateway_task = dataplane::serve_gateway(agent.context().clone(), gateway);
    let _metrics = tokio::spawn(metrics::serve(metrics_listener, metrics));
    let admin_task = tokio::spawn(admin::serve(admin_listener, agent.clone()));
    info!(
        name = %args.name,
        gateway = %args.listen,
        admin = %args.admin.display(),
        metrics = %args.metrics,
        mode = if kubernetes { "kubernetes" } else { "standalone" },
        client_ranges,
        datapath = datapath.name(),
        threads = args.threads.map_or_else(default_threads, usize::from),
        labels = %args.labels.join(","),
        "agent ready"
    );

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupted; shutting down"),
        _ = term.recv() => info!("terminated; shutting down"),
    }
    // Before the drain: another agent can write status while this one lets its connections
    // finish.
    if let Some(k8s_mode) = &mut k8s_mode {
        k8s_mode
            .leave_election(std::time::Duration::from_secs(3))
            .await;
    }
    drain(
        agent.context(),
        std::time::Duration::from_secs(args.limits.drain_timeout),
        &mut term,
    )
    .await;
    gateway_task.abort();
    admin_task.abort();
    let _ = std::fs::remove_file(&args.admin);
    datapath.shutdown();
    Ok(())
}

/// The first part of shutting down: no new connections (the gateway and Import listeners
/// close; the admin API and metrics stay up), then up to `timeout` for the open ones to end.
/// Returns early on a second signal.
async fn drain(
    ctx: &dataplane::Context,
    timeout: std::time::Duration,
    term: &mut tokio::signal::unix::Signal,
) {
    ctx.stop_accepting();
    let open = ctx.limits.open_connections();
    if open == 0 {
        return;
    }
    info!(
        open,
        drain_timeout_s = timeout.as_secs(),
        "draining: new connections are refused, open ones may finish"
    );
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::signal::ctrl_c() => {
                info!("second signal: not waiting for open connections");
                break;
            }
            _ = term.recv() => {
                info!("second signal: not waiting for open connections");
                break;
            }
        }
        if ctx.limits.open_connections() == 0 {
            info!("drained: every connection has ended");
            return;
        }
    }
    let reset = ctx
        .connections
        .end_all(&clink_agent::lifetime::Ending::Shutdown);
    warn!(
        open = ctx.limits.open_connections(),
        reset, "drain timeout: resetting the connections still open"
    );
    // Their pumps reset both sockets; give them a moment so clients see a reset rather than
    // a clean end of stream from the process's exit.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while ctx.limits.open_connections() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
}
