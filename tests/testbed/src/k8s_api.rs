//! A Kubernetes API server for tests: the emulator tests/k8s/apiserver.py (no real API server
//! is obtainable here, DESIGN.md §9), one process per [`ApiServer`], on the address a test
//! gives it, optionally inside a network namespace, with its own kubeconfig and request log.
//!
//! ```no_run
//! use clink_testbed::ApiServer;
//! let api = ApiServer::start_with_crds(None, "127.0.0.1:0".parse()?)?;
//! api.kubectl(&["apply", "-f", "docs/examples/import.yaml"])?;
//! // kube-rs: kube::Config::new(api.url().parse()?) or the kubeconfig file, see url().
//! assert!(api.requests()?.iter().any(|r| r.method == "POST"));
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! What the emulator does and does not do is written at the top of tests/tests/k8s_api.rs.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::k8s_tools::{apiserver_script, k8s_python_path, kubectl_path};
use crate::{last_lines, names, wait_for, ChildGuard, Netns};

/// How long the emulator may take to listen: Python starts slowly on a busy 2-core builder.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The role in the names of emulator directories (`clk-<pid>-<n>-kapi`).
const DIR_ROLE: &str = "kapi";

/// The CRDs the chart installs (`charts/clusterlink/crds`).
pub fn chart_crds_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../charts/clusterlink/crds"
    ))
}

/// A running emulator. Dropping it stops the process (SIGTERM, then SIGKILL) and removes its
/// directory (kubeconfig, request log, output, kubectl's discovery cache).
#[derive(Debug)]
pub struct ApiServer {
    // Declared first so that it drops first: the process stops before its files go.
    child: ChildGuard,
    dir: TempDir,
    addr: SocketAddr,
    netns: Option<String>,
}

/// One request the emulator received, as it logged it before handling it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiRequest {
    pub method: String,
    pub path: String,
    /// The query parameters (the last value of a repeated one).
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub body: String,
}

impl ApiRequest {
    /// The body parsed as JSON (server-side apply bodies may be YAML: parse those yourself).
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("body of {} {} is not JSON", self.method, self.path))
    }

    /// The query parameter `name`, if given.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    /// Whether this is a watch (`?watch=true`).
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }
}

impl ApiServer {
    /// Starts an emulator that serves the built-in resources only (CRDs applied to it add
    /// theirs), listening on `listen` (port 0 picks a free one) inside `netns` if given, and
    /// waits until it listens. Fails with the emulator's output if it does not start.
    pub fn start(netns: Option<&Netns>, listen: SocketAddr) -> Result<Self> {
        Self::spawn(netns, listen, &[])
    }

    /// Like [`start`](Self::start), with the chart's CRDs served from the beginning, as after
    /// `helm install`.
    pub fn start_with_crds(netns: Option<&Netns>, listen: SocketAddr) -> Result<Self> {
        Self::spawn(netns, listen, &[chart_crds_dir()])
    }

    fn spawn(netns: Option<&Netns>, listen: SocketAddr, crds: &[PathBuf]) -> Result<Self> {
        let dir = TempDir::new(DIR_ROLE)?;
        let ready = dir.path().join("ready");
        let output = dir.path().join("output.log");
        let log = fs::File::create(&output).context("create the emulator's output file")?;
        let mut cmd = match netns {
            Some(netns) => netns.command(k8s_python_path()),
            None => Command::new(k8s_python_path()),
        };
        cmd.arg(apiserver_script())
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--ready-file")
            .arg(&ready)
            .arg("--request-log")
            .arg(dir.path().join("requests.jsonl"))
            // If this process is killed before the guard can stop the emulator, it stops itself.
            .arg("--parent-pid")
            .arg(std::process::id().to_string());
        for crd in crds {
            cmd.arg("--crds").arg(crd);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // `ip netns exec` execs the program, so the guard's signals reach the emulator itself.
        let mut child = ChildGuard::spawn(&mut cmd)?;
        let mut exited = None;
        let started = wait_for("the API emulator to listen", START_TIMEOUT, || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return true;
            }
            ready.is_file()
        });
        let failure = |what: String| {
            let text = fs::read_to_string(&output).unwrap_or_default();
            anyhow::anyhow!(
                "{what}; its output ends:\n{}",
                last_lines(&text, 30).join("\n")
            )
        };
        if let Some(status) = exited {
            return Err(failure(format!("the API emulator exited with {status}")));
        }
        started.map_err(|e| failure(format!("{e:#}")))?;
        let bound = fs::read_to_string(&ready).context("read the emulator's ready file")?;
        let addr: SocketAddr = bound
            .trim()
            .parse()
            .with_context(|| format!("the emulator reported address {bound:?}"))?;
        let server = Self {
            child,
            dir,
            addr,
            netns: netns.map(|n| n.name().to_owned()),
        };
        fs::write(server.kubeconfig(), server.kubeconfig_text())
            .context("write the emulator's kubeconfig")?;
        Ok(server)
    }

    /// The address it listens on (with the port it picked if it was given port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`: plain HTTP, which kube-rs accepts as a cluster URL
    /// (`kube::Config::new(api.url().parse()?)`, namespace "default").
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file for it: one cluster with server [`url`](Self::url), one user with no
    /// credentials, namespace `default`. kube-rs reads it with
    /// `Kubeconfig::read_from(path)` + `Config::from_custom_kubeconfig`, as kubectl does.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn kubeconfig_text(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: emulator\n  cluster:\n    server: {}\n\
             users:\n\
             - name: emulator\n  user: {{}}\n\
             contexts:\n\
             - name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: default\n\
             current-context: emulator\n",
            self.url()
        )
    }

    /// Runs kubectl with this server's kubeconfig (in its network namespace, if it has one)
    /// and returns its stdout; fails with its stderr if it fails.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with_input(args, None)
    }

    /// [`kubectl`](Self::kubectl) with `input` on its stdin (for `apply -f -`).
    pub fn kubectl_input(&self, args: &[&str], input: &str) -> Result<String> {
        self.kubectl_with_input(args, Some(input))
    }

    /// The kubectl command [`kubectl`](Self::kubectl) runs, for a test that spawns it itself
    /// (`kubectl get -w` runs until it is stopped).
    pub fn kubectl_command(&self, args: &[&str]) -> Command {
        let mut cmd = match &self.netns {
            Some(name) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", name]).arg(kubectl_path());
                cmd
            }
            None => Command::new(kubectl_path()),
        };
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(self.dir.path().join("kubectl-cache"))
            .args(args);
        cmd
    }

    fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> Result<String> {
        let mut cmd = self.kubectl_command(args);
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("run {cmd:?}"))?;
        if let Some(input) = input {
            let mut stdin = child.stdin.take().context("kubectl's stdin")?;
            stdin.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `GET path` (for example `/apis/clusterlink.net/v1alpha1`), parsed.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        let text = self.kubectl(&["get", "--raw", path])?;
        serde_json::from_str(&text).with_context(|| format!("GET {path} returned {text:?}"))
    }

    /// Makes the emulator forget its watch history, so a watch from an older resource version
    /// gets the `410 Gone` (reason Expired) a compacted etcd gives.
    pub fn compact(&self) -> Result<()> {
        let empty = self.dir.path().join("empty.json");
        fs::write(&empty, "{}")?;
        let empty = empty.to_string_lossy().into_owned();
        self.kubectl(&["create", "--raw", "/_emulator/compact", "-f", &empty])
            .map(drop)
    }

    /// Every request so far, in order (requests the harness itself made through kubectl
    /// included).
    pub fn requests(&self) -> Result<Vec<ApiRequest>> {
        let path = self.dir.path().join("requests.jsonl");
        let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        text.lines()
            .map(|line| parse_request(line).with_context(|| format!("request log line {line:?}")))
            .collect()
    }

    /// Stops the emulator (SIGTERM) and returns how it exited: success if it shut down cleanly.
    pub fn stop(self) -> Result<ExitStatus> {
        let Self { child, dir, .. } = self;
        let status = child.stop();
        drop(dir);
        status
    }
}

/// Removes the directories of emulators whose test process was killed before it could (the
/// emulators themselves exit when that process is gone: `--parent-pid`).
pub(crate) fn remove_stale() -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let tmp = std::env::temp_dir();
    for entry in fs::read_dir(&tmp).with_context(|| format!("read {}", tmp.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(&format!("-{DIR_ROLE}")) && names::is_stale(&name) {
            fs::remove_dir_all(entry.path())
                .with_context(|| format!("remove {}", entry.path().display()))?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

fn parse_request(line: &str) -> Result<ApiRequest> {
    let value: Value = serde_json::from_str(line)?;
    let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_owned);
    let query = value
        .get("query")
        .and_then(Value::as_object)
        .map(|q| {
            q.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    Ok(ApiRequest {
        method: text("method").context("no method")?,
        path: text("path").context("no path")?,
        query,
        content_type: text("contentType"),
        body: text("body").unwrap_or_default(),
    })
}

/// A uniquely named directory under the system's temporary directory, removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new(role: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(names::unique_name(role));
        fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("testbed: removing {}: {e}", self.0.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_only_the_directories_of_dead_processes() {
        let mut exited = Command::new("true").spawn().unwrap();
        let dead_pid = exited.id();
        exited.wait().unwrap();
        let tmp = std::env::temp_dir();
        let dead = tmp.join(format!("{}{dead_pid}-0-{DIR_ROLE}", names::PREFIX));
        let alive = TempDir::new(DIR_ROLE).unwrap();
        fs::create_dir_all(dead.join("kubectl-cache")).unwrap();
        let removed = remove_stale().unwrap();
        assert!(removed.contains(&dead), "{removed:?}");
        assert!(!dead.exists());
        assert!(alive.path().is_dir());
    }

    #[test]
    fn parses_a_request_log_line() {
        let line = r#"{"method": "PATCH", "path": "/api/v1/namespaces/default/services/s", "query": {"fieldManager": "clink"}, "contentType": "application/apply-patch+yaml", "body": "{\"a\": 1}"}"#;
        let request = parse_request(line).unwrap();
        assert_eq!(request.method, "PATCH");
        assert_eq!(request.param("fieldManager"), Some("clink"));
        assert_eq!(
            request.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        assert_eq!(request.json().unwrap()["a"], 1);
        assert!(!request.is_watch());
    }
}
