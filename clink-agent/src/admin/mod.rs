//! The local admin API the `clink` CLI talks to: HTTP/1.1 with JSON bodies over a Unix socket
//! that only root can open (mode 0600 in a 0700 directory).
//!
//! | request | answer ([`types`]) |
//! |---|---|
//! | `GET /v1/status` | [`StatusResponse`]: agent name, gateway, data path, object counts, import ports, peers, counters, open connections per path, the served certificate (serial, expiry) |
//! | `GET /v1/connections` | [`ConnectionsResponse`]: every open tunneled connection and the path its payload takes |
//! | `GET /v1/objects/<Kind>[?namespace=NS][&name=N]` | JSON array of objects |
//! | `POST /v1/apply` (JSON array of objects) | [`ApplyResponse`], all or nothing |
//! | `DELETE /v1/objects/<Kind>/<namespace or _>/<name>` | [`DeleteResponse`] |
//!
//! Errors answer 4xx/5xx with an [`ErrorResponse`].

use std::path::PathBuf;

mod client;
mod server;
mod status;
pub mod types;

pub use client::Client;
pub use server::{bind, serve};
pub use types::{
    ApplyResponse, ConnectionsResponse, DeleteResponse, ErrorResponse, StatusResponse,
};

pub const DEFAULT_SOCKET: &str = "/run/clusterlink/admin.sock";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot reach the agent at {path}: {source} (is clink-agent running? point to its \
         socket with --admin or CLINK_ADMIN)"
    )]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {0} is in use by a running agent")]
    InUse(PathBuf),
    #[error("admin socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin API: {0}")]
    Http(String),
    #[error("{0}")]
    Api(String),
}
