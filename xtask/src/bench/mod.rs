//! `cargo xtask bench`: ClusterLink-rs side by side with direct TCP and the tunnels users
//! would pick instead, in one run on one machine.
//!
//! Two network-namespace clusters joined by a veth pair; every route (direct, an agent pair
//! per data path, an haproxy pair, a stunnel pair) is set up once with its own servers in B,
//! then each measurement runs for every route in turn, repetition after repetition
//! (A B C A B C ...), so background load on the machine hits all routes alike and the ratios
//! of the medians stay meaningful even when the absolute figures move.
//!
//! Everything it makes (namespaces, cgroups, processes, the working directory) lives in
//! guards and is removed on success, on error and on Ctrl-C.
//!
//! With `--vm` the same bench runs inside the kTLS-capable VM of `cargo xtask vm-test`
//! ([`vm`]), where the kTLS data path can run next to userspace and sockmap.

mod chart;
mod measure;
mod meta;
mod place;
mod progress;
mod reply;
mod report;
mod routes;
mod tool;
mod vm;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clink_testbed::{two_clusters, Topology};
use tempfile::TempDir;

use crate::clink::{build_release, make_certificates};
use crate::run::{self, step};
use meta::Meta;
use progress::{minutes, Progress};
use report::{Metric, Results, Side};
use routes::{Env, Route, RouteKind, Service};
pub use tool::{run as run_tool, Tool};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Fewer repetitions and shorter runs: done in about three minutes.
    #[arg(long)]
    quick: bool,
    /// Run only this scenario (repeatable).
    #[arg(long = "scenario", value_enum, value_name = "NAME")]
    scenarios: Vec<Scenario>,
    /// Measure only this route (repeatable); ratios need direct and haproxy.
    #[arg(long = "path", value_enum, value_name = "NAME")]
    paths: Vec<RouteKind>,
    /// The pipelined scenario's connections.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pipelined_connections: Option<u32>,
    /// The pipelined scenario's requests in flight on each connection.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pipelined_depth: Option<u32>,
    /// A directory holding another build's `clink-agent`: adds the route `compare`, that
    /// agent on the userspace data path, to the run (with its ratio to `userspace`).
    #[arg(long, value_name = "DIR")]
    compare_agent: Option<PathBuf>,
    /// Take `clink-agent`, `clink` and `xtask` from this directory instead of building them
    /// (and skip `cargo xtask setup`): a run that measures binaries built before, while the
    /// tree is changing.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["vm", "in_vm"])]
    prebuilt: Option<PathBuf>,
    /// Repetitions of each measurement [default: 5, with --quick 3].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    reps: Option<u32>,
    /// Where report.md, throughput.svg and results.json go [default: target/bench, with
    /// --vm target/bench-vm].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Run inside the kTLS-capable VM (`cargo xtask vm-test`'s kernel, qemu under software
    /// emulation), where the ktls route can run: by default direct, userspace, sockmap and
    /// ktls, throughput and CPU, 5 repetitions of 4 s runs.
    #[arg(long)]
    vm: bool,
    /// With --vm: boot this kernel image instead of `cargo xtask vm-test`'s (the newest
    /// /boot/vmlinuz-6.1*); its modules must be in /lib/modules/<release>, and the report
    /// names the release the guest ran.
    #[arg(long, value_name = "FILE", requires = "vm")]
    vm_kernel: Option<PathBuf>,
    /// Seconds the whole VM run may take before it is killed (with --vm).
    #[arg(long, value_name = "S", default_value_t = vm::DEFAULT_TIMEOUT.as_secs())]
    vm_timeout: u64,
    /// Set by --vm for the bench it starts in the VM: the binaries built on the host, in
    /// this directory.
    #[arg(long, hide = true, value_name = "DIR")]
    in_vm: Option<PathBuf>,
    /// Set by --vm for the report: the host's command line and machine.
    #[arg(long, hide = true, value_name = "TEXT")]
    host: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// iperf3, 1 and 4 streams, both directions.
    Throughput,
    /// CPU seconds per GiB of one and of four iperf3 streams A→B (only one with --vm): the
    /// whole machine's (/proc/stat) and the tunnel processes' (/proc/PID/stat), with their
    /// user-space share.
    Cpu,
    /// Round trips of 64-byte messages, one in flight: p50 and p99.
    Latency,
    /// New connections per second, each carrying a 64-byte request.
    Connect,
    /// Resident memory of each tunnel process, idle and with 1,000 open connections.
    Memory,
    /// Pipelined small requests: 20 connections (--pipelined-connections), each keeping 16
    /// 64-byte requests in flight (--pipelined-depth), answered with 64 B and, in a second
    /// measurement, 1 KiB: requests per second, p99, tunnel CPU per request.
    Pipelined,
    /// A real HTTP server: nginx in B answering 64 bytes, driven by wrk from A over 20
    /// keep-alive connections: requests per second, p50, p99.
    Http,
}

/// How much of everything one run does.
#[derive(Debug)]
struct Plan {
    reps: u32,
    transfer: measure::Transfer,
    /// The CPU measurement's window, in the middle of an iperf3 run.
    cpu_seconds: f64,
    latency_seconds: f64,
    connect_seconds: f64,
    held: usize,
    pipelined_seconds: f64,
    pipeline: measure::Pipeline,
    /// wrk counts whole seconds.
    http_seconds: u32,
    steps: Vec<Step>,
}

/// One measurement, taken for every route in turn.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    Throughput {
        streams: u32,
        reverse: bool,
    },
    Cpu {
        streams: u32,
    },
    Latency,
    Connect,
    Memory,
    /// Responses of `response` bytes.
    Pipelined {
        response: u32,
    },
    Http,
}

/// The response sizes of the pipelined scenario.
const PIPELINED_RESPONSES: [u32; 2] = [report::SMALL_RESPONSE, 1024];

impl Step {
    fn label(self) -> String {
        match self {
            Step::Throughput { streams, reverse } => {
                Metric::Throughput { streams, reverse }.label()
            }
            Step::Cpu { streams } => Metric::CpuMachine { streams }
                .label()
                .replace(", whole machine (", ", ")
                .replace(')', ""),
            Step::Latency => "latency".to_owned(),
            Step::Connect => "connection setup".to_owned(),
            Step::Memory => "RSS with 1,000 connections".to_owned(),
            Step::Pipelined { response } => Metric::PipelinedRate { response }.label(),
            Step::Http => "HTTP (nginx, wrk)".to_owned(),
        }
    }

    /// The report rows this step fills.
    fn metrics(self) -> Vec<Metric> {
        match self {
            Step::Throughput { streams, reverse } => vec![Metric::Throughput { streams, reverse }],
            Step::Cpu { streams } => vec![
                Metric::CpuMachine { streams },
                Metric::CpuTunnel { streams },
                Metric::CpuTunnelUser { streams },
                Metric::TunnelUserShare { streams },
            ],
            Step::Latency => vec![Metric::LatencyP50, Metric::LatencyP99],
            Step::Connect => vec![Metric::ConnectRate],
            Step::Memory => vec![Metric::RssOpen(Side::A), Metric::RssOpen(Side::B)],
            Step::Pipelined { response } => vec![
                Metric::PipelinedRate { response },
                Metric::PipelinedP99 { response },
                Metric::PipelinedCpu { response },
                Metric::PipelinedMachineCpu { response },
                Metric::PipelinedMachineBusy { response },
            ],
            Step::Http => vec![Metric::HttpRate, Metric::HttpP50, Metric::HttpP99],
        }
    }

    /// The server in B it measures against.
    fn service(self) -> Service {
        match self {
            Step::Throughput { .. } | Step::Cpu { .. } => Service::Iperf,
            Step::Latency | Step::Connect | Step::Memory => Service::Echo,
            Step::Pipelined { .. } => Service::Reply,
            Step::Http => Service::Http,
        }
    }

    /// Memory is a figure of tunnel processes, which the direct route does not have.
    fn applies_to(self, route: RouteKind) -> bool {
        !(self == Step::Memory && route == RouteKind::Direct)
    }
}

impl Plan {
    fn new(opts: &Options) -> Self {
        let in_vm = opts.vm || opts.in_vm.is_some();
        let all = [
            Scenario::Throughput,
            Scenario::Cpu,
            Scenario::Latency,
            Scenario::Connect,
            Scenario::Memory,
            Scenario::Pipelined,
            Scenario::Http,
        ];
        let chosen: &[Scenario] = match &opts.scenarios[..] {
            [] if in_vm => &VM_SCENARIOS,
            [] => &all,
            chosen => chosen,
        };
        let mut steps = Vec::new();
        for scenario in all {
            if !chosen.contains(&scenario) {
                continue;
            }
            match scenario {
                Scenario::Throughput => {
                    for (streams, reverse) in [(1, false), (1, true), (4, false), (4, true)] {
                        // Four streams on the VM's two emulated CPUs add time, not insight.
                        if !(in_vm && streams > 1) {
                            steps.push(Step::Throughput { streams, reverse });
                        }
                    }
                }
                Scenario::Cpu => {
                    // Four streams: whether the tunnel or the machine limits them (four streams
                    // on the VM's two emulated CPUs add time, not insight).
                    for streams in [1, 4] {
                        if !(in_vm && streams > 1) {
                            steps.push(Step::Cpu { streams });
                        }
                    }
                }
                Scenario::Latency => steps.push(Step::Latency),
                Scenario::Connect => steps.push(Step::Connect),
                Scenario::Memory => steps.push(Step::Memory),
                Scenario::Pipelined => {
                    for response in PIPELINED_RESPONSES {
                        steps.push(Step::Pipelined { response });
                    }
                }
                Scenario::Http => steps.push(Step::Http),
            }
        }
        let pipeline = measure::Pipeline {
            connections: opts.pipelined_connections.unwrap_or(20) as usize,
            depth: opts.pipelined_depth.unwrap_or(16) as usize,
        };
        if opts.quick {
            Plan {
                reps: opts.reps.unwrap_or(3),
                transfer: measure::Transfer::MiB(if in_vm { 48 } else { 384 }),
                cpu_seconds: if in_vm { 2.0 } else { 1.0 },
                latency_seconds: 0.5,
                connect_seconds: 0.4,
                held: 1000,
                pipelined_seconds: 0.5,
                pipeline,
                http_seconds: 1,
                steps,
            }
        } else if in_vm {
            // Under emulation iperf3 over loopback moves about 0.2 Gbit/s (against 30 on
            // the host) and takes 1.5 s to start and stop; the routes' figures spread by
            // ±30-80% between repetitions, so five of them, of 4 s each: the default set in
            // about 10 minutes.
            Plan {
                reps: opts.reps.unwrap_or(5),
                transfer: measure::Transfer::Seconds(4),
                cpu_seconds: 4.0,
                latency_seconds: 2.0,
                connect_seconds: 2.0,
                held: 1000,
                pipelined_seconds: 2.0,
                pipeline,
                http_seconds: 2,
                steps,
            }
        } else {
            Plan {
                reps: opts.reps.unwrap_or(5),
                transfer: measure::Transfer::Seconds(4),
                cpu_seconds: 3.0,
                latency_seconds: 3.0,
                connect_seconds: 3.0,
                held: 1000,
                pipelined_seconds: 3.0,
                pipeline,
                http_seconds: 3,
                steps,
            }
        }
    }

    /// The servers in B the steps measure against, in a fixed order.
    fn services(&self) -> Vec<Service> {
        Service::ALL
            .into_iter()
            .filter(|service| self.steps.iter().any(|s| s.service() == *service))
            .collect()
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for step in &self.steps {
            let part = match step {
                Step::Throughput { .. } => format!("{} per run", self.transfer.describe()),
                Step::Cpu { streams } => format!(
                    "CPU: {streams} iperf3 stream{} A→B; over {} s in its middle (after {} MiB and \
                     0.5 s more: connection set-up left out), the machine's busy CPU time (the \
                     window times the CPUs, less idle and iowait from /proc/stat) and both \
                     tunnel processes' (utime, stime of /proc/PID/stat), divided by the GiB \
                     the iperf3 server read meanwhile (rchar of /proc/PID/io)",
                    if *streams == 1 { "" } else { "s" },
                    self.cpu_seconds,
                    measure::CPU_WARM_UP_BYTES >> 20
                ),
                Step::Latency => format!(
                    "round trips: one connection, one {} B message in flight, echoed back, {} s \
                     per run (the first fifth, at most 200 ms, is a warm-up)",
                    measure::REQUEST_SIZE,
                    self.latency_seconds
                ),
                Step::Connect => format!(
                    "new connections: {} in flight, each sends {} B, reads the echo and closes, \
                     {} s per run",
                    measure::CONNECT_CONCURRENCY,
                    measure::REQUEST_SIZE,
                    self.connect_seconds
                ),
                Step::Memory => format!(
                    "RSS: VmRSS of each side's tunnel process, idle (before any traffic) and with \
                     {} connections open, each proven by an echoed request",
                    self.held
                ),
                Step::Pipelined { .. } => format!(
                    "pipelined requests: {} connections, each keeping {} requests of {} B in \
                     flight (a new one written whenever a response completes), answered with \
                     {} B or 1 KiB, {} s per run (the first fifth, at most 200 ms, is a \
                     warm-up); p99 from a request's write to its whole response; tunnel CPU \
                     per request: both tunnel processes' utime + stime over the whole client \
                     run ÷ every response; whole machine: the same window's busy CPU time (its \
                     length times the CPUs, less idle and iowait from /proc/stat) ÷ every \
                     response, and as a share of all CPUs (under 100%: the route waited, the \
                     CPUs did not bound it)",
                    self.pipeline.connections,
                    self.pipeline.depth,
                    measure::REQUEST_SIZE,
                    report::SMALL_RESPONSE,
                    self.pipelined_seconds
                ),
                Step::Http => format!(
                    "HTTP: nginx in B (one process, `return 200` of {} B, no access log), wrk -t1 \
                     -c{} -d{}s --latency from A over keep-alive connections",
                    routes::HTTP_BODY.len(),
                    measure::HTTP_CONNECTIONS,
                    self.http_seconds
                ),
            };
            if !parts.contains(&part) {
                parts.push(part);
            }
        }
        parts.join("; ")
    }
}

/// The scenarios of a `--vm` run unless told: what the kTLS data path is about.
const VM_SCENARIOS: [Scenario; 2] = [Scenario::Throughput, Scenario::Cpu];
/// The routes of a `--vm` run unless told: the data paths side by side, and direct as the
/// scale of the emulated machine. haproxy and stunnel are the host bench's comparison.
const VM_ROUTES: [RouteKind; 4] = [
    RouteKind::Direct,
    RouteKind::Userspace,
    RouteKind::Sockmap,
    RouteKind::Ktls,
];

pub fn bench(opts: Options) -> Result<ExitCode> {
    if opts.vm {
        return vm::bench_in_vm(&opts);
    }
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the bench makes network namespaces and cgroups and starts agents in them: run it as root"
    );
    run::catch_interrupts()?;
    let started = Instant::now();
    let (bins, out) = match &opts.in_vm {
        // Built and copied by the host; the guest's view of the host's disk is read-only.
        Some(bins) => (
            bins.clone(),
            opts.out.clone().context("--in-vm needs --out")?,
        ),
        None => {
            let bins = match &opts.prebuilt {
                Some(dir) => dir.clone(),
                None => build_all()?,
            };
            let out = match &opts.out {
                Some(out) => out.clone(),
                None => run::Workspace::locate()?.target_dir.join("bench"),
            };
            (bins, out)
        }
    };
    raise_nofile_limit()?;
    for what in clink_testbed::remove_stale()? {
        println!("    removed {what}, left by an earlier run that was killed");
    }

    let help = run::output(Command::new(bins.join("clink-agent")).arg("--help"))?;
    let datapaths = offered_datapaths(&help);
    let asked = match &opts.paths[..] {
        [] if opts.in_vm.is_some() => &VM_ROUTES[..],
        asked => asked,
    };
    let kinds = choose_routes(asked, datapaths.as_deref(), clink_testbed::ktls_available())?;
    let kinds = with_compare(kinds, asked, opts.compare_agent.is_some())?;
    let plan = Plan::new(&opts);
    println!(
        "    routes: {}",
        kinds
            .iter()
            .map(|k| k.label())
            .collect::<Vec<_>>()
            .join(", ")
    );

    step("creating clusters A and B: two network namespaces joined by a veth pair");
    let topo = two_clusters()?;
    for cluster in topo.clusters() {
        // Thousands of short connections a second leave TIME_WAIT sockets behind, which
        // clients may reuse only after a second: without more ports than the default
        // 28,232, direct connections would run out of them at about 14,000 a second.
        let (low, high) = routes::EPHEMERAL_PORTS;
        let mut sysctl = cluster.netns().command("sysctl");
        sysctl
            .args(["-q", "-w", "net.ipv4.tcp_tw_reuse=1"])
            .arg(format!("net.ipv4.ip_local_port_range={low} {high}"));
        run::output(&mut sysctl)?;
    }
    let dir = tempfile::Builder::new()
        .prefix("clink-bench-")
        .tempdir()
        .context("create the bench's working directory")?;
    println!(
        "    working directory (certificates, configuration, logs): {}",
        dir.path().display()
    );
    // A copy: a build running meanwhile may replace the one in target/.
    let helper = dir.path().join("xtask");
    fs::copy(bins.join("xtask"), &helper).context("copy the xtask binary")?;
    make_certificates(
        &bins.join("clink"),
        dir.path(),
        routes::FABRIC,
        &["peer-a", "peer-b"],
    )?;

    let mut bench = Bench {
        routes: Vec::new(),
        results: Results::new(kinds.clone()),
        topo,
        dir,
    };
    let env = Env {
        topo: &bench.topo,
        dir: bench.dir.path(),
        bins: &bins,
        compare_bins: opts.compare_agent.as_deref(),
        helper: &helper,
        agent_has_datapath_flag: datapaths.is_some(),
        agent_has_pin_dir_flag: help.contains("--bpf-pin-dir"),
        services: &plan.services(),
    };
    let mut routes = Vec::new();
    let mut setup_error = None;
    for kind in kinds {
        step(&format!("setting up {}", kind.label()));
        match Route::start(kind, &env) {
            Ok(route) => routes.push(route),
            Err(e) if run::interrupted() => {
                setup_error = Some(e.error);
                break;
            }
            Err(e) => {
                let error = format!("{:#}", e.error);
                println!("    warning: {} left out: {error}{}", kind.label(), e.logs);
                bench.results.fail_setup(kind, error);
            }
        }
    }
    bench.routes = routes;
    let result = match setup_error {
        Some(e) => Err(e),
        None => bench.measure(&plan, &helper),
    };
    let report = result.and_then(|()| {
        let meta = Meta::collect(started, &opts.host);
        bench.write_report(&plan, &meta, &out)
    });
    if report.is_err() && !run::interrupted() {
        bench.print_logs();
    }
    step("cleaning up: agents, proxies, servers, cgroups, namespaces, working directory");
    drop(bench);
    let markdown = report?;
    println!("\n{markdown}");
    println!(
        "report: {}\nchart:  {}\n(took {})",
        out.join("report.md").display(),
        out.join("throughput.svg").display(),
        minutes(started.elapsed())
    );
    Ok(if markdown.contains("\nFailures:\n") {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Installs what the bench needs and builds the release binaries; returns their directory
/// (`clink-agent`, `clink` and `xtask`).
fn build_all() -> Result<PathBuf> {
    crate::setup::setup()?;
    let bins = build_release()?;
    // The bench's own clients and echo server share the machine with what they measure:
    // optimised, they take less of it.
    step("cargo build --release -p xtask");
    run::check(run::cargo().args(["build", "--release", "-p", "xtask"]))?;
    Ok(bins)
}

/// Children inherit it: the agents and proxies hold two sockets per open connection.
fn raise_nofile_limit() -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")
}

/// The `--datapath` values `clink-agent --help` mentions, or None when it has no such flag.
fn offered_datapaths(help: &str) -> Option<Vec<String>> {
    let mut lines = help.lines().skip_while(|l| !l.contains("--datapath"));
    let flag = lines.next()?;
    // The flag's description ends where the next option begins.
    let next_option = |line: &str| {
        let line = line.trim_start();
        line.starts_with("--") || (line.starts_with('-') && line.get(2..3) == Some(","))
    };
    let description: Vec<&str> = lines.take_while(|l| !next_option(l)).collect();
    let section = format!("{flag}\n{}", description.join("\n"));
    Some(
        ["userspace", "sockmap", "ktls"]
            .into_iter()
            .filter(|name| section.contains(name))
            .map(str::to_owned)
            .collect(),
    )
}

/// The routes to measure: those asked for (all by default) that this build offers and, for
/// the kTLS data path, that this kernel can run (`ktls`: [`clink_testbed::ktls_available`]).
fn choose_routes(
    asked: &[RouteKind],
    datapaths: Option<&[String]>,
    ktls: Result<(), String>,
) -> Result<Vec<RouteKind>> {
    let offered = |kind: RouteKind| match (kind, datapaths) {
        (RouteKind::Userspace, _) => true,
        (kind, Some(paths)) => kind
            .datapath()
            .is_none_or(|dp| paths.iter().any(|p| p == dp)),
        (kind, None) => kind.datapath().is_none(),
    };
    let mut kinds = Vec::new();
    for kind in RouteKind::ALL {
        if !asked.is_empty() && !asked.contains(&kind) {
            continue;
        }
        // Added by the caller, with --compare-agent only.
        if kind == RouteKind::Compare {
            continue;
        }
        if !offered(kind) {
            if asked.contains(&kind) {
                bail!(
                    "clink-agent --help offers no `--datapath {}`",
                    kind.datapath().unwrap_or("?")
                );
            }
            println!(
                "    {}: not offered by this clink-agent (--help), left out",
                kind.label()
            );
        } else if let (RouteKind::Ktls, Err(why)) = (kind, &ktls) {
            if asked.contains(&kind) {
                bail!(
                    "{}: {why}; `cargo xtask bench --vm` runs it in a VM",
                    kind.label()
                );
            }
            println!(
                "    {}: {why}; left out (`cargo xtask bench --vm` measures it in a VM)",
                kind.label()
            );
        } else {
            kinds.push(kind);
        }
    }
    Ok(kinds)
}

/// Adds the compare route (`--compare-agent`) after userspace, when all routes or it was
/// asked for.
fn with_compare(
    mut kinds: Vec<RouteKind>,
    asked: &[RouteKind],
    compare_agent: bool,
) -> Result<Vec<RouteKind>> {
    let wanted = asked.is_empty() || asked.contains(&RouteKind::Compare);
    ensure!(
        compare_agent || !asked.contains(&RouteKind::Compare),
        "--path compare needs --compare-agent DIR"
    );
    if compare_agent && wanted {
        let after_userspace = kinds
            .iter()
            .position(|k| *k == RouteKind::Userspace)
            .map_or(0, |i| i + 1);
        kinds.insert(after_userspace, RouteKind::Compare);
    }
    Ok(kinds)
}

/// Field order is drop order: routes (their processes, then their cgroups) before the
/// namespaces, the working directory last.
struct Bench {
    routes: Vec<Route>,
    results: Results,
    topo: Topology,
    dir: TempDir,
}

impl Bench {
    fn measure(&mut self, plan: &Plan, helper: &Path) -> Result<()> {
        if plan.steps.contains(&Step::Memory) {
            for route in &self.routes {
                if let Some(processes) = route.processes() {
                    for (side, process) in [Side::A, Side::B].into_iter().zip(processes) {
                        let rss = measure::rss_mib(process.pid)?;
                        self.results.add(Metric::RssIdle(side), route.kind, rss);
                    }
                }
            }
        }
        let count = |rep_steps: &[Step]| -> usize {
            rep_steps
                .iter()
                .map(|s| self.routes.iter().filter(|r| s.applies_to(r.kind)).count())
                .sum()
        };
        let mut progress = Progress::new(count(&plan.steps) * plan.reps as usize);
        for rep in 0..plan.reps as usize {
            for &step in &plan.steps {
                let n = self.routes.len();
                // Each repetition starts with another route, so none is always first.
                for k in 0..n {
                    let index = (k + rep) % n;
                    let kind = self.routes[index].kind;
                    if !step.applies_to(kind) {
                        continue;
                    }
                    progress.begin(&format!(
                        "rep {}/{} · {} · {}",
                        rep + 1,
                        plan.reps,
                        step.label(),
                        kind.label()
                    ));
                    let route = &mut self.routes[index];
                    let outcome = route
                        .check_alive()
                        .and_then(|()| take(step, route, plan, helper, &self.topo));
                    match outcome {
                        Ok(figures) => {
                            let shown: Vec<_> = figures
                                .iter()
                                .map(|(m, v)| format!("{} {}", m.format(*v), m.unit()))
                                .collect();
                            progress.end(&shown.join(", "));
                            for (metric, value) in figures {
                                self.results.add(metric, kind, value);
                            }
                        }
                        Err(e) if run::interrupted() => {
                            progress.end("interrupted");
                            return Err(e);
                        }
                        Err(e) => {
                            progress.end(&format!("failed: {e:#}"));
                            // The command line is on the progress line; the report keeps
                            // what went wrong.
                            for metric in step.metrics() {
                                self.results.fail(metric, kind, e.root_cause().to_string());
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn write_report(&self, plan: &Plan, meta: &Meta, out: &Path) -> Result<String> {
        fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
        let method = plan.describe();
        let markdown = format!(
            "{}\n{}",
            meta.markdown(plan.reps, &method),
            self.results.markdown()
        );
        fs::write(out.join("report.md"), &markdown)?;
        let mut json = self.results.to_json();
        json["meta"] = meta.json(plan.reps, &method);
        fs::write(
            out.join("results.json"),
            serde_json::to_string_pretty(&json)?,
        )?;
        let cases: Vec<Metric> = plan
            .steps
            .iter()
            .filter_map(|s| match *s {
                Step::Throughput { streams, reverse } => {
                    Some(Metric::Throughput { streams, reverse })
                }
                _ => None,
            })
            .collect();
        let chart = out.join("throughput.svg");
        if cases.is_empty() {
            let _ = fs::remove_file(&chart);
        } else {
            let method = format!(
                "median of {} interleaved runs of {} each; direct (no tunnel) under each case",
                plan.reps,
                plan.transfer.describe(),
            );
            let run = format!(
                "{} · {} · commit {} · cargo xtask bench",
                meta.machine_short, meta.date, meta.commit
            );
            fs::write(
                &chart,
                chart::throughput_svg(&self.results, &cases, [&method, &run])?,
            )?;
        }
        Ok(markdown)
    }

    fn print_logs(&self) {
        for route in &self.routes {
            for process in route.processes().into_iter().flatten() {
                eprintln!(
                    "--- last lines of {} ({}) ---",
                    process.log.display(),
                    route.kind.label()
                );
                for line in
                    clink_testbed::last_lines(&clink_testbed::read_from(&process.log, 0), 10)
                {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// One measurement of one route.
fn take(
    step: Step,
    route: &Route,
    plan: &Plan,
    helper: &Path,
    topo: &Topology,
) -> Result<Vec<(Metric, f64)>> {
    let place = route.client();
    Ok(match step {
        Step::Throughput { streams, reverse } => {
            let to = route.entry(Service::Iperf);
            let gbps = measure::throughput(place, to, streams, reverse, plan.transfer)?;
            vec![(Metric::Throughput { streams, reverse }, gbps)]
        }
        Step::Cpu { streams } => {
            let to = route.entry(Service::Iperf);
            let probe = measure::CpuProbe {
                server: route
                    .server_pid(Service::Iperf)
                    .context("the route has no iperf3 server")?,
                tunnel: route.processes().map(|p| [p[0].pid, p[1].pid]),
            };
            let cost = measure::cpu_cost(place, to, streams, plan.cpu_seconds, &probe)?;
            let mut figures = vec![(Metric::CpuMachine { streams }, cost.machine)];
            if let (Some(tunnel), Some(user)) = (cost.tunnel, cost.tunnel_user) {
                figures.push((Metric::CpuTunnel { streams }, tunnel));
                figures.push((Metric::CpuTunnelUser { streams }, user));
                if tunnel > 0.0 {
                    figures.push((Metric::TunnelUserShare { streams }, 100.0 * user / tunnel));
                }
            }
            figures
        }
        Step::Latency => {
            let to = route.entry(Service::Echo);
            let latency = measure::latency(place, helper, to, plan.latency_seconds)?;
            vec![
                (Metric::LatencyP50, latency.p50),
                (Metric::LatencyP99, latency.p99),
            ]
        }
        Step::Connect => {
            let to = route.entry(Service::Echo);
            let rate = measure::connect_rate(place, helper, to, plan.connect_seconds)?;
            vec![(Metric::ConnectRate, rate)]
        }
        Step::Pipelined { response } => {
            let to = route.entry(Service::Reply);
            let tunnel = route.processes().map(|p| [p[0].pid, p[1].pid]);
            let figures = measure::pipelined(
                place,
                helper,
                to,
                plan.pipelined_seconds,
                plan.pipeline,
                response as usize,
                tunnel,
            )?;
            let mut out = vec![
                (Metric::PipelinedRate { response }, figures.rate),
                (Metric::PipelinedP99 { response }, figures.p99),
            ];
            if let Some(cpu) = figures.cpu_per_request {
                out.push((Metric::PipelinedCpu { response }, cpu));
            }
            out.push((
                Metric::PipelinedMachineCpu { response },
                figures.machine_cpu_per_request,
            ));
            out.push((
                Metric::PipelinedMachineBusy { response },
                figures.machine_busy,
            ));
            out
        }
        Step::Http => {
            let to = route.entry(Service::Http);
            let http = measure::http(place, to, plan.http_seconds)?;
            vec![
                (Metric::HttpRate, http.rate),
                (Metric::HttpP50, http.p50),
                (Metric::HttpP99, http.p99),
            ]
        }
        Step::Memory => {
            let processes = route
                .processes()
                .context("the route has no tunnel processes")?;
            let pids = [processes[0].pid, processes[1].pid];
            let to = route.entry(Service::Echo);
            let rss = measure::rss_with_open_connections(place, helper, to, plan.held, pids)?;
            // The next measurement starts once the tunnels have closed those connections.
            let netns = topo.a().netns();
            run::wait_until(
                "the held connections to close",
                Duration::from_secs(20),
                || measure::established(netns).is_ok_and(|n| n < 50),
            )?;
            vec![
                (Metric::RssOpen(Side::A), rss[0]),
                (Metric::RssOpen(Side::B), rss[1]),
            ]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: Options,
    }

    fn opts(args: &[&str]) -> Options {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .unwrap()
            .opts
    }

    #[test]
    fn plan_runs_every_scenario_unless_told() {
        let plan = Plan::new(&opts(&[]));
        assert_eq!(plan.reps, 5);
        assert_eq!(plan.steps.len(), 12);
        assert_eq!(plan.services(), Service::ALL);
        assert_eq!(
            plan.pipeline,
            measure::Pipeline {
                connections: 20,
                depth: 16
            }
        );
        let quick = Plan::new(&opts(&[
            "--quick",
            "--scenario",
            "latency",
            "--scenario",
            "memory",
        ]));
        assert_eq!(quick.reps, 3);
        assert_eq!(quick.steps, [Step::Latency, Step::Memory]);
        // Only the servers the steps use are started: no nginx here.
        assert_eq!(quick.services(), [Service::Echo]);
        assert!(Cli::try_parse_from(["bench", "--reps", "0"]).is_err());
    }

    #[test]
    fn the_vm_plan_is_throughput_and_cpu_single_stream() {
        let single = |reverse| Step::Throughput {
            streams: 1,
            reverse,
        };
        for vm in [&["--vm"][..], &["--in-vm", "/tmp/bins"]] {
            let plan = Plan::new(&opts(vm));
            assert_eq!(plan.reps, 5);
            assert_eq!(
                plan.steps,
                [single(false), single(true), Step::Cpu { streams: 1 }]
            );
        }
        let told = Plan::new(&opts(&["--vm", "--scenario", "latency", "--reps", "2"]));
        assert_eq!((told.reps, told.steps), (2, vec![Step::Latency]));
    }

    #[test]
    fn datapaths_come_from_the_agents_help() {
        let old = "Options:\n      --name <NAME>  This peer's name\n  -h, --help  Print help\n";
        assert_eq!(offered_datapaths(old), None);
        let new = "Options:\n      --datapath <DATAPATH>  Data path [default: auto]\n          \
                   [possible values: userspace, sockmap, auto]\n      --cgroup <DIR>  cgroup v2 \
                   (ktls later)\n";
        assert_eq!(
            offered_datapaths(new),
            Some(vec!["userspace".to_owned(), "sockmap".to_owned()])
        );
        let long = "      --datapath <DATAPATH>\n          Data path\n\n          \
                    Possible values:\n          - auto:      Sockmap when possible\n          \
                    - userspace\n          - sockmap\n\n      --cgroup <PATH>\n          \
                    ktls one day\n  -h, --help\n";
        assert_eq!(
            offered_datapaths(long),
            Some(vec!["userspace".to_owned(), "sockmap".to_owned()])
        );
    }

    #[test]
    fn the_compare_route_follows_userspace_and_needs_its_agent() {
        use RouteKind::*;
        let kinds = vec![Direct, Userspace, Haproxy];
        assert_eq!(
            with_compare(kinds.clone(), &[], true).unwrap(),
            [Direct, Userspace, Compare, Haproxy]
        );
        assert_eq!(with_compare(kinds.clone(), &[], false).unwrap(), kinds);
        assert_eq!(
            with_compare(kinds.clone(), &[Direct, Userspace, Haproxy], true).unwrap(),
            kinds,
            "not asked for"
        );
        assert!(with_compare(kinds, &[Compare], false).is_err());
        assert!(opts(&["--prebuilt", "/b", "--compare-agent", "/c"])
            .prebuilt
            .is_some());
        assert!(Cli::try_parse_from(["bench", "--prebuilt", "/b", "--vm"]).is_err());
        // Another kernel only means something for a run in the VM.
        assert!(Cli::try_parse_from(["bench", "--vm-kernel", "/boot/vmlinuz-x"]).is_err());
        assert_eq!(
            opts(&["--vm", "--vm-kernel", "/k/vmlinuz-6.12"]).vm_kernel,
            Some(PathBuf::from("/k/vmlinuz-6.12"))
        );
    }

    #[test]
    fn routes_follow_what_the_agent_offers() {
        let no_ktls = || Err("no kernel TLS".to_owned());
        let all = choose_routes(&[], None, no_ktls()).unwrap();
        assert_eq!(
            all,
            [
                RouteKind::Direct,
                RouteKind::Userspace,
                RouteKind::Haproxy,
                RouteKind::Stunnel
            ]
        );
        let offered = ["userspace".to_owned(), "sockmap".to_owned()];
        let with_sockmap = choose_routes(&[], Some(&offered), no_ktls()).unwrap();
        assert!(with_sockmap.contains(&RouteKind::Sockmap));
        assert!(choose_routes(&[RouteKind::Sockmap], None, no_ktls()).is_err());
        assert_eq!(
            choose_routes(&[RouteKind::Haproxy, RouteKind::Direct], None, no_ktls()).unwrap(),
            [RouteKind::Direct, RouteKind::Haproxy]
        );
    }

    #[test]
    fn ktls_needs_the_agent_and_the_kernel() {
        let offered = [
            "userspace".to_owned(),
            "sockmap".to_owned(),
            "ktls".to_owned(),
        ];
        let host = choose_routes(&[], Some(&offered), Err("no kernel TLS".to_owned())).unwrap();
        assert!(!host.contains(&RouteKind::Ktls), "{host:?}");
        let err = choose_routes(
            &[RouteKind::Ktls],
            Some(&offered),
            Err("no CONFIG_TLS".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("no CONFIG_TLS") && err.contains("--vm"),
            "{err}"
        );
        assert_eq!(
            choose_routes(&VM_ROUTES, Some(&offered), Ok(())).unwrap(),
            VM_ROUTES
        );
        let old_agent = ["userspace".to_owned(), "sockmap".to_owned()];
        assert!(choose_routes(&[RouteKind::Ktls], Some(&old_agent), Ok(())).is_err());
    }

    #[test]
    fn pipelined_runs_both_response_sizes_against_the_reply_server() {
        let plan = Plan::new(&opts(&[
            "--quick",
            "--scenario",
            "http",
            "--scenario",
            "pipelined",
            "--pipelined-connections",
            "4",
            "--pipelined-depth",
            "2",
        ]));
        assert_eq!(
            plan.steps,
            [
                Step::Pipelined { response: 64 },
                Step::Pipelined { response: 1024 },
                Step::Http
            ]
        );
        assert_eq!(plan.services(), [Service::Reply, Service::Http]);
        assert_eq!(
            plan.pipeline,
            measure::Pipeline {
                connections: 4,
                depth: 2
            }
        );
        assert_eq!((plan.pipelined_seconds, plan.http_seconds), (0.5, 1));
        let method = plan.describe();
        assert!(
            method.contains("4 connections, each keeping 2 requests of 64 B"),
            "{method}"
        );
        assert!(method.contains("wrk -t1 -c20 -d1s --latency"), "{method}");
        assert!(Cli::try_parse_from(["bench", "--pipelined-depth", "0"]).is_err());
    }
}
