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

mod chart;
mod measure;
mod meta;
mod place;
mod progress;
mod report;
mod routes;
mod tool;

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
    /// Fewer repetitions and shorter runs: done in under two minutes.
    #[arg(long)]
    quick: bool,
    /// Run only this scenario (repeatable).
    #[arg(long = "scenario", value_enum, value_name = "NAME")]
    scenarios: Vec<Scenario>,
    /// Measure only this route (repeatable); ratios need direct and haproxy.
    #[arg(long = "path", value_enum, value_name = "NAME")]
    paths: Vec<RouteKind>,
    /// Repetitions of each measurement [default: 5, with --quick 3].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    reps: Option<u32>,
    /// Where report.md, throughput.svg and results.json go [default: target/bench].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// iperf3, 1 and 4 streams, both directions.
    Throughput,
    /// Round trips of 64-byte messages, one in flight: p50 and p99.
    Latency,
    /// New connections per second, each carrying a 64-byte request.
    Connect,
    /// Resident memory of each tunnel process, idle and with 1,000 open connections.
    Memory,
}

/// How much of everything one run does.
#[derive(Debug)]
struct Plan {
    reps: u32,
    transfer: measure::Transfer,
    latency_seconds: f64,
    connect_seconds: f64,
    held: usize,
    steps: Vec<Step>,
}

/// One measurement, taken for every route in turn.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    Throughput { streams: u32, reverse: bool },
    Latency,
    Connect,
    Memory,
}

impl Step {
    fn label(self) -> String {
        match self {
            Step::Throughput { streams, reverse } => {
                Metric::Throughput { streams, reverse }.label()
            }
            Step::Latency => "latency".to_owned(),
            Step::Connect => "connection setup".to_owned(),
            Step::Memory => "RSS with 1,000 connections".to_owned(),
        }
    }

    /// The report rows this step fills.
    fn metrics(self) -> Vec<Metric> {
        match self {
            Step::Throughput { streams, reverse } => vec![Metric::Throughput { streams, reverse }],
            Step::Latency => vec![Metric::LatencyP50, Metric::LatencyP99],
            Step::Connect => vec![Metric::ConnectRate],
            Step::Memory => vec![Metric::RssOpen(Side::A), Metric::RssOpen(Side::B)],
        }
    }

    /// Memory is a figure of tunnel processes, which the direct route does not have.
    fn applies_to(self, route: RouteKind) -> bool {
        !(self == Step::Memory && route == RouteKind::Direct)
    }
}

impl Plan {
    fn new(opts: &Options) -> Self {
        let all = [
            Scenario::Throughput,
            Scenario::Latency,
            Scenario::Connect,
            Scenario::Memory,
        ];
        let mut steps = Vec::new();
        for scenario in all {
            if !opts.scenarios.is_empty() && !opts.scenarios.contains(&scenario) {
                continue;
            }
            match scenario {
                Scenario::Throughput => {
                    for (streams, reverse) in [(1, false), (1, true), (4, false), (4, true)] {
                        steps.push(Step::Throughput { streams, reverse });
                    }
                }
                Scenario::Latency => steps.push(Step::Latency),
                Scenario::Connect => steps.push(Step::Connect),
                Scenario::Memory => steps.push(Step::Memory),
            }
        }
        if opts.quick {
            Plan {
                reps: opts.reps.unwrap_or(3),
                transfer: measure::Transfer::MiB(384),
                latency_seconds: 0.5,
                connect_seconds: 0.4,
                held: 1000,
                steps,
            }
        } else {
            Plan {
                reps: opts.reps.unwrap_or(5),
                transfer: measure::Transfer::Seconds(4),
                latency_seconds: 3.0,
                connect_seconds: 3.0,
                held: 1000,
                steps,
            }
        }
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for step in &self.steps {
            let part = match step {
                Step::Throughput { .. } => format!("{} per run", self.transfer.describe()),
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
            };
            if !parts.contains(&part) {
                parts.push(part);
            }
        }
        parts.join("; ")
    }
}

pub fn bench(opts: Options) -> Result<ExitCode> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the bench makes network namespaces and cgroups and starts agents in them: run it as root"
    );
    run::catch_interrupts()?;
    let started = Instant::now();
    crate::setup::setup()?;
    let bins = build_release()?;
    // The bench's own clients and echo server share the machine with what they measure:
    // optimised, they take less of it.
    step("cargo build --release -p xtask");
    run::check(run::cargo().args(["build", "--release", "-p", "xtask"]))?;
    let out = match &opts.out {
        Some(out) => out.clone(),
        None => run::Workspace::locate()?.target_dir.join("bench"),
    };
    raise_nofile_limit()?;
    for what in clink_testbed::remove_stale()? {
        println!("    removed {what}, left by an earlier run that was killed");
    }

    let help = run::output(Command::new(bins.join("clink-agent")).arg("--help"))?;
    let datapaths = offered_datapaths(&help);
    let kinds = choose_routes(&opts.paths, datapaths.as_deref())?;
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
        helper: &helper,
        agent_has_datapath_flag: datapaths.is_some(),
        agent_has_pin_dir_flag: help.contains("--bpf-pin-dir"),
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
        let meta = Meta::collect(started);
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

/// The routes to measure: those asked for (all by default) that this build offers.
fn choose_routes(asked: &[RouteKind], datapaths: Option<&[String]>) -> Result<Vec<RouteKind>> {
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
        if offered(kind) {
            kinds.push(kind);
        } else if asked.contains(&kind) {
            bail!(
                "clink-agent --help offers no `--datapath {}`",
                kind.datapath().unwrap_or("?")
            );
        } else {
            println!(
                "    {}: not offered by this clink-agent (--help), left out",
                kind.label()
            );
        }
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
        assert_eq!(plan.steps.len(), 7);
        let quick = Plan::new(&opts(&[
            "--quick",
            "--scenario",
            "latency",
            "--scenario",
            "memory",
        ]));
        assert_eq!(quick.reps, 3);
        assert_eq!(quick.steps, [Step::Latency, Step::Memory]);
        assert!(Cli::try_parse_from(["bench", "--reps", "0"]).is_err());
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
    fn routes_follow_what_the_agent_offers() {
        let all = choose_routes(&[], None).unwrap();
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
        let with_sockmap = choose_routes(&[], Some(&offered)).unwrap();
        assert!(with_sockmap.contains(&RouteKind::Sockmap));
        assert!(choose_routes(&[RouteKind::Sockmap], None).is_err());
        assert_eq!(
            choose_routes(&[RouteKind::Haproxy, RouteKind::Direct], None).unwrap(),
            [RouteKind::Direct, RouteKind::Haproxy]
        );
    }
}
