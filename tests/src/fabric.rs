//! A fabric of test clusters: one agent per cluster, each knowing the others as Peers.

use std::{
    io,
    net::{SocketAddr, TcpListener, TcpStream},
};

use anyhow::{Context as _, Result};
use clink_testbed::{bin_path, make_certificates, Netns, Pod, Topology};

use crate::agent::Agent;
use crate::sockmap::{Datapath, Sockets, SockmapSandbox};
use crate::traffic::{connect_in, listen_in};

pub const GATEWAY_PORT: u16 = 443;

/// Clusters with one agent each, all of one fabric, each knowing the others as Peers.
pub struct Fabric {
    pub agents: Vec<Agent>,
    /// Per cluster on the sockmap data path: the process that makes sockets in its cgroup.
    sockets: Vec<Sockets>,
    pub topo: Topology,
    pub dir: tempfile::TempDir,
    /// The data path the agents run (`peer-a`'s, in a fabric made by
    /// [`Fabric::two_clusters_each`]).
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

    /// Two clusters whose agents run `datapath`; on the sockmap and kTLS paths each cluster gets a
    /// cgroup of its own, with its agent in it, and [`Fabric::listen`] and
    /// [`Fabric::connect`] make their sockets inside it.
    pub fn two_clusters_on(datapath: Datapath) -> Result<Fabric> {
        Self::on(clink_testbed::two_clusters()?, datapath)
    }

    /// Two clusters on `datapath` with allow-all policies and one tunneled service: a
    /// listener in cluster b (inside its cgroup on the kernel paths) exported as `svc` and
    /// imported into cluster a on `import_port`.
    pub fn with_service(datapath: Datapath, import_port: u16) -> Result<(Fabric, TcpListener)> {
        let fabric = Self::two_clusters_on(datapath)?;
        let service = fabric.listen(1)?;
        fabric.allow_all()?;
        fabric.export_import("svc", service.local_addr()?, import_port)?;
        Ok((fabric, service))
    }

    /// [`Fabric::with_service`] with more `clink-agent` flags: `args[0]` for `peer-a`,
    /// `args[1]` for `peer-b`.
    pub fn with_service_args(
        datapath: Datapath,
        import_port: u16,
        args: [&[&str]; 2],
    ) -> Result<(Fabric, TcpListener)> {
        let fabric = Self::on_with(clink_testbed::two_clusters()?, datapath, &args)?;
        let service = fabric.listen(1)?;
        fabric.allow_all()?;
        fabric.export_import("svc", service.local_addr()?, import_port)?;
        Ok((fabric, service))
    }

    /// Two clusters whose agents run different data paths (`a` for `peer-a`, `b` for
    /// `peer-b`): a kTLS agent must interoperate with a userspace one. Not for sockmap, whose
    /// cgroup set-up is per fabric.
    pub fn two_clusters_each(a: Datapath, b: Datapath) -> Result<Fabric> {
        anyhow::ensure!(
            a != Datapath::Sockmap && b != Datapath::Sockmap,
            "mixed fabrics take userspace and ktls agents"
        );
        let mut fabric = Self::on(clink_testbed::two_clusters()?, a)?;
        if b != a {
            let agent = &mut fabric.agents[1];
            agent.stop()?;
            agent
                .args
                .retain(|arg| arg != "--datapath" && arg != "ktls");
            let datapath = if b == Datapath::Ktls {
                "ktls"
            } else {
                "userspace"
            };
            agent.args.extend(["--datapath".into(), datapath.into()]);
            agent.start()?;
        }
        Ok(fabric)
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
        Self::on_with(topo, datapath, &[])
    }

    /// [`Fabric::on`], agent `i` started with `args[i]` too (if given).
    fn on_with(topo: Topology, datapath: Datapath, args: &[&[&str]]) -> Result<Fabric> {
        let dir = tempfile::Builder::new().prefix("clink-e2e-").tempdir()?;
        let certs = dir.path().join("certs");
        let names: Vec<String> = (0..topo.clusters().len())
            .map(|i| format!("peer-{}", (b'a' + i as u8) as char))
            .collect();
        let peers: Vec<&str> = names.iter().map(String::as_str).collect();
        make_certificates(&bin_path("clink")?, &certs, FABRIC, &peers)?;
        let mut agents = Vec::new();
        for (i, (name, cluster)) in names.iter().zip(topo.clusters()).enumerate() {
            let mut agent = Agent::new(
                name,
                cluster.netns(),
                &dir.path().join(name),
                &certs,
                GATEWAY_PORT,
            )?;
            agent.args = vec!["--label".into(), format!("cluster={}", &name[5..])];
            let extra = args.get(i).copied().unwrap_or_default();
            agent.args.extend(extra.iter().map(|a| (*a).to_owned()));
            if datapath == Datapath::Ktls {
                agent.args.extend(["--datapath".into(), "ktls".into()]);
            }
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
        // The kTLS path runs the connect hooks too (no splicing), in the same cgroup set-up;
        // the cluster's address is the node address its pods reach the agent at.
        if matches!(datapath, Datapath::Sockmap | Datapath::Ktls) {
            for (i, agent) in fabric.agents.iter_mut().enumerate() {
                let sandbox = SockmapSandbox::new(&agent.name)?;
                agent.sockmap = Some(sandbox.setup.clone());
                let node = fabric.topo.clusters()[i].ip().to_string();
                agent.args.extend(["--node-address".into(), node]);
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

    /// A client in a new pod of cluster `i`'s node (its own namespace on a veth pair, its
    /// process in the cluster's cgroup) connected to `service` (an Import's service address),
    /// checked to have landed on the Import listener `listener_port` at the node address.
    pub fn pod_client(
        &self,
        i: usize,
        service: SocketAddr,
        listener_port: u16,
    ) -> Result<PodClient> {
        let node = &self.topo.clusters()[i];
        let pod = clink_testbed::pod(node)?;
        let setup = self.agents[i]
            .sockmap
            .as_ref()
            .context("pods need the cluster's cgroup (sockmap or ktls fabric)")?;
        let sockets = Sockets::start(pod.netns(), &setup.cgroup)?;
        let stream = sockets.connect(service).with_context(|| {
            format!(
                "connect from the pod to {service}; agent log:\n{}",
                self.agents[i].log()
            )
        })?;
        let landed = stream.peer_addr()?;
        anyhow::ensure!(
            landed == SocketAddr::from((node.ip(), listener_port)),
            "the pod's connect to {service} landed on {landed}, not on the listener at the \
             node address"
        );
        Ok(PodClient {
            stream,
            _sockets: sockets,
            pod,
        })
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

/// A pod's client connection (see [`Fabric::pod_client`]). Fields drop in order: the
/// connection, the pod's process, then its namespace.
pub struct PodClient {
    pub stream: TcpStream,
    _sockets: Sockets,
    pub pod: Pod,
}
