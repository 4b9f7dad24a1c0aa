//! The clink binaries in test-bed clusters: the release build, certificates, agents and their
//! CLI. Shared by `cargo xtask demo` and `cargo xtask bench`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clink_testbed::{
    last_lines, peer_reachable, read_from, start_agent, AgentFiles, ChildGuard, Clink, Netns,
};

use crate::run::{
    self, cargo, check, check_interrupt, interrupted, interruptible, show, step, wait_until,
};

pub const CLI_TIMEOUT: Duration = Duration::from_secs(10);

/// `cargo build --release --bins -p clink-agent`; returns the directory that holds
/// `clink-agent` and `clink`.
pub fn build_release() -> Result<PathBuf> {
    step("cargo build --release --bins -p clink-agent");
    check(cargo().args(["build", "--release", "--bins", "-p", "clink-agent"]))?;
    check_interrupt()?;
    let bins = run::Workspace::locate()?.target_dir.join("release");
    for bin in ["clink-agent", "clink"] {
        ensure!(
            bins.join(bin).is_file(),
            "{} was not built",
            bins.join(bin).display()
        );
    }
    Ok(bins)
}

/// A fabric and one certificate per peer in `dir`: `dir/<fabric>/{ca.pem,ca.key}` and
/// `dir/<peer>/{cert.pem,key.pem,ca.pem}`.
pub fn make_certificates(clink: &Path, dir: &Path, fabric: &str, peers: &[&str]) -> Result<()> {
    step(&format!(
        "clink fabric create --name {fabric}, clink peer-cert create for {} (--path {})",
        peers.join(", "),
        dir.display()
    ));
    clink_testbed::make_certificates(clink, dir, fabric, peers)
}

/// Runs a clink CLI command; fails with its message unless it succeeds. Returns its stdout.
fn run_cli(cmd: &mut Command) -> Result<String> {
    let out = interruptible(cmd, CLI_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        show(cmd),
        stderr(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A running agent and the CLI that talks to it.
pub struct Agent {
    pub label: String,
    process: ChildGuard,
    clink: Clink,
    log: PathBuf,
}

impl Agent {
    /// Spawns `cmd` (configured by `files`) and waits until the agent's admin API answers.
    /// The agent gets its own process group: Ctrl-C reaches only xtask, which then stops the
    /// agent in order.
    pub fn start(label: &str, cmd: &mut Command, files: &AgentFiles, clink: &Path) -> Result<Self> {
        let clink = files.clink(clink);
        cmd.process_group(0);
        let process = start_agent(cmd, files, Duration::from_secs(30), || {
            interrupted()
                || interruptible(&mut clink.command(&["status"]), CLI_TIMEOUT)
                    .is_ok_and(|out| out.status.success())
        })
        .with_context(|| format!("starting {label}"))?;
        check_interrupt()?;
        Ok(Self {
            label: label.to_owned(),
            process,
            clink,
            log: files.log(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// The agent's exit status, if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.process.try_wait()?)
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Runs `clink --admin <socket> ARGS`, failing with the CLI's message; returns its stdout.
    pub fn clink(&self, args: &[&str]) -> Result<String> {
        run_cli(&mut self.clink.command(args))
    }

    /// Waits until this agent's heartbeats report `peer` reachable.
    pub fn wait_reachable(&self, peer: &str, timeout: Duration) -> Result<()> {
        wait_until(&format!("{peer} reachable"), timeout, || {
            let mut get = self.clink.command(&["get", "peer", peer, "-o", "json"]);
            interruptible(&mut get, CLI_TIMEOUT).is_ok_and(|out| {
                out.status.success()
                    && serde_json::from_slice(&out.stdout)
                        .is_ok_and(|v| peer_reachable(&v) == Some(true))
            })
        })
    }

    /// The last `n` lines of the agent's log.
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        last_lines(&read_from(&self.log, 0), n)
    }
}

/// Whether a TCP listener on `port` exists in `netns`.
pub fn listening(netns: &Netns, port: impl std::fmt::Display) -> bool {
    let mut ss = netns.command("ss");
    ss.args(["-Hltn", &format!("sport = :{port}")]);
    run::output(&mut ss).is_ok_and(|out| !out.trim().is_empty())
}

/// The receiver's rate from `iperf3 --json`, or iperf3's own error message.
pub fn iperf_report(stdout: &[u8]) -> Result<f64> {
    let report: serde_json::Value =
        serde_json::from_slice(stdout).context("iperf3 printed no JSON report")?;
    if let Some(error) = report.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {error}");
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3's report has no end.sum_received.bits_per_second")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf_report_reads_the_receiver_rate() {
        let json = br#"{"start":{},"end":{"sum_sent":{"bits_per_second":2.0e9},
            "sum_received":{"bits_per_second":1.5e9}}}"#;
        assert_eq!(iperf_report(json).unwrap(), 1.5e9);
    }

    #[test]
    fn iperf_report_surfaces_iperf_errors() {
        let json = br#"{"start":{},"end":{},"error":"control socket has closed unexpectedly"}"#;
        let err = iperf_report(json).unwrap_err().to_string();
        assert!(
            err.contains("control socket has closed unexpectedly"),
            "{err}"
        );
        assert!(iperf_report(b"").is_err());
    }
}
