//! One measurement each: a client started in cluster A (in its route's place), its output
//! turned into figures.

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clink_testbed::ChildGuard;

use super::place::Place;
use crate::clink::{iperf_report, stderr};
use crate::run::{check_interrupt, interruptible, show};

/// Connections the connect-rate client keeps in flight.
pub const CONNECT_CONCURRENCY: usize = 8;
/// Bytes of each request (latency, connect rate, held connections).
pub const REQUEST_SIZE: usize = 64;

/// How much one iperf3 run sends.
#[derive(Clone, Copy, Debug)]
pub enum Transfer {
    Seconds(u32),
    /// iperf3 counts time in whole seconds; a byte count makes shorter runs.
    MiB(u32),
}

impl Transfer {
    pub fn describe(self) -> String {
        match self {
            Transfer::Seconds(s) => format!("iperf3 -t {s}"),
            Transfer::MiB(n) => format!("iperf3 -n {n}M"),
        }
    }
}

/// iperf3 from A; returns the receiver's rate in Gbit/s.
pub fn throughput(
    place: &Place,
    to: SocketAddr,
    streams: u32,
    reverse: bool,
    transfer: Transfer,
) -> Result<f64> {
    let mut cmd = place.command("iperf3");
    cmd.args(["-c", &to.ip().to_string(), "-p", &to.port().to_string()])
        .args(["-P", &streams.to_string()])
        .args(["--json", "--connect-timeout", "5000"]);
    match transfer {
        Transfer::Seconds(s) => cmd.args(["-t", &s.to_string()]),
        Transfer::MiB(n) => cmd.args(["-n", &format!("{n}M")]),
    };
    if reverse {
        cmd.arg("-R");
    }
    let out = interruptible(&mut cmd, Duration::from_secs(60))?;
    // iperf3 3.12 exits 0 even when it fails in --json mode: its report tells.
    let bps = iperf_report(&out.stdout).with_context(|| show(&cmd))?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        show(&cmd),
        stderr(&out)
    );
    Ok(bps / 1e9)
}

/// Round-trip time percentiles of small messages, in microseconds.
#[derive(Debug, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
}

/// The bench's ping-pong client from A: one message of [`REQUEST_SIZE`] bytes in flight,
/// echoed back.
pub fn latency(place: &Place, helper: &Path, to: SocketAddr, seconds: f64) -> Result<Latency> {
    run_tool(place, helper, "ping-pong", to, seconds, &[], latency_report)
}

/// Runs one `bench-tool` client in `place` for `seconds` against `to`, and reads its JSON
/// report with `report`; failures name the command.
fn run_tool<T>(
    place: &Place,
    helper: &Path,
    tool: &str,
    to: SocketAddr,
    seconds: f64,
    extra: &[(&str, String)],
    report: fn(&[u8]) -> Result<T>,
) -> Result<T> {
    let mut cmd = place.command(helper);
    cmd.args(["bench-tool", tool, "--to", &to.to_string()])
        .args(["--seconds", &seconds.to_string()])
        .args(["--size", &REQUEST_SIZE.to_string()]);
    for (flag, value) in extra {
        cmd.args([flag, value.as_str()]);
    }
    let out = interruptible(&mut cmd, Duration::from_secs_f64(seconds + 30.0))?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        show(&cmd),
        stderr(&out)
    );
    report(&out.stdout).with_context(|| show(&cmd))
}

fn latency_report(stdout: &[u8]) -> Result<Latency> {
    let report: serde_json::Value =
        serde_json::from_slice(stdout).context("the ping-pong client printed no report")?;
    Ok(Latency {
        p50: report["p50_us"].as_f64().context("no p50_us")?,
        p99: report["p99_us"].as_f64().context("no p99_us")?,
    })
}

/// New connections per second from A, each carrying one echoed request.
pub fn connect_rate(place: &Place, helper: &Path, to: SocketAddr, seconds: f64) -> Result<f64> {
    let concurrency = [("--concurrency", CONNECT_CONCURRENCY.to_string())];
    run_tool(
        place,
        helper,
        "connect-rate",
        to,
        seconds,
        &concurrency,
        connect_report,
    )
}

fn connect_report(stdout: &[u8]) -> Result<f64> {
    let report: serde_json::Value =
        serde_json::from_slice(stdout).context("the connect-rate client printed no report")?;
    let done = report["connections"].as_f64().context("no connections")?;
    let errors = report["errors"].as_f64().context("no errors")?;
    let seconds = report["seconds"].as_f64().context("no seconds")?;
    // A rare failure under load is part of the figure; more means the route is broken.
    if done == 0.0 || errors > done / 100.0 {
        bail!(
            "{errors} of {} connections failed, first: {}",
            done + errors,
            report["first_error"].as_str().unwrap_or("?")
        );
    }
    Ok(done / seconds)
}

/// Opens `count` connections from A through a route (each proven by an echoed request),
/// then reads the resident memory of `pids` in MiB while they are open.
pub fn rss_with_open_connections(
    place: &Place,
    helper: &Path,
    to: SocketAddr,
    count: usize,
    pids: [u32; 2],
) -> Result<[f64; 2]> {
    let mut cmd = place.command(helper);
    cmd.args(["bench-tool", "hold", "--to", &to.to_string()])
        .args(["--connections", &count.to_string()])
        .args(["--size", &REQUEST_SIZE.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = ChildGuard::spawn(&mut cmd)?;
    let release = child.stdin.take();
    let errors = read_in_background(child.stderr.take(), |mut pipe| {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let report = read_in_background(child.stdout.take(), |pipe| {
        let mut line = String::new();
        let _ = BufReader::new(pipe).read_line(&mut line);
        line
    });
    let line = wait_for_line(&report, Duration::from_secs(120))
        .with_context(|| format!("{} gave no report", show(&cmd)))?;
    if line.is_empty() {
        let status = child.wait()?;
        let message = errors.recv().unwrap_or_default();
        bail!("{} failed ({status}): {}", show(&cmd), message.trim());
    }
    let report: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("hold client printed {line:?}"))?;
    ensure!(
        report["open"].as_u64() == Some(count as u64),
        "hold client reported {line:?}"
    );
    // Let the tunnels finish what the last connections started.
    std::thread::sleep(Duration::from_millis(300));
    let rss = [rss_mib(pids[0])?, rss_mib(pids[1])?];
    drop(release);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(rss)
}

fn read_in_background<P: Send + 'static>(
    pipe: Option<P>,
    read: impl FnOnce(P) -> String + Send + 'static,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(pipe.map(read).unwrap_or_default());
    });
    rx
}

fn wait_for_line(rx: &mpsc::Receiver<String>, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupt()?;
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => return Ok(line),
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(RecvTimeoutError::Timeout) => bail!("timed out after {timeout:?}"),
            Err(RecvTimeoutError::Disconnected) => bail!("its output reader stopped"),
        }
    }
}

/// A process's resident set size (`VmRSS` in /proc/PID/status) in MiB.
pub fn rss_mib(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    vm_rss_mib(&status).with_context(|| format!("no VmRSS in {path}"))
}

fn vm_rss_mib(status: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Established TCP connections in a namespace, to wait for a route to drain.
pub fn established(netns: &clink_testbed::Netns) -> Result<usize> {
    let mut ss: Command = netns.command("ss");
    ss.args(["-Htn", "state", "established"]);
    Ok(crate::run::output(&mut ss)?.lines().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_latency_percentiles() {
        let out = br#"{"messages": 9000, "p50_us": 10.876, "p99_us": 21.302}"#;
        assert_eq!(
            latency_report(out).unwrap(),
            Latency {
                p50: 10.876,
                p99: 21.302
            }
        );
        assert!(latency_report(b"").is_err());
    }

    #[test]
    fn connect_report_is_a_rate_and_rejects_broken_routes() {
        let ok = br#"{"connections": 3000, "errors": 1, "first_error": "reset", "seconds": 1.5}"#;
        assert_eq!(connect_report(ok).unwrap(), 2000.0);
        let broken = br#"{"connections": 10, "errors": 900, "first_error": "connection refused", "seconds": 1.0}"#;
        let err = connect_report(broken).unwrap_err().to_string();
        assert!(err.contains("connection refused"), "{err}");
    }

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tclink-agent\nVmPeak:\t  300000 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(vm_rss_mib(status), Some(10.0));
        assert_eq!(vm_rss_mib("Name:\tx\n"), None);
    }
}
