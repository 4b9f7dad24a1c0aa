//! What the report says about the run itself: the command, the machine, the tools.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use super::progress::minutes;

/// What the report says about the run itself.
pub struct Meta {
    command: String,
    pub date: String,
    pub commit: String,
    machine: String,
    pub machine_short: String,
    tools: String,
    took: Duration,
}

impl Meta {
    /// `host`: empty on the host; in the VM of `--vm`, the host's command line and machine
    /// (see [`Meta::host`]).
    pub fn collect(started: Instant, host: &[String]) -> Self {
        // The first line of a command's output (stdout, else stderr) that contains `needle`.
        let line_with = |cmd: &mut Command, needle: &str| {
            cmd.output()
                .ok()
                .and_then(|out| {
                    let text = [out.stdout, out.stderr].concat();
                    String::from_utf8_lossy(&text)
                        .lines()
                        .find(|l| l.contains(needle))
                        .map(|l| {
                            let l = l.split(" - ").next().unwrap_or_default();
                            // wrk: "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 ..."
                            l.split(" Copyright")
                                .next()
                                .unwrap_or_default()
                                .trim()
                                .to_owned()
                        })
                })
                .unwrap_or_default()
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let (machine, machine_short) = machine();
        let tools = [
            line_with(Command::new("iperf3").arg("--version"), "iperf"),
            line_with(Command::new("haproxy").arg("-v"), "HAProxy"),
            line_with(Command::new("stunnel").arg("-version"), "stunnel "),
            line_with(Command::new("nginx").arg("-v"), "nginx version"),
            line_with(Command::new("wrk").arg("-v"), "wrk "),
        ]
        .into_iter()
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
        let (command, machine, machine_short) = match host {
            [command, host_machine] => (
                command.clone(),
                format!("{machine}: a VM, qemu under software emulation (TCG), on {host_machine}"),
                format!("VM ({machine_short}) under emulation"),
            ),
            _ => (
                format!("cargo xtask {}", args.join(" ")),
                machine,
                machine_short,
            ),
        };
        Self {
            command,
            date: line_with(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]), ""),
            commit: line_with(
                Command::new("git")
                    .args(["describe", "--always", "--dirty"])
                    .current_dir(env!("CARGO_MANIFEST_DIR")),
                "",
            ),
            machine,
            machine_short,
            tools,
            took: started.elapsed(),
        }
    }

    /// What `--vm` passes to the bench in the VM: this command line and this machine.
    pub fn host() -> [String; 2] {
        let args: Vec<String> = std::env::args().skip(1).collect();
        [format!("cargo xtask {}", args.join(" ")), machine().0]
    }

    /// The report's heading and what the run was: `method` says how each figure is taken.
    pub fn markdown(&self, reps: u32, method: &str) -> String {
        format!(
            "# ClusterLink-rs benchmark\n\n\
             `{}` · {} · commit {} · {}, setup and build included\n\n\
             - Machine: {}. Other work on it is not controlled, so absolute figures move between \
             runs; the ratios come from one run in which every route was measured in turn \
             (A B C A B C …).\n\
             - Each figure is the median of {} repetitions; ± is half the range, relative to the \
             median. Clients run in cluster A, servers in cluster B, two network namespaces \
             joined by a veth pair.\n\
             - {}.\n\
             - Tunnels: one process per side, TLS 1.3 only, the same ECDSA P-256 fabric \
             certificates (made by `clink`), client certificates verified against the fabric \
             CA, the same suites in the agents' order (AES-128-GCM first); haproxy and \
             stunnel as packaged by Debian, with their default session resumption.\n\
             - Tools: {}.\n",
            self.command,
            self.date,
            self.commit,
            minutes(self.took),
            self.machine,
            reps,
            method,
            self.tools
        )
    }

    pub fn json(&self, reps: u32, method: &str) -> serde_json::Value {
        serde_json::json!({
            "command": self.command,
            "date": self.date,
            "commit": self.commit,
            "machine": self.machine,
            "tools": self.tools,
            "reps": reps,
            "method": method,
        })
    }
}

/// This machine's CPUs and kernel: in full, and short (for the chart).
fn machine() -> (String, String) {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    (
        format!("{cores} × {cpu}, Linux {kernel}"),
        format!("{cores} cores, Linux {kernel}"),
    )
}
