//! The clink binaries in test-bed clusters: the release build, certificates, agents and their
//! CLI. Shared by `cargo xtask demo` and `cargo xtask bench`.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clink_testbed::{ChildGuard, Netns};

use crate::run::{self, cargo, check, check_interrupt, interruptible, show, step, wait_until};

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
    let mut commands = vec![fabric_command(
        clink,
        ["fabric", "create", "--name", fabric],
    )];
    for peer in peers {
        commands.push(fabric_command(
            clink,
            ["peer-cert", "create", "--name", peer, "--fabric", fabric],
        ));
    }
    for mut cmd in commands {
        cmd.arg("--path").arg(dir);
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        step(&format!("clink {}", args.join(" ")));
        run_cli(&mut cmd)?;
    }
    Ok(())
}

fn fabric_command<'a>(clink: &Path, args: impl IntoIterator<Item = &'a str>) -> Command {
    let mut cmd = Command::new(clink);
    cmd.args(args);
    cmd
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

/// Where one agent keeps its files, and the flags that tell it so.
pub struct AgentFiles {
    name: String,
    certs: PathBuf,
    state: PathBuf,
    admin: PathBuf,
    log: PathBuf,
}

impl AgentFiles {
    /// Peer `name` with the certificates in `certs`; state, admin socket and log in `dir`.
    pub fn new(name: &str, certs: &Path, dir: &Path) -> Result<Self> {
        let state = dir.join(format!("{name}-state"));
        fs::create_dir_all(&state).with_context(|| format!("create {}", state.display()))?;
        Ok(Self {
            name: name.to_owned(),
            certs: certs.to_owned(),
            state,
            admin: dir.join(format!("{name}.sock")),
            log: dir.join(format!("{name}.log")),
        })
    }

    /// Adds `--name --certs --state --admin` to `cmd` (a `clink-agent` command line) and sends
    /// its output to the log file. The agent gets its own process group: Ctrl-C reaches only
    /// xtask, which then stops the agent in order.
    pub fn configure(&self, cmd: &mut Command) -> Result<()> {
        let log =
            File::create(&self.log).with_context(|| format!("create {}", self.log.display()))?;
        cmd.args(["--name", &self.name, "--certs"])
            .arg(&self.certs)
            .arg("--state")
            .arg(&self.state)
            .arg("--admin")
            .arg(&self.admin)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        Ok(())
    }

    pub fn log(&self) -> &Path {
        &self.log
    }
}

/// A running agent and the CLI that talks to it.
pub struct Agent {
    pub label: String,
    process: ChildGuard,
    clink: PathBuf,
    admin: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Spawns `cmd` (configured by `files`) and waits until the agent's admin API answers.
    pub fn start(label: &str, cmd: &mut Command, files: AgentFiles, clink: &Path) -> Result<Self> {
        let mut agent = Self {
            label: label.to_owned(),
            process: ChildGuard::spawn(cmd)?,
            clink: clink.to_owned(),
            admin: files.admin,
            log: files.log,
        };
        let mut exited = None;
        wait_until(
            &format!("{label}'s admin API"),
            Duration::from_secs(30),
            || {
                match agent.process.try_wait() {
                    Ok(Some(status)) => {
                        exited = Some(status);
                        return true;
                    }
                    Ok(None) => {}
                    Err(_) => return true,
                }
                let mut status = agent.cli(&["status"]);
                interruptible(&mut status, CLI_TIMEOUT).is_ok_and(|out| out.status.success())
            },
        )?;
        if let Some(status) = exited {
            bail!(
                "{label} exited during start-up ({status}); its log ends with:\n{}",
                last_lines(&read_from(&agent.log, 0), 10).join("\n")
            );
        }
        Ok(agent)
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

    /// `clink --admin <this agent's socket> ARGS`, to run.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.clink);
        cmd.arg("--admin").arg(&self.admin).args(args);
        cmd
    }

    /// Runs `clink --admin <socket> ARGS`, failing with the CLI's message; returns its stdout.
    pub fn clink(&self, args: &[&str]) -> Result<String> {
        run_cli(&mut self.cli(args))
    }

    /// Waits until this agent's heartbeats report `peer` reachable.
    pub fn wait_reachable(&self, peer: &str, timeout: Duration) -> Result<()> {
        wait_until(&format!("{peer} reachable"), timeout, || {
            let mut get = self.cli(&["get", "peer", peer, "-o", "json"]);
            interruptible(&mut get, CLI_TIMEOUT).is_ok_and(|out| {
                out.status.success()
                    && serde_json::from_slice(&out.stdout)
                        .is_ok_and(|v| has_true_condition(&v, "PeerReachable"))
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

/// Whether any object in `value` has a condition `kind` with status "True".
fn has_true_condition(value: &serde_json::Value, kind: &str) -> bool {
    match value {
        serde_json::Value::Object(map) => {
            (map.get("type").and_then(|t| t.as_str()) == Some(kind)
                && map.get("status").and_then(|s| s.as_str()) == Some("True"))
                || map.values().any(|v| has_true_condition(v, kind))
        }
        serde_json::Value::Array(items) => items.iter().any(|v| has_true_condition(v, kind)),
        _ => false,
    }
}

pub fn last_lines(log: &str, n: usize) -> Vec<String> {
    let lines: Vec<_> = log.lines().map(strip_ansi).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

pub fn read_from(path: &Path, offset: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Drops terminal colour sequences, in case the agent writes them to its log file.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters... final letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
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

    #[test]
    fn finds_true_conditions_anywhere() {
        let peer = serde_json::json!({
            "kind": "Peer",
            "status": {"conditions": [
                {"type": "Other", "status": "True"},
                {"type": "PeerReachable", "status": "True", "reason": "Heartbeat"}
            ]}
        });
        assert!(has_true_condition(&peer, "PeerReachable"));
        assert!(has_true_condition(
            &serde_json::json!([peer]),
            "PeerReachable"
        ));
        let down = serde_json::json!({"status": {"conditions": [
            {"type": "PeerReachable", "status": "False"}
        ]}});
        assert!(!has_true_condition(&down, "PeerReachable"));
    }

    #[test]
    fn last_lines_keeps_the_tail() {
        assert_eq!(last_lines("a\nb\nc\n", 2), ["b", "c"]);
        assert_eq!(last_lines("a\n", 5), ["a"]);
    }

    #[test]
    fn strip_ansi_drops_colour() {
        assert_eq!(strip_ansi("\u{1b}[33mWARN\u{1b}[0m x"), "WARN x");
    }
}
