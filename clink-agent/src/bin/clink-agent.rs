//! `clink-agent`: the gateway agent of one peer, standalone or as a Kubernetes DaemonSet pod.

use std::{collections::BTreeMap, io::IsTerminal as _, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use clap::{Parser, ValueEnum};
use clink_agent::{
    admin,
    agent::Agent,
    api,
    clients::{ClientMap, Clients},
    dataplane::{self, Context},
    k8s, kernel, metrics,
    peer::Dialer,
    store::{ApiServerObjects, FileStore, Store},
    tls::reload::{self, Reloader},
};
use tokio::{net::TcpListener, signal::unix::SignalKind};
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
    /// userspace, logging why (sockmap is opt-in until the kernel issues in ARCHITECTURE.md
    /// are resolved).
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
    /// Log filter (tracing EnvFilter syntax), e.g. info or clink_agent=debug.
    #[arg(long, env = "CLINK_LOG", default_value = "info")]
    log_level: String,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
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
        Ok(()) => info!("allocator: jemalloc, freed memory returned by background threads"),
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
    let kube_client = match &kube_options {
        Some(_) => Some(
            kube::Client::try_default()
                .await
                .context("Kubernetes mode: no API server configuration (in-cluster service account or KUBECONFIG)")?,
        ),
        None => None,
    };
    let gateway = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on gateway address {}", args.listen))?;
    let admin_listener = admin::bind(&args.admin)?;
    let metrics_listener = metrics::bind(args.metrics)
        .await
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
    let ctx = Context {
        name: args.name.clone(),
        labels,
        credentials: certs.credentials(),
        dialer: Arc::new(Dialer::new(certs.credentials())),
        snapshot: Default::default(),
        peers: Default::default(),
        balancer: Default::default(),
        clients,
        metrics: metrics.clone(),
        datapath: datapath.clone(),
        connections: Default::default(),
    };
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
    let _kubernetes = match (kube_client, kube_options, pods) {
        (Some(client), Some(options), Some(pods)) => {
            Some(k8s::start(agent.clone(), client, options, pods))
        }
        _ => None,
    };
    let _gateway = dataplane::serve_gateway(agent.context().clone(), gateway);
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
    admin_task.abort();
    let _ = std::fs::remove_file(&args.admin);
    datapath.shutdown();
    Ok(())
}
