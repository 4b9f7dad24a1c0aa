//! "Clusters" as network namespaces, joined by a veth pair or through a bridged "wan".

use std::net::Ipv4Addr;

use anyhow::Result;

use crate::names::next_id;
use crate::netns::{ip, Netns};

/// One cluster: a namespace with one interface towards the others.
#[derive(Debug)]
pub struct Cluster {
    netns: Netns,
    ifname: String,
    ip: Ipv4Addr,
}

impl Cluster {
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The cluster's address on its link to the other clusters.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The cluster's interface towards the other clusters.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }
}

/// Clusters that can reach each other by IP, and nothing else. Dropping it removes every
/// namespace, interface and process in it.
#[derive(Debug)]
pub struct Topology {
    clusters: Vec<Cluster>,
    wan: Option<Netns>,
}

impl Topology {
    pub fn a(&self) -> &Cluster {
        &self.clusters[0]
    }

    pub fn b(&self) -> &Cluster {
        &self.clusters[1]
    }

    /// # Panics
    /// On a topology from [`two_clusters`].
    pub fn c(&self) -> &Cluster {
        self.clusters
            .get(2)
            .expect("cluster c exists only in three_clusters()")
    }

    pub fn clusters(&self) -> &[Cluster] {
        &self.clusters
    }

    /// The namespace holding the bridge, in [`three_clusters`].
    pub fn wan(&self) -> Option<&Netns> {
        self.wan.as_ref()
    }
}

/// Clusters `a` and `b` joined by one veth pair, addresses from a private /30.
pub fn two_clusters() -> Result<Topology> {
    let id = next_id();
    let [ip_a, ip_b] = hosts::<2>(Ipv4Addr::new(10, 0, 0, 0), 8, 30, id);
    let a = Netns::with_id(id, "a")?;
    let b = Netns::with_id(id, "b")?;
    let (if_a, if_b) = (ifname(id, "a"), ifname(id, "b"));
    ip(veth_pair(&if_a, &a, &if_b, &b).split_whitespace())?;
    let a = configure(a, if_a, ip_a, 30)?;
    let b = configure(b, if_b, ip_b, 30)?;
    Ok(Topology {
        clusters: vec![a, b],
        wan: None,
    })
}

/// Clusters `a`, `b` and `c`, each with a veth to a bridge in a "wan" namespace, addresses
/// from one private /29.
pub fn three_clusters() -> Result<Topology> {
    let id = next_id();
    let ips = hosts::<3>(Ipv4Addr::new(172, 16, 0, 0), 12, 29, id);
    let wan = Netns::with_id(id, "wan")?;
    let bridge = ifname(id, "br");
    wan.ip(["link", "add", &bridge, "type", "bridge"])?;
    wan.ip(["link", "set", &bridge, "up"])?;
    let mut clusters = Vec::new();
    for (role, addr) in ["a", "b", "c"].into_iter().zip(ips) {
        let netns = Netns::with_id(id, role)?;
        let (inner, outer) = (ifname(id, role), ifname(id, &format!("{role}w")));
        ip(veth_pair(&inner, &netns, &outer, &wan).split_whitespace())?;
        wan.ip(["link", "set", &outer, "master", &bridge, "up"])?;
        clusters.push(configure(netns, inner, addr, 29)?);
    }
    Ok(Topology {
        clusters,
        wan: Some(wan),
    })
}

/// A "pod" of a cluster's "node": its own network namespace, joined to the node's namespace by
/// a veth pair, as a Kubernetes pod is to its node. Its default route goes through the node,
/// so it reaches the node's address ([`Cluster::ip`]) as a pod reaches its node's hostIP.
/// Dropping it removes the namespace (and the veth pair with it).
#[derive(Debug)]
pub struct Pod {
    netns: Netns,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
}

impl Pod {
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The pod's address (on the veth pair).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The node's end of the veth pair, the pod's default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }
}

/// Makes a pod on `node` (addresses from a private /30 of 10.244.0.0/16, the usual pod range).
pub fn pod(node: &Cluster) -> Result<Pod> {
    let id = next_id();
    let [gateway, pod_ip] = hosts::<2>(Ipv4Addr::new(10, 244, 0, 0), 16, 30, id);
    let netns = Netns::with_id(id, "p")?;
    let (inner, outer) = (ifname(id, "p"), ifname(id, "n"));
    ip(veth_pair(&inner, &netns, &outer, node.netns()).split_whitespace())?;
    node.netns()
        .ip(["addr", "add", &format!("{gateway}/30"), "dev", &outer])?;
    node.netns().ip(["link", "set", &outer, "up"])?;
    netns.ip(["addr", "add", &format!("{pod_ip}/30"), "dev", &inner])?;
    netns.ip(["link", "set", &inner, "up"])?;
    netns.ip(["route", "add", "default", "via", &gateway.to_string()])?;
    Ok(Pod {
        netns,
        ip: pod_ip,
        gateway,
    })
}

/// `ip` arguments for a veth pair made directly inside two namespaces, so that the host's
/// own namespace never holds either end.
fn veth_pair(name: &str, netns: &Netns, peer: &str, peer_netns: &Netns) -> String {
    format!(
        "link add {name} netns {} type veth peer name {peer} netns {}",
        netns.name(),
        peer_netns.name()
    )
}

fn configure(netns: Netns, ifname: String, ip: Ipv4Addr, prefix_len: u8) -> Result<Cluster> {
    netns.ip(["addr", "add", &format!("{ip}/{prefix_len}"), "dev", &ifname])?;
    netns.ip(["link", "set", &ifname, "up"])?;
    Ok(Cluster { netns, ifname, ip })
}

/// `ck<pid in hex>-<n>[role]`, at most 15 bytes (IFNAMSIZ - 1) for roles of up to 2 bytes.
///
/// The name need only be unique inside its namespace, so wrapping `n` is harmless; it is kept
/// unique per process and call anyway so that `ip` output names the test that made it.
fn ifname(id: u32, role: &str) -> String {
    format!("ck{:x}-{}{role}", std::process::id(), id % 10_000)
}

/// The first `N` host addresses of the `/subnet_len` block that (pid, id) picks inside the
/// private `pool/pool_len`. Parallel test processes get different blocks, not that it matters
/// inside separate namespaces, but it keeps captures and logs unambiguous.
fn hosts<const N: usize>(pool: Ipv4Addr, pool_len: u8, subnet_len: u8, id: u32) -> [Ipv4Addr; N] {
    let blocks = 1u64 << (subnet_len - pool_len);
    let block = (u64::from(std::process::id()) * 4096 + u64::from(id)) % blocks;
    let network = u32::from(pool) + (block as u32) * (1 << (32 - subnet_len));
    std::array::from_fn(|i| Ipv4Addr::from(network + 1 + i as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_fit_ifnamsiz() {
        // Largest pid (pid_max is at most 2^22) and largest wrapped counter.
        let worst = format!("ck{:x}-{}{}", (1u32 << 22) - 1, 9_999, "aw");
        assert!(worst.len() <= 15, "{worst}");
        assert!(ifname(u32::MAX, "br").len() <= 15);
    }

    #[test]
    fn hosts_stay_inside_pool_and_block() {
        for id in [0, 1, 4095, 4096, u32::MAX] {
            let [a, b] = hosts::<2>(Ipv4Addr::new(10, 0, 0, 0), 8, 30, id);
            assert_eq!(a.octets()[0], 10);
            assert_eq!(u32::from(b), u32::from(a) + 1);
            assert_eq!(u32::from(a) % 4, 1, "{a} is the first host of its /30");
            let [x, _, z] = hosts::<3>(Ipv4Addr::new(172, 16, 0, 0), 12, 29, id);
            assert_eq!(
                u32::from(x) & 0xfff0_0000,
                u32::from(Ipv4Addr::new(172, 16, 0, 0))
            );
            assert_eq!(u32::from(x) % 8, 1);
            assert_eq!(u32::from(z) % 8, 3);
        }
    }
}
