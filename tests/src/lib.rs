//! End-to-end harness: real `clink-agent` processes in network-namespace clusters, configured
//! with the real `clink` CLI, and traffic whose content is checked by SHA-256.
//!
//! What is not specific to these tests (namespaces, cgroups, pin directories, agent files and
//! processes, certificates) comes from `clink-testbed`.

mod agent;
mod fabric;
mod files;
mod metrics;
mod sockmap;
mod traffic;

pub use agent::Agent;
pub use clink_testbed::require_root;
pub use fabric::{Fabric, PodClient, FABRIC, GATEWAY_PORT};
pub use files::tree;
pub use metrics::{sample, scrape, scrape_at, total, wait_metric, METRICS_PORT};
pub use sockmap::{Datapath, Sockets, SockmapSandbox, SockmapSetup};
pub use traffic::{
    ask, assert_intact, connect_in, exchange, half_close_exchange, listen_in, pattern_digest,
    read_hash, refused, refused_at, round_trip, send_pattern, tcp_state, transfer_both_ways,
    EchoService, NamedService, Patient, Pattern, Transfer,
};
