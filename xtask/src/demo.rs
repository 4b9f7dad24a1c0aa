//! `cargo xtask demo`: iperf3 from cluster A to cluster B through two agents and an mTLS
//! tunnel, then directly for comparison, then the same connection denied once the policy
//! that allowed it is gone.
//!
//! Everything it starts or makes (namespaces, processes, the working directory with
//! certificates, state and logs) lives in guards, so it is removed on success, on error and
//! on Ctrl-C.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clink_testbed::{
    last_lines, read_from, strip_ansi, two_clusters, AgentFiles, ChildGuard, Cluster, Topology,
};
use tempfile::TempDir;

use crate::clink::{build_release, iperf_report, listening, make_certificates, stderr, Agent};
use crate::run::{self, check_interrupt, interruptible, show, step, wait_until};

const FABRIC: &str = "demo-fabric";
const GATEWAY_PORT: &str = "443";
/// The port of the export (in B, on loopback) and of the import (in A).
const SERVICE_PORT: &str = "5201";
/// A second iperf3 server in B, on B's link address, for the direct run.
const DIRECT_PORT: &str = "5202";
const IPERF_SECONDS: &str = "5";

pub fn demo() -> Result<ExitCode> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the demo makes network namespaces and starts agents in them: run it as root"
    );
    run::catch_interrupts()?;
    crate::setup::setup()?;
    let bins = build_release()?;
    for what in clink_testbed::remove_stale()? {
        println!("    removed {what}, left by an earlier run that was killed");
    }

    step("creating clusters A and B: two network namespaces joined by a veth pair");
    let topo = two_clusters()?;
    for (label, cluster) in [("A", topo.a()), ("B", topo.b())] {
        println!(
            "    cluster {label}: namespace {}, {} on {}",
            cluster.netns().name(),
            cluster.ip(),
            cluster.ifname()
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("clink-demo-")
        .tempdir()
        .context("create the demo's working directory")?;
    println!(
        "    working directory (certificates, state, logs): {}",
        dir.path().display()
    );

    let mut demo = Demo {
        servers: Vec::new(),
        agents: Vec::new(),
        topo,
        dir,
        bins,
    };
    let result = demo.run();
    if result.is_err() && !run::interrupted() {
        demo.print_logs();
    }
    step("cleaning up: agents, iperf3 servers, namespaces, working directory");
    drop(demo);
    result.map(|()| ExitCode::SUCCESS)
}

/// Field order is drop order: processes stop before their namespaces go, and the working
/// directory goes last.
struct Demo {
    servers: Vec<ChildGuard>,
    agents: Vec<Agent>,
    topo: Topology,
    dir: TempDir,
    bins: PathBuf,
}

/// Which agent a step talks to.
#[derive(Clone, Copy)]
enum Side {
    A = 0,
    B = 1,
}

impl Demo {
    fn run(&mut self) -> Result<()> {
        self.make_certificates()?;
        self.start_agent(Side::A, "peer-a")?;
        self.start_agent(Side::B, "peer-b")?;
        self.start_iperf_servers()?;

        let (a_ip, b_ip) = (
            self.topo.a().ip().to_string(),
            self.topo.b().ip().to_string(),
        );
        step("configuring B: A is a peer; iperf3 (127.0.0.1:5201 in B) is exported; allow all");
        self.clink(
            Side::B,
            &format!("create peer peer-a --host {a_ip} --port {GATEWAY_PORT}"),
        )?;
        self.clink(
            Side::B,
            &format!("create export iperf3 --host 127.0.0.1 --port {SERVICE_PORT}"),
        )?;
        self.clink(Side::B, "create policy allow-all --action allow")?;
        step("configuring A: B is a peer; B's iperf3 is imported on port 5201; allow all");
        self.clink(
            Side::A,
            &format!("create peer peer-b --host {b_ip} --port {GATEWAY_PORT}"),
        )?;
        self.clink(
            Side::A,
            &format!(
                "create import iperf3 --port {SERVICE_PORT} --peer peer-b \
                 --export-name iperf3 --export-namespace default"
            ),
        )?;
        self.clink(Side::A, "create policy allow-all --action allow")?;
        self.wait_for_tunnel()?;

        step(&format!(
            "iperf3 in A -> 127.0.0.1:{SERVICE_PORT} (the import) -> mTLS tunnel -> B"
        ));
        let tunnel = self.iperf_client("127.0.0.1", SERVICE_PORT)?;
        println!("    through the tunnel: {:.2} Gbit/s", tunnel / 1e9);
        step(&format!(
            "iperf3 in A -> {b_ip}:{DIRECT_PORT} directly over the veth link"
        ));
        let direct = self.iperf_client(&b_ip, DIRECT_PORT)?;
        println!("    direct:             {:.2} Gbit/s", direct / 1e9);
        println!("    tunnel / direct:    {:.1} %", 100.0 * tunnel / direct);

        self.show_denial()
    }

    fn cluster(&self, side: Side) -> &Cluster {
        &self.topo.clusters()[side as usize]
    }

    fn agent(&self, side: Side) -> &Agent {
        &self.agents[side as usize]
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn make_certificates(&self) -> Result<()> {
        make_certificates(
            &self.bins.join("clink"),
            self.dir.path(),
            FABRIC,
            &["peer-a", "peer-b"],
        )
    }

    fn start_agent(&mut self, side: Side, peer: &str) -> Result<()> {
        let label = ["A", "B"][side as usize];
        let files = AgentFiles::new(peer, &self.path(peer), &self.path("agents").join(peer))?;
        let mut cmd = self
            .cluster(side)
            .netns()
            .command(self.bins.join("clink-agent"));
        files.configure(&mut cmd)?;
        cmd.args(["--listen", &format!("0.0.0.0:{GATEWAY_PORT}")]);
        step(&format!(
            "starting {peer} in cluster {label}: {}",
            show(&cmd)
        ));
        println!("    log: {}", files.log().display());
        let agent = Agent::start(label, &mut cmd, &files, &self.bins.join("clink"))?;
        for line in agent.clink(&["status"])?.lines() {
            println!("    {line}");
        }
        self.agents.push(agent);
        Ok(())
    }

    fn start_iperf_servers(&mut self) -> Result<()> {
        let b_ip = self.topo.b().ip().to_string();
        for (addr, port) in [("127.0.0.1", SERVICE_PORT), (b_ip.as_str(), DIRECT_PORT)] {
            let log = self.path(&format!("iperf3-server-{port}.log"));
            let log_file = File::create(&log)?;
            let mut cmd = self.topo.b().netns().command("iperf3");
            cmd.args(["-s", "-B", addr, "-p", port])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                .process_group(0);
            step(&format!(
                "starting iperf3 server in cluster B on {addr}:{port}"
            ));
            self.servers.push(ChildGuard::spawn(&mut cmd)?);
        }
        for port in [SERVICE_PORT, DIRECT_PORT] {
            let netns = self.topo.b().netns();
            wait_until(
                &format!("iperf3 to listen on port {port} in B"),
                Duration::from_secs(10),
                || listening(netns, port),
            )?;
        }
        Ok(())
    }

    /// The import listens in A and B's heartbeats say it is reachable.
    fn wait_for_tunnel(&mut self) -> Result<()> {
        let netns = self.topo.a().netns();
        wait_until(
            &format!("A's agent to listen on import port {SERVICE_PORT}"),
            Duration::from_secs(15),
            || listening(netns, SERVICE_PORT),
        )?;
        step("waiting for A's heartbeats to report peer-b reachable");
        let reachable = self
            .agent(Side::A)
            .wait_reachable("peer-b", Duration::from_secs(10));
        match reachable {
            Ok(()) => println!("    peer-b: PeerReachable=True"),
            Err(e) if run::interrupted() => return Err(e),
            Err(e) => println!("    warning: {e:#}; trying anyway"),
        }
        Ok(())
    }

    /// Runs an iperf3 client in A and returns the receiver's bits per second.
    fn iperf_client(&self, host: &str, port: &str) -> Result<f64> {
        let mut cmd = self.topo.a().netns().command("iperf3");
        cmd.args(["-c", host, "-p", port, "-t", IPERF_SECONDS, "--json"]);
        let out = interruptible(&mut cmd, Duration::from_secs(60))?;
        match iperf_report(&out.stdout) {
            Ok(bps) if out.status.success() => Ok(bps),
            Ok(_) => bail!("{} failed: {}", show(&cmd), stderr(&out)),
            Err(e) => Err(e.context(show(&cmd))),
        }
    }

    fn show_denial(&mut self) -> Result<()> {
        step("deleting A's policy: from now on A's egress is denied by default");
        self.clink(Side::A, "delete accesspolicy allow-all")?;
        let log = self.agent(Side::A).log().to_owned();
        let seen = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);

        step(&format!("iperf3 in A -> 127.0.0.1:{SERVICE_PORT} again"));
        let mut cmd = self.topo.a().netns().command("iperf3");
        cmd.args(["-c", "127.0.0.1", "-p", SERVICE_PORT, "-t", "2", "--json"])
            .args(["--connect-timeout", "5000"]);
        let out = interruptible(&mut cmd, Duration::from_secs(30))?;
        // iperf3 3.12 exits 0 even when it fails in --json mode: its report tells.
        let reason = match iperf_report(&out.stdout) {
            Ok(_) if out.status.success() => {
                bail!("the connection still went through after the policy was deleted")
            }
            Ok(_) => stderr(&out),
            Err(e) => format!("{e:#}"),
        };
        println!("    iperf3 failed as expected: {reason}");

        step("A's agent log explains the decision:");
        let mut lines = Vec::new();
        // The log line may trail the client's failure by a moment.
        let _ = wait_until("a decision in A's log", Duration::from_secs(5), || {
            lines = decision_lines(&read_from(&log, seen));
            !lines.is_empty()
        });
        check_interrupt()?;
        if lines.is_empty() {
            println!("    (no line mentions \"denied\" or \"deny\"; the log's last lines follow)");
            lines = last_lines(&read_from(&log, 0), 10);
        }
        for line in lines {
            println!("    {line}");
        }
        Ok(())
    }

    /// `clink --admin <A's or B's socket> <command line>`, printed, failing with the CLI's
    /// message. The command line is split on whitespace.
    fn clink(&self, side: Side, line: &str) -> Result<()> {
        let agent = self.agent(side);
        let args: Vec<&str> = line.split_whitespace().collect();
        step(&format!("[{}] clink {}", agent.label, args.join(" ")));
        agent.clink(&args).map(drop)
    }

    fn print_logs(&self) {
        for agent in &self.agents {
            eprintln!("--- last lines of cluster {}'s agent log ---", agent.label);
            for line in agent.log_tail(20) {
                eprintln!("{line}");
            }
        }
    }
}

/// The log lines that record a denial.
fn decision_lines(log: &str) -> Vec<String> {
    log.lines()
        .map(strip_ansi)
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("denied") || l.contains("deny")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_lines_pick_denials_without_colour() {
        let log = "INFO applied object=default/allow-all\n\
                   \u{1b}[33mWARN\u{1b}[0m connection denied import=default/iperf3\n\
                   INFO decision=deny by default (no policy matched)\n";
        assert_eq!(
            decision_lines(log),
            [
                "WARN connection denied import=default/iperf3",
                "INFO decision=deny by default (no policy matched)"
            ]
        );
    }
}
