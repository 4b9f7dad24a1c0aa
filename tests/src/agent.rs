//! One `clink-agent` process of a test, on either data path, and its CLI.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};
use clink_testbed::{
    bin_path, command_in, peer_reachable, start_agent, wait_for, AgentFiles, ChildGuard, Clink,
    Netns,
};

use clink_agent::{
    admin::types::{ConnectionInfo, ConnectionsResponse, StatusResponse},
    kernel::inspect::Inspection,
};

use crate::sockmap::SockmapSetup;

/// One agent process in one cluster, with its certificates, state, admin socket and log.
pub struct Agent {
    pub name: String,
    netns: String,
    files: AgentFiles,
    clink: Clink,
    child: Option<ChildGuard>,
    gateway_port: u16,
    /// More `clink-agent` flags.
    pub args: Vec<String>,
    /// Environment variables for the agent (e.g. `KUBECONFIG`).
    pub env: Vec<(String, String)>,
    /// Run on the sockmap data path, inside this cgroup (see [`SockmapSetup`]); `None`: the
    /// userspace data path.
    pub sockmap: Option<SockmapSetup>,
    /// Start the agent with this open-file limit (soft and hard, through `prlimit`).
    pub open_files: Option<u64>,
}

impl Agent {
    /// An agent named `name` in `ns`, keeping its files in `dir`, with certificates from
    /// `certs/<name>/` (not started).
    pub fn new(
        name: &str,
        ns: &Netns,
        dir: &Path,
        certs: &Path,
        gateway_port: u16,
    ) -> Result<Agent> {
        let files = AgentFiles::new(name, &certs.join(name), dir)?;
        Ok(Agent {
            name: name.to_owned(),
            netns: ns.name().to_owned(),
            clink: files.clink(&bin_path("clink")?),
            files,
            child: None,
            gateway_port,
            args: Vec::new(),
            env: Vec::new(),
            sockmap: None,
            open_files: None,
        })
    }

    pub fn admin(&self) -> PathBuf {
        self.files.admin()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.files.state()
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.files.certs().to_owned()
    }

    pub fn log_path(&self) -> PathBuf {
        self.files.log()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the agent and waits until its admin API answers.
    pub fn start(&mut self) -> Result<()> {
        let agent = bin_path("clink-agent")?;
        let mut cmd = match &self.sockmap {
            None => {
                // prlimit sets its own limit and executes the rest, as `ip netns exec` does:
                // the process stays the agent's.
                let mut cmd = match self.open_files {
                    Some(n) => {
                        let mut cmd = Command::new("prlimit");
                        cmd.arg(format!("--nofile={n}:{n}")).args(["--", "ip"]);
                        cmd
                    }
                    None => Command::new("ip"),
                };
                cmd.args(["netns", "exec", &self.netns]).arg(agent);
                cmd
            }
            Some(setup) => command_in(&setup.cgroup, &self.netns, agent),
        };
        self.files.configure(&mut cmd)?;
        cmd.args(["--listen", &format!("0.0.0.0:{}", self.gateway_port)])
            .args(["--log-level", "info,clink_agent=debug,clink_ebpf=debug"])
            .args(self.datapath_args())
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        // Generous: a debug build in a VM under software emulation (the kTLS tests) takes
        // well over 15 s to start and answer.
        let child = start_agent(&mut cmd, &self.files, Duration::from_secs(90), || {
            self.clink(&["status"]).is_ok_and(|o| o.status.success())
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops the agent with SIGTERM (SIGKILL after a grace period).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(child) = self.child.take() {
            child.stop()?;
        }
        Ok(())
    }

    /// Kills the agent with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// How many descriptors the agent has open now (0 when it does not run).
    pub fn open_fds(&self) -> usize {
        self.pid()
            .and_then(|pid| fs::read_dir(format!("/proc/{pid}/fd")).ok())
            .map_or(0, Iterator::count)
    }

    /// Sends SIGTERM and returns at once (see [`Agent::wait_exit`]).
    pub fn terminate(&self) -> Result<()> {
        let pid = self.pid().context("the agent does not run")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        Ok(())
    }

    /// Waits up to `within` for the agent to exit by itself; its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("the agent does not run")?;
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the agent did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's process id while it runs: to kill it from another thread than the one
    /// applying through it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `--datapath` and friends: tests never let an agent pick by itself, since `auto` would
    /// attach to the machine's root cgroup. With a [`SockmapSetup`] the agent attaches to its
    /// cgroup and pins there: the sockmap path, or the kTLS path's connect hooks when the test
    /// chose `--datapath` itself.
    fn datapath_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if !self.args.iter().any(|a| a == "--datapath") {
            let datapath = if self.sockmap.is_some() {
                "sockmap"
            } else {
                "userspace"
            };
            args.extend(["--datapath".to_owned(), datapath.to_owned()]);
        }
        if let Some(setup) = &self.sockmap {
            args.extend([
                "--cgroup".to_owned(),
                setup.cgroup.display().to_string(),
                "--bpf-pin-dir".to_owned(),
                setup.pin_dir.display().to_string(),
            ]);
        }
        args
    }

    /// `clink bpf -o json` for this agent's pin directory.
    pub fn bpf(&self) -> Result<Inspection> {
        let setup = self
            .sockmap
            .as_ref()
            .context("not on a data path with eBPF programs (no cgroup set up)")?;
        let out = self.clink_ok(&[
            "bpf",
            "--bpf-pin-dir",
            &setup.pin_dir.display().to_string(),
            "-o",
            "json",
        ])?;
        Ok(serde_json::from_str(&out)?)
    }

    /// Bytes `clink_skmsg` has spliced for this agent so far.
    pub fn skmsg_bytes(&self) -> Result<u64> {
        Ok(self.bpf()?.skmsg.bytes)
    }

    /// Bytes that went through `clink_skmsg`: redirected, or passed to the TCP stack by the
    /// flow control.
    pub fn skmsg_seen(&self) -> Result<u64> {
        let skmsg = self.bpf()?.skmsg;
        Ok(skmsg.bytes + skmsg.passed_bytes)
    }

    /// Runs `clink --admin <socket> args...`.
    pub fn clink(&self, args: &[&str]) -> Result<Output> {
        self.clink.run(args)
    }

    /// Runs clink and fails with its stderr unless it succeeds; returns stdout.
    pub fn clink_ok(&self, args: &[&str]) -> Result<String> {
        self.clink
            .ok(args)
            .with_context(|| format!("on {}", self.name))
    }

    /// `clink status -o json`.
    pub fn status(&self) -> Result<StatusResponse> {
        Ok(serde_json::from_str(
            &self.clink_ok(&["status", "-o", "json"])?,
        )?)
    }

    /// `clink connections -o json`: the open connections and each one's path.
    pub fn connections(&self) -> Result<Vec<ConnectionInfo>> {
        let answer: ConnectionsResponse =
            serde_json::from_str(&self.clink_ok(&["connections", "-o", "json"])?)?;
        Ok(answer.connections)
    }

    /// `clink apply -f -` with `yaml` on stdin; returns the whole output.
    pub fn apply(&self, yaml: &str) -> Result<Output> {
        let mut child = self
            .clink
            .command(&["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(yaml.as_bytes())?;
        Ok(child.wait_with_output()?)
    }

    /// Waits until this agent reports `peer` as reachable (`true`) or not.
    pub fn wait_reachable(&self, peer: &str, reachable: bool, within: Duration) -> Result<()> {
        wait_for(
            &format!("{} to see {peer} PeerReachable={reachable}", self.name),
            within,
            || {
                self.clink_ok(&["get", "peer", peer, "-o", "json"])
                    .ok()
                    .and_then(|out| serde_json::from_str(&out).ok())
                    .and_then(|peer| peer_reachable(&peer))
                    == Some(reachable)
            },
        )
    }

    /// Waits until the agent's log contains `needle`: for what neither a metric nor a typed
    /// CLI output tells.
    pub fn wait_log(&self, needle: &str) -> Result<()> {
        wait_for(
            &format!("{needle:?} in the log of {}", self.name),
            Duration::from_secs(10),
            || self.log().contains(needle),
        )
        .with_context(|| format!("log of {}:\n{}", self.name, self.log()))
    }
}
