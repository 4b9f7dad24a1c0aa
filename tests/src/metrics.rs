//! An agent's Prometheus metrics, as a test reads them.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clink_testbed::{wait_for, Netns};

use crate::traffic::connect_in;

/// The agents' metrics port (`--metrics` default) on loopback in their namespace.
pub const METRICS_PORT: u16 = 9090;

/// `GET /metrics` from the agent in `ns` (default metrics address).
pub fn scrape(ns: &Netns) -> Result<String> {
    scrape_at(ns, METRICS_PORT)
}

/// `GET /metrics` from the agent in `ns` whose metrics are on `127.0.0.1:<port>`.
pub fn scrape_at(ns: &Netns, port: u16) -> Result<String> {
    let mut s = connect_in(ns, SocketAddr::from(([127, 0, 0, 1], port)))?;
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

/// The sum of every sample whose series starts with `prefix`: a whole series, or a family
/// with its first labels (`clink_connections_closed_total{direction="egress"`).
pub fn total(scrape: &str, prefix: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum()
}

/// Waits until [`total`] of `prefix` reaches `at_least` at the agent in `ns` with its metrics
/// on `port`: how a test waits for an event the agent counts.
pub fn wait_metric(ns: &Netns, port: u16, prefix: &str, at_least: f64) -> Result<()> {
    let mut last = String::new();
    wait_for(
        &format!("{prefix} >= {at_least} in {}", ns.name()),
        Duration::from_secs(10),
        || {
            last = scrape_at(ns, port).unwrap_or_default();
            total(&last, prefix) >= at_least
        },
    )
    .with_context(|| format!("metrics:\n{last}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_sums_the_matching_series() {
        let text = "# HELP clink_x X\n\
                    clink_x_total{reason=\"a\"} 2\n\
                    clink_x_total{reason=\"b\"} 3\n\
                    clink_y_total 7\n";
        assert_eq!(total(text, "clink_x_total"), 5.0);
        assert_eq!(total(text, "clink_x_total{reason=\"b\"}"), 3.0);
        assert_eq!(total(text, "clink_z_total"), 0.0);
        assert_eq!(sample(text, "clink_y_total"), 7.0);
    }
}
