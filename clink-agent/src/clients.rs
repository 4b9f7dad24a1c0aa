//! Client attributes in standalone mode: a file maps client address ranges to the namespace,
//! service account and labels policies see as `client.clusterlink.net/*` (in Kubernetes mode
//! a Pod cache provides them instead).
//!
//! ```yaml
//! - cidr: 10.1.0.0/16
//!   namespace: shop
//!   serviceAccount: frontend
//!   labels: {app: web}
//! ```
//! The most specific range containing the client's address wins.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::{attr, insert_labels, Attributes};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    cidr: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

fn parse_range(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>().map_err(|_| {
        format!("{s:?} is not a CIDR range (ADDRESS/LENGTH, e.g. 10.1.0.0/16 or fd00::/8)")
    })
}

/// An IPv6 range also holds the IPv4 addresses whose IPv4-mapped form it contains (`::/0`
/// holds every client), as it would for a dual-stack listener that never unmapped them.
fn contains(range: &IpNet, ip: IpAddr) -> bool {
    match (range, ip) {
        (IpNet::V6(range), IpAddr::V4(v4)) => range.contains(&v4.to_ipv6_mapped()),
        _ => range.contains(&ip),
    }
}

/// Prefix length in the IPv6 address space (IPv4 ranges as IPv4-mapped), so that an IPv4
/// range sorts as more specific than an IPv6 range that holds it.
fn specificity(range: &IpNet) -> u8 {
    match range {
        IpNet::V4(v4) => v4.prefix_len() + 96,
        IpNet::V6(v6) => v6.prefix_len(),
    }
}

/// Where the attributes of a local client come from.
pub enum Clients {
    /// Standalone: address ranges from `--client-attributes`.
    Ranges(ClientMap),
    /// Kubernetes: the pods of this node, by pod IP.
    Pods(std::sync::Arc<crate::k8s::PodCache>),
}

impl Default for Clients {
    fn default() -> Self {
        Clients::Ranges(ClientMap::default())
    }
}

impl Clients {
    /// The attributes policies see for a client at `ip` (empty when nothing is known).
    pub fn attributes(&self, ip: IpAddr) -> Attributes {
        let ip = unmapped(ip);
        match self {
            Clients::Ranges(map) => map.attributes(ip),
            Clients::Pods(pods) => pods.attributes(ip),
        }
    }
}

/// A dual-stack listener sees IPv4 clients as IPv4-mapped IPv6 addresses.
pub fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[derive(Debug, Default)]
pub struct ClientMap {
    /// Most specific first.
    ranges: Vec<(IpNet, Attributes)>,
}

impl ClientMap {
    pub fn load(path: &Path) -> Result<ClientMap, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<ClientMap, String> {
        let entries: Vec<Entry> = yaml_serde::from_str(text).map_err(|e| e.to_string())?;
        let mut ranges = Vec::new();
        for (i, e) in entries.into_iter().enumerate() {
            let range = parse_range(&e.cidr).map_err(|m| format!("[{i}].cidr: {m}"))?;
            let mut attrs = Attributes::new();
            if let Some(ns) = e.namespace {
                attrs.insert(attr::CLIENT_NAMESPACE.to_owned(), ns);
            }
            if let Some(sa) = e.service_account {
                attrs.insert(attr::CLIENT_SERVICE_ACCOUNT.to_owned(), sa);
            }
            for (k, v) in &e.labels {
                crate::api::check_label(k, v).map_err(|m| format!("[{i}].labels: {m}"))?;
            }
            insert_labels(&mut attrs, attr::CLIENT_LABELS, &e.labels);
            ranges.push((range, attrs));
        }
        ranges.sort_by_key(|(r, _)| std::cmp::Reverse(specificity(r)));
        Ok(ClientMap { ranges })
    }

    /// The attributes of a client at `ip` (empty when no range contains it).
    pub fn attributes(&self, ip: IpAddr) -> Attributes {
        let ip = unmapped(ip);
        self.ranges
            .iter()
            .find(|(r, _)| contains(r, ip))
            .map(|(_, a)| a.clone())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_specific_range_wins() {
        let map = ClientMap::parse(
            "- cidr: 10.0.0.0/8\n  namespace: wide\n- cidr: 10.1.2.0/24\n  namespace: shop\n  \
             serviceAccount: web\n  labels: {app: front}\n- cidr: fd00::/8\n  namespace: v6\n",
        )
        .unwrap();
        let a = map.attributes("10.1.2.3".parse().unwrap());
        assert_eq!(a["client.clusterlink.net/namespace"], "shop");
        assert_eq!(a["client.clusterlink.net/service-account"], "web");
        assert_eq!(a["client.clusterlink.net/labels.app"], "front");
        let a = map.attributes("10.9.9.9".parse().unwrap());
        assert_eq!(a["client.clusterlink.net/namespace"], "wide");
        // Dual-stack listeners see IPv4 clients as IPv4-mapped IPv6.
        let a = map.attributes("::ffff:10.9.9.9".parse().unwrap());
        assert_eq!(a["client.clusterlink.net/namespace"], "wide");
        assert_eq!(
            map.attributes("fd12::1".parse().unwrap())["client.clusterlink.net/namespace"],
            "v6"
        );
        assert!(map.attributes("192.168.0.1".parse().unwrap()).is_empty());
    }

    #[test]
    fn ipv6_ranges_hold_ipv4_mapped_clients() {
        let map = ClientMap::parse(
            "- cidr: ::/0\n  namespace: any\n- cidr: ::ffff:10.0.0.0/104\n  namespace: mapped\n\
             - cidr: 10.1.0.0/16\n  namespace: v4\n",
        )
        .unwrap();
        let ns = |ip: &str| {
            map.attributes(ip.parse().unwrap())["client.clusterlink.net/namespace"].clone()
        };
        assert_eq!(ns("10.1.2.3"), "v4");
        assert_eq!(ns("::ffff:10.1.2.3"), "v4");
        assert_eq!(ns("10.2.0.1"), "mapped");
        assert_eq!(ns("192.168.0.1"), "any");
        assert_eq!(ns("2001:db8::1"), "any");
    }

    #[test]
    fn bad_ranges_are_named() {
        assert!(ClientMap::parse("- cidr: 10.0.0.0/33\n")
            .unwrap_err()
            .starts_with("[0].cidr: "));
        assert!(ClientMap::parse("- cidr: 10.0.0.1\n")
            .unwrap_err()
            .contains("ADDRESS/LENGTH"));
        assert!(ClientMap::parse("- cidr: nope\n")
            .unwrap_err()
            .contains("CIDR"));
        assert!(
            ClientMap::parse("- cidr: 10.0.0.0/8\n  labels: {'bad key': x}\n")
                .unwrap_err()
                .contains("labels")
        );
        assert!(ClientMap::parse("- cidr: 10.0.0.0/8\n  color: red\n").is_err());
    }
}
