//! End-to-end harness: real `clink-agent` processes in network-namespace clusters, configured
//! with the real `clink` CLI, and traffic whose content is checked by SHA-256.

use std::{
    fs,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use clink_testbed::{bin_path, wait_for, ChildGuard, Netns, Topology};
use sha2::{Digest as _, Sha256};

pub use clink_testbed::require_root;

pub const GATEWAY_PORT: u16 = 443;

/// One agent process in one cluster, with its certificates, state, admin socket and log.
pub struct Agent {
    pub name: String,
    netns: String,
    dir: PathBuf,
    child: Option<ChildGuard>,
    gateway_port: u16,
    /// More `clink-agent` flags.
    pub args: Vec<String>,
    /// Run on the sockmap data path, inside this cgroup (see [`SockmapSetup`]); `None`: the
    /// userspace data path.
    pub sockmap: Option<SockmapSetup>,
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
        fs::create_dir_all(dir)?;
        std::os::unix::fs::symlink(certs, dir.join("certs"))?;
        Ok(Agent {
            name: name.to_owned(),
            netns: ns.name().to_owned(),
            dir: dir.to_owned(),
            child: None,
            gateway_port,
            args: Vec::new(),
            sockmap: None,
        })
    }

    pub fn admin(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.dir.join("certs").join(&self.name)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the agent and waits until its admin API answers.
    pub fn start(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = match &self.sockmap {
            None => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &self.netns]);
                cmd
            }
            Some(setup) => setup.command(&self.netns),
        };
        cmd.arg(bin_path("clink-agent")?)
            .args(["--name", &self.name])
            .arg("--certs")
            .arg(self.certs_dir())
            .arg("--state")
            .arg(self.state_dir())
            .args(["--listen", &format!("0.0.0.0:{}", self.gateway_port)])
            .arg("--admin")
            .arg(self.admin())
            .args(["--log-level", "info,clink_agent=debug,clink_ebpf=debug"])
            .args(self.datapath_args())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = ChildGuard::spawn(&mut cmd)?;
        let ready = wait_for(
            &format!("agent {} to answer on its admin socket", self.name),
            Duration::from_secs(15),
            || {
                matches!(child.try_wait(), Ok(Some(_)))
                    || self.clink(&["status"]).is_ok_and(|o| o.status.success())
            },
        );
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "agent {} exited with {status} at start:\n{}",
                self.name,
                self.log()
            );
        }
        ready?;
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

    // --- sockmap data path (issue 4) ---

    /// `--datapath` and friends: tests never let an agent pick by itself, since `auto` would
    /// attach to the machine's root cgroup.
    fn datapath_args(&self) -> Vec<String> {
        if self.args.iter().any(|a| a == "--datapath") {
            return Vec::new();
        }
        match &self.sockmap {
            None => vec!["--datapath".into(), "userspace".into()],
            Some(setup) => vec![
                "--datapath".into(),
                "sockmap".into(),
                "--cgroup".into(),
                setup.cgroup.display().to_string(),
                "--bpf-pin-dir".into(),
                setup.pin_dir.display().to_string(),
            ],
        }
    }

    /// Kills the agent with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// `clink bpf -o json` for this agent's pin directory.
    pub fn bpf(&self) -> Result<serde_json::Value> {
        let setup = self
            .sockmap
            .as_ref()
            .context("not on the sockmap data path")?;
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
        self.skmsg("bytes")
    }

    /// Bytes that went through `clink_skmsg`: redirected, or passed to the TCP stack by the
    /// flow control.
    pub fn skmsg_seen(&self) -> Result<u64> {
        Ok(self.skmsg("bytes")? + self.skmsg("passed_bytes")?)
    }

    /// A counter of `clink_skmsg` (`bytes`, `messages`, `passed_bytes`, `fallbacks`,
    /// `resumes`), from `clink bpf -o json`.
    pub fn skmsg(&self, counter: &str) -> Result<u64> {
        self.bpf()?["skmsg"][counter]
            .as_u64()
            .with_context(|| format!("clink bpf: no skmsg.{counter}"))
    }

    // --- end sockmap data path ---

    /// Runs `clink --admin <socket> args...`.
    pub fn clink(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(bin_path("clink")?)
            .arg("--admin")
            .arg(self.admin())
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// Runs clink and fails with its stderr unless it succeeds; returns stdout.
    pub fn clink_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.clink(args)?;
        if !out.status.success() {
            bail!(
                "clink {args:?} on {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `clink apply -f -` with `yaml` on stdin; returns the whole output.
    pub fn apply(&self, yaml: &str) -> Result<Output> {
        let mut child = Command::new(bin_path("clink")?)
            .arg("--admin")
            .arg(self.admin())
            .args(["apply", "-f", "-"])
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

    /// The `PeerReachable` condition status (`True`/`False`) this agent reports for `peer`.
    pub fn peer_reachable(&self, peer: &str) -> Option<String> {
        let out = self.clink_ok(&["get", "peer", peer, "-o", "json"]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "PeerReachable")
            .and_then(|c| c["status"].as_str())
            .map(str::to_owned)
    }

    /// Waits until this agent reports `peer` as reachable (`true`) or not.
    pub fn wait_reachable(&self, peer: &str, reachable: bool, within: Duration) -> Result<()> {
        let want = if reachable { "True" } else { "False" };
        wait_for(
            &format!("{} to see {peer} PeerReachable={want}", self.name),
            within,
            || self.peer_reachable(peer).as_deref() == Some(want),
        )
    }

    /// Waits until the agent's log contains `needle`.
    pub fn wait_log(&self, needle: &str) -> Result<()> {
        wait_for(
            &format!("{needle:?} in the log of {}", self.name),
            Duration::from_secs(10),
            || self.log().contains(needle),
        )
        .with_context(|| format!("log of {}:\n{}", self.name, self.log()))
    }
}

/// Clusters with one agent each, all of one fabric, each knowing the others as Peers.
pub struct Fabric {
    pub agents: Vec<Agent>,
    /// Per cluster on the sockmap data path: the process that makes sockets in its cgroup.
    sockets: Vec<Sockets>,
    pub topo: Topology,
    pub dir: tempfile::TempDir,
    /// The data path every agent runs.
    pub datapath: Datapath,
    /// Per cluster on the sockmap data path: its cgroup and pin directory. Declared last, so
    /// they go after every process in them.
    pub sandboxes: Vec<SockmapSandbox>,
}

pub const FABRIC: &str = "test-fabric";

impl Fabric {
    /// Two clusters (agents `peer-a` and `peer-b`) joined by a veth pair.
    pub fn two_clusters() -> Result<Fabric> {
        Self::on(clink_testbed::two_clusters()?, Datapath::Userspace)
    }

    /// Two clusters whose agents run `datapath`; on the sockmap data path each cluster gets a
    /// cgroup of its own, with its agent in it, and [`Fabric::listen`] and
    /// [`Fabric::connect`] make their sockets inside it.
    pub fn two_clusters_on(datapath: Datapath) -> Result<Fabric> {
        Self::on(clink_testbed::two_clusters()?, datapath)
    }

    /// Three clusters (`peer-a`, `peer-b`, `peer-c`) on one bridged "wan".
    pub fn three_clusters() -> Result<Fabric> {
        Self::on(clink_testbed::three_clusters()?, Datapath::Userspace)
    }

    pub fn c(&self) -> &Agent {
        &self.agents[2]
    }

    pub fn ns_c(&self) -> &Netns {
        self.topo.c().netns()
    }

    /// Every agent is labelled `cluster=<its letter>`.
    fn on(topo: Topology, datapath: Datapath) -> Result<Fabric> {
        let dir = tempfile::Builder::new().prefix("clink-e2e-").tempdir()?;
        let certs = dir.path().join("certs");
        fs::create_dir_all(&certs)?;
        run(Command::new(bin_path("clink")?)
            .args(["fabric", "create", "--name", FABRIC, "--path"])
            .arg(&certs))?;
        let mut agents = Vec::new();
        for (i, cluster) in topo.clusters().iter().enumerate() {
            let name = format!("peer-{}", (b'a' + i as u8) as char);
            run(Command::new(bin_path("clink")?)
                .args(["peer-cert", "create", "--name", &name, "--fabric", FABRIC])
                .arg("--path")
                .arg(&certs))?;
            let mut agent = Agent::new(
                &name,
                cluster.netns(),
                &dir.path().join(&name),
                &certs,
                GATEWAY_PORT,
            )?;
            agent.args = vec!["--label".into(), format!("cluster={}", &name[5..])];
            agents.push(agent);
        }
        let mut fabric = Fabric {
            agents,
            sockets: Vec::new(),
            topo,
            dir,
            datapath,
            sandboxes: Vec::new(),
        };
        if datapath == Datapath::Sockmap {
            for (i, agent) in fabric.agents.iter_mut().enumerate() {
                let sandbox = SockmapSandbox::new(&agent.name)?;
                agent.sockmap = Some(sandbox.setup.clone());
                let sockets =
                    Sockets::start(fabric.topo.clusters()[i].netns(), &sandbox.setup.cgroup);
                fabric.sandboxes.push(sandbox);
                fabric.sockets.push(sockets?);
            }
        }
        for agent in &mut fabric.agents {
            agent.start()?;
        }
        for (i, agent) in fabric.agents.iter().enumerate() {
            for (j, other) in fabric.agents.iter().enumerate() {
                if i != j {
                    let ip = fabric.topo.clusters()[j].ip().to_string();
                    agent.clink_ok(&["create", "peer", &other.name, "--host", &ip])?;
                }
            }
        }
        Ok(fabric)
    }

    pub fn a(&self) -> &Agent {
        &self.agents[0]
    }

    /// A listener on `127.0.0.1`, port chosen by the kernel, in cluster `i` (0 = a): inside
    /// the cluster's cgroup on the sockmap data path, so that its accepted sockets are too.
    pub fn listen(&self, i: usize) -> Result<TcpListener> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        match self.sockets.get(i) {
            Some(sockets) => Ok(sockets.listen(any)?),
            None => listen_in(self.topo.clusters()[i].netns()),
        }
    }

    /// A client connection from cluster `i` (0 = a): from inside the cluster's cgroup on the
    /// sockmap data path.
    pub fn connect(&self, i: usize, addr: SocketAddr) -> io::Result<TcpStream> {
        match self.sockets.get(i) {
            Some(sockets) => sockets.connect(addr),
            None => connect_in(self.topo.clusters()[i].netns(), addr),
        }
    }

    /// The socket maker inside cluster `i`'s cgroup (sockmap data path only).
    pub fn sockets(&self, i: usize) -> Option<&Sockets> {
        self.sockets.get(i)
    }

    pub fn b(&self) -> &Agent {
        &self.agents[1]
    }

    pub fn ns_a(&self) -> &Netns {
        self.topo.a().netns()
    }

    pub fn ns_b(&self) -> &Netns {
        self.topo.b().netns()
    }

    /// An allow-everything AccessPolicy on every agent.
    pub fn allow_all(&self) -> Result<()> {
        for agent in &self.agents {
            agent.clink_ok(&["create", "policy", "allow-all", "--action", "allow"])?;
        }
        Ok(())
    }

    /// Exports `target` (an address inside cluster b) from b as `name` and imports it into a
    /// on `port`.
    pub fn export_import(&self, name: &str, target: SocketAddr, port: u16) -> Result<()> {
        self.b().clink_ok(&[
            "create",
            "export",
            name,
            "--host",
            &target.ip().to_string(),
            "--port",
            &target.port().to_string(),
        ])?;
        self.a().clink_ok(&[
            "create",
            "import",
            name,
            "--port",
            &port.to_string(),
            "--peer",
            &self.b().name,
        ])?;
        Ok(())
    }
}

// --- sockmap data path (issue 4) ---

/// The data path a fabric's agents run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datapath {
    Userspace,
    Sockmap,
}

impl Datapath {
    /// As `clink status` and the `clink_datapath` metric show it.
    pub fn name(self) -> &'static str {
        match self {
            Datapath::Userspace => "userspace",
            Datapath::Sockmap => "sockmap",
        }
    }
}

/// Where a sockmap agent runs and pins (plain paths; a [`SockmapSandbox`] owns them).
#[derive(Clone, Debug)]
pub struct SockmapSetup {
    /// The agent runs in this cgroup and attaches its programs to it.
    pub cgroup: PathBuf,
    /// `--bpf-pin-dir`.
    pub pin_dir: PathBuf,
}

impl SockmapSetup {
    /// A command that runs its arguments in this cgroup and in network namespace `netns`.
    /// `nsenter --net`, not `ip netns exec`: the latter also gives the process a mount
    /// namespace with a fresh /sys, without the cgroup and bpf file systems.
    fn command(&self, netns: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            r#"echo $$ > "$0/cgroup.procs" && exec "$@""#,
            &self.cgroup.display().to_string(),
            "nsenter",
            &format!("--net=/run/netns/{netns}"),
        ]);
        cmd
    }
}

/// A cgroup and a pin directory for one test cluster, uniquely named, removed on drop (also
/// when a test fails): the processes left in the cgroup are killed first.
pub struct SockmapSandbox {
    pub setup: SockmapSetup,
}

impl SockmapSandbox {
    pub fn new(role: &str) -> Result<SockmapSandbox> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "clink-test-{}-{}-{role}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let root = clink_agent::kernel::host::cgroup2_root()?;
        let cgroup = root.join(&name);
        fs::create_dir(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        Ok(SockmapSandbox {
            setup: SockmapSetup {
                cgroup,
                pin_dir: Path::new("/sys/fs/bpf").join(name),
            },
        })
    }
}

impl Drop for SockmapSandbox {
    fn drop(&mut self) {
        let SockmapSetup { cgroup, pin_dir } = &self.setup;
        // An agent that was killed leaves its pins: those are ours to remove.
        if let Err(e) = fs::remove_dir_all(pin_dir) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("cleanup: removing {}: {e}", pin_dir.display());
            }
        }
        let _ = fs::write(cgroup.join("cgroup.kill"), "1");
        let removed = wait_for(
            &format!("cgroup {} to be removable", cgroup.display()),
            Duration::from_secs(10),
            || match fs::remove_dir(cgroup) {
                Ok(()) => true,
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            },
        );
        if let Err(e) = removed {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// A `clink-sockets` process in a cluster's network namespace and cgroup that makes sockets
/// for the test: sockets belong to their creator's cgroup for life, so a client or service
/// made there is one the cgroup's eBPF programs act on, while the test drives it.
pub struct Sockets {
    control: std::sync::Mutex<std::os::unix::net::UnixStream>,
    _child: ChildGuard,
}

impl Sockets {
    pub fn start(netns: &Netns, cgroup: &Path) -> Result<Sockets> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", netns.name()))
            .arg(bin_path("clink-sockets")?)
            .arg(cgroup)
            .stdin(std::os::fd::OwnedFd::from(theirs))
            .stdout(Stdio::null());
        let child = ChildGuard::spawn(&mut cmd)?;
        Ok(Sockets {
            control: std::sync::Mutex::new(ours),
            _child: child,
        })
    }

    /// A listening socket bound to `addr`.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        Ok(TcpListener::from(self.request(&format!("listen {addr}"))?))
    }

    /// A socket of the cgroup connected to `addr` (by the calling thread, blocking).
    pub fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        use std::os::fd::AsRawFd as _;
        let family = if addr.is_ipv4() { 4 } else { 6 };
        let socket = self.request(&format!("socket {family}"))?;
        let target = nix::sys::socket::SockaddrStorage::from(addr);
        nix::sys::socket::connect(socket.as_raw_fd(), &target).map_err(io::Error::from)?;
        Ok(TcpStream::from(socket))
    }

    fn request(&self, line: &str) -> io::Result<std::os::fd::OwnedFd> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::os::fd::{AsRawFd as _, FromRawFd as _};
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(control, "{line}")?;
        let mut buf = [0u8; 512];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            control.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fd = None;
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                // SAFETY: the kernel just installed these descriptors in this process.
                fd = fds
                    .first()
                    .map(|&fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
            }
        }
        let len = msg.bytes;
        match fd {
            Some(fd) => Ok(fd),
            None if len == 0 => Err(io::Error::other("clink-sockets exited")),
            None => Err(io::Error::other(format!(
                "clink-sockets: {}",
                String::from_utf8_lossy(&buf[1..len])
            ))),
        }
    }
}

// --- end sockmap data path ---

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `GET /metrics` from the agent in `ns` (default metrics address).
pub fn scrape(ns: &Netns) -> Result<String> {
    let mut s = connect_in(ns, SocketAddr::from(([127, 0, 0, 1], 9090)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The value of one sample (`name{labels}`) in a scrape, 0 when absent.
pub fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A service answering every connection with its name, until dropped.
pub struct NamedService {
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NamedService {
    pub fn start(ns: &Netns, name: &str) -> Result<NamedService> {
        let listener = listen_in(ns)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let name = name.to_owned();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(name.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(NamedService {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for NamedService {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects through a tunnel and returns what the service said (empty when refused).
pub fn ask(ns: &Netns, addr: SocketAddr) -> String {
    let Ok(mut s) = connect_in(ns, addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A listener inside `ns` on loopback, port chosen by the kernel.
pub fn listen_in(ns: &Netns) -> Result<TcpListener> {
    Ok(ns.enter(|| TcpListener::bind("127.0.0.1:0"))?)
}

/// A client connection from inside `ns`.
pub fn connect_in(ns: &Netns, addr: SocketAddr) -> io::Result<TcpStream> {
    ns.enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
}

/// Deterministic pseudo-random bytes (xorshift), so each side can hash what it sent.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Writes `len` pattern bytes in writes of `chunk` bytes; returns their SHA-256.
pub fn send_pattern(
    w: &mut impl Write,
    seed: u64,
    len: usize,
    chunk: usize,
) -> io::Result<[u8; 32]> {
    let mut pattern = Pattern::new(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; chunk];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk);
        pattern.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        hash.update(&buf[..n]);
        left -= n;
    }
    Ok(hash.finalize().into())
}

/// A blocking reader that waits out spurious `WouldBlock`s.
///
/// On a socket in a sockmap (the sockmap data path splices the client's and the service's
/// sockets), the kernel's `tcp_bpf_recvmsg` answers a *blocking* read with EAGAIN when its
/// wait is woken without data, e.g. by an ACK or a write on the same socket (seen on Linux
/// 6.18). Only for streams without a read timeout, where `WouldBlock` means nothing else.
pub struct Patient<R>(pub R);

impl<R: Read> Read for Patient<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                result => return result,
            }
        }
    }
}

/// Reads to end of stream; returns the byte count and SHA-256. The stream must have no read
/// timeout: `WouldBlock` is waited out (see [`Patient`]).
pub fn read_hash(r: &mut impl Read) -> io::Result<(usize, [u8; 32])> {
    let mut r = Patient(r);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n;
    }
}

/// What one side of a two-way transfer sent and received.
#[derive(Debug, PartialEq, Eq)]
pub struct Transfer {
    pub sent: [u8; 32],
    pub received_len: usize,
    pub received: [u8; 32],
}

/// Sends `len` bytes of pattern `seed` on `stream` while reading everything the other side
/// sends; half-closes after sending.
pub fn exchange(stream: TcpStream, seed: u64, len: usize, chunk: usize) -> io::Result<Transfer> {
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> io::Result<[u8; 32]> {
        let digest = send_pattern(&mut writer, seed, len, chunk)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(digest)
    });
    let mut reader = stream;
    let (received_len, received) = read_hash(&mut reader)?;
    let sent = sender.join().expect("sender thread panicked")?;
    Ok(Transfer {
        sent,
        received_len,
        received,
    })
}

/// The SHA-256 of `len` bytes of pattern `seed`.
pub fn pattern_digest(seed: u64, len: usize) -> [u8; 32] {
    send_pattern(&mut io::sink(), seed, len, 64 * 1024).expect("a sink never fails")
}

/// True when `stream` yields no data and ends (reset or EOF) within a few seconds: how a
/// refused tunneled connection looks to its client.
pub fn refused(stream: &mut TcpStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(15)));
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ),
    }
}

/// Connects from `ns` to `addr` and tells whether the connection was refused as a tunneled
/// connection is: no data, then reset or end. The agent can reset so fast that `connect`
/// itself reports it.
pub fn refused_at(ns: &Netns, addr: SocketAddr) -> bool {
    match connect_in(ns, addr) {
        Ok(mut stream) => refused(&mut stream),
        Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
    }
}

/// Reads the files of a directory tree, for "nothing was written" checks.
pub fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let data = fs::read(&p).unwrap_or_default();
                out.push((p, data));
            }
        }
    }
    out.sort();
    out
}
