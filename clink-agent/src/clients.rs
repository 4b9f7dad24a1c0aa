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

/// An address range, kept as an IPv6 prefix (IPv4 as IPv4-mapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    base: u128,
    len: u32,
}

fn to_v6(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl Range {
    fn parse(s: &str) -> Result<Range, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR range (ADDRESS/LENGTH)"))?;
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u32 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{len:?} is not a prefix length (0-{max})"))?;
        let len = if ip.is_ipv4() { len + 96 } else { len };
        Ok(Range {
            base: to_v6(ip) & mask(len),
            len,
        })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        to_v6(ip) & mask(self.len) == self.base
    }
}

fn mask(len: u32) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    }
}

#[derive(Debug, Default)]
pub struct ClientMap {
    /// Most specific first.
    ranges: Vec<(Range, Attributes)>,
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
            let range = Range::parse(&e.cidr).map_err(|m| format!("[{i}].cidr: {m}"))?;
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
        ranges.sort_by_key(|(r, _)| std::cmp::Reverse(r.len));
        Ok(ClientMap { ranges })
    }

    /// The attributes of a client at `ip` (empty when no range contains it).
    pub fn attributes(&self, ip: IpAddr) -> Attributes {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.ranges
            .iter()
            .find(|(r, _)| r.contains(ip))
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
    fn bad_ranges_are_named() {
        assert!(ClientMap::parse("- cidr: 10.0.0.0/33\n")
            .unwrap_err()
            .starts_with("[0].cidr: "));
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
