//! The figures of one run and their Markdown report: medians, spread, ratios to direct, to
//! haproxy and to the userspace data path, and the project's performance targets
//! (docs/performance.md).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::routes::RouteKind;

/// Which cluster's tunnel process a memory figure is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    A,
    B,
}

/// One row of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    /// iperf3; `reverse`: B sends to A (`-R`).
    Throughput {
        streams: u32,
        reverse: bool,
    },
    /// CPU seconds per GiB of `streams` iperf3 streams A→B, all CPUs of the machine (the
    /// VM).
    CpuMachine {
        streams: u32,
    },
    /// The same, both tunnel processes, user and system time.
    CpuTunnel {
        streams: u32,
    },
    /// The same, both tunnel processes, user time only.
    CpuTunnelUser {
        streams: u32,
    },
    /// The tunnel processes' user time as a share of their CPU time, in per cent.
    TunnelUserShare {
        streams: u32,
    },
    LatencyP50,
    LatencyP99,
    ConnectRate,
    /// Pipelined small requests answered per second, by response size in bytes.
    PipelinedRate {
        response: u32,
    },
    /// The p99 of a pipelined request, from its write to its whole response.
    PipelinedP99 {
        response: u32,
    },
    /// Both tunnel processes' CPU time per pipelined request.
    PipelinedCpu {
        response: u32,
    },
    /// The whole machine's busy CPU time per pipelined request: client, server, tunnels
    /// and the kernel's work for all of them.
    PipelinedMachineCpu {
        response: u32,
    },
    /// The share of the machine's CPUs that was busy while the pipelined client ran: under
    /// 100% the route's rate was bound by waiting (wake-ups, scheduling), not by the CPUs.
    PipelinedMachineBusy {
        response: u32,
    },
    /// nginx driven by wrk over keep-alive connections.
    HttpRate,
    HttpP50,
    HttpP99,
    /// Before any traffic.
    RssIdle(Side),
    /// While 1,000 connections are open through the route.
    RssOpen(Side),
}

impl Metric {
    pub fn label(self) -> String {
        match self {
            Metric::Throughput { streams, reverse } => format!(
                "throughput, {streams} stream{}, {}",
                if streams == 1 { "" } else { "s" },
                if reverse { "B→A" } else { "A→B" }
            ),
            Metric::CpuMachine { streams } => format!(
                "CPU per GiB, whole machine ({streams} stream{} A→B)",
                if streams == 1 { "" } else { "s" }
            ),
            Metric::CpuTunnel { streams } => format!(
                "CPU per GiB, tunnel processes (both sides){}",
                streams_note(streams)
            ),
            Metric::CpuTunnelUser { streams } => format!(
                "CPU per GiB, tunnel processes in user space{}",
                streams_note(streams)
            ),
            Metric::TunnelUserShare { streams } => format!(
                "user-space share of the tunnel processes' CPU{}",
                streams_note(streams)
            ),
            Metric::LatencyP50 => "request/response round trip, p50".to_owned(),
            Metric::LatencyP99 => "request/response round trip, p99".to_owned(),
            Metric::ConnectRate => "new connections per second".to_owned(),
            Metric::PipelinedRate { response } => format!(
                "pipelined requests per second, {} responses",
                bytes(response)
            ),
            Metric::PipelinedP99 { response } => format!(
                "pipelined request latency p99, {} responses",
                bytes(response)
            ),
            Metric::PipelinedCpu { response } => format!(
                "CPU per pipelined request, tunnel processes, {} responses",
                bytes(response)
            ),
            Metric::PipelinedMachineCpu { response } => format!(
                "CPU per pipelined request, whole machine, {} responses",
                bytes(response)
            ),
            Metric::PipelinedMachineBusy { response } => format!(
                "machine's CPUs busy during pipelined requests, {} responses",
                bytes(response)
            ),
            Metric::HttpRate => "HTTP requests per second (nginx, wrk)".to_owned(),
            Metric::HttpP50 => "HTTP request latency p50".to_owned(),
            Metric::HttpP99 => "HTTP request latency p99".to_owned(),
            Metric::RssIdle(side) => format!("RSS idle, {side:?} side"),
            Metric::RssOpen(side) => format!("RSS, 1,000 open connections, {side:?} side"),
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::Throughput { .. } => "Gbit/s",
            Metric::CpuMachine { .. } | Metric::CpuTunnel { .. } | Metric::CpuTunnelUser { .. } => {
                "s/GiB"
            }
            Metric::TunnelUserShare { .. } | Metric::PipelinedMachineBusy { .. } => "%",
            Metric::LatencyP50
            | Metric::LatencyP99
            | Metric::PipelinedP99 { .. }
            | Metric::PipelinedCpu { .. }
            | Metric::PipelinedMachineCpu { .. }
            | Metric::HttpP50
            | Metric::HttpP99 => "µs",
            Metric::ConnectRate => "conn/s",
            Metric::PipelinedRate { .. } | Metric::HttpRate => "req/s",
            Metric::RssIdle(_) | Metric::RssOpen(_) => "MiB",
        }
    }

    pub fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::Throughput { .. }
                | Metric::ConnectRate
                | Metric::PipelinedRate { .. }
                | Metric::HttpRate
        )
    }

    pub fn format(self, value: f64) -> String {
        match self {
            Metric::Throughput { .. } => format!("{value:.2}"),
            Metric::ConnectRate | Metric::PipelinedRate { .. } | Metric::HttpRate => {
                thousands(value.round() as u64)
            }
            Metric::PipelinedCpu { .. } | Metric::PipelinedMachineCpu { .. } => {
                format!("{value:.2}")
            }
            // Under emulation the userspace path costs tens of seconds per GiB, the kTLS
            // agents' user time hundredths: both keep three significant digits.
            Metric::CpuMachine { .. } | Metric::CpuTunnel { .. } | Metric::CpuTunnelUser { .. } => {
                match value {
                    v if v >= 10.0 => format!("{v:.1}"),
                    v if v >= 1.0 => format!("{v:.2}"),
                    v => format!("{v:.3}"),
                }
            }
            _ => format!("{value:.1}"),
        }
    }
}

/// What a CPU row of more than one stream adds to its label.
fn streams_note(streams: u32) -> String {
    if streams == 1 {
        String::new()
    } else {
        format!(", {streams} streams")
    }
}

/// `64 B`, `1 KiB`.
fn bytes(n: u32) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} B")
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct Results {
    /// The report's columns, in order.
    pub routes: Vec<RouteKind>,
    samples: BTreeMap<(Metric, RouteKind), Vec<f64>>,
    failures: BTreeMap<(Metric, RouteKind), String>,
    setup_failures: BTreeMap<RouteKind, String>,
}

impl Results {
    pub fn new(routes: Vec<RouteKind>) -> Self {
        Self {
            routes,
            ..Self::default()
        }
    }

    pub fn add(&mut self, metric: Metric, route: RouteKind, value: f64) {
        self.samples.entry((metric, route)).or_default().push(value);
    }

    /// Keeps the first failure of each figure.
    pub fn fail(&mut self, metric: Metric, route: RouteKind, error: String) {
        self.failures.entry((metric, route)).or_insert(error);
    }

    pub fn fail_setup(&mut self, route: RouteKind, error: String) {
        self.setup_failures.insert(route, error);
    }

    pub fn samples(&self, metric: Metric, route: RouteKind) -> &[f64] {
        self.samples
            .get(&(metric, route))
            .map_or(&[], |v| v.as_slice())
    }

    /// Whether a measurement of this figure failed, or the route could not be set up.
    pub fn failed(&self, metric: Metric, route: RouteKind) -> bool {
        self.failures.contains_key(&(metric, route)) || self.setup_failures.contains_key(&route)
    }

    pub fn median(&self, metric: Metric, route: RouteKind) -> Option<f64> {
        median(self.samples(metric, route))
    }

    fn metrics(&self) -> Vec<Metric> {
        let mut metrics: Vec<Metric> = self
            .samples
            .keys()
            .chain(self.failures.keys())
            .map(|(m, _)| *m)
            .collect();
        metrics.sort();
        metrics.dedup();
        metrics
    }

    fn ratio(&self, metric: Metric, route: RouteKind, base: RouteKind) -> Option<f64> {
        Some(self.median(metric, route)? / self.median(metric, base)?)
    }

    /// `5.71 ±3%` (half the range, relative to the median), `failed` or `—`.
    fn cell(&self, metric: Metric, route: RouteKind) -> String {
        let samples = self.samples(metric, route);
        match median(samples) {
            Some(m) if samples.len() > 1 && m > 0.0 => {
                let (lo, hi) = samples
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
                let spread = 50.0 * (hi - lo) / m;
                format!("{} ±{spread:.0}%", metric.format(m))
            }
            Some(m) => metric.format(m),
            None if self.failed(metric, route) => "failed".to_owned(),
            None => "—".to_owned(),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let figures: Vec<_> = self
            .metrics()
            .into_iter()
            .flat_map(|metric| {
                self.routes.iter().map(move |route| {
                    serde_json::json!({
                        "figure": metric.label(),
                        "unit": metric.unit(),
                        "route": route.label(),
                        "samples": self.samples(metric, *route),
                        "median": self.median(metric, *route),
                        "error": self.failures.get(&(metric, *route)),
                    })
                })
            })
            .collect();
        serde_json::json!({
            "figures": figures,
            "setup_failures": self.setup_failures.iter()
                .map(|(route, e)| (route.label().to_owned(), e.clone()))
                .collect::<BTreeMap<_, _>>(),
        })
    }

    /// The tables: absolute figures, ratios, targets, failures.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let routes = &self.routes;
        let metrics = self.metrics();

        md.push_str("| figure | unit |");
        for route in routes {
            let _ = write!(md, " {} |", route.label());
        }
        md.push_str("\n|---|---|");
        md.push_str(&"--:|".repeat(routes.len()));
        md.push('\n');
        for &metric in &metrics {
            let arrow = match metric {
                // Neither more nor less is better: it says what bound the route.
                Metric::PipelinedMachineBusy { .. } => "",
                m if m.higher_is_better() => " ↑",
                _ => " ↓",
            };
            let _ = write!(md, "| {} | {}{arrow} |", metric.label(), metric.unit());
            for &route in routes {
                let _ = write!(md, " {} |", self.cell(metric, route));
            }
            md.push('\n');
        }

        let columns = self.ratio_columns();
        if !columns.is_empty() {
            md.push_str("\nRatios of medians (above 1: more than the base, whichever way is better):\n\n| figure |");
            for (route, base) in &columns {
                let _ = write!(md, " {} ÷ {} |", route.label(), base.label());
            }
            md.push_str("\n|---|");
            md.push_str(&"--:|".repeat(columns.len()));
            md.push('\n');
            for &metric in &metrics {
                let _ = write!(md, "| {} |", metric.label());
                for &(route, base) in &columns {
                    let cell = self
                        .ratio(metric, route, base)
                        .map_or("—".to_owned(), |r| format!("{r:.2}×"));
                    let _ = write!(md, " {cell} |");
                }
                md.push('\n');
            }
        }

        md.push_str(&self.targets());
        md.push_str(&self.ktls_targets());
        md.push_str(&self.small_request_targets());

        if !self.failures.is_empty() || !self.setup_failures.is_empty() {
            md.push_str("\nFailures:\n\n");
            for (route, error) in &self.setup_failures {
                let _ = writeln!(
                    md,
                    "- {} could not be set up: {}",
                    route.label(),
                    one_line(error)
                );
            }
            for ((metric, route), error) in &self.failures {
                let _ = writeln!(
                    md,
                    "- {}, {}: {}",
                    route.label(),
                    metric.label(),
                    one_line(error)
                );
            }
        }
        md
    }

    /// (route, base) pairs: every tunnel against direct, every other route against haproxy,
    /// the kernel data paths against userspace.
    fn ratio_columns(&self) -> Vec<(RouteKind, RouteKind)> {
        let has = |k| self.routes.contains(&k);
        let mut columns = Vec::new();
        for &route in &self.routes {
            if route == RouteKind::Direct {
                continue;
            }
            if has(RouteKind::Direct) {
                columns.push((route, RouteKind::Direct));
            }
            if route != RouteKind::Haproxy && has(RouteKind::Haproxy) {
                columns.push((route, RouteKind::Haproxy));
            }
            if matches!(
                route,
                RouteKind::Sockmap | RouteKind::Ktls | RouteKind::Compare
            ) && has(RouteKind::Userspace)
            {
                columns.push((route, RouteKind::Userspace));
            }
        }
        columns
    }

    /// The performance targets (docs/performance.md) for each ClusterLink-rs route, read off
    /// this run.
    fn targets(&self) -> String {
        let clink: Vec<_> = self
            .routes
            .iter()
            .copied()
            .filter(|r| r.datapath().is_some())
            .collect();
        // Every target is a comparison with haproxy (or memory, measured with it).
        if clink.is_empty() || !self.routes.contains(&RouteKind::Haproxy) {
            return String::new();
        }
        let mut md = String::from("\nTargets, read off this run:\n\n| target |");
        for route in &clink {
            let _ = write!(md, " {} |", route.label());
        }
        md.push_str("\n|---|");
        md.push_str(&"---|".repeat(clink.len()));
        md.push('\n');
        let haproxy = RouteKind::Haproxy;
        type Check<'a> = Box<dyn Fn(RouteKind) -> Option<(String, bool)> + 'a>;
        let single = |reverse| Metric::Throughput {
            streams: 1,
            reverse,
        };
        let rows: [(&str, Check); 4] = [
            (
                "single-stream throughput ≥ 1.5× haproxy",
                Box::new(|r| {
                    let up = self.ratio(single(false), r, haproxy)?;
                    let down = self.ratio(single(true), r, haproxy)?;
                    Some((
                        format!("A→B {up:.2}×, B→A {down:.2}×"),
                        up >= 1.5 && down >= 1.5,
                    ))
                }),
            ),
            (
                "p99 latency ≤ haproxy's",
                Box::new(|r| {
                    let x = self.ratio(Metric::LatencyP99, r, haproxy)?;
                    Some((format!("{x:.2}×"), x <= 1.0))
                }),
            ),
            (
                "connection setup ≥ 2× haproxy",
                Box::new(|r| {
                    let x = self.ratio(Metric::ConnectRate, r, haproxy)?;
                    Some((format!("{x:.2}×"), x >= 2.0))
                }),
            ),
            (
                "RSS < 50 MiB with 1,000 connections",
                Box::new(|r| {
                    let a = self.median(Metric::RssOpen(Side::A), r)?;
                    let b = self.median(Metric::RssOpen(Side::B), r)?;
                    Some((format!("A {a:.1}, B {b:.1} MiB"), a < 50.0 && b < 50.0))
                }),
            ),
        ];
        for (target, check) in rows {
            let _ = write!(md, "| {target} |");
            for &route in &clink {
                let cell = match check(route) {
                    Some((figures, true)) => format!("met: {figures}"),
                    Some((figures, false)) => format!("**not met**: {figures}"),
                    None => "not measured".to_owned(),
                };
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
        md
    }

    /// The kTLS data path's targets (issue 10), against the userspace path in this run: a
    /// verdict per target, PASS or MISS, which never fails the run (a loaded machine moves
    /// the figures; the verdict is there to be read).
    fn ktls_targets(&self) -> String {
        let (ktls, user) = (RouteKind::Ktls, RouteKind::Userspace);
        if !self.routes.contains(&ktls) || !self.routes.contains(&user) {
            return String::new();
        }
        let throughput: Vec<(Metric, f64)> = self
            .metrics()
            .into_iter()
            .filter(|m| matches!(m, Metric::Throughput { .. }))
            .filter_map(|m| Some((m, self.ratio(m, ktls, user)?)))
            .collect();
        let rows = [
            (
                "throughput ≥ 1.3× userspace",
                (!throughput.is_empty()).then(|| {
                    let figures = throughput
                        .iter()
                        .map(|(m, r)| format!("{}: {r:.2}×", short_case(*m)))
                        .collect::<Vec<_>>()
                        .join(", ");
                    (figures, throughput.iter().all(|(_, r)| *r >= 1.3))
                }),
            ),
            (
                "whole-machine CPU per GiB ≤ 0.6× userspace",
                self.ratio(Metric::CpuMachine { streams: 1 }, ktls, user)
                    .map(|r| (format!("{r:.2}×"), r <= 0.6)),
            ),
            (
                "agents' user-space CPU per GiB ≤ 0.1× userspace's",
                self.ratio(Metric::CpuTunnelUser { streams: 1 }, ktls, user)
                    .map(|r| (format!("{r:.3}×"), r <= 0.1)),
            ),
        ];
        let mut md = String::from(
            "\nkTLS targets, clink ktls against clink userspace in this run:\n\n\
             | target | ratio of medians | verdict |\n|---|---|---|\n",
        );
        for (target, outcome) in rows {
            let (figures, verdict) = match outcome {
                Some((figures, true)) => (figures, "PASS"),
                Some((figures, false)) => (figures, "**MISS**"),
                None => ("not measured".to_owned(), "—"),
            };
            let _ = writeln!(md, "| {target} | {figures} | {verdict} |");
        }
        md
    }

    /// The small-request targets (issue 13) of the userspace data path, against direct and
    /// haproxy in this run: PASS or MISS, which never fails the run. Shown when the run
    /// measured pipelined requests.
    fn small_request_targets(&self) -> String {
        let user = RouteKind::Userspace;
        let rate = Metric::PipelinedRate {
            response: SMALL_RESPONSE,
        };
        if !self.routes.contains(&user) || !self.metrics().contains(&rate) {
            return String::new();
        }
        let mut md = String::from(
            "\nSmall-request targets, clink userspace in this run (pipelined, 64 B requests \
             and responses):\n\n| target | ratio of medians | verdict |\n|---|---|---|\n",
        );
        for (base, least) in [(RouteKind::Direct, 0.6), (RouteKind::Haproxy, 1.5)] {
            let target = format!("≥ {least}× {}", base.label());
            let (figures, verdict) = match self.ratio(rate, user, base) {
                Some(r) if r >= least => (format!("{r:.2}×"), "PASS"),
                Some(r) => (format!("{r:.2}×"), "**MISS**"),
                None => ("not measured".to_owned(), "—"),
            };
            let _ = writeln!(
                md,
                "| requests per second {target} | {figures} | {verdict} |"
            );
        }
        md
    }
}

/// The response size the small-request targets are judged on.
pub const SMALL_RESPONSE: u32 = 64;

/// `1 stream A→B` for a throughput row.
fn short_case(metric: Metric) -> String {
    metric
        .label()
        .strip_prefix("throughput, ")
        .map_or_else(|| metric.label(), str::to_owned)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if !sorted.len().is_multiple_of(2) {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: Metric = Metric::Throughput {
        streams: 1,
        reverse: false,
    };

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(Metric::ConnectRate.format(2345.6), "2,346");
        assert_eq!(UP.format(5.714), "5.71");
        assert_eq!(UP.label(), "throughput, 1 stream, A→B");
        assert_eq!(
            Metric::Throughput {
                streams: 4,
                reverse: true
            }
            .label(),
            "throughput, 4 streams, B→A"
        );
    }

    fn sample_run() -> Results {
        let mut r = Results::new(vec![
            RouteKind::Direct,
            RouteKind::Userspace,
            RouteKind::Haproxy,
        ]);
        for v in [30.0, 28.0, 29.0] {
            r.add(UP, RouteKind::Direct, v);
        }
        for v in [6.0, 6.2, 5.8] {
            r.add(UP, RouteKind::Userspace, v);
        }
        for v in [4.0, 4.0, 4.0] {
            r.add(UP, RouteKind::Haproxy, v);
        }
        r.add(Metric::LatencyP99, RouteKind::Userspace, 30.0);
        r.add(Metric::LatencyP99, RouteKind::Haproxy, 40.0);
        r.fail(
            Metric::ConnectRate,
            RouteKind::Userspace,
            "refused\nby peer".into(),
        );
        r
    }

    #[test]
    fn markdown_has_figures_ratios_targets_and_failures() {
        let md = sample_run().markdown();
        assert!(
            md.contains("| figure | unit | direct | clink userspace | haproxy |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| throughput, 1 stream, A→B | Gbit/s ↑ | 29.00 ±3% | 6.00 ±3% | 4.00 ±0% |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| new connections per second | conn/s ↑ | — | failed | — |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| clink userspace ÷ direct | clink userspace ÷ haproxy | haproxy ÷ direct |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| throughput, 1 stream, A→B | 0.21× | 1.50× | 0.14× |"),
            "{md}"
        );
        assert!(
            md.contains("| p99 latency ≤ haproxy's | met: 0.75× |"),
            "{md}"
        );
        // B→A was not measured, so the throughput target cannot be judged.
        assert!(
            md.contains("| single-stream throughput ≥ 1.5× haproxy | not measured |"),
            "{md}"
        );
        assert!(
            md.contains("- clink userspace, new connections per second: refused by peer"),
            "{md}"
        );
    }

    #[test]
    fn ktls_is_judged_against_userspace_without_failing_the_run() {
        let mut r = Results::new(vec![RouteKind::Userspace, RouteKind::Ktls]);
        let down = Metric::Throughput {
            streams: 1,
            reverse: true,
        };
        for (metric, userspace, ktls) in [
            (UP, 0.10, 0.15),
            (down, 0.10, 0.12),
            (Metric::CpuMachine { streams: 1 }, 200.0, 100.0),
            (Metric::CpuTunnel { streams: 1 }, 120.0, 30.0),
            (Metric::CpuTunnelUser { streams: 1 }, 80.0, 0.5),
        ] {
            r.add(metric, RouteKind::Userspace, userspace);
            r.add(metric, RouteKind::Ktls, ktls);
        }
        let md = r.markdown();
        assert!(md.contains("| clink ktls ÷ clink userspace |"), "{md}");
        assert!(
            md.contains(
                "| throughput ≥ 1.3× userspace | 1 stream, A→B: 1.50×, 1 stream, B→A: 1.20× \
                 | **MISS** |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| whole-machine CPU per GiB ≤ 0.6× userspace | 0.50× | PASS |"),
            "{md}"
        );
        assert!(
            md.contains("| agents' user-space CPU per GiB ≤ 0.1× userspace's | 0.006× | PASS |"),
            "{md}"
        );
        assert!(
            md.contains("| CPU per GiB, tunnel processes in user space | s/GiB ↓ | 80.0 | 0.500 |"),
            "{md}"
        );
        // Without haproxy there is nothing to hold the haproxy targets against.
        assert!(!md.contains("1.5× haproxy"), "{md}");
        assert!(!md.contains("Failures"), "{md}");
    }

    #[test]
    fn json_keeps_every_sample() {
        let json = sample_run().to_json();
        let figures = json["figures"].as_array().unwrap();
        let up = figures
            .iter()
            .find(|f| f["figure"] == UP.label() && f["route"] == "clink userspace")
            .unwrap();
        assert_eq!(up["samples"], serde_json::json!([6.0, 6.2, 5.8]));
        assert_eq!(up["median"], serde_json::json!(6.0));
    }

    #[test]
    fn pipelined_requests_are_judged_against_direct_and_haproxy() {
        let mut r = Results::new(vec![
            RouteKind::Direct,
            RouteKind::Userspace,
            RouteKind::Haproxy,
        ]);
        let small = Metric::PipelinedRate { response: 64 };
        let large = Metric::PipelinedRate { response: 1024 };
        for (route, rate) in [
            (RouteKind::Direct, 200_000.0),
            (RouteKind::Userspace, 130_000.0),
            (RouteKind::Haproxy, 100_000.0),
        ] {
            r.add(small, route, rate);
            r.add(large, route, rate / 2.0);
        }
        r.add(
            Metric::PipelinedCpu { response: 64 },
            RouteKind::Userspace,
            3.456,
        );
        r.add(
            Metric::PipelinedMachineCpu { response: 64 },
            RouteKind::Direct,
            0.987,
        );
        r.add(
            Metric::PipelinedMachineBusy { response: 64 },
            RouteKind::Userspace,
            87.34,
        );
        r.add(Metric::HttpRate, RouteKind::Direct, 45_678.9);
        let md = r.markdown();
        assert!(
            md.contains(
                "| CPU per pipelined request, whole machine, 64 B responses | µs ↓ | 0.99 | — \
                 | — |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| machine's CPUs busy during pipelined requests, 64 B responses | % | — | 87.3 \
                 | — |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| pipelined requests per second, 64 B responses | req/s ↑ | 200,000 | 130,000 \
                 | 100,000 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| pipelined requests per second, 1 KiB responses | req/s ↑ |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| CPU per pipelined request, tunnel processes, 64 B responses | µs ↓ | — | \
                 3.46 | — |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| HTTP requests per second (nginx, wrk) | req/s ↑ | 45,679 | — | — |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| pipelined requests per second, 64 B responses | 0.65× | 1.30× | 0.50× |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| requests per second ≥ 0.6× direct | 0.65× | PASS |"),
            "{md}"
        );
        assert!(
            md.contains("| requests per second ≥ 1.5× haproxy | 1.30× | **MISS** |"),
            "{md}"
        );
        // Runs without the scenario have no such table.
        assert!(!sample_run().markdown().contains("Small-request targets"));
    }
}
