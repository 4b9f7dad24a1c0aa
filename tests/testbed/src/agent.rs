//! One `clink-agent` process and the `clink` CLI that talks to it: where the agent keeps its
//! files, how it is started and waited for, and what its CLI reports. The caller decides
//! where the agent runs (a namespace, a cgroup) and with which further flags.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::logs::{last_lines, read_from};
use crate::process::{wait_for, ChildGuard};

/// How many log lines an error about an agent that died at start shows.
const LOG_TAIL: usize = 40;

/// Where one agent keeps its files, and the flags that tell it so.
#[derive(Clone, Debug)]
pub struct AgentFiles {
    name: String,
    certs: PathBuf,
    dir: PathBuf,
}

impl AgentFiles {
    /// Peer `name` with its certificates (`cert.pem`, `key.pem`, `ca.pem`) in `certs`; state,
    /// admin socket and log in `dir`, which is created.
    pub fn new(name: &str, certs: &Path, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self {
            name: name.to_owned(),
            certs: certs.to_owned(),
            dir: dir.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn certs(&self) -> &Path {
        &self.certs
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn admin(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// Adds `--name --certs --state --admin` to `cmd` (a `clink-agent` command line) and
    /// appends its output to the log file, so that a restarted agent's log follows the first.
    pub fn configure(&self, cmd: &mut Command) -> Result<()> {
        let log = self.log();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        cmd.args(["--name", &self.name, "--certs"])
            .arg(&self.certs)
            .arg("--state")
            .arg(self.state())
            .arg("--admin")
            .arg(self.admin())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(())
    }

    /// The CLI `bin` talking to this agent.
    pub fn clink(&self, bin: &Path) -> Clink {
        Clink {
            bin: bin.to_owned(),
            admin: self.admin(),
        }
    }
}

/// Spawns `cmd` (an agent configured by `files`) and waits until `ready` says it answers,
/// typically `clink status` through its admin socket. Fails if the agent exits first, with
/// the end of its log.
pub fn start_agent(
    cmd: &mut Command,
    files: &AgentFiles,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<ChildGuard> {
    let mut child = ChildGuard::spawn(cmd)?;
    let waited = wait_for(
        &format!("agent {} to answer on its admin socket", files.name),
        timeout,
        || matches!(child.try_wait(), Ok(Some(_))) || ready(),
    );
    if let Ok(Some(status)) = child.try_wait() {
        bail!(
            "agent {} exited with {status} at start; its log ends with:\n{}",
            files.name,
            last_lines(&read_from(&files.log(), 0), LOG_TAIL).join("\n")
        );
    }
    waited?;
    Ok(child)
}

/// `clink --admin <socket>`: the CLI of one agent.
#[derive(Clone, Debug)]
pub struct Clink {
    bin: PathBuf,
    admin: PathBuf,
}

impl Clink {
    /// `clink --admin <socket> args...`, to run; stdin is empty.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--admin")
            .arg(&self.admin)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `clink --admin <socket> args...` and returns its output, failed or not.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = self.command(args);
        cmd.output().with_context(|| format!("run {cmd:?}"))
    }

    /// Runs clink and fails with its stderr unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        checked(args, self.run(args)?)
    }
}

/// The stdout of `clink args...`, or an error with its stderr if it failed.
pub fn checked(args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "clink {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The status of the `PeerReachable` condition in a Peer as `clink get peer <name> -o json`
/// prints it; `None` before the first heartbeat decided.
pub fn peer_reachable(peer: &serde_json::Value) -> Option<bool> {
    match peer["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "PeerReachable")?["status"]
        .as_str()?
    {
        "True" => Some(true),
        "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_peer_reachable_condition() {
        let peer = |status: &str| {
            serde_json::json!({
                "kind": "Peer",
                "status": {"conditions": [
                    {"type": "Other", "status": "True"},
                    {"type": "PeerReachable", "status": status, "reason": "Heartbeat"}
                ]}
            })
        };
        assert_eq!(peer_reachable(&peer("True")), Some(true));
        assert_eq!(peer_reachable(&peer("False")), Some(false));
        assert_eq!(peer_reachable(&peer("Unknown")), None);
        assert_eq!(peer_reachable(&serde_json::json!({"status": {}})), None);
    }

    #[test]
    fn files_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let files =
            AgentFiles::new("peer-a", Path::new("/certs/peer-a"), &dir.path().join("a")).unwrap();
        let mut cmd = Command::new("clink-agent");
        files.configure(&mut cmd).unwrap();
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let a = dir.path().join("a");
        assert_eq!(
            args,
            [
                "--name".to_owned(),
                "peer-a".to_owned(),
                "--certs".to_owned(),
                "/certs/peer-a".to_owned(),
                "--state".to_owned(),
                a.join("state").display().to_string(),
                "--admin".to_owned(),
                a.join("admin.sock").display().to_string(),
            ]
        );
        assert!(
            files.log().exists(),
            "the log is opened before the agent starts"
        );
    }

    #[test]
    fn an_agent_that_dies_at_start_shows_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let files = AgentFiles::new("peer-a", dir.path(), dir.path()).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'bad flag --frobnicate' >&2; exit 2"]);
        files.configure(&mut cmd).unwrap();
        let err = start_agent(&mut cmd, &files, Duration::from_secs(10), || false).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("bad flag --frobnicate"), "{err}");
        assert!(err.contains("peer-a"), "{err}");
    }
}
