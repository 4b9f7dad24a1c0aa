//! ClusterLink-rs agent library: everything the `clink-agent` daemon and the `clink` CLI share.
//! See ARCHITECTURE.md for how the modules fit together and the flow of one connection.

pub mod admin;
pub mod agent;
pub mod api;
pub mod cli;
pub mod clients;
pub mod connections;
pub mod dataplane;
pub mod k8s;
pub mod kernel;
pub mod lb;
pub mod lifetime;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod peer;
pub mod policy;
pub mod state;
pub mod store;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod wire;
