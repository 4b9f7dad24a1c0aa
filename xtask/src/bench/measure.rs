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
/// Bytes of each request (latency, connect rate, held connections, pipelined requests).
pub const REQUEST_SIZE: usize = 64;
/// Keep-alive connections wrk keeps open in the http scenario (one thread).
pub const HTTP_CONNECTIONS: usize = 20;

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

/// CPU seconds per GiB that iperf3 streams from A to B cost in steady state, the
/// kernel's work included.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuCost {
    /// Every CPU of the machine (in the VM: the whole VM), busy in any way: user, nice,
    /// system, irq and softirq time. With splice and kTLS the kernel encrypts in the agent's
    /// system calls and in softirq, which this counts wherever it runs. Taken as the
    /// window's length times the CPUs less their idle and iowait time (/proc/stat), not as
    /// the sum of the busy fields: those are sampled by the timer tick, and under emulation,
    /// where the host delays the guest's ticks, they counted less than the tunnel
    /// processes' own precise time. Idle time is measured, not sampled, where the kernel
    /// stops the tick when idle (NO_HZ, as Debian's kernels do).
    pub machine: f64,
    /// Both tunnel processes (agents, proxies), user and system time.
    pub tunnel: Option<f64>,
    /// Both tunnel processes, user time only: the bytes the process itself touches.
    pub tunnel_user: Option<f64>,
}

/// Where a CPU measurement reads its counters.
pub struct CpuProbe {
    /// The iperf3 server in B: the bytes it has read (`rchar` of /proc/PID/io; iperf3 reads
    /// with read(2)) are the bytes the route delivered.
    pub server: u32,
    /// The route's two tunnel processes, if it has them.
    pub tunnel: Option<[u32; 2]>,
}

/// Bytes the server must have read before the window opens: the data connection is up and
/// past TCP's slow start.
pub const CPU_WARM_UP_BYTES: u64 = 4 << 20;
/// And then this long, for work that set-up started to end.
const CPU_SETTLE: Duration = Duration::from_millis(500);

/// Runs `streams` iperf3 streams from A to B through `to` and reads, over a window of `seconds` in
/// its middle, the CPU time the machine (/proc/stat) and the route's tunnel processes
/// (/proc/PID/stat) spent and the bytes the server read. The window leaves out iperf3's
/// start-up and the set-up of its connections (tunnel handshakes included): a per-connection
/// cost that, under emulation, where a run moves only tens of MiB, would otherwise be most
/// of the kTLS agents' user time.
pub fn cpu_cost(
    place: &Place,
    to: SocketAddr,
    streams: u32,
    seconds: f64,
    probe: &CpuProbe,
) -> Result<CpuCost> {
    let pids: &[u32] = probe.tunnel.as_ref().map_or(&[], |p| p.as_slice());
    // Long enough for the warm-up and the window: iperf3's clock starts once its
    // connections are up.
    let runtime = (seconds + 3.0).ceil() as u32;
    let mut cmd = place.command("iperf3");
    cmd.args(["-c", &to.ip().to_string(), "-p", &to.port().to_string()])
        .args(["-t", &runtime.to_string(), "-P", &streams.to_string()])
        .args(["--json", "--connect-timeout", "5000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let started = server_bytes(probe.server)?;
    let mut child = ChildGuard::spawn(&mut cmd)?;
    let report = read_in_background(child.stdout.take(), |mut pipe| {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while server_bytes(probe.server)? < started + CPU_WARM_UP_BYTES {
        check_interrupt()?;
        if let Some(status) = child.try_wait()? {
            bail!("{} ended ({status}) before the window", show(&cmd));
        }
        ensure!(
            Instant::now() < deadline,
            "{}: fewer than {} MiB in 30 s",
            show(&cmd),
            CPU_WARM_UP_BYTES >> 20
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The tunnels refill their pools of handshaked connections as the run's take theirs.
    std::thread::sleep(CPU_SETTLE);
    let (bytes_before, before) = (server_bytes(probe.server)?, CpuTimes::read(pids)?);
    std::thread::sleep(Duration::from_secs_f64(seconds));
    check_interrupt()?;
    let (after, bytes_after) = (CpuTimes::read(pids)?, server_bytes(probe.server)?);
    ensure!(
        child.try_wait()?.is_none(),
        "{} ended before the window closed",
        show(&cmd)
    );
    // Its report is not needed (the window is ours), but it says whether the run was sound.
    let stdout = wait_for_line(&report, Duration::from_secs(u64::from(runtime) + 30))?;
    iperf_report(stdout.as_bytes()).with_context(|| show(&cmd))?;

    let ticks_per_second = clock_ticks_per_second()?;
    let moved = bytes_after.saturating_sub(bytes_before);
    ensure!(moved > 0, "{}: no bytes in the window", show(&cmd));
    let gib = moved as f64 / f64::from(1u32 << 30);
    let per_gib = |ticks: u64| ticks as f64 / ticks_per_second / gib;
    let (user, system) = after.processes_since(&before);
    let busy_seconds = after.machine_busy_since(&before, ticks_per_second);
    Ok(CpuCost {
        machine: busy_seconds / gib,
        tunnel: (!pids.is_empty()).then(|| per_gib(user + system)),
        tunnel_user: (!pids.is_empty()).then(|| per_gib(user)),
    })
}

/// The bytes a process has read (`rchar` in /proc/PID/io).
fn server_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/io");
    let io = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    rchar(&io).with_context(|| format!("no rchar in {path}"))
}

fn rchar(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))?
        .trim()
        .parse()
        .ok()
}

/// The kernel's CPU time counters, in clock ticks (USER_HZ), and when they were read.
#[derive(Clone, Debug, PartialEq)]
struct CpuTimes {
    at: Instant,
    /// The machine's CPUs and their idle + iowait time, summed.
    machine: MachineTimes,
    /// Each process's (user, system) time, all its threads included.
    processes: Vec<(u64, u64)>,
}

impl CpuTimes {
    fn read(pids: &[u32]) -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        let at = Instant::now();
        let machine = machine_times(&stat).context("no cpu lines in /proc/stat")?;
        let processes = pids
            .iter()
            .map(|pid| {
                let path = format!("/proc/{pid}/stat");
                let stat =
                    std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
                process_times(&stat).with_context(|| format!("no utime/stime in {path}"))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            at,
            machine,
            processes,
        })
    }

    /// CPU seconds the machine had since `earlier`: the time passed times its CPUs.
    fn machine_capacity_since(&self, earlier: &Self) -> f64 {
        self.at.duration_since(earlier.at).as_secs_f64() * f64::from(self.machine.cpus)
    }

    /// Seconds all CPUs together were busy since `earlier`: not idle, not waiting for I/O.
    fn machine_busy_since(&self, earlier: &Self, ticks_per_second: f64) -> f64 {
        let idle = self.machine.idle.saturating_sub(earlier.machine.idle) as f64;
        (self.machine_capacity_since(earlier) - idle / ticks_per_second).max(0.0)
    }

    /// The user and system ticks all processes spent since `earlier`.
    fn processes_since(&self, earlier: &Self) -> (u64, u64) {
        self.processes.iter().zip(&earlier.processes).fold(
            (0, 0),
            |(user, system), ((u1, s1), (u0, s0))| {
                (
                    user + u1.saturating_sub(*u0),
                    system + s1.saturating_sub(*s0),
                )
            },
        )
    }
}

/// What /proc/stat says of all CPUs together.
#[derive(Clone, Copy, Debug, PartialEq)]
struct MachineTimes {
    /// Online CPUs (`cpuN` lines).
    cpus: u32,
    /// Idle + iowait ticks of the `cpu` line (user nice system idle iowait irq ...).
    idle: u64,
}

fn machine_times(stat: &str) -> Option<MachineTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [_user, _nice, _system, idle, iowait, ..] = fields[..] else {
        return None;
    };
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    Some(MachineTimes {
        cpus: u32::try_from(cpus).ok().filter(|n| *n > 0)?,
        idle: idle + iowait,
    })
}

/// utime and stime (fields 14 and 15) of /proc/PID/stat; the command name before them is in
/// parentheses and may hold spaces, so fields are counted from its closing one.
fn process_times(stat: &str) -> Option<(u64, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts with field 3 (state).
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
}

fn clock_ticks_per_second() -> Result<f64> {
    use nix::unistd::{sysconf, SysconfVar};
    let ticks = sysconf(SysconfVar::CLK_TCK)
        .context("sysconf(_SC_CLK_TCK)")?
        .context("sysconf(_SC_CLK_TCK) has no value")?;
    Ok(ticks as f64)
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

/// What the pipelined client measured through one route.
#[derive(Debug, PartialEq)]
pub struct Pipelined {
    /// Responses per second after the warm-up.
    pub rate: f64,
    /// From a request's write to its whole response, in microseconds.
    pub p99: f64,
    /// CPU time (user and system) of both tunnel processes over the client's whole run,
    /// divided by every response it received, in microseconds; None without tunnel
    /// processes.
    pub cpu_per_request: Option<f64>,
    /// The machine's busy CPU time over the same run, divided the same way.
    pub machine_cpu_per_request: f64,
    /// The machine's busy CPU time over the run as a share of all its CPUs, in per cent.
    pub machine_busy: f64,
}

/// How many connections and requests in flight the pipelined client keeps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pipeline {
    pub connections: usize,
    /// Requests in flight on each connection.
    pub depth: usize,
}

/// The bench's pipelined client from A against the reply server: requests of
/// [`REQUEST_SIZE`] bytes, each answered with `response` bytes.
pub fn pipelined(
    place: &Place,
    helper: &Path,
    to: SocketAddr,
    seconds: f64,
    pipeline: Pipeline,
    response: usize,
    tunnel: Option<[u32; 2]>,
) -> Result<Pipelined> {
    let pids: &[u32] = tunnel.as_ref().map_or(&[], |p| p.as_slice());
    let extra = [
        ("--response-size", response.to_string()),
        ("--connections", pipeline.connections.to_string()),
        ("--depth", pipeline.depth.to_string()),
    ];
    let before = CpuTimes::read(pids)?;
    let report = run_tool(
        place,
        helper,
        "pipelined",
        to,
        seconds,
        &extra,
        pipelined_report,
    )?;
    let after = CpuTimes::read(pids)?;
    let ticks = clock_ticks_per_second()?;
    let (user, system) = after.processes_since(&before);
    let cpu_seconds = (user + system) as f64 / ticks;
    let machine_seconds = after.machine_busy_since(&before, ticks);
    Ok(Pipelined {
        rate: report.requests / report.seconds,
        p99: report.p99,
        cpu_per_request: (!pids.is_empty()).then(|| cpu_seconds * 1e6 / report.total),
        machine_cpu_per_request: machine_seconds * 1e6 / report.total,
        machine_busy: 100.0 * machine_seconds / after.machine_capacity_since(&before),
    })
}

/// The pipelined client's report.
#[derive(Debug, PartialEq)]
struct PipelinedReport {
    requests: f64,
    total: f64,
    seconds: f64,
    p99: f64,
}

fn pipelined_report(stdout: &[u8]) -> Result<PipelinedReport> {
    let report: serde_json::Value =
        serde_json::from_slice(stdout).context("the pipelined client printed no report")?;
    let field = |name: &str| report[name].as_f64().with_context(|| format!("no {name}"));
    let parsed = PipelinedReport {
        requests: field("requests")?,
        total: field("total")?,
        seconds: field("seconds")?,
        p99: field("p99_us")?,
    };
    ensure!(
        parsed.seconds > 0.0 && parsed.requests > 0.0,
        "no requests in the window"
    );
    Ok(parsed)
}

/// What wrk measured through one route.
#[derive(Debug, PartialEq)]
pub struct Http {
    /// wrk's "Requests/sec".
    pub rate: f64,
    /// Latency percentiles of its "Latency Distribution", in microseconds.
    pub p50: f64,
    pub p99: f64,
}

/// wrk from A, one thread, [`HTTP_CONNECTIONS`] keep-alive connections, against nginx in
/// B through `to`, for `seconds` (wrk counts whole seconds).
pub fn http(place: &Place, to: SocketAddr, seconds: u32) -> Result<Http> {
    let mut cmd = place.command("wrk");
    cmd.args(["-t1", &format!("-c{HTTP_CONNECTIONS}")])
        .arg(format!("-d{seconds}s"))
        .args(["--timeout", "5s", "--latency"])
        .arg(format!("http://{to}/"));
    let out = interruptible(&mut cmd, Duration::from_secs(u64::from(seconds) + 30))?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        show(&cmd),
        stderr(&out)
    );
    wrk_report(&String::from_utf8_lossy(&out.stdout)).with_context(|| show(&cmd))
}

/// Reads wrk 4's text report; fails when more than 1% of the requests failed (socket
/// errors or answers other than 2xx and 3xx), naming the failures.
fn wrk_report(text: &str) -> Result<Http> {
    let value_after = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    let rate: f64 = value_after("Requests/sec:")
        .context("wrk printed no Requests/sec")?
        .parse()
        .context("wrk's Requests/sec is not a number")?;
    let percentile = |p: &str| -> Result<f64> {
        let value = value_after(&format!("{p}%"))
            .with_context(|| format!("wrk printed no {p}% latency (--latency)"))?;
        wrk_duration_us(value).with_context(|| format!("wrk's {p}% latency {value:?}"))
    };
    let (p50, p99) = (percentile("50")?, percentile("99")?);
    let requests: f64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.parse().ok())
        .context("wrk printed no request count")?;
    let mut failed = 0.0;
    let mut failures = Vec::new();
    if let Some(errors) = value_after("Socket errors:") {
        // "connect 0, read 2, write 0, timeout 0"
        for part in errors.split(',') {
            if let Some(n) = part
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<f64>().ok())
            {
                failed += n;
            }
        }
        failures.push(format!("socket errors: {errors}"));
    }
    if let Some(n) = value_after("Non-2xx or 3xx responses:") {
        failed += n
            .parse::<f64>()
            .context("wrk's count of non-2xx responses")?;
        failures.push(format!("{n} answers not 2xx or 3xx"));
    }
    ensure!(requests > 0.0 && rate > 0.0, "wrk completed no request");
    // A rare failure under load is part of the figure; more means the route is broken.
    ensure!(
        failed <= requests / 100.0,
        "{failed} of {requests} requests failed: {}",
        failures.join("; ")
    );
    Ok(Http { rate, p50, p99 })
}

/// wrk's durations: `263.00us`, `1.16ms`, `2.01s`.
fn wrk_duration_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        _ => return None,
    };
    Some(number * scale)
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
    fn reads_cpu_counters() {
        let stat = "cpu  100 5 40 9000 7 3 2 11 0 0\ncpu0 50 2 20 4500 3 1 1 5 0 0\n\
                    cpu1 50 3 20 4500 4 2 1 6 0 0\nintr 1 2 3\n";
        let machine = machine_times(stat).unwrap();
        assert_eq!((machine.cpus, machine.idle), (2, 9007));
        assert_eq!(machine_times("intr 1 2 3\n"), None);
        let pid = "4242 (clink agent) S 1 4242 4242 0 -1 4194560 2041 0 0 0 731 269 0 0 20 0 \
                   3 0 1234 100000 2000";
        assert_eq!(process_times(pid), Some((731, 269)));
        assert_eq!(process_times("4242 (x) S 1"), None);
        let start = Instant::now();
        let before = CpuTimes {
            at: start,
            machine: MachineTimes {
                cpus: 2,
                idle: 1000,
            },
            processes: vec![(100, 50), (200, 60)],
        };
        let after = CpuTimes {
            at: start + Duration::from_secs(4),
            machine: MachineTimes {
                cpus: 2,
                idle: 1250,
            },
            processes: vec![(110, 80), (201, 90)],
        };
        assert_eq!(after.processes_since(&before), (11, 60));
        // 2 CPUs for 4 s, 2.5 s of it idle.
        assert_eq!(after.machine_busy_since(&before, 100.0), 5.5);
    }

    #[test]
    fn reads_rchar() {
        let io = "rchar: 1073741824\nwchar: 12\nsyscr: 3\n";
        assert_eq!(rchar(io), Some(1 << 30));
        assert_eq!(rchar("wchar: 12\n"), None);
    }

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tclink-agent\nVmPeak:\t  300000 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(vm_rss_mib(status), Some(10.0));
        assert_eq!(vm_rss_mib("Name:\tx\n"), None);
    }

    #[test]
    fn reads_the_pipelined_report() {
        let out = br#"{"requests": 30000, "total": 36000, "seconds": 0.4, "p50_us": 310.5, "p99_us": 1020.25}"#;
        assert_eq!(
            pipelined_report(out).unwrap(),
            PipelinedReport {
                requests: 30000.0,
                total: 36000.0,
                seconds: 0.4,
                p99: 1020.25
            }
        );
        assert!(pipelined_report(b"").is_err());
        let none = br#"{"requests": 0, "total": 0, "seconds": 0.4, "p50_us": 0, "p99_us": 0}"#;
        assert!(pipelined_report(none).is_err());
    }

    /// wrk 4.1.0 (Debian 12), against nginx through a tunnel.
    const WRK: &str = "Running 1s test @ http://127.0.0.1:10314/
  1 threads and 20 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.94ms    1.38ms  11.23ms   86.45%
    Req/Sec    30.90k     7.20k   42.54k    60.00%
  Latency Distribution
     50%  263.00us
     75%    1.16ms
     90%    2.82ms
     99%    5.99ms
  31005 requests in 1.01s, 6.27MB read
Requests/sec:  30629.27
Transfer/sec:      6.19MB
";

    #[test]
    fn reads_wrk_rate_and_percentiles() {
        assert_eq!(
            wrk_report(WRK).unwrap(),
            Http {
                rate: 30629.27,
                p50: 263.0,
                p99: 5990.0
            }
        );
        assert_eq!(wrk_duration_us("2.50s"), Some(2.5e6));
        assert_eq!(wrk_duration_us("1.5m"), Some(90e6));
        assert_eq!(wrk_duration_us("12"), None);
        assert_eq!(wrk_duration_us("3.0h"), None);
        // Without --latency there is no distribution.
        let without: String = WRK
            .lines()
            .filter(|l| !l.contains('%'))
            .map(|l| format!("{l}\n"))
            .collect();
        let err = wrk_report(&without).unwrap_err().to_string();
        assert!(err.contains("50%"), "{err}");
        assert!(wrk_report("").is_err());
    }

    #[test]
    fn wrk_runs_with_failed_requests_fail() {
        let rare = WRK.replace(
            "Requests/sec:",
            "  Socket errors: connect 0, read 3, write 0, timeout 0\nRequests/sec:",
        );
        assert_eq!(wrk_report(&rare).unwrap().rate, 30629.27);
        let broken = WRK.replace(
            "Requests/sec:",
            "  Socket errors: connect 0, read 200, write 0, timeout 150\n  \
             Non-2xx or 3xx responses: 400\nRequests/sec:",
        );
        let err = wrk_report(&broken).unwrap_err().to_string();
        assert!(err.contains("750 of 31005 requests failed"), "{err}");
        assert!(
            err.contains("read 200") && err.contains("400 answers not 2xx"),
            "{err}"
        );
    }
}
